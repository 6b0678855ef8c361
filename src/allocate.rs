//! Lossy settings per tensor for a size target (`convert --target-bits R`). One dry conversion per
//! candidate setting measures every free tensor's exact encoded size and its relative squared error
//! (error energy / signal energy); then a multiple-choice knapsack picks one setting per tensor with the
//! least summed error that fits the target, and what its rounding leaves over goes to the upgrades with the
//! best error drop per byte. The candidates are the mantissa widths K (at the given normalization), or, when
//! K is given too (`--mantissa-bits K --target-bits R`), the normalization group sizes at that K. The
//! objective, the sum of the free tensors' relative errors, treats every weight matrix as an equal source of
//! relative noise at the model's output: the classic bit-allocation model, with no calibration data. Its
//! effect is that large tables (an embedding matrix) get fewer bits than the small matrices every token
//! passes through.
//!
//! Free tensors are those the lossy rank default would make lossy: rank 2 or more, BF16/F16/F32, and no
//! `--tensor-bits` rule naming them. Rules and 1-D tensors keep their settings.

use rayon::prelude::*;

use crate::codec::lossy::FloatFormat;
use crate::convert::{encode_blocks, plan_all, Bounds, ConvertOptions, Placement, TensorPlan};
use crate::error::{NzError, Result};
use crate::format::header::{data_offset, TensorEntry};
use crate::precision::Precision;
use crate::source::SafetensorsFile;

/// Narrowest mantissa kept when the target is larger: candidates stop at this K (and lossless), because
/// beyond it a bit per weight buys error no checkpoint user can see.
pub const MAX_CANDIDATE_BITS: u32 = 10;

/// Size steps of the allocation search: its sizes are rounded up to 1/20000 of the room the free tensors
/// share.
const KNAPSACK_UNITS: u64 = 20_000;

/// Normalization group sizes tried at a fixed K, cheapest first (0: none). Groups of 16 cost half a bit per
/// weight in scale bytes; past that the scales cost more than a mantissa bit gains.
pub const CANDIDATE_NORM_BLOCKS: [u32; 9] = [0, 1024, 512, 256, 128, 64, 48, 32, 16];

/// One candidate setting of the free tensors: a mantissa width (None for lossless) and a group size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub mantissa_bits: Option<u32>,
    pub norm_block: u32,
}

impl std::fmt::Display for Setting {
    /// "K = 3, groups of 64", "K = 0, no normalization", "lossless".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.mantissa_bits, self.norm_block) {
            (None, _) => write!(f, "lossless"),
            (Some(k), 0) => write!(f, "K = {k}, no normalization"),
            (Some(k), b) => write!(f, "K = {k}, groups of {b}"),
        }
    }
}

/// The precision chosen for one free tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorChoice {
    pub name: String,
    pub elements: u64,
    /// Mantissa bits kept; None for lossless.
    pub mantissa_bits: Option<u32>,
    /// Elements per scale byte (0: no normalization).
    pub norm_block: u32,
    /// Block payload bytes at this precision.
    pub payload_bytes: u64,
    /// Error energy over signal energy at this precision (0 for lossless).
    pub relative_error: f64,
}

/// The result of an allocation: the choice for every free tensor, in file order.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Allocation {
    pub target_bits_per_weight: f64,
    /// The K every free tensor kept when the group sizes were chosen (`--mantissa-bits` given); None when K
    /// was chosen.
    pub fixed_mantissa_bits: Option<u32>,
    pub choices: Vec<TensorChoice>,
    /// The exact size a conversion with these choices writes.
    pub predicted_bytes: u64,
    pub predicted_bits_per_weight: f64,
}

impl Allocation {
    /// The choices as exact-name settings for `LossySettings::assigned`.
    pub fn assignments(&self) -> impl Iterator<Item = (String, Precision)> + '_ {
        self.choices.iter().map(|c| {
            (
                c.name.clone(),
                c.mantissa_bits
                    .map_or(Precision::Lossless, Precision::MantissaBits),
            )
        })
    }

    /// The chosen group sizes as exact-name settings for `LossySettings::assigned_norm_blocks`.
    pub fn norm_block_assignments(&self) -> impl Iterator<Item = (String, u32)> + '_ {
        self.choices.iter().map(|c| (c.name.clone(), c.norm_block))
    }
}

