//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//! 2023): keep the attention sinks and the most recent tokens. The score is the position, so
//! with any keep ratio the newest tokens win; sinks are protected by the selection.
use burn::tensor::{Int, Tensor};
use kv_tensor::KvBackend;

/// `[b, h, t]` scores: the token index.
pub fn score<B: KvBackend>(k: &Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, _] = k.dims();
    Tensor::<B, 1, Int>::arange(0..t as i64, &k.device())
        .float()
        .reshape([1, 1, t])
        .expand([b, h, t])
}

crate::builtin_scorer! {
    /// The StreamingLLM scorer.
    Streaming, needs: [], |i| Ok(score(i.k))
}
