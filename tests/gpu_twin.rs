//! The GPU decoder's CPU twin (`neuzip::gpu::twin`) against the reference decoder, bit for bit: every fixture as
//! the library converts it, the golden files, and files whose blocks are forced through the float codec (all
//! BF16 and F16 bit patterns, random F32 bits) in layouts with several rANS fields, raw fields of odd widths and
//! block-local tables, own and borrowed. Where a GPU is present, the same files are decoded on it too. Each is run with 1, 3 and 8 warps per CTA, so blocks share a CTA's tables in
//! different groupings.

mod common;

use std::collections::BTreeMap;

use common::{
    convert_bytes, fixture, open_bytes, safetensors_bytes, SplitMix, TestTensor,
    ROUND_TRIP_FIXTURES,
};
use neuzip::codec::freq::{histogram, FreqTable};
use neuzip::codec::split::{
    encode_block, encode_local_block, Coding, Field, LocalChoice, SplitParams,
};
use neuzip::convert::ConvertOptions;
use neuzip::format::header::{self, BlockEntry, TensorEntry};
use neuzip::format::{align_up, checksum, BlockMode, Codec, FILE_HEADER_LEN};
use neuzip::gpu::layout::{TensorLayout, DESC_WORDS};
use neuzip::gpu::{twin, GpuModel};
use neuzip::{Dtype, NzError, NztFile};

const WARPS: [u32; 3] = [1, 3, 8];

/// Decodes every tensor of `file` with the twin and with the reference; returns the block modes seen.
fn check_file(label: &str, bytes: &[u8], file: &NztFile) -> BTreeMap<&'static str, usize> {
    let mut modes = BTreeMap::new();
    for (i, tensor) in file.tensors().iter().enumerate() {
        let mut expected = vec![0u8; tensor.byte_len() as usize];
        file.decode_tensor_into(i, &mut expected)
            .unwrap_or_else(|e| panic!("{label}: reference decode of '{}': {e}", tensor.name));
        let layout = TensorLayout::build(bytes, tensor, true)
            .unwrap_or_else(|e| panic!("{label}: layout of '{}': {e}", tensor.name));
        for warps in WARPS {
            let mut out = vec![0x5Au8; expected.len()];
            twin::decode_tensor(bytes, &layout, &mut out, warps)
                .unwrap_or_else(|e| panic!("{label}: twin decode of '{}': {e}", tensor.name));
            assert!(
                out == expected,
                "{label}: tensor '{}' differs with {warps} warps per CTA",
                tensor.name
            );
        }
        for b in &tensor.blocks {
            *modes.entry(b.mode.name()).or_insert(0) += 1;
        }
    }
    modes
}

#[test]
fn twin_matches_the_reference_on_every_fixture() {
    let mut modes: BTreeMap<&str, usize> = BTreeMap::new();
    for name in ROUND_TRIP_FIXTURES {
        let source = std::fs::read(fixture(name)).expect("fixture");
        // Small blocks as well as the default, so the fixtures make many blocks and block-local tables.
        for float_block_elements in [1 << 17, 4096] {
            let opts = ConvertOptions {
                float_block_elements,
                ..Default::default()
            };
            let bytes = convert_bytes(&source, &opts);
            let file = open_bytes(bytes.clone()).expect("open");
            for (mode, count) in check_file(name, &bytes, &file) {
                *modes.entry(mode).or_insert(0) += count;
            }
            check_on_gpu(name, &bytes, &file);
        }
    }
    for name in ["tiny.nzt", "modes.nzt"] {
        let bytes = std::fs::read(fixture("golden").join(name)).expect("golden");
        let file = open_bytes(bytes.clone()).expect("open");
        for (mode, count) in check_file(name, &bytes, &file) {
            *modes.entry(mode).or_insert(0) += count;
        }
    }
    for mode in ["raw", "zstd", "split", "split_local"] {
        assert!(
            modes.get(mode).copied().unwrap_or(0) > 0,
            "no {mode} block was exercised: {modes:?}"
        );
    }
}

fn table_for(values: impl Iterator<Item = u32>, width: u32, prob_bits: u32) -> FreqTable {
    let counts = histogram(values, width);
    FreqTable::from_counts(&counts, width, prob_bits).expect("table")
}

