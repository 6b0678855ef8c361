//! Reading safetensors inputs: the header (kept verbatim for byte-exact reconstruction) and each tensor's bytes.

use std::path::Path;

use crate::dtype::Dtype;
use crate::error::{NzError, Result};
use crate::mmap::{map_file, Bytes};

/// One tensor as a safetensors header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range in the data area.
    pub start: u64,
    pub end: u64,
}

impl SourceTensor {
    /// Number of elements (1 for a scalar).
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

fn invalid(what: impl Into<String>) -> NzError {
    NzError::InvalidSafetensors { what: what.into() }
}

/// Parses a safetensors JSON header. Tensors come back in data order (ties, which only empty tensors can
/// have, broken by name), and their offsets are checked to be contiguous from 0 with the right lengths.
pub fn parse_header_json(json: &[u8]) -> Result<Vec<SourceTensor>> {
    if let Some(key) = duplicate_top_level_key(json) {
        return Err(invalid(format!("header has the key '{key}' twice")));
    }
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(json).map_err(|e| invalid(format!("header: {e}")))?;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = Dtype::from_name(&format!("{:?}", info.dtype))?;
        tensors.push(SourceTensor {
            name,
            dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            start: info.data_offsets.0 as u64,
            end: info.data_offsets.1 as u64,
        });
    }
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    Ok(tensors)
}

/// A safetensors file, mapped.
pub struct SafetensorsFile {
    bytes: Bytes,
    header_len: usize,
    pub tensors: Vec<SourceTensor>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bytes = map_file(path)?;
        Self::from_bytes(bytes).map_err(|e| match e {
            NzError::InvalidSafetensors { what } => NzError::InvalidSafetensors {
                what: format!("{}: {what}", path.display()),
            },
            other => other,
        })
    }

    pub fn from_bytes(bytes: Bytes) -> Result<SafetensorsFile> {
        let (header_len, _) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| invalid(format!("{e:?}")))?;
        let tensors = parse_header_json(&bytes[8..8 + header_len])?;
        Ok(SafetensorsFile {
            bytes,
            header_len,
            tensors,
        })
    }

    /// The JSON header, verbatim.
    pub fn header_json(&self) -> &[u8] {
        &self.bytes[8..8 + self.header_len]
    }

    /// The `__metadata__` map, if any.
    pub fn metadata(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        let value: serde_json::Value = serde_json::from_slice(self.header_json()).ok()?;
        value.get("__metadata__")?.as_object().cloned()
    }

    /// A tensor's bytes.
    pub fn data(&self, tensor: &SourceTensor) -> &[u8] {
        let base = 8 + self.header_len;
        &self.bytes[base + tensor.start as usize..base + tensor.end as usize]
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Elements of every tensor together: the weights a bits-per-weight figure divides by.
    pub fn elements(&self) -> u64 {
        self.tensors.iter().map(SourceTensor::elements).sum()
    }
}

/// The first top-level key of a JSON object that appears twice (safetensors would silently keep the last).
fn duplicate_top_level_key(json: &[u8]) -> Option<String> {
    struct Keys(Option<String>);
    impl<'de> serde::de::Visitor<'de> for &mut Keys {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if self.0.is_none() && !seen.insert(key.clone()) {
                    self.0 = Some(key);
                }
            }
            Ok(())
        }
    }
    let mut keys = Keys(None);
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_map(&mut de, &mut keys).ok()?;
    keys.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_rejected() {
        let t = r#""a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        let once = format!("{{{t}}}");
        let twice = format!("{{{t},{t}}}");
        assert!(parse_header_json(once.as_bytes()).is_ok());
        let err = parse_header_json(twice.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("'a' twice"), "{err}");
    }
}
