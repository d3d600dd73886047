//! Shared helpers of the cross-crate tests: the backend alias and the embedded model.
//!
//! Tests on the real model need it fetched first (`cargo xtask fetch-model`, which `.ci/run`
//! does); when it is missing they fail with that instruction rather than skip.
#[cfg(not(any(feature = "cuda", feature = "flex")))]
use burn_ndarray::NdArray;
use models::LoadedModel;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The backend the cross-crate tests run on: the CPU, CUDA with `--features cuda`, or burn-flex
/// with `--features flex`.
#[cfg(not(any(feature = "cuda", feature = "flex")))]
pub type B = NdArray<f32>;
/// The backend the cross-crate tests run on: the CPU, or CUDA with `--features cuda`.
#[cfg(feature = "cuda")]
pub type B = burn_cuda::Cuda<f32, i32>;
/// The backend the cross-crate tests run on: burn-flex, burn's newer CPU backend.
#[cfg(all(feature = "flex", not(feature = "cuda")))]
pub type B = burn_flex::Flex;

/// Path of the embedded default model, or a panic telling how to fetch it.
pub fn model_path() -> PathBuf {
    let p = models::paths::default_model().expect("no cache directory: set KVND_HOME");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask fetch-model` first",
        p.display()
    );
    p
}

/// The embedded default model, loaded once per test binary.
pub fn model() -> &'static LoadedModel<B> {
    static M: OnceLock<LoadedModel<B>> = OnceLock::new();
    M.get_or_init(|| {
        models::load_gguf::<B>(&model_path(), &Default::default()).expect("the default model loads")
    })
}

/// The model a benchmark runs on (`KVND_MODEL`, set by `cargo xtask bench --model`, else the
/// embedded default), loaded once per bench binary.
pub fn bench_model() -> &'static LoadedModel<B> {
    static M: OnceLock<LoadedModel<B>> = OnceLock::new();
    M.get_or_init(|| {
        let p = models::paths::bench_model().expect("no cache directory: set KVND_HOME");
        models::load_gguf::<B>(&p, &Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    })
}

/// The shared reference fixtures (`../shared/fixtures` next to the repository), the source of
/// truth the issue names.
fn shared_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name)
}

/// The repository's copy of a shared fixture (`tests/fixtures`), so a clone that has no
/// `../shared` beside it still runs the reference tests; `vendored_fixtures_match_shared`
/// keeps the copy identical wherever `../shared` exists.
fn vendored_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Path of a reference fixture: the shared one where the checkout sits beside `../shared`,
/// the repository's copy otherwise.
pub fn fixture(name: &str) -> PathBuf {
    let shared = shared_fixture(name);
    let p = if shared.exists() {
        shared
    } else {
        vendored_fixture(name)
    };
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// Deterministic English prose from the data set (`cargo xtask fetch-data`): the addresses in
/// file-name order, concatenated, starting `skip` characters in.
pub fn prose(skip: usize, chars: usize) -> String {
    let dir = models::paths::sotu_dir().expect("no cache directory: set KVND_HOME");
    let text = models::paths::read_sotu(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: run `cargo xtask fetch-data` first", dir.display()));
    assert!(text.len() > skip + chars, "the prose data set is too small");
    text.chars().skip(skip).take(chars).collect()
}

/// `n` tokens of prose for the embedded model.
pub fn prose_tokens(skip: usize, n: usize) -> Vec<u32> {
    let ids = model()
        .tokenizer
        .encode(&prose(skip, n * 8))
        .expect("tokenizes");
    assert!(ids.len() >= n, "not enough prose for {n} tokens");
    ids[..n].to_vec()
}

/// Prefills `ids` through recording caches: per layer, post-RoPE K/V and the last `window`
/// queries.
pub fn capture(ids: &[u32], window: usize) -> Vec<kv_tensor::RecordingCache<B>> {
    capture_with(
        ids,
        models::PrefillOptions {
            observe_window: window,
            ..Default::default()
        },
    )
}

/// Like [`capture`] with explicit prefill options (e.g. accumulated attention for H2O).
pub fn capture_with(
    ids: &[u32],
    opts: models::PrefillOptions,
) -> Vec<kv_tensor::RecordingCache<B>> {
    let m = model();
    let mut caches: Vec<kv_tensor::RecordingCache<B>> = (0..m.model.config.layers)
        .map(|_| kv_tensor::RecordingCache::new())
        .collect();
    m.model.prefill(ids, &mut caches, &opts).expect("prefill");
    caches
}

/// Relative Frobenius error `‖a − b‖ / ‖b‖` (the calibration proxy's own measure).
pub use solver::calibrate::relative_error as rel_err;

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's fixture copies are byte-identical to `../shared/fixtures` (when this
    /// checkout has it beside it: CI's clone may not, which is why the copies exist).
    #[test]
    fn vendored_fixtures_match_shared() {
        let name = "smollm2_reference.json";
        let vendored = std::fs::read(vendored_fixture(name)).expect("tests/fixtures copy exists");
        assert!(!vendored.is_empty());
        if let Ok(shared) = std::fs::read(shared_fixture(name)) {
            assert!(
                shared == vendored,
                "tests/fixtures/{name} differs from ../shared/fixtures/{name}: copy it again"
            );
        }
    }
}