fn field_values(data: &[u8], dtype: Dtype, shift: u32, width: u32) -> Vec<u32> {
    let w = dtype.byte_width().expect("float");
    data.chunks_exact(w)
        .map(|c| {
            let mut v = [0u8; 8];
            v[..w].copy_from_slice(c);
            ((u64::from_le_bytes(v) >> shift) & ((1u64 << width) - 1)) as u32
        })
        .collect()
}

/// Params with the given fields; rANS tables from `data`'s own histograms at `prob_bits`.
fn params_for(data: &[u8], dtype: Dtype, fields: &[(u32, Coding)], prob_bits: u32) -> SplitParams {
    let mut shift: u32 = fields.iter().map(|f| f.0).sum();
    let mut tables = Vec::new();
    for &(width, coding) in fields {
        shift -= width;
        if coding == Coding::Rans {
            let values = field_values(data, dtype, shift, width);
            tables.push(table_for(values.into_iter(), width, prob_bits));
        }
    }
    SplitParams {
        fields: fields
            .iter()
            .map(|&(width, coding)| Field { width, coding })
            .collect(),
        tables,
    }
}

/// Encodes `data` (one tensor) in blocks of `block_units` elements, block k as `split` if `local(k)` is None,
/// else as `split_local` with that choice, and assembles a complete `.nzt` file around them with the format's
/// own header writer. Returns the file's bytes.
fn forced_nzt(
    data: &[u8],
    dtype: Dtype,
    tensor: &SplitParams,
    block_units: u32,
    local: impl Fn(usize, &[u8]) -> Option<LocalChoice>,
) -> Vec<u8> {
    let width = dtype.byte_width().expect("float");
    let name = format!("forced_{dtype}");
    let mut payloads = Vec::new();
    let mut blocks = Vec::new();
    for (k, block) in data.chunks(block_units as usize * width).enumerate() {
        let (mode, payload) = match local(k, block) {
            None => (BlockMode::Split, encode_block(tensor, dtype, block)),
            Some(choice) => (
                BlockMode::SplitLocal,
                encode_local_block(&choice, dtype, block),
            ),
        };
        blocks.push(BlockEntry {
            stored_len: payload.len() as u32,
            mode,
            checksum: checksum(&payload),
            offset: 0,
        });
        payloads.push(payload);
    }
    let source = safetensors_bytes(
        &[TestTensor {
            name: name.clone(),
            dtype,
            shape: vec![data.len() / width],
            data: data.to_vec(),
        }],
        None,
    );
    let header_len = u64::from_le_bytes(source[..8].try_into().unwrap()) as usize;
    let source_header = &source[8..8 + header_len];
    let mut entries = vec![TensorEntry {
        name,
        dtype,
        codec: Codec::FloatSplit,
        shape: vec![(data.len() / width) as u64],
        block_units,
        params: tensor.to_bytes(),
        blocks,
    }];
    let section = header::write_section(source_header, &entries);
    let data_offset = align_up(FILE_HEADER_LEN as u64 + section.len() as u64, 64).unwrap();
    let data_len = header::assign_offsets(&mut entries, data_offset).expect("offsets");
    let mut file = header::file_header(&section, 0, data_offset, data_len).to_vec();
    file.extend_from_slice(&section);
    file.resize(data_offset as usize, 0);
    for (b, payload) in entries[0].blocks.iter().zip(&payloads) {
        file.resize(b.offset as usize, 0);
        file.extend_from_slice(payload);
    }
    file
}

/// The twin against the reference reader on a forced file, and both against the original bytes; then, where a
/// GPU is present, the GPU too.
fn check_forced(label: &str, file_bytes: Vec<u8>, original: &[u8]) {
    let file = open_bytes(file_bytes.clone()).expect("the forced file is valid");
    let modes = check_file(label, &file_bytes, &file);
    assert!(
        modes.contains_key("split") && modes.contains_key("split_local"),
        "{modes:?}"
    );
    let tensor_name = &file.tensors()[0].name;
    assert!(
        file.decode_tensor(tensor_name).expect("decode") == original,
        "{label}: the reference does not give back the original"
    );
    check_on_gpu(label, &file_bytes, &file);
}

