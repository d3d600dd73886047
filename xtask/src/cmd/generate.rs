//! `generate`: answer a chat prompt, through a plan's compressed caches or the full cache,
//! and report speed, cache bytes and peak memory.
use crate::backend::{B, device};
use anyhow::{Context, Result};
use clap::Args;
use kv_tensor::{FullCache, LayerCache};
use models::{LoadedModel, PrefillOptions, Sampling};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Token ids of the prompt: raw, or wrapped in the model's chat template.
pub fn prompt_ids(m: &LoadedModel<B>, prompt: &str, raw: bool) -> Result<Vec<u32>> {
    let text = match (&m.chat, raw) {
        (Some(chat), false) => chat.user_prompt(prompt)?,
        _ => prompt.to_string(),
    };
    Ok(m.tokenizer.encode(&text)?)
}

/// Arguments of `generate`.
#[derive(Args)]
pub struct Generate {
    /// The user message.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    model: crate::session::ModelArg,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_new: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Answer through a compressed cache routed by this plan (from `cargo xtask solve`).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// With a plan: prefill the whole prompt into a dense cache and compress it once at
    /// the end (the default compresses after every 512-token chunk, so peak memory follows
    /// the plan's budget).
    #[arg(long)]
    compress_at_end: bool,
}

/// The caches `generate` runs with, and where they came from.
struct PlanCaches {
    caches: Vec<Box<dyn LayerCache<B>>>,
    plan: Option<router::RoutingPlan>,
    /// The plan's predicted bytes for the prompt.
    predicted: Option<u64>,
}

