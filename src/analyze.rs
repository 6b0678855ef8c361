//! What the codec reaches on a safetensors file, measured without writing anything: exponent histograms and
//! entropies per dtype, the zero-order bound of the scheme the codec uses (per block: the tensor's statistics
//! or the block's own, whichever is lower; zstd and raw blocks at their size) and the exact `.nzt` size
//! a conversion with the same options would write; and, for lossy mode, the size and error over a range of
//! mantissa widths (`sweep`), from the same dry run and the quantizer's own round trip.

use std::collections::BTreeMap;
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use crate::codec::codebook_format::{matrix_shape, reconstruction_bytes, CodebookParams};
use crate::codec::freq::entropy_bits;
use crate::codec::lossy::{FloatFormat, LossyParams};
use crate::codec::quant_baselines::{nf4, rtn_clipped, NF4_BLOCK, RTN_GROUP};
use crate::codec::split::{Coding, FieldStats, SplitParams};
use crate::convert::{encode_blocks, plan_all, Bounds, ConvertOptions, Placement, TensorPlan};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::format::header::{data_offset, TensorEntry};
use crate::format::Codec;
use crate::precision::CODEBOOK_BITS;
use crate::source::SafetensorsFile;
use crate::verify::{ErrorReport, ErrorStats};

#[derive(Clone, Debug, Serialize)]
pub struct TensorAnalysis {
    pub name: String,
    pub dtype: String,
    pub elements: u64,
    /// Field layout, most significant first, e.g. "10c+6r" (c = rANS-coded, r = raw), "stored", or for a lossy
    /// tensor "K3:12c" (K mantissa bits kept, then the narrow code's coded and raw bits), or for a codebook
    /// tensor "B3:K4:G128" (index bits, row clusters, group size).
    pub layout: String,
    /// Zero-order bound of the codec's scheme, bits per weight (tables and stream flushes excluded).
    pub bound_bits_per_weight: f64,
    /// What the codec writes for this tensor's blocks, bits per weight.
    pub coded_bits_per_weight: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DtypeAnalysis {
    pub dtype: String,
    pub elements: u64,
    /// Count of each biased exponent value.
    pub exponent_histogram: BTreeMap<u32, u64>,
    /// Zero-order entropy of the exponent field over all tensors of this dtype, bits per weight.
    pub exponent_entropy: f64,
    /// The codec's bound over these tensors, bits per weight.
    pub bound_bits_per_weight: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub tensors: Vec<TensorAnalysis>,
    pub dtypes: Vec<DtypeAnalysis>,
    pub elements: u64,
    pub input_bytes: u64,
    /// The codec's bound over the whole file, bits per weight (tables, flushes and the header excluded).
    pub bound_bits_per_weight: f64,
    /// The exact size `convert` with the same options writes.
    pub predicted_bytes: u64,
    pub predicted_bits_per_weight: f64,
    /// Block payloads alone (what the bound is held against), bits per weight.
    pub predicted_payload_bits_per_weight: f64,
}

fn exponent_histogram(dtype: Dtype, data: &[u8]) -> Vec<u64> {
    let stats = FieldStats::gather(dtype, data);
    let exp_bits = dtype.exponent_bits().expect("float dtype");
    let mut hist = vec![0u64; 1 << exp_bits];
    // The top part holds the sign then the exponent.
    let shift = stats.top_bits - 1 - exp_bits;
    for &(v, c) in &stats.top {
        hist[(v >> shift) & ((1 << exp_bits) - 1)] += c;
    }
    hist
}

fn layout_name(entry: &TensorEntry) -> String {
    if entry.codec == Codec::Lossy {
        let Ok(p) = LossyParams::parse(&entry.params, entry.dtype) else {
            return "?".into();
        };
        let code_bits = p.quantizer(entry.dtype).map_or(0, |q| q.code_bits());
        let raw = code_bits - p.coded_bits;
        let fields: Vec<String> = [(p.coded_bits, "c"), (raw, "r")]
            .iter()
            .filter(|(w, _)| *w > 0)
            .map(|(w, c)| format!("{w}{c}"))
            .collect();
        return format!("K{}:{}", p.mantissa_bits, fields.join("+"));
    }
    if entry.codec == Codec::Codebook {
        return match CodebookParams::parse(&entry.params, entry.dtype, &entry.shape) {
            Ok(p) => format!("B{}:K{}:G{}", p.index_bits, p.clusters, p.group_size),
            Err(_) => "?".into(),
        };
    }
    if entry.codec != Codec::FloatSplit {
        return "stored".into();
    }
    match SplitParams::parse(&entry.params, entry.dtype) {
        Ok(p) => p
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
            .join("+"),
        Err(_) => "?".into(),
    }
}

/// Dry-runs a conversion of `source` and measures it.
pub fn analyze(
    source: &SafetensorsFile,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Analysis> {
    let plans = plan_all(source, opts, progress);
    let entries: Vec<TensorEntry> = plans.iter().map(|p| p.entry.clone()).collect();
    let mut bound = vec![0.0f64; plans.len()];
    let mut coded = vec![0u64; plans.len()];
    let mut placement = Placement::default();
    encode_blocks(
        source,
        &plans,
        opts,
        Bounds::Measure,
        progress,
        |ti, _, block| {
            bound[ti] += block.bound_bits;
            coded[ti] += block.payload.len() as u64;
            placement.place(ti, block.payload.len() as u64);
            Ok(())
        },
    )?;
    let predicted_bytes = data_offset(source.header_json(), &entries) + placement.end;

    let exponents: Mutex<BTreeMap<Dtype, Vec<u64>>> = Mutex::new(BTreeMap::new());
    rayon::scope(|scope| {
        for t in source
            .tensors
            .iter()
            .filter(|t| t.dtype.exponent_bits().is_some())
        {
            let exponents = &exponents;
            scope.spawn(move |_| {
                let hist = exponent_histogram(t.dtype, source.data(t));
                let mut all = exponents.lock().expect("no panics while held");
                let entry = all.entry(t.dtype).or_insert_with(|| vec![0; hist.len()]);
                for (a, b) in entry.iter_mut().zip(&hist) {
                    *a += b;
                }
            });
        }
    });

    let per = |bits: f64, n: u64| if n == 0 { 0.0 } else { bits / n as f64 };
    let mut tensors = Vec::new();
    let mut by_dtype: BTreeMap<Dtype, (u64, f64)> = BTreeMap::new();
    for (i, (t, e)) in source.tensors.iter().zip(&entries).enumerate() {
        let n = t.elements();
        if t.dtype.exponent_bits().is_some() {
            let d = by_dtype.entry(t.dtype).or_default();
            d.0 += n;
            d.1 += bound[i];
        }
        tensors.push(TensorAnalysis {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            elements: n,
            layout: layout_name(e),
            bound_bits_per_weight: per(bound[i], n),
            coded_bits_per_weight: per(8.0 * coded[i] as f64, n),
        });
    }
    let exponents = exponents.into_inner().expect("no panics while held");
    let dtypes = by_dtype
        .into_iter()
        .map(|(dtype, (n, bits))| {
            let hist = exponents.get(&dtype).cloned().unwrap_or_default();
            DtypeAnalysis {
                dtype: dtype.to_string(),
                elements: n,
                exponent_entropy: entropy_bits(&hist),
                exponent_histogram: hist
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(e, &c)| (e as u32, c))
                    .collect(),
                bound_bits_per_weight: per(bits, n),
            }
        })
        .collect();
    let elements: u64 = tensors.iter().map(|t| t.elements).sum();
    Ok(Analysis {
        tensors,
        dtypes,
        elements,
        input_bytes: source.file_len(),
        bound_bits_per_weight: per(bound.iter().sum(), elements),
        predicted_bytes,
        predicted_bits_per_weight: per(8.0 * predicted_bytes as f64, elements),
        predicted_payload_bits_per_weight: per(8.0 * coded.iter().sum::<u64>() as f64, elements),
    })
}

/// One point of a lossy or codebook sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    /// Mantissa bits kept (tensors whose dtype has no more stay lossless); None for the lossless row and in a
    /// codebook sweep.
    pub mantissa_bits: Option<u32>,
    /// Codebook rate R, in a codebook sweep; None for the lossless row and in a lossy sweep.
    pub codebook_bits: Option<f64>,
    /// The exact `.nzt` size a conversion with these settings writes.
    pub predicted_bytes: u64,
    pub bits_per_weight: f64,
    /// Error of every BF16, F16 and F32 tensor together against the original.
    pub error: ErrorReport,
    /// In a codebook sweep, the codebook-coded tensors alone (None for the lossless row).
    pub codebook: Option<CodebookFigures>,
}

