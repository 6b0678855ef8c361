//! What the GPU decoder is given for one tensor: the file range copied to the device unchanged, and three small
//! `u32` arrays that describe its blocks, field layouts and frequency tables (the layout is documented at the top
//! of `kernels/split_decode.cu`; a lossy tensor's narrow codes are described as a split layout plus its format).
//! Built on the host from the mapped file, with every length the kernel relies on checked here, so the kernel (and
//! its CPU twin, `twin.rs`) only has to check the rANS stream itself.

use std::ops::Range;

use crate::codec::freq::FreqTable;
use crate::codec::lossy::{LossyParams, Quantizer};
use crate::codec::rans::LANES;
use crate::codec::split::{split_local_payload, Coding, SplitParams, RANS_HEADER_BYTES};
use crate::dtype::Dtype;
use crate::error::{NzError, Result};
use crate::format::header::TensorEntry;
use crate::format::{checksum, BlockMode, Codec};

/// `u32` words per block descriptor.
pub const DESC_WORDS: usize = 8;
/// Table reference flag: "the tensor's table number `ref & !TENSOR_TABLE`" (expanded once per CTA).
pub const TENSOR_TABLE: u32 = 0x8000_0000;
/// `tensor_layout` when the tensor has no parameters (codec `stored`).
pub const NO_LAYOUT: u32 = u32::MAX;
/// Most warps (blocks decoded at once) per CTA.
pub const MAX_WARPS_PER_CTA: u32 = 8;

/// Per-block result codes written by the kernel (0 is success).
pub const STATUS_OK: u32 = 0;
pub const STATUS_STATE_BELOW_L: u32 = 1;
pub const STATUS_STREAM_ENDS_EARLY: u32 = 2;
pub const STATUS_WORDS_LEFT_OVER: u32 = 3;
pub const STATUS_FINAL_STATE: u32 = 4;
/// A block of a mode the launched entry point does not decode (a host bug, never the file's fault).
pub const STATUS_WRONG_KERNEL: u32 = 5;

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// Shared-memory bytes of one expanded table: `slot_sym: u16[2^P]` (padded to 4 bytes), `sym_info: u32[2^w]`.
pub fn table_smem_bytes(prob_bits: u32, symbol_bits: u32) -> u32 {
    (align4(2usize << prob_bits) + (4usize << symbol_bits)) as u32
}

/// One tensor, ready for the kernel.
#[derive(Clone, Debug)]
pub struct TensorLayout {
    pub name: String,
    pub dtype: Dtype,
    /// Bytes per unit: the element size for `float_split`, 1 for `stored`.
    pub unit_bytes: u32,
    /// Decoded bytes.
    pub byte_len: u64,
    /// File range copied to the device: from the first block's payload to the end of the last one.
    pub payload: Range<u64>,
    /// `DESC_WORDS` words per block: mode, n, body offset (lo, hi) in the payload range, body length,
    /// layout offset, output byte offset (lo, hi).
    pub descs: Vec<u32>,
    /// Field layouts: field_count, rans_count, then per field `(width | coding << 8 | shift << 16, table ref)`.
    pub layouts: Vec<u32>,
    /// Tables: prob_bits, symbol_bits, listed count, then per listed symbol `(symbol, (freq - 1) << 16 | cum)`.
    pub tables: Vec<u32>,
    /// Offset of the tensor's own layout in `layouts`, or `NO_LAYOUT`.
    pub tensor_layout: u32,
    /// Shared bytes of the tensor's expanded tables (once per CTA).
    pub tensor_smem_bytes: u32,
    /// Shared bytes each warp reserves for its block's own tables (the most any block needs).
    pub local_smem_bytes: u32,
    /// Blocks in mode `zstd`, which the host decodes.
    pub zstd_blocks: Vec<usize>,
    /// Codec `lossy`: decoded by the kernel's lossy entry point (`nzt_decode_lossy_blocks`).
    pub lossy: bool,
}

impl TensorLayout {
    pub fn block_count(&self) -> usize {
        self.descs.len() / DESC_WORDS
    }

    /// Bytes of the three descriptor arrays (device memory besides the payload).
    pub fn metadata_bytes(&self) -> u64 {
        4 * (self.descs.len() + self.layouts.len() + self.tables.len()) as u64
    }

    /// Output byte range of block `k`.
    pub fn block_output(&self, k: usize) -> Range<usize> {
        let d = &self.descs[k * DESC_WORDS..(k + 1) * DESC_WORDS];
        let start = (d[6] as u64 | (d[7] as u64) << 32) as usize;
        let n = d[1] as usize;
        let len = if d[0] == BlockMode::Raw as u32 || d[0] == BlockMode::Zstd as u32 {
            n
        } else {
            n * self.unit_bytes as usize
        };
        start..start + len
    }

