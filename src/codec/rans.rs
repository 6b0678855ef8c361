//! Interleaved rANS: 32 lanes, 32-bit states, one shared stream of 16-bit words (format-spec/nzt.md, "rANS bitstream").
//!
//! Element `i` of a block belongs to lane `i % 32`. Each element may carry several entropy-coded fields, each
//! with its own table, all coded through the same lane state. The encoder walks backwards (elements from last to
//! first, fields from last to first, lanes from 31 to 0) and its words are reversed at the end, so the decoder
//! walks forwards and, at each step, lanes needing a word take the next one in ascending lane order.
//!
//! State invariant: between symbols every state lies in `[STATE_LOWER, 2^32)`. The encoder starts each lane at
//! `STATE_LOWER`, so a decoder that ends anywhere else, or with words left over, has read corrupt data.

use super::freq::{DecodeTable, FreqTable, PackedTable};
use super::simd::Kernel;

pub const LANES: usize = 32;
/// Lower bound `L` of the normalized state interval.
pub const STATE_LOWER: u32 = 1 << 16;
const WORD_BITS: u32 = 16;

/// What the encoder produces for one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The decoder's initial states (the encoder's final states).
    pub states: [u32; LANES],
    /// Words in decoder order.
    pub words: Vec<u16>,
}

/// One entropy-coded field of every element: its symbols and its table.
pub struct FieldSymbols<'a> {
    pub symbols: &'a [u16],
    pub table: &'a FreqTable,
}

