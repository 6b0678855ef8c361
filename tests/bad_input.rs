//! Bad input: missing, foreign, truncated and corrupted files, impossible output paths. Every failure must be a
//! clean error (exit code 1, `neuzip: error: ...` on stderr, no panic) that leaves no file behind, and every
//! corruption of a `.nzt` that the format can detect must be detected, never decoded silently or by panicking.

mod common;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::str::contains;

use neuzip::convert::ConvertOptions;
use neuzip::format::header::Header;
use neuzip::format::{BlockMode, FILE_HEADER_LEN};
use neuzip::mmap::Bytes;
use neuzip::source::SafetensorsFile;
use neuzip::{DecodeOptions, Dtype, NztFile};

use common::*;

fn neuzip() -> Command {
    let mut cmd = Command::cargo_bin("neuzip").expect("neuzip binary");
    cmd.timeout(std::time::Duration::from_secs(60));
    cmd
}

/// Runs `neuzip args...` and asserts a clean failure: exit code 1 (not 101, the panic code, and not a
/// signal), stderr starting with `neuzip: error:`, no panic text, and no file created or removed in any of
/// `watched` (hidden temporary files included). Returns stderr.
fn fails_cleanly(args: &[&std::ffi::OsStr], watched: &[&Path]) -> String {
    let before: Vec<BTreeSet<String>> = watched.iter().map(|d| dir_entries(d)).collect();
    let out = neuzip().args(args).output().expect("run neuzip");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let shown = format!("neuzip {args:?}\nstatus {:?}\nstderr: {stderr}", out.status);
    assert!(!out.status.success(), "succeeded: {shown}");
    assert_ne!(out.status.code(), Some(101), "panicked: {shown}");
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(stderr.starts_with("neuzip: error:"), "{shown}");
    assert!(!stderr.contains("panicked"), "{shown}");
    assert!(
        stderr.len() > "neuzip: error: ".len() + 10,
        "message too terse: {shown}"
    );
    for (d, b) in watched.iter().zip(&before) {
        assert_eq!(
            &dir_entries(d),
            b,
            "files changed in {}: {shown}",
            d.display()
        );
    }
    stderr
}

fn os(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

fn s(x: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(x)
}

fn copy_fixture(name: &str, dir: &Path, as_name: &str) -> PathBuf {
    let dst = dir.join(as_name);
    std::fs::copy(fixture(name), &dst).expect("copy fixture");
    dst
}

// ---------------------------------------------------------------------------------------------------------
// Inputs that are not what they claim to be.

#[test]
fn missing_input_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("missing.safetensors");
    let missing_nzt = d.join("missing.nzt");
    let out = d.join("out.nzt");
    let e = fails_cleanly(&[s("convert"), os(&missing), s("-o"), os(&out)], &[d]);
    assert!(e.contains("missing.safetensors"), "{e}");
    fails_cleanly(&[s("convert"), os(&missing)], &[d]);
    let e = fails_cleanly(&[s("decompress"), os(&missing_nzt)], &[d]);
    assert!(e.contains("missing.nzt"), "{e}");
    fails_cleanly(&[s("inspect"), os(&missing_nzt)], &[d]);
    fails_cleanly(&[s("verify"), os(&missing_nzt)], &[d]);
    fails_cleanly(&[s("analyze"), os(&missing)], &[d]);
    // verify --against a missing original.
    let nzt = d.join("good.nzt");
    neuzip()
        .arg("convert")
        .arg(fixture("minilm_slice_bf16.safetensors"))
        .arg("-o")
        .arg(&nzt)
        .assert()
        .success();
    let e = fails_cleanly(&[s("verify"), os(&nzt), s("--against"), os(&missing)], &[d]);
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn not_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (fixture_name, as_name) in [
        ("not_safetensors.bin", "not_safetensors.bin"),
        ("not_safetensors.bin", "random.safetensors"),
        ("truncated.safetensors", "truncated.safetensors"),
    ] {
        let input = copy_fixture(fixture_name, d, as_name);
        let e = fails_cleanly(&[s("convert"), os(&input)], &[d]);
        assert!(e.contains(as_name), "{e}");
        assert!(e.to_lowercase().contains("safetensors"), "{e}");
        fails_cleanly(
            &[
                s("convert"),
                os(&input),
                s("-o"),
                os(&d.join("x.nzt")),
                s("--force"),
            ],
            &[d],
        );
        fails_cleanly(&[s("analyze"), os(&input)], &[d]);
        fails_cleanly(&[s("inspect"), os(&input)], &[d]);
        fails_cleanly(
            &[
                s("decompress"),
                os(&input),
                s("-o"),
                os(&d.join("y.safetensors")),
            ],
            &[d],
        );
    }
    // An empty file and a directory given as a file.
    let empty = write_file(d, "empty.safetensors", b"");
    fails_cleanly(&[s("convert"), os(&empty)], &[d]);
    fails_cleanly(
        &[
            s("decompress"),
            os(&empty),
            s("-o"),
            os(&d.join("z.safetensors")),
        ],
        &[d],
    );
    let sub = d.join("plain_dir");
    std::fs::create_dir(&sub).unwrap();
    fails_cleanly(&[s("convert"), os(&sub)], &[d, &sub]);
    fails_cleanly(&[s("decompress"), os(&sub)], &[d, &sub]);
}

