//! The `neuzip` command: convert, decompress, inspect, verify and analyze on fixtures, output naming and
//! overwrite rules, sharded directories, and help text.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use predicates::str::contains;

use common::*;

fn neuzip() -> Command {
    let mut cmd = Command::cargo_bin("neuzip").expect("neuzip binary");
    cmd.timeout(std::time::Duration::from_secs(60));
    cmd
}

/// Copies a fixture into `dir` under `name`.
fn copy_fixture(fixture_name: &str, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(fixture(fixture_name), &dst).expect("copy fixture");
    dst
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn json_stdout(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn convert_then_decompress_restores_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "minilm_slice_bf16.safetensors",
        "mixed_dtypes.safetensors",
        "f32_specials.safetensors",
    ] {
        let src = copy_fixture(name, dir.path(), name);
        let nzt = dir.path().join(format!("{name}.nzt"));
        let back = dir.path().join(format!("{name}.restored"));
        neuzip()
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&nzt)
            .assert()
            .success()
            .stdout(contains("->"))
            .stderr("");
        neuzip()
            .arg("decompress")
            .arg(&nzt)
            .arg("-o")
            .arg(&back)
            .assert()
            .success()
            .stderr("");
        assert!(
            read(&back) == read(&fixture(name)),
            "{name}: restored bytes differ"
        );
        // Skipping checksum verification gives the same bytes.
        let back2 = dir.path().join(format!("{name}.restored2"));
        neuzip()
            .args(["decompress", "--no-verify-checksums"])
            .arg(&nzt)
            .arg("-o")
            .arg(&back2)
            .assert()
            .success();
        assert!(
            read(&back2) == read(&fixture(name)),
            "{name}: --no-verify-checksums"
        );
    }
}

#[test]
fn default_output_names() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture(
        "minilm_slice_f16.safetensors",
        dir.path(),
        "model.safetensors",
    );
    neuzip().arg("convert").arg(&src).assert().success();
    let nzt = dir.path().join("model.nzt");
    assert!(
        nzt.is_file(),
        "convert did not write model.nzt: {:?}",
        dir_entries(dir.path())
    );
    assert_eq!(
        dir_entries(dir.path()).len(),
        2,
        "{:?}",
        dir_entries(dir.path())
    );

    // decompress defaults to the input with .safetensors, so move the original out of the way.
    let kept = dir.path().join("original.bin");
    std::fs::rename(&src, &kept).unwrap();
    neuzip().arg("decompress").arg(&nzt).assert().success();
    assert!(
        read(&src) == read(&kept),
        "model.safetensors restored by default differs"
    );

    // Relative paths, run from the directory.
    std::fs::remove_file(&nzt).unwrap();
    neuzip()
        .current_dir(dir.path())
        .args(["convert", "model.safetensors"])
        .assert()
        .success();
    assert!(nzt.is_file());
}

#[test]
fn convert_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture(
        "minilm_slice_bf16.safetensors",
        dir.path(),
        "in.safetensors",
    );
    let out = dir.path().join("out.nzt");
    std::fs::write(&out, b"precious").unwrap();
    let before = dir_entries(dir.path());
    neuzip()
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::starts_with("neuzip: error:"))
        .stderr(contains("--force"));
    assert_eq!(read(&out), b"precious", "existing output was touched");
    assert_eq!(
        dir_entries(dir.path()),
        before,
        "files appeared or vanished"
    );

    neuzip()
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg("--force")
        .assert()
        .success();
    let file = neuzip::NztFile::open(&out).expect("a valid .nzt after --force");
    assert!(decompress(&file).unwrap() == read(&src));
    assert_eq!(
        dir_entries(dir.path()),
        before,
        "no temporary file may remain"
    );

    // decompress has the same rule.
    let restored = dir.path().join("restored.safetensors");
    std::fs::write(&restored, b"precious").unwrap();
    neuzip()
        .arg("decompress")
        .arg(&out)
        .arg("-o")
        .arg(&restored)
        .assert()
        .failure()
        .code(1)
        .stderr(contains("--force"));
    assert_eq!(read(&restored), b"precious");
    neuzip()
        .arg("decompress")
        .arg(&out)
        .arg("-o")
        .arg(&restored)
        .arg("-f")
        .assert()
        .success();
    assert!(read(&restored) == read(&src));
}

