//! MoQAE's learned router (Tao et al., ACL 2025): a small gated MLP over each token of a chunk,
//! `P = (f(C·W1) ⊙ (C·W2))·W3` with `f` = SiLU, a per-token argmax over the expert set
//! {16, 4, 2} bits and a majority vote per chunk. The LLM stays frozen; only the router is
//! trained, with `L = λ·L_model + (1 − λ)·L_mem`:
//!
//! - `L_model = Σ_j p_j · w_t / B_j`: the routing-probability-weighted model loss with the
//!   paper's `1/B_j` penalty. The paper back-propagates the LLM's NLL through a
//!   probability-weighted mix of the experts' caches; kvnd's cache is packed integer codes read
//!   by host kernels, which carry no gradient. So `w_t` is the first-order weight of token
//!   `t`'s quantization error in the NLL of what follows: the share of attention the held-out
//!   continuation pays it (mean 1 over the routed tokens, measured once with the frozen model).
//! - `L_mem = Σ_j p_j · B_j / 16`: the bytes held relative to fp16 (the inverse of the expert's
//!   `16/B_j` compression).
//!
//! λ is the user's knob: λ → 1 keeps everything at 16 bits, λ → 0 sends everything to 2 bits.
//! Routing freezing (the first chunk stays fp16) is the cache's; routing sharing is one router
//! for every layer, or one per group of adjacent layers ([`TrainOptions::layers_per_router`]).
//! The router reads a token's keys and values of all KV heads (what the cache holds), so it
//! also routes chunks completed during decoding, where no attention has been observed.
use super::{BudgetedRouter, ChunkFeatures, ChunkRouter};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_autodiff::Autodiff;
use kv_tensor::{Bits, KvError};
use serde::{Deserialize, Serialize};

/// One gated MLP with its input standardisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterMlp {
    /// Per-feature mean subtracted from the input.
    pub mean: Vec<f32>,
    /// Per-feature scale the centred input is divided by.
    pub scale: Vec<f32>,
    /// `[features × hidden]`, row-major (gate branch).
    pub w1: Vec<f32>,
    /// `[features × hidden]`, row-major (linear branch).
    pub w2: Vec<f32>,
    /// `[hidden × experts]`, row-major.
    pub w3: Vec<f32>,
    /// Hidden width.
    pub hidden: usize,
}

impl RouterMlp {
    fn features(&self) -> usize {
        self.mean.len()
    }

    /// Routing logits of one token.
    fn logits(&self, x: &[f32], experts: usize) -> Vec<f32> {
        let h = self.hidden;
        let mut a = vec![0f32; h];
        let mut b = vec![0f32; h];
        for (i, ((xv, m), s)) in x.iter().zip(&self.mean).zip(&self.scale).enumerate() {
            let xi = (xv - m) / s;
            let (r1, r2) = (&self.w1[i * h..][..h], &self.w2[i * h..][..h]);
            for (((aj, bj), w1), w2) in a.iter_mut().zip(b.iter_mut()).zip(r1).zip(r2) {
                *aj += xi * w1;
                *bj += xi * w2;
            }
        }
        let mut out = vec![0f32; experts];
        for j in 0..h {
            let g = a[j] / (1.0 + (-a[j]).exp()) * b[j];
            for (e, o) in out.iter_mut().enumerate() {
                *o += g * self.w3[j * experts + e];
            }
        }
        out
    }
}

/// A trained MoQAE router: the expert set and one MLP per group of layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnedRouter {
    /// The experts, in the order of the MLPs' outputs.
    pub experts: Vec<Bits>,
    /// The λ it was trained with.
    pub lambda: f64,
    /// Adjacent layers sharing one MLP (routing sharing).
    pub layers_per_router: usize,
    /// One MLP per group of layers.
    pub mlps: Vec<RouterMlp>,
}

impl LearnedRouter {
    /// Features per token the router reads: keys then values of every KV head.
    pub fn features(&self) -> usize {
        self.mlps.first().map_or(0, RouterMlp::features)
    }

    fn mlp(&self, layer: usize) -> &RouterMlp {
        let g = layer / self.layers_per_router.max(1);
        &self.mlps[g.min(self.mlps.len() - 1)]
    }

