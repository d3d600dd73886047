//! A dense K/V store in host memory and few-query attention over it: how [`FullCache`] decodes
//! on CPU backends.
//!
//! Why it exists: burn-ndarray 0.21 copies a tensor on every `reshape` and `slice`, and `cat`
//! re-allocates the whole cache, so a decode step at 2048 tokens copied each layer's keys and
//! values about ten times before its two tiny matmuls ran (measured: 87 of the 124 ms a step
//! took at 2048 tokens went to those copies). Here new tokens are appended in place (amortised
//! growth, copy-on-write between forks) and every query row reads each key and value once.
//! Prefill chunks still take burn's matmul path, which is faster for many queries.
//!
//! [`FullCache`]: crate::FullCache
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Queries up to this many rows (decode steps, a short batch of them) take the host kernel;
/// longer chunks decode the cache into tensors and use burn's matmuls.
pub(crate) const HOST_MAX_QUERIES: usize = 8;

/// True when tensors of this backend live in host memory as f32, where copying them out costs
/// one read (burn-ndarray); GPU backends keep the tensor path.
pub(crate) fn is_host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dtype() == DType::F32 && B::name(&t.device()) == "ndarray"
}

/// Keys and values of `b × h` heads, each head a row-major `[tokens][d]` vector that grows by
/// appending. Clones share storage until one of them appends.
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    /// `k[bh]`: head `bh`'s keys, `len × d` floats.
    k: Arc<Vec<Vec<f32>>>,
    v: Arc<Vec<Vec<f32>>>,
    b: usize,
    h: usize,
    d: usize,
    len: usize,
}

impl HostKv {
    /// An empty store for `[b, h, ·, d]` tensors.
    pub(crate) fn new(b: usize, h: usize, d: usize) -> Self {
        Self {
            k: Arc::new(vec![Vec::new(); b * h]),
            v: Arc::new(vec![Vec::new(); b * h]),
            b,
            h,
            d,
            len: 0,
        }
    }

    /// `[b, h, d]` of every head.
    pub(crate) fn dims(&self) -> [usize; 3] {
        [self.b, self.h, self.d]
    }

    /// Tokens held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Floats held (keys and values).
    pub(crate) fn elements(&self) -> usize {
        2 * self.b * self.h * self.len * self.d
    }

    /// Appends `t` tokens given as contiguous `[b, h, t, d]` keys and values.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let row = t * self.d;
        debug_assert_eq!(k.len(), self.b * self.h * row);
        debug_assert_eq!(v.len(), k.len());
        for (dst, src) in Arc::make_mut(&mut self.k)
            .iter_mut()
            .zip(k.chunks_exact(row))
        {
            dst.extend_from_slice(src);
        }
        for (dst, src) in Arc::make_mut(&mut self.v)
            .iter_mut()
            .zip(v.chunks_exact(row))
        {
            dst.extend_from_slice(src);
        }
        self.len += t;
    }

    /// Keys and values as contiguous `[b, h, len, d]` vectors.
    pub(crate) fn to_vecs(&self) -> (Vec<f32>, Vec<f32>) {
        (self.k.concat(), self.v.concat())
    }

    /// Softmax attention of the newest `tq` tokens' queries over everything held, with the
    /// causal convention of [`attention`](crate::attention): query `i` sees keys
    /// `0 ..= len − tq + i`. Query head `qh` reads KV head `qh / (q_heads / h)`.
    ///
    /// Work is split the flash-decoding way: one task per KV head and run of
    /// [`KEYS_PER_TASK`] keys, each computing every query of the head's query group over its
    /// keys (a key row is read once for all of them, not once per query head), with its own
    /// running maximum; the partial results are then merged exactly. Splitting along keys keeps
    /// both cores busy when there are fewer KV heads than cores times two (SmolLM2 has 3).
    ///
    /// # Shapes
    /// `q`: contiguous `[b, q_heads, tq, d]` → the same shape. The caller checks that
    /// `q_heads` is a multiple of `h`, `b` and `d` match and `1 ≤ tq ≤ len`.
    pub(crate) fn attend(&self, q: &[f32], q_heads: usize, tq: usize) -> Vec<f32> {
        let (d, len) = (self.d, self.len);
        let group = q_heads / self.h;
        // Queries of one KV head: its `group` query heads × `tq` tokens, contiguous in `q`.
        let rows = group * tq;
        let chunks = len.div_ceil(KEYS_PER_TASK).max(1);
        let span = len.div_ceil(chunks);
        let scale = 1.0 / (d as f32).sqrt();
        let partials: Vec<Partial> = (0..self.b * self.h * chunks)
            .into_par_iter()
            .map(|task| {
                let (bkv, c) = (task / chunks, task % chunks);
                let (start, end) = (c * span, ((c + 1) * span).min(len));
                pulp::Arch::new().dispatch(GroupAttention {
                    keys: &self.k[bkv][start * d..end * d],
                    values: &self.v[bkv][start * d..end * d],
                    q: &q[bkv * rows * d..(bkv + 1) * rows * d],
                    // Query `r` (token `r % tq`) sees `len − tq + r % tq + 1` keys in all.
                    visible: &|r: usize| (len - tq + r % tq + 1).min(end).saturating_sub(start),
                    d,
                    scale,
                })
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        for (out, parts) in out
            .chunks_exact_mut(rows * d)
            .zip(partials.chunks_exact(chunks))
        {
            for (r, o) in out.chunks_exact_mut(d).enumerate() {
                let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[r]));
                let mut total = 0f32;
                for p in parts {
                    if p.sum[r] > 0.0 {
                        let w = (p.max[r] - max).exp();
                        total += w * p.sum[r];
                        axpy(o, w, &p.out[r * d..(r + 1) * d]);
                    }
                }
                let inv = 1.0 / total;
                for x in o.iter_mut() {
                    *x *= inv;
                }
            }
        }
        out
    }
}

