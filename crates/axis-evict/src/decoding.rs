//! Decode-time compression (kvpress's `DecodingPress`): a long generation grows the cache again
//! after the prompt was compressed, so every `interval` generated tokens the layer is evicted
//! back to `target` tokens whenever it holds more. Scorers see the queries of the most recent
//! decoding steps as their observation window (the cache remembers the last `observe` queries it
//! was asked to attend with), so SnapKV, TOVA and expected attention work during decoding; H2O
//! (prefill attention mass) and head-wise ragged selection are refused at construction.
use crate::{Evict, EvictSetting, ScorerKind, Selection};
use burn::tensor::{Bool, Tensor};
use kv_tensor::KvBackend;
use kv_tensor::{
    AxisError, CompressedLayer, CompressionAxis, Footprint, KvError, LayerCache, ObservationCtx,
    Positions, Ratio, Segment,
};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// When and how far a decoding cache compresses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodingSetting {
    /// Scorer, protection and selection (its `keep` is ignored: `target` decides).
    pub evict: EvictSetting,
    /// Tokens held after each compression.
    pub target: usize,
    /// Generated tokens between compressions.
    pub interval: usize,
    /// Recent decoding queries kept as the scorers' observation window.
    #[serde(default = "default_observe")]
    pub observe: usize,
}

fn default_observe() -> usize {
    32
}

impl DecodingSetting {
    /// Checks the setting can run during decoding.
    pub fn validate(&self) -> Result<(), AxisError> {
        let bad = |why: String| {
            Err(AxisError::Method {
                method: "decoding eviction",
                source: why.into(),
            })
        };
        if self.interval == 0 {
            return bad("interval must be at least 1 token".into());
        }
        let protected = self.evict.sinks + self.evict.window;
        if self.target < protected {
            return bad(format!(
                "target {} is below the {protected} protected tokens (sinks + window)",
                self.target
            ));
        }
        if self.evict.scorer == ScorerKind::H2o {
            return bad("h2o needs prefill attention mass, which decoding does not produce".into());
        }
        if matches!(self.evict.selection, Selection::HeadWise { .. }) {
            return bad("head-wise (ragged) segments cannot be re-evicted".into());
        }
        Ok(())
    }
}

/// The last `capacity` queries a cache attended with: the scorers' observation window during
/// decoding (this cache's, and the router's decode budgets'). Cloning copies the history, so a
/// forked cache observes on its own.
#[derive(Debug)]
pub struct RecentQueries<B: KvBackend> {
    seen: Mutex<Option<Tensor<B, 4>>>,
    capacity: usize,
}

impl<B: KvBackend> RecentQueries<B> {
    /// No queries yet; at most `capacity` kept.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::new(None),
            capacity,
        }
    }

    /// The kept queries `[b, q_heads, ≤ capacity, d]`, oldest first.
    pub fn get(&self) -> Option<Tensor<B, 4>> {
        self.seen.lock().ok().and_then(|q| q.clone())
    }

    /// Appends `q` `[b, q_heads, t, d]`, dropping the oldest beyond the capacity.
    pub fn record(&self, q: &Tensor<B, 4>) {
        if let Ok(mut seen) = self.seen.lock() {
            let all = match seen.take() {
                Some(old) => Tensor::cat(vec![old, q.clone()], 2),
                None => q.clone(),
            };
            let n = all.dims()[2];
            *seen = Some(if n > self.capacity {
                all.slice_dim(2, n - self.capacity..n)
            } else {
                all
            });
        }
    }
}

impl<B: KvBackend> Clone for RecentQueries<B> {
    fn clone(&self) -> Self {
        Self {
            seen: Mutex::new(self.get()),
            capacity: self.capacity,
        }
    }
}

/// A cache that evicts at the end of prefill and again during decoding (see the module doc).
#[derive(Debug)]
pub struct DecodingEvictCache<B: KvBackend> {
    layer: CompressedLayer<B>,
    axis: Evict<B>,
    setting: DecodingSetting,
    queries: RecentQueries<B>,
    since: usize,
    prefilled: bool,
    layer_idx: usize,
}

impl<B: KvBackend> DecodingEvictCache<B> {
    /// An empty cache; the setting is validated here.
    pub fn new(axis: Evict<B>, setting: DecodingSetting) -> Result<Self, AxisError> {
        setting.validate()?;
        Ok(Self {
            layer: CompressedLayer::new(),
            axis,
            setting,
            queries: RecentQueries::new(setting.observe),
            since: 0,
            prefilled: false,
            layer_idx: 0,
        })
    }

