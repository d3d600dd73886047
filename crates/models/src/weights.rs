//! Where weights come from: a GGUF file or HF safetensors, seen through one small trait that
//! hands out dequantised f32 tensors under GGUF tensor names.
use crate::gguf::Gguf;
use crate::{GgmlType, ModelError};
use std::collections::HashMap;

/// A dequantised tensor: dims in GGUF order (fastest-varying first) and row-major values.
pub type RawTensor = (Vec<usize>, Vec<f32>);

/// A source of f32 weights, addressed by GGUF tensor names (`blk.3.attn_q.weight`).
pub trait WeightSource {
    /// A tensor's dims (GGUF order: fastest-varying first) and row-major values, or `None`
    /// when absent.
    fn fetch(&self, name: &str) -> Result<Option<RawTensor>, ModelError>;

    /// Like [`WeightSource::fetch`], but absence is an error.
    fn require(&self, name: &str) -> Result<RawTensor, ModelError> {
        self.fetch(name)?
            .ok_or_else(|| ModelError::MissingTensor(name.into()))
    }

    /// A tensor's ggml blocks as stored, with their type, where the source keeps quantised
    /// data (GGUF). Decode then streams the blocks instead of f32 weights. `None` (the default)
    /// when the source has no such tensor or no blocks.
    fn fetch_blocks(&self, name: &str) -> Option<(GgmlType, &[u8])> {
        let _ = name;
        None
    }
}

impl WeightSource for Gguf {
    fn fetch(&self, name: &str) -> Result<Option<RawTensor>, ModelError> {
        if self.tensors.contains_key(name) {
            self.tensor_f32(name).map(Some)
        } else {
            Ok(None)
        }
    }

    fn fetch_blocks(&self, name: &str) -> Option<(GgmlType, &[u8])> {
        self.tensor_bytes(name)
    }
}

/// HF safetensors shards, renamed to GGUF names on the fly.
pub struct SafetensorsWeights {
    tensors: HashMap<String, RawTensor>,
}

impl SafetensorsWeights {
    /// Reads every shard fully (F32, F16 and BF16 tensors).
    pub fn open(paths: &[std::path::PathBuf]) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
                path: path.display().to_string(),
                source,
            })?;
            let st =
                safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Corrupt {
                    what: format!("{}: {e}", path.display()),
                    offset: 0,
                })?;
            for (name, view) in st.tensors() {
                let data = view.data();
                let values: Vec<f32> = match view.dtype() {
                    safetensors::Dtype::F32 => data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    safetensors::Dtype::F16 => data
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    safetensors::Dtype::BF16 => data
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    other => {
                        return Err(ModelError::Corrupt {
                            what: format!("tensor {name}: unsupported dtype {other:?}"),
                            offset: 0,
                        });
                    }
                };
                // safetensors shapes are slowest-varying first; GGUF's are the reverse.
                let dims: Vec<usize> = view.shape().iter().rev().copied().collect();
                if let Some(g) = gguf_name(&name) {
                    tensors.insert(g, (dims, values));
                }
            }
        }
        Ok(Self { tensors })
    }
}

impl WeightSource for SafetensorsWeights {
    fn fetch(&self, name: &str) -> Result<Option<RawTensor>, ModelError> {
        Ok(self.tensors.get(name).cloned())
    }
}

/// HF tensor name → GGUF tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("model.").unwrap_or(hf);
    match hf {
        "embed_tokens.weight" => return Some("token_embd.weight".into()),
        "norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let g = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}"))
}