/// Keys per task of the host attention: enough work per task that scheduling is noise, few
/// enough that 2000 tokens over 3 KV heads make 24 tasks for the cores to share.
const KEYS_PER_TASK: usize = 256;

/// One task's share of the attention of a query group: per query row, the maximum score over
/// its visible keys of the run, `Σ exp(score − max)`, and `Σ exp(score − max) · v`
/// (unnormalised). A row that sees no key of the run has sum 0 and is skipped in the merge.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// The queries of one KV head's group over one run of its keys, as a [`pulp::WithSimd`] so
/// that the plain loops below are compiled for (and run with) the widest vector unit the CPU
/// has. Keys and values are walked once, each row used for every query while in L1.
struct GroupAttention<'a> {
    /// `[n][d]`, the run's keys and values.
    keys: &'a [f32],
    values: &'a [f32],
    /// `[rows][d]`, the group's queries.
    q: &'a [f32],
    /// How many keys of the run query row `r` sees (causality).
    visible: &'a (dyn Fn(usize) -> usize + Sync),
    d: usize,
    scale: f32,
}

impl pulp::WithSimd for GroupAttention<'_> {
    type Output = Partial;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Partial {
        let GroupAttention {
            keys,
            values,
            q,
            visible,
            d,
            scale,
        } = self;
        let n = keys.len() / d;
        let rows = q.len() / d;
        let vis: Vec<usize> = (0..rows).map(visible).collect();
        // scores[r][j]; keys a query row does not see are computed and then ignored.
        let mut scores = vec![0f32; rows * n];
        let pf = Prefetch::new();
        // Rows ahead to prefetch: ~2 KiB, whatever the head dimension.
        let ahead = (512 / d.max(1)).max(1) * d;
        for (j, kr) in keys.chunks_exact(d).enumerate() {
            for l in (0..d).step_by(16) {
                pf.line(keys, j * d + ahead + l);
            }
            for (r, qr) in q.chunks_exact(d).enumerate() {
                scores[r * n + j] = dot(qr, kr) * scale;
            }
        }
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        for r in 0..rows {
            let s = &mut scores[r * n..r * n + vis[r]];
            max[r] = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for x in s.iter_mut() {
                *x = (*x - max[r]).exp();
                sum[r] += *x;
            }
        }
        let mut out = vec![0f32; rows * d];
        for (j, vr) in values.chunks_exact(d).enumerate() {
            for l in (0..d).step_by(16) {
                pf.line(values, j * d + ahead + l);
            }
            for (r, o) in out.chunks_exact_mut(d).enumerate() {
                if j < vis[r] {
                    axpy(o, scores[r * n + j], vr);
                }
            }
        }
        Partial { max, sum, out }
    }
}

