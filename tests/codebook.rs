//! Codebook mode end to end: every decoded codebook tensor equals the library fit's reconstruction rounded to
//! the dtype, bit for bit (BF16, F16, F32, rank 2 and 3, several blocks); the default rules keep 1-D tensors
//! and embeddings lossless; the file bytes do not depend on the thread count; damaged blocks are caught by
//! their checksums and never panic; the CLI's flags, errors and `verify --against`.

mod common;

use assert_cmd::Command;
use predicates::str::contains;

use neuzip::codec::codebook::{self, ErrorWeights, FitOptions};
use neuzip::convert::{convert_to_vec, ConvertOptions};
use neuzip::format::{BlockMode, Codec};
use neuzip::mmap::Bytes;
use neuzip::precision::{CodebookChoice, CodebookMode, CodebookSettings};
use neuzip::source::SafetensorsFile;
use neuzip::{Dtype, NztFile};

use common::*;

fn neuzip() -> Command {
    let mut cmd = Command::cargo_bin("neuzip").expect("neuzip binary");
    cmd.timeout(std::time::Duration::from_secs(120));
    cmd
}

/// Fixed-rate codebook options: `2^bits` codewords.
fn codebook_opts(bits: u32, group_size: u32, row_clusters: u32, block: u32) -> ConvertOptions {
    ConvertOptions {
        float_block_elements: block,
        codebook: CodebookSettings {
            default_bits: Some(bits as f64),
            mode: CodebookMode::FixedRate,
            group_size,
            row_clusters,
            ..CodebookSettings::default()
        },
        ..ConvertOptions::default()
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        _ => unreachable!(),
    }
}

/// `values` rounded to `dtype` (nearest even, by the `half` crate) as little-endian bytes.
fn to_dtype_bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        match dtype {
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
    out
}

fn sqnr_db(original: &[f32], decoded: &[f32]) -> f64 {
    let signal: f64 = original.iter().map(|&x| (x as f64).powi(2)).sum();
    let noise: f64 = original
        .iter()
        .zip(decoded)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    10.0 * (signal / noise).log10()
}

/// Converts `source` and checks every tensor: codebook ones equal the fit (refitted here with the same
/// options) rounded to the dtype, decoded whole and block by block; the others bit-exact. Returns the
/// codebook tensors' names and their SQNR.
fn check_file(source: &SafetensorsFile, opts: &ConvertOptions) -> Vec<(String, f64)> {
    let nzt = convert_to_vec(source, opts).unwrap();
    assert_eq!(&nzt[8..12], &[1, 0, 2, 0], "version 1.2");
    let file = open_bytes(nzt).unwrap();
    let mut quantized = Vec::new();
    for (index, (t, s)) in file.tensors().iter().zip(&source.tensors).enumerate() {
        let original = source.data(s);
        let whole = file.decode_tensor(&t.name).unwrap();
        for k in 0..t.blocks.len() {
            let range = t.block_range(k);
            let mut block = vec![0u8; range.len()];
            file.decode_block_into(index, k, &mut block).unwrap();
            assert_eq!(block, whole[range], "{} block {k}", t.name);
        }
        let bits = opts
            .codebook
            .bits_for(&t.name, t.dtype, t.shape.len())
            .map(|b| b as u32);
        let Some(bits) = bits else {
            assert_ne!(t.codec, Codec::Codebook, "{}", t.name);
            assert_eq!(whole, original, "{} should be lossless", t.name);
            continue;
        };
        assert_eq!(t.codec, Codec::Codebook, "{}", t.name);
        assert!(t.blocks.iter().all(|b| b.mode == BlockMode::Codebook));
        let cols = *t.shape.last().unwrap() as usize;
        let rows = (t.elements().unwrap() as usize) / cols;
        assert_eq!(t.block_units as usize % cols, 0);
        let weights = to_f32(t.dtype, original);
        let fit = FitOptions {
            index_bits: bits,
            group_size: opts.codebook.group_size as usize,
            row_clusters: opts.codebook.row_clusters as usize,
            ..FitOptions::default()
        };
        let (q, _) = codebook::fit(&weights, rows, cols, ErrorWeights::AbsPlusSigma, &fit).unwrap();
        let want = to_dtype_bytes(t.dtype, &q.dequantize());
        assert!(whole == want, "{}: decoded differs from the fit", t.name);
        quantized.push((t.name.clone(), sqnr_db(&weights, &to_f32(t.dtype, &whole))));
    }
    quantized
}

