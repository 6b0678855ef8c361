//! The GPU loader: keeps a `.nzt` model compressed in device memory and decodes tensors on the GPU, from the
//! same bytes the CPU decoder reads.
//!
//! - [`layout`] (always built): the host's description of a tensor for the kernel, with every length checked.
//! - [`twin`] (always built): the kernel's CPU twin, the same algorithm with warps and lanes simulated; tests
//!   match it bit for bit against [`crate::NztFile`].
//! - `GpuModel`, `GpuBuffer`, [`compile_ptx`], [`bench_gpu`]: with the cargo feature `cuda`, from `enabled.rs`
//!   (cudarc, CUDA loaded at run time); without it, from `disabled.rs`, where every call returns
//!   [`NzError::NoCudaSupport`](crate::NzError::NoCudaSupport).
//!
//! The kernels live in `kernels/*.cu`, are embedded in the binary ([`KERNELS`]) and compiled by NVRTC at run
//! time for the device's architecture.

pub mod layout;
pub mod twin;

#[cfg(feature = "cuda")]
#[path = "enabled.rs"]
mod backend;

#[cfg(not(feature = "cuda"))]
#[path = "disabled.rs"]
mod backend;

pub use backend::{bench_gpu, compile_ptx, GpuBuffer, GpuModel};

use serde::Serialize;

/// Every kernel source, as (file name, CUDA C++ source).
pub const KERNELS: &[(&str, &str)] = &[(
    "split_decode.cu",
    include_str!("../../kernels/split_decode.cu"),
)];

/// The decoding kernel's entry point in `split_decode.cu` for lossless tensors (codecs `float_split`, `stored`).
pub const DECODE_KERNEL: &str = "nzt_decode_blocks";

/// The entry point in `split_decode.cu` for tensors of codec `lossy`.
pub const LOSSY_DECODE_KERNEL: &str = "nzt_decode_lossy_blocks";

/// Whether this build has the GPU backend (cargo feature `cuda`).
pub fn enabled() -> bool {
    cfg!(feature = "cuda")
}

/// Device memory a loaded model holds, against what its dense tensors would need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    /// The data section (every block payload, as in the file), held on the device.
    pub compressed_bytes: u64,
    /// Block descriptors, field layouts and tables, held on the device.
    pub metadata_bytes: u64,
    /// Decoded size of every tensor.
    pub dense_bytes: u64,
    /// Of the payloads, bytes in zstd blocks, which the host decodes (from the mapped file).
    pub host_decoded_bytes: u64,
}

/// `neuzip bench --gpu`: decode throughput beside a device-to-device copy of the same bytes, same run.
#[derive(Clone, Debug, Serialize)]
pub struct GpuBenchReport {
    pub device: String,
    pub memory: MemoryReport,
    pub runs: usize,
    /// Whole model: every tensor decoded into one scratch buffer.
    pub decode_gbps: f64,
    /// The same tensors' bytes copied device to device.
    pub copy_gbps: f64,
    /// The largest tensor on its own.
    pub largest: String,
    pub largest_bytes: u64,
    pub largest_decode_gbps: f64,
    pub largest_copy_gbps: f64,
}

impl GpuBenchReport {
    /// The memory-bound limit for decoding: a copy moves 2 bytes per byte, a bf16 decode about 1.66 (reads
    /// ~0.66, writes 1).
    pub fn memory_bound_gbps(copy_gbps: f64) -> f64 {
        copy_gbps / 1.66
    }
}
