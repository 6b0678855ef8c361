//! Opens arbitrary bytes as a `.nzt` file and, if the header is accepted, decodes every tensor and every block
//! on its own, with block checksums on and off, and rebuilds the safetensors file into memory.
//!
//! Mutated files almost never keep a valid header checksum (R8), so each input is also tried with the header
//! checksum recomputed and `data_len` set to what the file length implies (R7); that variant is what lets the
//! fuzzer reach the tensor table, the frequency tables and the source-header checks. Block checksums (R33) are
//! not rewritten: decoding with `verify_checksums: false` reaches the same block decoders (zstd, raw, split,
//! split_local: rANS, gamma tables, bit planes), and the header re-serialization assertion below shows that
//! a file with rewritten block checksums would parse to the same table.
//!
//! Besides "no panic", the target asserts what must hold for every file the reader accepts:
//! - `write_section` reproduces the header section byte for byte (the parser accepts nothing the writer
//!   cannot express);
//! - decoding a tensor succeeds exactly when each of its blocks decodes on its own, to the same bytes;
//! - a decode with checksums on that succeeds gives the same bytes as one with checksums off;
//! - `write_safetensors` output, when it succeeds, is a safetensors file neuzip opens, with the stored
//!   source header and the decoded tensor bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

use neuzip::format::header::{self, TensorEntry};
use neuzip::format::{checksum, FILE_HEADER_LEN};
use neuzip::mmap::Bytes;
use neuzip::source::SafetensorsFile;
use neuzip::{DecodeOptions, NztFile};

/// Tensors larger than this are not decoded (a tiny file can declare a huge tensor of zstd or
/// single-symbol rANS blocks).
const MAX_TENSOR_BYTES: u64 = 64 << 20;
/// Decoded bytes per input, over all tensors and both checksum settings.
const MAX_INPUT_BYTES: u64 = 256 << 20;

fuzz_target!(|data: &[u8]| {
    exercise(data);
    if let Some(repaired) = repair_file_header(data) {
        if repaired != data {
            exercise(&repaired);
        }
    }
});

/// The input with `data_len` and `header_xxh3` made consistent with the file length and the header section,
/// or None where the fixed header does not say where the section ends.
fn repair_file_header(data: &[u8]) -> Option<Vec<u8>> {
    let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    if data.len() < FILE_HEADER_LEN {
        return None;
    }
    let header_len = usize::try_from(u64_at(16)).ok()?;
    let section_end = FILE_HEADER_LEN.checked_add(header_len)?;
    let section = data.get(FILE_HEADER_LEN..section_end)?;
    let mut out = data.to_vec();
    out[24..32].copy_from_slice(&checksum(section).to_le_bytes());
    if let Some(data_len) = (data.len() as u64).checked_sub(u64_at(32)) {
        out[40..48].copy_from_slice(&data_len.to_le_bytes());
    }
    Some(out)
}

fn open(data: &[u8], options: DecodeOptions) -> Option<NztFile> {
    NztFile::from_bytes(Bytes::Owned(data.to_vec()))
        .ok()
        .map(|f| f.with_options(options))
}

/// Decoded tensors of one pass: None where the tensor was skipped for size, else the decode result.
type Decoded = Vec<Option<Result<Vec<u8>, String>>>;

fn exercise(data: &[u8]) {
    let Some(file) = open(data, DecodeOptions::default()) else {
        return;
    };
    let h = file.header();
    let section = &data[FILE_HEADER_LEN..FILE_HEADER_LEN + h.header_len as usize];
    assert_eq!(
        header::write_section(&h.source_header, &h.tensors),
        section,
        "the header section does not re-serialize to itself"
    );
    boundary_checks(&file);

    let mut budget = MAX_INPUT_BYTES;
    let verified = decode_all(&file, &mut budget);
    let unverified_file = open(
        data,
        DecodeOptions {
            verify_checksums: false,
        },
    )
    .expect("opened once");
    let unverified = decode_all(&unverified_file, &mut budget);
    for (i, (v, u)) in verified.iter().zip(&unverified).enumerate() {
        if let (Some(Ok(v)), Some(u)) = (v, u) {
            assert_eq!(
                Some(v),
                u.as_ref().ok(),
                "tensor {i}: checksums on decoded, checksums off gave something else"
            );
        }
    }

    // Rebuilding decodes every tensor again: only where none was skipped and the budget allows.
    let total = file
        .tensors()
        .iter()
        .map(TensorEntry::byte_len)
        .fold(0u64, u64::saturating_add);
    let none_skipped = verified.iter().chain(&unverified).all(Option::is_some);
    if none_skipped && total.saturating_mul(2) <= budget {
        rebuild(&file, &verified);
        rebuild(&unverified_file, &unverified);
    }
}

