//! Where kvnd keeps downloaded models, data and calibration results.
use anyhow::{Context, Result};
use std::path::PathBuf;

/// The cache root: `$KVND_HOME` if set, else `<user cache dir>/kvnd`.
pub fn home() -> Result<PathBuf> {
    let dir = match std::env::var_os("KVND_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => dirs::cache_dir()
            .context("no user cache directory on this system: set KVND_HOME")?
            .join("kvnd"),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;
    Ok(dir)
}

/// Directory of fetched model files.
pub fn models() -> Result<PathBuf> {
    sub("models")
}

/// Directory of the prose data set (one `.txt` per address).
pub fn sotu() -> Result<PathBuf> {
    sub("data/sotu")
}

fn sub(name: &str) -> Result<PathBuf> {
    let d = home()?.join(name);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
