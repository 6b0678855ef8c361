//! Codebook quantization of a weight matrix (JLCM, Yvinec, Dapogny and Bailly, ICLR 2024), data-free version.
//!
//! A matrix has `rows` output neurons of `cols` inputs (higher ranks are flattened by the caller). The weight
//! `w[r, j]` is reconstructed as `t * s[r, j / G] * c[k(r), q[r, j]]`: `t` a power-of-two tensor scale, `s` an
//! f16 scale per row and group of `G` inputs, `c` an f16 codebook of `2^B` entries per row cluster `k(r)`, and
//! `q` a B-bit index per weight.
//!
//! Fitting (`fit`), in order:
//! 1. normalize by `t` (exact: a power of two) and take the initial scales as the group absmax;
//! 2. cluster the rows by quantiles of their scaled weights (k-means from a deterministic start);
//! 3. start each cluster's codebook by a weighted Lloyd-Max fit to its scaled weights (or on a uniform grid, for
//!    the entropy-coded mode), assign every weight to its nearest codeword;
//! 4. repeat `rounds` times the exact block-coordinate descent on the objective
//!    `J = sum h (x - s c_q)^2 + lambda * sum len(q)`:
//!    (a) least-squares refit of each scale, (a') optionally, a joint move of each group's scale on a small grid
//!    with its indices moved to neighbours, (b) centroid update of each codeword (then the codebook is sorted and
//!    the indices renumbered, which leaves `J` unchanged), (c) proximal assignment: each weight may only move to
//!    a neighbouring codeword, (d) with `lambda > 0`, the code lengths are refit to the index counts.
//!    Each step minimizes `J` over its own variables (or, for (a'), over a set that includes the current point);
//!    scales and codewords range over the f16 values, and the nearest f16 to the minimizer of a 1-D quadratic is
//!    the best f16, so `J` never increases.
//!
//! `h` are the error weights: `|w| + sigma` by default, or an importance per input channel. `lambda = 0` gives
//! fixed-rate indices; `lambda > 0` trades error for index entropy, which the rANS coder then realizes
//! (`entropy_coded_size`). Sums run in f64 over fixed row chunks in order, so results do not depend on the
//! number of threads.

use half::f16;
use rayon::prelude::*;

use super::freq::{histogram, FreqTable};
use super::rans::{self, Encoded, FieldSymbols, LANES};
use crate::error::{NzError, Result};

/// Widest index supported (the entropy-coded mode uses codebooks larger than the target rate).
pub const MAX_INDEX_BITS: u32 = 10;
/// Most row clusters (each stores its own codebook).
pub const MAX_ROW_CLUSTERS: usize = 256;
/// Probability precision of the index frequency tables.
pub const INDEX_PROB_BITS: u32 = 14;
/// Quantile features per row used to cluster rows.
const ROW_FEATURES: usize = 16;
/// Scale multipliers tried by the joint scale step.
const SCALE_SEARCH_FACTORS: [f64; 8] = [0.9, 0.95, 0.98, 0.99, 1.01, 1.02, 1.05, 1.1];
/// Lloyd-Max iterations of the initial codebooks.
const LLOYD_INIT_ITERATIONS: usize = 40;
/// k-means iterations for row clustering.
const KMEANS_ITERATIONS: usize = 25;
/// Rows per chunk of the parallel partial sums (fixed, so the summation order does not depend on threads).
const ROW_CHUNK: usize = 16;

/// What each weight's squared error is multiplied by.
#[derive(Clone, Copy, Debug)]
pub enum ErrorWeights<'a> {
    /// Plain squared error.
    Uniform,
    /// `|w| + sigma`, sigma the RMS of the tensor: large weights matter more.
    AbsPlusSigma,
    /// One importance per input channel (column), e.g. activation second moments; non-negative.
    PerInput(&'a [f32]),
}

/// How each cluster's codebook starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CodebookInit {
    /// Weighted 1-D Lloyd-Max on the cluster's scaled weights (unrestricted, started at their quantiles).
    Lloyd,
    /// On a uniform grid `(i - 2^B / 2) * step` (scaled units, where the group absmax is 1); zero is a level.
    Uniform { step: f32 },
}

/// Fit parameters.
#[derive(Clone, Copy, Debug)]
pub struct FitOptions {
    /// Index width B: the codebooks have `2^B` entries (1..=MAX_INDEX_BITS).
    pub index_bits: u32,
    /// Inputs per scale group G.
    pub group_size: usize,
    /// Row clusters K, each with its own codebook (capped at the row count).
    pub row_clusters: usize,
    /// Descent rounds after the initial assignment.
    pub rounds: usize,
    pub init: CodebookInit,
    /// Weight of the index-length term, relative to the mean of `h * s^2` at the start (so in squared codeword
    /// units per bit). 0 for fixed-rate indices.
    pub rate_lambda: f64,
    /// Adds a joint step per round: each group's scale on a small grid around its value, with its indices moved
    /// to neighbours.
    pub scale_search: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            index_bits: 4,
            group_size: 128,
            row_clusters: 4,
            rounds: 8,
            init: CodebookInit::Lloyd,
            rate_lambda: 0.0,
            scale_search: true,
        }
    }
}

/// A quantized matrix: everything needed to dequantize it.
#[derive(Clone, Debug, PartialEq)]
pub struct CodebookQuantized {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub index_bits: u32,
    /// Power-of-two tensor scale `t` (stored as f32).
    pub tensor_scale: f32,
    /// Cluster of each row.
    pub row_cluster: Vec<u16>,
    /// Codebooks, cluster-major, `2^index_bits` ascending entries each.
    pub codebooks: Vec<f16>,
    /// Scales, row-major, `groups_per_row()` per row.
    pub scales: Vec<f16>,
    /// Codeword index of each weight, row-major.
    pub indices: Vec<u16>,
}

/// Sizes in bits of a quantized matrix, split by component.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeReport {
    pub weights: u64,
    /// Indices: `B` bits each at fixed rate, or the rANS streams (tables, states and words) when entropy-coded.
    pub index_bits: u64,
    /// The f32 tensor scale.
    pub tensor_scale_bits: u64,
    /// f16 scales.
    pub scale_bits: u64,
    /// f16 codebooks.
    pub codebook_bits: u64,
    /// `ceil(log2 K)` bits per row.
    pub cluster_id_bits: u64,
}

