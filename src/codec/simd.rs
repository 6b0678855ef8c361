//! SIMD kernels of the fast decode path.
//!
//! 1. Single-field rANS (`rans::decode_ranks`): the 32 lane states live in vector registers, each lane's packed
//!    table entry is fetched with one gather, and the shared word stream is handed out with a compare mask, a
//!    popcount and an expand (AVX-512) or a permute from a small index table (AVX2).
//! 2. The merge of 2-byte elements (`merge16`): ranks become symbols through a 256-entry table held in
//!    registers (AVX-512 VBMI) or gathered from memory (AVX2), and the raw field is unpacked with a byte
//!    permute and per-lane shifts (AVX-512) or a byte shuffle and a multiply (AVX2).
//! 3. The merge of 4-byte elements (`merge32`, AVX2): symbols gathered or computed through rank windows, and up
//!    to three raw fields unpacked with a byte shuffle and per-lane shifts.
//!
//! On CPUs whose gathers are slow (AMD Zen 2 to 4), the AVX2 and AVX-512 kernels look their tables up with
//! scalar loads instead (`Kernel::Avx2Loads`, `Kernel::Avx512Loads`): the same steps, the same bytes.
//!
//! A kernel only runs full 32-element steps, and only while 32 words remain after the current one, so every
//! vector load stays inside the stream; the scalar reference finishes the block and does the end checks.
//! This is the crate's second `unsafe` boundary (the first is `mmap`): target-feature calls and raw-pointer
//! loads, each justified below. Tests compare every kernel the CPU has with the scalar reference.

use super::freq::PackedTable;
use super::rans::LANES;
use std::sync::OnceLock;

/// A decode kernel. `Scalar` runs no bulk steps and leaves everything to the reference loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// AVX2, its table lookups done by gathers.
    Avx2,
    /// AVX2, its table lookups done by scalar loads, for CPUs whose gathers are slow.
    Avx2Loads,
    /// AVX-512, its table lookups done by gathers.
    Avx512,
    /// AVX-512, its table lookups done by scalar loads, for CPUs whose gathers are slow.
    Avx512Loads,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx2Loads => "avx2-loads",
            Kernel::Avx512 => "avx512",
            Kernel::Avx512Loads => "avx512-loads",
        }
    }

    /// Kernels this CPU can run, slowest first (of each gather and loads pair, loads are taken to be faster
    /// where gathers are slow). Worked out once: the kernels ask per block.
    pub fn available() -> &'static [Kernel] {
        static AVAILABLE: OnceLock<Vec<Kernel>> = OnceLock::new();
        AVAILABLE.get_or_init(Kernel::detect)
    }

    fn detect() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let faster_last = |gathers: Kernel, loads: Kernel| match x86::gathers_are_slow() {
                true => [gathers, loads],
                false => [loads, gathers],
            };
            if x86::has_avx2() {
                kernels.extend(faster_last(Kernel::Avx2, Kernel::Avx2Loads));
            }
            if x86::has_avx512() {
                kernels.extend(faster_last(Kernel::Avx512, Kernel::Avx512Loads));
            }
        }
        kernels
    }

    /// The fastest available kernel, or the one `NEUZIP_KERNEL` (scalar, avx2, avx2-loads, avx512,
    /// avx512-loads) names if available.
    pub fn selected() -> Kernel {
        static SELECTED: OnceLock<Kernel> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let available = Kernel::available();
            let wanted = std::env::var("NEUZIP_KERNEL").ok();
            wanted
                .and_then(|w| available.iter().copied().find(|k| k.name() == w))
                .unwrap_or(*available.last().expect("scalar is always there"))
        })
    }
}

/// Runs as many full steps as the selected kernel can from the start of the block; returns the step count.
pub fn decode_steps(
    x: &mut [u32; LANES],
    pos: &mut usize,
    words: &[u8],
    table: &PackedTable,
    ranks: &mut [u8],
) -> usize {
    decode_steps_with(Kernel::selected(), x, pos, words, table, ranks)
}

/// Whether a packed table has an entry for every slot of its precision, which the kernels' gathers (indexed
/// by the low state bits) need to stay inside it.
fn has_every_slot(table: &PackedTable) -> bool {
    table.entries.len() == 1 << table.prob_bits
}

