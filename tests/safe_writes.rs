//! Writes that never lose data, and reads whose memory does not follow what a header claims:
//! a process killed or interrupted mid-write, a full disk (a file-size limit), and a small file that
//! decodes to far more than its size.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{dir_entries, safetensors_bytes, write_file, SplitMix, TestTensor};
use neuzip::format::header::{assign_offsets, file_header, write_section, BlockEntry, TensorEntry};
use neuzip::format::{align_up, checksum, BlockMode, Codec, FILE_HEADER_LEN, TENSOR_ALIGN};
use neuzip::Dtype;

fn neuzip() -> String {
    env!("CARGO_BIN_EXE_neuzip").to_string()
}

/// A bf16 checkpoint big enough (48 MiB) that converting it takes a noticeable time.
fn big_checkpoint(dir: &Path) -> std::path::PathBuf {
    let mut rng = SplitMix::new(7);
    let tensors: Vec<TestTensor> = (0..6)
        .map(|i| TestTensor {
            name: format!("layer.{i}.weight"),
            dtype: Dtype::BF16,
            shape: vec![2048, 2048],
            data: common::gaussian_tensor(&mut rng, Dtype::BF16, 2048 * 2048, 0.02),
        })
        .collect();
    write_file(dir, "big.safetensors", &safetensors_bytes(&tensors, None))
}

/// Starts `neuzip args`, sends `signal` after `delay`; returns true if the signal ended it before it finished.
/// neuzip starts with every signal at its default action, as from a terminal: a test run launched in the
/// background (`cmd &` in a script) inherits SIGINT ignored, and ignored signals survive exec.
fn interrupt(args: &[&str], signal: &str, delay: Duration) -> bool {
    let mut child = Command::new("env")
        .arg("--default-signal")
        .arg(neuzip())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_ne!(status.code(), Some(101), "neuzip panicked");
    !status.success()
}

fn assert_killed_mid_write_leaves_nothing(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = big_checkpoint(dir.path());
    let before = dir_entries(dir.path());
    let output = dir.path().join("big.nzt");
    let args = [
        "convert",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ];
    let mut interrupted = 0;
    for delay_ms in [300, 150, 60, 20] {
        if interrupt(&args, signal, Duration::from_millis(delay_ms)) {
            interrupted += 1;
            let after = dir_entries(dir.path());
            if after != before && output.exists() {
                // The signal landed after the output was committed (renamed into place) but before the
                // process exited: then the file must be complete, which `verify` checks block by block.
                let verified = Command::new(neuzip())
                    .args(["verify", "-q", output.to_str().unwrap()])
                    .status()
                    .unwrap();
                assert!(
                    verified.success(),
                    "{signal} after {delay_ms} ms left a partial output"
                );
                std::fs::remove_file(&output).unwrap();
            }
            assert_eq!(
                dir_entries(dir.path()),
                before,
                "{signal} after {delay_ms} ms left files behind"
            );
        } else {
            std::fs::remove_file(&output).unwrap(); // finished first: start again
        }
    }
    println!("{signal}: {interrupted} of 4 conversions interrupted mid-write, none left a file");
    assert!(
        interrupted > 0,
        "no conversion was still running when signalled"
    );
}

#[test]
fn sigkill_mid_write_leaves_no_file() {
    assert_killed_mid_write_leaves_nothing("-KILL");
}

#[test]
fn ctrl_c_mid_write_leaves_no_file() {
    assert_killed_mid_write_leaves_nothing("-INT");
}

/// A file-size limit stands in for a full disk: writes fail with EFBIG once the output passes 64 KiB.
#[test]
fn full_disk_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::fixture("minilm_slice_bf16.safetensors");
    let nzt = dir.path().join("slice.nzt");
    let ok = Command::new(neuzip())
        .args(["convert", input.to_str().unwrap(), "-o"])
        .arg(&nzt)
        .status()
        .unwrap();
    assert!(ok.success());
    let before = dir_entries(dir.path());
    for args in [
        format!(
            "convert {} -o {}/again.nzt",
            input.display(),
            dir.path().display()
        ),
        format!(
            "decompress {} -o {}/restored.safetensors",
            nzt.display(),
            dir.path().display()
        ),
    ] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f 64; exec {} {args}",
                neuzip()
            ))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args}: {stderr}");
        assert!(
            stderr.starts_with("neuzip: error:") && stderr.contains("File too large"),
            "{stderr}"
        );
        assert_eq!(dir_entries(dir.path()), before, "{args} left a file behind");
    }
}

/// A few-kilobyte `.nzt` whose zstd blocks each expand to 16 MiB (the largest block the format allows).
fn expanding_file(blocks: usize) -> Vec<u8> {
    let block_bytes = 1usize << 24;
    let frame = zstd::bulk::compress(&vec![0u8; block_bytes], 19).unwrap();
    let total = (block_bytes * blocks) as u64;
    let source =
        format!(r#"{{"bomb":{{"dtype":"U8","shape":[{total}],"data_offsets":[0,{total}]}}}}"#);
    let mut tensors = vec![TensorEntry {
        name: "bomb".into(),
        dtype: Dtype::U8,
        codec: Codec::Stored,
        shape: vec![total],
        block_units: block_bytes as u32,
        params: vec![],
        blocks: (0..blocks)
            .map(|_| BlockEntry {
                stored_len: frame.len() as u32,
                mode: BlockMode::Zstd,
                checksum: checksum(&frame),
                offset: 0,
            })
            .collect(),
    }];
    let section = write_section(source.as_bytes(), &tensors);
    let data_offset = align_up((FILE_HEADER_LEN + section.len()) as u64, TENSOR_ALIGN).unwrap();
    let data_len = assign_offsets(&mut tensors, data_offset).unwrap();
    let mut file = vec![0u8; (data_offset + data_len) as usize];
    file[..FILE_HEADER_LEN].copy_from_slice(&file_header(&section, 0, data_offset, data_len));
    file[FILE_HEADER_LEN..FILE_HEADER_LEN + section.len()].copy_from_slice(&section);
    for b in &tensors[0].blocks {
        file[b.offset as usize..b.offset as usize + frame.len()].copy_from_slice(&frame);
    }
    file
}

/// Peak resident memory (KiB) of `neuzip args`, from GNU time.
fn peak_rss_kib(args: &[&str]) -> Option<u64> {
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(neuzip())
        .args(args)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn decoding_memory_does_not_follow_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let file = expanding_file(32); // 512 MiB declared and decoded
    let path = write_file(dir.path(), "bomb.nzt", &file);
    let Some(peak) = peak_rss_kib(&["verify", "-q", path.to_str().unwrap()]) else {
        eprintln!("SKIPPED: /usr/bin/time is not installed, peak memory not measured");
        return;
    };
    let budget_kib = 2 * file.len() as u64 / 1024 + 96 * 1024;
    println!(
        "verify of a {} byte file that decodes to 512 MiB: peak RSS {} KiB (budget 2x input + 96 MiB = {budget_kib} KiB)",
        file.len(),
        peak
    );
    assert!(
        peak < budget_kib,
        "peak RSS {peak} KiB over {budget_kib} KiB"
    );
}
