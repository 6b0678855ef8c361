//! Frequency tables: count, normalize to a power-of-two total, serialize compactly, and build decode lookups.
//!
//! Pipeline (the order the encoder runs): 1. count symbols (`histogram`), 2. normalize the counts so they sum to
//! `2^prob_bits` with every occurring symbol at least 1 (`FreqTable::from_counts`), 3. serialize (`write`),
//! 4. the decoder parses it back (`parse`) and 5. expands it into a slot lookup (`DecodeTable`).

use std::collections::BinaryHeap;

/// The largest supported probability precision: 16-bit renormalization needs `prob_bits <= 16`, and a
/// single-symbol table (frequency `2^prob_bits`) must fit a `u16`.
pub const MAX_PROB_BITS: u32 = 15;
/// The largest alphabet an entropy-coded field may have, as a width in bits.
pub const MAX_SYMBOL_BITS: u32 = 12;

/// A normalized frequency table over the alphabet `0..2^symbol_bits`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreqTable {
    /// Probability precision: frequencies sum to `1 << prob_bits`.
    pub prob_bits: u32,
    /// Width of the symbols in bits.
    pub symbol_bits: u32,
    /// `freqs[s]`, zero for symbols that never occur. Length `1 << symbol_bits`.
    pub freqs: Vec<u32>,
    /// `cums[s]` = sum of `freqs[t]` for `t < s`. Length `1 << symbol_bits`.
    pub cums: Vec<u32>,
}

/// A table that could not be built or read; the caller adds the context.
#[derive(Debug, PartialEq, Eq)]
pub struct TableError(pub String);

fn table_error(what: impl Into<String>) -> TableError {
    TableError(what.into())
}

impl FreqTable {
    /// Normalizes `counts` (length `1 << symbol_bits`) to sum to `1 << prob_bits`, keeping every nonzero count
    /// at least 1, and spending the rounding where it costs the fewest bits. Returns None when more symbols
    /// occur than there are slots, or when nothing occurs.
    pub fn from_counts(counts: &[u64], symbol_bits: u32, prob_bits: u32) -> Option<FreqTable> {
        assert_eq!(counts.len(), 1 << symbol_bits);
        let used = UsedCounts::new(counts);
        let mut freqs = Vec::new();
        if !used.normalize(prob_bits, &mut freqs) {
            return None;
        }
        let table = FreqTable::from_freqs(used.dense(&freqs, symbol_bits), symbol_bits, prob_bits);
        debug_assert!(table.is_ok());
        table.ok()
    }

    /// Builds a table from explicit frequencies, checking that they sum to `1 << prob_bits`.
    pub fn from_freqs(
        freqs: Vec<u32>,
        symbol_bits: u32,
        prob_bits: u32,
    ) -> Result<FreqTable, TableError> {
        if freqs.len() != 1 << symbol_bits {
            return Err(table_error("alphabet size does not match the field width"));
        }
        let mut cums = Vec::with_capacity(freqs.len());
        let mut running = 0u64;
        for &f in &freqs {
            cums.push(running as u32);
            running += f as u64;
        }
        if running != 1u64 << prob_bits {
            return Err(table_error(format!(
                "frequencies sum to {running}, expected {}",
                1u64 << prob_bits
            )));
        }
        Ok(FreqTable {
            prob_bits,
            symbol_bits,
            freqs,
            cums,
        })
    }

    /// Bits needed to code `counts` with this table (the rANS payload, excluding the table and the flush).
    pub fn coded_bits(&self, counts: &[u64]) -> f64 {
        let used = counts.iter().zip(&self.freqs).filter(|(&c, _)| c > 0);
        coded_bits_of(used.map(|(&c, &f)| (c, f)), self.prob_bits)
    }

