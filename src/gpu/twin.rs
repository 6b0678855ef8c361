//! The CPU twin of `kernels/split_decode.cu` (both entry points: `nzt_decode_blocks` for lossless tensors,
//! `nzt_decode_lossy_blocks` for lossy ones): the same algorithm, step for step, with the GPU's structure
//! simulated: CTAs of `warps` warps sharing the tensor's expanded tables in a byte array standing for shared
//! memory, one warp per block, 32 lanes per warp, and the shared word stream split between lanes by a ballot
//! and a prefix population count. It reads the same descriptor arrays and the same payload bytes as the
//! kernel, so a test that matches it bit for bit against the reference decoder (`NztFile`) checks the kernel's
//! algorithm and the host's layout on machines without a GPU. The lossy expansion (`lossy_expand`) repeats the
//! kernel's f64 steps rather than calling the reference's `Quantizer`, so the tests compare two implementations. (The kernel's fast paths for common field counts
//! are its general loop with the counts fixed at compile time; the twin has the general loop only.)

use super::layout::{
    status_error, table_smem_bytes, TensorLayout, DESC_WORDS, NO_LAYOUT, STATUS_FINAL_STATE,
    STATUS_OK, STATUS_STATE_BELOW_L, STATUS_STREAM_ENDS_EARLY, STATUS_WORDS_LEFT_OVER,
    STATUS_WRONG_KERNEL, TENSOR_TABLE,
};
use crate::codec::rans::{LANES, STATE_LOWER};
use crate::error::{NzError, Result};
use crate::format::reader::decode_zstd_block;
use crate::format::BlockMode;

const WARP: u32 = LANES as u32;
const MODE_RAW: u32 = BlockMode::Raw as u32;
const MODE_SPLIT: u32 = BlockMode::Split as u32;
const MODE_SPLIT_LOCAL: u32 = BlockMode::SplitLocal as u32;
const MODE_LOSSY: u32 = BlockMode::Lossy as u32;
const CODING_RANS: u32 = 1;
const RANS_HEADER_BYTES: u32 = 132;

fn align4(x: u32) -> u32 {
    (x + 3) & !3
}

/// Little-endian loads and stores that never panic: reads outside the slice give 0 and writes are dropped. The
/// host's checks (`TensorLayout::build`) keep every access in range; these only make a bug there harmless.
fn load_u16(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    bytes
        .get(at..at + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as u32)
}

