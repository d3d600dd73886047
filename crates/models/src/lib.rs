//! Llama-family decoders in burn, generic over the backend, with the KV cache behind
//! `kv_tensor::LayerCache`: GGUF and HF safetensors loading, tokenizer and chat template, and a
//! generation loop over any cache.
#![warn(missing_docs)]

mod chat;
mod config;
mod dequant;
mod error;
mod gemm;
mod generate;
pub mod gguf;
mod linear;
mod llama;
mod loader;
pub mod paths;
mod quant_rows;
mod rope;
pub mod speed;
mod tokenizer;
mod weights;
// The crate's tests on tiny model files the tests write themselves, in the unit-test binary
// like every crate's tests.
#[cfg(test)]
mod tests;

pub use chat::{ChatTemplate, Message};
pub use config::{LlamaConfig, RopeLayout};
pub use dequant::GgmlType;
pub use error::ModelError;
pub use generate::{GenerateOptions, Generation, Sampling, generate, pick};
pub use llama::{Llama, Logits, PrefillOptions, REPEAT_PROMPT};
pub use loader::{LoadedModel, load_gguf};
pub use rope::Rope;
pub use tokenizer::Tokenizer;
pub use weights::{RawTensor, SafetensorsWeights, WeightSource};
