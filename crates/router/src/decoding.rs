//! Decode-time compression of a routed layer ([`crate::DecodeBudget`]): the queries the layer
//! attends with are remembered (`axis_evict::RecentQueries`), and every `interval` generated tokens a layer holding more
//! than its budget is evicted back to it by its expert's scorer and selection, the survivors
//! re-staged as after a prefill of that many tokens.
use crate::RoutedCache;
use burn::tensor::{Int, Tensor};
use kv_tensor::{
    AxisError, CompressionAxis, Encoded, KvBackend, KvError, ObservationCtx, Positions, Ratio,
    Segment,
};

impl<B: KvBackend> RoutedCache<B> {
    /// After `t` generated tokens: re-evicts when the interval is up and the layer is over its
    /// budget.
    pub(crate) fn decode_step(&mut self, t: usize) -> Result<(), AxisError> {
        let (Some(d), Some(e)) = (self.expert.decode, self.expert.evict) else {
            return Ok(());
        };
        self.since_evict += t;
        if self.since_evict < d.interval || self.layer.stored() <= d.tokens {
            return Ok(());
        }
        self.since_evict = 0;
        let stored = self.layer.stored();
        let positions = self.layer.positions().ok_or(KvError::Empty)?;
        let (k, v) = self.layer.decode()?;
        let setting = axis_evict::EvictSetting {
            // A keep ratio whose ceiling over what is held is exactly `tokens`.
            keep: Ratio::new((d.tokens as f64 - 0.5).max(0.5) / stored as f64)?,
            ..e
        };
        let mut ctx = ObservationCtx::bare(self.layer_idx);
        ctx.window_queries = self.recent.get();
        if self.tracks_mass() {
            ctx.attention_mass = self.mass.get(stored);
        }
        let seg = Segment {
            positions: Positions::Explicit(positions.clone()),
            k: Encoded::Dense(k),
            v: Encoded::Dense(v),
        };
        let seg = self.axes.evict.compress(seg, &setting, &ctx)?;
        self.restage(seg, &ctx)?;
        self.carry_mass(positions);
        Ok(())
    }

    /// Whether this layer keeps a [`axis_evict::MassLedger`]: it re-evicts while decoding with a scorer
    /// that reads attention mass.
    pub(crate) fn tracks_mass(&self) -> bool {
        self.expert.decode.is_some()
            && self
                .expert
                .evict
                .is_some_and(|e| e.scorer.needs().attention_mass)
    }

    /// After the rows changed from positions `old` to what the layer holds now, carries the
    /// ledger over (see [`axis_evict::MassLedger::remap`]).
    pub(crate) fn carry_mass(&self, old: Tensor<B, 3, Int>) {
        if let (true, Some(new)) = (self.tracks_mass(), self.layer.positions()) {
            self.mass.remap(old, new);
        }
    }
}
