//! The GPU decoder's CPU twin (`neuzip::gpu::twin`) against the reference decoder, bit for bit: every fixture as
//! the library converts it, the golden files, and files whose blocks are forced through the float codec (all
//! BF16 and F16 bit patterns, random F32 bits) in layouts with several rANS fields, raw fields of odd widths and
//! block-local tables, own and borrowed; and lossy files (section 13.3), from the library and with forced
//! numbers of rANS-coded bits, mixed with lossless tensors, intact and damaged. Where a GPU is present, the same
//! files are decoded on it too. Each is run with 1, 3 and 8 warps per CTA (the slow sweeps with 3), so blocks
//! share a CTA's tables in different groupings.

mod common;

use std::collections::BTreeMap;

use common::{
    convert_bytes, fixture, open_bytes, safetensors_bytes, SplitMix, TestTensor,
    ROUND_TRIP_FIXTURES,
};
use neuzip::codec::freq::{histogram, FreqTable};
use neuzip::codec::lossy::{self, LossyParams, Quantizer};
use neuzip::codec::split::{
    encode_block, encode_local_block, Coding, Field, LocalChoice, SplitParams,
};
use neuzip::convert::ConvertOptions;
use neuzip::format::header::{self, BlockEntry, TensorEntry};
use neuzip::format::{align_up, checksum, BlockMode, Codec, FILE_HEADER_LEN};
use neuzip::gpu::layout::{TensorLayout, DESC_WORDS};
use neuzip::gpu::{twin, GpuModel};
use neuzip::precision::{LossySettings, Precision};
use neuzip::{Dtype, NzError, NztFile};

const WARPS: [u32; 3] = [1, 3, 8];

/// Decodes every tensor of `file` with the twin and with the reference; returns the block modes seen.
fn check_file(label: &str, bytes: &[u8], file: &NztFile) -> BTreeMap<&'static str, usize> {
    check_file_with(label, bytes, file, &WARPS)
}

fn check_file_with(
    label: &str,
    bytes: &[u8],
    file: &NztFile,
    warp_counts: &[u32],
) -> BTreeMap<&'static str, usize> {
    let mut modes = BTreeMap::new();
    for (i, tensor) in file.tensors().iter().enumerate() {
        let mut expected = vec![0u8; tensor.byte_len() as usize];
        file.decode_tensor_into(i, &mut expected)
            .unwrap_or_else(|e| panic!("{label}: reference decode of '{}': {e}", tensor.name));
        let layout = TensorLayout::build(bytes, tensor, true)
            .unwrap_or_else(|e| panic!("{label}: layout of '{}': {e}", tensor.name));
        for &warps in warp_counts {
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
    let blocks = data
        .chunks(block_units as usize * width)
        .enumerate()
        .map(|(k, block)| match local(k, block) {
            None => (BlockMode::Split, encode_block(tensor, dtype, block)),
            Some(choice) => (
                BlockMode::SplitLocal,
                encode_local_block(&choice, dtype, block),
            ),
        })
        .collect();
    assemble_nzt(
        data,
        dtype,
        Codec::FloatSplit,
        tensor.to_bytes(),
        block_units,
        blocks,
    )
}

/// A complete one-tensor `.nzt` file around already encoded blocks, with the format's own header writer.
fn assemble_nzt(
    data: &[u8],
    dtype: Dtype,
    codec: Codec,
    params: Vec<u8>,
    block_units: u32,
    encoded: Vec<(BlockMode, Vec<u8>)>,
) -> Vec<u8> {
    let width = dtype.byte_width().expect("float");
    let name = format!("forced_{dtype}");
    let mut payloads = Vec::new();
    let mut blocks = Vec::new();
    for (mode, payload) in encoded {
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
        codec,
        shape: vec![(data.len() / width) as u64],
        block_units,
        params,
        blocks,
    }];
    let section = header::write_section(source_header, &entries);
    let data_offset = align_up(FILE_HEADER_LEN as u64 + section.len() as u64, 64).unwrap();
    let data_len = header::assign_offsets(&mut entries, data_offset).expect("offsets");
    let version_minor = header::version_minor_for(&entries);
    let mut file = header::file_header(&section, version_minor, data_offset, data_len).to_vec();
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
/// options and lossy (K = 3, without and with groups of 64), through the twin. Too slow for CI; run with
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
        // Lossy matrices beside lossless 1-D tensors, with and without normalization.
        for norm_block in [0, 64] {
            let opts = lossy_opts(3, norm_block, false, 1 << 17);
            let bytes = convert_bytes(&source, &opts);
            let file = open_bytes(bytes.clone()).expect("open");
            let label = format!("{dtype} K=3 B={norm_block}");
            let modes = check_file_with(&label, &bytes, &file, &[8]);
            check_on_gpu(&label, &bytes, &file);
            eprintln!("minilm {label}: blocks by mode {modes:?}");
        }
    }
}

