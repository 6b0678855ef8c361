//! safetensors -> `.nzt`. Plan (a codec and parameters per tensor, from whole-tensor histograms), then encode
//! blocks in bounded parallel batches, write them in order to a temporary file, then the header, then rename.
//! The bytes written do not depend on the thread count.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::codec::split::{
    block_cost, block_field_counts, encode_block, encode_local_block, local_params, plan,
    FieldStats, SplitParams,
};
use crate::error::{NzError, Result};
use crate::format::header::{self, BlockEntry, TensorEntry};
use crate::format::writer::OutputFile;
use crate::format::{
    align_up, checksum, BlockMode, Codec, BLOCK_ALIGN, DEFAULT_FLOAT_BLOCK_ELEMENTS,
    DEFAULT_STORED_BLOCK_BYTES, FILE_HEADER_LEN, TENSOR_ALIGN,
};
use crate::source::{SafetensorsFile, SourceTensor};

/// Encoder settings.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Elements per block for float tensors.
    pub float_block_elements: u32,
    /// Bytes per block for stored tensors.
    pub stored_block_bytes: u32,
    /// zstd level for stored blocks and for the per-block fallback.
    pub zstd_level: i32,
    /// Replace an existing output.
    pub replace: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            float_block_elements: DEFAULT_FLOAT_BLOCK_ELEMENTS,
            stored_block_bytes: DEFAULT_STORED_BLOCK_BYTES,
            zstd_level: 3,
            replace: false,
        }
    }
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub input: PathBuf,
    pub output: PathBuf,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub tensors: usize,
}

/// A tensor's codec decision, made before any block is encoded.
struct TensorPlan {
    entry: TensorEntry,
    split: Option<SplitParams>,
}

fn plan_tensor(source: &SafetensorsFile, t: &SourceTensor, opts: &ConvertOptions) -> TensorPlan {
    let data = source.data(t);
    let elements = t.shape.iter().product::<u64>();
    let stored = |data_len: u64| {
        let block_units = opts.stored_block_bytes.max(1);
        TensorPlan {
            entry: entry(
                t,
                Codec::Stored,
                block_units,
                Vec::new(),
                data_len.div_ceil(block_units as u64),
            ),
            split: None,
        }
    };
    if !t.dtype.is_splittable_float() || elements == 0 {
        return stored(data.len() as u64);
    }
    let block_units = opts.float_block_elements.max(1);
    let blocks = elements.div_ceil(block_units as u64);
    let stats = FieldStats::gather(t.dtype, data);
    match plan(&stats, blocks) {
        Some(p) => TensorPlan {
            entry: entry(
                t,
                Codec::FloatSplit,
                block_units,
                p.params.to_bytes(),
                blocks,
            ),
            split: Some(p.params),
        },
        None => stored(data.len() as u64),
    }
}

fn entry(
    t: &SourceTensor,
    codec: Codec,
    block_units: u32,
    params: Vec<u8>,
    blocks: u64,
) -> TensorEntry {
    TensorEntry {
        name: t.name.clone(),
        dtype: t.dtype,
        codec,
        shape: t.shape.clone(),
        block_units,
        params,
        blocks: vec![
            BlockEntry {
                stored_len: 0,
                mode: BlockMode::Raw,
                checksum: 0,
                offset: 0
            };
            blocks as usize
        ],
    }
}

/// Encodes one block, keeping the smallest of split (when planned), zstd and raw.
fn encode_one(plan: &TensorPlan, raw: &[u8], zstd_level: i32) -> Result<(BlockMode, Vec<u8>)> {
    let mut best = (BlockMode::Raw, None::<Vec<u8>>);
    let mut best_len = raw.len();
    if let Some(params) = &plan.split {
        let dtype = plan.entry.dtype;
        let n = (raw.len() / dtype.byte_width().unwrap_or(1)) as u64;
        let counts = block_field_counts(&params.fields, dtype, raw);
        let (local, local_bits) = local_params(&params.fields, &counts, n);
        let payload = if local_bits < block_cost(params, &counts, n) {
            (
                BlockMode::SplitLocal,
                encode_local_block(&local, dtype, raw),
            )
        } else {
            (BlockMode::Split, encode_block(params, dtype, raw))
        };
        if payload.1.len() < best_len {
            best_len = payload.1.len();
            best = (payload.0, Some(payload.1));
        }
    }
    let z = zstd::bulk::compress(raw, zstd_level).map_err(|e| NzError::Zstd {
        what: format!("tensor '{}'", plan.entry.name),
        message: e.to_string(),
    })?;
    if z.len() < best_len {
        best = (BlockMode::Zstd, Some(z));
    }
    Ok(match best {
        (mode, Some(payload)) => (mode, payload),
        (mode, None) => (mode, raw.to_vec()),
    })
}

