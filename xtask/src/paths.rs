//! Cache directories (the layout itself is `models::paths`; this adds creation and errors).
use anyhow::{Context, Result};
use std::path::PathBuf;

/// The cache root, created if needed.
pub fn home() -> Result<PathBuf> {
    ensure(models::paths::home())
}

/// Directory of fetched model files, created if needed.
pub fn models() -> Result<PathBuf> {
    ensure(models::paths::models_dir())
}

/// Directory of the prose data set, created if needed.
pub fn sotu() -> Result<PathBuf> {
    ensure(models::paths::sotu_dir())
}

/// Directory of the QA documents (SQuAD, HotpotQA), created if needed.
pub fn qa() -> Result<PathBuf> {
    ensure(models::paths::home().map(|h| h.join("data").join("qa")))
}

fn ensure(dir: Option<PathBuf>) -> Result<PathBuf> {
    let dir = dir.context("no user cache directory on this system: set KVND_HOME")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