/// Hand-made safetensors files that break one rule each.
fn malformed_safetensors() -> Vec<(&'static str, Vec<u8>)> {
    let with_header = |json: &str, data: &[u8]| {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(data);
        v
    };
    vec![
        ("seven bytes", vec![1, 0, 0, 0, 0, 0, 0]),
        (
            "header length past the end",
            with_header("{}", b"")[..9].to_vec(),
        ),
        ("header length 0", 0u64.to_le_bytes().to_vec()),
        ("header not JSON", with_header("{\"a\": [", b"")),
        ("header not an object", with_header("[1, 2, 3]", b"")),
        (
            "unknown dtype",
            with_header(
                r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
        ),
        (
            "offsets past the data",
            with_header(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
            ),
        ),
        (
            "data longer than the tensors",
            with_header(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 8],
            ),
        ),
        (
            "shape and length disagree",
            with_header(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        (
            "overlapping tensors",
            with_header(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                &[0; 6],
            ),
        ),
        (
            "hole between tensors",
            with_header(
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
                &[0; 6],
            ),
        ),
        (
            "half a byte of F4",
            with_header(
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
                &[0; 2],
            ),
        ),
        (
            "metadata not strings",
            with_header(r#"{"__metadata__":{"a":1}}"#, b""),
        ),
    ]
}

#[test]
fn malformed_safetensors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, (what, bytes)) in malformed_safetensors().into_iter().enumerate() {
        let r =
            catch_unwind(|| SafetensorsFile::from_bytes(Bytes::Owned(bytes.clone())).map(|_| ()));
        match r {
            Err(_) => panic!("{what}: SafetensorsFile::from_bytes panicked"),
            Ok(Ok(())) => panic!("{what}: accepted"),
            Ok(Err(_)) => {}
        }
        let input = write_file(d, &format!("bad{i}.safetensors"), &bytes);
        let e = fails_cleanly(&[s("convert"), os(&input)], &[d]);
        assert!(e.contains(&format!("bad{i}.safetensors")), "{what}: {e}");
    }
}

#[test]
fn safetensors_truncated_at_every_offset() {
    let bytes = std::fs::read(fixture("sharded/model-00001-of-00002.safetensors")).unwrap();
    let mut panics = Vec::new();
    for len in 0..bytes.len() {
        let cut = bytes[..len].to_vec();
        match catch_unwind(|| SafetensorsFile::from_bytes(Bytes::Owned(cut)).is_ok()) {
            Err(_) => panics.push(len),
            Ok(true) => panic!(
                "a safetensors file cut to {len} of {} bytes was accepted",
                bytes.len()
            ),
            Ok(false) => {}
        }
    }
    println!(
        "safetensors truncations tested: {} (all rejected)",
        bytes.len()
    );
    assert!(panics.is_empty(), "panics at lengths {panics:?}");
}

// ---------------------------------------------------------------------------------------------------------
// Damaged .nzt files.

/// A small `.nzt` whose blocks use every mode (raw, zstd, split, split_local), with an empty tensor, a
/// scalar and metadata. Returns (safetensors bytes, .nzt bytes).
fn small_nzt() -> (Vec<u8>, Vec<u8>) {
    let mut rng = SplitMix::new(7);
    let mut scales = Vec::new();
    for e in [-30, 0, 30] {
        scales.extend(gaussian_tensor(&mut rng, Dtype::BF16, 512, 2f64.powi(e)));
    }
    let tensors = vec![
        TestTensor {
            name: "w".into(),
            dtype: Dtype::BF16,
            shape: vec![40, 50],
            data: gaussian_tensor(&mut rng, Dtype::BF16, 2000, 0.02),
        },
        TestTensor {
            name: "scales".into(),
            dtype: Dtype::BF16,
            shape: vec![1536],
            data: scales,
        },
        TestTensor {
            name: "ids".into(),
            dtype: Dtype::I64,
            shape: vec![300],
            data: (0..300i64).flat_map(|i| i.to_le_bytes()).collect(),
        },
        TestTensor {
            name: "noise".into(),
            dtype: Dtype::U8,
            shape: vec![100],
            data: rng.bytes(100),
        },
        TestTensor {
            name: "empty".into(),
            dtype: Dtype::F32,
            shape: vec![0],
            data: vec![],
        },
        TestTensor {
            name: "scalar".into(),
            dtype: Dtype::F32,
            shape: vec![],
            data: 0.5f32.to_le_bytes().to_vec(),
        },
    ];
    let input = safetensors_bytes(
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    );
    let opts = ConvertOptions {
        float_block_elements: 512,
        stored_block_bytes: 1024,
        ..ConvertOptions::default()
    };
    let nzt = convert_bytes(&input, &opts);
    let file = open_bytes(nzt.clone()).expect("small .nzt opens");
    let modes: BTreeSet<&str> = file
        .tensors()
        .iter()
        .flat_map(|t| t.blocks.iter().map(|b| b.mode.name()))
        .collect();
    for m in [
        BlockMode::Raw,
        BlockMode::Zstd,
        BlockMode::Split,
        BlockMode::SplitLocal,
    ] {
        assert!(
            modes.contains(m.name()),
            "the small .nzt has no {} block: {modes:?}",
            m.name()
        );
    }
    assert!(decompress(&file).unwrap() == input);
    (input, nzt)
}

/// What reading a damaged `.nzt` gave.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The header parser rejected it.
    ParseError(String),
    /// It parsed, and decoding something failed.
    DecodeError(String),
    /// Everything decoded, and the restored file equals the original.
    Intact,
    /// Everything decoded, to something else.
    Different,
    /// A panic (always a bug).
    Panic(String),
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".into())
}