/// Asking for what does not exist, or into a buffer of the wrong size, is an error.
fn boundary_checks(file: &NztFile) {
    let count = file.tensors().len();
    assert!(file.decode_tensor_into(count, &mut []).is_err());
    assert!(file.decode_block_into(count, 0, &mut []).is_err());
    for (i, t) in file.tensors().iter().enumerate() {
        assert!(file.decode_block_into(i, t.blocks.len(), &mut []).is_err());
        if t.byte_len() > 0 {
            assert!(file.decode_tensor_into(i, &mut []).is_err());
        }
        if let Some(k) = (0..t.blocks.len()).find(|&k| t.block_range(k).len() <= 4096) {
            let mut wrong = vec![0u8; t.block_range(k).len() + 1];
            assert!(file.decode_block_into(i, k, &mut wrong).is_err());
        }
        // Names are unique (R14), so the lookup finds this tensor.
        assert_eq!(file.tensor_index(&t.name).ok(), Some(i));
    }
}

fn decode_all(file: &NztFile, budget: &mut u64) -> Decoded {
    let mut results = Vec::new();
    for (i, t) in file.tensors().iter().enumerate() {
        let len = t.byte_len();
        if len > MAX_TENSOR_BYTES || len.saturating_mul(2) > *budget {
            results.push(None);
            continue;
        }
        *budget -= 2 * len;
        let mut whole = vec![0u8; len as usize];
        let tensor = file
            .decode_tensor_into(i, &mut whole)
            .map_err(|e| e.to_string());
        let mut any_block_failed = false;
        for k in 0..t.blocks.len() {
            let range = t.block_range(k);
            let mut block = vec![0u8; range.len()];
            match file.decode_block_into(i, k, &mut block) {
                Ok(()) => {
                    if tensor.is_ok() {
                        assert!(
                            block == whole[range],
                            "tensor {i} block {k}: decoded alone, it differs from the tensor decode"
                        );
                    }
                }
                Err(e) => {
                    assert!(
                        tensor.is_err(),
                        "tensor {i} decoded, but its block {k} alone fails: {e}"
                    );
                    any_block_failed = true;
                }
            }
        }
        if let Err(e) = &tensor {
            assert!(
                any_block_failed,
                "tensor {i} failed ({e}), but every block decodes on its own"
            );
        }
        results.push(Some(tensor.map(|()| whole)));
    }
    results
}

/// `write_safetensors` into memory; when it succeeds the output must be the stored source header followed by
/// the tensors, and open as a safetensors file.
fn rebuild(file: &NztFile, decoded: &Decoded) {
    let mut out = Vec::new();
    let mut progressed = 0u64;
    let result = file.write_safetensors(&mut out, |n| progressed += n);
    let all_ok = decoded.iter().all(|d| matches!(d, Some(Ok(_))));
    assert_eq!(
        result.is_ok(),
        all_ok,
        "write_safetensors {:?}, tensor decodes all ok: {all_ok}",
        result.as_ref().err().map(|e| e.to_string())
    );
    if result.is_err() {
        return;
    }
    let source = &file.header().source_header;
    let mut expected = (source.len() as u64).to_le_bytes().to_vec();
    expected.extend_from_slice(source);
    for d in decoded {
        expected.extend_from_slice(d.as_ref().unwrap().as_ref().unwrap());
    }
    assert!(
        out == expected,
        "write_safetensors output is not header + tensors"
    );
    assert_eq!(progressed as usize, out.len() - 8 - source.len());
    if let Err(e) = SafetensorsFile::from_bytes(Bytes::Owned(out)) {
        panic!("write_safetensors produced a file neuzip cannot read back: {e}");
    }
}
