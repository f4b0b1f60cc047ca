//! bitsandbytes' 4-bit formats (issue 10): Temper's quantizer gives the codes and absmax that
//! `bitsandbytes.functional.quantize_4bit` gives, and the same dequantized values, bit for bit
//! (tests/fixtures/quant, made by scripts/reference/make_quant_fixtures.py).

use safetensors::{Dtype, SafeTensors};
use temper::quant::{dequantize_4bit, quantize_4bit, FourBit};

use crate::common::fixtures;

fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    temper::export::shard::bytes_to_f32(view.dtype(), view.data()).expect("float tensor")
}

#[test]
fn nf4_and_fp4_codes_absmax_and_dequantization_are_bitsandbytes_bit_for_bit() {
    let bytes = std::fs::read(fixtures().join("quant/bnb4bit.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 9);
    for (name, c) in cases {
        let kind = if c["quant_type"] == "nf4" { FourBit::Nf4 } else { FourBit::Fp4 };
        let blocksize = c["blocksize"].as_u64().unwrap() as usize;
        let input = st.tensor(&format!("{name}.input")).unwrap();
        assert_ne!(input.dtype(), Dtype::U8);
        let q = quantize_4bit(&f32s(&input), blocksize, kind);
        let want_packed = st.tensor(&format!("{name}.packed")).unwrap();
        assert_eq!(q.packed, want_packed.data(), "{name}: packed codes");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let want_absmax = f32s(&st.tensor(&format!("{name}.absmax")).unwrap());
        assert_eq!(bits(&q.absmax), bits(&want_absmax), "{name}: absmax");
        let want = f32s(&st.tensor(&format!("{name}.dequant")).unwrap());
        let got = dequantize_4bit(&q);
        assert_eq!(got.len(), want.len(), "{name}: dequantized length");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("{name}: dequantized value {i} is {} (code {}), bitsandbytes {}", got[i], q.packed[i / 2], want[i]);
        }
    }
}
