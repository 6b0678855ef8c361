//! The `.nzt` header: a pure parser from bytes to a validated `Header`, and the serializer the writer uses.
//! Every rule a reader must check (format-spec/nzt.md, "Reader validation") is checked here, before any
//! allocation that a hostile length could inflate.

use std::collections::HashSet;

use super::{
    align_up, checksum, BlockMode, Codec, BLOCK_ALIGN, BLOCK_ENTRY_LEN, CODEBOOK_VERSION_MINOR,
    FILE_HEADER_LEN, LOSSY_VERSION_MINOR, MAGIC, MAX_BLOCK_BYTES, MAX_RANK, MIN_TENSOR_ENTRY_LEN,
    TENSOR_ALIGN, VERSION_MAJOR, VERSION_MINOR,
};
use crate::codec::codebook_format::CodebookParams;
use crate::codec::lossy::LossyParams;
use crate::codec::split::SplitParams;
use crate::dtype::Dtype;
use crate::error::{NzError, Result};
use crate::source::parse_header_json;

/// One block of a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    pub stored_len: u32,
    pub mode: BlockMode,
    pub checksum: u64,
    /// Absolute file offset of the payload (derived from the lengths; not stored).
    pub offset: u64,
}

/// One tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub codec: Codec,
    pub shape: Vec<u64>,
    /// Units per block: bytes for `stored`, elements for `float_split`.
    pub block_units: u32,
    pub params: Vec<u8>,
    pub blocks: Vec<BlockEntry>,
}

impl TensorEntry {
    /// Number of elements (1 for a scalar); None on overflow.
    pub fn elements(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// Decoded byte length.
    pub fn byte_len(&self) -> u64 {
        self.elements()
            .and_then(|e| self.dtype.byte_len(e))
            .unwrap_or(0)
    }

    /// Bytes per unit.
    pub fn unit_bytes(&self) -> u64 {
        match self.codec {
            Codec::Stored => 1,
            Codec::FloatSplit | Codec::Lossy | Codec::Codebook => {
                self.dtype.byte_width().unwrap_or(1) as u64
            }
        }
    }

    /// Decoded byte range of block `k` within the tensor.
    pub fn block_range(&self, k: usize) -> std::ops::Range<usize> {
        let block_bytes = self.block_units as u64 * self.unit_bytes();
        let start = k as u64 * block_bytes;
        let end = (start + block_bytes).min(self.byte_len());
        start as usize..end as usize
    }

    /// Total stored bytes of the blocks.
    pub fn stored_len(&self) -> u64 {
        self.blocks.iter().map(|b| b.stored_len as u64).sum()
    }
}

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub struct Header {
    pub version_minor: u16,
    /// The original safetensors JSON header, verbatim.
    pub source_header: Vec<u8>,
    pub tensors: Vec<TensorEntry>,
    pub header_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
}

/// Bounds-checked little-endian reads over the header section.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = (self.pos as u64).checked_add(n);
        match end.and_then(|e| self.bytes.get(self.pos..usize::try_from(e).ok()?)) {
            Some(slice) => {
                self.pos += n as usize;
                Ok(slice)
            }
            None => Err(NzError::Truncated {
                what: format!("header: {what}"),
                start: self.base + self.pos as u64,
                end: (self.base + self.pos as u64).saturating_add(n),
                available: self.base + self.bytes.len() as u64,
            }),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }
}

fn malformed(what: impl Into<String>) -> NzError {
    NzError::malformed(what)
}

fn limit(what: impl Into<String>, value: u64, limit: u64) -> NzError {
    NzError::LimitExceeded {
        what: what.into(),
        value,
        limit,
    }
}

