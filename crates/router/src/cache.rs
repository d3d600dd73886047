//! The routed cache: one layer's expert applied as eviction, then its stages in order.
use crate::Expert;
use crate::stage::{Registered, StageAxis};
use axis_evict::Evict;
use axis_lowrank::LowRank;
use axis_quant::Kivi;
use burn::tensor::{Bool, Tensor};
use kv_tensor::{
    AxisError, CompressedLayer, CompressionAxis, Configured, Footprint, KvError, LayerCache,
    ObservationCtx, Stage,
};
use kv_tensor::{KvBackend, Segment};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A `LayerCache` applying one [`Expert`].
///
/// End of prefill: the prompt is evicted (if the expert evicts), then the oldest kept tokens
/// go through the expert's stages (projection, registered axes' stages, quantization) in whole
/// groups, leaving at least the expert's residual window of recent tokens
/// untouched; every unquantized part is stored in fp16 (16 bits, two bytes per value). Decode:
/// tokens land in the residual window; a full group beyond the window is projected/quantized and
/// appended (never re-compressing history). Its footprint equals [`Expert::footprint`] after
/// prefill.
#[derive(Clone)]
pub struct RoutedCache<B: KvBackend> {
    pub(crate) layer: CompressedLayer<B>,
    pub(crate) expert: Expert,
    pub(crate) axes: Axes<B>,
    pub(crate) layer_idx: usize,
    prefilled: bool,
    /// Set once the prefill compresses chunk by chunk.
    chunked: Option<Chunked>,
    /// Queries attended with since the prefill (decode-time compression observes them).
    pub(crate) recent: axis_evict::RecentQueries<B>,
    /// Generated tokens since the last decode-time eviction.
    pub(crate) since_evict: usize,
    /// Attention mass of the held rows, for a scorer that reads it while decoding (H2O).
    pub(crate) mass: axis_evict::MassLedger<B>,
}

/// Where a chunk-by-chunk prefill stands: tokens (per head) already in final projected or
/// quantized segments, and whether the newest segment is the fp16 set of kept recent tokens
/// that the next chunk is evicted together with.
#[derive(Debug, Clone, Copy, Default)]
struct Chunked {
    compressed: usize,
    pending: bool,
}

/// The calibrated axes a plan's caches share: the eviction axis (with trig statistics), every
/// layer's low-rank bases and the registered axes' stages. Cheap to clone (all shared).
#[derive(Clone)]
pub struct Axes<B: KvBackend> {
    /// The eviction axis.
    pub evict: Evict<B>,
    /// Low-rank bases, needed by experts that project.
    pub lowrank: Option<Arc<LowRank<B>>>,
    /// Axes outside the router, by the name their settings give (see [`crate::stage`]).
    stages: BTreeMap<&'static str, Arc<dyn StageAxis<B>>>,
}

impl<B: KvBackend> Default for Axes<B> {
    fn default() -> Self {
        Self::new(Evict::new(), None)
    }
}

impl<B: KvBackend> Axes<B> {
    /// The built-in axes: eviction and (when calibrated) low-rank bases.
    pub fn new(evict: Evict<B>, lowrank: Option<Arc<LowRank<B>>>) -> Self {
        Self {
            evict,
            lowrank,
            stages: BTreeMap::new(),
        }
    }