/// Software prefetch for the host kernels' streams. The hardware prefetcher of the machines
/// measured here ramps up slowly on each new stream (a 4 KiB page at a time), so a kernel that
/// does real work per byte (dequantising, or three dot products per key row) waits on memory;
/// asking for the data ~2 KiB ahead made the Q4_1 kernel 2.2× faster on a 100 MB matrix. A
/// prefetch never faults, so this is safe for any address; off x86-64 it does nothing.
#[derive(Debug, Clone, Copy)]
pub struct Prefetch {
    #[cfg(target_arch = "x86_64")]
    sse: Option<pulp::x86::V1>,
}

impl Prefetch {
    /// Detects the instruction (every x86-64 CPU has it) once, for a kernel's inner loops.
    #[inline]
    pub fn new() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            sse: pulp::x86::V1::try_new(),
        }
    }

    /// Asks for the cache line holding `slice[at]` (which may lie past the end: nothing is read).
    #[inline(always)]
    pub fn line<T>(self, slice: &[T], at: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.sse {
            simd.sse
                ._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    slice.as_ptr().wrapping_add(at).cast(),
                );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (slice, at);
    }
}

impl Default for Prefetch {
    fn default() -> Self {
        Self::new()
    }
}

/// Dot product with 16 explicit accumulator lanes, so the compiler vectorises it without
/// reassociating floats. Shared by the host kernels (this attention, `models`' matrix–vector
/// product); `#[inline(always)]` so it is compiled inside each caller's SIMD dispatch.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (p, q) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += p[i] * q[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `o += a · x`.
#[inline(always)]
fn axpy(o: &mut [f32], a: f32, x: &[f32]) {
    for (o, x) in o.iter_mut().zip(x) {
        *o += a * x;
    }
}

#[cfg(test)]
mod tests {
    use crate::{FullCache, KvError, LayerCache, attention};
    use burn::tensor::{Tensor, TensorData};
    use burn_ndarray::NdArray;
    use proptest::prelude::*;

    type B = NdArray<f32>;

