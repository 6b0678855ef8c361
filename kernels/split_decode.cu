// Decodes the blocks of one .nzt tensor on the GPU: `split` and `split_local` blocks (rANS-coded fields plus
// bit-packed raw fields, format-spec/nzt.md sections 12 to 14), `lossy` blocks (section 13.3: the narrow codes
// are decoded as a split layout of one rANS and one raw field, then each is expanded to the dtype's bits) and
// `raw` blocks (a copy). `zstd` blocks are skipped here; the host decodes them.
//
// One warp decodes one block; lane j of the warp is rANS lane j. A CTA holds WARPS warps (the launch's
// blockDim.x / 32) decoding consecutive blocks of the same tensor, and shares the tensor's decoding tables,
// which it expands once into shared memory. A split_local block's own tables are expanded by its warp into the
// warp's private part of shared memory.
//
// The host describes the tensor with three u32 arrays (src/gpu/layout.rs writes them; src/gpu/twin.rs is this
// kernel's CPU twin and reads the same arrays):
//   descs[8 * k ..]: block k: mode, n, body offset (lo, hi), body length, layout offset, output offset (lo, hi)
//   layouts[off ..]: field_count, rans_count, then per field: (width | coding << 8 | shift << 16), table ref
//                    (table ref: a word offset into tables; in a block's own layout, TENSOR_TABLE | t instead
//                    borrows the tensor's t-th rANS table. Blocks whose layout is the tensor's use its tables.)
//                    A lossy tensor's layout has two more words after its fields: exp_bits | man_bits << 8 |
//                    kept << 16 | stored << 24 (E, M, K and k = max(K, 1)), then norm_block (B).
//   tables[off ..]:  prob_bits, symbol_bits, listed count C, then C pairs (symbol, (freq - 1) << 16 | cum)
// A lossy block's body offset points past its scale bytes, which start align4(ceil(n / B)) bytes before it.
// A table expands to slot_sym[2^P] (u16, the symbol of each slot) and sym_info[2^w] (u32, (freq - 1) << 16 | cum).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define DESC_WORDS 8
#define MODE_RAW 0
#define MODE_SPLIT 2
#define MODE_SPLIT_LOCAL 3
#define MODE_LOSSY 4
#define CODING_RANS 1
#define TENSOR_TABLE 0x80000000u
#define MAX_FIELDS 8
#define STATE_LOWER 65536u
#define RANS_HEADER_BYTES 132u

#define STATUS_OK 0u
#define STATUS_STATE_BELOW_L 1u
#define STATUS_STREAM_ENDS_EARLY 2u
#define STATUS_WORDS_LEFT_OVER 3u
#define STATUS_FINAL_STATE 4u
#define STATUS_WRONG_KERNEL 5u

__device__ __forceinline__ u32 align4(u32 x) { return (x + 3u) & ~3u; }

// Bytes of shared memory one expanded table takes (the u16 slot array padded to 4 bytes).
__device__ __forceinline__ u32 table_smem_bytes(u32 prob_bits, u32 symbol_bits) {
    return align4(2u << prob_bits) + (4u << symbol_bits);
}

// Expands a listed-symbol table into slot_sym / sym_info; threads tid, tid + nthreads, ... share the work.
__device__ void expand_table(const u32 *table, u8 *smem, u32 tid, u32 nthreads) {
    u32 prob_bits = table[0];
    u32 listed = table[2];
    const u32 *entries = table + 3;
    u16 *slot_sym = (u16 *)smem;
    u32 *sym_info = (u32 *)(smem + align4(2u << prob_bits));
    for (u32 k = tid; k < listed; k += nthreads) {
        sym_info[entries[2 * k]] = entries[2 * k + 1];
    }
    u32 slots = 1u << prob_bits;
    for (u32 slot = tid; slot < slots; slot += nthreads) {
        // The last listed symbol whose cum is <= slot (cums increase with the listing order).
        u32 lo = 0, hi = listed - 1;
        while (lo < hi) {
            u32 mid = (lo + hi + 1) >> 1;
            if ((entries[2 * mid + 1] & 0xFFFFu) <= slot) lo = mid; else hi = mid - 1;
        }
        slot_sym[slot] = (u16)entries[2 * lo];
    }
}

__device__ __forceinline__ void store_element(u8 *out, u32 elem_bytes, u64 value) {
    switch (elem_bytes) {
        case 1: *out = (u8)value; break;
        case 2: *(u16 *)out = (u16)value; break;
        case 4: *(u32 *)out = (u32)value; break;
        default: *(u64 *)out = value; break;
    }
}

