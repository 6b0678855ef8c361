//! safetensors -> `.nzt`. Plan (a codec and parameters per tensor, from the precision settings and
//! whole-tensor histograms), then encode blocks in bounded parallel batches, write them in order to a
//! temporary file, then the header, then rename. The bytes written do not depend on the thread count.

use std::borrow::Cow;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::allocate::{allocate, Allocation};
use crate::codec::codebook::{ErrorWeights, FitOptions};
use crate::codec::codebook_format::{self, CodebookPlan, Importance};
use crate::codec::lossy::{self, LossyParams, Quantizer};
use crate::codec::split::{
    block_bound_bits, block_cost, block_field_counts, block_field_counts_for_coding,
    choose_block_coding, encode_block, encode_local_block, plan, FieldStats, SparseCounts,
    SplitParams, BLOCK_TOP_BITS,
};
use crate::error::{NzError, Result};
use crate::format::header::{self, BlockEntry, TensorEntry};
use crate::format::writer::OutputFile;
use crate::format::{
    align_up, checksum, BlockMode, Codec, BLOCK_ALIGN, DEFAULT_FLOAT_BLOCK_ELEMENTS,
    DEFAULT_STORED_BLOCK_BYTES, TENSOR_ALIGN,
};
use crate::precision::{CodebookMode, CodebookSettings, LossySettings};
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
    /// Which tensors are lossy, and how (default: none).
    pub lossy: LossySettings,
    /// Which tensors are codebook-quantized, and how (default: none); not together with `lossy`.
    pub codebook: CodebookSettings,
    /// Error weights of the codebook fit per input channel, by tensor name (others use `|w| + sigma`).
    pub importance: Option<std::sync::Arc<Importance>>,
    /// Lossy with a size target: bits per weight of the whole file; `allocate` chooses K for every tensor
    /// the lossy rank default would cover (`lossy.default_bits` is then not used).
    pub target_bits_per_weight: Option<f64>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            float_block_elements: DEFAULT_FLOAT_BLOCK_ELEMENTS,
            stored_block_bytes: DEFAULT_STORED_BLOCK_BYTES,
            zstd_level: 3,
            replace: false,
            lossy: LossySettings::default(),
            codebook: CodebookSettings::default(),
            importance: None,
            target_bits_per_weight: None,
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
    /// The K chosen per tensor, when the options had a size target.
    pub allocation: Option<Allocation>,
}

/// A tensor's codec decision, made before any block is encoded.
pub struct TensorPlan {
    pub entry: TensorEntry,
    split: Option<SplitParams>,
    lossy: Option<(LossyParams, Quantizer)>,
    codebook: Option<CodebookPlan>,
    /// The tensor's histogram of each split field, for the per-block bound.
    field_counts: Vec<Vec<u64>>,
    /// Each block's histogram of the first split field, counted while planning (empty when the tensor was
    /// too small, or the plans' budget for them was spent): the encoder does not count it again.
    block_first_counts: Vec<SparseCounts>,
}

/// Bytes of per-block histograms that the plans of one `plan_all` may hold: up to 32 KiB per block while a
/// tensor's blocks are gathered (the values of their top 12 bits that occur, a few hundred for weights), then
/// about 1 KiB per block of weights (`block_first_counts`). Blocks of tensors planned beyond it are counted by
/// the encoder instead, so memory does not grow with the model.
const BLOCK_COUNTS_BUDGET: usize = 32 << 20;

impl TensorPlan {
    /// The quantizer of a lossy tensor.
    pub fn quantizer(&self) -> Option<&Quantizer> {
        self.lossy.as_ref().map(|(_, q)| q)
    }

    /// The fit of a codebook tensor.
    pub fn codebook(&self) -> Option<&CodebookPlan> {
        self.codebook.as_ref()
    }
}