    /// Appends the serialized table: `prob_bits u8`, `symbol_count u16`, then a bit stream (LSB-first) of one
    /// `(gamma(delta + 1), gamma(freq))` pair per used symbol, zero-padded to a whole byte.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.prob_bits as u8);
        let used = self.freqs.iter().filter(|&&f| f > 0).count() as u16;
        out.extend_from_slice(&used.to_le_bytes());
        let mut bits = BitWriter::default();
        let mut next = 0u32;
        for (s, &f) in self.freqs.iter().enumerate() {
            if f > 0 {
                bits.gamma(s as u32 - next + 1);
                bits.gamma(f);
                next = s as u32 + 1;
            }
        }
        out.extend_from_slice(&bits.bytes);
    }

    /// Serialized size in bytes, counted without writing: a gamma code of `v` takes `2 * floor(log2 v) + 1`
    /// bits.
    pub fn serialized_len(&self) -> usize {
        let used = self.freqs.iter().enumerate().filter(|(_, &f)| f > 0);
        serialized_len_of(used.map(|(s, &f)| (s as u32, f)))
    }

    /// Parses a table for a field of `symbol_bits` from the front of `bytes`; returns it and the bytes used.
    pub fn parse(bytes: &[u8], symbol_bits: u32) -> Result<(FreqTable, usize), TableError> {
        let (&prob_byte, rest) = bytes
            .split_first()
            .ok_or_else(|| table_error("table truncated"))?;
        let prob_bits = prob_byte as u32;
        if !(1..=MAX_PROB_BITS).contains(&prob_bits) {
            return Err(table_error(format!(
                "prob_bits {prob_bits} outside 1..={MAX_PROB_BITS}"
            )));
        }
        let count_bytes = rest
            .get(..2)
            .ok_or_else(|| table_error("table truncated"))?;
        let used = u16::from_le_bytes([count_bytes[0], count_bytes[1]]) as u64;
        let alphabet = 1u64 << symbol_bits;
        if used == 0 || used > alphabet {
            return Err(table_error(format!(
                "symbol_count {used} outside 1..={alphabet}"
            )));
        }
        let mut freqs = vec![0u32; alphabet as usize];
        let mut reader = BitReader {
            bytes: &rest[2..],
            bit: 0,
        };
        let mut next = 0u64;
        for _ in 0..used {
            let symbol = next + reader.gamma()? as u64 - 1;
            if symbol >= alphabet {
                return Err(table_error(format!(
                    "symbol {symbol} outside the {symbol_bits}-bit alphabet"
                )));
            }
            let freq = reader.gamma()?;
            if freq > 1 << prob_bits {
                return Err(table_error(format!("frequency {freq} above 2^{prob_bits}")));
            }
            freqs[symbol as usize] = freq;
            next = symbol + 1;
        }
        let table = FreqTable::from_freqs(freqs, symbol_bits, prob_bits)?;
        Ok((table, 3 + reader.bit.div_ceil(8)))
    }
}

/// The symbols of a histogram that occur, with their counts, in ascending symbol order: the encoder normalizes
/// and prices tables over these alone, so the cost does not grow with the alphabet.
pub struct UsedCounts {
    /// `(symbol, count)` with `count > 0`.
    pub used: Vec<(u32, u64)>,
    pub total: u64,
}

impl UsedCounts {
    pub fn new(counts: &[u64]) -> UsedCounts {
        // Sized first (a vectorized count), so that it is allocated once; runs of 8 zero counts (most of a
        // wide field's alphabet) are then skipped with one test.
        let mut used: Vec<(u32, u64)> =
            Vec::with_capacity(counts.iter().filter(|&&c| c > 0).count());
        for (run, chunk) in counts.chunks(8).enumerate() {
            if chunk.iter().fold(0, |any, &c| any | c) == 0 {
                continue;
            }
            let first = 8 * run as u32;
            let nonzero = chunk.iter().enumerate().filter(|(_, &c)| c > 0);
            used.extend(nonzero.map(|(k, &c)| (first + k as u32, c)));
        }
        let total = used.iter().map(|&(_, c)| c).sum();
        UsedCounts { used, total }
    }