impl SizeReport {
    pub fn total_bits(&self) -> u64 {
        self.index_bits
            + self.tensor_scale_bits
            + self.scale_bits
            + self.codebook_bits
            + self.cluster_id_bits
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.total_bits() as f64 / self.weights.max(1) as f64
    }
}

/// The indices of one row cluster, rANS-coded with their own table.
#[derive(Clone, Debug)]
pub struct CodedCluster {
    pub cluster: u16,
    pub count: usize,
    pub table: FreqTable,
    pub encoded: Encoded,
}

impl CodedCluster {
    /// Serialized bytes: the table, the 32 lane states and the words.
    pub fn byte_len(&self) -> usize {
        self.table.serialized_len() + 4 * LANES + 2 * self.encoded.words.len()
    }
}

/// One step of the descent, as recorded in the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitStep {
    Init,
    Scales,
    ScaleSearch,
    Codebooks,
    Assignment,
    CodeLengths,
}

/// The objective `J` after the initialization and after every step.
#[derive(Clone, Debug, Default)]
pub struct FitTrace {
    pub steps: Vec<(FitStep, f64)>,
}

fn invalid(what: impl Into<String>) -> NzError {
    NzError::InvalidQuantInput { what: what.into() }
}

/// The nearest f16 to `x`, saturating at the largest finite value.
fn to_f16(x: f64) -> f32 {
    f16::from_f64(x.clamp(-65504.0, 65504.0)).to_f32()
}

fn cluster_id_width(clusters: usize) -> u64 {
    (usize::BITS - clusters.saturating_sub(1).leading_zeros()) as u64
}

impl CodebookQuantized {
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }

    pub fn clusters(&self) -> usize {
        self.codebooks.len() >> self.index_bits
    }

    /// The reconstructed matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let m = 1usize << self.index_bits;
        let groups = self.groups_per_row();
        let mut out = vec![0.0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let k = self.row_cluster[r] as usize;
                let book = &self.codebooks[k * m..(k + 1) * m];
                let scales = &self.scales[r * groups..(r + 1) * groups];
                let indices = &self.indices[r * self.cols..(r + 1) * self.cols];
                for (j, (o, &q)) in row.iter_mut().zip(indices).enumerate() {
                    let s = scales[j / self.group_size].to_f32();
                    *o = self.tensor_scale * (s * book[q as usize].to_f32());
                }
            });
        out
    }

    fn side_sizes(&self, index_bits: u64) -> SizeReport {
        SizeReport {
            weights: (self.rows * self.cols) as u64,
            index_bits,
            tensor_scale_bits: 32,
            scale_bits: 16 * self.scales.len() as u64,
            codebook_bits: 16 * self.codebooks.len() as u64,
            cluster_id_bits: self.rows as u64 * cluster_id_width(self.clusters()),
        }
    }

    /// Size with every index stored in `index_bits` bits.
    pub fn fixed_rate_size(&self) -> SizeReport {
        self.side_sizes(self.indices.len() as u64 * self.index_bits as u64)
    }

    /// rANS-codes the indices, one stream and table per row cluster (rows of the cluster in order).
    pub fn encode_indices(&self) -> Vec<CodedCluster> {
        let clusters = self.clusters();
        let mut per_cluster: Vec<Vec<u16>> = vec![Vec::new(); clusters];
        for (r, &k) in self.row_cluster.iter().enumerate() {
            per_cluster[k as usize]
                .extend_from_slice(&self.indices[r * self.cols..(r + 1) * self.cols]);
        }
        per_cluster
            .into_par_iter()
            .enumerate()
            .filter(|(_, symbols)| !symbols.is_empty())
            .map(|(k, symbols)| {
                let counts = histogram(symbols.iter().map(|&q| q as u32), self.index_bits);
                let table = FreqTable::from_counts(&counts, self.index_bits, INDEX_PROB_BITS)
                    .expect("at most 2^10 symbols fit a 2^14 table");
                let encoded = rans::encode(
                    &[FieldSymbols {
                        symbols: &symbols,
                        table: &table,
                    }],
                    symbols.len(),
                );
                CodedCluster {
                    cluster: k as u16,
                    count: symbols.len(),
                    table,
                    encoded,
                }
            })
            .collect()
    }

    /// Size with the indices rANS-coded (`encode_indices`), tables and lane states included.
    pub fn entropy_coded_size(&self) -> SizeReport {
        let bytes: usize = self
            .encode_indices()
            .iter()
            .map(CodedCluster::byte_len)
            .sum();
        self.side_sizes(8 * bytes as u64)
    }
}

/// Quantizes a `rows x cols` matrix (row-major, rows = output neurons). Returns the quantized form and the trace
/// of the objective.
pub fn fit(
    weights: &[f32],
    rows: usize,
    cols: usize,
    error_weights: ErrorWeights<'_>,
    options: &FitOptions,
) -> Result<(CodebookQuantized, FitTrace)> {
    let mut fitter = Fitter::new(weights, rows, cols, error_weights, options)?;
    let mut trace = FitTrace::default();
    trace.steps.push((FitStep::Init, fitter.objective()));
    for _ in 0..options.rounds {
        fitter.refit_scales();
        trace.steps.push((FitStep::Scales, fitter.objective()));
        if options.scale_search {
            fitter.search_scales();
            trace.steps.push((FitStep::ScaleSearch, fitter.objective()));
        }
        fitter.update_codebooks();
        trace.steps.push((FitStep::Codebooks, fitter.objective()));
        fitter.assign_proximal();
        trace.steps.push((FitStep::Assignment, fitter.objective()));
        if fitter.lambda > 0.0 {
            fitter.refit_code_lengths();
            trace.steps.push((FitStep::CodeLengths, fitter.objective()));
        }
    }
    Ok((fitter.finish(), trace))
}

/// The state of the descent, in normalized units (`x = w / t`); scales and codewords hold f16 values.
struct Fitter {
    rows: usize,
    cols: usize,
    group: usize,
    groups: usize,
    m: usize,
    clusters: usize,
    tensor_scale: f32,
    x: Vec<f32>,
    h: Vec<f32>,
    lambda: f64,
    row_cluster: Vec<u16>,
    codebooks: Vec<f32>,
    /// Code length in bits of each codeword, cluster-major (all `B` at fixed rate).
    lengths: Vec<f64>,
    scales: Vec<f32>,
    indices: Vec<u16>,
}

