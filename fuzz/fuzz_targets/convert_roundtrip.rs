//! Lossless round trip of the whole pipeline on arbitrary safetensors files: a file that
//! `SafetensorsFile::from_bytes` accepts is converted in memory the way `convert::convert_uncommitted` writes
//! it (plan, encode blocks, place them, header section, file header), opened with `NztFile::from_bytes`,
//! and `write_safetensors` must give back the input byte for byte.
//!
//! The block sizes come from the input length, so that one corpus exercises several block sizes, partial
//! last blocks and single-block tensors.
#![no_main]
use libfuzzer_sys::fuzz_target;

use neuzip::convert::{encode_blocks, plan_all, ConvertOptions, Placement};
use neuzip::format::header::{self, TensorEntry};
use neuzip::format::{align_up, checksum, FILE_HEADER_LEN, TENSOR_ALIGN};
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
    };
    let mut plans = plan_all(&source, &opts);
    let header_json = source.header_json();
    let entries: Vec<TensorEntry> = plans.iter().map(|p| p.entry.clone()).collect();
    let section_len = header::section_len(header_json, &entries);
    let data_offset = align_up(FILE_HEADER_LEN as u64 + section_len, TENSOR_ALIGN).unwrap();

    let mut body = Vec::new();
    let mut placement = Placement::default();
    let mut records = Vec::new();
    encode_blocks(&source, &plans, &opts, &|_| {}, |ti, k, block| {
        let padding = placement.place(ti, block.payload.len() as u64);
        body.resize(body.len() + padding as usize, 0);
        body.extend_from_slice(&block.payload);
        records.push((
            ti,
            k,
            block.mode,
            block.payload.len(),
            checksum(&block.payload),
        ));
        Ok(())
    })
    .expect("encoding a valid safetensors file");
    for (ti, k, mode, len, sum) in records {
        let b = &mut plans[ti].entry.blocks[k];
        b.stored_len = u32::try_from(len).unwrap();
        b.mode = mode;
        b.checksum = sum;
    }
    let mut entries: Vec<TensorEntry> = plans.into_iter().map(|p| p.entry).collect();
    let data_len = header::assign_offsets(&mut entries, data_offset).unwrap();
    assert_eq!(data_len, placement.end);
    assert_eq!(data_len, body.len() as u64);
    let section = header::write_section(header_json, &entries);
    assert_eq!(section.len() as u64, section_len);

    let mut file = header::file_header(&section, data_offset, data_len).to_vec();
    file.extend_from_slice(&section);
    file.resize(data_offset as usize, 0);
    file.extend_from_slice(&body);

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