/// Parses `bytes` and decodes every tensor and every block, catching panics.
fn read_damaged(bytes: Vec<u8>, original: &[u8], options: DecodeOptions) -> Outcome {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let file = match NztFile::from_bytes(Bytes::Owned(bytes)) {
            Ok(f) => f.with_options(options),
            Err(e) => return Outcome::ParseError(e.to_string()),
        };
        if let Err(e) = decode_everything(&file) {
            return Outcome::DecodeError(e.to_string());
        }
        match decompress(&file) {
            Err(e) => Outcome::DecodeError(e.to_string()),
            Ok(restored) if restored == original => Outcome::Intact,
            Ok(_) => Outcome::Different,
        }
    }));
    result.unwrap_or_else(|p| Outcome::Panic(panic_message(p)))
}

fn header_of(nzt: &[u8]) -> Header {
    neuzip::format::header::parse(nzt).expect("undamaged header parses")
}

#[test]
fn nzt_truncated_at_every_offset_is_rejected() {
    let (original, nzt) = small_nzt();
    let mut bad = Vec::new();
    for len in 0..nzt.len() {
        match read_damaged(nzt[..len].to_vec(), &original, DecodeOptions::default()) {
            Outcome::ParseError(_) | Outcome::DecodeError(_) => {}
            other => bad.push((len, other)),
        }
    }
    println!(
        ".nzt truncations tested: {} offsets (0..{}), all rejected",
        nzt.len(),
        nzt.len()
    );
    assert!(bad.is_empty(), "truncations not rejected: {bad:?}");
    // Appending bytes is as wrong as removing them.
    let mut longer = nzt.clone();
    longer.push(0);
    assert!(matches!(
        read_damaged(longer, &original, DecodeOptions::default()),
        Outcome::ParseError(_)
    ));
}

