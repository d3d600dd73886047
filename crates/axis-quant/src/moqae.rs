//! MoQAE-style chunk-level mixed precision (Tao et al., "MoQAE: Mixed-Precision Quantization
//! for Long-Context LLM Inference via Mixture of Quantization-Aware Experts", 2025): the cache is
//! cut into chunks of `C` tokens and each chunk gets a bit width from an expert set, chosen by a
//! [`ChunkRouter`]. The first chunk (attention sinks) is frozen at 16 bits.
//!
//! The router here is a heuristic ([`AttentionMassRouter`]); a learned router implements the
//! same trait: [`learned`] is the paper's trained MLP. One router can be shared by every layer,
//! or [`PerLayer`] holds one per layer.
use crate::{Kivi, QuantSetting};

pub mod learned;
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{
    AxisError, Bits, Bytes, CompressedLayer, CompressionAxis, Footprint, GroupAxis, KvError,
    LayerCache, LayerShape, ObservationCtx, Ratio, window_attention,
};
use std::sync::Arc;

/// What a router sees of one chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkFeatures {
    /// Chunk index from the start of the sequence.
    pub index: usize,
    /// Share of the observation window's attention the chunk received, scaled so that the mean
    /// over the routed chunks is 1 (1.0 when nothing was observed).
    pub importance: f64,
}

/// Picks a bit width for each chunk of a layer.
pub trait ChunkRouter: Send + Sync {
    /// One width per chunk, each from the router's expert set.
    fn route(&self, layer: usize, chunks: &[ChunkFeatures]) -> Vec<Bits>;

    /// Whether the router reads the chunks' keys and values ([`ChunkRouter::route_content`]);
    /// the cache gathers them only for routers that do.
    fn reads_content(&self) -> bool {
        false
    }

    /// One width per chunk from the chunks' content: `rows` holds one row per token (keys then
    /// values of every KV head), the chunks' tokens in order.
    fn route_content(
        &self,
        layer: usize,
        chunks: &[ChunkFeatures],
        rows: &[f32],
    ) -> Result<Vec<Bits>, KvError> {
        let _ = rows;
        Ok(self.route(layer, chunks))
    }
}

/// Heuristic router: for each chunk, the expert minimising
/// `importance · err(bits) + λ · bits / 16`, where `err(b) = 1 / (2^b − 1)` is the relative
/// step of `b`-bit quantization (0 at 16 bits). λ = 0 keeps everything at 16 bits; a large λ
/// sends every chunk to the narrowest expert.
#[derive(Debug, Clone)]
pub struct AttentionMassRouter {
    experts: Vec<Bits>,
    lambda: f64,
}

impl AttentionMassRouter {
    /// A router over `experts` (non-empty) with memory weight `lambda` ≥ 0.
    pub fn new(experts: Vec<Bits>, lambda: f64) -> Result<Self, KvError> {
        if experts.is_empty() || !(lambda.is_finite() && lambda >= 0.0) {
            return Err(KvError::InvalidValue {
                what: "MoQAE router",
                value: format!("{} experts, λ = {lambda}", experts.len()),
                allowed: "at least one expert and λ ≥ 0",
            });
        }
        Ok(Self { experts, lambda })
    }

    /// MoQAE's expert set {16, 4, 2}.
    pub fn default_experts() -> Vec<Bits> {
        [16u8, 4, 2]
            .iter()
            .filter_map(|&b| Bits::try_from(b).ok())
            .collect()
    }
}

impl ChunkRouter for AttentionMassRouter {
    fn route(&self, _layer: usize, chunks: &[ChunkFeatures]) -> Vec<Bits> {
        let err = |b: Bits| match b {
            Bits::Full => 0.0,
            Bits::Code(c) => 1.0 / c.max_code() as f64,
        };
        chunks
            .iter()
            .map(|c| {
                let cost = |b: Bits| c.importance * err(b) + self.lambda * b.get() as f64 / 16.0;
                self.experts
                    .iter()
                    .copied()
                    .min_by(|a, b| cost(*a).total_cmp(&cost(*b)))
                    .unwrap_or(Bits::Full)
            })
            .collect()
    }
}

/// MoQAE at a byte budget: within a layer, the `share` of chunks with the most attention mass
/// get `high` bits and the rest `low` (ties: earlier chunks first). [`BudgetedRouter::fit`]
/// picks the largest share whose bytes fit a budget, so MoQAE can be compared at matched memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetedRouter {
    /// Bits of the important chunks.
    pub high: Bits,
    /// Bits of the rest.
    pub low: Bits,
    /// Share of chunks at `high`.
    pub share: Ratio,
}

