//! Lossy mode end to end: every decoded element within the error bound of format-spec/nzt.md section
//! 13.3.5 (on every BF16 and F16 bit pattern, on F32 specials and random bits, on real MiniLM weights), NaN
//! and Inf kept, no Inf made, K = full mantissa giving the lossless file, the version byte, the CLI's flags,
//! errors, `verify --against`, `analyze --sweep`, and `--importance` weighing the choice of scale bytes.

mod common;

use assert_cmd::Command;
use predicates::str::contains;

use neuzip::convert::{convert_to_vec, ConvertOptions};
use neuzip::format::{BlockMode, Codec};
use neuzip::mmap::Bytes;
use neuzip::precision::{LossySettings, Precision};
use neuzip::source::SafetensorsFile;
use neuzip::{Dtype, NztFile};

use common::*;

fn neuzip() -> Command {
    let mut cmd = Command::cargo_bin("neuzip").expect("neuzip binary");
    cmd.timeout(std::time::Duration::from_secs(120));
    cmd
}

/// Options that make every tensor matching `*` keep `k` mantissa bits (1-D tensors included).
fn lossy_opts(k: u32, norm_block: u32) -> ConvertOptions {
    let mut lossy = LossySettings {
        norm_block,
        ..LossySettings::default()
    };
    lossy
        .rules
        .push_parsed(&format!("*={k}"), Precision::parse)
        .unwrap();
    ConvertOptions {
        float_block_elements: 4096,
        lossy,
        ..ConvertOptions::default()
    }
}

/// (exponent bits, mantissa bits) of the lossy dtypes.
fn widths(dtype: Dtype) -> (u32, u32) {
    match dtype {
        Dtype::BF16 => (8, 7),
        Dtype::F16 => (5, 10),
        Dtype::F32 => (8, 23),
        _ => unreachable!(),
    }
}

/// An element's value, decoded with the `half` crate and std (independent of the codec's own arithmetic).
fn value(dtype: Dtype, bytes: &[u8]) -> f64 {
    match dtype {
        Dtype::BF16 => half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
        Dtype::F16 => half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
        Dtype::F32 => f32::from_le_bytes(bytes.try_into().unwrap()) as f64,
        _ => unreachable!(),
    }
}

/// The spec's bound on `|decoded - x|` (section 13.3.5), from K, the dtype's widths and whether the tensor
/// is normalized.
fn spec_bound(dtype: Dtype, k: u32, normalized: bool, x: f64) -> f64 {
    let (exp_bits, man_bits) = widths(dtype);
    let x = x.abs();
    let smallest_normal = 2f64.powi(2 - (1 << (exp_bits - 1)));
    let e_k = 2f64.powi(-(k as i32) - 1);
    if !normalized {
        return e_k * x.max(smallest_normal);
    }
    let e_m = 2f64.powi(-(man_bits as i32) - 1);
    let e1 = e_k * x.max(2.0 * smallest_normal) + 2f64.powi(-52) * x;
    e1 + e_m * (x + e1).max(smallest_normal)
}