impl Fitter {
    fn new(
        weights: &[f32],
        rows: usize,
        cols: usize,
        error_weights: ErrorWeights<'_>,
        options: &FitOptions,
    ) -> Result<Fitter> {
        if rows == 0 || cols == 0 || rows.checked_mul(cols) != Some(weights.len()) {
            return Err(invalid(format!(
                "{} values do not form a non-empty {rows} x {cols} matrix",
                weights.len()
            )));
        }
        if !(1..=MAX_INDEX_BITS).contains(&options.index_bits) {
            return Err(invalid(format!(
                "codebook index width {} outside 1..={MAX_INDEX_BITS}",
                options.index_bits
            )));
        }
        if options.group_size == 0 {
            return Err(invalid("group size must be positive"));
        }
        if !(1..=MAX_ROW_CLUSTERS).contains(&options.row_clusters) {
            return Err(invalid(format!(
                "row clusters {} outside 1..={MAX_ROW_CLUSTERS}",
                options.row_clusters
            )));
        }
        if !(options.rate_lambda >= 0.0 && options.rate_lambda.is_finite()) {
            return Err(invalid("rate lambda must be finite and non-negative"));
        }
        if let CodebookInit::Uniform { step } = options.init {
            if !(step > 0.0 && step.is_finite()) {
                return Err(invalid("uniform codebook step must be positive"));
            }
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return Err(invalid(format!("weight {i} is not finite")));
        }
        let absmax = weights.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        // Smallest power of two >= absmax, so that x = w / t is exact and |x| <= 1.
        let tensor_scale = if absmax > 0.0 {
            2f32.powi(absmax.log2().ceil() as i32)
        } else {
            1.0
        };
        let x: Vec<f32> = weights.iter().map(|&w| w / tensor_scale).collect();
        let h: Vec<f32> = match error_weights {
            ErrorWeights::Uniform => vec![1.0; x.len()],
            ErrorWeights::AbsPlusSigma => {
                let sigma = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64)
                    .sqrt() as f32;
                x.iter().map(|&v| v.abs() + sigma).collect()
            }
            ErrorWeights::PerInput(importance) => {
                if importance.len() != cols {
                    return Err(invalid(format!(
                        "importance has {} channels, the matrix has {cols} inputs",
                        importance.len()
                    )));
                }
                if importance.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                    return Err(invalid("importance values must be finite and non-negative"));
                }
                (0..x.len()).map(|i| importance[i % cols]).collect()
            }
        };
        let group = options.group_size.min(cols);
        let groups = cols.div_ceil(group);
        let m = 1usize << options.index_bits;
        let clusters = options.row_clusters.min(rows);

        let mut scales = vec![0.0f32; rows * groups];
        scales
            .par_chunks_mut(groups)
            .zip(x.par_chunks(cols))
            .for_each(|(row_scales, row)| {
                for (s, g) in row_scales.iter_mut().zip(row.chunks(group)) {
                    *s = to_f16(g.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64);
                }
            });
        let scaled = |r: usize, j: usize, scales: &[f32]| -> f32 {
            let s = scales[r * groups + j / group];
            if s > 0.0 {
                x[r * cols + j] / s
            } else {
                0.0
            }
        };

        let row_cluster = cluster_rows(rows, cols, clusters, |r, j| scaled(r, j, &scales));

        let mut codebooks = vec![0.0f32; clusters * m];
        for (k, book) in codebooks.chunks_mut(m).enumerate() {
            match options.init {
                CodebookInit::Lloyd => {
                    // (scaled weight, its weight h s^2 in the error) of every weight of the cluster.
                    let mut pooled: Vec<(f32, f32)> = Vec::new();
                    for r in (0..rows).filter(|&r| row_cluster[r] as usize == k) {
                        pooled.extend((0..cols).map(|j| {
                            let s = scales[r * groups + j / group];
                            (scaled(r, j, &scales), h[r * cols + j] * s * s)
                        }));
                    }
                    lloyd_init(&mut pooled, book);
                }
                CodebookInit::Uniform { step } => {
                    for (i, c) in book.iter_mut().enumerate() {
                        *c = to_f16((i as f64 - (m / 2) as f64) * step as f64);
                    }
                }
            }
        }

        let mean_hs2 = {
            let per_row: Vec<f64> = (0..rows)
                .into_par_iter()
                .map(|r| {
                    (0..cols)
                        .map(|j| {
                            h[r * cols + j] as f64 * (scales[r * groups + j / group] as f64).powi(2)
                        })
                        .sum()
                })
                .collect();
            per_row.iter().sum::<f64>() / x.len() as f64
        };
        let mut fitter = Fitter {
            rows,
            cols,
            group,
            groups,
            m,
            clusters,
            tensor_scale,
            x,
            h,
            lambda: options.rate_lambda * mean_hs2,
            row_cluster,
            codebooks,
            lengths: vec![options.index_bits as f64; clusters * m],
            scales,
            indices: vec![0; rows * cols],
        };
        fitter.sort_codebooks();
        fitter.assign_nearest();
        if fitter.lambda > 0.0 {
            fitter.refit_code_lengths();
        }
        Ok(fitter)
    }

    /// `J`, summed per row in parallel and over rows in order.
    fn objective(&self) -> f64 {
        let per_row: Vec<f64> = (0..self.rows)
            .into_par_iter()
            .map(|r| {
                let k = self.row_cluster[r] as usize;
                let book = &self.codebooks[k * self.m..(k + 1) * self.m];
                let lengths = &self.lengths[k * self.m..(k + 1) * self.m];
                let mut sum = 0.0f64;
                for j in 0..self.cols {
                    let i = r * self.cols + j;
                    let q = self.indices[i] as usize;
                    let s = self.scales[r * self.groups + j / self.group] as f64;
                    let e = self.x[i] as f64 - s * book[q] as f64;
                    sum += self.h[i] as f64 * e * e + self.lambda * lengths[q];
                }
                sum
            })
            .collect();
        per_row.iter().sum()
    }

    /// Initial assignment: every weight to its nearest codeword (codebooks sorted, lengths all equal).
    fn assign_nearest(&mut self) {
        let (cols, m, group, groups) = (self.cols, self.m, self.group, self.groups);
        let (x, scales, codebooks, row_cluster) =
            (&self.x, &self.scales, &self.codebooks, &self.row_cluster);
        self.indices
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| {
                let k = row_cluster[r] as usize;
                let book = &codebooks[k * m..(k + 1) * m];
                for (j, q) in row.iter_mut().enumerate() {
                    let s = scales[r * groups + j / group];
                    let target = x[r * cols + j] as f64;
                    let cost = |c: f32| (target - s as f64 * c as f64).abs();
                    let u = if s != 0.0 { x[r * cols + j] / s } else { 0.0 };
                    // First codeword at or above u; the nearest is it or the one below.
                    let above = book.partition_point(|&c| c < u).min(m - 1);
                    let below = above.saturating_sub(1);
                    *q = if cost(book[below]) <= cost(book[above]) {
                        below as u16
                    } else {
                        above as u16
                    };
                }
            });
    }

    /// Proximal assignment: each weight keeps its codeword or moves to a neighbour, whichever lowers its
    /// term of `J` strictly.
    fn assign_proximal(&mut self) {
        let (cols, m, group, groups, lambda) =
            (self.cols, self.m, self.group, self.groups, self.lambda);
        let (x, h, scales) = (&self.x, &self.h, &self.scales);
        let (codebooks, lengths, row_cluster) = (&self.codebooks, &self.lengths, &self.row_cluster);
        self.indices
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| {
                let k = row_cluster[r] as usize;
                let book = &codebooks[k * m..(k + 1) * m];
                let lens = &lengths[k * m..(k + 1) * m];
                for (j, q) in row.iter_mut().enumerate() {
                    let i = r * cols + j;
                    let s = scales[r * groups + j / group] as f64;
                    let cost = |c: usize| {
                        let e = x[i] as f64 - s * book[c] as f64;
                        h[i] as f64 * e * e + lambda * lens[c]
                    };
                    let current = *q as usize;
                    let mut best = (cost(current), current);
                    for c in [current.wrapping_sub(1), current + 1] {
                        if c < m {
                            let value = cost(c);
                            if value < best.0 {
                                best = (value, c);
                            }
                        }
                    }
                    *q = best.1 as u16;
                }
            });
    }

    /// Joint move of each group's scale and indices: tries the scale times each of `SCALE_SEARCH_FACTORS`, with
    /// every index of the group free to move to a neighbour, and keeps the best only if it lowers the group's
    /// term of `J` strictly (the current point is a candidate, so `J` cannot rise).
    fn search_scales(&mut self) {
        let (cols, m, group, lambda) = (self.cols, self.m, self.group, self.lambda);
        let (x, h) = (&self.x, &self.h);
        let (codebooks, lengths, row_cluster) = (&self.codebooks, &self.lengths, &self.row_cluster);
        self.scales
            .par_chunks_mut(self.groups)
            .zip(self.indices.par_chunks_mut(cols))
            .enumerate()
            .for_each(|(r, (row_scales, row_indices))| {
                let k = row_cluster[r] as usize;
                let book = &codebooks[k * m..(k + 1) * m];
                let lens = &lengths[k * m..(k + 1) * m];
                let mut trial = vec![0u16; group];
                for (g, s) in row_scales.iter_mut().enumerate() {
                    let span = g * group..((g + 1) * group).min(cols);
                    let (xs, hs) = (
                        &x[r * cols + span.start..r * cols + span.end],
                        &h[r * cols + span.start..r * cols + span.end],
                    );
                    let indices = &mut row_indices[span];
                    let term = |scale: f64, q: usize, i: usize| {
                        let e = xs[i] as f64 - scale * book[q] as f64;
                        hs[i] as f64 * e * e + lambda * lens[q]
                    };
                    let mut best: f64 = (0..indices.len())
                        .map(|i| term(*s as f64, indices[i] as usize, i))
                        .sum();
                    let mut best_scale = *s;
                    let mut best_indices: Option<Vec<u16>> = None;
                    for factor in SCALE_SEARCH_FACTORS {
                        let candidate = to_f16(*s as f64 * factor);
                        if candidate == *s {
                            continue;
                        }
                        let mut total = 0.0;
                        for (i, t) in trial[..indices.len()].iter_mut().enumerate() {
                            let current = indices[i] as usize;
                            let mut pick = (term(candidate as f64, current, i), current);
                            for c in [current.wrapping_sub(1), current + 1] {
                                if c < m {
                                    let v = term(candidate as f64, c, i);
                                    if v < pick.0 {
                                        pick = (v, c);
                                    }
                                }
                            }
                            *t = pick.1 as u16;
                            total += pick.0;
                        }
                        if total < best {
                            best = total;
                            best_scale = candidate;
                            best_indices = Some(trial[..indices.len()].to_vec());
                        }
                    }
                    if let Some(found) = best_indices {
                        *s = best_scale;
                        indices.copy_from_slice(&found);
                    }
                }
            });
    }

    /// Weighted least squares for each scale: `s = sum h x c / sum h c^2` over its group, rounded to f16.
    fn refit_scales(&mut self) {
        let (cols, m, group, groups) = (self.cols, self.m, self.group, self.groups);
        let (x, h, indices) = (&self.x, &self.h, &self.indices);
        let (codebooks, row_cluster) = (&self.codebooks, &self.row_cluster);
        self.scales
            .par_chunks_mut(groups)
            .enumerate()
            .for_each(|(r, row_scales)| {
                let k = row_cluster[r] as usize;
                let book = &codebooks[k * m..(k + 1) * m];
                for (g, s) in row_scales.iter_mut().enumerate() {
                    let (mut num, mut den) = (0.0f64, 0.0f64);
                    for j in g * group..((g + 1) * group).min(cols) {
                        let i = r * cols + j;
                        let c = book[indices[i] as usize] as f64;
                        num += h[i] as f64 * x[i] as f64 * c;
                        den += h[i] as f64 * c * c;
                    }
                    if den > 0.0 {
                        *s = to_f16(num / den);
                    }
                }
            });
    }

    /// Weighted centroid of each codeword: `c = sum h s x / sum h s^2` over the weights assigned to it, rounded
    /// to f16; codewords with no weight (or zero scales only) keep their value. Then the codebooks are sorted.
    fn update_codebooks(&mut self) {
        let (cols, m, group, groups) = (self.cols, self.m, self.group, self.groups);
        let width = self.clusters * m;
        let (x, h, indices, scales, row_cluster) = (
            &self.x,
            &self.h,
            &self.indices,
            &self.scales,
            &self.row_cluster,
        );
        let partials: Vec<Vec<(f64, f64)>> = (0..self.rows.div_ceil(ROW_CHUNK))
            .into_par_iter()
            .map(|chunk| {
                let mut sums = vec![(0.0f64, 0.0f64); width];
                for r in chunk * ROW_CHUNK..((chunk + 1) * ROW_CHUNK).min(self.rows) {
                    let base = row_cluster[r] as usize * m;
                    for j in 0..cols {
                        let i = r * cols + j;
                        let s = scales[r * groups + j / group] as f64;
                        let slot = &mut sums[base + indices[i] as usize];
                        slot.0 += h[i] as f64 * s * x[i] as f64;
                        slot.1 += h[i] as f64 * s * s;
                    }
                }
                sums
            })
            .collect();
        let mut totals = vec![(0.0f64, 0.0f64); width];
        for part in &partials {
            for (t, p) in totals.iter_mut().zip(part) {
                t.0 += p.0;
                t.1 += p.1;
            }
        }
        for (c, (num, den)) in self.codebooks.iter_mut().zip(totals) {
            if den > 0.0 {
                *c = to_f16(num / den);
            }
        }
        self.sort_codebooks();
    }

    /// Sorts each codebook ascending and renumbers the indices (and code lengths) to match; `J` is unchanged.
    fn sort_codebooks(&mut self) {
        let m = self.m;
        for k in 0..self.clusters {
            let book = &self.codebooks[k * m..(k + 1) * m];
            if book.windows(2).all(|p| p[0] <= p[1]) {
                continue;
            }
            let mut order: Vec<usize> = (0..m).collect();
            order.sort_by(|&a, &b| book[a].total_cmp(&book[b]).then(a.cmp(&b)));
            let mut new_index = vec![0u16; m];
            for (new, &old) in order.iter().enumerate() {
                new_index[old] = new as u16;
            }
            let sorted_book: Vec<f32> = order.iter().map(|&o| book[o]).collect();
            let lengths = &self.lengths[k * m..(k + 1) * m];
            let sorted_lengths: Vec<f64> = order.iter().map(|&o| lengths[o]).collect();
            self.codebooks[k * m..(k + 1) * m].copy_from_slice(&sorted_book);
            self.lengths[k * m..(k + 1) * m].copy_from_slice(&sorted_lengths);
            let row_cluster = &self.row_cluster;
            self.indices
                .par_chunks_mut(self.cols)
                .enumerate()
                .filter(|(r, _)| row_cluster[*r] as usize == k)
                .for_each(|(_, row)| {
                    for q in row {
                        *q = new_index[*q as usize];
                    }
                });
        }
    }

    /// Code lengths minimizing `sum len(q)` over the current indices, among lengths `-log2 p` with
    /// `sum p = 1` and every `p >= 2^-INDEX_PROB_BITS` (the coder's smallest frequency): `p = max(p_min, n / mu)`.
    fn refit_code_lengths(&mut self) {
        let m = self.m;
        let mut counts = vec![0u64; self.clusters * m];
        for (r, row) in self.indices.chunks(self.cols).enumerate() {
            let base = self.row_cluster[r] as usize * m;
            for &q in row {
                counts[base + q as usize] += 1;
            }
        }
        let p_min = (-(INDEX_PROB_BITS as f64)).exp2();
        for (lengths, counts) in self.lengths.chunks_mut(m).zip(counts.chunks(m)) {
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            // Grow the clamped set until every free symbol has n / mu >= p_min.
            let mut clamped = vec![false; m];
            let mu = loop {
                let free: u64 = (0..m).filter(|&q| !clamped[q]).map(|q| counts[q]).sum();
                let clamped_count = clamped.iter().filter(|&&c| c).count();
                let mu = free as f64 / (1.0 - p_min * clamped_count as f64);
                let mut changed = false;
                for q in 0..m {
                    if !clamped[q] && (counts[q] as f64) < p_min * mu {
                        clamped[q] = true;
                        changed = true;
                    }
                }
                if !changed {
                    break mu;
                }
            };
            for q in 0..m {
                let p = if clamped[q] {
                    p_min
                } else {
                    counts[q] as f64 / mu
                };
                lengths[q] = -p.log2();
            }
        }
    }

    fn finish(self) -> CodebookQuantized {
        CodebookQuantized {
            rows: self.rows,
            cols: self.cols,
            group_size: self.group,
            index_bits: self.m.trailing_zeros(),
            tensor_scale: self.tensor_scale,
            row_cluster: self.row_cluster,
            codebooks: self.codebooks.iter().map(|&c| f16::from_f32(c)).collect(),
            scales: self.scales.iter().map(|&s| f16::from_f32(s)).collect(),
            indices: self.indices,
        }
    }
}

