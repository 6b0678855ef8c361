#!/usr/bin/env python3
"""Check the committed fixtures and the helpers in st.py.

Usage: python3 scripts/check_fixtures.py [--fixtures DIR] [--minilm DIR]

* every fixture is re-read with st.load and every tensor compared with what
  make_fixtures.py intends (exact bytes where the content is defined);
* every file is in canonical layout: st.dumps(st.load(f)) == f;
* truncated.safetensors and not_safetensors.bin fail to load;
* the sharded index agrees with the shards;
* to_bf16_bits / to_f16 on hand-picked values (ties, overflow, NaN, subnormals)
  and, exhaustively, against an independent integer-only RNE implementation;
* if --minilm DIR has prepare_minilm.py output, it is checked too.
Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "fixtures"))

import numpy as np  # noqa: E402

import st  # noqa: E402

CHECKS = 0


def ok(cond, msg):
    global CHECKS
    CHECKS += 1
    if not cond:
        raise SystemExit(f"FAIL: {msg}")


def canonical(path):
    buf = open(path, "rb").read()
    md, t = st.loads(buf)
    ok(st.dumps(t, md) == buf, f"{path}: not in canonical layout")
    (n,) = struct.unpack("<Q", buf[:8])
    ok(n % 8 == 0, f"{path}: header length {n} not a multiple of 8")
    return md, t


def arr(t, name, np_dtype):
    return np.frombuffer(t[name][2], dtype=np_dtype)


def ref_bf16(bits: int) -> int:
    """Integer-only reference: f32 bits -> bf16 bits, RNE; NaN -> quiet, sign kept."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return (bits >> 16) | 0x0040
    hi, lo = bits >> 16, bits & 0xFFFF
    if lo > 0x8000 or (lo == 0x8000 and (hi & 1)):
        hi += 1
    return hi


def check_rounding():
    f = lambda bits: np.array(bits, dtype="<u4").view("<f4")  # noqa: E731
    cases = {
        0x3F800001: 0x3F80,  # 1.0000001 -> 1.0
        0x3F808000: 0x3F80,  # exact tie, even is down
        0x3F818000: 0x3F82,  # exact tie, even is up
        0x3F808001: 0x3F81,  # just above tie
        0x3F807FFF: 0x3F80,  # just below tie
        0xBF808000: 0xBF80,  # negative tie
        0x7F7FFFFF: 0x7F80,  # max finite f32 -> +inf (above bf16 max + half ulp)
        0x7F7F7FFF: 0x7F7F,  # stays at bf16 max
        0x7F7F8000: 0x7F80,  # tie at the top, odd mantissa -> rounds up to inf
        0xFF7FFFFF: 0xFF80,  # -> -inf
        0x7F800000: 0x7F80,  # +inf
        0xFF800000: 0xFF80,  # -inf
        0x7FC00000: 0x7FC0,  # qNaN
        0xFFC00001: 0xFFC0,  # -qNaN keeps sign
        0x7F800001: 0x7FC0,  # sNaN with low payload -> quiet NaN, not inf
        0xFF800001: 0xFFC0,
        0x7FBFFFFF: 0x7FFF,  # sNaN high payload kept, quiet bit set
        0x00000001: 0x0000,  # smallest subnormal -> +0
        0x80000001: 0x8000,  # -> -0
        0x007FFFFF: 0x0080,  # largest subnormal rounds up to smallest normal
        0x00008000: 0x0000,  # subnormal tie, even down
        0x00018000: 0x0002,  # subnormal tie, even up
        0x00000000: 0x0000,
        0x80000000: 0x8000,
    }
    got = st.to_bf16_bits(f(list(cases)))
    for (src, want), g in zip(cases.items(), got):
        ok(int(g) == want, f"bf16({src:#010x}) = {int(g):#06x}, want {want:#06x}")
    # 3.4e38 (0x7F7FC99E) is past bf16 max + half ulp (0x7F7F8000) -> inf under RNE
    ok(int(st.to_bf16_bits(np.array([3.4e38], "<f4"))[0]) == 0x7F80, "3.4e38 should round to +inf in bf16")
    # bf16 max is 3.3895e38; the RNE overflow threshold is 3.3961e38 (max + half ulp)
    ok(int(st.to_bf16_bits(np.array([3.39e38], "<f4"))[0]) == 0x7F7F, "3.39e38 should round to bf16 max")
    ok(int(st.to_bf16_bits(np.array([3.397e38], "<f4"))[0]) == 0x7F80, "3.397e38 should round to +inf")
    # exhaustive agreement with the integer reference on a structured + random sample
    rs = np.random.default_rng(123)
    sample = np.concatenate(
        [
            rs.integers(0, 2**32, size=2_000_000, dtype=np.uint32),
            (np.arange(2**16, dtype=np.uint32) << 16) | 0x8000,  # every tie
            (np.arange(2**16, dtype=np.uint32) << 16) | 0x7FFF,
            (np.arange(2**16, dtype=np.uint32) << 16) | 0x8001,
            (np.arange(2**16, dtype=np.uint32) << 16) | 0x0001,
            np.arange(2**16, dtype=np.uint32) << 16,
        ]
    ).astype("<u4")
    got = st.to_bf16_bits(sample.view("<f4"))
    ref = np.vectorize(ref_bf16, otypes=[np.uint32])(sample[::7]).astype(np.uint16)
    ok(np.array_equal(got[::7], ref), "to_bf16_bits disagrees with integer reference")
    # every tie / edge row fully
    tail = sample[2_000_000:]
    ref_tail = np.array([ref_bf16(int(b)) for b in tail], dtype=np.uint16)
    ok(np.array_equal(got[2_000_000:], ref_tail), "to_bf16_bits disagrees on tie rows")
    # bf16 -> f32 -> bf16 is the identity on every non-NaN pattern
    pats = np.arange(65536, dtype="<u2")
    back = st.to_bf16_bits(st.bf16_bits_to_f32(pats))
    nan = (pats & 0x7FFF) > 0x7F80
    ok(np.array_equal(back[~nan], pats[~nan]), "bf16 round trip not identity")
    ok(np.array_equal(back[nan], pats[nan] | 0x40), "bf16 NaN round trip")
    # f16: numpy cast, spot checks
    h = st.to_f16(np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.99, 65520.0, 1e-8, np.nan, -np.inf, -0.0], "<f4"))
    hb = h.view("<u2").tolist()
    want = [0x3C00, 0x3C00, 0x3C02, 0x7BFF, 0x7BFF, 0x7C00, 0x0000, None, 0xFC00, 0x8000]
    for i, (g, w) in enumerate(zip(hb, want)):
        if w is None:
            ok((g & 0x7C00) == 0x7C00 and (g & 0x3FF) != 0, f"f16 NaN case gave {g:#06x}")
        else:
            ok(g == w, f"f16 case {i}: {g:#06x} != {w:#06x}")
    ok(int(st.to_f16(np.array([-np.nan], "<f4")).view("<u2")[0]) >> 15 == 1, "f16 -NaN keeps sign")