/// The settings tried, narrowest first: with a K given (`opts.lossy.default_bits`), that K at each of
/// `CANDIDATE_NORM_BLOCKS`; otherwise `candidate_bits` at the given group size.
pub fn candidate_settings(source: &SafetensorsFile, opts: &ConvertOptions) -> Vec<Setting> {
    match opts.lossy.default_bits {
        Some(k) => CANDIDATE_NORM_BLOCKS
            .iter()
            .map(|&norm_block| Setting {
                mantissa_bits: Some(k),
                norm_block,
            })
            .collect(),
        None => candidate_bits(source, opts)
            .into_iter()
            .map(|mantissa_bits| Setting {
                mantissa_bits,
                norm_block: opts.lossy.norm_block,
            })
            .collect(),
    }
}

/// The K values tried: 0 up to one below the widest free dtype's mantissa (at most `MAX_CANDIDATE_BITS`),
/// then None for lossless.
pub fn candidate_bits(source: &SafetensorsFile, opts: &ConvertOptions) -> Vec<Option<u32>> {
    let widest = source
        .tensors
        .iter()
        .filter(|t| is_free(t, opts))
        .filter_map(|t| FloatFormat::of(t.dtype))
        .map(|f| f.man_bits)
        .max()
        .unwrap_or(0);
    (0..widest.min(MAX_CANDIDATE_BITS + 1))
        .map(Some)
        .chain([None])
        .collect()
}

fn is_free(t: &crate::source::SourceTensor, opts: &ConvertOptions) -> bool {
    t.shape.len() >= 2
        && t.elements() > 0
        && FloatFormat::of(t.dtype).is_some()
        && opts.lossy.rules.lookup(&t.name).is_none()
}

/// One dry conversion: every tensor's entry and block sizes, and each tensor's relative error.
struct Candidate {
    entries: Vec<TensorEntry>,
    block_lens: Vec<Vec<u64>>,
    relative_error: Vec<f64>,
}

