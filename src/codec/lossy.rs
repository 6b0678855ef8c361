//! The lossy float codec (`lossy`, codec id 2; format-spec/nzt.md section 13.3): keep the top K mantissa
//! bits of each BF16, F16 or F32 weight, rounded to nearest even, optionally after dividing each group of B
//! elements by a one-byte scale, the one of least squared error for the group.
//!
//! Steps: 1. `Quantizer::quantize_block` turns a block into its scale bytes and one *narrow code* per element:
//! sign, the dtype's exponent field and `k = max(K, 1)` stored mantissa bits (`1 + E + k` bits); 2. `plan`
//! counts the codes' top bits over the whole tensor and picks how many of them to rANS-code (the rest are
//! packed raw); 3. `encode_block` writes scales, the rANS stream and the raw plane; 4. `LossyDecoder` reads
//! them back and `Quantizer::dequantize` rebuilds each element in the original dtype, multiplying by the same
//! stored scale that the encoder divided by.

use super::bitpack;
use super::freq::{DecodeTable, FreqTable, TableError, MAX_SYMBOL_BITS};
use super::rans::{self, FieldOutput, FieldSymbols, StreamError, LANES};
use super::split::{best_coding, element_values, ENCODER_MAX_PROB_BITS, RANS_HEADER_BYTES};
use crate::dtype::Dtype;

/// Largest normalization group, in elements.
pub const MAX_NORM_BLOCK: u32 = 1024;
/// Bits of the group maximum's mantissa kept in each scale byte.
pub const SCALE_BITS: u32 = 8;

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// Scale bytes between the candidates of the first pass of the scale search.
const SCALE_SEARCH_STRIDE: usize = 8;

/// `f(0) + ... + f(n - 1)` as eight partial sums, so that the compiler keeps eight terms in flight (SIMD).
#[inline]
fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let full = n - n % 8;
    for base in (0..full).step_by(8) {
        for (j, lane) in lanes.iter_mut().enumerate() {
            *lane += f(base + j);
        }
    }
    lanes.iter().sum::<f64>() + (full..n).map(f).sum::<f64>()
}

/// `v >= 0` rounded to `bits` mantissa bits, to nearest with ties to even, in f64 (exact for values whose
/// rounded form is a normal number of the target format; the search uses it as its error model).
fn round_mantissa(v: f64, bits: u32) -> f64 {
    let drop = 52 - bits;
    let raw = v.to_bits();
    let odd = (raw >> drop) & 1;
    f64::from_bits((raw + (1u64 << (drop - 1)) - 1 + odd) & !((1u64 << drop) - 1))
}

/// `2^k` for `-1022 <= k <= 1023`, exactly.
fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// `floor(log2(v))` of a positive normal f64.
fn floor_log2(v: f64) -> i32 {
    ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

/// A binary floating-point format: exponent and mantissa widths, IEEE-style bias, subnormals, Inf and NaN.
/// Used both for a dtype and for the narrow format of the same exponent range with fewer mantissa bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloatFormat {
    pub exp_bits: u32,
    pub man_bits: u32,
}

impl FloatFormat {
    /// The formats the lossy codec applies to.
    pub fn of(dtype: Dtype) -> Option<FloatFormat> {
        let (exp_bits, man_bits) = match dtype {
            Dtype::BF16 => (8, 7),
            Dtype::F16 => (5, 10),
            Dtype::F32 => (8, 23),
            _ => return None,
        };
        Some(FloatFormat { exp_bits, man_bits })
    }

    fn bias(self) -> i32 {
        (1 << (self.exp_bits - 1)) - 1
    }

    /// Exponent of the smallest normal value.
    pub fn emin(self) -> i32 {
        1 - self.bias()
    }

    fn exp_all_ones(self) -> u32 {
        (1 << self.exp_bits) - 1
    }

    /// The largest finite value.
    pub fn max_finite(self) -> f64 {
        (2.0 - pow2(-(self.man_bits as i32))) * pow2(self.bias())
    }

    /// The smallest positive normal value, `2^emin`.
    pub fn smallest_normal(self) -> f64 {
        pow2(self.emin())
    }

    /// Magnitude of finite exponent and mantissa fields (exact).
    pub fn value(self, exp: u32, man: u32) -> f64 {
        let significand = if exp == 0 {
            man
        } else {
            (1 << self.man_bits) + man
        };
        significand as f64 * pow2((exp.max(1) as i32) - self.bias() - self.man_bits as i32)
    }

    /// The value of a bit pattern: signed, with Inf and NaN.
    pub fn to_f64(self, bits: u64) -> f64 {
        let sign = (bits >> (self.exp_bits + self.man_bits)) & 1;
        let exp = ((bits >> self.man_bits) as u32) & self.exp_all_ones();
        let man = (bits as u32) & ((1 << self.man_bits) - 1);
        let magnitude = match (exp == self.exp_all_ones(), man) {
            (true, 0) => f64::INFINITY,
            (true, _) => f64::NAN,
            (false, _) => self.value(exp, man),
        };
        if sign == 1 {
            -magnitude
        } else {
            magnitude
        }
    }

    /// Rounds `v >= 0` to the nearest value of this format's grid (subnormals included); a tie goes to the
    /// value whose bit pattern (exponent and mantissa fields read as one integer) is even. Does not clamp:
    /// the result may exceed `max_finite`.
    pub fn round(self, v: f64) -> f64 {
        if v == 0.0 {
            return 0.0;
        }
        let e = floor_log2(v).max(self.emin());
        let quantum = pow2(e - self.man_bits as i32);
        let steps = v / quantum;
        // With mantissa bits, or below the normal range, the pattern's parity is the parity of `steps`
        // rounded. With none, a normal tie lies between 2^e and 2^(e+1), whose patterns are the exponent
        // fields e + bias and e + bias + 1.
        let rounded = if self.man_bits == 0 && steps == 1.5 {
            if (e + self.bias()) % 2 == 0 {
                1.0
            } else {
                2.0
            }
        } else {
            steps.round_ties_even()
        };
        rounded * quantum
    }