/// Converts one safetensors file. `progress` is called with the number of input bytes just encoded.
pub fn convert_file(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ConvertSummary> {
    let source = SafetensorsFile::open(input)?;
    let mut out = OutputFile::create(output, opts.replace, &[input])?;

    let mut plans: Vec<TensorPlan> = source
        .tensors
        .par_iter()
        .map(|t| plan_tensor(&source, t, opts))
        .collect();
    let header_json = source.header_json();
    let entries: Vec<TensorEntry> = plans.iter().map(|p| p.entry.clone()).collect();
    let section_len = header::section_len(header_json, &entries);
    let data_offset =
        align_up(FILE_HEADER_LEN as u64 + section_len, TENSOR_ALIGN).expect("header fits u64");

    let file = out.file();
    let io = |e| NzError::io(output, e);
    file.seek(SeekFrom::Start(data_offset)).map_err(io)?;
    let mut writer = BufWriter::with_capacity(1 << 20, &mut *file);
    let jobs: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .flat_map(|(ti, p)| (0..p.entry.blocks.len()).map(move |k| (ti, k)))
        .collect();
    let batch = (rayon::current_num_threads() * 4).max(8);
    let mut written = 0u64; // bytes written after data_offset
    let mut previous_tensor = None;
    for chunk in jobs.chunks(batch) {
        let encoded: Vec<Result<(BlockMode, Vec<u8>)>> = chunk
            .par_iter()
            .map(|&(ti, k)| {
                let plan = &plans[ti];
                let range = plan.entry.block_range(k);
                let raw = &source.data(&source.tensors[ti])[range];
                let result = encode_one(plan, raw, opts.zstd_level);
                progress(raw.len() as u64);
                result
            })
            .collect();
        for (&(ti, k), result) in chunk.iter().zip(encoded) {
            let (mode, payload) = result?;
            let align = if previous_tensor == Some(ti) {
                BLOCK_ALIGN
            } else {
                TENSOR_ALIGN
            };
            previous_tensor = Some(ti);
            let start = align_up(written, align).expect("offsets fit u64");
            writer
                .write_all(&vec![0u8; (start - written) as usize])
                .map_err(io)?;
            writer.write_all(&payload).map_err(io)?;
            written = start + payload.len() as u64;
            let block = &mut plans[ti].entry.blocks[k];
            block.stored_len = u32::try_from(payload.len()).expect("blocks are at most 64 MiB");
            block.mode = mode;
            block.checksum = checksum(&payload);
        }
    }
    writer.flush().map_err(io)?;
    drop(writer);

    let mut entries: Vec<TensorEntry> = plans.into_iter().map(|p| p.entry).collect();
    let data_len = header::assign_offsets(&mut entries, data_offset)?;
    debug_assert_eq!(data_len, written);
    let section = header::write_section(header_json, &entries);
    debug_assert_eq!(section.len() as u64, section_len);
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(&header::file_header(&section, data_offset, data_len))
        .map_err(io)?;
    file.write_all(&section).map_err(io)?;
    let output_bytes = data_offset + data_len;
    file.set_len(output_bytes).map_err(io)?;
    out.commit()?;
    Ok(ConvertSummary {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        input_bytes: source.file_len(),
        output_bytes,
        tensors: entries.len(),
    })
}

/// The index file of a sharded Hugging Face checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// The index neuzip writes beside the converted shards.
pub const NZT_INDEX: &str = "model.nzt.index.json";

/// Replaces a `.safetensors` extension with `.nzt` (or appends `.nzt`).
pub fn nzt_name(file_name: &str) -> String {
    match file_name.strip_suffix(".safetensors") {
        Some(stem) => format!("{stem}.nzt"),
        None => format!("{file_name}.nzt"),
    }
}

/// The shard files a Hugging Face index names, in first-seen order, and the index rewritten for `.nzt`.
pub fn read_shard_index(dir: &Path) -> Result<(Vec<String>, serde_json::Value)> {
    let index_path = dir.join(SAFETENSORS_INDEX);
    let text = std::fs::read(&index_path).map_err(|e| NzError::io(&index_path, e))?;
    let bad = |what: &str| NzError::InvalidSafetensors {
        what: format!("{}: {what}", index_path.display()),
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(&e.to_string()))?;
    let map = index
        .get_mut("weight_map")
        .and_then(|m| m.as_object_mut())
        .ok_or_else(|| bad("no weight_map object"))?;
    let mut shards: Vec<String> = Vec::new();
    for value in map.values_mut() {
        let shard = value
            .as_str()
            .ok_or_else(|| bad("weight_map values must be file names"))?
            .to_string();
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(bad(&format!(
                "shard name '{shard}' is not a plain file name"
            )));
        }
        *value = serde_json::Value::String(nzt_name(&shard));
        if !shards.contains(&shard) {
            shards.push(shard);
        }
    }
    Ok((shards, index))
}
