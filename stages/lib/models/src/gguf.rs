//! A small GGUF (version 3) reader and writer for the quantized checkpoints.
//!
//! candle's `gguf_file` has no `I8` tensor type, which per-channel INT8 needs, so this module
//! writes the container itself. Tensor types used: `F32` (0), `Q4_0` (2: per 32 weights an f16
//! scale and 16 bytes of nibbles, value = (nibble − 8)·scale) and `I8` (24). Files open with the
//! `gguf` Python package (a test in `tests/` checks it).

use std::collections::BTreeMap;
use std::io::{Read, Write};

pub const ALIGNMENT: usize = 32;
const MAGIC: &[u8; 4] = b"GGUF";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorType {
    F32,
    Q4_0,
    I8,
}

impl TensorType {
    fn code(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::Q4_0 => 2,
            TensorType::I8 => 24,
        }
    }
    fn from_code(c: u32) -> Option<Self> {
        match c {
            0 => Some(TensorType::F32),
            2 => Some(TensorType::Q4_0),
            24 => Some(TensorType::I8),
            _ => None,
        }
    }
    /// Bytes for `n` elements.
    pub fn bytes(self, n: usize) -> usize {
        match self {
            TensorType::F32 => 4 * n,
            TensorType::Q4_0 => n / 32 * 18,
            TensorType::I8 => n,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Other scalar types and arrays are read but not interpreted.
    Other,
}

/// A tensor as stored: row-major dims (outermost first) and raw bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dims: Vec<usize>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gguf {
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, RawTensor>,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic {0:?})")]
    Magic([u8; 4]),
    #[error("unsupported GGUF version {0} (this reader handles 2 and 3)")]
    Version(u32),
    #[error("tensor `{name}` has type {code}, which this reader does not handle (F32, Q4_0, I8)")]
    TensorType { name: String, code: u32 },
    #[error("malformed GGUF: {0}")]
    Malformed(String),
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn pad(w: &mut Vec<u8>) {
    while !w.len().is_multiple_of(ALIGNMENT) {
        w.push(0);
    }
}

impl Gguf {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&3u32.to_le_bytes());
        w.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        w.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut w, k);
            let (code, bytes): (u32, Vec<u8>) = match v {
                Value::U32(x) => (4, x.to_le_bytes().to_vec()),
                Value::I32(x) => (5, x.to_le_bytes().to_vec()),
                Value::F32(x) => (6, x.to_le_bytes().to_vec()),
                Value::Bool(x) => (7, vec![*x as u8]),
                Value::Str(s) => {
                    let mut b = Vec::new();
                    put_str(&mut b, s);
                    (8, b)
                }
                Value::U64(x) => (10, x.to_le_bytes().to_vec()),
                Value::I64(x) => (11, x.to_le_bytes().to_vec()),
                Value::F64(x) => (12, x.to_le_bytes().to_vec()),
                Value::Other => continue,
            };
            w.extend_from_slice(&code.to_le_bytes());
            w.extend_from_slice(&bytes);
        }
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            put_str(&mut w, name);
            w.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            // GGUF lists dimensions innermost first.
            for d in t.dims.iter().rev() {
                w.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            w.extend_from_slice(&t.ty.code().to_le_bytes());
            w.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.data.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        pad(&mut w);
        for t in self.tensors.values() {
            w.extend_from_slice(&t.data);
            pad(&mut w);
        }
        w
    }

    pub fn write(&self, out: &mut impl Write) -> Result<(), GgufError> {
        out.write_all(&self.to_bytes())?;
        Ok(())
    }

    pub fn read(input: &mut impl Read) -> Result<Gguf, GgufError> {
        let mut bytes = Vec::new();
        input.read_to_end(&mut bytes)?;
        Gguf::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Cursor { b: bytes, pos: 0 };
        let magic: [u8; 4] = r.take(4)?.try_into().map_err(|_| GgufError::Malformed("short header".into()))?;
        if &magic != MAGIC {
            return Err(GgufError::Magic(magic));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.u64()? as usize;
        let n_kv = r.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U32(a)) if *a > 0 => *a as usize,
            _ => ALIGNMENT,
        };
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd > 8 {
                return Err(GgufError::Malformed(format!("tensor `{name}` has {nd} dimensions")));
            }
            let mut dims = (0..nd).map(|_| r.u64().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
            dims.reverse();
            let code = r.u32()?;
            let ty = TensorType::from_code(code).ok_or(GgufError::TensorType { name: name.clone(), code })?;
            let offset = r.u64()? as usize;
            infos.push((name, dims, ty, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let n: usize = dims.iter().product();
            if ty == TensorType::Q4_0 && !n.is_multiple_of(32) {
                return Err(GgufError::Malformed(format!(
                    "Q4_0 tensor `{name}` has {n} elements, not a multiple of 32"
                )));
            }
            let len = ty.bytes(n);
            let start = data_start.checked_add(offset).ok_or_else(|| GgufError::Malformed("offset overflow".into()))?;
            let data = bytes
                .get(start..start.saturating_add(len))
                .ok_or_else(|| GgufError::Malformed(format!("tensor `{name}` runs past the end of the file")))?;
            tensors.insert(name, RawTensor { dims, ty, data: data.to_vec() });
        }
        Ok(Gguf { metadata, tensors })
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn u32(&self, key: &str) -> Option<u32> {
        match self.metadata.get(key) {
            Some(Value::U32(v)) => Some(*v),
            _ => None,
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| GgufError::Malformed(format!("unexpected end of file at byte {}", self.pos)))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| GgufError::Malformed(format!("string at byte {} is not UTF-8", self.pos - n)))
    }
    fn value(&mut self, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 | 1 | 7 => {
                let b = self.take(1)?[0];
                if ty == 7 {
                    Value::Bool(b != 0)
                } else {
                    Value::Other
                }
            }
            2 | 3 => {
                self.take(2)?;
                Value::Other
            }
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            8 => Value::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(inner)?;
                }
                Value::Other
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => return Err(GgufError::Malformed(format!("unknown metadata type {other} at byte {}", self.pos))),
        })
    }
}