    /// The layer as stored.
    pub fn layer(&self) -> &CompressedLayer<B> {
        &self.layer
    }

    fn compress(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        let stored = self.layer.stored();
        if stored <= self.setting.target {
            return Ok(());
        }
        let positions = self.layer.positions().ok_or(KvError::Empty)?;
        let (k, v) = self.layer.decode()?;
        let keep = Ratio::new(self.setting.target as f64 / stored as f64)?;
        let setting = EvictSetting {
            keep,
            ..self.setting.evict
        };
        let seg = Segment {
            positions: Positions::Explicit(positions),
            k: kv_tensor::Encoded::Dense(k),
            v: kv_tensor::Encoded::Dense(v),
        };
        let seg = self.axis.compress(seg, &setting, ctx)?;
        self.layer.replace_all(seg.into_half())?;
        Ok(())
    }
}

impl<B: KvBackend> LayerCache<B> for DecodingEvictCache<B> {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        let t = k.dims()[2];
        self.layer.push(k, v)?;
        if self.prefilled {
            self.since += t;
            if self.since >= self.setting.interval {
                self.since = 0;
                let mut ctx = ObservationCtx::bare(self.layer_idx);
                ctx.window_queries = self.queries.get();
                self.compress(&ctx)?;
            }
        }
        Ok(())
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.layer.decode()
    }

    fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        self.layer.padding()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        if self.prefilled {
            self.queries.record(&q);
        }
        self.layer.attend(q)
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.prefilled = true;
        self.layer_idx = ctx.layer;
        self.compress(ctx)
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
    use burn::tensor::Distribution;
    use burn_ndarray::NdArray;

    type B = NdArray<f32>;

    fn setting(scorer: ScorerKind) -> DecodingSetting {
        DecodingSetting {
            evict: EvictSetting::new(scorer, Ratio::ONE),
            target: 48,
            interval: 8,
            observe: 4,
        }
    }

    #[test]
    fn long_generation_stays_bounded_with_increasing_positions() {
        let device = Default::default();
        for scorer in [ScorerKind::Knorm, ScorerKind::Snapkv, ScorerKind::Streaming] {
            let mut cache =
                DecodingEvictCache::<B>::new(Evict::new(), setting(scorer)).expect("test");
            let kv =
                |t| Tensor::<B, 4>::random([1, 2, t, 8], Distribution::Normal(0.0, 1.0), &device);
            let q =
                |t| Tensor::<B, 4>::random([1, 4, t, 8], Distribution::Normal(0.0, 1.0), &device);
            cache.append(kv(40), kv(40)).expect("test");
            let mut ctx = ObservationCtx::bare(3);
            ctx.window_queries = Some(q(8));
            cache.finish_prefill(&ctx).expect("test");
            assert_eq!(
                cache.stored(),
                40,
                "{scorer:?}: under target, nothing evicted"
            );
            for step in 0..100 {
                let out = cache.attend(q(1)).expect("test");
                assert_eq!(out.dims(), [1, 4, 1, 8]);
                cache.append(kv(1), kv(1)).expect("test");
                assert!(
                    cache.stored() < 48 + 8,
                    "{scorer:?} step {step}: {}",
                    cache.stored()
                );
            }
            assert_eq!(cache.len(), 140);
            let pos: Vec<i64> = cache
                .layer()
                .positions()
                .expect("test")
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("test");
            let stored = cache.stored();
            for head in pos.chunks(stored) {
                assert!(head.windows(2).all(|w| w[0] < w[1]), "{scorer:?}: {head:?}");
                // Sinks and the newest token survive every compression.
                assert_eq!(&head[..4], &[0, 1, 2, 3]);
                assert_eq!(*head.last().expect("test"), 139);
            }
            let f = cache.footprint().total().get();
            assert!(f > 0 && f < 140 * 2 * 2 * 8 * 4);
        }
    }

    #[test]
    fn unusable_settings_are_refused() {
        let mut s = setting(ScorerKind::H2o);
        assert!(s.validate().is_err());
        s.evict.scorer = ScorerKind::Knorm;
        s.target = 10;
        assert!(s.validate().is_err());
        s.target = 48;
        s.interval = 0;
        assert!(s.validate().is_err());
        s.interval = 1;
        s.evict.selection = Selection::HeadWise {
            min_share: Ratio::new(0.2).expect("test"),
        };
        assert!(s.validate().is_err());
    }
}