#[test]
fn decoded_tensors_are_the_fit_rounded_to_the_dtype() {
    for name in [
        "minilm_slice_bf16.safetensors",
        "minilm_slice_f16.safetensors",
        "minilm_slice_f32.safetensors",
    ] {
        let source = SafetensorsFile::open(&fixture(name)).unwrap();
        // 3 rows of 384 per block: many blocks, a short last one for the 256-row tensor.
        let mut by_bits = Vec::new();
        for bits in [3, 4] {
            let q = check_file(&source, &codebook_opts(bits, 128, 4, 1200));
            // The 1-D tensors and the position embeddings stay lossless by default.
            let names: Vec<&str> = q.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "encoder.layer.0.attention.self.query.weight",
                    "encoder.layer.0.intermediate.dense.weight"
                ],
                "{name}"
            );
            by_bits.push(q);
        }
        for ((tensor, sqnr3), (_, sqnr4)) in by_bits[0].iter().zip(&by_bits[1]) {
            // About 6 dB per bit; a broken decoder (wrong scale, codebook or index) is far below.
            assert!(*sqnr3 > 10.0, "{name} {tensor}: {sqnr3} dB at 3 bits");
            assert!(
                sqnr4 > &(sqnr3 + 3.0),
                "{name} {tensor}: {sqnr4} dB at 4 bits"
            );
        }
    }
}

#[test]
fn rules_and_higher_ranks() {
    let mut rng = SplitMix::new(5);
    let tensors = vec![
        TestTensor {
            name: "a.embeddings.weight".into(),
            dtype: Dtype::F32,
            shape: vec![20, 30],
            data: gaussian_tensor(&mut rng, Dtype::F32, 600, 0.05),
        },
        TestTensor {
            name: "conv.weight".into(),
            dtype: Dtype::F16,
            shape: vec![5, 3, 50],
            data: gaussian_tensor(&mut rng, Dtype::F16, 750, 0.1),
        },
        TestTensor {
            name: "norm.weight".into(),
            dtype: Dtype::BF16,
            shape: vec![70],
            data: gaussian_tensor(&mut rng, Dtype::BF16, 70, 1.0),
        },
        TestTensor {
            name: "head.weight".into(),
            dtype: Dtype::BF16,
            shape: vec![9, 40],
            data: gaussian_tensor(&mut rng, Dtype::BF16, 360, 0.02),
        },
    ];
    let source =
        SafetensorsFile::from_bytes(Bytes::Owned(safetensors_bytes(&tensors, None))).unwrap();
    // Rows of 50 with groups of 16 (a short last group), 3 clusters, 2 rows per block.
    let opts = codebook_opts(3, 16, 3, 100);
    let q = check_file(&source, &opts);
    let mut names: Vec<&str> = q.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["conv.weight", "head.weight"]);
    // Rules override the defaults both ways; a 1-D tensor is one row.
    let mut opts = codebook_opts(3, 16, 3, 100);
    for rule in ["*embeddings*=2", "norm.*=4", "head.*=lossless"] {
        opts.codebook
            .rules
            .push_parsed(rule, CodebookChoice::parse)
            .unwrap();
    }
    let q = check_file(&source, &opts);
    let mut names: Vec<&str> = q.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a.embeddings.weight", "conv.weight", "norm.weight"]);
}

