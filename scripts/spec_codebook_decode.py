"""An independent decoder of the codebook codec, written from format-spec/nzt.md (sections 9-11, 12.3, 13.4, 14.2),
checking that a .nzt file decodes to an expected safetensors file (the golden pair codebook.nzt and
codebook.decoded.safetensors). Lossless blocks are taken from the source for `raw` blocks only; tensors in any
other lossless mode must be identical to the expected file's, which the reference round trip already tests.

Usage: python3 scripts/spec_codebook_decode.py fixtures/golden/codebook.nzt \
           fixtures/golden/codebook.decoded.safetensors fixtures/golden/modes.safetensors

The binary32 products and the binary16 conversion use numpy (IEEE arithmetic, round to nearest even); the bfloat16
conversion is written out on the bit pattern.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_lossy_decode import freq_table, rans_decode, u  # noqa: E402

DTYPES = {9: ("F16", 2), 10: ("BF16", 2), 11: ("F32", 4)}


def align4(x):
    return (x + 3) & ~3


def f16(bits):
    return np.frombuffer(int(bits).to_bytes(2, "little"), dtype=np.float16)[0]


def to_dtype_bytes(dtype, v):
    """Section 13.4: binary32 `v` rounded to the dtype, ties to even, as little-endian bytes."""
    if dtype == 11:
        return np.float32(v).tobytes()
    if dtype == 9:
        return np.float32(v).astype(np.float16).tobytes()
    bits = int(np.float32(v).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # nearest even; a carry reaches the exponent (Inf)
    return bits.to_bytes(2, "little")


def parse_params(params, shape):
    """Section 13.4.1."""
    cols = shape[-1]
    b, reserved, k, g = params[0], params[1], u(params, 2, 2), u(params, 4, 4)
    t = np.frombuffer(params[8:12], dtype=np.float32)[0]
    assert 1 <= b <= 10 and reserved == 0 and 1 <= k <= 256 and 1 <= g <= cols, "R40"
    assert np.isfinite(t) and t > 0, "R40 tensor_scale"
    pos = 12
    books = [f16(u(params, pos + 2 * i, 2)) for i in range(k << b)]
    assert all(np.isfinite(c) for c in books), "R40 codebook entry"
    pos += 2 * (k << b)
    tables = []
    for _ in range(k):
        flag = params[pos]
        pos += 1
        assert flag in (0, 1), "R40 has_table"
        if flag:
            table, p, used = freq_table(params, pos, b)
            tables.append((table, p))
            pos += used
        else:
            tables.append(None)
    assert pos == len(params), "R40 length"
    return b, k, g, t, books, tables


def decode_codebook_block(params, shape, dtype, payload, n):
    """Section 13.4.2: the block's output bytes."""
    b, k, g, t, books, tables = params
    cols = shape[-1]
    m, groups = n // cols, -(-cols // g)
    ids = list(payload[:m])
    assert all(i < k for i in ids), "R41 cluster id"
    pos = align4(m)
    scales = [f16(u(payload, pos + 2 * i, 2)) for i in range(m * groups)]
    assert all(np.isfinite(s) for s in scales), "R41 scale"
    pos = align4(pos + 2 * m * groups)
    indices = [None] * m
    for c in range(k):
        rows = [r for r in range(m) if ids[r] == c]
        if not rows:
            continue
        assert tables[c] is not None, "R41 row of a cluster without a table"
        table, p = tables[c]
        symbols, end = rans_decode(payload, pos, len(rows) * cols, table, p)
        for i, r in enumerate(rows):
            indices[r] = symbols[i * cols:(i + 1) * cols]
        pos = align4(end)
    assert pos == len(payload), "R41 length"
    out = bytearray()
    for r in range(m):
        book = books[ids[r] << b:(ids[r] + 1) << b]
        for j in range(cols):
            s = np.float32(scales[r * groups + j // g])
            v = np.float32(t) * (s * np.float32(book[indices[r][j]]))
            out += to_dtype_bytes(dtype, v)
    return bytes(out)


def main(nzt_path, expected_path, source_path):
    b = open(nzt_path, "rb").read()
    assert b[:8] == b"\x89NZT\r\n\x1a\n"
    minor, data_offset = u(b, 10, 2), u(b, 32, 8)
    pos = 48
    pos += 8 + u(b, pos, 8)
    count = u(b, pos, 4)
    pos += 4
    tensors = []
    for _ in range(count):
        name_len = u(b, pos, 2)
        name = b[pos + 2:pos + 2 + name_len].decode()
        pos += 2 + name_len
        dtype, codec, rank = b[pos], b[pos + 1], b[pos + 2]
        pos += 3
        shape = [u(b, pos + 8 * i, 8) for i in range(rank)]
        pos += 8 * rank
        units, plen = u(b, pos, 4), u(b, pos + 4, 4)
        params = b[pos + 8:pos + 8 + plen]
        pos += 8 + plen
        nblocks = u(b, pos, 4)
        pos += 4
        blocks = [(u(b, pos + 16 * i, 4), b[pos + 16 * i + 4]) for i in range(nblocks)]
        pos += 16 * nblocks
        tensors.append((name, dtype, codec, shape, units, params, blocks))
    codecs = {t[2] for t in tensors}
    assert minor == (2 if 3 in codecs else 1 if 2 in codecs else 0), "R39"

    e = open(expected_path, "rb").read()
    header = json.loads(e[8:8 + u(e, 0, 8)])
    base = 8 + u(e, 0, 8)
    src = open(source_path, "rb").read()
    src_base = 8 + u(src, 0, 8)
    cursor, decoded_tensors = 0, 0
    for name, dtype, codec, shape, units, params, blocks in tensors:
        start, end = header[name]["data_offsets"]
        expected = e[base + start:base + end]
        if codec != 3:
            # Lossless: the expected file must hold the source's bytes.
            assert expected == src[src_base + start:src_base + end], f"{name} (lossless) differs"
        else:
            assert units % shape[-1] == 0, "R40 block_units"
            parsed = parse_params(params, shape)
        elements = 1
        for d in shape:
            elements *= d
        decoded = bytearray()
        for k, (stored_len, mode) in enumerate(blocks):
            align = 64 if k == 0 else 16
            cursor = (cursor + align - 1) // align * align
            payload = b[data_offset + cursor:data_offset + cursor + stored_len]
            cursor += stored_len
            if codec != 3:
                continue
            assert mode == 5, f"{name}: codebook tensor with block mode {mode}"
            n = min(units, elements - k * units)
            decoded += decode_codebook_block(parsed, shape, dtype, payload, n)
        if codec == 3:
            assert bytes(decoded) == expected, f"{name} differs"
            decoded_tensors += 1
            print(f"{name}: {len(decoded)} bytes identical")
    print(f"OK: {decoded_tensors} codebook tensors of {nzt_path} (format 1.{minor}) decode to {expected_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
