//! Writing and reading what leaves Temper: PEFT adapters, atomically.

pub mod atomic;
pub mod peft;

pub use atomic::{write_dir_atomically, write_file_atomically, WriteMode};
pub use peft::{Adapter, HostTensor, LoraPair};
