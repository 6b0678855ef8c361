//! The lossless float codec (`float_split`): each element's bits are cut into fields, most significant first.
//! Fields that pay for it (the sign, exponent and top mantissa bits) are rANS-coded with a per-tensor table;
//! the rest are stored raw, bit-packed.
//!
//! Steps: 1. `plan` counts the top bits and each low byte over the whole tensor and picks the field layout and
//! tables with the lowest exact cost, tables and stream flushes included; 2. `encode_block` splits a block into
//! field values, rANS-codes the coded fields through 32 lanes and packs the raw ones; 3. `SplitDecoder` reverses it.

use super::bitpack;
use super::freq::{DecodeTable, FreqTable, PackedTable, TableError, UsedCounts, MAX_SYMBOL_BITS};
use super::rans::{self, FieldOutput, FieldSymbols, LANES};
use super::simd::Merge16;
use crate::dtype::Dtype;
use std::sync::Arc;

/// How a field is stored. The numbers are the spec's field coding ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Raw = 0,
    Rans = 1,
}

/// Field coding id, in a block's own params, for "rANS with the tensor's table for this field".
pub const CODING_TENSOR_TABLE: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub width: u32,
    pub coding: Coding,
}

/// The float_split parameters of one tensor: its field layout and one table per rANS field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitParams {
    pub fields: Vec<Field>,
    pub tables: Vec<FreqTable>,
}

/// Most fields a layout may have.
pub const MAX_FIELDS: usize = 8;
/// Highest probability precision the encoder picks for a tensor's tables (the decoder accepts up to
/// `freq::MAX_PROB_BITS`): 12 bits keep the fast decoder's tables inside a core's L1 cache.
pub const ENCODER_MAX_PROB_BITS: u32 = 12;
/// Highest precision for a block's own tables, which the decoder expands once per block.
pub const ENCODER_MAX_LOCAL_PROB_BITS: u32 = 12;
/// Fewest bits per element a field below the first coded one must save to be coded too: every coded field
/// costs the decoder a table lookup per element, about as much as the first one.
pub const MIN_SECONDARY_GAIN_BITS: f64 = 0.2;
const ENCODER_MIN_PROB_BITS: u32 = 8;
/// Fixed bytes of a split block's rANS part: 32 states and the word count.
pub const RANS_HEADER_BYTES: usize = LANES * 4 + 4;

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

impl SplitParams {
    /// Shift of each field within the element.
    pub fn shifts(&self) -> Vec<u32> {
        field_shifts(&self.fields)
    }

    pub fn has_rans(&self) -> bool {
        !self.tables.is_empty()
    }

    /// Serialized form (spec: "float_split params").
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.fields.len() as u8);
        for f in &self.fields {
            out.push(f.width as u8);
            out.push(f.coding as u8);
        }
        for t in &self.tables {
            t.write(out);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    /// Parses a tensor's parameters for `dtype`; all of `bytes` must be used.
    pub fn parse(bytes: &[u8], dtype: Dtype) -> Result<SplitParams, TableError> {
        Ok(Self::parse_with(bytes, dtype, None)?.0)
    }

    /// Parses a block's own parameters, where a field may borrow the tensor's table (coding id 2). Returns the
    /// resolved parameters and, per coded field, whether its table is the tensor's.
    pub fn parse_local(
        bytes: &[u8],
        dtype: Dtype,
        tensor: &SplitParams,
    ) -> Result<(SplitParams, Vec<bool>), TableError> {
        Self::parse_with(bytes, dtype, Some(tensor))
    }

    fn parse_with(
        bytes: &[u8],
        dtype: Dtype,
        tensor: Option<&SplitParams>,
    ) -> Result<(SplitParams, Vec<bool>), TableError> {
        let err = |s: String| TableError(s);
        let count = *bytes
            .first()
            .ok_or_else(|| err("params are empty".into()))? as usize;
        if count == 0 || count > MAX_FIELDS {
            return Err(err(format!("field_count {count} outside 1..={MAX_FIELDS}")));
        }
        let field_bytes = bytes
            .get(1..1 + 2 * count)
            .ok_or_else(|| err("params truncated".into()))?;
        let mut fields = Vec::with_capacity(count);
        let mut borrowed = Vec::with_capacity(count);
        for (index, pair) in field_bytes.chunks_exact(2).enumerate() {
            let width = pair[0] as u32;
            let coding = match (pair[1], tensor) {
                (0, _) => Coding::Raw,
                (1, _) => Coding::Rans,
                (CODING_TENSOR_TABLE, Some(t)) => {
                    if t.fields.get(index)
                        != Some(&Field {
                            width,
                            coding: Coding::Rans,
                        })
                    {
                        return Err(err(format!(
                            "field {index} borrows the tensor's table, but the tensor's field {index} is not a \
                             {width}-bit rANS field"
                        )));
                    }
                    Coding::Rans
                }
                (c, _) => return Err(err(format!("unknown field coding {c}"))),
            };
            if coding == Coding::Rans {
                borrowed.push(pair[1] == CODING_TENSOR_TABLE);
            }
            if width == 0 || width > 32 || (coding == Coding::Rans && width > MAX_SYMBOL_BITS) {
                return Err(err(format!(
                    "field width {width} not allowed for {coding:?}"
                )));
            }
            fields.push(Field { width, coding });
        }
        let total: u32 = fields.iter().map(|f| f.width).sum();
        if total != dtype.bits() {
            return Err(err(format!(
                "field widths sum to {total}, {dtype} has {} bits",
                dtype.bits()
            )));
        }
        let mut pos = 1 + 2 * count;
        let mut tables = Vec::new();
        let coded = fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.coding == Coding::Rans);
        for ((index, f), &is_borrowed) in coded.zip(&borrowed) {
            if is_borrowed {
                let tensor = tensor.expect("borrowing needs a tensor");
                tables.push(tensor.table_of_field(index).expect("checked above").clone());
            } else {
                let (table, used) = FreqTable::parse(&bytes[pos..], f.width)?;
                tables.push(table);
                pos += used;
            }
        }
        if pos != bytes.len() {
            return Err(err(format!(
                "{} bytes left after the params",
                bytes.len() - pos
            )));
        }
        Ok((SplitParams { fields, tables }, borrowed))
    }

    /// The table of field `index`, if that field is rANS-coded.
    pub fn table_of_field(&self, index: usize) -> Option<&FreqTable> {
        if self.fields.get(index)?.coding != Coding::Rans {
            return None;
        }
        let table_index = self.fields[..index]
            .iter()
            .filter(|f| f.coding == Coding::Rans)
            .count();
        self.tables.get(table_index)
    }

    /// Exact payload length of a split block of `n` elements with `word_count` rANS words.
    pub fn payload_len(&self, n: usize, word_count: usize) -> usize {
        let rans_part = if self.has_rans() {
            align4(RANS_HEADER_BYTES + 2 * word_count)
        } else {
            0
        };
        rans_part
            + self
                .fields
                .iter()
                .filter(|f| f.coding == Coding::Raw)
                .map(|f| align4(bitpack::packed_len(n, f.width)))
                .sum::<usize>()
    }
}

/// Reads element `i` of little-endian `bytes` with `width` bytes per element.
#[inline]
/// The little-endian elements of `bytes` (`width` bytes each) as integers, one pass per width.
pub fn element_values(bytes: &[u8], width: usize) -> Vec<u64> {
    match width {
        1 => bytes.iter().map(|&b| b as u64).collect(),
        2 => bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u64)
            .collect(),
        4 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")) as u64)
            .collect(),
        8 => bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect(),
        _ => unreachable!("element widths are 1, 2, 4 or 8 bytes"),
    }
}

fn field_mask(width: u32) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

/// Splits a block into field values and encodes it (spec: "split block payload").
pub fn encode_block(params: &SplitParams, dtype: Dtype, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len());
    encode_block_into(params, dtype, block, &mut out);
    out
}

/// `encode_block`, appended to `out` (whose length must be a multiple of 4: the padding is aligned to it).
fn encode_block_into(params: &SplitParams, dtype: Dtype, block: &[u8], out: &mut Vec<u8>) {
    debug_assert_eq!(out.len() % 4, 0);
    let width = dtype
        .byte_width()
        .expect("float_split dtypes are whole bytes");
    let n = block.len() / width;
    let shifts = params.shifts();
    if let (2 | 4, [table]) = (width, &params.tables[..]) {
        match width {
            2 => encode_single_field::<2>(params, &shifts, table, block, out),
            _ => encode_single_field::<4>(params, &shifts, table, block, out),
        }
        return;
    }
    let field_values = |shift: u32, bits: u32| -> Vec<u32> {
        match width {
            2 => field_of::<2>(block, shift, bits),
            4 => field_of::<4>(block, shift, bits),
            _ => element_values(block, width)
                .iter()
                .map(|&v| ((v >> shift) & field_mask(bits)) as u32)
                .collect(),
        }
    };
    if params.has_rans() {
        let coded: Vec<Vec<u16>> = params
            .fields
            .iter()
            .zip(&shifts)
            .filter(|(f, _)| f.coding == Coding::Rans)
            .map(|(f, &shift)| {
                field_values(shift, f.width)
                    .into_iter()
                    .map(|v| v as u16)
                    .collect()
            })
            .collect();
        let fields: Vec<FieldSymbols> = coded
            .iter()
            .zip(&params.tables)
            .map(|(symbols, table)| FieldSymbols { symbols, table })
            .collect();
        let encoded = match &fields[..] {
            [single] => rans::encode_single(single.symbols, &rans::EncodeTable::new(single.table)),
            _ => rans::encode(&fields, n),
        };
        for s in encoded.states {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(encoded.words.len() as u32).to_le_bytes());
        append_words(&encoded.words, out);
        out.resize(align4(out.len()), 0);
    }
    for (f, &shift) in params.fields.iter().zip(&shifts) {
        if f.coding == Coding::Raw {
            bitpack::pack_slice(&field_values(shift, f.width), f.width, out);
            out.resize(align4(out.len()), 0);
        }
    }
}

/// `encode_block` for one coded field of 2- or 4-byte elements, through per-thread buffers.
fn encode_single_field<const W: usize>(
    params: &SplitParams,
    shifts: &[u32],
    table: &FreqTable,
    block: &[u8],
    out: &mut Vec<u8>,
) {
    ENCODE_SCRATCH.with_borrow_mut(|(symbols, words)| {
        let fields = params.fields.iter().zip(shifts);
        let (coded, &shift) = fields
            .clone()
            .find(|(f, _)| f.coding == Coding::Rans)
            .expect("one coded field");
        let mask = field_mask(coded.width) as u32;
        // Into a slice of known length, so that the extraction vectorizes.
        symbols.resize(block.len() / W, 0);
        for (symbol, c) in symbols.iter_mut().zip(block.chunks_exact(W)) {
            *symbol = field_value::<W>(c, shift, mask) as u16;
        }
        let (states, start) =
            rans::encode_single_in(symbols, &rans::EncodeTable::new(table), words);
        for s in states {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&((words.len() - start) as u32).to_le_bytes());
        append_words(&words[start..], out);
        out.resize(align4(out.len()), 0);
        for (f, &shift) in fields.filter(|(f, _)| f.coding == Coding::Raw) {
            pack_field::<W>(block, shift, f.width, out);
            out.resize(align4(out.len()), 0);
        }
    });
}

/// Appends `words` as little-endian bytes, through a slice of known length (a byte-wise extend does not
/// vectorize).
fn append_words(words: &[u16], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + 2 * words.len(), 0);
    for (bytes, w) in out[start..].chunks_exact_mut(2).zip(words) {
        bytes.copy_from_slice(&w.to_le_bytes());
    }
}

