//! Lossless round trip of the whole pipeline on arbitrary safetensors files: a file that
//! `SafetensorsFile::from_bytes` accepts is converted in memory by `convert::convert_to_vec` (the same
//! `NztPlan` that `convert` streams to a file), opened with `NztFile::from_bytes`, and `write_safetensors` must
//! give back the input byte for byte.
//!
//! The block sizes come from the input length, so that one corpus exercises several block sizes, partial
//! last blocks and single-block tensors.
#![no_main]
use libfuzzer_sys::fuzz_target;

use neuzip::convert::{convert_to_vec, ConvertOptions};
use neuzip::mmap::Bytes;
use neuzip::source::SafetensorsFile;
use neuzip::NztFile;

/// Larger inputs are skipped: the encoder's cost is what is being tested, not the allocator's.
const MAX_INPUT_BYTES: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = SafetensorsFile::from_bytes(Bytes::Owned(data.to_vec())) else {
        return;
    };
    if data.len() > MAX_INPUT_BYTES {
        return;
    }
    let opts = ConvertOptions {
        float_block_elements: [31, 64, 100, 256][data.len() % 4],
        stored_block_bytes: [64, 100, 256, 4096][data.len() / 4 % 4],
        zstd_level: 1,
        replace: false,
        lossy: Default::default(),
        codebook: Default::default(),
        importance: None,
        target_bits_per_weight: None,
    };
    let file = convert_to_vec(&source, &opts).expect("encoding a valid safetensors file");

    let nzt = match NztFile::from_bytes(Bytes::Owned(file)) {
        Ok(nzt) => nzt,
        Err(e) => panic!("the reader rejects what the encoder wrote: {e}"),
    };
    let mut out = Vec::new();
    if let Err(e) = nzt.write_safetensors(&mut out, |_| {}) {
        panic!("the encoder's file does not decode: {e}");
    }
    assert!(out == data, "round trip changed the bytes");
});
