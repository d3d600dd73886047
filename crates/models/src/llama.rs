//! The Llama-family decoder, top to bottom: embedding, blocks (RMSNorm → fused QKV → optional
//! q/k norm → RoPE → cache → attention → output projection; RMSNorm → SwiGLU MLP), final norm,
//! head. The KV cache is passed in, one [`LayerCache`] per layer: `append` + `attend` is the
//! single patch point where every compression method acts.
//!
//! Batch size is one: prompts are processed in chunks of tokens, rows of a `[t, hidden]` matrix.
use crate::ModelError;
use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::quant_rows::QuantRows;
use crate::rope::Rope;
use crate::weights::WeightSource;
use burn::tensor::activation::silu;
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::KvBackend;
use kv_tensor::{LayerCache, ObservationCtx};

/// One decoder block's weights. Matrices are stored `[in, out]` so that `x.matmul(w)` applies
/// them; q, k, v are fused into one matrix and gate, up into another (fewer, larger matmuls).
#[derive(Debug, Clone)]
struct Block<B: KvBackend> {
    attn_norm: Tensor<B, 1>,
    wqkv: Linear<B>,
    bqkv: Option<Tensor<B, 1>>,
    q_norm: Option<Tensor<B, 1>>,
    k_norm: Option<Tensor<B, 1>>,
    wo: Linear<B>,
    ffn_norm: Tensor<B, 1>,
    w_gate_up: Linear<B>,
    w_down: Linear<B>,
}

/// What a prefill hands back besides filling the caches.
#[derive(Debug, Clone, Copy)]
pub struct PrefillOptions {
    /// Tokens per forward chunk (bounds activation memory).
    pub chunk: usize,
    /// How many of the last prompt tokens' queries to give scorers (SnapKV's window).
    pub observe_window: usize,
    /// Also give scorers the pre-RoPE queries of the observation window.
    pub pre_rope: bool,
    /// Also accumulate the attention every key receives from every prompt query (H2O). Read
    /// off the attention's own softmax (a column sum per chunk), not a second pass.
    pub attention_mass: bool,
    /// Let every cache compress after each chunk ([`LayerCache::after_prefill_chunk`]) with
    /// what has been observed so far, so a long prompt is never held dense as a whole: peak
    /// memory follows the caches' budgets instead of the prompt. Off, caches compress once at
    /// the end (the kvpress protocol: question-agnostic compression of the whole prompt).
    pub compress_chunks: bool,
    /// Also run KVzip's reconstruction pass before the caches compress (see
    /// [`REPEAT_PROMPT`]): about one more prefill, in pieces of `chunk` context tokens. With
    /// `compress_chunks` it runs after the last chunk over what the caches hold then: a cache
    /// whose scorer reads the pass keeps its whole prompt until `finish_prefill`, the others
    /// are already compressed (and the pass attends through their compressed rows).
    pub reconstruction: bool,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        Self {
            chunk: 512,
            observe_window: 32,
            pre_rope: false,
            attention_mass: false,
            compress_chunks: false,
            reconstruction: false,
        }
    }
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (teacher-forced scoring).
    All,
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct Llama<B: KvBackend> {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    embed: Tensor<B, 2>,
    blocks: Vec<Block<B>>,
    norm: Tensor<B, 1>,
    /// The output head `[hidden, vocab]`, in column blocks of [`HEAD_BLOCK`].
    head: Linear<B>,
    rope: Rope<B>,
    /// Host copies of norms, biases and RoPE tables for one-token decode steps, present while
    /// every projection has its host copy.
    host: Option<host_forward::HostParams>,
    /// Tokens before each repeated piece of context in KVzip's reconstruction pass.
    reconstruction_prompt: Vec<u32>,
}

mod host_forward;
mod reconstruction;
pub use reconstruction::REPEAT_PROMPT;

/// Columns per block of the output head.
const HEAD_BLOCK: usize = 3072;

/// One layer's queries, keys and values of a chunk, each `[1, heads, t, d]`; the pre-RoPE
/// queries only when a scorer asked for them.
struct Step<B: KvBackend> {
    pre_q: Option<Tensor<B, 4>>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
}

/// Per-layer observations gathered during prefill.
#[derive(Default)]
struct Observed<B: KvBackend> {
    queries: Option<Tensor<B, 4>>,
    pre_q: Option<Tensor<B, 4>>,
    mass: Option<Tensor<B, 3>>,
}