#[test]
fn a_tensor_with_non_finite_weights_stays_lossless() {
    let mut rng = SplitMix::new(9);
    let mut data = gaussian_tensor(&mut rng, Dtype::F32, 400, 0.1);
    data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    let tensors = vec![TestTensor {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![10, 40],
        data: data.clone(),
    }];
    let source =
        SafetensorsFile::from_bytes(Bytes::Owned(safetensors_bytes(&tensors, None))).unwrap();
    let nzt = convert_to_vec(&source, &codebook_opts(4, 128, 4, 4096)).unwrap();
    let file = open_bytes(nzt).unwrap();
    assert_ne!(file.tensors()[0].codec, Codec::Codebook);
    assert_eq!(file.decode_tensor("w").unwrap(), data);
}

#[test]
fn file_bytes_do_not_depend_on_the_thread_count() {
    let source = SafetensorsFile::open(&fixture("minilm_slice_bf16.safetensors")).unwrap();
    let on = |opts: &ConvertOptions, threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| convert_to_vec(&source, opts).unwrap())
    };
    // Fixed rate, then the rate search: every fit it tries is deterministic, so it ends at the same one.
    for (what, opts) in [
        ("fixed rate", codebook_opts(3, 64, 4, 4096)),
        ("rate target", rate_opts(3.5, 4096)),
    ] {
        let one = on(&opts, 1);
        assert!(
            one == on(&opts, 2),
            "{what}: 1 and 2 threads wrote different files"
        );
        assert!(
            one == on(&opts, 3),
            "{what}: 1 and 3 threads wrote different files"
        );
    }
}

/// Rate-targeted options: each codebook tensor at most `rate` bits per weight.
fn rate_opts(rate: f64, block: u32) -> ConvertOptions {
    ConvertOptions {
        float_block_elements: block,
        codebook: CodebookSettings {
            default_bits: Some(rate),
            ..CodebookSettings::default()
        },
        ..ConvertOptions::default()
    }
}

/// A codebook tensor's size in the file as a rate budget counts it: params and block payloads, per weight.
fn stored_bits_per_weight(t: &neuzip::format::header::TensorEntry) -> f64 {
    let bytes = t.params.len() as u64 + t.stored_len();
    8.0 * bytes as f64 / t.elements().unwrap() as f64
}

#[test]
fn rate_targeted_tensors_fill_their_budget_and_decode_to_the_library_fit() {
    for name in [
        "minilm_slice_f32.safetensors",
        "minilm_slice_bf16.safetensors",
    ] {
        let source = SafetensorsFile::open(&fixture(name)).unwrap();
        for rate in [2.5, 3.0, 4.25] {
            // 10 rows of 384 per block, so the stream headers of many blocks count against the budget.
            let opts = rate_opts(rate, 3840);
            let file = open_bytes(convert_to_vec(&source, &opts).unwrap()).unwrap();
            let mut coded = 0;
            for (t, s) in file.tensors().iter().zip(&source.tensors) {
                if t.codec != Codec::Codebook {
                    continue;
                }
                coded += 1;
                let bits = stored_bits_per_weight(t);
                // At most the budget, and the search uses most of it.
                assert!(bits <= rate, "{name} {} at {rate}: {bits}", t.name);
                assert!(
                    bits > rate - 0.1,
                    "{name} {} at {rate}: only {bits}",
                    t.name
                );
                let plan = neuzip::codec::codebook_format::plan_at_rate(
                    t.dtype,
                    &t.shape,
                    source.data(s),
                    &FitOptions::default(),
                    ErrorWeights::AbsPlusSigma,
                    3840,
                    rate,
                )
                .unwrap();
                assert_eq!(plan.params.to_bytes(), t.params, "{}", t.name);
                assert!((plan.bits_per_weight() - bits).abs() < 1e-12);
                let decoded = file.decode_tensor(&t.name).unwrap();
                let want =
                    neuzip::codec::codebook_format::reconstruction_bytes(&plan.quantized, t.dtype);
                assert!(
                    decoded == want,
                    "{name} {}: decoded differs from the fit",
                    t.name
                );
            }
            assert_eq!(coded, 2, "{name}");
        }
    }
}

