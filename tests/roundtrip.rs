//! Lossless round trips through the library: every fixture, every pattern of the 16-bit floats through the
//! float_split codec, generated files of every whole-byte dtype (proptest), and thread-count independence.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use neuzip::codec::freq::FreqTable;
use neuzip::codec::split::{encode_block, Coding, Field, SplitDecoder, SplitParams};
use neuzip::convert::{convert_file, ConvertOptions};
use neuzip::format::{BlockMode, Codec, DEFAULT_FLOAT_BLOCK_ELEMENTS, DEFAULT_STORED_BLOCK_BYTES};
use neuzip::{DecodeOptions, Dtype, NzError, NztFile};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};

use common::*;

/// The original tensors of a safetensors file, by name: (dtype name, shape, bytes).
fn original_tensors(bytes: &[u8]) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (
                    format!("{:?}", view.dtype()),
                    view.shape().iter().map(|&d| d as u64).collect(),
                    view.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// Checks everything a reader can give back against the original safetensors bytes: the whole file, each
/// tensor, and each block on its own. Returns the block modes seen.
fn check_against_original(file: &NztFile, original: &[u8], what: &str) -> BTreeSet<&'static str> {
    let restored = decompress(file).unwrap_or_else(|e| panic!("{what}: write_safetensors: {e}"));
    if restored != original {
        let first = restored
            .iter()
            .zip(original)
            .position(|(a, b)| a != b)
            .unwrap_or(restored.len().min(original.len()));
        panic!(
            "{what}: restored file differs from the original (lengths {} vs {}, first difference at byte {first})",
            restored.len(),
            original.len()
        );
    }

    let want = original_tensors(original);
    let names: BTreeSet<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        want.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        "{what}: tensor names"
    );
    let mut modes = BTreeSet::new();
    for (i, t) in file.tensors().iter().enumerate() {
        let (dtype, shape, data) = &want[&t.name];
        assert_eq!(t.dtype.name(), dtype, "{what}: dtype of {}", t.name);
        assert_eq!(&t.shape, shape, "{what}: shape of {}", t.name);
        assert_eq!(
            t.byte_len() as usize,
            data.len(),
            "{what}: byte_len of {}",
            t.name
        );

        let decoded = file
            .decode_tensor(&t.name)
            .unwrap_or_else(|e| panic!("{what}: decode_tensor({}): {e}", t.name));
        assert!(decoded == *data, "{what}: tensor {} differs", t.name);

        // Blocks tile the tensor, in order, and each decodes alone to its slice of the original.
        let mut next = 0;
        for k in 0..t.blocks.len() {
            let range = t.block_range(k);
            assert_eq!(range.start, next, "{what}: {} block {k} start", t.name);
            assert!(!range.is_empty(), "{what}: {} block {k} is empty", t.name);
            next = range.end;
            let mut buf = vec![0xa5u8; range.len()];
            file.decode_block_into(i, k, &mut buf)
                .unwrap_or_else(|e| panic!("{what}: decode_block_into({}, {k}): {e}", t.name));
            assert!(
                buf == data[range.clone()],
                "{what}: {} block {k} ({}) differs",
                t.name,
                t.blocks[k].mode.name()
            );
            modes.insert(t.blocks[k].mode.name());
        }
        assert_eq!(
            next,
            data.len(),
            "{what}: blocks of {} cover {next} bytes",
            t.name
        );
    }
    modes
}