/// Per-layer caches for `plan` (calibrated axes loaded when its experts need them), with the
/// plan's predicted bytes for a prompt of `tokens` tokens; the full fp16 cache without a plan.
fn plan_caches(
    m: &LoadedModel<B>,
    model: Option<&Path>,
    plan: Option<&Path>,
    tokens: usize,
) -> Result<PlanCaches> {
    let layers = m.model.config.layers;
    let Some(p) = plan else {
        let caches = (0..layers)
            .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
            .collect();
        return Ok(PlanCaches {
            caches,
            plan: None,
            predicted: None,
        });
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let plan = router::RoutingPlan::from_toml(&text, layers, m.model.config.head_dim)
        .with_context(|| format!("loading {}", p.display()))?;
    let needs = plan.needs();
    let axes = if needs.calibration() {
        let model_path = crate::session::model_path(model)?;
        let sha = eval::sha256_file(&model_path)?;
        let text = eval::data::corpus(&crate::fetch::data(None)?)?;
        let dir = crate::session::calibration_dir()?;
        let bars = crate::progress::Bars::default();
        eval::calibrated_axes(m, &sha, &text, &dir, &device(), &bars)?
    } else {
        router::Axes::default()
    };
    let geo = solver::Geometry::new(m.model.config.kv_layout(), tokens);
    let predicted = solver::baselines::plan_bytes(&plan, &geo).get();
    let caches = plan
        .layers
        .iter()
        .map(|e| Box::new(axes.cache(e.clone())) as Box<dyn LayerCache<B>>)
        .collect();
    Ok(PlanCaches {
        caches,
        plan: Some(plan),
        predicted: Some(predicted),
    })
}

/// Peak resident memory of this process so far (`VmHWM`), where the system reports it.
fn peak_rss() -> Option<u64> {
    proc_status("VmHWM:")
}

/// Resident memory of this process now (`VmRSS`), where the system reports it.
fn rss_now() -> Option<u64> {
    proc_status("VmRSS:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Generate {
    /// Generates and reports.
    pub fn run(self) -> Result<()> {
        generate(&self)
    }
}

/// Prints the chat answer as it is generated, then timings, the cache's bytes (counted,
/// allocated, and the plan's prediction) and the process's peak memory. With a plan, the
/// prompt is prefilled in chunks that every layer compresses as it goes (unless
/// `compress_at_end`), so peak memory follows the plan's budget rather than the prompt.
fn generate(a: &Generate) -> Result<()> {
    let model_file = a.model.path()?;
    let m = crate::session::load(Some(&model_file))?;
    let after_load = peak_rss().zip(rss_now());
    let ids = prompt_ids(&m, &a.prompt, false)?;
    let PlanCaches {
        mut caches,
        plan,
        predicted,
    } = plan_caches(&m, Some(&model_file), a.plan.as_deref(), ids.len())?;
    let sampling = if a.temperature > 0.0 {
        Sampling::Temperature {
            t: a.temperature,
            seed: a.seed,
        }
    } else {
        Sampling::Greedy
    };
    let needs = plan.as_ref().map(|p| p.needs()).unwrap_or_default();
    let opts = models::GenerateOptions {
        max_new: a.max_new,
        sampling,
        prefill: PrefillOptions {
            // KVzip layers keep their prompt until the pass after the last chunk; the
            // others compress as they go.
            compress_chunks: plan.is_some() && !a.compress_at_end,
            ..solver::observing(needs)
        },
    };
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let g = models::generate(&m.model, &m.tokenizer, &ids, &mut caches, &opts, |id| {
        so_far.push(id);
        // Print the text delta: decoding token by token would split multi-byte characters.
        if let Ok(text) = m.tokenizer.decode(&so_far)
            && let Some(delta) = text.strip_prefix(shown.as_str())
        {
            print!("{delta}");
            std::io::stdout().flush().ok();
            shown = text;
        }
    })?;
    println!();
    let sized = plan.as_ref().and_then(|p| p.sized_for);
    report(&m, &g, &caches, (predicted, sized), after_load);
    Ok(())
}

/// The figures `generate` prints after the answer.
fn report(
    m: &LoadedModel<B>,
    g: &models::Generation,
    caches: &[Box<dyn LayerCache<B>>],
    (predicted, sized): (Option<u64>, Option<router::SizedFor>),
    after_load: Option<(u64, u64)>,
) {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let layout = m.model.config.kv_layout();
    let fp16 = |t: usize| layout.fp16_bytes(1, t).get() as f64;
    let after = g.prefill_footprint.total().get();
    eprintln!(
        "prompt {} tokens: prefill {:.1} tok/s; {} new tokens: decode {:.1} tok/s",
        g.prompt_tokens,
        g.prefill_tps(),
        g.ids.len(),
        g.decode_tps(),
    );
    eprintln!(
        "KV cache after the prompt: {} counted ({:.2}x vs fp16), {} allocated{}",
        mb(after),
        fp16(g.prompt_tokens) / after.max(1) as f64,
        mb(g.prefill_resident.get()),
        predicted.map_or(String::new(), |p| format!(", plan predicted {}", mb(p))),
    );
    if let Some(s) = sized {
        let reached = fp16(g.prompt_tokens) / after.max(1) as f64;
        eprintln!(
            "the plan was sized for {} tokens at {:.2}x; on this {}-token prompt it reached {reached:.2}x{}",
            s.tokens,
            s.ratio(),
            g.prompt_tokens,
            if (reached - s.ratio()).abs() > 0.05 * s.ratio() {
                format!(
                    " (solve --context {} sizes it for this prompt)",
                    g.prompt_tokens
                )
            } else {
                String::new()
            }
        );
    }
    let now: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
    let resident: u64 = caches.iter().map(|c| c.resident().get()).sum();
    let tokens = caches.first().map_or(0, |c| c.len());
    eprintln!(
        "KV cache at the end ({tokens} tokens): {} counted ({:.2}x vs fp16), {} allocated",
        mb(now),
        fp16(tokens) / now.max(1) as f64,
        mb(resident),
    );
    if let (Some(peak), Some((load_peak, weights))) = (peak_rss(), after_load) {
        eprintln!(
            "peak RSS {} (loading the model peaked at {}, then held {}: the weights; \
             above that, the KV cache and activations)",
            mb(peak),
            mb(load_peak),
            mb(weights)
        );
    }
}
