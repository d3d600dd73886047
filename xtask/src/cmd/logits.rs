//! `logits`: the next-token logits of a prompt as JSON.
use crate::backend::B;
use anyhow::Result;
use clap::Args;
use kv_tensor::FullCache;
use models::PrefillOptions;
use std::path::{Path, PathBuf};

/// Arguments of `logits`.
#[derive(Args)]
pub struct Logits {
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// No chat template: tokenize the prompt as is.
    #[arg(long)]
    raw: bool,
    /// How many top tokens.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// A GGUF file (default: the embedded model).
    #[arg(long)]
    model: Option<PathBuf>,
}

impl Logits {
    /// Prints the JSON.
    pub fn run(self) -> Result<()> {
        logits(self.model.as_deref(), &self.prompt, self.raw, self.top)
    }
}

/// Prints `{"ids": [...], "top": [{"id", "logit"}, ...]}` for the next token.
fn logits(model: Option<&Path>, prompt: &str, raw: bool, top: usize) -> Result<()> {
    let m = crate::session::load(model)?;
    let ids = super::generate::prompt_ids(&m, prompt, raw)?;
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
