//! The GPU backend (cargo feature `cuda`): cudarc with CUDA loaded at run time. Every entry point first checks
//! that libcuda (and, to compile kernels, libnvrtc) can be loaded, since cudarc panics on a missing library.
//!
//! Load: map the file, build every tensor's layout (checksums verified), copy the data section to the device
//! through two pinned staging buffers used in turn (the host fills one while the other's copy runs), upload the
//! layouts. Decode: one kernel launch per tensor (the lossy entry point for a lossy tensor); zstd blocks are decoded on the host and copied in.
//!
//! This is the crate's second `unsafe` boundary (the first is `mmap.rs`): cudarc marks library probing, pinned
//! allocation and kernel launches `unsafe`; each use below says why it holds.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use super::layout::{status_error, TensorLayout, STATUS_OK};
use super::{GpuBenchReport, MemoryReport, DECODE_KERNEL, KERNELS, LOSSY_DECODE_KERNEL};
use crate::error::{NzError, Result};
use crate::format::header;
use crate::format::reader::decode_zstd_block;
use crate::format::reader::DecodeOptions;
use crate::mmap::{map_file, Bytes};

/// Size of each of the two pinned staging buffers.
const STAGING_BYTES: usize = 8 << 20;

fn gpu_error(what: impl Into<String>) -> impl FnOnce(DriverError) -> NzError {
    let what = what.into();
    move |e| NzError::Gpu {
        what,
        message: format!("{e:?}"),
    }
}

/// Checks that the CUDA driver library can be loaded.
fn require_driver() -> Result<()> {
    // SAFETY: `is_culib_present` only tries to dlopen the library names cudarc knows and drops what it opened;
    // it calls no CUDA function.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(NzError::GpuUnavailable {
            what: "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into(),
        })
    }
}

/// Checks that NVRTC can be loaded.
fn require_nvrtc() -> Result<()> {
    // SAFETY: as in `require_driver`: a dlopen probe, no NVRTC call.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(NzError::GpuUnavailable {
            what: "NVRTC (libnvrtc.so.12 or libnvrtc.so) was not found: add its directory to LD_LIBRARY_PATH \
                   (`pip install nvidia-cuda-nvrtc-cu12` provides one)"
                .into(),
        })
    }
}

fn compile(name: &str, source: &str, arch: &str) -> Result<Ptx> {
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++14".into()],
        name: Some(name.to_string()),
        ..Default::default()
    };
    compile_ptx_with_opts(source, options).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => NzError::KernelCompile {
            kernel: name.to_string(),
            message: format!("{nvrtc:?} for {arch}"),
            log: log.to_string_lossy().into_owned(),
        },
        other => NzError::KernelCompile {
            kernel: name.to_string(),
            message: format!("{other:?}"),
            log: String::new(),
        },
    })
}

/// Compiles the decode kernel for a device of compute capability `major.minor`. If this NVRTC does not know the
/// device's architecture (a GPU newer than the library), falls back to older virtual architectures, whose PTX
/// the driver compiles for the device; the first error is returned if none works.
fn compile_for_device(major: i32, minor: i32) -> Result<Ptx> {
    let (name, source) = KERNELS[0];
    let native = format!("compute_{major}{minor}");
    let first_error = match compile(name, source, &native) {
        Ok(ptx) => return Ok(ptx),
        Err(e) => e,
    };
    let capability = major * 10 + minor;
    for older in [90, 80] {
        if older < capability {
            if let Ok(ptx) = compile(name, source, &format!("compute_{older}")) {
                return Ok(ptx);
            }
        }
    }
    Err(first_error)
}

/// Compiles every kernel in `kernels/` to PTX for `arch` (e.g. `compute_90`) with NVRTC; no GPU needed. Returns
/// (file name, PTX text).
pub fn compile_ptx(arch: &str) -> Result<Vec<(String, String)>> {
    require_nvrtc()?;
    KERNELS
        .iter()
        .map(|(name, source)| Ok((name.to_string(), compile(name, source, arch)?.to_src())))
        .collect()
}

