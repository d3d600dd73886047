//! The forward pass on the host: hidden states stay plain `[t][hidden]` vectors through every
//! block (RMSNorm, RoPE, SwiGLU, residual adds), projections run the host matrix–vector product
//! (a few rows) or burn's matmul (a prefill chunk), and only the cache is handed tensors, laid
//! out contiguously so that it reads them with one copy.
//!
//! Why: each burn-ndarray op allocates and dispatches, and its permuted views (heads split
//! out of a projection, swapped to `[heads][t][d]`) are copied element by element when read
//! back. On one decode row a block's two dozen small ops cost about as much as its weights
//! take to stream; on a prefill chunk the element-wise passes and strided copies took a
//! fifth of the time. The arithmetic is the tensor path's, in a fixed summation order.
use super::{Block, Llama, Observed, PrefillOptions, Step, cache_step};
use crate::ModelError;
use crate::config::RopeLayout;
use burn::tensor::{Tensor, TensorData};
use kv_tensor::KvBackend;
use kv_tensor::LayerCache;
use kv_tensor::exp_nonpositive;

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

/// The values of `t` on the host, by value: burn-ndarray hands over an unshared tensor's buffer
/// without a copy, and copies a shared one element by element.
fn host_vec<B: KvBackend, const D: usize>(t: Tensor<B, D>) -> Option<Vec<f32>> {
    t.into_data().convert::<f32>().into_vec::<f32>().ok()
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
                    attn_norm: host_vec(b.attn_norm.clone())?,
                    ffn_norm: host_vec(b.ffn_norm.clone())?,
                    bqkv: match &b.bqkv {
                        Some(t) => Some(host_vec(t.clone())?),
                        None => None,
                    },
                    q_norm: match &b.q_norm {
                        Some(t) => Some(host_vec(t.clone())?),
                        None => None,
                    },
                    k_norm: match &b.k_norm {
                        Some(t) => Some(host_vec(t.clone())?),
                        None => None,
                    },
                })
            })
            .collect::<Option<_>>()?;
        let (cos, sin) = model.rope.tables();
        Some(Self {
            blocks,
            norm: host_vec(model.norm.clone())?,
            cos: host_vec(cos.clone())?,
            sin: host_vec(sin.clone())?,
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

/// Rotates `x` (`[heads][t][d]`), token `i` to position `start + i`, with the tables' rows.
fn rope(x: &mut [f32], t: usize, d: usize, start: usize, p: &HostParams, layout: RopeLayout) {
    let half = d / 2;
    for (n, head) in x.chunks_exact_mut(d).enumerate() {
        let pos = start + n % t;
        let cos = &p.cos[pos * half..(pos + 1) * half];
        let sin = &p.sin[pos * half..(pos + 1) * half];
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

/// `silu(g) · u` for the gate and up halves of each row of `gu` (`[t][2·ffn]`): `[t][ffn]`.
/// The sigmoid takes `e^{−|g|}` (never overflows) from the vectorising exponential.
fn swiglu(gu: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gu.len() / 2);
    for row in gu.chunks_exact(2 * ffn) {
        let (g, u) = row.split_at(ffn);
        out.extend(g.iter().zip(u).map(|(&g, &u)| {
            let e = exp_nonpositive(-g.abs());
            let sig = if g >= 0.0 {
                1.0 / (1.0 + e)
            } else {
                e / (1.0 + e)
            };
            g * sig * u
        }));
    }
    out
}

/// `[t][heads·d]` columns `from..from + heads·d` of `rows` (each `width` wide) as
/// `[heads][t][d]`.
fn heads_major(rows: &[f32], width: usize, from: usize, heads: usize, d: usize) -> Vec<f32> {
    let t = rows.len() / width;
    let mut out = Vec::with_capacity(heads * t * d);
    for h in 0..heads {
        for r in 0..t {
            let c = r * width + from + h * d;
            out.extend_from_slice(&rows[c..c + d]);
        }
    }
    out
}

/// `[heads][t][d]` back to `[t][heads·d]`.
fn tokens_major(x: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let t = x.len() / (heads * d);
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for r in 0..t {
            let src = (h * t + r) * d;
            let dst = (r * heads + h) * d;
            out[dst..dst + d].copy_from_slice(&x[src..src + d]);
        }
    }
    out
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
        let pos = caches[0].len();
        let mut unobserved: Vec<Observed<B>> = caches.iter().map(|_| Observed::default()).collect();
        let Some(mut x) = self.chunk_host(&[id], pos, caches, None, &mut unobserved)? else {
            return Ok(None);
        };
        rms_norm(&mut x, &p.norm, self.config.rms_eps);
        let logits = rows_apply(&self.head, &x, 1)?;
        let n = logits.len();
        Ok(Some(Tensor::from_data(
            TensorData::new(logits, [1, n]),
            &self.embed.device(),
        )))
    }

    /// The last hidden states `[t][hidden]` of tokens `ids` (at positions `start..`) through
    /// every block on the host, appending to `caches` and recording what `observe` asks for in
    /// `observed` (one per layer). `None` (nothing done) without host parameters.
    pub(super) fn chunk_host<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        start: usize,
        caches: &mut [C],
        observe: Option<&PrefillOptions>,
        observed: &mut [Observed<B>],
    ) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(p) = &self.host else {
            return Ok(None);
        };
        let Some(mut x) = host_vec(self.embed_rows(ids)) else {
            return Ok(None);
        };
        for (l, (cache, ob)) in caches.iter_mut().zip(observed.iter_mut()).enumerate() {
            self.block_host(l, p, cache, &mut x, start, observe, ob)?;
        }
        Ok(Some(x))
    }

    /// Block `l` on the host (`p`: the host parameters): `x` (`[t][hidden]`, tokens at
    /// `start..`) in, `x` out.
    #[allow(clippy::too_many_arguments)]
    fn block_host<C: LayerCache<B>>(
        &self,
        l: usize,
        p: &HostParams,
        cache: &mut C,
        x: &mut [f32],
        start: usize,
        observe: Option<&PrefillOptions>,
        ob: &mut Observed<B>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (qh, kvh, d) = (c.q_heads, c.kv_heads, c.head_dim);
        let (blk, bp) = (&self.blocks[l], &p.blocks[l]);
        let t = x.len() / c.hidden;
        let device = self.embed.device();
        let tensor = |v: Vec<f32>, heads: usize| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, heads, t, d]), &device)
        };
        let mut h = x.to_vec();
        rms_norm(&mut h, &bp.attn_norm, c.rms_eps);
        let width = (qh + 2 * kvh) * d;
        let mut qkv = rows_apply(&blk.wqkv, &h, t)?;
        if let Some(b) = &bp.bqkv {
            for row in qkv.chunks_exact_mut(width) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        let mut q = heads_major(&qkv, width, 0, qh, d);
        let mut k = heads_major(&qkv, width, qh * d, kvh, d);
        let v = heads_major(&qkv, width, (qh + kvh) * d, kvh, d);
        if let (Some(qn), Some(kn)) = (&bp.q_norm, &bp.k_norm) {
            rms_norm(&mut q, qn, c.rms_eps);
            rms_norm(&mut k, kn, c.rms_eps);
        }
        let pre_q = observe
            .is_some_and(|o| o.pre_rope)
            .then(|| tensor(q.clone(), qh));
        rope(&mut q, t, d, start, p, c.rope_layout);
        rope(&mut k, t, d, start, p, c.rope_layout);
        let step = Step {
            pre_q,
            q: tensor(q, qh),
            k: tensor(k, kvh),
            v: tensor(v, kvh),
        };
        let att = cache_step(cache, l, step, observe, ob)?;
        let att = host_vec(att).ok_or_else(|| lost("attention output"))?;
        let o = rows_apply(&blk.wo, &tokens_major(&att, qh, d), t)?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let mut h = x.to_vec();
        rms_norm(&mut h, &bp.ffn_norm, c.rms_eps);
        let gu = rows_apply(&blk.w_gate_up, &h, t)?;
        let down = rows_apply(&blk.w_down, &swiglu(&gu, c.ffn), t)?;
        x.iter_mut().zip(&down).for_each(|(x, o)| *x += o);
        Ok(())
    }
}

/// `x · W` for the `t` rows of `x` on the host (see [`Linear::apply_rows`]).
fn rows_apply<B: KvBackend>(
    w: &crate::linear::Linear<B>,
    x: &[f32],
    t: usize,
) -> Result<Vec<f32>, ModelError> {
    w.apply_rows(x, t)
        .ok_or_else(|| lost("a projection's output rows"))
}