/// Encodes `n` elements whose coded fields are `fields` (most significant first).
/// Every symbol must have a nonzero frequency in its table.
pub fn encode(fields: &[FieldSymbols<'_>], n: usize) -> Encoded {
    let mut states = [STATE_LOWER; LANES];
    let mut emitted: Vec<u16> = Vec::with_capacity(n * fields.len() / 2 + 16);
    for step in (0..n.div_ceil(LANES)).rev() {
        let base = step * LANES;
        let lanes = (n - base).min(LANES);
        for field in fields.iter().rev() {
            let prob_bits = field.table.prob_bits;
            let symbols = &field.symbols[base..base + lanes];
            for lane in (0..lanes).rev() {
                let symbol = symbols[lane] as usize;
                let freq = field.table.freqs[symbol];
                let cum = field.table.cums[symbol];
                debug_assert!(freq > 0, "symbol {symbol} missing from its table");
                let mut x = states[lane];
                let x_max = (freq as u64) << (32 - prob_bits);
                if x as u64 >= x_max {
                    emitted.push(x as u16);
                    x >>= WORD_BITS;
                }
                states[lane] = ((x / freq) << prob_bits) + (x % freq) + cum;
            }
        }
    }
    emitted.reverse();
    Encoded {
        states,
        words: emitted,
    }
}

/// A table prepared for `encode_single`: per symbol, the reciprocal of its frequency, so the hot loop does not
/// divide.
pub struct EncodeTable {
    pub(crate) prob_bits: u32,
    /// For the scalar steps (block tails, CPUs without the SIMD encoder), built on first use: a full block
    /// on the SIMD path never needs it.
    symbols: std::sync::OnceLock<Vec<EncodeSymbol>>,
    /// For the SIMD encoder, per symbol: `freq << 16 | cum`.
    pub(crate) freq_cum: Vec<u32>,
    /// For the AVX2 encoder, per symbol: `1 / freq` (0 where freq is 0), built on first use (the AVX-512
    /// encoder divides in single precision instead).
    inverse: std::sync::OnceLock<Vec<f64>>,
}

#[derive(Clone, Copy, Default)]
struct EncodeSymbol {
    /// `ceil(2^63 / freq)`: for every state `x < 2^32`, `x / freq == (x * reciprocal) >> 63` (the rounding error
    /// stays below 2^-31, less than the gap `1 / freq` between the fraction of `x / freq` and 1).
    reciprocal: u64,
    /// A state at or above `freq << (32 - prob_bits)` must emit a word first.
    x_max: u64,
    freq: u32,
    cum: u32,
}

impl EncodeTable {
    pub fn new(table: &FreqTable) -> EncodeTable {
        // Frequencies and sums are below 2^16 (`MAX_PROB_BITS` is 15), so they share a word.
        let freq_cum: Vec<u32> = table
            .freqs
            .iter()
            .zip(&table.cums)
            .map(|(&f, &c)| f << 16 | c)
            .collect();
        EncodeTable {
            prob_bits: table.prob_bits,
            symbols: std::sync::OnceLock::new(),
            freq_cum,
            inverse: std::sync::OnceLock::new(),
        }
    }

    /// Per symbol, `1 / freq` (0 where freq is 0).
    pub(crate) fn inverse(&self) -> &[f64] {
        self.inverse.get_or_init(|| {
            (self.freq_cum.iter())
                .map(|&fc| match fc >> 16 {
                    0 => 0.0,
                    freq => 1.0 / freq as f64,
                })
                .collect()
        })
    }

    fn symbols(&self) -> &[EncodeSymbol] {
        self.symbols.get_or_init(|| {
            self.freq_cum
                .iter()
                .map(|&fc| match (fc >> 16, fc & 0xffff) {
                    (0, _) => EncodeSymbol::default(),
                    (freq, cum) => EncodeSymbol {
                        reciprocal: (1u64 << 63).div_ceil(freq as u64),
                        x_max: (freq as u64) << (32 - self.prob_bits),
                        freq,
                        cum,
                    },
                })
                .collect()
        })
    }
}

/// `encode` for a single field, without division or branches: same states and words. Words are written
/// backwards from the end of a buffer (one slot per symbol is enough), so they come out in decoder order.
pub fn encode_single(symbols: &[u16], table: &EncodeTable) -> Encoded {
    let mut buffer = Vec::new();
    let (states, start) = encode_single_in(symbols, table, &mut buffer);
    buffer.drain(..start);
    Encoded {
        states,
        words: buffer,
    }
}

/// `encode_single` into a reusable buffer: returns the states and where the words start in `buffer`.
pub fn encode_single_in(
    symbols: &[u16],
    table: &EncodeTable,
    buffer: &mut Vec<u16>,
) -> ([u32; LANES], usize) {
    encode_single_in_with(Kernel::selected(), symbols, table, buffer)
}

/// `encode_single_in` with a chosen kernel for the full steps.
pub fn encode_single_in_with(
    kernel: Kernel,
    symbols: &[u16],
    table: &EncodeTable,
    buffer: &mut Vec<u16>,
) -> ([u32; LANES], usize) {
    let n = symbols.len();
    let mut states = [STATE_LOWER; LANES];
    // One extra slot: every lane writes a word below `pos` whether or not it emits it. Words from the
    // returned position on are all written, so a reused buffer is not cleared first.
    buffer.truncate(n + 1);
    buffer.resize(n + 1, 0);
    let mut pos = n + 1;
    let (full, last) = symbols.split_at(n - n % LANES);
    table.scalar_step(&mut states, last, buffer, &mut pos);
    let done = super::simd::encode_steps_with(kernel, &mut states, full, table, buffer, &mut pos);
    for chunk in full[..full.len() - done * LANES].rchunks_exact(LANES) {
        table.scalar_step(&mut states, chunk, buffer, &mut pos);
    }
    (states, pos)
}

impl EncodeTable {
    /// Encodes one step (lanes from last to first), writing emitted words below `pos`.
    fn scalar_step(
        &self,
        states: &mut [u32; LANES],
        chunk: &[u16],
        buffer: &mut [u16],
        pos: &mut usize,
    ) {
        if chunk.is_empty() {
            return;
        }
        let symbols = self.symbols();
        for (x, &symbol) in states[..chunk.len()].iter_mut().zip(chunk).rev() {
            let e = symbols[symbol as usize];
            debug_assert!(e.freq > 0, "symbol {symbol} missing from its table");
            let mut state = *x;
            let emit = (state as u64 >= e.x_max) as usize;
            buffer[*pos - 1] = state as u16;
            *pos -= emit;
            state >>= WORD_BITS * emit as u32;
            let q = ((state as u128 * e.reciprocal as u128) >> 63) as u32;
            *x = (q << self.prob_bits) + (state - q * e.freq) + e.cum;
        }
    }
}

/// Why a stream failed to decode.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamError(pub &'static str);

/// A field to decode into: `out[i]` receives element i's symbol.
pub struct FieldOutput<'a> {
    pub out: &'a mut [u16],
    pub table: &'a DecodeTable,
}

