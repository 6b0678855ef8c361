//! Decode everything (checking every checksum and stream end) and, given the original, compare: lossless
//! tensors bit for bit, lossy ones against the error bound of their parameters (format-spec/nzt.md section
//! 13.3.5), codebook ones (section 13.4, which has no per-element bound) for finite output, with error statistics (SQNR, relative Frobenius error, largest absolute and relative error) for
//! every float tensor.

use serde::Serialize;

use crate::codec::lossy::{FloatFormat, LossyParams, Quantizer};
use crate::error::Result;
use crate::format::reader::NztFile;
use crate::format::Codec;
use crate::source::SafetensorsFile;
use crate::Dtype;

/// Relative slack on the bound check, for the rounding of the bound's own f64 arithmetic.
const BOUND_SLACK: f64 = 1.0 + 1.0 / (1u64 << 40) as f64;

/// Running error statistics of decoded floats against their originals.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorStats {
    /// Finite elements compared.
    pub elements: u64,
    pub signal_energy: f64,
    pub error_energy: f64,
    pub max_abs_error: f64,
    pub max_rel_error: f64,
    /// NaN or Inf elements not decoded as the same NaN sign or the same Inf, and finite ones that were not
    /// decoded as finite.
    pub specials_changed: u64,
    /// Elements whose error exceeds the bound (lossy tensors only).
    pub over_bound: u64,
}

impl ErrorStats {
    /// Adds one element: original `x` and decoded `y` as values (NaN and Inf included). `bound` gives the
    /// largest allowed error for a finite `x`, if there is one.
    pub fn add(&mut self, x: f64, y: f64, bound: Option<&dyn Fn(f64) -> f64>) {
        if x.is_nan() {
            self.specials_changed +=
                u64::from(!(y.is_nan() && y.is_sign_negative() == x.is_sign_negative()));
            return;
        }
        if x.is_infinite() {
            self.specials_changed += u64::from(x != y);
            return;
        }
        if !y.is_finite() {
            self.specials_changed += 1;
            return;
        }
        let err = (y - x).abs();
        self.elements += 1;
        self.signal_energy += x * x;
        self.error_energy += err * err;
        self.max_abs_error = self.max_abs_error.max(err);
        let rel = if x != 0.0 {
            err / x.abs()
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        self.max_rel_error = self.max_rel_error.max(rel);
        if let Some(bound) = bound {
            self.over_bound += u64::from(err > bound(x) * BOUND_SLACK);
        }
    }

    pub fn merge(&mut self, other: &ErrorStats) {
        self.elements += other.elements;
        self.signal_energy += other.signal_energy;
        self.error_energy += other.error_energy;
        self.max_abs_error = self.max_abs_error.max(other.max_abs_error);
        self.max_rel_error = self.max_rel_error.max(other.max_rel_error);
        self.specials_changed += other.specials_changed;
        self.over_bound += other.over_bound;
    }

    /// Signal-to-quantization-noise ratio in dB; None when there is no error at all.
    pub fn sqnr_db(&self) -> Option<f64> {
        (self.error_energy > 0.0).then(|| 10.0 * (self.signal_energy / self.error_energy).log10())
    }

    /// `||decoded - original||_F / ||original||_F`.
    pub fn relative_frobenius(&self) -> f64 {
        if self.error_energy == 0.0 {
            0.0
        } else {
            (self.error_energy / self.signal_energy).sqrt()
        }
    }

    pub fn report(&self) -> ErrorReport {
        ErrorReport {
            elements: self.elements,
            sqnr_db: self.sqnr_db(),
            relative_frobenius: self.relative_frobenius(),
            max_abs_error: self.max_abs_error,
            max_rel_error: self.max_rel_error,
            specials_changed: self.specials_changed,
            over_bound: self.over_bound,
        }
    }
}

/// Error statistics as reported.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorReport {
    pub elements: u64,
    /// None (null) when every element is exact.
    pub sqnr_db: Option<f64>,
    pub relative_frobenius: f64,
    pub max_abs_error: f64,
    pub max_rel_error: f64,
    pub specials_changed: u64,
    pub over_bound: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub codec: String,
    pub bytes: u64,
    /// Stored payload bits per element.
    pub bits_per_weight: f64,
    /// Bytes of the tensor's codec parameters in the header (tables, codebooks); with the payload, what a
    /// codebook rate budget counts.
    pub params_bytes: u64,
    /// None when no original was given.
    pub identical: Option<bool>,
    /// Elements whose bytes differ from the original.
    pub mismatched_elements: u64,
    /// Error against the original, for BF16, F16 and F32 tensors when an original was given.
    pub error: Option<ErrorReport>,
    /// For lossy tensors with an original: every element within the bound, NaN and Inf kept. For codebook
    /// tensors, which have no per-element bound: every element decoded finite (the error is in `error`).
    pub within_bound: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub tensors: Vec<TensorCheck>,
    pub decoded_bytes: u64,
    /// Whether the source header matches the original's byte for byte (None without an original).
    pub header_identical: Option<bool>,
    pub all_identical: Option<bool>,
    /// Whether any tensor uses a lossy codec (`lossy` or `codebook`).
    pub lossy: bool,
    /// Error over every BF16, F16 and F32 tensor together (None without an original).
    pub error: Option<ErrorReport>,
    /// The whole file's bits per element (header included).
    pub bits_per_weight: f64,
    /// With an original: the header matches, lossless tensors are bit-exact and lossy ones within their
    /// bound.
    pub passed: Option<bool>,
}