/// Options that make tensors lossy with `k` mantissa bits and groups of `norm_block`: every tensor if `all`,
/// else (the default rule) those of rank 2 or more, so 1-D tensors stay lossless beside them.
fn lossy_opts(k: u32, norm_block: u32, all: bool, float_block_elements: u32) -> ConvertOptions {
    let mut lossy = LossySettings {
        norm_block,
        default_bits: (!all).then_some(k),
        ..LossySettings::default()
    };
    if all {
        lossy
            .rules
            .push_parsed(&format!("*={k}"), Precision::parse)
            .expect("rule");
    }
    ConvertOptions {
        float_block_elements,
        lossy,
        ..ConvertOptions::default()
    }
}

fn mantissa_width(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::BF16 => 7,
        Dtype::F16 => 10,
        Dtype::F32 => 23,
        _ => unreachable!("not a lossy dtype"),
    }
}

/// The codecs of a file's tensors and their lossy parameters' coded bits.
fn codecs_and_coded_bits(file: &NztFile) -> (BTreeMap<&'static str, usize>, Vec<u32>) {
    let mut codecs = BTreeMap::new();
    let mut coded = Vec::new();
    for t in file.tensors() {
        *codecs.entry(t.codec.name()).or_insert(0) += 1;
        if t.codec == Codec::Lossy {
            coded.push(
                LossyParams::parse(&t.params, t.dtype)
                    .expect("params")
                    .coded_bits,
            );
        }
    }
    (codecs, coded)
}

#[test]
fn lossy_twin_matches_the_reference_on_every_bf16_and_f16_pattern() {
    for (name, dtype) in [
        ("bf16_all_patterns.safetensors", Dtype::BF16),
        ("f16_all_patterns.safetensors", Dtype::F16),
    ] {
        let source = std::fs::read(fixture(name)).expect("fixture");
        let m = mantissa_width(dtype);
        for k in [0, 1, 3, m - 1] {
            for norm_block in [0, 1, 64, 1024] {
                let label = format!("{name} K={k} B={norm_block}");
                let bytes = convert_bytes(&source, &lossy_opts(k, norm_block, true, 8192));
                let file = open_bytes(bytes.clone()).expect("open");
                let (codecs, _) = codecs_and_coded_bits(&file);
                assert!(
                    codecs.contains_key("lossy") && !codecs.contains_key("float_split"),
                    "{label}: {codecs:?}"
                );
                let warps: &[u32] = if norm_block == 64 { &WARPS } else { &[3] };
                let modes = check_file_with(&label, &bytes, &file, warps);
                assert!(
                    modes.get("lossy").copied().unwrap_or(0) >= 8,
                    "{label}: {modes:?}"
                );
                check_on_gpu(&label, &bytes, &file);
            }
        }
    }
}

#[test]
fn lossy_twin_matches_the_reference_on_minilm_slices_at_every_k() {
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let name = format!("minilm_slice_{dtype}.safetensors").to_lowercase();
        let source = std::fs::read(fixture(&name)).expect("fixture");
        let mut coded_bits_seen = Vec::new();
        for k in 0..mantissa_width(dtype) {
            for norm_block in [0, 32] {
                let label = format!("{name} K={k} B={norm_block}");
                let bytes = convert_bytes(&source, &lossy_opts(k, norm_block, false, 16384));
                let file = open_bytes(bytes.clone()).expect("open");
                let (codecs, coded) = codecs_and_coded_bits(&file);
                // Lossy matrices beside lossless 1-D tensors, in one file.
                assert!(
                    codecs.contains_key("lossy") && codecs.contains_key("float_split"),
                    "{label}: {codecs:?}"
                );
                coded_bits_seen.extend(coded);
                check_file_with(&label, &bytes, &file, &[3]);
                if k == 3 {
                    check_on_gpu(&label, &bytes, &file);
                }
            }
        }
        coded_bits_seen.sort_unstable();
        coded_bits_seen.dedup();
        eprintln!("{name}: lossy tensors rANS-code {coded_bits_seen:?} top bits");
    }
}