    /// Per-token expert probabilities of `rows` (`[tokens × features]`) at `layer`.
    pub fn probabilities(&self, layer: usize, rows: &[f32]) -> Result<Vec<Vec<f32>>, KvError> {
        let f = self.features();
        if f == 0 || !rows.len().is_multiple_of(f) {
            return Err(KvError::Shape {
                context: "MoQAE router features",
                expected: vec![f],
                got: vec![rows.len()],
            });
        }
        let mlp = self.mlp(layer);
        Ok(rows
            .chunks(f)
            .map(|x| {
                let l = mlp.logits(x, self.experts.len());
                let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = l.iter().map(|v| (v - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.into_iter().map(|v| v / s).collect()
            })
            .collect())
    }

    /// The paper's routing: per-token argmax, then the majority vote of each chunk's tokens
    /// (ties go to the wider expert). `rows` holds `chunk` tokens per chunk.
    pub fn vote(&self, layer: usize, rows: &[f32], chunk: usize) -> Result<Vec<Bits>, KvError> {
        let probs = self.probabilities(layer, rows)?;
        Ok(probs
            .chunks(chunk.max(1))
            .map(|tokens| {
                let mut votes = vec![0usize; self.experts.len()];
                for p in tokens {
                    let arg = (0..p.len())
                        .max_by(|&a, &b| p[a].total_cmp(&p[b]))
                        .unwrap_or(0);
                    votes[arg] += 1;
                }
                let best = (0..votes.len())
                    .max_by_key(|&e| (votes[e], self.experts[e]))
                    .unwrap_or(0);
                self.experts[best]
            })
            .collect())
    }

    /// Each chunk's expected width under the router's probabilities: the learned ranking of
    /// chunks by how many bits they need.
    pub fn expected_bits(
        &self,
        layer: usize,
        rows: &[f32],
        chunk: usize,
    ) -> Result<Vec<f64>, KvError> {
        let probs = self.probabilities(layer, rows)?;
        Ok(probs
            .chunks(chunk.max(1))
            .map(|tokens| {
                let sum: f64 = tokens
                    .iter()
                    .map(|p| {
                        p.iter()
                            .zip(&self.experts)
                            .map(|(&q, b)| q as f64 * b.get() as f64)
                            .sum::<f64>()
                    })
                    .sum();
                sum / tokens.len() as f64
            })
            .collect())
    }
}

impl LearnedRouter {
    /// Tokens per chunk of `rows` split into `chunks` chunks (what the cache handed over: the
    /// chunk size is the cache's, never a second copy that could disagree).
    fn chunk_tokens(&self, rows: &[f32], chunks: usize) -> Result<usize, KvError> {
        let per = self.features() * chunks;
        if per == 0 || !rows.len().is_multiple_of(per) {
            return Err(KvError::Shape {
                context: "MoQAE router chunks",
                expected: vec![chunks, self.features()],
                got: vec![rows.len()],
            });
        }
        Ok(rows.len() / per)
    }
}

/// The learned router used as trained: argmax and majority vote.
#[derive(Debug, Clone)]
pub struct Voting {
    /// The trained router.
    pub router: std::sync::Arc<LearnedRouter>,
}

impl ChunkRouter for Voting {
    fn route(&self, _layer: usize, chunks: &[ChunkFeatures]) -> Vec<Bits> {
        vec![Bits::Full; chunks.len()]
    }

    fn reads_content(&self) -> bool {
        true
    }

    fn route_content(
        &self,
        layer: usize,
        chunks: &[ChunkFeatures],
        rows: &[f32],
    ) -> Result<Vec<Bits>, KvError> {
        let chunk = self.router.chunk_tokens(rows, chunks.len())?;
        self.router.vote(layer, rows, chunk)
    }
}

/// The learned router at a byte budget: chunks ranked by their expected width under the
/// router, the top `share` at `high` bits (the same fitting as the heuristic
/// [`BudgetedRouter`], so the two compare at matched bytes).
#[derive(Debug, Clone)]
pub struct LearnedBudgeted {
    /// The trained router.
    pub router: std::sync::Arc<LearnedRouter>,
    /// Widths and share, fitted to the budget.
    pub budget: BudgetedRouter,
}

impl ChunkRouter for LearnedBudgeted {
    fn route(&self, layer: usize, chunks: &[ChunkFeatures]) -> Vec<Bits> {
        self.budget.route(layer, chunks)
    }

    fn reads_content(&self) -> bool {
        true
    }

    fn route_content(
        &self,
        layer: usize,
        chunks: &[ChunkFeatures],
        rows: &[f32],
    ) -> Result<Vec<Bits>, KvError> {
        let chunk = self.router.chunk_tokens(rows, chunks.len())?;
        let need = self.router.expected_bits(layer, rows, chunk)?;
        let ranked: Vec<ChunkFeatures> = chunks
            .iter()
            .zip(need)
            .map(|(c, importance)| ChunkFeatures { importance, ..*c })
            .collect();
        Ok(self.budget.route(layer, &ranked))
    }
}

/// What the router is trained on: one row of features per routed token, the token's
/// model-loss weight and its layer.
#[derive(Debug, Clone, Default)]
pub struct TrainingSet {
    /// `[rows × features]`, row-major.
    pub rows: Vec<f32>,
    /// Features per row.
    pub features: usize,
    /// `w_t` of each row (see the module doc).
    pub weight: Vec<f32>,
    /// Layer of each row.
    pub layer: Vec<usize>,
}

/// Training knobs.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    /// λ: weight of the model term against the memory term, in [0, 1].
    pub lambda: f64,
    /// Adjacent layers sharing one router (routing sharing); `usize::MAX` shares one router
    /// across all layers, as in the paper.
    pub layers_per_router: usize,
    /// Hidden width of the MLP.
    pub hidden: usize,
    /// Adam steps per router.
    pub steps: usize,
    /// Rows per step.
    pub batch: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Seed of the initial weights and of the batches.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            lambda: 0.5,
            layers_per_router: usize::MAX,
            hidden: 32,
            steps: 300,
            batch: 2048,
            learning_rate: 1e-2,
            seed: 0x006d_6f71_6165,
        }
    }
}