    /// Normalizes the counts to sum to `1 << prob_bits` as `FreqTable::from_counts` specifies, writing one
    /// frequency per used symbol into `freqs`. Returns false when more symbols occur than there are slots, or
    /// when nothing occurs.
    pub fn normalize(&self, prob_bits: u32, freqs: &mut Vec<u32>) -> bool {
        assert!((1..=MAX_PROB_BITS).contains(&prob_bits));
        let target = 1u64 << prob_bits;
        if self.total == 0 || self.used.len() as u64 > target {
            return false;
        }
        freqs.clear();
        freqs.extend(
            self.used
                .iter()
                .map(|&(_, c)| share_of(c, target, self.total).max(1) as u32),
        );
        let sum: u64 = freqs.iter().map(|&f| f as u64).sum();
        // Marginal cost, in bits, of moving one slot to or from a symbol: counts[s] * log2((f+1)/f), and
        // counts[s] * log2(f/(f-1)) = counts[s] * step_bits(f - 1).
        let gain = |c: u64, f: u32| c as f64 * log2_step(f);
        let loss = |c: u64, f: u32| c as f64 * log2_step(f - 1);
        /// A heap entry ordered by its cost (total order on f64), then by symbol (the index of a used symbol
        /// orders as the symbol does).
        struct Key(f64, usize);
        impl PartialEq for Key {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o) == std::cmp::Ordering::Equal
            }
        }
        impl Eq for Key {}
        impl PartialOrd for Key {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Key {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
            }
        }
        let count = |i: usize| self.used[i].1;
        if sum < target {
            let mut heap: BinaryHeap<Key> = (0..freqs.len())
                .map(|i| Key(gain(count(i), freqs[i]), i))
                .collect();
            for _ in sum..target {
                let Key(_, i) = heap.pop().expect("a used symbol exists");
                freqs[i] += 1;
                heap.push(Key(gain(count(i), freqs[i]), i));
            }
        } else if sum > target {
            // Take slots where it hurts least: highest -loss first.
            let mut heap: BinaryHeap<Key> = (0..freqs.len())
                .filter(|&i| freqs[i] > 1)
                .map(|i| Key(-loss(count(i), freqs[i]), i))
                .collect();
            for _ in target..sum {
                let Key(_, i) = heap.pop().expect("used <= target leaves a symbol above 1");
                freqs[i] -= 1;
                if freqs[i] > 1 {
                    heap.push(Key(-loss(count(i), freqs[i]), i));
                }
            }
        }
        true
    }

    /// `FreqTable::coded_bits` of these counts under the table whose used symbols have `freqs` (same sum, in
    /// the same order).
    pub fn coded_bits(&self, freqs: &[u32], prob_bits: u32) -> f64 {
        coded_bits_of(
            self.used.iter().zip(freqs).map(|(&(_, c), &f)| (c, f)),
            prob_bits,
        )
    }

    /// `FreqTable::serialized_len` of the table whose used symbols have `freqs`.
    pub fn serialized_len(&self, freqs: &[u32]) -> usize {
        serialized_len_of(self.used.iter().zip(freqs).map(|(&(s, _), &f)| (s, f)))
    }

    /// A lower bound on `serialized_len` of a table over these symbols at `prob_bits` (at any precision when
    /// None). Normalizing only raises frequencies from their rounded-down shares when those fit the total,
    /// and never takes one below 1.
    pub fn serialized_len_floor(&self, prob_bits: Option<u32>) -> usize {
        let target = prob_bits.map_or(0, |p| 1u64 << p);
        let total = self.total.max(1);
        // Bits with every frequency at 1, and with every frequency at its rounded-down share (at least 1).
        let (mut ones, mut shares, mut share_sum) = (0, 0, 0u64);
        let mut next = 0u32;
        for &(s, c) in &self.used {
            let delta = gamma_bits(s - next + 1);
            let share = share_of(c, target, total).max(1);
            ones += delta + 1;
            shares += delta + gamma_bits(share.min(u32::MAX as u64) as u32);
            share_sum += share;
            next = s + 1;
        }
        let bits = if prob_bits.is_some() && share_sum <= target {
            shares
        } else {
            ones
        };
        3 + bits.div_ceil(8)
    }

    /// `entropy_bits` of the histogram these counts came from (the same value, bit for bit).
    pub fn entropy_bits(&self) -> f64 {
        entropy_of(self.used.iter().map(|&(_, c)| c))
    }

    /// The frequencies of the whole `symbol_bits` alphabet (zero for unused symbols).
    pub fn dense(&self, freqs: &[u32], symbol_bits: u32) -> Vec<u32> {
        let mut out = vec![0u32; 1 << symbol_bits];
        for (&(s, _), &f) in self.used.iter().zip(freqs) {
            out[s as usize] = f;
        }
        out
    }
}

/// `count * target / total` rounded down, in 64 bits when the product fits (the usual case) and 128 otherwise.
fn share_of(count: u64, target: u64, total: u64) -> u64 {
    match count.checked_mul(target) {
        Some(product) => product / total,
        None => (count as u128 * target as u128 / total as u128) as u64,
    }
}

/// Bits of `count` symbols each coded at frequency `freq` out of `2^prob_bits`, summed over `(count, freq)`
/// pairs in symbol order.
fn coded_bits_of(pairs: impl Iterator<Item = (u64, u32)>, prob_bits: u32) -> f64 {
    pairs
        .map(|(c, f)| c as f64 * (prob_bits as f64 - log2_of(f)))
        .sum()
}

