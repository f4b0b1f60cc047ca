//! Inspect a checkpoint without loading it: architecture switches and every tensor's dtype and
//! shape, through the library API only.
//!
//!     cargo run --example inspect_checkpoint -- ../shared/models/stories260K

use std::path::PathBuf;

use temper::model::{Checkpoint, DecoderConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: inspect_checkpoint MODEL_DIR")?);
    let (_, cfg) = DecoderConfig::from_model_dir(&dir)?;
    println!(
        "{}: {} layers, hidden {}, {} heads ({} KV) x {}, vocab {}, {} parameters",
        cfg.model_type,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.num_parameters()
    );
    let ckpt = Checkpoint::open(&dir)?;
    let mut names: Vec<&String> = ckpt.tensor_names().collect();
    names.sort();
    for name in names {
        if let Some((dtype, shape)) = ckpt.info(name) {
            println!("{name:60} {dtype:?} {shape:?}");
        }
    }
    Ok(())
}
