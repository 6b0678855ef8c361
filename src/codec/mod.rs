//! Codecs: frequency tables, the interleaved rANS coder, bit packing of raw fields, and the lossless float
//! codec built from them.

pub mod bitpack;
pub mod freq;
pub mod rans;
pub mod simd;
pub mod split;