/// Parses and validates the header of a whole `.nzt` file. Block payloads are not read (their checksums are
/// checked when they are decoded), but every block's position is checked to lie inside the file.
pub fn parse(file: &[u8]) -> Result<Header> {
    let file_len = file.len() as u64;
    let fixed = file.get(..FILE_HEADER_LEN).ok_or_else(|| {
        if file.len() >= 8 && file[..8] != MAGIC {
            NzError::BadMagic {
                found: file[..8].to_vec(),
            }
        } else {
            NzError::Truncated {
                what: "file header".into(),
                start: 0,
                end: FILE_HEADER_LEN as u64,
                available: file_len,
            }
        }
    })?;
    if fixed[..8] != MAGIC {
        return Err(NzError::BadMagic {
            found: fixed[..8].to_vec(),
        });
    }
    let mut c = Cursor {
        bytes: fixed,
        pos: 8,
        base: 0,
    };
    let major = c.u16("version")?;
    let minor = c.u16("version")?;
    let flags = c.u32("flags")?;
    if major != VERSION_MAJOR || minor > VERSION_MINOR || flags != 0 {
        return Err(NzError::UnsupportedVersion {
            major,
            minor,
            flags,
        });
    }
    let header_len = c.u64("header_len")?;
    let header_xxh3 = c.u64("header checksum")?;
    let data_offset = c.u64("data_offset")?;
    let data_len = c.u64("data_len")?;

    let header_end = (FILE_HEADER_LEN as u64)
        .checked_add(header_len)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| NzError::Truncated {
            what: "header section".into(),
            start: FILE_HEADER_LEN as u64,
            end: (FILE_HEADER_LEN as u64).saturating_add(header_len),
            available: file_len,
        })?;
    if data_offset % TENSOR_ALIGN != 0 || data_offset < header_end {
        return Err(malformed(format!(
            "data_offset {data_offset} must be a multiple of {TENSOR_ALIGN} at or after the header end {header_end}"
        )));
    }
    if data_offset.checked_add(data_len) != Some(file_len) {
        return Err(NzError::Truncated {
            what: "data section".into(),
            start: data_offset,
            end: data_offset.saturating_add(data_len),
            available: file_len,
        });
    }
    let section = &file[FILE_HEADER_LEN..header_end as usize];
    let computed = checksum(section);
    if computed != header_xxh3 {
        return Err(NzError::ChecksumMismatch {
            what: "header".into(),
            stored: header_xxh3,
            computed,
        });
    }

    let mut c = Cursor {
        bytes: section,
        pos: 0,
        base: FILE_HEADER_LEN as u64,
    };
    let source_len = c.u64("source header length")?;
    let source_header = c.take(source_len, "source header")?.to_vec();
    let tensor_count = c.u32("tensor count")? as u64;
    let max_tensors = c.remaining() / MIN_TENSOR_ENTRY_LEN;
    if tensor_count > max_tensors {
        return Err(limit(
            "tensor count (for this header size)",
            tensor_count,
            max_tensors,
        ));
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::new();
    for index in 0..tensor_count {
        let entry = parse_tensor(&mut c, index, minor)?;
        if !names.insert(entry.name.clone()) {
            return Err(malformed(format!("duplicate tensor name '{}'", entry.name)));
        }
        tensors.push(entry);
    }
    if c.remaining() != 0 {
        return Err(malformed(format!(
            "{} unexpected bytes after the last tensor entry",
            c.remaining()
        )));
    }
    // The minor version is the lowest that has every codec the file uses, so that no flipped version bit
    // passes unnoticed.
    let needed = version_minor_for(&tensors);
    if minor != needed {
        return Err(malformed(format!(
            "version 1.{minor} declared, but the tensors need exactly 1.{needed}"
        )));
    }
    check_against_source(&source_header, &tensors)?;

    let end = assign_offsets(&mut tensors, data_offset)?;
    if end != data_len {
        return Err(malformed(format!(
            "blocks end at data offset {end} but data_len is {data_len}"
        )));
    }
    Ok(Header {
        version_minor: minor,
        source_header,
        tensors,
        header_len,
        data_offset,
        data_len,
    })
}