/// Frequencies and counts below this have their logarithms looked up (`LOG2_TABLES`): the encoder's tables
/// reach `2^12`, pricing them takes a logarithm per symbol and precision, and an entropy one per count.
const LOG2_TABLE_LEN: usize = (1 << 12) + 1;

/// `log2(f)` and `step_bits(f)` for `f < LOG2_TABLE_LEN`, from the same formulas as outside the table, so a
/// lookup gives the same value bit for bit.
static LOG2_TABLES: std::sync::LazyLock<(Vec<f64>, Vec<f64>)> = std::sync::LazyLock::new(|| {
    let f = || (0..LOG2_TABLE_LEN).map(|f| f as f64);
    (f().map(f64::log2).collect(), f().map(step_bits).collect())
});

/// `log2((f + 1) / f)`: the bits saved per occurrence when a symbol's frequency grows from `f` to `f + 1`.
fn step_bits(f: f64) -> f64 {
    ((f + 1.0) / f).log2()
}

/// `log2(f)`.
fn log2_of(f: u32) -> f64 {
    log2_of_count(f as u64)
}

/// `step_bits(f)`.
fn log2_step(f: u32) -> f64 {
    LOG2_TABLES
        .1
        .get(f as usize)
        .map_or_else(|| step_bits(f as f64), |&v| v)
}

/// Serialized length of a table with these `(symbol, freq)` pairs, ascending: 3 bytes of head, then a
/// `(gamma(delta + 1), gamma(freq))` pair per symbol, padded to a byte (`FreqTable::write`).
fn serialized_len_of(pairs: impl Iterator<Item = (u32, u32)>) -> usize {
    let mut bits = 0;
    let mut next = 0u32;
    for (s, f) in pairs {
        bits += gamma_bits(s - next + 1) + gamma_bits(f);
        next = s + 1;
    }
    3 + bits.div_ceil(8)
}

/// Length of the Elias-gamma code of `v >= 1`, in bits.
fn gamma_bits(v: u32) -> usize {
    2 * (31 - v.leading_zeros()) as usize + 1
}

/// Longest Elias-gamma prefix accepted: values below 2^21 (frequencies are at most 2^15, deltas 2^12).
const MAX_GAMMA_ZEROS: u32 = 20;

/// LSB-first bit writer for tables.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    bit: usize,
}

impl BitWriter {
    fn push(&mut self, bit: u32) {
        if self.bit.is_multiple_of(8) {
            self.bytes.push(0);
        }
        if bit != 0 {
            *self.bytes.last_mut().expect("pushed above") |= 1 << (self.bit % 8);
        }
        self.bit += 1;
    }

