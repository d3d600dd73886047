//! Model hyper-parameters, read from GGUF metadata or an HF `config.json`.
use crate::ModelError;
use crate::gguf::Gguf;
use kv_tensor::KvLayout;
use serde::Deserialize;

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimensions `(2i, 2i+1)` rotate together. llama.cpp's converter permutes the Q/K weights
    /// of Llama-architecture models into this layout, so GGUF `llama` tensors need it.
    Interleaved,
    /// Dimensions `(i, i + d/2)` rotate together ("rotate half"): HF checkpoints, and GGUF
    /// files of architectures llama.cpp runs with NeoX RoPE (qwen2, qwen3).
    Halves,
}

/// Architecture switches on top of the Llama block.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Architecture name (`llama`, `qwen2`, `qwen3`, `mistral`).
    pub arch: String,
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// MLP inner size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Trained context length.
    pub context: usize,
    /// RoPE pair layout of the loaded weights.
    pub rope_layout: RopeLayout,
    /// Qwen2-style biases on q, k, v.
    pub qkv_bias: bool,
    /// Qwen3-style RMSNorm on each head of q and k (before RoPE).
    pub qk_norm: bool,
}

impl LlamaConfig {
    /// The KV geometry.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            layers: self.layers,
            kv_heads: self.kv_heads,
            q_heads: self.q_heads,
            head_dim: self.head_dim,
        }
    }

    /// Reads the config from GGUF metadata (`<arch>.block_count`, …).
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?.to_string();
        let (rope_layout, qkv_bias, qk_norm) = match arch.as_str() {
            "llama" | "mistral" => (RopeLayout::Interleaved, false, false),
            "qwen2" => (RopeLayout::Halves, true, false),
            "qwen3" => (RopeLayout::Halves, false, true),
            other => return Err(ModelError::UnsupportedArchitecture(other.into())),
        };
        let k = |s: &str| format!("{arch}.{s}");
        let u = |s: &str| g.get_u64(&k(s)).map(|v| v as usize);
        let hidden = u("embedding_length")?;
        let q_heads = u("attention.head_count")?;
        let kv_heads = g
            .get_u64(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(q_heads);
        let head_dim = match g.get_u64(&k("attention.key_length")) {
            Ok(v) => v as usize,
            Err(_) if q_heads > 0 && hidden % q_heads == 0 => hidden / q_heads,
            Err(e) => return Err(e),
        };
        let vocab = match g.get_strings("tokenizer.ggml.tokens") {
            Ok(t) => t.len(),
            Err(_) => u("vocab_size")?,
        };
        let cfg = Self {
            layers: u("block_count")?,
            hidden,
            q_heads,
            kv_heads,
            head_dim,
            ffn: u("feed_forward_length")?,
            vocab,
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rms_eps: g
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            context: u("context_length")?,
            rope_layout,
            qkv_bias,
            qk_norm,
            arch,
        };
        cfg.validate()
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_json(text: &str, path: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: String,
            num_hidden_layers: usize,
            hidden_size: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            intermediate_size: usize,
            vocab_size: usize,
            rope_theta: Option<f64>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: usize,
        }
        let hf: Hf = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: path.into(),
            message: e.to_string(),
        })?;
        let (qkv_bias, qk_norm) = match hf.model_type.as_str() {
            "llama" | "mistral" => (false, false),
            "qwen2" => (true, false),
            "qwen3" => (false, true),
            other => return Err(ModelError::UnsupportedArchitecture(other.into())),
        };
        Self {
            arch: hf.model_type,
            layers: hf.num_hidden_layers,
            hidden: hf.hidden_size,
            q_heads: hf.num_attention_heads,
            kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            ffn: hf.intermediate_size,
            vocab: hf.vocab_size,
            rope_theta: hf.rope_theta.unwrap_or(10000.0),
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            context: hf.max_position_embeddings,
            rope_layout: RopeLayout::Halves,
            qkv_bias,
            qk_norm,
        }
        .validate()
    }

    fn validate(self) -> Result<Self, ModelError> {
        let ok = self.layers > 0
            && self.hidden > 0
            && self.q_heads > 0
            && self.kv_heads > 0
            && self.q_heads.is_multiple_of(self.kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            && self.ffn > 0
            && self.vocab > 0
            && self.context > 0;
        if ok {
            Ok(self)
        } else {
            Err(ModelError::Metadata {
                key: format!("{}.*", self.arch),
                problem: format!("inconsistent hyper-parameters {self:?}"),
            })
        }
    }
}