/// `decode_steps` with a chosen kernel; one this CPU lacks runs no steps.
pub fn decode_steps_with(
    kernel: Kernel,
    x: &mut [u32; LANES],
    pos: &mut usize,
    words: &[u8],
    table: &PackedTable,
    ranks: &mut [u8],
) -> usize {
    if !has_every_slot(table) || !Kernel::available().contains(&kernel) {
        return 0;
    }
    match kernel {
        Kernel::Scalar => 0,
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` confirmed the CPU features; the kernel bounds every access itself.
        Kernel::Avx2 => unsafe { x86::avx2_steps::<false>(x, pos, words, table, ranks) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2Loads => unsafe { x86::avx2_steps::<true>(x, pos, words, table, ranks) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512 => unsafe { x86::avx512_steps::<false>(x, pos, words, table, ranks) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Loads => unsafe { x86::avx512_steps::<true>(x, pos, words, table, ranks) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => 0,
    }
}

/// `decode_steps` for two independent streams, each with its own table (the same one for two blocks of a
/// tensor), interleaved step by step so that each stream's gathers overlap the other's (one stream's steps
/// form a dependency chain). Runs while both streams can take a full step; returns the common step count
/// (only AVX-512 has a two-stream kernel).
pub fn decode_steps_pair(
    kernel: Kernel,
    x: [&mut [u32; LANES]; 2],
    pos: [&mut usize; 2],
    words: [&[u8]; 2],
    tables: [&PackedTable; 2],
    ranks: [&mut [u8]; 2],
) -> usize {
    if !tables.iter().all(|t| has_every_slot(t)) || !Kernel::available().contains(&kernel) {
        return 0;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` confirmed the CPU features; the kernel bounds every access itself.
        Kernel::Avx512 => unsafe { x86::avx512_steps_pair::<false>(x, pos, words, tables, ranks) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Loads => unsafe {
            x86::avx512_steps_pair::<true>(x, pos, words, tables, ranks)
        },
        _ => 0,
    }
}

/// Encodes the last full steps of `symbols` (a multiple of 32 long) backwards with the selected kernel (AVX2 or
/// AVX-512), writing words below `pos` in `buffer` as `rans::encode_single` does; returns the steps done (from
/// the end).
pub fn encode_steps(
    x: &mut [u32; LANES],
    symbols: &[u16],
    table: &super::rans::EncodeTable,
    buffer: &mut [u16],
    pos: &mut usize,
) -> usize {
    encode_steps_with(Kernel::selected(), x, symbols, table, buffer, pos)
}

/// `encode_steps` with a chosen kernel; one this CPU lacks (or the scalar one) encodes no steps.
pub fn encode_steps_with(
    kernel: Kernel,
    x: &mut [u32; LANES],
    symbols: &[u16],
    table: &super::rans::EncodeTable,
    buffer: &mut [u16],
    pos: &mut usize,
) -> usize {
    // The kernels write 8 or 16 words below `pos` at a time: it must stay at least the symbols left (one
    // word per symbol at most) and inside `buffer`.
    let room = *pos >= symbols.len() && *pos <= buffer.len();
    if !room || !table.freq_cum.len().is_power_of_two() || !Kernel::available().contains(&kernel) {
        return 0;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features (checked above); the kernel bounds every access itself.
        Kernel::Avx512 if x86::has_avx512_vbmi() => unsafe {
            x86::encode_avx512::<false>(x, symbols, table, buffer, pos)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Loads if x86::has_avx512_vbmi() => unsafe {
            x86::encode_avx512::<true>(x, symbols, table, buffer, pos)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { x86::encode_avx2::<false>(x, symbols, table, buffer, pos) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2Loads => unsafe { x86::encode_avx2::<true>(x, symbols, table, buffer, pos) },
        _ => {
            let _ = (x, symbols, table, buffer, pos);
            0
        }
    }
}

/// Packs the `width`-bit field at `shift` (width at most 8, inside the element) of the `W`-byte little-endian
/// elements of `block` (W is 2 or 4) as `bitpack::pack_slice` does, one group of 8 values (`width` bytes) at a
/// time from `out[0]`, each group written as 8 bytes of which the next group overwrites the spare ones. `out`
/// must hold `width` bytes per group plus 8. Returns the whole groups written (0 without BMI2).
pub fn pack_groups<const W: usize>(block: &[u8], shift: u32, width: u32, out: &mut [u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("bmi2") {
        // SAFETY: the CPU has BMI2 (checked above); the kernel indexes slices, so every access is bounds-checked.
        return unsafe { x86::pack_groups_bmi2::<W>(block, shift, width, out) };
    }
    let _ = (block, shift, width, out);
    0
}

/// How the elements of a 2-byte-element block are put together from the ranks of its one coded field:
/// `out[i] = symbols[ranks[i]] | raw[i] << shift`, where `symbols` holds the coded field's alphabet already
/// shifted into place and `raw` the one raw field, if any: (bytes, width 1..=8, shift), packed LSB-first.
#[derive(Clone, Copy)]
pub struct Merge16<'a> {
    pub symbols: &'a [u16; 256],
    pub raw: Option<(&'a [u8], u32, u32)>,
    /// The ranks' windows, when the table has them: AVX2 then computes symbols instead of gathering them.
    pub windows: Option<ShiftedWindows>,
}

/// A packed table's `RankWindows` with the bases shifted into place as `Merge16::symbols` are: a rank `r`'s
/// symbol in place is `(r << shift) + bases[r >> size_bits]` (wrapping).
#[derive(Clone, Copy, Debug)]
pub struct ShiftedWindows {
    pub size_bits: u32,
    pub shift: u32,
    pub bases: [u32; 8],
}

impl ShiftedWindows {
    pub fn new(windows: &super::freq::RankWindows, shift: u32) -> ShiftedWindows {
        ShiftedWindows {
            size_bits: windows.size_bits,
            shift,
            bases: windows.bases.map(|b| b.wrapping_shl(shift)),
        }
    }
}

impl<'a> Merge16<'a> {
    /// This merge for the elements after the first `groups` groups of 32.
    pub fn advanced(self, groups: usize) -> Merge16<'a> {
        let raw = self.raw.map(|(bytes, width, shift)| {
            let skip = 4 * width as usize * groups;
            (bytes.get(skip..).unwrap_or(&[]), width, shift)
        });
        Merge16 { raw, ..self }
    }

    /// Whether `kernel` has fused and bulk merge kernels on this CPU (AVX2, or AVX-512 with VBMI).
    fn runs_on(kernel: Kernel) -> bool {
        #[cfg(target_arch = "x86_64")]
        match kernel {
            Kernel::Avx512 | Kernel::Avx512Loads => return x86::has_avx512_vbmi(),
            Kernel::Avx2 | Kernel::Avx2Loads => return x86::has_avx2(),
            Kernel::Scalar => {}
        }
        let _ = kernel;
        false
    }
}

/// Elements of a 2-byte-element block merged so far by `merge16`, from `ranks` into `out` as `merge` says.
/// It handles whole groups of 32 while the raw field's loads stay inside it, and returns how many elements it
/// wrote (a multiple of 32; 0 where the selected kernel has no merge kernel).
pub fn merge16(ranks: &[u8], merge: Merge16<'_>, out: &mut [u8]) -> usize {
    merge16_with(Kernel::selected(), ranks, merge, out)
}

/// `merge16` with a chosen kernel; one without a merge kernel on this CPU merges nothing.
pub fn merge16_with(kernel: Kernel, ranks: &[u8], merge: Merge16<'_>, out: &mut [u8]) -> usize {
    if !Merge16::runs_on(kernel) {
        return 0;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `runs_on` confirmed the CPU features; the kernel bounds every access itself.
        Kernel::Avx512 | Kernel::Avx512Loads => unsafe { x86::merge16_avx512(ranks, merge, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 | Kernel::Avx2Loads => unsafe { x86::merge16_avx2(ranks, merge, out) },
        _ => 0,
    }
}

/// How the elements of a 4-byte-element block are put together from the ranks of its one coded field:
/// `out[i] = symbols[ranks[i]] | sum over raw fields of raw[i] << shift`, each raw field (bytes, width 1..=8,
/// shift) packed LSB-first.
#[derive(Clone, Copy)]
pub struct Merge32<'a> {
    pub symbols: &'a [u32; 256],
    pub raw: &'a [(&'a [u8], u32, u32)],
    /// The ranks' windows, when the table has them (symbols computed instead of gathered).
    pub windows: Option<ShiftedWindows>,
}

/// Elements of a 4-byte-element block merged by AVX2 (at most three raw fields), from `ranks` into `out` as
/// `merge` says: whole groups of 8 while every raw field's 16-byte loads stay inside it. Returns how many
/// elements it wrote (a multiple of 8; 0 without AVX2 or with the scalar kernel selected).
pub fn merge32(ranks: &[u8], merge: Merge32<'_>, out: &mut [u8]) -> usize {
    merge32_with(Kernel::selected(), ranks, merge, out)
}

/// `merge32` with a chosen kernel (AVX-512 runs the AVX2 kernel: it has none of its own).
pub fn merge32_with(kernel: Kernel, ranks: &[u8], merge: Merge32<'_>, out: &mut [u8]) -> usize {
    let fits = merge.raw.len() <= 3
        && merge
            .raw
            .iter()
            .all(|&(_, w, s)| (1..=8).contains(&w) && s + w <= 32);
    if kernel == Kernel::Scalar || !fits || !Kernel::available().contains(&kernel) {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU has AVX2 (checked above); the kernel bounds every access itself.
        return unsafe { x86::merge32_avx2(ranks, merge, out) };
    }
    let _ = (ranks, merge, out);
    0
}

/// `decode_steps` for a 2-byte-element block that merges as it decodes: each full step writes its 32
/// elements straight to `out` (64 bytes at `64 * step`) as `merge` says, so no ranks are stored. Runs while
/// the output and the raw field hold the whole step too; returns the step count (0 where `kernel` has no
/// merge kernel on this CPU).
pub fn decode_merge16_steps(
    kernel: Kernel,
    x: &mut [u32; LANES],
    pos: &mut usize,
    words: &[u8],
    table: &PackedTable,
    merge: Merge16<'_>,
    out: &mut [u8],
) -> usize {
    if !has_every_slot(table) || !Merge16::runs_on(kernel) {
        return 0;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `runs_on` confirmed the CPU features; the kernel bounds every access itself.
        Kernel::Avx512 => unsafe {
            x86::avx512_merge16_steps::<false>(x, pos, words, table, merge, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Loads => unsafe {
            x86::avx512_merge16_steps::<true>(x, pos, words, table, merge, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe {
            x86::avx2_merge16_steps::<false>(x, pos, words, table, merge, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2Loads => unsafe {
            x86::avx2_merge16_steps::<true>(x, pos, words, table, merge, out)
        },
        _ => {
            let _ = (x, pos, words, merge, out);
            0
        }
    }
}

/// `decode_merge16_steps` for two blocks, their steps interleaved as in `decode_steps_pair`; runs while both
/// can take a full step and returns the common step count (only AVX-512 has a two-stream merge kernel).
pub fn decode_merge16_steps_pair(
    kernel: Kernel,
    x: [&mut [u32; LANES]; 2],
    pos: [&mut usize; 2],
    words: [&[u8]; 2],
    tables: [&PackedTable; 2],
    merges: [Merge16<'_>; 2],
    outs: [&mut [u8]; 2],
) -> usize {
    if !tables.iter().all(|t| has_every_slot(t)) || !Merge16::runs_on(kernel) {
        return 0;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `runs_on` confirmed the CPU features; the kernel bounds every access itself.
        Kernel::Avx512 => unsafe {
            x86::avx512_merge16_steps_pair::<false>(x, pos, words, tables, merges, outs)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Loads => unsafe {
            x86::avx512_merge16_steps_pair::<true>(x, pos, words, tables, merges, outs)
        },
        _ => {
            let _ = (x, pos, words, merges, outs);
            0
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    const L: i32 = super::super::rans::STATE_LOWER as i32;

    pub fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("popcnt")
    }

    pub fn has_avx512_vbmi() -> bool {
        has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
    }

    /// A `Merge16` held in registers: the 256 symbols as eight vectors of 32 (or, with rank windows, the
    /// window bases), and the raw field's unpacking constants. Shift counts are vectors: a per-lane shift is
    /// one uop where a shift by an xmm count is two.
    struct Merger512 {
        table: [__m512i; 8],
        /// The shifted window bases (16-bit, wrapping) in lanes 0..8; zero without windows.
        window_bases: __m512i,
        window_bits: __m512i,
        symbol_shift: __m512i,
        raw: *const u8,
        /// Raw bytes per group of 32 elements (4 * width), 0 without a raw field.
        raw_step: usize,
        byte_index: __m512i,
        bit_shift: __m512i,
        field_mask: __m512i,
        shift: __m512i,
        bit6: __m512i,
        bit7: __m512i,
    }

    impl Merger512 {
        #[target_feature(enable = "avx512f,avx512bw")]
        fn new(merge: Merge16<'_>) -> Merger512 {
            let symbols = merge.symbols;
            let table = std::array::from_fn(|k| {
                let chunk: &[u16; 32] = symbols[32 * k..32 * k + 32].try_into().expect("32");
                // SAFETY: `chunk` is 64 readable bytes.
                unsafe { _mm512_loadu_si512(chunk.as_ptr() as *const _) }
            });
            let (raw_bytes, width, shift) = merge.raw.unwrap_or((&[], 0, 0));
            // Word lane i takes the two bytes holding bits i*width.. of the group, shifted down by
            // (i*width) % 8.
            let mut byte_index = [0u8; 64];
            let mut bit_shift = [0u16; 32];
            for i in 0..32 {
                let bit = i * width as usize;
                byte_index[2 * i] = (bit / 8) as u8;
                byte_index[2 * i + 1] = (bit / 8 + 1) as u8;
                bit_shift[i] = (bit % 8) as u16;
            }
            // SAFETY: both arrays are 64 readable bytes.
            let (byte_index, bit_shift) = unsafe {
                (
                    _mm512_loadu_si512(byte_index.as_ptr() as *const _),
                    _mm512_loadu_si512(bit_shift.as_ptr() as *const _),
                )
            };
            let windows = merge.windows.unwrap_or(ShiftedWindows {
                size_bits: 0,
                shift: 0,
                bases: [0; 8],
            });
            let mut bases = [0u16; 32];
            for (b, w) in bases.iter_mut().zip(windows.bases) {
                *b = w as u16;
            }
            Merger512 {
                table,
                // SAFETY: `bases` is 64 readable bytes.
                window_bases: unsafe { _mm512_loadu_si512(bases.as_ptr() as *const _) },
                window_bits: _mm512_set1_epi16(windows.size_bits as i16),
                symbol_shift: _mm512_set1_epi16(windows.shift as i16),
                raw: raw_bytes.as_ptr(),
                raw_step: 4 * width as usize,
                byte_index,
                bit_shift,
                field_mask: _mm512_set1_epi16(((1u32 << width) - 1) as i16),
                shift: _mm512_set1_epi16(shift as i16),
                bit6: _mm512_set1_epi16(0x40),
                bit7: _mm512_set1_epi16(0x80),
            }
        }

        /// Groups of 32 that `out` (64 bytes each) and the raw field (a 64-byte load at `raw_step * g`) hold.
        fn groups(&self, merge: Merge16<'_>, out: &[u8]) -> usize {
            let out_groups = out.len() / 64;
            match merge.raw {
                None => out_groups,
                Some((bytes, _, _)) => match bytes.len().checked_sub(64) {
                    Some(spare) => out_groups.min(spare / self.raw_step + 1),
                    None => 0,
                },
            }
        }

        /// The 32 elements of group `g` whose ranks are the 16-bit lanes of `idx`; with `WINDOWS`, the
        /// symbols come from the rank windows (`Merge16::windows` must be Some), else from the table.
        ///
        /// # Safety
        /// `g < groups(..)` for the `Merge16` this was built from.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        unsafe fn merge<const WINDOWS: bool>(&self, g: usize, idx: __m512i) -> __m512i {
            let value = match WINDOWS {
                true => _mm512_add_epi16(
                    _mm512_sllv_epi16(idx, self.symbol_shift),
                    _mm512_permutexvar_epi16(
                        _mm512_srlv_epi16(idx, self.window_bits),
                        self.window_bases,
                    ),
                ),
                false => self.table_symbols(idx),
            };
            if self.raw_step == 0 {
                return value;
            }
            let src = _mm512_loadu_si512(self.raw.add(self.raw_step * g) as *const _);
            let pairs = _mm512_permutexvar_epi8(self.byte_index, src);
            let field = _mm512_and_si512(_mm512_srlv_epi16(pairs, self.bit_shift), self.field_mask);
            _mm512_or_si512(value, _mm512_sllv_epi16(field, self.shift))
        }

        /// The symbols of the ranks in the 16-bit lanes of `idx`, looked up in the 256-entry table.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        fn table_symbols(&self, idx: __m512i) -> __m512i {
            let t = &self.table;
            let t0 = _mm512_permutex2var_epi16(t[0], idx, t[1]);
            let t1 = _mm512_permutex2var_epi16(t[2], idx, t[3]);
            let t2 = _mm512_permutex2var_epi16(t[4], idx, t[5]);
            let t3 = _mm512_permutex2var_epi16(t[6], idx, t[7]);
            let high6 = _mm512_test_epi16_mask(idx, self.bit6);
            let low_half = _mm512_mask_blend_epi16(high6, t0, t1);
            let high_half = _mm512_mask_blend_epi16(high6, t2, t3);
            _mm512_mask_blend_epi16(_mm512_test_epi16_mask(idx, self.bit7), low_half, high_half)
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F, BW and VBMI. Memory: groups of 32 elements are handled while
    /// `32 * (g + 1) <= ranks.len()` and `g < Merger512::groups` (output and raw load in bounds).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn merge16_avx512(ranks: &[u8], merge: Merge16<'_>, out: &mut [u8]) -> usize {
        match merge.windows.is_some() {
            true => merge16_avx512_with::<true>(ranks, merge, out),
            false => merge16_avx512_with::<false>(ranks, merge, out),
        }
    }

    /// # Safety
    /// As for `merge16_avx512`; `WINDOWS` only when `merge.windows` is Some.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn merge16_avx512_with<const WINDOWS: bool>(
        ranks: &[u8],
        merge: Merge16<'_>,
        out: &mut [u8],
    ) -> usize {
        let merger = Merger512::new(merge);
        let groups = (ranks.len() / 32).min(merger.groups(merge, out));
        for g in 0..groups {
            let idx =
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(ranks.as_ptr().add(32 * g) as *const _));
            let value = merger.merge::<WINDOWS>(g, idx);
            _mm512_storeu_si512(out.as_mut_ptr().add(64 * g) as *mut _, value);
        }
        groups * 32
    }

    /// The ranks of two 16-lane halves' packed entries as one vector of 32 16-bit lanes: the high words of
    /// the entries (permuted together in lane order), shifted down to their top byte.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn ranks16(high_words: __m512i, e0: __m512i, e1: __m512i) -> __m512i {
        _mm512_srli_epi16::<8>(_mm512_permutex2var_epi16(e0, high_words, e1))
    }

    /// The index vector of `ranks16`: word 2i+1 of the 64 words of two vectors, for i in 0..32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn high_word_index() -> __m512i {
        let index: [u16; 32] = std::array::from_fn(|i| 2 * i as u16 + 1);
        // SAFETY: `index` is 64 readable bytes.
        unsafe { _mm512_loadu_si512(index.as_ptr() as *const _) }
    }

    /// # Safety
    /// The CPU must have AVX-512F, BW, VBMI and POPCNT. Memory: as `avx512_steps` for the stream (a step
    /// starts only while `p + 32 <= word_count`), and a step runs only while `step < Merger512::groups`
    /// (64 output bytes and the raw load in bounds).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,popcnt")]
    pub(super) unsafe fn avx512_merge16_steps<const LOADS: bool>(
        x: &mut [u32; LANES],
        pos: &mut usize,
        words: &[u8],
        table: &PackedTable,
        merge: Merge16<'_>,
        out: &mut [u8],
    ) -> usize {
        match merge.windows.is_some() {
            true => avx512_merge16_steps_with::<true, LOADS>(x, pos, words, table, merge, out),
            false => avx512_merge16_steps_with::<false, LOADS>(x, pos, words, table, merge, out),
        }
    }

    /// # Safety
    /// As for `avx512_merge16_steps`; `WINDOWS` only when `merge.windows` is Some.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,popcnt")]
    unsafe fn avx512_merge16_steps_with<const WINDOWS: bool, const LOADS: bool>(
        x: &mut [u32; LANES],
        pos: &mut usize,
        words: &[u8],
        table: &PackedTable,
        merge: Merge16<'_>,
        out: &mut [u8],
    ) -> usize {
        let word_count = words.len() / 2;
        let lanes = Lanes512::new(table);
        let merger = Merger512::new(merge);
        let steps = merger.groups(merge, out);
        let high_words = high_word_index();
        let word_ptr = words.as_ptr();
        let out_ptr = out.as_mut_ptr();
        let mut states = [
            _mm512_loadu_si512(x.as_ptr() as *const _),
            _mm512_loadu_si512(x.as_ptr().add(16) as *const _),
        ];
        let mut p = *pos;
        let mut step = 0;
        while step < steps && p + 32 <= word_count {
            let entry = [
                lanes.gather::<LOADS>(states[0]),
                lanes.gather::<LOADS>(states[1]),
            ];
            for half in 0..2 {
                let (state, used) = lanes.advance(states[half], entry[half], word_ptr.add(2 * p));
                states[half] = state;
                p += used;
            }
            let value = merger.merge::<WINDOWS>(step, ranks16(high_words, entry[0], entry[1]));
            _mm512_storeu_si512(out_ptr.add(64 * step) as *mut _, value);
            step += 1;
        }
        _mm512_storeu_si512(x.as_mut_ptr() as *mut _, states[0]);
        _mm512_storeu_si512(x.as_mut_ptr().add(16) as *mut _, states[1]);
        *pos = p;
        step
    }

    /// # Safety
    /// As for `avx512_merge16_steps`, for each of the two streams: a step runs only while both streams can
    /// take it.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,popcnt")]
    pub(super) unsafe fn avx512_merge16_steps_pair<const LOADS: bool>(
        x: [&mut [u32; LANES]; 2],
        pos: [&mut usize; 2],
        words: [&[u8]; 2],
        tables: [&PackedTable; 2],
        merges: [Merge16<'_>; 2],
        outs: [&mut [u8]; 2],
    ) -> usize {
        match merges.iter().all(|m| m.windows.is_some()) {
            true => {
                avx512_merge16_steps_pair_with::<true, LOADS>(x, pos, words, tables, merges, outs)
            }
            false => {
                avx512_merge16_steps_pair_with::<false, LOADS>(x, pos, words, tables, merges, outs)
            }
        }
    }

    /// # Safety
    /// As for `avx512_merge16_steps_pair`; `WINDOWS` only when both merges have windows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,popcnt")]
    unsafe fn avx512_merge16_steps_pair_with<const WINDOWS: bool, const LOADS: bool>(
        x: [&mut [u32; LANES]; 2],
        pos: [&mut usize; 2],
        words: [&[u8]; 2],
        tables: [&PackedTable; 2],
        merges: [Merge16<'_>; 2],
        outs: [&mut [u8]; 2],
    ) -> usize {
        let word_count = [words[0].len() / 2, words[1].len() / 2];
        let lanes = [Lanes512::new(tables[0]), Lanes512::new(tables[1])];
        let mergers = [Merger512::new(merges[0]), Merger512::new(merges[1])];
        let steps = mergers[0]
            .groups(merges[0], outs[0])
            .min(mergers[1].groups(merges[1], outs[1]));
        let high_words = high_word_index();
        let word_ptr = [words[0].as_ptr(), words[1].as_ptr()];
        let [out_a, out_b] = outs;
        let out_ptr = [out_a.as_mut_ptr(), out_b.as_mut_ptr()];
        let mut states = [
            _mm512_loadu_si512(x[0].as_ptr() as *const _),
            _mm512_loadu_si512(x[0].as_ptr().add(16) as *const _),
            _mm512_loadu_si512(x[1].as_ptr() as *const _),
            _mm512_loadu_si512(x[1].as_ptr().add(16) as *const _),
        ];
        let mut p = [*pos[0], *pos[1]];
        let mut step = 0;
        while step < steps && p[0] + 32 <= word_count[0] && p[1] + 32 <= word_count[1] {
            let entry: [__m512i; 4] =
                std::array::from_fn(|v| lanes[v / 2].gather::<LOADS>(states[v]));
            for v in 0..4 {
                let stream = v / 2;
                let words_at = word_ptr[stream].add(2 * p[stream]);
                let (state, used) = lanes[stream].advance(states[v], entry[v], words_at);
                states[v] = state;
                p[stream] += used;
            }
            for stream in 0..2 {
                let idx = ranks16(high_words, entry[2 * stream], entry[2 * stream + 1]);
                let value = mergers[stream].merge::<WINDOWS>(step, idx);
                _mm512_storeu_si512(out_ptr[stream].add(64 * step) as *mut _, value);
            }
            step += 1;
        }
        let [x_a, x_b] = x;
        _mm512_storeu_si512(x_a.as_mut_ptr() as *mut _, states[0]);
        _mm512_storeu_si512(x_a.as_mut_ptr().add(16) as *mut _, states[1]);
        _mm512_storeu_si512(x_b.as_mut_ptr() as *mut _, states[2]);
        _mm512_storeu_si512(x_b.as_mut_ptr().add(16) as *mut _, states[3]);
        let [pos_a, pos_b] = pos;
        *pos_a = p[0];
        *pos_b = p[1];
        step
    }

    /// The new states come from `coded_states`, exact through a single-precision division and a correction,
    /// so that only the frequencies are looked up, by a gather or (`LOADS`) scalar loads.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, BW and VL, and `symbols.len() <= *pos <= buffer.len()` (checked by
    /// `encode_steps_with`). Memory: each half step reads the 16 symbols at `base <= symbols.len() - 16`,
    /// masked to the table length (a power of two; `freq_cum` holds one entry per symbol) before the gather
    /// or the loads; each step writes at most 32 words below `pos`, and `pos` stays at least one word per
    /// remaining symbol above 0 (one slot per symbol), so the masked stores stay inside `buffer`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,popcnt")]
    pub(super) unsafe fn encode_avx512<const LOADS: bool>(
        x: &mut [u32; LANES],
        symbols: &[u16],
        table: &super::super::rans::EncodeTable,
        buffer: &mut [u16],
        pos: &mut usize,
    ) -> usize {
        let pb = table.prob_bits;
        let Some(rounds) = correction_rounds(pb) else {
            return 0;
        };
        let steps = symbols.len() / LANES;
        let symbol_last = table.freq_cum.len() - 1;
        let symbol_mask = _mm512_set1_epi32(symbol_last as i32);
        let low16 = _mm512_set1_epi32(0xffff);
        let top_shift = _mm_cvtsi32_si128(32 - pb as i32);
        let freq_cum = table.freq_cum.as_ptr() as *const i32;
        let mut p = *pos;
        // A macro rather than a closure, which the compiler would not inline.
        macro_rules! half_step {
            ($state:expr, $at:expr) => {{
                let (state, at): (__m512i, *const u16) = ($state, $at);
                let fc = match LOADS {
                    false => {
                        let sym = _mm512_cvtepu16_epi32(_mm256_loadu_si256(at as *const _));
                        _mm512_i32gather_epi32::<4>(_mm512_and_si512(sym, symbol_mask), freq_cum)
                    }
                    true => {
                        let s = |k: usize| *at.add(k) as usize & symbol_last;
                        let fc = |half: usize| lanes_of(|k| *freq_cum.add(s(8 * half + k)));
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(fc(0)), fc(1))
                    }
                };
                let freq = _mm512_srli_epi32::<16>(fc);
                let cum = _mm512_and_si512(fc, low16);
                let emit = _mm512_cmpge_epu32_mask(_mm512_srl_epi32(state, top_shift), freq);
                let count = emit.count_ones() as usize;
                let words = _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(emit, state));
                p -= count;
                _mm256_mask_storeu_epi16(
                    buffer.as_mut_ptr().add(p) as *mut _,
                    ((1u32 << count) - 1) as u16,
                    words,
                );
                let state = _mm512_mask_srli_epi32::<16>(state, emit, state);
                coded_states(state, freq, cum, pb, rounds)
            }};
        }
        let mut low = _mm512_loadu_si512(x.as_ptr() as *const _);
        let mut high = _mm512_loadu_si512(x.as_ptr().add(16) as *const _);
        for step in (0..steps).rev() {
            let at = symbols.as_ptr().add(step * LANES);
            high = half_step!(high, at.add(16));
            low = half_step!(low, at);
        }
        _mm512_storeu_si512(x.as_mut_ptr() as *mut _, low);
        _mm512_storeu_si512(x.as_mut_ptr().add(16) as *mut _, high);
        *pos = p;
        steps
    }

    /// The states after coding symbols of frequency `freq` and start `cum` in the renormalized `state`
    /// (below `freq << (32 - pb)`): `(state / freq) << pb | state % freq` plus `cum`. The quotient comes from
    /// a single-precision division, whose relative error of `2^-23` leaves it off by less than
    /// `2^(9 - pb)`; each of `rounds` (`correction_rounds(pb)`) moves the lanes whose remainder lies outside
    /// `0..freq` by one.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn coded_states(
        state: __m512i,
        freq: __m512i,
        cum: __m512i,
        pb: u32,
        rounds: u32,
    ) -> __m512i {
        let ratio = _mm512_div_ps(_mm512_cvtepu32_ps(state), _mm512_cvtepi32_ps(freq));
        let q = _mm512_cvttps_epu32(ratio);
        let mut rest = _mm512_sub_epi32(state, _mm512_mullo_epi32(q, freq));
        let shifted = _mm512_sll_epi32(q, _mm_cvtsi32_si128(pb as i32));
        let mut next = _mm512_add_epi32(_mm512_add_epi32(shifted, rest), cum);
        // A quotient one too large leaves `rest` negative, one too small leaves it at `freq` or above; moving
        // the quotient by one moves the state by `2^pb - freq`.
        let step = _mm512_sub_epi32(_mm512_set1_epi32(1 << pb), freq);
        for _ in 0..rounds {
            let over = _mm512_cmplt_epi32_mask(rest, _mm512_setzero_si512());
            let under = _mm512_cmpge_epi32_mask(rest, freq);
            rest = _mm512_mask_add_epi32(rest, over, rest, freq);
            rest = _mm512_mask_sub_epi32(rest, under, rest, freq);
            next = _mm512_mask_sub_epi32(next, over, next, step);
            next = _mm512_mask_add_epi32(next, under, next, step);
        }
        next
    }

    /// Correction rounds that make `coded_states` exact at `prob_bits` (None below 8 bits, which the encoder
    /// never picks).
    pub(super) fn correction_rounds(prob_bits: u32) -> Option<u32> {
        match prob_bits {
            10.. => Some(1),
            9 => Some(2),
            8 => Some(3),
            _ => None,
        }
    }

    /// # Safety
    /// The CPU must have BMI2. Memory: slices only (bounds-checked), and nothing is written unless `out` holds
    /// every group.
    #[target_feature(enable = "bmi2")]
    pub(super) unsafe fn pack_groups_bmi2<const W: usize>(
        block: &[u8],
        shift: u32,
        width: u32,
        out: &mut [u8],
    ) -> usize {
        let groups = block.len() / (8 * W);
        let step = width as usize;
        if !(W == 2 || W == 4) || width == 0 || width > 8 || shift + width > 8 * W as u32 {
            return 0;
        }
        if out.len() < groups * step + 8 {
            return 0;
        }
        // The field of each element of a 64-bit word, e.g. 0x003f_003f_003f_003f for 6 low bits of 2-byte ones.
        let lane = ((1u64 << width) - 1) << shift;
        let mask = (0..8 / W).fold(0u64, |m, k| m | lane << (8 * W * k));
        let word_bits = (8 / W) as u32 * width;
        for (g, group) in block.chunks_exact(8 * W).enumerate() {
            let mut bits = 0u64;
            for (k, word) in group.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                bits |= _pext_u64(v, mask) << (k as u32 * word_bits);
            }
            out[g * step..g * step + 8].copy_from_slice(&bits.to_le_bytes());
        }
        groups
    }

    pub fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt")
    }

    /// Whether the CPU is AMD's (or Hygon's, the same cores), whose gathers are slow: on Zen 3 one 8-lane
    /// gather takes about 13 cycles, on Zen 4 one 16-lane gather about 17, while as many scalar loads and
    /// inserts take fewer. Asked only by `Kernel::detect`, which runs once (CPUID traps to the hypervisor in
    /// a VM).
    pub fn gathers_are_slow() -> bool {
        let id = __cpuid(0);
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == *b"AuthenticAMD" || vendor == *b"HygonGenuine"
    }

    /// One packed table's constants for the AVX-512 decode step of 16 lanes, shared by the one- and two-stream
    /// kernels.
    #[derive(Clone, Copy)]
    struct Lanes512 {
        mask: __m512i,
        low12: __m512i,
        one: __m512i,
        lower: __m512i,
        shift: __m512i,
        entries: *const i32,
    }

    impl Lanes512 {
        #[target_feature(enable = "avx512f")]
        fn new(table: &PackedTable) -> Lanes512 {
            Lanes512 {
                mask: _mm512_set1_epi32(((1u32 << table.prob_bits) - 1) as i32),
                low12: _mm512_set1_epi32(0xfff),
                one: _mm512_set1_epi32(1),
                lower: _mm512_set1_epi32(L),
                shift: _mm512_set1_epi32(table.prob_bits as i32),
                entries: table.entries.as_ptr() as *const i32,
            }
        }

        /// The packed entries of 16 lanes' slots, by a gather or (`LOADS`) by scalar loads.
        ///
        /// # Safety
        /// `entries` holds `2^prob_bits` entries (checked by `decode_steps_with`), and slots are masked below it.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn gather<const LOADS: bool>(&self, state: __m512i) -> __m512i {
            let slots = _mm512_and_si512(state, self.mask);
            if !LOADS {
                return _mm512_i32gather_epi32::<4>(slots, self.entries);
            }
            let low = load_lanes8(self.entries, _mm512_castsi512_si256(slots));
            let high = load_lanes8(self.entries, _mm512_extracti64x4_epi64::<1>(slots));
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
        }

        /// Decodes 16 lanes whose entries are `e`: their new states, refilled in lane order from the 16 words at
        /// `words`, and how many words they took. (Their ranks are the entries' top bytes.)
        ///
        /// # Safety
        /// 16 words (32 bytes) must be readable at `words`.
        #[inline]
        #[target_feature(enable = "avx512f,popcnt")]
        unsafe fn advance(&self, state: __m512i, e: __m512i, words: *const u8) -> (__m512i, usize) {
            let freq = _mm512_add_epi32(
                _mm512_and_si512(_mm512_srli_epi32::<12>(e), self.low12),
                self.one,
            );
            let decoded = _mm512_add_epi32(
                _mm512_mullo_epi32(freq, _mm512_srlv_epi32(state, self.shift)),
                _mm512_and_si512(e, self.low12),
            );
            let need = _mm512_cmplt_epu32_mask(decoded, self.lower);
            let fresh = _mm512_cvtepu16_epi32(_mm256_loadu_si256(words as *const _));
            let fresh = _mm512_maskz_expand_epi32(need, fresh);
            let state =
                _mm512_mask_or_epi32(decoded, need, _mm512_slli_epi32::<16>(decoded), fresh);
            (state, need.count_ones() as usize)
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F and POPCNT. Memory: gathers index `entries` with `slot < 2^prob_bits ==
    /// entries.len()`; each half reads 16 words at `p`, and a step starts only while `p + 32 <= word_count`
    /// (a step consumes at most 32); stores write 16 ranks at `base + half + 16 <= ranks.len()`.
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn avx512_steps<const LOADS: bool>(
        x: &mut [u32; LANES],
        pos: &mut usize,
        words: &[u8],
        table: &PackedTable,
        ranks: &mut [u8],
    ) -> usize {
        let word_count = words.len() / 2;
        let steps = ranks.len() / LANES;
        let lanes = Lanes512::new(table);
        let word_ptr = words.as_ptr();
        let rank_ptr = ranks.as_mut_ptr();
        let mut states = [
            _mm512_loadu_si512(x.as_ptr() as *const _),
            _mm512_loadu_si512(x.as_ptr().add(16) as *const _),
        ];
        let mut p = *pos;
        let mut step = 0;
        while step < steps && p + 32 <= word_count {
            let base = step * LANES;
            let entry = [
                lanes.gather::<LOADS>(states[0]),
                lanes.gather::<LOADS>(states[1]),
            ];
            for half in 0..2 {
                let (state, used) = lanes.advance(states[half], entry[half], word_ptr.add(2 * p));
                states[half] = state;
                p += used;
                let rank = _mm512_cvtepi32_epi8(_mm512_srli_epi32::<24>(entry[half]));
                _mm_storeu_si128(rank_ptr.add(base + 16 * half) as *mut _, rank);
            }
            step += 1;
        }
        _mm512_storeu_si512(x.as_mut_ptr() as *mut _, states[0]);
        _mm512_storeu_si512(x.as_mut_ptr().add(16) as *mut _, states[1]);
        *pos = p;
        step
    }

    /// # Safety
    /// As for `avx512_steps`, for each of the two streams: a step runs only while both streams have a full
    /// step of ranks left and at least 32 words after their read positions.
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn avx512_steps_pair<const LOADS: bool>(
        x: [&mut [u32; LANES]; 2],
        pos: [&mut usize; 2],
        words: [&[u8]; 2],
        tables: [&PackedTable; 2],
        ranks: [&mut [u8]; 2],
    ) -> usize {
        let word_count = [words[0].len() / 2, words[1].len() / 2];
        let steps = (ranks[0].len() / LANES).min(ranks[1].len() / LANES);
        let lanes = [Lanes512::new(tables[0]), Lanes512::new(tables[1])];
        let word_ptr = [words[0].as_ptr(), words[1].as_ptr()];
        let [ranks_a, ranks_b] = ranks;
        let rank_ptr = [ranks_a.as_mut_ptr(), ranks_b.as_mut_ptr()];
        let mut states = [
            _mm512_loadu_si512(x[0].as_ptr() as *const _),
            _mm512_loadu_si512(x[0].as_ptr().add(16) as *const _),
            _mm512_loadu_si512(x[1].as_ptr() as *const _),
            _mm512_loadu_si512(x[1].as_ptr().add(16) as *const _),
        ];
        let mut p = [*pos[0], *pos[1]];
        let mut step = 0;
        while step < steps && p[0] + 32 <= word_count[0] && p[1] + 32 <= word_count[1] {
            let base = step * LANES;
            let entry: [__m512i; 4] =
                std::array::from_fn(|v| lanes[v / 2].gather::<LOADS>(states[v]));
            for v in 0..4 {
                let (stream, half) = (v / 2, v % 2);
                let words_at = word_ptr[stream].add(2 * p[stream]);
                let (state, used) = lanes[stream].advance(states[v], entry[v], words_at);
                states[v] = state;
                p[stream] += used;
                let rank = _mm512_cvtepi32_epi8(_mm512_srli_epi32::<24>(entry[v]));
                _mm_storeu_si128(rank_ptr[stream].add(base + 16 * half) as *mut _, rank);
            }
            step += 1;
        }
        let [x_a, x_b] = x;
        _mm512_storeu_si512(x_a.as_mut_ptr() as *mut _, states[0]);
        _mm512_storeu_si512(x_a.as_mut_ptr().add(16) as *mut _, states[1]);
        _mm512_storeu_si512(x_b.as_mut_ptr() as *mut _, states[2]);
        _mm512_storeu_si512(x_b.as_mut_ptr().add(16) as *mut _, states[3]);
        let [pos_a, pos_b] = pos;
        *pos_a = p[0];
        *pos_b = p[1];
        step
    }

    /// For each 8-bit refill mask, the source word of each lane: lane j takes word `popcount(mask & (2^j - 1))`.
    /// One byte per lane, eight lanes per entry.
    static EXPAND_INDEX: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut m = 0;
        while m < 256 {
            let mut entry = 0u64;
            let mut j = 0;
            while j < 8 {
                let below = (m as u32 & ((1u32 << j) - 1)).count_ones() as u64;
                entry |= below << (8 * j);
                j += 1;
            }
            table[m] = entry;
            m += 1;
        }
        table
    };

    /// One packed table's constants for the AVX2 decode step of 8 lanes (a quarter of a step).
    #[derive(Clone, Copy)]
    struct Lanes256 {
        mask: __m256i,
        low12: __m256i,
        one: __m256i,
        zero: __m256i,
        shift: __m128i,
        entries: *const i32,
    }

    impl Lanes256 {
        #[target_feature(enable = "avx2")]
        fn new(table: &PackedTable) -> Lanes256 {
            Lanes256 {
                mask: _mm256_set1_epi32(((1u32 << table.prob_bits) - 1) as i32),
                low12: _mm256_set1_epi32(0xfff),
                one: _mm256_set1_epi32(1),
                zero: _mm256_setzero_si256(),
                shift: _mm_cvtsi32_si128(table.prob_bits as i32),
                entries: table.entries.as_ptr() as *const i32,
            }
        }

        /// The packed entries of 8 lanes' slots, by a gather or (`LOADS`) by scalar loads.
        ///
        /// # Safety
        /// As `Lanes512::gather`.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn gather<const LOADS: bool>(&self, state: __m256i) -> __m256i {
            let slots = _mm256_and_si256(state, self.mask);
            match LOADS {
                false => _mm256_i32gather_epi32::<4>(self.entries, slots),
                true => load_lanes8(self.entries, slots),
            }
        }

        /// `Lanes512::advance` for 8 lanes, refilled from the 8 words at `words`.
        ///
        /// # Safety
        /// 8 words (16 bytes) must be readable at `words`.
        #[inline]
        #[target_feature(enable = "avx2,popcnt")]
        unsafe fn advance(&self, state: __m256i, e: __m256i, words: *const u8) -> (__m256i, usize) {
            let freq = _mm256_add_epi32(
                _mm256_and_si256(_mm256_srli_epi32::<12>(e), self.low12),
                self.one,
            );
            let decoded = _mm256_add_epi32(
                _mm256_mullo_epi32(freq, _mm256_srl_epi32(state, self.shift)),
                _mm256_and_si256(e, self.low12),
            );
            let need_lanes = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(decoded), self.zero);
            let need = _mm256_movemask_ps(_mm256_castsi256_ps(need_lanes)) as usize;
            let fresh = _mm256_cvtepu16_epi32(_mm_loadu_si128(words as *const _));
            let index = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(EXPAND_INDEX[need] as i64));
            let fresh = _mm256_permutevar8x32_epi32(fresh, index);
            let refilled = _mm256_or_si256(_mm256_slli_epi32::<16>(decoded), fresh);
            (
                _mm256_blendv_epi8(decoded, refilled, need_lanes),
                need.count_ones() as usize,
            )
        }
    }

    /// `entries[slots[k]]` for 4 lanes, by scalar loads (a gather's stand-in where gathers are slow).
    ///
    /// # Safety
    /// Every slot must index inside `entries`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_lanes(entries: *const i32, slots: __m128i) -> __m128i {
        // Two slots per 64-bit extract.
        let (a, b) = (
            _mm_cvtsi128_si64(slots) as u64,
            _mm_extract_epi64::<1>(slots) as u64,
        );
        _mm_setr_epi32(
            *entries.add(a as u32 as usize),
            *entries.add((a >> 32) as usize),
            *entries.add(b as u32 as usize),
            *entries.add((b >> 32) as usize),
        )
    }

    /// `load_lanes` for 8 lanes.
    ///
    /// # Safety
    /// As `load_lanes`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_lanes8(entries: *const i32, slots: __m256i) -> __m256i {
        _mm256_set_m128i(
            load_lanes(entries, _mm256_extracti128_si256::<1>(slots)),
            load_lanes(entries, _mm256_castsi256_si128(slots)),
        )
    }

    /// The 8 lanes `lane(0)..lane(7)`: how the `LOADS` kernels put together what they looked up.
    #[inline]
    #[target_feature(enable = "avx")]
    fn lanes_of(lane: impl Fn(usize) -> i32) -> __m256i {
        _mm256_setr_epi32(
            lane(0),
            lane(1),
            lane(2),
            lane(3),
            lane(4),
            lane(5),
            lane(6),
            lane(7),
        )
    }

    /// Loads 32 lane states as four 8-lane quarters.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load_quarters(x: &[u32; LANES]) -> [__m256i; 4] {
        std::array::from_fn(|k| _mm256_loadu_si256(x.as_ptr().add(8 * k) as *const _))
    }

    /// Stores four 8-lane quarters as 32 lane states.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn store_quarters(x: &mut [u32; LANES], states: &[__m256i; 4]) {
        for (k, s) in states.iter().enumerate() {
            _mm256_storeu_si256(x.as_mut_ptr().add(8 * k) as *mut _, *s);
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and POPCNT. Memory as for `avx512_steps`, with four 8-lane quarters each reading
    /// 8 words at `p`.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn avx2_steps<const LOADS: bool>(
        x: &mut [u32; LANES],
        pos: &mut usize,
        words: &[u8],
        table: &PackedTable,
        ranks: &mut [u8],
    ) -> usize {
        let word_count = words.len() / 2;
        let steps = ranks.len() / LANES;
        let lanes = Lanes256::new(table);
        let word_ptr = words.as_ptr();
        let rank_ptr = ranks.as_mut_ptr();
        let mut states = load_quarters(x);
        let mut p = *pos;
        let mut step = 0;
        // Ranks are the top bytes of the entries: byte 3 of every lane, in lane order.
        let pick = _mm256_setr_epi8(
            3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, //
            3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        while step < steps && p + 32 <= word_count {
            let base = step * LANES;
            let entry: [__m256i; 4] = std::array::from_fn(|k| lanes.gather::<LOADS>(states[k]));
            for (state, &e) in states.iter_mut().zip(&entry) {
                let used;
                (*state, used) = lanes.advance(*state, e, word_ptr.add(2 * p));
                p += used;
            }
            let mut bytes = [0u8; 32];
            for (k, &e) in entry.iter().enumerate() {
                let r = _mm256_shuffle_epi8(e, pick);
                let lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(r)) as u32;
                let hi = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(r)) as u32;
                bytes[8 * k..8 * k + 4].copy_from_slice(&lo.to_le_bytes());
                bytes[8 * k + 4..8 * k + 8].copy_from_slice(&hi.to_le_bytes());
            }
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), rank_ptr.add(base), LANES);
            step += 1;
        }
        store_quarters(x, &states);
        *pos = p;
        step
    }

    /// How the AVX2 merges turn ranks into symbols (already shifted into place): through the rank windows
    /// when the table has them, else by a gather from the symbols widened to 32 bits.
    struct RankSymbols {
        table: [u32; 256],
        /// With rank windows: the shifted bases, the shift from a rank to its window and the symbols' shift.
        windows: Option<(__m256i, __m128i, __m128i)>,
    }

    impl RankSymbols {
        #[target_feature(enable = "avx2")]
        fn new(table: [u32; 256], windows: Option<ShiftedWindows>) -> RankSymbols {
            let windows = windows.map(|w| {
                // SAFETY: `bases` is 32 readable bytes.
                let bases = unsafe { _mm256_loadu_si256(w.bases.as_ptr() as *const _) };
                (
                    bases,
                    _mm_cvtsi32_si128(w.size_bits as i32),
                    _mm_cvtsi32_si128(w.shift as i32),
                )
            });
            RankSymbols { table, windows }
        }

        /// The symbols of 8 ranks (32-bit lanes, below 256).
        ///
        /// # Safety
        /// The CPU must have AVX2.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn of(&self, ranks: __m256i) -> __m256i {
            match self.windows {
                Some((bases, size_bits, shift)) => _mm256_add_epi32(
                    _mm256_sll_epi32(ranks, shift),
                    _mm256_permutevar8x32_epi32(bases, _mm256_srl_epi32(ranks, size_bits)),
                ),
                None => _mm256_i32gather_epi32::<4>(self.table.as_ptr() as *const i32, ranks),
            }
        }

        /// The symbols of the 8 ranks that are the 8 bytes at `ranks`.
        ///
        /// # Safety
        /// The CPU must have AVX2, and 8 bytes must be readable at `ranks`.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn of_bytes(&self, ranks: *const u8) -> __m256i {
            self.of(_mm256_cvtepu8_epi32(_mm_loadl_epi64(ranks as *const _)))
        }
    }

    /// A `Merge16` for the AVX2 kernels: its symbols by rank, and the raw field's unpacking constants. Each group of 8 elements starts on a byte (8 * width bits), so one 16-byte
    /// load, one byte shuffle and one multiply unpack it the same way for every group.
    struct Merger256 {
        symbols: RankSymbols,
        raw: *const u8,
        /// Raw bytes per group of 8 elements (the width), 0 without a raw field.
        raw_step: usize,
        byte_index: __m256i,
        multiplier: __m256i,
        field_mask: __m256i,
        shift: __m128i,
    }

    impl Merger256 {
        #[target_feature(enable = "avx2")]
        fn new(merge: Merge16<'_>) -> Merger256 {
            let (raw_bytes, width, shift) = merge.raw.unwrap_or((&[], 0, 0));
            // Word lane i of a group takes the two bytes holding bits i*width.., moved up by 8 - (i*width) % 8
            // so that a shift right by 8 brings the field down.
            let mut byte_index = [0i8; 32];
            let mut multiplier = [0i16; 16];
            for i in 0..16 {
                let bit = (i % 8) * width as usize;
                byte_index[2 * i] = (bit / 8) as i8;
                byte_index[2 * i + 1] = (bit / 8 + 1) as i8;
                multiplier[i] = 1 << (8 - bit % 8);
            }
            // SAFETY: both arrays are 32 readable bytes.
            let (byte_index, multiplier) = unsafe {
                (
                    _mm256_loadu_si256(byte_index.as_ptr() as *const _),
                    _mm256_loadu_si256(multiplier.as_ptr() as *const _),
                )
            };
            Merger256 {
                symbols: RankSymbols::new(
                    std::array::from_fn(|k| merge.symbols[k] as u32),
                    merge.windows,
                ),
                raw: raw_bytes.as_ptr(),
                raw_step: width as usize,
                byte_index,
                multiplier,
                field_mask: _mm256_set1_epi16(((1u32 << width) - 1) as i16),
                shift: _mm_cvtsi32_si128(shift as i32),
            }
        }

        /// Groups of 32 that `out` (64 bytes each) and the raw field (16-byte loads at `raw_step * (4g + k)`,
        /// k < 4) hold.
        fn groups(&self, merge: Merge16<'_>, out: &[u8]) -> usize {
            let out_groups = out.len() / 64;
            match merge.raw {
                None => out_groups,
                Some((bytes, _, _)) => {
                    // The last load of group g starts at raw_step * (4g + 3).
                    match (bytes.len().checked_sub(16)).map(|spare| spare / self.raw_step) {
                        Some(last) if last >= 3 => out_groups.min((last - 3) / 4 + 1),
                        _ => 0,
                    }
                }
            }
        }

        /// Stores the 32 elements of group `g` at `out`, from the symbols of its four groups of 8 (32-bit lanes).
        ///
        /// # Safety
        /// `g < groups(..)` for the `Merge16` this was built from, and 64 bytes writable at `out`.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn merge(&self, g: usize, symbols: [__m256i; 4], out: *mut u8) {
            // Narrow to 16 bits (symbols are below 2^16); the pack interleaves 128-bit halves, the permute
            // puts them back in order.
            let halves = [
                _mm256_permute4x64_epi64::<0xd8>(_mm256_packus_epi32(symbols[0], symbols[1])),
                _mm256_permute4x64_epi64::<0xd8>(_mm256_packus_epi32(symbols[2], symbols[3])),
            ];
            for (h, value) in halves.into_iter().enumerate() {
                let value = if self.raw_step == 0 {
                    value
                } else {
                    let first = self.raw.add(self.raw_step * (4 * g + 2 * h));
                    let src = _mm256_loadu2_m128i(
                        first.add(self.raw_step) as *const _,
                        first as *const _,
                    );
                    let pairs = _mm256_shuffle_epi8(src, self.byte_index);
                    let field = _mm256_and_si256(
                        _mm256_srli_epi16::<8>(_mm256_mullo_epi16(pairs, self.multiplier)),
                        self.field_mask,
                    );
                    _mm256_or_si256(value, _mm256_sll_epi16(field, self.shift))
                };
                _mm256_storeu_si256(out.add(32 * h) as *mut _, value);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2. Memory: groups of 32 elements are handled while `32 * (g + 1) <= ranks.len()`
    /// and `g < Merger256::groups` (output and raw loads in bounds); gathers index 256 symbols by a byte.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn merge16_avx2(ranks: &[u8], merge: Merge16<'_>, out: &mut [u8]) -> usize {
        let merger = Merger256::new(merge);
        let groups = (ranks.len() / 32).min(merger.groups(merge, out));
        for g in 0..groups {
            let at = ranks.as_ptr().add(32 * g);
            let symbols = std::array::from_fn(|k| merger.symbols.of_bytes(at.add(8 * k)));
            merger.merge(g, symbols, out.as_mut_ptr().add(64 * g));
        }
        groups * 32
    }

    /// # Safety
    /// The CPU must have AVX2 and POPCNT. Memory: as `avx2_steps` for the stream (a step starts only while
    /// `p + 32 <= word_count`), and a step runs only while `step < Merger256::groups`.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn avx2_merge16_steps<const LOADS: bool>(
        x: &mut [u32; LANES],
        pos: &mut usize,
        words: &[u8],
        table: &PackedTable,
        merge: Merge16<'_>,
        out: &mut [u8],
    ) -> usize {
        let word_count = words.len() / 2;
        let lanes = Lanes256::new(table);
        let merger = Merger256::new(merge);
        let steps = merger.groups(merge, out);
        let word_ptr = words.as_ptr();
        let out_ptr = out.as_mut_ptr();
        let mut states = load_quarters(x);
        let mut p = *pos;
        let mut step = 0;
        while step < steps && p + 32 <= word_count {
            let entry: [__m256i; 4] = std::array::from_fn(|k| lanes.gather::<LOADS>(states[k]));
            for (state, &e) in states.iter_mut().zip(&entry) {
                let used;
                (*state, used) = lanes.advance(*state, e, word_ptr.add(2 * p));
                p += used;
            }
            // Ranks are the entries' top bytes.
            let symbols =
                std::array::from_fn(|k| merger.symbols.of(_mm256_srli_epi32::<24>(entry[k])));
            merger.merge(step, symbols, out_ptr.add(64 * step));
            step += 1;
        }
        store_quarters(x, &states);
        *pos = p;
        step
    }

    /// # Safety
    /// The CPU must have AVX2; `merge.raw` holds at most three fields of 1 to 8 bits (checked by
    /// `merge32_with`). Memory: group g reads 8 ranks at `8g` and 16 bytes of each raw field at `width * g`,
    /// and writes 32 bytes at `32g`; groups run while all of these are in bounds.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn merge32_avx2(ranks: &[u8], merge: Merge32<'_>, out: &mut [u8]) -> usize {
        let mut groups = (ranks.len() / 8).min(out.len() / 32);
        for &(bytes, width, _) in merge.raw {
            // The last load of group g starts at width * g.
            groups = match bytes.len().checked_sub(16) {
                Some(spare) => groups.min(spare / width as usize + 1),
                None => 0,
            };
        }
        // Per raw field: lane i takes the two bytes holding bits i*width.. (both 128-bit halves see the same 16
        // bytes), shifted down by (i*width) % 8, masked, and moved to the field's place.
        let fields: Vec<(__m256i, __m256i, __m256i, __m128i)> = merge
            .raw
            .iter()
            .map(|&(_, width, shift)| {
                let mut index = [-1i8; 32];
                let mut down = [0u32; 8];
                for (i, down) in down.iter_mut().enumerate() {
                    let bit = i * width as usize;
                    let at = 16 * (i / 4) + 4 * (i % 4);
                    index[at] = (bit / 8) as i8;
                    index[at + 1] = (bit / 8 + 1) as i8;
                    *down = (bit % 8) as u32;
                }
                // SAFETY: both arrays are 32 readable bytes.
                let (index, down) = unsafe {
                    (
                        _mm256_loadu_si256(index.as_ptr() as *const _),
                        _mm256_loadu_si256(down.as_ptr() as *const _),
                    )
                };
                let mask = _mm256_set1_epi32(((1u32 << width) - 1) as i32);
                (index, down, mask, _mm_cvtsi32_si128(shift as i32))
            })
            .collect();
        let symbols = RankSymbols::new(*merge.symbols, merge.windows);
        for g in 0..groups {
            let mut value = symbols.of_bytes(ranks.as_ptr().add(8 * g));
            for (&(bytes, width, _), &(index, down, mask, shift)) in merge.raw.iter().zip(&fields) {
                let src = _mm_loadu_si128(bytes.as_ptr().add(width as usize * g) as *const _);
                let pairs = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(src), index);
                let field = _mm256_and_si256(_mm256_srlv_epi32(pairs, down), mask);
                value = _mm256_or_si256(value, _mm256_sll_epi32(field, shift));
            }
            _mm256_storeu_si256(out.as_mut_ptr().add(32 * g) as *mut _, value);
        }
        groups * 8
    }

    /// For each 8-bit emit mask, the source lane of each output lane when the emitting lanes are packed, in
    /// lane order, at the top: output lane `8 - c + i` (c emitting lanes) takes the i-th emitting lane, and the
    /// lanes below take lane 0 (they land below the stream and are overwritten or cut off).
    static COMPRESS_TOP_INDEX: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut m = 0;
        while m < 256 {
            let count = (m as u32).count_ones() as usize;
            let mut entry = 0u64;
            let (mut lane, mut i) = (0, 0);
            while lane < 8 {
                if m & (1 << lane) != 0 {
                    entry |= (lane as u64) << (8 * (8 - count + i));
                    i += 1;
                }
                lane += 1;
            }
            table[m] = entry;
            m += 1;
        }
        table
    };

    /// The 8 unsigned 32-bit lanes of `v` plus one half, as two vectors of 4 doubles (exact: below 2^33).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn plus_half_pd(v: __m256i) -> [__m256d; 2] {
        // Flipping the top bit makes the signed conversion give v - 2^31; adding 2^31 + 0.5 restores it.
        let flipped = _mm256_xor_si256(v, _mm256_set1_epi32(i32::MIN));
        let offset = _mm256_set1_pd(2147483648.5);
        [
            _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(flipped)), offset),
            _mm256_add_pd(
                _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(flipped)),
                offset,
            ),
        ]
    }

    /// The quotient `state / freq` comes from a double division, `trunc((state + 0.5) / freq)`, or (`LOADS`)
    /// a multiplication by the loaded `1 / freq`: exact, since the true quotient's distance to the next
    /// integer, at least `0.5 / freq`, is far above the rounding error (states below 2^32, frequencies at most
    /// 2^15). With gathers, two divisions per 8 lanes cost less than two gathers of inverses (Zen 3).
    ///
    /// # Safety
    /// The CPU must have AVX2 and POPCNT, and `symbols.len() <= *pos <= buffer.len()` (checked by
    /// `encode_steps_with`). Memory: symbols are masked to the table length (a power of two) before the
    /// gather or the loads (`freq_cum` and `inverse` both hold one entry per symbol); each group of 8 lanes
    /// reads the 8 symbols at `base <= symbols.len() - 8` and stores 8 words ending at `pos` (the emitted
    /// ones on top), and `pos` stays at least the number of symbols left (one word per symbol at most), so at
    /// least 8 when a group starts: every store stays inside `buffer`.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn encode_avx2<const LOADS: bool>(
        x: &mut [u32; LANES],
        symbols: &[u16],
        table: &super::super::rans::EncodeTable,
        buffer: &mut [u16],
        pos: &mut usize,
    ) -> usize {
        let steps = symbols.len() / LANES;
        let pb = table.prob_bits;
        let symbol_last = table.freq_cum.len() - 1;
        let symbol_mask = _mm256_set1_epi32(symbol_last as i32);
        let low16 = _mm256_set1_epi32(0xffff);
        let top_shift = _mm_cvtsi32_si128(32 - pb as i32);
        let pb_shift = _mm_cvtsi32_si128(pb as i32);
        let freq_cum = table.freq_cum.as_ptr() as *const i32;
        // Only the loads read the inverses (the gathers divide).
        let inverse = match LOADS {
            true => table.inverse().as_ptr(),
            false => std::ptr::null(),
        };
        let mut states = load_quarters(x);
        let mut p = *pos;
        for step in (0..steps).rev() {
            for q in (0..4).rev() {
                let base = step * LANES + 8 * q;
                let at = symbols.as_ptr().add(base);
                // With loads, each lane's `1 / freq` too, for a multiplication in place of the division.
                let (fc, inverse) = match LOADS {
                    false => {
                        let sym = _mm256_cvtepu16_epi32(_mm_loadu_si128(at as *const _));
                        let sym = _mm256_and_si256(sym, symbol_mask);
                        (_mm256_i32gather_epi32::<4>(freq_cum, sym), None)
                    }
                    true => {
                        let s = |k: usize| *at.add(k) as usize & symbol_last;
                        let inv = |k: usize| *inverse.add(s(k));
                        (
                            lanes_of(|k| *freq_cum.add(s(k))),
                            Some([
                                _mm256_setr_pd(inv(0), inv(1), inv(2), inv(3)),
                                _mm256_setr_pd(inv(4), inv(5), inv(6), inv(7)),
                            ]),
                        )
                    }
                };
                let freq = _mm256_srli_epi32::<16>(fc);
                let cum = _mm256_and_si256(fc, low16);
                let state = states[q];
                // Emit where state >> (32 - pb) >= freq (both below 2^16, so a signed compare is right).
                let keep = _mm256_cmpgt_epi32(freq, _mm256_srl_epi32(state, top_shift));
                let emit = !_mm256_movemask_ps(_mm256_castsi256_ps(keep)) as usize & 0xff;
                let count = emit.count_ones() as usize;
                let index =
                    _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(COMPRESS_TOP_INDEX[emit] as i64));
                let words = _mm256_and_si256(_mm256_permutevar8x32_epi32(state, index), low16);
                let words = _mm256_permute4x64_epi64::<0xd8>(_mm256_packus_epi32(words, words));
                _mm_storeu_si128(
                    buffer.as_mut_ptr().add(p - 8) as *mut _,
                    _mm256_castsi256_si128(words),
                );
                p -= count;
                let state = _mm256_blendv_epi8(_mm256_srli_epi32::<16>(state), state, keep);
                let plus_half = plus_half_pd(state);
                let quotient = match inverse {
                    Some(inv) => [
                        _mm256_mul_pd(plus_half[0], inv[0]),
                        _mm256_mul_pd(plus_half[1], inv[1]),
                    ],
                    None => [
                        _mm256_div_pd(
                            plus_half[0],
                            _mm256_cvtepi32_pd(_mm256_castsi256_si128(freq)),
                        ),
                        _mm256_div_pd(
                            plus_half[1],
                            _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(freq)),
                        ),
                    ],
                };
                let quotient = _mm256_set_m128i(
                    _mm256_cvttpd_epi32(quotient[1]),
                    _mm256_cvttpd_epi32(quotient[0]),
                );
                let rest = _mm256_sub_epi32(state, _mm256_mullo_epi32(quotient, freq));
                states[q] = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_sll_epi32(quotient, pb_shift), rest),
                    cum,
                );
            }
        }
        store_quarters(x, &states);
        *pos = p;
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::bitpack;
    use crate::codec::rans::tests::xorshift;

    /// `coded_states`' quotients against exact integer division at every precision the encoder can pick,
    /// for every frequency at the low precisions (where the single-precision error is largest) and sampled
    /// ones above, at states next to multiples of the frequency up to the largest a renormalized state takes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn coded_states_match_integer_division() {
        use std::arch::x86_64::*;
        if !x86::has_avx512() {
            return;
        }
        let mut seed = 5u64;
        for pb in 8..=crate::codec::freq::MAX_PROB_BITS {
            let rounds = x86::correction_rounds(pb).expect("8 bits and up are corrected");
            let freqs: Vec<u32> = match pb {
                8..=11 => (1..=1 << pb).collect(),
                _ => (0..3000)
                    .map(|_| 1 + (xorshift(&mut seed) % (1 << pb)) as u32)
                    .collect(),
            };
            for freq in freqs {
                let limit = (freq as u64) << (32 - pb);
                let top = limit / freq as u64;
                let mut states = Vec::new();
                for multiple in [top, top - 1, top / 2 + 1, 1 << 16] {
                    let at = multiple * freq as u64;
                    states.extend([at.saturating_sub(1), at, at + 1, at + freq as u64 - 1]);
                }
                states.extend((0..4).map(|_| xorshift(&mut seed) % limit));
                let states: Vec<u32> = states
                    .into_iter()
                    .filter(|&x| x >= 1 << 16 && x < limit)
                    .map(|x| x as u32)
                    .collect();
                for chunk in states.chunks(16) {
                    let mut lanes = [1u32 << 16; 16];
                    lanes[..chunk.len()].copy_from_slice(chunk);
                    let cum = (freq * 7) % (1 << pb);
                    let mut got = [0u32; 16];
                    // SAFETY: the CPU has AVX-512F (checked above); the pointers are 16 lanes each.
                    unsafe {
                        let next = x86::coded_states(
                            _mm512_loadu_si512(lanes.as_ptr() as *const _),
                            _mm512_set1_epi32(freq as i32),
                            _mm512_set1_epi32(cum as i32),
                            pb,
                            rounds,
                        );
                        _mm512_storeu_si512(got.as_mut_ptr() as *mut _, next);
                    }
                    for (&x, &g) in lanes.iter().zip(&got) {
                        let want = ((x / freq) << pb) + x % freq + cum;
                        assert_eq!(g, want, "pb={pb} freq={freq} state={x}");
                    }
                }
            }
        }
    }

    /// `merge32` against the elements put together one by one: zero to three raw fields of every width, with
    /// the symbols gathered and through windows, on lengths with and without a tail.
    #[test]
    fn merge32_matches_the_elements() {
        let mut seed = 21u64;
        let kernels = Kernel::available();
        for case in 0..60u32 {
            let n = [8usize, 37, 4096, 5003][case as usize % 4];
            let field_count = (case % 4) as usize;
            let widths: Vec<u32> = (0..field_count)
                .map(|_| 1 + (xorshift(&mut seed) % 8) as u32)
                .collect();
            // Raw fields at the bottom, the coded field's symbols above them.
            let shifts: Vec<u32> = widths
                .iter()
                .scan(0, |at, &w| Some(std::mem::replace(at, *at + w)))
                .collect();
            let coded_shift: u32 = widths.iter().sum();
            // Symbols of a windowed layout: rank r is r + base of its window of 32.
            let windows = crate::codec::freq::RankWindows {
                size_bits: 5,
                bases: std::array::from_fn(|k| (100 * k as u32).wrapping_sub(32 * k as u32)),
            };
            let symbols: [u32; 256] = std::array::from_fn(|r| {
                (r as u32).wrapping_add(windows.bases[r >> 5]) << coded_shift
            });
            let ranks: Vec<u8> = (0..n).map(|_| xorshift(&mut seed) as u8).collect();
            let values: Vec<Vec<u32>> = widths
                .iter()
                .map(|&w| {
                    (0..n)
                        .map(|_| (xorshift(&mut seed) as u32) & ((1 << w) - 1))
                        .collect()
                })
                .collect();
            let packed: Vec<Vec<u8>> = values
                .iter()
                .zip(&widths)
                .map(|(v, &w)| {
                    let mut bytes = Vec::new();
                    bitpack::pack_slice(v, w, &mut bytes);
                    bytes
                })
                .collect();
            let expected: Vec<u8> = (0..n)
                .flat_map(|i| {
                    let raw = values
                        .iter()
                        .zip(&shifts)
                        .map(|(v, &s)| v[i] << s)
                        .fold(0, |a, b| a | b);
                    (symbols[ranks[i] as usize] | raw).to_le_bytes()
                })
                .collect();
            let raw: Vec<(&[u8], u32, u32)> = packed
                .iter()
                .zip(&widths)
                .zip(&shifts)
                .map(|((b, &w), &s)| (&b[..], w, s))
                .collect();
            for &kernel in kernels {
                for windows in [None, Some(ShiftedWindows::new(&windows, coded_shift))] {
                    let mut out = vec![0u8; 4 * n];
                    let merge = Merge32 {
                        symbols: &symbols,
                        raw: &raw,
                        windows,
                    };
                    let done = merge32_with(kernel, &ranks, merge, &mut out);
                    assert_eq!(done % 8, 0);
                    if kernel != Kernel::Scalar && n >= 4096 {
                        assert!(done > 0, "{kernel:?} merged nothing");
                    }
                    assert_eq!(
                        out[..4 * done],
                        expected[..4 * done],
                        "{kernel:?} case {case}"
                    );
                }
            }
        }
    }
}