    /// Elias gamma, LSB-first: `k` zero bits, a one bit, then the low `k` bits of `v` (LSB first), where
    /// `k = floor(log2 v)`; `v >= 1`.
    fn gamma(&mut self, v: u32) {
        debug_assert!(v >= 1);
        let k = 31 - v.leading_zeros();
        for _ in 0..k {
            self.push(0);
        }
        self.push(1);
        for b in 0..k {
            self.push((v >> b) & 1);
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    bit: usize,
}

impl BitReader<'_> {
    fn next(&mut self) -> Result<u32, TableError> {
        let byte = self
            .bytes
            .get(self.bit / 8)
            .ok_or_else(|| table_error("table truncated"))?;
        let bit = (byte >> (self.bit % 8)) & 1;
        self.bit += 1;
        Ok(bit as u32)
    }

    fn gamma(&mut self) -> Result<u32, TableError> {
        let mut k = 0;
        while self.next()? == 0 {
            k += 1;
            if k > MAX_GAMMA_ZEROS {
                return Err(table_error("gamma code longer than 20 zero bits"));
            }
        }
        let mut v = 1u32 << k;
        for b in 0..k {
            v |= self.next()? << b;
        }
        Ok(v)
    }
}

/// Counts symbols into a histogram of `1 << symbol_bits` bins.
pub fn histogram(symbols: impl Iterator<Item = u32>, symbol_bits: u32) -> Vec<u64> {
    let mut counts = vec![0u64; 1 << symbol_bits];
    for s in symbols {
        counts[s as usize] += 1;
    }
    counts
}

/// Zero-order entropy of a histogram in bits per symbol.
pub fn entropy_bits(counts: &[u64]) -> f64 {
    entropy_of(counts.iter().copied())
}

/// `entropy_bits` of the counts `counts` yields, in order (zeros add nothing).
pub(crate) fn entropy_of(counts: impl Iterator<Item = u64> + Clone) -> f64 {
    let total: u64 = counts.clone().sum();
    if total == 0 {
        return 0.0;
    }
    // log2(t) - sum(c log2 c) / t: a logarithm per count, looked up for counts of the table's range, which
    // is most of a histogram's (counts of 1 add nothing).
    let (weighted, largest) = counts
        .filter(|&c| c > 1)
        .fold((0.0, 0), |(sum, largest), c| {
            (sum + c as f64 * log2_of_count(c), largest.max(c))
        });
    if largest == total {
        return 0.0;
    }
    (log2_of_count(total) - weighted / total as f64).max(0.0)
}

/// `log2(c)`, looked up in `LOG2_TABLES` where it reaches.
fn log2_of_count(c: u64) -> f64 {
    LOG2_TABLES
        .0
        .get(c as usize)
        .map_or_else(|| (c as f64).log2(), |&v| v)
}

/// The decoder's view of a table: the packed table of the SIMD decoders when it fits, and the scalar
/// decoder's slot arrays, built on first use (a block the fast path decodes whole never needs them).
#[derive(Clone, Debug)]
pub struct DecodeTable {
    pub prob_bits: u32,
    /// The same table packed for the SIMD decoders, when it fits.
    pub packed: Option<PackedTable>,
    freqs: Vec<u32>,
    slots: std::sync::OnceLock<SlotArrays>,
}

/// Two arrays indexed by slot: `freq << 16 | (slot - cum)` and the symbol. (`freq <= 2^15` and
/// `slot - cum < freq` fit 16 bits each.)
#[derive(Clone, Debug)]
pub struct SlotArrays {
    /// Per slot: `freq << 16 | bias`.
    pub freq_bias: Vec<u32>,
    /// Per slot: the symbol.
    pub symbols: Vec<u16>,
}

/// A decode table packed into one `u32` per slot, so a SIMD decoder needs one gather per symbol:
/// `rank << 24 | (freq - 1) << 12 | (slot - cum)`, where `rank` indexes `alphabet`. It exists for tables of
/// at most 12 probability bits and 256 symbols, which covers the tables the encoder writes for real weights.
/// Ranks are laid out in `windows` when the symbols that occur allow it, else they are the symbols' places
/// in ascending order. (Ranks are the decoder's own choice: the file holds only the frequencies.)
#[derive(Clone, Debug)]
pub struct PackedTable {
    pub prob_bits: u32,
    pub entries: Vec<u32>,
    /// The symbol of each rank (0 for a rank no symbol has).
    pub alphabet: Vec<u16>,
    pub windows: Option<RankWindows>,
}

/// Ranks laid out in windows of `2^size_bits` consecutive symbols: the k-th window starts at the smallest
/// symbol above the windows before it, and a symbol `s` in it has rank `k * 2^size_bits + (s - start_k)`.
/// A rank `r` then becomes its symbol by one addition, `r + bases[r >> size_bits]` (wrapping), which SIMD
/// decoders do with a register permute instead of a table gather. At most 8 windows, of 32 to 128 symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankWindows {
    pub size_bits: u32,
    /// `start_k - k * 2^size_bits` (wrapping) for window k; unused windows hold 0.
    pub bases: [u32; 8],
}

impl RankWindows {
    /// Windows covering the ascending `used` symbols, of the largest size that needs at most `256 / size`
    /// of them, if any, with each symbol's rank.
    fn cover(used: &[u16]) -> Option<(RankWindows, Vec<u32>)> {
        (5..=7).rev().find_map(|size_bits| {
            let size = 1u32 << size_bits;
            let mut starts: Vec<u32> = Vec::new();
            let mut ranks = Vec::with_capacity(used.len());
            for &s in used {
                let s = s as u32;
                if starts.last().is_none_or(|&start| s >= start + size) {
                    starts.push(s);
                }
                let k = starts.len() - 1;
                ranks.push(((k as u32) << size_bits) + s - starts[k]);
            }
            (starts.len() <= (256 >> size_bits) as usize).then(|| {
                let mut bases = [0u32; 8];
                for (k, &start) in starts.iter().enumerate() {
                    bases[k] = start.wrapping_sub((k as u32) << size_bits);
                }
                (RankWindows { size_bits, bases }, ranks)
            })
        })
    }
}

/// Most probability bits a packed table can have.
pub const PACKED_MAX_PROB_BITS: u32 = 12;
/// Most symbols a packed table can have.
pub const PACKED_MAX_SYMBOLS: usize = 256;