impl<B: KvBackend> Llama<B> {
    /// Builds the model from weights named as in GGUF.
    pub fn load(
        config: LlamaConfig,
        w: &dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let c = &config;
        let (qd, kvd) = (c.q_heads * c.head_dim, c.kv_heads * c.head_dim);
        // Host-side matrix–vector products pay off where tensors live in host memory.
        let host = B::host_memory(device);
        let (edims, evals) = w.require("token_embd.weight")?;
        expect(&edims, &[c.hidden, c.vocab], "token_embd.weight")?;
        let embed = Tensor::from_data(TensorData::new(evals.clone(), [c.vocab, c.hidden]), device);
        let head_rows = match w.fetch("output.weight")? {
            Some((d, v)) => {
                expect(&d, &[c.hidden, c.vocab], "output.weight")?;
                v
            }
            None => evals,
        };
        // Decode streams the file's quantised blocks where it has them (see `QuantRows`).
        let with_blocks = |mut lin: Linear<B>, names: &[String], inp: usize, out: usize| {
            if host && let Some(b) = host_blocks(w, names, inp, out) {
                lin.use_blocks(b);
            }
            lin
        };
        let head_name = if w.fetch_blocks("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let head = with_blocks(
            Linear::from_rows(head_rows, c.hidden, c.vocab, HEAD_BLOCK, host, device),
            &[head_name.into()],
            c.hidden,
            c.vocab,
        );
        let mut blocks = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let rows = |s: &str, i: usize, o: usize| -> Result<(Vec<f32>, usize), ModelError> {
                let (d, v) = w.require(&n(s))?;
                expect(&d, &[i, o], &n(s))?;
                Ok((v, o))
            };
            let vec = |s: &str, len: usize| -> Result<Tensor<B, 1>, ModelError> {
                let (d, v) = w.require(&n(s))?;
                expect(&d, &[len], &n(s))?;
                Ok(Tensor::from_data(TensorData::new(v, [len]), device))
            };
            let wqkv = with_blocks(
                Linear::fused(
                    vec![
                        rows("attn_q.weight", c.hidden, qd)?,
                        rows("attn_k.weight", c.hidden, kvd)?,
                        rows("attn_v.weight", c.hidden, kvd)?,
                    ],
                    c.hidden,
                    host,
                    device,
                ),
                &[n("attn_q.weight"), n("attn_k.weight"), n("attn_v.weight")],
                c.hidden,
                qd + 2 * kvd,
            );
            let bqkv = if c.qkv_bias {
                Some(Tensor::cat(
                    vec![
                        vec("attn_q.bias", qd)?,
                        vec("attn_k.bias", kvd)?,
                        vec("attn_v.bias", kvd)?,
                    ],
                    0,
                ))
            } else {
                None
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(vec("attn_q_norm.weight", c.head_dim)?),
                    Some(vec("attn_k_norm.weight", c.head_dim)?),
                )
            } else {
                (None, None)
            };
            blocks.push(Block {
                attn_norm: vec("attn_norm.weight", c.hidden)?,
                wqkv,
                bqkv,
                q_norm,
                k_norm,
                wo: with_blocks(
                    Linear::fused(
                        vec![rows("attn_output.weight", qd, c.hidden)?],
                        qd,
                        host,
                        device,
                    ),
                    &[n("attn_output.weight")],
                    qd,
                    c.hidden,
                ),
                ffn_norm: vec("ffn_norm.weight", c.hidden)?,
                w_gate_up: with_blocks(
                    Linear::fused(
                        vec![
                            rows("ffn_gate.weight", c.hidden, c.ffn)?,
                            rows("ffn_up.weight", c.hidden, c.ffn)?,
                        ],
                        c.hidden,
                        host,
                        device,
                    ),
                    &[n("ffn_gate.weight"), n("ffn_up.weight")],
                    c.hidden,
                    2 * c.ffn,
                ),
                w_down: with_blocks(
                    Linear::fused(
                        vec![rows("ffn_down.weight", c.ffn, c.hidden)?],
                        c.ffn,
                        host,
                        device,
                    ),
                    &[n("ffn_down.weight")],
                    c.ffn,
                    c.hidden,
                ),
            });
        }
        let (nd, nv) = w.require("output_norm.weight")?;
        expect(&nd, &[c.hidden], "output_norm.weight")?;
        let norm = Tensor::from_data(TensorData::new(nv, [c.hidden]), device);
        let rope = Rope::new(c.head_dim, c.context, c.rope_theta, c.rope_layout, device);
        let mut model = Self {
            config,
            embed,
            blocks,
            norm,
            head,
            rope,
            host: None,
            reconstruction_prompt: Vec::new(),
        };
        model.refresh_host();
        Ok(model)
    }

    /// Keeps the host decode parameters in step with the projections' host copies.
    fn refresh_host(&mut self) {
        let all = self.head.has_host()
            && self.blocks.iter().all(|b| {
                [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down]
                    .iter()
                    .all(|w| w.has_host())
            });
        self.host = if all {
            host_forward::HostParams::new(self)
        } else {
            None
        };
    }

    /// Turns the host path (the host matrix products of every forward pass) on or off. It is
    /// on by default where the backend keeps tensors in host memory (burn-ndarray), where it
    /// makes a decode step several times faster. Its copy of each matrix replaces burn's f32
    /// tensors: the model file's blocks where a kernel reads them (0.1 GB for SmolLM2-135M in
    /// Q4_1, instead of 0.54 GB of f32), f32 rows otherwise. Turned off, burn's tensors are
    /// rebuilt from it (dequantised); turned back on, it is rebuilt as f32 rows. Results agree
    /// up to float summation order.
    pub fn set_host_matvec(&mut self, on: bool) {
        for b in &mut self.blocks {
            for w in [&mut b.wqkv, &mut b.wo, &mut b.w_gate_up, &mut b.w_down] {
                w.set_host(on);
            }
        }
        self.head.set_host(on);
        self.refresh_host();
    }

    /// Tokens the model's position tables cover (its context window): no cache grows past it.
    pub fn context(&self) -> usize {
        self.rope.context()
    }

    /// Bytes of weights one decode step streams through the host path (0 when it is off).
    pub fn host_matvec_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down]
                    .iter()
                    .map(|w| w.host_bytes())
                    .sum::<usize>()
            })
            .sum();
        blocks + self.head.host_bytes()
    }

    /// Runs the prompt through the model in chunks, filling `caches`, then lets every cache
    /// compress itself (`finish_prefill`) with what was observed. Returns the logits of the
    /// last prompt token `[1, vocab]` (computed before compression, from full attention).
    pub fn prefill<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [C],
        opts: &PrefillOptions,
    ) -> Result<Tensor<B, 2>, ModelError> {
        on_pool(|| self.prefill_here(ids, caches, opts))
    }

    fn prefill_here<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [C],
        opts: &PrefillOptions,
    ) -> Result<Tensor<B, 2>, ModelError> {
        let (logits, observed) = self.run(ids, caches, Logits::Last, Some(opts))?;
        let mut peaks = if opts.reconstruction {
            Some(
                self.reconstruction_peaks(ids, caches, opts.chunk)?
                    .into_iter(),
            )
        } else {
            None
        };
        for (layer, (cache, obs)) in caches.iter_mut().zip(observed).enumerate() {
            let ctx = ObservationCtx {
                layer,
                window_queries: obs.queries,
                attention_mass: obs.mass,
                pre_rope_queries: obs.pre_q,
                reconstruction: peaks.as_mut().and_then(Iterator::next),
            };
            cache
                .finish_prefill(&ctx)
                .map_err(|source| ModelError::Compress { layer, source })?;
        }
        Ok(logits)
    }

    /// Feeds tokens after the prompt (decode steps, or a question appended to a compressed
    /// context) without compressing at the end. Returns `[1, vocab]` or `[t, vocab]` logits.
    pub fn forward<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [C],
        want: Logits,
    ) -> Result<Tensor<B, 2>, ModelError> {
        on_pool(|| self.forward_here(ids, caches, want))
    }

    fn forward_here<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [C],
        want: Logits,
    ) -> Result<Tensor<B, 2>, ModelError> {
        // One token on a host backend: the host decode step (see `host_forward`), once the
        // checks every step shares have passed.
        if let [id] = ids
            && self.host.is_some()
        {
            self.check_step(ids, caches)?;
            if let Some(logits) = self.decode_host(*id, caches)? {
                return Ok(logits);
            }
        }
        Ok(self.run(ids, caches, want, None)?.0)
    }

    /// One decode step for several sequences at once: `ids[s]` is appended to sequence `s`,
    /// whose caches are `caches[s]` (one per layer, any lengths). Returns next-token logits
    /// `[sequences, vocab]`, row `s` equal to [`Llama::forward`] of `ids[s]` alone.
    ///
    /// Why: on the CPU a one-row matmul costs nearly what a 64-row one does (the weights are
    /// read and packed either way), so stepping many sequences together (e.g. every method of an
    /// evaluation) divides the weight cost by their number. Attention stays per sequence.
    pub fn decode_batch<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [&mut [C]],
    ) -> Result<Tensor<B, 2>, ModelError> {
        on_pool(|| self.decode_batch_here(ids, caches))
    }

    fn decode_batch_here<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [&mut [C]],
    ) -> Result<Tensor<B, 2>, ModelError> {
        let c = &self.config;
        let n = ids.len();
        if n == 0 {
            return Err(ModelError::EmptyPrompt);
        }
        if caches.len() != n || caches.iter().any(|cs| cs.len() != c.layers) {
            return Err(ModelError::Metadata {
                key: "caches".into(),
                problem: format!("{} sequences need {n} cache sets of {} layers", n, c.layers),
            });
        }
        for cs in caches.iter() {
            if cs[0].len() + 1 > self.rope.context() {
                return Err(ModelError::PromptTooLong {
                    tokens: cs[0].len() + 1,
                    context: self.rope.context(),
                });
            }
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab) {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} outside the vocabulary of {}",
                c.vocab
            )));
        }
        let (qh, d) = (c.q_heads, c.head_dim);
        let mut x = self.embed_rows(ids);
        for (l, blk) in self.blocks.iter().enumerate() {
            let qkv = self.project_qkv(blk, x.clone());
            let mut rows = Vec::with_capacity(n);
            for (s, cs) in caches.iter_mut().enumerate() {
                let (q, k, v) = self.split_heads(blk, &qkv, s..s + 1);
                let cache = &mut cs[l];
                let pos = cache.len();
                let q = self.rope.apply(q, pos);
                let k = self.rope.apply(k, pos);
                cache
                    .append(k, v)
                    .map_err(|source| ModelError::Compress { layer: l, source })?;
                let att = cache
                    .attend(q)
                    .map_err(|source| ModelError::Cache { layer: l, source })?;
                rows.push(att.squeeze_dim::<3>(0).swap_dims(0, 1).reshape([1, qh * d]));
            }
            x = self.finish_block(blk, x, Tensor::cat(rows, 0));
        }
        Ok(self.logits(x))
    }

    /// The embedding rows of `ids`: `[ids.len(), hidden]`.
    fn embed_rows(&self, ids: &[u32]) -> Tensor<B, 2> {
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [ids.len()],
            ),
            &self.embed.device(),
        );
        self.embed.clone().select(0, idx)
    }

    /// RMSNorm, then the fused q/k/v projection (with bias when the model has one): `[t, ·]`.
    fn project_qkv(&self, blk: &Block<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = rms_norm(x, &blk.attn_norm, self.config.rms_eps);
        let qkv = blk.wqkv.apply(h);
        match &blk.bqkv {
            Some(b) => qkv + b.clone().unsqueeze(),
            None => qkv,
        }
    }

    /// Rows `rows` of a fused projection as `[1, heads, t, d]` q, k and v (q/k normed when the
    /// model has q/k norms), before RoPE.
    fn split_heads(
        &self,
        blk: &Block<B>,
        qkv: &Tensor<B, 2>,
        rows: std::ops::Range<usize>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let c = &self.config;
        let (qh, kvh, d) = (c.q_heads, c.kv_heads, c.head_dim);
        let t = rows.len();
        let heads = |from: usize, n: usize| {
            qkv.clone()
                .slice([rows.clone(), from * d..(from + n) * d])
                .reshape([t, n, d])
                .swap_dims(0, 1)
                .unsqueeze::<4>()
        };
        let mut q = heads(0, qh);
        let mut k = heads(qh, kvh);
        let v = heads(qh + kvh, kvh);
        if let (Some(qn), Some(kn)) = (&blk.q_norm, &blk.k_norm) {
            q = rms_norm(q, qn, c.rms_eps);
            k = rms_norm(k, kn, c.rms_eps);
        }
        (q, k, v)
    }

    /// The rest of a block after attention: output projection and residual, then the SwiGLU
    /// MLP and residual.
    fn finish_block(&self, blk: &Block<B>, x: Tensor<B, 2>, att: Tensor<B, 2>) -> Tensor<B, 2> {
        let c = &self.config;
        let t = x.dims()[0];
        let x = x + blk.wo.apply(att);
        let h = rms_norm(x.clone(), &blk.ffn_norm, c.rms_eps);
        let gu = blk.w_gate_up.apply(h);
        let g = gu.clone().slice([0..t, 0..c.ffn]);
        let u = gu.slice([0..t, c.ffn..2 * c.ffn]);
        x + blk.w_down.apply(silu(g) * u)
    }

    /// Final norm and the output head: `[t, vocab]`.
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.head
            .apply(rms_norm(x, &self.norm, self.config.rms_eps))
    }

    /// What every forward pass checks first: tokens to feed, a cache per layer, room in the
    /// context, ids inside the vocabulary.
    fn check_step<C: LayerCache<B>>(&self, ids: &[u32], caches: &[C]) -> Result<(), ModelError> {
        let c = &self.config;
        if ids.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        if caches.len() != c.layers {
            return Err(ModelError::Metadata {
                key: "caches".into(),
                problem: format!("{} caches for {} layers", caches.len(), c.layers),
            });
        }
        let start = caches[0].len();
        if start + ids.len() > self.rope.context() {
            return Err(ModelError::PromptTooLong {
                tokens: start + ids.len(),
                context: self.rope.context(),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab) {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} outside the vocabulary of {}",
                c.vocab
            )));
        }
        Ok(())
    }

    fn run<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        caches: &mut [C],
        want: Logits,
        observe: Option<&PrefillOptions>,
    ) -> Result<(Tensor<B, 2>, Vec<Observed<B>>), ModelError> {
        let c = &self.config;
        self.check_step(ids, caches)?;
        let start = caches[0].len();
        let chunk = observe.map_or(ids.len(), |o| o.chunk.max(1));
        let mut observed: Vec<Observed<B>> = (0..c.layers).map(|_| Observed::default()).collect();
        let mut outs = Vec::new();
        let mut pos = start;
        for piece in ids.chunks(chunk) {
            let x = self.chunk(piece, pos, caches, observe, &mut observed)?;
            let x = match want {
                Logits::Last => {
                    let t = x.dims()[0];
                    x.slice(t - 1..t)
                }
                Logits::All => x,
            };
            outs.push(x);
            pos += piece.len();
        }
        let x = match want {
            Logits::Last => outs
                .pop()
                .unwrap_or_else(|| unreachable!("ids is not empty")),
            Logits::All => Tensor::cat(outs, 0),
        };
        Ok((self.logits(x), observed))
    }

    /// One chunk through every block; returns the last hidden states `[t, hidden]`.
    fn chunk<C: LayerCache<B>>(
        &self,
        ids: &[u32],
        start: usize,
        caches: &mut [C],
        observe: Option<&PrefillOptions>,
        observed: &mut [Observed<B>],
    ) -> Result<Tensor<B, 2>, ModelError> {
        let c = &self.config;
        let device = self.embed.device();
        let t = ids.len();
        if let Some(x) = self.chunk_host(ids, start, caches, observe, observed)? {
            return Ok(Tensor::from_data(
                TensorData::new(x, [t, c.hidden]),
                &device,
            ));
        }
        let (qh, d) = (c.q_heads, c.head_dim);
        let mut x = self.embed_rows(ids);
        for (l, (blk, cache)) in self.blocks.iter().zip(caches.iter_mut()).enumerate() {
            let qkv = self.project_qkv(blk, x.clone());
            let (q, k, v) = self.split_heads(blk, &qkv, 0..t);
            let pre_q = observe.is_some_and(|o| o.pre_rope).then(|| q.clone());
            let q = self.rope.apply(q, start);
            let k = self.rope.apply(k, start);
            let att = cache_step(cache, l, Step { pre_q, q, k, v }, observe, &mut observed[l])?;
            let att = att.squeeze_dim::<3>(0).swap_dims(0, 1).reshape([t, qh * d]);
            x = self.finish_block(blk, x, att);
        }
        Ok(x)
    }
}

