//! KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context
//! Reconstruction", arXiv 2505.23416): each key's importance is the largest attention any query
//! paid it while the model was teacher-forced to repeat its context over the prefilled cache.
//! The model computes that pass when asked (`PrefillOptions::reconstruction` in `models`),
//! about one more prefill; the keys it needs to rebuild the context are the ones any later
//! question can reach.
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, ObservationCtx};

/// `[b, h, t]` scores: the reconstruction pass's peak attention per key.
pub fn score<B: KvBackend>(
    k: &Tensor<B, 4>,
    ctx: &ObservationCtx<B>,
) -> Result<Tensor<B, 3>, AxisError> {
    crate::scorer::observed_per_token(
        ctx.reconstruction.as_ref(),
        k,
        "kvzip",
        "the context-reconstruction pass's attention",
    )
}

crate::builtin_scorer! {
    /// The KVzip scorer.
    Kvzip, needs: [reconstruction], |i| score(i.k, i.ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};
    use burn_ndarray::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn scores_are_the_peaks_and_a_missing_or_misshapen_pass_is_an_error() {
        let dev = Default::default();
        let k = Tensor::<B, 4>::random([1, 2, 5, 4], Distribution::Default, &dev);
        let peaks: Vec<f32> = (0..10).map(|i| i as f32 / 10.0).collect();
        let ctx = ObservationCtx {
            reconstruction: Some(Tensor::from_data(
                TensorData::new(peaks.clone(), [1, 2, 5]),
                &dev,
            )),
            ..ObservationCtx::bare(0)
        };
        let got: Vec<f32> = score(&k, &ctx)
            .expect("peaks")
            .into_data()
            .to_vec()
            .expect("f32");
        assert_eq!(got, peaks);
        let e = score(&k, &ObservationCtx::bare(0)).expect_err("no pass");
        assert!(e.to_string().contains("kvzip"), "{e}");
        let short = ObservationCtx {
            reconstruction: Some(Tensor::zeros([1, 2, 4], &dev)),
            ..ObservationCtx::bare(0)
        };
        assert!(score(&k, &short).is_err());
    }
}