thread_local! {
    /// Per-thread buffers of the single-field encoder: symbols and words.
    static ENCODE_SCRATCH: std::cell::RefCell<(Vec<u16>, Vec<u16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Appends one field (`width` bits at `shift`) of every `W`-byte element of `block`, packed as
/// `bitpack::pack_slice` packs it, straight from the elements: eight values (`width` bytes) per step when
/// the field is at most 8 bits wide.
fn pack_field<const W: usize>(block: &[u8], shift: u32, width: u32, out: &mut Vec<u8>) {
    pack_field_with::<W>(block, shift, width, out, true)
}

/// `pack_field`, with the SIMD kernel (when the CPU has it) or without.
fn pack_field_with<const W: usize>(
    block: &[u8],
    shift: u32,
    width: u32,
    out: &mut Vec<u8>,
    simd: bool,
) {
    let mask = field_mask(width) as u32;
    let value = |c: &[u8]| field_value::<W>(c, shift, mask);
    if width > 8 {
        return bitpack::pack(block.chunks_exact(W).map(value), width, out);
    }
    let groups = block.chunks_exact(8 * W);
    let rest = groups.remainder();
    let step = width as usize;
    let start = out.len();
    // Each step writes 8 bytes and keeps `width` of them; the spare tail is cut off after the loop.
    out.resize(start + groups.len() * step + 8, 0);
    let done = match simd {
        true => super::simd::pack_groups::<W>(block, shift, width, &mut out[start..]),
        false => 0,
    };
    let mut pos = start + done * step;
    for g in groups.skip(done) {
        let bits = g.chunks_exact(W).enumerate().fold(0u64, |acc, (k, e)| {
            acc | (value(e) as u64) << (k as u32 * width)
        });
        out[pos..pos + 8].copy_from_slice(&bits.to_le_bytes());
        pos += step;
    }
    out.truncate(pos);
    bitpack::pack(rest.chunks_exact(W).map(value), width, out);
}

/// One field of every `W`-byte little-endian element.
fn field_of<const W: usize>(block: &[u8], shift: u32, bits: u32) -> Vec<u32> {
    let mask = field_mask(bits) as u32;
    block
        .chunks_exact(W)
        .map(|c| field_value::<W>(c, shift, mask))
        .collect()
}

/// A tensor's parameters expanded for decoding; build once, decode many blocks.
pub struct SplitDecoder {
    params: SplitParams,
    shifts: Vec<u32>,
    tables: Vec<Arc<DecodeTable>>,
    width: usize,
}

impl SplitDecoder {
    pub fn new(params: SplitParams, dtype: Dtype) -> SplitDecoder {
        let tables = params
            .tables
            .iter()
            .map(|t| Arc::new(DecodeTable::new(t)))
            .collect();
        Self::with_tables(params, tables, dtype)
    }

    /// A decoder for a block's own params, reusing this (tensor) decoder's expanded tables where borrowed.
    pub fn local(&self, params: SplitParams, borrowed: &[bool], dtype: Dtype) -> SplitDecoder {
        let coded = params
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.coding == Coding::Rans);
        let tables = coded
            .zip(&params.tables)
            .zip(borrowed)
            .map(|(((index, _), table), &is_borrowed)| {
                if is_borrowed {
                    let tensor_index = self.params.fields[..index]
                        .iter()
                        .filter(|f| f.coding == Coding::Rans)
                        .count();
                    Arc::clone(&self.tables[tensor_index])
                } else {
                    Arc::new(DecodeTable::new(table))
                }
            })
            .collect();
        Self::with_tables(params, tables, dtype)
    }

    fn with_tables(
        params: SplitParams,
        tables: Vec<Arc<DecodeTable>>,
        dtype: Dtype,
    ) -> SplitDecoder {
        let shifts = params.shifts();
        SplitDecoder {
            params,
            shifts,
            tables,
            width: dtype
                .byte_width()
                .expect("float_split dtypes are whole bytes"),
        }
    }

    pub fn params(&self) -> &SplitParams {
        &self.params
    }

    /// Decodes a split payload of `out.len() / width` elements into `out` (little-endian elements).
    /// Takes the fast path (one coded field through a packed table, SIMD where the CPU has it) when the layout
    /// allows, the reference path otherwise; both give the same bytes and the same errors.
    pub fn decode_block(&self, payload: &[u8], out: &mut [u8]) -> Result<(), rans::StreamError> {
        self.decode_block_with(payload, out, true)
    }

    /// Decodes two blocks of this decoder's tensor, with their rANS streams interleaved when both take the fast
    /// path; otherwise one after the other. Same results as two `decode_block` calls.
    pub fn decode_block_pair(
        &self,
        payloads: [&[u8]; 2],
        outs: [&mut [u8]; 2],
    ) -> [Result<(), rans::StreamError>; 2] {
        decode_pair([self, self], payloads, outs)
    }

    /// `decode_block` on the reference path only: the oracle the fast path is tested against.
    pub fn decode_block_reference(
        &self,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<(), rans::StreamError> {
        self.decode_block_with(payload, out, false)
    }

    fn decode_block_with(
        &self,
        payload: &[u8],
        out: &mut [u8],
        fast: bool,
    ) -> Result<(), rans::StreamError> {
        let n = out.len() / self.width;
        let coded = self.tables.len();
        let (rans_part, raw_start) = self.rans_part(payload, n)?;
        let packed = self.fast_table().filter(|_| fast);
        if let (Some((states, words)), Some(packed)) = (rans_part, packed) {
            let raw = &payload[raw_start..];
            return SCRATCH.with_borrow_mut(|scratch| {
                let ranks = rank_buffer(scratch, n);
                let done = match self.merge16_symbols(&packed.alphabet) {
                    Some(symbols) => rans::decode_merged16(rans::Merged16Block {
                        states: &states,
                        words,
                        table: packed,
                        merge: self.merge16(packed, &symbols, n, raw),
                        ranks: &mut *ranks,
                        out: &mut *out,
                    })?,
                    None => {
                        rans::decode_ranks(&states, words, packed, ranks)?;
                        0
                    }
                };
                self.merge_fast(ranks, packed, raw, out, done);
                Ok(())
            });
        }
        let mut values = vec![0u64; n];
        if let Some((states, words)) = rans_part {
            let mut symbols: Vec<Vec<u16>> = vec![vec![0u16; n]; coded];
            let mut outputs: Vec<FieldOutput> = symbols
                .iter_mut()
                .zip(&self.tables)
                .map(|(out, table)| FieldOutput {
                    out,
                    table: table.as_ref(),
                })
                .collect();
            rans::decode(&states, words, &mut outputs, n)?;
            for (field_symbols, shift) in symbols.iter().zip(self.coded_shifts()) {
                for (v, &s) in values.iter_mut().zip(field_symbols) {
                    *v |= (s as u64) << shift;
                }
            }
        }
        let mut pos = raw_start;
        for (f, &shift) in self.params.fields.iter().zip(&self.shifts) {
            if f.coding == Coding::Raw {
                let len = bitpack::packed_len(n, f.width);
                bitpack::unpack(&payload[pos..pos + len], f.width, n, |i, v| {
                    values[i] |= (v as u64) << shift
                });
                pos += align4(len);
            }
        }
        for (chunk, v) in out.chunks_exact_mut(self.width).zip(values) {
            chunk.copy_from_slice(&v.to_le_bytes()[..self.width]);
        }
        Ok(())
    }

    /// Checks the payload length and splits off the rANS part: (states, words) if any field is coded, and the
    /// offset of the first raw field.
    #[allow(clippy::type_complexity)]
    fn rans_part<'p>(
        &self,
        payload: &'p [u8],
        n: usize,
    ) -> Result<(Option<([u32; LANES], &'p [u8])>, usize), rans::StreamError> {
        if !self.params.has_rans() {
            if self.params.payload_len(n, 0) != payload.len() {
                return Err(rans::StreamError(
                    "payload length does not match its contents",
                ));
            }
            return Ok((None, 0));
        }
        let header = payload
            .get(..RANS_HEADER_BYTES)
            .ok_or(rans::StreamError("payload shorter than the rANS header"))?;
        let mut states = [0u32; LANES];
        for (s, chunk) in states.iter_mut().zip(header.chunks_exact(4)) {
            *s = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        }
        let word_count =
            u32::from_le_bytes(header[LANES * 4..].try_into().expect("4 bytes")) as usize;
        if self.params.payload_len(n, word_count) != payload.len() {
            return Err(rans::StreamError(
                "payload length does not match its contents",
            ));
        }
        let words = &payload[RANS_HEADER_BYTES..RANS_HEADER_BYTES + 2 * word_count];
        Ok((
            Some((states, words)),
            align4(RANS_HEADER_BYTES + 2 * word_count),
        ))
    }

    fn coded_shifts(&self) -> impl Iterator<Item = u32> + '_ {
        self.params
            .fields
            .iter()
            .zip(&self.shifts)
            .filter(|(f, _)| f.coding == Coding::Rans)
            .map(|(_, &s)| s)
    }

    /// The packed table of the fast path: one coded field with a packed table, 2- or 4-byte elements, and raw
    /// fields at most 8 bits wide (the fused merge's limits). The common layouts of real weights qualify.
    fn fast_table(&self) -> Option<&PackedTable> {
        let fits = self.tables.len() == 1
            && matches!(self.width, 2 | 4)
            && self
                .params
                .fields
                .iter()
                .all(|f| f.coding == Coding::Rans || f.width <= 8);
        self.tables[..].first().filter(|_| fits)?.packed.as_ref()
    }

    /// `merge` for the element width of the fast path (2 or 4 bytes, as `fast_table` requires).
    fn merge_fast(
        &self,
        ranks: &[u8],
        packed: &PackedTable,
        raw: &[u8],
        out: &mut [u8],
        done: usize,
    ) {
        match self.width {
            2 => self.merge::<2>(ranks, packed, raw, out, done),
            _ => self.merge::<4>(ranks, packed, raw, out, done),
        }
    }

    /// The raw fields of a block of `n` elements whose raw part is `raw`, in layout order.
    fn raw_fields<'p>(&self, n: usize, raw: &'p [u8]) -> Vec<RawField<'p>> {
        let mut fields = Vec::new();
        let mut pos = 0;
        for (f, &shift) in self.params.fields.iter().zip(&self.shifts) {
            if f.coding == Coding::Raw {
                let len = bitpack::packed_len(n, f.width);
                fields.push(RawField {
                    bytes: &raw[pos..pos + len],
                    width: f.width,
                    shift,
                });
                pos += align4(len);
            }
        }
        fields
    }

    /// The coded field's symbols shifted into place, by rank.
    fn coded_symbols(&self, alphabet: &[u16]) -> [u32; 256] {
        let coded_shift = self.coded_shifts().next().expect("one coded field");
        let mut symbols = [0u32; 256];
        for (s, &a) in symbols.iter_mut().zip(alphabet) {
            *s = (a as u32) << coded_shift;
        }
        symbols
    }

    /// `coded_symbols` for the 2-byte merge kernels (`simd::Merge16`), when the fast path's elements are 2 bytes
    /// with at most one raw field.
    fn merge16_symbols(&self, alphabet: &[u16]) -> Option<[u16; 256]> {
        let raw_count = self.params.fields.len() - self.tables.len();
        if self.width != 2 || raw_count > 1 {
            return None;
        }
        let symbols = self.coded_symbols(alphabet);
        Some(std::array::from_fn(|k| symbols[k] as u16))
    }

    /// The `simd::Merge16` of a block of `n` elements whose raw part is `raw` (a layout `merge16_symbols`
    /// accepts).
    fn merge16<'p>(
        &self,
        packed: &PackedTable,
        symbols: &'p [u16; 256],
        n: usize,
        raw: &'p [u8],
    ) -> Merge16<'p> {
        let raw = self
            .raw_fields(n, raw)
            .first()
            .map(|f| (f.bytes, f.width, f.shift));
        Merge16 {
            symbols,
            raw,
            windows: self.shifted_windows(packed),
        }
    }

    /// The packed table's rank windows, if any, with the bases shifted into place as `coded_symbols` are.
    fn shifted_windows(&self, packed: &PackedTable) -> Option<super::simd::ShiftedWindows> {
        let coded_shift = self.coded_shifts().next().expect("one coded field");
        packed
            .windows
            .map(|w| super::simd::ShiftedWindows::new(&w, coded_shift))
    }

    /// Writes `alphabet[rank] << shift | raw fields` for every element (`W` bytes each) after the first
    /// `done` (a multiple of 32, already in `out`).
    fn merge<const W: usize>(
        &self,
        ranks: &[u8],
        packed: &PackedTable,
        raw: &[u8],
        out: &mut [u8],
        done: usize,
    ) {
        let alphabet = &packed.alphabet;
        let mut raw_fields = self.raw_fields(ranks.len(), raw);
        let symbols = self.coded_symbols(alphabet);
        let mut first_group = done / 8;
        let skip = |fields: &mut [RawField], groups: usize| {
            for f in fields {
                f.bytes = &f.bytes[groups * f.width as usize..];
            }
        };
        skip(&mut raw_fields, first_group);
        if let Some(symbols16) = self.merge16_symbols(alphabet) {
            // The kernel's groups are of 32 elements; `done` is a whole number of them.
            let merge = self
                .merge16(packed, &symbols16, ranks.len(), raw)
                .advanced(done / 32);
            let more = super::simd::merge16(&ranks[done..], merge, &mut out[2 * done..]) / 8;
            skip(&mut raw_fields, more);
            first_group += more;
            if first_group * 8 == ranks.len() {
                return;
            }
        }
        if W == 4 {
            let raw: Vec<(&[u8], u32, u32)> = raw_fields
                .iter()
                .map(|f| (f.bytes, f.width, f.shift))
                .collect();
            let merge = super::simd::Merge32 {
                symbols: &symbols,
                raw: &raw,
                windows: self.shifted_windows(packed),
            };
            let start = first_group * 8;
            let more = super::simd::merge32(&ranks[start..], merge, &mut out[4 * start..]) / 8;
            skip(&mut raw_fields, more);
            first_group += more;
        }
        let (ranks, out) = (&ranks[first_group * 8..], &mut out[first_group * 8 * W..]);
        match raw_fields[..] {
            [] => merge_fields::<W, 0>(ranks, &symbols, [], out),
            [a] => merge_fields::<W, 1>(ranks, &symbols, [a], out),
            [a, b] => merge_fields::<W, 2>(ranks, &symbols, [a, b], out),
            [a, b, c] => merge_fields::<W, 3>(ranks, &symbols, [a, b, c], out),
            _ => merge_fields_any::<W>(ranks, &symbols, &raw_fields, out),
        }
    }
}