impl BudgetedRouter {
    /// Bytes of one layer holding `shape.tokens` tokens after prefill routing: the first chunk
    /// fp16, the incomplete tail f32 (the window), the routed chunks quantized (KIVI, default
    /// group).
    pub fn footprint(&self, shape: &LayerShape, chunk: usize) -> Footprint {
        let t = shape.tokens;
        let chunks = t / chunk.max(1);
        let routed = chunks.saturating_sub(1);
        let high = (self.share.get() * routed as f64).round() as usize;
        let at = |n: usize| LayerShape {
            tokens: n,
            ..*shape
        };
        // The first chunk is stored as fp16, and so is the incomplete tail waiting in the
        // residual window (the host window's storage; see `kv_tensor::DensePrecision`).
        let first = chunk.min(t);
        let tail = t - routed * chunk - first;
        let group = crate::GroupSize::DEFAULT.get();
        let mut f = Footprint::dense(Bytes(
            (2 * (at(first).numel() + at(tail).numel()) * 2) as u64,
        ));
        for (n, bits) in [(high, self.high), (routed - high, self.low)] {
            for along in [GroupAxis::Tokens, GroupAxis::Channels] {
                f += Kivi::side_footprint(&at(n * chunk), bits, group, along, 2);
            }
        }
        f
    }

    /// The largest share (1% steps) of `high`-bit chunks whose bytes over `layers` layers fit
    /// `budget`; `None` when even all-`low` does not fit.
    pub fn fit(
        high: Bits,
        low: Bits,
        shape: &LayerShape,
        chunk: usize,
        layers: usize,
        budget: Bytes,
    ) -> Option<Self> {
        Ratio::largest_fitting(
            budget,
            |share| Some(Self { high, low, share }),
            |r| Bytes(r.footprint(shape, chunk).total().get() * layers as u64),
        )
    }
}

impl ChunkRouter for BudgetedRouter {
    fn route(&self, _layer: usize, chunks: &[ChunkFeatures]) -> Vec<Bits> {
        // The first chunk is frozen at 16 bits by the cache: it takes no share.
        let mut order: Vec<usize> = (0..chunks.len())
            .filter(|&i| chunks[i].index != 0)
            .collect();
        let high = (self.share.get() * order.len() as f64).round() as usize;
        order.sort_by(|&a, &b| chunks[b].importance.total_cmp(&chunks[a].importance));
        let mut bits = vec![self.low; chunks.len()];
        for &i in &order[..high.min(order.len())] {
            bits[i] = self.high;
        }
        bits
    }
}

/// MoQAE's default chunk size (tokens), for callers without a backend at hand.
pub const DEFAULT_CHUNK: usize = 32;

/// One router per layer.
pub struct PerLayer(pub Vec<Arc<dyn ChunkRouter>>);

impl ChunkRouter for PerLayer {
    fn route(&self, layer: usize, chunks: &[ChunkFeatures]) -> Vec<Bits> {
        match self.0.get(layer) {
            Some(r) => r.route(layer, chunks),
            None => vec![Bits::Full; chunks.len()],
        }
    }
}

/// A layer cache with chunk-level mixed precision. Chunks are routed at the end of prefill
/// (with the observation window's attention) and, during decode, whenever a new chunk is full
/// (with neutral importance); the incomplete last chunk stays dense.
#[derive(Clone)]
pub struct MoqaeCache<B: KvBackend> {
    layer: CompressedLayer<B>,
    router: Arc<dyn ChunkRouter>,
    layer_idx: usize,
    chunk: usize,
    chunks_done: usize,
    prefilled: bool,
    /// Bits chosen per chunk, in order (for reports).
    pub routed: Vec<Bits>,
}

impl<B: KvBackend> MoqaeCache<B> {
    /// MoQAE's default chunk size.
    pub const DEFAULT_CHUNK: usize = DEFAULT_CHUNK;

    /// An empty cache for layer `layer_idx`; `chunk` must be a multiple of the KIVI group (32).
    pub fn new(router: Arc<dyn ChunkRouter>, layer_idx: usize, chunk: usize) -> Self {
        Self {
            layer: CompressedLayer::new(),
            router,
            layer_idx,
            chunk,
            chunks_done: 0,
            prefilled: false,
            routed: Vec::new(),
        }
    }

