//! What the codec can reach on a safetensors file before converting it: exponent histograms, zero-order
//! entropies, the bound of the layout the codec would pick, and the predicted `.nzt` size.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::codec::freq::entropy_bits;
use crate::codec::split::{plan, Coding, FieldStats};
use crate::convert::ConvertOptions;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::source::SafetensorsFile;

#[derive(Clone, Debug, Serialize)]
pub struct TensorAnalysis {
    pub name: String,
    pub dtype: String,
    pub elements: u64,
    /// Field layout the codec would use, most significant first, e.g. "10c+6r" (c = coded, r = raw);
    /// "stored" when the tensor is kept as bytes (zstd or raw).
    pub layout: String,
    /// Zero-order bound of that layout in bits per weight (no tables, no flushes).
    pub bound_bits_per_weight: f64,
    /// Predicted bits per weight, tables and flushes included.
    pub predicted_bits_per_weight: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DtypeAnalysis {
    pub dtype: String,
    pub elements: u64,
    /// Count of each biased exponent value.
    pub exponent_histogram: BTreeMap<u32, u64>,
    /// Zero-order entropy of the exponent field over all tensors of this dtype, bits per weight.
    pub exponent_entropy: f64,
    /// Bound of the codec's layouts over these tensors, bits per weight.
    pub bound_bits_per_weight: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub tensors: Vec<TensorAnalysis>,
    pub dtypes: Vec<DtypeAnalysis>,
    pub elements: u64,
    pub input_bytes: u64,
    /// The codec's bound over the whole file in bits per weight (stored tensors counted at their zstd size).
    pub bound_bits_per_weight: f64,
    /// Predicted `.nzt` size in bytes (header estimated).
    pub predicted_bytes: u64,
    pub predicted_bits_per_weight: f64,
}

struct Measured {
    analysis: TensorAnalysis,
    bound_bits: f64,
    predicted_bits: f64,
    exponents: Option<(Dtype, Vec<u64>)>,
}

fn exponent_histogram(dtype: Dtype, stats: &FieldStats) -> Vec<u64> {
    let exp_bits = dtype.exponent_bits().expect("float dtype");
    let mut hist = vec![0u64; 1 << exp_bits];
    // The top part holds the sign then the exponent (top_bits >= 1 + exp_bits for every split dtype).
    let shift = stats.top_bits - 1 - exp_bits;
    for (v, &c) in stats.top.iter().enumerate() {
        hist[(v >> shift) & ((1 << exp_bits) - 1)] += c;
    }
    hist
}

fn measure(source: &SafetensorsFile, index: usize, opts: &ConvertOptions) -> Result<Measured> {
    let t = &source.tensors[index];
    let data = source.data(t);
    let elements = t.shape.iter().product::<u64>();
    let per = |bits: f64| {
        if elements == 0 {
            0.0
        } else {
            bits / elements as f64
        }
    };
    let stored = |exponents| -> Result<Measured> {
        let z = zstd::bulk::compress(data, opts.zstd_level).map_err(|e| crate::NzError::Zstd {
            what: format!("tensor '{}'", t.name),
            message: e.to_string(),
        })?;
        let bits = 8.0 * z.len().min(data.len()) as f64;
        Ok(Measured {
            analysis: TensorAnalysis {
                name: t.name.clone(),
                dtype: t.dtype.to_string(),
                elements,
                layout: "stored".into(),
                bound_bits_per_weight: per(bits),
                predicted_bits_per_weight: per(bits),
            },
            bound_bits: bits,
            predicted_bits: bits,
            exponents,
        })
    };
    if !t.dtype.is_splittable_float() || elements == 0 {
        return stored(None);
    }
    let stats = FieldStats::gather(t.dtype, data);
    let exponents = Some((t.dtype, exponent_histogram(t.dtype, &stats)));
    let blocks = elements.div_ceil(opts.float_block_elements as u64);
    let Some(p) = plan(&stats, blocks) else {
        return stored(exponents);
    };
    let layout = p
        .params
        .fields
        .iter()
        .map(|f| {
            format!(
                "{}{}",
                f.width,
                if f.coding == Coding::Rans { "c" } else { "r" }
            )
        })
        .collect::<Vec<_>>()
        .join("+");
    Ok(Measured {
        analysis: TensorAnalysis {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            elements,
            layout,
            bound_bits_per_weight: per(p.bound_bits),
            predicted_bits_per_weight: per(p.predicted_bits),
        },
        bound_bits: p.bound_bits,
        predicted_bits: p.predicted_bits,
        exponents,
    })
}

pub fn analyze(source: &SafetensorsFile, opts: &ConvertOptions) -> Result<Analysis> {
    let measured: Vec<Measured> = (0..source.tensors.len())
        .into_par_iter()
        .map(|i| measure(source, i, opts))
        .collect::<Result<_>>()?;
    let elements: u64 = measured.iter().map(|m| m.analysis.elements).sum();
    let bound: f64 = measured.iter().map(|m| m.bound_bits).sum();
    let predicted_payload: f64 = measured.iter().map(|m| m.predicted_bits).sum::<f64>() / 8.0;
    // Header: fixed part, source header, ~40 bytes per tensor entry, 16 per block, plus alignment padding.
    let blocks: u64 = measured
        .iter()
        .map(|m| {
            m.analysis
                .elements
                .div_ceil(opts.float_block_elements as u64)
        })
        .sum();
    let header = 48.0
        + source.header_json().len() as f64
        + 12.0
        + measured
            .iter()
            .map(|m| 40.0 + m.analysis.name.len() as f64)
            .sum::<f64>()
        + 16.0 * blocks as f64
        + 8.0 * blocks as f64
        + 32.0 * measured.len() as f64;
    let predicted_bytes = (predicted_payload + header).ceil() as u64;

    let mut by_dtype: BTreeMap<Dtype, (u64, Vec<u64>, f64)> = BTreeMap::new();
    for m in &measured {
        if let Some((dtype, hist)) = &m.exponents {
            let entry = by_dtype
                .entry(*dtype)
                .or_insert_with(|| (0, vec![0; hist.len()], 0.0));
            entry.0 += m.analysis.elements;
            for (a, b) in entry.1.iter_mut().zip(hist) {
                *a += b;
            }
            entry.2 += m.bound_bits;
        }
    }
    let dtypes = by_dtype
        .into_iter()
        .map(|(dtype, (n, hist, bound))| DtypeAnalysis {
            dtype: dtype.to_string(),
            elements: n,
            exponent_entropy: entropy_bits(&hist),
            exponent_histogram: hist
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(e, &c)| (e as u32, c))
                .collect(),
            bound_bits_per_weight: if n == 0 { 0.0 } else { bound / n as f64 },
        })
        .collect();
    let per = |bits: f64| {
        if elements == 0 {
            0.0
        } else {
            bits / elements as f64
        }
    };
    Ok(Analysis {
        tensors: measured.into_iter().map(|m| m.analysis).collect(),
        dtypes,
        elements,
        input_bytes: source.file_len(),
        bound_bits_per_weight: per(bound),
        predicted_bytes,
        predicted_bits_per_weight: per(8.0 * predicted_bytes as f64),
    })
}