#[test]
fn rate_target_beats_fixed_rate_at_the_same_size() {
    let source = SafetensorsFile::open(&fixture("minilm_slice_f32.safetensors")).unwrap();
    for bits in [2, 3] {
        let fixed =
            open_bytes(convert_to_vec(&source, &codebook_opts(bits, 128, 4, 1 << 17)).unwrap())
                .unwrap();
        for (t, s) in fixed.tensors().iter().zip(&source.tensors) {
            if t.codec != Codec::Codebook {
                continue;
            }
            let original = to_f32(t.dtype, source.data(s));
            let cols = *t.shape.last().unwrap() as usize;
            let fit = FitOptions {
                index_bits: bits,
                ..FitOptions::default()
            };
            let (q, _) = codebook::fit(
                &original,
                original.len() / cols,
                cols,
                ErrorWeights::AbsPlusSigma,
                &fit,
            )
            .unwrap();
            let fixed_sqnr = sqnr_db(
                &original,
                &to_f32(t.dtype, &fixed.decode_tensor(&t.name).unwrap()),
            );
            // Two budgets: the tensor's size with B-bit indices, and (at 3 bits; at 2 it is under the
            // smallest rate, 2) the fixed-rate tensor's size in the file, its indices rANS-coded too. The rate
            // term and a larger codebook buy more at either.
            let mut budgets = vec![(q.fixed_rate_size().bits_per_weight(), 1.0)];
            if bits == 3 {
                budgets.push((stored_bits_per_weight(t), 0.25));
            }
            for (budget, gain) in budgets {
                let mut opts = rate_opts(2.0, 1 << 17);
                opts.codebook.default_bits = None;
                opts.codebook
                    .rules
                    .push_parsed(&format!("{}={budget}", t.name), CodebookChoice::parse)
                    .unwrap();
                let targeted = open_bytes(convert_to_vec(&source, &opts).unwrap()).unwrap();
                let other = &targeted.tensors()[targeted.tensor_index(&t.name).unwrap()];
                assert!(stored_bits_per_weight(other) <= budget);
                let decoded = to_f32(t.dtype, &targeted.decode_tensor(&t.name).unwrap());
                let targeted_sqnr = sqnr_db(&original, &decoded);
                assert!(
                    targeted_sqnr > fixed_sqnr + gain,
                    "{} B={bits} at {budget:.3} bits: {targeted_sqnr} dB vs fixed {fixed_sqnr} dB",
                    t.name
                );
            }
        }
    }
}

#[test]
fn a_tensor_too_small_for_its_budget_gets_the_fixed_rate_fit() {
    let mut rng = SplitMix::new(21);
    let tensors = vec![TestTensor {
        name: "tiny.weight".into(),
        dtype: Dtype::F32,
        shape: vec![4, 16],
        data: gaussian_tensor(&mut rng, Dtype::F32, 64, 0.1),
    }];
    let source =
        SafetensorsFile::from_bytes(Bytes::Owned(safetensors_bytes(&tensors, None))).unwrap();
    // 64 weights: one stream header alone (132 bytes) is over 16 bits per weight.
    let file = open_bytes(convert_to_vec(&source, &rate_opts(2.5, 4096)).unwrap()).unwrap();
    let t = &file.tensors()[0];
    assert_eq!(t.codec, Codec::Codebook);
    assert!(stored_bits_per_weight(t) > 2.5);
    let fixed =
        open_bytes(convert_to_vec(&source, &codebook_opts(2, 128, 4, 4096)).unwrap()).unwrap();
    assert_eq!(t.params, fixed.tensors()[0].params);
    assert_eq!(
        file.decode_tensor("tiny.weight").unwrap(),
        fixed.decode_tensor("tiny.weight").unwrap()
    );
}

