//! The crate's tests on tiny model files the tests write themselves: GGUF robustness, RoPE
//! layouts, block decode, batched decode against the one-token path, and KVzip's reconstruction
//! pass.
mod support;

mod block_decode;
mod decode_batch;
mod gguf_robustness;
mod reconstruction;
mod rope_layouts;
