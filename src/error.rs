//! The library's one error type. Every variant says where (tensor, block, offset) and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or decoding a `.nzt` or safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum NzError {
    /// An operating-system error on a named file. (The cause is part of the message, not a separate
    /// `source`, so that error chains print it once.)
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The file does not start with the `.nzt` magic bytes.
    #[error("not a .nzt file (magic bytes are {found:02x?})")]
    BadMagic { found: Vec<u8> },

    /// A major version this build cannot read, or flag bits it does not know.
    #[error("unsupported .nzt version {major}.{minor} (flags {flags:#x}); this build reads 1.0 and 1.1 with no flags")]
    UnsupportedVersion { major: u16, minor: u16, flags: u32 },

    /// The file ends before a structure it declares.
    #[error("truncated: {what} needs bytes {start}..{end} but only {available} are present")]
    Truncated {
        what: String,
        start: u64,
        end: u64,
        available: u64,
    },

    /// A checksum does not match the bytes it covers.
    #[error("checksum mismatch in {what}: stored {stored:016x}, computed {computed:016x} (file is corrupted)")]
    ChecksumMismatch {
        what: String,
        stored: u64,
        computed: u64,
    },

    /// A structural rule of the format is broken (bad length, bad id, inconsistent counts).
    #[error("malformed .nzt: {what}")]
    Malformed { what: String },

    /// A declared size is beyond what this reader accepts.
    #[error("limit exceeded: {what} is {value}, the maximum is {limit}")]
    LimitExceeded {
        what: String,
        value: u64,
        limit: u64,
    },

    /// An entropy-coded stream does not decode to exactly its declared content.
    #[error("corrupt data in tensor '{tensor}' block {block}: {what}")]
    CorruptBlock {
        tensor: String,
        block: usize,
        what: String,
    },

    /// The input is not a valid safetensors file.
    #[error("invalid safetensors file: {what}")]
    InvalidSafetensors { what: String },

    /// A dtype name or id this build does not know.
    #[error("unknown dtype {what}")]
    UnknownDtype { what: String },

    /// A tensor name that is not in the file.
    #[error("no tensor named '{name}'")]
    NoSuchTensor { name: String },

    /// A caller's buffer of the wrong size.
    #[error("buffer for '{tensor}' has {found} bytes, {expected} are needed")]
    BufferSize {
        tensor: String,
        expected: usize,
        found: usize,
    },

    /// The output exists and `--force` was not given.
    #[error("{path} already exists (use --force to replace it)")]
    OutputExists { path: PathBuf },

    /// The output path names an input file.
    #[error("refusing to write {path}: it is an input of this command")]
    OutputIsInput { path: PathBuf },

    /// This build has no GPU backend.
    #[error("built without CUDA: rebuild with `cargo build --features cuda` to use the GPU")]
    NoCudaSupport,

    /// The CUDA driver or NVRTC library cannot be loaded, or there is no such device.
    #[error("GPU unavailable: {what}")]
    GpuUnavailable { what: String },

    /// A CUDA driver call failed.
    #[error("CUDA error {what}: {message}")]
    Gpu { what: String, message: String },

    /// NVRTC rejected a kernel; `log` is its compile log.
    #[error("NVRTC could not compile {kernel}: {message}\n{log}")]
    KernelCompile {
        kernel: String,
        message: String,
        log: String,
    },

    /// A conversion setting that cannot apply (a bit count too large for a dtype, a group size out of range).
    #[error("invalid setting: {what}")]
    InvalidSetting { what: String },

    /// zstd failed to compress or decompress.
    #[error("zstd error in {what}: {message}")]
    Zstd { what: String, message: String },

    /// A quantizer parameter or input outside what it accepts (bit width, group size, shape, non-finite data).
    #[error("invalid quantization input: {what}")]
    InvalidQuantInput { what: String },
}

pub type Result<T, E = NzError> = std::result::Result<T, E>;

impl NzError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        NzError::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn malformed(what: impl Into<String>) -> Self {
        NzError::Malformed { what: what.into() }
    }
}