/// A buffer in device memory.
pub struct GpuBuffer {
    /// At least one byte: CUDA allocations cannot be empty.
    slice: CudaSlice<u8>,
    len: usize,
}

impl GpuBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the buffer to host memory.
    pub fn to_host(&self) -> Result<Vec<u8>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        self.slice
            .stream()
            .clone_dtoh(&self.slice.slice(0..self.len))
            .map_err(gpu_error("copying a buffer to the host"))
    }

    /// The cudarc slice, to hand to other kernels (one byte long for an empty buffer).
    pub fn cuda_slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }
}

/// One tensor's descriptor arrays on the device.
struct DeviceTensor {
    layout: TensorLayout,
    descs: CudaSlice<u32>,
    layouts: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    warps: u32,
}

/// A `.nzt` model held compressed in device memory.
pub struct GpuModel {
    file: Bytes,
    data_offset: u64,
    stream: Arc<CudaStream>,
    /// `nzt_decode_blocks`, for lossless tensors.
    function: CudaFunction,
    /// `nzt_decode_lossy_blocks`, for lossy tensors.
    lossy_function: CudaFunction,
    data: Option<CudaSlice<u8>>,
    tensors: Vec<DeviceTensor>,
    device_name: String,
}

impl GpuModel {
    /// Loads `path` onto CUDA device number `device`: every block payload is copied to device memory, as stored,
    /// after its checksum is verified.
    pub fn load(path: &Path, device: usize) -> Result<GpuModel> {
        Self::load_with(path, device, DecodeOptions::default())
    }

