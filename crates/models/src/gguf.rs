//! A small, self-contained GGUF (v2, v3) reader: header, every metadata value type, tensor
//! infos and alignment, with every read bounds-checked so that truncated or corrupt files give a
//! [`ModelError`] naming what was being read, never a panic.
use crate::ModelError;
use crate::dequant::GgmlType;
use std::collections::BTreeMap;
use std::path::Path;

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
/// Counts above this are treated as corruption rather than allocated.
const MAX_COUNT: u64 = 1 << 28;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// Homogeneous array
    Array(Vec<Value>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl Value {
    /// As an unsigned integer, if it is any integer type ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// ggml dims, fastest-varying first (`[cols, rows]` for a matrix).
    pub dims: Vec<u64>,
    /// Raw ggml type id.
    pub ggml_type: u32,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of values.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos, by name, in file order of names.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: Vec<u8>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], ModelError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(end) => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(ModelError::Truncated {
                what: what(),
                offset: self.pos as u64,
            }),
        }
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8, ModelError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16, ModelError> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, ModelError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, ModelError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    fn count(&mut self, what: &dyn Fn() -> String) -> Result<usize, ModelError> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        // Every counted item takes at least one byte, so a count beyond the remaining bytes
        // (or absurdly large) is corruption, not an allocation request.
        if n > MAX_COUNT || n > (self.b.len() - self.pos) as u64 {
            return Err(ModelError::Corrupt {
                what: format!("{} count {n}", what()),
                offset: at,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, ModelError> {
        let n = self.count(what)?;
        let at = self.pos as u64;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| ModelError::Corrupt {
            what: format!("{} is not UTF-8", what()),
            offset: at,
        })
    }

    fn value(
        &mut self,
        ty: u32,
        what: &dyn Fn() -> String,
        depth: u8,
    ) -> Result<Value, ModelError> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(ModelError::Corrupt {
                        what: format!("{}: bool byte {b}", what()),
                        offset: self.pos as u64 - 1,
                    });
                }
            },
            8 => Value::String(self.string(what)?),
            9 if depth == 0 => {
                let at = self.pos as u64;
                let inner = self.u32(what)?;
                if inner == 9 {
                    return Err(ModelError::Corrupt {
                        what: format!("{}: nested array", what()),
                        offset: at,
                    });
                }
                let n = self.count(what)?;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => {
                return Err(ModelError::Corrupt {
                    what: format!("{}: unknown value type {t}", what()),
                    offset: self.pos as u64 - 4,
                });
            }
        })
    }
}

impl Gguf {
    /// Reads and parses a file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parses GGUF bytes. Validates that every tensor's data lies inside the file and that its
    /// type is one we dequantise, so later reads cannot fail on layout.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, ModelError> {
        let mut r = Reader { b: &bytes, pos: 0 };
        let magic = r.u32(&|| "magic".into())?;
        if magic != MAGIC {
            return Err(ModelError::BadMagic { magic });
        }
        let version = r.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::UnsupportedVersion(version));
        }
        let n_tensors = r.count(&|| "tensor".into())?;
        let n_kv = r.count(&|| "metadata".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let ty = r.u32(&|| format!("type of metadata {key}"))?;
            let v = r.value(ty, &|| format!("metadata {key}"), 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r.string(&|| format!("tensor name #{i}"))?;
            let at = r.pos as u64;
            let nd = r.u32(&|| format!("dims of tensor {name}"))?;
            if nd == 0 || nd > 4 {
                return Err(ModelError::Corrupt {
                    what: format!("tensor {name}: {nd} dims"),
                    offset: at,
                });
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(r.u64(&|| format!("dims of tensor {name}"))?);
            }
            let ggml_type = r.u32(&|| format!("type of tensor {name}"))?;
            let offset = r.u64(&|| format!("offset of tensor {name}"))?;
            infos.push((
                name,
                TensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            ));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(ModelError::Metadata {
                        key: "general.alignment".into(),
                        problem: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, mut info) in infos {
            let ty = GgmlType::from_id(info.ggml_type).ok_or_else(|| {
                ModelError::UnsupportedTensorType {
                    tensor: name.clone(),
                    ggml_type: info.ggml_type,
                }
            })?;
            let numel = info
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| ModelError::Corrupt {
                    what: format!("tensor {name}: dims {:?}", info.dims),
                    offset: 0,
                })?;
            let size = ty.bytes_for(numel).ok_or_else(|| ModelError::Corrupt {
                what: format!("tensor {name}: {numel} values is not whole blocks of {ty:?}"),
                offset: 0,
            })?;
            let start = data_start.checked_add(info.offset);
            match start.and_then(|s| s.checked_add(size)) {
                Some(end) if end <= bytes.len() as u64 => {}
                _ => {
                    return Err(ModelError::Truncated {
                        what: format!("data of tensor {name}"),
                        offset: data_start.saturating_add(info.offset),
                    });
                }
            }
            info.offset += data_start;
            if tensors.insert(name.clone(), info).is_some() {
                return Err(ModelError::Corrupt {
                    what: format!("duplicate tensor {name}"),
                    offset: 0,
                });
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.metadata.get(key).ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: "missing".into(),
        })
    }

    /// A metadata integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, ModelError> {
        let v = self.get(key)?;
        v.as_u64().ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: format!("expected an integer, found {v:?}"),
        })
    }

    /// A metadata float.
    pub fn get_f64(&self, key: &str) -> Result<f64, ModelError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: format!("expected a number, found {v:?}"),
        })
    }

    /// A metadata string.
    pub fn get_str(&self, key: &str) -> Result<&str, ModelError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: "expected a string".into(),
        })
    }

    /// A metadata array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| ModelError::Metadata {
                        key: key.into(),
                        problem: "array item is not a string".into(),
                    })
                })
                .collect(),
            _ => Err(ModelError::Metadata {
                key: key.into(),
                problem: "expected an array of strings".into(),
            }),
        }
    }

    /// A tensor's type and its data as stored in the file (`None` when absent or of a type
    /// this crate does not read).
    pub fn tensor_bytes(&self, name: &str) -> Option<(GgmlType, &[u8])> {
        let info = self.tensors.get(name)?;
        let ty = GgmlType::from_id(info.ggml_type)?;
        let size = ty.bytes_for(info.numel()).unwrap_or(0) as usize;
        let start = info.offset as usize;
        Some((ty, self.bytes.get(start..start.checked_add(size)?)?))
    }

    /// Dequantises a tensor to f32, returning its ggml dims (fastest-varying first) and values.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        // Validated in `parse`: the type is known and the data lies inside the file.
        let ty =
            GgmlType::from_id(info.ggml_type).ok_or_else(|| ModelError::UnsupportedTensorType {
                tensor: name.into(),
                ggml_type: info.ggml_type,
            })?;
        let n = info.numel() as usize;
        let size = ty.bytes_for(n as u64).unwrap_or(0) as usize;
        let start = info.offset as usize;
        let mut out = vec![0f32; n];
        ty.dequantize(&self.bytes[start..start + size], &mut out);
        Ok((info.dims.iter().map(|&d| d as usize).collect(), out))
    }
}