/// f32 values → GGUF bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn f32_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Pack quantized values in [-8, 7] with one f16 scale per 32 into Q4_0 blocks.
pub fn pack_q4_0(q: &[i8], block_scales: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.len() / 32 * 18);
    for (block, &s) in q.chunks_exact(32).zip(block_scales) {
        out.extend_from_slice(&half::f16::from_f32(s).to_le_bytes());
        for j in 0..16 {
            let lo = (block[j] + 8) as u8 & 0x0f;
            let hi = (block[j + 16] + 8) as u8 & 0x0f;
            out.push(lo | (hi << 4));
        }
    }
    out
}

/// Inverse of [`pack_q4_0`]: values and one scale per 32.
pub fn unpack_q4_0(bytes: &[u8]) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(bytes.len() / 18 * 32);
    let mut scales = Vec::with_capacity(bytes.len() / 18);
    for b in bytes.chunks_exact(18) {
        scales.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
        let mut block = [0i8; 32];
        for j in 0..16 {
            block[j] = (b[2 + j] & 0x0f) as i8 - 8;
            block[j + 16] = (b[2 + j] >> 4) as i8 - 8;
        }
        q.extend_from_slice(&block);
    }
    (q, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bit_exact() {
        let mut g = Gguf::default();
        g.metadata.insert("general.architecture".into(), Value::Str("itera_lite".into()));
        g.metadata.insert("general.alignment".into(), Value::U32(32));
        g.metadata.insert("x.count".into(), Value::U64(7));
        g.tensors.insert("a".into(), RawTensor { dims: vec![3, 5], ty: TensorType::F32, data: f32_bytes(&[1.5; 15]) });
        g.tensors.insert("b".into(), RawTensor { dims: vec![2, 64], ty: TensorType::I8, data: (0..128u8).collect() });
        let q: Vec<i8> = (0..64).map(|i| (i % 15) as i8 - 7).collect();
        g.tensors.insert(
            "c".into(),
            RawTensor { dims: vec![1, 64], ty: TensorType::Q4_0, data: pack_q4_0(&q, &[0.25, 0.5]) },
        );
        let bytes = g.to_bytes();
        let back = Gguf::parse(&bytes).unwrap();
        assert_eq!(back, g);
        let (q2, s2) = unpack_q4_0(&back.tensors["c"].data);
        assert_eq!(q2, q);
        assert_eq!(s2, vec![0.25, 0.5]);
        assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn truncated_and_foreign_files_are_errors_not_panics() {
        let mut g = Gguf::default();
        g.tensors.insert("a".into(), RawTensor { dims: vec![4], ty: TensorType::F32, data: f32_bytes(&[1.0; 4]) });
        let bytes = g.to_bytes();
        for cut in [0, 3, 10, 30, bytes.len() - 17] {
            assert!(Gguf::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(Gguf::parse(b"PK\x03\x04aaaaaaaaaaaaaaaaaaaaaaaa"), Err(GgufError::Magic(_))));
    }
}
