//! Reference quantizers, used only to compare the codebook mode against: round-to-nearest INT-B with groups of
//! 128 along the input dimension (asymmetric, MSE-optimal clipping by grid search) and NF4 with blocks of 64.
//! Each returns the dequantized tensor and its exact size, metadata included, so bits per weight compare fairly.
//!
//! Storage counted: RTN stores per group an f16 scale and a B-bit integer zero point; NF4 stores per block an
//! f16 absmax. Payload is B (or 4) bits per weight.

use half::f16;
use rayon::prelude::*;

use crate::error::{NzError, Result};

/// Group size of the RTN baseline along the input dimension.
pub const RTN_GROUP: usize = 128;
/// Block size of the NF4 baseline (contiguous in row-major order).
pub const NF4_BLOCK: usize = 64;
/// Clipping ratios tried by the RTN search: 1.00, 0.99, ..., 0.50 of the group's range.
const CLIP_STEPS: u32 = 50;

/// A dequantized tensor and what its quantized form costs.
#[derive(Clone, Debug)]
pub struct BaselineResult {
    pub dequantized: Vec<f32>,
    /// Bits of the per-weight codes.
    pub payload_bits: u64,
    /// Bits of scales, zero points and other side data.
    pub metadata_bits: u64,
}

impl BaselineResult {
    pub fn bits_per_weight(&self) -> f64 {
        (self.payload_bits + self.metadata_bits) as f64 / self.dequantized.len().max(1) as f64
    }
}

fn invalid(what: impl Into<String>) -> NzError {
    NzError::InvalidQuantInput { what: what.into() }
}

fn check_matrix(weights: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows.checked_mul(cols) != Some(weights.len()) || cols == 0 {
        return Err(invalid(format!(
            "{} values do not form a {rows} x {cols} matrix",
            weights.len()
        )));
    }
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(invalid(format!("weight {i} is not finite")));
    }
    Ok(())
}

/// Rounds to the nearest f16, saturating at the largest finite value.
fn to_f16(x: f64) -> f32 {
    f16::from_f64(x.clamp(-65504.0, 65504.0)).to_f32()
}

/// Asymmetric uniform quantization of one group onto `0..=qmax` with the range `[lo, hi]`; writes the
/// reconstruction and returns its squared error. The step is stored as f16, the zero point as an integer.
fn rtn_group(group: &[f32], lo: f32, hi: f32, qmax: u32, out: &mut [f32]) -> f64 {
    let step = to_f16((hi as f64 - lo as f64) / qmax as f64);
    let mut error = 0.0;
    if step == 0.0 {
        // A constant group whose range rounds to a zero step: every code dequantizes to 0.
        for (o, &w) in out.iter_mut().zip(group) {
            *o = 0.0;
            error += (w as f64).powi(2);
        }
        return error;
    }
    let zero = (-lo / step).round().clamp(0.0, qmax as f32);
    for (o, &w) in out.iter_mut().zip(group) {
        let code = ((w / step).round() + zero).clamp(0.0, qmax as f32);
        *o = (code - zero) * step;
        error += (w as f64 - *o as f64).powi(2);
    }
    error
}

