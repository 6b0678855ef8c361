//! Codecs: frequency tables, the interleaved rANS coder, bit packing of raw fields, and the two float codecs
//! built from them: lossless `split` and `lossy` (rounded mantissas, rANS-coded exponents).

pub mod bitpack;
pub mod freq;
pub mod lossy;
pub mod rans;
pub mod simd;
pub mod split;