    /// Exponent and mantissa fields of `v`, a value of this format's grid in `[0, max_finite]`.
    pub fn fields(self, v: f64) -> (u32, u32) {
        if v < self.smallest_normal() {
            let m = v / pow2(self.emin() - self.man_bits as i32);
            (0, m as u32)
        } else {
            let e = floor_log2(v);
            let m = v / pow2(e - self.man_bits as i32);
            ((e + self.bias()) as u32, m as u32 - (1 << self.man_bits))
        }
    }
}

/// Rounding and normalization of one tensor: dtype bits to narrow codes and back.
#[derive(Clone, Debug)]
pub struct Quantizer {
    fmt: FloatFormat,
    narrow: FloatFormat,
    /// Stored mantissa bits, `max(K, 1)` (at K = 0 the one bit marks NaN).
    stored: u32,
    norm_block: u32,
    /// Error weights of the scale search, one per input channel (the last dimension), e.g. activation second
    /// moments; None weighs every element alike. Encoder-only: decoding never reads them.
    channel_weights: Option<std::sync::Arc<[f32]>>,
}

impl Quantizer {
    /// None unless the dtype is BF16, F16 or F32, `mantissa_bits` is below its mantissa width and
    /// `norm_block` is 0 (no normalization) or in `1..=MAX_NORM_BLOCK`.
    pub fn new(dtype: Dtype, mantissa_bits: u32, norm_block: u32) -> Option<Quantizer> {
        let fmt = FloatFormat::of(dtype)?;
        if mantissa_bits >= fmt.man_bits || norm_block > MAX_NORM_BLOCK {
            return None;
        }
        Some(Quantizer {
            fmt,
            narrow: FloatFormat {
                exp_bits: fmt.exp_bits,
                man_bits: mantissa_bits,
            },
            stored: mantissa_bits.max(1),
            norm_block,
            channel_weights: None,
        })
    }

    /// The quantizer whose scale search weighs element `i` of the tensor by `weights[i % weights.len()]`
    /// (an importance per input channel; non-negative, not all zero). Empty weights are ignored.
    pub fn with_channel_weights(mut self, weights: &[f32]) -> Quantizer {
        self.channel_weights = (!weights.is_empty()).then(|| weights.into());
        self
    }

    /// The error weight of the tensor's element `index` (1 without channel weights).
    pub fn element_weight(&self, index: usize) -> f64 {
        self.channel_weights
            .as_ref()
            .map_or(1.0, |w| w[index % w.len()] as f64)
    }

    pub fn has_channel_weights(&self) -> bool {
        self.channel_weights.is_some()
    }

    pub fn mantissa_bits(&self) -> u32 {
        self.narrow.man_bits
    }

    pub fn norm_block(&self) -> u32 {
        self.norm_block
    }

    /// Width of a narrow code: sign, exponent and the stored mantissa bits.
    pub fn code_bits(&self) -> u32 {
        1 + self.fmt.exp_bits + self.stored
    }

    /// The dtype's format.
    pub fn format(&self) -> FloatFormat {
        self.fmt
    }

    /// The largest `|decoded - x|` the format allows for a finite element `x` (format-spec/nzt.md section
    /// 13.3.5): with `e_K = 2^-(K+1)`, `e_M = 2^-(M+1)` and `t` the smallest normal value, `e_K * max(|x|, t)`
    /// without normalization; with it, `e1 + e_M * max(|x| + e1, t)` where
    /// `e1 = e_K * max(|x|, 2t) + 2^-52 * |x|`.
    pub fn error_bound(&self, x: f64) -> f64 {
        let x = x.abs();
        let t = self.fmt.smallest_normal();
        let e_k = pow2(-(self.narrow.man_bits as i32) - 1);
        if self.norm_block == 0 {
            return e_k * x.max(t);
        }
        let e_m = pow2(-(self.fmt.man_bits as i32) - 1);
        let e1 = e_k * x.max(2.0 * t) + pow2(-52) * x;
        e1 + e_m * (x + e1).max(t)
    }

    /// Number of scale bytes of a block of `n` elements.
    pub fn scale_count(&self, n: usize) -> usize {
        if self.norm_block == 0 {
            0
        } else {
            n.div_ceil(self.norm_block as usize)
        }
    }

    /// The scale `1 + c / 256` of scale byte `c`.
    pub fn scale(byte: u8) -> f64 {
        1.0 + byte as f64 / (1 << SCALE_BITS) as f64
    }

    /// The scale byte of a group whose largest finite magnitude is `absmax`: the top 8 bits of its mantissa.
    fn scale_byte(absmax: f64) -> u8 {
        if absmax == 0.0 {
            return 0;
        }
        let fraction = absmax / pow2(floor_log2(absmax)) - 1.0;
        (fraction * (1 << SCALE_BITS) as f64) as u8
    }

