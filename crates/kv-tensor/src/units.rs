//! Validated newtypes for the quantities every plan talks about: bit widths, ratios and bytes. They are checked once at construction, so inner code never re-checks ranges.
use crate::KvError;
use crate::packing::CodeBits;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Storage precision of one side of the cache: a packed integer code width, or 16 (untouched,
/// full precision). Serialised as the plain integer 2, 3, 4, 8 or 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Bits {
    /// Integer codes of this width, packed into 32-bit words.
    Code(CodeBits),
    /// Full precision: the axis leaves this side untouched.
    Full,
}

impl Bits {
    /// The nominal width in bits (16 for [`Bits::Full`]).
    pub fn get(self) -> u8 {
        match self {
            Bits::Code(c) => c.get(),
            Bits::Full => 16,
        }
    }
}

impl TryFrom<u8> for Bits {
    type Error = KvError;
    fn try_from(v: u8) -> Result<Self, KvError> {
        if v == 16 {
            return Ok(Bits::Full);
        }
        CodeBits::try_from(v)
            .map(Bits::Code)
            .map_err(|_| KvError::InvalidValue {
                what: "bit width",
                value: v.to_string(),
                allowed: "one of 2, 3, 4, 8, 16",
            })
    }
}

impl From<Bits> for u8 {
    fn from(b: Bits) -> u8 {
        b.get()
    }
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// A fraction in (0, 1]: a keep ratio, a budget as a share of the fp16 cache.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    /// Everything kept.
    pub const ONE: Ratio = Ratio(1.0);

    /// Validates `v ∈ (0, 1]`.
    pub fn new(v: f64) -> Result<Self, KvError> {
        if v.is_finite() && v > 0.0 && v <= 1.0 {
            Ok(Ratio(v))
        } else {
            Err(KvError::InvalidValue {
                what: "ratio",
                value: v.to_string(),
                allowed: "a number in (0, 1]",
            })
        }
    }

    /// The fraction as a float.
    pub fn get(self) -> f64 {
        self.0
    }

    /// `ceil(self × n)`, the number of items this ratio keeps out of `n`.
    pub fn of(self, n: usize) -> usize {
        // The epsilon keeps 0.25 × 100 at 25 despite binary rounding.
        ((self.0 * n as f64) - 1e-9).ceil().max(0.0) as usize
    }

    /// 100 %, 99 %, …, 1 %: the candidates of a budget search, largest first.
    pub fn percents_down() -> impl Iterator<Item = Ratio> {
        (1..=100u32).rev().map(|p| Ratio(f64::from(p) / 100.0))
    }

    /// The budget search every budgeted baseline shares (uniform keep, pyramid, MoQAE's
    /// high-precision share): the candidate at the largest ratio in 1 % steps whose bytes fit
    /// `budget`. `build(r)` makes the candidate at `r` (`None`: no candidate there) and `bytes`
    /// counts it. Callers' bytes grow with the ratio, so the first fit from the top is the
    /// largest; `None` when not even 1 % fits.
    pub fn largest_fitting<T>(
        budget: Bytes,
        mut build: impl FnMut(Ratio) -> Option<T>,
        bytes: impl Fn(&T) -> Bytes,
    ) -> Option<T> {
        Self::percents_down()
            .filter_map(&mut build)
            .find(|c| bytes(c) <= budget)
    }
}

impl TryFrom<f64> for Ratio {
    type Error = KvError;
    fn try_from(v: f64) -> Result<Self, KvError> {
        Ratio::new(v)
    }
}

impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A byte count. Displayed human-readably (KiB, MiB).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    /// The count as a plain integer.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;
    fn add(self, o: Bytes) -> Bytes {
        Bytes(self.0 + o.0)
    }
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, o: Bytes) {
        self.0 += o.0;
    }
}

impl std::iter::Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        Bytes(iter.map(|b| b.0).sum())
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 1024.0 * 1024.0 {
            write!(f, "{:.2} MiB", b / (1024.0 * 1024.0))
        } else if b >= 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_accept_only_supported_widths() {
        for ok in [2u8, 3, 4, 8, 16] {
            assert_eq!(Bits::try_from(ok).map(u8::from), Ok(ok));
        }
        for bad in [0u8, 1, 5, 6, 7, 9, 15, 17, 32] {
            assert!(Bits::try_from(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ratio_range_and_of() {
        assert!(Ratio::new(0.0).is_err());
        assert!(Ratio::new(1.5).is_err());
        assert!(Ratio::new(f64::NAN).is_err());
        let r = Ratio::new(0.25).expect("valid");
        assert_eq!(r.of(100), 25);
        assert_eq!(r.of(101), 26);
        assert_eq!(Ratio::ONE.of(7), 7);
    }

    #[test]
    fn percent_steps_are_valid_ratios_largest_first() {
        let all: Vec<f64> = Ratio::percents_down().map(Ratio::get).collect();
        assert_eq!(all.len(), 100);
        assert_eq!(all[0], 1.0);
        assert_eq!(all[99], 0.01);
        assert!(all.windows(2).all(|w| w[0] > w[1]));
    }

    proptest::proptest! {
        /// With bytes growing in the ratio, the search returns the largest step that fits: it
        /// fits, and the next step up does not (or there is none).
        #[test]
        fn largest_fitting_is_the_largest_step_that_fits(per in 1u64..10_000, budget in 0u64..2_000_000) {
            let bytes = |r: &Ratio| Bytes((r.get() * 100.0).round() as u64 * per);
            let found = Ratio::largest_fitting(Bytes(budget), Some, bytes);
            match found {
                Some(r) => {
                    proptest::prop_assert!(bytes(&r).get() <= budget);
                    if let Ok(up) = Ratio::new(r.get() + 0.01) {
                        proptest::prop_assert!(bytes(&up).get() > budget);
                    }
                }
                None => proptest::prop_assert!(per > budget),
            }
        }
    }

    #[test]
    fn serde_rejects_bad_values() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct S {
            b: Bits,
            r: Ratio,
        }
        assert!(toml::from_str::<S>("b = 4\nr = 0.5").is_ok());
        assert!(toml::from_str::<S>("b = 5\nr = 0.5").is_err());
        assert!(toml::from_str::<S>("b = 4\nr = 2.0").is_err());
    }
}