/// Sets `book` to a weighted Lloyd-Max quantizer of the `(value, weight)` pairs: starts at the `(i + 1/2) / m`
/// quantiles, then alternates nearest-codeword cells and weighted centroids (prefix sums over the sorted values).
/// Entries are rounded to f16 and ascending; an empty input gives a uniform grid on [-1, 1].
fn lloyd_init(pooled: &mut [(f32, f32)], book: &mut [f32]) {
    let m = book.len();
    if pooled.is_empty() {
        for (i, c) in book.iter_mut().enumerate() {
            *c = to_f16(-1.0 + (2 * i + 1) as f64 / m as f64);
        }
        return;
    }
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = pooled.len();
    let mut centres: Vec<f64> = (0..m)
        .map(|i| pooled[((2 * i + 1) * n / (2 * m)).min(n - 1)].0 as f64)
        .collect();
    // prefix[i] = (sum of weights, sum of weight * value) over pooled[..i].
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push((0.0f64, 0.0f64));
    for &(u, wt) in pooled.iter() {
        let (a, b) = *prefix.last().expect("non-empty");
        prefix.push((a + wt as f64, b + wt as f64 * u as f64));
    }
    for _ in 0..LLOYD_INIT_ITERATIONS {
        let mut start = 0;
        for q in 0..m {
            let end = if q + 1 < m {
                let threshold = 0.5 * (centres[q] + centres[q + 1]);
                start + pooled[start..].partition_point(|p| (p.0 as f64) < threshold)
            } else {
                n
            };
            let (wsum, wusum) = (
                prefix[end].0 - prefix[start].0,
                prefix[end].1 - prefix[start].1,
            );
            if wsum > 0.0 {
                centres[q] = wusum / wsum;
            }
            start = end;
        }
        centres.sort_by(f64::total_cmp);
    }
    for (c, &v) in book.iter_mut().zip(&centres) {
        *c = to_f16(v);
    }
}

