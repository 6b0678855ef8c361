//! Format test vectors (format-spec/nzt.md, "Test vectors"): the reference encoder must reproduce every
//! golden `.nzt` byte for byte, and decoding it must give back its source exactly (lossless vectors) or the
//! golden decoded file exactly (the lossy vector).
//! Regenerate after an intended format change with `NEUZIP_BLESS=1 cargo test --release --test golden`.

use std::path::PathBuf;

use neuzip::convert::{convert_file, ConvertOptions};
use neuzip::format::BlockMode;
use neuzip::mmap::Bytes;
use neuzip::precision::{CodebookChoice, CodebookMode, CodebookSettings, LossySettings, Precision};
use neuzip::NztFile;

const VECTORS: &[&str] = &["tiny", "modes"];
const BLOCK_ELEMENTS: u32 = 256;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden")
}

/// The lossy vector: `modes.safetensors` with every float tensor at K = 3 (`layer.half` at K = 0) and
/// normalization groups of 64: `neuzip convert --block-elements 256 --norm-block 64 --tensor-bits '*=3'
/// --tensor-bits 'layer.half=0'`.
const LOSSY_SOURCE: &str = "modes";
const LOSSY_NAME: &str = "lossy";

fn lossy_options() -> ConvertOptions {
    let mut lossy = LossySettings {
        norm_block: 64,
        ..LossySettings::default()
    };
    for rule in ["*=3", "layer.half=0"] {
        lossy.rules.push_parsed(rule, Precision::parse).unwrap();
    }
    ConvertOptions {
        float_block_elements: BLOCK_ELEMENTS,
        lossy,
        ..ConvertOptions::default()
    }
}

/// The codebook vector (1.2): `modes.safetensors` with 3-bit codebooks, groups of 64 and 2 row clusters, and
/// `layer.full` (1-D) quantized at 4 bits as one row: `neuzip convert --block-elements 256 --codebook-bits 3
/// --fixed-rate --group-size 64 --row-clusters 2 --tensor-bits 'layer.full=4'`. `layer.noise` (NaNs among its random bits)
/// and the other tensors stay lossless.
const CODEBOOK_NAME: &str = "codebook";

fn codebook_options() -> ConvertOptions {
    let mut codebook = CodebookSettings {
        default_bits: Some(3.0),
        mode: CodebookMode::FixedRate,
        group_size: 64,
        row_clusters: 2,
        ..CodebookSettings::default()
    };
    codebook
        .rules
        .push_parsed("layer.full=4", CodebookChoice::parse)
        .unwrap();
    ConvertOptions {
        float_block_elements: BLOCK_ELEMENTS,
        codebook,
        ..ConvertOptions::default()
    }
}

fn encode(name: &str) -> Vec<u8> {
    let opts = ConvertOptions {
        float_block_elements: BLOCK_ELEMENTS,
        ..ConvertOptions::default()
    };
    encode_with(name, name, &opts)
}

fn encode_with(source: &str, name: &str, opts: &ConvertOptions) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("{name}.nzt"));
    convert_file(
        &golden_dir().join(format!("{source}.safetensors")),
        &out,
        opts,
        &|_| {},
    )
    .unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn encoder_reproduces_golden_files() {
    for name in VECTORS {
        let encoded = encode(name);
        let golden_path = golden_dir().join(format!("{name}.nzt"));
        if std::env::var_os("NEUZIP_BLESS").is_some() {
            std::fs::write(&golden_path, &encoded).unwrap();
        }
        let golden = std::fs::read(&golden_path).unwrap();
        println!(
            "{name}.nzt: {} bytes, xxh3-64 {:016x}",
            golden.len(),
            neuzip::format::checksum(&golden)
        );
        assert!(
            encoded == golden,
            "{name}: encoder output differs from the golden file"
        );
    }
}

#[test]
fn golden_files_decode_to_their_sources() {
    for name in VECTORS {
        let golden = std::fs::read(golden_dir().join(format!("{name}.nzt"))).unwrap();
        let source = std::fs::read(golden_dir().join(format!("{name}.safetensors"))).unwrap();
        let file = NztFile::from_bytes(Bytes::Owned(golden)).unwrap();
        let mut restored = Vec::new();
        file.write_safetensors(&mut restored, |_| {}).unwrap();
        assert!(
            restored == source,
            "{name}: decoded file differs from its source"
        );
    }
}

