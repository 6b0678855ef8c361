//! Decode everything (checking every checksum and stream end) and, given the original, compare bit for bit.

use serde::Serialize;

use crate::error::Result;
use crate::format::reader::NztFile;
use crate::source::SafetensorsFile;

#[derive(Clone, Debug, Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub bytes: u64,
    /// None when no original was given.
    pub identical: Option<bool>,
    /// Elements whose bytes differ from the original.
    pub mismatched_elements: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub tensors: Vec<TensorCheck>,
    pub decoded_bytes: u64,
    /// Whether the source header matches the original's byte for byte (None without an original).
    pub header_identical: Option<bool>,
    pub all_identical: Option<bool>,
}

/// Decodes every tensor of `file`; compares with `original` when given. A decode error (bad checksum,
/// corrupt stream) is returned as an error; a mismatch is reported in the result.
pub fn verify(
    file: &NztFile,
    original: Option<&SafetensorsFile>,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport> {
    // The original's tensor for each table entry, when names, dtypes and sizes agree.
    let counterpart: Vec<Option<&[u8]>> = file
        .tensors()
        .iter()
        .map(|t| {
            let orig = original?;
            let s = orig.tensors.iter().find(|s| s.name == t.name)?;
            (s.dtype == t.dtype && s.end - s.start == t.byte_len()).then(|| orig.data(s))
        })
        .collect();
    let mut mismatched = vec![0u64; file.tensors().len()];
    let mut decoded = 0u64;
    file.for_each_block(|index, block, bytes| {
        decoded += bytes.len() as u64;
        progress(bytes.len() as u64);
        if let Some(want) = counterpart[index] {
            let t = &file.tensors()[index];
            let want = &want[t.block_range(block)];
            let width = t.dtype.byte_width().unwrap_or(1);
            mismatched[index] += want
                .chunks(width)
                .zip(bytes.chunks(width))
                .filter(|(a, b)| a != b)
                .count() as u64;
        }
        Ok(())
    })?;
    let tensors: Vec<TensorCheck> = file
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (identical, bad) = match (original, counterpart[i]) {
                (None, _) => (None, 0),
                (Some(_), None) => (Some(false), t.elements().unwrap_or(0)),
                (Some(_), Some(_)) => (Some(mismatched[i] == 0), mismatched[i]),
            };
            TensorCheck {
                name: t.name.clone(),
                bytes: t.byte_len(),
                identical,
                mismatched_elements: bad,
            }
        })
        .collect();
    let header_identical =
        original.map(|o| o.header_json() == file.header().source_header.as_slice());
    let all_identical = original.map(|o| {
        header_identical == Some(true)
            && o.tensors.len() == tensors.len()
            && tensors.iter().all(|t| t.identical == Some(true))
    });
    Ok(VerifyReport {
        tensors,
        decoded_bytes: decoded,
        header_identical,
        all_identical,
    })
}
