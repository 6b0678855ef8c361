//! The codebook codec in the file (`codebook`, codec id 3; format-spec/nzt.md section 13.4): a BF16, F16 or F32
//! tensor of rank >= 1, seen as `rows x cols` with `cols` its last dimension, fitted by `codebook::fit` (at a
//! fixed index width, `plan`, or to a size budget by a search over the rate term, `plan_at_rate`) and
//! stored as tensor parameters (index width, group size, cluster count, tensor scale, the codebooks and one
//! index frequency table per cluster) and blocks of whole rows (each row's cluster id, its group scales, and
//! per cluster present one rANS stream of the block's indices of that cluster).
//!
//! Decoding computes `t * (s * c)` in f32, exactly as `CodebookQuantized::dequantize` does, and rounds the
//! result to the dtype, ties to even; so a decoded file equals the fit's reconstruction rounded to the dtype.

use half::{bf16, f16};
use rayon::prelude::*;

use super::codebook::{self, CodebookQuantized, ErrorWeights, FitOptions, INDEX_PROB_BITS};
use super::codebook::{MAX_INDEX_BITS, MAX_ROW_CLUSTERS};
use super::freq::{histogram, DecodeTable, FreqTable, TableError};
use super::rans::{self, FieldOutput, FieldSymbols, StreamError, LANES};
use super::split::RANS_HEADER_BYTES;
use crate::dtype::Dtype;