    /// File range of block `k`'s whole payload (used for host-decoded zstd blocks).
    pub fn block_file_range(&self, k: usize) -> Range<usize> {
        let d = &self.descs[k * DESC_WORDS..(k + 1) * DESC_WORDS];
        let start = self.payload.start + (d[2] as u64 | (d[3] as u64) << 32);
        start as usize..(start + d[4] as u64) as usize
    }

    /// Warps per CTA that fit `smem_limit` bytes of shared memory, at most `MAX_WARPS_PER_CTA`; None if even one
    /// warp does not fit.
    pub fn warps_per_cta(&self, smem_limit: u32) -> Option<u32> {
        let free = smem_limit.checked_sub(self.tensor_smem_bytes)?;
        let warps = match self.local_smem_bytes {
            0 => MAX_WARPS_PER_CTA,
            local => (free / local).min(MAX_WARPS_PER_CTA),
        };
        (warps >= 1).then_some(warps)
    }

    /// Dynamic shared memory for a CTA of `warps` warps.
    pub fn smem_bytes(&self, warps: u32) -> u32 {
        self.tensor_smem_bytes + warps * self.local_smem_bytes
    }

    /// Builds the layout of `tensor` from the mapped `file`, checking every block's length against its contents
    /// (and, if `verify_checksums`, its XXH3-64).
    pub fn build(
        file: &[u8],
        tensor: &TensorEntry,
        verify_checksums: bool,
    ) -> Result<TensorLayout> {
        let payload = match (tensor.blocks.first(), tensor.blocks.last()) {
            (Some(first), Some(last)) => first.offset..last.offset + last.stored_len as u64,
            _ => 0..0,
        };
        let mut layout = TensorLayout {
            name: tensor.name.clone(),
            dtype: tensor.dtype,
            unit_bytes: tensor.unit_bytes() as u32,
            byte_len: tensor.byte_len(),
            payload: payload.clone(),
            descs: Vec::with_capacity(tensor.blocks.len() * DESC_WORDS),
            layouts: Vec::new(),
            tables: Vec::new(),
            tensor_layout: NO_LAYOUT,
            tensor_smem_bytes: 0,
            local_smem_bytes: 0,
            zstd_blocks: Vec::new(),
            lossy: tensor.codec == Codec::Lossy,
        };
        let mut lossy_params = None;
        let tensor_params = match tensor.codec {
            Codec::Stored => None,
            Codec::FloatSplit => {
                let params = SplitParams::parse(&tensor.params, tensor.dtype).map_err(|e| {
                    NzError::malformed(format!("'{}': params: {}", tensor.name, e.0))
                })?;
                layout.tensor_layout = layout.layouts.len() as u32;
                layout.push_layout(&params, &[])?;
                layout.tensor_smem_bytes = params
                    .tables
                    .iter()
                    .map(|t| table_smem_bytes(t.prob_bits, t.symbol_bits))
                    .sum();
                Some(params)
            }
            Codec::Codebook => return Err(codebook_unsupported(&tensor.name)),
            Codec::Lossy => {
                let bad =
                    |what: String| NzError::malformed(format!("'{}': params: {what}", tensor.name));
                let params =
                    LossyParams::parse(&tensor.params, tensor.dtype).map_err(|e| bad(e.0))?;
                let quantizer = params
                    .quantizer(tensor.dtype)
                    .ok_or_else(|| bad("lossy settings do not fit the dtype".into()))?;
                layout.tensor_layout = layout.layouts.len() as u32;
                layout.tensor_smem_bytes = layout.push_lossy_layout(&params, &quantizer);
                lossy_params = Some((params, quantizer));
                None
            }
        };
        for (k, block) in tensor.blocks.iter().enumerate() {
            let corrupt = |what: String| NzError::CorruptBlock {
                tensor: tensor.name.clone(),
                block: k,
                what,
            };
            // The header parser checked that every payload lies inside the file.
            let bytes = file
                .get(block.offset as usize..block.offset as usize + block.stored_len as usize)
                .ok_or_else(|| corrupt("payload outside the file".into()))?;
            if verify_checksums {
                let computed = checksum(bytes);
                if computed != block.checksum {
                    return Err(NzError::ChecksumMismatch {
                        what: format!("tensor '{}' block {k}", tensor.name),
                        stored: block.checksum,
                        computed,
                    });
                }
            }
            let out = tensor.block_range(k);
            let n_units = out.len() / layout.unit_bytes as usize;
            let in_range = block.offset - payload.start;
            let (mode, n, body_start, body_len, layout_offset) = match (block.mode, &tensor_params)
            {
                (BlockMode::Raw, _) => (BlockMode::Raw, out.len(), 0, bytes.len(), 0),
                (BlockMode::Zstd, _) => {
                    layout.zstd_blocks.push(k);
                    (BlockMode::Zstd, out.len(), 0, bytes.len(), 0)
                }
                (BlockMode::Split, Some(params)) => {
                    check_body(params, bytes, n_units).map_err(corrupt)?;
                    (
                        BlockMode::Split,
                        n_units,
                        0,
                        bytes.len(),
                        layout.tensor_layout,
                    )
                }
                (BlockMode::SplitLocal, Some(tensor_params)) => {
                    let local_error = |e: crate::codec::freq::TableError| {
                        corrupt(format!("block params: {}", e.0))
                    };
                    let (param_bytes, body) = split_local_payload(bytes).map_err(local_error)?;
                    let (params, borrowed) =
                        SplitParams::parse_local(param_bytes, tensor.dtype, tensor_params)
                            .map_err(local_error)?;
                    check_body(&params, body, n_units).map_err(corrupt)?;
                    let offset = layout.layouts.len() as u32;
                    let local_smem = layout.push_layout(&params, &borrowed)?;
                    layout.local_smem_bytes = layout.local_smem_bytes.max(local_smem);
                    let body_start = bytes.len() - body.len();
                    (
                        BlockMode::SplitLocal,
                        n_units,
                        body_start,
                        body.len(),
                        offset,
                    )
                }
                (BlockMode::Split | BlockMode::SplitLocal, None) => {
                    return Err(corrupt("split block in a tensor of another codec".into()))
                }
                (BlockMode::Lossy, _) => {
                    let (params, quantizer) = lossy_params.as_ref().ok_or_else(|| {
                        corrupt("lossy block in a tensor of another codec".into())
                    })?;
                    let scales =
                        check_lossy_payload(params, quantizer, bytes, n_units).map_err(corrupt)?;
                    (
                        BlockMode::Lossy,
                        n_units,
                        scales,
                        bytes.len() - scales,
                        layout.tensor_layout,
                    )
                }
                (BlockMode::Codebook, _) => return Err(codebook_unsupported(&tensor.name)),
            };
            let body_offset = in_range + body_start as u64;
            layout.descs.extend_from_slice(&[
                mode as u32,
                n as u32,
                body_offset as u32,
                (body_offset >> 32) as u32,
                body_len as u32,
                layout_offset,
                out.start as u32,
                ((out.start as u64) >> 32) as u32,
            ]);
        }
        Ok(layout)
    }

