#!/usr/bin/env python3
"""An independent decoder of the lossy codec, written from format-spec/nzt.md (sections 4-10, 12.3, 13.3, 14.2)
and nothing else, to check that text against the reference implementation.

    python3 scripts/spec_lossy_decode.py fixtures/golden/lossy.nzt fixtures/golden/lossy.decoded.safetensors

decodes every `lossy` and `raw` block of the .nzt file and compares each tensor with the same tensor of the
expected safetensors file, byte for byte. Standard library only; exact rational arithmetic for the values.
"""

import json
import struct
import sys
from fractions import Fraction

FORMATS = {9: ("F16", 5, 10, 2), 10: ("BF16", 8, 7, 2), 11: ("F32", 8, 23, 4)}


def u(b, off, n):
    return int.from_bytes(b[off:off + n], "little")


class Bits:
    """LSB-first bit reader (section 2.5)."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def bit(self):
        v = (self.data[self.pos >> 3] >> (self.pos & 7)) & 1
        self.pos += 1
        return v

    def gamma(self):
        zeros = 0
        while self.bit() == 0:
            zeros += 1
        v = 1 << zeros
        for i in range(zeros):
            v |= self.bit() << i
        return v


def freq_table(b, off, width):
    """Section 12.3: returns ({symbol: (freq, cum)}, P, length)."""
    p, count = b[off], u(b, off + 1, 2)
    bits = Bits(b[off + 3:])
    table, nxt, cum = {}, 0, 0
    for _ in range(count):
        s = nxt + bits.gamma() - 1
        f = bits.gamma()
        table[s] = (f, cum)
        cum += f
        nxt = s + 1
    assert cum == 1 << p and max(table) < 1 << width
    return table, p, 3 + (bits.pos + 7) // 8


def rans_decode(payload, off, n, table, p):
    """Section 14.2 with one rans field; returns (symbols, end offset)."""
    states = [u(payload, off + 4 * j, 4) for j in range(32)]
    wc = u(payload, off + 128, 4)
    words = [u(payload, off + 132 + 2 * i, 2) for i in range(wc)]
    slot_symbol = [0] * (1 << p)              # slot -> the listed symbol whose range holds it
    for s, (f, c) in table.items():
        slot_symbol[c:c + f] = [s] * f
    out, pos = [0] * n, 0
    for t in range((n + 31) // 32):
        for j in range(32):
            i = 32 * t + j
            if i >= n:
                break
            x = states[j]
            slot = x & ((1 << p) - 1)
            s = slot_symbol[slot]
            f, c = table[s]
            x = f * (x >> p) + slot - c
            if x < 1 << 16:
                x = (x << 16) | words[pos]
                pos += 1
            states[j] = x
            out[i] = s
    assert pos == wc and all(x == 1 << 16 for x in states), "end-of-stream checks"
    return out, off + 132 + 2 * wc


def floor_log2(v):
    """floor(log2(v)) of a positive Fraction, exactly."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    return e if v >= Fraction(2) ** e else e - 1


def grid_round(v, e_bits, m_bits):
    """Nearest value of the format's grid to v >= 0, ties to the even pattern (section 13.3.1)."""
    bias = (1 << (e_bits - 1)) - 1
    emin = 1 - bias
    if v == 0:
        return Fraction(0)
    e = max(floor_log2(v), emin)
    q = Fraction(2) ** (e - m_bits)
    steps = v / q
    lo = steps.numerator // steps.denominator
    below, above = lo * q, (lo + 1) * q
    if v - below != above - v:
        return below if v - below < above - v else above
    return below if pattern(below, e_bits, m_bits) % 2 == 0 else above


def pattern(v, e_bits, m_bits):
    """(exponent << m_bits) | mantissa of a grid value v >= 0."""
    bias = (1 << (e_bits - 1)) - 1
    emin = 1 - bias
    if v < Fraction(2) ** emin:
        return int(v / Fraction(2) ** (emin - m_bits))
    e = floor_log2(v)
    return ((e + bias) << m_bits) | (int(v / Fraction(2) ** (e - m_bits)) - (1 << m_bits))


