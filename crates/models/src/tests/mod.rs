//! The crate's tests on tiny model files the tests write themselves: GGUF robustness, RoPE
//! layouts, block decode and batched decode against the one-token path.
mod support;

mod block_decode;
mod decode_batch;
mod gguf_robustness;
mod rope_layouts;