    /// The scale byte of least (weighted) squared error for a group, given the magnitudes of its finite
    /// elements and, with channel weights, their weights (ties to the byte of `scale_byte` of their maximum,
    /// which makes a BF16 group's maximum exact): every 8th byte, then the neighbours of the best of those.
    /// The error is the decoded one for normal values: `x` rounded to K bits after division, multiplied back
    /// and rounded to the dtype.
    fn best_scale_byte(&self, magnitudes: &[f64], weights: &[f64]) -> u8 {
        let absmax = magnitudes.iter().copied().fold(0.0f64, f64::max);
        let max_rule = Self::scale_byte(absmax);
        if absmax == 0.0 {
            return max_rule;
        }
        let (k, m) = (self.narrow.man_bits, self.fmt.man_bits);
        let error = |byte: u8| -> f64 {
            let c = Self::scale(byte);
            let squared_error = |x: f64| {
                let decoded = round_mantissa(c * round_mantissa(x / c, k), m);
                (x - decoded) * (x - decoded)
            };
            match weights.is_empty() {
                true => lane_sum(magnitudes.len(), |i| squared_error(magnitudes[i])),
                false => lane_sum(magnitudes.len(), |i| {
                    weights[i] * squared_error(magnitudes[i])
                }),
            }
        };
        let mut best = (error(max_rule), max_rule);
        let consider = |byte: u8, best: &mut (f64, u8)| {
            let e = error(byte);
            if e < best.0 {
                *best = (e, byte);
            }
        };
        for byte in (0..=u8::MAX).step_by(SCALE_SEARCH_STRIDE) {
            consider(byte, &mut best);
        }
        let centre = best.1;
        let half = SCALE_SEARCH_STRIDE as i32 / 2;
        for byte in
            (centre as i32 - half..=centre as i32 + half).filter_map(|b| u8::try_from(b).ok())
        {
            consider(byte, &mut best);
        }
        best.1
    }

    fn split(&self, bits: u64) -> (u64, u32, u32) {
        let m = self.fmt.man_bits;
        let e = self.fmt.exp_bits;
        (
            (bits >> (e + m)) & 1,
            ((bits >> m) as u32) & self.fmt.exp_all_ones(),
            (bits as u32) & ((1 << m) - 1),
        )
    }

    /// The narrow code of one element (dtype bits) divided by `scale`.
    pub fn quantize(&self, bits: u64, scale: f64) -> u32 {
        let (sign, exp, man) = self.split(bits);
        let k = self.stored;
        let head = (sign as u32) << (self.fmt.exp_bits + k);
        let all_ones = self.fmt.exp_all_ones();
        if exp == all_ones {
            // Inf keeps mantissa 0; a NaN keeps the top K bits of its payload, or 1 if they are all zero.
            let field = if man == 0 {
                0
            } else {
                (man >> (self.fmt.man_bits - self.narrow.man_bits)).max(1)
            };
            return head | (all_ones << k) | field;
        }
        let x = self.fmt.value(exp, man);
        let y = if scale == 1.0 { x } else { x / scale };
        let rounded = self.narrow.round(y).min(self.narrow.max_finite());
        let (e, m) = self.narrow.fields(rounded);
        head | (e << k) | (m << (k - self.narrow.man_bits))
    }

    /// The dtype bits an element decodes to from its narrow code and its group's scale.
    pub fn dequantize(&self, code: u32, scale: f64) -> u64 {
        let k = self.stored;
        let (fe, fm) = (self.fmt.exp_bits, self.fmt.man_bits);
        let sign = ((code >> (fe + k)) & 1) as u64;
        let exp = (code >> k) & self.fmt.exp_all_ones();
        let field = code & ((1 << k) - 1);
        let head = sign << (fe + fm);
        if exp == self.fmt.exp_all_ones() {
            let man = if field == 0 { 0 } else { field << (fm - k) };
            return head | ((exp as u64) << fm) | man as u64;
        }
        let m = field >> (k - self.narrow.man_bits);
        if self.norm_block == 0 {
            return head | ((exp as u64) << fm) | ((m as u64) << (fm - self.narrow.man_bits));
        }
        let v = self.narrow.value(exp, m) * scale;
        let rounded = self.fmt.round(v).min(self.fmt.max_finite());
        let (e, m) = self.fmt.fields(rounded);
        head | ((e as u64) << fm) | m as u64
    }

    /// The scale bytes and narrow codes of a block of dtype bit patterns whose first element is element
    /// `first` of the tensor (which places the channel weights).
    pub fn quantize_block(&self, values: &[u64], first: usize) -> (Vec<u8>, Vec<u32>) {
        if self.norm_block == 0 {
            return (
                Vec::new(),
                values.iter().map(|&v| self.quantize(v, 1.0)).collect(),
            );
        }
        let mut scales = Vec::with_capacity(self.scale_count(values.len()));
        let mut codes = Vec::with_capacity(values.len());
        let mut magnitudes = Vec::with_capacity(self.norm_block as usize);
        let mut weights = Vec::new();
        for (g, group) in values.chunks(self.norm_block as usize).enumerate() {
            // NaN and Inf are left out of the scale choice.
            let start = first + g * self.norm_block as usize;
            let finite = group.iter().enumerate().filter_map(|(i, &v)| {
                let (_, exp, man) = self.split(v);
                (exp != self.fmt.exp_all_ones()).then(|| (start + i, self.fmt.value(exp, man)))
            });
            magnitudes.clear();
            weights.clear();
            match self.channel_weights.is_some() {
                true => finite.for_each(|(i, x)| {
                    magnitudes.push(x);
                    weights.push(self.element_weight(i));
                }),
                false => magnitudes.extend(finite.map(|(_, x)| x)),
            }
            let byte = self.best_scale_byte(&magnitudes, &weights);
            scales.push(byte);
            let scale = Self::scale(byte);
            codes.extend(group.iter().map(|&v| self.quantize(v, scale)));
        }
        (scales, codes)
    }

