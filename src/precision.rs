//! Which precision each tensor gets, decided before any block is encoded: name patterns (`PATTERN=VALUE`,
//! shell-style globs) mapped to a setting, the last matching pattern winning, and a default by rank.
//! `NameRules` is generic over the setting so that other per-tensor choices can reuse it.

use std::collections::BTreeMap;

use crate::codec::lossy::{FloatFormat, MAX_NORM_BLOCK};
use crate::dtype::Dtype;
use crate::error::{NzError, Result};

/// Matches `name` against a shell-style glob: `*` any run of characters (dots included), `?` one
/// character; every other character stands for itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0, 0);
    // Where the last `*` was and how much of `s` it has swallowed, to backtrack to.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One `PATTERN=VALUE` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRule<T> {
    pub pattern: String,
    pub value: T,
}

/// Ordered rules; the last one whose pattern matches a tensor's name applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRules<T> {
    pub rules: Vec<NameRule<T>>,
}

impl<T> Default for NameRules<T> {
    fn default() -> Self {
        NameRules { rules: Vec::new() }
    }
}

impl<T> NameRules<T> {
    /// Parses `PATTERN=VALUE` (split at the last `=`) with `parse_value` for the value.
    pub fn push_parsed(
        &mut self,
        rule: &str,
        parse_value: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> Result<()> {
        let bad = |what: String| NzError::InvalidSetting {
            what: format!("rule '{rule}': {what}"),
        };
        let (pattern, value) = rule
            .rsplit_once('=')
            .ok_or_else(|| bad("expected PATTERN=VALUE".into()))?;
        if pattern.is_empty() {
            return Err(bad("empty pattern".into()));
        }
        let value = parse_value(value).map_err(bad)?;
        self.rules.push(NameRule {
            pattern: pattern.to_string(),
            value,
        });
        Ok(())
    }

    /// The value of the last rule matching `name`.
    pub fn lookup(&self, name: &str) -> Option<&T> {
        self.rules
            .iter()
            .rev()
            .find(|r| glob_match(&r.pattern, name))
            .map(|r| &r.value)
    }
}

/// The precision of one tensor's floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Bit-exact (the lossless codecs).
    Lossless,
    /// Keep this many mantissa bits (the lossy codec; the dtype's full width means lossless).
    MantissaBits(u32),
}

impl Precision {
    /// Parses `lossless`, `full` or a number of mantissa bits.
    pub fn parse(text: &str) -> std::result::Result<Precision, String> {
        match text {
            "lossless" | "full" => Ok(Precision::Lossless),
            _ => text
                .parse::<u32>()
                .map(Precision::MantissaBits)
                .map_err(|_| format!("'{text}' is not a bit count, 'lossless' or 'full'")),
        }
    }
}

/// Elements per scale byte when no group size is given. Measured on MiniLM bf16 at K = 3 with the
/// least-error scale search: groups of 256 give +1.2 dB SQNR for +0.077 bits per weight, about 16 dB per bit
/// against the 6 dB a mantissa bit buys, and a higher sentence-embedding cosine at equal file size.
pub const DEFAULT_NORM_BLOCK: u32 = 256;

/// Largest K any lossy dtype accepts (F32's mantissa width).
pub const MAX_MANTISSA_BITS: u32 = 23;

/// Lossy settings of a conversion: a default K for tensors of rank 2 and more, rules by name, and the
/// normalization group size.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LossySettings {
    /// K for tensors no rule matches, when their rank is at least 2; None keeps them lossless.
    pub default_bits: Option<u32>,
    /// Per-name precision; overrides the default, 1-D tensors included.
    pub rules: NameRules<Precision>,
    /// Elements per scale byte; 0 = no normalization.
    pub norm_block: u32,
    /// Per-tensor precision by exact name, as chosen by `allocate` for a size target; consulted after the
    /// rules and before the rank default.
    pub assigned: BTreeMap<String, Precision>,
    /// Per-tensor normalization group size by exact name, as chosen by `allocate` for a size target at a
    /// fixed K; tensors not named use `norm_block`.
    pub assigned_norm_blocks: BTreeMap<String, u32>,
}

