//! Decode-time compression of a routed layer ([`crate::DecodeBudget`]): the queries the layer
//! attends with are remembered, and every `interval` generated tokens a layer holding more
//! than its budget is evicted back to it by its expert's scorer and selection, the survivors
//! re-staged as after a prefill of that many tokens.
use crate::{DECODE_OBSERVE, RoutedCache};
use burn::tensor::Tensor;
use kv_tensor::{
    AxisError, CompressionAxis, Encoded, KvBackend, KvError, ObservationCtx, Positions, Ratio,
    Segment,
};
use std::sync::Mutex;

/// The last [`DECODE_OBSERVE`] queries a layer attended with (the scorers' observation window
/// during decoding). Cloning copies the history, so a forked cache observes on its own.
#[derive(Debug, Default)]
pub(crate) struct Recent<B: KvBackend>(Mutex<Option<Tensor<B, 4>>>);

impl<B: KvBackend> Clone for Recent<B> {
    fn clone(&self) -> Self {
        Self(Mutex::new(self.get()))
    }
}

impl<B: KvBackend> Recent<B> {
    pub(crate) fn get(&self) -> Option<Tensor<B, 4>> {
        self.0.lock().ok().and_then(|q| q.clone())
    }

    pub(crate) fn record(&self, q: &Tensor<B, 4>) {
        if let Ok(mut seen) = self.0.lock() {
            let all = match seen.take() {
                Some(old) => Tensor::cat(vec![old, q.clone()], 2),
                None => q.clone(),
            };
            let n = all.dims()[2];
            *seen = Some(if n > DECODE_OBSERVE {
                all.slice_dim(2, n - DECODE_OBSERVE..n)
            } else {
                all
            });
        }
    }
}

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
        let seg = Segment {
            positions: Positions::Explicit(positions),
            k: Encoded::Dense(k),
            v: Encoded::Dense(v),
        };
        let seg = self.axes.evict.compress(seg, &setting, &ctx)?;
        self.restage(seg, &ctx)
    }
}