    /// Appends a field layout; `borrowed[r]` says whether rANS field number `r` uses the tensor's table (block
    /// parameters only). Returns the shared bytes of the tables it appended.
    fn push_layout(&mut self, params: &SplitParams, borrowed: &[bool]) -> Result<u32> {
        let shifts = params.shifts();
        let rans_count = params.tables.len();
        self.layouts.push(params.fields.len() as u32);
        self.layouts.push(rans_count as u32);
        let mut r = 0;
        let mut own_smem = 0;
        for (index, (field, shift)) in params.fields.iter().zip(shifts).enumerate() {
            let word = field.width | (field.coding as u32) << 8 | shift << 16;
            let table_ref = if field.coding == Coding::Rans {
                let reference = if borrowed.get(r).copied().unwrap_or(false) {
                    // The tensor's table for the field at the same index: count its rANS fields before it.
                    TENSOR_TABLE | r_of_tensor_field(&self.layouts, self.tensor_layout, index)?
                } else {
                    let table = &params.tables[r];
                    own_smem += table_smem_bytes(table.prob_bits, table.symbol_bits);
                    self.push_table(table)
                };
                r += 1;
                reference
            } else {
                0
            };
            self.layouts.push(word);
            self.layouts.push(table_ref);
        }
        Ok(own_smem)
    }

    /// Appends a lossy tensor's layout: the narrow code as one rANS field of the top `h` bits (if `h >= 1`) and
    /// one raw field of the other `W - h` (if any), then the format word `E | M << 8 | K << 16 | k << 24` and
    /// the group size `B`. Returns the shared bytes of its table.
    fn push_lossy_layout(&mut self, params: &LossyParams, quantizer: &Quantizer) -> u32 {
        let code_bits = quantizer.code_bits();
        let raw_bits = code_bits - params.coded_bits;
        let fields = (params.table.is_some() as u32) + (raw_bits > 0) as u32;
        self.layouts.push(fields);
        self.layouts.push(params.table.is_some() as u32);
        let mut smem = 0;
        if let Some(table) = &params.table {
            let word = params.coded_bits | (Coding::Rans as u32) << 8 | raw_bits << 16;
            let table_ref = self.push_table(table);
            self.layouts.extend_from_slice(&[word, table_ref]);
            smem = table_smem_bytes(table.prob_bits, table.symbol_bits);
        }
        if raw_bits > 0 {
            self.layouts
                .extend_from_slice(&[raw_bits | (Coding::Raw as u32) << 8, 0]);
        }
        let format = quantizer.format();
        let stored = code_bits - 1 - format.exp_bits;
        self.layouts.push(
            format.exp_bits | format.man_bits << 8 | quantizer.mantissa_bits() << 16 | stored << 24,
        );
        self.layouts.push(quantizer.norm_block());
        smem
    }