#[test]
fn convert_refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let src = copy_fixture(
        "minilm_slice_bf16.safetensors",
        dir.path(),
        "in.safetensors",
    );
    let original = read(&src);
    let spellings = [
        src.clone(),
        dir.path().join("sub").join("..").join("in.safetensors"),
    ];
    for output in &spellings {
        for force in [false, true] {
            let mut cmd = neuzip();
            cmd.arg("convert").arg(&src).arg("-o").arg(output);
            if force {
                cmd.arg("--force");
            }
            cmd.assert()
                .failure()
                .code(1)
                .stderr(predicate::str::starts_with("neuzip: error:"))
                .stderr(contains("input"));
            assert!(
                read(&src) == original,
                "input changed (-o {}, force {force})",
                output.display()
            );
        }
    }
    #[cfg(unix)]
    {
        let link = dir.path().join("link.nzt");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        neuzip()
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&link)
            .arg("--force")
            .assert()
            .failure()
            .code(1);
        assert!(read(&src) == original, "input changed through a symlink");
    }
    assert_eq!(
        dir_entries(dir.path())
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .count(),
        0,
        "a temporary file was left behind"
    );
}

/// Converts a fixture into `dir`, returning the .nzt path.
fn convert_into(dir: &Path, fixture_name: &str) -> PathBuf {
    let out = dir.join(fixture_name.replace(".safetensors", ".nzt"));
    neuzip()
        .arg("convert")
        .arg(fixture(fixture_name))
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    out
}