#[test]
fn damaged_codebook_blocks_are_caught_and_never_panic() {
    let source = SafetensorsFile::open(&fixture("minilm_slice_f16.safetensors")).unwrap();
    let nzt = convert_to_vec(&source, &codebook_opts(4, 128, 4, 4096)).unwrap();
    let file = open_bytes(nzt.clone()).unwrap();
    let t = file
        .tensors()
        .iter()
        .find(|t| t.codec == Codec::Codebook)
        .unwrap();
    let block = &t.blocks[0];
    let (start, len) = (block.offset as usize, block.stored_len as usize);
    let mut detected = 0;
    for pos in (start..start + len).step_by((len / 150).max(1)) {
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
        // Without checksums a flip may decode to other values, but never panics.
        detected += u64::from(decode_everything(&unchecked).is_err());
    }
    // Cluster ids, scales and stream states and lengths are checked.
    assert!(detected > 0);
    // A flip in the tensor's params (in the header section) is caught when the file is opened.
    let params_at = nzt
        .windows(t.params.len())
        .position(|w| w == t.params.as_slice())
        .unwrap();
    for offset in [0, 5, 12, t.params.len() - 1] {
        let mut damaged = nzt.clone();
        damaged[params_at + offset] ^= 0x21;
        assert!(open_bytes(damaged).is_err(), "params byte {offset}");
    }
}

#[test]
fn cli_converts_and_verifies_a_codebook_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_f32.safetensors");
    let nzt = dir.path().join("m.nzt");
    neuzip()
        .args([
            "convert",
            "--codebook-bits",
            "4",
            "--group-size",
            "64",
            "--row-clusters",
            "2",
            "--tensor-bits",
            "*intermediate*=lossless",
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
        let quantized = name.ends_with("query.weight");
        assert_eq!(t["codec"] == "codebook", quantized, "{name}");
        if quantized {
            assert_eq!(t["within_bound"], true);
            let sqnr = t["error"]["sqnr_db"].as_f64().unwrap();
            assert!((15.0..35.0).contains(&sqnr), "{name}: {sqnr}");
            // 4-bit indices before entropy coding, plus scales (16 bits per 64 weights) and codebooks.
            let bpw = t["bits_per_weight"].as_f64().unwrap();
            assert!((2.0..4.6).contains(&bpw), "{name}: {bpw}");
        } else {
            assert_eq!(t["identical"], true, "{name}");
        }
    }
    neuzip()
        .args(["verify", "--against"])
        .arg(&input)
        .arg(&nzt)
        .assert()
        .success()
        .stdout(contains("SQNR"))
        .stdout(contains("codebook"));
    let restored = dir.path().join("r.safetensors");
    neuzip()
        .arg("decompress")
        .arg(&nzt)
        .arg("-o")
        .arg(&restored)
        .assert()
        .success();
    let source = SafetensorsFile::open(&input).unwrap();
    let reread = SafetensorsFile::open(&restored).unwrap();
    assert_eq!(reread.header_json(), source.header_json());
    let file = NztFile::open(&nzt).unwrap();
    for t in &reread.tensors {
        assert_eq!(reread.data(t), file.decode_tensor(&t.name).unwrap());
    }
}

#[test]
fn cli_rejects_bad_codebook_flags_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_bf16.safetensors");
    let out = dir.path().join("x.nzt");
    let cases: &[(&[&str], &str)] = &[
        (&["--codebook-bits", "1"], "between 2 and 8"),
        (&["--codebook-bits", "9"], "between 2 and 8"),
        (
            &["--codebook-bits", "4", "--group-size", "0"],
            "--group-size",
        ),
        (
            &["--codebook-bits", "4", "--row-clusters", "0"],
            "between 1 and 256",
        ),
        (
            &["--codebook-bits", "4", "--row-clusters", "257"],
            "between 1 and 256",
        ),
        (
            &["--codebook-bits", "4", "--mantissa-bits", "3"],
            "cannot be used with",
        ),
        (&["--group-size", "64"], "--codebook-bits"),
        (&["--row-clusters", "2"], "--codebook-bits"),
        (
            &["--codebook-bits", "4", "--tensor-bits", "*query*=9"],
            "outside 2..=8",
        ),
        (
            &["--codebook-bits", "4", "--tensor-bits", "*=many"],
            "not a bit count",
        ),
        (&["--codebook-bits", "3.5", "--fixed-rate"], "whole number"),
        (
            &[
                "--codebook-bits",
                "3",
                "--fixed-rate",
                "--tensor-bits",
                "*query*=2.5",
            ],
            "whole number",
        ),
        (&["--codebook-bits", "nan"], "between 2 and 8"),
        (&["--fixed-rate"], "--codebook-bits"),
    ];
    assert_convert_refused(&input, &out, cases);
}