    fn tensor(vals: &[f32], shape: [usize; 4]) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(vals.to_vec(), shape), &Default::default())
    }

    fn values(t: Tensor<B, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().expect("f32")
    }

    proptest! {
        /// A full cache filled by a prefill chunk and then token by token attends exactly like
        /// burn's attention over the same keys and values (up to float order), for every query
        /// count the host kernel takes and beyond it, with grouped heads, batches and head
        /// dimensions that are not a multiple of the kernel's lanes; its keys/values and
        /// bookkeeping match what was appended.
        #[test]
        fn host_full_cache_attends_like_burn(
            b in 1usize..3,
            kvh in 1usize..4,
            group in 1usize..4,
            d in 1usize..21,
            // Past `KEYS_PER_TASK` the attention splits keys over tasks and merges them.
            prompt in prop_oneof![1usize..12, 250usize..530],
            steps in 0usize..4,
            tq in 1usize..11,
            seed in 0u32..1000,
        ) {
            let total = prompt + steps;
            let val = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 500.0 - 2.0;
            let kall: Vec<f32> = (0..b * kvh * total * d).map(val).collect();
            let vall: Vec<f32> = (0..b * kvh * total * d).map(|i| val(i + 99991)).collect();
            let full = |src: &[f32], from: usize, to: usize| {
                let mut out = Vec::new();
                for bh in 0..b * kvh {
                    out.extend_from_slice(&src[(bh * total + from) * d..(bh * total + to) * d]);
                }
                tensor(&out, [b, kvh, to - from, d])
            };
            let mut cache = FullCache::<B>::new();
            let mut len = 0;
            for piece in std::iter::once(prompt).chain(std::iter::repeat_n(1, steps)) {
                cache.append(full(&kall, len, len + piece), full(&vall, len, len + piece)).expect("append");
                len += piece;
                let qh = kvh * group;
                let tq = tq.min(len);
                let qs: Vec<f32> = (0..b * qh * tq * d).map(|i| val(i + 7 * len)).collect();
                let q = || tensor(&qs, [b, qh, tq, d]);
                let got = values(cache.attend(q()).expect("attend"));
                let want = values(attention(q(), full(&kall, 0, len), full(&vall, 0, len)).expect("reference"));
                prop_assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{} vs {}", g, w);
                }
                let (k, v) = cache.keys_values().expect("keys");
                prop_assert_eq!(values(k), values(full(&kall, 0, len)));
                prop_assert_eq!(values(v), values(full(&vall, 0, len)));
                prop_assert_eq!(cache.len(), len);
                prop_assert_eq!(cache.stored(), len);
                prop_assert_eq!(cache.footprint().total().0 as usize, 2 * b * kvh * len * d * 4);
            }
        }
    }

    /// A fork shares nothing observable with its origin: appending to one leaves the other's
    /// keys and length as they were.
    #[test]
    fn fork_is_independent() {
        let mut a = FullCache::<B>::new();
        let one = |x: f32| tensor(&[x, x + 1.0], [1, 1, 1, 2]);
        a.append(one(1.0), one(2.0)).expect("append");
        let mut b = a.fork().expect("full caches fork");
        b.append(one(5.0), one(6.0)).expect("append");
        assert_eq!(a.len(), 1);
        assert_eq!(b.len(), 2);
        assert_eq!(values(a.keys_values().expect("kv").0), vec![1.0, 2.0]);
        assert_eq!(
            values(b.keys_values().expect("kv").0),
            vec![1.0, 2.0, 5.0, 6.0]
        );
    }

    /// Bad input is a typed error: keys of another head count, values of another shape than
    /// the keys, queries of an empty cache and more queries than tokens.
    #[test]
    fn bad_shapes_are_errors() {
        let mut c = FullCache::<B>::new();
        let q = tensor(&[0.0; 2], [1, 1, 1, 2]);
        assert!(matches!(c.attend(q.clone()), Err(KvError::Empty)));
        c.append(
            tensor(&[0.0; 2], [1, 1, 1, 2]),
            tensor(&[0.0; 2], [1, 1, 1, 2]),
        )
        .expect("append");
        assert!(
            c.append(
                tensor(&[0.0; 4], [1, 2, 1, 2]),
                tensor(&[0.0; 4], [1, 2, 1, 2])
            )
            .is_err()
        );
        assert!(
            c.append(
                tensor(&[0.0; 2], [1, 1, 1, 2]),
                tensor(&[0.0; 4], [1, 1, 2, 2])
            )
            .is_err()
        );
        assert_eq!(c.len(), 1, "a refused append leaves the cache as it was");
        let two = tensor(&[0.0; 4], [1, 1, 2, 2]);
        assert!(matches!(
            c.attend(two),
            Err(KvError::QueriesExceedCache {
                queries: 2,
                cached: 1
            })
        ));
    }

    /// The tensor store (taken by backends that are not host f32, here f64) gives the same
    /// attention as the host store.
    #[test]
    fn tensor_and_host_stores_agree() {
        type D = NdArray<f64>;
        let (h, t, d) = (2, 5, 3);
        let vals: Vec<f32> = (0..h * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let qv: Vec<f32> = (0..2 * h * d).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut host = FullCache::<B>::new();
        host.append(tensor(&vals, [1, h, t, d]), tensor(&vals, [1, h, t, d]))
            .expect("append");
        let mut dense = FullCache::<D>::new();
        let td = |v: &[f32], s: [usize; 4]| {
            Tensor::<D, 4>::from_data(TensorData::new(v.to_vec(), s), &Default::default())
        };
        dense
            .append(td(&vals, [1, h, t, d]), td(&vals, [1, h, t, d]))
            .expect("append");
        let a = values(host.attend(tensor(&qv, [1, 2 * h, 1, d])).expect("host"));
        let b: Vec<f32> = dense
            .attend(td(&qv, [1, 2 * h, 1, d]))
            .expect("dense")
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
