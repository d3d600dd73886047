//! Calibration: one basis per group of adjacent layers, from the per-layer PCA calibration.
use axis_lowrank::{HeadBasis, PcaBases};
use nalgebra::{DMatrix, SymmetricEigen};
use thiserror::Error;

/// What went wrong with shared bases.
#[derive(Debug, Error)]
pub enum ShareError {
    /// The group size does not divide the model's layers (a short last group would be charged
    /// shares of a basis it does not fill).
    #[error(
        "{layers} layers cannot be grouped {group} at a time (the group size must divide the layer count)"
    )]
    Grouping {
        /// Layers in the model.
        layers: usize,
        /// The asked group size.
        group: usize,
    },
    /// A setting asks for another group size than the one calibrated.
    #[error(
        "the setting shares bases across {asked} layers, but they were calibrated for {calibrated}"
    )]
    GroupMismatch {
        /// The setting's group size.
        asked: usize,
        /// The calibrated group size.
        calibrated: usize,
    },
    /// No shared basis covers the layer.
    #[error("no shared basis for layer {0}")]
    Layer(usize),
    /// A rank beyond the head dimension or zero.
    #[error("rank {rank} is outside 1..={head_dim}")]
    Rank {
        /// Asked rank.
        rank: usize,
        /// Head dimension.
        head_dim: usize,
    },
}

/// Per group of `group` adjacent layers, per side and KV head: the top directions of the
/// group's pooled uncentred second moment `Σ_l V_l Λ_l V_lᵀ / group`, rebuilt from each layer's
/// eigen-decomposition (the PCA file holds every direction with its eigenvalue, so no new
/// capture is needed). Entry `g` of the result covers layers `g·group .. (g+1)·group`.
pub fn pooled_bases(pca: &PcaBases, group: usize) -> Result<PcaBases, ShareError> {
    let layers = pca.layers.len();
    if group == 0 || !layers.is_multiple_of(group) {
        return Err(ShareError::Grouping { layers, group });
    }
    let d = pca.head_dim;
    let groups = pca
        .layers
        .chunks(group)
        .map(|members| {
            [0, 1].map(|side| {
                (0..pca.kv_heads)
                    .map(|h| pooled_head(members.iter().map(|m| &m[side][h]), d, group))
                    .collect()
            })
        })
        .collect();
    Ok(PcaBases {
        model_sha256: pca.model_sha256.clone(),
        head_dim: d,
        kv_heads: pca.kv_heads,
        layers: groups,
    })
}

fn pooled_head<'a>(heads: impl Iterator<Item = &'a HeadBasis>, d: usize, n: usize) -> HeadBasis {
    let mut m = DMatrix::<f64>::zeros(d, d);
    for hb in heads {
        // Column j of `vectors` is direction j: V[i][j] = vectors[i·d + j].
        let v = DMatrix::from_fn(d, d, |i, j| f64::from(hb.vectors[i * d + j]));
        let lambda = DMatrix::from_diagonal(&nalgebra::DVector::from_iterator(
            d,
            hb.eigenvalues.iter().copied(),
        ));
        m += &v * lambda * v.transpose() / n as f64;
    }
    let sym = (&m + m.transpose()) / 2.0;
    let eig = SymmetricEigen::new(sym);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    HeadBasis {
        eigenvalues: order.iter().map(|&c| eig.eigenvalues[c].max(0.0)).collect(),
        vectors: (0..d)
            .flat_map(|i| order.iter().map(move |&c| (i, c)))
            .map(|(i, c)| eig.eigenvectors[(i, c)] as f32)
            .collect(),
    }
}