impl LossySettings {
    /// Checks the settings on their own (K within the widest dtype, group size within 0..=1024).
    pub fn validate(&self) -> Result<()> {
        let blocks =
            std::iter::once(self.norm_block).chain(self.assigned_norm_blocks.values().copied());
        for block in blocks {
            if block > MAX_NORM_BLOCK {
                return Err(NzError::InvalidSetting {
                    what: format!("norm block {block} outside 1..={MAX_NORM_BLOCK}"),
                });
            }
        }
        let bits = self
            .default_bits
            .map(Precision::MantissaBits)
            .into_iter()
            .chain(self.rules.rules.iter().map(|r| r.value))
            .chain(self.assigned.values().copied())
            .filter_map(|p| match p {
                Precision::MantissaBits(k) => Some(k),
                Precision::Lossless => None,
            });
        for k in bits {
            if k > MAX_MANTISSA_BITS {
                return Err(NzError::InvalidSetting {
                    what: format!("{k} mantissa bits: no dtype has more than {MAX_MANTISSA_BITS}"),
                });
            }
        }
        Ok(())
    }

    pub fn is_lossless(&self) -> bool {
        self.default_bits.is_none()
            && self
                .rules
                .rules
                .iter()
                .map(|r| &r.value)
                .chain(self.assigned.values())
                .all(|&p| p == Precision::Lossless)
    }

    /// Elements per scale byte for a tensor (0 = no normalization): its assigned group size, else `norm_block`.
    pub fn norm_block_for(&self, name: &str) -> u32 {
        self.assigned_norm_blocks
            .get(name)
            .copied()
            .unwrap_or(self.norm_block)
    }

    /// The mantissa bits to keep for a tensor, None for lossless: a rule's value if one matches, else its
    /// assigned precision, else the default for tensors of rank 2 and more. Only BF16, F16 and F32 can be
    /// lossy; K equal to the dtype's mantissa width is lossless; K above it is an error.
    pub fn mantissa_bits_for(&self, name: &str, dtype: Dtype, rank: usize) -> Result<Option<u32>> {
        let precision = match self.rules.lookup(name).or(self.assigned.get(name)) {
            Some(&p) => p,
            None if rank >= 2 => self
                .default_bits
                .map_or(Precision::Lossless, Precision::MantissaBits),
            None => Precision::Lossless,
        };
        let (Precision::MantissaBits(k), Some(fmt)) = (precision, FloatFormat::of(dtype)) else {
            return Ok(None);
        };
        if k > fmt.man_bits {
            return Err(NzError::InvalidSetting {
                what: format!(
                    "{k} mantissa bits for tensor '{name}': {dtype} has {}",
                    fmt.man_bits
                ),
            });
        }
        Ok((k < fmt.man_bits).then_some(k))
    }
}

/// Narrowest and widest codebook rate (bits per weight) accepted from the command line and the library
/// settings; at fixed rate it is the index width B and must be a whole number.
pub const CODEBOOK_BITS: std::ops::RangeInclusive<u32> = 2..=8;
/// Scale group size of the codebook mode when none is given.
pub const DEFAULT_CODEBOOK_GROUP: u32 = 128;
/// Row clusters (codebooks per tensor) of the codebook mode when none is given.
pub const DEFAULT_ROW_CLUSTERS: u32 = 4;
/// Tensors the codebook mode leaves lossless unless a rule names them: embedding tables, whose rows are
/// looked up one at a time rather than multiplied.
pub const CODEBOOK_LOSSLESS_BY_DEFAULT: &str = "*embeddings*";

/// What one tensor gets in codebook mode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CodebookChoice {
    Lossless,
    /// A rate R in bits per weight: the size target of the tensor, or at fixed rate the index width
    /// (codebooks of `2^R` entries).
    Bits(f64),
}

impl CodebookChoice {
    /// Parses `lossless`, `full` or a rate such as `3` or `3.5`.
    pub fn parse(text: &str) -> std::result::Result<CodebookChoice, String> {
        match text {
            "lossless" | "full" => Ok(CodebookChoice::Lossless),
            _ => text
                .parse::<f64>()
                .ok()
                .filter(|r| r.is_finite())
                .map(CodebookChoice::Bits)
                .ok_or_else(|| {
                    format!("'{text}' is not a bit count (e.g. 3 or 3.5), 'lossless' or 'full'")
                }),
        }
    }
}

/// How the codebook mode turns a rate R into a fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CodebookMode {
    /// R is a budget: the tensor's stored size (codec params and block payloads) is at most R bits per
    /// weight. The fit uses codebooks of `2^(ceil(R) + 2)` entries and a rate term whose weight is searched
    /// per tensor to fill the budget (`codebook_format::plan_at_rate`).
    #[default]
    RateTarget,
    /// R is the index width B, a whole number: codebooks of `2^B` entries fitted for error alone (no rate
    /// term). The indices are still rANS-coded, so the stored size is usually a little under B bits per
    /// weight plus the side data.
    FixedRate,
}

