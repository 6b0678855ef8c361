//! The `.nzt` container: constants and ids from format-spec/nzt.md, the pure header parser and serializer,
//! the reader (decode tensors and blocks from a mapped file) and the writer (temporary file, then rename).

pub mod header;
pub mod reader;
pub mod writer;

/// The first eight bytes of every `.nzt` file.
pub const MAGIC: [u8; 8] = [0x89, b'N', b'Z', b'T', 0x0d, 0x0a, 0x1a, 0x0a];
pub const VERSION_MAJOR: u16 = 1;
/// The highest minor version this build reads and writes. 1.1 added the lossy codec, 1.2 the codebook codec;
/// a file is written with the lowest minor version that has every codec it uses, so a file without lossy or
/// codebook tensors is written as 1.0, byte for byte as before.
pub const VERSION_MINOR: u16 = 2;
/// The first minor version with the lossy codec (codec id 2, block mode 4).
pub const LOSSY_VERSION_MINOR: u16 = 1;
/// The first minor version with the codebook codec (codec id 3, block mode 5).
pub const CODEBOOK_VERSION_MINOR: u16 = 2;
/// Size of the fixed file header.
pub const FILE_HEADER_LEN: usize = 48;
/// Alignment of the data section and of each tensor's first block.
pub const TENSOR_ALIGN: u64 = 64;
/// Alignment of each block inside a tensor.
pub const BLOCK_ALIGN: u64 = 16;
/// Largest block, in bytes of decoded data, a reader accepts.
pub const MAX_BLOCK_BYTES: u64 = 1 << 24;
/// Largest tensor rank a reader accepts.
pub const MAX_RANK: usize = 32;
/// Fewest bytes a tensor entry can take; bounds the tensor count before anything is allocated.
pub const MIN_TENSOR_ENTRY_LEN: u64 = 16;
/// Bytes per block entry.
pub const BLOCK_ENTRY_LEN: u64 = 16;

/// Elements per block the encoder uses for float tensors.
pub const DEFAULT_FLOAT_BLOCK_ELEMENTS: u32 = 1 << 17;
/// Bytes per block the encoder uses for stored tensors.
pub const DEFAULT_STORED_BLOCK_BYTES: u32 = 1 << 18;

/// How a tensor is coded. The numbers are the spec's codec ids and are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Bytes kept as they are (raw or zstd per block).
    Stored = 0,
    /// Lossless float codec: fields split, the top ones rANS-coded.
    FloatSplit = 1,
    /// Lossy float codec (format 1.1): mantissas rounded to K bits, the rest rANS-coded or packed.
    Lossy = 2,
    /// Codebook codec (format 1.2): per-cluster codebooks, group scales, rANS-coded indices.
    Codebook = 3,
}

impl Codec {
    pub fn from_id(id: u8) -> Option<Codec> {
        match id {
            0 => Some(Codec::Stored),
            1 => Some(Codec::FloatSplit),
            2 => Some(Codec::Lossy),
            3 => Some(Codec::Codebook),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Stored => "stored",
            Codec::FloatSplit => "float_split",
            Codec::Lossy => "lossy",
            Codec::Codebook => "codebook",
        }
    }
}

/// How one block's payload is stored. The numbers are the spec's mode ids and are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockMode {
    Raw = 0,
    Zstd = 1,
    Split = 2,
    /// Split, with the block's own parameters in front of the body.
    SplitLocal = 3,
    /// A lossy payload coded with the tensor's lossy parameters (codec `lossy` only).
    Lossy = 4,
    /// A codebook payload coded with the tensor's codebook parameters (codec `codebook` only).
    Codebook = 5,
}

impl BlockMode {
    pub fn from_id(id: u8) -> Option<BlockMode> {
        match id {
            0 => Some(BlockMode::Raw),
            1 => Some(BlockMode::Zstd),
            2 => Some(BlockMode::Split),
            3 => Some(BlockMode::SplitLocal),
            4 => Some(BlockMode::Lossy),
            5 => Some(BlockMode::Codebook),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockMode::Raw => "raw",
            BlockMode::Zstd => "zstd",
            BlockMode::Split => "split",
            BlockMode::SplitLocal => "split_local",
            BlockMode::Lossy => "lossy",
            BlockMode::Codebook => "codebook",
        }
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two); None on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// XXH3-64 with seed 0, the checksum of the header and of every block.
pub fn checksum(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's check value (section 2.4), and the one-shot hash (SIMD paths on long inputs) equal to the
    /// streaming one. (tests/golden.rs holds checksums computed by another XXH3 implementation.)
    #[test]
    fn checksum_is_xxh3_64_with_seed_0() {
        assert_eq!(checksum(b""), 0x2D06_8005_38D3_94C2);
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [1, 16, 17, 128, 129, 240, 241, 1024, 100_000] {
            let mut streamed = twox_hash::XxHash3_64::with_seed(0);
            for chunk in data[..len].chunks(7) {
                std::hash::Hasher::write(&mut streamed, chunk);
            }
            assert_eq!(
                checksum(&data[..len]),
                std::hash::Hasher::finish(&streamed),
                "len {len}"
            );
        }
    }
}