/// Decodes one block with each of two decoders (two blocks of one tensor, each with its tensor's or its own
/// params), their rANS streams interleaved when both take the fast path; otherwise one after the other. Same
/// results as two `decode_block` calls.
pub fn decode_pair(
    decoders: [&SplitDecoder; 2],
    payloads: [&[u8]; 2],
    outs: [&mut [u8]; 2],
) -> [Result<(), rans::StreamError>; 2] {
    let [out_a, out_b] = outs;
    let [dec_a, dec_b] = decoders;
    let n = [out_a.len() / dec_a.width, out_b.len() / dec_b.width];
    let parts = [
        dec_a.rans_part(payloads[0], n[0]),
        dec_b.rans_part(payloads[1], n[1]),
    ];
    let (
        [Some(packed_a), Some(packed_b)],
        [Ok((Some((states_a, words_a)), raw_a)), Ok((Some((states_b, words_b)), raw_b))],
    ) = ([dec_a.fast_table(), dec_b.fast_table()], &parts)
    else {
        return [
            dec_a.decode_block(payloads[0], out_a),
            dec_b.decode_block(payloads[1], out_b),
        ];
    };
    let raw = [&payloads[0][*raw_a..], &payloads[1][*raw_b..]];
    PAIR_SCRATCH.with_borrow_mut(|(scratch_a, scratch_b)| {
        let ranks_a = rank_buffer(scratch_a, n[0]);
        let ranks_b = rank_buffer(scratch_b, n[1]);
        let symbols = [
            dec_a.merge16_symbols(&packed_a.alphabet),
            dec_b.merge16_symbols(&packed_b.alphabet),
        ];
        let results = match &symbols {
            [Some(symbols_a), Some(symbols_b)] => rans::decode_merged16_pair([
                rans::Merged16Block {
                    states: states_a,
                    words: words_a,
                    table: packed_a,
                    merge: dec_a.merge16(packed_a, symbols_a, n[0], raw[0]),
                    ranks: &mut *ranks_a,
                    out: &mut *out_a,
                },
                rans::Merged16Block {
                    states: states_b,
                    words: words_b,
                    table: packed_b,
                    merge: dec_b.merge16(packed_b, symbols_b, n[1], raw[1]),
                    ranks: &mut *ranks_b,
                    out: &mut *out_b,
                },
            ]),
            _ => {
                let [ra, rb] = rans::decode_ranks_pair([
                    (states_a, words_a, packed_a, &mut ranks_a[..]),
                    (states_b, words_b, packed_b, &mut ranks_b[..]),
                ]);
                [ra.map(|()| 0), rb.map(|()| 0)]
            }
        };
        let [ra, rb] = results;
        if let Ok(done) = ra {
            dec_a.merge_fast(ranks_a, packed_a, raw[0], out_a, done);
        }
        if let Ok(done) = rb {
            dec_b.merge_fast(ranks_b, packed_b, raw[1], out_b, done);
        }
        [ra.map(|_| ()), rb.map(|_| ())]
    })
}

/// The first `n` bytes of a reused rank buffer, grown when needed but not cleared: the decoders write every
/// rank before it is read.
fn rank_buffer(scratch: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if scratch.len() < n {
        scratch.resize(n, 0);
    }
    &mut scratch[..n]
}

/// A raw field of a block: its packed bytes, width (at most 8) and shift in the element.
#[derive(Clone, Copy)]
struct RawField<'a> {
    bytes: &'a [u8],
    width: u32,
    shift: u32,
}