/// Chooses a tensor's codec and parameters from its whole-tensor statistics.
pub fn plan_tensor(
    source: &SafetensorsFile,
    t: &SourceTensor,
    opts: &ConvertOptions,
) -> TensorPlan {
    plan_tensor_within(source, t, opts, &AtomicUsize::new(0))
}

/// `plan_tensor`, keeping each block's first-field histogram if `budget` (bytes left) has room for it.
fn plan_tensor_within(
    source: &SafetensorsFile,
    t: &SourceTensor,
    opts: &ConvertOptions,
    budget: &AtomicUsize,
) -> TensorPlan {
    let data = source.data(t);
    let elements = t.elements();
    let stored = || {
        let block_units = opts.stored_block_bytes.max(1);
        let blocks = (data.len() as u64).div_ceil(block_units as u64);
        TensorPlan {
            entry: entry(t, Codec::Stored, block_units, Vec::new(), blocks),
            split: None,
            lossy: None,
            codebook: None,
            field_counts: Vec::new(),
            block_first_counts: Vec::new(),
        }
    };
    if !t.dtype.is_splittable_float() || elements == 0 {
        return stored();
    }
    let block_units = opts.float_block_elements.max(1);
    let blocks = elements.div_ceil(block_units as u64);
    // `check_settings` checked the importance lengths.
    let importance = opts.importance.as_ref().and_then(|i| {
        let cols = t.shape.last().copied().unwrap_or(0);
        i.for_tensor(&t.name, cols).ok().flatten()
    });
    let codebook_rate = opts.codebook.bits_for(&t.name, t.dtype, t.shape.len());
    if let Some(rate) = codebook_rate {
        let fit = FitOptions {
            group_size: opts.codebook.group_size as usize,
            row_clusters: opts.codebook.row_clusters as usize,
            ..FitOptions::default()
        };
        let error_weights = importance.map_or(ErrorWeights::AbsPlusSigma, ErrorWeights::PerInput);
        // A tensor the codec cannot apply to (a non-finite weight, a row over the block limit) stays lossless.
        let planned = match opts.codebook.mode {
            // `validate` checked that a fixed rate is a whole number of bits.
            CodebookMode::FixedRate => codebook_format::plan(
                t.dtype,
                &t.shape,
                data,
                &FitOptions {
                    index_bits: rate as u32,
                    ..fit
                },
                error_weights,
                block_units,
            ),
            CodebookMode::RateTarget => codebook_format::plan_at_rate(
                t.dtype,
                &t.shape,
                data,
                &fit,
                error_weights,
                block_units,
                rate,
            ),
        };
        if let Some(p) = planned {
            let units = p.block_units();
            let blocks = elements.div_ceil(units as u64);
            return TensorPlan {
                entry: entry(t, Codec::Codebook, units, p.params.to_bytes(), blocks),
                split: None,
                lossy: None,
                codebook: Some(p),
                field_counts: Vec::new(),
                block_first_counts: Vec::new(),
            };
        }
    }
    // Settings were checked by `check_settings`; a tensor they cannot apply to stays lossless.
    let mantissa_bits = opts
        .lossy
        .mantissa_bits_for(&t.name, t.dtype, t.shape.len())
        .ok()
        .flatten();
    if let Some(k) = mantissa_bits {
        let norm_block = opts.lossy.norm_block_for(&t.name);
        let weights = importance.unwrap_or_default();
        if let Some(p) = lossy::plan(t.dtype, k, norm_block, data, block_units, weights) {
            return TensorPlan {
                entry: entry(t, Codec::Lossy, block_units, p.params.to_bytes(), blocks),
                split: None,
                lossy: Some((p.params, p.quantizer)),
                codebook: None,
                field_counts: Vec::new(),
                block_first_counts: Vec::new(),
            };
        }
    }
    // Block histograms are worth keeping for tensors of several blocks. Room for the most their sparse top
    // histograms can take (every value occurring) is reserved while gathering, and what the first field's
    // histograms do not take is given back.
    let widest = blocks as usize * (std::mem::size_of::<(u16, u32)>() << BLOCK_TOP_BITS);
    let reserved = blocks > 1 && take_budget(budget, widest);
    let stats =
        FieldStats::gather_with_block_tops(t.dtype, data, reserved.then_some(block_units as usize));
    let planned = plan(&stats, blocks);
    let block_first_counts = match &planned {
        Some(p) if reserved && stats.block_tops.len() == blocks as usize => {
            stats.block_top_field(p.params.fields[0].width)
        }
        _ => Vec::new(),
    };
    if reserved {
        let kept: usize = block_first_counts
            .iter()
            .map(|c| std::mem::size_of_val(c) + std::mem::size_of_val(&c.used[..]))
            .sum();
        budget.fetch_add(widest - kept, Ordering::Relaxed);
    }
    drop(stats);
    match planned {
        Some(p) => TensorPlan {
            entry: entry(
                t,
                Codec::FloatSplit,
                block_units,
                p.params.to_bytes(),
                blocks,
            ),
            split: Some(p.params),
            lossy: None,
            codebook: None,
            field_counts: p.field_counts,
            block_first_counts,
        },
        None => stored(),
    }
}

