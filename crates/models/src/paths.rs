//! Where kvnd keeps fetched models and data: `$KVND_HOME`, else `<user cache dir>/kvnd`.
//! Shared by xtask (which fetches) and the tests and benches (which read).
use std::path::PathBuf;

/// File name of the embedded default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache root (not created).
pub fn home() -> Option<PathBuf> {
    match std::env::var_os("KVND_HOME") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => dirs::cache_dir().map(|d| d.join("kvnd")),
    }
}

/// Directory of fetched model files.
pub fn models_dir() -> Option<PathBuf> {
    home().map(|h| h.join("models"))
}

/// Directory of the prose addresses (one `.txt` each).
pub fn sotu_dir() -> Option<PathBuf> {
    home().map(|h| h.join("data").join("sotu"))
}

/// The default model's path in the cache (it may not be fetched yet).
pub fn default_model() -> Option<PathBuf> {
    models_dir().map(|d| d.join(DEFAULT_MODEL_FILE))
}

/// The model a benchmark runs on: the GGUF file named by `KVND_MODEL` (what `cargo xtask
/// bench --model` sets), else the embedded default.
pub fn bench_model() -> Option<PathBuf> {
    match std::env::var_os("KVND_MODEL") {
        Some(p) => Some(PathBuf::from(p)),
        None => default_model(),
    }
}

/// The prose data set in `dir`: every address (`*.txt`), in file-name order, concatenated with
/// a newline after each. One reader for the tests and the evaluation, so both see the same text.
pub fn read_sotu(dir: &std::path::Path) -> std::io::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        text.push_str(&std::fs::read_to_string(&f)?);
        text.push('\n');
    }
    Ok(text)
}
