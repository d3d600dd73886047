//! One decode step on the host: the single token's hidden state stays a plain vector through
//! every block (RMSNorm, RoPE, SwiGLU, residual adds), the projections run the host
//! matrix–vector products, and only the cache is handed tensors.
//!
//! Why: on one row, each burn-ndarray op allocates and dispatches; a block's two dozen small
//! ops (norms, rotations, slices, the gated activation) cost about as much as its weights take
//! to stream. The arithmetic is the same as the tensor path's, in a fixed summation order.
use super::{Block, Llama};
use crate::ModelError;
use crate::config::RopeLayout;
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::KvBackend;
use kv_tensor::LayerCache;

/// Host copies of the small parameters a decode step reads (norm weights, biases, RoPE tables).
#[derive(Debug, Clone)]
pub(crate) struct HostParams {
    blocks: Vec<BlockParams>,
    norm: Vec<f32>,
    /// `[context][head_dim / 2]` cosines and sines.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

#[derive(Debug, Clone)]
struct BlockParams {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    bqkv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

fn host_vec<B: KvBackend, const D: usize>(t: &Tensor<B, D>) -> Option<Vec<f32>> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .ok()
}

impl HostParams {
    /// Copies the parameters out of `model`'s tensors; `None` when the backend will not hand
    /// them over as f32.
    pub(crate) fn new<B: KvBackend>(model: &Llama<B>) -> Option<Self> {
        let blocks = model
            .blocks
            .iter()
            .map(|b: &Block<B>| {
                Some(BlockParams {
                    attn_norm: host_vec(&b.attn_norm)?,
                    ffn_norm: host_vec(&b.ffn_norm)?,
                    bqkv: match &b.bqkv {
                        Some(t) => Some(host_vec(t)?),
                        None => None,
                    },
                    q_norm: match &b.q_norm {
                        Some(t) => Some(host_vec(t)?),
                        None => None,
                    },
                    k_norm: match &b.k_norm {
                        Some(t) => Some(host_vec(t)?),
                        None => None,
                    },
                })
            })
            .collect::<Option<_>>()?;
        let (cos, sin) = model.rope.tables();
        Some(Self {
            blocks,
            norm: host_vec(&model.norm)?,
            cos: host_vec(cos)?,
            sin: host_vec(sin)?,
        })
    }
}

/// The typed error of a host step whose data went missing (host parameters exist only while
/// every projection has its host copy, so this does not happen).
fn lost(what: &str) -> ModelError {
    ModelError::Metadata {
        key: what.into(),
        problem: "the host decode path has no copy of it".into(),
    }
}

fn host_apply<B: KvBackend>(
    w: &crate::linear::Linear<B>,
    x: &[f32],
) -> Result<Vec<f32>, ModelError> {
    w.apply_host(x)
        .ok_or_else(|| lost("a projection's host rows"))
}

/// `x / sqrt(mean(x²) + eps) · w`, in place on each `w.len()`-wide piece of `x`.
fn rms_norm(x: &mut [f32], w: &[f32], eps: f64) {
    for piece in x.chunks_exact_mut(w.len()) {
        let ms = piece.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps as f32).sqrt();
        for (v, g) in piece.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// Rotates every `d`-wide head of `x` to position `pos` with the tables' row `pos`.
fn rope(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = match layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

impl<B: KvBackend> Llama<B> {
    /// Next-token logits `[1, vocab]` of one token appended to `caches`, computed on the host;
    /// `None` (nothing done) without host parameters. They exist only while every projection
    /// has its host copy, so no step stops half-way.
    pub(super) fn decode_host<C: LayerCache<B>>(
        &self,
        id: u32,
        caches: &mut [C],
    ) -> Result<Option<Tensor<B, 2>>, ModelError> {
        let Some(p) = &self.host else {
            return Ok(None);
        };
        let c = &self.config;
        let (qh, kvh, d) = (c.q_heads, c.kv_heads, c.head_dim);
        let device = self.embed.device();
        let pos = caches[0].len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![id as i64], [1]), &device);
        let Some(mut x) = host_vec(&self.embed.clone().select(0, idx)) else {
            return Ok(None);
        };
        let half = d / 2;
        let (cos, sin) = (
            &p.cos[pos * half..(pos + 1) * half],
            &p.sin[pos * half..(pos + 1) * half],
        );
        let tensor = |v: Vec<f32>, heads: usize| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, heads, 1, d]), &device)
        };
        for (l, ((blk, bp), cache)) in self
            .blocks
            .iter()
            .zip(&p.blocks)
            .zip(caches.iter_mut())
            .enumerate()
        {
            let mut h = x.clone();
            rms_norm(&mut h, &bp.attn_norm, c.rms_eps);
            let mut qkv = host_apply(&blk.wqkv, &h)?;
            if let Some(b) = &bp.bqkv {
                for (v, b) in qkv.iter_mut().zip(b) {
                    *v += b;
                }
            }
            let v = qkv.split_off((qh + kvh) * d);
            let mut k = qkv.split_off(qh * d);
            let mut q = qkv;
            if let (Some(qn), Some(kn)) = (&bp.q_norm, &bp.k_norm) {
                rms_norm(&mut q, qn, c.rms_eps);
                rms_norm(&mut k, kn, c.rms_eps);
            }
            rope(&mut q, d, cos, sin, c.rope_layout);
            rope(&mut k, d, cos, sin, c.rope_layout);
            cache
                .append(tensor(k, kvh), tensor(v, kvh))
                .map_err(|source| ModelError::Compress { layer: l, source })?;
            let att = cache
                .attend(tensor(q, qh))
                .map_err(|source| ModelError::Cache { layer: l, source })?;
            let att = host_vec(&att).ok_or_else(|| lost("attention output"))?;
            let o = host_apply(&blk.wo, &att)?;
            for (x, o) in x.iter_mut().zip(&o) {
                *x += o;
            }
            let mut h = x.clone();
            rms_norm(&mut h, &bp.ffn_norm, c.rms_eps);
            let gu = host_apply(&blk.w_gate_up, &h)?;
            let (g, u) = gu.split_at(c.ffn);
            let a: Vec<f32> = g
                .iter()
                .zip(u)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = host_apply(&blk.w_down, &a)?;
            for (x, o) in x.iter_mut().zip(&down) {
                *x += o;
            }
        }
        rms_norm(&mut x, &p.norm, c.rms_eps);
        let logits = host_apply(&self.head, &x)?;
        let n = logits.len();
        Ok(Some(Tensor::from_data(
            TensorData::new(logits, [1, n]),
            &device,
        )))
    }
}
