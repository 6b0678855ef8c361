//! Helpers shared by the integration tests: fixture paths, a seeded generator, building safetensors bytes,
//! converting in a temporary directory, and decoding a `.nzt` back to bytes.
//!
//! Each test binary uses only some of these, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use neuzip::convert::{convert_file, ConvertOptions};
use neuzip::mmap::Bytes;
use neuzip::{Dtype, NztFile};

/// The fixture files every round-trip test must cover (all of `fixtures/*.safetensors` except
/// `truncated.safetensors`, which is invalid on purpose).
pub const ROUND_TRIP_FIXTURES: &[&str] = &[
    "bf16_all_patterns.safetensors",
    "f16_all_patterns.safetensors",
    "f32_specials.safetensors",
    "minilm_slice_bf16.safetensors",
    "minilm_slice_f16.safetensors",
    "minilm_slice_f32.safetensors",
    "mixed_dtypes.safetensors",
];

/// Fixture files that are invalid on purpose.
pub const INVALID_FIXTURES: &[&str] = &["not_safetensors.bin", "truncated.safetensors"];

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A progress callback that ignores its argument.
pub fn no_progress(_: u64) {}

/// SplitMix64: a tiny seeded generator, so test data is reproducible without extra dependencies.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn gaussian(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// The safetensors crate's dtype for one of ours.
pub fn st_dtype(d: Dtype) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        Dtype::BOOL => S::BOOL,
        Dtype::U8 => S::U8,
        Dtype::I8 => S::I8,
        Dtype::I16 => S::I16,
        Dtype::U16 => S::U16,
        Dtype::I32 => S::I32,
        Dtype::U32 => S::U32,
        Dtype::I64 => S::I64,
        Dtype::U64 => S::U64,
        Dtype::F16 => S::F16,
        Dtype::BF16 => S::BF16,
        Dtype::F32 => S::F32,
        Dtype::F64 => S::F64,
        Dtype::F8_E5M2 => S::F8_E5M2,
        Dtype::F8_E4M3 => S::F8_E4M3,
        Dtype::F8_E8M0 => S::F8_E8M0,
        Dtype::F4 => S::F4,
        Dtype::F6_E2M3 => S::F6_E2M3,
        Dtype::F6_E3M2 => S::F6_E3M2,
        Dtype::C64 => S::C64,
    }
}

/// One tensor to put in a safetensors file.
#[derive(Clone, Debug)]
pub struct TestTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Serializes tensors with the official library (canonical layout).
pub fn safetensors_bytes(
    tensors: &[TestTensor],
    metadata: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view =
                safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.data)
                    .unwrap_or_else(|e| panic!("bad test tensor {}: {e:?}", t.name));
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, metadata).expect("serialize safetensors")
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Converts safetensors bytes to `.nzt` bytes through a temporary directory.
pub fn convert_bytes(input: &[u8], opts: &ConvertOptions) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write_file(dir.path(), "in.safetensors", input);
    let dst = dir.path().join("out.nzt");
    convert_file(&src, &dst, opts, &no_progress).expect("convert_file");
    std::fs::read(&dst).expect("read .nzt")
}

/// Parses `.nzt` bytes held in memory.
pub fn open_bytes(nzt: Vec<u8>) -> neuzip::Result<NztFile> {
    NztFile::from_bytes(Bytes::Owned(nzt))
}

/// The safetensors file a `.nzt` decodes to.
pub fn decompress(file: &NztFile) -> neuzip::Result<Vec<u8>> {
    let mut out = Vec::new();
    file.write_safetensors(&mut out, no_progress)?;
    Ok(out)
}

/// Decodes every tensor, whole and block by block; the first error, if any.
pub fn decode_everything(file: &NztFile) -> neuzip::Result<()> {
    for (i, t) in file.tensors().iter().enumerate() {
        let mut whole = vec![0u8; t.byte_len() as usize];
        file.decode_tensor_into(i, &mut whole)?;
        for k in 0..t.blocks.len() {
            let mut block = vec![0u8; t.block_range(k).len()];
            file.decode_block_into(i, k, &mut block)?;
        }
    }
    Ok(())
}

/// Runs `neuzip convert FLAGS INPUT -o OUTPUT` for each `(flags, message)`: each must fail with `message` in
/// its stderr and leave no output file.
pub fn assert_convert_refused(input: &Path, output: &Path, cases: &[(&[&str], &str)]) {
    for (flags, message) in cases {
        assert_cmd::Command::cargo_bin("neuzip")
            .unwrap()
            .arg("convert")
            .args(*flags)
            .arg(input)
            .arg("-o")
            .arg(output)
            .assert()
            .failure()
            .stderr(predicates::str::contains(*message));
        assert!(!output.exists(), "{flags:?} left an output");
    }
}

/// Runs `neuzip convert FLAGS INPUT -o OUTPUT` and checks that it succeeds and writes exactly `expected`
/// (the library's bytes for the same settings).
pub fn assert_cli_writes<S: AsRef<std::ffi::OsStr>>(
    flags: impl IntoIterator<Item = S>,
    input: &Path,
    output: &Path,
    expected: &[u8],
) {
    assert_cmd::Command::cargo_bin("neuzip")
        .unwrap()
        .arg("convert")
        .args(flags)
        .arg(input)
        .arg("-o")
        .arg(output)
        .assert()
        .success();
    assert!(
        std::fs::read(output).unwrap() == expected,
        "the CLI and the library wrote different files"
    );
}