def check_fixtures(fx):
    import make_fixtures as mf

    p = lambda n: os.path.join(fx, n)  # noqa: E731
    pats = np.arange(65536, dtype="<u2")
    for dt in ("BF16", "F16"):
        md, t = canonical(p(f"{dt.lower()}_all_patterns.safetensors"))
        ok(md is None and list(t) == ["all_patterns", "shuffled"], f"{dt} names")
        ok(t["all_patterns"][:2] == (dt, [65536]) and np.array_equal(arr(t, "all_patterns", "<u2"), pats), f"{dt} all_patterns")
        sh = arr(t, "shuffled", "<u2")
        ok(t["shuffled"][:2] == (dt, [256, 256]), f"{dt} shuffled shape")
        ok(np.array_equal(np.sort(sh), pats) and not np.array_equal(sh, pats), f"{dt} shuffled is a permutation")

    md, t = canonical(p("f32_specials.safetensors"))
    ok(list(t) == ["normal_weights", "random_bits", "specials"], "f32_specials order")
    sp = arr(t, "specials", "<u4")
    ok(sp.tolist() == [b for b, _ in mf.F32_SPECIALS], "specials bits preserved (sNaNs not quietened)")
    ok(t["random_bits"][:2] == ("F32", [70001]), "random_bits shape")
    rb = arr(t, "random_bits", "<u4")
    ok(len(np.unique(rb)) > 69990, "random_bits look random")
    nw = arr(t, "normal_weights", "<f4")
    ok(t["normal_weights"][:2] == ("F32", [3, 33335]) and abs(nw.std() - 0.02) < 5e-4 and abs(nw.mean()) < 5e-4, "normal_weights")

    md, t = canonical(p("mixed_dtypes.safetensors"))
    ok(md == {"format": "pt", "note": "neuzip fixture"}, "mixed metadata")
    want = {
        "bool_mask": ("BOOL", [1000]), "u8_values": ("U8", [1000]), "i8_values": ("I8", [1000]),
        "i16_values": ("I16", [1000]), "u16_values": ("U16", [1000]), "i32_token_ids": ("I32", [1000]),
        "u32_values": ("U32", [1000]), "i64_values": ("I64", [1000]), "u64_values": ("U64", [1000]),
        "f64_normal": ("F64", [1000]), "f8_e4m3_bytes": ("F8_E4M3", [4097]), "f8_e5m2_bytes": ("F8_E5M2", [4097]),
        "empty_f32": ("F32", [0]), "empty_bf16": ("BF16", [3, 0]), "scalar_f32": ("F32", []),
        "one_bf16": ("BF16", [1]), "bf16_65537": ("BF16", [65537]), "position_ids": ("I64", [1, 512]),
    }
    ok(set(t) == set(want), f"mixed names {sorted(set(t) ^ set(want))}")
    for k, v in want.items():
        ok(t[k][:2] == v, f"mixed {k}: {t[k][:2]} != {v}")
    ok(set(np.frombuffer(t["bool_mask"][2], np.uint8).tolist()) == {0, 1}, "bool values 0/1")
    ok(np.array_equal(arr(t, "position_ids", "<i8"), np.arange(512)), "position_ids arange")
    ok(arr(t, "scalar_f32", "<f4").tolist() == [0.125], "scalar")
    ok(arr(t, "one_bf16", "<u2").tolist() == [0xBFC0], "one_bf16 = -1.5")
    ok(t["empty_f32"][2] == b"" and t["empty_bf16"][2] == b"", "empty tensors")
    f64 = arr(t, "f64_normal", "<f8")
    ok(abs(f64.std() - 1) < 0.1, "f64 normal")
    order = list(t)
    ranks = [st.DTYPE_RANK[t[k][0]] for k in order]
    ok(ranks == sorted(ranks, reverse=True), "mixed: dtype rank descending")

    # minilm slices: compare with the installed model
    if os.path.exists(p("minilm_slice_f32.safetensors")):
        import prepare_minilm

        _, model = st.load(prepare_minilm.find_model())
        md32, t32 = canonical(p("minilm_slice_f32.safetensors"))
        ok(md32 == {"format": "pt"}, "slice metadata")
        ok(set(t32) == {n for n, _ in mf.MINILM_SLICES}, "slice names")
        for name, rows in mf.MINILM_SLICES:
            dt, shape, raw = t32[name]
            mdt, mshape, mraw = model[name]
            ok(dt == "F32" and shape[1:] == mshape[1:] and shape[0] == (rows or mshape[0]), f"slice {name} shape {shape}")
            ok(mraw.startswith(raw), f"slice {name} bytes are a prefix of the model tensor")
        for target, view in (("BF16", "<u2"), ("F16", "<f2")):
            mdx, tx = canonical(p(f"minilm_slice_{target.lower()}.safetensors"))
            ok(mdx == {"format": "pt"} and set(tx) == set(t32), f"{target} slice names")
            for name in t32:
                dt, shape, raw = tx[name]
                src = np.frombuffer(t32[name][2], "<f4")
                exp = st.to_bf16_bits(src) if target == "BF16" else st.to_f16(src)
                ok(dt == target and shape == t32[name][1] and raw == exp.tobytes(), f"{target} slice {name}")
            if target == "BF16":
                # rounding error bounded by half a bf16 ulp
                for name in t32:
                    src = np.frombuffer(t32[name][2], "<f4").astype(np.float64)
                    back = st.bf16_bits_to_f32(np.frombuffer(tx[name][2], "<u2")).astype(np.float64)
                    ok(np.all(np.abs(back - src) <= np.abs(src) * 2.0**-8 + 1e-45), f"bf16 error bound {name}")

    # sharded
    sd = p("sharded")
    index = json.load(open(os.path.join(sd, "model.safetensors.index.json")))
    ok(set(index) == {"metadata", "weight_map"}, "index keys")
    total = 0
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        md, t = canonical(os.path.join(sd, shard))
        ok(md == {"format": "pt"}, f"{shard} metadata")
        for name, (dt, shape, raw) in t.items():
            seen[name] = shard
            total += len(raw)
    ok(seen == index["weight_map"], "weight_map matches shard contents")
    ok(index["metadata"]["total_size"] == total, "total_size = sum of tensor bytes")
    ok(sorted(os.listdir(sd)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"], "sharded dir listing")

    # bad inputs
    for bad in ("truncated.safetensors", "not_safetensors.bin"):
        try:
            st.load(p(bad))
        except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:  # noqa: PERF203
            ok(True, "")
            print(f"  {bad}: rejected ({type(e).__name__}: {str(e)[:70]})")
        else:
            ok(False, f"{bad} loaded without error")
    ok(os.path.getsize(p("not_safetensors.bin")) == 1024, "not_safetensors size")
    buf = open(p("truncated.safetensors"), "rb").read()
    (n,) = struct.unpack("<Q", buf[:8])
    hdr = json.loads(buf[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__")
    have = len(buf) - 8 - n
    ok(0 < have < end, f"truncated: has {have} of {end} data bytes")


def check_minilm(d):
    import prepare_minilm

    src = prepare_minilm.find_model()
    f32 = os.path.join(d, "model-f32.safetensors")
    ok(open(f32, "rb").read() == open(src, "rb").read(), "model-f32 is a byte copy")
    md, t = canonical(f32)
    for target in ("BF16", "F16"):
        mdx, tx = canonical(os.path.join(d, f"model-{target.lower()}.safetensors"))
        ok(mdx == md and list(tx) == list(t), f"{target}: names/metadata/order")
        for name, (dt, shape, raw) in t.items():
            ok(tx[name] == st.round_tensor(dt, shape, raw, target), f"{target} {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.join(ROOT, "fixtures"))
    ap.add_argument("--minilm", default=os.path.join(ROOT, "data", "minilm"))
    a = ap.parse_args()
    check_rounding()
    print(f"rounding helpers ok ({CHECKS} checks)")
    check_fixtures(a.fixtures)
    print(f"fixtures ok ({CHECKS} checks)")
    if os.path.exists(os.path.join(a.minilm, "model-f32.safetensors")):
        check_minilm(a.minilm)
        print(f"{a.minilm} ok ({CHECKS} checks)")
    else:
        print(f"{a.minilm}: not present, skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
