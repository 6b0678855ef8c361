//! Replays inputs for the fuzz targets (fuzz/fuzz_targets/, see fuzz/README.md) through the same library calls,
//! so that what the fuzzer once found stays fixed without a fuzzer or a nightly toolchain.
//!
//! Every file `fuzz/regressions/<target>-<n>.bin` is an input that once made `<target>` panic; each must now
//! return, Ok or Err, without panicking. The committed seeds (`fuzz/seeds/<target>/`) are replayed too, which
//! keeps the seeds and these replays in step with the library.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use neuzip::codec::split::{
    block_field_counts, choose_block_coding, encode_block, encode_local_block, plan,
    split_local_payload, FieldStats, SplitDecoder, SplitParams,
};
use neuzip::convert::{convert_to_vec, ConvertOptions};
use neuzip::format::header;
use neuzip::format::{checksum, FILE_HEADER_LEN};
use neuzip::mmap::Bytes;
use neuzip::source::{parse_header_json, SafetensorsFile};
use neuzip::{DecodeOptions, Dtype, NztFile};

const TARGETS: [&str; 6] = [
    "header",
    "nzt_decode",
    "safetensors",
    "convert_roundtrip",
    "split_block",
    "split_roundtrip",
];

const SPLIT_DTYPES: [Dtype; 6] = [
    Dtype::F16,
    Dtype::BF16,
    Dtype::F32,
    Dtype::F64,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
];

/// Tensors larger than this are not decoded (as in the fuzz target).
const MAX_TENSOR_BYTES: u64 = 64 << 20;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Feeds `data` to the library the way fuzz target `target` does.
fn replay(target: &str, data: &[u8]) {
    match target {
        "header" => {
            let _ = header::parse(data);
        }
        "nzt_decode" => nzt_decode(data),
        "safetensors" => safetensors(data),
        "convert_roundtrip" => convert_roundtrip(data),
        "split_block" => split_block(data),
        "split_roundtrip" => split_roundtrip(data),
        other => panic!("unknown fuzz target '{other}'"),
    }
}

fn nzt_decode(data: &[u8]) {
    decode_everything(data);
    // The target also tries the file with its header checksum and data_len repaired.
    if data.len() >= FILE_HEADER_LEN {
        let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        let end = usize::try_from(u64_at(16))
            .ok()
            .and_then(|n| n.checked_add(FILE_HEADER_LEN));
        if let Some(section) = end.and_then(|end| data.get(FILE_HEADER_LEN..end)) {
            let mut repaired = data.to_vec();
            repaired[24..32].copy_from_slice(&checksum(section).to_le_bytes());
            if let Some(data_len) = (data.len() as u64).checked_sub(u64_at(32)) {
                repaired[40..48].copy_from_slice(&data_len.to_le_bytes());
            }
            decode_everything(&repaired);
        }
    }
}

fn decode_everything(data: &[u8]) {
    for options in [
        DecodeOptions::default(),
        DecodeOptions {
            verify_checksums: false,
        },
    ] {
        let Ok(file) = NztFile::from_bytes(Bytes::Owned(data.to_vec())) else {
            return;
        };
        let file = file.with_options(options);
        let mut total = 0u64;
        for (i, t) in file.tensors().iter().enumerate() {
            total = total.saturating_add(t.byte_len());
            if t.byte_len() > MAX_TENSOR_BYTES {
                continue;
            }
            let mut out = vec![0u8; t.byte_len() as usize];
            let _ = file.decode_tensor_into(i, &mut out);
            for k in 0..t.blocks.len() {
                let mut out = vec![0u8; t.block_range(k).len()];
                let _ = file.decode_block_into(i, k, &mut out);
            }
        }
        if total <= MAX_TENSOR_BYTES {
            let _ = file.write_safetensors(&mut Vec::new(), |_| {});
        }
    }
}

fn safetensors(data: &[u8]) {
    let _ = parse_header_json(data);
    if let Some(len) = data.get(..8) {
        let len = u64::from_le_bytes(len.try_into().unwrap());
        if let Some(json) = usize::try_from(len)
            .ok()
            .and_then(|n| data.get(8..8usize.checked_add(n)?))
        {
            let _ = parse_header_json(json);
        }
    }
    if let Ok(file) = SafetensorsFile::from_bytes(Bytes::Owned(data.to_vec())) {
        let _ = file.metadata();
        for t in &file.tensors {
            let _ = file.data(t);
        }
    }
}