/// Converts `fixture_name` with every float tensor at K bits and checks every element of every lossy tensor
/// against the bound; returns how many elements were checked.
fn check_bound(fixture_name: &str, k: u32, norm_block: u32) -> u64 {
    let source = SafetensorsFile::open(&fixture(fixture_name)).unwrap();
    let nzt = convert_to_vec(&source, &lossy_opts(k, norm_block)).unwrap();
    let file = NztFile::from_bytes(Bytes::Owned(nzt)).unwrap();
    let mut checked = 0;
    for t in &source.tensors {
        if !matches!(t.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) || k >= widths(t.dtype).1 {
            continue;
        }
        let entry = &file.tensors()[file.tensor_index(&t.name).unwrap()];
        let elements: u64 = t.shape.iter().product();
        assert_eq!(entry.codec == Codec::Lossy, elements > 0, "{}", t.name);
        let decoded = file.decode_tensor(&t.name).unwrap();
        let width = t.dtype.byte_width().unwrap();
        let sign_bit = |b: &[u8]| b[width - 1] & 0x80;
        for (a, b) in source.data(t).chunks(width).zip(decoded.chunks(width)) {
            let (x, y) = (value(t.dtype, a), value(t.dtype, b));
            let at = || {
                format!(
                    "{fixture_name} '{}' K={k} B={norm_block}: {x:e} -> {y:e}",
                    t.name
                )
            };
            if x.is_nan() {
                assert!(y.is_nan() && sign_bit(a) == sign_bit(b), "{}", at());
            } else if x.is_infinite() {
                assert_eq!(a, b, "{}", at());
            } else {
                assert!(y.is_finite(), "finite became {}", at());
                let bound = spec_bound(t.dtype, k, norm_block > 0, x);
                assert!((y - x).abs() <= bound * (1.0 + 1e-12), "{}", at());
                // A zero stays a zero of the same sign.
                if x == 0.0 {
                    assert_eq!(a, b, "{}", at());
                }
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_bf16_and_f16_pattern_is_within_the_bound_for_every_k() {
    for (fixture_name, dtype) in [
        ("bf16_all_patterns.safetensors", Dtype::BF16),
        ("f16_all_patterns.safetensors", Dtype::F16),
    ] {
        for k in 0..widths(dtype).1 {
            for norm_block in [0, 1, 512] {
                assert_eq!(check_bound(fixture_name, k, norm_block), 2 * 65536);
            }
        }
    }
}

#[test]
fn f32_specials_random_bits_and_weights_are_within_the_bound() {
    for k in [0, 1, 2, 3, 5, 8, 12, 16, 20, 22] {
        for norm_block in [0, 3, 1024] {
            assert!(check_bound("f32_specials.safetensors", k, norm_block) > 170_000);
        }
    }
}

#[test]
fn real_weights_are_within_the_bound_for_every_k() {
    for (fixture_name, dtype) in [
        ("minilm_slice_bf16.safetensors", Dtype::BF16),
        ("minilm_slice_f16.safetensors", Dtype::F16),
        ("minilm_slice_f32.safetensors", Dtype::F32),
    ] {
        for k in 0..widths(dtype).1 {
            for norm_block in [0, 512] {
                assert_eq!(check_bound(fixture_name, k, norm_block), 296_064);
            }
        }
    }
}

#[test]
fn the_canonical_quiet_nan_is_kept_exactly() {
    let source = SafetensorsFile::open(&fixture("f32_specials.safetensors")).unwrap();
    let t = source
        .tensors
        .iter()
        .find(|t| t.name == "specials")
        .unwrap();
    for k in [0, 4, 22] {
        let file = NztFile::from_bytes(Bytes::Owned(
            convert_to_vec(&source, &lossy_opts(k, 16)).unwrap(),
        ))
        .unwrap();
        let decoded = file.decode_tensor("specials").unwrap();
        let mut seen = 0;
        for (a, b) in source.data(t).chunks(4).zip(decoded.chunks(4)) {
            if a == 0x7fc0_0000u32.to_le_bytes() || a == 0xffc0_0000u32.to_le_bytes() {
                assert_eq!(a, b, "K={k}");
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }
}

#[test]
fn full_mantissa_gives_the_lossless_file() {
    for (fixture_name, full) in [
        ("minilm_slice_bf16.safetensors", 7),
        ("minilm_slice_f16.safetensors", 10),
        ("minilm_slice_f32.safetensors", 23),
    ] {
        let source = SafetensorsFile::open(&fixture(fixture_name)).unwrap();
        let lossless = ConvertOptions {
            float_block_elements: 4096,
            ..ConvertOptions::default()
        };
        let lossless = convert_to_vec(&source, &lossless).unwrap();
        let full = convert_to_vec(&source, &lossy_opts(full, 512)).unwrap();
        assert!(full == lossless, "{fixture_name}");
        let file = open_bytes(full).unwrap();
        assert_eq!(
            decompress(&file).unwrap(),
            std::fs::read(fixture(fixture_name)).unwrap()
        );
    }
}

#[test]
fn lossy_files_are_version_1_1_and_decode_block_by_block() {
    let source = SafetensorsFile::open(&fixture("minilm_slice_bf16.safetensors")).unwrap();
    let lossless = convert_to_vec(&source, &ConvertOptions::default()).unwrap();
    assert_eq!(&lossless[8..12], &[1, 0, 0, 0]);
    let mut opts = lossy_opts(3, 0);
    opts.float_block_elements = 1000;
    let lossy = convert_to_vec(&source, &opts).unwrap();
    assert_eq!(&lossy[8..12], &[1, 0, 1, 0]);
    let file = open_bytes(lossy).unwrap();
    for (index, t) in file.tensors().iter().enumerate() {
        assert_eq!(t.codec, Codec::Lossy);
        assert!(t.blocks.iter().all(|b| b.mode == BlockMode::Lossy));
        let whole = file.decode_tensor(&t.name).unwrap();
        for k in 0..t.blocks.len() {
            let range = t.block_range(k);
            let mut block = vec![0u8; range.len()];
            file.decode_block_into(index, k, &mut block).unwrap();
            assert_eq!(block, whole[range]);
        }
    }
    // The decompressed file is an ordinary safetensors checkpoint with the original header.
    let restored = decompress(&file).unwrap();
    let reread = SafetensorsFile::from_bytes(Bytes::Owned(restored)).unwrap();
    assert_eq!(reread.header_json(), source.header_json());
    for t in &reread.tensors {
        assert_eq!(reread.data(t), file.decode_tensor(&t.name).unwrap());
    }
}

#[test]
fn damaged_lossy_payloads_never_panic() {
    let source = SafetensorsFile::open(&fixture("minilm_slice_f16.safetensors")).unwrap();
    let opts = lossy_opts(3, 64);
    let nzt = convert_to_vec(&source, &opts).unwrap();
    let file = open_bytes(nzt.clone()).unwrap();
    // The largest tensor: its blocks have a rANS stream, whose end checks catch most flips.
    let t = file.tensors().iter().max_by_key(|t| t.byte_len()).unwrap();
    let block = &t.blocks[0];
    let (start, len) = (block.offset as usize, block.stored_len as usize);
    let mut detected = 0;
    for pos in (start..start + len).step_by((len / 200).max(1)) {
        let mut damaged = nzt.clone();
        damaged[pos] ^= 0x5a;
        let checked = open_bytes(damaged.clone()).unwrap();
        assert!(
            decode_everything(&checked).is_err(),
            "flip at {pos} passed the checksum"
        );
        let unchecked = open_bytes(damaged)
            .unwrap()
            .with_options(neuzip::DecodeOptions {
                verify_checksums: false,
            });
        // Without checksums a flip may decode to other values, but never panics or makes a wrong size.
        detected += u64::from(decode_everything(&unchecked).is_err());
    }
    assert!(detected > 0);
}

#[test]
fn cli_converts_verifies_and_decompresses_a_lossy_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_bf16.safetensors");
    let nzt = dir.path().join("m.nzt");
    neuzip()
        .args([
            "convert",
            "--mantissa-bits",
            "3",
            "--tensor-bits",
            "*position*=lossless",
        ])
        .arg(&input)
        .arg("-o")
        .arg(&nzt)
        .assert()
        .success();
    let out = neuzip()
        .args(["verify", "--json", "--against"])
        .arg(&input)
        .arg(&nzt)
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lossy"], true);
    assert_eq!(r["passed"], true);
    assert_eq!(r["all_identical"], false);
    for t in r["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let lossy = !name.contains("position") && name.ends_with("dense.weight")
            || name.ends_with("query.weight");
        assert_eq!(t["codec"] == "lossy", lossy, "{name}");
        if lossy {
            assert_eq!(t["within_bound"], true);
            // Uniform relative rounding noise of +-2^-4 alone gives 10*log10(12 * 4^3) = 28.9 dB.
            let sqnr = t["error"]["sqnr_db"].as_f64().unwrap();
            assert!((25.0..40.0).contains(&sqnr), "{name}: {sqnr}");
            assert!(t["error"]["max_rel_error"].as_f64().unwrap() <= 1.0 / 16.0);
            assert!(t["bits_per_weight"].as_f64().unwrap() < 8.0);
        } else {
            assert_eq!(t["identical"], true, "{name}");
            assert!(t["error"]["sqnr_db"].is_null());
        }
    }
    neuzip()
        .args(["verify", "--against"])
        .arg(&input)
        .arg(&nzt)
        .assert()
        .success()
        .stdout(contains("SQNR"))
        .stdout(contains("within the error bound"));
    // Against a different original (one weight's exponent changed), the bound check fails.
    let mut other = std::fs::read(&input).unwrap();
    let source = SafetensorsFile::open(&input).unwrap();
    let query = source
        .tensors
        .iter()
        .find(|t| t.name.ends_with("query.weight"))
        .unwrap();
    let header_len = u64::from_le_bytes(other[..8].try_into().unwrap()) as usize;
    other[8 + header_len + query.start as usize + 1] ^= 0x01;
    let other_path = dir.path().join("other.safetensors");
    std::fs::write(&other_path, other).unwrap();
    neuzip()
        .args(["verify", "--against"])
        .arg(&other_path)
        .arg(&nzt)
        .assert()
        .failure()
        .stdout(contains("FAIL"))
        .stderr(contains("within the lossy error bound"));
    // decompress gives a safetensors file of the original's size and header.
    let restored = dir.path().join("r.safetensors");
    neuzip()
        .arg("decompress")
        .arg(&nzt)
        .arg("-o")
        .arg(&restored)
        .assert()
        .success();
    let reread = SafetensorsFile::open(&restored).unwrap();
    assert_eq!(reread.header_json(), source.header_json());
    assert_eq!(
        std::fs::metadata(&restored).unwrap().len(),
        source.file_len()
    );
}

#[test]
fn cli_rejects_bad_lossy_flags_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_bf16.safetensors");
    let out = dir.path().join("x.nzt");
    let cases: &[(&[&str], &str)] = &[
        (&["--mantissa-bits", "8"], "BF16 has 7"),
        (&["--mantissa-bits", "24"], "no dtype has more than 23"),
        (&["--tensor-bits", "*query*=9"], "BF16 has 7"),
        (
            &["--mantissa-bits", "3", "--norm-block", "0"],
            "between 1 and 1024",
        ),
        (
            &["--mantissa-bits", "3", "--norm-block", "1025"],
            "between 1 and 1024",
        ),
        (&["--tensor-bits", "noequals"], "expected PATTERN=VALUE"),
        (&["--tensor-bits", "*=many"], "not a bit count"),
        (&["--norm-block", "64", "--no-norm"], "cannot be used with"),
    ];
    assert_convert_refused(&input, &out, cases);
}

#[test]
fn sweep_predicts_the_exact_size_and_error_falls_with_k() {
    let input = fixture("minilm_slice_bf16.safetensors");
    let out = neuzip()
        .args(["analyze", "--sweep", "--json", "--norm-block", "256"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    let points: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 8); // K = 0..=6, then lossless
    assert!(points[7]["mantissa_bits"].is_null());
    assert!(points[7]["error"]["sqnr_db"].is_null());
    for pair in points[..7].windows(2) {
        assert!(pair[1]["bits_per_weight"].as_f64() > pair[0]["bits_per_weight"].as_f64());
        assert!(pair[1]["error"]["sqnr_db"].as_f64() > pair[0]["error"]["sqnr_db"].as_f64());
    }
    // The sweep's size at K = 3 is what convert writes with the same settings.
    let dir = tempfile::tempdir().unwrap();
    let nzt = dir.path().join("k3.nzt");
    neuzip()
        .args(["convert", "--mantissa-bits", "3", "--norm-block", "256"])
        .arg(&input)
        .arg("-o")
        .arg(&nzt)
        .assert()
        .success();
    assert_eq!(
        points[3]["predicted_bytes"].as_u64().unwrap(),
        std::fs::metadata(&nzt).unwrap().len()
    );
    neuzip()
        .args(["analyze", "--sweep", "--mantissa-bits", "2"])
        .arg(&input)
        .assert()
        .success()
        .stdout(contains("lossless"))
        .stdout(contains("SQNR dB"));
}

mod property {
    use super::*;
    use neuzip::codec::lossy::{encode_block, plan, LossyDecoder};
    use proptest::prelude::*;

    const DTYPES: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Arbitrary bit patterns (NaNs, Infs, subnormals, zeros of both signs among them), every dtype, any K
        /// below the mantissa width and any group size: encoded and decoded through the payload, every element
        /// keeps its NaN/Inf class and sign, and every finite one is within the spec's bound.
        #[test]
        fn any_block_decodes_within_the_bound(
            dtype_index in 0usize..3,
            k_fraction in 0.0f64..1.0,
            norm_block in prop_oneof![Just(0u32), 1u32..=1024],
            patterns in proptest::collection::vec(any::<u32>(), 1..700),
            scale_exponent in -30i32..30,
        ) {
            let dtype = DTYPES[dtype_index];
            let (_, man_bits) = widths(dtype);
            let k = ((k_fraction * man_bits as f64) as u32).min(man_bits - 1);
            let width = dtype.byte_width().unwrap();
            // Half the elements arbitrary bits, half weight-like values at a random scale.
            let mut block = Vec::with_capacity(patterns.len() * width);
            for (i, &p) in patterns.iter().enumerate() {
                let bits = if i % 2 == 0 {
                    p as u64
                } else {
                    let v = (p as f64 / u32::MAX as f64 - 0.5) * 2f64.powi(scale_exponent);
                    match dtype {
                        Dtype::F32 => (v as f32).to_bits() as u64,
                        Dtype::BF16 => half::bf16::from_f64(v).to_bits() as u64,
                        _ => half::f16::from_f64(v).to_bits() as u64,
                    }
                };
                block.extend_from_slice(&bits.to_le_bytes()[..width]);
            }
            let lossy = plan(dtype, k, norm_block, &block, 4096, &[]).unwrap();
            let payload = encode_block(&lossy.params, &lossy.quantizer, dtype, &block, 0);
            let decoder = LossyDecoder::new(lossy.params.clone(), dtype).unwrap();
            let mut out = vec![0u8; block.len()];
            decoder.decode_block(&payload, &mut out).unwrap();
            for (a, b) in block.chunks(width).zip(out.chunks(width)) {
                let (x, y) = (value(dtype, a), value(dtype, b));
                let sign = |e: &[u8]| e[width - 1] & 0x80;
                if x.is_nan() {
                    prop_assert!(y.is_nan() && sign(a) == sign(b));
                } else if x.is_infinite() {
                    prop_assert_eq!(a, b);
                } else {
                    prop_assert!(y.is_finite(), "{} -> {}", x, y);
                    let bound = spec_bound(dtype, k, norm_block > 0, x);
                    prop_assert!((y - x).abs() <= bound * (1.0 + 1e-12),
                        "{} K={} B={}: {:e} -> {:e}", dtype, k, norm_block, x, y);
                    // The sign is kept, zeros included.
                    prop_assert_eq!(sign(a), sign(b));
                }
            }
        }
    }
}

#[test]
fn importance_weighs_the_scale_bytes_of_its_tensor_only() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_bf16.safetensors");
    let source = SafetensorsFile::open(&input).unwrap();
    let query = "encoder.layer.0.attention.self.query.weight";
    let cols = 384;
    // Seeded importances spanning four decades.
    let mut rng = SplitMix::new(29);
    let importance: Vec<f32> = (0..cols)
        .map(|_| 10f64.powf(4.0 * rng.unit() - 2.0) as f32)
        .collect();
    let path = write_file(
        dir.path(),
        "importance.safetensors",
        &safetensors_bytes(
            &[TestTensor {
                name: query.into(),
                dtype: Dtype::F32,
                shape: vec![cols],
                data: importance.iter().flat_map(|v| v.to_le_bytes()).collect(),
            }],
            None,
        ),
    );
    let mut weighted = lossy_opts(3, 64);
    weighted.importance = Some(std::sync::Arc::new(
        neuzip::codec::codebook_format::Importance::from_file(
            &SafetensorsFile::open(&path).unwrap(),
        )
        .unwrap(),
    ));
    let with = open_bytes(convert_to_vec(&source, &weighted).unwrap()).unwrap();
    let without = open_bytes(convert_to_vec(&source, &lossy_opts(3, 64)).unwrap()).unwrap();
    let weighted_error = |file: &NztFile, t: &neuzip::source::SourceTensor| -> f64 {
        let decoded = file.decode_tensor(&t.name).unwrap();
        source
            .data(t)
            .chunks_exact(2)
            .zip(decoded.chunks_exact(2))
            .enumerate()
            .map(|(i, (x, y))| {
                let d = value(Dtype::BF16, x) - value(Dtype::BF16, y);
                importance[i % cols] as f64 * d * d
            })
            .sum()
    };
    for t in &source.tensors {
        let same = with.decode_tensor(&t.name).unwrap() == without.decode_tensor(&t.name).unwrap();
        assert_eq!(same, t.name != query, "{}", t.name);
        if t.name == query {
            let (w, u) = (weighted_error(&with, t), weighted_error(&without, t));
            assert!(w < u, "weighted error {w} with the importance, {u} without");
        }
    }
    // The CLI writes the same file from the same flags.
    let flags = [
        "--tensor-bits",
        "*=3",
        "--norm-block",
        "64",
        "--block-elements",
        "4096",
    ];
    let flags = flags
        .iter()
        .map(std::ffi::OsStr::new)
        .chain(["--importance".as_ref(), path.as_os_str()]);
    let expected = convert_to_vec(&source, &weighted).unwrap();
    assert_cli_writes(flags, &input, &dir.path().join("x.nzt"), &expected);
}
