//! Format test vectors (format-spec/nzt.md, "Test vectors"): the reference encoder must reproduce every
//! golden `.nzt` byte for byte, and decoding it must give back its source exactly.
//! Regenerate after an intended format change with `NEUZIP_BLESS=1 cargo test --release --test golden`.

use std::path::PathBuf;

use neuzip::convert::{convert_file, ConvertOptions};
use neuzip::format::BlockMode;
use neuzip::mmap::Bytes;
use neuzip::NztFile;

const VECTORS: &[&str] = &["tiny", "modes"];
const BLOCK_ELEMENTS: u32 = 256;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden")
}

fn encode(name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("{name}.nzt"));
    let opts = ConvertOptions {
        float_block_elements: BLOCK_ELEMENTS,
        ..ConvertOptions::default()
    };
    convert_file(
        &golden_dir().join(format!("{name}.safetensors")),
        &out,
        &opts,
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