/// Runs a whole forward pass on a rayon worker thread. Called from outside the pool, every
/// parallel product would otherwise be injected into the pool while the caller sleeps, and each
/// of a decode step's ~150 products paid three futex wake-ups; on a worker, the caller takes a
/// share of each product itself. Inside the pool (a harness's parallel evaluation) it runs in
/// place.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Appends a chunk's keys and values to `cache` and attends with its queries (after RoPE),
/// recording what `observe` asks for in `ob`: the window's queries (and pre-RoPE queries,
/// given when asked for), the attention mass every key received, and a compression after the
/// chunk. Returns the attention output `[1, q_heads, t, d]`. The tensor and host forward
/// passes share it.
fn cache_step<B: KvBackend, C: LayerCache<B>>(
    cache: &mut C,
    l: usize,
    step: Step<B>,
    observe: Option<&PrefillOptions>,
    ob: &mut Observed<B>,
) -> Result<Tensor<B, 4>, ModelError> {
    let Step { pre_q, q, k, v } = step;
    if let (Some(o), Some(p)) = (observe, pre_q) {
        ob.pre_q = Some(keep_last(ob.pre_q.take(), p, o.observe_window));
    }
    if let Some(o) = observe {
        ob.queries = Some(keep_last(ob.queries.take(), q.clone(), o.observe_window));
    }
    cache
        .append(k, v)
        .map_err(|source| ModelError::Compress { layer: l, source })?;
    let att = if observe.is_some_and(|o| o.attention_mass) {
        // H2O's statistic from the attention's own softmax: the mass each key received from
        // this chunk's queries (all grouped heads), accumulated.
        let (att, chunk_mass) = cache
            .attend_with_mass(q)
            .map_err(|source| ModelError::Cache { layer: l, source })?;
        ob.mass = Some(kv_tensor::accumulate_mass(ob.mass.take(), chunk_mass));
        att
    } else {
        cache
            .attend(q)
            .map_err(|source| ModelError::Cache { layer: l, source })?
    };
    if let Some(o) = observe
        && o.compress_chunks
    {
        compress_chunk(cache, l, ob)?;
    }
    Ok(att)
}

