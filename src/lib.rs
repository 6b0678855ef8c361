//! neuzip: compression of neural-network weights, from safetensors to `.nzt` and back: lossless by default,
//! or lossy (rounded mantissas) for the tensors [`precision`] selects.
//!
//! Data flow: [`source`] (safetensors, mapped) → [`convert`] (a plan per tensor, blocks encoded by
//! [`codec`]) → [`format::writer`] (temporary file, checksum, rename). Reading: [`format::reader::NztFile`]
//! maps the file, [`format::header::parse`] validates the header, and any tensor or block decodes on its own.

pub mod allocate;
pub mod analyze;
pub mod bench;
pub mod codec;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod format;
pub mod gpu;
pub mod inspect;
pub mod mmap;
pub mod precision;
pub mod source;
pub mod verify;

pub use dtype::Dtype;
pub use error::{NzError, Result};
pub use format::reader::{DecodeOptions, NztFile};