/// Where a GPU is present (and the build has the `cuda` feature), every tensor decoded on it equals the CPU
/// decode; elsewhere nothing is checked, unless `NEUZIP_REQUIRE_GPU=1` (scripts/gpu_check.sh) makes that a
/// failure.
fn check_on_gpu(label: &str, file_bytes: &[u8], file: &NztFile) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.nzt");
    std::fs::write(&path, file_bytes).expect("write");
    let model = match GpuModel::load(&path, 0) {
        Ok(model) => model,
        Err(e) if std::env::var_os("NEUZIP_REQUIRE_GPU").is_some_and(|v| v == "1") => {
            panic!("{label}: NEUZIP_REQUIRE_GPU=1 but the GPU loader failed: {e}")
        }
        Err(_) => return,
    };
    for (i, tensor) in file.tensors().iter().enumerate() {
        let mut expected = vec![0u8; tensor.byte_len() as usize];
        file.decode_tensor_into(i, &mut expected)
            .expect("cpu decode");
        let got = model.decode(&tensor.name).expect("gpu decode");
        assert!(
            got.to_host().expect("copy back") == expected,
            "{label}: '{}' differs on the GPU",
            tensor.name
        );
    }
}

fn le_bytes<const N: usize>(values: impl Iterator<Item = [u8; N]>) -> Vec<u8> {
    values.flatten().collect()
}

#[test]
fn every_bf16_and_f16_pattern_through_the_float_codec() {
    let mut rng = SplitMix::new(6);
    for dtype in [Dtype::BF16, Dtype::F16] {
        // Every 16-bit pattern, then the same shuffled, then 1000 more: 132072 elements, a short last block.
        let mut values: Vec<u16> = (0..=u16::MAX).collect();
        let mut shuffled = values.clone();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i as u64 + 1) as usize);
        }
        values.extend_from_slice(&shuffled);
        values.extend((0..1000).map(|_| rng.below(1 << 16) as u16));
        let data = le_bytes(values.iter().map(|v| v.to_le_bytes()));
        let tensor = params_for(&data, dtype, &[(10, Coding::Rans), (6, Coding::Raw)], 14);
        // Every third block carries its own layout: top 12 bits with its own table at P = 12, or the tensor's
        // 10-bit table borrowed beside a rANS-coded 6-bit field.
        let local = |k: usize, block: &[u8]| -> Option<LocalChoice> {
            let own = params_for(block, dtype, &[(12, Coding::Rans), (4, Coding::Raw)], 12);
            let mixed = params_for(block, dtype, &[(10, Coding::Rans), (6, Coding::Rans)], 11);
            match k % 3 {
                1 => Some(LocalChoice {
                    params: own,
                    borrowed: vec![false],
                    bits: 0.0,
                }),
                2 => Some(LocalChoice {
                    params: SplitParams {
                        fields: mixed.fields,
                        tables: vec![tensor.tables[0].clone(), mixed.tables[1].clone()],
                    },
                    borrowed: vec![true, false],
                    bits: 0.0,
                }),
                _ => None,
            }
        };
        let file = forced_nzt(&data, dtype, &tensor, 8192, local);
        check_forced(&format!("all {dtype} patterns"), file, &data);
    }
}

#[test]
fn random_f32_bits_with_three_rans_fields_and_raw_fields_of_odd_widths() {
    let mut rng = SplitMix::new(32);
    let n = 70_001;
    // Weight-like values, with every 97th element replaced by random bits (NaNs, infinities, subnormals).
    let data = le_bytes((0..n).map(|i| {
        let v = if i % 97 == 0 {
            rng.next_u64() as u32
        } else {
            ((rng.gaussian() * 0.02) as f32).to_bits()
        };
        v.to_le_bytes()
    }));
    let layouts: [&[(u32, Coding)]; 3] = [
        &[(9, Coding::Rans), (23, Coding::Raw)],
        &[
            (12, Coding::Rans),
            (8, Coding::Rans),
            (5, Coding::Raw),
            (7, Coding::Raw),
        ],
        &[
            (1, Coding::Raw),
            (8, Coding::Rans),
            (3, Coding::Rans),
            (20, Coding::Raw),
        ],
    ];
    for (l, fields) in layouts.iter().enumerate() {
        let tensor = params_for(&data, Dtype::F32, fields, 15 - l as u32);
        let local = |k: usize, block: &[u8]| -> Option<LocalChoice> {
            (k % 2 == 1).then(|| {
                let own = params_for(
                    block,
                    Dtype::F32,
                    &[(11, Coding::Rans), (21, Coding::Raw)],
                    12,
                );
                LocalChoice {
                    params: own,
                    borrowed: vec![false],
                    bits: 0.0,
                }
            })
        };
        let file = forced_nzt(&data, Dtype::F32, &tensor, 3000, local);
        check_forced(&format!("f32 layout {l}"), file, &data);
    }
}