fn load_u32(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    bytes
        .get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn store(bytes: &mut [u8], at: u64, value: &[u8]) {
    let at = at as usize;
    if let Some(dst) = bytes.get_mut(at..at + value.len()) {
        dst.copy_from_slice(value);
    }
}

fn word(words: &[u32], at: u32) -> u32 {
    words.get(at as usize).copied().unwrap_or(0)
}

/// `expand_table` of the kernel, run by all `nthreads` simulated threads in turn (their writes are disjoint).
fn expand_table(tables: &[u32], table: u32, smem: &mut [u8], base: u32, nthreads: u32) {
    let prob_bits = word(tables, table);
    let listed = word(tables, table + 2);
    let entry = |k: u32, half: u32| word(tables, table + 3 + 2 * k + half);
    let sym_info = base + align4(2 << prob_bits);
    for tid in 0..nthreads {
        let mut k = tid;
        while k < listed {
            store(
                smem,
                (sym_info + 4 * entry(k, 0)) as u64,
                &entry(k, 1).to_le_bytes(),
            );
            k += nthreads;
        }
        let mut slot = tid;
        while slot < 1 << prob_bits {
            let (mut lo, mut hi) = (0, listed.saturating_sub(1));
            while lo < hi {
                let mid = (lo + hi + 1) >> 1;
                if entry(mid, 1) & 0xffff <= slot {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            store(
                smem,
                (base + 2 * slot) as u64,
                &(entry(lo, 0) as u16).to_le_bytes(),
            );
            slot += nthreads;
        }
    }
}

/// Runs the kernel over every block of `layout`, `warps` warps per CTA, reading `payload` (the tensor's payload
/// range) and writing `out` (the tensor's bytes): the lossy entry point for a lossy tensor, as the loader
/// launches it. Returns each block's status, as the kernel writes them.
pub fn run_kernel(layout: &TensorLayout, payload: &[u8], out: &mut [u8], warps: u32) -> Vec<u32> {
    let blocks = layout.block_count() as u32;
    let mut status = vec![STATUS_OK; blocks as usize];
    let mut smem = vec![0u8; layout.smem_bytes(warps) as usize];
    for cta in 0..blocks.div_ceil(warps) {
        smem.fill(0xA5); // shared memory starts undefined
        if layout.tensor_layout != NO_LAYOUT {
            let l = layout.tensor_layout;
            let mut offset = 0;
            for f in 0..word(&layout.layouts, l) {
                if (word(&layout.layouts, l + 2 + 2 * f) >> 8) & 0xff != CODING_RANS {
                    continue;
                }
                let table = word(&layout.layouts, l + 3 + 2 * f);
                expand_table(&layout.tables, table, &mut smem, offset, warps * WARP);
                offset +=
                    table_smem_bytes(word(&layout.tables, table), word(&layout.tables, table + 1));
            }
        }
        // __syncthreads()
        for warp in 0..warps {
            let k = cta * warps + warp;
            if k < blocks {
                status[k as usize] =
                    run_warp(layout, layout.lossy, payload, out, &mut smem, warp, k);
            }
        }
    }
    status
}

/// One warp decoding block `k`: the kernel's steps 2 to 5, in the lossy entry point if `lossy_kernel`.
fn run_warp(
    layout: &TensorLayout,
    lossy_kernel: bool,
    payload: &[u8],
    out: &mut [u8],
    smem: &mut [u8],
    warp: u32,
    k: u32,
) -> u32 {
    let desc = |w: u32| word(&layout.descs, k * DESC_WORDS as u32 + w);
    let (mode, n) = (desc(0), desc(1));
    let body = desc(2) as u64 | (desc(3) as u64) << 32;
    let dst = desc(6) as u64 | (desc(7) as u64) << 32;
    let elem_bytes = layout.unit_bytes as u64;

    if mode == MODE_RAW {
        for lane in 0..WARP {
            let mut b = lane;
            while b < n {
                let byte = payload
                    .get((body + b as u64) as usize)
                    .copied()
                    .unwrap_or(0);
                store(out, dst + b as u64, &[byte]);
                b += WARP;
            }
        }
        return STATUS_OK;
    }
    if mode != MODE_SPLIT && mode != MODE_SPLIT_LOCAL && mode != MODE_LOSSY {
        return STATUS_OK; // zstd: the host's
    }
    if (mode == MODE_LOSSY) != lossy_kernel {
        return STATUS_WRONG_KERNEL;
    }

    // 2. Fields and their expanded tables.
    let layouts = &layout.layouts;
    let l = desc(5);
    let (field_count, rans_count) = (word(layouts, l), word(layouts, l + 1));
    let local = layout.tensor_smem_bytes + warp * layout.local_smem_bytes;
    let mut rans: Vec<(u32, u32, u32)> = Vec::new(); // (smem base, prob_bits, shift)
    let mut raw: Vec<(u32, u32)> = Vec::new(); // (width, shift)
    let mut local_offset = 0;
    for f in 0..field_count {
        let field = word(layouts, l + 2 + 2 * f);
        let (width, shift) = (field & 0xff, field >> 16);
        if (field >> 8) & 0xff != CODING_RANS {
            raw.push((width, shift));
            continue;
        }
        let reference = word(layouts, l + 3 + 2 * f);
        if l == layout.tensor_layout || reference & TENSOR_TABLE != 0 {
            // The tensor's table number t, expanded by the CTA: its own t-th (a `split` block) or a borrowed one.
            let t = if l == layout.tensor_layout {
                rans.len() as u32
            } else {
                reference & !TENSOR_TABLE
            };
            let tl = layout.tensor_layout;
            let (mut seen, mut offset) = (0, 0);
            for g in 0..word(layouts, tl) {
                if (word(layouts, tl + 2 + 2 * g) >> 8) & 0xff != CODING_RANS {
                    continue;
                }
                let table = word(layouts, tl + 3 + 2 * g);
                if seen == t {
                    rans.push((offset, word(&layout.tables, table), shift));
                    break;
                }
                offset +=
                    table_smem_bytes(word(&layout.tables, table), word(&layout.tables, table + 1));
                seen += 1;
            }
        } else {
            let base = local + local_offset;
            expand_table(&layout.tables, reference, smem, base, WARP);
            rans.push((base, word(&layout.tables, reference), shift));
            local_offset += table_smem_bytes(
                word(&layout.tables, reference),
                word(&layout.tables, reference + 1),
            );
        }
    }
    // __syncwarp()
    let lossy = lossy_kernel.then(|| {
        let format = word(layouts, l + 2 + 2 * field_count);
        let norm_block = word(layouts, l + 3 + 2 * field_count);
        let groups = if norm_block == 0 {
            0
        } else {
            n.div_ceil(norm_block)
        };
        LossyFormat {
            exp_bits: format & 0xff,
            man_bits: (format >> 8) & 0xff,
            kept: (format >> 16) & 0xff,
            stored: format >> 24,
            norm_block,
            scales: body.wrapping_sub(align4(groups) as u64),
        }
    });

    // 3. States, word count, planes.
    let mut x = [0u32; LANES];
    let (mut word_count, mut pos, mut planes) = (0u32, 0u32, 0u32);
    let words = body + RANS_HEADER_BYTES as u64;
    if rans_count > 0 {
        for (lane, state) in x.iter_mut().enumerate() {
            *state = load_u32(payload, body + 4 * lane as u64);
        }
        word_count = load_u32(payload, body + 128);
        planes = align4(RANS_HEADER_BYTES + 2 * word_count);
        if ballot(|lane| x[lane] < STATE_LOWER) != 0 {
            return STATUS_STATE_BELOW_L;
        }
    }
    let mut plane_start = Vec::with_capacity(raw.len());
    for &(width, _) in &raw {
        plane_start.push(planes);
        planes = align4(planes + ((n as u64 * width as u64).div_ceil(8)) as u32);
    }

    // 4. Steps of 32 elements.
    let mut value = [0u64; LANES];
    for t in 0..n.div_ceil(WARP) {
        let active = |lane: usize| t * WARP + (lane as u32) < n;
        value.fill(0);
        for &(base, prob_bits, shift) in &rans {
            let mut need = [false; LANES];
            for lane in 0..LANES {
                if !active(lane) {
                    continue;
                }
                let slot = x[lane] & ((1 << prob_bits) - 1);
                let symbol = load_u16(smem, (base + 2 * slot) as u64);
                let info = load_u32(smem, (base + align4(2 << prob_bits) + 4 * symbol) as u64);
                x[lane] = ((info >> 16) + 1)
                    .wrapping_mul(x[lane] >> prob_bits)
                    .wrapping_add(slot)
                    .wrapping_sub(info & 0xffff);
                value[lane] |= (symbol as u64) << shift;
                need[lane] = x[lane] < STATE_LOWER;
            }
            let mask = ballot(|lane| need[lane]);
            let taken = mask.count_ones();
            if pos + taken > word_count {
                return STATUS_STREAM_ENDS_EARLY;
            }
            for lane in 0..LANES {
                if need[lane] {
                    let below = mask & ((1u32 << lane) - 1);
                    let w = load_u16(payload, words + 2 * (pos + below.count_ones()) as u64);
                    x[lane] = (x[lane] << 16) | w;
                }
            }
            pos += taken;
        }
        for lane in (0..LANES).filter(|&lane| active(lane)) {
            let i = (t * WARP + lane as u32) as u64;
            for (&(width, shift), &start) in raw.iter().zip(&plane_start) {
                let plane = body + start as u64;
                let bit = i * width as u64;
                let (w, offset) = (bit >> 5, (bit & 31) as u32);
                let mut v = (load_u32(payload, plane + 4 * w) as u64) >> offset;
                if offset + width > 32 {
                    v |= (load_u32(payload, plane + 4 * (w + 1)) as u64) << (32 - offset);
                }
                v &= (1u64 << width) - 1;
                value[lane] |= v << shift;
            }
            if let Some(f) = &lossy {
                value[lane] = lossy_expand(f, payload, value[lane] as u32, i as u32);
            }
            let bytes = value[lane].to_le_bytes();
            store(out, dst + i * elem_bytes, &bytes[..elem_bytes as usize]);
        }
    }

    // 5. End checks.
    if rans_count > 0 {
        if pos != word_count {
            return STATUS_WORDS_LEFT_OVER;
        }
        if ballot(|lane| x[lane] != STATE_LOWER) != 0 {
            return STATUS_FINAL_STATE;
        }
    }
    STATUS_OK
}

/// A lossy tensor's dtype, narrow format and group size (the kernel's `LossyFormat`); `scales` is the offset of
/// the block's scale bytes in the payload range.
struct LossyFormat {
    exp_bits: u32,
    man_bits: u32,
    kept: u32,
    stored: u32,
    norm_block: u32,
    scales: u64,
}

/// `2^k` for `-1022 <= k <= 1023` (the kernel's `lossy_pow2`; out of range gives garbage, never a panic).
fn lossy_pow2(k: i32) -> f64 {
    f64::from_bits(((k as i64 + 1023) as u64 & 0x7ff) << 52)
}

/// `floor(log2(v))` of a positive normal f64.
fn lossy_floor_log2(v: f64) -> i32 {
    ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

fn lossy_bias(exp_bits: u32) -> i32 {
    (1 << (exp_bits - 1)) - 1
}

/// The magnitude of finite fields of a format with `exp_bits` / `man_bits` (the kernel's `lossy_value`).
fn lossy_value(exp_bits: u32, man_bits: u32, exp: u32, man: u32) -> f64 {
    let significand = if exp == 0 { man } else { (1 << man_bits) + man };
    let e = exp.max(1) as i32 - lossy_bias(exp_bits) - man_bits as i32;
    significand as f64 * lossy_pow2(e)
}

/// Rounds `v >= 0` to the dtype's grid, ties to even (the kernel's `lossy_round`; CUDA's `rint` is
/// `round_ties_even`).
fn lossy_round(exp_bits: u32, man_bits: u32, v: f64) -> f64 {
    if v == 0.0 {
        return 0.0;
    }
    let e = lossy_floor_log2(v).max(1 - lossy_bias(exp_bits));
    let quantum = lossy_pow2(e - man_bits as i32);
    (v / quantum).round_ties_even() * quantum
}

/// The kernel's `lossy_expand`: the dtype bits of element `i` from its narrow code.
fn lossy_expand(f: &LossyFormat, payload: &[u8], code: u32, i: u32) -> u64 {
    let (fe, fm, k) = (f.exp_bits, f.man_bits, f.stored);
    let all_ones = (1u32 << fe) - 1;
    let sign = ((code >> (fe + k)) & 1) as u64;
    let exp = (code >> k) & all_ones;
    let field = code & ((1u32 << k) - 1);
    let head = sign << (fe + fm);
    if exp == all_ones {
        let man = if field == 0 { 0 } else { field << (fm - k) };
        return head | (exp as u64) << fm | man as u64;
    }
    let m = field >> (k - f.kept);
    if f.norm_block == 0 {
        return head | (exp as u64) << fm | (m as u64) << (fm - f.kept);
    }
    let byte = payload
        .get((f.scales + (i / f.norm_block) as u64) as usize)
        .copied()
        .unwrap_or(0);
    let scale = 1.0 + byte as f64 / 256.0;
    let v = lossy_value(fe, f.kept, exp, m) * scale;
    let bias = lossy_bias(fe);
    let max_finite = (2.0 - lossy_pow2(-(fm as i32))) * lossy_pow2(bias);
    let mut rounded = lossy_round(fe, fm, v);
    if rounded > max_finite {
        rounded = max_finite;
    }
    let emin = 1 - bias;
    let (e_field, m_field) = if rounded < lossy_pow2(emin) {
        (0, (rounded / lossy_pow2(emin - fm as i32)) as u32)
    } else {
        let e = lossy_floor_log2(rounded);
        (
            (e + bias) as u32,
            ((rounded / lossy_pow2(e - fm as i32)) as u32).wrapping_sub(1 << fm),
        )
    };
    head | (e_field as u64) << fm | m_field as u64
}

/// `__ballot_sync(0xFFFFFFFF, predicate)`: bit `lane` set where the predicate holds.
fn ballot(predicate: impl Fn(usize) -> bool) -> u32 {
    (0..LANES).fold(0, |mask, lane| mask | (predicate(lane) as u32) << lane)
}

/// Decodes a whole tensor the way the GPU loader does: the kernel (here its twin) over the payload range, then
/// the zstd blocks on the host. `file` is the mapped `.nzt`; `out` must be exactly the tensor's bytes.
pub fn decode_tensor(file: &[u8], layout: &TensorLayout, out: &mut [u8], warps: u32) -> Result<()> {
    if out.len() as u64 != layout.byte_len {
        return Err(NzError::BufferSize {
            tensor: layout.name.clone(),
            expected: layout.byte_len as usize,
            found: out.len(),
        });
    }
    let payload = file
        .get(layout.payload.start as usize..layout.payload.end as usize)
        .ok_or_else(|| {
            NzError::malformed(format!("'{}': payload outside the file", layout.name))
        })?;
    let status = run_kernel(layout, payload, out, warps.max(1));
    if let Some((k, &s)) = status.iter().enumerate().find(|(_, &s)| s != STATUS_OK) {
        return Err(status_error(&layout.name, k, s));
    }
    for &k in &layout.zstd_blocks {
        let range = layout.block_output(k);
        let dst = out.get_mut(range).ok_or_else(|| {
            NzError::malformed(format!("'{}' block {k}: output out of range", layout.name))
        })?;
        decode_zstd_block(&layout.name, k, &file[layout.block_file_range(k)], dst)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballot_sets_the_bits_of_lanes_where_the_predicate_holds() {
        assert_eq!(ballot(|lane| lane % 2 == 1), 0xAAAA_AAAA);
        assert_eq!(ballot(|_| false), 0);
        assert_eq!(ballot(|lane| lane == 31), 1 << 31);
    }

    #[test]
    fn expanded_table_maps_every_slot_to_its_symbol() {
        // symbols 3 (freq 5), 7 (freq 2), 9 (freq 1): P = 3, w = 4
        let tables = vec![3, 4, 3, 3, 4 << 16, 7, 1 << 16 | 5, 9, 7];
        let mut smem = vec![0u8; table_smem_bytes(3, 4) as usize];
        expand_table(&tables, 0, &mut smem, 0, 4);
        let slots: Vec<u32> = (0..8).map(|s| load_u16(&smem, 2 * s)).collect();
        assert_eq!(slots, [3, 3, 3, 3, 3, 7, 7, 9]);
        let info = |s: u64| load_u32(&smem, 16 + 4 * s);
        assert_eq!((info(3), info(7), info(9)), (4 << 16, 1 << 16 | 5, 7));
    }
}