/// Takes `bytes` from `budget` if it has them.
fn take_budget(budget: &AtomicUsize, bytes: usize) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            left.checked_sub(bytes)
        })
        .is_ok()
}

fn entry(
    t: &SourceTensor,
    codec: Codec,
    block_units: u32,
    params: Vec<u8>,
    blocks: u64,
) -> TensorEntry {
    let empty = BlockEntry {
        stored_len: 0,
        mode: BlockMode::Raw,
        checksum: 0,
        offset: 0,
    };
    TensorEntry {
        name: t.name.clone(),
        dtype: t.dtype,
        codec,
        shape: t.shape.clone(),
        block_units,
        params,
        blocks: vec![empty; blocks as usize],
    }
}

/// Bytes of a float block that zstd compresses first, to decide whether compressing the whole block is worth it.
const ZSTD_SAMPLE_BYTES: usize = 8 << 10;
/// zstd level of that sample, whatever level the block would get: on weights level 1 compresses a sample as
/// well as level 3 does, in about 80-85% of the time.
const ZSTD_PROBE_LEVEL: i32 = 1;

/// One encoded block.
pub struct EncodedBlock {
    pub mode: BlockMode,
    pub payload: Vec<u8>,
    /// Zero-order bound of the block under the codec's scheme (tables excluded); for zstd and raw blocks,
    /// their stored size. For split blocks, only with `Bounds::Measure` (else 0): that bound counts every
    /// field of the block.
    pub bound_bits: f64,
    /// XXH3 of `payload`, computed by the worker that encoded it.
    pub checksum: u64,
}

