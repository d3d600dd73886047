//! The CLI's sessions: the library's `Session` over the cached (or fetched) default model,
//! its prose and calibration directory.
use crate::backend::{B, device};
use crate::progress::Bars;
use anyhow::{Context, Result};
use models::LoadedModel;
use std::path::{Path, PathBuf};

/// Where calibrated axes and tables are cached.
pub fn calibration_dir() -> Result<PathBuf> {
    Ok(crate::paths::home()?.join("calibration"))
}

/// The model at `path`, or the default model (fetched if needed).
pub fn model_path(path: Option<&Path>) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(p.to_path_buf()),
        None => crate::fetch::model(crate::fetch::DEFAULT_MODEL, None),
    }
}

/// Loads `path`, or the default model, printing how long it took.
pub fn load(path: Option<&Path>) -> Result<LoadedModel<B>> {
    let p = model_path(path)?;
    eprint!("loading {}… ", p.display());
    let t = std::time::Instant::now();
    let m = models::load_gguf::<B>(&p, &device())
        .with_context(|| format!("loading {}", p.display()))?;
    eprintln!("{:.1}s", t.elapsed().as_secs_f64());
    Ok(m)
}

/// The default model with its prose data and calibrated axes (fetched, fitted and cached as
/// needed): what `calibrate`, `solve`, `validate-proxy`, `bench` and `eval` share.
pub fn open() -> Result<eval::Session<B>> {
    let model = model_path(None)?;
    let corpus = crate::fetch::data(None)?;
    let m = load(Some(&model))?;
    let text = eval::data::corpus(&corpus)?;
    let sha = eval::sha256_file(&model)?;
    Ok(eval::Session::from_model(
        m,
        sha,
        text,
        calibration_dir()?,
        &device(),
        &Bars::default(),
    )?)
}
