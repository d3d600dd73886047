//! KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression", 2024): keys with a small norm attract more attention, so the score is the
//! negative key norm.
use burn::tensor::Tensor;
use kv_tensor::KvBackend;

/// `[b, h, t]` scores: `−‖k‖`.
pub fn score<B: KvBackend>(k: &Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, _] = k.dims();
    k.clone()
        .square()
        .sum_dim(3)
        .sqrt()
        .neg()
        .reshape([b, h, t])
}

crate::builtin_scorer! {
    /// The key-norm scorer.
    Knorm, needs: [], |i| Ok(score(i.k))
}
