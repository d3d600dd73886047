//! `generate` and `logits`: run the model on a prompt.
use crate::backend::{B, device};
use anyhow::{Context, Result};
use kv_tensor::{FullCache, LayerCache};
use models::{LoadedModel, PrefillOptions, Sampling};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Loads `path`, or the default model (fetched if needed).
pub fn load(path: Option<&Path>) -> Result<LoadedModel<B>> {
    let p: PathBuf = match path {
        Some(p) => p.to_path_buf(),
        None => crate::fetch::model(crate::fetch::DEFAULT_MODEL, None)?,
    };
    eprint!("loading {}… ", p.display());
    let t = std::time::Instant::now();
    let m = models::load_gguf::<B>(&p, &device())
        .with_context(|| format!("loading {}", p.display()))?;
    eprintln!("{:.1}s", t.elapsed().as_secs_f64());
    Ok(m)
}

/// Token ids of the prompt: raw, or wrapped in the model's chat template.
pub fn prompt_ids(m: &LoadedModel<B>, prompt: &str, raw: bool) -> Result<Vec<u32>> {
    let text = match (&m.chat, raw) {
        (Some(chat), false) => chat.user_prompt(prompt)?,
        _ => prompt.to_string(),
    };
    Ok(m.tokenizer.encode(&text)?)
}

/// Prints the chat answer as it is generated, then timings and cache size. With `plan`, the
/// answer goes through caches routed by that plan.
pub fn generate(
    model: Option<&Path>,
    plan: Option<&Path>,
    prompt: &str,
    max_new: usize,
    temperature: f32,
    seed: u64,
) -> Result<()> {
    let m = load(model)?;
    let ids = prompt_ids(&m, prompt, false)?;
    let layers = m.model.config.layers;
    let mut caches: Vec<Box<dyn LayerCache<B>>> = match plan {
        None => (0..layers)
            .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
            .collect(),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let plan = router::RoutingPlan::from_toml(&text, layers, m.model.config.head_dim)
                .with_context(|| format!("loading {}", p.display()))?;
            let uses_trig = plan.layers.iter().any(|e| {
                e.evict
                    .is_some_and(|s| s.scorer == axis_evict::ScorerKind::Trig)
            });
            let axes = if plan.needs_bases() || uses_trig {
                let model_path = match model {
                    Some(p) => p.to_path_buf(),
                    None => crate::fetch::model(crate::fetch::DEFAULT_MODEL, None)?,
                };
                let sha = crate::fetch::sha256_file(&model_path)?;
                crate::eval::axes(&m, &sha, &crate::eval::corpus_text()?)?
            } else {
                router::Axes::default()
            };
            plan.layers
                .into_iter()
                .map(|e| Box::new(axes.cache(e)) as Box<dyn LayerCache<B>>)
                .collect()
        }
    };
    let sampling = if temperature > 0.0 {
        Sampling::Temperature {
            t: temperature,
            seed,
        }
    } else {
        Sampling::Greedy
    };
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let g = models::generate(
        &m.model,
        &m.tokenizer,
        &ids,
        &mut caches,
        max_new,
        sampling,
        |id| {
            so_far.push(id);
            // Print the text delta: decoding token by token would split multi-byte characters.
            if let Ok(text) = m.tokenizer.decode(&so_far)
                && let Some(delta) = text.strip_prefix(shown.as_str())
            {
                print!("{delta}");
                std::io::stdout().flush().ok();
                shown = text;
            }
        },
    )?;
    println!();
    let bytes: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
    let fp16 = m.model.config.kv_layout().fp16_bytes(1, caches[0].len());
    eprintln!(
        "prompt {} tokens: prefill {:.1} tok/s; {} new tokens: decode {:.1} tok/s; KV cache {} ({:.2}x vs fp16)",
        g.prompt_tokens,
        g.prefill_tps(),
        g.ids.len(),
        g.decode_tps(),
        kv_tensor::Bytes(bytes),
        fp16.get() as f64 / bytes.max(1) as f64
    );
    Ok(())
}

/// Prints `{"ids": [...], "top": [{"id", "logit"}, ...]}` for the next token.
pub fn logits(model: Option<&Path>, prompt: &str, raw: bool, top: usize) -> Result<()> {
    let m = load(model)?;
    let ids = prompt_ids(&m, prompt, raw)?;
    let mut caches: Vec<FullCache<B>> = (0..m.model.config.layers)
        .map(|_| FullCache::new())
        .collect();
    let logits = m
        .model
        .prefill(&ids, &mut caches, &PrefillOptions::default())?;
    let v: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    let top: Vec<_> = order
        .iter()
        .take(top)
        .map(|&i| serde_json::json!({"id": i, "logit": v[i]}))
        .collect();
    println!("{}", serde_json::json!({"ids": ids, "top": top}));
    Ok(())
}