#[test]
fn corrupt_streams_are_reported_per_block() {
    let source = std::fs::read(fixture("minilm_slice_bf16.safetensors")).expect("fixture");
    let opts = ConvertOptions {
        float_block_elements: 4096,
        ..Default::default()
    };
    let bytes = convert_bytes(&source, &opts);
    let file = open_bytes(bytes.clone()).expect("open");
    let (index, tensor) = file
        .tensors()
        .iter()
        .enumerate()
        .find(|(_, t)| t.blocks.len() > 4 && t.blocks[3].mode == BlockMode::Split)
        .expect("a tensor whose block 3 is split");
    let block = &tensor.blocks[3];
    let mut detected = 0;
    let trials = 40;
    let mut rng = SplitMix::new(3);
    for _ in 0..trials {
        // Flip one bit among the states and words (the first 132 + 2 * word_count bytes).
        let mut damaged = bytes.clone();
        let words = u32::from_le_bytes(
            damaged[block.offset as usize + 128..block.offset as usize + 132]
                .try_into()
                .unwrap(),
        );
        let at = block.offset as usize + rng.below(132 + 2 * words as u64) as usize;
        damaged[at] ^= 1 << rng.below(8);
        // Without checksums, so the rANS checks are what must catch it.
        let layout = TensorLayout::build(&damaged, tensor, false).expect("layout");
        let mut out = vec![0u8; tensor.byte_len() as usize];
        let twin_result = twin::decode_tensor(&damaged, &layout, &mut out, 8);
        let reference = NztFile::from_bytes(neuzip::mmap::Bytes::Owned(damaged))
            .expect("open")
            .with_options(neuzip::DecodeOptions {
                verify_checksums: false,
            });
        let mut expected = vec![0u8; out.len()];
        let reference_result = reference.decode_tensor_into(index, &mut expected);
        match twin_result {
            Err(NzError::CorruptBlock { block: 3, .. }) => {
                detected += 1;
                assert!(
                    reference_result.is_err(),
                    "the reference missed a damage the twin caught"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
            // An undetected flip must decode to what the reference decodes.
            Ok(()) => {
                reference_result.expect("the reference caught a damage the twin missed");
                assert!(out == expected);
            }
        }
    }
    assert!(
        detected * 10 >= trials * 8,
        "only {detected} of {trials} flips detected"
    );
    // With checksums (the default), every damaged block is refused before decoding.
    let mut damaged = bytes.clone();
    damaged[block.offset as usize + 140] ^= 0x40;
    assert!(matches!(
        TensorLayout::build(&damaged, tensor, true),
        Err(NzError::ChecksumMismatch { .. })
    ));
}

/// Real all-MiniLM-L6-v2 checkpoints (bf16, f16, f32; 22.7 M weights each), converted with the default
/// options, through the twin. Too slow for CI; run with
/// `NEUZIP_MINILM_DIR=/path/to/minilm cargo test --release --test gpu_twin -- --ignored`.
#[test]
#[ignore]
fn twin_matches_the_reference_on_real_minilm() {
    let dir =
        std::path::PathBuf::from(std::env::var_os("NEUZIP_MINILM_DIR").expect("NEUZIP_MINILM_DIR"));
    for dtype in ["bf16", "f16", "f32"] {
        let source =
            std::fs::read(dir.join(format!("model-{dtype}.safetensors"))).expect("checkpoint");
        let bytes = convert_bytes(&source, &ConvertOptions::default());
        let file = open_bytes(bytes.clone()).expect("open");
        let modes = check_file(dtype, &bytes, &file);
        check_on_gpu(dtype, &bytes, &file);
        // Which (rANS fields, raw fields) layouts the blocks use: the kernel has fast paths for some.
        let mut layouts: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        for tensor in file.tensors() {
            let layout = TensorLayout::build(&bytes, tensor, false).expect("layout");
            for k in 0..layout.block_count() {
                let d = &layout.descs[k * DESC_WORDS..];
                if d[0] == BlockMode::Split as u32 || d[0] == BlockMode::SplitLocal as u32 {
                    let l = &layout.layouts[d[5] as usize..];
                    *layouts.entry((l[1], l[0] - l[1])).or_insert(0) += 1;
                }
            }
        }
        eprintln!("minilm {dtype}: blocks by (rANS fields, raw fields): {layouts:?}");
        eprintln!(
            "minilm {dtype}: {} tensors, blocks by mode {modes:?}",
            file.tensors().len()
        );
    }
}
