//! The per-layer knob of the precision axis.
use kv_tensor::{Bits, KvError};
use serde::{Deserialize, Serialize};

/// Tokens (keys) or channels (values) sharing one scale and minimum. A power of two in
/// 8..=128, validated once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "usize", into = "usize")]
pub struct GroupSize(usize);

impl GroupSize {
    /// KIVI's default.
    pub const DEFAULT: GroupSize = GroupSize(32);

    /// Validates a group size.
    pub fn new(g: usize) -> Result<Self, KvError> {
        if (8..=128).contains(&g) && g.is_power_of_two() {
            Ok(GroupSize(g))
        } else {
            Err(KvError::InvalidValue {
                what: "group size",
                value: g.to_string(),
                allowed: "a power of two from 8 to 128",
            })
        }
    }

    /// The size.
    pub fn get(self) -> usize {
        self.0
    }
}

impl TryFrom<usize> for GroupSize {
    type Error = KvError;
    fn try_from(g: usize) -> Result<Self, KvError> {
        GroupSize::new(g)
    }
}

impl From<GroupSize> for usize {
    fn from(g: GroupSize) -> usize {
        g.0
    }
}

impl Default for GroupSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Bits for keys and values (16 = that side untouched) and the group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSetting {
    /// Key bits.
    pub k_bits: Bits,
    /// Value bits.
    pub v_bits: Bits,
    /// Group size.
    #[serde(default)]
    pub group: GroupSize,
}

impl QuantSetting {
    /// K and V at the given widths, default group.
    pub fn new(k_bits: Bits, v_bits: Bits) -> Self {
        Self {
            k_bits,
            v_bits,
            group: GroupSize::DEFAULT,
        }
    }

    /// True when neither side is quantized.
    pub fn is_identity(&self) -> bool {
        self.k_bits == Bits::Full && self.v_bits == Bits::Full
    }
}
