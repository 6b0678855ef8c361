//! The GPU API on this machine: typed errors where there is no CUDA build, driver or device; every kernel
//! compiled to PTX by NVRTC (with the `cuda` feature); and, where a GPU is present, GPU decodes bit for bit
//! equal to the CPU decoder, lossless and lossy.
//!
//! CI sets `NEUZIP_REQUIRE_NVRTC=1` (see `.ci/run`), which turns a missing NVRTC into a failure; elsewhere the
//! PTX test prints why it did not run.

mod common;

use common::{convert_bytes, fixture, open_bytes, ROUND_TRIP_FIXTURES};
use neuzip::convert::ConvertOptions;
use neuzip::gpu::{enabled, GpuModel};
use neuzip::precision::LossySettings;
use neuzip::NzError;

fn nvrtc_required() -> bool {
    std::env::var_os("NEUZIP_REQUIRE_NVRTC").is_some_and(|v| v == "1")
}

#[test]
fn every_kernel_compiles_to_ptx() {
    if !enabled() {
        assert!(matches!(
            neuzip::gpu::compile_ptx("compute_90"),
            Err(NzError::NoCudaSupport)
        ));
        assert!(
            !nvrtc_required(),
            "NEUZIP_REQUIRE_NVRTC=1 needs a build with --features cuda"
        );
        eprintln!("gpu: built without the cuda feature; PTX not compiled");
        return;
    }
    for arch in ["compute_75", "compute_80", "compute_90"] {
        match neuzip::gpu::compile_ptx(arch) {
            Ok(kernels) => {
                assert_eq!(kernels.len(), neuzip::gpu::KERNELS.len());
                let (_, ptx) = &kernels[0];
                for entry in [neuzip::gpu::DECODE_KERNEL, neuzip::gpu::LOSSY_DECODE_KERNEL] {
                    assert!(
                        ptx.contains(&format!(".entry {entry}")),
                        "no entry point {entry} in the PTX for {arch}"
                    );
                }
                // The lossy expansion is compiled in: f64 round-to-nearest-even (`rint`) and f64 products.
                assert!(
                    ptx.contains("cvt.rni.f64.f64") && ptx.contains("mul.rn.f64"),
                    "no f64 rounding in the PTX for {arch}"
                );
                assert!(ptx.contains(&format!(".target sm_{}", &arch["compute_".len()..])));
                let header = ptx
                    .lines()
                    .filter(|l| l.contains("compilation tools") || l.starts_with(".version"));
                eprintln!(
                    "gpu: {arch}: {} bytes of PTX; {}",
                    ptx.len(),
                    header.collect::<Vec<_>>().join("; ")
                );
            }
            Err(NzError::GpuUnavailable { what }) if !nvrtc_required() => {
                eprintln!("gpu: skipping the PTX check: {what}");
                return;
            }
            Err(e) => panic!("compiling the kernels for {arch}: {e}"),
        }
    }
}

#[test]
fn a_kernel_error_shows_the_nvrtc_log() {
    if !enabled() {
        return;
    }
    // An architecture NVRTC does not know: the error names it and carries NVRTC's log.
    match neuzip::gpu::compile_ptx("compute_1") {
        Err(NzError::KernelCompile { message, log, .. }) => {
            assert!(message.contains("compute_1"), "{message}");
            assert!(!log.trim().is_empty(), "NVRTC's log is missing");
        }
        Err(NzError::GpuUnavailable { .. }) if !nvrtc_required() => {}
        other => panic!("expected a compile error, got {:?}", other.map(|k| k.len())),
    }
}

#[test]
fn gpu_decode_matches_the_cpu_or_fails_with_a_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Lossless, and lossy matrices (K = 3, groups of 64) beside lossless 1-D tensors.
    let lossy = ConvertOptions {
        lossy: LossySettings {
            default_bits: Some(3),
            norm_block: 64,
            ..LossySettings::default()
        },
        ..ConvertOptions::default()
    };
    let runs = ROUND_TRIP_FIXTURES
        .iter()
        .flat_map(|name| [(name, ConvertOptions::default()), (name, lossy.clone())]);
    for (name, options) in runs {
        let source = std::fs::read(fixture(name)).expect("fixture");
        let bytes = convert_bytes(&source, &options);
        let path = dir.path().join("model.nzt");
        std::fs::write(&path, &bytes).expect("write");
        let model = match GpuModel::load(&path, 0) {
            Ok(model) => model,
            Err(NzError::NoCudaSupport) => {
                assert!(!enabled());
                return;
            }
            Err(NzError::GpuUnavailable { what }) => {
                assert!(enabled());
                assert!(
                    std::env::var_os("NEUZIP_REQUIRE_GPU").is_none_or(|v| v != "1"),
                    "NEUZIP_REQUIRE_GPU=1 but {what}"
                );
                eprintln!("gpu: no GPU here ({what}); GPU decode not checked");
                return;
            }
            Err(e) => panic!("{name}: loading on the GPU: {e}"),
        };
        // A GPU is present: every tensor, decoded on it, equals the CPU decode.
        let file = open_bytes(bytes).expect("open");
        let decoded = model.decode_all().expect("decode_all");
        for (i, (tensor, (gpu_name, buffer))) in file.tensors().iter().zip(&decoded).enumerate() {
            assert_eq!(&tensor.name, gpu_name);
            let mut expected = vec![0u8; tensor.byte_len() as usize];
            file.decode_tensor_into(i, &mut expected)
                .expect("cpu decode");
            assert_eq!(buffer.len(), expected.len());
            let got = buffer.to_host().expect("copy back");
            assert!(got == expected, "{name}: '{gpu_name}' differs on the GPU");
        }
        let memory = model.memory();
        assert_eq!(memory.compressed_bytes, file.header().data_len);
    }
}

#[test]
fn bench_gpu_reports_figures_or_says_why_not() {
    let out = assert_cmd::Command::cargo_bin("neuzip")
        .expect("neuzip binary")
        .args(["bench", "--gpu", "--runs", "1"])
        .arg(fixture("minilm_slice_bf16.safetensors"))
        .output()
        .expect("run neuzip");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // A GPU is present: both figures are printed.
        assert!(
            stdout.contains("decode GB/s") && stdout.contains("D2D copy GB/s"),
            "{stdout}"
        );
        return;
    }
    assert_eq!(
        out.status.code(),
        Some(1),
        "not a clean error exit: {stderr}"
    );
    let expected = if enabled() {
        "GPU unavailable"
    } else {
        "built without CUDA"
    };
    assert!(
        stderr.starts_with("neuzip: error:") && stderr.contains(expected),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}
