#!/usr/bin/env python3
"""Writes a safetensors file with one large BF16 tensor of seeded N(0, 0.02) weights (default 2^29 elements,
1 GiB), for `neuzip bench --gpu`. Needs numpy only.

    python3 scripts/make_big_bf16.py OUT.safetensors [ELEMENTS]
"""
import json
import struct
import sys

import numpy as np


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = sys.argv[1]
    elements = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 29
    rows = 4096
    if elements % rows:
        print(f"ELEMENTS must be a multiple of {rows}", file=sys.stderr)
        return 2
    header = {"big.weight": {"dtype": "BF16", "shape": [rows, elements // rows],
                             "data_offsets": [0, 2 * elements]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(29)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        left = elements
        while left:
            n = min(left, 1 << 24)
            bits = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).view(np.uint32)
            # round to nearest even, to BF16
            bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            f.write(bits.astype("<u2").tobytes())
            left -= n
    return 0


if __name__ == "__main__":
    sys.exit(main())
