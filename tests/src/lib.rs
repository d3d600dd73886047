//! Shared helpers of the cross-crate tests: the backend alias and the embedded model.
//!
//! Tests on the real model need it fetched first (`cargo xtask fetch-model`, which `.ci/run`
//! does); when it is missing they fail with that instruction rather than skip.
#[cfg(not(feature = "cuda"))]
use burn_ndarray::NdArray;
use models::LoadedModel;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The backend the cross-crate tests run on: the CPU, or CUDA with `--features cuda`.
#[cfg(not(feature = "cuda"))]
pub type B = NdArray<f32>;
/// The backend the cross-crate tests run on: the CPU, or CUDA with `--features cuda`.
#[cfg(feature = "cuda")]
pub type B = burn_cuda::Cuda<f32, i32>;

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

/// Path of the shared reference fixtures (`../shared/fixtures` next to the repository).
pub fn fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}