impl Candidate {
    fn measure(
        source: &SafetensorsFile,
        opts: &ConvertOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Candidate> {
        let plans = plan_all(source, opts, progress);
        let mut block_lens: Vec<Vec<u64>> = plans
            .iter()
            .map(|p| Vec::with_capacity(p.entry.blocks.len()))
            .collect();
        encode_blocks(
            source,
            &plans,
            opts,
            Bounds::Skip,
            progress,
            |ti, _, block| {
                block_lens[ti].push(block.payload.len() as u64);
                Ok(())
            },
        )?;
        let relative_error = source
            .tensors
            .par_iter()
            .zip(&plans)
            .map(|(t, plan)| relative_error(source, t, plan))
            .collect();
        Ok(Candidate {
            entries: plans.into_iter().map(|p| p.entry).collect(),
            block_lens,
            relative_error,
        })
    }
}

/// Error energy over signal energy of a lossy tensor's round trip, weighted by its input channels'
/// importance when it has one (`--importance`); 0 for tensors stored exactly.
fn relative_error(
    source: &SafetensorsFile,
    t: &crate::source::SourceTensor,
    plan: &TensorPlan,
) -> f64 {
    if let Some(weighted) = crate::analyze::planned_weighted_relative_error(source, t, plan) {
        return weighted;
    }
    match crate::analyze::planned_error(source, t, plan) {
        Some(stats) if stats.signal_energy > 0.0 => stats.error_energy / stats.signal_energy,
        _ => 0.0,
    }
}

/// Chooses a setting (K, or the group size at a given K) per free tensor so that the converted file is at
/// most `target_bits_per_weight` bits per weight (file bytes × 8 over all elements) with the least summed
/// relative error (exact up to the knapsack's size rounding, which the final greedy steps make up for).
/// `progress` receives the input bytes of each dry conversion (one per `candidate_settings`).
pub fn allocate(
    source: &SafetensorsFile,
    opts: &ConvertOptions,
    target_bits_per_weight: f64,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Allocation> {
    if !(target_bits_per_weight.is_finite() && target_bits_per_weight > 0.0) {
        return Err(NzError::InvalidSetting {
            what: format!("target of {target_bits_per_weight} bits per weight"),
        });
    }
    let elements = source.elements();
    let budget = (target_bits_per_weight * elements as f64 / 8.0).floor() as u64;
    let free: Vec<usize> = (0..source.tensors.len())
        .filter(|&i| is_free(&source.tensors[i], opts))
        .collect();
    let settings = candidate_settings(source, opts);
    let mut candidates = Vec::with_capacity(settings.len());
    for setting in &settings {
        let mut candidate_opts = opts.clone();
        candidate_opts.lossy.default_bits = setting.mantissa_bits;
        candidate_opts.lossy.norm_block = setting.norm_block;
        candidate_opts.lossy.assigned.clear();
        candidate_opts.lossy.assigned_norm_blocks.clear();
        candidates.push(Candidate::measure(source, &candidate_opts, progress)?);
    }
    let payload = |c: usize, ti: usize| candidates[c].block_lens[ti].iter().sum::<u64>();
    let exact_bytes = |choice: &[usize]| -> u64 {
        let entries: Vec<TensorEntry> = choice
            .iter()
            .enumerate()
            .map(|(ti, &c)| candidates[c].entries[ti].clone())
            .collect();
        let mut placement = Placement::default();
        for (ti, &c) in choice.iter().enumerate() {
            for &len in &candidates[c].block_lens[ti] {
                placement.place(ti, len);
            }
        }
        data_offset(source.header_json(), &entries) + placement.end
    };

    // The narrowest candidate everywhere must fit; tensors that are not free are the same in every run.
    let smallest = exact_bytes(&vec![0usize; source.tensors.len()]);
    if smallest > budget {
        return Err(NzError::InvalidSetting {
            what: format!(
                "a target of {target_bits_per_weight} bits per weight: the smallest this file reaches, with \
                 every free tensor at {}, is {:.3}",
                settings[0],
                8.0 * smallest as f64 / elements.max(1) as f64
            ),
        });
    }
    // A multiple-choice knapsack over the free tensors' payloads, solved exactly by dynamic programming on
    // sizes rounded up to `KNAPSACK_UNITS` steps of the room they share. (Lagrangian prices alone miss the
    // best choice when one tensor, such as an embedding table, is a large share of the model.) The header and
    // padding, which change a little with the choices, are checked exactly; if they overshoot, the room
    // shrinks by that much and the search runs again.
    let fixed_bytes = smallest - free.iter().map(|&ti| payload(0, ti)).sum::<u64>();
    let mut room = budget.saturating_sub(fixed_bytes);
    let mut choice = vec![0usize; source.tensors.len()];
    loop {
        let unit = room.div_ceil(KNAPSACK_UNITS).max(1);
        let options: Vec<Vec<(usize, f64)>> = free
            .iter()
            .map(|&ti| {
                (0..candidates.len())
                    .map(|c| {
                        (
                            payload(c, ti).div_ceil(unit) as usize,
                            candidates[c].relative_error[ti],
                        )
                    })
                    .collect()
            })
            .collect();
        // With sizes rounded up, even the narrowest choices may not fit the room: keep them (they fit
        // exactly, as checked above) and let the steps below use what is left.
        let Some(picks) = knapsack(&options, (room / unit) as usize) else {
            choice.fill(0);
            break;
        };
        for (&ti, &c) in free.iter().zip(&picks) {
            choice[ti] = c;
        }
        let total = exact_bytes(&choice);
        if total <= budget {
            break;
        }
        room = room.saturating_sub(total - budget);
    }
    // What the rounding leaves unused goes, one step at a time, to the upgrade with the best error drop
    // per added byte that still fits.
    let mut blocked = vec![false; source.tensors.len()];
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for &ti in free.iter().filter(|&&ti| !blocked[ti]) {
            let now = choice[ti];
            for next in now + 1..candidates.len() {
                let gain = candidates[now].relative_error[ti] - candidates[next].relative_error[ti];
                let cost = payload(next, ti) as f64 - payload(now, ti) as f64;
                let score = gain / cost.max(1.0);
                if gain > 0.0 && best.is_none_or(|(s, _, _)| score > s) {
                    best = Some((score, ti, next));
                }
            }
        }
        let Some((_, ti, next)) = best else { break };
        let previous = choice[ti];
        choice[ti] = next;
        if exact_bytes(&choice) > budget {
            choice[ti] = previous;
            blocked[ti] = true;
        }
    }
    let predicted_bytes = exact_bytes(&choice);
    let choices = free
        .iter()
        .map(|&ti| {
            let c = choice[ti];
            let t = &source.tensors[ti];
            let man_bits = FloatFormat::of(t.dtype).map_or(0, |f| f.man_bits);
            TensorChoice {
                name: t.name.clone(),
                elements: t.elements(),
                // K at or past the dtype's mantissa is that dtype's lossless run.
                mantissa_bits: settings[c].mantissa_bits.filter(|&k| k < man_bits),
                norm_block: settings[c].norm_block,
                payload_bytes: payload(c, ti),
                relative_error: candidates[c].relative_error[ti],
            }
        })
        .collect();
    Ok(Allocation {
        target_bits_per_weight,
        fixed_mantissa_bits: opts.lossy.default_bits,
        choices,
        predicted_bytes,
        predicted_bits_per_weight: 8.0 * predicted_bytes as f64 / elements.max(1) as f64,
    })
}

/// Picks one option per item, each `(size, error)`, minimizing the summed error with the summed size at most
/// `capacity`; ties go to the earlier option. None when no choice fits.
fn knapsack(items: &[Vec<(usize, f64)>], capacity: usize) -> Option<Vec<usize>> {
    // best[s]: least error of the items so far within size s; pick[i][s]: the option item i took there.
    let mut best = vec![0.0f64; capacity + 1];
    let mut pick: Vec<Vec<u8>> = Vec::with_capacity(items.len());
    for options in items {
        let mut next = vec![f64::INFINITY; capacity + 1];
        let mut chosen = vec![0u8; capacity + 1];
        for s in 0..=capacity {
            for (o, &(size, error)) in options.iter().enumerate() {
                if size <= s && best[s - size] + error < next[s] {
                    next[s] = best[s - size] + error;
                    chosen[s] = o as u8;
                }
            }
        }
        best = next;
        pick.push(chosen);
    }
    if !best[capacity].is_finite() {
        return None;
    }
    let mut s = capacity;
    let mut picks = vec![0usize; items.len()];
    for (i, options) in items.iter().enumerate().rev() {
        let o = pick[i][s] as usize;
        picks[i] = o;
        s -= options[o].0;
    }
    Some(picks)
}

#[cfg(test)]
mod tests {
    use super::knapsack;

