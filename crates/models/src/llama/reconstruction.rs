//! KVzip's context reconstruction (Kim et al., "KVzip: Query-Agnostic KV Cache Compression
//! with Context Reconstruction", arXiv 2505.23416): after the prefill, the model is
//! teacher-forced to repeat its context (a repeat prompt, then the context again) over the
//! prefilled cache, and every cached key is scored by the largest attention any of those
//! reconstruction queries pays it. A key the model needs to rebuild the context scores high,
//! whatever question comes later.
//!
//! The pass runs piece by piece, as the paper's chunked scoring does: each piece of the context
//! is repeated after the prompt on its own, over the whole prefilled cache, so memory stays at
//! one piece's activations whatever the context length. The prefilled caches are read, never
//! written: each piece's own keys and values live in a [`ReadThrough`] wrapper and are dropped
//! with it. The cost is about one more prefill (every reconstruction query sees the whole
//! context, where a prefill query sees half of it on average).
use super::Llama;
use crate::ModelError;
use crate::llama::Logits;
use burn::tensor::{Bool, Tensor, TensorData};
use kv_tensor::{AxisError, Footprint, KvBackend, KvError, LayerCache, attention_with_peak};
use std::sync::Mutex;

/// The text KVzip feeds before the repeated context.
pub const REPEAT_PROMPT: &str = "\n\nRepeat the previous context exactly.\n";

impl<B: KvBackend> Llama<B> {
    /// The reconstruction peaks of every layer, `[1, kv_heads, stored]` each: for each key
    /// held by `caches` (the prefilled context `ids`), the largest softmax weight a query of
    /// the reconstruction pass paid it, over all query heads of its KV head. `piece` context
    /// tokens are repeated per pass.
    pub(super) fn reconstruction_peaks<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [C],
        piece: usize,
    ) -> Result<Vec<Tensor<B, 3>>, ModelError> {
        let mut peaks: Vec<Option<Tensor<B, 3>>> = (0..caches.len()).map(|_| None).collect();
        for part in ids.chunks(piece.max(1)) {
            let input: Vec<u32> = self
                .reconstruction_prompt
                .iter()
                .chain(part)
                .copied()
                .collect();
            let mut wrapped: Vec<ReadThrough<'_, B, C>> =
                caches.iter_mut().map(ReadThrough::new).collect();
            self.run(&input, &mut wrapped, Logits::Last, None)?;
            for (l, (w, acc)) in wrapped.into_iter().zip(peaks.iter_mut()).enumerate() {
                let p = w.into_peak().ok_or(ModelError::Cache {
                    layer: l,
                    source: KvError::Empty,
                })?;
                *acc = Some(match acc.take() {
                    Some(prev) => prev.max_pair(p),
                    None => p,
                });
            }
        }
        peaks
            .into_iter()
            .enumerate()
            .map(|(layer, p)| {
                p.ok_or(ModelError::Cache {
                    layer,
                    source: KvError::Empty,
                })
            })
            .collect()
    }

    /// Sets the tokens fed before each repeated piece of context (the tokenized
    /// [`REPEAT_PROMPT`]; `load_gguf` sets it from the file's tokenizer). Empty, the pass
    /// repeats the context with no instruction.
    pub fn set_reconstruction_prompt(&mut self, ids: Vec<u32>) {
        self.reconstruction_prompt = ids;
    }

    /// The tokens fed before each repeated piece of context.
    pub fn reconstruction_prompt(&self) -> &[u32] {
        &self.reconstruction_prompt
    }
}

/// A prefilled cache seen through a reconstruction piece: attention reads the cache's keys and
/// values followed by the piece's own, and records the peak weight every cached key received.
/// The cache itself is never written (see [`Piece`]).
/// (It borrows the cache mutably only so that it is `Send` whenever the cache is.)
struct ReadThrough<'a, B: KvBackend, C: LayerCache<B>> {
    base: &'a mut C,
    piece: Piece<B>,
    peak: Mutex<Option<Tensor<B, 3>>>,
}

/// Where a reconstruction piece's own keys and values go.
enum Piece<B: KvBackend> {
    /// Appended to a fork of the prefilled cache (a copy of its stored rows, which the host
    /// kernels read in place).
    Fork(Box<dyn LayerCache<B>>),
    /// Held beside the cache, for a cache that cannot fork: attention then reads a decoded copy.
    Held(Option<(Tensor<B, 4>, Tensor<B, 4>)>),
}

impl<'a, B: KvBackend, C: LayerCache<B>> ReadThrough<'a, B, C> {
    fn new(base: &'a mut C) -> Self {
        let piece = base.fork().map_or(Piece::Held(None), Piece::Fork);
        Self {
            base,
            piece,
            peak: Mutex::new(None),
        }
    }

    fn into_peak(self) -> Option<Tensor<B, 3>> {
        self.peak.into_inner().ok().flatten()
    }

    fn own_len(&self) -> usize {
        match &self.piece {
            Piece::Fork(f) => f.stored() - self.base.stored(),
            Piece::Held(own) => own.as_ref().map_or(0, |(k, _)| k.dims()[2]),
        }
    }
}

impl<B: KvBackend, C: LayerCache<B>> LayerCache<B> for ReadThrough<'_, B, C> {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        match &mut self.piece {
            Piece::Fork(f) => f.append(k, v)?,
            Piece::Held(own) => {
                *own = Some(match own.take() {
                    Some((ok, ov)) => (Tensor::cat(vec![ok, k], 2), Tensor::cat(vec![ov, v], 2)),
                    None => (k, v),
                });
            }
        }
        Ok(())
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        let own = match &self.piece {
            Piece::Fork(f) => return f.keys_values(),
            Piece::Held(own) => own,
        };
        let (k, v) = self.base.keys_values()?;
        Ok(match own {
            Some((ok, ov)) => (
                Tensor::cat(vec![k, ok.clone()], 2),
                Tensor::cat(vec![v, ov.clone()], 2),
            ),
            None => (k, v),
        })
    }

    fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        if let Piece::Fork(f) = &self.piece {
            return f.padding();
        }
        let base = self.base.padding()?;
        let [b, h, _] = base.dims();
        let n = self.own_len();
        let own = Tensor::<B, 3, Bool>::from_data(
            TensorData::new(vec![false; b * h * n], [b, h, n]),
            &base.device(),
        );
        Some(Tensor::cat(vec![base, own], 2))
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        let (out, peak) = match &self.piece {
            Piece::Fork(f) => f.attend_with_peak(q)?,
            Piece::Held(_) => {
                let (k, v) = self.keys_values()?;
                attention_with_peak(q, k, v, self.padding())?
            }
        };
        let held = self.base.stored();
        let peak = peak.slice_dim(2, 0..held);
        let mut slot = self.peak.lock().map_err(|_| KvError::Empty)?;
        *slot = Some(match slot.take() {
            Some(prev) => prev.max_pair(peak),
            None => peak,
        });
        Ok(out)
    }

    fn footprint(&self) -> Footprint {
        self.base.footprint()
    }

    fn len(&self) -> usize {
        self.base.len() + self.own_len()
    }

    fn stored(&self) -> usize {
        self.base.stored() + self.own_len()
    }
}