#[test]
fn every_header_byte_flip_is_detected() {
    let (original, nzt) = small_nzt();
    let h = header_of(&nzt);
    let section_end = FILE_HEADER_LEN + h.header_len as usize;
    let masks = [0x01u8, 0x80, 0xff];
    let (mut detected, mut padding_ok) = (0, 0);
    let mut bad = Vec::new();
    for pos in 0..h.data_offset as usize {
        for &mask in &masks {
            let mut damaged = nzt.clone();
            damaged[pos] ^= mask;
            let outcome = read_damaged(damaged, &original, DecodeOptions::default());
            let ok = if pos >= section_end {
                // Zero padding before the data section: readers MUST ignore its value.
                padding_ok += 1;
                outcome == Outcome::Intact
            } else {
                detected += 1;
                matches!(outcome, Outcome::ParseError(_) | Outcome::DecodeError(_))
            };
            if !ok {
                bad.push((pos, mask, outcome));
            }
        }
    }
    println!(
        "header byte flips tested: {} ({} bytes x {} masks): {detected} in the fixed header and header section, \
         all detected; {padding_ok} in padding, all read back intact",
        h.data_offset as usize * masks.len(),
        h.data_offset,
        masks.len()
    );
    assert!(padding_ok > 0 || section_end == h.data_offset as usize);
    assert!(
        bad.is_empty(),
        "{} header flips mishandled: {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
}

/// (start, end, tensor name) of every block payload, and the gaps between them.
fn payload_ranges(h: &Header) -> Vec<(usize, usize, String)> {
    h.tensors
        .iter()
        .flat_map(|t| {
            t.blocks.iter().map(move |b| {
                (
                    b.offset as usize,
                    (b.offset + b.stored_len as u64) as usize,
                    t.name.clone(),
                )
            })
        })
        .collect()
}

/// Streaming decode (`for_each_block`) decodes blocks in pairs, of one tensor or of two, in an order of its
/// own; a damaged block must still be reported as itself.
#[test]
fn streaming_decode_names_the_damaged_block() {
    let (_, nzt) = small_nzt();
    let h = header_of(&nzt);
    let mut checked = 0;
    for t in &h.tensors {
        for (k, b) in t.blocks.iter().enumerate() {
            if b.stored_len == 0 {
                continue;
            }
            let mut damaged = nzt.clone();
            damaged[b.offset as usize + b.stored_len as usize / 2] ^= 0x10;
            let file = NztFile::from_bytes(Bytes::Owned(damaged)).expect("header intact");
            let e = decompress(&file).expect_err("damage detected").to_string();
            let named = format!("tensor '{}' block {k}", t.name);
            assert!(e.contains(&named), "{named}: {e}");
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} blocks");
}

#[test]
fn every_payload_byte_flip_is_detected() {
    let (original, nzt) = small_nzt();
    let h = header_of(&nzt);
    let ranges = payload_ranges(&h);
    let masks = [0x01u8, 0x10, 0xff];
    let (mut flips, mut gaps) = (0, 0);
    let mut bad = Vec::new();
    for (start, end, tensor) in &ranges {
        for pos in *start..*end {
            for &mask in &masks {
                let mut damaged = nzt.clone();
                damaged[pos] ^= mask;
                flips += 1;
                match read_damaged(damaged, &original, DecodeOptions::default()) {
                    Outcome::DecodeError(e)
                        if e.contains("checksum") && e.contains(&format!("'{tensor}'")) => {}
                    other => bad.push((pos, mask, tensor.clone(), other)),
                }
            }
        }
    }
    // Gap bytes between blocks (alignment padding) are ignored by readers.
    let covered: Vec<(usize, usize)> = ranges.iter().map(|(a, b, _)| (*a, *b)).collect();
    for pos in h.data_offset as usize..nzt.len() {
        if covered.iter().any(|&(a, b)| (a..b).contains(&pos)) {
            continue;
        }
        let mut damaged = nzt.clone();
        damaged[pos] ^= 0xff;
        gaps += 1;
        let outcome = read_damaged(damaged, &original, DecodeOptions::default());
        if outcome != Outcome::Intact {
            bad.push((pos, 0xff, "<gap>".into(), outcome));
        }
    }
    println!(
        "payload byte flips tested: {flips} in {} blocks, all detected by checksum; {gaps} gap-byte flips ignored",
        ranges.len()
    );
    assert!(flips > 1000);
    assert!(
        bad.is_empty(),
        "{} payload flips mishandled: {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
}

#[test]
fn corrupt_payloads_without_checksums_never_panic() {
    let (original, nzt) = small_nzt();
    let h = header_of(&nzt);
    let ranges = payload_ranges(&h);
    let unchecked = DecodeOptions {
        verify_checksums: false,
    };
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut panics = Vec::new();
    let mut tally = |outcome: Outcome, what: String| {
        let key = match &outcome {
            Outcome::ParseError(_) => "parse error",
            Outcome::DecodeError(_) => "decode error",
            Outcome::Intact => "intact",
            Outcome::Different => "decoded to other values",
            Outcome::Panic(_) => "panic",
        };
        *counts.entry(key).or_default() += 1;
        if let Outcome::Panic(m) = outcome {
            panics.push((what, m));
        }
    };
    // Every single-byte flip of every payload, three ways.
    for (start, end, _) in &ranges {
        for pos in *start..*end {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut damaged = nzt.clone();
                damaged[pos] ^= mask;
                tally(
                    read_damaged(damaged, &original, unchecked),
                    format!("byte {pos} ^ {mask:#04x}"),
                );
            }
        }
    }
    // Whole payloads replaced by seeded random bytes, and by zeros.
    let mut rng = SplitMix::new(99);
    for (start, end, tensor) in &ranges {
        for round in 0..20 {
            let mut damaged = nzt.clone();
            if round == 0 {
                damaged[*start..*end].fill(0);
            } else {
                let noise = rng.bytes(end - start);
                damaged[*start..*end].copy_from_slice(&noise);
            }
            tally(
                read_damaged(damaged, &original, unchecked),
                format!("block of '{tensor}' at {start} replaced (round {round})"),
            );
        }
    }
    let total: usize = counts.values().sum();
    println!("unchecked corruptions tested: {total}: {counts:?}");
    assert!(
        panics.is_empty(),
        "{} panics, e.g. {:?}",
        panics.len(),
        &panics[..panics.len().min(10)]
    );
}

#[test]
fn corrupted_nzt_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, nzt) = small_nzt();
    let h = header_of(&nzt);
    let out = d.join("out.safetensors");

    // A handful of truncations: inside the magic, the fixed header, the header section, the data.
    let cuts = [
        0,
        7,
        8,
        FILE_HEADER_LEN - 1,
        FILE_HEADER_LEN,
        FILE_HEADER_LEN + h.header_len as usize / 2,
        h.data_offset as usize,
        nzt.len() - 1,
    ];
    for &len in &cuts {
        let path = write_file(d, "cut.nzt", &nzt[..len]);
        let e = fails_cleanly(&[s("decompress"), os(&path), s("-o"), os(&out)], &[d]);
        assert!(e.contains("cut.nzt"), "{e}");
        fails_cleanly(&[s("verify"), os(&path)], &[d]);
        fails_cleanly(&[s("inspect"), os(&path)], &[d]);
    }
    println!("CLI truncations tested: {}", cuts.len());

    // A flipped byte in a block payload: decompress and verify name the problem; nothing is written.
    let (start, _, tensor) = payload_ranges(&h)
        .into_iter()
        .find(|(_, _, t)| t == "w")
        .expect("block of w");
    let mut damaged = nzt.clone();
    damaged[start + 40] ^= 0x04;
    let path = write_file(d, "damaged.nzt", &damaged);
    let e = fails_cleanly(&[s("decompress"), os(&path), s("-o"), os(&out)], &[d]);
    assert!(e.contains("checksum") && e.contains(&tensor), "{e}");
    let e = fails_cleanly(&[s("verify"), os(&path)], &[d]);
    assert!(e.contains("checksum"), "{e}");
    // Without checksums, the split stream may or may not notice, but it never panics or writes a
    // partial file.
    let run = neuzip()
        .args([
            s("decompress"),
            s("--no-verify-checksums"),
            os(&path),
            s("-o"),
            os(&out),
        ])
        .output()
        .unwrap();
    assert_ne!(
        run.status.code(),
        Some(101),
        "panicked: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.code().is_some(), "killed by a signal");
    if !run.status.success() {
        assert!(!out.exists());
    }
    // A flipped byte in the header section.
    let mut damaged = nzt.clone();
    damaged[FILE_HEADER_LEN + 3] ^= 0x01;
    let path = write_file(d, "bad_header.nzt", &damaged);
    let e = fails_cleanly(
        &[
            s("decompress"),
            os(&path),
            s("-o"),
            os(&d.join("o2.safetensors")),
        ],
        &[d],
    );
    assert!(e.contains("checksum"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// Outputs that cannot be written.

#[test]
fn output_in_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("no").join("such");
    let e = fails_cleanly(
        &[
            s("convert"),
            os(&fixture("minilm_slice_bf16.safetensors")),
            s("-o"),
            os(&missing.join("out.nzt")),
        ],
        &[d],
    );
    assert!(e.contains("no"), "{e}");
    let nzt = d.join("good.nzt");
    neuzip()
        .arg("convert")
        .arg(fixture("mixed_dtypes.safetensors"))
        .arg("-o")
        .arg(&nzt)
        .assert()
        .success();
    fails_cleanly(
        &[
            s("decompress"),
            os(&nzt),
            s("-o"),
            os(&missing.join("out.safetensors")),
        ],
        &[d],
    );
    // A directory input with a missing output directory.
    let model = d.join("model");
    std::fs::create_dir(&model).unwrap();
    copy_dir(&fixtures_dir().join("sharded"), &model);
    fails_cleanly(
        &[s("convert"), os(&model), s("-o"), os(&missing)],
        &[d, &model],
    );
    assert!(!d.join("no").exists());
}

#[test]
fn decompress_of_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = copy_fixture("minilm_slice_bf16.safetensors", d, "model.safetensors");
    let original = std::fs::read(&input).unwrap();
    let e = fails_cleanly(
        &[
            s("decompress"),
            os(&input),
            s("-o"),
            os(&d.join("out.safetensors")),
        ],
        &[d],
    );
    assert!(e.contains("not a .nzt"), "{e}");
    // With the default output name, which is the input itself.
    fails_cleanly(&[s("decompress"), os(&input)], &[d]);
    fails_cleanly(&[s("decompress"), os(&input), s("--force")], &[d]);
    fails_cleanly(&[s("verify"), os(&input)], &[d]);
    assert!(std::fs::read(&input).unwrap() == original, "input changed");
}

#[test]
fn decompress_refuses_to_overwrite_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let nzt = d.join("model.nzt");
    neuzip()
        .arg("convert")
        .arg(fixture("minilm_slice_bf16.safetensors"))
        .arg("-o")
        .arg(&nzt)
        .assert()
        .success();
    let before = std::fs::read(&nzt).unwrap();
    let e = fails_cleanly(
        &[s("decompress"), os(&nzt), s("-o"), os(&nzt), s("--force")],
        &[d],
    );
    assert!(e.contains("input"), "{e}");
    assert!(std::fs::read(&nzt).unwrap() == before);
}

// ---------------------------------------------------------------------------------------------------------
// Damaged model directories.

fn model_dir(root: &Path) -> PathBuf {
    let model = root.join("model");
    std::fs::create_dir(&model).unwrap();
    copy_dir(&fixtures_dir().join("sharded"), &model);
    model
}

#[test]
fn bad_shard_indexes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let index = model.join("model.safetensors.index.json");
    let good = std::fs::read_to_string(&index).unwrap();
    for (what, text) in [
        ("not JSON", "{ nope".to_string()),
        ("no weight_map", r#"{"metadata": {}}"#.to_string()),
        (
            "non-string shard",
            r#"{"weight_map": {"a": 3}}"#.to_string(),
        ),
        (
            "path in shard name",
            good.replace("model-00002-of-00002", "../model-00002-of-00002"),
        ),
    ] {
        std::fs::write(&index, &text).unwrap();
        let e = fails_cleanly(&[s("convert"), os(&model)], &[&model, dir.path()]);
        assert!(e.contains("model.safetensors.index.json"), "{what}: {e}");
    }
    // A directory with neither an index nor model.safetensors.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = fails_cleanly(&[s("convert"), os(&empty)], &[&empty]);
    assert!(e.contains("model.safetensors"), "{e}");
    // decompress of a directory without model.nzt.index.json.
    let e = fails_cleanly(&[s("decompress"), os(&empty)], &[&empty]);
    assert!(e.contains("model.nzt.index.json"), "{e}");
}

/// A shard that fails must not leave the shards converted before it behind: a failed command writes nothing.
#[test]

fn failing_shard_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    // The index names model-00002 first (lm_head.weight), so model-00001 is converted second; cut it short.
    let second = model.join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&second).unwrap();
    std::fs::write(&second, &bytes[..bytes.len() - 10]).unwrap();
    let e = fails_cleanly(&[s("convert"), os(&model)], &[&model]);
    assert!(e.contains("model-00001-of-00002"), "{e}");
}

#[test]
fn failing_shard_is_reported_cleanly() {
    // The part of the above that holds today: a clean error naming the shard, and no index written.
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let second = model.join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&second).unwrap();
    std::fs::write(&second, &bytes[..bytes.len() - 10]).unwrap();
    neuzip()
        .arg("convert")
        .arg(&model)
        .assert()
        .failure()
        .code(1)
        .stderr(predicates::str::starts_with("neuzip: error:"))
        .stderr(contains("model-00001-of-00002"));
    let after = dir_entries(&model);
    assert!(!after.contains("model.nzt.index.json"), "{after:?}");
    assert!(!after.contains("model-00001-of-00002.nzt"), "{after:?}");
    assert!(
        after.iter().all(|n| !n.starts_with('.')),
        "temporary file left: {after:?}"
    );
}