#[test]
fn inspect_reports_consistent_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["minilm_slice_bf16.safetensors", "mixed_dtypes.safetensors"] {
        let nzt = convert_into(dir.path(), name);
        let original_bytes = read(&fixture(name));
        let original = safetensors::SafeTensors::deserialize(&original_bytes)
            .unwrap()
            .tensors();

        let text = neuzip().arg("inspect").arg(&nzt).assert().success();
        let stdout = String::from_utf8(text.get_output().stdout.clone()).unwrap();
        for (tensor, _) in &original {
            assert!(
                stdout.contains(tensor.as_str()),
                "{name}: inspect omits {tensor}"
            );
        }
        assert!(stdout.contains("total:"), "{name}: {stdout}");

        let out = neuzip()
            .args(["inspect", "--json"])
            .arg(&nzt)
            .output()
            .unwrap();
        assert!(out.status.success());
        let r = json_stdout(&out);
        let tensors = r["tensors"].as_array().expect("tensors array");
        assert_eq!(tensors.len(), original.len(), "{name}: tensor count");
        let elements: u64 = original
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>() as u64)
            .sum();
        assert_eq!(r["elements"].as_u64(), Some(elements), "{name}: elements");
        let file_bytes = std::fs::metadata(&nzt).unwrap().len();
        assert_eq!(
            r["file_bytes"].as_u64(),
            Some(file_bytes),
            "{name}: file_bytes"
        );
        let bpw = r["bits_per_weight"].as_f64().expect("bits_per_weight");
        let expected = file_bytes as f64 * 8.0 / elements as f64;
        assert!(
            (bpw - expected).abs() < 1e-9 * expected,
            "{name}: {bpw} vs {expected}"
        );
        let original_bytes = original_bytes.len() as u64;
        assert_eq!(
            r["original_bytes"].as_u64(),
            Some(original_bytes),
            "{name}: original_bytes"
        );
        let ratio = r["ratio"].as_f64().unwrap();
        assert!(
            (ratio - original_bytes as f64 / file_bytes as f64).abs() < 1e-9,
            "{name}: ratio"
        );
        for t in tensors {
            let stored = t["stored_bytes"].as_u64().unwrap();
            let shape: Vec<u64> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let n: u64 = shape.iter().product();
            let b = t["bits_per_weight"].as_f64().unwrap();
            if n > 0 {
                assert!(
                    (b - stored as f64 * 8.0 / n as f64).abs() < 1e-9,
                    "{name}: {}",
                    t["name"]
                );
            }
            let blocks: u64 = t["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_u64().unwrap())
                .sum();
            assert_eq!(
                blocks == 0,
                n == 0,
                "{name}: {} has {blocks} blocks",
                t["name"]
            );
        }
    }
    // inspect also reads safetensors files.
    let out = neuzip()
        .args(["inspect", "--json"])
        .arg(fixture("mixed_dtypes.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let r = json_stdout(&out);
    assert_eq!(r["format"], "safetensors");
    assert_eq!(r["tensors"].as_array().unwrap().len(), 18);
}

#[test]
fn verify_checks_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let name = "minilm_slice_bf16.safetensors";
    let nzt = convert_into(dir.path(), name);
    neuzip()
        .arg("verify")
        .arg(&nzt)
        .assert()
        .success()
        .stdout(contains("OK"));
    neuzip()
        .arg("verify")
        .arg(&nzt)
        .arg("--against")
        .arg(fixture(name))
        .assert()
        .success()
        .stdout(contains("bit-exact"));
    let out = neuzip()
        .args(["verify", "--json"])
        .arg(&nzt)
        .arg("--against")
        .arg(fixture(name))
        .output()
        .unwrap();
    assert!(out.status.success());
    let r = json_stdout(&out);
    assert_eq!(r["all_identical"], true);
    assert_eq!(r["header_identical"], true);

    // The same tensors with one element changed, written the same way.
    let bytes = read(&fixture(name));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let target = "encoder.layer.0.attention.self.query.weight";
    let mut tensors: Vec<TestTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| TestTensor {
            name: n,
            dtype: neuzip::Dtype::from_name(&format!("{:?}", v.dtype())).unwrap(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    let t = tensors.iter_mut().find(|t| t.name == target).unwrap();
    t.data[2 * 1000] ^= 0x01; // element 1000, lowest mantissa bit
    let changed = safetensors_bytes(&tensors, metadata.metadata().clone());
    assert_eq!(changed.len(), bytes.len());
    assert_eq!(
        changed.iter().zip(&bytes).filter(|(a, b)| a != b).count(),
        1,
        "the rebuilt file must differ from the fixture in exactly one byte"
    );
    let other = write_file(dir.path(), "changed.safetensors", &changed);
    neuzip()
        .arg("verify")
        .arg(&nzt)
        .arg("--against")
        .arg(&other)
        .assert()
        .failure()
        .code(1)
        .stdout(contains(format!("MISMATCH {target}: 1 elements differ")))
        .stdout(contains("bit-exact").not())
        .stderr(predicate::str::starts_with("neuzip: error:"))
        .stderr(contains("does not match"));
    let out = neuzip()
        .args(["verify", "--json"])
        .arg(&nzt)
        .arg("--against")
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let r = json_stdout(&out);
    assert_eq!(r["all_identical"], false);
    let bad: Vec<_> = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["identical"] == false)
        .collect();
    assert_eq!(bad.len(), 1, "{r}");
    assert_eq!(bad[0]["name"], target);
    assert_eq!(bad[0]["mismatched_elements"], 1);

    // A different file altogether (other tensors) is a mismatch too.
    neuzip()
        .arg("verify")
        .arg(&nzt)
        .arg("--against")
        .arg(fixture("minilm_slice_f16.safetensors"))
        .assert()
        .failure()
        .code(1);
}

#[test]
fn analyze_predicts_what_convert_achieves() {
    let dir = tempfile::tempdir().unwrap();
    let name = "minilm_slice_bf16.safetensors";
    neuzip()
        .arg("analyze")
        .arg(fixture(name))
        .assert()
        .success()
        .stdout(contains("BF16"))
        .stdout(contains("bits/weight"))
        .stdout(contains("total:"));
    neuzip()
        .args(["analyze", "--tensors"])
        .arg(fixture(name))
        .assert()
        .success()
        .stdout(contains("encoder.layer.0.intermediate.dense.weight"));
    let out = neuzip()
        .args(["analyze", "--json"])
        .arg(fixture(name))
        .output()
        .unwrap();
    assert!(out.status.success());
    let a = json_stdout(&out);
    assert_eq!(a["tensors"].as_array().unwrap().len(), 6);
    let predicted = a["predicted_bits_per_weight"]
        .as_f64()
        .expect("predicted_bits_per_weight");
    let bound = a["bound_bits_per_weight"]
        .as_f64()
        .expect("bound_bits_per_weight");

    let nzt = convert_into(dir.path(), name);
    let out = neuzip()
        .args(["inspect", "--json"])
        .arg(&nzt)
        .output()
        .unwrap();
    let achieved = json_stdout(&out)["bits_per_weight"].as_f64().unwrap();
    eprintln!(
        "{name}: bound {bound:.4}, predicted {predicted:.4}, achieved {achieved:.4} bits/weight"
    );
    assert!(
        (predicted - achieved).abs() < 0.1,
        "analyze predicts {predicted} bits/weight, convert achieves {achieved}"
    );
    assert!(
        bound <= achieved,
        "the bound {bound} exceeds what was achieved, {achieved}"
    );
    assert!(achieved < 16.0, "BF16 weights did not shrink: {achieved}");
}

#[test]
fn sharded_directory_converts_and_decompresses() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let sharded = fixtures_dir().join("sharded");
    copy_dir(&sharded, &model);
    let shards = ["model-00001-of-00002", "model-00002-of-00002"];

    neuzip().arg("convert").arg(&model).assert().success();
    let mut expected: std::collections::BTreeSet<String> = dir_entries(&sharded);
    for s in shards {
        expected.insert(format!("{s}.nzt"));
    }
    expected.insert("model.nzt.index.json".into());
    assert_eq!(dir_entries(&model), expected);

    let original_index: serde_json::Value =
        serde_json::from_slice(&read(&sharded.join("model.safetensors.index.json"))).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&read(&model.join("model.nzt.index.json"))).unwrap();
    assert_eq!(index["metadata"], original_index["metadata"]);
    let map = index["weight_map"].as_object().unwrap();
    let original_map = original_index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), original_map.len());
    for (tensor, shard) in original_map {
        let expected = shard.as_str().unwrap().replace(".safetensors", ".nzt");
        assert_eq!(map[tensor].as_str(), Some(expected.as_str()), "{tensor}");
        // The tensor is really in that .nzt.
        let file = neuzip::NztFile::open(&model.join(&expected)).unwrap();
        file.tensor_index(tensor)
            .unwrap_or_else(|e| panic!("{expected}: {e}"));
    }

    // Decompress into a new directory holding only the .nzt side.
    let nzt_only = dir.path().join("nzt");
    let restored = dir.path().join("restored");
    std::fs::create_dir(&nzt_only).unwrap();
    std::fs::create_dir(&restored).unwrap();
    for s in shards {
        std::fs::copy(
            model.join(format!("{s}.nzt")),
            nzt_only.join(format!("{s}.nzt")),
        )
        .unwrap();
    }
    std::fs::copy(
        model.join("model.nzt.index.json"),
        nzt_only.join("model.nzt.index.json"),
    )
    .unwrap();
    neuzip()
        .arg("decompress")
        .arg(&nzt_only)
        .arg("-o")
        .arg(&restored)
        .assert()
        .success();
    assert_eq!(
        dir_entries(&restored),
        dir_entries(&sharded),
        "restored directory holds other files"
    );
    for s in shards {
        let name = format!("{s}.safetensors");
        assert!(
            read(&restored.join(&name)) == read(&sharded.join(&name)),
            "{name} differs"
        );
    }
    let restored_index: serde_json::Value =
        serde_json::from_slice(&read(&restored.join("model.safetensors.index.json"))).unwrap();
    assert_eq!(restored_index, original_index);

    // Converting again refuses to overwrite, and --force replaces.
    neuzip()
        .arg("convert")
        .arg(&model)
        .assert()
        .failure()
        .code(1)
        .stderr(contains("--force"));
    neuzip()
        .arg("convert")
        .arg(&model)
        .arg("--force")
        .assert()
        .success();
    assert_eq!(dir_entries(&model), expected);

    // A directory holding model.safetensors converts to model.nzt.
    let single = dir.path().join("single");
    std::fs::create_dir(&single).unwrap();
    copy_fixture("minilm_slice_f32.safetensors", &single, "model.safetensors");
    neuzip().arg("convert").arg(&single).assert().success();
    let file = neuzip::NztFile::open(&single.join("model.nzt")).unwrap();
    assert!(decompress(&file).unwrap() == read(&fixture("minilm_slice_f32.safetensors")));
}