#[test]
fn codebook_sweep_predicts_the_exact_size_and_the_verified_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_bf16.safetensors");
    let out = neuzip()
        .args(["analyze", "--sweep", "--json", "--codebook-bits", "3.5"])
        .args(["--group-size", "64"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    let sweep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = sweep["points"].as_array().unwrap();
    let rates: Vec<Option<f64>> = points.iter().map(|p| p["codebook_bits"].as_f64()).collect();
    assert_eq!(rates, [Some(2.0), Some(3.0), Some(3.5), None]);
    let mut last_sqnr = 0.0;
    for p in &points[..3] {
        let r = p["codebook_bits"].as_f64().unwrap();
        let nzt = dir.path().join(format!("r{r}.nzt"));
        neuzip()
            .args(["convert", "--codebook-bits", &r.to_string()])
            .args(["--group-size", "64"])
            .arg(&input)
            .arg("-o")
            .arg(&nzt)
            .assert()
            .success();
        assert_eq!(
            p["predicted_bytes"].as_u64().unwrap(),
            std::fs::metadata(&nzt).unwrap().len(),
            "R = {r}"
        );
        let verified = neuzip()
            .args(["verify", "--json", "--against"])
            .arg(&input)
            .arg(&nzt)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
        let sqnr = p["error"]["sqnr_db"].as_f64().unwrap();
        assert_eq!(sqnr, v["error"]["sqnr_db"].as_f64().unwrap(), "R = {r}");
        assert!(sqnr > last_sqnr + 2.0, "R = {r}: {sqnr} dB");
        last_sqnr = sqnr;
        // The codebook tensors' own figures: their bytes are the verified params and payloads.
        let codebook = &p["codebook"];
        assert_eq!(codebook["tensors"], 2);
        let stored: u64 = v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["codec"] == "codebook")
            .map(|t| {
                let payload =
                    t["bits_per_weight"].as_f64().unwrap() * t["bytes"].as_f64().unwrap() / 16.0;
                payload.round() as u64 + t["params_bytes"].as_u64().unwrap()
            })
            .sum();
        assert_eq!(
            codebook["stored_bytes"].as_u64().unwrap(),
            stored,
            "R = {r}"
        );
        assert!(codebook["bits_per_weight"].as_f64().unwrap() <= r);
    }
    // Baselines on the same two tensors: RTN at the whole rates and NF4, metadata counted.
    let baselines = sweep["baselines"].as_array().unwrap();
    let names: Vec<(String, u64)> = baselines
        .iter()
        .map(|b| {
            (
                b["method"].as_str().unwrap().to_string(),
                b["bits"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("rtn-g128-clip".to_string(), 2),
            ("rtn-g128-clip".to_string(), 3),
            ("nf4-b64".to_string(), 4)
        ]
    );
    let weights = points[0]["codebook"]["weights"].as_u64().unwrap();
    for b in baselines {
        assert_eq!(b["weights"].as_u64().unwrap(), weights);
        assert_eq!(b["per_tensor"].as_array().unwrap().len(), 2);
        // B bits per code, an f16 scale and a B-bit zero point per 128 (RTN); 4 bits and an f16 per 64 (NF4).
        let bits = b["bits"].as_f64().unwrap();
        let side = if b["method"] == "nf4-b64" {
            16.0 / 64.0
        } else {
            (16.0 + bits) / 128.0
        };
        assert!(
            (b["bits_per_weight"].as_f64().unwrap() - bits - side).abs() < 1e-9,
            "{b}"
        );
    }
    // The rate-targeted codebook at 3 bits per weight (groups of 64) beats RTN-3, which takes 3.148.
    let codebook3 = points[1]["codebook"]["error"]["sqnr_db"].as_f64().unwrap();
    let rtn3 = baselines[1]["error"]["sqnr_db"].as_f64().unwrap();
    assert!(codebook3 > rtn3, "codebook {codebook3} dB, RTN-3 {rtn3} dB");
    // The text report shows both tables.
    neuzip()
        .args(["analyze", "--sweep", "--codebook-bits", "2", "--fixed-rate"])
        .arg(&input)
        .assert()
        .success()
        .stdout(contains("fixed rate"))
        .stdout(contains("codebook R=2"))
        .stdout(contains("rtn2-g128-clip"))
        .stdout(contains("nf4-b64"));
}

#[test]
fn importance_file_weights_the_fit_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("minilm_slice_f32.safetensors");
    let source = SafetensorsFile::open(&input).unwrap();
    let query = "encoder.layer.0.attention.self.query.weight";
    // Seeded importances spanning four decades, so that they change which errors the fit prefers.
    let mut rng = SplitMix::new(17);
    let values: Vec<f32> = (0..384)
        .map(|_| 10f64.powf(4.0 * rng.unit() - 2.0) as f32)
        .collect();
    let importance_tensor = |values: &[f32], name: &str| TestTensor {
        name: name.into(),
        dtype: Dtype::F32,
        shape: vec![values.len()],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let good = write_file(
        dir.path(),
        "importance.safetensors",
        &safetensors_bytes(&[importance_tensor(&values, query)], None),
    );
    // In the library: the query tensor decodes to the fit with those error weights, the other to the default.
    let mut opts = codebook_opts(3, 128, 4, 4096);
    let importance = neuzip::codec::codebook_format::Importance::from_file(
        &SafetensorsFile::open(&good).unwrap(),
    )
    .unwrap();
    opts.importance = Some(std::sync::Arc::new(importance));
    let file = open_bytes(convert_to_vec(&source, &opts).unwrap()).unwrap();
    let plain =
        open_bytes(convert_to_vec(&source, &codebook_opts(3, 128, 4, 4096)).unwrap()).unwrap();
    for (t, s) in file.tensors().iter().zip(&source.tensors) {
        if t.codec != Codec::Codebook {
            continue;
        }
        let weights = to_f32(t.dtype, source.data(s));
        let cols = *t.shape.last().unwrap() as usize;
        let error_weights = if t.name == query {
            ErrorWeights::PerInput(&values)
        } else {
            ErrorWeights::AbsPlusSigma
        };
        let fit = FitOptions {
            index_bits: 3,
            ..FitOptions::default()
        };
        let (q, _) =
            codebook::fit(&weights, weights.len() / cols, cols, error_weights, &fit).unwrap();
        let decoded = file.decode_tensor(&t.name).unwrap();
        assert!(
            decoded == to_dtype_bytes(t.dtype, &q.dequantize()),
            "{}",
            t.name
        );
        let without = plain.decode_tensor(&t.name).unwrap();
        assert_eq!(decoded == without, t.name != query, "{}", t.name);
    }
    // The CLI takes the same file; a vector of the wrong length, a negative value, or the flag without
    // --codebook-bits is refused before anything is written.
    let out = dir.path().join("x.nzt");
    let flags = [
        "--codebook-bits",
        "3",
        "--fixed-rate",
        "--block-elements",
        "4096",
    ];
    let flags = flags
        .iter()
        .map(std::ffi::OsStr::new)
        .chain(["--importance".as_ref(), good.as_os_str()]);
    assert_cli_writes(
        flags,
        &input,
        &out,
        &convert_to_vec(&source, &opts).unwrap(),
    );
    std::fs::remove_file(&out).unwrap();
    let short = write_file(
        dir.path(),
        "short.safetensors",
        &safetensors_bytes(&[importance_tensor(&values[..10], query)], None),
    );
    let mut negative_values = values.clone();
    negative_values[3] = -1.0;
    let negative = write_file(
        dir.path(),
        "negative.safetensors",
        &safetensors_bytes(&[importance_tensor(&negative_values, query)], None),
    );
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--codebook-bits".into(),
                "3".into(),
                "--importance".into(),
                short.display().to_string(),
            ],
            "has 10 values, the tensor has 384 inputs",
        ),
        (
            vec![
                "--codebook-bits".into(),
                "3".into(),
                "--importance".into(),
                negative.display().to_string(),
            ],
            "negative or non-finite",
        ),
        (
            vec!["--importance".into(), good.display().to_string()],
            "--codebook-bits",
        ),
    ];
    for (flags, message) in cases {
        neuzip()
            .arg("convert")
            .args(&flags)
            .arg(&input)
            .arg("-o")
            .arg(&out)
            .assert()
            .failure()
            .stderr(contains(message));
        assert!(!out.exists(), "{flags:?} left an output");
    }
}

