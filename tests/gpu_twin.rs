//! The GPU decoder's CPU twin (`neuzip::gpu::twin`) against the reference decoder, bit for bit: every fixture as
//! the library converts it, the golden files, and blocks forced through the float codec (all BF16 and F16 bit
//! patterns, random F32 bits) in layouts with several rANS fields, raw fields of every width and block-local
//! tables, own and borrowed. Each is run with 1, 3 and 8 warps per CTA, so blocks share a CTA's tables in
//! different groupings.

mod common;

use std::collections::BTreeMap;

use common::{convert_bytes, fixture, open_bytes, SplitMix, ROUND_TRIP_FIXTURES};
use neuzip::codec::freq::{histogram, FreqTable};
use neuzip::codec::split::{
    encode_block, encode_local_block, Coding, Field, LocalChoice, SplitDecoder, SplitParams,
};
use neuzip::convert::ConvertOptions;
use neuzip::format::header::{BlockEntry, TensorEntry};
use neuzip::format::{checksum, BlockMode, Codec};
use neuzip::gpu::layout::TensorLayout;
use neuzip::gpu::twin;
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

/// A tensor whose blocks are encoded by hand, in one payload buffer laid out as in a file.
struct Synthetic {
    bytes: Vec<u8>,
    entry: TensorEntry,
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

/// Encodes `data` in blocks of `block_units` elements: block k is `split` if `local[k]` is None, else
/// `split_local` with that choice of (fields, borrowed flags).
fn synthetic(
    data: &[u8],
    dtype: Dtype,
    tensor: &SplitParams,
    block_units: u32,
    local: impl Fn(usize, &[u8]) -> Option<LocalChoice>,
) -> Synthetic {
    let width = dtype.byte_width().expect("float");
    let mut bytes = vec![0u8; 64]; // the payloads start 64 bytes in, as a tensor's first block does
    let mut blocks = Vec::new();
    for (k, block) in data.chunks(block_units as usize * width).enumerate() {
        let (mode, payload) = match local(k, block) {
            None => (BlockMode::Split, encode_block(tensor, dtype, block)),
            Some(choice) => (
                BlockMode::SplitLocal,
                encode_local_block(&choice, dtype, block),
            ),
        };
        bytes.resize(bytes.len().next_multiple_of(16), 0);
        blocks.push(BlockEntry {
            stored_len: payload.len() as u32,
            mode,
            checksum: checksum(&payload),
            offset: bytes.len() as u64,
        });
        bytes.extend_from_slice(&payload);
    }
    let entry = TensorEntry {
        name: format!("synthetic_{dtype}"),
        dtype,
        codec: Codec::FloatSplit,
        shape: vec![(data.len() / width) as u64],
        block_units,
        params: tensor.to_bytes(),
        blocks,
    };
    Synthetic { bytes, entry }
}

/// The twin against the reference block decoder (`SplitDecoder`) and against the original bytes.
fn check_synthetic(s: &Synthetic, original: &[u8]) {
    let dtype = s.entry.dtype;
    let tensor_params = SplitParams::parse(&s.entry.params, dtype).expect("params");
    let reference = SplitDecoder::new(tensor_params.clone(), dtype);
    let mut expected = vec![0u8; original.len()];
    for (k, b) in s.entry.blocks.iter().enumerate() {
        let payload = &s.bytes[b.offset as usize..(b.offset + b.stored_len as u64) as usize];
        let out = &mut expected[s.entry.block_range(k)];
        match b.mode {
            BlockMode::Split => reference.decode_block(payload, out).expect("reference"),
            _ => {
                let (param_bytes, body) =
                    neuzip::codec::split::split_local_payload(payload).expect("local");
                let (params, borrowed) =
                    SplitParams::parse_local(param_bytes, dtype, &tensor_params).expect("parse");
                reference
                    .local(params, &borrowed, dtype)
                    .decode_block(body, out)
                    .expect("reference local")
            }
        }
    }
    assert!(
        expected == original,
        "the reference itself does not round-trip"
    );
    let layout = TensorLayout::build(&s.bytes, &s.entry, true).expect("layout");
    for warps in WARPS {
        let mut out = vec![0xA5u8; original.len()];
        twin::decode_tensor(&s.bytes, &layout, &mut out, warps).expect("twin");
        let first_difference = out.iter().zip(original).position(|(a, b)| a != b);
        assert_eq!(
            first_difference, None,
            "{}: twin differs ({warps} warps)",
            s.entry.name
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
        let s = synthetic(&data, dtype, &tensor, 8192, local);
        check_synthetic(&s, &data);
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
        let s = synthetic(&data, Dtype::F32, &tensor, 3000, local);
        check_synthetic(&s, &data);
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
        eprintln!(
            "minilm {dtype}: {} tensors, blocks by mode {modes:?}",
            file.tensors().len()
        );
    }
}