/// Size and error of the codebook-coded tensors of a sweep point, together.
#[derive(Clone, Debug, Serialize)]
pub struct CodebookFigures {
    pub tensors: usize,
    pub weights: u64,
    /// Their params and block payloads: what a codebook rate budget counts.
    pub stored_bytes: u64,
    pub bits_per_weight: f64,
    /// The same fits with every index stored in `B` bits (fixed length, no entropy coding) and the same side
    /// data (`CodebookQuantized::fixed_rate_size`), for comparison with `bits_per_weight`.
    pub fixed_length_bits_per_weight: f64,
    pub error: ErrorReport,
}

/// A reference quantizer (`quant_baselines`) on the tensors a codebook sweep quantizes, for comparison only:
/// nothing in the file format uses it.
#[derive(Clone, Debug, Serialize)]
pub struct BaselinePoint {
    /// `rtn-g128-clip` or `nf4-b64`.
    pub method: String,
    /// Code bits per weight (4 for NF4).
    pub bits: u32,
    pub tensors: usize,
    pub weights: u64,
    /// All metadata counted (scales, zero points).
    pub bits_per_weight: f64,
    /// Error of those tensors together, the reconstruction rounded to each tensor's dtype.
    pub error: ErrorReport,
    pub per_tensor: Vec<BaselineTensor>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BaselineTensor {
    pub name: String,
    pub bits_per_weight: f64,
    /// None when exact.
    pub sqnr_db: Option<f64>,
}

/// What `sweep` visits for a codebook rate R: every whole rate from 2 below R, then R.
pub fn codebook_sweep_rates(max: f64) -> Vec<f64> {
    let mut rates: Vec<f64> = (*CODEBOOK_BITS.start()..)
        .map(f64::from)
        .take_while(|&r| r < max)
        .collect();
    rates.push(max);
    rates
}

/// RTN-g128-clip at each of `rtn_bits` and NF4-b64, on every tensor the codebook settings of `opts` quantize
/// (as a `rows x last dimension` matrix; tensors with a non-finite weight are skipped, as the codebook mode
/// keeps them lossless). For `analyze --sweep --codebook-bits`.
pub fn baselines(
    source: &SafetensorsFile,
    opts: &ConvertOptions,
    rtn_bits: &[u32],
) -> Result<Vec<BaselinePoint>> {
    struct Tensor {
        name: String,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        weights: Vec<f32>,
    }
    let tensors: Vec<Tensor> = source
        .tensors
        .iter()
        .filter(|t| {
            opts.codebook
                .bits_for(&t.name, t.dtype, t.shape.len())
                .is_some()
        })
        .filter_map(|t| {
            let fmt = FloatFormat::of(t.dtype)?;
            let (rows, cols) = matrix_shape(&t.shape)?;
            let width = t.dtype.byte_width()?;
            let weights: Vec<f32> = crate::codec::split::element_values(source.data(t), width)
                .into_iter()
                .map(|bits| fmt.to_f64(bits) as f32)
                .collect();
            weights.iter().all(|w| w.is_finite()).then(|| Tensor {
                name: t.name.clone(),
                dtype: t.dtype,
                rows: rows as usize,
                cols: cols as usize,
                weights,
            })
        })
        .collect();
    let methods = rtn_bits
        .iter()
        .map(|&b| ("rtn-g128-clip", b))
        .chain([("nf4-b64", 4)]);
    let mut points = Vec::new();
    for (method, bits) in methods {
        let (mut total, mut coded_bits, mut weights) = (ErrorStats::default(), 0u64, 0u64);
        let mut per_tensor = Vec::new();
        for t in &tensors {
            let result = if method == "nf4-b64" {
                nf4(&t.weights, t.rows, t.cols, NF4_BLOCK)?
            } else {
                rtn_clipped(&t.weights, t.rows, t.cols, bits, RTN_GROUP)?
            };
            let mut stats = ErrorStats::default();
            for (&x, &y) in t.weights.iter().zip(&result.dequantized) {
                stats.add(x as f64, round_to(t.dtype, y) as f64, None);
            }
            total.merge(&stats);
            coded_bits += result.payload_bits + result.metadata_bits;
            weights += t.weights.len() as u64;
            per_tensor.push(BaselineTensor {
                name: t.name.clone(),
                bits_per_weight: result.bits_per_weight(),
                sqnr_db: stats.report().sqnr_db,
            });
        }
        points.push(BaselinePoint {
            method: method.to_string(),
            bits,
            tensors: tensors.len(),
            weights,
            bits_per_weight: coded_bits as f64 / weights.max(1) as f64,
            error: total.report(),
            per_tensor,
        });
    }
    Ok(points)
}

/// `v` rounded to a BF16, F16 or F32 value (nearest even), as decoding rounds a reconstruction.
fn round_to(dtype: Dtype, v: f32) -> f32 {
    match dtype {
        Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
        Dtype::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The mantissa widths `sweep` visits by default: 0 up to one below the widest lossy dtype's mantissa,
/// at most 10.
pub fn default_sweep_bits(source: &SafetensorsFile) -> Vec<u32> {
    let widest = source
        .tensors
        .iter()
        .filter_map(|t| FloatFormat::of(t.dtype))
        .map(|f| f.man_bits)
        .max()
        .unwrap_or(0);
    (0..widest.min(11)).collect()
}

/// Dry-runs a conversion for each K of `bits` (with `opts.lossy`'s rules and normalization, K as the
/// default), then a lossless one, and measures size and error. Nothing is written. When `opts.codebook` has a
/// default rate, `bits` are codebook rates R instead (with its rules, mode, group size and clusters), and each
/// point also has the figures of its codebook tensors alone.
pub fn sweep(
    source: &SafetensorsFile,
    opts: &ConvertOptions,
    bits: &[f64],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<SweepPoint>> {
    opts.lossy.validate()?;
    opts.codebook.validate()?;
    let codebook_mode = opts.codebook.default_bits.is_some();
    if codebook_mode {
        // The importance file against the tensors it names.
        crate::convert::check_settings(source, opts)?;
    }
    let elements = source.elements();
    let mut points = Vec::new();
    let settings: Vec<Option<f64>> = bits.iter().map(|&k| Some(k)).chain([None]).collect();
    for k in settings {
        let mut point_opts = opts.clone();
        match k {
            Some(b) if codebook_mode => point_opts.codebook.default_bits = Some(b),
            Some(k) => point_opts.lossy.default_bits = Some(k as u32),
            None => {
                point_opts.lossy = Default::default();
                point_opts.codebook = Default::default();
            }
        }
        if codebook_mode {
            point_opts.codebook.validate()?;
        }
        let plans = plan_all(source, &point_opts, progress);
        let entries: Vec<TensorEntry> = plans.iter().map(|p| p.entry.clone()).collect();
        let mut placement = Placement::default();
        let mut payload_bytes = vec![0u64; plans.len()];
        encode_blocks(
            source,
            &plans,
            &point_opts,
            Bounds::Skip,
            progress,
            |ti, _, block| {
                placement.place(ti, block.payload.len() as u64);
                payload_bytes[ti] += block.payload.len() as u64;
                Ok(())
            },
        )?;
        let predicted_bytes = data_offset(source.header_json(), &entries) + placement.end;
        let per_tensor: Vec<ErrorStats> = source
            .tensors
            .par_iter()
            .zip(&plans)
            .filter_map(|(t, plan)| planned_error(source, t, plan))
            .collect();
        let mut total = ErrorStats::default();
        for s in &per_tensor {
            total.merge(s);
        }
        // The codebook tensors alone: `per_tensor` has one entry per float tensor, in order.
        let float_plans = source
            .tensors
            .iter()
            .zip(plans.iter().zip(&payload_bytes))
            .filter(|(t, _)| FloatFormat::of(t.dtype).is_some())
            .map(|(_, p)| p);
        let (mut codebook_total, mut codebook_bytes) = (ErrorStats::default(), 0u64);
        let mut fixed_length_bits = 0u64;
        let mut codebook_tensors = 0;
        for ((plan, payload), stats) in float_plans.zip(&per_tensor) {
            if let Some(cb) = plan.codebook() {
                fixed_length_bits += cb.quantized.fixed_rate_size().total_bits();
                codebook_total.merge(stats);
                codebook_bytes += plan.entry.params.len() as u64 + payload;
                codebook_tensors += 1;
            }
        }
        let codebook = (codebook_mode && k.is_some()).then(|| {
            let weights = codebook_total.elements;
            CodebookFigures {
                tensors: codebook_tensors,
                weights,
                stored_bytes: codebook_bytes,
                bits_per_weight: 8.0 * codebook_bytes as f64 / weights.max(1) as f64,
                fixed_length_bits_per_weight: fixed_length_bits as f64 / weights.max(1) as f64,
                error: codebook_total.report(),
            }
        });
        points.push(SweepPoint {
            mantissa_bits: k.filter(|_| !codebook_mode).map(|k| k as u32),
            codebook_bits: k.filter(|_| codebook_mode),
            predicted_bytes,
            bits_per_weight: if elements == 0 {
                0.0
            } else {
                8.0 * predicted_bytes as f64 / elements as f64
            },
            error: total.report(),
            codebook,
        });
    }
    Ok(points)
}

/// Error of a planned tensor's round trip against its original values, without encoding it: the lossy
/// quantizer's or the codebook fit's reconstruction, or none for tensors stored exactly (then every element
/// counts as exact). None for tensors that are not BF16, F16 or F32.
pub fn planned_error(
    source: &SafetensorsFile,
    t: &crate::source::SourceTensor,
    plan: &TensorPlan,
) -> Option<ErrorStats> {
    let fmt = FloatFormat::of(t.dtype)?;
    let mut stats = ErrorStats::default();
    let quantizer = plan.quantizer();
    let bound = quantizer.map(|q| move |x: f64| q.error_bound(x));
    let bound_ref = bound.as_ref().map(|b| b as &dyn Fn(f64) -> f64);
    for_each_round_trip(source, t, plan, |_, a, b| {
        stats.add(fmt.to_f64(a), fmt.to_f64(b), bound_ref)
    })?;
    Some(stats)
}

/// Weighted error energy over weighted signal energy of a lossy tensor whose quantizer has channel weights
/// (`--importance`): every finite element's squared error and square weighted by its input channel's
/// importance. None for other tensors.
pub fn planned_weighted_relative_error(
    source: &SafetensorsFile,
    t: &crate::source::SourceTensor,
    plan: &TensorPlan,
) -> Option<f64> {
    let fmt = FloatFormat::of(t.dtype)?;
    let q = plan.quantizer().filter(|q| q.has_channel_weights())?;
    let (mut error, mut signal) = (0.0, 0.0);
    for_each_round_trip(source, t, plan, |i, a, b| {
        let (x, y) = (fmt.to_f64(a), fmt.to_f64(b));
        if x.is_finite() && y.is_finite() {
            let w = q.element_weight(i);
            error += w * (x - y) * (x - y);
            signal += w * x * x;
        }
    })?;
    (signal > 0.0).then(|| error / signal)
}

/// Calls `f(index, original, decoded)` with the bit patterns of every element of a planned tensor and its
/// round trip (see `planned_error`). None for dtypes without whole-byte elements.
fn for_each_round_trip(
    source: &SafetensorsFile,
    t: &crate::source::SourceTensor,
    plan: &TensorPlan,
    mut f: impl FnMut(usize, u64, u64),
) -> Option<()> {
    let width = t.dtype.byte_width()?;
    let data = source.data(t);
    if let Some(cb) = plan.codebook() {
        let original = crate::codec::split::element_values(data, width);
        let decoded = crate::codec::split::element_values(
            &reconstruction_bytes(&cb.quantized, t.dtype),
            width,
        );
        for (i, (&a, &b)) in original.iter().zip(&decoded).enumerate() {
            f(i, a, b);
        }
        return Some(());
    }
    let block_units = (plan.entry.block_units as usize).max(1);
    for (k, block) in data.chunks(block_units * width).enumerate() {
        let original = crate::codec::split::element_values(block, width);
        let first = k * block_units;
        match plan.quantizer() {
            Some(q) => {
                let decoded = q.round_trip_block(block, width, first);
                for (i, (&a, &b)) in original.iter().zip(&decoded).enumerate() {
                    f(first + i, a, b);
                }
            }
            None => {
                for (i, &a) in original.iter().enumerate() {
                    f(first + i, a, a);
                }
            }
        }
    }
    Some(())
}