/// Lets `cache` (layer `layer`) compress after a prefill chunk with what was observed so far.
/// The accumulated attention mass follows the rows the cache holds, so it restarts whenever
/// the cache changed them.
fn compress_chunk<B: KvBackend, C: LayerCache<B>>(
    cache: &mut C,
    layer: usize,
    ob: &mut Observed<B>,
) -> Result<(), ModelError> {
    let ctx = ObservationCtx {
        layer,
        window_queries: ob.queries.clone(),
        attention_mass: ob.mass.clone(),
        pre_rope_queries: ob.pre_q.clone(),
        reconstruction: None,
    };
    cache
        .after_prefill_chunk(&ctx)
        .map_err(|source| ModelError::Compress { layer, source })?;
    if ob
        .mass
        .as_ref()
        .is_some_and(|m| m.dims()[2] != cache.stored())
    {
        ob.mass = None;
    }
    Ok(())
}

/// The last `w` tokens of `prev ++ new` along the token axis (dim 2).
fn keep_last<B: KvBackend>(
    prev: Option<Tensor<B, 4>>,
    new: Tensor<B, 4>,
    w: usize,
) -> Tensor<B, 4> {
    let all = match prev {
        Some(p) => Tensor::cat(vec![p, new], 2),
        None => new,
    };
    let n = all.dims()[2];
    if n > w {
        all.slice_dim(2, n - w..n)
    } else {
        all
    }
}

