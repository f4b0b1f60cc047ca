//! One integration-test binary (one link step on small CI machines).

mod common;
mod cli;
mod data_bad_rows;
mod data_chat;
mod data_formats;
mod data_packing;
mod data_preview;
mod hub;
mod parity;
