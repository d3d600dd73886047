//! The typed errors of model loading and running.
use thiserror::Error;

/// What went wrong loading or running a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a GGUF file.
    #[error("not a GGUF file (magic {magic:#010x})")]
    BadMagic {
        /// The four bytes found.
        magic: u32,
    },
    /// A GGUF version this reader does not know.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends before a structure it announces.
    #[error("file truncated while reading {what} at byte {offset}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Where.
        offset: u64,
    },
    /// A structurally invalid value (bad type tag, absurd count, bad UTF-8…).
    #[error("corrupt GGUF: {what} at byte {offset}")]
    Corrupt {
        /// What was wrong.
        what: String,
        /// Where.
        offset: u64,
    },
    /// A tensor of a ggml type we cannot dequantise.
    #[error("tensor {tensor}: unsupported ggml type {ggml_type}")]
    UnsupportedTensorType {
        /// The tensor.
        tensor: String,
        /// The type id.
        ggml_type: u32,
    },
    /// A required metadata key is absent or has the wrong type.
    #[error("metadata key {key}: {problem}")]
    Metadata {
        /// The key.
        key: String,
        /// Missing, or of the wrong type.
        problem: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    /// A tensor has an unexpected shape.
    #[error("tensor {tensor}: expected shape {expected:?}, got {got:?}")]
    TensorShape {
        /// The tensor.
        tensor: String,
        /// Expected dims.
        expected: Vec<usize>,
        /// Found dims.
        got: Vec<usize>,
    },
    /// An architecture the loader does not implement.
    #[error("unsupported architecture {0:?}")]
    UnsupportedArchitecture(String),
    /// The tokenizer could not be built or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A JSON config (HF config.json) is invalid.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The prompt is longer than the model's context.
    #[error("prompt of {tokens} tokens exceeds the model's context of {context} tokens")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Context length.
        context: usize,
    },
    /// An empty prompt.
    #[error("empty prompt")]
    EmptyPrompt,
    /// Options that cannot be combined.
    #[error("incompatible options: {0}")]
    IncompatibleOptions(&'static str),
    /// A cache error during the forward pass.
    #[error("layer {layer}: {source}")]
    Cache {
        /// The layer.
        layer: usize,
        /// The cache error.
        source: kv_tensor::KvError,
    },
    /// Compression at the end of prefill failed.
    #[error("layer {layer}: {source}")]
    Compress {
        /// The layer.
        layer: usize,
        /// The axis error.
        source: kv_tensor::AxisError,
    },
}
