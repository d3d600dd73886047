//! The attention mass each row of a layer has received while decoding: what H2O scores on when
//! a cache re-evicts during generation (the standalone [`crate::DecodingEvictCache`] and a
//! routed layer with a decode budget both keep one).
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::KvBackend;
use std::sync::Mutex;

/// The attention mass each held row has received, kept while decoding for scorers that read it
/// (H2O): the prefill's mass of the kept tokens, plus what every decoding query paid each row.
/// Rows follow the layer's stored order; an eviction carries each survivor's mass over by its
/// position, and rows appended since the last query start at 0. Interior mutability because
/// attention takes the cache by shared reference; cloning copies the ledger, so a forked cache
/// accumulates on its own.
#[derive(Debug)]
pub struct MassLedger<B: KvBackend> {
    mass: Mutex<Option<Tensor<B, 3>>>,
}

impl<B: KvBackend> Default for MassLedger<B> {
    fn default() -> Self {
        Self {
            mass: Mutex::new(None),
        }
    }
}

impl<B: KvBackend> Clone for MassLedger<B> {
    fn clone(&self) -> Self {
        Self {
            mass: Mutex::new(self.peek()),
        }
    }
}

impl<B: KvBackend> MassLedger<B> {
    fn peek(&self) -> Option<Tensor<B, 3>> {
        self.mass.lock().ok().and_then(|m| m.clone())
    }

    /// The mass of `[b, h, stored]` rows; rows beyond those recorded (appended, not yet
    /// attended to) get 0. `None` before anything was recorded.
    pub fn get(&self, stored: usize) -> Option<Tensor<B, 3>> {
        self.peek().map(|m| pad_to(m, stored))
    }

    /// Replaces the ledger.
    pub fn set(&self, mass: Option<Tensor<B, 3>>) {
        if let Ok(mut m) = self.mass.lock() {
            *m = mass;
        }
    }

    /// Adds the mass `add` (`[b, h, stored]`) that queries just paid the rows (see
    /// [`kv_tensor::accumulate_mass`]).
    pub fn add(&self, add: Tensor<B, 3>) {
        if let Ok(mut m) = self.mass.lock() {
            *m = Some(kv_tensor::accumulate_mass(m.take(), add));
        }
    }

    /// Carries each surviving row's mass from the rows at positions `old` (`[b, h, n]`, the
    /// ledger's order) to the rows at positions `new` (`[b, h, m]`, both increasing per head);
    /// a position not among the old rows starts at 0.
    pub fn remap(&self, old: Tensor<B, 3, Int>, new: Tensor<B, 3, Int>) {
        let Some(mass) = self.get(old.dims()[2]) else {
            return;
        };
        self.set(Some(carry_over(mass, old, new)));
    }
}

/// `m` (`[b, h, n ≤ len]`) padded with zero rows to `len`.
fn pad_to<B: KvBackend>(m: Tensor<B, 3>, len: usize) -> Tensor<B, 3> {
    let [b, h, n] = m.dims();
    if n >= len {
        return m;
    }
    let zeros = Tensor::zeros([b, h, len - n], &m.device());
    Tensor::cat(vec![m, zeros], 2)
}

/// See [`MassLedger::remap`]: one merge walk per head on the host.
fn carry_over<B: KvBackend>(
    mass: Tensor<B, 3>,
    old: Tensor<B, 3, Int>,
    new: Tensor<B, 3, Int>,
) -> Tensor<B, 3> {
    let device = mass.device();
    let [b, h, n] = old.dims();
    let m_len = new.dims()[2];
    let ints = |t: Tensor<B, 3, Int>| -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec().unwrap_or_default()
    };
    let (old, new) = (ints(old), ints(new));
    let mass: Vec<f32> = mass
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let mut out = vec![0f32; b * h * m_len];
    if old.len() == b * h * n && mass.len() == old.len() && new.len() == out.len() {
        for head in 0..b * h {
            let (o, w) = (
                &old[head * n..(head + 1) * n],
                &mass[head * n..(head + 1) * n],
            );
            let mut i = 0;
            for (j, p) in new[head * m_len..(head + 1) * m_len].iter().enumerate() {
                while i < n && o[i] < *p {
                    i += 1;
                }
                if i < n && o[i] == *p {
                    out[head * m_len + j] = w[i];
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [b, h, m_len]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::NdArray;
    use proptest::prelude::*;

    type B = NdArray<f32>;

    proptest! {
        /// Every new row gets the mass of the old row at its position, or 0 when its position
        /// was not held; the order of rows follows the new positions.
        #[test]
        fn mass_follows_positions(
            old in proptest::collection::btree_set(0i64..200, 1..60),
            picks in proptest::collection::vec(any::<bool>(), 60),
            fresh in proptest::collection::btree_set(200i64..260, 0..8),
        ) {
            let d = Default::default();
            let old: Vec<i64> = old.into_iter().collect();
            let mass: Vec<f32> = old.iter().map(|&p| 1.0 + p as f32).collect();
            let mut new: Vec<i64> = old.iter().zip(&picks).filter(|(_, k)| **k).map(|(p, _)| *p).collect();
            new.extend(fresh.iter().copied());
            let ints = |v: &[i64]| Tensor::<B, 3, Int>::from_data(TensorData::new(v.to_vec(), [1, 1, v.len()]), &d);
            let ledger = MassLedger::<B>::default();
            ledger.set(Some(Tensor::from_data(TensorData::new(mass, [1, 1, old.len()]), &d)));
            ledger.remap(ints(&old), ints(&new));
            let got: Vec<f32> = ledger.get(new.len()).expect("set").into_data().to_vec().expect("f32");
            let want: Vec<f32> = new.iter().map(|&p| if p < 200 { 1.0 + p as f32 } else { 0.0 }).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn added_mass_pads_rows_appended_since() {
        let d = Default::default();
        let ledger = MassLedger::<B>::default();
        assert!(ledger.get(3).is_none());
        let m = |v: Vec<f32>| {
            Tensor::<B, 3>::from_data(TensorData::new(v.clone(), [1, 1, v.len()]), &d)
        };
        ledger.add(m(vec![1.0, 2.0]));
        ledger.add(m(vec![1.0, 1.0, 1.0]));
        let got: Vec<f32> = ledger
            .get(4)
            .expect("added")
            .into_data()
            .to_vec()
            .expect("f32");
        assert_eq!(got, vec![2.0, 3.0, 1.0, 0.0]);
    }
}