/// What `ErrorStats::add(x, x, _)` adds for every element of a block decoded bit for bit: finite elements count,
/// with their energy, in the same order (so the sums are the same); NaN and Inf add nothing.
fn add_exact_block(stats: &mut ErrorStats, dtype: Dtype, bytes: &[u8]) {
    let mut add = |x: f64| {
        if x.is_finite() {
            stats.elements += 1;
            stats.signal_energy += x * x;
        }
    };
    match dtype {
        Dtype::BF16 => bytes.chunks_exact(2).for_each(|c| {
            add(f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
        }),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .for_each(|c| add(half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .for_each(|c| add(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)),
        _ => {
            let fmt = FloatFormat::of(dtype).expect("a float dtype");
            let width = dtype.byte_width().unwrap_or(1);
            for c in bytes.chunks_exact(width) {
                let mut le = [0u8; 8];
                le[..width].copy_from_slice(c);
                add(fmt.to_f64(u64::from_le_bytes(le)));
            }
        }
    }
}

/// Decodes every tensor of `file`; compares with `original` when given. A decode error (bad checksum,
/// corrupt stream) is returned as an error; a mismatch is reported in the result.
pub fn verify(
    file: &NztFile,
    original: Option<&SafetensorsFile>,
    mut progress: impl FnMut(u64) + Send,
) -> Result<VerifyReport> {
    // The original's tensor for each table entry, when names, dtypes and sizes agree.
    let counterpart: Vec<Option<&[u8]>> = file
        .tensors()
        .iter()
        .map(|t| {
            let orig = original?;
            let s = orig.tensors.iter().find(|s| s.name == t.name)?;
            (s.dtype == t.dtype && s.end - s.start == t.byte_len()).then(|| orig.data(s))
        })
        .collect();
    // The quantizer of each lossy tensor, for its bound.
    let quantizers: Vec<Option<Quantizer>> = file
        .tensors()
        .iter()
        .map(|t| {
            (t.codec == Codec::Lossy)
                .then(|| {
                    LossyParams::parse(&t.params, t.dtype)
                        .ok()?
                        .quantizer(t.dtype)
                })
                .flatten()
        })
        .collect();
    let mut mismatched = vec![0u64; file.tensors().len()];
    let mut stats = vec![ErrorStats::default(); file.tensors().len()];
    let mut decoded = 0u64;
    file.for_each_block(|index, block, bytes| {
        decoded += bytes.len() as u64;
        progress(bytes.len() as u64);
        if let Some(want) = counterpart[index] {
            let t = &file.tensors()[index];
            let want = &want[t.block_range(block)];
            let width = t.dtype.byte_width().unwrap_or(1);
            if want == bytes {
                // Bit-exact block (every lossless one): no error to measure, only the signal.
                if FloatFormat::of(t.dtype).is_some() {
                    add_exact_block(&mut stats[index], t.dtype, want);
                }
                return Ok(());
            }
            mismatched[index] += want
                .chunks(width)
                .zip(bytes.chunks(width))
                .filter(|(a, b)| a != b)
                .count() as u64;
            if let Some(fmt) = FloatFormat::of(t.dtype) {
                let q = &quantizers[index];
                let bound = q.as_ref().map(|q| move |x: f64| q.error_bound(x));
                let bound_ref = bound.as_ref().map(|b| b as &dyn Fn(f64) -> f64);
                let bits = |c: &[u8]| {
                    let mut le = [0u8; 8];
                    le[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(le)
                };
                for (a, b) in want.chunks(width).zip(bytes.chunks(width)) {
                    stats[index].add(fmt.to_f64(bits(a)), fmt.to_f64(bits(b)), bound_ref);
                }
            }
        }
        Ok(())
    })?;
    let mut tensors = Vec::with_capacity(file.tensors().len());
    let mut total = ErrorStats::default();
    for (i, t) in file.tensors().iter().enumerate() {
        let (identical, bad) = match (original, counterpart[i]) {
            (None, _) => (None, 0),
            (Some(_), None) => (Some(false), t.elements().unwrap_or(0)),
            (Some(_), Some(_)) => (Some(mismatched[i] == 0), mismatched[i]),
        };
        let has_error = counterpart[i].is_some() && FloatFormat::of(t.dtype).is_some();
        if has_error {
            total.merge(&stats[i]);
        }
        let elements = t.elements().unwrap_or(0);
        tensors.push(TensorCheck {
            name: t.name.clone(),
            codec: t.codec.name().to_string(),
            bytes: t.byte_len(),
            bits_per_weight: if elements == 0 {
                0.0
            } else {
                8.0 * t.stored_len() as f64 / elements as f64
            },
            params_bytes: t.params.len() as u64,
            identical,
            mismatched_elements: bad,
            error: has_error.then(|| stats[i].report()),
            within_bound: match t.codec {
                _ if original.is_none() => None,
                Codec::Lossy => Some(
                    has_error
                        && quantizers[i].is_some()
                        && stats[i].over_bound == 0
                        && stats[i].specials_changed == 0,
                ),
                Codec::Codebook => Some(has_error && stats[i].specials_changed == 0),
                _ => None,
            },
        });
    }
    let header_identical =
        original.map(|o| o.header_json() == file.header().source_header.as_slice());
    let all_identical = original.map(|o| {
        header_identical == Some(true)
            && o.tensors.len() == tensors.len()
            && tensors.iter().all(|t| t.identical == Some(true))
    });
    let passed = original.map(|o| {
        header_identical == Some(true)
            && o.tensors.len() == tensors.len()
            && tensors
                .iter()
                .all(|t| t.identical == Some(true) || t.within_bound == Some(true))
    });
    let elements: u64 = file
        .tensors()
        .iter()
        .map(|t| t.elements().unwrap_or(0))
        .sum();
    Ok(VerifyReport {
        tensors,
        decoded_bytes: decoded,
        header_identical,
        all_identical,
        lossy: file
            .tensors()
            .iter()
            .any(|t| matches!(t.codec, Codec::Lossy | Codec::Codebook)),
        error: original.map(|_| total.report()),
        bits_per_weight: if elements == 0 {
            0.0
        } else {
            8.0 * file.file_len() as f64 / elements as f64
        },
        passed,
    })
}