/// Trains one router per group of layers on `set` with burn's autodiff over `B`, calling
/// `progress(done, total)` after every step.
pub fn train<B: Backend>(
    set: &TrainingSet,
    experts: &[Bits],
    opts: &TrainOptions,
    device: &B::Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<LearnedRouter, KvError> {
    let bad = |why: String| KvError::InvalidValue {
        what: "MoQAE router training",
        value: why,
        allowed: "λ in [0, 1], at least one expert, rows with features, batch ≥ 1",
    };
    if !(0.0..=1.0).contains(&opts.lambda) || experts.is_empty() || opts.batch == 0 {
        return Err(bad(format!(
            "λ = {}, {} experts",
            opts.lambda,
            experts.len()
        )));
    }
    let f = set.features;
    let n = set.weight.len();
    if f == 0 || n == 0 || set.rows.len() != n * f || set.layer.len() != n {
        return Err(bad(format!("{n} rows of {f} features")));
    }
    let per = opts.layers_per_router.max(1);
    let groups = set.layer.iter().max().map_or(1, |&l| l / per + 1);
    let total = groups * opts.steps;
    let mut mlps = Vec::with_capacity(groups);
    for g in 0..groups {
        let idx: Vec<usize> = (0..n).filter(|&i| set.layer[i] / per == g).collect();
        if idx.is_empty() {
            return Err(bad(format!("no rows for the layers of router {g}")));
        }
        let seed = opts.seed ^ (g as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        mlps.push(train_one::<B>(
            set,
            &idx,
            experts,
            opts,
            seed,
            device,
            |s| progress(g * opts.steps + s, total),
        )?);
    }
    Ok(LearnedRouter {
        experts: experts.to_vec(),
        lambda: opts.lambda,
        layers_per_router: per.min(set.layer.iter().max().map_or(1, |&l| l + 1)),
        mlps,
    })
}

type Ad<B> = Autodiff<B>;

/// Adam state of one weight matrix.
struct Param<B: Backend> {
    w: Tensor<B, 2>,
    m: Tensor<B, 2>,
    v: Tensor<B, 2>,
}

impl<B: Backend> Param<B> {
    fn new(w: Tensor<B, 2>) -> Self {
        Self {
            m: w.zeros_like(),
            v: w.zeros_like(),
            w,
        }
    }

    fn step(&mut self, g: Tensor<B, 2>, t: i32, lr: f64) {
        let (b1, b2) = (0.9f64, 0.999f64);
        self.m = self.m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        self.v = self.v.clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
        let mh = self.m.clone().div_scalar(1.0 - b1.powi(t));
        let vh = self.v.clone().div_scalar(1.0 - b2.powi(t));
        self.w = self.w.clone() - mh.div(vh.sqrt().add_scalar(1e-8)).mul_scalar(lr);
    }

    fn host(&self) -> Vec<f32> {
        self.w
            .to_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default()
    }
}

fn train_one<B: Backend>(
    set: &TrainingSet,
    idx: &[usize],
    experts: &[Bits],
    opts: &TrainOptions,
    seed: u64,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<RouterMlp, KvError> {
    let (f, h, e) = (set.features, opts.hidden.max(1), experts.len());
    let (mean, scale) = standardise(set, idx);
    let mut rng = SplitMix(seed);
    let mut init = |rows: usize, cols: usize| {
        let s = (1.0 / rows as f64).sqrt();
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.normal() * s) as f32)
            .collect();
        Param::<B>::new(Tensor::from_data(TensorData::new(w, [rows, cols]), device))
    };
    let (mut w1, mut w2, mut w3) = (init(f, h), init(f, h), init(h, e));
    // Per-expert costs: the model term's 1/B_j and the memory term's B_j/16.
    let inv: Vec<f32> = experts.iter().map(|b| 1.0 / b.get() as f32).collect();
    let mem: Vec<f32> = experts.iter().map(|b| b.get() as f32 / 16.0).collect();
    let inv = Tensor::<Ad<B>, 2>::from_data(TensorData::new(inv, [1, e]), device);
    let mem = Tensor::<Ad<B>, 2>::from_data(TensorData::new(mem, [1, e]), device);
    let batch = opts.batch.min(idx.len());
    let lambda = opts.lambda;
    for step in 1..=opts.steps {
        let mut x = Vec::with_capacity(batch * f);
        let mut w = Vec::with_capacity(batch);
        for _ in 0..batch {
            let i = idx[rng.below(idx.len())];
            x.extend(
                set.rows[i * f..(i + 1) * f]
                    .iter()
                    .zip(&mean)
                    .zip(&scale)
                    .map(|((v, m), s)| (v - m) / s),
            );
            w.push(set.weight[i]);
        }
        let x = Tensor::<Ad<B>, 2>::from_data(TensorData::new(x, [batch, f]), device);
        let w = Tensor::<Ad<B>, 2>::from_data(TensorData::new(w, [batch, 1]), device);
        let p1 = Tensor::<Ad<B>, 2>::from_inner(w1.w.clone()).require_grad();
        let p2 = Tensor::<Ad<B>, 2>::from_inner(w2.w.clone()).require_grad();
        let p3 = Tensor::<Ad<B>, 2>::from_inner(w3.w.clone()).require_grad();
        let hid = silu(x.clone().matmul(p1.clone())) * x.matmul(p2.clone());
        let p = softmax(hid.matmul(p3.clone()), 1);
        let model = (p.clone() * inv.clone()).sum_dim(1) * w;
        let memory = (p * mem.clone()).sum_dim(1);
        let loss = (model.mul_scalar(lambda) + memory.mul_scalar(1.0 - lambda)).mean();
        let grads = loss.backward();
        let grad = |t: &Tensor<Ad<B>, 2>| t.grad(&grads);
        let (Some(g1), Some(g2), Some(g3)) = (grad(&p1), grad(&p2), grad(&p3)) else {
            return Err(KvError::InvalidValue {
                what: "MoQAE router training",
                value: "no gradient".into(),
                allowed: "a differentiable loss",
            });
        };
        w1.step(g1, step as i32, opts.learning_rate);
        w2.step(g2, step as i32, opts.learning_rate);
        w3.step(g3, step as i32, opts.learning_rate);
        progress(step);
    }
    Ok(RouterMlp {
        mean,
        scale,
        w1: w1.host(),
        w2: w2.host(),
        w3: w3.host(),
        hidden: h,
    })
}

/// Per-feature mean and standard deviation (at least 1e-6) of the rows `idx`.
fn standardise(set: &TrainingSet, idx: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let f = set.features;
    let mut sum = vec![0f64; f];
    let mut sq = vec![0f64; f];
    for &i in idx {
        for (j, &v) in set.rows[i * f..(i + 1) * f].iter().enumerate() {
            sum[j] += v as f64;
            sq[j] += (v as f64) * (v as f64);
        }
    }
    let n = idx.len() as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let scale = sq
        .iter()
        .zip(&sum)
        .map(|(q, s)| ((q / n - (s / n).powi(2)).max(0.0).sqrt().max(1e-6)) as f32)
        .collect();
    (mean, scale)
}

/// A seeded generator for the initial weights and the batches (splitmix64), so a trained
/// router is reproducible bit for bit on one machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::NdArray;

    fn bits(b: u8) -> Bits {
        Bits::try_from(b).expect("bits")
    }

    /// Rows whose first feature says how much the continuation attends them: the router must
    /// learn to give the attended tokens more bits, and λ must move the average width.
    fn set() -> TrainingSet {
        let mut rng = SplitMix(7);
        let (n, f) = (2000, 4);
        let mut rows = Vec::with_capacity(n * f);
        let mut weight = Vec::with_capacity(n);
        for i in 0..n {
            let hot = i % 5 == 0;
            rows.push(if hot { 2.0 } else { -0.5 } + 0.1 * rng.normal() as f32);
            rows.extend((1..f).map(|_| rng.normal() as f32));
            weight.push(if hot { 4.0 } else { 0.25 });
        }
        TrainingSet {
            rows,
            features: f,
            weight,
            layer: (0..n).map(|i| i % 2).collect(),
        }
    }

    fn trained(lambda: f64, per: usize) -> LearnedRouter {
        let opts = TrainOptions {
            lambda,
            layers_per_router: per,
            steps: 150,
            batch: 256,
            ..Default::default()
        };
        let experts = [bits(16), bits(4), bits(2)];
        train::<NdArray<f32>>(&set(), &experts, &opts, &Default::default(), |_, _| {})
            .expect("trains")
    }

    #[test]
    fn the_router_learns_which_tokens_need_bits_and_lambda_trades_them() {
        let r = trained(0.4, usize::MAX);
        assert_eq!(r.mlps.len(), 1);
        let hot = [2.0f32, 0.0, 0.0, 0.0];
        let cold = [-0.5f32, 0.0, 0.0, 0.0];
        let wide = |x: &[f32]| r.vote(0, x, 1).expect("routes")[0].get();
        assert!(
            wide(&hot) > wide(&cold),
            "{} vs {}",
            wide(&hot),
            wide(&cold)
        );
        let mean_bits = |r: &LearnedRouter| {
            let s = set();
            let v = r.vote(0, &s.rows, 1).expect("routes");
            v.iter().map(|b| b.get() as f64).sum::<f64>() / v.len() as f64
        };
        let (low, high) = (trained(0.05, usize::MAX), trained(0.95, usize::MAX));
        assert!(mean_bits(&low) < mean_bits(&r) && mean_bits(&r) < mean_bits(&high));
        assert!(mean_bits(&low) < 3.0 && mean_bits(&high) > 12.0);
    }

    #[test]
    fn routing_sharing_trains_one_router_per_group_and_bad_input_is_refused() {
        assert_eq!(trained(0.5, 1).mlps.len(), 2);
        let r = trained(0.5, usize::MAX);
        assert!(r.probabilities(0, &[1.0, 2.0, 3.0]).is_err());
        let text = serde_json::to_string(&r).expect("serialises");
        let back: LearnedRouter = serde_json::from_str(&text).expect("parses");
        assert_eq!(
            back.vote(1, &set().rows, 8).expect("routes"),
            r.vote(1, &set().rows, 8).expect("routes")
        );
        let opts = TrainOptions {
            lambda: 1.5,
            ..Default::default()
        };
        let experts = [bits(16)];
        let dev = Default::default();
        assert!(train::<NdArray<f32>>(&set(), &experts, &opts, &dev, |_, _| {}).is_err());
        let empty = TrainingSet::default();
        assert!(
            train::<NdArray<f32>>(&empty, &experts, &TrainOptions::default(), &dev, |_, _| {})
                .is_err()
        );
    }

    #[test]
    fn a_majority_vote_decides_each_chunk() {
        let r = trained(0.4, usize::MAX);
        let hot = [2.0f32, 0.0, 0.0, 0.0];
        let cold = [-0.5f32, 0.0, 0.0, 0.0];
        let chunk: Vec<f32> = [hot, cold, cold].concat();
        let single = r.vote(0, &cold, 1).expect("routes")[0];
        assert_eq!(r.vote(0, &chunk, 3).expect("routes"), vec![single]);
    }
}