    /// The dtype bits of a whole block from its scale bytes and codes.
    pub fn dequantize_block(&self, scales: &[u8], codes: &[u32], out: &mut Vec<u64>) {
        out.clear();
        if self.norm_block == 0 {
            out.extend(codes.iter().map(|&c| self.dequantize(c, 1.0)));
            return;
        }
        for (group, &byte) in codes.chunks(self.norm_block as usize).zip(scales) {
            let scale = Self::scale(byte);
            out.extend(group.iter().map(|&c| self.dequantize(c, scale)));
        }
    }

    /// Quantizes and rebuilds a block of little-endian dtype bytes whose first element is element `first` of
    /// the tensor, as encoding and decoding it would.
    pub fn round_trip_block(&self, block: &[u8], width: usize, first: usize) -> Vec<u64> {
        let values = element_values(block, width);
        let (scales, codes) = self.quantize_block(&values, first);
        let mut out = Vec::with_capacity(values.len());
        self.dequantize_block(&scales, &codes, &mut out);
        out
    }
}

/// The lossy parameters of one tensor (spec: "lossy params").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossyParams {
    /// K: mantissa bits kept, below the dtype's mantissa width.
    pub mantissa_bits: u32,
    /// Elements per scale byte; 0 = no normalization.
    pub norm_block: u32,
    /// How many top bits of each narrow code are rANS-coded (0 = none); the rest are packed raw.
    pub coded_bits: u32,
    /// The table of the coded top bits, present exactly when `coded_bits > 0`.
    pub table: Option<FreqTable>,
}

impl LossyParams {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.mantissa_bits as u8);
        out.extend_from_slice(&(self.norm_block as u16).to_le_bytes());
        out.push(self.coded_bits as u8);
        if let Some(t) = &self.table {
            t.write(out);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn quantizer(&self, dtype: Dtype) -> Option<Quantizer> {
        Quantizer::new(dtype, self.mantissa_bits, self.norm_block)
    }

    /// Parses a tensor's lossy parameters for `dtype`; all of `bytes` must be used.
    pub fn parse(bytes: &[u8], dtype: Dtype) -> Result<LossyParams, TableError> {
        let err = |s: String| TableError(s);
        let fmt = FloatFormat::of(dtype)
            .ok_or_else(|| err(format!("lossy does not apply to {dtype}")))?;
        let head = bytes
            .get(..4)
            .ok_or_else(|| err("lossy params shorter than 4 bytes".into()))?;
        let mantissa_bits = head[0] as u32;
        let norm_block = u16::from_le_bytes([head[1], head[2]]) as u32;
        let coded_bits = head[3] as u32;
        if mantissa_bits >= fmt.man_bits {
            return Err(err(format!(
                "mantissa_bits {mantissa_bits} not below the {} of {dtype}",
                fmt.man_bits
            )));
        }
        if norm_block > MAX_NORM_BLOCK {
            return Err(err(format!(
                "norm_block {norm_block} outside 0..={MAX_NORM_BLOCK}"
            )));
        }
        let code_bits = 1 + fmt.exp_bits + mantissa_bits.max(1);
        if coded_bits > code_bits.min(MAX_SYMBOL_BITS) {
            return Err(err(format!(
                "coded_bits {coded_bits} above {}",
                code_bits.min(MAX_SYMBOL_BITS)
            )));
        }
        let mut pos = 4;
        let table = if coded_bits > 0 {
            let (table, used) = FreqTable::parse(&bytes[pos..], coded_bits)?;
            pos += used;
            Some(table)
        } else {
            None
        };
        if pos != bytes.len() {
            return Err(err(format!(
                "{} bytes left after the lossy params",
                bytes.len() - pos
            )));
        }
        Ok(LossyParams {
            mantissa_bits,
            norm_block,
            coded_bits,
            table,
        })
    }
}

/// Exact payload length of a lossy block (spec section 13.3).
fn payload_len(q: &Quantizer, coded_bits: u32, n: usize, word_count: usize) -> usize {
    let mut size = align4(q.scale_count(n));
    if coded_bits > 0 {
        size = align4(size + RANS_HEADER_BYTES + 2 * word_count);
    }
    let raw_bits = q.code_bits() - coded_bits;
    if raw_bits > 0 {
        size = align4(size + bitpack::packed_len(n, raw_bits));
    }
    size
}

