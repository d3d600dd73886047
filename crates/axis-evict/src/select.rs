//! Selection: protect sinks and the recent window, keep the top-k tokens of each KV head, and
//! gather them in position order.
use burn::tensor::{Int, IntDType, Tensor};
use kv_tensor::KvBackend;

/// Raises the scores of the first `sinks` and last `window` tokens above every other score.
pub fn protect<B: KvBackend>(scores: Tensor<B, 3>, sinks: usize, window: usize) -> Tensor<B, 3> {
    let [b, h, t] = scores.dims();
    let device = scores.device();
    let pos = Tensor::<B, 1, Int>::arange(0..t as i64, &device);
    let keep = pos
        .clone()
        .lower_elem(sinks as i64)
        .bool_or(pos.greater_equal_elem(t.saturating_sub(window) as i64));
    let mask = keep.reshape([1, 1, t]).expand([b, h, t]);
    scores.mask_fill(mask, f32::INFINITY)
}

/// Indices `[b, h, n]` of the `n` highest scores per head, ascending (position order).
pub fn top_k<B: KvBackend>(scores: Tensor<B, 3>, n: usize) -> Tensor<B, 3, Int> {
    let (_, idx) = scores.topk_with_indices(n, 2);
    idx.sort(2).cast(IntDType::I32)
}

/// Keys and values at `idx` `[b, h, n]` along the token axis.
pub fn gather<B: KvBackend>(
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    idx: Tensor<B, 3, Int>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, n] = idx.dims();
    let d = k.dims()[3];
    let idx = idx.reshape([b, h, n, 1]).expand([b, h, n, d]);
    (k.gather(2, idx.clone()), v.gather(2, idx))
}
