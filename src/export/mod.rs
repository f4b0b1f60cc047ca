//! Writing and reading what leaves Temper: PEFT adapters and merged models, atomically.

pub mod atomic;
pub mod experts;
pub mod gguf;
pub mod gguf_delta_net;
pub mod merge;
pub mod model_card;
pub mod ollama;
pub mod peft;
pub mod serving;
pub mod serving_delta_net;
pub mod shard;
pub mod verify;

pub use atomic::{write_dir_atomically, write_file_atomically, WriteMode};
pub use merge::{merge_model, write_merged, MergeDtype, MergeInput, MergeOptions, MergeSummary};
pub use peft::{Adapter, HostTensor, LoraPair};
pub use verify::{verify_merge, VerifyReport};
