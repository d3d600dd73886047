//! The routed cache: one layer's expert applied evict → quantize.
use crate::{Expert, RESIDUAL};
use axis_evict::Evict;
use axis_quant::Kivi;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use kv_tensor::{
    AxisError, CompressedLayer, CompressionAxis, Footprint, KvError, LayerCache, ObservationCtx,
};

/// A `LayerCache` applying one [`Expert`].
///
/// End of prefill: the prompt is evicted (if the expert evicts), then the oldest kept tokens
/// are quantized in whole groups, leaving at least [`RESIDUAL`] recent tokens unquantized;
/// every unquantized part of the prompt is stored in fp16 (16 bits, two bytes per value). Decode:
/// tokens land in the residual window; a full group beyond the window is quantized and appended
/// (never re-quantizing history). Its footprint equals [`Expert::footprint`] after prefill.
#[derive(Debug, Clone)]
pub struct RoutedCache<B: Backend> {
    layer: CompressedLayer<B>,
    expert: Expert,
    prefilled: bool,
}

impl<B: Backend> RoutedCache<B> {
    /// An empty cache for `expert`.
    pub fn new(expert: Expert) -> Self {
        Self {
            layer: CompressedLayer::new(),
            expert,
            prefilled: false,
        }
    }

    /// The expert.
    pub fn expert(&self) -> &Expert {
        &self.expert
    }

    fn flush_decode(&mut self) -> Result<(), AxisError> {
        let Some(q) = self.expert.quant.filter(|q| !q.is_identity()) else {
            return Ok(());
        };
        if let Some(seg) = self.layer.take_overflow(RESIDUAL, q.group.get()) {
            let seg = CompressionAxis::<B>::compress(&Kivi, seg, &q, &ObservationCtx::bare(0))?;
            self.layer.push_segment(seg.into_half());
        }
        Ok(())
    }
}

impl<B: Backend> LayerCache<B> for RoutedCache<B> {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        self.layer.push(k, v)?;
        if self.prefilled {
            self.flush_decode()
        } else {
            Ok(())
        }
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.layer.decode()
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.prefilled = true;
        let Some(mut seg) = self.layer.take_window(usize::MAX) else {
            return Ok(());
        };
        let t = seg.len();
        if let Some(e) = &self.expert.evict {
            seg = Evict.compress(seg, e, ctx)?;
        }
        let (quantized, _) = self.expert.split(t);
        // Whatever stays unquantized is stored at 16 bits (fp16), as the expert says.
        match self.expert.quant {
            Some(q) if quantized > 0 => {
                let (old, recent) = seg.split_at(quantized)?;
                self.layer
                    .push_segment(Kivi.compress(old, &q, ctx)?.into_half());
                self.layer.push_segment(recent.into_half());
            }
            _ => self.layer.push_segment(seg.into_half()),
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
