//! Codecs: frequency tables, the interleaved rANS coder (scalar reference and SIMD kernels), bit packing of raw
//! fields, the two float codecs built from them (lossless `split` and `lossy`: rounded mantissas, rANS-coded
//! exponents), the codebook quantizer with its reference baselines and error metrics, and its codec in the
//! file (`codebook_format`).

pub mod bitpack;
pub mod codebook;
pub mod codebook_format;
pub mod freq;
pub mod lossy;
pub mod quant_baselines;
pub mod quant_metrics;
pub mod rans;
pub mod simd;
pub mod split;
