"""Minimal safetensors reader/writer (numpy only; no `safetensors` package).

File layout: u64 little-endian header length N, N bytes of UTF-8 JSON
(padded with spaces to a multiple of 8), then the raw tensor data.

`save` writes the canonical layout produced by the official Rust crate
(`safetensors::serialize`, which the Python package also uses):
  * tensors sorted by dtype rank descending, then by name (bytewise).  The
    rank is the declaration order of the crate's `Dtype` enum, which is in
    increasing alignment order; within one element size the crate's order is
    e.g. U64 > I64 > F64, F32 > U32 > I32, BF16 > F16 > U16 > I16,
    F8_E8M0 > F8_E4M3 > F8_E5M2 > I8 > U8 > BOOL;
  * JSON keys: "__metadata__" first (only if given), then the tensors in
    data order, each {"dtype","shape","data_offsets"}; compact separators;
    non-ASCII characters are written as UTF-8, not \\u escapes (serde_json);
  * header padded with b' ' to a multiple of 8.
The crate keeps `__metadata__` in a HashMap, so its key order there is not
defined; we write the keys in the caller's (dict insertion) order.

API:
  load(path)  -> (metadata dict or None, OrderedDict name -> (dtype, shape, raw bytes))
  loads(buf)  -> same, from bytes
  save(path, tensors, metadata=None)  tensors: mapping name -> (dtype, shape, bytes)
                                       or name -> numpy array (dtype inferred)
  dumps(tensors, metadata=None) -> bytes
  to_bf16_bits(f32 array) -> uint16 array (round to nearest even)
  to_f16(f32 array) -> float16 array (numpy cast, round to nearest even)
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict

import numpy as np

# Declaration order of `safetensors::Dtype` (crate 0.6/0.7). Sorting is by
# this rank, descending.
DTYPE_RANK = {
    name: i
    for i, name in enumerate(
        [
            "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
            "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
            "F64", "I64", "U64",
        ]
    )
}

# Bits per element.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}

# numpy dtype used to view raw bytes of a safetensors dtype (little endian).
# Formats numpy has no type for are viewed as their raw bit container.
NP_VIEW = {
    "BOOL": np.dtype("bool"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype("u1"), "F8_E4M3": np.dtype("u1"), "F8_E8M0": np.dtype("u1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"), "C64": np.dtype("<c8"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}

_FROM_NP = {
    np.dtype("bool"): "BOOL", np.dtype("u1"): "U8", np.dtype("i1"): "I8",
    np.dtype("<i2"): "I16", np.dtype("<u2"): "U16", np.dtype("<f2"): "F16",
    np.dtype("<i4"): "I32", np.dtype("<u4"): "U32", np.dtype("<f4"): "F32",
    np.dtype("<c8"): "C64", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64",
    np.dtype("<u8"): "U64",
}


def nbytes_for(dtype: str, shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    bits = n * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} tensor of shape {list(shape)} is not a whole number of bytes")
    return bits // 8


def loads(buf: bytes):
    if len(buf) < 8:
        raise ValueError("file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError(f"header length {n} exceeds file size {len(buf)}")
    header = json.loads(buf[8 : 8 + n].decode("utf-8"), object_pairs_hook=OrderedDict)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        metadata = OrderedDict(metadata)
    data = memoryview(buf)[8 + n :]
    entries = sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    tensors = OrderedDict()
    pos = 0
    for name, info in entries:
        dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
        s, e = (int(x) for x in info["data_offsets"])
        if s != pos or e < s:
            raise ValueError(f"tensor {name!r}: offsets {s},{e} not contiguous (expected start {pos})")
        if e - s != nbytes_for(dtype, shape):
            raise ValueError(f"tensor {name!r}: {e - s} bytes for {dtype}{shape}")
        if e > len(data):
            raise ValueError(f"tensor {name!r}: data truncated ({e} > {len(data)})")
        tensors[name] = (dtype, shape, bytes(data[s:e]))
        pos = e
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} trailing bytes after the last tensor")
    return metadata, tensors


def load(path):
    with open(path, "rb") as f:
        return loads(f.read())


def _normalize(value):
    """(dtype, shape, bytes) tuple or numpy array -> (dtype, shape, bytes)."""
    if isinstance(value, np.ndarray):
        dt = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        if dt not in _FROM_NP:
            raise TypeError(f"no safetensors dtype for numpy {value.dtype}")
        arr = np.ascontiguousarray(value, dtype=dt)
        return _FROM_NP[dt], list(arr.shape), arr.tobytes()
    dtype, shape, raw = value
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).tobytes()
    raw = bytes(raw)
    shape = [int(d) for d in shape]
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype}")
    if len(raw) != nbytes_for(dtype, shape):
        raise ValueError(f"{dtype}{shape} needs {nbytes_for(dtype, shape)} bytes, got {len(raw)}")
    return dtype, shape, raw


def dumps(tensors, metadata=None) -> bytes:
    items = [(name, _normalize(v)) for name, v in tensors.items()]
    # Stable two-key sort: dtype rank descending, then name ascending by
    # bytes (Rust String ordering is bytewise UTF-8).
    items.sort(key=lambda kv: (-DTYPE_RANK[kv[1][0]], kv[0].encode("utf-8")))
    header = OrderedDict()
    if metadata is not None:
        md = OrderedDict()
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("__metadata__ must map str -> str")
            md[k] = v
        header["__metadata__"] = md
    off = 0
    for name, (dtype, shape, raw) in items:
        header[name] = OrderedDict(
            [("dtype", dtype), ("shape", shape), ("data_offsets", [off, off + len(raw)])]
        )
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    out = bytearray(struct.pack("<Q", len(hb)))
    out += hb
    for _, (_, _, raw) in items:
        out += raw
    return bytes(out)


def save(path, tensors, metadata=None) -> int:
    buf = dumps(tensors, metadata)
    with open(path, "wb") as f:
        f.write(buf)
    return len(buf)


def to_bf16_bits(x) -> np.ndarray:
    """float32 array -> uint16 bf16 bit patterns, round to nearest, ties to even.

    Overflow rounds to +-Inf exactly as RNE dictates (values >= 0x7F7F8000 in
    magnitude bits).  NaN stays NaN: the top 16 bits are kept (sign and upper
    payload) and the quiet bit is set, so a signalling NaN whose payload lives
    only in the low 16 bits cannot collapse to Inf.
    """
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    lsb = (bits >> 16) & 1
    rounded = ((bits.astype(np.uint64) + 0x7FFF + lsb) >> 16).astype(np.uint16)
    quiet = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(nan, quiet, rounded).astype("<u2")


def bf16_bits_to_f32(b) -> np.ndarray:
    return (np.asarray(b, dtype="<u2").astype("<u4") << 16).view("<f4")


def to_f16(x) -> np.ndarray:
    """float32 array -> float16 via numpy's cast (round to nearest even)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype="<f4").astype("<f2")


def round_tensor(dtype, shape, raw, target):
    """Round one F32 tensor to target ('BF16' or 'F16'); other tensors pass through."""
    if dtype != "F32":
        return dtype, shape, raw
    a = np.frombuffer(raw, dtype="<f4")
    if target == "BF16":
        return "BF16", shape, to_bf16_bits(a).tobytes()
    if target == "F16":
        return "F16", shape, to_f16(a).tobytes()
    raise ValueError(target)
