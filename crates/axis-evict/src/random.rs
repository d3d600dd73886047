//! Random scores: the control every real scorer must beat.
use burn::tensor::{Int, Tensor};
use kv_tensor::KvBackend;

/// `[b, h, t]` pseudo-random scores in [0, 1), reproducible from `seed`: an LCG step of the
/// flat index in integer arithmetic (exact on every backend, no RNG state).
pub fn score<B: KvBackend>(k: &Tensor<B, 4>, seed: u64) -> Tensor<B, 3> {
    let [b, h, t, _] = k.dims();
    let n = b * h * t;
    let i = Tensor::<B, 1, Int>::arange(0..n as i64, &k.device());
    // (i mod 2^16) · 25173 < 2^31: no overflow even with 32-bit integers.
    let x = (i.remainder_scalar(65536) * 25173 + (13849 + (seed % 65536) as i64))
        .remainder_scalar(65536);
    (x.float() / 65536.0).reshape([b, h, t])
}

crate::builtin_scorer! {
    /// The random (control) scorer.
    Random, needs: [], |i| Ok(score(i.k, i.ctx.layer as u64))
}