/// The fused merge for `R` raw fields, eight elements per raw-field load.
fn merge_fields<const W: usize, const R: usize>(
    ranks: &[u8],
    symbols: &[u32; 256],
    fields: [RawField<'_>; R],
    out: &mut [u8],
) {
    let full = ranks.len() / 8;
    let (out_full, out_tail) = out.split_at_mut(full * 8 * W);
    for (g, (out8, ranks8)) in out_full
        .chunks_exact_mut(8 * W)
        .zip(ranks.chunks_exact(8))
        .enumerate()
    {
        let mut values = [0u32; 8];
        for (v, &r) in values.iter_mut().zip(ranks8) {
            *v = symbols[r as usize];
        }
        for f in &fields {
            let bits = bitpack::group_of_8(f.bytes, f.width, g);
            let mask = (1u64 << f.width) - 1;
            for (k, v) in values.iter_mut().enumerate() {
                *v |= (((bits >> (k as u32 * f.width)) & mask) as u32) << f.shift;
            }
        }
        for (chunk, v) in out8.chunks_exact_mut(W).zip(values) {
            chunk.copy_from_slice(&v.to_le_bytes()[..W]);
        }
    }
    merge_tail::<W>(ranks, symbols, &fields, full, out_tail);
}

/// The merge for any number of raw fields.
fn merge_fields_any<const W: usize>(
    ranks: &[u8],
    symbols: &[u32; 256],
    fields: &[RawField<'_>],
    out: &mut [u8],
) {
    merge_tail::<W>(ranks, symbols, fields, 0, out);
}

/// Merges groups `first_group..` of eight elements one by one.
fn merge_tail<const W: usize>(
    ranks: &[u8],
    symbols: &[u32; 256],
    fields: &[RawField<'_>],
    first_group: usize,
    out: &mut [u8],
) {
    let groups = out
        .chunks_mut(8 * W)
        .zip(ranks[first_group * 8..].chunks(8));
    for (g, (out8, ranks8)) in groups.enumerate() {
        let g = g + first_group;
        for (k, (chunk, &r)) in out8.chunks_exact_mut(W).zip(ranks8).enumerate() {
            let mut v = symbols[r as usize];
            for f in fields {
                let bits = bitpack::group_of_8(f.bytes, f.width, g);
                v |= (((bits >> (k as u32 * f.width)) & ((1u64 << f.width) - 1)) as u32) << f.shift;
            }
            chunk.copy_from_slice(&v.to_le_bytes()[..W]);
        }
    }
}

thread_local! {
    /// Per-thread rank buffers of `decode_block_pair`.
    static PAIR_SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Per-thread rank buffer of the fast decode path, so blocks do not allocate.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Histograms of a float tensor from which every candidate layout's cost follows.
pub struct FieldStats {
    pub dtype: Dtype,
    pub elements: u64,
    /// Width of the top part (`min(16, bits)`), counted jointly.
    pub top_bits: u32,
    /// The values of the top `top_bits` bits that occur, ascending, with their counts: a sparse histogram.
    pub top: Vec<(usize, u64)>,
    /// Histograms of each byte below the top part, most significant first.
    pub low_bytes: Vec<Vec<u64>>,
    /// Per block, in block order, the histogram of the top `BLOCK_TOP_BITS` bits (empty unless asked for by
    /// `gather_with_block_tops`), from which a block's top field of any codable width follows.
    pub block_tops: Vec<SparseCounts>,
}

/// Width of the per-block top histograms of `FieldStats::gather_with_block_tops`: the widest top field a
/// layout may code.
pub const BLOCK_TOP_BITS: u32 = MAX_SYMBOL_BITS;

/// A histogram of a `bits`-bit field kept as the symbols that occur, ascending, with their counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseCounts {
    pub bits: u32,
    pub used: Vec<(u16, u32)>,
}

impl SparseCounts {
    /// The counts of the whole alphabet.
    pub fn dense(&self) -> Vec<u64> {
        let mut counts = vec![0; 1 << self.bits];
        for &(symbol, c) in &self.used {
            counts[symbol as usize] = c as u64;
        }
        counts
    }
}

impl FieldStats {
    /// Counts over the whole tensor, in parallel over 8 MiB slices whose histograms are then summed (the
    /// sums do not depend on how the work was split). A tensor of fewer elements than an eighth of the top
    /// part's values (biases, norms) has its top values sorted instead, so that it never touches a table
    /// of 2^16 counters.
    pub fn gather(dtype: Dtype, data: &[u8]) -> FieldStats {
        Self::gather_with_block_tops(dtype, data, None)
    }

    /// `gather`, and with `block_elements`, each block's top histogram (`block_tops`) counted in the same
    /// pass: the encoder then need not count a block's top field again. Slices are whole blocks. A tensor
    /// small enough to be sorted gets none.
    pub fn gather_with_block_tops(
        dtype: Dtype,
        data: &[u8],
        block_elements: Option<usize>,
    ) -> FieldStats {
        use rayon::prelude::*;
        let width = dtype.byte_width().expect("whole-byte dtype");
        let bits = dtype.bits();
        let top_bits = bits.min(16);
        let low_count = ((bits - top_bits) / 8) as usize;
        let data = &data[..data.len() / width * width];
        let elements = data.len() / width;
        let block_bytes = block_elements.map(|b| b.max(1) * width);
        let low_histograms = |chunk: &[u8]| -> Vec<Vec<u64>> {
            (0..low_count)
                .map(|k| {
                    let mut hist = vec![0u64; 256];
                    add_field_counts(chunk, width, 8 * (low_count - 1 - k) as u32, 8, &mut hist);
                    hist
                })
                .collect()
        };
        let slice = match block_bytes {
            Some(b) => ((8 << 20) / b).max(1) * b,
            None => (8 << 20) / width * width,
        };
        let partial = |chunk: &[u8]| {
            let (top, tops) =
                occurring_values(chunk, width, bits - top_bits, top_bits, block_bytes);
            (top, low_histograms(chunk), tops)
        };
        type Partial = (Vec<(usize, u64)>, Vec<Vec<u64>>, Vec<SparseCounts>);
        let sum = |(a, mut al, mut at): Partial, (b, bl, bt): Partial| {
            for (ha, hb) in al.iter_mut().zip(&bl) {
                ha.iter_mut().zip(hb).for_each(|(x, y)| *x += y);
            }
            at.extend(bt);
            (add_sparse(&a, &b), al, at)
        };
        let (top, low_bytes, block_tops) = if elements < (1 << top_bits) / 8 {
            let shift = bits - top_bits;
            let mut values: Vec<u64> = element_values(data, width)
                .iter()
                .map(|&v| (v >> shift) & field_mask(top_bits))
                .collect();
            values.sort_unstable();
            let top = values
                .chunk_by(|a, b| a == b)
                .map(|run| (run[0] as usize, run.len() as u64))
                .collect();
            (top, low_histograms(data), Vec::new())
        } else if data.len() <= slice {
            partial(data)
        } else {
            data.par_chunks(slice)
                .map(partial)
                .reduce_with(sum)
                .expect("at least one slice")
        };
        FieldStats {
            dtype,
            elements: elements as u64,
            top_bits,
            top,
            low_bytes,
            block_tops,
        }
    }

    /// Each block's histogram of the top `bits` bits (at most `BLOCK_TOP_BITS`), folded from `block_tops`
    /// and kept sparse: a weight field uses a tenth of its alphabet or less.
    pub fn block_top_field(&self, bits: u32) -> Vec<SparseCounts> {
        let bits = bits.min(BLOCK_TOP_BITS);
        let shift = BLOCK_TOP_BITS - bits;
        self.block_tops
            .iter()
            .map(|tops| {
                let mut used: Vec<(u16, u32)> = Vec::with_capacity(tops.used.len());
                for &(symbol, c) in &tops.used {
                    match used.last_mut() {
                        Some((last, total)) if *last == symbol >> shift => *total += c,
                        _ => used.push((symbol >> shift, c)),
                    }
                }
                SparseCounts { bits, used }
            })
            .collect()
    }

    /// Histogram of the top `hi` bits.
    fn top_field(&self, hi: u32, occurring: &[(usize, u64)]) -> Vec<u64> {
        let shift = self.top_bits - hi;
        let mut h = vec![0u64; 1 << hi];
        for &(v, c) in occurring {
            h[v >> shift] += c;
        }
        h
    }

    /// Histogram of the `top_bits - hi` bits below the top `hi`; empty when too wide to code.
    fn mid_field(&self, hi: u32, occurring: &[(usize, u64)]) -> Vec<u64> {
        let mid = self.top_bits - hi;
        if mid > MAX_SYMBOL_BITS {
            return Vec::new();
        }
        let mut h = vec![0u64; 1 << mid];
        for &(v, c) in occurring {
            h[v & ((1 << mid) - 1)] += c;
        }
        h
    }

    /// The fields and their histograms for a top field of `hi` bits (a histogram is empty for a field too
    /// wide to code).
    pub fn candidate_fields(&self, hi: u32) -> Vec<(u32, Vec<u64>)> {
        let occurring = &self.top;
        let (top, mid) = (self.top_field(hi, occurring), self.mid_field(hi, occurring));
        self.layout_fields(hi, top, mid)
    }

    /// The fields of the layout with a top field of `hi` bits, from its top and middle histograms (the middle
    /// one is dropped when the top field takes the whole top part).
    fn layout_fields(&self, hi: u32, top: Vec<u64>, mid: Vec<u64>) -> Vec<(u32, Vec<u64>)> {
        let mut out = vec![(hi, top)];
        if hi < self.top_bits {
            out.push((self.top_bits - hi, mid));
        }
        out.extend(self.low_bytes.iter().map(|h| (8, h.clone())));
        out
    }

    /// `candidate_fields(hi)` for every `hi` in `1..=min(top_bits, MAX_SYMBOL_BITS)`, in that order: the
    /// widest top and middle fields are counted from the occurring values once, and the others are folded from
    /// them (a top field of `hi` bits sums pairs of the one of `hi + 1`; a middle field drops its top bit).
    fn all_candidate_fields(&self) -> Vec<Vec<(u32, Vec<u64>)>> {
        let occurring = &self.top;
        let widest = self.top_bits.min(MAX_SYMBOL_BITS);
        let mut tops = vec![self.top_field(widest, occurring)];
        while tops.len() < widest as usize {
            let wider = tops.last().expect("one top field");
            tops.push(wider.chunks_exact(2).map(|p| p[0] + p[1]).collect());
        }
        // tops[hi - 1] is the top field of hi bits.
        tops.reverse();
        // The middle field of the smallest `hi` that leaves it codable, then narrower ones.
        let first_mid = self.top_bits.saturating_sub(MAX_SYMBOL_BITS).max(1);
        let mut mids: Vec<Vec<u64>> = Vec::new();
        for hi in 1..=widest {
            let mid = if hi >= self.top_bits || hi < first_mid {
                Vec::new()
            } else if let Some(wider) = mids.last().filter(|m| !m.is_empty()) {
                let half = wider.len() / 2;
                wider[..half]
                    .iter()
                    .zip(&wider[half..])
                    .map(|(a, b)| a + b)
                    .collect()
            } else {
                self.mid_field(hi, occurring)
            };
            mids.push(mid);
        }
        (1..=widest)
            .zip(tops)
            .zip(mids)
            .map(|((hi, top), mid)| self.layout_fields(hi, top, mid))
            .collect()
    }
}

/// The cheapest way to store one field: raw (None) or a table, and its cost in bits (table included).
pub(crate) fn best_coding(
    counts: &[u64],
    width: u32,
    elements: u64,
    max_prob_bits: u32,
) -> (f64, Option<FreqTable>) {
    FieldPrice::new(counts).best_coding(width, elements, max_prob_bits)
}

/// What pricing a field's tables needs, computed once per histogram: its used symbols and its entropy.
struct FieldPrice {
    used: UsedCounts,
    /// Entropy in bits per element, exactly as `freq::entropy_bits` computes it.
    entropy: f64,
}

impl FieldPrice {
    fn new(counts: &[u64]) -> FieldPrice {
        let used = UsedCounts::new(counts);
        let entropy = used.entropy_bits();
        FieldPrice { used, entropy }
    }

    /// `best_coding`: each precision is normalized and priced over the used symbols only, precisions whose
    /// floor cannot beat the best so far are skipped, and only the winner becomes a table.
    fn best_coding(
        &self,
        width: u32,
        elements: u64,
        max_prob_bits: u32,
    ) -> (f64, Option<FreqTable>) {
        let raw = (width as u64 * elements) as f64;
        if width > MAX_SYMBOL_BITS {
            return (raw, None);
        }
        let used = &self.used;
        let coded_floor = self.entropy_floor(elements);
        let mut best_cost = raw;
        let mut best: Option<(u32, Vec<u32>)> = None;
        let mut freqs = Vec::with_capacity(used.used.len());
        for prob_bits in ENCODER_MIN_PROB_BITS..=max_prob_bits {
            let floor = coded_floor + 8.0 * used.serialized_len_floor(Some(prob_bits)) as f64;
            if floor < best_cost && used.normalize(prob_bits, &mut freqs) {
                let cost =
                    used.coded_bits(&freqs, prob_bits) + 8.0 * used.serialized_len(&freqs) as f64;
                if cost < best_cost {
                    best_cost = cost;
                    let spare = best.take().map(|(_, f)| f).unwrap_or_default();
                    best = Some((prob_bits, std::mem::replace(&mut freqs, spare)));
                }
            }
        }
        let table = best.map(|(prob_bits, freqs)| {
            FreqTable::from_freqs(used.dense(&freqs, width), width, prob_bits)
                .expect("normalized frequencies sum to the precision")
        });
        (best_cost, table)
    }

    /// A lower bound on the rANS-coded bits of `elements` symbols under any table: their entropy, less a
    /// margin for the rounding of the sums.
    fn entropy_floor(&self, elements: u64) -> f64 {
        self.entropy * elements as f64 * (1.0 - 1e-9) - 1e-6
    }

    /// Whether a secondary field cannot save `MIN_SECONDARY_GAIN_BITS` per element even at its entropy, or at
    /// its entropy plus its smallest table, so that `charge_secondary` would keep it raw: its tables need not
    /// be built.
    fn hopeless_as_secondary(&self, width: u32, elements: u64) -> bool {
        let raw = (width as u64 * elements) as f64;
        let needed = MIN_SECONDARY_GAIN_BITS * elements as f64;
        raw - self.entropy * (elements as f64) < needed
            || raw - self.floor(width, elements) < needed
    }

    /// A lower bound on what `best_coding` returns at up to `max_prob_bits`, tighter than `floor` for fields
    /// with many rare symbols: raw, or `slot_floor` plus the smallest table.
    fn slot_aware_floor(&self, width: u32, elements: u64, max_prob_bits: u32) -> f64 {
        self.floor_with(width, elements, || self.slot_floor(max_prob_bits))
    }

    /// A lower bound on the rANS-coded bits under any table of at most `2^prob_bits` slots (infinite when
    /// more symbols occur than that). Every occurring symbol takes a slot, so the rarest ones cost up to
    /// `prob_bits` bits each, far above their entropy. The bound is the Lagrange dual of the relaxed problem
    /// (real frequencies of at least one slot, summing to the slots): for any multiplier it is at most the
    /// relaxed minimum, hence at most any table's cost, so an approximate multiplier keeps it valid.
    fn slot_floor(&self, prob_bits: u32) -> f64 {
        let slots = (1u64 << prob_bits) as f64;
        let used = &self.used.used;
        if used.len() as f64 > slots {
            return f64::INFINITY;
        }
        // The multiplier as a count `mu`: a symbol's relaxed share is `max(c / mu, 1 / slots)`. Symbols below
        // `mu / slots` are held at one slot, and the rest share what is left in proportion to their counts.
        let total = self.used.total as f64;
        let mut mu = total;
        for _ in 0..4 {
            // In integers, which vectorize: a count is below `mu / slots` exactly when it is below its
            // ceiling, and sums of counts are exact in f64 as in u64.
            let below = (mu / slots).ceil() as u64;
            let (mut held, mut rest) = (0u64, 0u64);
            for &(_, c) in used {
                held += (c < below) as u64;
                rest += if c < below { 0 } else { c };
            }
            if rest == 0 {
                break;
            }
            mu = rest as f64 * slots / (slots - held as f64);
        }
        // The dual at `mu` (in bits): sum over symbols of min over shares q >= 1/slots of
        // c * -log2(q) + q * mu / ln 2, less mu / ln 2.
        let per_share = mu / std::f64::consts::LN_2;
        let bound: f64 = used
            .iter()
            .map(|&(_, c)| {
                let c = c as f64;
                match c < mu / slots {
                    true => c * prob_bits as f64 + per_share / slots,
                    false => -c * (c / mu).log2() + c / std::f64::consts::LN_2,
                }
            })
            .sum::<f64>()
            - per_share;
        // A margin for the rounding of the sums, as in `entropy_floor`.
        bound * (1.0 - 1e-9) - 1e-6
    }

    /// A lower bound on what `best_coding` returns: raw, or the entropy plus the smallest table.
    fn floor(&self, width: u32, elements: u64) -> f64 {
        self.floor_with(width, elements, || self.entropy_floor(elements))
    }

    /// Raw, or a floor of the coded bits plus the smallest table, whichever is less.
    fn floor_with(&self, width: u32, elements: u64, coded_floor: impl FnOnce() -> f64) -> f64 {
        let raw = (width as u64 * elements) as f64;
        if width > MAX_SYMBOL_BITS {
            return raw;
        }
        let table = 8.0 * self.used.serialized_len_floor(None) as f64;
        raw.min(coded_floor() + table)
    }
}

/// Keeps a secondary field raw unless coding it saves `MIN_SECONDARY_GAIN_BITS` per element.
fn charge_secondary(
    cost: f64,
    table: Option<FreqTable>,
    width: u32,
    elements: u64,
    secondary: bool,
) -> (f64, Option<FreqTable>) {
    let raw = (width as u64 * elements) as f64;
    if secondary && table.is_some() && raw - cost < MIN_SECONDARY_GAIN_BITS * elements as f64 {
        (raw, None)
    } else {
        (cost, table)
    }
}

/// Symbols above which `plan` checks a field against `FieldPrice::slot_aware_floor` before building its tables.
const MANY_SYMBOLS: usize = 256;

/// A chosen layout and its predicted size.
pub struct Plan {
    pub params: SplitParams,
    /// Predicted bits for the whole tensor, tables and flushes included.
    pub predicted_bits: f64,
    /// The zero-order bound of this layout: field entropies plus raw bits, no tables or flushes.
    pub bound_bits: f64,
    /// The tensor's histogram of each field (empty for fields wider than `MAX_SYMBOL_BITS`).
    pub field_counts: Vec<Vec<u64>>,
}

/// A candidate layout's fields: width, histogram (empty when too wide to code) and its price (None when empty).
type CandidateFields = Vec<(u32, Vec<u64>, Option<FieldPrice>)>;

impl Plan {
    fn top_width(&self) -> u32 {
        self.params.fields[0].width
    }
}

/// Picks the layout with the lowest predicted size for a tensor split into `blocks` blocks.
/// Returns None when no layout codes any field for less than storing it raw.
pub fn plan(stats: &FieldStats, blocks: u64) -> Option<Plan> {
    let n = stats.elements;
    if n == 0 {
        return None;
    }
    let flush_bits = blocks as f64 * (RANS_HEADER_BYTES as f64 + 2.0) * 8.0;
    let mut best: Option<Plan> = None;
    // Each layout costs at least its zero-order bound (entropy or raw per field, plus flushes), so layouts are
    // tried in order of bound and those whose bound exceeds the best cost found are never built. Ties between
    // equal costs go to the smaller top field, as in a plain scan.
    let mut candidates: Vec<(f64, u32, CandidateFields, Vec<f64>)> = stats
        .all_candidate_fields()
        .into_iter()
        .zip(1..)
        .map(|(fields, hi)| {
            let fields: CandidateFields = fields
                .into_iter()
                .map(|(width, counts)| {
                    let price = (!counts.is_empty()).then(|| FieldPrice::new(&counts));
                    (width, counts, price)
                })
                .collect();
            let raw = |width: u32| (width as u64 * n) as f64;
            let floors: Vec<f64> = fields
                .iter()
                .map(|(width, _, price)| price.as_ref().map_or(raw(*width), |p| p.floor(*width, n)))
                .collect();
            (floors.iter().sum::<f64>() + flush_bits, hi, fields, floors)
        })
        .collect();
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for (lower_bound, hi, candidate, floors) in candidates {
        if best
            .as_ref()
            .is_some_and(|b| lower_bound > b.predicted_bits)
        {
            continue;
        }
        let mut fields = Vec::new();
        let mut tables = Vec::new();
        let mut cost = 0.0;
        let mut bound = 0.0;
        let mut field_counts = Vec::new();
        // Before each field, what the fields before it cost plus the floors of it and the rest: a layout that
        // cannot beat the best any more is dropped before its remaining tables are built (with a margin for
        // the rounding of the sums).
        let floors_from: Vec<f64> = (0..floors.len())
            .map(|i| floors[i..].iter().sum())
            .collect();
        let mut hopeless = false;
        let floors_after = floors_from.iter().skip(1).copied().chain([0.0]);
        for (((width, counts, price), floor_from), floor_after) in candidate
            .into_iter()
            .zip(floors_from.iter().copied())
            .zip(floors_after)
        {
            if best.as_ref().is_some_and(|b| {
                (cost + floor_from + flush_bits) * (1.0 - 1e-12) > b.predicted_bits
            }) {
                hopeless = true;
                break;
            }
            let raw = (width as u64 * n) as f64;
            // A field of many symbols is first held to a floor that counts the slots its rare symbols take
            // (`slot_aware_floor`, a few passes over its symbols against a normalization's heap). With no
            // more elements than slots no symbol is below a slot, and the floor would be the entropy's.
            if let (Some(p), Some(b)) = (&price, &best) {
                if p.used.used.len() > MANY_SYMBOLS && n > 1 << ENCODER_MAX_PROB_BITS {
                    let floor = p.slot_aware_floor(width, n, ENCODER_MAX_PROB_BITS);
                    if (cost + floor + floor_after + flush_bits) * (1.0 - 1e-12) > b.predicted_bits
                    {
                        hopeless = true;
                        break;
                    }
                }
            }
            // A secondary field that cannot save enough stays raw without building tables.
            let (c, table) = match &price {
                Some(p) if tables.is_empty() || !p.hopeless_as_secondary(width, n) => {
                    p.best_coding(width, n, ENCODER_MAX_PROB_BITS)
                }
                _ => (raw, None),
            };
            let (c, table) = charge_secondary(c, table, width, n, !tables.is_empty());
            cost += c;
            match table {
                Some(t) => {
                    let entropy = price.as_ref().expect("a coded field has counts").entropy;
                    bound += entropy * n as f64;
                    tables.push(t);
                    fields.push(Field {
                        width,
                        coding: Coding::Rans,
                    });
                }
                None => {
                    bound += (width as u64 * n) as f64;
                    fields.push(Field {
                        width,
                        coding: Coding::Raw,
                    });
                }
            }
            field_counts.push(if width <= MAX_SYMBOL_BITS {
                counts
            } else {
                Vec::new()
            });
        }
        if hopeless || tables.is_empty() {
            continue;
        }
        cost += flush_bits;
        let better = best.as_ref().is_none_or(|b| {
            cost < b.predicted_bits || (cost == b.predicted_bits && hi < b.top_width())
        });
        if better {
            best = Some(Plan {
                params: SplitParams { fields, tables },
                predicted_bits: cost,
                bound_bits: bound,
                field_counts,
            });
        }
    }
    best.filter(|p| p.predicted_bits < (n * stats.dtype.bits() as u64) as f64)
}

/// Each field's shift in the element: the first field is the highest.
fn field_shifts(fields: &[Field]) -> Vec<u32> {
    let mut remaining: u32 = fields.iter().map(|f| f.width).sum();
    fields
        .iter()
        .map(|f| {
            remaining -= f.width;
            remaining
        })
        .collect()
}

/// Adds the histogram of the `bits`-bit field at `shift` of the `width`-byte elements of `block` to
/// `counts` (`2^bits` long).
fn add_field_counts(block: &[u8], width: usize, shift: u32, bits: u32, counts: &mut [u64]) {
    match width {
        2 => field_histogram::<2>(block, shift, bits, counts),
        4 => field_histogram::<4>(block, shift, bits, counts),
        _ => {
            let mask = field_mask(bits);
            for v in element_values(block, width) {
                counts[((v >> shift) & mask) as usize] += 1;
            }
        }
    }
}

/// Histogram of every field of `fields` over a block (empty for fields too wide to code).
pub fn block_field_counts(fields: &[Field], dtype: Dtype, block: &[u8]) -> Vec<Vec<u64>> {
    block_field_counts_where(fields, &vec![true; fields.len()], dtype, block)
}

/// `block_field_counts` of the fields where `counted` is true; the others get an empty histogram.
fn block_field_counts_where(
    fields: &[Field],
    counted: &[bool],
    dtype: Dtype,
    block: &[u8],
) -> Vec<Vec<u64>> {
    let width = dtype.byte_width().expect("whole-byte dtype");
    fields
        .iter()
        .zip(field_shifts(fields))
        .zip(counted)
        .map(|((f, shift), &counted)| {
            if !counted || f.width > MAX_SYMBOL_BITS {
                return Vec::new();
            }
            let mut c = vec![0; 1 << f.width];
            add_field_counts(block, width, shift, f.width, &mut c);
            c
        })
        .collect()
}

/// Fewest elements a block needs for `block_field_counts_for_coding` to judge a raw field from a sample.
const SAMPLED_FIELD_MIN_ELEMENTS: usize = 8192;

/// How close to its width (bits per element) a raw field's sampled entropy must be for
/// `block_field_counts_for_coding` to leave it uncounted: half of `MIN_SECONDARY_GAIN_BITS`, a margin far
/// beyond the sample's error (an eighth of a block of at least 8192 elements).
const SAMPLED_FIELD_SKIP_BITS: f64 = MIN_SECONDARY_GAIN_BITS / 2.0;

/// `block_field_counts` for choosing a block's coding (`choose_block_coding`): a field the tensor keeps raw
/// after a coded one is left uncounted (empty, which prices it raw) when the entropy of a sample of the block
/// (every eighth run of 64 elements) is within `SAMPLED_FIELD_SKIP_BITS` of its width, since a table of its
/// own must save `MIN_SECONDARY_GAIN_BITS` per element. Such fields, the low mantissa bits of weights, are
/// nearly uniform, and counting them is a full pass over the block.
///
/// `first`, when given, is the first field's histogram, already counted (`FieldStats::block_top_field`).
pub fn block_field_counts_for_coding(
    fields: &[Field],
    dtype: Dtype,
    block: &[u8],
    first: Option<&SparseCounts>,
) -> Vec<Vec<u64>> {
    let width = dtype.byte_width().expect("whole-byte dtype");
    let n = block.len() / width;
    let first_coded = fields.iter().position(|f| f.coding == Coding::Rans);
    let skippable: Vec<bool> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let secondary = first_coded.is_some_and(|c| c < i);
            let candidate = secondary && f.coding == Coding::Raw && f.width <= MAX_SYMBOL_BITS;
            candidate && n >= SAMPLED_FIELD_MIN_ELEMENTS && (width == 2 || width == 4)
        })
        .collect();
    let first = first.filter(|c| fields.first().is_some_and(|f| c.bits == f.width));
    let shifts = field_shifts(fields);
    // The other fields first: their pass streams the block into cache for the sample's scattered reads.
    let others: Vec<bool> = (0..fields.len())
        .map(|i| !(skippable[i] || (i == 0 && first.is_some())))
        .collect();
    let mut counts = block_field_counts_where(fields, &others, dtype, block);
    if let Some(first) = first {
        counts[0] = first.dense();
    }
    // Where no field was counted (the first one's counts came with the block), the samples below would
    // each wait on memory: one sequential read of every cache line brings the block in at the prefetchers'
    // pace.
    if skippable.contains(&true) && !others.contains(&true) {
        let touched = block.chunks(64).fold(0u8, |x, line| x ^ line[0]);
        std::hint::black_box(touched);
    }
    for (i, f) in fields.iter().enumerate().filter(|&(i, _)| skippable[i]) {
        if sampled_entropy_bits(block, width, shifts[i], f.width)
            < f.width as f64 - SAMPLED_FIELD_SKIP_BITS
        {
            counts[i] = vec![0; 1 << f.width];
            add_field_counts(block, width, shifts[i], f.width, &mut counts[i]);
        }
    }
    counts
}

/// The entropy of the `bits`-bit field at `shift` over `block_field_counts_for_coding`'s sample of a block of
/// 2- or 4-byte elements (every eighth run of 64): one table for all runs, counted a word at a time.
fn sampled_entropy_bits(block: &[u8], width: usize, shift: u32, bits: u32) -> f64 {
    let mask = field_mask(bits) as u32;
    let mut counts = vec![[0u32; 1]; 1 << bits];
    for run in block.chunks(64 * width).step_by(8) {
        count_into(run, width, shift, mask, &mut counts);
    }
    super::freq::entropy_of(counts.iter().map(|&[c]| c as u64))
}

/// `count_into_sub_histograms` for elements of any whole-byte `width` (2- and 4-byte ones a word at a time;
/// others, whose sub-histograms are not interleaved, into the first).
fn count_into<const S: usize>(
    part: &[u8],
    width: usize,
    shift: u32,
    mask: u32,
    table: &mut [[u32; S]],
) {
    match width {
        2 => count_into_sub_histograms::<2, S>(part, shift, mask, table),
        4 => count_into_sub_histograms::<4, S>(part, shift, mask, table),
        _ => {
            for v in element_values(part, width) {
                table[((v >> shift) & mask as u64) as usize][0] += 1;
            }
        }
    }
}

/// Adds the histogram of one field of `W`-byte elements to `counts`. Elements are read eight bytes at a time
/// and counted into `SUB_HISTOGRAMS` interleaved sub-histograms, so that a symbol repeated in neighbouring
/// elements does not serialize on one counter.
fn field_histogram<const W: usize>(block: &[u8], shift: u32, width: u32, counts: &mut [u64]) {
    let mask = (1u32 << width) - 1;
    let elements = block.len() / W;
    if elements < 4 * counts.len() {
        // Few elements for the alphabet: sub-histograms would cost more to clear and sum than they save.
        for e in block.chunks_exact(W) {
            counts[field_value::<W>(e, shift, mask) as usize] += 1;
        }
        return;
    }
    sub_histograms::<W, SUB_HISTOGRAMS>(block, shift, mask, counts)
}

/// The field at `shift` under `mask` of one little-endian `W`-byte element.
fn field_value<const W: usize>(element: &[u8], shift: u32, mask: u32) -> u32 {
    let mut le = [0u8; 4];
    le[..W].copy_from_slice(element);
    (u32::from_le_bytes(le) >> shift) & mask
}

/// Sub-histograms of `field_histogram`. Two beat four and eight on Zen 3 for every field of bf16 MiniLM
/// (6, 10 and 16 bits): the tables stay small and repeats are rare enough.
const SUB_HISTOGRAMS: usize = 2;

/// `field_histogram`'s counting through `S` sub-histograms: `count_into_sub_histograms` into a fresh table,
/// then summed into `counts` (a power of two long).
fn sub_histograms<const W: usize, const S: usize>(
    block: &[u8],
    shift: u32,
    mask: u32,
    counts: &mut [u64],
) {
    // u32 counters: a block holds fewer than 2^32 elements
    let mut sub = vec![[0u32; S]; counts.len()];
    count_into_sub_histograms::<W, S>(block, shift, mask, &mut sub);
    for (total, s) in counts.iter_mut().zip(&sub) {
        *total += s.iter().map(|&k| k as u64).sum::<u64>();
    }
}

/// Adds the field at `shift` under `mask` of each `W`-byte element of `block` to `sub` (a power of two long,
/// more than the field's largest value). `S` divides the elements of a word: the element in lane `k` of each
/// 8-byte word goes to the `k % S`-th sub-histogram.
fn count_into_sub_histograms<const W: usize, const S: usize>(
    block: &[u8],
    shift: u32,
    mask: u32,
    sub: &mut [[u32; S]],
) {
    let per_word = 8 / W;
    debug_assert!(per_word.is_multiple_of(S) && sub.len().is_power_of_two());
    // Masking by the table size lets the compiler drop the bounds checks.
    let last = sub.len() - 1;
    let words = block.chunks_exact(8);
    let rest = words.remainder();
    for word in words {
        let word = u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
        for lane in 0..per_word {
            let value = (word >> (8 * W * lane) as u32 >> shift) as u32 & mask;
            sub[value as usize & last][lane % S] += 1;
        }
    }
    for e in rest.chunks_exact(W) {
        sub[field_value::<W>(e, shift, mask) as usize & last][0] += 1;
    }
}

thread_local! {
    /// `occurring_values`' sub-histograms, all zero between calls (the flag says a call was cut short).
    static OCCURRING_COUNTS: std::cell::RefCell<(Vec<[u32; SUB_HISTOGRAMS]>, bool)> =
        const { std::cell::RefCell::new((Vec::new(), false)) };
}

/// The values of the `bits`-bit field at `shift` of the `width`-byte elements of `chunk` (fewer than 2^32)
/// that occur, ascending, with their counts. The counting table is per thread and each call leaves it zero
/// again as it reads it out, so a table of 2^16 counters is neither allocated nor cleared per call. With
/// `block_bytes`, also each block's histogram of the top `BLOCK_TOP_BITS` bits of the field: the table's
/// groups are summed after each block, and a block's counts are the growth since the block before.
fn occurring_values(
    chunk: &[u8],
    width: usize,
    shift: u32,
    bits: u32,
    block_bytes: Option<usize>,
) -> (Vec<(usize, u64)>, Vec<SparseCounts>) {
    OCCURRING_COUNTS.with_borrow_mut(|(sub, dirty)| {
        let len = 1usize << bits;
        if sub.len() < len {
            sub.resize(len, [0; SUB_HISTOGRAMS]);
        }
        if *dirty {
            sub.fill([0; SUB_HISTOGRAMS]);
        }
        *dirty = true;
        let table = &mut sub[..len];
        let mask = field_mask(bits) as u32;
        let mut block_tops = Vec::new();
        match block_bytes.filter(|_| bits >= BLOCK_TOP_BITS) {
            Some(block_bytes) => {
                // Counts only grow, so when the spans of groups that held counts before account for all of
                // a block's elements, no other group changed and they are not summed again.
                const SPAN: usize = 16;
                let group = (len >> BLOCK_TOP_BITS) * SUB_HISTOGRAMS;
                let mut before = vec![0u32; 1 << BLOCK_TOP_BITS];
                let mut occupied = vec![false; (1 << BLOCK_TOP_BITS) / SPAN];
                let mut tops = vec![0u32; 1 << BLOCK_TOP_BITS];
                for block in chunk.chunks(block_bytes) {
                    count_into(block, width, shift, mask, table);
                    let flat = table.as_flattened();
                    tops.fill(0);
                    let mut fold = |span: usize| -> u64 {
                        let groups = span * SPAN..(span + 1) * SPAN;
                        let mut grown = 0;
                        for g in groups {
                            let total = sum_u32(&flat[g * group..(g + 1) * group]);
                            tops[g] = total - std::mem::replace(&mut before[g], total);
                            grown += tops[g] as u64;
                        }
                        grown
                    };
                    let spans = 0..occupied.len();
                    let grown: u64 = spans.clone().filter(|&s| occupied[s]).map(&mut fold).sum();
                    if grown != (block.len() / width) as u64 {
                        for span in spans {
                            if !occupied[span] {
                                occupied[span] = fold(span) > 0;
                            }
                        }
                    }
                    // Kept sparse: a block of weights uses a few hundred of the 4096 values.
                    let used = tops.iter().enumerate().filter(|&(_, &c)| c > 0);
                    block_tops.push(SparseCounts {
                        bits: BLOCK_TOP_BITS,
                        used: used.map(|(symbol, &c)| (symbol as u16, c)).collect(),
                    });
                }
            }
            None => count_into(chunk, width, shift, mask, table),
        }
        let mut occurring = Vec::with_capacity(len.min(chunk.len() / width));
        for (value, counts) in table.iter_mut().enumerate() {
            if *counts != [0; SUB_HISTOGRAMS] {
                occurring.push((value, counts.iter().map(|&k| k as u64).sum()));
                *counts = [0; SUB_HISTOGRAMS];
            }
        }
        *dirty = false;
        (occurring, block_tops)
    })
}

/// The sum of `values`, in 16 vector lanes where it is long enough: the compiler keeps a plain sum serial.
fn sum_u32(values: &[u32]) -> u32 {
    let lanes = values.chunks_exact(16);
    let rest: u32 = lanes.remainder().iter().sum();
    let mut acc = [0u32; 16];
    for chunk in lanes {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<u32>() + rest
}

/// The sum of two sparse histograms (ascending values with counts), ascending.
fn add_sparse(a: &[(usize, u64)], b: &[(usize, u64)]) -> Vec<(usize, u64)> {
    let mut sum = Vec::with_capacity(a.len().max(b.len()));
    let (mut i, mut j) = (0, 0);
    while let (Some(&(va, ca)), Some(&(vb, cb))) = (a.get(i), b.get(j)) {
        match va.cmp(&vb) {
            std::cmp::Ordering::Less => {
                sum.push((va, ca));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                sum.push((vb, cb));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                sum.push((va, ca + cb));
                i += 1;
                j += 1;
            }
        }
    }
    sum.extend_from_slice(&a[i..]);
    sum.extend_from_slice(&b[j..]);
    sum
}

/// Predicted bits of a block coded with `params` (the tensor's tables), from the block's field counts.
pub fn block_cost(params: &SplitParams, counts: &[Vec<u64>], n: u64) -> f64 {
    let mut tables = params.tables.iter();
    let mut bits = 8.0 * (RANS_HEADER_BYTES as f64 + 2.0);
    for (f, c) in params.fields.iter().zip(counts) {
        bits += match f.coding {
            Coding::Raw => (f.width as u64 * n) as f64,
            Coding::Rans => tables
                .next()
                .expect("one table per coded field")
                .coded_bits(c),
        };
    }
    bits
}

/// Zero-order bound of a block under the scheme: each field costs the least of its cross-entropy under the
/// tensor's statistics (for fields the tensor codes), its own entropy, and its raw width. Tables and flushes
/// are not counted.
pub fn block_bound_bits(
    fields: &[Field],
    tensor_counts: &[Vec<u64>],
    counts: &[Vec<u64>],
    n: u64,
) -> f64 {
    let mut bits = 0.0;
    for ((f, tc), c) in fields.iter().zip(tensor_counts).zip(counts) {
        let raw = (f.width as u64 * n) as f64;
        if c.is_empty() {
            bits += raw;
            continue;
        }
        let own = super::freq::entropy_bits(c) * n as f64;
        let cross = if f.coding == Coding::Rans && !tc.is_empty() {
            let log_total = (tc.iter().sum::<u64>() as f64).log2();
            c.iter()
                .zip(tc)
                .filter(|(&k, _)| k > 0)
                .map(|(&k, &t)| k as f64 * (log_total - (t as f64).log2()))
                .sum()
        } else {
            f64::INFINITY
        };
        bits += raw.min(own).min(cross);
    }
    bits
}

/// A block's coding choice: per field, raw, a table of its own, or the tensor's table.
pub struct LocalChoice {
    /// Resolved parameters (borrowed tables copied in).
    pub params: SplitParams,
    /// Per coded field, whether its table is the tensor's.
    pub borrowed: Vec<bool>,
    /// Predicted bits, tables, flush and the params' own bytes included.
    pub bits: f64,
}

impl LocalChoice {
    /// True when every field is coded as the tensor codes it: the block needs no params of its own.
    pub fn is_tensor_layout(&self, tensor: &SplitParams) -> bool {
        self.params.fields == tensor.fields && self.borrowed.iter().all(|&b| b)
    }

    /// Serialized params (coding id 2 for borrowed tables, which are not written).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.params.fields.len() as u8];
        let mut borrowed = self.borrowed.iter();
        let mut is_borrowed = Vec::new();
        for f in &self.params.fields {
            out.push(f.width as u8);
            let b = f.coding == Coding::Rans && *borrowed.next().expect("one flag per coded field");
            out.push(if b {
                CODING_TENSOR_TABLE
            } else {
                f.coding as u8
            });
            if f.coding == Coding::Rans {
                is_borrowed.push(b);
            }
        }
        for (t, b) in self.params.tables.iter().zip(is_borrowed) {
            if !b {
                t.write(&mut out);
            }
        }
        out
    }
}

/// Chooses, for each field of a block, the cheapest of raw, its own table, and the tensor's table.
pub fn choose_block_coding(tensor: &SplitParams, counts: &[Vec<u64>], n: u64) -> LocalChoice {
    let mut params = SplitParams {
        fields: Vec::with_capacity(tensor.fields.len()),
        tables: Vec::new(),
    };
    let mut borrowed = Vec::new();
    let mut bits = 0.0;
    for (index, (f, c)) in tensor.fields.iter().zip(counts).enumerate() {
        let shared_cost = tensor.table_of_field(index).map(|t| t.coded_bits(c));
        let raw = (f.width as u64 * n) as f64;
        // An own table costs at least the block's entropy; skip building tables that cannot win, either
        // outright or because a secondary field would not save enough to be coded (`charge_secondary`).
        let secondary = params.fields.iter().any(|f| f.coding == Coding::Rans);
        let price = (!c.is_empty()).then(|| FieldPrice::new(c));
        let hopeless = price.as_ref().is_some_and(|p| {
            let entropy = p.entropy * n as f64;
            let own_floor = p.floor(f.width, n);
            let to_beat = shared_cost.unwrap_or(f64::INFINITY).min(raw);
            entropy >= to_beat
                || own_floor >= to_beat
                || (secondary && p.hopeless_as_secondary(f.width, n))
        });
        let (mut cost, mut table) = match &price {
            Some(p) if !hopeless => {
                let (cost, table) = p.best_coding(f.width, n, ENCODER_MAX_LOCAL_PROB_BITS);
                charge_secondary(cost, table, f.width, n, secondary)
            }
            _ => (raw, None),
        };
        let mut is_borrowed = false;
        if let (Some(shared), Some(shared_cost)) = (tensor.table_of_field(index), shared_cost) {
            if shared_cost <= cost {
                cost = shared_cost;
                table = Some(shared.clone());
                is_borrowed = true;
            }
        }
        bits += cost;
        let coding = if table.is_some() {
            Coding::Rans
        } else {
            Coding::Raw
        };
        if let Some(t) = table {
            params.tables.push(t);
            borrowed.push(is_borrowed);
        }
        params.fields.push(Field {
            width: f.width,
            coding,
        });
    }
    if params.has_rans() {
        bits += 8.0 * (RANS_HEADER_BYTES as f64 + 2.0);
    }
    LocalChoice {
        params,
        borrowed,
        bits,
    }
}

/// A block that carries its own parameters (mode `split_local`): `params_len u32`, the params, zero padding
/// to 4 bytes, then the split body.
pub fn encode_local_block(choice: &LocalChoice, dtype: Dtype, block: &[u8]) -> Vec<u8> {
    let param_bytes = choice.to_bytes();
    let mut out = Vec::with_capacity(block.len());
    out.extend_from_slice(&(param_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&param_bytes);
    out.resize(align4(out.len()), 0);
    encode_block_into(&choice.params, dtype, block, &mut out);
    out
}

/// Splits a `split_local` payload into its parameters bytes and its split body.
pub fn split_local_payload(payload: &[u8]) -> Result<(&[u8], &[u8]), TableError> {
    let len_bytes = payload
        .get(..4)
        .ok_or_else(|| TableError("local block shorter than 4 bytes".into()))?;
    let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    let params = payload
        .get(4..4usize.saturating_add(len))
        .ok_or_else(|| TableError("local params run past the block".into()))?;
    let body = payload
        .get(align4(4 + len)..)
        .ok_or_else(|| TableError("local block padding missing".into()))?;
    Ok((params, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_bf16(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut out = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let mut u = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            let bits = (u * 0.05).to_bits();
            out.extend_from_slice(&((bits >> 16) as u16).to_le_bytes());
        }
        out
    }

    #[test]
    fn pack_field_packs_as_pack_slice_does() {
        let bytes = gaussian_bf16(4099, 11);
        for len in [0usize, 2, 14, 16, 18, 8190, 8198] {
            for (shift, width) in [(0, 6), (0, 8), (3, 5), (8, 8), (0, 1), (4, 12), (0, 16)] {
                for simd in [false, true] {
                    let block = &bytes[..len];
                    let mut fused = vec![7u8; 4];
                    pack_field_with::<2>(block, shift, width, &mut fused, simd);
                    let mut reference = vec![7u8; 4];
                    let values = field_of::<2>(block, shift, width);
                    bitpack::pack_slice(&values, width, &mut reference);
                    assert_eq!(fused, reference, "2-byte {len} {shift} {width} {simd}");
                    let block = &bytes[..len / 4 * 4];
                    let mut fused = Vec::new();
                    pack_field_with::<4>(block, shift + 8, width, &mut fused, simd);
                    let mut reference = Vec::new();
                    let values = field_of::<4>(block, shift + 8, width);
                    bitpack::pack_slice(&values, width, &mut reference);
                    assert_eq!(fused, reference, "4-byte {len} {shift} {width} {simd}");
                }
            }
        }
    }

    /// `best_coding` as a plain search: every precision's table built and priced in full.
    fn best_coding_exhaustive(
        counts: &[u64],
        width: u32,
        elements: u64,
        max_prob_bits: u32,
    ) -> (f64, Option<FreqTable>) {
        let mut best = ((width as u64 * elements) as f64, None);
        for prob_bits in ENCODER_MIN_PROB_BITS..=max_prob_bits {
            if let Some(table) = FreqTable::from_counts(counts, width, prob_bits) {
                let cost = table.coded_bits(counts) + 8.0 * table.serialized_len() as f64;
                if cost < best.0 {
                    best = (cost, Some(table));
                }
            }
        }
        best
    }

    /// `plan` as a plain scan: every layout built in full with `best_coding_exhaustive`, the cheapest kept (ties
    /// to the smaller top field). Returns its params and predicted bits.
    fn plan_exhaustive(stats: &FieldStats, blocks: u64) -> Option<(SplitParams, f64)> {
        let n = stats.elements;
        let flush_bits = blocks as f64 * (RANS_HEADER_BYTES as f64 + 2.0) * 8.0;
        let mut best: Option<(SplitParams, f64)> = None;
        for hi in 1..=stats.top_bits.min(MAX_SYMBOL_BITS) {
            let (mut fields, mut tables, mut cost) = (Vec::new(), Vec::new(), 0.0);
            for (width, counts) in stats.candidate_fields(hi) {
                let raw = (width as u64 * n) as f64;
                let (c, table) = match counts.is_empty() {
                    true => (raw, None),
                    false => best_coding_exhaustive(&counts, width, n, ENCODER_MAX_PROB_BITS),
                };
                let (c, table) = charge_secondary(c, table, width, n, !tables.is_empty());
                cost += c;
                let coding = match table {
                    Some(t) => {
                        tables.push(t);
                        Coding::Rans
                    }
                    None => Coding::Raw,
                };
                fields.push(Field { width, coding });
            }
            cost += flush_bits;
            if !tables.is_empty() && best.as_ref().is_none_or(|b| cost < b.1) {
                best = Some((SplitParams { fields, tables }, cost));
            }
        }
        best.filter(|b| b.1 < (n * stats.dtype.bits() as u64) as f64)
    }

    #[test]
    fn plan_matches_the_exhaustive_scan() {
        let mut seed = 0x9e37_79b9_u64;
        for round in 0..24u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Weights of different spreads and sizes, and a few repetitive tensors (zeros, two values).
            let n = [7usize, 300, 5000, 70_000][round as usize % 4];
            let mut data = gaussian_bf16(n, seed);
            if round % 6 == 5 {
                for (i, e) in data.chunks_exact_mut(2).enumerate() {
                    e.copy_from_slice(&[0, if i % 3 == 0 { 0x3f } else { 0 }]);
                }
            }
            for (dtype, bytes) in [(Dtype::BF16, &data[..]), (Dtype::F32, &data[..n / 2 * 4])] {
                let stats = FieldStats::gather(dtype, bytes);
                let blocks = 1 + round % 3;
                let fast = plan(&stats, blocks).map(|p| (p.params, p.predicted_bits));
                let reference = plan_exhaustive(&stats, blocks);
                assert_eq!(
                    fast.as_ref().map(|p| (&p.0, p.1.to_bits())),
                    reference.as_ref().map(|p| (&p.0, p.1.to_bits())),
                    "round {round} {dtype:?}"
                );
            }
        }
    }

    #[test]
    fn all_candidate_fields_match_each_candidate() {
        for dtype in Dtype::ALL.iter().copied() {
            let (Some(_), Some(width)) = (dtype.exponent_bits(), dtype.byte_width()) else {
                continue;
            };
            for (n, seed) in [(0usize, 1u64), (9, 2), (5000, 3)] {
                let data: Vec<u8> = gaussian_bf16(n * width, seed)[..n * width].to_vec();
                let stats = FieldStats::gather(dtype, &data);
                let all = stats.all_candidate_fields();
                assert_eq!(
                    all.len() as u32,
                    stats.top_bits.min(MAX_SYMBOL_BITS),
                    "{dtype:?}"
                );
                for (hi, fields) in (1..).zip(&all) {
                    assert_eq!(
                        *fields,
                        stats.candidate_fields(hi),
                        "{dtype:?} n={n} hi={hi}"
                    );
                }
            }
        }
    }

    #[test]
    fn best_coding_matches_the_exhaustive_search() {
        let mut seed = 0x5eed_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut coded, mut tighter) = (0, 0);
        for round in 0..300 {
            let width = 1 + (next() % 12) as u32;
            // From a handful of elements (tables cost more than they save) to many (tables pay).
            let elements = 1 + next() % [16, 400, 5000, 200_000][round % 4];
            let spread = 1 + next() % (1 << width);
            let mut counts = vec![0u64; 1 << width];
            for _ in 0..elements.min(20_000) {
                // Roughly geometric over the first `spread` symbols.
                let r = next();
                let symbol = (r % spread).min((r >> 32).trailing_zeros() as u64 * spread / 8);
                counts[symbol as usize] += 1;
            }
            let n = counts.iter().sum();
            let fast = best_coding(&counts, width, n, ENCODER_MAX_PROB_BITS);
            let reference = best_coding_exhaustive(&counts, width, n, ENCODER_MAX_PROB_BITS);
            assert_eq!(fast.0.to_bits(), reference.0.to_bits(), "round {round}");
            assert_eq!(fast.1, reference.1, "round {round}");
            coded += fast.1.is_some() as usize;
            // The floors that let `plan` skip layouts never exceed the real cost.
            let price = FieldPrice::new(&counts);
            assert!(price.floor(width, n) <= fast.0, "round {round}");
            let slot_aware = price.slot_aware_floor(width, n, ENCODER_MAX_PROB_BITS);
            assert!(
                slot_aware <= fast.0,
                "round {round}: {slot_aware} > {}",
                fast.0
            );
            tighter += (slot_aware > price.floor(width, n)) as usize;
        }
        // Both outcomes occur, and the slot-aware floor is the tighter one in some rounds.
        assert!(coded > 30 && coded < 270, "{coded} of 300 rounds coded");
        assert!(
            tighter > 10,
            "slot-aware floor tighter in {tighter} of 300 rounds"
        );
    }

    #[test]
    fn plan_codes_the_top_bits_of_weights() {
        let data = gaussian_bf16(100_000, 3);
        let stats = FieldStats::gather(Dtype::BF16, &data);
        let plan = plan(&stats, 2).expect("weights compress");
        assert_eq!(plan.params.fields[0].coding, Coding::Rans);
        let bits_per_weight = plan.predicted_bits / 100_000.0;
        assert!(bits_per_weight < 13.0, "{bits_per_weight}");
        assert!(plan.bound_bits <= plan.predicted_bits);
    }

    #[test]
    fn blocks_round_trip_for_every_split_dtype() {
        for dtype in [
            Dtype::BF16,
            Dtype::F16,
            Dtype::F32,
            Dtype::F64,
            Dtype::F8_E4M3,
            Dtype::F8_E5M2,
        ] {
            let width = dtype.byte_width().unwrap();
            let mut data = gaussian_bf16(5000 * width, 9);
            data.truncate(4099 * width);
            let stats = FieldStats::gather(dtype, &data);
            let Some(plan) = plan(&stats, 1) else {
                continue;
            };
            let payload = encode_block(&plan.params, dtype, &data);
            let params = SplitParams::parse(&plan.params.to_bytes(), dtype).unwrap();
            assert_eq!(params, plan.params);
            let decoder = SplitDecoder::new(params, dtype);
            let mut out = vec![0u8; data.len()];
            decoder.decode_block(&payload, &mut out).unwrap();
            assert_eq!(out, data, "{dtype}");
            let mut longer = payload.clone();
            longer.extend_from_slice(&[0; 4]);
            assert!(decoder.decode_block(&longer, &mut out).is_err());
        }
    }

    /// The fast path (packed table, SIMD rANS and merge) against the reference path, for every top-field width
    /// with the rest raw, on 2- and 4-byte dtypes, block sizes with and without a tail, intact and damaged.
    #[test]
    fn fast_path_matches_the_reference() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let width = dtype.byte_width().unwrap();
            for elements in [4099usize, 70_001] {
                let data = gaussian_bf16(elements * width, elements as u64);
                let stats = FieldStats::gather(dtype, &data);
                for hi in 1..=12 {
                    let fields: Vec<(u32, Vec<u64>)> = stats.candidate_fields(hi);
                    let counts = &fields[0].1;
                    let Some(table) = FreqTable::from_counts(counts, hi, 12.min(hi + 4)) else {
                        continue;
                    };
                    let params = SplitParams {
                        fields: fields
                            .iter()
                            .enumerate()
                            .map(|(k, (w, _))| Field {
                                width: *w,
                                coding: if k == 0 { Coding::Rans } else { Coding::Raw },
                            })
                            .collect(),
                        tables: vec![table],
                    };
                    let decoder = SplitDecoder::new(params.clone(), dtype);
                    let payload = encode_block(&params, dtype, &data);
                    let mut fast = vec![0u8; data.len()];
                    let mut reference = vec![0u8; data.len()];
                    decoder.decode_block(&payload, &mut fast).unwrap();
                    decoder
                        .decode_block_reference(&payload, &mut reference)
                        .unwrap();
                    assert_eq!(reference, data, "{dtype} hi={hi}");
                    assert!(fast == data, "{dtype} hi={hi} n={elements}");
                    let mut damaged = payload.clone();
                    let at = RANS_HEADER_BYTES
                        + (hi as usize * 131) % (payload.len() - RANS_HEADER_BYTES);
                    damaged[at] ^= 0x20;
                    let a = decoder.decode_block(&damaged, &mut fast);
                    let b = decoder.decode_block_reference(&damaged, &mut reference);
                    assert_eq!(a, b, "{dtype} hi={hi}");
                    if a.is_ok() {
                        assert!(fast == reference, "{dtype} hi={hi} damaged");
                    }
                }
            }
        }
    }

    /// Pairs of blocks decoded together give what each gives alone, intact or damaged, whatever the sizes.
    #[test]
    fn pair_decode_matches_single_decode() {
        let dtype = Dtype::BF16;
        let data = gaussian_bf16(300_000, 5);
        let stats = FieldStats::gather(dtype, &data);
        let params = plan(&stats, 3).expect("weights compress").params;
        let decoder = SplitDecoder::new(params.clone(), dtype);
        let blocks: Vec<&[u8]> = vec![
            &data[..262_144],
            &data[262_144..524_288],
            &data[524_288..530_002],
        ];
        let payloads: Vec<Vec<u8>> = blocks
            .iter()
            .map(|b| encode_block(&params, dtype, b))
            .collect();
        let mut damaged = payloads[1].clone();
        damaged[RANS_HEADER_BYTES + 1000] ^= 4;
        let cases: [(&[u8], &[u8], usize, usize); 4] = [
            (&payloads[0], &payloads[1], 0, 1),
            (&payloads[0], &payloads[2], 0, 2),
            (&payloads[2], &payloads[0], 2, 0),
            (&damaged, &payloads[0], 1, 0),
        ];
        for (pa, pb, ia, ib) in cases {
            let mut pair_a = vec![0u8; blocks[ia].len()];
            let mut pair_b = vec![0u8; blocks[ib].len()];
            let mut single_a = pair_a.clone();
            let mut single_b = pair_b.clone();
            let results = decoder.decode_block_pair([pa, pb], [&mut pair_a, &mut pair_b]);
            let expected = [
                decoder.decode_block(pa, &mut single_a),
                decoder.decode_block(pb, &mut single_b),
            ];
            assert_eq!(results, expected, "blocks {ia} and {ib}");
            if results[0].is_ok() {
                assert!(pair_a == single_a && pair_a == blocks[ia], "block {ia}");
            }
            if results[1].is_ok() {
                assert!(pair_b == single_b && pair_b == blocks[ib], "block {ib}");
            }
        }
    }

    #[test]
    fn pair_of_two_decoders_matches_single_decodes() {
        let dtype = Dtype::BF16;
        let wide = gaussian_bf16(200_000, 11);
        // Another seed, scaled by 2^-3: the exponents move, so the table and alphabet differ.
        let narrow: Vec<u8> = gaussian_bf16(150_000, 12)
            .chunks_exact(2)
            .flat_map(|c| {
                let f = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) * 0.125;
                (((f.to_bits() + 0x8000) >> 16) as u16).to_le_bytes()
            })
            .collect();
        let setup = |data: &[u8]| {
            let params = plan(&FieldStats::gather(dtype, data), 8)
                .expect("weights compress")
                .params;
            let payload = encode_block(&params, dtype, data);
            (SplitDecoder::new(params, dtype), payload)
        };
        let (dec_wide, pay_wide) = setup(&wide);
        let (dec_narrow, pay_narrow) = setup(&narrow);
        let pay_short = encode_block(dec_narrow.params(), dtype, &narrow[..3_000]);
        assert!(dec_wide.fast_table().is_some() && dec_narrow.fast_table().is_some());
        assert_ne!(
            dec_wide.fast_table().unwrap().alphabet,
            dec_narrow.fast_table().unwrap().alphabet
        );
        let mut damaged = pay_narrow.clone();
        damaged[RANS_HEADER_BYTES + 500] ^= 0x10;
        let blocks = [
            (&dec_wide, &pay_wide[..], &wide[..]),
            (&dec_narrow, &pay_narrow[..], &narrow[..]),
            (&dec_narrow, &pay_short[..], &narrow[..3_000]),
            (&dec_narrow, &damaged[..], &narrow[..]),
        ];
        for (ia, ib) in [(0, 1), (1, 0), (0, 2), (2, 1), (3, 0), (0, 3)] {
            let [(da, pa, a), (db, pb, b)] = [blocks[ia], blocks[ib]];
            let mut pair = [vec![0u8; a.len()], vec![0u8; b.len()]];
            let mut single = pair.clone();
            let [pair_a, pair_b] = &mut pair;
            let results = decode_pair([da, db], [pa, pb], [pair_a, pair_b]);
            let expected = [
                da.decode_block(pa, &mut single[0]),
                db.decode_block(pb, &mut single[1]),
            ];
            assert_eq!(results, expected, "blocks {ia} and {ib}");
            assert_eq!(results[0].is_err(), ia == 3);
            assert_eq!(results[1].is_err(), ib == 3);
            for (j, original) in [(0, a), (1, b)] {
                if results[j].is_ok() {
                    assert!(
                        pair[j] == single[j] && pair[j] == original,
                        "blocks {ia}, {ib}"
                    );
                }
            }
        }
    }

    #[test]
    fn params_parse_rejects_bad_layouts() {
        let good = SplitParams {
            fields: vec![
                Field {
                    width: 10,
                    coding: Coding::Raw,
                },
                Field {
                    width: 6,
                    coding: Coding::Raw,
                },
            ],
            tables: vec![],
        };
        assert!(SplitParams::parse(&good.to_bytes(), Dtype::BF16).is_ok());
        assert!(SplitParams::parse(&good.to_bytes(), Dtype::F32).is_err());
        assert!(SplitParams::parse(&[], Dtype::BF16).is_err());
        assert!(SplitParams::parse(&[0], Dtype::BF16).is_err());
        assert!(SplitParams::parse(&[1, 16, 2], Dtype::BF16).is_err());
        assert!(SplitParams::parse(&[1, 16, 1], Dtype::BF16).is_err()); // rANS field over 12 bits
        assert!(SplitParams::parse(&[1, 16, 0, 0], Dtype::BF16).is_err()); // trailing byte
    }

    #[test]
    fn local_blocks_borrow_or_own_tables_and_round_trip() {
        let tensor_data = gaussian_bf16(50_000, 1);
        let stats = FieldStats::gather(Dtype::F32, &tensor_data);
        let tensor = plan(&stats, 1).unwrap().params;
        let decoder = SplitDecoder::new(tensor.clone(), Dtype::F32);
        // A block like the tensor borrows; a block with a different distribution (all low bytes zero) gets
        // tables of its own.
        let same = tensor_data[..40_000].to_vec();
        let mut zeros_low = same.clone();
        for chunk in zeros_low.chunks_exact_mut(4) {
            chunk[0] = 0;
            chunk[1] = 0;
        }
        for (block, expect_all_borrowed) in [(same, true), (zeros_low, false)] {
            let n = (block.len() / 4) as u64;
            let counts = block_field_counts(&tensor.fields, Dtype::F32, &block);
            let choice = choose_block_coding(&tensor, &counts, n);
            assert_eq!(choice.borrowed.iter().all(|&b| b), expect_all_borrowed);
            let payload = encode_local_block(&choice, Dtype::F32, &block);
            let (param_bytes, body) = split_local_payload(&payload).unwrap();
            let (params, borrowed) =
                SplitParams::parse_local(param_bytes, Dtype::F32, &tensor).unwrap();
            assert_eq!(params, choice.params);
            assert_eq!(borrowed, choice.borrowed);
            let mut out = vec![0u8; block.len()];
            decoder
                .local(params, &borrowed, Dtype::F32)
                .decode_block(body, &mut out)
                .unwrap();
            assert_eq!(out, block);
        }
    }

    /// `gather`'s sparse top histogram, sorted (small tensors) or counted (large ones, in 8 MiB slices whose
    /// histograms are merged), lists the values that occur, ascending, with the counts of a plain loop: on both
    /// sides of the switch, and over two slices. Each count also leaves the per-thread table zero for the next.
    #[test]
    fn gathered_top_values_equal_a_plain_count() {
        let data = gaussian_bf16(4_600_000, 5);
        for dtype in [Dtype::BF16, Dtype::F32] {
            let width = dtype.byte_width().unwrap();
            for n in [0usize, 1, 100, 8_191, 8_192, 20_000, data.len() / width] {
                let bytes = &data[..n * width];
                let shift = dtype.bits() - 16;
                let mut plain = std::collections::BTreeMap::new();
                for v in element_values(bytes, width) {
                    *plain.entry((v >> shift) as usize).or_insert(0u64) += 1;
                }
                let plain: Vec<(usize, u64)> = plain.into_iter().collect();
                assert_eq!(
                    FieldStats::gather(dtype, bytes).top,
                    plain,
                    "{dtype:?} n={n}"
                );
            }
        }
    }

    /// The word-wise sub-histograms count what a plain loop over the elements counts: 2- and 4-byte
    /// elements, fields anywhere in the element, lengths that end mid-word, and alphabets large and small
    /// against the block (both of `field_histogram`'s paths).
    #[test]
    fn field_histograms_equal_a_plain_count() {
        let data = gaussian_bf16(50_003, 11);
        for width in [2usize, 4] {
            for (shift, bits) in [(0u32, 16u32), (6, 10), (0, 6), (9, 7), (12, 4), (3, 12)] {
                if (shift + bits) as usize > 8 * width {
                    continue;
                }
                for len in [0usize, 1, 3, 7, 8, 9, 1_000, 50_003] {
                    let block = &data[..(len * width).min(data.len() / width * width)];
                    let mut plain = vec![0u64; 1 << bits];
                    for e in block.chunks_exact(width) {
                        let mut le = [0u8; 4];
                        le[..width].copy_from_slice(e);
                        plain[((u32::from_le_bytes(le) >> shift) & ((1 << bits) - 1)) as usize] +=
                            1;
                    }
                    // Counts are added to what is there.
                    let mut counts = vec![1u64; 1 << bits];
                    add_field_counts(block, width, shift, bits, &mut counts);
                    let added: Vec<u64> = counts.iter().map(|c| c - 1).collect();
                    assert!(
                        added == plain,
                        "width {width} shift {shift} bits {bits} len {len}"
                    );
                }
            }
        }
    }

    /// The coding's counts leave a nearly uniform raw field uncounted only where a sample says so, count the
    /// rest exactly, and choose the same coding as exact counts: on weights (low mantissa bits uniform), on a
    /// block whose low bits are skewed (a table of their own pays), and on a block too small to sample.
    #[test]
    fn sampled_raw_fields_choose_what_exact_counts_choose() {
        let tensor_data = gaussian_bf16(200_000, 3);
        let stats = FieldStats::gather(Dtype::BF16, &tensor_data);
        let tensor = plan(&stats, 1).unwrap().params;
        let raw_after_coded = |fields: &[Field]| {
            let first = fields
                .iter()
                .position(|f| f.coding == Coding::Rans)
                .unwrap();
            (first + 1..fields.len()).find(|&i| fields[i].coding == Coding::Raw)
        };
        let raw = raw_after_coded(&tensor.fields).expect("weights keep low mantissa bits raw");
        let weights = tensor_data[..2 * 65_536].to_vec();
        // Low mantissa bits mostly zero: a table of their own saves far more than it costs.
        let mut skewed = weights.clone();
        for (i, e) in skewed.chunks_exact_mut(2).enumerate() {
            if i % 16 != 0 {
                e[0] &= !((1u8 << tensor.fields[raw].width) - 1);
            }
        }
        let small = weights[..2 * 4000].to_vec();
        for (block, expect_skipped) in [(weights, true), (skewed, false), (small, false)] {
            let n = (block.len() / 2) as u64;
            let exact = block_field_counts(&tensor.fields, Dtype::BF16, &block);
            let for_coding =
                block_field_counts_for_coding(&tensor.fields, Dtype::BF16, &block, None);
            for (i, (e, c)) in exact.iter().zip(&for_coding).enumerate() {
                match i == raw && expect_skipped {
                    true => assert!(c.is_empty(), "field {i} was counted"),
                    false => assert_eq!(e, c, "field {i}"),
                }
            }
            let (a, b) = (
                choose_block_coding(&tensor, &exact, n),
                choose_block_coding(&tensor, &for_coding, n),
            );
            assert_eq!(a.to_bytes(), b.to_bytes());
            assert_eq!(a.bits, b.bits);
            if n == 65_536 {
                let coded = a.params.fields[raw].coding == Coding::Rans;
                assert_eq!(coded, !expect_skipped, "skewed low bits get a table");
            }
        }
    }

    /// The per-block top histograms counted while gathering, folded to any width, are each block's histogram
    /// of its top field, for every split dtype and for blocks that do not divide the gather's slices; given to
    /// `block_field_counts_for_coding`, they change nothing.
    #[test]
    fn gathered_block_tops_are_each_blocks_top_field() {
        let weights = gaussian_bf16(300_001, 8);
        let f32s: Vec<u8> = weights
            .chunks_exact(2)
            .flat_map(|e| (f32::from(half::bf16::from_le_bytes([e[0], e[1]])) * 1.37).to_le_bytes())
            .collect();
        let f16s: Vec<u8> = weights
            .chunks_exact(2)
            .flat_map(|e| {
                half::f16::from_f32(f32::from(half::bf16::from_le_bytes([e[0], e[1]])))
                    .to_le_bytes()
            })
            .collect();
        for (dtype, data) in [
            (Dtype::BF16, &weights),
            (Dtype::F32, &f32s),
            (Dtype::F16, &f16s),
        ] {
            let width = dtype.byte_width().unwrap();
            for block_elements in [65_536, 100_000, 1 << 22] {
                let stats = FieldStats::gather_with_block_tops(dtype, data, Some(block_elements));
                let plain = FieldStats::gather(dtype, data);
                assert_eq!(stats.top, plain.top);
                assert_eq!(stats.low_bytes, plain.low_bytes);
                let blocks: Vec<&[u8]> = data.chunks(block_elements * width).collect();
                assert_eq!(
                    stats.block_tops.len(),
                    blocks.len(),
                    "{dtype:?} {block_elements}"
                );
                for bits in [1, 7, 10, 11, 12] {
                    let fields = [
                        Field {
                            width: bits,
                            coding: Coding::Rans,
                        },
                        Field {
                            width: dtype.bits() - bits,
                            coding: Coding::Raw,
                        },
                    ];
                    let folded = stats.block_top_field(bits);
                    for (k, block) in blocks.iter().enumerate() {
                        let exact = block_field_counts(&fields, dtype, block);
                        let known = folded[k].dense();
                        assert_eq!(
                            known, exact[0],
                            "{dtype:?} block {k} of {block_elements}, {bits} bits"
                        );
                        assert_eq!(
                            block_field_counts_for_coding(&fields, dtype, block, Some(&folded[k])),
                            block_field_counts_for_coding(&fields, dtype, block, None),
                        );
                    }
                }
            }
        }
        // Too few elements to count through the table: no block tops, and the encoder counts.
        let small = FieldStats::gather_with_block_tops(Dtype::BF16, &weights[..2000], Some(65_536));
        assert!(small.block_tops.is_empty());
    }

    #[test]
    fn borrowing_needs_a_matching_tensor_field() {
        let tensor = SplitParams {
            fields: vec![Field {
                width: 16,
                coding: Coding::Raw,
            }],
            tables: vec![],
        };
        // One 16-bit field that claims the tensor's table: the tensor's field is raw.
        assert!(
            SplitParams::parse_local(&[1, 16, CODING_TENSOR_TABLE], Dtype::BF16, &tensor).is_err()
        );
        // Coding 2 is not allowed in a tensor's own params.
        assert!(SplitParams::parse(&[1, 16, CODING_TENSOR_TABLE], Dtype::BF16).is_err());
        assert!(split_local_payload(&[9, 0, 0, 0, 1]).is_err());
    }
}