/// Decodes `n` elements: the reference decoder, written exactly as the spec's pseudo-code.
/// `words` holds the stream as little-endian bytes (2 per word).
pub fn decode(
    states: &[u32; LANES],
    words: &[u8],
    fields: &mut [FieldOutput<'_>],
    n: usize,
) -> Result<(), StreamError> {
    let mut cursor = Cursor::start(states, words)?;
    cursor.scalar_steps(words, fields, 0, n);
    cursor.finish(words)
}

/// Decodes the elements of a single coded field as ranks into the packed table's alphabet (`ranks.len()`
/// elements): the fast path. It accepts and rejects exactly what `decode` does and gives the same symbols.
/// Full steps run in a SIMD kernel when the CPU has one (AVX-512 or AVX2, detected at run time) while at least
/// 32 words remain, so no vector load leaves the stream; a scalar loop with the same arithmetic finishes.
pub fn decode_ranks(
    states: &[u32; LANES],
    words: &[u8],
    table: &PackedTable,
    ranks: &mut [u8],
) -> Result<(), StreamError> {
    decode_ranks_with(Kernel::selected(), states, words, table, ranks)
}

/// `decode_ranks` with a chosen kernel (one the CPU lacks runs scalar).
pub fn decode_ranks_with(
    kernel: Kernel,
    states: &[u32; LANES],
    words: &[u8],
    table: &PackedTable,
    ranks: &mut [u8],
) -> Result<(), StreamError> {
    Cursor::start(states, words)?.finish_ranks(kernel, words, table, ranks, 0)
}

/// One block of `decode_ranks_pair`: the arguments of `decode_ranks` (states, words, table, ranks).
pub type RanksBlock<'a> = (&'a [u32; LANES], &'a [u8], &'a PackedTable, &'a mut [u8]);

/// `decode_ranks` for two blocks, each with its own table, their full steps interleaved in one kernel (where
/// the CPU has one) so that each block's table lookups overlap the other's. Same results as two calls.
pub fn decode_ranks_pair(blocks: [RanksBlock<'_>; 2]) -> [Result<(), StreamError>; 2] {
    decode_ranks_pair_with(Kernel::selected(), blocks)
}

/// `decode_ranks_pair` with a chosen kernel.
pub fn decode_ranks_pair_with(
    kernel: Kernel,
    blocks: [RanksBlock<'_>; 2],
) -> [Result<(), StreamError>; 2] {
    let [(states_a, words_a, table_a, ranks_a), (states_b, words_b, table_b, ranks_b)] = blocks;
    let (mut a, mut b) = match (
        Cursor::start(states_a, words_a),
        Cursor::start(states_b, words_b),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            return [
                decode_ranks_with(kernel, states_a, words_a, table_a, ranks_a),
                decode_ranks_with(kernel, states_b, words_b, table_b, ranks_b),
            ]
        }
    };
    let together = super::simd::decode_steps_pair(
        kernel,
        [&mut a.x, &mut b.x],
        [&mut a.pos, &mut b.pos],
        [words_a, words_b],
        [table_a, table_b],
        [&mut *ranks_a, &mut *ranks_b],
    );
    let finish = |cursor: Cursor, words: &[u8], table: &PackedTable, ranks: &mut [u8]| {
        cursor.finish_ranks(kernel, words, table, ranks, together * LANES)
    };
    [
        finish(a, words_a, table_a, ranks_a),
        finish(b, words_b, table_b, ranks_b),
    ]
}

/// One block of `decode_merged16` and `decode_merged16_pair`: states, words, table, how its elements are
/// merged, its rank buffer (one per element) and its output (2 bytes per element).
pub struct Merged16Block<'a> {
    pub states: &'a [u32; LANES],
    pub words: &'a [u8],
    pub table: &'a PackedTable,
    pub merge: super::simd::Merge16<'a>,
    pub ranks: &'a mut [u8],
    pub out: &'a mut [u8],
}

/// `decode_ranks` for a block of 2-byte elements that merges as it decodes where the CPU can (AVX-512 VBMI):
/// the kernel's full steps write their elements straight to `out`, and only the ranks of the elements after
/// them go to `ranks`, as `decode_ranks` writes them. Returns how many leading elements are already in `out`
/// (a multiple of 32); the caller merges the rest. Accepts and rejects exactly what `decode_ranks` does.
pub fn decode_merged16(block: Merged16Block<'_>) -> Result<usize, StreamError> {
    decode_merged16_with(Kernel::selected(), block)
}

/// `decode_merged16` with a chosen kernel (one without a merge kernel on this CPU decodes ranks only).
pub fn decode_merged16_with(
    kernel: Kernel,
    block: Merged16Block<'_>,
) -> Result<usize, StreamError> {
    let Merged16Block {
        states,
        words,
        table,
        merge,
        ranks,
        out,
    } = block;
    let mut cursor = Cursor::start(states, words)?;
    let done = super::simd::decode_merge16_steps(
        kernel,
        &mut cursor.x,
        &mut cursor.pos,
        words,
        table,
        merge,
        &mut out[..2 * ranks.len()],
    );
    cursor.finish_ranks(kernel, words, table, ranks, done * LANES)?;
    Ok(done * LANES)
}

/// `decode_merged16` for two blocks, their full steps interleaved in one kernel so that each block's table
/// lookups overlap the other's. Same results as two calls.
pub fn decode_merged16_pair(blocks: [Merged16Block<'_>; 2]) -> [Result<usize, StreamError>; 2] {
    decode_merged16_pair_with(Kernel::selected(), blocks)
}

/// `decode_merged16_pair` with a chosen kernel.
pub fn decode_merged16_pair_with(
    kernel: Kernel,
    blocks: [Merged16Block<'_>; 2],
) -> [Result<usize, StreamError>; 2] {
    let [a, b] = blocks;
    let mut cursors = match (
        Cursor::start(a.states, a.words),
        Cursor::start(b.states, b.words),
    ) {
        (Ok(ca), Ok(cb)) => [ca, cb],
        _ => {
            return [
                decode_merged16_with(kernel, a),
                decode_merged16_with(kernel, b),
            ]
        }
    };
    let [ca, cb] = &mut cursors;
    let together = super::simd::decode_merge16_steps_pair(
        kernel,
        [&mut ca.x, &mut cb.x],
        [&mut ca.pos, &mut cb.pos],
        [a.words, b.words],
        [a.table, b.table],
        [a.merge, b.merge],
        [
            &mut a.out[..2 * a.ranks.len()],
            &mut b.out[..2 * b.ranks.len()],
        ],
    );
    let finish = |mut cursor: Cursor, block: Merged16Block<'_>| {
        let from = together * LANES;
        let n = block.ranks.len();
        let more = super::simd::decode_merge16_steps(
            kernel,
            &mut cursor.x,
            &mut cursor.pos,
            block.words,
            block.table,
            block.merge.advanced(together),
            &mut block.out[2 * from..2 * n],
        );
        let done = from + more * LANES;
        cursor.finish_ranks(kernel, block.words, block.table, block.ranks, done)?;
        Ok(done)
    };
    let [ca, cb] = cursors;
    [finish(ca, a), finish(cb, b)]
}

/// Decoder state between steps: the lane states, the next word and whether a lane read past the end.
struct Cursor {
    x: [u32; LANES],
    pos: usize,
    overrun: bool,
}

impl Cursor {
    fn start(states: &[u32; LANES], words: &[u8]) -> Result<Cursor, StreamError> {
        if !words.len().is_multiple_of(2) {
            return Err(StreamError("word stream has an odd byte length"));
        }
        if states.iter().any(|&x| x < STATE_LOWER) {
            return Err(StreamError("initial state below 2^16"));
        }
        Ok(Cursor {
            x: *states,
            pos: 0,
            overrun: false,
        })
    }

    /// Decodes elements `from..n` (`from` a multiple of 32).
    fn scalar_steps(
        &mut self,
        words: &[u8],
        fields: &mut [FieldOutput<'_>],
        from: usize,
        n: usize,
    ) {
        let (words, _) = words.as_chunks::<2>();
        let word_count = words.len();
        let Cursor { x, pos, overrun } = self;
        // Renormalization is branchless: every lane reads the next word (0 past the end) and keeps it only if
        // its state fell below L. Reading past the end is remembered and reported once the block is done.
        for base in (from..n).step_by(LANES) {
            let lanes = (n - base).min(LANES);
            for field in fields.iter_mut() {
                let table = field.table;
                let slots = table.slots();
                let mask = (1u32 << table.prob_bits) - 1;
                let out = &mut field.out[base..base + lanes];
                for (state, symbol) in x[..lanes].iter_mut().zip(out) {
                    let slot = (*state & mask) as usize;
                    let entry = slots.freq_bias[slot];
                    *symbol = slots.symbols[slot];
                    let decoded = (entry >> 16) * (*state >> table.prob_bits) + (entry & 0xffff);
                    let need = decoded < STATE_LOWER;
                    let word = words.get(*pos).map_or(0, |w| u16::from_le_bytes(*w));
                    *overrun |= need & (*pos >= word_count);
                    *state = if need {
                        (decoded << WORD_BITS) | word as u32
                    } else {
                        decoded
                    };
                    *pos += need as usize;
                }
            }
        }
    }

    /// `scalar_steps` for one field through a packed table, writing ranks: elements `from..ranks.len()`.
    fn packed_steps(&mut self, words: &[u8], table: &PackedTable, ranks: &mut [u8], from: usize) {
        let (words, _) = words.as_chunks::<2>();
        let mask = (1u32 << table.prob_bits) - 1;
        for base in (from..ranks.len()).step_by(LANES) {
            let lanes = (ranks.len() - base).min(LANES);
            for (state, rank) in self.x[..lanes]
                .iter_mut()
                .zip(&mut ranks[base..base + lanes])
            {
                let entry = table.entries[(*state & mask) as usize];
                *rank = (entry >> 24) as u8;
                let freq = ((entry >> 12) & 0xfff) + 1;
                let decoded = freq * (*state >> table.prob_bits) + (entry & 0xfff);
                let need = decoded < STATE_LOWER;
                let word = words.get(self.pos).map_or(0, |w| u16::from_le_bytes(*w));
                self.overrun |= need & (self.pos >= words.len());
                *state = if need {
                    (decoded << WORD_BITS) | word as u32
                } else {
                    decoded
                };
                self.pos += need as usize;
            }
        }
    }

    /// Decodes the ranks of elements `from..ranks.len()` (`kernel`'s full steps, then `packed_steps`), then
    /// runs the end checks.
    fn finish_ranks(
        mut self,
        kernel: Kernel,
        words: &[u8],
        table: &PackedTable,
        ranks: &mut [u8],
        from: usize,
    ) -> Result<(), StreamError> {
        let more = super::simd::decode_steps_with(
            kernel,
            &mut self.x,
            &mut self.pos,
            words,
            table,
            &mut ranks[from..],
        );
        self.packed_steps(words, table, ranks, from + more * LANES);
        self.finish(words)
    }

    /// The end checks: no read past the end, no word left over, every lane back at the encoder's start.
    fn finish(self, words: &[u8]) -> Result<(), StreamError> {
        if self.overrun {
            return Err(StreamError("word stream ends early"));
        }
        if self.pos != words.len() / 2 {
            return Err(StreamError("words left over after the last element"));
        }
        if self.x.iter().any(|&s| s != STATE_LOWER) {
            return Err(StreamError(
                "final state is not the encoder's initial state",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec::freq::histogram;

    /// A small seeded generator, so failures reproduce.
    pub(crate) fn xorshift(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn skewed_symbols(n: usize, bits: u32, seed: u64) -> Vec<u16> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                let r = xorshift(&mut s);
                // geometric-ish: many small symbols, a few large ones
                ((r.trailing_zeros() as u64 * 7 + (r >> 60)) % (1 << bits)) as u16
            })
            .collect()
    }

    /// `encode` of one field with the reference encoder, and its words as little-endian bytes.
    fn encode_one_field(symbols: &[u16], table: &FreqTable) -> (Encoded, Vec<u8>) {
        let enc = encode(&[FieldSymbols { symbols, table }], symbols.len());
        let bytes = enc.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        (enc, bytes)
    }

    fn round_trip(n: usize, field_bits: &[u32], prob_bits: u32, seed: u64) {
        let symbols: Vec<Vec<u16>> = field_bits
            .iter()
            .enumerate()
            .map(|(k, &b)| skewed_symbols(n, b, seed + k as u64))
            .collect();
        let tables: Vec<FreqTable> = symbols
            .iter()
            .zip(field_bits)
            .map(|(s, &b)| {
                let mut counts = histogram(s.iter().map(|&v| v as u32), b);
                counts[0] += 1; // an empty block still needs a valid table
                FreqTable::from_counts(&counts, b, prob_bits).unwrap_or_else(|| {
                    FreqTable::from_counts(&counts, b, 15).expect("fits 15 bits")
                })
            })
            .collect();
        let fields: Vec<FieldSymbols> = symbols
            .iter()
            .zip(&tables)
            .map(|(s, t)| FieldSymbols {
                symbols: s,
                table: t,
            })
            .collect();
        let enc = encode(&fields, n);
        let bytes: Vec<u8> = enc.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let decode_tables: Vec<DecodeTable> = tables.iter().map(DecodeTable::new).collect();
        let mut outs: Vec<Vec<u16>> = vec![vec![0xffff; n]; field_bits.len()];
        let mut outputs: Vec<FieldOutput> = outs
            .iter_mut()
            .zip(&decode_tables)
            .map(|(o, t)| FieldOutput { out: o, table: t })
            .collect();
        decode(&enc.states, &bytes, &mut outputs, n).unwrap();
        assert_eq!(outs, symbols, "n={n} fields={field_bits:?}");
    }

    #[test]
    fn round_trips_odd_sizes_and_field_counts() {
        for n in [0, 1, 2, 31, 32, 33, 63, 64, 65, 1000, 4097] {
            round_trip(n, &[10], 12, n as u64 + 1);
            round_trip(n, &[8, 6, 8], 11, n as u64 + 7);
        }
        round_trip(70_000, &[12, 8], 15, 99);
        round_trip(5000, &[1], 1, 5);
    }

    /// Every kernel the CPU has, against the reference: same symbols on valid streams, same verdict (and
    /// message) on damaged ones.
    #[test]
    fn fast_kernels_match_the_reference() {
        use crate::codec::freq::PackedTable;
        use crate::codec::simd::Kernel;
        let kernels = Kernel::available();
        let mut seed = 7u64;
        for (n, bits, prob_bits) in [
            (0, 4, 4),
            (31, 6, 12),
            (32, 8, 1),
            (1000, 10, 12),
            (4097, 11, 9),
            (70_000, 8, 12),
            (131_072, 11, 12),
        ] {
            let symbols = skewed_symbols(n, bits, n as u64 + bits as u64);
            let mut counts = histogram(symbols.iter().map(|&v| v as u32), bits);
            counts[0] += 1;
            let Some(table) = FreqTable::from_counts(&counts, bits, prob_bits) else {
                continue;
            };
            let packed = PackedTable::new(&table).expect("small alphabet packs");
            let dt = DecodeTable::new(&table);
            let (enc, bytes) = encode_one_field(&symbols, &table);
            let mut cases = vec![(enc.states, bytes.clone())];
            for _ in 0..6 {
                let mut damaged = bytes.clone();
                if !damaged.is_empty() {
                    let at = (xorshift(&mut seed) as usize) % damaged.len();
                    damaged[at] ^= 1 << (xorshift(&mut seed) % 8);
                }
                cases.push((enc.states, damaged));
            }
            cases.push((enc.states, bytes[..bytes.len().saturating_sub(2)].to_vec()));
            let references: Vec<_> = cases
                .iter()
                .map(|(states, words)| {
                    let mut expected = vec![0u16; n];
                    let reference = decode(
                        states,
                        words,
                        &mut [FieldOutput {
                            out: &mut expected,
                            table: &dt,
                        }],
                        n,
                    );
                    (reference, expected)
                })
                .collect();
            type Reference = (Result<(), StreamError>, Vec<u16>);
            let check = |what: &str, fast, ranks: &[u8], (reference, expected): &Reference| {
                let what = format!("{what} n={n} bits={bits} prob_bits={prob_bits}");
                assert_eq!(fast, *reference, "{what}");
                if reference.is_ok() {
                    let got: Vec<u16> =
                        ranks.iter().map(|&r| packed.alphabet[r as usize]).collect();
                    assert_eq!(got, *expected, "{what}");
                }
            };
            for &kernel in kernels {
                for (k, (states, words)) in cases.iter().enumerate() {
                    let mut ranks = vec![0u8; n];
                    let fast = decode_ranks_with(kernel, states, words, &packed, &mut ranks);
                    check(&format!("{kernel:?}"), fast, &ranks, &references[k]);
                    // Paired with the intact stream (and the intact one with itself).
                    let (mut ranks_a, mut ranks_b) = (vec![0u8; n], vec![0u8; n]);
                    let [fast_a, fast_b] = decode_ranks_pair_with(
                        kernel,
                        [
                            (states, words, &packed, &mut ranks_a),
                            (&cases[0].0, &cases[0].1, &packed, &mut ranks_b),
                        ],
                    );
                    check(
                        &format!("{kernel:?} pair, first"),
                        fast_a,
                        &ranks_a,
                        &references[k],
                    );
                    check(
                        &format!("{kernel:?} pair, second"),
                        fast_b,
                        &ranks_b,
                        &references[0],
                    );
                }
            }
        }
    }

    #[test]
    fn merged16_matches_the_reference() {
        use crate::codec::bitpack;
        use crate::codec::freq::PackedTable;
        use crate::codec::simd::{Kernel, Merge16, ShiftedWindows};
        let mut seed = 11u64;
        for raw_width in 0..=8u32 {
            let bits = 10.min(16 - raw_width);
            for n in [31usize, 4099, 70_001] {
                // Two blocks on one table, so the pair kernel can run too.
                let blocks: Vec<(Vec<u16>, Vec<u32>)> = (0..2)
                    .map(|b| {
                        let symbols = skewed_symbols(n + 37 * b, bits, n as u64 + b as u64);
                        let raw = symbols
                            .iter()
                            .map(|_| (xorshift(&mut seed) as u32) & ((1 << raw_width) - 1))
                            .collect();
                        (symbols, raw)
                    })
                    .collect();
                let all = blocks.iter().flat_map(|(s, _)| s.iter().map(|&v| v as u32));
                let Some(table) = FreqTable::from_counts(&histogram(all, bits), bits, 12) else {
                    continue;
                };
                let packed = PackedTable::new(&table).expect("small alphabet packs");
                let dt = DecodeTable::new(&table);
                let mut symbols16 = [0u16; 256];
                for (s, &a) in symbols16.iter_mut().zip(&packed.alphabet) {
                    *s = a << raw_width;
                }
                // Per block: states, words (intact, then with one flipped bit), packed raw field.
                let mut cases = Vec::new();
                for (symbols, raw) in &blocks {
                    let (enc, bytes) = encode_one_field(symbols, &table);
                    let mut raw_bytes = Vec::new();
                    bitpack::pack_slice(raw, raw_width, &mut raw_bytes);
                    let mut damaged = bytes.clone();
                    if !damaged.is_empty() {
                        let at = (xorshift(&mut seed) as usize) % damaged.len();
                        damaged[at] ^= 1 << (xorshift(&mut seed) % 8);
                    }
                    for words in [bytes, damaged] {
                        cases.push((enc.states, words, raw_bytes.clone(), symbols.len()));
                    }
                }
                // What decode + merge gives, from the reference decoder.
                let expect = |(states, words, raw_bytes, n): &(_, Vec<u8>, Vec<u8>, usize)| {
                    let mut symbols = vec![0u16; *n];
                    let output = FieldOutput {
                        out: &mut symbols,
                        table: &dt,
                    };
                    decode(states, words, &mut [output], *n).map(|()| {
                        let mut values: Vec<u16> =
                            symbols.iter().map(|&s| s << raw_width).collect();
                        bitpack::unpack(raw_bytes, raw_width, *n, |i, v| values[i] |= v as u16);
                        values
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                    })
                };
                fn merge_of<'a>(
                    symbols: &'a [u16; 256],
                    raw: &'a [u8],
                    width: u32,
                    windows: Option<ShiftedWindows>,
                ) -> Merge16<'a> {
                    Merge16 {
                        symbols,
                        raw: (width > 0).then_some((raw, width, 0)),
                        windows,
                    }
                }
                // Elements the kernel left to the caller, merged from their ranks.
                let finish = |done: usize, ranks: &[u8], raw_bytes: &[u8], out: &mut [u8]| {
                    bitpack::unpack(raw_bytes, raw_width, ranks.len(), |i, v| {
                        if i >= done {
                            let value = symbols16[ranks[i] as usize] | v as u16;
                            out[2 * i..2 * i + 2].copy_from_slice(&value.to_le_bytes());
                        }
                    });
                    if raw_width == 0 {
                        for i in done..ranks.len() {
                            let value = symbols16[ranks[i] as usize];
                            out[2 * i..2 * i + 2].copy_from_slice(&value.to_le_bytes());
                        }
                    }
                };
                // Windows in use when the table has them, and the gathered symbols of the same ranks.
                let shifted = packed.windows.map(|w| ShiftedWindows::new(&w, raw_width));
                for (kernel, windows) in Kernel::available()
                    .iter()
                    .flat_map(|&k| [(k, shifted), (k, None)])
                {
                    for a in &cases {
                        let expected = expect(a);
                        let (mut ranks, mut out) = (vec![0u8; a.3], vec![0u8; 2 * a.3]);
                        let got = decode_merged16_with(
                            kernel,
                            Merged16Block {
                                states: &a.0,
                                words: &a.1,
                                table: &packed,
                                merge: merge_of(&symbols16, &a.2, raw_width, windows),
                                ranks: &mut ranks,
                                out: &mut out,
                            },
                        );
                        let what = format!(
                            "{kernel:?}, windows {windows:?}, raw width {raw_width}, n {n}"
                        );
                        assert_eq!(
                            got.as_ref().map(|_| ()),
                            expected.as_ref().map(|_| ()),
                            "{what}"
                        );
                        if let (Ok(done), Ok(expected)) = (got, &expected) {
                            finish(done, &ranks, &a.2, &mut out);
                            assert!(out == *expected, "{what}");
                        }
                        for b in &cases {
                            let (mut ranks_a, mut out_a) = (vec![0u8; a.3], vec![0u8; 2 * a.3]);
                            let (mut ranks_b, mut out_b) = (vec![0u8; b.3], vec![0u8; 2 * b.3]);
                            let got = decode_merged16_pair_with(
                                kernel,
                                [
                                    Merged16Block {
                                        states: &a.0,
                                        words: &a.1,
                                        table: &packed,
                                        merge: merge_of(&symbols16, &a.2, raw_width, windows),
                                        ranks: &mut ranks_a,
                                        out: &mut out_a,
                                    },
                                    Merged16Block {
                                        states: &b.0,
                                        words: &b.1,
                                        table: &packed,
                                        merge: merge_of(&symbols16, &b.2, raw_width, windows),
                                        ranks: &mut ranks_b,
                                        out: &mut out_b,
                                    },
                                ],
                            );
                            for (got, (case, ranks, out)) in got
                                .into_iter()
                                .zip([(a, &ranks_a, &mut out_a), (b, &ranks_b, &mut out_b)])
                            {
                                let expected = expect(case);
                                assert_eq!(got.as_ref().map(|_| ()), expected.as_ref().map(|_| ()));
                                if let (Ok(done), Ok(expected)) = (got, expected) {
                                    finish(done, ranks, &case.2, out);
                                    assert!(*out == expected, "pair, {what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn encode_single_matches_encode() {
        use crate::codec::simd::Kernel;
        for (n, bits, prob_bits) in [
            (0, 4, 4),
            (33, 6, 12),
            (1000, 10, 1),
            (70_001, 11, 12),
            (5000, 12, 15),
            // Each precision the encoder can pick, for the SIMD encoders' quotients.
            (40_000, 6, 8),
            (40_000, 8, 9),
            (40_000, 9, 10),
            (40_000, 10, 11),
        ] {
            let symbols = skewed_symbols(n, bits, 3 + n as u64);
            let mut counts = histogram(symbols.iter().map(|&v| v as u32), bits);
            counts[1] += 1;
            let Some(table) = FreqTable::from_counts(&counts, bits, prob_bits) else {
                continue;
            };
            let (reference, _) = encode_one_field(&symbols, &table);
            assert_eq!(
                encode_single(&symbols, &EncodeTable::new(&table)),
                reference,
                "n={n} pb={prob_bits}"
            );
            for &kernel in Kernel::available() {
                let mut buffer = Vec::new();
                let (states, start) =
                    encode_single_in_with(kernel, &symbols, &EncodeTable::new(&table), &mut buffer);
                let got = Encoded {
                    states,
                    words: buffer[start..].to_vec(),
                };
                assert_eq!(got, reference, "{kernel:?} n={n} pb={prob_bits}");
            }
        }
        // a one-symbol table: frequency 2^prob_bits, reciprocal 2^63
        let table = FreqTable::from_counts(&[0, 5, 0, 0], 2, 10).unwrap();
        let symbols = vec![1u16; 100];
        let (reference, _) = encode_one_field(&symbols, &table);
        assert_eq!(
            encode_single(&symbols, &EncodeTable::new(&table)),
            reference
        );
    }

    #[test]
    fn single_symbol_costs_no_words() {
        let symbols = vec![3u16; 1000];
        let counts = histogram(symbols.iter().map(|&v| v as u32), 4);
        let table = FreqTable::from_counts(&counts, 4, 12).unwrap();
        let (enc, _) = encode_one_field(&symbols, &table);
        assert!(enc.words.is_empty());
        assert!(enc.states.iter().all(|&x| x == STATE_LOWER));
    }

    #[test]
    fn corrupt_streams_are_detected() {
        let n = 5000;
        let symbols = skewed_symbols(n, 10, 42);
        let counts = histogram(symbols.iter().map(|&v| v as u32), 10);
        let table = FreqTable::from_counts(&counts, 10, 12).unwrap();
        let dt = DecodeTable::new(&table);
        let (enc, bytes) = encode_one_field(&symbols, &table);
        let mut out = vec![0u16; n];
        let mut try_decode = |states: &[u32; LANES], words: &[u8]| {
            decode(
                states,
                words,
                &mut [FieldOutput {
                    out: &mut out,
                    table: &dt,
                }],
                n,
            )
        };
        assert!(try_decode(&enc.states, &bytes).is_ok());
        assert!(try_decode(&enc.states, &bytes[..bytes.len() - 2]).is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0, 0]);
        assert!(try_decode(&enc.states, &longer).is_err());
        let mut detected = 0;
        for k in (0..bytes.len()).step_by(97) {
            let mut flipped = bytes.clone();
            flipped[k] ^= 0x10;
            detected += try_decode(&enc.states, &flipped).is_err() as usize;
        }
        // A flip changes every later state; the end check catches nearly all of them.
        assert!(
            detected * 10 >= (bytes.len() / 97) * 9,
            "only {detected} flips detected"
        );
        let mut states = enc.states;
        states[5] ^= 1;
        assert!(try_decode(&states, &bytes).is_err());
    }
}
