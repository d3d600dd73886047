//! The one place the backend is chosen: burn-ndarray on the CPU, burn-cuda with `--features cuda`,
//! or burn-flex (burn's newer CPU backend) with `--features flex`.
#[cfg(not(any(feature = "cuda", feature = "flex")))]
/// The backend every command runs on.
pub type B = burn_ndarray::NdArray<f32>;
#[cfg(feature = "cuda")]
/// The backend every command runs on.
pub type B = burn_cuda::Cuda<f32, i32>;
#[cfg(all(feature = "flex", not(feature = "cuda")))]
/// The backend every command runs on.
pub type B = burn_flex::Flex;

/// The default device of [`B`].
pub fn device() -> <B as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}