fn convert_fixture(name: &str, opts: &ConvertOptions) -> (Vec<u8>, NztFile, tempfile::TempDir) {
    let src = fixture(name);
    let original = std::fs::read(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("out.nzt");
    let summary = convert_file(&src, &dst, opts, &no_progress)
        .unwrap_or_else(|e| panic!("converting {name}: {e}"));
    assert_eq!(summary.input_bytes, original.len() as u64, "{name}");
    assert_eq!(
        summary.output_bytes,
        std::fs::metadata(&dst).expect("output").len(),
        "{name}: summary.output_bytes"
    );
    let file = NztFile::open(&dst).unwrap_or_else(|e| panic!("opening {name} converted: {e}"));
    assert_eq!(summary.tensors, file.tensors().len(), "{name}");
    (original, file, dir)
}

#[test]
fn fixture_list_is_complete() {
    // A new fixture must be added to ROUND_TRIP_FIXTURES (or INVALID_FIXTURES) to be tested.
    let mut listed: BTreeSet<String> = ROUND_TRIP_FIXTURES.iter().map(|s| s.to_string()).collect();
    listed.extend(INVALID_FIXTURES.iter().map(|s| s.to_string()));
    for name in dir_entries(&fixtures_dir()) {
        if name.ends_with(".safetensors") || name.ends_with(".bin") {
            assert!(
                listed.contains(&name),
                "fixture {name} is not covered by any test"
            );
        }
    }
}

#[test]
fn every_fixture_round_trips_byte_exact() {
    let mut modes = BTreeSet::new();
    for name in ROUND_TRIP_FIXTURES {
        let (original, file, _dir) = convert_fixture(name, &ConvertOptions::default());
        modes.extend(check_against_original(&file, &original, name));
        // The same again without checksum verification.
        let unchecked = file.with_options(DecodeOptions {
            verify_checksums: false,
        });
        assert!(
            decompress(&unchecked).expect("decompress") == original,
            "{name} without checksums"
        );
    }
    // The fixtures between them exercise raw, zstd and split blocks.
    for mode in ["raw", "zstd", "split"] {
        assert!(
            modes.contains(mode),
            "no fixture produced a {mode} block: {modes:?}"
        );
    }
}

#[test]
fn every_fixture_round_trips_with_small_blocks() {
    // Many blocks per tensor, last blocks of every length, and block-local tables.
    let opts = ConvertOptions {
        float_block_elements: 1000,
        stored_block_bytes: 777,
        ..ConvertOptions::default()
    };
    for name in ROUND_TRIP_FIXTURES {
        let (original, file, _dir) = convert_fixture(name, &opts);
        check_against_original(&file, &original, &format!("{name} (small blocks)"));
    }
}

#[test]
fn reader_rejects_bad_indices_and_buffer_sizes() {
    let (_, file, _dir) =
        convert_fixture("minilm_slice_bf16.safetensors", &ConvertOptions::default());
    let t = &file.tensors()[0];
    let n = t.byte_len() as usize;
    let mut buf = vec![0u8; n + 1];
    assert!(matches!(
        file.decode_tensor_into(0, &mut buf),
        Err(NzError::BufferSize { .. })
    ));
    assert!(matches!(
        file.decode_tensor_into(0, &mut buf[..n - 1]),
        Err(NzError::BufferSize { .. })
    ));
    let block = t.block_range(0).len();
    assert!(matches!(
        file.decode_block_into(0, 0, &mut buf[..block - 1]),
        Err(NzError::BufferSize { .. })
    ));
    assert!(file
        .decode_block_into(0, t.blocks.len(), &mut buf[..block])
        .is_err());
    let count = file.tensors().len();
    assert!(matches!(
        file.decode_tensor_into(count, &mut buf),
        Err(NzError::NoSuchTensor { .. })
    ));
    assert!(matches!(
        file.decode_block_into(count, 0, &mut buf),
        Err(NzError::NoSuchTensor { .. })
    ));
    assert!(matches!(
        file.decode_tensor("no such tensor"),
        Err(NzError::NoSuchTensor { .. })
    ));
}

/// The u16 bit patterns of a 16-bit tensor.
fn patterns(data: &[u8]) -> Vec<u16> {
    data.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

#[test]
fn all_patterns_fixtures_hold_and_round_trip_every_16_bit_pattern() {
    for (name, dtype) in [
        ("bf16_all_patterns.safetensors", "BF16"),
        ("f16_all_patterns.safetensors", "F16"),
    ] {
        let original = std::fs::read(fixture(name)).expect("fixture");
        let tensors = original_tensors(&original);
        assert_eq!(tensors.len(), 2, "{name}");
        for (tname, (d, shape, data)) in &tensors {
            assert_eq!(d, dtype, "{name}/{tname}");
            let set: BTreeSet<u16> = patterns(data).into_iter().collect();
            assert_eq!(
                set.len(),
                65536,
                "{name}/{tname}: shape {shape:?} lacks some patterns"
            );
        }
        let in_order: Vec<u16> = (0..=u16::MAX).collect();
        assert_eq!(
            patterns(&tensors["all_patterns"].2),
            in_order,
            "{name}: all_patterns order"
        );

        let (original, file, _dir) = convert_fixture(name, &ConvertOptions::default());
        check_against_original(&file, &original, name);
        for t in file.tensors() {
            eprintln!(
                "{name}/{}: codec {}, block modes {:?}",
                t.name,
                t.codec.name(),
                t.blocks.iter().map(|b| b.mode.name()).collect::<Vec<_>>()
            );
        }
    }
}

/// Every 16-bit pattern through float_split, at file level: the 65,536 patterns interleaved with weight-like
/// values (1 in 8), so the planner picks float_split and every block is a split block. The uniform
/// all-patterns fixtures themselves are incompressible, so the encoder rightly stores them; this test is what
/// proves the codec, not a fallback, carries every pattern.
#[test]
fn every_16_bit_pattern_round_trips_through_float_split_blocks() {
    for (seed, dtype) in [(1u64, Dtype::BF16), (2, Dtype::F16)] {
        let mut rng = SplitMix::new(seed);
        let mut order: Vec<u16> = (0..=u16::MAX).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut data = Vec::with_capacity(65536 * 8 * 2);
        for &p in &order {
            data.extend_from_slice(&p.to_le_bytes());
            data.extend(gaussian_tensor(&mut rng, dtype, 7, 0.02));
        }
        let n = data.len() / 2;
        let input = safetensors_bytes(
            &[TestTensor {
                name: "mixed".into(),
                dtype,
                shape: vec![n / 64, 64],
                data,
            }],
            None,
        );
        let opts = ConvertOptions {
            float_block_elements: 1 << 15,
            ..ConvertOptions::default()
        };
        let file = open_bytes(convert_bytes(&input, &opts)).expect("open");
        let t = &file.tensors()[0];
        assert_eq!(t.codec, Codec::FloatSplit, "{dtype}: codec");
        assert_eq!(t.blocks.len(), 16, "{dtype}: blocks");
        for (k, b) in t.blocks.iter().enumerate() {
            assert!(
                matches!(b.mode, BlockMode::Split | BlockMode::SplitLocal),
                "{dtype}: block {k} is {} (not a float_split block)",
                b.mode.name()
            );
        }
        let modes = check_against_original(&file, &input, &format!("{dtype} interleaved patterns"));
        eprintln!("{dtype}: every pattern in float_split blocks, modes {modes:?}");
    }
}

/// Every 16-bit pattern through the split encoder and decoder directly, for layouts with wide and narrow coded
/// fields, several coded fields, and none.
#[test]
fn every_16_bit_pattern_round_trips_through_the_split_codec() {
    let mut rng = SplitMix::new(3);
    let mut all: Vec<u16> = (0..=u16::MAX).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let block: Vec<u8> = all.iter().flat_map(|p| p.to_le_bytes()).collect();
    let layouts: &[&[(u32, Coding)]] = &[
        &[(9, Coding::Rans), (7, Coding::Raw)],
        &[(6, Coding::Rans), (10, Coding::Raw)],
        &[(12, Coding::Rans), (4, Coding::Raw)],
        &[(1, Coding::Rans), (8, Coding::Rans), (7, Coding::Raw)],
        &[(4, Coding::Rans), (12, Coding::Rans)],
        &[(3, Coding::Raw), (10, Coding::Rans), (3, Coding::Raw)],
        &[(16, Coding::Raw)],
    ];
    for dtype in [Dtype::BF16, Dtype::F16] {
        for layout in layouts {
            let fields: Vec<Field> = layout
                .iter()
                .map(|&(width, coding)| Field { width, coding })
                .collect();
            // One table per coded field, from that field's histogram over all patterns.
            let mut shift = 16;
            let mut tables = Vec::new();
            for f in &fields {
                shift -= f.width;
                if f.coding == Coding::Rans {
                    let mut counts = vec![0u64; 1 << f.width];
                    for &p in &all {
                        counts[((p >> shift) as usize) & ((1 << f.width) - 1)] += 1;
                    }
                    tables.push(FreqTable::from_counts(&counts, f.width, 14).expect("table"));
                }
            }
            let params = SplitParams { fields, tables };
            let reparsed = SplitParams::parse(&params.to_bytes(), dtype).expect("params parse");
            assert_eq!(reparsed, params, "{dtype} {layout:?}: params bytes");
            let payload = encode_block(&params, dtype, &block);
            let mut out = vec![0u8; block.len()];
            SplitDecoder::new(reparsed, dtype)
                .decode_block(&payload, &mut out)
                .unwrap_or_else(|e| panic!("{dtype} {layout:?}: {e:?}"));
            assert!(out == block, "{dtype} {layout:?}: decoded patterns differ");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Generated files (proptest).

/// Every dtype with a whole number of bytes per element.
const WHOLE_BYTE_DTYPES: &[Dtype] = &[
    Dtype::BOOL,
    Dtype::U8,
    Dtype::I8,
    Dtype::I16,
    Dtype::U16,
    Dtype::I32,
    Dtype::U32,
    Dtype::I64,
    Dtype::U64,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F32,
    Dtype::F64,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
    Dtype::F8_E8M0,
    Dtype::C64,
];

#[test]
fn whole_byte_dtype_list_is_complete() {
    let listed: BTreeSet<Dtype> = WHOLE_BYTE_DTYPES.iter().copied().collect();
    let all: BTreeSet<Dtype> = Dtype::ALL
        .iter()
        .copied()
        .filter(|d| d.byte_width().is_some())
        .collect();
    assert_eq!(listed, all);
}

/// What a generated tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Content {
    /// Uniformly random bit patterns (NaNs, infinities and subnormals included).
    RandomBits,
    /// Weight-like values: N(0, std) rounded to the dtype (small integers for integer types).
    Realistic,
    /// One random element repeated.
    Constant,
    /// A few distinct random elements.
    FewValues,
    /// Realistic values with 1% random bit patterns.
    Outliers,
    /// Realistic values whose scale changes by 2^12 from the first half to the second.
    Drift,
}

const CONTENTS: &[Content] = &[
    Content::RandomBits,
    Content::Realistic,
    Content::Constant,
    Content::FewValues,
    Content::Outliers,
    Content::Drift,
];

/// A tensor's shape, possibly relative to the block size the case uses.
#[derive(Clone, Debug)]
enum ShapeSpec {
    Fixed(Vec<usize>),
    /// `k` blocks plus `delta` elements, with an optional leading dimension of 1.
    NearBlocks {
        k: usize,
        delta: i64,
        leading_one: bool,
    },
}

#[derive(Clone, Debug)]
struct TensorSpec {
    dtype: Dtype,
    shape: ShapeSpec,
    content: Content,
    std_exp: i32,
    seed: u64,
}

#[derive(Clone, Debug)]
struct FileSpec {
    tensors: Vec<TensorSpec>,
    name_prefix: String,
    /// Unique keys, sorted.
    metadata: Option<Vec<(String, String)>>,
    /// Written by `safetensors::serialize` (then only the first metadata entry is kept, so that the
    /// bytes do not depend on a HashMap's order), or by hand with a seeded `Layout`.
    canonical: bool,
    layout_seed: u64,
    pretty: bool,
    pad_to: usize,
    float_block_elements: u32,
    stored_block_bytes: u32,
    zstd_level: i32,
}

fn shape_strategy() -> impl Strategy<Value = ShapeSpec> {
    let fixed = |v: Vec<usize>| Just(ShapeSpec::Fixed(v));
    prop_oneof![
        1 => fixed(vec![]),
        1 => fixed(vec![0]),
        1 => fixed(vec![3, 0]),
        1 => fixed(vec![0, 5, 7]),
        1 => fixed(vec![1]),
        1 => fixed(vec![1, 1, 1, 1]),
        4 => prop::collection::vec(1usize..9, 1..5).prop_map(ShapeSpec::Fixed),
        4 => (1usize..5000).prop_map(|n| ShapeSpec::Fixed(vec![n])),
        6 => (1usize..3, -1i64..=1, any::<bool>())
            .prop_map(|(k, delta, leading_one)| ShapeSpec::NearBlocks { k, delta, leading_one }),
    ]
}

fn tensor_strategy() -> impl Strategy<Value = TensorSpec> {
    (
        prop::sample::select(WHOLE_BYTE_DTYPES),
        shape_strategy(),
        prop::sample::select(CONTENTS),
        -12i32..4,
        any::<u64>(),
    )
        .prop_map(|(dtype, shape, content, std_exp, seed)| TensorSpec {
            dtype,
            shape,
            content,
            std_exp,
            seed,
        })
}

fn file_strategy() -> impl Strategy<Value = FileSpec> {
    (
        prop::collection::vec(tensor_strategy(), 1..6),
        "[a-zA-Z0-9_.µß-]{0,12}",
        proptest::option::of(
            prop::collection::btree_map("[a-z_]{1,8}", "\\PC{0,16}", 0..4)
                .prop_map(|m| m.into_iter().collect::<Vec<_>>()),
        ),
        (
            any::<bool>(),
            any::<u64>(),
            any::<bool>(),
            prop::sample::select(vec![1usize, 8]),
        ),
        prop::sample::select(vec![7u32, 64, 1000, DEFAULT_FLOAT_BLOCK_ELEMENTS]),
        prop::sample::select(vec![100u32, 4096, DEFAULT_STORED_BLOCK_BYTES]),
        prop::sample::select(vec![-1i32, 1, 3]),
    )
        .prop_map(
            |(
                tensors,
                name_prefix,
                metadata,
                (canonical, layout_seed, pretty, pad_to),
                float_block_elements,
                stored_block_bytes,
                zstd_level,
            )| FileSpec {
                tensors,
                name_prefix,
                metadata,
                canonical,
                layout_seed,
                pretty,
                pad_to,
                float_block_elements,
                stored_block_bytes,
                zstd_level,
            },
        )
}

/// The element count a block holds for `dtype` under these options.
fn block_elements(spec: &FileSpec, dtype: Dtype) -> usize {
    let width = dtype.byte_width().expect("whole byte");
    if dtype.is_splittable_float() {
        spec.float_block_elements as usize
    } else {
        (spec.stored_block_bytes as usize / width).max(1)
    }
}

fn resolve_shape(spec: &FileSpec, t: &TensorSpec) -> Vec<usize> {
    match &t.shape {
        ShapeSpec::Fixed(v) => v.clone(),
        ShapeSpec::NearBlocks {
            k,
            delta,
            leading_one,
        } => {
            // Keep the block count modest when blocks are tiny.
            let b = block_elements(spec, t.dtype);
            let k = if b < 64 { k * 50 } else { *k };
            let n = ((k * b) as i64 + delta).max(1) as usize;
            if *leading_one {
                vec![1, n]
            } else {
                vec![n]
            }
        }
    }
}

/// One element of weight-like data for any whole-byte dtype.
fn realistic_element(rng: &mut SplitMix, dtype: Dtype, std: f64) -> Vec<u8> {
    let g = rng.gaussian();
    let int = (g * 20.0).round() as i64;
    match dtype {
        Dtype::BOOL => vec![(g > 0.5) as u8],
        Dtype::U8 => vec![int.unsigned_abs().min(255) as u8],
        Dtype::I8 => vec![int.clamp(-128, 127) as i8 as u8],
        Dtype::I16 => (int as i16).to_le_bytes().to_vec(),
        Dtype::U16 => (int.unsigned_abs() as u16).to_le_bytes().to_vec(),
        Dtype::I32 => (int as i32 * 1000).to_le_bytes().to_vec(),
        Dtype::U32 => (int.unsigned_abs() as u32).to_le_bytes().to_vec(),
        Dtype::I64 => (int * 100_000).to_le_bytes().to_vec(),
        Dtype::U64 => int.unsigned_abs().to_le_bytes().to_vec(),
        _ => float_bytes(dtype, g * std),
    }
}

fn generate_data(t: &TensorSpec, n: usize) -> Vec<u8> {
    let width = t.dtype.byte_width().expect("whole byte");
    let mut rng = SplitMix::new(t.seed);
    let std = 2f64.powi(t.std_exp);
    let mut out = Vec::with_capacity(n * width);
    match t.content {
        Content::RandomBits => out = rng.bytes(n * width),
        Content::Realistic => {
            for _ in 0..n {
                out.extend(realistic_element(&mut rng, t.dtype, std));
            }
        }
        Content::Constant => {
            let e = rng.bytes(width);
            for _ in 0..n {
                out.extend_from_slice(&e);
            }
        }
        Content::FewValues => {
            let values: Vec<Vec<u8>> = (0..3).map(|_| rng.bytes(width)).collect();
            for _ in 0..n {
                out.extend_from_slice(&values[rng.below(3) as usize]);
            }
        }
        Content::Outliers => {
            for _ in 0..n {
                if rng.below(100) == 0 {
                    out.extend(rng.bytes(width));
                } else {
                    out.extend(realistic_element(&mut rng, t.dtype, std));
                }
            }
        }
        Content::Drift => {
            for i in 0..n {
                let s = if i < n / 2 { std } else { std * 4096.0 };
                out.extend(realistic_element(&mut rng, t.dtype, s));
            }
        }
    }
    out
}

fn build_file(spec: &FileSpec) -> Vec<u8> {
    let tensors: Vec<TestTensor> = spec
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let shape = resolve_shape(spec, t);
            let n: usize = shape.iter().product();
            TestTensor {
                name: format!("{}{i}.{}", spec.name_prefix, t.dtype.name().to_lowercase()),
                dtype: t.dtype,
                shape,
                data: generate_data(t, n),
            }
        })
        .collect();
    if spec.canonical {
        let first = spec
            .metadata
            .as_ref()
            .map(|m| m.iter().take(1).cloned().collect::<HashMap<_, _>>());
        return safetensors_bytes(&tensors, first);
    }
    let mut rng = SplitMix::new(spec.layout_seed);
    let layout = Layout {
        data_order: permutation(&mut rng, tensors.len()),
        json_order: permutation(&mut rng, tensors.len()),
        metadata_position: rng.below(tensors.len() as u64 + 1) as usize,
        pretty: spec.pretty,
        pad_to: spec.pad_to,
    };
    safetensors_bytes_with_layout(&tensors, spec.metadata.as_deref(), &layout)
}

#[derive(Default)]
struct Coverage {
    cases: usize,
    dtypes: BTreeSet<Dtype>,
    contents: BTreeSet<Content>,
    modes: BTreeSet<&'static str>,
    codecs: BTreeSet<&'static str>,
    empty_tensors: usize,
    scalars: usize,
    with_metadata: usize,
    hand_built: usize,
    tensors: usize,
    input_bytes: usize,
}

#[test]
fn generated_files_round_trip_byte_exact() {
    let config = ProptestConfig {
        cases: 48,
        rng_seed: RngSeed::Fixed(0x6e65_757a_6970),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let coverage = RefCell::new(Coverage::default());
    let mut runner = TestRunner::new(config);
    let result = runner.run(&file_strategy(), |spec| {
        let input = build_file(&spec);
        let opts = ConvertOptions {
            float_block_elements: spec.float_block_elements,
            stored_block_bytes: spec.stored_block_bytes,
            zstd_level: spec.zstd_level,
            ..ConvertOptions::default()
        };
        let file = open_bytes(convert_bytes(&input, &opts))
            .map_err(|e| TestCaseError::fail(format!("open: {e}")))?;
        let modes = check_against_original(&file, &input, "generated file");
        let mut c = coverage.borrow_mut();
        c.cases += 1;
        c.modes.extend(modes);
        c.input_bytes += input.len();
        c.with_metadata += spec.metadata.is_some() as usize;
        c.hand_built += !spec.canonical as usize;
        for t in file.tensors() {
            c.codecs.insert(t.codec.name());
            c.tensors += 1;
            c.empty_tensors += (t.elements() == Some(0)) as usize;
            c.scalars += t.shape.is_empty() as usize;
        }
        c.dtypes.extend(spec.tensors.iter().map(|t| t.dtype));
        c.contents.extend(spec.tensors.iter().map(|t| t.content));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = coverage.into_inner();
    eprintln!(
        "generated: {} files ({} hand-built layouts), {} tensors, {} input bytes, {} empty, {} scalars, {} with metadata; dtypes {:?}; codecs {:?}; modes {:?}",
        c.cases, c.hand_built, c.tensors, c.input_bytes, c.empty_tensors, c.scalars, c.with_metadata, c.dtypes, c.codecs, c.modes
    );
    // The generator must keep reaching what it is meant to test.
    assert_eq!(c.cases, 48);
    assert!(c.dtypes.len() >= 15, "dtypes covered: {:?}", c.dtypes);
    assert_eq!(
        c.contents.len(),
        CONTENTS.len(),
        "contents covered: {:?}",
        c.contents
    );
    assert!(c.codecs.contains("float_split") && c.codecs.contains("stored"));
    for mode in ["raw", "zstd", "split"] {
        assert!(
            c.modes.contains(mode),
            "no {mode} block generated: {:?}",
            c.modes
        );
    }
    assert!(c.empty_tensors > 0 && c.scalars > 0 && c.with_metadata > 0);
    assert!(c.hand_built > 0 && c.hand_built < c.cases);
}

/// Every whole-byte dtype with every kind of content, near block boundaries, deterministically (proptest
/// samples; this sweeps).
#[test]
fn every_dtype_and_content_round_trips() {
    let spec_for = |dtype, content, shape, seed| TensorSpec {
        dtype,
        shape,
        content,
        std_exp: -6,
        seed,
    };
    let mut seed = 100;
    let mut modes = BTreeSet::new();
    for &dtype in WHOLE_BYTE_DTYPES {
        let mut tensors = Vec::new();
        for &content in CONTENTS {
            seed += 1;
            tensors.push(spec_for(
                dtype,
                content,
                ShapeSpec::NearBlocks {
                    k: 3,
                    delta: (seed % 3) as i64 - 1,
                    leading_one: false,
                },
                seed,
            ));
        }
        tensors.push(spec_for(
            dtype,
            Content::RandomBits,
            ShapeSpec::Fixed(vec![]),
            7,
        ));
        tensors.push(spec_for(
            dtype,
            Content::RandomBits,
            ShapeSpec::Fixed(vec![2, 0]),
            8,
        ));
        tensors.push(spec_for(
            dtype,
            Content::Realistic,
            ShapeSpec::Fixed(vec![1]),
            9,
        ));
        let spec = FileSpec {
            tensors,
            name_prefix: "t".into(),
            metadata: Some(vec![("format".to_string(), "pt".to_string())]),
            canonical: true,
            layout_seed: 0,
            pretty: false,
            pad_to: 8,
            float_block_elements: 256,
            stored_block_bytes: 512,
            zstd_level: 3,
        };
        let input = build_file(&spec);
        let opts = ConvertOptions {
            float_block_elements: spec.float_block_elements,
            stored_block_bytes: spec.stored_block_bytes,
            ..ConvertOptions::default()
        };
        let file = open_bytes(convert_bytes(&input, &opts)).expect("open");
        modes.extend(check_against_original(&file, &input, dtype.name()));
        for t in file.tensors() {
            if !dtype.is_splittable_float() {
                assert_eq!(t.codec, Codec::Stored, "{}: {dtype} must be stored", t.name);
            }
        }
    }
    eprintln!("block modes over every dtype: {modes:?}");
}

/// Blocks whose statistics differ from the tensor's carry their own tables (split_local), and decode.
#[test]
fn blocks_with_their_own_tables_round_trip() {
    let mut rng = SplitMix::new(21);
    let block = 4096;
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let mut data = Vec::new();
        // Each block has a different scale, so one tensor-wide table fits none of them well.
        for scale_exp in [-14, -9, -4, 0, 3, -12, -1] {
            data.extend(gaussian_tensor(
                &mut rng,
                dtype,
                block,
                2f64.powi(scale_exp),
            ));
        }
        let n = data.len() / dtype.byte_width().expect("width");
        let input = safetensors_bytes(
            &[TestTensor {
                name: "scales".into(),
                dtype,
                shape: vec![n],
                data,
            }],
            None,
        );
        let opts = ConvertOptions {
            float_block_elements: block as u32,
            ..ConvertOptions::default()
        };
        let file = open_bytes(convert_bytes(&input, &opts)).expect("open");
        assert_eq!(file.tensors()[0].codec, Codec::FloatSplit, "{dtype}");
        let modes = check_against_original(&file, &input, &format!("{dtype} scales"));
        assert!(
            modes.contains("split_local"),
            "{dtype}: no block used its own tables: {modes:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Determinism.

fn convert_in_pool(threads: usize, input: &[u8], opts: &ConvertOptions) -> Vec<u8> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(|| convert_bytes(input, opts))
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let mut rng = SplitMix::new(11);
    let mut drift = gaussian_tensor(&mut rng, Dtype::BF16, 20_000, 0.001);
    drift.extend(gaussian_tensor(&mut rng, Dtype::BF16, 20_000, 4.0));
    let generated = safetensors_bytes(
        &[
            TestTensor {
                name: "drift".into(),
                dtype: Dtype::BF16,
                shape: vec![40_000],
                data: drift,
            },
            TestTensor {
                name: "ids".into(),
                dtype: Dtype::I64,
                shape: vec![3000],
                data: (0..3000i64).flat_map(|i| (i % 77).to_le_bytes()).collect(),
            },
            TestTensor {
                name: "noise".into(),
                dtype: Dtype::F32,
                shape: vec![5000],
                data: rng.bytes(20_000),
            },
        ],
        None,
    );
    let small_blocks = ConvertOptions {
        float_block_elements: 64,
        stored_block_bytes: 1000,
        ..ConvertOptions::default()
    };
    let inputs = [
        (
            "mixed_dtypes",
            std::fs::read(fixture("mixed_dtypes.safetensors")).expect("fixture"),
            ConvertOptions::default(),
        ),
        (
            "minilm_slice_bf16",
            std::fs::read(fixture("minilm_slice_bf16.safetensors")).expect("fixture"),
            small_blocks.clone(),
        ),
        ("generated", generated, small_blocks),
    ];
    for (name, input, opts) in &inputs {
        let one = convert_in_pool(1, input, opts);
        for threads in [2, 5] {
            let other = convert_in_pool(threads, input, opts);
            assert!(
                one == other,
                "{name}: 1 thread and {threads} threads give different files"
            );
        }
        // And the output still decodes to the input.
        assert!(
            decompress(&open_bytes(one).expect("open")).expect("decode") == *input,
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Edge files.

#[test]
fn files_without_tensors_round_trip() {
    let no_layout = Layout {
        data_order: vec![],
        json_order: vec![],
        metadata_position: 0,
        pretty: false,
        pad_to: 1,
    };
    let meta = [("format".to_string(), "pt".to_string())];
    let cases = [
        ("{}", safetensors_bytes(&[], None)),
        (
            "{} unpadded",
            safetensors_bytes_with_layout(&[], None, &no_layout),
        ),
        (
            "metadata only",
            safetensors_bytes(&[], Some(meta.iter().cloned().collect())),
        ),
        (
            "metadata only, pretty",
            safetensors_bytes_with_layout(
                &[],
                Some(&meta),
                &Layout {
                    pretty: true,
                    ..no_layout.clone()
                },
            ),
        ),
    ];
    for (what, input) in cases {
        let file = open_bytes(convert_bytes(&input, &ConvertOptions::default()))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(file.tensors().is_empty(), "{what}");
        check_against_original(&file, &input, what);
    }
}

/// Sub-byte dtypes (F4, F6) are stored as bytes; a whole number of bytes round-trips.
#[test]
fn sub_byte_dtypes_round_trip() {
    let mut rng = SplitMix::new(5);
    let tensors = vec![
        TestTensor {
            name: "f4".into(),
            dtype: Dtype::F4,
            shape: vec![6, 2],
            data: rng.bytes(6),
        },
        TestTensor {
            name: "f6a".into(),
            dtype: Dtype::F6_E2M3,
            shape: vec![8],
            data: rng.bytes(6),
        },
        TestTensor {
            name: "f6b".into(),
            dtype: Dtype::F6_E3M2,
            shape: vec![4, 1000],
            data: rng.bytes(3000),
        },
    ];
    let input = safetensors_bytes(&tensors, None);
    let opts = ConvertOptions {
        stored_block_bytes: 1000,
        ..ConvertOptions::default()
    };
    let file = open_bytes(convert_bytes(&input, &opts)).expect("open");
    check_against_original(&file, &input, "sub-byte dtypes");
}