/// Encodes one block, keeping the smallest of split with the tensor's tables, split with the block's own
/// tables (whichever predicts smaller), zstd and raw.
fn encode_one(
    plan: &TensorPlan,
    k: usize,
    raw: &[u8],
    zstd_level: i32,
    bounds: Bounds,
) -> Result<EncodedBlock> {
    if let Some(codebook) = &plan.codebook {
        let payload = codebook.encode_block(k);
        return Ok(EncodedBlock {
            mode: BlockMode::Codebook,
            bound_bits: 8.0 * payload.len() as f64,
            checksum: checksum(&payload),
            payload,
        });
    }
    if let Some((params, quantizer)) = &plan.lossy {
        let first = k * plan.entry.block_units as usize;
        let payload = lossy::encode_block(params, quantizer, plan.entry.dtype, raw, first);
        return Ok(EncodedBlock {
            mode: BlockMode::Lossy,
            bound_bits: 8.0 * payload.len() as f64,
            checksum: checksum(&payload),
            payload,
        });
    }
    let mut best = EncodedBlock {
        checksum: 0,
        mode: BlockMode::Raw,
        payload: Vec::new(),
        bound_bits: 8.0 * raw.len() as f64,
    };
    let mut best_len = raw.len();
    if let Some(params) = &plan.split {
        let dtype = plan.entry.dtype;
        let n = (raw.len() / dtype.byte_width().unwrap_or(1)) as u64;
        let known = plan.block_first_counts.get(k);
        let counts = block_field_counts_for_coding(&params.fields, dtype, raw, known);
        let choice = choose_block_coding(params, &counts, n);
        let params_bits = 8.0 * (4 + choice.to_bytes().len() + 3) as f64;
        let tensor_bits = block_cost(params, &counts, n);
        let (mode, payload) =
            if choice.is_tensor_layout(params) || choice.bits + params_bits >= tensor_bits {
                (BlockMode::Split, encode_block(params, dtype, raw))
            } else {
                (
                    BlockMode::SplitLocal,
                    encode_local_block(&choice, dtype, raw),
                )
            };
        if payload.len() < best_len {
            best_len = payload.len();
            let bound_bits = match bounds {
                Bounds::Measure => {
                    let exact = block_field_counts(&params.fields, dtype, raw);
                    block_bound_bits(&params.fields, &plan.field_counts, &exact, n)
                }
                Bounds::Skip => 0.0,
            };
            best = EncodedBlock {
                checksum: 0,
                mode,
                payload,
                bound_bits,
            };
        }
    }
    let zstd = |bytes: &[u8], context: ZstdContext, level: i32| {
        ZSTD.with_borrow_mut(|contexts| {
            let compressor = match &mut contexts[context as usize] {
                Some((l, c)) if *l == level => c,
                slot => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
            };
            compressor.compress(bytes)
        })
        .map_err(|e| NzError::Zstd {
            what: format!("tensor '{}'", plan.entry.name),
            message: e.to_string(),
        })
    };
    // zstd beats the float codec only on repetitive blocks; a sample tells them apart cheaply.
    let sample = &raw[..raw.len().min(ZSTD_SAMPLE_BYTES)];
    if plan.split.is_some() && raw.len() > ZSTD_SAMPLE_BYTES {
        let sample_ratio =
            zstd(sample, ZstdContext::Probe, ZSTD_PROBE_LEVEL)?.len() as f64 / sample.len() as f64;
        if sample_ratio >= best_len as f64 / raw.len() as f64 {
            return Ok(finish(best, raw));
        }
    }
    let z = zstd(raw, ZstdContext::Block, zstd_level)?;
    if z.len() < best_len {
        best = EncodedBlock {
            checksum: 0,
            mode: BlockMode::Zstd,
            bound_bits: 8.0 * z.len() as f64,
            payload: z,
        };
    }
    Ok(finish(best, raw))
}

/// Which of a thread's two zstd contexts compresses: the probe's sample or a whole block.
#[derive(Clone, Copy)]
enum ZstdContext {
    Probe = 0,
    Block = 1,
}