/// A one-tensor lossy file with `coded_bits` top bits of each code rANS-coded (table at `prob_bits` from the
/// tensor's own codes), whatever the planner would pick.
fn forced_lossy_nzt(
    data: &[u8],
    dtype: Dtype,
    k: u32,
    norm_block: u32,
    coded_bits: u32,
    prob_bits: u32,
    block_units: u32,
) -> Vec<u8> {
    let width = dtype.byte_width().expect("float");
    let quantizer = Quantizer::new(dtype, k, norm_block).expect("settings");
    let code_bits = quantizer.code_bits();
    let table = (coded_bits > 0).then(|| {
        let tops = data.chunks(block_units as usize * width).flat_map(|block| {
            let values = field_values(block, dtype, 0, 8 * width as u32);
            let values: Vec<u64> = values.into_iter().map(u64::from).collect();
            let (_, codes) = quantizer.quantize_block(&values, 0);
            codes.into_iter().map(|c| c >> (code_bits - coded_bits))
        });
        table_for(tops, coded_bits, prob_bits)
    });
    let params = LossyParams {
        mantissa_bits: k,
        norm_block,
        coded_bits,
        table,
    };
    let blocks = data
        .chunks(block_units as usize * width)
        .enumerate()
        .map(|(i, block)| {
            let first = i * block_units as usize;
            (
                BlockMode::Lossy,
                lossy::encode_block(&params, &quantizer, dtype, block, first),
            )
        })
        .collect();
    assemble_nzt(
        data,
        dtype,
        Codec::Lossy,
        params.to_bytes(),
        block_units,
        blocks,
    )
}

#[test]
fn lossy_twin_matches_with_every_split_of_the_codes_between_rans_and_raw() {
    let mut rng = SplitMix::new(64);
    let n = 20_011;
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let width = dtype.byte_width().unwrap();
        // Weight-like values, every 13th replaced by random bits (NaN payloads, infinities, subnormals).
        let data: Vec<u8> = (0..n)
            .flat_map(|i| {
                let x = rng.gaussian() * 0.05;
                let bits = if i % 13 == 0 {
                    rng.next_u64()
                } else {
                    match dtype {
                        Dtype::F32 => (x as f32).to_bits() as u64,
                        Dtype::BF16 => ((x as f32).to_bits() >> 16) as u64,
                        _ => half::f16::from_f64(x).to_bits() as u64,
                    }
                };
                bits.to_le_bytes()[..width].to_vec()
            })
            .collect();
        let m = mantissa_width(dtype);
        for k in [0, 2, m - 1] {
            let code_bits = Quantizer::new(dtype, k, 0).unwrap().code_bits();
            let most = code_bits.min(12);
            for coded_bits in [0, 1, most / 2, most] {
                for norm_block in [0, 7] {
                    let label = format!("{dtype} K={k} h={coded_bits} B={norm_block}");
                    // Enough probability bits for every symbol of up to 12 bits.
                    let prob_bits = coded_bits.max(11);
                    let bytes =
                        forced_lossy_nzt(&data, dtype, k, norm_block, coded_bits, prob_bits, 3000);
                    let file = open_bytes(bytes.clone()).expect("the forced file is valid");
                    check_file_with(&label, &bytes, &file, &[1, 8]);
                    check_on_gpu(&label, &bytes, &file);
                }
            }
        }
    }
}

#[test]
fn lossy_twin_matches_the_reference_on_random_f32() {
    let mut rng = SplitMix::new(23);
    let n = 50_000;
    let data = le_bytes((0..n).map(|i| {
        let v = if i % 5 == 0 {
            rng.next_u64() as u32
        } else {
            ((rng.gaussian() * 0.02) as f32).to_bits()
        };
        v.to_le_bytes()
    }));
    let source = safetensors_bytes(
        &[TestTensor {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![n / 100, 100],
            data: data.clone(),
        }],
        None,
    );
    for k in [0, 1, 7, 15, 22] {
        for norm_block in [0, 3, 1024] {
            let label = format!("random f32 K={k} B={norm_block}");
            let bytes = convert_bytes(&source, &lossy_opts(k, norm_block, false, 4096));
            let file = open_bytes(bytes.clone()).expect("open");
            assert_eq!(file.tensors()[0].codec, Codec::Lossy, "{label}");
            check_file_with(&label, &bytes, &file, &[3]);
        }
    }
}

