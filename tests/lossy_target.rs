//! Lossy mode with a size target (`convert --target-bits R`): the file stays within R bits per weight, more
//! room never means more error, the choice beats one K for all at that K's size, rules and 1-D tensors keep
//! their settings, a target at or above the lossless size gives the lossless file, the bytes do not depend
//! on the thread count, and bad targets are refused. With K given too, every free tensor keeps that K and
//! only the normalization groups are chosen. Errors are measured here by decoding the file and
//! comparing values, independently of the allocator's own figures.

mod common;

use assert_cmd::Command;

use neuzip::codec::lossy::LossyParams;
use neuzip::convert::{convert_to_vec, ConvertOptions};
use neuzip::format::Codec;
use neuzip::mmap::Bytes;
use neuzip::precision::Precision;
use neuzip::source::SafetensorsFile;
use neuzip::{Dtype, NzError};

use common::*;

const FIXTURE: &str = "minilm_slice_bf16.safetensors";

fn source() -> SafetensorsFile {
    let bytes = std::fs::read(fixture(FIXTURE)).unwrap();
    SafetensorsFile::from_bytes(Bytes::Owned(bytes)).unwrap()
}

fn opts() -> ConvertOptions {
    ConvertOptions {
        float_block_elements: 4096,
        ..ConvertOptions::default()
    }
}

fn with_target(r: f64) -> ConvertOptions {
    ConvertOptions {
        target_bits_per_weight: Some(r),
        ..opts()
    }
}

fn uniform(k: u32) -> ConvertOptions {
    let mut o = opts();
    o.lossy.default_bits = Some(k);
    o
}

fn elements(source: &SafetensorsFile) -> u64 {
    source
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<u64>())
        .sum()
}

fn bits_per_weight(source: &SafetensorsFile, nzt: &[u8]) -> f64 {
    8.0 * nzt.len() as f64 / elements(source) as f64
}

fn bf16(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
        .collect()
}

/// Sum over the rank-2 tensors of error energy / signal energy, from the decoded file.
fn summed_relative_error(source: &SafetensorsFile, nzt: Vec<u8>) -> f64 {
    let file = open_bytes(nzt).unwrap();
    let mut sum = 0.0;
    for t in source.tensors.iter().filter(|t| t.shape.len() >= 2) {
        let original = bf16(source.data(t));
        let decoded = bf16(&file.decode_tensor(&t.name).unwrap());
        let signal: f64 = original.iter().map(|x| x * x).sum();
        let error: f64 = original
            .iter()
            .zip(&decoded)
            .map(|(x, y)| (x - y) * (x - y))
            .sum();
        sum += error / signal;
    }
    sum
}

#[test]
fn the_target_is_met_and_more_room_never_costs_error() {
    let source = source();
    assert!(source.tensors.iter().all(|t| t.dtype == Dtype::BF16));
    let smallest = bits_per_weight(&source, &convert_to_vec(&source, &uniform(0)).unwrap());
    let lossless = bits_per_weight(&source, &convert_to_vec(&source, &opts()).unwrap());
    let mut previous = f64::INFINITY;
    let steps = 9;
    for i in 0..=steps {
        let target = smallest + (lossless - smallest) * i as f64 / steps as f64;
        let nzt = convert_to_vec(&source, &with_target(target)).unwrap();
        let got = bits_per_weight(&source, &nzt);
        assert!(got <= target, "target {target}: {got} bits/weight");
        let error = summed_relative_error(&source, nzt);
        assert!(
            error <= previous,
            "target {target}: error {error} above {previous} at a smaller target"
        );
        previous = error;
    }
    assert_eq!(previous, 0.0, "the lossless size allows no error");
}

#[test]
fn the_choice_beats_one_k_for_all_at_that_size() {
    let source = source();
    for k in [1, 3, 5] {
        let one_k = convert_to_vec(&source, &uniform(k)).unwrap();
        // A hair of room over the uniform file's size: the search rounds sizes up.
        let target = bits_per_weight(&source, &one_k) * 1.001;
        let chosen = convert_to_vec(&source, &with_target(target)).unwrap();
        let (uniform_error, chosen_error) = (
            summed_relative_error(&source, one_k),
            summed_relative_error(&source, chosen),
        );
        assert!(
            chosen_error <= uniform_error,
            "K={k}: allocated {chosen_error} vs uniform {uniform_error}"
        );
    }
}

#[test]
fn rules_and_vectors_keep_their_settings() {
    let source = source();
    // Room above the floor the lossless query matrix sets (about 8 bits per weight).
    let mut o = with_target(9.0);
    o.lossy
        .rules
        .push_parsed("*query.weight=lossless", Precision::parse)
        .unwrap();
    o.lossy
        .rules
        .push_parsed("*intermediate*=2", Precision::parse)
        .unwrap();
    let file = open_bytes(convert_to_vec(&source, &o).unwrap()).unwrap();
    for e in file.tensors() {
        let lossy = e.codec == Codec::Lossy;
        if e.name.contains("query.weight") || e.shape.len() < 2 {
            assert!(!lossy, "{} became lossy", e.name);
        }
        if e.name.contains("intermediate") {
            assert!(lossy, "{} is not lossy", e.name);
            let expected = convert_to_vec(&source, &{
                let mut u = opts();
                u.lossy
                    .rules
                    .push_parsed("*intermediate*=2", Precision::parse)
                    .unwrap();
                u
            })
            .unwrap();
            let expected = open_bytes(expected).unwrap();
            let i = expected.tensor_index(&e.name).unwrap();
            assert_eq!(
                e.params,
                expected.tensors()[i].params,
                "the rule's K was not kept"
            );
        }
    }
}