    /// Every combination, for small cases.
    fn brute_force(items: &[Vec<(usize, f64)>], capacity: usize) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut index = vec![0usize; items.len()];
        loop {
            let size: usize = items.iter().zip(&index).map(|(o, &i)| o[i].0).sum();
            let error: f64 = items.iter().zip(&index).map(|(o, &i)| o[i].1).sum();
            if size <= capacity && best.is_none_or(|b| error < b) {
                best = Some(error);
            }
            let mut i = 0;
            loop {
                if i == items.len() {
                    return best;
                }
                index[i] += 1;
                if index[i] < items[i].len() {
                    break;
                }
                index[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn knapsack_finds_the_least_error_that_fits() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        for _ in 0..300 {
            let items: Vec<Vec<(usize, f64)>> = (0..1 + next(4))
                .map(|_| {
                    (0..1 + next(4))
                        .map(|_| (next(12) as usize, next(1000) as f64 / 7.0))
                        .collect()
                })
                .collect();
            let capacity = next(30) as usize;
            let expected = brute_force(&items, capacity);
            match knapsack(&items, capacity) {
                None => assert_eq!(expected, None, "{items:?} in {capacity}"),
                Some(picks) => {
                    let size: usize = items.iter().zip(&picks).map(|(o, &i)| o[i].0).sum();
                    let error: f64 = items.iter().zip(&picks).map(|(o, &i)| o[i].1).sum();
                    assert!(size <= capacity, "{items:?} in {capacity}: {picks:?}");
                    assert_eq!(Some(error), expected, "{items:?} in {capacity}");
                }
            }
        }
    }
}
