//! kvnd's backend extension (the pattern of burn's book, "backend extension"): what a backend
//! tells kvnd beyond burn's `Backend`. Every kvnd type is generic over [`KvBackend`]; the
//! defaults select the generic burn-tensor path, so a backend opts into the host fast paths
//! (compressed-domain attention kernels, host matrix–vector products) by saying where its
//! tensors live, not by its name.
use burn::tensor::backend::Backend;

/// A burn backend as kvnd sees it.
pub trait KvBackend: Backend {
    /// True when this backend's float tensors live in host memory, so that reading them out
    /// costs one copy and the host kernels pay off (CPU backends). GPU backends keep the
    /// tensor path: copying to the host would cost more than the kernels save.
    fn host_memory(_device: &Self::Device) -> bool {
        false
    }
}

/// burn-ndarray: tensors are ndarray arrays in host memory.
impl KvBackend for burn_ndarray::NdArray<f32> {
    fn host_memory(_device: &Self::Device) -> bool {
        true
    }
}

/// burn-ndarray in f64 (the host kernels read f32, so this backend takes the generic path all
/// the same; tests use it to check that path on the CPU).
impl KvBackend for burn_ndarray::NdArray<f64> {
    fn host_memory(_device: &Self::Device) -> bool {
        true
    }
}

/// burn-flex, burn's newer CPU backend: host memory too.
#[cfg(feature = "flex")]
impl KvBackend for burn_flex::Flex {
    fn host_memory(_device: &Self::Device) -> bool {
        true
    }
}

/// burn-cuda: device memory, the generic path.
#[cfg(feature = "cuda")]
impl KvBackend for burn_cuda::Cuda<f32, i32> {}

#[cfg(test)]
mod tests {
    use super::KvBackend;
    use burn_ndarray::NdArray;

    /// burn-ndarray keeps the host fast paths (decode attention in the compressed domain, host
    /// mat-vecs); losing them would not fail a correctness test, only slow every decode.
    #[test]
    fn ndarray_takes_the_host_paths() {
        assert!(<NdArray<f32> as KvBackend>::host_memory(&Default::default()));
        assert!(crate::host::host_backend::<NdArray<f32>>(
            &Default::default()
        ));
        assert!(!crate::host::host_backend::<NdArray<f64>>(
            &Default::default()
        ));
    }
}
