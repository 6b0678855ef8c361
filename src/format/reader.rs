//! Reading `.nzt`: map the file, parse the header, decode any tensor or block on its own into a caller's buffer.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;

use super::header::{self, Header, TensorEntry};
use super::{checksum, BlockMode, Codec};
use crate::codec::codebook_format::{CodebookDecoder, CodebookParams};
use crate::codec::freq::TableError;
use crate::codec::lossy::{LossyDecoder, LossyParams};
use crate::codec::split::{split_local_payload, SplitDecoder, SplitParams};
use crate::error::{NzError, Result};
use crate::mmap::{map_file, Bytes};

/// Decoding options.
#[derive(Clone, Copy, Debug)]
pub struct DecodeOptions {
    /// Check each block's XXH3-64 before decoding it (default true).
    pub verify_checksums: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            verify_checksums: true,
        }
    }
}

/// An open `.nzt` file.
pub struct NztFile {
    bytes: Bytes,
    header: Header,
    options: DecodeOptions,
    /// The batch buffers of the last `for_each_block`, kept for the next one (at most two), so repeated
    /// decodes of a file do not allocate and zero them again.
    spare_buffers: Mutex<Vec<Vec<u8>>>,
}

/// What one tensor needs to decode its blocks: its parameters, expanded once.
enum TensorDecoder {
    Stored,
    Split(SplitDecoder),
    Lossy(LossyDecoder),
    Codebook(CodebookDecoder),
}