    fn flush(&mut self, mass: Option<Tensor<B, 3>>) -> Result<(), AxisError> {
        let c = self.chunk;
        let n = self.layer.window_len() / c;
        if n == 0 {
            return Ok(());
        }
        let first_pos = self.layer.seen() - self.layer.window_len();
        let features: Vec<ChunkFeatures> = match mass {
            Some(m) => {
                // Attention per token, summed over heads → per chunk of the window.
                let [_, _, t] = m.dims();
                let per_token: Vec<f32> = m
                    .sum_dim(1)
                    .sum_dim(0)
                    .reshape([t])
                    .into_data()
                    .iter::<f32>()
                    .collect();
                let sums: Vec<f64> = (0..n)
                    .map(|i| {
                        per_token[first_pos + i * c..first_pos + (i + 1) * c]
                            .iter()
                            .map(|&x| x as f64)
                            .sum()
                    })
                    .collect();
                let mean = sums.iter().sum::<f64>() / n as f64;
                sums.iter()
                    .enumerate()
                    .map(|(i, s)| ChunkFeatures {
                        index: self.chunks_done + i,
                        importance: if mean > 0.0 { s / mean } else { 1.0 },
                    })
                    .collect()
            }
            None => (0..n)
                .map(|i| ChunkFeatures {
                    index: self.chunks_done + i,
                    importance: 1.0,
                })
                .collect(),
        };
        let segments: Vec<_> = (0..n)
            .map(|_| self.layer.take_window(c).ok_or(KvError::Empty))
            .collect::<Result<_, _>>()?;
        let mut bits = if self.router.reads_content() {
            let rows = content_rows(&segments)?;
            self.router
                .route_content(self.layer_idx, &features, &rows)?
        } else {
            self.router.route(self.layer_idx, &features)
        };
        bits.resize(n, Bits::Full);
        for ((f, b), seg) in features.iter().zip(bits).zip(segments) {
            // Attention sinks: the first chunk is never quantized.
            let b = if f.index == 0 { Bits::Full } else { b };
            // 16-bit chunks are stored as fp16, as in the paper.
            let seg = if b == Bits::Full {
                seg.into_half()
            } else {
                seg
            };
            let seg = CompressionAxis::<B>::compress(
                &Kivi,
                seg,
                &QuantSetting::new(b, b),
                &ObservationCtx::bare(self.layer_idx),
            )?;
            self.layer.push_segment(seg)?;
            self.routed.push(b);
        }
        self.chunks_done += n;
        Ok(())
    }
}

/// One row per token of `segments` (batch 1): its keys then its values, every KV head in
/// order — what a content-reading router sees.
pub fn content_rows<B: KvBackend>(segments: &[kv_tensor::Segment<B>]) -> Result<Vec<f32>, KvError> {
    let mut rows = Vec::new();
    for s in segments {
        let (k, v) = (s.k.decode()?, s.v.decode()?);
        let [_, h, t, d] = k.dims();
        // [1, h, t, d] → [t, h·d] for keys and values, side by side.
        let tok = |x: Tensor<B, 4>| x.swap_dims(1, 2).reshape([t, h * d]);
        let both = Tensor::cat(vec![tok(k), tok(v)], 1);
        rows.extend(
            both.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| KvError::Backend(format!("{e:?}")))?,
        );
    }
    Ok(rows)
}