// ---- Lossy codes (format-spec/nzt.md section 13.3.1), the same steps as `Quantizer::dequantize` in
// src/codec/lossy.rs, in f64 as there. Every step is exact in f64 (a narrow value has at most 24 significant bits,
// a scale 9, their product 33; divisions are by powers of two; rint is exact), so the result does not depend on
// evaluation order; the _rn intrinsics still keep the compiler from contracting anything into an FMA.

// A lossy tensor's dtype, narrow format and group size; scales point at the block's scale bytes.
struct LossyFormat {
    u32 exp_bits, man_bits;   // the dtype's E and M
    u32 kept, stored;         // K, and k = max(K, 1) stored mantissa bits
    u32 norm_block;           // B: 0 = no normalization
    const u8 *scales;
};

// 2^k for -1022 <= k <= 1023.
__device__ __forceinline__ double lossy_pow2(int k) { return __longlong_as_double((long long)(k + 1023) << 52); }

// floor(log2(v)) of a positive normal double.
__device__ __forceinline__ int lossy_floor_log2(double v) {
    return (int)((__double_as_longlong(v) >> 52) & 0x7FF) - 1023;
}

__device__ __forceinline__ int lossy_bias(u32 exp_bits) { return (1 << (exp_bits - 1)) - 1; }

// The magnitude of finite exponent and mantissa fields of a format with exp_bits / man_bits.
__device__ __forceinline__ double lossy_value(u32 exp_bits, u32 man_bits, u32 exp, u32 man) {
    u32 significand = exp == 0 ? man : (1u << man_bits) + man;
    int e = (int)(exp > 1u ? exp : 1u) - lossy_bias(exp_bits) - (int)man_bits;
    return __dmul_rn(__uint2double_rn(significand), lossy_pow2(e));
}

// Rounds v >= 0 to the dtype's grid (subnormals included), ties to even; man_bits >= 1 here.
__device__ __forceinline__ double lossy_round(u32 exp_bits, u32 man_bits, double v) {
    if (v == 0.0) return 0.0;
    int emin = 1 - lossy_bias(exp_bits);
    int e = lossy_floor_log2(v);
    if (e < emin) e = emin;
    double quantum = lossy_pow2(e - (int)man_bits);
    double steps = __ddiv_rn(v, quantum);
    return __dmul_rn(rint(steps), quantum);
}

// The dtype bits of an element from its narrow code (spec: decode_element).
__device__ __forceinline__ u64 lossy_expand(const LossyFormat &f, u32 code, u32 i) {
    const u32 fe = f.exp_bits, fm = f.man_bits, k = f.stored;
    const u32 all_ones = (1u << fe) - 1u;
    const u64 sign = (code >> (fe + k)) & 1u;
    const u32 exp = (code >> k) & all_ones;
    const u32 field = code & ((1u << k) - 1u);
    const u64 head = sign << (fe + fm);
    if (exp == all_ones) {   // Inf or NaN
        u32 man = field == 0 ? 0u : field << (fm - k);
        return head | ((u64)exp << fm) | man;
    }
    const u32 m = field >> (k - f.kept);
    if (f.norm_block == 0) return head | ((u64)exp << fm) | ((u64)m << (fm - f.kept));
    const double scale = __dadd_rn(1.0, __ddiv_rn(__uint2double_rn(f.scales[i / f.norm_block]), 256.0));
    const double v = __dmul_rn(lossy_value(fe, f.kept, exp, m), scale);
    const int bias = lossy_bias(fe);
    const double max_finite = __dmul_rn(2.0 - lossy_pow2(-(int)fm), lossy_pow2(bias));
    double rounded = lossy_round(fe, fm, v);
    if (rounded > max_finite) rounded = max_finite;
    u32 e_field, m_field;
    const int emin = 1 - bias;
    if (rounded < lossy_pow2(emin)) {
        e_field = 0;
        m_field = (u32)__ddiv_rn(rounded, lossy_pow2(emin - (int)fm));
    } else {
        const int e = lossy_floor_log2(rounded);
        e_field = (u32)(e + bias);
        m_field = (u32)__ddiv_rn(rounded, lossy_pow2(e - (int)fm)) - (1u << fm);
    }
    return head | ((u64)e_field << fm) | m_field;
}