/// Round-to-nearest INT-`bits` (1..=8), asymmetric, groups of `group_size` along each row, with the clipping
/// ratio of each group chosen from a grid to minimize its squared error.
pub fn rtn_clipped(
    weights: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
) -> Result<BaselineResult> {
    check_matrix(weights, rows, cols)?;
    if !(1..=8).contains(&bits) || group_size == 0 {
        return Err(invalid(format!(
            "RTN needs 1..=8 bits and a positive group size, got {bits} bits, group {group_size}"
        )));
    }
    let qmax = (1u32 << bits) - 1;
    let mut dequantized = vec![0.0f32; weights.len()];
    dequantized
        .par_chunks_mut(cols)
        .zip(weights.par_chunks(cols))
        .for_each(|(out_row, row)| {
            let mut trial = vec![0.0f32; group_size];
            for (out, group) in out_row.chunks_mut(group_size).zip(row.chunks(group_size)) {
                let min = group.iter().copied().fold(f32::INFINITY, f32::min);
                let max = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut best = f64::INFINITY;
                for step in 0..=CLIP_STEPS {
                    let ratio = 1.0 - step as f32 / (2 * CLIP_STEPS) as f32;
                    // Shrink each end of the range toward zero; an end on the far side of zero stays.
                    let lo = if min < 0.0 { min * ratio } else { min };
                    let hi = if max > 0.0 { max * ratio } else { max };
                    let trial = &mut trial[..group.len()];
                    let error = rtn_group(group, lo, hi, qmax, trial);
                    if error < best {
                        best = error;
                        out.copy_from_slice(trial);
                    }
                }
            }
        });
    let groups = rows as u64 * cols.div_ceil(group_size) as u64;
    Ok(BaselineResult {
        dequantized,
        payload_bits: weights.len() as u64 * bits as u64,
        metadata_bits: groups * (16 + bits as u64),
    })
}

/// Standard normal CDF from the Taylor series of erf, accurate to about 1e-13 for |x| <= 4.
fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let mut term = z;
    let mut sum = z;
    for n in 1..200 {
        term *= -z * z / n as f64;
        let next = term / (2 * n + 1) as f64;
        sum += next;
        if next.abs() < 1e-18 {
            break;
        }
    }
    0.5 + sum / std::f64::consts::PI.sqrt()
}

/// Inverse standard normal CDF for `p` in (0.5, 0.99], by bisection on [0, 4].
fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 4.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The 16 NF4 levels of QLoRA (Dettmers et al. 2023), in ascending order: the normal quantiles at 8 evenly
/// spaced probabilities from `offset` down to 1/2 (exclusive) on the positive side, 7 on the negative side, and
/// an exact zero, all divided by the largest. `offset` = mean of 1 - 1/(2*15) and 1 - 1/(2*16), so that the
/// extreme levels are the quantiles of the outermost bin centres of a 15- and a 16-bin split.
pub fn nf4_levels() -> [f32; 16] {
    let offset = 0.5 * ((1.0 - 1.0 / 30.0) + (1.0 - 1.0 / 32.0));
    let mut levels = Vec::with_capacity(16);
    for i in 0..8 {
        levels.push(normal_quantile(offset - i as f64 * (offset - 0.5) / 8.0));
    }
    for i in 0..7 {
        levels.push(-normal_quantile(offset - i as f64 * (offset - 0.5) / 7.0));
    }
    levels.push(0.0);
    levels.sort_by(f64::total_cmp);
    let top = levels[15];
    let mut out = [0.0f32; 16];
    for (o, l) in out.iter_mut().zip(&levels) {
        *o = (l / top) as f32;
    }
    out
}

