//! Per-tensor and total sizes of a `.nzt` file, as `neuzip inspect` shows them.

use serde::Serialize;

use crate::codec::lossy::LossyParams;
use crate::format::reader::NztFile;
use crate::format::{BlockMode, Codec};

#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub codec: String,
    /// Lossy tensors: mantissa bits kept (K) and elements per scale byte (0: no normalization).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mantissa_bits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_block: Option<u32>,
    /// Block count per mode: raw, zstd, split, split_local, lossy, codebook.
    pub blocks: [usize; 6],
    pub original_bytes: u64,
    pub stored_bytes: u64,
    pub bits_per_weight: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub version: String,
    pub tensors: Vec<TensorRow>,
    pub elements: u64,
    pub original_bytes: u64,
    /// Size of the whole `.nzt` file: header, tables, padding and blocks.
    pub file_bytes: u64,
    /// `8 * file_bytes / elements`.
    pub bits_per_weight: f64,
    /// Bytes of block payloads alone (no header, index, tables of the header, or alignment padding).
    pub payload_bytes: u64,
    /// `8 * payload_bytes / elements`: the figure to hold against `analyze`'s bound.
    pub payload_bits_per_weight: f64,
    pub ratio: f64,
}

fn bits_per(bytes: u64, elements: u64) -> f64 {
    if elements == 0 {
        0.0
    } else {
        8.0 * bytes as f64 / elements as f64
    }
}

pub fn report(file: &NztFile) -> Report {
    let mut rows = Vec::new();
    let (mut elements, mut original) = (0u64, 0u64);
    for t in file.tensors() {
        let mut blocks = [0usize; 6];
        for b in &t.blocks {
            blocks[match b.mode {
                BlockMode::Raw => 0,
                BlockMode::Zstd => 1,
                BlockMode::Split => 2,
                BlockMode::SplitLocal => 3,
                BlockMode::Lossy => 4,
                BlockMode::Codebook => 5,
            }] += 1;
        }
        let n = t.elements().unwrap_or(0);
        elements += n;
        original += t.byte_len();
        // The header parser has checked the params.
        let lossy = (t.codec == Codec::Lossy)
            .then(|| LossyParams::parse(&t.params, t.dtype).ok())
            .flatten();
        rows.push(TensorRow {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            codec: t.codec.name().to_string(),
            mantissa_bits: lossy.as_ref().map(|p| p.mantissa_bits),
            norm_block: lossy.as_ref().map(|p| p.norm_block),
            blocks,
            original_bytes: t.byte_len(),
            stored_bytes: t.stored_len(),
            bits_per_weight: bits_per(t.stored_len(), n),
        });
    }
    let source_len = 8 + file.header().source_header.len() as u64;
    let file_bytes = file.file_len();
    let payload_bytes: u64 = file.tensors().iter().map(|t| t.stored_len()).sum();
    Report {
        version: format!("1.{}", file.header().version_minor),
        tensors: rows,
        elements,
        original_bytes: original + source_len,
        file_bytes,
        bits_per_weight: bits_per(file_bytes, elements),
        payload_bytes,
        payload_bits_per_weight: bits_per(payload_bytes, elements),
        ratio: (original + source_len) as f64 / file_bytes.max(1) as f64,
    }
}