// The per-field values of a block's layout, in field order within each kind.
struct Fields {
    const u8 *rans_table[MAX_FIELDS];
    u32 rans_prob_bits[MAX_FIELDS];
    u32 rans_shift[MAX_FIELDS];
    u32 raw_width[MAX_FIELDS];
    u32 raw_shift[MAX_FIELDS];
    u32 plane_start[MAX_FIELDS];
};

// The decoding steps of one block (the warp's lanes, 32 elements per step). R and W are the numbers of rANS and
// raw fields when fixed at compile time, or -1 for the run-time counts `rans_count` and `raw_count`. Returns
// STATUS_OK, or STATUS_STREAM_ENDS_EARLY (the same value in every lane). With LOSSY, the fields make a narrow code,
// which is expanded to the dtype's bits before it is stored.
template <int R, int W, bool LOSSY>
__device__ __forceinline__ u32 decode_steps(const Fields &fs, u32 rans_count, u32 raw_count, const u8 *body,
                                            const u16 *words, u32 word_count, u32 &x, u32 &pos, u32 n,
                                            u32 lane, u32 lanes_below, u8 *dst, u32 elem_bytes,
                                            const LossyFormat &lossy) {
    const u32 nr = R >= 0 ? (u32)R : rans_count;
    const u32 nw = W >= 0 ? (u32)W : raw_count;
    const u32 steps = (n + 31u) >> 5;
    for (u32 t = 0; t < steps; ++t) {
        const u32 i = (t << 5) + lane;
        const bool active = i < n;
        u64 value = 0;
#pragma unroll
        for (u32 q = 0; q < nr; ++q) {
            const u32 prob_bits = fs.rans_prob_bits[q];
            const u16 *slot_sym = (const u16 *)fs.rans_table[q];
            const u32 *sym_info = (const u32 *)(fs.rans_table[q] + align4(2u << prob_bits));
            bool need = false;
            if (active) {
                u32 slot = x & ((1u << prob_bits) - 1u);
                u32 symbol = slot_sym[slot];
                u32 info = sym_info[symbol];
                x = ((info >> 16) + 1u) * (x >> prob_bits) + slot - (info & 0xFFFFu);
                value |= (u64)symbol << fs.rans_shift[q];
                need = x < STATE_LOWER;
            }
            u32 mask = __ballot_sync(0xFFFFFFFFu, need);
            u32 taken = __popc(mask);
            if (pos + taken > word_count) return STATUS_STREAM_ENDS_EARLY;
            if (need) x = (x << 16) | words[pos + __popc(mask & lanes_below)];
            pos += taken;
        }
        if (!active) continue;
#pragma unroll
        for (u32 q = 0; q < nw; ++q) {
            const u32 width = fs.raw_width[q];
            const u32 *plane = (const u32 *)(body + fs.plane_start[q]);
            const u64 bit = (u64)i * width;
            const u32 word = (u32)(bit >> 5), offset = (u32)(bit & 31u);
            u64 v = plane[word] >> offset;
            if (offset + width > 32u) v |= (u64)plane[word + 1] << (32u - offset);
            v &= (width == 32u) ? 0xFFFFFFFFull : ((1ull << width) - 1ull);
            value |= v << fs.raw_shift[q];
        }
        if (LOSSY) value = lossy_expand(lossy, (u32)value, i);
        store_element(dst + (u64)i * elem_bytes, elem_bytes, value);
    }
    return STATUS_OK;
}

