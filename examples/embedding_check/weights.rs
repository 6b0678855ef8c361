//! Weights for the embedding check: tensors read from a safetensors or a `.nzt` file (told apart by the
//! magic bytes) and converted from F32, F64, BF16 or F16 to f32.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use neuzip::format::MAGIC;
use neuzip::source::SafetensorsFile;
use neuzip::{Dtype, NztFile};

/// An open checkpoint.
pub enum Checkpoint {
    Safetensors(SafetensorsFile),
    Nzt(NztFile),
}

/// A tensor in f32, row-major.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Checkpoint {
    /// Opens `path` as `.nzt` when it starts with the `.nzt` magic, else as safetensors.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let mut head = [0u8; 8];
        let is_nzt = {
            use std::io::Read;
            let mut file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            file.read_exact(&mut head).is_ok() && head == MAGIC
        };
        Ok(if is_nzt {
            Checkpoint::Nzt(NztFile::open(path).with_context(|| format!("{}", path.display()))?)
        } else {
            Checkpoint::Safetensors(
                SafetensorsFile::open(path).with_context(|| format!("{}", path.display()))?,
            )
        })
    }

    /// The tensor called `name`, or `bert.{name}` (checkpoints of BERT task models carry that prefix).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let prefixed = format!("bert.{name}");
        for candidate in [name, prefixed.as_str()] {
            if let Some(tensor) = self.find(candidate)? {
                return Ok(tensor);
            }
        }
        bail!("the checkpoint has no tensor '{name}'")
    }

    fn find(&self, name: &str) -> Result<Option<Tensor>> {
        let (dtype, shape, bytes) = match self {
            Checkpoint::Safetensors(file) => {
                let Some(t) = file.tensors.iter().find(|t| t.name == name) else {
                    return Ok(None);
                };
                (t.dtype, t.shape.clone(), file.data(t).to_vec())
            }
            Checkpoint::Nzt(file) => {
                let Some(t) = file.tensors().iter().find(|t| t.name == name) else {
                    return Ok(None);
                };
                let bytes = file
                    .decode_tensor(name)
                    .with_context(|| format!("decoding '{name}'"))?;
                (t.dtype, t.shape.clone(), bytes)
            }
        };
        let data = to_f32(dtype, &bytes).with_context(|| format!("tensor '{name}'"))?;
        let shape = shape.iter().map(|&d| d as usize).collect();
        Ok(Some(Tensor { shape, data }))
    }

    /// The distinct dtypes of the float tensors, for reports.
    pub fn float_dtypes(&self) -> BTreeSet<Dtype> {
        let dtypes: Vec<Dtype> = match self {
            Checkpoint::Safetensors(file) => file.tensors.iter().map(|t| t.dtype).collect(),
            Checkpoint::Nzt(file) => file.tensors().iter().map(|t| t.dtype).collect(),
        };
        dtypes
            .into_iter()
            .filter(|d| matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64))
            .collect()
    }
}

/// Little-endian elements of `dtype` converted to f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let width = dtype.byte_width().unwrap_or(0);
    if width == 0 || !bytes.len().is_multiple_of(width) {
        bail!("{} bytes of {dtype:?}", bytes.len());
    }
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        other => bail!("{other:?} is not a float type"),
    })
}