fn parse_tensor(c: &mut Cursor<'_>, index: u64, version_minor: u16) -> Result<TensorEntry> {
    let name_len = c.u16("tensor name length")? as u64;
    let name_bytes = c.take(name_len, "tensor name")?;
    let name = String::from_utf8(name_bytes.to_vec())
        .map_err(|_| malformed(format!("tensor {index}: name is not UTF-8")))?;
    let dtype = Dtype::from_id(c.u8("dtype")?)?;
    let codec_id = c.u8("codec")?;
    let codec = Codec::from_id(codec_id)
        .filter(|&c| match c {
            Codec::Lossy => version_minor >= LOSSY_VERSION_MINOR,
            Codec::Codebook => version_minor >= CODEBOOK_VERSION_MINOR,
            _ => true,
        })
        .ok_or_else(|| {
            malformed(format!(
                "tensor '{name}': unknown codec id {codec_id} in a version 1.{version_minor} file"
            ))
        })?;
    let rank = c.u8("rank")? as usize;
    if rank > MAX_RANK {
        return Err(limit(
            format!("rank of '{name}'"),
            rank as u64,
            MAX_RANK as u64,
        ));
    }
    let mut shape = Vec::with_capacity(rank);
    for _ in 0..rank {
        shape.push(c.u64("shape")?);
    }
    let block_units = c.u32("block_units")?;
    let params_len = c.u32("params length")? as u64;
    let params = c.take(params_len, "codec params")?.to_vec();
    let block_count = c.u32("block count")? as u64;

    let elements = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| limit(format!("element count of '{name}'"), u64::MAX, u64::MAX))?;
    let byte_len = dtype.byte_len(elements).ok_or_else(|| {
        malformed(format!(
            "'{name}': {elements} {dtype} elements are not a whole number of bytes"
        ))
    })?;
    let (units, unit_bytes) = match codec {
        Codec::Stored => {
            if !params.is_empty() {
                return Err(malformed(format!(
                    "'{name}': stored tensors take no params"
                )));
            }
            (byte_len, 1)
        }
        Codec::FloatSplit => {
            if !dtype.is_splittable_float() {
                return Err(malformed(format!(
                    "'{name}': float_split does not apply to {dtype}"
                )));
            }
            SplitParams::parse(&params, dtype)
                .map_err(|e| malformed(format!("'{name}': params: {}", e.0)))?;
            (elements, dtype.byte_width().unwrap_or(1) as u64)
        }
        Codec::Lossy => {
            LossyParams::parse(&params, dtype)
                .map_err(|e| malformed(format!("'{name}': lossy params: {}", e.0)))?;
            (elements, dtype.byte_width().unwrap_or(1) as u64)
        }
        Codec::Codebook => {
            CodebookParams::parse(&params, dtype, &shape)
                .map_err(|e| malformed(format!("'{name}': codebook params: {}", e.0)))?;
            // The params parser checked the shape: rank >= 1 and no zero dimension.
            let cols = shape.last().copied().unwrap_or(1);
            if !(block_units as u64).is_multiple_of(cols) {
                return Err(malformed(format!(
                    "'{name}': codebook block_units {block_units} is not a multiple of the row length {cols}"
                )));
            }
            (elements, dtype.byte_width().unwrap_or(1) as u64)
        }
    };
    if block_units == 0 {
        return Err(malformed(format!("'{name}': block_units is 0")));
    }
    let block_bytes = block_units as u64 * unit_bytes;
    if block_bytes > MAX_BLOCK_BYTES {
        return Err(limit(
            format!("block size of '{name}' in bytes"),
            block_bytes,
            MAX_BLOCK_BYTES,
        ));
    }
    let expected_blocks = units.div_ceil(block_units as u64);
    if block_count != expected_blocks {
        return Err(malformed(format!(
            "'{name}': {block_count} blocks, but {units} units in blocks of {block_units} need {expected_blocks}"
        )));
    }
    if block_count * BLOCK_ENTRY_LEN > c.remaining() {
        return Err(NzError::Truncated {
            what: format!("header: block index of '{name}'"),
            start: c.base + c.pos as u64,
            end: c.base + c.pos as u64 + block_count * BLOCK_ENTRY_LEN,
            available: c.base + c.bytes.len() as u64,
        });
    }
    let mut blocks = Vec::with_capacity(block_count as usize);
    for k in 0..block_count {
        let stored_len = c.u32("block length")?;
        let mode_id = c.u8("block mode")?;
        let reserved = c.take(3, "block reserved bytes")?;
        let checksum = c.u64("block checksum")?;
        let mode = BlockMode::from_id(mode_id)
            .ok_or_else(|| malformed(format!("'{name}' block {k}: unknown mode {mode_id}")))?;
        if reserved != [0, 0, 0] {
            return Err(malformed(format!(
                "'{name}' block {k}: reserved bytes are not zero"
            )));
        }
        let decoded = (block_units as u64).min(units - k * block_units as u64) * unit_bytes;
        match mode {
            BlockMode::Raw if stored_len as u64 != decoded => {
                return Err(malformed(format!(
                    "'{name}' block {k}: raw block of {stored_len} bytes, expected {decoded}"
                )))
            }
            BlockMode::Split | BlockMode::SplitLocal if codec != Codec::FloatSplit => {
                return Err(malformed(format!(
                    "'{name}' block {k}: split block in a {} tensor",
                    codec.name()
                )))
            }
            BlockMode::Lossy if codec != Codec::Lossy => {
                return Err(malformed(format!(
                    "'{name}' block {k}: lossy block in a {} tensor",
                    codec.name()
                )))
            }
            BlockMode::Codebook if codec != Codec::Codebook => {
                return Err(malformed(format!(
                    "'{name}' block {k}: codebook block in a {} tensor",
                    codec.name()
                )))
            }
            _ => {}
        }
        blocks.push(BlockEntry {
            stored_len,
            mode,
            checksum,
            offset: 0,
        });
    }
    Ok(TensorEntry {
        name,
        dtype,
        codec,
        shape,
        block_units,
        params,
        blocks,
    })
}