#[test]
fn modes_vector_covers_every_block_mode() {
    let golden = std::fs::read(golden_dir().join("modes.nzt")).unwrap();
    let file = NztFile::from_bytes(Bytes::Owned(golden)).unwrap();
    let modes: Vec<BlockMode> = file
        .tensors()
        .iter()
        .flat_map(|t| t.blocks.iter().map(|b| b.mode))
        .collect();
    for mode in [
        BlockMode::Raw,
        BlockMode::Zstd,
        BlockMode::Split,
        BlockMode::SplitLocal,
    ] {
        assert!(modes.contains(&mode), "no {mode:?} block in modes.nzt");
    }
}

#[test]
fn encoder_reproduces_the_lossy_vector_and_it_decodes_to_its_golden_output() {
    let encoded = encode_with(LOSSY_SOURCE, LOSSY_NAME, &lossy_options());
    let golden_path = golden_dir().join(format!("{LOSSY_NAME}.nzt"));
    let decoded_path = golden_dir().join(format!("{LOSSY_NAME}.decoded.safetensors"));
    let file = NztFile::from_bytes(Bytes::Owned(encoded.clone())).unwrap();
    let mut decoded = Vec::new();
    file.write_safetensors(&mut decoded, |_| {}).unwrap();
    if std::env::var_os("NEUZIP_BLESS").is_some() {
        std::fs::write(&golden_path, &encoded).unwrap();
        std::fs::write(&decoded_path, &decoded).unwrap();
    }
    let golden = std::fs::read(&golden_path).unwrap();
    let golden_decoded = std::fs::read(&decoded_path).unwrap();
    for (what, bytes) in [
        ("lossy.nzt", &golden),
        ("lossy.decoded.safetensors", &golden_decoded),
    ] {
        println!(
            "{what}: {} bytes, xxh3-64 {:016x}",
            bytes.len(),
            neuzip::format::checksum(bytes)
        );
    }
    assert!(encoded == golden, "encoder output differs from lossy.nzt");
    // The golden file itself decodes to the golden output, and is a 1.1 file with lossy blocks.
    let file = NztFile::from_bytes(Bytes::Owned(golden)).unwrap();
    let mut restored = Vec::new();
    file.write_safetensors(&mut restored, |_| {}).unwrap();
    assert!(
        restored == golden_decoded,
        "lossy.nzt does not decode to lossy.decoded.safetensors"
    );
    assert_eq!(file.header().version_minor, 1);
    assert!(file
        .tensors()
        .iter()
        .any(|t| t.blocks.iter().any(|b| b.mode == BlockMode::Lossy)));
}

#[test]
fn encoder_reproduces_the_codebook_vector_and_it_decodes_to_its_golden_output() {
    let encoded = encode_with(LOSSY_SOURCE, CODEBOOK_NAME, &codebook_options());
    let golden_path = golden_dir().join(format!("{CODEBOOK_NAME}.nzt"));
    let decoded_path = golden_dir().join(format!("{CODEBOOK_NAME}.decoded.safetensors"));
    let file = NztFile::from_bytes(Bytes::Owned(encoded.clone())).unwrap();
    let mut decoded = Vec::new();
    file.write_safetensors(&mut decoded, |_| {}).unwrap();
    if std::env::var_os("NEUZIP_BLESS").is_some() {
        std::fs::write(&golden_path, &encoded).unwrap();
        std::fs::write(&decoded_path, &decoded).unwrap();
    }
    let golden = std::fs::read(&golden_path).unwrap();
    let golden_decoded = std::fs::read(&decoded_path).unwrap();
    for (what, bytes) in [
        ("codebook.nzt", &golden),
        ("codebook.decoded.safetensors", &golden_decoded),
    ] {
        println!(
            "{what}: {} bytes, xxh3-64 {:016x}",
            bytes.len(),
            neuzip::format::checksum(bytes)
        );
    }
    assert!(
        encoded == golden,
        "encoder output differs from codebook.nzt"
    );
    // The golden file itself decodes to the golden output, and is a 1.2 file with codebook blocks in the three
    // quantized tensors.
    let file = NztFile::from_bytes(Bytes::Owned(golden)).unwrap();
    let mut restored = Vec::new();
    file.write_safetensors(&mut restored, |_| {}).unwrap();
    assert!(
        restored == golden_decoded,
        "codebook.nzt does not decode to codebook.decoded.safetensors"
    );
    assert_eq!(file.header().version_minor, 2);
    let quantized: Vec<&str> = file
        .tensors()
        .iter()
        .filter(|t| t.blocks.iter().any(|b| b.mode == BlockMode::Codebook))
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(quantized, ["layer.full", "layer.weight", "layer.half"]);
}