/// k-means over per-row quantile features of the scaled weights, started from rows spread evenly over the
/// order of their feature range; ties go to the lower cluster.
fn cluster_rows(
    rows: usize,
    cols: usize,
    clusters: usize,
    scaled: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<u16> {
    if clusters <= 1 {
        return vec![0; rows];
    }
    let features: Vec<[f32; ROW_FEATURES]> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let mut values: Vec<f32> = (0..cols).map(|j| scaled(r, j)).collect();
            values.sort_by(f32::total_cmp);
            let mut f = [0.0f32; ROW_FEATURES];
            for (i, v) in f.iter_mut().enumerate() {
                *v = values[((2 * i + 1) * cols / (2 * ROW_FEATURES)).min(cols - 1)];
            }
            f
        })
        .collect();
    let spread = |f: &[f32; ROW_FEATURES]| f[ROW_FEATURES - 1] - f[0];
    let mut order: Vec<usize> = (0..rows).collect();
    order.sort_by(|&a, &b| {
        spread(&features[a])
            .total_cmp(&spread(&features[b]))
            .then(a.cmp(&b))
    });
    let mut centres: Vec<[f64; ROW_FEATURES]> = (0..clusters)
        .map(|k| features[order[(2 * k + 1) * rows / (2 * clusters)]].map(|v| v as f64))
        .collect();
    let mut assignment = vec![0u16; rows];
    for _ in 0..KMEANS_ITERATIONS {
        let next: Vec<u16> = features
            .par_iter()
            .map(|f| {
                let distance = |c: &[f64; ROW_FEATURES]| -> f64 {
                    f.iter().zip(c).map(|(&a, &b)| (a as f64 - b).powi(2)).sum()
                };
                let mut best = (distance(&centres[0]), 0u16);
                for (k, c) in centres.iter().enumerate().skip(1) {
                    let d = distance(c);
                    if d < best.0 {
                        best = (d, k as u16);
                    }
                }
                best.1
            })
            .collect();
        let changed = next != assignment;
        assignment = next;
        let mut sums = vec![([0.0f64; ROW_FEATURES], 0usize); clusters];
        for (f, &k) in features.iter().zip(&assignment) {
            let (sum, count) = &mut sums[k as usize];
            for (s, &v) in sum.iter_mut().zip(f) {
                *s += v as f64;
            }
            *count += 1;
        }
        for (centre, (sum, count)) in centres.iter_mut().zip(sums) {
            if count > 0 {
                *centre = sum.map(|s| s / count as f64);
            }
        }
        if !changed {
            break;
        }
    }
    assignment
}