/// The source header must describe the same tensors, in the same order, as the tensor table.
fn check_against_source(source_header: &[u8], tensors: &[TensorEntry]) -> Result<()> {
    let source =
        parse_header_json(source_header).map_err(|e| malformed(format!("source header: {e}")))?;
    if source.len() != tensors.len() {
        return Err(malformed(format!(
            "source header lists {} tensors, the table {}",
            source.len(),
            tensors.len()
        )));
    }
    for (s, t) in source.iter().zip(tensors) {
        if s.name != t.name
            || s.dtype != t.dtype
            || s.shape != t.shape
            || s.end - s.start != t.byte_len()
        {
            return Err(malformed(format!(
                "tensor table entry '{}' ({} {:?}) does not match the source header's '{}' ({} {:?})",
                t.name, t.dtype, t.shape, s.name, s.dtype, s.shape
            )));
        }
    }
    Ok(())
}

/// Places every block in the data section (spec: "Data-section placement"); returns the end of the last block.
pub fn assign_offsets(tensors: &mut [TensorEntry], data_offset: u64) -> Result<u64> {
    let overflow = || malformed("block offsets overflow");
    let mut end = 0u64;
    for t in tensors.iter_mut() {
        if t.blocks.is_empty() {
            continue;
        }
        let mut start = align_up(end, TENSOR_ALIGN).ok_or_else(overflow)?;
        for b in t.blocks.iter_mut() {
            b.offset = data_offset.checked_add(start).ok_or_else(overflow)?;
            end = start
                .checked_add(b.stored_len as u64)
                .ok_or_else(overflow)?;
            start = align_up(end, BLOCK_ALIGN).ok_or_else(overflow)?;
        }
    }
    Ok(end)
}

