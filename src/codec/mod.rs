//! Codecs: frequency tables, the interleaved rANS coder, bit packing of raw fields, the lossless float codec
//! built from them, and the codebook quantizer with its reference baselines and error metrics.

pub mod bitpack;
pub mod codebook;
pub mod freq;
pub mod quant_baselines;
pub mod quant_metrics;
pub mod rans;
pub mod split;
