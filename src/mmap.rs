//! The crate's one `unsafe` boundary: read-only memory maps of input files.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use crate::error::{NzError, Result};

/// Bytes of a file, mapped read-only, or owned (for data that never touched the disk).
pub enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Maps `path` read-only.
pub fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| NzError::io(path, e))?;
    let meta = file.metadata().map_err(|e| NzError::io(path, e))?;
    if !meta.is_file() {
        return Err(NzError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    if meta.len() == 0 {
        return Ok(Bytes::Owned(Vec::new()));
    }
    // SAFETY: the map is read-only and private to this process. neuzip never writes to a file it has mapped:
    // outputs go to a fresh temporary file that is renamed into place (format::writer::OutputFile), and an
    // output path equal to an input is refused. Another process truncating the file while it is mapped would
    // fault the reader; like every mmap-based loader (safetensors included), we accept that risk.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| NzError::io(path, e))?;
    Ok(Bytes::Mapped(map))
}