impl PackedTable {
    pub fn new(table: &FreqTable) -> Option<PackedTable> {
        if table.prob_bits > PACKED_MAX_PROB_BITS {
            return None;
        }
        let used: Vec<(u16, u32)> = table
            .freqs
            .iter()
            .enumerate()
            .filter(|(_, &f)| f > 0)
            .map(|(s, &f)| (s as u16, f))
            .collect();
        if used.len() > PACKED_MAX_SYMBOLS {
            return None;
        }
        let symbols: Vec<u16> = used.iter().map(|&(s, _)| s).collect();
        let (windows, ranks) = match RankWindows::cover(&symbols) {
            Some((windows, ranks)) => (Some(windows), ranks),
            None => (None, (0..symbols.len() as u32).collect()),
        };
        let mut alphabet = vec![0u16; ranks.last().map_or(0, |&r| r as usize + 1)];
        let mut entries = Vec::with_capacity(1 << table.prob_bits);
        for (&(s, f), &rank) in used.iter().zip(&ranks) {
            alphabet[rank as usize] = s;
            entries.extend((0..f).map(|bias| rank << 24 | (f - 1) << 12 | bias));
        }
        Some(PackedTable {
            prob_bits: table.prob_bits,
            entries,
            alphabet,
            windows,
        })
    }
}

impl DecodeTable {
    pub fn new(table: &FreqTable) -> DecodeTable {
        DecodeTable {
            prob_bits: table.prob_bits,
            packed: PackedTable::new(table),
            freqs: table.freqs.clone(),
            slots: std::sync::OnceLock::new(),
        }
    }