/// Encodes one block of little-endian dtype bytes whose first element is element `first` of the tensor
/// (spec: "lossy block payload").
pub fn encode_block(
    params: &LossyParams,
    q: &Quantizer,
    dtype: Dtype,
    block: &[u8],
    first: usize,
) -> Vec<u8> {
    let width = dtype.byte_width().expect("lossy dtypes are whole bytes");
    let values = element_values(block, width);
    let (scales, codes) = q.quantize_block(&values, first);
    let n = codes.len();
    let code_bits = q.code_bits();
    let raw_bits = code_bits - params.coded_bits;
    let mut out = Vec::with_capacity(block.len() / 2);
    out.extend_from_slice(&scales);
    out.resize(align4(out.len()), 0);
    if let Some(table) = &params.table {
        let symbols: Vec<u16> = codes.iter().map(|&c| (c >> raw_bits) as u16).collect();
        let encoded = rans::encode(
            &[FieldSymbols {
                symbols: &symbols,
                table,
            }],
            n,
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
    if raw_bits > 0 {
        let mask = (1u32 << raw_bits) - 1;
        bitpack::pack(codes.iter().map(|&c| c & mask), raw_bits, &mut out);
        out.resize(align4(out.len()), 0);
    }
    out
}

/// A tensor's lossy parameters expanded for decoding; build once, decode many blocks.
pub struct LossyDecoder {
    params: LossyParams,
    quantizer: Quantizer,
    table: Option<DecodeTable>,
    width: usize,
}

impl LossyDecoder {
    /// None when the parameters do not fit the dtype (the header parser has already checked them).
    pub fn new(params: LossyParams, dtype: Dtype) -> Option<LossyDecoder> {
        let quantizer = params.quantizer(dtype)?;
        let table = params.table.as_ref().map(DecodeTable::new);
        Some(LossyDecoder {
            params,
            quantizer,
            table,
            width: dtype.byte_width()?,
        })
    }

    pub fn params(&self) -> &LossyParams {
        &self.params
    }

    /// Decodes a lossy payload of `out.len() / width` elements into `out` (little-endian dtype elements).
    pub fn decode_block(&self, payload: &[u8], out: &mut [u8]) -> Result<(), StreamError> {
        let q = &self.quantizer;
        let n = out.len() / self.width;
        let code_bits = q.code_bits();
        let raw_bits = code_bits - self.params.coded_bits;
        let scale_count = q.scale_count(n);
        let mut pos = align4(scale_count);
        let mut codes = vec![0u32; n];
        if let Some(table) = &self.table {
            let header = payload
                .get(pos..pos + RANS_HEADER_BYTES)
                .ok_or(StreamError(
                    "payload shorter than its scales and rANS header",
                ))?;
            let mut states = [0u32; LANES];
            for (s, chunk) in states.iter_mut().zip(header.chunks_exact(4)) {
                *s = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            }
            let word_count =
                u32::from_le_bytes(header[LANES * 4..].try_into().expect("4 bytes")) as usize;
            if payload_len(q, self.params.coded_bits, n, word_count) != payload.len() {
                return Err(StreamError("payload length does not match its contents"));
            }
            let words_start = pos + RANS_HEADER_BYTES;
            let words = &payload[words_start..words_start + 2 * word_count];
            let mut symbols = vec![0u16; n];
            rans::decode(
                &states,
                words,
                &mut [FieldOutput {
                    out: &mut symbols,
                    table,
                }],
                n,
            )?;
            for (c, &s) in codes.iter_mut().zip(&symbols) {
                *c = (s as u32) << raw_bits;
            }
            pos = align4(words_start + 2 * word_count);
        } else if payload_len(q, 0, n, 0) != payload.len() {
            return Err(StreamError("payload length does not match its contents"));
        }
        if raw_bits > 0 {
            let len = bitpack::packed_len(n, raw_bits);
            bitpack::unpack(&payload[pos..pos + len], raw_bits, n, |i, v| codes[i] |= v);
        }
        let mut values = Vec::with_capacity(n);
        q.dequantize_block(&payload[..scale_count], &codes, &mut values);
        for (chunk, v) in out.chunks_exact_mut(self.width).zip(values) {
            chunk.copy_from_slice(&v.to_le_bytes()[..self.width]);
        }
        Ok(())
    }
}

/// The lossy parameters chosen for a tensor and their predicted size.
pub struct LossyPlan {
    pub params: LossyParams,
    pub quantizer: Quantizer,
    /// Predicted bits of all the tensor's payloads.
    pub predicted_bits: f64,
}

/// Quantizes every block of a tensor (blocks of `block_units` elements) and picks how many top bits of the
/// narrow codes to rANS-code: the choice with the lowest predicted size, table and stream flushes included
/// (the fewest coded bits on ties). `channel_weights` (may be empty) weigh the scale search per input
/// channel. None when the dtype or settings do not allow the lossy codec.
pub fn plan(
    dtype: Dtype,
    mantissa_bits: u32,
    norm_block: u32,
    data: &[u8],
    block_units: u32,
    channel_weights: &[f32],
) -> Option<LossyPlan> {
    let quantizer =
        Quantizer::new(dtype, mantissa_bits, norm_block)?.with_channel_weights(channel_weights);
    let width = dtype.byte_width()?;
    let code_bits = quantizer.code_bits();
    let top_bits = code_bits.min(MAX_SYMBOL_BITS);
    let mut top = vec![0u64; 1 << top_bits];
    let mut blocks = 0u64;
    let mut scale_bytes = 0u64;
    for block in data.chunks(block_units as usize * width) {
        let values = element_values(block, width);
        let (scales, codes) =
            quantizer.quantize_block(&values, blocks as usize * block_units as usize);
        blocks += 1;
        scale_bytes += align4(scales.len()) as u64;
        for c in codes {
            top[(c >> (code_bits - top_bits)) as usize] += 1;
        }
    }
    let n = (data.len() / width) as u64;
    let flush_bits = blocks as f64 * 8.0 * (RANS_HEADER_BYTES as f64 + 2.0);
    let mut best = LossyParams {
        mantissa_bits,
        norm_block,
        coded_bits: 0,
        table: None,
    };
    let mut best_bits = (code_bits as u64 * n) as f64;
    for coded_bits in 1..=top_bits {
        let mut counts = vec![0u64; 1 << coded_bits];
        for (v, &c) in top.iter().enumerate() {
            counts[v >> (top_bits - coded_bits)] += c;
        }
        let (cost, table) = best_coding(&counts, coded_bits, n, ENCODER_MAX_PROB_BITS);
        let Some(table) = table else { continue };
        let bits = cost + ((code_bits - coded_bits) as u64 * n) as f64 + flush_bits;
        if bits < best_bits {
            best_bits = bits;
            best = LossyParams {
                mantissa_bits,
                norm_block,
                coded_bits,
                table: Some(table),
            };
        }
    }
    Some(LossyPlan {
        params: best,
        quantizer,
        predicted_bits: best_bits + 8.0 * scale_bytes as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded xorshift, so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    const DTYPES: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

    /// Rounding without normalization, written on the integer bit pattern as the spec states it: round the
    /// magnitude to a multiple of `2^(M-K)`, ties to even, and clamp at the largest finite value.
    fn reference_round(fmt: FloatFormat, k: u32, bits: u64) -> u64 {
        let m = fmt.man_bits;
        let sign = bits & (1 << (fmt.exp_bits + m));
        let magnitude = bits & ((1 << (fmt.exp_bits + m)) - 1);
        let inf = (fmt.exp_all_ones() as u64) << m;
        assert!(magnitude < inf, "finite values only");
        let shift = m - k;
        let mut q = magnitude >> shift;
        let low = magnitude & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if low > half || (low == half && q & 1 == 1) {
            q += 1;
        }
        let rounded = (q << shift).min(inf - (1 << shift));
        sign | rounded
    }

    fn round_trip_bits(q: &Quantizer, bits: u64) -> u64 {
        q.dequantize(q.quantize(bits, 1.0), 1.0)
    }

    #[test]
    fn rounding_matches_the_integer_reference_on_every_16_bit_pattern() {
        for dtype in [Dtype::BF16, Dtype::F16] {
            let fmt = FloatFormat::of(dtype).unwrap();
            for k in 0..fmt.man_bits {
                let q = Quantizer::new(dtype, k, 0).unwrap();
                for bits in 0..=u16::MAX as u64 {
                    if (bits >> fmt.man_bits) as u32 & fmt.exp_all_ones() == fmt.exp_all_ones() {
                        continue;
                    }
                    assert_eq!(
                        round_trip_bits(&q, bits),
                        reference_round(fmt, k, bits),
                        "{dtype} K={k} bits {bits:#06x}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_matches_the_integer_reference_on_random_f32() {
        let fmt = FloatFormat::of(Dtype::F32).unwrap();
        let mut rng = Rng(0x5eed);
        for k in 0..fmt.man_bits {
            let q = Quantizer::new(Dtype::F32, k, 0).unwrap();
            for _ in 0..20_000 {
                let bits = rng.next() & 0xffff_ffff;
                if (bits >> 23) & 0xff == 0xff {
                    continue;
                }
                assert_eq!(
                    round_trip_bits(&q, bits),
                    reference_round(fmt, k, bits),
                    "K={k} bits {bits:#010x}"
                );
            }
        }
    }

    #[test]
    fn carries_reach_the_exponent_and_never_overflow() {
        // bf16 1.1111111b * 2^0 (0x3FFF) at K = 3 rounds up to 2.0 (0x4000).
        let q = Quantizer::new(Dtype::BF16, 3, 0).unwrap();
        assert_eq!(round_trip_bits(&q, 0x3FFF), 0x4000);
        // The largest finite bf16 (0x7F7F) clamps to the largest value with 3 mantissa bits, not Inf.
        assert_eq!(round_trip_bits(&q, 0x7F7F), 0x7F70);
        assert_eq!(round_trip_bits(&q, 0xFF7F), 0xFF70);
        // K = 0 keeps powers of two: a tie goes to the even exponent field, so 1.5 (exponent field 127)
        // rounds to 2 (128) and 3 (128) to 2; 1.25 rounds to 1.
        let q0 = Quantizer::new(Dtype::F32, 0, 0).unwrap();
        assert_eq!(
            round_trip_bits(&q0, 1.5f32.to_bits() as u64),
            2.0f32.to_bits() as u64
        );
        assert_eq!(
            round_trip_bits(&q0, 3.0f32.to_bits() as u64),
            2.0f32.to_bits() as u64
        );
        assert_eq!(
            round_trip_bits(&q0, 1.25f32.to_bits() as u64),
            1.0f32.to_bits() as u64
        );
        assert_eq!(
            round_trip_bits(&q0, f32::MAX.to_bits() as u64),
            (2.0f32.powi(127)).to_bits() as u64
        );
    }

    #[test]
    fn nan_and_inf_survive_every_setting() {
        for dtype in DTYPES {
            let fmt = FloatFormat::of(dtype).unwrap();
            let m = fmt.man_bits;
            let inf = (fmt.exp_all_ones() as u64) << m;
            let sign = 1u64 << (fmt.exp_bits + m);
            let quiet = inf | (1 << (m - 1));
            for k in 0..m {
                for norm in [0, 1, 512] {
                    let q = Quantizer::new(dtype, k, norm).unwrap();
                    for scale in [1.0, Quantizer::scale(200)] {
                        let rt = |b: u64| q.dequantize(q.quantize(b, scale), scale);
                        assert_eq!(rt(inf), inf);
                        assert_eq!(rt(sign | inf), sign | inf);
                        // The canonical quiet NaN is kept exactly; any NaN stays a NaN of the same sign.
                        assert_eq!(rt(quiet), quiet, "{dtype} K={k}");
                        assert_eq!(rt(sign | quiet), sign | quiet);
                        for payload in [1u64, 2, (1 << m) - 1, 1 << (m - 2)] {
                            let out = rt(sign | inf | payload);
                            assert!(
                                fmt.to_f64(out).is_nan(),
                                "{dtype} K={k} payload {payload:#x}"
                            );
                            assert_eq!(out & sign, sign);
                        }
                    }
                }
            }
        }
    }

    /// The bound of format-spec section 13.3.5, written out again here from the spec.
    fn spec_bound(fmt: FloatFormat, k: u32, normalized: bool, x: f64) -> f64 {
        let x = x.abs();
        let t = 2f64.powi(fmt.emin());
        let e_k = 2f64.powi(-(k as i32) - 1);
        if !normalized {
            return e_k * x.max(t);
        }
        let e_m = 2f64.powi(-(fmt.man_bits as i32) - 1);
        let e1 = e_k * x.max(2.0 * t) + 2f64.powi(-52) * x;
        e1 + e_m * (x + e1).max(t)
    }

    fn random_block(dtype: Dtype, n: usize, rng: &mut Rng) -> Vec<u8> {
        let width = dtype.byte_width().unwrap();
        let mut out = Vec::with_capacity(n * width);
        for i in 0..n {
            let r = rng.next();
            // Mix arbitrary bit patterns (specials, subnormals, huge values) with weight-like values.
            let bits = if i % 3 == 0 {
                r
            } else {
                let v = ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2;
                match dtype {
                    Dtype::F32 => (v as f32).to_bits() as u64,
                    Dtype::BF16 => ((v as f32).to_bits() >> 16) as u64,
                    _ => half::f16::from_f64(v).to_bits() as u64,
                }
            };
            out.extend_from_slice(&bits.to_le_bytes()[..width]);
        }
        out
    }

    #[test]
    fn every_element_is_within_the_bound_for_every_k_and_group_size() {
        let mut rng = Rng(0xfeed_beef);
        for dtype in DTYPES {
            let fmt = FloatFormat::of(dtype).unwrap();
            let width = dtype.byte_width().unwrap();
            for k in 0..fmt.man_bits {
                for norm in [0, 1, 7, 512, 1024] {
                    let q = Quantizer::new(dtype, k, norm).unwrap();
                    let block = random_block(dtype, 1500, &mut rng);
                    let decoded = q.round_trip_block(&block, width, 0);
                    for (a, &b) in element_values(&block, width).iter().zip(&decoded) {
                        let (x, y) = (fmt.to_f64(*a), fmt.to_f64(b));
                        if !x.is_finite() {
                            assert!(x.is_nan() && y.is_nan() || x == y, "{dtype} K={k}");
                            continue;
                        }
                        assert!(y.is_finite(), "{dtype} K={k} B={norm}: {x} became {y}");
                        let bound = spec_bound(fmt, k, norm > 0, x);
                        assert!(
                            (y - x).abs() <= bound * (1.0 + 1e-12),
                            "{dtype} K={k} B={norm}: {x:e} -> {y:e}, error {:e} > {bound:e}",
                            (y - x).abs()
                        );
                        assert!(q.error_bound(x) >= bound * (1.0 - 1e-12));
                    }
                }
            }
        }
    }

    #[test]
    fn the_max_rule_keeps_a_group_maximum_with_8_mantissa_bits_exact() {
        // bf16 has 7 mantissa bits, so the max rule's scale is the maximum's mantissa itself: the maximum
        // becomes a power of two, which every K represents, and decodes exactly.
        let q = Quantizer::new(Dtype::BF16, 0, 4).unwrap();
        let fmt = q.format();
        let max = 0x3FB5u64;
        let byte = Quantizer::scale_byte(fmt.to_f64(max));
        assert_eq!(byte, 0x35 << 1);
        let scale = Quantizer::scale(byte);
        assert_eq!(q.dequantize(q.quantize(max, scale), scale), max);
        assert_eq!(q.dequantize(q.quantize(0, scale), scale), 0);
    }

    #[test]
    fn the_scale_search_never_loses_to_the_max_rule() {
        let mut rng = Rng(0x5ca1e);
        for dtype in DTYPES {
            let fmt = FloatFormat::of(dtype).unwrap();
            for k in [0, 1, 3, 5] {
                for norm in [1, 7, 64, 256] {
                    let q = Quantizer::new(dtype, k, norm).unwrap();
                    // Weight-like values in the normal range, where the search's error model is exact.
                    let values: Vec<u64> = (0..2048)
                        .map(|_| {
                            let r = rng.next();
                            let v = ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2;
                            let v = if v.abs() < 1e-3 { 1e-3 } else { v };
                            match dtype {
                                Dtype::F32 => (v as f32).to_bits() as u64,
                                Dtype::BF16 => ((v as f32).to_bits() >> 16) as u64,
                                _ => half::f16::from_f64(v).to_bits() as u64,
                            }
                        })
                        .collect();
                    let (scales, codes) = q.quantize_block(&values, 0);
                    let mut decoded = Vec::new();
                    q.dequantize_block(&scales, &codes, &mut decoded);
                    let (mut searched, mut max_rule) = (0.0, 0.0);
                    for (g, group) in values.chunks(norm as usize).enumerate() {
                        let absmax = group
                            .iter()
                            .map(|&v| fmt.to_f64(v).abs())
                            .fold(0.0, f64::max);
                        let scale = Quantizer::scale(Quantizer::scale_byte(absmax));
                        let error = |x: u64, y: u64| (fmt.to_f64(x) - fmt.to_f64(y)).powi(2);
                        let chosen: f64 = group
                            .iter()
                            .zip(&decoded[g * norm as usize..])
                            .map(|(&x, &y)| error(x, y))
                            .sum();
                        let by_max: f64 = group
                            .iter()
                            .map(|&x| error(x, q.dequantize(q.quantize(x, scale), scale)))
                            .sum();
                        assert!(chosen <= by_max, "{dtype} K={k} B={norm} group {g}");
                        searched += chosen;
                        max_rule += by_max;
                    }
                    if norm > 1 {
                        assert!(
                            searched < max_rule,
                            "{dtype} K={k} B={norm}: the search gained nothing"
                        );
                    }
                }
            }
        }
    }

    /// With channel weights the search minimizes the weighted error: over a block it does better on that
    /// error than the unweighted choice (per group it may not, the search being a coarse-to-fine one), and
    /// the bound still holds everywhere.
    #[test]
    fn channel_weights_steer_the_scale_search() {
        let mut rng = Rng(0xc0ffee);
        let fmt = FloatFormat::of(Dtype::BF16).unwrap();
        // Weights spanning four decades over 24 channels, groups of 8 (three per row of 24).
        let weights: Vec<f32> = (0..24)
            .map(|_| 10f32.powf((rng.next() % 400) as f32 / 100.0))
            .collect();
        let plain = Quantizer::new(Dtype::BF16, 3, 8).unwrap();
        let weighted = plain.clone().with_channel_weights(&weights);
        let values: Vec<u64> = (0..24 * 200)
            .map(|_| {
                let v = ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2;
                ((v.max(1e-3) as f32).to_bits() >> 16) as u64
            })
            .collect();
        // The block starts at element 48 of the tensor, a multiple of the row length.
        let first = 48;
        let decode = |q: &Quantizer| {
            let (scales, codes) = q.quantize_block(&values, first);
            let mut out = Vec::new();
            q.dequantize_block(&scales, &codes, &mut out);
            out
        };
        let (by_plain, by_weighted) = (decode(&plain), decode(&weighted));
        let weighted_error = |decoded: &[u64], range: std::ops::Range<usize>| -> f64 {
            range
                .map(|i| {
                    let (x, y) = (fmt.to_f64(values[i]), fmt.to_f64(decoded[i]));
                    weights[(first + i) % 24] as f64 * (x - y) * (x - y)
                })
                .sum()
        };
        let all = 0..values.len();
        let (total_plain, total_weighted) = (
            weighted_error(&by_plain, all.clone()),
            weighted_error(&by_weighted, all),
        );
        assert!(
            total_weighted < 0.98 * total_plain,
            "weighted {total_weighted:e} against plain {total_plain:e}"
        );
        for (&a, &b) in values.iter().zip(&by_weighted) {
            let x = fmt.to_f64(a);
            assert!((fmt.to_f64(b) - x).abs() <= weighted.error_bound(x));
        }
    }

    #[test]
    fn blocks_round_trip_through_the_payload() {
        let mut rng = Rng(77);
        for dtype in DTYPES {
            let fmt = FloatFormat::of(dtype).unwrap();
            let width = dtype.byte_width().unwrap();
            for k in [0, 3, fmt.man_bits - 1] {
                // Channel weights change only the encoder's scale choice: the decoder, which has none,
                // must still give back what the weighted quantizer's round trip predicts.
                for (norm, weights) in [
                    (0, vec![]),
                    (64, vec![]),
                    (64, vec![0.5, 4.0, 0.0, 9.0, 1.0]),
                ] {
                    let data = random_block(dtype, 3000, &mut rng);
                    let plan = plan(dtype, k, norm, &data, 1000, &weights).unwrap();
                    let bytes = plan.params.to_bytes();
                    let params = LossyParams::parse(&bytes, dtype).unwrap();
                    assert_eq!(params, plan.params);
                    let decoder = LossyDecoder::new(params, dtype).unwrap();
                    for (b, block) in data.chunks(1000 * width).enumerate() {
                        let payload =
                            encode_block(&plan.params, &plan.quantizer, dtype, block, 1000 * b);
                        let mut out = vec![0u8; block.len()];
                        decoder.decode_block(&payload, &mut out).unwrap();
                        let want = plan.quantizer.round_trip_block(block, width, 1000 * b);
                        assert_eq!(element_values(&out, width), want, "{dtype} K={k} B={norm}");
                        let mut longer = payload.clone();
                        longer.extend_from_slice(&[0; 4]);
                        assert!(decoder.decode_block(&longer, &mut out).is_err());
                        assert!(decoder
                            .decode_block(&payload[..payload.len() - 4], &mut out)
                            .is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn params_parse_rejects_what_the_spec_forbids() {
        let ok = LossyParams {
            mantissa_bits: 3,
            norm_block: 512,
            coded_bits: 0,
            table: None,
        };
        assert!(LossyParams::parse(&ok.to_bytes(), Dtype::BF16).is_ok());
        assert!(LossyParams::parse(&ok.to_bytes(), Dtype::F64).is_err());
        assert!(LossyParams::parse(&[7, 0, 0, 0], Dtype::BF16).is_err()); // K = M
        assert!(LossyParams::parse(&[3, 0x01, 0x04, 0], Dtype::BF16).is_err()); // B = 1025
        assert!(LossyParams::parse(&[3, 0, 0, 13], Dtype::F32).is_err()); // over 12 coded bits
        assert!(LossyParams::parse(&[3, 0, 0, 5], Dtype::BF16).is_err()); // table missing
        assert!(LossyParams::parse(&[3, 0, 0, 0, 0], Dtype::BF16).is_err()); // trailing byte
        assert!(LossyParams::parse(&[3, 0, 0], Dtype::BF16).is_err());
        // F16 K = 0 codes are 1 + 5 + 1 = 7 bits: 7 coded bits is the most.
        assert!(LossyParams::parse(&[0, 0, 0, 8], Dtype::F16).is_err());
    }
}