#[test]
fn lossy_corruption_is_caught_or_decoded_as_the_reference_does() {
    let source = std::fs::read(fixture("minilm_slice_bf16.safetensors")).expect("fixture");
    let bytes = convert_bytes(&source, &lossy_opts(3, 64, false, 4096));
    let file = open_bytes(bytes.clone()).expect("open");
    let (index, tensor) = file
        .tensors()
        .iter()
        .enumerate()
        .find(|(_, t)| t.codec == Codec::Lossy && t.blocks.len() > 4)
        .expect("a lossy tensor of 5 blocks or more");
    let params = LossyParams::parse(&tensor.params, tensor.dtype).expect("params");
    assert!(params.coded_bits > 0, "the planner rANS-codes some bits");
    let block = &tensor.blocks[3];
    let n = tensor.block_range(3).len() / 2;
    let scales = n.div_ceil(64).next_multiple_of(4);
    let start = block.offset as usize;
    let rans_start = start + scales;
    let words = u32::from_le_bytes(
        bytes[rans_start + 128..rans_start + 132]
            .try_into()
            .unwrap(),
    );
    let rans_end = rans_start + 132 + 2 * words as usize;
    let end = start + block.stored_len as usize;
    let mut rng = SplitMix::new(9);
    let (mut detected, mut stream_flips) = (0, 0);
    let trials = 60;
    for trial in 0..trials {
        // Thirds: a scale byte, the rANS states and words, the raw plane.
        let at = match trial % 3 {
            0 => start + rng.below(scales as u64) as usize,
            1 => rans_start + rng.below((rans_end - rans_start) as u64) as usize,
            _ => rans_end + rng.below((end - rans_end) as u64) as usize,
        };
        let mut damaged = bytes.clone();
        damaged[at] ^= 1 << rng.below(8);
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
        stream_flips += (trial % 3 == 1) as usize;
        match twin_result {
            Err(NzError::CorruptBlock { block: 3, .. }) => {
                detected += 1;
                assert!(trial % 3 == 1, "a flip outside the stream was reported");
                assert!(
                    reference_result.is_err(),
                    "the reference missed a damage the twin caught"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => {
                reference_result.expect("the reference caught a damage the twin missed");
                assert!(out == expected, "trial {trial}: the decodes differ");
            }
        }
    }
    assert!(
        detected * 10 >= stream_flips * 8,
        "only {detected} of {stream_flips} stream flips detected"
    );
    // A payload one word short of what its word count declares is refused before any decoding, as the
    // reference refuses it.
    let mut damaged = bytes.clone();
    damaged[rans_start + 128..rans_start + 132].copy_from_slice(&(words + 2).to_le_bytes());
    assert!(matches!(
        TensorLayout::build(&damaged, tensor, false),
        Err(NzError::CorruptBlock { block: 3, .. })
    ));
    let reference = NztFile::from_bytes(neuzip::mmap::Bytes::Owned(damaged))
        .expect("open")
        .with_options(neuzip::DecodeOptions {
            verify_checksums: false,
        });
    let mut sink = vec![0u8; tensor.byte_len() as usize];
    assert!(reference.decode_tensor_into(index, &mut sink).is_err());
}

#[test]
fn a_block_launched_in_the_wrong_entry_point_is_an_error_not_garbage() {
    let source = std::fs::read(fixture("minilm_slice_f16.safetensors")).expect("fixture");
    let bytes = convert_bytes(&source, &lossy_opts(4, 0, false, 4096));
    let file = open_bytes(bytes.clone()).expect("open");
    for codec in [Codec::Lossy, Codec::FloatSplit] {
        let tensor = file
            .tensors()
            .iter()
            .find(|t| {
                t.codec == codec
                    && t.blocks.iter().any(|b| {
                        matches!(
                            b.mode,
                            BlockMode::Split | BlockMode::SplitLocal | BlockMode::Lossy
                        )
                    })
            })
            .expect("a tensor of each codec");
        let mut layout = TensorLayout::build(&bytes, tensor, true).expect("layout");
        layout.lossy = !layout.lossy;
        let mut out = vec![0u8; tensor.byte_len() as usize];
        match twin::decode_tensor(&bytes, &layout, &mut out, 3) {
            Err(NzError::CorruptBlock { what, .. }) => {
                assert!(what.contains("launched kernel"), "{what}")
            }
            other => panic!("{}: expected an error, got {other:?}", tensor.name),
        }
    }
}
