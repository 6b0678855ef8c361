//! The GPU API in a build without the cargo feature `cuda`: the same names, and every call returns
//! [`NzError::NoCudaSupport`].

use std::convert::Infallible;
use std::path::Path;

use super::{GpuBenchReport, MemoryReport};
use crate::error::{NzError, Result};
use crate::format::reader::DecodeOptions;

/// A device buffer (never exists in this build).
pub struct GpuBuffer {
    never: Infallible,
}

impl GpuBuffer {
    pub fn len(&self) -> usize {
        match self.never {}
    }

    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    pub fn to_host(&self) -> Result<Vec<u8>> {
        match self.never {}
    }
}

/// A model held compressed on a GPU (never exists in this build).
pub struct GpuModel {
    never: Infallible,
}

impl GpuModel {
    pub fn load(_path: &Path, _device: usize) -> Result<GpuModel> {
        Err(NzError::NoCudaSupport)
    }

    pub fn load_with(_path: &Path, _device: usize, _options: DecodeOptions) -> Result<GpuModel> {
        Err(NzError::NoCudaSupport)
    }

    pub fn device_name(&self) -> &str {
        match self.never {}
    }

    pub fn tensor_names(&self) -> Vec<&str> {
        match self.never {}
    }

    pub fn memory(&self) -> MemoryReport {
        match self.never {}
    }

    pub fn alloc(&self, _bytes: usize) -> Result<GpuBuffer> {
        match self.never {}
    }

    pub fn decode(&self, _name: &str) -> Result<GpuBuffer> {
        match self.never {}
    }

    pub fn decode_into(&self, _name: &str, _out: &mut GpuBuffer) -> Result<usize> {
        match self.never {}
    }

    pub fn decode_all(&self) -> Result<Vec<(String, GpuBuffer)>> {
        match self.never {}
    }
}

/// Compiling kernels needs NVRTC, which this build does not load.
pub fn compile_ptx(_arch: &str) -> Result<Vec<(String, String)>> {
    Err(NzError::NoCudaSupport)
}

pub fn bench_gpu(_path: &Path, _device: usize, _runs: usize) -> Result<GpuBenchReport> {
    Err(NzError::NoCudaSupport)
}