    fn push_table(&mut self, table: &FreqTable) -> u32 {
        let offset = self.tables.len() as u32;
        let listed: Vec<u32> = (0..table.freqs.len() as u32)
            .filter(|&s| table.freqs[s as usize] > 0)
            .collect();
        self.tables
            .extend_from_slice(&[table.prob_bits, table.symbol_bits, listed.len() as u32]);
        for s in listed {
            let (freq, cum) = (table.freqs[s as usize], table.cums[s as usize]);
            self.tables.push(s);
            self.tables.push((freq - 1) << 16 | cum);
        }
        offset
    }
}

/// Number of the tensor layout's rANS field `index` among its rANS fields.
fn r_of_tensor_field(layouts: &[u32], tensor_layout: u32, index: usize) -> Result<u32> {
    let base = tensor_layout as usize;
    let rans = |f: usize| (layouts[base + 2 + 2 * f] >> 8) & 0xff == Coding::Rans as u32;
    let count = layouts.get(base).copied().unwrap_or(0) as usize;
    if tensor_layout == NO_LAYOUT || index >= count || !rans(index) {
        return Err(NzError::malformed(format!(
            "block borrows the tensor's table {index}, which does not exist"
        )));
    }
    Ok((0..index).filter(|&f| rans(f)).count() as u32)
}

/// Checks a split body of `n` elements: the rANS header is there and the length is exactly what it declares.
fn check_body(params: &SplitParams, body: &[u8], n: usize) -> std::result::Result<(), String> {
    let word_count = if params.has_rans() {
        let header = body
            .get(..RANS_HEADER_BYTES)
            .ok_or("payload shorter than the rANS header")?;
        let bytes: [u8; 4] = header[LANES * 4..].try_into().expect("4 bytes");
        u32::from_le_bytes(bytes) as usize
    } else {
        0
    };
    // A valid stream reads at most one word per symbol (spec 14.2), which also bounds the size arithmetic.
    if word_count > n * params.tables.len() {
        return Err(format!("{word_count} words for {n} elements"));
    }
    if params.payload_len(n, word_count) != body.len() {
        return Err("payload length does not match its contents".into());
    }
    Ok(())
}

/// Checks a lossy payload of `n` elements (spec section 13.3.4): the rANS header is there and the length is
/// exactly what it declares. Returns the bytes of the scales and their padding, where the rANS part starts.
fn check_lossy_payload(
    params: &LossyParams,
    quantizer: &Quantizer,
    payload: &[u8],
    n: usize,
) -> std::result::Result<usize, String> {
    let scales = align4(quantizer.scale_count(n));
    let mut size = scales;
    if params.coded_bits > 0 {
        let header = payload
            .get(scales..scales + RANS_HEADER_BYTES)
            .ok_or("payload shorter than its scales and rANS header")?;
        let bytes: [u8; 4] = header[LANES * 4..].try_into().expect("4 bytes");
        let word_count = u32::from_le_bytes(bytes) as usize;
        // A valid stream reads at most one word per symbol (spec 14.2), which also bounds the size arithmetic.
        if word_count > n {
            return Err(format!("{word_count} words for {n} elements"));
        }
        size = align4(size + RANS_HEADER_BYTES + 2 * word_count);
    }
    let raw_bits = (quantizer.code_bits() - params.coded_bits) as usize;
    if raw_bits > 0 {
        size = align4(size + (n * raw_bits).div_ceil(8));
    }
    if size != payload.len() {
        return Err("payload length does not match its contents".into());
    }
    Ok(scales)
}

/// The error for a nonzero kernel status of block `k`.
pub fn status_error(name: &str, k: usize, status: u32) -> NzError {
    let what = match status {
        STATUS_STATE_BELOW_L => "initial state below 2^16",
        STATUS_STREAM_ENDS_EARLY => "word stream ends early",
        STATUS_WORDS_LEFT_OVER => "words left over after the last element",
        STATUS_FINAL_STATE => "final state is not the encoder's initial state",
        STATUS_WRONG_KERNEL => "block mode not decoded by the launched kernel",
        _ => "unknown decoder status",
    };
    NzError::CorruptBlock {
        tensor: name.to_string(),
        block: k,
        what: format!("{what} (GPU decoder status {status})"),
    }
}

/// Codebook tensors have no GPU kernel yet.
fn codebook_unsupported(tensor: &str) -> NzError {
    NzError::Gpu {
        what: format!("tensor '{tensor}'"),
        message: "codebook (--codebook-bits) tensors are not decoded on the GPU yet; decode them on the CPU"
            .into(),
    }
}