    /// `load`, with the checksums checked or not. Checking them reads the whole file once before the copies;
    /// without it, the disk reads happen in the staging pass and overlap with the copies to the device.
    pub fn load_with(path: &Path, device: usize, options: DecodeOptions) -> Result<GpuModel> {
        require_driver()?;
        require_nvrtc()?;
        let file = map_file(path)?;
        let header = header::parse(&file)?;
        let count = CudaContext::device_count().map_err(gpu_error("counting CUDA devices"))?;
        if device >= count.max(0) as usize {
            return Err(NzError::GpuUnavailable {
                what: format!("CUDA device {device} asked for, {count} present"),
            });
        }
        let ctx =
            CudaContext::new(device).map_err(gpu_error(format!("opening CUDA device {device}")))?;
        let stream = ctx.default_stream();
        let device_name = ctx.name().map_err(gpu_error("reading the device name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(gpu_error("reading the compute capability"))?;
        let ptx = compile_for_device(major, minor)?;
        let module = ctx
            .load_module(ptx)
            .map_err(gpu_error("loading the PTX module"))?;
        let function = module
            .load_function(DECODE_KERNEL)
            .map_err(gpu_error("finding the decode kernel"))?;
        let lossy_function = module
            .load_function(LOSSY_DECODE_KERNEL)
            .map_err(gpu_error("finding the lossy decode kernel"))?;
        let smem_limit = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(gpu_error("reading the shared memory limit"))? as u32;

        let mut tensors = Vec::with_capacity(header.tensors.len());
        let mut most_smem = 0;
        for tensor in &header.tensors {
            let layout = TensorLayout::build(&file, tensor, options.verify_checksums)?;
            let warps = layout
                .warps_per_cta(smem_limit)
                .ok_or_else(|| NzError::LimitExceeded {
                    what: format!("shared memory for the tables of '{}'", tensor.name),
                    value: (layout.tensor_smem_bytes + layout.local_smem_bytes) as u64,
                    limit: smem_limit as u64,
                })?;
            most_smem = most_smem.max(layout.smem_bytes(warps));
            let upload = |words: &[u32], what: &str| {
                // A zero-length allocation is not allowed: keep one word.
                let words = if words.is_empty() { &[0u32][..] } else { words };
                stream.clone_htod(words).map_err(gpu_error(format!(
                    "uploading the {what} of '{}'",
                    tensor.name
                )))
            };
            tensors.push(DeviceTensor {
                descs: upload(&layout.descs, "block descriptors")?,
                layouts: upload(&layout.layouts, "field layouts")?,
                tables: upload(&layout.tables, "tables")?,
                layout,
                warps,
            });
        }
        for f in [&function, &lossy_function] {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                most_smem as i32,
            )
            .map_err(gpu_error("raising the kernel's shared memory limit"))?;
        }
        let data_range =
            header.data_offset as usize..(header.data_offset + header.data_len) as usize;
        let payloads = file.get(data_range).ok_or_else(|| NzError::Truncated {
            what: "data section".into(),
            start: header.data_offset,
            end: header.data_offset + header.data_len,
            available: file.len() as u64,
        })?;
        let data = upload_staged(&ctx, &stream, payloads)?;
        Ok(GpuModel {
            file,
            data_offset: header.data_offset,
            stream,
            function,
            lossy_function,
            data,
            tensors,
            device_name,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors
            .iter()
            .map(|t| t.layout.name.as_str())
            .collect()
    }

    pub fn memory(&self) -> MemoryReport {
        let mut report = MemoryReport {
            compressed_bytes: self.data.as_ref().map_or(0, |d| d.len() as u64),
            ..Default::default()
        };
        for t in &self.tensors {
            report.metadata_bytes += t.layout.metadata_bytes();
            report.dense_bytes += t.layout.byte_len;
            report.host_decoded_bytes += t
                .layout
                .zstd_blocks
                .iter()
                .map(|&k| t.layout.block_file_range(k).len() as u64)
                .sum::<u64>();
        }
        report
    }

    /// A device buffer of `bytes` bytes (zeroed), e.g. one scratch buffer for `decode_into`.
    pub fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(gpu_error(format!("allocating {bytes} bytes")))?;
        Ok(GpuBuffer { slice, len: bytes })
    }

    fn tensor(&self, name: &str) -> Result<&DeviceTensor> {
        self.tensors
            .iter()
            .find(|t| t.layout.name == name)
            .ok_or_else(|| NzError::NoSuchTensor {
                name: name.to_string(),
            })
    }

    /// Decodes tensor `name` into a new device buffer of exactly its size.
    pub fn decode(&self, name: &str) -> Result<GpuBuffer> {
        let tensor = self.tensor(name)?;
        let mut out = self.alloc(tensor.layout.byte_len as usize)?;
        self.decode_tensor(tensor, &mut out)?;
        Ok(out)
    }

    /// Decodes tensor `name` into the first bytes of `out`, which may be larger (one scratch buffer can serve
    /// every tensor). Returns the tensor's byte length.
    pub fn decode_into(&self, name: &str, out: &mut GpuBuffer) -> Result<usize> {
        let tensor = self.tensor(name)?;
        self.decode_tensor(tensor, out)?;
        Ok(tensor.layout.byte_len as usize)
    }

    /// Decodes every tensor, each into its own buffer.
    pub fn decode_all(&self) -> Result<Vec<(String, GpuBuffer)>> {
        self.tensors
            .iter()
            .map(|t| Ok((t.layout.name.clone(), self.decode(&t.layout.name)?)))
            .collect()
    }

    fn decode_tensor(&self, tensor: &DeviceTensor, out: &mut GpuBuffer) -> Result<()> {
        match self.launch(tensor, out)? {
            Some(status) => self.check(tensor, &status),
            None => Ok(()),
        }
    }

    /// Queues the decode of `tensor` into `out` (the kernel, then the host-decoded zstd blocks); returns the
    /// device buffer of per-block statuses for `check`, or None for a tensor without blocks.
    fn launch(&self, tensor: &DeviceTensor, out: &mut GpuBuffer) -> Result<Option<CudaSlice<u32>>> {
        let layout = &tensor.layout;
        let byte_len = layout.byte_len as usize;
        if out.len() < byte_len {
            return Err(NzError::BufferSize {
                tensor: layout.name.clone(),
                expected: byte_len,
                found: out.len(),
            });
        }
        let blocks = layout.block_count() as u32;
        let Some(data) = self.data.as_ref().filter(|_| blocks > 0) else {
            return Ok(None);
        };
        let name = &layout.name;
        let start = (layout.payload.start - self.data_offset) as usize;
        let end = (layout.payload.end - self.data_offset) as usize;
        let payload = data.slice(start..end);
        let mut status = self
            .stream
            .alloc_zeros::<u32>(blocks as usize)
            .map_err(gpu_error(format!("allocating the status of '{name}'")))?;
        let mut dense = out.slice.slice_mut(0..byte_len);
        let config = LaunchConfig {
            grid_dim: (blocks.div_ceil(tensor.warps), 1, 1),
            block_dim: (32 * tensor.warps, 1, 1),
            shared_mem_bytes: layout.smem_bytes(tensor.warps),
        };
        let function = if layout.lossy {
            &self.lossy_function
        } else {
            &self.function
        };
        let mut launch = self.stream.launch_builder(function);
        launch
            .arg(&payload)
            .arg(&tensor.descs)
            .arg(&blocks)
            .arg(&tensor.layouts)
            .arg(&tensor.tables)
            .arg(&layout.tensor_layout)
            .arg(&layout.tensor_smem_bytes)
            .arg(&layout.local_smem_bytes)
            .arg(&layout.unit_bytes)
            .arg(&mut dense)
            .arg(&mut status);
        // SAFETY: the arguments match the signature of both entry points in kernels/split_decode.cu, in order and
        // type (pointers to u8/u32 device memory, u32 scalars). Every offset the kernel derives from the descriptors
        // was checked against the payload and output sizes by `TensorLayout::build`; the grid covers
        // `blocks` warps and the dynamic shared memory is what the layout asks for `tensor.warps` warps.
        unsafe { launch.launch(config) }
            .map_err(gpu_error(format!("launching the decode of '{name}'")))?;
        for &k in &layout.zstd_blocks {
            let mut block = vec![0u8; layout.block_output(k).len()];
            decode_zstd_block(name, k, &self.file[layout.block_file_range(k)], &mut block)?;
            let mut dst = dense.slice_mut(layout.block_output(k));
            self.stream
                .memcpy_htod(&block, &mut dst)
                .map_err(gpu_error(format!("copying zstd block {k} of '{name}'")))?;
        }
        Ok(Some(status))
    }

    /// Waits for a launched decode and turns a nonzero block status into an error.
    fn check(&self, tensor: &DeviceTensor, status: &CudaSlice<u32>) -> Result<()> {
        let name = &tensor.layout.name;
        let status = self
            .stream
            .clone_dtoh(status)
            .map_err(gpu_error(format!("reading the status of '{name}'")))?;
        match status.iter().position(|&s| s != STATUS_OK) {
            Some(k) => Err(status_error(name, k, status[k])),
            None => Ok(()),
        }
    }
}

/// Copies `bytes` to a new device buffer through two pinned staging buffers, filled in turn: while the copy
/// from one runs, the host fills the other. Returns None for no bytes.
fn upload_staged(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    bytes: &[u8],
) -> Result<Option<CudaSlice<u8>>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let mut device = stream
        .alloc_zeros::<u8>(bytes.len())
        .map_err(gpu_error(format!(
            "allocating {} bytes for the payloads",
            bytes.len()
        )))?;
    let chunk = STAGING_BYTES.min(bytes.len());
    let pinned = |len: usize| -> Result<PinnedHostSlice<u8>> {
        // SAFETY: the buffer's contents are undefined until written; every byte of a staging buffer is written
        // (copy_from_slice of exactly its length) before it is copied to the device.
        unsafe { ctx.alloc_pinned::<u8>(len) }
            .map_err(gpu_error("allocating pinned staging memory"))
    };
    let mut staging = [pinned(chunk)?, pinned(chunk)?];
    let mut in_flight: [Option<CudaEvent>; 2] = [None, None];
    for (c, piece) in bytes.chunks(chunk).enumerate() {
        let slot = c % 2;
        if let Some(event) = in_flight[slot].take() {
            event
                .synchronize()
                .map_err(gpu_error("waiting for a staging copy"))?;
        }
        let start = c * chunk;
        let mut dst = device.slice_mut(start..start + piece.len());
        if piece.len() == chunk {
            let buffer = &mut staging[slot];
            buffer
                .as_mut_slice()
                .map_err(gpu_error("filling a staging buffer"))?
                .copy_from_slice(piece);
            stream
                .memcpy_htod(&*buffer, &mut dst)
                .map_err(gpu_error("copying payloads to the device"))?;
        } else {
            // The last, shorter piece: a pinned buffer of its own length (copies need equal lengths).
            let mut last = pinned(piece.len())?;
            last.as_mut_slice()
                .map_err(gpu_error("filling a staging buffer"))?
                .copy_from_slice(piece);
            stream
                .memcpy_htod(&last, &mut dst)
                .map_err(gpu_error("copying payloads to the device"))?;
            stream
                .synchronize()
                .map_err(gpu_error("finishing the payload copies"))?;
        }
        in_flight[slot] = Some(
            stream
                .record_event(None)
                .map_err(gpu_error("recording a staging event"))?,
        );
    }
    stream
        .synchronize()
        .map_err(gpu_error("finishing the payload copies"))?;
    Ok(Some(device))
}

/// Median seconds of `runs` timed calls of `f` (after one warm-up), each ended by a stream synchronization.
fn median_seconds(
    stream: &CudaStream,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    f()?;
    stream.synchronize().map_err(gpu_error("synchronizing"))?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        stream.synchronize().map_err(gpu_error("synchronizing"))?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Loads the `.nzt` at `path` on `device` and measures decoding every tensor (and the largest alone) into one
/// scratch buffer, beside device-to-device copies of the same byte counts.
pub fn bench_gpu(path: &Path, device: usize, runs: usize) -> Result<GpuBenchReport> {
    let model = GpuModel::load(path, device)?;
    let memory = model.memory();
    let largest_index = (0..model.tensors.len())
        .max_by_key(|&t| model.tensors[t].layout.byte_len)
        .ok_or_else(|| NzError::malformed("the file has no tensors"))?;
    let largest = &model.tensors[largest_index];
    let most = largest.layout.byte_len as usize;
    let mut scratch = model.alloc(most)?;
    let source = model.alloc(most)?;
    let stream = Arc::clone(&model.stream);
    // Timed: the launches and a final synchronization; the statuses of the last run are checked afterwards.
    type Statuses = Vec<(usize, Option<CudaSlice<u32>>)>;
    let decode = |scratch: &mut GpuBuffer, tensors: &[usize]| -> Result<Statuses> {
        tensors
            .iter()
            .map(|&t| Ok((t, model.launch(&model.tensors[t], scratch)?)))
            .collect()
    };
    let (mut all_statuses, mut one_statuses) = (Vec::new(), Vec::new());
    let copy = |scratch: &mut GpuBuffer, len: usize| -> Result<()> {
        let src = source.slice.slice(0..len);
        let mut dst = scratch.slice.slice_mut(0..len);
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(gpu_error("device-to-device copy"))
    };
    let gbps = |bytes: u64, seconds: f64| bytes as f64 / seconds / 1e9;
    let all: Vec<usize> = (0..model.tensors.len()).collect();
    let all_decode = median_seconds(&stream, runs, || {
        all_statuses = decode(&mut scratch, &all)?;
        Ok(())
    })?;
    let all_copy = median_seconds(&stream, runs, || {
        for t in &model.tensors {
            copy(&mut scratch, t.layout.byte_len as usize)?;
        }
        Ok(())
    })?;
    let one_decode = median_seconds(&stream, runs, || {
        one_statuses = decode(&mut scratch, &[largest_index])?;
        Ok(())
    })?;
    for (t, status) in all_statuses.iter().chain(&one_statuses) {
        if let Some(status) = status {
            model.check(&model.tensors[*t], status)?;
        }
    }
    let one_copy = median_seconds(&stream, runs, || copy(&mut scratch, most))?;
    Ok(GpuBenchReport {
        device: model.device_name.clone(),
        memory,
        runs: runs.max(1),
        decode_gbps: gbps(memory.dense_bytes, all_decode),
        copy_gbps: gbps(memory.dense_bytes, all_copy),
        largest: largest.layout.name.clone(),
        largest_bytes: most as u64,
        largest_decode_gbps: gbps(most as u64, one_decode),
        largest_copy_gbps: gbps(most as u64, one_copy),
    })
}