    /// The scalar decoder's slot arrays.
    pub fn slots(&self) -> &SlotArrays {
        self.slots.get_or_init(|| {
            let slots = 1usize << self.prob_bits;
            let mut freq_bias = Vec::with_capacity(slots);
            let mut symbols = Vec::with_capacity(slots);
            for (s, &f) in self.freqs.iter().enumerate() {
                freq_bias.extend((0..f).map(|bias| f << 16 | bias));
                symbols.extend(std::iter::repeat_n(s as u16, f as usize));
            }
            debug_assert_eq!(freq_bias.len(), slots);
            SlotArrays { freq_bias, symbols }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entropy from looked-up logarithms agrees with `-sum p log2 p` to 1e-12 bits per symbol, on
    /// histograms with counts inside and beyond the table, and is exactly 0 for a single symbol.
    #[test]
    fn entropy_matches_the_direct_formula() {
        let mut seed = 9u64;
        let mut next = || crate::codec::rans::tests::xorshift(&mut seed);
        for case in 0..200 {
            let len = 1 + (next() % 600) as usize;
            let top = [3, 5000, 1 << 20, 1 << 40][case % 4];
            let counts: Vec<u64> = (0..len)
                .map(|_| next() % top * (next() % 3).min(1))
                .collect();
            let total: u64 = counts.iter().sum();
            let direct: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / total as f64;
                    -p * p.log2()
                })
                .sum();
            let h = entropy_bits(&counts);
            assert!(
                (h - direct).abs() < 1e-12,
                "case {case}: {h} against {direct}"
            );
        }
        assert_eq!(entropy_bits(&[0, 12345, 0]).to_bits(), 0f64.to_bits());
        assert_eq!(entropy_bits(&[0, 0]).to_bits(), 0f64.to_bits());
    }

    /// Every symbol of a packed table is found again from its rank, through the alphabet and, where the
    /// ranks are in windows, through the windows' one addition; alphabets the windows cannot cover keep
    /// ascending ranks.
    #[test]
    fn packed_ranks_map_back_to_their_symbols() {
        let mut seed = 5u64;
        let mut next = || crate::codec::rans::tests::xorshift(&mut seed);
        let mut windowed = 0;
        for case in 0..300 {
            let bits = 4 + (case % 9) as u32;
            let mut counts = vec![0u64; 1 << bits];
            // Clusters of symbols (like the exponents of weights of both signs), sometimes scattered ones.
            for _ in 0..1 + next() % 4 {
                let centre = (next() % (1 << bits)) as usize;
                let spread = 1 + (next() % 80) as usize;
                for _ in 0..200 {
                    let s = centre + (next() as usize % spread);
                    counts[s.min((1 << bits) - 1)] += 1;
                }
            }
            let Some(table) = FreqTable::from_counts(&counts, bits, 12) else {
                continue;
            };
            let Some(packed) = PackedTable::new(&table) else {
                continue;
            };
            windowed += packed.windows.is_some() as u32;
            let mut seen = vec![false; packed.alphabet.len()];
            for e in &packed.entries {
                let rank = e >> 24;
                let symbol = packed.alphabet[rank as usize];
                assert!(table.freqs[symbol as usize] > 0, "case {case}");
                seen[rank as usize] = true;
                if let Some(w) = &packed.windows {
                    let from_windows = rank.wrapping_add(w.bases[(rank >> w.size_bits) as usize]);
                    assert_eq!(from_windows, symbol as u32, "case {case}");
                }
            }
            let used = table.freqs.iter().filter(|&&f| f > 0).count();
            assert_eq!(seen.iter().filter(|&&s| s).count(), used, "case {case}");
            if packed.windows.is_none() {
                assert_eq!(packed.alphabet.len(), used, "case {case}");
                assert!(
                    packed.alphabet.windows(2).all(|p| p[0] < p[1]),
                    "case {case}"
                );
            }
        }
        assert!(windowed > 50, "only {windowed} alphabets in windows");
    }

    #[test]
    fn serialized_len_counts_what_write_writes() {
        for (symbol_bits, prob_bits, seed) in [
            (4, 4, 1u64),
            (8, 12, 2),
            (11, 12, 3),
            (12, 15, 4),
            (1, 1, 5),
        ] {
            let mut x = seed;
            let counts: Vec<u64> = (0..1u64 << symbol_bits)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if x >> 62 == 0 {
                        0
                    } else {
                        (x >> 40) % 1000
                    }
                })
                .collect();
            if let Some(table) = FreqTable::from_counts(&counts, symbol_bits, prob_bits) {
                let mut out = Vec::new();
                table.write(&mut out);
                assert_eq!(
                    table.serialized_len(),
                    out.len(),
                    "{symbol_bits} {prob_bits}"
                );
            }
        }
    }

    /// Seeded histograms of `1 << symbol_bits` bins: some bins empty, the rest skewed over several decades.
    fn random_counts(symbol_bits: u32, seed: u64) -> Vec<u64> {
        let mut x = seed;
        (0..1u64 << symbol_bits)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match x >> 61 {
                    0..=2 => 0,
                    3 => 1 + (x >> 50) % 3,
                    _ => (x >> 40) % (1 << ((x >> 33) % 20)),
                }
            })
            .collect()
    }

    #[test]
    fn used_counts_price_tables_as_the_dense_table_does() {
        for (symbol_bits, seed) in [(1, 1u64), (4, 2), (8, 3), (10, 4), (12, 5)] {
            let counts = random_counts(symbol_bits, seed);
            let used = UsedCounts::new(&counts);
            let mut freqs = Vec::new();
            for prob_bits in 1..=MAX_PROB_BITS {
                let table = FreqTable::from_counts(&counts, symbol_bits, prob_bits);
                let normalized = used.normalize(prob_bits, &mut freqs);
                assert_eq!(normalized, table.is_some(), "{symbol_bits} {prob_bits}");
                let Some(table) = table else { continue };
                assert_eq!(used.dense(&freqs, symbol_bits), table.freqs);
                assert_eq!(used.serialized_len(&freqs), table.serialized_len());
                assert_eq!(
                    used.coded_bits(&freqs, prob_bits).to_bits(),
                    table.coded_bits(&counts).to_bits()
                );
                // The floors never exceed the real size, at this precision or any.
                let len = table.serialized_len();
                assert!(used.serialized_len_floor(Some(prob_bits)) <= len);
                assert!(used.serialized_len_floor(None) <= len);
            }
        }
    }

    #[test]
    fn looked_up_logarithms_equal_the_formulas() {
        // Inside the tables, at their edge and past it.
        for f in (1..LOG2_TABLE_LEN as u32 + 64).chain([1 << 16, u32::MAX]) {
            assert_eq!(log2_of(f).to_bits(), (f as f64).log2().to_bits(), "{f}");
            let step = ((f as f64 + 1.0) / f as f64).log2();
            assert_eq!(log2_step(f).to_bits(), step.to_bits(), "{f}");
            if f > 1 {
                let loss = (f as f64 / (f as f64 - 1.0)).log2();
                assert_eq!(log2_step(f - 1).to_bits(), loss.to_bits(), "{f}");
            }
        }
    }

    #[test]
    fn normalization_sums_and_keeps_rare_symbols() {
        let mut counts = vec![0u64; 256];
        counts[0] = 1_000_000;
        counts[7] = 1;
        counts[200] = 3;
        for bits in [2, 8, 12, 15] {
            let t = FreqTable::from_counts(&counts, 8, bits).unwrap();
            assert_eq!(t.freqs.iter().map(|&f| f as u64).sum::<u64>(), 1 << bits);
            assert!(t.freqs[7] >= 1 && t.freqs[200] >= 1 && t.freqs[0] >= 1);
            assert_eq!(t.freqs[1], 0);
        }
        // Three symbols do not fit a 1-bit table.
        assert!(FreqTable::from_counts(&counts, 8, 1).is_none());
        assert!(FreqTable::from_counts(&[0; 4], 2, 4).is_none());
    }

    #[test]
    fn normalization_is_near_entropy_and_beats_naive_scaling() {
        let counts: Vec<u64> = (0..1024u64).map(|s| (1u64 << 20) >> (s % 21)).collect();
        let total: u64 = counts.iter().sum();
        let h = entropy_bits(&counts);
        let t = FreqTable::from_counts(&counts, 10, 15).unwrap();
        let coded = t.coded_bits(&counts) / total as f64;
        // Naive: scale, floor at 1, give the rounding error to the most frequent symbol.
        let mut naive: Vec<u32> = counts
            .iter()
            .map(|&c| ((c << 15) / total).max(1) as u32)
            .collect();
        let sum: i64 = naive.iter().map(|&f| f as i64).sum();
        let top = (0..1024).max_by_key(|&s| counts[s]).unwrap();
        naive[top] = (naive[top] as i64 + (1 << 15) - sum) as u32;
        let naive = FreqTable::from_freqs(naive, 10, 15).unwrap();
        let naive_coded = naive.coded_bits(&counts) / total as f64;
        assert!(
            coded >= h - 1e-9 && coded < h + 0.03,
            "coded {coded} vs entropy {h}"
        );
        assert!(coded <= naive_coded, "{coded} > naive {naive_coded}");
    }

    #[test]
    fn table_round_trips_through_bytes() {
        let counts: Vec<u64> = (0..4096u64)
            .map(|s| if s % 3 == 0 { s * s % 977 } else { 0 })
            .collect();
        let t = FreqTable::from_counts(&counts, 12, 14).unwrap();
        let mut bytes = Vec::new();
        t.write(&mut bytes);
        bytes.push(0xAA); // trailing data is not consumed
        let (back, used) = FreqTable::parse(&bytes, 12).unwrap();
        assert_eq!(back, t);
        assert_eq!(used, bytes.len() - 1);
        assert_eq!(used, t.serialized_len());
    }

    #[test]
    fn parse_rejects_bad_tables() {
        // LSB-first gamma codes: gamma(1) = 1; gamma(16) = 0000 1 0000 (9 bits).
        // One symbol (delta+1 = 1) with freq 16 = 2^4: bits 1, 0000 1 0000 -> 0b0010_0001, 0b0000_0000
        let one_symbol = [4u8, 1, 0, 0b0010_0001, 0];
        assert_eq!(FreqTable::parse(&one_symbol, 8).unwrap().1, 5);
        // prob_bits 0 and 16
        assert!(FreqTable::parse(&[0, 1, 0, 0b0010_0001, 0], 8).is_err());
        assert!(FreqTable::parse(&[16, 1, 0, 0b0010_0001, 0], 8).is_err());
        // freq 1 does not sum to 2^4: bits 1, 1
        assert!(FreqTable::parse(&[4, 1, 0, 0b11], 8).is_err());
        // symbol past a 1-bit alphabet: delta+1 = 3 (bits 0 1 1), freq 2 (bits 0 1 0)
        assert!(FreqTable::parse(&[1, 1, 0, 0b0001_0110], 1).is_err());
        // frequency above 2^prob_bits: freq 32 with prob_bits 4
        assert!(FreqTable::parse(&[4, 1, 0, 0b0100_0001, 0], 8).is_err());
        // truncated
        assert!(FreqTable::parse(&[4, 1], 8).is_err());
        assert!(FreqTable::parse(&[4, 1, 0], 8).is_err());
        assert!(FreqTable::parse(&[4, 1, 0, 0b0010_0001], 8).is_err());
        // an endless run of zero bits
        assert!(FreqTable::parse(&[4, 1, 0, 0, 0, 0, 0], 8).is_err());
        // zero symbols
        assert!(FreqTable::parse(&[4, 0, 0], 8).is_err());
    }
}
