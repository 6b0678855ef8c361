#!/usr/bin/env python3
"""Builds the committed seed corpora under fuzz/seeds/ from fixtures/ (run from the repository root, after
`cargo build --release`). Standard library only; the .nzt seeds are made by the neuzip binary itself.

    python3 fuzz/make_seeds.py [--neuzip target/release/neuzip] [--out fuzz/seeds]

Seeds are kept small (the fixtures' tensors are cut to a few hundred elements) so that every seed directory
together stays well under 1 MB.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
FIX = os.path.join(ROOT, "fixtures")

BITS = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64, "U64": 64,
        "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4,
        "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
# Ids of format-spec/nzt.md section 8.1, in the split_block / split_roundtrip selector order.
SPLIT_DTYPES = ["F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"]
DTYPE_IDS = {name: i for i, name in enumerate(BITS)}


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    data = b[8 + n:]
    meta = header.pop("__metadata__", None)
    tensors = []
    for name, info in header.items():
        s, e = info["data_offsets"]
        tensors.append((name, info["dtype"], info["shape"], data[s:e]))
    tensors.sort(key=lambda t: header[t[0]]["data_offsets"])
    return meta, tensors


def write_st(path, meta, tensors):
    header = {}
    if meta is not None:
        header["__metadata__"] = meta
    blobs, off = [], 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def trim(tensors, keep):
    """Cuts each tensor to its first rows so it holds at most `keep` elements, keeping its rank."""
    out = []
    for name, dtype, shape, raw in tensors:
        count = 1
        for d in shape:
            count *= d
        if count <= keep or not shape:
            out.append((name, dtype, shape, raw))
            continue
        row = count // shape[0]
        rows = max(1, keep // max(row, 1))
        if row > keep:  # one row is already too many: flatten
            new_shape, n = [keep], keep
        else:
            new_shape, n = [rows] + shape[1:], rows * row
        out.append((name, dtype, new_shape, raw[: n * BITS[dtype] // 8]))
    return out


def parse_nzt(b):
    """Yields (tensor dtype name, codec, params, [(mode, payload, decoded elements)]) from a .nzt file."""
    header_len = struct.unpack_from("<Q", b, 16)[0]
    data_offset = struct.unpack_from("<Q", b, 32)[0]
    pos = 48
    (slen,) = struct.unpack_from("<Q", b, pos)
    pos += 8 + slen
    (count,) = struct.unpack_from("<I", b, pos)
    pos += 4
    names = list(BITS)
    end = 0
    for _ in range(count):
        (nlen,) = struct.unpack_from("<H", b, pos)
        pos += 2 + nlen
        dtype, codec, rank = b[pos], b[pos + 1], b[pos + 2]
        pos += 3
        shape = struct.unpack_from("<%dQ" % rank, b, pos)
        pos += 8 * rank
        block_units, plen = struct.unpack_from("<II", b, pos)
        pos += 8
        params = b[pos:pos + plen]
        pos += plen
        (nblocks,) = struct.unpack_from("<I", b, pos)
        pos += 4
        elements = 1
        for d in shape:
            elements *= d
        blocks = []
        for k in range(nblocks):
            stored_len, mode = struct.unpack_from("<IB", b, pos)
            pos += 16
            start = (end + 63) // 64 * 64 if k == 0 else (end + 15) // 16 * 16
            payload = b[data_offset + start:data_offset + start + stored_len]
            end = start + stored_len
            n = min(block_units, elements - k * block_units)
            blocks.append((mode, payload, n))
        yield names[dtype], codec, params, blocks
    assert pos == 48 + header_len


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--neuzip", default=os.path.join(ROOT, "target", "release", "neuzip"))
    ap.add_argument("--out", default=SEEDS, help="where to write the seed directories (default fuzz/seeds)")
    args = ap.parse_args()
    make(args.neuzip, args.out)


def make(neuzip, seeds):
    for target in ["header", "nzt_decode", "safetensors", "convert_roundtrip", "split_block", "split_roundtrip"]:
        d = os.path.join(seeds, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    small_st = {}
    for fname, keep in [("minilm_slice_bf16", 700), ("minilm_slice_f16", 700), ("minilm_slice_f32", 600),
                        ("f32_specials", 600), ("bf16_all_patterns", 600), ("mixed_dtypes", 300)]:
        meta, tensors = read_st(os.path.join(FIX, fname + ".safetensors"))
        small_st[fname] = (meta, trim(tensors, keep))
    # A tensor whose blocks differ in distribution, so the encoder picks split_local for some of them.
    _, spec = read_st(os.path.join(FIX, "f32_specials.safetensors"))
    by_name = {t[0]: t for t in spec}
    normal, random_bits = by_name["normal_weights"][3], by_name["random_bits"][3]
    mixed = normal[:4 * 512] + bytes(4 * 256) + random_bits[:4 * 256] + normal[4 * 512:4 * 768]
    small_st["local_blocks"] = ({"format": "pt"}, [("mixed", "F32", [len(mixed) // 4], mixed)])
    _, bf = read_st(os.path.join(FIX, "minilm_slice_bf16.safetensors"))
    w = bf[0][3][:2 * 768]
    zeros_low = bytes(x if i % 2 else 0 for i, x in enumerate(w[:512]))
    small_st["local_bf16"] = (None, [("w", "BF16", [3, 256], w[:512] + zeros_low + w[1024:1536])])

    nzt_files = [os.path.join(FIX, "golden", "tiny.nzt"), os.path.join(FIX, "golden", "modes.nzt")]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (meta, tensors) in small_st.items():
            st = os.path.join(tmp, name + ".safetensors")
            write_st(st, meta, tensors)
            for target in ["safetensors", "convert_roundtrip"]:
                shutil.copy(st, os.path.join(seeds, target, name + ".safetensors"))
            out = os.path.join(tmp, name + ".nzt")
            subprocess.run([neuzip, "convert", "--block-elements", "256", "--quiet", "-o", out, st],
                           check=True, stdout=subprocess.DEVNULL)
            nzt_files.append(out)
        # The lossy golden vector (format 1.1) seeds the readers only: its blocks are not split payloads.
        for path in nzt_files + [os.path.join(FIX, "golden", "lossy.nzt")]:
            for target in ["header", "nzt_decode"]:
                shutil.copy(path, os.path.join(seeds, target, os.path.basename(path)))

        for target in ["safetensors", "convert_roundtrip"]:
            for f in ["tiny.safetensors", "modes.safetensors"]:
                shutil.copy(os.path.join(FIX, "golden", f), os.path.join(seeds, target, f))
            for f in ["truncated.safetensors", "not_safetensors.bin"]:
                shutil.copy(os.path.join(FIX, f), os.path.join(seeds, target, f))

        # split_block: [selector][n u16][params_len u16][params][payload], selector bit 7 = split_local.
        seen = 0
        for path in nzt_files:
            stem = os.path.splitext(os.path.basename(path))[0]
            for dtype, codec, params, blocks in parse_nzt(open(path, "rb").read()):
                if codec != 1:
                    continue
                for k, (mode, payload, n) in enumerate(blocks):
                    if mode not in (2, 3) or n > 0xFFFF:
                        continue
                    sel = SPLIT_DTYPES.index(dtype) | (0x80 if mode == 3 else 0)
                    seed = bytes([sel]) + struct.pack("<HH", n, len(params)) + params + payload
                    with open(os.path.join(seeds, "split_block", "%s-%s-%d.bin" % (stem, dtype, k)), "wb") as f:
                        f.write(seed)
                    seen += 1
        assert seen > 0, "no split blocks found"

    # split_roundtrip: [selector][block elements u16][raw little-endian elements]
    for name in ["minilm_slice_bf16", "minilm_slice_f16", "minilm_slice_f32", "f32_specials", "local_blocks",
                 "local_bf16"]:
        for tname, dtype, shape, raw in small_st[name][1][:2]:
            sel = SPLIT_DTYPES.index(dtype)
            seed = bytes([sel]) + struct.pack("<H", 256) + raw[:4096]
            safe = tname.replace("/", "_")
            with open(os.path.join(seeds, "split_roundtrip", "%s-%s.bin" % (name, safe[-40:])), "wb") as f:
                f.write(seed)
    _, mixed_tensors = small_st["mixed_dtypes"]
    for tname, dtype, shape, raw in mixed_tensors:
        if dtype in SPLIT_DTYPES and raw:
            seed = bytes([SPLIT_DTYPES.index(dtype)]) + struct.pack("<H", 100) + raw[:2048]
            with open(os.path.join(seeds, "split_roundtrip", "mixed-%s.bin" % tname), "wb") as f:
                f.write(seed)

    total = 0
    for dirpath, _, files in os.walk(seeds):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    print("seeds: %d bytes" % total)
    if total >= 1 << 20:
        sys.exit("seeds exceed 1 MB")


if __name__ == "__main__":
    main()