#[test]
fn progress_counts_every_tensor_byte_while_planning_and_again_while_encoding() {
    // Codebook fits are most of a codebook conversion's time, so the bar must move during planning too.
    let src = fixture("minilm_slice_bf16.safetensors");
    let source = SafetensorsFile::open(&src).unwrap();
    let tensor_bytes: u64 = source
        .tensors
        .iter()
        .map(|t| source.data(t).len() as u64)
        .sum();
    let dir = tempfile::tempdir().unwrap();
    let reported = std::sync::Mutex::new(Vec::new());
    neuzip::convert::convert_file(
        &src,
        &dir.path().join("out.nzt"),
        &codebook_opts(3, 64, 4, 4096),
        &|n| reported.lock().unwrap().push(n),
    )
    .unwrap();
    let reported = reported.into_inner().unwrap();
    let total: u64 = reported.iter().sum();
    assert_eq!(total, neuzip::convert::PROGRESS_PASSES * tensor_bytes);
    // Planning reports one call per tensor, first: those calls alone add up to the tensor bytes.
    let planned: u64 = reported[..source.tensors.len()].iter().sum();
    assert_eq!(
        planned, tensor_bytes,
        "planning did not report every tensor first"
    );
}

#[test]
fn codebook_sweep_reports_the_fixed_length_index_size_beside_the_coded_one() {
    // At fixed rate B: B bits per index, f16 scales per (row, group), K codebooks of 2^B f16 entries,
    // ceil(log2 K) bits of cluster id per row and the f32 tensor scale, counted here from the shapes.
    let input = fixture("minilm_slice_bf16.safetensors");
    let (group, clusters) = (64u64, 4u64);
    let out = neuzip()
        .args([
            "analyze",
            "--sweep",
            "--json",
            "--codebook-bits",
            "3",
            "--fixed-rate",
        ])
        .args(["--group-size", "64", "--row-clusters", "4"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    let sweep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let source = SafetensorsFile::open(&input).unwrap();
    let matrices: Vec<(u64, u64)> = source
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2 && !t.name.contains("embeddings"))
        .map(|t| (t.shape[0], t.shape[1]))
        .collect();
    let weights: u64 = matrices.iter().map(|(r, c)| r * c).sum();
    for p in sweep["points"].as_array().unwrap() {
        let Some(b) = p["codebook_bits"].as_f64() else {
            continue;
        };
        let b = b as u64;
        let side: u64 = matrices
            .iter()
            .map(|&(rows, cols)| {
                16 * rows * cols.div_ceil(group) + 16 * clusters * (1 << b) + 2 * rows + 32
            })
            .sum();
        let expected = (b * weights + side) as f64 / weights as f64;
        let codebook = &p["codebook"];
        let fixed_length = codebook["fixed_length_bits_per_weight"].as_f64().unwrap();
        assert!(
            (fixed_length - expected).abs() < 1e-9,
            "B = {b}: {fixed_length} vs {expected}"
        );
        // Entropy-coded indices take less than fixed-length ones.
        assert!(
            codebook["bits_per_weight"].as_f64().unwrap() < fixed_length,
            "B = {b}"
        );
    }
}