def narrow_value(exp, man, k, bias):
    emin = 1 - bias
    if exp == 0:
        return man * Fraction(2) ** (emin - k)
    return ((1 << k) + man) * Fraction(2) ** (exp - bias - k)


def decode_lossy(params, dtype, payload, n):
    _, E, M, _ = FORMATS[dtype]
    K, B, h = params[0], u(params, 1, 2), params[3]
    k = max(K, 1)
    W = 1 + E + k
    bias = (1 << (E - 1)) - 1
    table = None
    if h:
        table, p, used = freq_table(params, 4, h)
        assert 4 + used == len(params)
    else:
        assert len(params) == 4
    G = (n + B - 1) // B if B else 0
    scales = payload[:G]
    off = (G + 3) & ~3
    codes = [0] * n
    if h:
        symbols, end = rans_decode(payload, off, n, table, p)
        codes = [s << (W - h) for s in symbols]
        off = (end + 3) & ~3
    r = W - h
    if r:
        plane = Bits(payload[off:])
        for i in range(n):
            codes[i] |= sum(plane.bit() << b for b in range(r))
        off = (off + (n * r + 7) // 8 + 3) & ~3
    assert off == len(payload), "section 13.3.4 size"
    max_m = (2 - Fraction(1, 1 << M)) * Fraction(2) ** bias
    out = []
    for i, code in enumerate(codes):
        s, e, f = code >> (E + k), (code >> k) & ((1 << E) - 1), code & ((1 << k) - 1)
        if e == (1 << E) - 1:
            bits = (s << (E + M)) | (e << M) | (0 if f == 0 else f << (M - k))
        else:
            j = f >> (k - K)
            if B == 0:
                bits = (s << (E + M)) | (e << M) | (j << (M - K))
            else:
                c = 1 + Fraction(scales[i // B], 256)
                z = narrow_value(e, j, K, bias) * c
                v = min(grid_round(z, E, M), max_m)
                bits = (s << (E + M)) | pattern(v, E, M)
        out.append(bits)
    return out


def main(nzt_path, expected_path):
    b = open(nzt_path, "rb").read()
    assert b[:8] == b"\x89NZT\r\n\x1a\n"
    minor, data_offset = u(b, 10, 2), u(b, 32, 8)
    pos = 48
    source_len = u(b, pos, 8)
    pos += 8 + source_len
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
    assert minor == (1 if any(t[2] == 2 for t in tensors) else 0), "R39"

    e = open(expected_path, "rb").read()
    header = json.loads(e[8:8 + u(e, 0, 8)])
    base = 8 + u(e, 0, 8)
    cursor, checked = 0, 0
    for name, dtype, codec, shape, units, params, blocks in tensors:
        elements = 1
        for d in shape:
            elements *= d
        decoded = bytearray()
        for k, (stored_len, mode) in enumerate(blocks):
            align = 64 if k == 0 else 16
            cursor = (cursor + align - 1) // align * align
            payload = b[data_offset + cursor:data_offset + cursor + stored_len]
            cursor += stored_len
            if mode == 0:
                decoded += payload
            elif mode == 4:
                width = FORMATS[dtype][3]
                n = min(units, elements - k * units)
                for v in decode_lossy(params, dtype, payload, n):
                    decoded += v.to_bytes(width, "little")
            else:
                raise SystemExit(f"{name}: block mode {mode} is not handled by this checker")
        start, end = header[name]["data_offsets"]
        assert bytes(decoded) == e[base + start:base + end], f"{name} differs"
        checked += 1
        print(f"{name}: {len(decoded)} bytes identical")
    print(f"OK: {checked} tensors of {nzt_path} (format 1.{minor}) decode to {expected_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