#[test]
fn a_target_at_the_lossless_size_gives_the_lossless_file() {
    let source = source();
    let lossless = convert_to_vec(&source, &opts()).unwrap();
    let target = bits_per_weight(&source, &lossless) + 0.01;
    assert_eq!(
        convert_to_vec(&source, &with_target(target)).unwrap(),
        lossless
    );
}

#[test]
fn the_bytes_do_not_depend_on_the_thread_count() {
    let source = source();
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| convert_to_vec(&source, &with_target(5.0)).unwrap())
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn a_target_below_the_smallest_file_is_refused() {
    let source = source();
    let err = convert_to_vec(&source, &with_target(1.0)).unwrap_err();
    assert!(
        matches!(&err, NzError::InvalidSetting { what } if what.contains("smallest")),
        "{err}"
    );
}

#[test]
fn cli_reports_the_choice_and_refuses_bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture(FIXTURE);
    let out = dir.path().join("x.nzt");
    let output = Command::cargo_bin("neuzip")
        .unwrap()
        .args(["convert", "-q", "--json", "--target-bits", "6"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let allocation = &summary["files"][0]["allocation"];
    let choices = allocation["choices"].as_array().unwrap();
    let source = source();
    let matrices: Vec<&str> = source
        .tensors
        .iter()
        .filter(|t| t.shape.len() >= 2)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        choices
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        matrices
    );
    let written = std::fs::metadata(&out).unwrap().len();
    assert!(8.0 * written as f64 / elements(&source) as f64 <= 6.0);
    assert_eq!(allocation["predicted_bytes"].as_u64(), Some(written));

    let bad: &[(&[&str], &str)] = &[
        (&["--target-bits", "0"], "positive"),
        (&["--target-bits", "1"], "smallest"),
        (
            &[
                "--target-bits",
                "6",
                "--mantissa-bits",
                "3",
                "--norm-block",
                "64",
            ],
            "leave out --norm-block",
        ),
        (
            &["--target-bits", "6", "--mantissa-bits", "3", "--no-norm"],
            "leave out --norm-block",
        ),
        (
            &["--target-bits", "6", "--codebook-bits", "3"],
            "cannot be used with",
        ),
    ];
    let refused = dir.path().join("refused.nzt");
    assert_convert_refused(&input, &refused, bad);
}

fn fixed_k_target(k: u32, r: f64) -> ConvertOptions {
    let mut o = with_target(r);
    o.lossy.default_bits = Some(k);
    o
}

/// (K, group size) of every lossy tensor of `nzt`, by name.
fn lossy_settings(nzt: &[u8]) -> Vec<(String, u32, u32)> {
    let file = open_bytes(nzt.to_vec()).unwrap();
    file.tensors()
        .iter()
        .filter(|e| e.codec == Codec::Lossy)
        .map(|e| {
            let p = LossyParams::parse(&e.params, e.dtype).unwrap();
            (e.name.clone(), p.mantissa_bits, p.norm_block)
        })
        .collect()
}

#[test]
fn a_fixed_k_target_keeps_k_and_chooses_the_groups() {
    let source = source();
    let matrices = source.tensors.iter().filter(|t| t.shape.len() >= 2).count();
    let one_group = convert_to_vec(&source, &uniform(3)).unwrap();
    let uniform_bits = bits_per_weight(&source, &one_group);
    let uniform_error = summed_relative_error(&source, one_group);
    let mut previous = f64::INFINITY;
    let mut group_sizes = std::collections::BTreeSet::new();
    for extra in [0.001, 0.1, 0.3, 1.0] {
        let target = uniform_bits * (1.0 + extra);
        let nzt = convert_to_vec(&source, &fixed_k_target(3, target)).unwrap();
        let got = bits_per_weight(&source, &nzt);
        assert!(got <= target, "target {target}: {got} bits/weight");
        let settings = lossy_settings(&nzt);
        assert_eq!(settings.len(), matrices, "every matrix stays lossy");
        assert!(settings.iter().all(|(_, k, _)| *k == 3), "{settings:?}");
        group_sizes.extend(settings.iter().map(|(_, _, b)| *b));
        let error = summed_relative_error(&source, nzt);
        assert!(
            error <= uniform_error,
            "target {target}: {error} vs one group size {uniform_error}"
        );
        assert!(error <= previous, "more room cost error at {target}");
        previous = error;
    }
    assert!(
        group_sizes.len() > 1,
        "one group size for every target: {group_sizes:?}"
    );
    // Below the file with no normalization anywhere there is nothing to choose.
    let no_norm = {
        let mut o = uniform(3);
        o.lossy.norm_block = 0;
        bits_per_weight(&source, &convert_to_vec(&source, &o).unwrap())
    };
    let err = convert_to_vec(&source, &fixed_k_target(3, no_norm * 0.98)).unwrap_err();
    assert!(
        matches!(&err, NzError::InvalidSetting { what } if what.contains("K = 3, no normalization")),
        "{err}"
    );
}
