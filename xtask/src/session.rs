//! The CLI's sessions: the library's `Session` over a chosen model (the embedded default unless
//! `--model` names another), its prose and calibration directory.
use crate::backend::{B, device};
use crate::progress::Bars;
use anyhow::{Context, Result, bail};
use clap::Args;
use models::LoadedModel;
use std::path::{Path, PathBuf};

/// Where calibrated axes and tables are cached (files are keyed by the model's sha256, so
/// every model has its own).
pub fn calibration_dir() -> Result<PathBuf> {
    Ok(crate::paths::home()?.join("calibration"))
}

/// `--model`: which model a command runs on.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArg {
    /// A model `fetch-model` knows (smollm2-135m, qwen2.5-coder-0.5b: fetched if not cached) or
    /// the path of a GGUF file [default: smollm2-135m, the embedded default].
    #[arg(long = "model")]
    pub model: Option<String>,
}

impl ModelArg {
    /// The GGUF file: a known name resolved through the cache (fetching it if needed), or a
    /// path that must exist.
    pub fn path(&self) -> Result<PathBuf> {
        let Some(m) = &self.model else {
            return crate::fetch::model(crate::fetch::DEFAULT_MODEL, None);
        };
        if crate::fetch::MODELS.iter().any(|s| s.name == m) {
            return crate::fetch::model(m, None);
        }
        let p = PathBuf::from(m);
        if !p.is_file() {
            let names: Vec<&str> = crate::fetch::MODELS.iter().map(|s| s.name).collect();
            bail!(
                "--model {m:?} is neither a known model ({}) nor a GGUF file",
                names.join(", ")
            );
        }
        Ok(p)
    }

    /// A short name for output directories: `None` for the default model.
    pub fn label(&self) -> Option<String> {
        let m = self.model.as_deref()?;
        if m == crate::fetch::DEFAULT_MODEL {
            return None;
        }
        if crate::fetch::MODELS.iter().any(|s| s.name == m) {
            return Some(m.to_string());
        }
        Some(
            Path::new(m)
                .file_stem()
                .map_or(m.to_string(), |s| s.to_string_lossy().into_owned()),
        )
    }
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

/// The chosen model with its prose data and calibrated axes (fetched, fitted and cached as
/// needed): what `calibrate`, `solve`, `validate-proxy`, `bench` and `eval` share.
pub fn open(model: &ModelArg) -> Result<eval::Session<B>> {
    let model = model.path()?;
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