/// Serializes the header section (everything after the fixed file header).
pub fn write_section(source_header: &[u8], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(source_header.len() as u64).to_le_bytes());
    out.extend_from_slice(source_header);
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        out.extend_from_slice(&(t.name.len() as u16).to_le_bytes());
        out.extend_from_slice(t.name.as_bytes());
        out.push(t.dtype.id());
        out.push(t.codec as u8);
        out.push(t.shape.len() as u8);
        for &d in &t.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.block_units.to_le_bytes());
        out.extend_from_slice(&(t.params.len() as u32).to_le_bytes());
        out.extend_from_slice(&t.params);
        out.extend_from_slice(&(t.blocks.len() as u32).to_le_bytes());
        for b in &t.blocks {
            out.extend_from_slice(&b.stored_len.to_le_bytes());
            out.push(b.mode as u8);
            out.extend_from_slice(&[0, 0, 0]);
            out.extend_from_slice(&b.checksum.to_le_bytes());
        }
    }
    out
}

/// Length of the header section `write_section` would produce, computable before the blocks are encoded.
pub fn section_len(source_header: &[u8], tensors: &[TensorEntry]) -> u64 {
    let entries: u64 = tensors
        .iter()
        .map(|t| {
            2 + t.name.len() as u64
                + 3
                + 8 * t.shape.len() as u64
                + 4
                + 4
                + t.params.len() as u64
                + 4
                + BLOCK_ENTRY_LEN * t.blocks.len() as u64
        })
        .sum();
    8 + source_header.len() as u64 + 4 + entries
}

/// Where the data section starts (the first tensor's offset) for this header section: after the fixed
/// header and the section, aligned to `TENSOR_ALIGN`.
pub fn data_offset(source_header: &[u8], tensors: &[TensorEntry]) -> u64 {
    let header = FILE_HEADER_LEN as u64 + section_len(source_header, tensors);
    align_up(header, TENSOR_ALIGN).expect("a header section fits u64")
}

/// The fixed 48-byte file header for a header section and data placement.
/// The minor version a file with these tensors is written as: the lowest that has every codec they use.
pub fn version_minor_for(tensors: &[TensorEntry]) -> u16 {
    if tensors.iter().any(|t| t.codec == Codec::Codebook) {
        CODEBOOK_VERSION_MINOR
    } else if tensors.iter().any(|t| t.codec == Codec::Lossy) {
        LOSSY_VERSION_MINOR
    } else {
        0
    }
}