/// Codebook settings of a conversion: a default rate for matrices (rank 2 and more, not embeddings), rules by
/// name, how a rate becomes a fit, and the fit's group size and row clusters.
#[derive(Clone, Debug, PartialEq)]
pub struct CodebookSettings {
    /// R for tensors no rule matches, when their rank is at least 2 and their name does not match
    /// `CODEBOOK_LOSSLESS_BY_DEFAULT`; None keeps them lossless.
    pub default_bits: Option<f64>,
    /// Per-name choice; overrides the default (a rule may make a 1-D tensor or an embedding quantized).
    pub rules: NameRules<CodebookChoice>,
    pub mode: CodebookMode,
    /// Inputs per scale group G.
    pub group_size: u32,
    /// Row clusters K, each with its own codebook.
    pub row_clusters: u32,
}

impl Default for CodebookSettings {
    fn default() -> Self {
        CodebookSettings {
            default_bits: None,
            rules: NameRules::default(),
            mode: CodebookMode::default(),
            group_size: DEFAULT_CODEBOOK_GROUP,
            row_clusters: DEFAULT_ROW_CLUSTERS,
        }
    }
}

impl CodebookSettings {
    /// Checks R (2..=8 in the default and every rule, a whole number at fixed rate), G (1 or more) and K
    /// (1..=256).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(NzError::InvalidSetting { what });
        let bits = self
            .default_bits
            .into_iter()
            .chain(self.rules.rules.iter().filter_map(|r| match r.value {
                CodebookChoice::Bits(b) => Some(b),
                CodebookChoice::Lossless => None,
            }));
        let (low, high) = (*CODEBOOK_BITS.start() as f64, *CODEBOOK_BITS.end() as f64);
        for b in bits {
            if !(low..=high).contains(&b) {
                return bad(format!("codebook rate {b} outside {low}..={high}"));
            }
            if self.mode == CodebookMode::FixedRate && b.fract() != 0.0 {
                return bad(format!(
                    "codebook rate {b} at fixed rate: the index width must be a whole number"
                ));
            }
        }
        if self.group_size == 0 {
            return bad("codebook group size must be at least 1".into());
        }
        let max_clusters = crate::codec::codebook::MAX_ROW_CLUSTERS as u32;
        if !(1..=max_clusters).contains(&self.row_clusters) {
            return bad(format!(
                "row clusters {} outside 1..={max_clusters}",
                self.row_clusters
            ));
        }
        Ok(())
    }

    pub fn is_lossless(&self) -> bool {
        self.default_bits.is_none()
            && self
                .rules
                .rules
                .iter()
                .all(|r| r.value == CodebookChoice::Lossless)
    }

    /// The rate R for a tensor, None for lossless: a rule's value if one matches, else the default for
    /// tensors of rank 2 and more that are not embeddings. Only BF16, F16 and F32 tensors of rank 1 or more
    /// can be quantized.
    pub fn bits_for(&self, name: &str, dtype: Dtype, rank: usize) -> Option<f64> {
        let choice = match self.rules.lookup(name) {
            Some(&c) => c,
            None if rank >= 2 && !glob_match(CODEBOOK_LOSSLESS_BY_DEFAULT, name) => self
                .default_bits
                .map_or(CodebookChoice::Lossless, CodebookChoice::Bits),
            None => CodebookChoice::Lossless,
        };
        match choice {
            CodebookChoice::Bits(b)
                if rank >= 1 && crate::codec::codebook_format::applies_to(dtype) =>
            {
                Some(b)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("*", "a.b.c"));
        assert!(glob_match("*.weight", "encoder.layer.0.weight"));
        assert!(!glob_match("*.weight", "encoder.layer.0.bias"));
        assert!(glob_match(
            "encoder.*.query.*",
            "encoder.layer.3.query.weight"
        ));
        assert!(glob_match("l?yer", "layer"));
        assert!(!glob_match("l?yer", "laayer"));
        assert!(glob_match("*emb*", "embeddings.word_embeddings.weight"));
        assert!(!glob_match("emb", "embeddings"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn last_matching_rule_wins_and_rank_sets_the_default() {
        let mut s = LossySettings {
            default_bits: Some(3),
            ..LossySettings::default()
        };
        s.rules.push_parsed("*emb*=5", Precision::parse).unwrap();
        s.rules
            .push_parsed("*position*=lossless", Precision::parse)
            .unwrap();
        s.rules.push_parsed("*.bias=2", Precision::parse).unwrap();
        let k = |s: &LossySettings, name: &str, rank| {
            s.mantissa_bits_for(name, Dtype::BF16, rank).unwrap()
        };
        assert_eq!(k(&s, "layer.0.weight", 2), Some(3));
        assert_eq!(k(&s, "layer.0.gamma", 1), None);
        assert_eq!(k(&s, "embeddings.word.weight", 2), Some(5));
        assert_eq!(k(&s, "embeddings.position.weight", 2), None);
        assert_eq!(k(&s, "layer.0.bias", 1), Some(2));
        // Full width is lossless; wider is an error naming the tensor; non-lossy dtypes stay lossless.
        s.rules.push_parsed("full=7", Precision::parse).unwrap();
        assert_eq!(k(&s, "full", 2), None);
        s.rules.push_parsed("wide=8", Precision::parse).unwrap();
        let err = s.mantissa_bits_for("wide", Dtype::BF16, 2).unwrap_err();
        assert!(err.to_string().contains("'wide'"), "{err}");
        assert_eq!(s.mantissa_bits_for("wide", Dtype::F32, 2).unwrap(), Some(8));
        assert_eq!(s.mantissa_bits_for("x", Dtype::F64, 2).unwrap(), None);
    }

    #[test]
    fn codebook_rules_keep_vectors_and_embeddings_lossless_by_default() {
        let mut s = CodebookSettings {
            default_bits: Some(4.0),
            ..CodebookSettings::default()
        };
        let b = |s: &CodebookSettings, name: &str, dtype, rank| s.bits_for(name, dtype, rank);
        assert_eq!(b(&s, "layer.0.weight", Dtype::BF16, 2), Some(4.0));
        assert_eq!(b(&s, "layer.0.weight", Dtype::F32, 3), Some(4.0));
        assert_eq!(b(&s, "layer.0.bias", Dtype::F32, 1), None);
        assert_eq!(
            b(&s, "embeddings.word_embeddings.weight", Dtype::F32, 2),
            None
        );
        assert_eq!(b(&s, "layer.0.weight", Dtype::F64, 2), None);
        assert_eq!(b(&s, "layer.0.weight", Dtype::I8, 2), None);
        s.rules
            .push_parsed("*word_embeddings*=3.5", CodebookChoice::parse)
            .unwrap();
        s.rules
            .push_parsed("*.5.*=lossless", CodebookChoice::parse)
            .unwrap();
        assert_eq!(
            b(&s, "embeddings.word_embeddings.weight", Dtype::F16, 2),
            Some(3.5)
        );
        assert_eq!(b(&s, "layer.5.weight", Dtype::F16, 2), None);
        assert_eq!(b(&s, "scalar", Dtype::F16, 0), None);
        assert!(s.validate().is_ok());
        assert!(!s.is_lossless());
        assert!(CodebookSettings::default().is_lossless());
        for bad in [
            CodebookSettings {
                default_bits: Some(8.5),
                ..CodebookSettings::default()
            },
            CodebookSettings {
                default_bits: Some(1.9),
                ..CodebookSettings::default()
            },
            CodebookSettings {
                group_size: 0,
                ..CodebookSettings::default()
            },
            CodebookSettings {
                row_clusters: 257,
                ..CodebookSettings::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // A fractional rate is a size target; at fixed rate it must be a whole index width.
        let fixed = CodebookSettings {
            mode: CodebookMode::FixedRate,
            ..s.clone()
        };
        assert!(fixed.validate().is_err());
        let mut whole = fixed.clone();
        whole
            .rules
            .rules
            .retain(|r| r.value != CodebookChoice::Bits(3.5));
        assert!(whole.validate().is_ok());
        assert_eq!(
            CodebookChoice::parse("2.75"),
            Ok(CodebookChoice::Bits(2.75))
        );
        assert!(CodebookChoice::parse("inf").is_err());
        assert!(CodebookChoice::parse("three").is_err());
        s.rules.push_parsed("x=12", CodebookChoice::parse).unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn bad_rules_and_settings_are_rejected() {
        let mut rules = NameRules::default();
        assert!(rules.push_parsed("no-equals", Precision::parse).is_err());
        assert!(rules.push_parsed("=3", Precision::parse).is_err());
        assert!(rules.push_parsed("x=three", Precision::parse).is_err());
        let too_many = LossySettings {
            default_bits: Some(24),
            ..LossySettings::default()
        };
        assert!(too_many.validate().is_err());
        let big_block = LossySettings {
            norm_block: 1025,
            ..LossySettings::default()
        };
        assert!(big_block.validate().is_err());
        assert!(LossySettings::default().is_lossless());
    }
}