    /// Adds a calibrated axis whose settings name `axis` (as registered with
    /// [`crate::register_stage`]).
    pub fn with_stage<A, S>(mut self, axis: &'static str, compressor: Arc<A>) -> Self
    where
        A: CompressionAxis<B, Setting = S> + 'static,
        S: crate::StageSetting + Clone,
    {
        self.stages.insert(axis, Arc::new(Registered(compressor)));
        self
    }

    /// A cache applying `expert` with these axes.
    pub fn cache(&self, expert: Expert) -> RoutedCache<B> {
        RoutedCache::with_axes(expert, self.clone())
    }

    /// The run-time stages of `expert`, in order.
    pub fn stages(&self, expert: &Expert) -> Result<Vec<Box<dyn Stage<B>>>, AxisError> {
        let mut v: Vec<Box<dyn Stage<B>>> = Vec::new();
        if let Some(l) = expert.lowrank {
            let axis = self.lowrank.clone().ok_or(AxisError::MissingObservation {
                method: "lowrank",
                what: "calibrated bases (build the cache from calibrated Axes)",
            })?;
            v.push(Box::new(Configured::<_, _, B>::new(axis, l)));
        }
        for s in &expert.stages {
            let name = s.setting().axis();
            let axis = self.stages.get(name).ok_or_else(|| AxisError::Stage {
                axis: name.into(),
                why: "not among the calibrated axes (add it with Axes::with_stage)".into(),
            })?;
            v.push(axis.stage(s)?);
        }
        if let Some(q) = expert.quant {
            v.push(Box::new(Configured::<_, _, B>::new(Arc::new(Kivi), q)));
        }
        Ok(v)
    }
}

impl<B: KvBackend> std::fmt::Debug for RoutedCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutedCache")
            .field("expert", &self.expert)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<B: KvBackend> RoutedCache<B> {
    /// An empty cache for `expert` with uncalibrated axes (no `trig` scorer, no projection).
    pub fn new(expert: Expert) -> Self {
        Self::with_axes(expert, Axes::default())
    }

    /// An empty cache for `expert` whose axes carry calibration: the eviction axis (trig
    /// statistics), the low-rank bases of every layer and the registered axes.
    pub fn with_axes(expert: Expert, axes: Axes<B>) -> Self {
        Self {
            layer: CompressedLayer::new(),
            expert,
            axes,
            layer_idx: 0,
            prefilled: false,
            chunked: None,
            recent: axis_evict::RecentQueries::new(crate::DECODE_OBSERVE),
            since_evict: 0,
            mass: Default::default(),
        }
    }

    /// Runs a dense segment of old tokens through the expert's stages in order.
    fn compress_history(
        &self,
        mut seg: Segment<B>,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        for stage in self.axes.stages(&self.expert)? {
            seg = stage.compress(seg, ctx)?;
        }
        Ok(seg.into_half())
    }

    /// One step of a chunk-by-chunk prefill: the fp16 tokens kept so far and the new chunk
    /// are evicted together down to what the expert keeps of the tokens seen, then whole groups
    /// beyond the residual window are projected/quantized for good (the same split as at the
    /// end of a one-shot prefill, so the final layer holds the same number of tokens in each
    /// form). Scorers see what was observed so far: the latest queries, and the attention mass
    /// since the cache last changed its rows.
    fn compress_step(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        let mut st = self.chunked.unwrap_or_default();
        let Some(window) = self.layer.take_window(usize::MAX) else {
            return Ok(());
        };
        let mut seg = if st.pending {
            match self.layer.pop_segment().transpose()? {
                Some(p) => p.join(window)?,
                None => window,
            }
        } else {
            window
        };
        let candidates = seg.len();
        let target = self
            .expert
            .kept(self.layer.seen())
            .saturating_sub(st.compressed);
        if let Some(e) = &self.expert.evict
            && target < candidates
        {
            // A keep ratio whose ceiling over the candidates is exactly `target`.
            let keep = kv_tensor::Ratio::new((target as f64 - 0.5).max(0.5) / candidates as f64)?;
            let mut local = ctx.clone();
            let tail = |m: Tensor<B, 3>| {
                let t = m.dims()[2];
                m.slice_dim(2, t - candidates.min(t)..t)
            };
            local.attention_mass = ctx.attention_mass.clone().map(tail);
            local.reconstruction = ctx.reconstruction.clone().map(tail);
            // Protection within the candidates: the sinks only while nothing is compressed
            // yet (then the candidates start at the prompt's first token), and never more than
            // the budget has room for. Compressed tokens can already fill part of the recent
            // window (a residual window smaller than the eviction's), and the layer must hold
            // exactly what the expert keeps.
            let sinks = if st.compressed == 0 {
                e.sinks.min(target)
            } else {
                0
            };
            let window = e.window.min(target - sinks);
            let local_setting = axis_evict::EvictSetting {
                keep,
                sinks,
                window,
                ..*e
            };
            seg = self.axes.evict.compress(seg, &local_setting, &local)?;
        }
        if self.expert.compresses_history() {
            let g = self.expert.group();
            let q = seg.len().saturating_sub(self.expert.residual()) / g * g;
            if q > 0 {
                let (old, recent) = seg.split_at(q)?;
                let old = self.compress_history(old, ctx)?;
                self.layer.push_segment(old)?;
                st.compressed += q;
                seg = recent;
            }
        }
        st.pending = !seg.is_empty();
        if st.pending {
            self.layer.push_segment(seg.into_half())?;
        }
        self.chunked = Some(st);
        Ok(())
    }

    /// Whether this expert can compress chunk by chunk. Head-wise (ragged) selections are
    /// final once made, and KVzip scores every key by a reconstruction pass that only runs
    /// once the whole context is in: both keep the prompt until the end of prefill (while the
    /// other layers of a chunked prefill compress as they go).
    fn chunkable(&self) -> bool {
        !self.expert.evict.is_some_and(|e| {
            matches!(e.selection, axis_evict::Selection::HeadWise { .. })
                || e.scorer.needs().reconstruction
        })
    }

    /// Replaces everything held by `seg` (the kept tokens, oldest first), staged as at the end
    /// of a prefill: whole groups beyond the residual window through the stages, the rest
    /// fp16.
    pub(crate) fn restage(
        &mut self,
        seg: Segment<B>,
        ctx: &ObservationCtx<B>,
    ) -> Result<(), AxisError> {
        let plain = Expert {
            evict: None,
            ..self.expert.clone()
        };
        let (compressed, _) = plain.split(seg.len());
        let first = if compressed > 0 {
            let (old, recent) = seg.split_at(compressed)?;
            let old = self.compress_history(old, ctx)?;
            self.layer.replace_all(old)?;
            recent
        } else {
            self.layer.replace_all(seg.into_half())?;
            return Ok(());
        };
        // A zero-token residual window leaves nothing recent.
        if !first.is_empty() {
            self.layer.push_segment(first.into_half())?;
        }
        Ok(())
    }

    /// The prompt's compression at the end of prefill: the last chunk's step when the prefill
    /// compressed chunk by chunk, else eviction of the whole prompt and its staging.
    fn compress_prompt(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        if self.chunked.is_some() {
            return self.compress_step(ctx);
        }
        let Some(mut seg) = self.layer.take_window(usize::MAX) else {
            return Ok(());
        };
        if let Some(e) = &self.expert.evict {
            seg = self.axes.evict.compress(seg, e, ctx)?;
        }
        self.restage(seg, ctx)
    }

    /// The expert.
    pub fn expert(&self) -> &Expert {
        &self.expert
    }

    fn flush_decode(&mut self) -> Result<(), AxisError> {
        if !self.expert.compresses_history() {
            return Ok(());
        }
        if let Some(seg) = self
            .layer
            .take_overflow(self.expert.residual(), self.expert.group())
        {
            let seg = self.compress_history(seg, &ObservationCtx::bare(self.layer_idx))?;
            self.layer.push_segment(seg)?;
        }
        Ok(())
    }
}

impl<B: KvBackend> LayerCache<B> for RoutedCache<B> {
    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        Some(Box::new(self.clone()))
    }

    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        let t = k.dims()[2];
        self.layer.push(k, v)?;
        if self.prefilled {
            self.flush_decode()?;
            self.decode_step(t)
        } else {
            Ok(())
        }
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.layer.decode()
    }

    fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        self.layer.padding()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        if self.prefilled && self.tracks_mass() {
            return Ok(self.attend_with_mass(q)?.0);
        }
        if self.prefilled && self.expert.decode.is_some() {
            self.recent.record(&q);
        }
        self.layer.attend(q)
    }

    fn attend_with_mass(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        if self.prefilled && self.expert.decode.is_some() {
            self.recent.record(&q);
        }
        let (out, mass) = self.layer.attend_with_mass(q)?;
        if self.prefilled && self.tracks_mass() {
            self.mass.add(mass.clone());
        }
        Ok((out, mass))
    }

    /// Read by KVzip's reconstruction pass on a fork of the prefilled cache, before anything
    /// is compressed or tracked.
    fn attend_with_peak(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.layer.attend_with_peak(q)
    }

    fn resident(&self) -> kv_tensor::Bytes {
        self.layer.resident()
    }

    fn after_prefill_chunk(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        if !self.chunkable() {
            return Ok(());
        }
        self.layer_idx = ctx.layer;
        self.compress_step(ctx)
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.prefilled = true;
        self.layer_idx = ctx.layer;
        if self.expert.decode.is_some()
            && let Some(q) = &ctx.window_queries
        {
            // The prompt's observation window is what the first re-eviction sees until
            // decoding queries replace it.
            self.recent.record(q);
        }
        // A scorer reading attention mass while decoding starts from the prompt's.
        let before = self.tracks_mass().then(|| self.layer.positions()).flatten();
        if before.is_some() {
            let stored = self.layer.stored();
            let mass = ctx.attention_mass.clone();
            self.mass.set(mass.filter(|m| m.dims()[2] == stored));
        }
        self.compress_prompt(ctx)?;
        if let Some(old) = before {
            self.carry_mass(old);
        }
        Ok(())
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
