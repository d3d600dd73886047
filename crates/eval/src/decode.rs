//! Free generation of the task answers: every method's pending answer decoded in lockstep, one
//! batched step for all of them (the weights are read once per step).
use crate::error::Result;
use crate::tasks::TaskSample;
use kv_tensor::KvBackend;
use kv_tensor::LayerCache;
use models::LoadedModel;

/// A greedy answer under way: caches holding the question and the answer but its last token.
pub struct Generation<B: KvBackend> {
    /// Index of its record.
    pub record: usize,
    /// The caches.
    pub caches: Vec<Box<dyn LayerCache<B>>>,
    /// The answer so far.
    pub out: Vec<u32>,
}

/// Greedy decoding of every pending answer in lockstep (one batched step for all methods),
/// each until the end of the turn, a line break after a non-empty answer, or `max_new` tokens.
pub fn generate<B: KvBackend>(
    m: &LoadedModel<B>,
    t: &TaskSample,
    pending: &mut [Generation<B>],
) -> Result<()> {
    let done = |out: &[u32]| -> Result<bool> {
        let last = out[out.len() - 1];
        Ok(out.len() >= t.max_new
            || m.tokenizer.eos.contains(&last)
            || (m.tokenizer.decode(&[last])?.contains('\n')
                && !m.tokenizer.decode(out)?.trim().is_empty()))
    };
    loop {
        let mut active: Vec<&mut Generation<B>> = Vec::new();
        for g in pending.iter_mut() {
            if !done(&g.out)? {
                active.push(g);
            }
        }
        if active.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = active.iter().map(|g| g.out[g.out.len() - 1]).collect();
        let mut sets: Vec<&mut [Box<dyn LayerCache<B>>]> =
            active.iter_mut().map(|g| g.caches.as_mut_slice()).collect();
        let logits = m.model.decode_batch(&ids, &mut sets)?;
        let next: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
        for (g, id) in active.into_iter().zip(next) {
            g.out.push(id as u32);
        }
    }
}