/// NF4: blocks of `block` consecutive weights (row-major), each scaled by its f16 absmax and rounded to the
/// nearest NF4 level.
pub fn nf4(weights: &[f32], rows: usize, cols: usize, block: usize) -> Result<BaselineResult> {
    check_matrix(weights, rows, cols)?;
    if block == 0 {
        return Err(invalid("NF4 block size must be positive"));
    }
    let levels = nf4_levels();
    let mut dequantized = vec![0.0f32; weights.len()];
    dequantized
        .par_chunks_mut(block)
        .zip(weights.par_chunks(block))
        .for_each(|(out, group)| {
            let absmax = group.iter().fold(0.0f32, |m, w| m.max(w.abs()));
            let scale = to_f16(absmax as f64);
            for (o, &w) in out.iter_mut().zip(group) {
                let u = if scale > 0.0 { w / scale } else { 0.0 };
                let nearest = levels
                    .iter()
                    .copied()
                    .min_by(|a, b| (a - u).abs().total_cmp(&(b - u).abs()))
                    .expect("16 levels");
                *o = nearest * scale;
            }
        });
    let blocks = weights.len().div_ceil(block) as u64;
    Ok(BaselineResult {
        dequantized,
        payload_bits: weights.len() as u64 * 4,
        metadata_bits: blocks * 16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::quant_metrics::sqnr_db;

    /// Seeded Gaussian-like matrix (sum of 4 uniforms) with per-row spread.
    fn test_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..rows * cols)
            .map(|i| {
                let row_scale = 0.02 * (1.0 + (i / cols % 5) as f64);
                let g: f64 = (0..4).map(|_| next() - 0.5).sum();
                (g * row_scale) as f32
            })
            .collect()
    }

    #[test]
    fn nf4_levels_are_ordered_normalized_and_match_qlora() {
        let levels = nf4_levels();
        assert!(levels.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(levels[0], -1.0);
        assert_eq!(levels[15], 1.0);
        assert!(levels.contains(&0.0));
        // 7 negative and 8 positive levels.
        assert_eq!(levels.iter().filter(|&&l| l < 0.0).count(), 7);
        // Two entries of the table published with QLoRA (bitsandbytes, computed in f32).
        assert!((levels[1] - -0.696_192_8).abs() < 5e-7);
        assert!((levels[14] - 0.722_956_84).abs() < 5e-7);
        // The normal quantiles behind them are right: Phi(1.959964) = 0.975.
        assert!((normal_quantile(0.975) - 1.959_963_985).abs() < 1e-8);
    }

    #[test]
    fn rtn_error_shrinks_with_bits_and_clipping_helps() {
        let (rows, cols) = (16, 256);
        let w = test_matrix(rows, cols, 7);
        let mut last = f64::NEG_INFINITY;
        for bits in 2..=8 {
            let r = rtn_clipped(&w, rows, cols, bits, RTN_GROUP).unwrap();
            let s = sqnr_db(&w, &r.dequantized);
            assert!(s > last + 3.0, "{bits} bits: {s} dB after {last} dB");
            last = s;
            let expected_bits = bits as f64 + (16.0 + bits as f64) / RTN_GROUP as f64;
            assert!((r.bits_per_weight() - expected_bits).abs() < 1e-12);
        }
        // The search includes the unclipped range, so it can only beat plain min/max rounding.
        let clipped = rtn_clipped(&w, rows, cols, 3, RTN_GROUP).unwrap();
        let mut plain = vec![0.0f32; w.len()];
        for (out, g) in plain.chunks_mut(RTN_GROUP).zip(w.chunks(RTN_GROUP)) {
            let lo = g.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            rtn_group(g, lo, hi, 7, out);
        }
        assert!(sqnr_db(&w, &clipped.dequantized) > sqnr_db(&w, &plain) + 0.1);
    }

    #[test]
    fn nf4_reconstructs_block_maxima_and_counts_metadata() {
        let (rows, cols) = (8, 192);
        let w = test_matrix(rows, cols, 3);
        let r = nf4(&w, rows, cols, NF4_BLOCK).unwrap();
        assert!((r.bits_per_weight() - (4.0 + 16.0 / 64.0)).abs() < 1e-12);
        for (block, out) in w.chunks(NF4_BLOCK).zip(r.dequantized.chunks(NF4_BLOCK)) {
            let i = (0..block.len())
                .max_by(|&a, &b| block[a].abs().total_cmp(&block[b].abs()))
                .unwrap();
            // The absmax element maps to +-1 up to the f16 rounding of the scale.
            assert!((out[i] - block[i]).abs() <= block[i].abs() * 1e-3);
        }
        let s = sqnr_db(&w, &r.dequantized);
        assert!(s > 15.0 && s < 25.0, "NF4 SQNR {s}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(rtn_clipped(&[1.0; 6], 2, 4, 4, 128).is_err());
        assert!(rtn_clipped(&[1.0; 8], 2, 4, 9, 128).is_err());
        assert!(nf4(&[f32::NAN; 8], 2, 4, 64).is_err());
    }
}