/// `lambda / step^2` that matches a uniform quantizer at high rate: `D = step^2 / 12` falls by `2 ln 2 * D` per
/// bit, so trading one bit is worth `ln 2 * step^2 / 6` of squared error (scaled units).
pub const LAMBDA_PER_STEP_SQUARED: f64 = std::f64::consts::LN_2 / 6.0;

/// Entropy-coded fit at a target size: searches the uniform grid step of a codebook of `2^options.index_bits`
/// entries (by bisection on its logarithm, `search_steps` fits, `lambda` tied to the step), and returns the fit
/// with the smallest step whose total entropy-coded size is at most `target_bits_per_weight`, with that size.
/// None when even the coarsest step tried is over the target.
pub fn fit_entropy_coded(
    weights: &[f32],
    rows: usize,
    cols: usize,
    error_weights: ErrorWeights<'_>,
    options: &FitOptions,
    target_bits_per_weight: f64,
    search_steps: usize,
) -> Result<Option<(CodebookQuantized, SizeReport)>> {
    // Steps between 2^-12 and 1 (three levels cover the scaled range [-1, 1]).
    let (mut fine, mut coarse) = (-12.0f64, 0.0f64);
    let try_step = |log_step: f64| -> Result<(CodebookQuantized, SizeReport)> {
        let step = log_step.exp2();
        let opts = FitOptions {
            init: CodebookInit::Uniform { step: step as f32 },
            rate_lambda: LAMBDA_PER_STEP_SQUARED * step * step,
            ..*options
        };
        let (q, _) = fit(weights, rows, cols, error_weights, &opts)?;
        let size = q.entropy_coded_size();
        Ok((q, size))
    };
    let mut best = {
        let (q, size) = try_step(coarse)?;
        if size.bits_per_weight() > target_bits_per_weight {
            return Ok(None);
        }
        (q, size)
    };
    for _ in 0..search_steps {
        let mid = 0.5 * (fine + coarse);
        let (q, size) = try_step(mid)?;
        if size.bits_per_weight() <= target_bits_per_weight {
            coarse = mid;
            best = (q, size);
        } else {
            fine = mid;
        }
    }
    Ok(Some(best))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::freq::DecodeTable;
    use crate::codec::quant_baselines::rtn_clipped;
    use crate::codec::quant_metrics::{energies, sqnr_db};
    use crate::codec::rans::FieldOutput;

    /// Seeded matrix whose rows have different shapes: Gaussian-like, Laplacian-like and skewed, with
    /// per-row magnitudes.
    fn test_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let magnitude = 0.01 * (1.0 + (r % 7) as f64);
            for _ in 0..cols {
                let v = match r % 3 {
                    0 => (0..4).map(|_| uniform() - 0.5).sum::<f64>(),
                    1 => {
                        let u = uniform() - 0.5;
                        -u.signum() * (1.0 - 2.0 * u.abs()).ln() * 0.5
                    }
                    _ => uniform().powi(3) - 0.2,
                };
                out.push((v * magnitude) as f32);
            }
        }
        out
    }

    fn options(index_bits: u32) -> FitOptions {
        FitOptions {
            index_bits,
            group_size: 64,
            row_clusters: 3,
            rounds: 6,
            init: CodebookInit::Lloyd,
            rate_lambda: 0.0,
            scale_search: true,
        }
    }

    fn assert_monotone(trace: &FitTrace) {
        for pair in trace.steps.windows(2) {
            let (before, after) = (pair[0].1, pair[1].1);
            // Only the f64 summation order may differ between two evaluations of an unchanged J.
            assert!(
                after <= before * (1.0 + 1e-12),
                "{:?} raised J: {pair:?}",
                pair[1].0
            );
        }
    }

    #[test]
    fn descent_never_raises_the_objective() {
        let (rows, cols) = (30, 200);
        let w = test_matrix(rows, cols, 1);
        let importance: Vec<f32> = (0..cols).map(|j| 0.5 + (j % 5) as f32).collect();
        for weights in [
            ErrorWeights::AbsPlusSigma,
            ErrorWeights::Uniform,
            ErrorWeights::PerInput(&importance),
        ] {
            for bits in [2, 3, 5] {
                let (_, trace) = fit(&w, rows, cols, weights, &options(bits)).unwrap();
                assert!(trace.steps.iter().any(|s| s.0 == FitStep::ScaleSearch));
                assert_monotone(&trace);
                let first = trace.steps[0].1;
                let last = trace.steps.last().unwrap().1;
                assert!(
                    last < first * 0.999,
                    "no progress at {bits} bits: {first} -> {last}"
                );
            }
        }
        // With the rate term: J includes lambda * code lengths, and the code-length step is in the trace.
        let opts = FitOptions {
            init: CodebookInit::Uniform { step: 0.1 },
            rate_lambda: LAMBDA_PER_STEP_SQUARED * 0.01,
            ..options(5)
        };
        let (_, trace) = fit(&w, rows, cols, ErrorWeights::AbsPlusSigma, &opts).unwrap();
        assert!(trace.steps.iter().any(|s| s.0 == FitStep::CodeLengths));
        assert_monotone(&trace);
    }

    #[test]
    fn objective_is_the_weighted_reconstruction_error() {
        let (rows, cols) = (12, 100);
        let w = test_matrix(rows, cols, 2);
        let (q, trace) = fit(&w, rows, cols, ErrorWeights::Uniform, &options(3)).unwrap();
        let (_, error) = energies(&w, &q.dequantize());
        let objective = trace.steps.last().unwrap().1 * (q.tensor_scale as f64).powi(2);
        assert!(
            (error - objective).abs() <= 1e-6 * objective,
            "{error} vs {objective}"
        );
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let (rows, cols) = (40, 160);
        let w = test_matrix(rows, cols, 3);
        let opts = FitOptions {
            init: CodebookInit::Uniform { step: 0.08 },
            rate_lambda: 0.002,
            ..options(4)
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (q, trace) = fit(&w, rows, cols, ErrorWeights::AbsPlusSigma, &opts).unwrap();
                let coded: Vec<Vec<u16>> = q
                    .encode_indices()
                    .into_iter()
                    .map(|c| c.encoded.words)
                    .collect();
                let bits: Vec<u64> = trace.steps.iter().map(|s| s.1.to_bits()).collect();
                (q, bits, coded)
            })
        };
        let single = run(1);
        assert_eq!(single, run(3));
        assert_eq!(single, run(4));
    }

    #[test]
    fn assignment_moves_only_to_neighbouring_codewords() {
        let (rows, cols) = (20, 128);
        let w = test_matrix(rows, cols, 4);
        let mut fitter =
            Fitter::new(&w, rows, cols, ErrorWeights::AbsPlusSigma, &options(4)).unwrap();
        // Shrink every codebook 4x: most weights are now nearest to a codeword several places away.
        for c in &mut fitter.codebooks {
            *c = to_f16(*c as f64 * 0.25);
        }
        let before = fitter.indices.clone();
        let j_before = fitter.objective();
        fitter.assign_proximal();
        let moved = before
            .iter()
            .zip(&fitter.indices)
            .filter(|(a, b)| a != b)
            .count();
        assert!(moved > before.len() / 4, "only {moved} moved");
        assert!(before
            .iter()
            .zip(&fitter.indices)
            .all(|(&a, &b)| (a as i32 - b as i32).abs() <= 1));
        assert!(fitter.objective() < j_before);
        // The joint scale step moves indices to neighbours only, too.
        let before = fitter.indices.clone();
        let j_before = fitter.objective();
        fitter.search_scales();
        assert!(before
            .iter()
            .zip(&fitter.indices)
            .all(|(&a, &b)| (a as i32 - b as i32).abs() <= 1));
        assert!(fitter.objective() <= j_before);
        // Unrestricted, the same weights would jump further.
        let proximal = fitter.indices.clone();
        fitter.assign_nearest();
        let far = proximal
            .iter()
            .zip(&fitter.indices)
            .filter(|(&a, &b)| (a as i32 - b as i32).abs() > 1)
            .count();
        assert!(far > 0);
    }

    #[test]
    fn sizes_match_their_components_and_coded_indices_decode() {
        let (rows, cols) = (24, 150);
        let w = test_matrix(rows, cols, 5);
        let opts = FitOptions {
            group_size: 32,
            row_clusters: 5,
            ..options(3)
        };
        let (q, _) = fit(&w, rows, cols, ErrorWeights::AbsPlusSigma, &opts).unwrap();
        let groups = 150usize.div_ceil(32);
        assert_eq!(q.scales.len(), rows * groups);
        assert_eq!(q.codebooks.len(), 5 * 8);
        let fixed = q.fixed_rate_size();
        let expected = (rows * cols * 3) + 32 + 16 * rows * groups + 16 * 5 * 8 + rows * 3;
        assert_eq!(fixed.total_bits(), expected as u64);
        assert!((fixed.bits_per_weight() - expected as f64 / (rows * cols) as f64).abs() < 1e-12);

        let coded = q.encode_indices();
        let mut bytes = 0;
        for cluster in &coded {
            let rows_of: Vec<usize> = (0..rows)
                .filter(|&r| q.row_cluster[r] == cluster.cluster)
                .collect();
            let expected: Vec<u16> = rows_of
                .iter()
                .flat_map(|&r| q.indices[r * cols..(r + 1) * cols].iter().copied())
                .collect();
            let mut decoded = vec![0u16; cluster.count];
            let words: Vec<u8> = cluster
                .encoded
                .words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let table = DecodeTable::new(&cluster.table);
            rans::decode(
                &cluster.encoded.states,
                &words,
                &mut [FieldOutput {
                    out: &mut decoded,
                    table: &table,
                }],
                cluster.count,
            )
            .unwrap();
            assert_eq!(decoded, expected);
            bytes += cluster.table.serialized_len() + 4 * LANES + words.len();
        }
        assert_eq!(coded.iter().map(|c| c.count).sum::<usize>(), rows * cols);
        let entropy = q.entropy_coded_size();
        assert_eq!(entropy.index_bits, 8 * bytes as u64);
        assert_eq!(
            entropy.total_bits() - entropy.index_bits,
            fixed.total_bits() - fixed.index_bits
        );

        // Dequantization is t * s * c.
        let deq = q.dequantize();
        let (r, j) = (7, 101);
        let k = q.row_cluster[r] as usize;
        let c = q.codebooks[k * 8 + q.indices[r * cols + j] as usize].to_f32();
        let s = q.scales[r * groups + j / 32].to_f32();
        assert_eq!(deq[r * cols + j], q.tensor_scale * s * c);
    }

    #[test]
    fn rate_term_lowers_the_coded_size() {
        let (rows, cols) = (32, 256);
        let w = test_matrix(rows, cols, 6);
        let base = FitOptions {
            init: CodebookInit::Uniform { step: 0.05 },
            ..options(6)
        };
        let plain = fit(&w, rows, cols, ErrorWeights::Uniform, &base).unwrap().0;
        let constrained = FitOptions {
            rate_lambda: 0.01,
            ..base
        };
        let with_rate = fit(&w, rows, cols, ErrorWeights::Uniform, &constrained)
            .unwrap()
            .0;
        let (a, b) = (plain.entropy_coded_size(), with_rate.entropy_coded_size());
        assert!(b.index_bits < a.index_bits, "{b:?} vs {a:?}");
        // And entropy coding beats fixed-rate indices for a fine grid.
        assert!(a.index_bits < plain.fixed_rate_size().index_bits);
    }

    #[test]
    fn rate_search_meets_its_target() {
        let (rows, cols) = (16, 256);
        let w = test_matrix(rows, cols, 8);
        let opts = FitOptions {
            rounds: 3,
            ..options(5)
        };
        let (q, size) = fit_entropy_coded(&w, rows, cols, ErrorWeights::Uniform, &opts, 3.5, 6)
            .unwrap()
            .unwrap();
        assert!(size.bits_per_weight() <= 3.5);
        assert!(
            size.bits_per_weight() > 3.0,
            "search stopped far below the target: {size:?}"
        );
        assert_eq!(q.entropy_coded_size(), size);
        assert!(
            fit_entropy_coded(&w, rows, cols, ErrorWeights::Uniform, &opts, 0.2, 2)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn beats_rtn_and_entropy_coding_beats_fixed_rate_at_equal_size() {
        let (rows, cols) = (96, 512);
        let w = test_matrix(rows, cols, 10);
        let opts = FitOptions {
            group_size: 128,
            row_clusters: 2,
            ..options(4)
        };
        let (q, _) = fit(&w, rows, cols, ErrorWeights::Uniform, &opts).unwrap();
        let fixed_sqnr = sqnr_db(&w, &q.dequantize());
        let fixed = q.fixed_rate_size();
        let rtn = rtn_clipped(&w, rows, cols, 4, 128).unwrap();
        assert!(fixed.bits_per_weight() <= rtn.bits_per_weight());
        let rtn_sqnr = sqnr_db(&w, &rtn.dequantized);
        assert!(
            fixed_sqnr > rtn_sqnr + 0.3,
            "JLCM {fixed_sqnr} dB, RTN {rtn_sqnr} dB"
        );
        let ec_opts = FitOptions {
            index_bits: 6,
            ..opts
        };
        let (ec, size) = fit_entropy_coded(
            &w,
            rows,
            cols,
            ErrorWeights::Uniform,
            &ec_opts,
            fixed.bits_per_weight(),
            8,
        )
        .unwrap()
        .unwrap();
        assert!(size.bits_per_weight() <= fixed.bits_per_weight());
        let ec_sqnr = sqnr_db(&w, &ec.dequantize());
        assert!(
            ec_sqnr > fixed_sqnr + 1.5,
            "entropy-coded {ec_sqnr} dB, fixed {fixed_sqnr} dB"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let w = test_matrix(4, 8, 9);
        let o = options(3);
        assert!(fit(&w, 4, 7, ErrorWeights::Uniform, &o).is_err());
        assert!(fit(&w, 4, 8, ErrorWeights::PerInput(&[1.0; 7]), &o).is_err());
        assert!(fit(&w, 4, 8, ErrorWeights::PerInput(&[-1.0; 8]), &o).is_err());
        assert!(fit(
            &w,
            4,
            8,
            ErrorWeights::Uniform,
            &FitOptions {
                index_bits: 11,
                ..o
            }
        )
        .is_err());
        assert!(fit(
            &w,
            4,
            8,
            ErrorWeights::Uniform,
            &FitOptions {
                row_clusters: 0,
                ..o
            }
        )
        .is_err());
        let mut bad = w.clone();
        bad[3] = f32::INFINITY;
        assert!(fit(&bad, 4, 8, ErrorWeights::Uniform, &o).is_err());
        // More clusters than rows and a group wider than the row are clamped, not errors.
        let (q, _) = fit(
            &w,
            4,
            8,
            ErrorWeights::Uniform,
            &FitOptions {
                row_clusters: 9,
                ..o
            },
        )
        .unwrap();
        assert_eq!(q.clusters(), 4);
    }
}
