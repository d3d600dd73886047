//! KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression", 2024): keys with a small norm attract more attention, so the score is the
//! negative key norm.
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// `[b, h, t]` scores: `−‖k‖`.
pub fn score<B: Backend>(k: &Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, _] = k.dims();
    k.clone()
        .square()
        .sum_dim(3)
        .sqrt()
        .neg()
        .reshape([b, h, t])
}