pub fn file_header(
    section: &[u8],
    version_minor: u16,
    data_offset: u64,
    data_len: u64,
) -> [u8; FILE_HEADER_LEN] {
    let mut out = [0u8; FILE_HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
    out[10..12].copy_from_slice(&version_minor.to_le_bytes());
    out[12..16].copy_from_slice(&0u32.to_le_bytes());
    out[16..24].copy_from_slice(&(section.len() as u64).to_le_bytes());
    out[24..32].copy_from_slice(&checksum(section).to_le_bytes());
    out[32..40].copy_from_slice(&data_offset.to_le_bytes());
    out[40..48].copy_from_slice(&data_len.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tensor entry written field by field, so that any field can hold a value the types would forbid.
    struct RawEntry {
        name: Vec<u8>,
        dtype: u8,
        codec: u8,
        shape: Vec<u64>,
        block_units: u32,
        blocks: Vec<(u32, u8)>,
    }

    fn u8_tensor(name: &str, n: u64) -> RawEntry {
        RawEntry {
            name: name.into(),
            dtype: 1,
            codec: 0,
            shape: vec![n],
            block_units: 4,
            blocks: blocks_for(n, 4),
        }
    }

    fn blocks_for(n: u64, per: u64) -> Vec<(u32, u8)> {
        (0..n.div_ceil(per))
            .map(|k| ((per.min(n - k * per)) as u32, 0))
            .collect()
    }

    fn source_for(entries: &[(&str, u64)]) -> String {
        let mut offset = 0;
        let parts: Vec<String> = entries
            .iter()
            .map(|(name, n)| {
                let s = format!(
                    r#""{name}":{{"dtype":"U8","shape":[{n}],"data_offsets":[{offset},{}]}}"#,
                    offset + n
                );
                offset += n;
                s
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    /// A whole file: fixed header (checksum correct), header section, and raw blocks of 0xAB bytes.
    fn file(source: &str, entries: &[RawEntry], tensor_count: Option<u32>) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&(source.len() as u64).to_le_bytes());
        s.extend_from_slice(source.as_bytes());
        s.extend_from_slice(&tensor_count.unwrap_or(entries.len() as u32).to_le_bytes());
        let mut data = Vec::new();
        for e in entries {
            s.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            s.extend_from_slice(&e.name);
            s.extend_from_slice(&[e.dtype, e.codec, e.shape.len() as u8]);
            for d in &e.shape {
                s.extend_from_slice(&d.to_le_bytes());
            }
            s.extend_from_slice(&e.block_units.to_le_bytes());
            s.extend_from_slice(&0u32.to_le_bytes());
            s.extend_from_slice(&(e.blocks.len() as u32).to_le_bytes());
            if !e.blocks.is_empty() {
                data.resize(
                    align_up(data.len() as u64, TENSOR_ALIGN).unwrap() as usize,
                    0,
                );
            }
            for (k, &(len, mode)) in e.blocks.iter().enumerate() {
                if k > 0 {
                    data.resize(
                        align_up(data.len() as u64, BLOCK_ALIGN).unwrap() as usize,
                        0,
                    );
                }
                let payload = vec![0xAB; len as usize];
                s.extend_from_slice(&len.to_le_bytes());
                s.extend_from_slice(&[mode, 0, 0, 0]);
                s.extend_from_slice(&checksum(&payload).to_le_bytes());
                data.extend_from_slice(&payload);
            }
        }
        let data_offset = align_up((FILE_HEADER_LEN + s.len()) as u64, TENSOR_ALIGN).unwrap();
        let mut out = file_header(&s, 0, data_offset, data.len() as u64).to_vec();
        out.extend_from_slice(&s);
        out.resize(data_offset as usize, 0);
        out.extend_from_slice(&data);
        out
    }

    fn err(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(_) => panic!("parsed"),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn a_valid_file_parses_with_derived_offsets() {
        let f = file(
            &source_for(&[("a", 10), ("b", 3)]),
            &[u8_tensor("a", 10), u8_tensor("b", 3)],
            None,
        );
        let h = parse(&f).unwrap();
        assert_eq!(h.tensors.len(), 2);
        let offsets: Vec<u64> = h
            .tensors
            .iter()
            .flat_map(|t| t.blocks.iter().map(|b| b.offset - h.data_offset))
            .collect();
        assert_eq!(offsets, vec![0, 16, 32, 64]);
    }

    #[test]
    fn fixed_header_errors() {
        let good = file(&source_for(&[("a", 10)]), &[u8_tensor("a", 10)], None);
        assert!(
            err(&good[..20]).starts_with("BadMagic") || err(&good[..20]).starts_with("Truncated")
        );
        assert!(err(b"GGUF\0\0\0\0 more bytes than the magic").starts_with("BadMagic"));
        for (pos, value) in [(8, 2u8), (10, VERSION_MINOR as u8 + 1), (12, 1)] {
            let mut f = good.clone();
            f[pos] = value;
            assert!(err(&f).starts_with("UnsupportedVersion"), "byte {pos}");
        }
        let mut f = good.clone();
        f[24] ^= 1; // header checksum
        assert!(err(&f).starts_with("ChecksumMismatch"));
        let mut f = good.clone();
        f[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // header_len past the end
        assert!(err(&f).starts_with("Truncated"));
        let mut f = good.clone();
        f.push(0); // data_len no longer reaches the end
        assert!(err(&f).starts_with("Truncated"));
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        let src = source_for(&[("a", 10)]);
        assert!(
            err(&file(&src, &[u8_tensor("a", 10)], Some(u32::MAX))).starts_with("LimitExceeded")
        );
        let mut deep = u8_tensor("a", 10);
        deep.shape = vec![1; 33];
        assert!(err(&file(&src, &[deep], None)).starts_with("LimitExceeded"));
        let mut huge = u8_tensor("a", 10);
        huge.shape = vec![u64::MAX, 3];
        assert!(err(&file(&src, &[huge], None)).starts_with("LimitExceeded"));
        let mut big_block = u8_tensor("a", 10);
        big_block.block_units = (MAX_BLOCK_BYTES + 1) as u32;
        assert!(err(&file(&src, &[big_block], None)).starts_with("LimitExceeded"));
        let mut many = u8_tensor("a", 10);
        many.shape = vec![1 << 40];
        many.blocks = vec![];
        // 2^38 blocks declared by the shape, none present: refused as a count mismatch, nothing allocated.
        assert!(err(&file(&src, &[many], None)).contains("blocks"));
    }

    #[test]
    fn bad_ids_names_and_counts() {
        let src = source_for(&[("a", 10)]);
        let with = |f: &dyn Fn(&mut RawEntry)| {
            let mut e = u8_tensor("a", 10);
            f(&mut e);
            err(&file(&src, &[e], None))
        };
        assert!(with(&|e| e.dtype = 200).starts_with("UnknownDtype"));
        assert!(with(&|e| e.codec = 9).contains("unknown codec"));
        assert!(with(&|e| e.blocks[0].1 = 7).contains("unknown mode"));
        assert!(with(&|e| e.blocks[0].1 = 2).contains("split block in a stored tensor"));
        // The lossy codec and its block mode exist from version 1.1 on, and only for BF16, F16 and F32.
        assert!(with(&|e| e.codec = 2).contains("unknown codec id 2 in a version 1.0 file"));
        assert!(with(&|e| e.blocks[0].1 = 4).contains("lossy block in a stored tensor"));
        let mut lossy_u8 = u8_tensor("a", 10);
        lossy_u8.codec = 2;
        let mut v11 = file(&src, &[lossy_u8], None);
        v11[10] = 1; // version_minor; the header checksum covers the header section only
        let e = err(&v11);
        assert!(e.contains("lossy does not apply to U8"), "{e}");
        // A file declares exactly the version its codecs need.
        let mut plain_v11 = file(&src, &[u8_tensor("a", 10)], None);
        plain_v11[10] = 1;
        assert!(err(&plain_v11).contains("version 1.1 declared"));
        // The codebook codec and its block mode exist from version 1.2 on, only for BF16, F16 and F32.
        assert!(with(&|e| e.codec = 3).contains("unknown codec id 3 in a version 1.0 file"));
        assert!(with(&|e| e.blocks[0].1 = 5).contains("codebook block in a stored tensor"));
        let mut codebook_u8 = u8_tensor("a", 10);
        codebook_u8.codec = 3;
        let mut v12 = file(&src, &[codebook_u8], None);
        v12[10] = 1;
        assert!(err(&v12).contains("unknown codec id 3 in a version 1.1 file"));
        v12[10] = 2;
        let e = err(&v12);
        assert!(e.contains("codebook does not apply to U8"), "{e}");
        let mut plain_v12 = file(&src, &[u8_tensor("a", 10)], None);
        plain_v12[10] = 2;
        assert!(err(&plain_v12).contains("version 1.2 declared"));
        assert!(with(&|e| e.name = vec![0xff, 0xfe]).contains("not UTF-8"));
        assert!(with(&|e| e.block_units = 0).contains("block_units is 0"));
        assert!(with(&|e| {
            e.blocks.pop();
        })
        .contains("blocks"));
        assert!(with(&|e| e.blocks[0].0 = 3).contains("raw block of 3 bytes"));
        assert!(with(&|e| e.name = b"b".to_vec()).contains("does not match the source header"));
        let dup = source_for(&[("a", 10), ("b", 3)]);
        let e = err(&file(&dup, &[u8_tensor("a", 10), u8_tensor("a", 3)], None));
        assert!(e.contains("duplicate tensor name"), "{e}");
    }
}