/// Every entry name in `dir`, hidden files included.
pub fn dir_entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Copies every file of `from` (not recursive) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

/// A float's bits rounded to `dtype` (round to nearest even), as little-endian bytes.
pub fn float_bytes(dtype: Dtype, x: f64) -> Vec<u8> {
    match dtype {
        Dtype::F64 => x.to_le_bytes().to_vec(),
        Dtype::F32 => (x as f32).to_le_bytes().to_vec(),
        Dtype::F16 => half::f16::from_f64(x).to_le_bytes().to_vec(),
        Dtype::BF16 => half::bf16::from_f64(x).to_le_bytes().to_vec(),
        Dtype::C64 => {
            let mut v = (x as f32).to_le_bytes().to_vec();
            v.extend_from_slice(&((x * 0.5) as f32).to_le_bytes());
            v
        }
        Dtype::F8_E4M3 => vec![f8_e4m3(x)],
        Dtype::F8_E5M2 => {
            // E5M2 is the top byte of an F16, rounded to nearest even.
            let bits = half::f16::from_f64(x).to_bits();
            let round = 0x7f + ((bits >> 8) & 1);
            let rounded = if (bits & 0x7c00) == 0x7c00 {
                bits
            } else {
                bits.saturating_add(round)
            };
            vec![(rounded >> 8) as u8]
        }
        Dtype::F8_E8M0 => {
            // A power of two: the biased exponent of |x|.
            let e = (x.abs().max(1e-30).log2().round() as i32 + 127).clamp(0, 254);
            vec![e as u8]
        }
        _ => panic!("{dtype} is not a float type"),
    }
}

/// Round to nearest F8_E4M3 (bias 7, no infinities, S.1111.111 = NaN); ties go to the even code. Test data only.
fn f8_e4m3(x: f64) -> u8 {
    use std::sync::OnceLock;
    fn value(code: u8) -> f64 {
        let e = ((code >> 3) & 0xf) as i32;
        let m = (code & 7) as f64;
        if e == 0 {
            m / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }
    // Non-negative codes 0x00..=0x7e, whose values increase with the code.
    static VALUES: OnceLock<Vec<f64>> = OnceLock::new();
    let values = VALUES.get_or_init(|| (0u8..0x7f).map(value).collect());
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let i = values.partition_point(|&v| v < a);
    let code = if i == 0 {
        0
    } else if i == values.len() {
        values.len() - 1
    } else {
        let (lo, hi) = (values[i - 1], values[i]);
        if a - lo < hi - a || (a - lo == hi - a && (i - 1) % 2 == 0) {
            i - 1
        } else {
            i
        }
    };
    sign | code as u8
}

/// `n` gaussian weights with standard deviation `std`, rounded to `dtype`.
pub fn gaussian_tensor(rng: &mut SplitMix, dtype: Dtype, n: usize, std: f64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.byte_width().unwrap_or(1));
    for _ in 0..n {
        out.extend(float_bytes(dtype, rng.gaussian() * std));
    }
    out
}

/// How to lay out a hand-built safetensors file, to cover files the official writer would not produce.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Order of the tensors' bytes in the data area (indices into the tensor list).
    pub data_order: Vec<usize>,
    /// Order of the tensors' entries in the JSON header.
    pub json_order: Vec<usize>,
    /// Where `__metadata__` goes among the JSON entries (clamped to the end).
    pub metadata_position: usize,
    /// Indented JSON instead of compact.
    pub pretty: bool,
    /// Pad the header with spaces to a multiple of this (1: no padding).
    pub pad_to: usize,
}

/// Builds safetensors bytes by hand with `layout`; the result is checked to be valid for the official reader.
pub fn safetensors_bytes_with_layout(
    tensors: &[TestTensor],
    metadata: Option<&[(String, String)]>,
    layout: &Layout,
) -> Vec<u8> {
    let mut offsets = vec![(0usize, 0usize); tensors.len()];
    let mut data = Vec::new();
    for &i in &layout.data_order {
        let start = data.len();
        data.extend_from_slice(&tensors[i].data);
        offsets[i] = (start, data.len());
    }
    let mut entries: Vec<(String, serde_json::Value)> = layout
        .json_order
        .iter()
        .map(|&i| {
            let t = &tensors[i];
            (
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "data_offsets": [offsets[i].0, offsets[i].1],
                }),
            )
        })
        .collect();
    if let Some(meta) = metadata {
        let map: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let at = layout.metadata_position.min(entries.len());
        entries.insert(at, ("__metadata__".into(), serde_json::Value::Object(map)));
    }
    let object: serde_json::Map<String, serde_json::Value> = entries.into_iter().collect();
    let mut header = if layout.pretty {
        serde_json::to_vec_pretty(&object)
    } else {
        serde_json::to_vec(&object)
    }
    .expect("json");
    while header.len() % layout.pad_to.max(1) != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    if let Err(e) = safetensors::SafeTensors::deserialize(&out) {
        panic!("hand-built safetensors file is invalid: {e:?}");
    }
    out
}

/// A seeded permutation of `0..n`.
pub fn permutation(rng: &mut SplitMix, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}
