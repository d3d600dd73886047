//! Byte budgets.
use crate::SolverError;
use kv_tensor::Bytes;
use std::str::FromStr;

/// A cache budget: absolute bytes, or a fraction of the fp16 cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many bytes.
    Bytes(Bytes),
    /// At most this fraction of fp16 K+V bytes (0 < f ≤ 1).
    Fraction(f64),
}

impl Budget {
    /// Bytes allowed when the fp16 cache takes `fp16`.
    pub fn bytes(&self, fp16: Bytes) -> Bytes {
        match *self {
            Budget::Bytes(b) => b,
            Budget::Fraction(f) => Bytes((fp16.get() as f64 * f).floor() as u64),
        }
    }
}

impl FromStr for Budget {
    type Err = SolverError;

    /// `1/14`, `0.25`, `12345` (bytes), `3MiB`, `512KiB`.
    fn from_str(s: &str) -> Result<Self, SolverError> {
        let bad = || SolverError::BadBudget(s.to_string());
        let s = s.trim();
        if let Some((a, b)) = s.split_once('/') {
            let (a, b): (f64, f64) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            let f = a / b;
            return if f.is_finite() && f > 0.0 && f <= 1.0 {
                Ok(Budget::Fraction(f))
            } else {
                Err(bad())
            };
        }
        for (suffix, mult) in [
            ("GiB", 1u64 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("B", 1),
        ] {
            if let Some(n) = s.strip_suffix(suffix) {
                let n: f64 = n.trim().parse().map_err(|_| bad())?;
                return if n > 0.0 {
                    Ok(Budget::Bytes(Bytes((n * mult as f64) as u64)))
                } else {
                    Err(bad())
                };
            }
        }
        if let Ok(n) = s.parse::<u64>() {
            return if n > 1 {
                Ok(Budget::Bytes(Bytes(n)))
            } else {
                Err(bad())
            };
        }
        let f: f64 = s.parse().map_err(|_| bad())?;
        if f > 0.0 && f <= 1.0 {
            Ok(Budget::Fraction(f))
        } else {
            Err(bad())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets() {
        assert_eq!(
            "1/14".parse::<Budget>().ok(),
            Some(Budget::Fraction(1.0 / 14.0))
        );
        assert_eq!("0.25".parse::<Budget>().ok(), Some(Budget::Fraction(0.25)));
        assert_eq!(
            "2MiB".parse::<Budget>().ok(),
            Some(Budget::Bytes(Bytes(2 << 20)))
        );
        assert_eq!(
            "5000".parse::<Budget>().ok(),
            Some(Budget::Bytes(Bytes(5000)))
        );
        for bad in ["0", "2/1", "-1", "x", "1/0", "0MiB"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        assert_eq!(Budget::Fraction(0.5).bytes(Bytes(1000)), Bytes(500));
    }
}