impl NztFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<NztFile> {
        Self::from_bytes(map_file(path)?)
    }

    /// Parses a file held in memory.
    pub fn from_bytes(bytes: Bytes) -> Result<NztFile> {
        let header = header::parse(&bytes)?;
        Ok(NztFile {
            bytes,
            header,
            options: DecodeOptions::default(),
            spare_buffers: Mutex::new(Vec::new()),
        })
    }

    pub fn with_options(mut self, options: DecodeOptions) -> Self {
        self.options = options;
        self
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn tensors(&self) -> &[TensorEntry] {
        &self.header.tensors
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Index of the tensor called `name`.
    pub fn tensor_index(&self, name: &str) -> Result<usize> {
        self.header
            .tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| NzError::NoSuchTensor {
                name: name.to_string(),
            })
    }

    fn decoder(&self, tensor: &TensorEntry) -> Result<TensorDecoder> {
        Ok(match tensor.codec {
            Codec::Stored => TensorDecoder::Stored,
            Codec::FloatSplit => {
                let params = SplitParams::parse(&tensor.params, tensor.dtype).map_err(|e| {
                    NzError::malformed(format!("'{}': params: {}", tensor.name, e.0))
                })?;
                TensorDecoder::Split(SplitDecoder::new(params, tensor.dtype))
            }
            Codec::Lossy => {
                let bad = |what: String| {
                    NzError::malformed(format!("'{}': lossy params: {what}", tensor.name))
                };
                let params =
                    LossyParams::parse(&tensor.params, tensor.dtype).map_err(|e| bad(e.0))?;
                let decoder = LossyDecoder::new(params, tensor.dtype)
                    .ok_or_else(|| bad(format!("not valid for {}", tensor.dtype)))?;
                TensorDecoder::Lossy(decoder)
            }
            Codec::Codebook => {
                let bad = |what: String| {
                    NzError::malformed(format!("'{}': codebook params: {what}", tensor.name))
                };
                let params = CodebookParams::parse(&tensor.params, tensor.dtype, &tensor.shape)
                    .map_err(|e| bad(e.0))?;
                let decoder = CodebookDecoder::new(params, tensor.dtype, &tensor.shape)
                    .ok_or_else(|| bad(format!("not valid for {}", tensor.dtype)))?;
                TensorDecoder::Codebook(decoder)
            }
        })
    }

    fn decode_block_with(
        &self,
        tensor: &TensorEntry,
        decoder: &TensorDecoder,
        k: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let decoded = self.decode_payload(tensor, decoder, k, self.payload(tensor, k), out);
        self.check_payload(tensor, k).and(decoded)
    }

    /// Block `k`'s stored bytes.
    fn payload(&self, tensor: &TensorEntry, k: usize) -> &[u8] {
        let block = &tensor.blocks[k];
        // The header parser checked that every block lies inside the file.
        &self.bytes[block.offset as usize..block.offset as usize + block.stored_len as usize]
    }

    /// Checks block `k`'s checksum (unless checksums are off). Decoders run before it, while the payload is
    /// still in cache from decoding (the decoders are safe on any bytes), and a mismatch is the error reported
    /// whatever the decoder said.
    fn check_payload(&self, tensor: &TensorEntry, k: usize) -> Result<()> {
        let block = &tensor.blocks[k];
        let payload = self.payload(tensor, k);
        if self.options.verify_checksums {
            let computed = checksum(payload);
            if computed != block.checksum {
                return Err(NzError::ChecksumMismatch {
                    what: format!("tensor '{}' block {k}", tensor.name),
                    stored: block.checksum,
                    computed,
                });
            }
        }
        Ok(())
    }

    /// Decodes block `k`'s `payload` into `out` (its checksum is checked by the caller, after this).
    fn decode_payload(
        &self,
        tensor: &TensorEntry,
        decoder: &TensorDecoder,
        k: usize,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        let block = &tensor.blocks[k];
        let corrupt = |what: String| NzError::CorruptBlock {
            tensor: tensor.name.clone(),
            block: k,
            what,
        };
        match (block.mode, decoder) {
            (BlockMode::Raw, _) => out.copy_from_slice(payload),
            (BlockMode::Zstd, _) => decode_zstd_block(&tensor.name, k, payload, out)?,
            (BlockMode::Split, TensorDecoder::Split(split)) => split
                .decode_block(payload, out)
                .map_err(|e| corrupt(e.0.to_string()))?,
            (BlockMode::SplitLocal, TensorDecoder::Split(split)) => {
                let (local, body) = self.local_decoder(tensor, split, k, payload)?;
                local
                    .decode_block(body, out)
                    .map_err(|e| corrupt(e.0.to_string()))?
            }
            (BlockMode::Lossy, TensorDecoder::Lossy(lossy)) => lossy
                .decode_block(payload, out)
                .map_err(|e| corrupt(e.0.to_string()))?,
            (BlockMode::Split | BlockMode::SplitLocal, _) => {
                return Err(corrupt("split block in a tensor of another codec".into()))
            }
            (BlockMode::Codebook, TensorDecoder::Codebook(codebook)) => codebook
                .decode_block(payload, out)
                .map_err(|e| corrupt(e.0.to_string()))?,
            (BlockMode::Lossy, _) => {
                return Err(corrupt("lossy block in a tensor of another codec".into()))
            }
            (BlockMode::Codebook, _) => {
                return Err(corrupt(
                    "codebook block in a tensor of another codec".into(),
                ))
            }
        }
        Ok(())
    }

    /// The decoder of `split_local` block `k` (its own params, borrowing the tensor's tables where it says so)
    /// and the block's coded body.
    fn local_decoder<'p>(
        &self,
        tensor: &TensorEntry,
        split: &SplitDecoder,
        k: usize,
        payload: &'p [u8],
    ) -> Result<(SplitDecoder, &'p [u8])> {
        let local_error = |e: TableError| NzError::CorruptBlock {
            tensor: tensor.name.clone(),
            block: k,
            what: format!("block params: {}", e.0),
        };
        let (param_bytes, body) = split_local_payload(payload).map_err(local_error)?;
        let (params, borrowed) =
            SplitParams::parse_local(param_bytes, tensor.dtype, split.params())
                .map_err(local_error)?;
        Ok((split.local(params, &borrowed, tensor.dtype), body))
    }

    /// Decodes block `block` of tensor `index` into `out`, which must be exactly that block's decoded size.
    pub fn decode_block_into(&self, index: usize, block: usize, out: &mut [u8]) -> Result<()> {
        let tensor = self.tensor_at(index)?;
        if block >= tensor.blocks.len() {
            return Err(NzError::malformed(format!(
                "tensor '{}' has {} blocks, block {block} asked for",
                tensor.name,
                tensor.blocks.len()
            )));
        }
        let range = tensor.block_range(block);
        check_len(tensor, range.len(), out.len())?;
        let decoder = self.decoder(tensor)?;
        self.decode_block_with(tensor, &decoder, block, out)
    }

    fn tensor_at(&self, index: usize) -> Result<&TensorEntry> {
        self.header
            .tensors
            .get(index)
            .ok_or_else(|| NzError::NoSuchTensor {
                name: format!("#{index}"),
            })
    }

    /// Decodes tensor `index` into `out` (its exact byte length), blocks in parallel.
    pub fn decode_tensor_into(&self, index: usize, out: &mut [u8]) -> Result<()> {
        let tensor = self.tensor_at(index)?;
        check_len(tensor, tensor.byte_len() as usize, out.len())?;
        let decoder = self.decoder(tensor)?;
        let block_bytes = (tensor.block_units as u64 * tensor.unit_bytes()) as usize;
        if tensor.blocks.is_empty() {
            return Ok(());
        }
        out.par_chunks_mut(block_bytes)
            .enumerate()
            .try_for_each(|(k, chunk)| self.decode_block_with(tensor, &decoder, k, chunk))
    }

    /// Decodes the tensor called `name` into a new buffer.
    pub fn decode_tensor(&self, name: &str) -> Result<Vec<u8>> {
        let index = self.tensor_index(name)?;
        let mut out = vec![0u8; self.header.tensors[index].byte_len() as usize];
        self.decode_tensor_into(index, &mut out)?;
        Ok(out)
    }

    /// Decodes every block of every tensor, in file order, calling `sink(tensor, block, bytes)` in that
    /// order. Blocks are decoded in parallel batches of at most `DECODE_BATCH_BYTES` (or one block) that run
    /// across tensor boundaries, so small tensors keep every thread busy too. Two batch buffers are reused in
    /// turn: while `sink` consumes one batch the pool decodes the next, so memory stays bounded (two batches)
    /// whatever the model or a hostile header declares. The two buffers are kept for the next call.
    pub fn for_each_block(
        &self,
        sink: impl FnMut(usize, usize, &[u8]) -> Result<()> + Send,
    ) -> Result<()> {
        let mut spare = self
            .spare_buffers
            .lock()
            .map(|mut kept| std::mem::take(&mut *kept))
            .unwrap_or_default();
        let mut decoding = Batch {
            buffer: spare.pop().unwrap_or_default(),
            ..Batch::default()
        };
        let mut consuming = Batch {
            buffer: spare.pop().unwrap_or_default(),
            ..Batch::default()
        };
        let result = self.decode_batches(&mut decoding, &mut consuming, sink);
        if let Ok(mut kept) = self.spare_buffers.lock() {
            *kept = vec![decoding.buffer, consuming.buffer];
        }
        result
    }

    /// The loop of `for_each_block`, with its two batches: the one being decoded and the one being consumed.
    fn decode_batches(
        &self,
        decoding: &mut Batch,
        consuming: &mut Batch,
        mut sink: impl FnMut(usize, usize, &[u8]) -> Result<()> + Send,
    ) -> Result<()> {
        let tensors = &self.header.tensors;
        let mut blocks = tensors
            .iter()
            .enumerate()
            .flat_map(|(t, tensor)| (0..tensor.blocks.len()).map(move |k| (t, k)))
            .peekable();
        let mut decoders: Vec<Option<TensorDecoder>> = (0..tensors.len()).map(|_| None).collect();
        loop {
            decoding.blocks.clear();
            let mut batch_bytes = 0usize;
            // Tensors of this batch without a decoder yet, in block order.
            let mut new_tensors: Vec<usize> = Vec::new();
            while let Some(&(t, k)) = blocks.peek() {
                let len = tensors[t].block_range(k).len();
                if !decoding.blocks.is_empty() && (batch_bytes + len) as u64 > DECODE_BATCH_BYTES {
                    break;
                }
                if decoders[t].is_none() && new_tensors.last() != Some(&t) {
                    new_tensors.push(t);
                }
                decoding.blocks.push((t, k, len));
                batch_bytes += len;
                blocks.next();
            }
            // Building decoders (tables) is per-tensor work: a batch of many small tensors builds them in
            // parallel. The first error in block order is the one reported.
            let built: Vec<Result<TensorDecoder>> = new_tensors
                .par_iter()
                .map(|&t| self.decoder(&tensors[t]))
                .collect();
            for (&t, decoder) in new_tensors.iter().zip(built) {
                decoders[t] = Some(decoder?);
            }
            if decoding.blocks.is_empty() && consuming.blocks.is_empty() {
                return Ok(());
            }
            if decoding.buffer.len() < batch_bytes {
                // A fresh zeroed allocation rather than `resize`: large ones come zeroed from the system
                // (calloc), so the buffer is not written twice before the decoders fill it.
                decoding.buffer = vec![0u8; batch_bytes];
            }
            let decoders_ref = &decoders;
            let (decoded, consumed) = rayon::join(
                || {
                    self.decode_batch(
                        decoders_ref,
                        &decoding.blocks,
                        &mut decoding.buffer[..batch_bytes],
                    )
                },
                || consuming.consume(&mut sink),
            );
            consumed?;
            decoding.results = decoded;
            // A tensor's decoder is dropped once its last block is decoded.
            for &(t, k, _) in &decoding.blocks {
                if k + 1 == tensors[t].blocks.len() {
                    decoders[t] = None;
                }
            }
            std::mem::swap(decoding, consuming);
        }
    }

    /// Decodes `blocks` into consecutive slices of `buffer`, in parallel; returns their results in order.
    /// `split` and `split_local` blocks are decoded two at a time (`split::decode_pair`), which keeps the SIMD
    /// units busier.
    fn decode_batch(
        &self,
        decoders: &[Option<TensorDecoder>],
        blocks: &[(usize, usize, usize)],
        buffer: &mut [u8],
    ) -> Vec<Result<()>> {
        let tensors = &self.header.tensors;
        let is_split = |&(t, k, _): &(usize, usize, usize)| {
            matches!(
                tensors[t].blocks[k].mode,
                BlockMode::Split | BlockMode::SplitLocal
            )
        };
        // Units of one or two blocks (indices into `blocks`). Split blocks pair up by size, longest first,
        // across tensors too: the two streams of a pair run together only as far as the shorter one goes, and
        // tensors often end in a short block (a 384 x 384 weight is a full block and an eighth).
        let mut split_blocks: Vec<usize> = (0..blocks.len())
            .filter(|&i| is_split(&blocks[i]))
            .collect();
        split_blocks.sort_by_key(|&i| std::cmp::Reverse(blocks[i].2));
        let mut units: Vec<(usize, Option<usize>)> = split_blocks
            .chunks(2)
            .map(|unit| (unit[0], unit.get(1).copied()))
            .collect();
        units.extend(
            (0..blocks.len())
                .filter(|&i| !is_split(&blocks[i]))
                .map(|i| (i, None)),
        );
        // Each block's slice of `buffer`, handed to its unit.
        let mut slices: Vec<Option<&mut [u8]>> = Vec::with_capacity(blocks.len());
        let mut rest = buffer;
        for &(_, _, len) in blocks {
            let (slice, tail) = rest.split_at_mut(len);
            rest = tail;
            slices.push(Some(slice));
        }
        let mut take = |i: usize| slices[i].take().expect("each block is in one unit");
        let mut outs: Vec<(&mut [u8], Option<&mut [u8]>)> = units
            .iter()
            .map(|&(i, j)| (take(i), j.map(&mut take)))
            .collect();
        let decoder = |t: usize| decoders[t].as_ref().expect("built before the batch");
        let unit_results: Vec<(usize, Result<()>)> = units
            .par_iter()
            .zip(outs.par_iter_mut())
            .flat_map_iter(|(&(i, j), (first, second))| {
                let (t, k, _) = blocks[i];
                let results = match (j, second) {
                    (Some(j), Some(second)) => {
                        let (t2, k2, _) = blocks[j];
                        let [a, b] = self.decode_pair_with(
                            [
                                (&tensors[t], decoder(t), k),
                                (&tensors[t2], decoder(t2), k2),
                            ],
                            [first, second],
                        );
                        [Some((i, a)), Some((j, b))]
                    }
                    _ => [
                        Some((i, self.decode_block_with(&tensors[t], decoder(t), k, first))),
                        None,
                    ],
                };
                results.into_iter().flatten()
            })
            .collect();
        let mut results: Vec<Option<Result<()>>> = (0..blocks.len()).map(|_| None).collect();
        for (i, result) in unit_results {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.expect("each block is in one unit"))
            .collect()
    }

    /// Decodes two split or split_local blocks, each given as (tensor, its decoder, block index), as a pair,
    /// then checks their checksums; each keeps its own result.
    fn decode_pair_with(
        &self,
        blocks: [(&TensorEntry, &TensorDecoder, usize); 2],
        outs: [&mut [u8]; 2],
    ) -> [Result<()>; 2] {
        let [a, b] = self.decode_pair_unchecked(blocks, outs);
        let [(tensor_a, _, k_a), (tensor_b, _, k_b)] = blocks;
        [
            self.check_payload(tensor_a, k_a).and(a),
            self.check_payload(tensor_b, k_b).and(b),
        ]
    }

    /// `decode_pair_with` before the checksums (single blocks check their own).
    fn decode_pair_unchecked(
        &self,
        blocks: [(&TensorEntry, &TensorDecoder, usize); 2],
        outs: [&mut [u8]; 2],
    ) -> [Result<()>; 2] {
        let [out_a, out_b] = outs;
        let [(tensor_a, decoder_a, k_a), (tensor_b, decoder_b, k_b)] = blocks;
        let (TensorDecoder::Split(split_a), TensorDecoder::Split(split_b)) = (decoder_a, decoder_b)
        else {
            let payloads = [self.payload(tensor_a, k_a), self.payload(tensor_b, k_b)];
            return [
                self.decode_payload(tensor_a, decoder_a, k_a, payloads[0], out_a),
                self.decode_payload(tensor_b, decoder_b, k_b, payloads[1], out_b),
            ];
        };
        // A block's decoder (its tensor's for `split`, built for `split_local`) and coded body.
        let prepare = |tensor: &TensorEntry,
                       split: &SplitDecoder,
                       k: usize|
         -> Result<(Option<SplitDecoder>, &[u8])> {
            let payload = self.payload(tensor, k);
            match tensor.blocks[k].mode {
                BlockMode::SplitLocal => {
                    let (local, body) = self.local_decoder(tensor, split, k, payload)?;
                    Ok((Some(local), body))
                }
                _ => Ok((None, payload)),
            }
        };
        let corrupt = |tensor: &TensorEntry, k: usize, e: crate::codec::rans::StreamError| {
            NzError::CorruptBlock {
                tensor: tensor.name.clone(),
                block: k,
                what: e.0.to_string(),
            }
        };
        match [
            prepare(tensor_a, split_a, k_a),
            prepare(tensor_b, split_b, k_b),
        ] {
            [Ok((local_a, body_a)), Ok((local_b, body_b))] => {
                let decoders = [
                    local_a.as_ref().unwrap_or(split_a),
                    local_b.as_ref().unwrap_or(split_b),
                ];
                let [ra, rb] =
                    crate::codec::split::decode_pair(decoders, [body_a, body_b], [out_a, out_b]);
                [
                    ra.map_err(|e| corrupt(tensor_a, k_a, e)),
                    rb.map_err(|e| corrupt(tensor_b, k_b, e)),
                ]
            }
            [a, b] => {
                let single = |prepared: Result<(Option<SplitDecoder>, &[u8])>,
                              (tensor, split, k): (&TensorEntry, &SplitDecoder, usize),
                              out| {
                    let (local, body) = prepared?;
                    let decoder = local.as_ref().unwrap_or(split);
                    decoder
                        .decode_block(body, out)
                        .map_err(|e| corrupt(tensor, k, e))
                };
                [
                    single(a, (tensor_a, split_a, k_a), out_a),
                    single(b, (tensor_b, split_b, k_b), out_b),
                ]
            }
        }
    }

    /// Writes the original safetensors file (byte-identical to the one converted) to `w`, streaming.
    pub fn write_safetensors(
        &self,
        w: &mut (impl Write + Send),
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<()> {
        let io = |e| NzError::io("<output>", e);
        let source = &self.header.source_header;
        w.write_all(&(source.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(source).map_err(io)?;
        self.for_each_block(|_, _, bytes| {
            w.write_all(bytes).map_err(io)?;
            progress(bytes.len() as u64);
            Ok(())
        })
    }
}

/// A batch of `for_each_block`: its blocks (tensor, block, bytes), their decode results and their bytes.
#[derive(Default)]
struct Batch {
    blocks: Vec<(usize, usize, usize)>,
    results: Vec<Result<()>>,
    buffer: Vec<u8>,
}

impl Batch {
    /// Hands the decoded blocks to `sink` in order, stopping at the first error; leaves the batch empty.
    fn consume(&mut self, sink: &mut impl FnMut(usize, usize, &[u8]) -> Result<()>) -> Result<()> {
        let mut start = 0;
        let results = std::mem::take(&mut self.results);
        for (&(t, k, len), result) in self.blocks.iter().zip(results) {
            result?;
            sink(t, k, &self.buffer[start..start + len])?;
            start += len;
        }
        self.blocks.clear();
        Ok(())
    }
}

/// Most decoded bytes one batch of `for_each_block` holds (a single larger block is still decoded alone);
/// two batches are alive at once. Small, because a one-shot `decompress` pays a page fault for every fresh
/// 4 KiB of them (16 MiB batches: 9,500 faults and 1.2x `zstd -d`'s wall time on MiniLM bf16; 4 MiB: 4,200 and
/// 0.8-0.9x), while repeated decodes reuse them and, with a few dozen blocks per batch, keep both threads busy.
pub const DECODE_BATCH_BYTES: u64 = 4 << 20;

/// Decodes zstd block `k` of tensor `name` into `out` (exactly the block's bytes): one frame that ends where the
/// payload ends (spec: block modes), giving exactly `out.len()` bytes. The GPU loader decodes zstd blocks on the
/// host with it too.
pub fn decode_zstd_block(name: &str, k: usize, payload: &[u8], out: &mut [u8]) -> Result<()> {
    let corrupt = |what: String| NzError::CorruptBlock {
        tensor: name.to_string(),
        block: k,
        what,
    };
    match zstd::zstd_safe::find_frame_compressed_size(payload) {
        Ok(len) if len == payload.len() => {}
        _ => return Err(corrupt("zstd payload is not exactly one frame".into())),
    }
    let mut z = zstd::bulk::Decompressor::new().map_err(|e| corrupt(e.to_string()))?;
    let written = z
        .decompress_to_buffer(payload, out)
        .map_err(|e| corrupt(format!("zstd: {e}")))?;
    if written != out.len() {
        return Err(corrupt(format!(
            "zstd gave {written} bytes, expected {}",
            out.len()
        )));
    }
    Ok(())
}

fn check_len(tensor: &TensorEntry, expected: usize, found: usize) -> Result<()> {
    if expected != found {
        return Err(NzError::BufferSize {
            tensor: tensor.name.clone(),
            expected,
            found,
        });
    }
    Ok(())
}
