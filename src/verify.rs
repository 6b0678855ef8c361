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
    let mut tensors = Vec::new();
    let mut decoded = 0u64;
    file.for_each_tensor(|index, bytes| {
        let t = &file.tensors()[index];
        decoded += bytes.len() as u64;
        progress(bytes.len() as u64);
        let (identical, mismatched) = match original {
            None => (None, 0),
            Some(orig) => match orig.tensors.iter().find(|s| s.name == t.name) {
                None => (Some(false), t.elements().unwrap_or(0)),
                Some(s) => {
                    let want = orig.data(s);
                    if want.len() != bytes.len() {
                        (Some(false), t.elements().unwrap_or(0))
                    } else {
                        let width = t.dtype.byte_width().unwrap_or(1);
                        let bad = want
                            .chunks(width)
                            .zip(bytes.chunks(width))
                            .filter(|(a, b)| a != b)
                            .count() as u64;
                        (Some(bad == 0), bad)
                    }
                }
            },
        };
        tensors.push(TensorCheck {
            name: t.name.clone(),
            bytes: bytes.len() as u64,
            identical,
            mismatched_elements: mismatched,
        });
        Ok(())
    })?;
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