/// RMSNorm over the last dimension, scaled by `w`.
fn rms_norm<B: KvBackend, const D: usize>(
    x: Tensor<B, D>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let ms = x.clone().square().mean_dim(D - 1);
    let shape: [usize; D] = std::array::from_fn(|i| if i == D - 1 { w.dims()[0] } else { 1 });
    x * (ms + eps).sqrt().recip() * w.clone().reshape(shape)
}

/// The ggml blocks of the tensors `names`, concatenated in order (GGUF stores each output row
/// contiguously, so this is the fused matrix's rows), when the source keeps blocks and they
/// share one type that [`QuantRows`] has a kernel for.
fn host_blocks(
    w: &dyn WeightSource,
    names: &[String],
    inp: usize,
    out: usize,
) -> Option<QuantRows> {
    let mut ty = None;
    let mut bytes = Vec::new();
    for name in names {
        let (t, b) = w.fetch_blocks(name)?;
        if *ty.get_or_insert(t) != t {
            return None;
        }
        bytes.extend_from_slice(b);
    }
    QuantRows::from_ggml(ty?, &bytes, inp, out)
}

fn expect(got: &[usize], want: &[usize], name: &str) -> Result<(), ModelError> {
    if got == want {
        Ok(())
    } else {
        Err(ModelError::TensorShape {
            tensor: name.into(),
            expected: want.to_vec(),
            got: got.to_vec(),
        })
    }
}