impl<B: KvBackend> LayerCache<B> for MoqaeCache<B> {
    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        Some(Box::new(self.clone()))
    }

    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        self.layer.push(k, v)?;
        if self.prefilled {
            self.flush(None)
        } else {
            Ok(())
        }
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.layer.decode()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        self.layer.attend(q)
    }

    fn attend_with_mass(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.layer.attend_with_mass(q)
    }

    fn attend_with_peak(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.layer.attend_with_peak(q)
    }

    fn resident(&self) -> kv_tensor::Bytes {
        self.layer.resident()
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.prefilled = true;
        let mass = match &ctx.window_queries {
            Some(q) => {
                let (k, _) = self.layer.decode()?;
                Some(window_attention(q.clone(), k)?)
            }
            None => None,
        };
        self.flush(mass)
    }

    fn footprint(&self) -> Footprint {
        self.layer.footprint()
    }

    fn len(&self) -> usize {
        self.layer.seen()
    }

    fn stored(&self) -> usize {
        self.layer.stored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgeted_router_ranks_by_importance_and_fits_budgets() {
        let b = |x: u8| Bits::try_from(x).expect("bits");
        let chunks: Vec<_> = [0.5, 3.0, 0.1, 2.0]
            .iter()
            .enumerate()
            .map(|(index, &importance)| ChunkFeatures { index, importance })
            .collect();
        let r = BudgetedRouter {
            high: b(4),
            low: b(2),
            share: Ratio::new(0.5).expect("ratio"),
        };
        assert_eq!(r.route(0, &chunks), vec![b(2), b(4), b(2), b(4)]);
        let shape = LayerShape {
            batch: 1,
            kv_heads: 3,
            tokens: 2048,
            head_dim: 64,
        };
        let fp16 = Bytes((2 * shape.numel() * 2 * 30) as u64);
        let quarter = Bytes(fp16.get() / 4);
        let fit = BudgetedRouter::fit(b(4), b(2), &shape, 32, 30, quarter).expect("fits 1/4");
        assert!(fit.footprint(&shape, 32).total().get() * 30 <= quarter.get());
        // One more percent of 4-bit chunks would not fit.
        if fit.share.get() < 1.0 {
            let more = BudgetedRouter {
                share: Ratio::new(fit.share.get() + 0.01).expect("ratio"),
                ..fit
            };
            assert!(more.footprint(&shape, 32).total().get() * 30 > quarter.get());
        }
        assert!(BudgetedRouter::fit(b(4), b(2), &shape, 32, 30, Bytes(fp16.get() / 8)).is_none());
        // The predicted bytes are what a cache routed by it allocates.
        let small = LayerShape {
            tokens: 300,
            ..shape
        };
        let dev = Default::default();
        let mut cache = MoqaeCache::<B>::new(Arc::new(fit), 0, 32);
        let kv = || Tensor::<B, 4>::random([1, 3, 300, 64], Distribution::Default, &dev);
        cache.append(kv(), kv()).expect("append");
        let ctx = ObservationCtx {
            window_queries: Some(Tensor::random([1, 9, 8, 64], Distribution::Default, &dev)),
            ..ObservationCtx::bare(0)
        };
        cache.finish_prefill(&ctx).expect("prefill");
        assert_eq!(cache.footprint(), fit.footprint(&small, 32));
    }
    use burn::tensor::Distribution;
    use burn_ndarray::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn lambda_trades_precision_for_memory() {
        let chunks: Vec<_> = (0..8)
            .map(|i| ChunkFeatures {
                index: i,
                importance: if i == 3 { 5.0 } else { 0.4 },
            })
            .collect();
        let at = |l: f64| {
            AttentionMassRouter::new(AttentionMassRouter::default_experts(), l)
                .expect("router")
                .route(0, &chunks)
        };
        assert!(at(0.0).iter().all(|b| *b == Bits::Full));
        assert!(at(100.0).iter().all(|b| b.get() == 2));
        let mid = at(0.05);
        // The important chunk keeps more bits than the others.
        assert!(mid[3].get() > mid[0].get(), "{mid:?}");
        assert!(AttentionMassRouter::new(vec![], 1.0).is_err());
        assert!(AttentionMassRouter::new(AttentionMassRouter::default_experts(), -1.0).is_err());
    }

    #[test]
    fn first_chunk_stays_full_and_bytes_shrink() {
        let d = Default::default();
        let r: Arc<dyn ChunkRouter> = Arc::new(
            AttentionMassRouter::new(AttentionMassRouter::default_experts(), 100.0)
                .expect("router"),
        );
        let mut c = MoqaeCache::<B>::new(r, 0, 32);
        let k = Tensor::<B, 4>::random([1, 3, 200, 64], Distribution::Normal(0.0, 1.0), &d);
        c.append(k.clone(), k.clone()).expect("append");
        let q = Tensor::<B, 4>::random([1, 9, 16, 64], Distribution::Normal(0.0, 1.0), &d);
        let ctx = ObservationCtx {
            window_queries: Some(q),
            ..ObservationCtx::bare(0)
        };
        let before = c.footprint().total();
        c.finish_prefill(&ctx).expect("route");
        assert_eq!(c.routed.len(), 6);
        assert_eq!(c.routed[0], Bits::Full);
        assert!(c.routed[1..].iter().all(|b| b.get() == 2));
        // Before: 200 fp16 tokens. After: the first chunk and the 8-token tail in fp16, the
        // rest 2-bit with fp16 scales (0.375 bytes per value): 2.9× smaller.
        assert!(c.footprint().total().get() * 5 < before.get() * 2);
        assert_eq!(c.stored(), 200);
    }
}