/// Bytes of the fixed part of the codebook params: index_bits, reserved, clusters, group_size, tensor_scale.
const FIXED_PARAMS_BYTES: usize = 12;

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// Whether the codebook codec applies to a dtype.
pub fn applies_to(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// `(rows, cols)` of a tensor seen as a matrix: cols is the last dimension, rows the product of the others.
/// None for rank 0 or an empty tensor.
pub fn matrix_shape(shape: &[u64]) -> Option<(u64, u64)> {
    let (&cols, rest) = shape.split_last()?;
    let rows = rest.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    (rows > 0 && cols > 0).then_some((rows, cols))
}

/// The codebook parameters of one tensor (spec: "codebook params").
#[derive(Clone, Debug, PartialEq)]
pub struct CodebookParams {
    /// B: each codebook has `2^B` entries.
    pub index_bits: u32,
    /// K: number of row clusters (codebooks).
    pub clusters: usize,
    /// G: inputs per scale group, `1..=cols`.
    pub group_size: usize,
    /// Tensor scale `t` (finite, positive).
    pub tensor_scale: f32,
    /// `K * 2^B` finite f16 entries, cluster-major.
    pub codebooks: Vec<f16>,
    /// The index table of each cluster; None for a cluster no row uses.
    pub tables: Vec<Option<FreqTable>>,
}

impl CodebookParams {
    /// The parameters of a fitted matrix: its side data and a table per cluster from the index counts.
    pub fn from_quantized(q: &CodebookQuantized) -> CodebookParams {
        let clusters = q.clusters();
        let mut counts = vec![vec![0u64; 1 << q.index_bits]; clusters];
        for (r, &k) in q.row_cluster.iter().enumerate() {
            let row = &q.indices[r * q.cols..(r + 1) * q.cols];
            for (c, n) in counts[k as usize]
                .iter_mut()
                .zip(histogram(row.iter().map(|&i| i as u32), q.index_bits))
            {
                *c += n;
            }
        }
        let tables = counts
            .iter()
            .map(|c| FreqTable::from_counts(c, q.index_bits, INDEX_PROB_BITS))
            .collect();
        CodebookParams {
            index_bits: q.index_bits,
            clusters,
            group_size: q.group_size,
            tensor_scale: q.tensor_scale,
            codebooks: q.codebooks.clone(),
            tables,
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.index_bits as u8);
        out.push(0);
        out.extend_from_slice(&(self.clusters as u16).to_le_bytes());
        out.extend_from_slice(&(self.group_size as u32).to_le_bytes());
        out.extend_from_slice(&self.tensor_scale.to_bits().to_le_bytes());
        for c in &self.codebooks {
            out.extend_from_slice(&c.to_bits().to_le_bytes());
        }
        for table in &self.tables {
            match table {
                Some(t) => {
                    out.push(1);
                    t.write(out);
                }
                None => out.push(0),
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    /// Parses the codebook parameters of a tensor of `dtype` and `shape`; all of `bytes` must be used.
    pub fn parse(bytes: &[u8], dtype: Dtype, shape: &[u64]) -> Result<CodebookParams, TableError> {
        let err = |s: String| TableError(s);
        if !applies_to(dtype) {
            return Err(err(format!("codebook does not apply to {dtype}")));
        }
        let (_, cols) = matrix_shape(shape)
            .ok_or_else(|| err("codebook needs a non-empty tensor of rank 1 or more".into()))?;
        let head = bytes.get(..FIXED_PARAMS_BYTES).ok_or_else(|| {
            err(format!(
                "codebook params shorter than {FIXED_PARAMS_BYTES} bytes"
            ))
        })?;
        let index_bits = head[0] as u32;
        let clusters = u16::from_le_bytes([head[2], head[3]]) as usize;
        let group_size = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as u64;
        let tensor_scale =
            f32::from_bits(u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")));
        if !(1..=MAX_INDEX_BITS).contains(&index_bits) {
            return Err(err(format!(
                "index_bits {index_bits} outside 1..={MAX_INDEX_BITS}"
            )));
        }
        if head[1] != 0 {
            return Err(err("reserved byte is not zero".into()));
        }
        if !(1..=MAX_ROW_CLUSTERS).contains(&clusters) {
            return Err(err(format!(
                "clusters {clusters} outside 1..={MAX_ROW_CLUSTERS}"
            )));
        }
        if !(1..=cols).contains(&group_size) {
            return Err(err(format!("group_size {group_size} outside 1..={cols}")));
        }
        if !(tensor_scale.is_finite() && tensor_scale > 0.0) {
            return Err(err(format!(
                "tensor_scale {tensor_scale} is not finite and positive"
            )));
        }
        let entries = clusters << index_bits;
        let mut pos = FIXED_PARAMS_BYTES;
        let book_bytes = bytes
            .get(pos..pos + 2 * entries)
            .ok_or_else(|| err("codebooks truncated".into()))?;
        let codebooks: Vec<f16> = book_bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        if let Some(i) = codebooks.iter().position(|c| !c.is_finite()) {
            return Err(err(format!("codebook entry {i} is not finite")));
        }
        pos += 2 * entries;
        let mut tables = Vec::with_capacity(clusters);
        for k in 0..clusters {
            let flag = *bytes
                .get(pos)
                .ok_or_else(|| err(format!("table flag of cluster {k} missing")))?;
            pos += 1;
            tables.push(match flag {
                0 => None,
                1 => {
                    let (table, used) = FreqTable::parse(&bytes[pos..], index_bits)
                        .map_err(|e| err(format!("table of cluster {k}: {}", e.0)))?;
                    pos += used;
                    Some(table)
                }
                _ => {
                    return Err(err(format!(
                        "table flag {flag} of cluster {k} is not 0 or 1"
                    )))
                }
            });
        }
        if pos != bytes.len() {
            return Err(err(format!(
                "{} bytes left after the codebook params",
                bytes.len() - pos
            )));
        }
        Ok(CodebookParams {
            index_bits,
            clusters,
            group_size: group_size as usize,
            tensor_scale,
            codebooks,
            tables,
        })
    }
}

/// Per-input-channel importances (activation second moments) by weight tensor name, the error weights of the
/// fit for the tensors that have one (`neuzip convert --importance FILE`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Importance {
    pub per_tensor: std::collections::BTreeMap<String, Vec<f32>>,
}

impl Importance {
    /// Reads every tensor of a safetensors file: each must be F32 of rank 1, finite and non-negative.
    pub fn from_file(file: &crate::source::SafetensorsFile) -> crate::error::Result<Importance> {
        let bad = |what: String| crate::error::NzError::InvalidSetting { what };
        let mut per_tensor = std::collections::BTreeMap::new();
        for t in &file.tensors {
            if t.dtype != Dtype::F32 || t.shape.len() != 1 {
                return Err(bad(format!(
                    "importance '{}' is {} {:?}, not a 1-D F32 vector",
                    t.name, t.dtype, t.shape
                )));
            }
            let values: Vec<f32> = file
                .data(t)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            if values.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(bad(format!(
                    "importance '{}' has a negative or non-finite value",
                    t.name
                )));
            }
            per_tensor.insert(t.name.clone(), values);
        }
        Ok(Importance { per_tensor })
    }

    /// The importance of tensor `name`, checked against its row length `cols`.
    pub fn for_tensor(&self, name: &str, cols: u64) -> crate::error::Result<Option<&[f32]>> {
        match self.per_tensor.get(name) {
            None => Ok(None),
            Some(v) if v.len() as u64 == cols => Ok(Some(v)),
            Some(v) => Err(crate::error::NzError::InvalidSetting {
                what: format!(
                    "importance '{name}' has {} values, the tensor has {cols} inputs",
                    v.len()
                ),
            }),
        }
    }
}

/// A tensor's codebook fit, ready to encode its blocks.
pub struct CodebookPlan {
    pub params: CodebookParams,
    pub quantized: CodebookQuantized,
    /// Whole rows per block; `block_units` is this times `cols`.
    pub rows_per_block: usize,
}

impl CodebookPlan {
    pub fn block_units(&self) -> u32 {
        (self.rows_per_block * self.quantized.cols) as u32
    }

    pub fn blocks(&self) -> usize {
        self.quantized.rows.div_ceil(self.rows_per_block)
    }

    /// Bytes the tensor takes in the file: its params and every block payload (not its header entry, block
    /// index or alignment padding, which every codec has).
    pub fn stored_bytes(&self) -> u64 {
        let blocks: u64 = (0..self.blocks())
            .into_par_iter()
            .map(|k| self.encode_block(k).len() as u64)
            .sum();
        self.params.to_bytes().len() as u64 + blocks
    }

    /// `8 * stored_bytes / weights`: what a rate target bounds.
    pub fn bits_per_weight(&self) -> f64 {
        let weights = (self.quantized.rows * self.quantized.cols).max(1);
        8.0 * self.stored_bytes() as f64 / weights as f64
    }

    /// Encodes block `k` (spec: "codebook block payload").
    pub fn encode_block(&self, k: usize) -> Vec<u8> {
        let q = &self.quantized;
        let start = k * self.rows_per_block;
        let end = (start + self.rows_per_block).min(q.rows);
        encode_rows(&self.params, q, start..end)
    }
}

/// A tensor as an f32 matrix, with the rows per block of the codebook layout.
struct Matrix {
    weights: Vec<f32>,
    rows: usize,
    cols: usize,
    rows_per_block: usize,
}

/// Reads a tensor (little-endian `dtype` bytes of `shape`) as a matrix, in blocks of whole rows holding at
/// most `max_block_elements` elements (one row if a row is longer). None when the codec cannot apply: another
/// dtype, rank 0, an empty tensor, or a row too long for one block.
fn matrix(dtype: Dtype, shape: &[u64], data: &[u8], max_block_elements: u32) -> Option<Matrix> {
    if !applies_to(dtype) {
        return None;
    }
    let (rows, cols) = matrix_shape(shape)?;
    let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
    let width = dtype.byte_width()?;
    let rows_per_block = (max_block_elements as usize / cols).clamp(1, rows);
    let block_bytes = (rows_per_block * cols).checked_mul(width)? as u64;
    if block_bytes > crate::format::MAX_BLOCK_BYTES || rows_per_block * cols > u32::MAX as usize {
        return None;
    }
    let weights: Vec<f32> = data
        .chunks_exact(width)
        .map(|b| match dtype {
            Dtype::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")),
            Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        })
        .collect();
    Some(Matrix {
        weights,
        rows,
        cols,
        rows_per_block,
    })
}

/// Fits a matrix; None for a non-finite weight or a tensor scale that overflows f32.
fn fit_matrix(
    m: &Matrix,
    options: &FitOptions,
    error_weights: ErrorWeights<'_>,
) -> Option<CodebookPlan> {
    let (quantized, _) = codebook::fit(&m.weights, m.rows, m.cols, error_weights, options).ok()?;
    if !quantized.tensor_scale.is_finite() {
        return None;
    }
    Some(CodebookPlan {
        params: CodebookParams::from_quantized(&quantized),
        quantized,
        rows_per_block: m.rows_per_block,
    })
}

/// Fits a tensor (little-endian `dtype` bytes of `shape`) with `options` (fixed rate: `2^options.index_bits`
/// entries, or whatever rate term `options` holds) and `error_weights`, in blocks of whole rows holding at
/// most `max_block_elements` elements (one row if a row is longer). None when the codec cannot apply: another
/// dtype, rank 0, an empty tensor, a non-finite weight, a tensor scale that overflows f32, or a row too long
/// for one block.
pub fn plan(
    dtype: Dtype,
    shape: &[u64],
    data: &[u8],
    options: &FitOptions,
    error_weights: ErrorWeights<'_>,
    max_block_elements: u32,
) -> Option<CodebookPlan> {
    fit_matrix(
        &matrix(dtype, shape, data, max_block_elements)?,
        options,
        error_weights,
    )
}

/// Index bits above `ceil(R)` of the rate-targeted fit: its codebooks have `2^(ceil(R) + 2)` entries (at
/// most `2^MAX_INDEX_BITS`), so that the rate term, not the codebook size, sets the rate.
pub const RATE_EXTRA_INDEX_BITS: u32 = 2;
/// Most fits the rate search runs per tensor.
pub const RATE_SEARCH_FITS: usize = 8;
/// The rate search stops at a fit this close under the target, in bits per weight.
pub const RATE_TOLERANCE: f64 = 0.02;
/// Range of log2 of the grid step searched (scaled units, where a group's largest magnitude is 1).
const LOG_STEP_RANGE: (f64, f64) = (-14.0, 1.0);

/// Fits a tensor so that its stored size (`CodebookPlan::stored_bytes`: params and block payloads) is at most
/// `target_bits_per_weight` bits per weight, using as much of that budget as the search finds.
///
/// The fit starts from a uniform grid of step `d` in a codebook of `2^(ceil(R) + RATE_EXTRA_INDEX_BITS)`
/// entries, with the rate term `lambda = LAMBDA_PER_STEP_SQUARED * d^2`, so one number, `log2 d`, sets the
/// rate. The search guesses it from the high-rate rule (one bit per halving of `d`), then refines it by
/// secant steps between the finest fit over the target and the coarsest under it, for at most
/// `RATE_SEARCH_FITS` fits or until a fit lands within `RATE_TOLERANCE` under the target. It is
/// deterministic, so the result does not depend on the thread count. Of the fits under the target, the one
/// with the largest size is kept.
///
/// When no fit gets under the target (a tensor so small that its side data alone is near the budget), the
/// result is the fixed-rate fit of `floor(R)` index bits, whatever its size. Other arguments as for `plan`.
pub fn plan_at_rate(
    dtype: Dtype,
    shape: &[u64],
    data: &[u8],
    options: &FitOptions,
    error_weights: ErrorWeights<'_>,
    max_block_elements: u32,
    target_bits_per_weight: f64,
) -> Option<CodebookPlan> {
    let m = matrix(dtype, shape, data, max_block_elements)?;
    let target = target_bits_per_weight;
    let index_bits = (target.ceil().max(1.0) as u32 + RATE_EXTRA_INDEX_BITS).min(MAX_INDEX_BITS);
    let fit_at = |log_step: f64| -> Option<(CodebookPlan, f64)> {
        let step = log_step.exp2();
        let fit_options = FitOptions {
            index_bits,
            init: codebook::CodebookInit::Uniform { step: step as f32 },
            rate_lambda: codebook::LAMBDA_PER_STEP_SQUARED * step * step,
            ..*options
        };
        let plan = fit_matrix(&m, &fit_options, error_weights)?;
        let bits = plan.bits_per_weight();
        Some((plan, bits))
    };
    let goal = target - 0.5 * RATE_TOLERANCE;
    let (lowest, highest) = LOG_STEP_RANGE;
    // Scaled weights have a standard deviation near 0.38 (a group of 128 Gaussians peaks near 2.6 sigma):
    // index entropy about 0.65 - log2 d, plus about 0.16 bits of scales and stream headers.
    let mut log_step = (0.8 - target).clamp(lowest, highest);
    // (log2 d, bits per weight) of the coarsest fit over the target and the finest under it.
    let mut over: Option<(f64, f64)> = None;
    let mut under: Option<(f64, f64)> = None;
    let mut best: Option<(CodebookPlan, f64)> = None;
    for _ in 0..RATE_SEARCH_FITS {
        let (plan, bits) = fit_at(log_step)?;
        if bits <= target {
            if under.is_none_or(|(x, _)| log_step < x) {
                under = Some((log_step, bits));
            }
            if best.as_ref().is_none_or(|(_, b)| bits > *b) {
                best = Some((plan, bits));
            }
            if target - bits <= RATE_TOLERANCE {
                break;
            }
        } else if over.is_none_or(|(x, _)| log_step > x) {
            over = Some((log_step, bits));
        }
        let next = match (over, under) {
            (Some((xo, bo)), Some((xu, bu))) => {
                if xo >= xu || bo <= bu {
                    break;
                }
                let t = ((bo - goal) / (bo - bu)).clamp(0.05, 0.95);
                xo + t * (xu - xo)
            }
            // One bit per halving of the step, at most four octaves at a time.
            (None, Some((xu, bu))) => xu - (goal - bu).min(4.0),
            (Some((xo, bo)), None) => xo + (bo - goal).min(4.0),
            (None, None) => unreachable!("every fit is over or under the target"),
        }
        .clamp(lowest, highest);
        if next == log_step {
            break;
        }
        log_step = next;
    }
    match best {
        Some((plan, _)) => Some(plan),
        None => fit_matrix(
            &m,
            &FitOptions {
                index_bits: (target.floor() as u32).clamp(1, MAX_INDEX_BITS),
                ..*options
            },
            error_weights,
        ),
    }
}

/// The payload of rows `rows` of a fitted matrix.
pub fn encode_rows(
    params: &CodebookParams,
    q: &CodebookQuantized,
    rows: std::ops::Range<usize>,
) -> Vec<u8> {
    let groups = q.groups_per_row();
    let mut out = Vec::new();
    out.extend(rows.clone().map(|r| q.row_cluster[r] as u8));
    out.resize(align4(out.len()), 0);
    for s in &q.scales[rows.start * groups..rows.end * groups] {
        out.extend_from_slice(&s.to_bits().to_le_bytes());
    }
    out.resize(align4(out.len()), 0);
    for (k, table) in params.tables.iter().enumerate() {
        let symbols: Vec<u16> = rows
            .clone()
            .filter(|&r| q.row_cluster[r] as usize == k)
            .flat_map(|r| q.indices[r * q.cols..(r + 1) * q.cols].iter().copied())
            .collect();
        if symbols.is_empty() {
            continue;
        }
        let table = table.as_ref().expect("a cluster with rows has a table");
        let encoded = rans::encode(
            &[FieldSymbols {
                symbols: &symbols,
                table,
            }],
            symbols.len(),
        );
        for s in encoded.states {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(encoded.words.len() as u32).to_le_bytes());
        for w in &encoded.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(align4(out.len()), 0);
    }
    out
}

/// A tensor's codebook parameters expanded for decoding; build once, decode many blocks.
pub struct CodebookDecoder {
    params: CodebookParams,
    tables: Vec<Option<DecodeTable>>,
    dtype: Dtype,
    width: usize,
    cols: usize,
}

impl CodebookDecoder {
    /// None when the dtype or shape does not allow the codec (the header parser has already checked them).
    pub fn new(params: CodebookParams, dtype: Dtype, shape: &[u64]) -> Option<CodebookDecoder> {
        if !applies_to(dtype) {
            return None;
        }
        let (_, cols) = matrix_shape(shape)?;
        let tables = params
            .tables
            .iter()
            .map(|t| t.as_ref().map(DecodeTable::new))
            .collect();
        Some(CodebookDecoder {
            params,
            tables,
            dtype,
            width: dtype.byte_width()?,
            cols: usize::try_from(cols).ok()?,
        })
    }

    pub fn params(&self) -> &CodebookParams {
        &self.params
    }

    /// Decodes a block of whole rows into `out` (little-endian dtype elements).
    pub fn decode_block(&self, payload: &[u8], out: &mut [u8]) -> Result<(), StreamError> {
        let row_bytes = self.cols * self.width;
        if !out.len().is_multiple_of(row_bytes) {
            return Err(StreamError("block is not a whole number of rows"));
        }
        let rows = out.len() / row_bytes;
        let p = &self.params;
        let groups = self.cols.div_ceil(p.group_size);
        let ids = payload
            .get(..rows)
            .ok_or(StreamError("payload shorter than its cluster ids"))?;
        if ids.iter().any(|&k| k as usize >= p.clusters) {
            return Err(StreamError("cluster id not below the cluster count"));
        }
        let mut pos = align4(rows);
        let scale_bytes = payload
            .get(pos..pos + 2 * rows * groups)
            .ok_or(StreamError("payload shorter than its scales"))?;
        let scales: Vec<f32> = scale_bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect();
        if scales.iter().any(|s| !s.is_finite()) {
            return Err(StreamError("a scale is not finite"));
        }
        pos = align4(pos + 2 * rows * groups);
        let mut indices = vec![0u16; rows * self.cols];
        let mut symbols = Vec::new();
        for (k, table) in self.tables.iter().enumerate() {
            let count = ids.iter().filter(|&&id| id as usize == k).count() * self.cols;
            if count == 0 {
                continue;
            }
            let table = table
                .as_ref()
                .ok_or(StreamError("rows of a cluster that has no table"))?;
            let header = payload
                .get(pos..pos + RANS_HEADER_BYTES)
                .ok_or(StreamError("payload shorter than a stream header"))?;
            let mut states = [0u32; LANES];
            for (s, chunk) in states.iter_mut().zip(header.chunks_exact(4)) {
                *s = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            }
            let word_count =
                u32::from_le_bytes(header[LANES * 4..].try_into().expect("4 bytes")) as usize;
            let words_start = pos + RANS_HEADER_BYTES;
            let words = payload
                .get(words_start..words_start + 2 * word_count)
                .ok_or(StreamError("payload shorter than a stream's words"))?;
            symbols.clear();
            symbols.resize(count, 0u16);
            rans::decode(
                &states,
                words,
                &mut [FieldOutput {
                    out: &mut symbols,
                    table,
                }],
                count,
            )?;
            let mut next = symbols.chunks_exact(self.cols);
            for (r, &id) in ids.iter().enumerate() {
                if id as usize == k {
                    let row = next.next().expect("count rows of the cluster");
                    indices[r * self.cols..(r + 1) * self.cols].copy_from_slice(row);
                }
            }
            pos = align4(words_start + 2 * word_count);
        }
        if pos != payload.len() {
            return Err(StreamError("payload length does not match its contents"));
        }
        let m = 1usize << p.index_bits;
        for (r, row_out) in out.chunks_exact_mut(row_bytes).enumerate() {
            let k = ids[r] as usize;
            let book = &p.codebooks[k * m..(k + 1) * m];
            let row_scales = &scales[r * groups..(r + 1) * groups];
            let row_indices = &indices[r * self.cols..(r + 1) * self.cols];
            for (j, (o, &q)) in row_out
                .chunks_exact_mut(self.width)
                .zip(row_indices)
                .enumerate()
            {
                let v = p.tensor_scale * (row_scales[j / p.group_size] * book[q as usize].to_f32());
                write_element(self.dtype, v, o);
            }
        }
        Ok(())
    }
}

/// Writes `v` as a little-endian `dtype` element, rounded to nearest even.
fn write_element(dtype: Dtype, v: f32, out: &mut [u8]) {
    match dtype {
        Dtype::F32 => out.copy_from_slice(&v.to_le_bytes()),
        Dtype::BF16 => out.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        _ => out.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
    }
}

/// The fit's reconstruction as the dtype's little-endian bytes: what decoding the tensor gives.
pub fn reconstruction_bytes(q: &CodebookQuantized, dtype: Dtype) -> Vec<u8> {
    let width = dtype.byte_width().unwrap_or(4);
    let mut out = vec![0u8; q.rows * q.cols * width];
    for (o, v) in out.chunks_exact_mut(width).zip(q.dequantize()) {
        write_element(dtype, v, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded matrix of `rows x cols` weights spread over a few magnitudes.
    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..rows * cols)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                (u * 0.01 * (1 + i / cols % 5) as f64) as f32
            })
            .collect()
    }

    fn fitted(rows: usize, cols: usize) -> CodebookPlan {
        let data: Vec<u8> = matrix(rows, cols, 3)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let options = FitOptions {
            index_bits: 3,
            group_size: 16,
            row_clusters: 3,
            rounds: 2,
            ..FitOptions::default()
        };
        plan(
            Dtype::F32,
            &[rows as u64, cols as u64],
            &data,
            &options,
            ErrorWeights::AbsPlusSigma,
            100,
        )
        .unwrap()
    }

    #[test]
    fn params_round_trip_and_parse_rejects_what_the_spec_forbids() {
        let p = fitted(12, 40);
        let shape = [12u64, 40];
        let bytes = p.params.to_bytes();
        assert_eq!(
            CodebookParams::parse(&bytes, Dtype::F32, &shape).unwrap(),
            p.params
        );
        let with = |pos: usize, value: u8| {
            let mut b = bytes.clone();
            b[pos] = value;
            CodebookParams::parse(&b, Dtype::F32, &shape)
        };
        assert!(with(0, 0).is_err()); // B = 0
        assert!(with(0, 11).is_err()); // B over 10
        assert!(with(1, 1).is_err()); // reserved
        assert!(with(2, 0).is_err()); // no clusters
        assert!(with(4, 41).is_err()); // G over cols
        assert!(with(11, 0xff).is_err()); // tensor scale NaN
        assert!(with(13, 0x7c).is_err()); // first codebook entry Inf
        assert!(CodebookParams::parse(&bytes, Dtype::F64, &shape).is_err());
        assert!(CodebookParams::parse(&bytes, Dtype::F32, &[]).is_err());
        assert!(CodebookParams::parse(&bytes, Dtype::F32, &[12, 0]).is_err());
        assert!(CodebookParams::parse(&bytes[..bytes.len() - 1], Dtype::F32, &shape).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(CodebookParams::parse(&longer, Dtype::F32, &shape).is_err());
    }

    #[test]
    fn blocks_decode_to_the_fit_and_reject_bad_lengths_and_ids() {
        let p = fitted(12, 40);
        assert_eq!(p.rows_per_block, 2);
        let decoder = CodebookDecoder::new(p.params.clone(), Dtype::F32, &[12, 40]).unwrap();
        let want = reconstruction_bytes(&p.quantized, Dtype::F32);
        let block_bytes = 2 * 40 * 4;
        for k in 0..6 {
            let payload = p.encode_block(k);
            let mut out = vec![0u8; block_bytes];
            decoder.decode_block(&payload, &mut out).unwrap();
            assert_eq!(out, want[k * block_bytes..(k + 1) * block_bytes]);
            let mut longer = payload.clone();
            longer.extend_from_slice(&[0; 4]);
            assert!(decoder.decode_block(&longer, &mut out).is_err());
            assert!(decoder
                .decode_block(&payload[..payload.len() - 4], &mut out)
                .is_err());
            let mut bad_id = payload.clone();
            bad_id[0] = 3;
            assert!(decoder.decode_block(&bad_id, &mut out).is_err());
            assert!(decoder.decode_block(&payload, &mut out[..100]).is_err());
        }
    }
}
