//! Decode-time compression (kvpress's `DecodingPress`): a long generation grows the cache again
//! after the prompt was compressed, so every `interval` generated tokens the layer is evicted
//! back to `target` tokens whenever it holds more. Scorers see the queries of the most recent
//! decoding steps as their observation window (the cache remembers the last `observe` queries it
//! was asked to attend with), so SnapKV, TOVA and expected attention work during decoding. H2O
//! scores on a [`MassLedger`]: the prompt's attention mass of the kept tokens plus what every
//! decoding query paid each row. Head-wise ragged selection is refused at construction.
use crate::{Evict, EvictSetting, MassLedger, Selection};
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
    /// Attention mass of the held rows, for a scorer that reads it (H2O).
    mass: MassLedger<B>,
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
            mass: MassLedger::default(),
            since: 0,
            prefilled: false,
            layer_idx: 0,
        })
    }

    /// The layer as stored.
    pub fn layer(&self) -> &CompressedLayer<B> {
        &self.layer
    }

    /// Whether the scorer reads attention mass, so the cache keeps a [`MassLedger`].
    fn tracks_mass(&self) -> bool {
        self.setting.evict.scorer.needs().attention_mass
    }

    /// Evicts back to the target when the layer holds more, scoring with `ctx` (whose
    /// attention mass, for H2O, is the ledger's); the ledger follows the survivors.
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
            positions: Positions::Explicit(positions.clone()),
            k: kv_tensor::Encoded::Dense(k),
            v: kv_tensor::Encoded::Dense(v),
        };
        let seg = self.axis.compress(seg, &setting, ctx)?;
        self.layer.replace_all(seg.into_half())?;
        if let (true, Some(new)) = (self.tracks_mass(), self.layer.positions()) {
            self.mass.remap(positions, new);
        }
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
                if self.tracks_mass() {
                    ctx.attention_mass = self.mass.get(self.layer.stored());
                }
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
        if !self.prefilled {
            return self.layer.attend(q);
        }
        self.queries.record(&q);
        if !self.tracks_mass() {
            return self.layer.attend(q);
        }
        let (out, mass) = self.layer.attend_with_mass(q)?;
        self.mass.add(mass);
        Ok(out)
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.prefilled = true;
        self.layer_idx = ctx.layer;
        if self.tracks_mass() {
            // The prompt's mass starts the ledger when it covers the held rows.
            let stored = self.layer.stored();
            let mass = ctx.attention_mass.clone();
            self.mass.set(mass.filter(|m| m.dims()[2] == stored));
        }
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
    use crate::ScorerKind;
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
        for scorer in [
            ScorerKind::Knorm,
            ScorerKind::Snapkv,
            ScorerKind::Streaming,
            ScorerKind::H2o,
        ] {
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
        assert!(
            s.validate().is_ok(),
            "h2o scores on the cache's mass ledger"
        );
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

    /// H2O while decoding, as the standalone cache runs it: the prompt's heaviest token
    /// survives the first re-eviction; a token the decoding queries attend to is kept although
    /// the prompt paid it least, and it stays kept at the next re-eviction, when every query
    /// looks away from it, because the ledger carries its mass over by position (a ledger that
    /// forgot it, or gave it a neighbour's, would drop it).
    #[test]
    fn h2o_keeps_what_the_decoding_queries_attend_to() {
        let d = Default::default();
        let dim = 8;
        let unit = |i: usize, scale: f32| {
            let mut v = vec![0f32; dim];
            v[i] = scale;
            Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(v, [1, 1, 1, dim]), &d)
        };
        let small = |t| Tensor::<B, 4>::random([1, 1, t, dim], Distribution::Normal(0.0, 0.05), &d);
        let prompt_k = small(24).slice_assign([0..1, 0..1, 10..11, 0..dim], unit(0, 3.0));
        let mut s = setting(ScorerKind::H2o);
        (s.evict.sinks, s.evict.window) = (0, 4);
        (s.target, s.interval) = (24, 16);
        let mut c = DecodingEvictCache::<B>::new(Evict::new(), s).expect("valid");
        c.append(prompt_k, small(24)).expect("append");
        // The prompt paid token 10 less than the rest, token 15 much more.
        let mut mass = vec![0.01f32; 24];
        mass[10] = 0.005;
        mass[15] = 5.0;
        let ctx = ObservationCtx {
            attention_mass: Some(Tensor::from_data(
                burn::tensor::TensorData::new(mass, [1, 1, 24]),
                &d,
            )),
            ..ObservationCtx::bare(0)
        };
        c.finish_prefill(&ctx).expect("prefill");
        let kept = |c: &DecodingEvictCache<B>| -> Vec<i64> {
            let p = c.layer().positions().expect("positions");
            p.into_data().convert::<i64>().to_vec().expect("ints")
        };
        // The prompt fills the target exactly, so each re-eviction drops 16 rows: the 12
        // unprotected new ones and 4 of the prompt's, where token 10 is the lightest unless the
        // decoding queries' mass counts.
        assert_eq!(kept(&c).len(), 24, "at target after prefill");
        // Round 1: the queries look at token 10, up to the re-eviction at its 16th token
        // (the query after it looks away, so what token 10 holds then is what the ledger
        // carried). Round 2: every query looks away from it, so the other rows gain mass and
        // only what round 1 left keeps it.
        for round in [1, 2] {
            for step in 0..16 {
                c.append(small(1), small(1)).expect("append");
                let scale = if round == 1 && step < 15 { 20.0 } else { -20.0 };
                c.attend(unit(0, scale)).expect("attend");
            }
            let held = kept(&c);
            assert!(held.len() <= 24, "{held:?}");
            assert!(held.contains(&10), "after round {round}: {held:?}");
            if round == 1 {
                assert!(held.contains(&15), "after round {round}: {held:?}");
            }
        }
    }
}