/// In-memory convert (`convert::convert_to_vec`), then decode: must give `data` back.
fn convert_roundtrip(data: &[u8]) {
    let Ok(source) = SafetensorsFile::from_bytes(Bytes::Owned(data.to_vec())) else {
        return;
    };
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
    let file = convert_to_vec(&source, &opts).expect("encode");
    let nzt = NztFile::from_bytes(Bytes::Owned(file)).expect("the encoder's file opens");
    let mut out = Vec::new();
    nzt.write_safetensors(&mut out, |_| {})
        .expect("the encoder's file decodes");
    assert!(out == data, "round trip changed the bytes");
}

fn split_block(data: &[u8]) {
    let Some((head, rest)) = data.split_at_checked(5) else {
        return;
    };
    let dtype = SPLIT_DTYPES[(head[0] & 0x7f) as usize % SPLIT_DTYPES.len()];
    let n = u16::from_le_bytes([head[1], head[2]]) as usize;
    let params_len = u16::from_le_bytes([head[3], head[4]]) as usize;
    let Some((param_bytes, payload)) = rest.split_at_checked(params_len) else {
        return;
    };
    let Ok(params) = SplitParams::parse(param_bytes, dtype) else {
        return;
    };
    let decoder = SplitDecoder::new(params.clone(), dtype);
    let mut out = vec![0u8; n * dtype.byte_width().unwrap()];
    if head[0] & 0x80 == 0 {
        let _ = decoder.decode_block(payload, &mut out);
    } else if let Ok((local_bytes, body)) = split_local_payload(payload) {
        if let Ok((local, borrowed)) = SplitParams::parse_local(local_bytes, dtype, &params) {
            let _ = decoder
                .local(local, &borrowed, dtype)
                .decode_block(body, &mut out);
        }
    }
}

fn split_roundtrip(data: &[u8]) {
    let Some((head, rest)) = data.split_at_checked(3) else {
        return;
    };
    let dtype = SPLIT_DTYPES[head[0] as usize % SPLIT_DTYPES.len()];
    let block_elements = u16::from_le_bytes([head[1], head[2]]).max(1) as usize;
    let width = dtype.byte_width().unwrap();
    let tensor = &rest[..rest.len() / width * width];
    let blocks = (tensor.len() / width).div_ceil(block_elements);
    let Some(plan) = plan(&FieldStats::gather(dtype, tensor), blocks as u64) else {
        return;
    };
    let decoder = SplitDecoder::new(plan.params.clone(), dtype);
    for block in tensor.chunks(block_elements * width) {
        let mut out = vec![0u8; block.len()];
        decoder
            .decode_block(&encode_block(&plan.params, dtype, block), &mut out)
            .expect("split block decodes");
        assert!(out == block, "split block does not round-trip");
        let counts = block_field_counts(&plan.params.fields, dtype, block);
        let choice = choose_block_coding(&plan.params, &counts, (block.len() / width) as u64);
        let local = encode_local_block(&choice, dtype, block);
        let (param_bytes, body) = split_local_payload(&local).expect("local payload");
        let (params, borrowed) =
            SplitParams::parse_local(param_bytes, dtype, &plan.params).expect("local params");
        decoder
            .local(params, &borrowed, dtype)
            .decode_block(body, &mut out)
            .expect("split_local block decodes");
        assert!(out == block, "split_local block does not round-trip");
    }
}

/// Replays every file of `dir` whose name is accepted by `target_of`; returns how many were replayed.
fn replay_dir(dir: &Path, target_of: impl Fn(&str) -> Option<&'static str>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    let mut failures = Vec::new();
    let mut count = 0;
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(target) = target_of(&name) else {
            continue;
        };
        let data = std::fs::read(&path).unwrap();
        count += 1;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| replay(target, &data))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{} ({target}): {message}", path.display()));
        }
    }
    assert!(failures.is_empty(), "panicked:\n{}", failures.join("\n"));
    count
}

/// `<target>-<n>.bin` -> `<target>`.
fn regression_target(name: &str) -> Option<&'static str> {
    let stem = name.strip_suffix(".bin")?;
    let (target, n) = stem.rsplit_once('-')?;
    n.parse::<u32>().ok()?;
    TARGETS.iter().copied().find(|&t| t == target)
}

#[test]
fn every_saved_crash_input_returns() {
    replay_dir(&fuzz_dir().join("regressions"), regression_target);
}

#[test]
fn seeds_replay_without_panicking() {
    for target in TARGETS {
        let count = replay_dir(&fuzz_dir().join("seeds").join(target), |_| Some(target));
        assert!(count > 0, "no seeds for {target}");
    }
}

#[test]
fn regression_names_name_a_target() {
    assert_eq!(regression_target("nzt_decode-3.bin"), Some("nzt_decode"));
    assert_eq!(regression_target("split_block-12.bin"), Some("split_block"));
    assert_eq!(regression_target("header.bin"), None);
    assert_eq!(regression_target("nope-1.bin"), None);
}