// The body of both entry points. The lossless kernel (LOSSY_KERNEL false) decodes split and split_local blocks,
// the lossy kernel lossy blocks; both copy raw blocks and skip zstd ones. Two entries, so the lossy expansion's
// f64 registers do not weigh on the lossless kernel's occupancy.
template <bool LOSSY_KERNEL>
__device__ __forceinline__ void decode_blocks(
    const u8 *__restrict__ payload,     // the tensor's payload range, as in the file
    const u32 *__restrict__ descs,
    u32 block_count,
    const u32 *__restrict__ layouts,
    const u32 *__restrict__ tables,
    u32 tensor_layout,                  // offset of the tensor's own layout in layouts, or ~0 if it has none
    u32 tensor_smem_bytes,              // shared bytes of the tensor's expanded tables
    u32 local_smem_bytes,               // shared bytes each warp reserves for its block's own tables
    u32 elem_bytes,
    u8 *__restrict__ out,
    u32 *__restrict__ status) {
    extern __shared__ __align__(16) u8 smem[];
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 warps = blockDim.x >> 5;

    // 1. The CTA expands the tensor's tables once.
    if (tensor_layout != 0xFFFFFFFFu) {
        const u32 *layout = layouts + tensor_layout;
        u32 offset = 0;
        for (u32 f = 0; f < layout[0]; ++f) {
            u32 field = layout[2 + 2 * f];
            if (((field >> 8) & 0xFFu) != CODING_RANS) continue;
            const u32 *table = tables + layout[3 + 2 * f];
            expand_table(table, smem + offset, threadIdx.x, blockDim.x);
            offset += table_smem_bytes(table[0], table[1]);
        }
    }
    __syncthreads();

    const u32 k = blockIdx.x * warps + warp;
    if (k >= block_count) return;
    const u32 *desc = descs + DESC_WORDS * k;
    const u32 mode = desc[0];
    const u32 n = desc[1];
    const u8 *body = payload + ((u64)desc[3] << 32 | desc[2]);
    u8 *dst = out + ((u64)desc[7] << 32 | desc[6]);

    if (mode == MODE_RAW) {
        // 16 bytes per lane when both ends allow it (payloads are 16-byte aligned in the file), else bytes.
        u32 done = 0;
        if ((((u64)body | (u64)dst) & 15u) == 0) {
            done = n & ~15u;
            for (u32 b = 16 * lane; b < done; b += 16 * 32) *(uint4 *)(dst + b) = *(const uint4 *)(body + b);
        }
        for (u32 b = done + lane; b < n; b += 32) dst[b] = body[b];
        if (lane == 0) status[k] = STATUS_OK;
        return;
    }
    if (mode != MODE_SPLIT && mode != MODE_SPLIT_LOCAL && mode != MODE_LOSSY) {
        if (lane == 0) status[k] = STATUS_OK;   // zstd: decoded by the host
        return;
    }
    if ((mode == MODE_LOSSY) != LOSSY_KERNEL) {
        if (lane == 0) status[k] = STATUS_WRONG_KERNEL;   // the host launched the other entry point
        return;
    }

    // 2. Resolve each field: rANS fields get their expanded table (the tensor's, or this warp's own copy).
    const u32 *layout = layouts + desc[5];
    const u32 field_count = layout[0];
    const u32 rans_count = layout[1];
    u8 *local = smem + tensor_smem_bytes + warp * local_smem_bytes;
    Fields fs;
    u32 raw_count = 0;
    u32 r = 0;
    u32 local_offset = 0;
    for (u32 f = 0; f < field_count; ++f) {
        u32 field = layout[2 + 2 * f];
        u32 width = field & 0xFFu;
        u32 shift = field >> 16;
        if (((field >> 8) & 0xFFu) != CODING_RANS) {
            fs.raw_width[raw_count] = width;
            fs.raw_shift[raw_count] = shift;
            ++raw_count;
            continue;
        }
        u32 ref = layout[3 + 2 * f];
        if (desc[5] == tensor_layout || (ref & TENSOR_TABLE)) {
            // The tensor's t-th table, expanded by the CTA: its own (a split block) or a borrowed one. Skip the
            // expanded tables before it.
            const u32 *tensor = layouts + tensor_layout;
            u32 t = desc[5] == tensor_layout ? r : (ref & ~TENSOR_TABLE), seen = 0, offset = 0;
            for (u32 g = 0; g < tensor[0]; ++g) {
                if (((tensor[2 + 2 * g] >> 8) & 0xFFu) != CODING_RANS) continue;
                const u32 *table = tables + tensor[3 + 2 * g];
                if (seen == t) {
                    fs.rans_table[r] = smem + offset;
                    fs.rans_prob_bits[r] = table[0];
                    break;
                }
                offset += table_smem_bytes(table[0], table[1]);
                ++seen;
            }
        } else {
            const u32 *table = tables + ref;
            expand_table(table, local + local_offset, lane, 32);
            fs.rans_table[r] = local + local_offset;
            fs.rans_prob_bits[r] = table[0];
            local_offset += table_smem_bytes(table[0], table[1]);
        }
        fs.rans_shift[r] = shift;
        ++r;
    }
    __syncwarp();
    LossyFormat lossy = {0, 0, 0, 0, 0, 0};
    if (LOSSY_KERNEL) {
        const u32 format = layout[2 + 2 * field_count];
        lossy.exp_bits = format & 0xFFu;
        lossy.man_bits = (format >> 8) & 0xFFu;
        lossy.kept = (format >> 16) & 0xFFu;
        lossy.stored = format >> 24;
        lossy.norm_block = layout[3 + 2 * field_count];
        const u32 groups = lossy.norm_block == 0 ? 0u : (n + lossy.norm_block - 1u) / lossy.norm_block;
        lossy.scales = body - align4(groups);
    }

    // 3. The rANS part: states, word count, the shared word stream.
    u32 x = 0, word_count = 0, pos = 0, planes = 0;
    const u16 *words = 0;
    if (rans_count > 0) {
        x = ((const u32 *)body)[lane];
        word_count = ((const u32 *)body)[32];
        words = (const u16 *)(body + RANS_HEADER_BYTES);
        planes = align4(RANS_HEADER_BYTES + 2u * word_count);
        if (__ballot_sync(0xFFFFFFFFu, x < STATE_LOWER) != 0) {
            if (lane == 0) status[k] = STATUS_STATE_BELOW_L;
            return;
        }
    }
    for (u32 q = 0; q < raw_count; ++q) {
        fs.plane_start[q] = planes;
        planes = align4(planes + (u32)(((u64)n * fs.raw_width[q] + 7u) >> 3));
    }

    // 4. Steps of 32 elements, with the field counts fixed at compile time for the common layouts (their
    //    per-field values then live in registers).
    const u32 lanes_below = (1u << lane) - 1u;
    // The layouts the reference encoder writes most (MiniLM: bf16 and f16 use (1, 1) and (2, 0), f32 (1, 3)
    // and (2, 2); lossy blocks (1, 1) and (1, 0)); any other goes through the general loop.
#define DECODE_STEPS(R, W, L)                                                                            \
    decode_steps<R, W, L>(fs, rans_count, raw_count, body, words, word_count, x, pos, n, lane, lanes_below, \
                          dst, elem_bytes, lossy)
    u32 code;
    if (LOSSY_KERNEL) {
        if (rans_count == 1 && raw_count == 1) {
            code = DECODE_STEPS(1, 1, true);
        } else if (rans_count == 1 && raw_count == 0) {
            code = DECODE_STEPS(1, 0, true);
        } else {
            code = DECODE_STEPS(-1, -1, true);
        }
    } else if (rans_count == 1 && raw_count == 1) {
        code = DECODE_STEPS(1, 1, false);
    } else if (rans_count == 2 && raw_count == 0) {
        code = DECODE_STEPS(2, 0, false);
    } else if (rans_count == 1 && raw_count == 3) {
        code = DECODE_STEPS(1, 3, false);
    } else if (rans_count == 2 && raw_count == 2) {
        code = DECODE_STEPS(2, 2, false);
    } else if (rans_count == 1 && raw_count == 2) {
        code = DECODE_STEPS(1, 2, false);
    } else if (rans_count == 1 && raw_count == 0) {
        code = DECODE_STEPS(1, 0, false);
    } else {
        code = DECODE_STEPS(-1, -1, false);
    }
#undef DECODE_STEPS
    if (code != STATUS_OK) {
        if (lane == 0) status[k] = code;
        return;
    }

    // 5. End checks: every word consumed, every lane back at 2^16.
    u32 result = STATUS_OK;
    if (rans_count > 0) {
        if (pos != word_count) result = STATUS_WORDS_LEFT_OVER;
        else if (__ballot_sync(0xFFFFFFFFu, x != STATE_LOWER) != 0) result = STATUS_FINAL_STATE;
    }
    if (lane == 0) status[k] = result;
}

#define DECODE_KERNEL_PARAMS                                                                                 \
    const u8 *__restrict__ payload, const u32 *__restrict__ descs, u32 block_count,                          \
        const u32 *__restrict__ layouts, const u32 *__restrict__ tables, u32 tensor_layout,                  \
        u32 tensor_smem_bytes, u32 local_smem_bytes, u32 elem_bytes, u8 *__restrict__ out,                   \
        u32 *__restrict__ status
#define DECODE_KERNEL_ARGS                                                                                   \
    payload, descs, block_count, layouts, tables, tensor_layout, tensor_smem_bytes, local_smem_bytes,       \
        elem_bytes, out, status

// Tensors of codec float_split (and stored).
extern "C" __global__ void nzt_decode_blocks(DECODE_KERNEL_PARAMS) {
    decode_blocks<false>(DECODE_KERNEL_ARGS);
}

// Tensors of codec lossy: the same arguments.
extern "C" __global__ void nzt_decode_lossy_blocks(DECODE_KERNEL_PARAMS) {
    decode_blocks<true>(DECODE_KERNEL_ARGS);
}
