"""Compare a LoRA GGUF written by `temper export --format gguf` with the one llama.cpp's
convert_lora_to_gguf.py writes for the same adapter, using llama.cpp's own reader (the `gguf`
package's GGUFReader). Run by hand:

    pip install gguf
    python convert_lora_to_gguf.py --base BASE --outfile ref.gguf --outtype f32 ADAPTER
    temper export --adapter ADAPTER --base BASE --format gguf --out ours.gguf
    python scripts/reference/check_gguf.py ours.gguf ref.gguf
"""

import sys

import numpy as np
from gguf import GGUFReader


def fields(r):
    # general.name is informational (the converter derives it from the folder name).
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and k != "general.name"}


def main(ours_path, ref_path):
    ours, ref = GGUFReader(ours_path), GGUFReader(ref_path)
    fo, fr = fields(ours), fields(ref)
    assert fo == fr, f"metadata differs:\n ours {fo}\n ref  {fr}"
    to = {t.name: t for t in ours.tensors}
    tr = {t.name: t for t in ref.tensors}
    assert set(to) == set(tr), f"tensor names differ: {sorted(set(to) ^ set(tr))}"
    worst = 0.0
    for name, t in tr.items():
        o = to[name]
        assert o.tensor_type == t.tensor_type, f"{name}: type {o.tensor_type} vs {t.tensor_type}"
        assert list(o.shape) == list(t.shape), f"{name}: shape {o.shape} vs {t.shape}"
        worst = max(worst, float(np.abs(o.data.astype(np.float32) - t.data.astype(np.float32)).max()))
    print(f"{len(tr)} tensors, metadata {fr}, max |difference| {worst:g}")
    assert worst == 0.0, "tensors differ"


if __name__ == "__main__":
    main(*sys.argv[1:3])