thread_local! {
    /// Per-thread zstd contexts (`ZstdContext`), each with its level, kept across blocks: creating one per
    /// block costs more than a small sample.
    static ZSTD: std::cell::RefCell<[Option<(i32, zstd::bulk::Compressor<'static>)>; 2]> =
        const { std::cell::RefCell::new([None, None]) };
}

/// The raw payload is copied only when raw wins.
fn finish(mut best: EncodedBlock, raw: &[u8]) -> EncodedBlock {
    if best.mode == BlockMode::Raw {
        best.payload = raw.to_vec();
    }
    best.checksum = checksum(&best.payload);
    best
}

/// Checks the lossy settings against every tensor of `source` (a K wider than a tensor's mantissa is an
/// error naming the tensor), before anything is planned or written.
pub fn check_settings(source: &SafetensorsFile, opts: &ConvertOptions) -> Result<()> {
    opts.lossy.validate()?;
    opts.codebook.validate()?;
    if opts.target_bits_per_weight.is_some() && !opts.codebook.is_lossless() {
        return Err(NzError::InvalidSetting {
            what: "a bits-per-weight target applies to the lossy mode, not to the codebook mode"
                .into(),
        });
    }
    if !opts.lossy.is_lossless() && !opts.codebook.is_lossless() {
        return Err(NzError::InvalidSetting {
            what: "the lossy (mantissa bits) and codebook modes cannot be combined".into(),
        });
    }
    for t in &source.tensors {
        let mantissa_bits = opts
            .lossy
            .mantissa_bits_for(&t.name, t.dtype, t.shape.len())?;
        if let Some(importance) = &opts.importance {
            // A size target may make any free tensor lossy.
            let lossy = mantissa_bits.is_some() || opts.target_bits_per_weight.is_some();
            if lossy
                || opts
                    .codebook
                    .bits_for(&t.name, t.dtype, t.shape.len())
                    .is_some()
            {
                importance.for_tensor(&t.name, t.shape.last().copied().unwrap_or(0))?;
            }
        }
    }
    Ok(())
}

/// Passes a conversion makes over the input, each reporting every tensor byte to `progress`: planning
/// (statistics, quantization, codebook fits) and encoding. A progress bar's total is this many times the
/// input size.
pub const PROGRESS_PASSES: u64 = 2;

/// Plans every tensor of `source` (in parallel), calling `progress` with each tensor's bytes once it is
/// planned.
pub fn plan_all(
    source: &SafetensorsFile,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Vec<TensorPlan> {
    let budget = AtomicUsize::new(BLOCK_COUNTS_BUDGET);
    source
        .tensors
        .par_iter()
        .map(|t| {
            let plan = plan_tensor_within(source, t, opts, &budget);
            progress(source.data(t).len() as u64);
            plan
        })
        .collect()
}

/// Whether `encode_blocks` measures each split block's zero-order bound (`EncodedBlock::bound_bits`), which
/// counts every field of the block once more (the coding itself judges nearly uniform raw fields from a
/// sample). The blocks' bytes do not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bounds {
    Measure,
    Skip,
}

/// Encodes every block of every planned tensor in bounded parallel batches, calling `sink` in file order.
/// While `sink` takes one batch the pool encodes the next, so memory stays at two batches of a few blocks per
/// thread whatever the model size.
pub fn encode_blocks(
    source: &SafetensorsFile,
    plans: &[TensorPlan],
    opts: &ConvertOptions,
    bounds: Bounds,
    progress: &(dyn Fn(u64) + Sync),
    mut sink: impl FnMut(usize, usize, EncodedBlock) -> Result<()> + Send,
) -> Result<()> {
    let jobs: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .flat_map(|(ti, p)| (0..p.entry.blocks.len()).map(move |k| (ti, k)))
        .collect();
    let batch = (rayon::current_num_threads() * 4).max(8);
    let encode_chunk = |chunk: &[(usize, usize)]| -> Vec<Result<EncodedBlock>> {
        chunk
            .par_iter()
            .map(|&(ti, k)| {
                let plan = &plans[ti];
                let raw = &source.data(&source.tensors[ti])[plan.entry.block_range(k)];
                let result = encode_one(plan, k, raw, opts.zstd_level, bounds);
                progress(raw.len() as u64);
                result
            })
            .collect()
    };
    let mut sink_chunk =
        |chunk: &[(usize, usize)], encoded: Vec<Result<EncodedBlock>>| -> Result<()> {
            for (&(ti, k), result) in chunk.iter().zip(encoded) {
                sink(ti, k, result?)?;
            }
            Ok(())
        };
    let mut pending: Option<PendingChunk<'_>> = None;
    for chunk in jobs.chunks(batch) {
        let (encoded, sunk) = rayon::join(
            || encode_chunk(chunk),
            || match pending.take() {
                Some((previous, results)) => sink_chunk(previous, results),
                None => Ok(()),
            },
        );
        sunk?;
        pending = Some((chunk, encoded));
    }
    match pending {
        Some((previous, results)) => sink_chunk(previous, results),
        None => Ok(()),
    }
}

/// A batch of block jobs and their encoded results, waiting for the sink.
type PendingChunk<'a> = (&'a [(usize, usize)], Vec<Result<EncodedBlock>>);

/// Tracks where the next block goes in the data section (spec: "Data-section placement").
#[derive(Default)]
pub struct Placement {
    /// End of the last block, relative to the data section.
    pub end: u64,
    previous_tensor: Option<usize>,
}

impl Placement {
    /// Start offset of a block of tensor `ti` of `len` bytes; records it and returns the padding before it.
    pub fn place(&mut self, ti: usize, len: u64) -> u64 {
        let align = if self.previous_tensor == Some(ti) {
            BLOCK_ALIGN
        } else {
            TENSOR_ALIGN
        };
        self.previous_tensor = Some(ti);
        let start = align_up(self.end, align).expect("offsets fit u64");
        let padding = start - self.end;
        self.end = start + len;
        padding
    }
}

/// Converts one safetensors file. `progress` is called with the number of input bytes just planned, then
/// again as they are encoded (`PROGRESS_PASSES`).
pub fn convert_file(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ConvertSummary> {
    let (out, summary) = convert_uncommitted(input, output, opts, progress)?;
    out.commit()?;
    Ok(summary)
}

/// The start of a `.nzt` whose data section has been streamed out by `NztPlan::encode`.
pub struct NztHead {
    /// The fixed file header and the header section; zero padding follows up to `data_offset`.
    pub header: Vec<u8>,
    pub data_offset: u64,
    pub data_len: u64,
    pub tensors: usize,
}

/// Every tensor's plan, and where the data section will start (the header's size is known before any block
/// is encoded, so a file writer can stream the data first and write the header last).
pub struct NztPlan {
    plans: Vec<TensorPlan>,
    pub data_offset: u64,
}

impl NztPlan {
    pub fn new(
        source: &SafetensorsFile,
        opts: &ConvertOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> NztPlan {
        let plans = plan_all(source, opts, progress);
        let entries: Vec<TensorEntry> = plans.iter().map(|p| p.entry.clone()).collect();
        let data_offset = header::data_offset(source.header_json(), &entries);
        NztPlan { plans, data_offset }
    }

    /// Encodes every block, passing the data section to `write_data` in order (alignment padding included),
    /// then returns the header that goes in front of it.
    pub fn encode(
        mut self,
        source: &SafetensorsFile,
        opts: &ConvertOptions,
        progress: &(dyn Fn(u64) + Sync),
        mut write_data: impl FnMut(&[u8]) -> Result<()> + Send,
    ) -> Result<NztHead> {
        let mut placement = Placement::default();
        let mut records = Vec::new();
        encode_blocks(
            source,
            &self.plans,
            opts,
            Bounds::Skip,
            progress,
            |ti, k, block| {
                let padding = placement.place(ti, block.payload.len() as u64);
                write_data(&[0u8; 64][..padding as usize])?;
                write_data(&block.payload)?;
                records.push((ti, k, block.mode, block.payload.len(), block.checksum));
                Ok(())
            },
        )?;
        for (ti, k, mode, len, sum) in records {
            let b = &mut self.plans[ti].entry.blocks[k];
            b.stored_len = u32::try_from(len).expect("blocks are at most 16 MiB");
            b.mode = mode;
            b.checksum = sum;
        }
        let mut entries: Vec<TensorEntry> = self.plans.into_iter().map(|p| p.entry).collect();
        let data_len = header::assign_offsets(&mut entries, self.data_offset)?;
        debug_assert_eq!(data_len, placement.end);
        let section = header::write_section(source.header_json(), &entries);
        let minor = header::version_minor_for(&entries);
        let mut head = header::file_header(&section, minor, self.data_offset, data_len).to_vec();
        head.extend_from_slice(&section);
        debug_assert!(head.len() as u64 <= self.data_offset);
        Ok(NztHead {
            header: head,
            data_offset: self.data_offset,
            data_len,
            tensors: entries.len(),
        })
    }
}

/// The options with every free tensor's K chosen for the size target, and that allocation; without a
/// target, the options as given.
fn resolve_target<'a>(
    source: &SafetensorsFile,
    opts: &'a ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Cow<'a, ConvertOptions>, Option<Allocation>)> {
    let Some(target) = opts.target_bits_per_weight else {
        return Ok((Cow::Borrowed(opts), None));
    };
    let allocation = allocate(source, opts, target, progress)?;
    let mut resolved = opts.clone();
    resolved.target_bits_per_weight = None;
    resolved.lossy.default_bits = None;
    resolved.lossy.assigned = allocation.assignments().collect();
    resolved.lossy.assigned_norm_blocks = allocation.norm_block_assignments().collect();
    check_settings(source, &resolved)?;
    Ok((Cow::Owned(resolved), Some(allocation)))
}

/// Encodes `source` into a `.nzt` held in memory (for tests, fuzzing and small files).
pub fn convert_to_vec(source: &SafetensorsFile, opts: &ConvertOptions) -> Result<Vec<u8>> {
    check_settings(source, opts)?;
    let (opts, _) = resolve_target(source, opts, &|_| {})?;
    let opts = opts.as_ref();
    let mut data = Vec::new();
    let head = NztPlan::new(source, opts, &|_| {}).encode(source, opts, &|_| {}, |bytes| {
        data.extend_from_slice(bytes);
        Ok(())
    })?;
    let mut file = head.header;
    file.resize(head.data_offset as usize, 0);
    file.extend_from_slice(&data);
    Ok(file)
}

/// Converts one safetensors file into a temporary file that becomes `output` only when committed, so that
/// several outputs (the shards of a checkpoint) can appear together or not at all.
pub fn convert_uncommitted(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(OutputFile, ConvertSummary)> {
    let source = SafetensorsFile::open(input)?;
    check_settings(&source, opts)?;
    let (opts, allocation) = resolve_target(&source, opts, progress)?;
    let opts = opts.as_ref();
    let mut out = OutputFile::create(output, opts.replace, &[input])?;
    let file = out.file();
    let io = |e| NzError::io(output, e);
    let plan = NztPlan::new(&source, opts, progress);
    let data_offset = plan.data_offset;
    file.seek(SeekFrom::Start(data_offset)).map_err(io)?;
    let mut writer = BufWriter::with_capacity(1 << 20, &mut *file);
    let head = plan.encode(&source, opts, progress, |bytes| {
        writer.write_all(bytes).map_err(io)
    })?;
    writer.flush().map_err(io)?;
    drop(writer);
    debug_assert_eq!(head.data_offset, data_offset);
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(&head.header).map_err(io)?;
    let output_bytes = head.data_offset + head.data_len;
    file.set_len(output_bytes).map_err(io)?;
    let summary = ConvertSummary {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        input_bytes: source.file_len(),
        output_bytes,
        tensors: head.tensors,
        allocation,
    };
    Ok((out, summary))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of 1-D BF16 tensors, held in memory.
    fn bf16_file(tensors: &[(&str, Vec<u8>)]) -> SafetensorsFile {
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        for (name, data) in tensors {
            let entry = serde_json::json!({
                "dtype": "BF16",
                "shape": [data.len() / 2],
                "data_offsets": [offset, offset + data.len()],
            });
            header.insert(name.to_string(), entry);
            offset += data.len();
        }
        let mut text = serde_json::to_vec(&header).expect("json");
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(text);
        tensors.iter().for_each(|(_, d)| bytes.extend(d));
        SafetensorsFile::from_bytes(crate::mmap::Bytes::Owned(bytes)).expect("valid file")
    }

    /// `n` bf16 weights of roughly normal values times `scale`, from a seeded generator.
    fn weights(n: usize, seed: u64, scale: f32) -> Vec<u8> {
        let mut state = seed;
        let mut unit = || crate::codec::rans::tests::xorshift(&mut state) as f32 / u64::MAX as f32;
        let mut weight = || (0..4).map(|_| unit()).sum::<f32>() - 2.0;
        let bf16 = |w: f32| ((w * scale).to_bits() >> 16) as u16;
        (0..n).flat_map(|_| bf16(weight()).to_le_bytes()).collect()
    }

    /// The encoder writes the same blocks whether a block's first-field histogram comes from the plan
    /// (`plan_all`) or is counted again (`plan_tensor`, as for tensors beyond the budget), for blocks that keep
    /// the tensor's tables and blocks that take their own.
    #[test]
    fn block_counts_from_the_plan_encode_the_same_blocks() {
        let mut drifting = weights(20_000, 1, 0.02);
        drifting.extend(weights(20_000, 2, 3.0));
        let source = bf16_file(&[
            ("steady", weights(50_000, 3, 0.05)),
            ("drifting", drifting),
            ("small", weights(300, 4, 1.0)),
        ]);
        let opts = ConvertOptions {
            float_block_elements: 4096,
            ..ConvertOptions::default()
        };
        let from_plan = plan_all(&source, &opts, &|_| {});
        let counted_again: Vec<TensorPlan> = (source.tensors.iter())
            .map(|t| plan_tensor(&source, t, &opts))
            .collect();
        assert!(from_plan[..2]
            .iter()
            .all(|p| p.block_first_counts.len() == p.entry.blocks.len()));
        assert!(counted_again
            .iter()
            .all(|p| p.block_first_counts.is_empty()));
        let encode = |plans: &[TensorPlan]| {
            let mut blocks = Vec::new();
            encode_blocks(&source, plans, &opts, Bounds::Skip, &|_| {}, |ti, k, b| {
                blocks.push((ti, k, b.mode, b.payload));
                Ok(())
            })
            .expect("encodes");
            blocks
        };
        let (a, b) = (encode(&from_plan), encode(&counted_again));
        assert!(a.iter().any(|block| block.2 == BlockMode::SplitLocal));
        assert!(a.iter().any(|block| block.2 == BlockMode::Split));
        assert!(a == b, "the plan's block counts changed the encoded blocks");
    }

    /// The zstd probe sends a float block to zstd when its rows repeat (here rows of 3 KiB, within the probe's
    /// sample) and keeps weights without repeats in the float codec.
    #[test]
    fn repeating_float_blocks_go_to_zstd() {
        let row = weights(1536, 5, 0.05);
        let repeating: Vec<u8> = row.iter().copied().cycle().take(2 * 65_536).collect();
        let source = bf16_file(&[
            ("repeating", repeating),
            ("plain", weights(65_536, 6, 0.05)),
        ]);
        let opts = ConvertOptions::default();
        let plans = plan_all(&source, &opts, &|_| {});
        let mut modes = vec![Vec::new(); plans.len()];
        encode_blocks(&source, &plans, &opts, Bounds::Skip, &|_| {}, |ti, _, b| {
            modes[ti].push(b.mode);
            Ok(())
        })
        .expect("encodes");
        assert!(
            modes[0].iter().all(|&m| m == BlockMode::Zstd),
            "{:?}",
            modes[0]
        );
        assert!(
            modes[1].iter().all(|&m| m == BlockMode::Split),
            "{:?}",
            modes[1]
        );
    }
}