#[test]
fn convert_json_summary_and_thread_flag() {
    let dir = tempfile::tempdir().unwrap();
    let name = "mixed_dtypes.safetensors";
    let a = dir.path().join("a.nzt");
    let b = dir.path().join("b.nzt");
    let out = neuzip()
        .args(["convert", "--json", "--threads", "1"])
        .arg(fixture(name))
        .arg("-o")
        .arg(&a)
        .output()
        .unwrap();
    assert!(out.status.success());
    let j = json_stdout(&out);
    let files = j["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["tensors"], 18);
    assert_eq!(
        files[0]["input_bytes"].as_u64(),
        Some(read(&fixture(name)).len() as u64)
    );
    assert_eq!(
        files[0]["output_bytes"].as_u64(),
        Some(read(&a).len() as u64)
    );
    neuzip()
        .args(["convert", "--threads", "2", "--block-elements", "1000"])
        .arg(fixture(name))
        .arg("-o")
        .arg(&b)
        .assert()
        .success();
    neuzip()
        .arg("verify")
        .arg(&b)
        .arg("--against")
        .arg(fixture(name))
        .assert()
        .success();
    neuzip()
        .args(["convert", "--block-elements", "0"])
        .arg(fixture(name))
        .arg("-o")
        .arg(dir.path().join("c.nzt"))
        .assert()
        .failure()
        .code(1)
        .stderr(contains("--block-elements"));
    assert!(!dir.path().join("c.nzt").exists());
}

#[test]
fn help_for_every_subcommand() {
    neuzip()
        .arg("--help")
        .assert()
        .success()
        .stdout(contains("convert"))
        .stdout(contains("decompress"));
    neuzip()
        .arg("--version")
        .assert()
        .success()
        .stdout(contains("neuzip"));
    for sub in ["convert", "decompress", "inspect", "verify", "analyze"] {
        neuzip()
            .args([sub, "--help"])
            .assert()
            .success()
            .stdout(contains("Usage"))
            .stdout(contains(sub));
        neuzip().args(["help", sub]).assert().success();
    }
    // No subcommand, or an unknown one, is a usage error (clap exits with 2).
    neuzip().assert().failure().code(2);
    neuzip().arg("frobnicate").assert().failure().code(2);
}

#[test]
fn bench_reports_codec_and_reference_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = copy_fixture(
        "minilm_slice_bf16.safetensors",
        dir.path(),
        "in.safetensors",
    );
    let nzt = convert_into(dir.path(), "minilm_slice_bf16.safetensors");
    let inspect = json_stdout(
        &neuzip()
            .args(["inspect", "--json"])
            .arg(&nzt)
            .output()
            .unwrap(),
    );
    let out = neuzip()
        .args(["bench", "--runs", "1", "--json", "--threads", "2"])
        .arg(&input)
        .output()
        .unwrap();
    let report = json_stdout(&out);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for name in [
        "neuzip",
        "neuzip (no checksums)",
        "zstd -3 (256 KiB chunks)",
        "memcpy",
    ] {
        assert_eq!(
            names.iter().filter(|&&n| n == name).count(),
            2,
            "{name}: one row per thread count"
        );
    }
    let ours = &rows[0];
    let bits = ours["bits_per_weight"].as_f64().unwrap();
    let expected = inspect["bits_per_weight"].as_f64().unwrap();
    assert!(
        (bits - expected).abs() < 1e-9,
        "bench {bits} vs inspect {expected}"
    );
    for r in rows {
        if let Some(g) = r["decode_gbps"].as_f64() {
            assert!(g.is_finite() && g > 0.0, "{r}");
        }
    }
    assert!(
        !dir_entries(dir.path()).iter().any(|n| n.contains("bench")),
        "bench left a scratch file"
    );
}
