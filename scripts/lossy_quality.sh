#!/usr/bin/env bash
# Lossy-mode quality sweep on real all-MiniLM-L6-v2: for each dtype and K, convert with --mantissa-bits K
# (default rules: 1-D tensors lossless; default normalization, groups of 256, and none), read bits/weight and SQNR from
# `neuzip verify --against`, and the sentence-embedding cosine similarity from examples/embedding_check
# against the original F32 model and against the lossless file of the same dtype.
#
# Usage: scripts/lossy_quality.sh [DIR=data/minilm] [OUT=target/lossy-quality]   (after scripts/demo.sh)
# Prints a Markdown table; writes OUT/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-data/minilm}
OUT=${2:-target/lossy-quality}
mkdir -p "$OUT"
cargo build --release --quiet --bin neuzip --example embedding_check
NZ=target/release/neuzip
EMB=target/release/examples/embedding_check
declare -A FULL=([bf16]=7 [f16]=10 [f32]=23)
rows=()
# measure TAG SRC CONVERT-ARGS...: convert, verify against SRC, and the embedding cosine against F32 and SRC.
measure() {
    local tag=$1 src=$2 nzt="$OUT/$1.nzt"
    shift 2
    "$NZ" convert "$src" -o "$nzt" --force -q "$@" > /dev/null
    "$NZ" verify "$nzt" --against "$src" --json > "$OUT/$tag.verify.json"
    "$EMB" --reference "$DIR/model-f32.safetensors" --candidate "$nzt" --json > "$OUT/$tag.emb-f32.json"
    "$EMB" --reference "$src" --candidate "$nzt" --json > "$OUT/$tag.emb-self.json"
    rows+=("$tag")
}
for dtype in ${DTYPES:-bf16 f32}; do
    src="$DIR/model-$dtype.safetensors"
    for norm in 256 none; do
        for k in 0 1 2 3 4 5 6 7; do
            tag="$dtype-k$k"
            args=(--mantissa-bits "$k")
            if [ "$norm" = none ]; then tag+="-nonorm"; args+=(--no-norm); fi
            measure "$tag" "$src" "${args[@]}"
        done
    done
    # Same size budget as K=3, bits moved from the embedding table to the encoder's matrices: by hand, then
    # chosen by --target-bits at uniform K=3's size and at 6.7.
    k3_bits=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bits_per_weight"])' \
        "$OUT/$dtype-k3.verify.json")
    # K=3 everywhere with the normalization groups chosen for 6.7 bits per weight, then the same weighted by
    # activation importances measured on fixtures/calibration.txt (disjoint from the evaluation sentences).
    importance="$OUT/importance-$dtype.safetensors"
    "$EMB" --reference "$src" --sentences fixtures/calibration.txt --importance-out "$importance" > /dev/null
    for variant in "mixed-emb2-k4" "target-k3size" "target-6.7" "k3-groups-6.7" "k3-imp" "k3-groups-6.7-imp"; do
        tag="$dtype-$variant"
        case $variant in
            mixed-emb2-k4) args=(--mantissa-bits 4 --tensor-bits '*word_embeddings*=2') ;;
            target-k3size) args=(--target-bits "$k3_bits") ;;
            target-6.7) args=(--target-bits 6.7) ;;
            k3-groups-6.7) args=(--mantissa-bits 3 --target-bits 6.7) ;;
            k3-imp) args=(--mantissa-bits 3 --importance "$importance") ;;
            k3-groups-6.7-imp) args=(--mantissa-bits 3 --target-bits 6.7 --importance "$importance") ;;
        esac
        measure "$tag" "$src" "${args[@]}"
    done
done
python3 - "$OUT" "${rows[@]}" <<'PY'
import json, sys
out, tags = sys.argv[1], sys.argv[2:]
def cos(path):
    d = json.load(open(path))
    c = d["candidates"][0] if "candidates" in d else d
    return c["mean_cosine"], c["min_cosine"]
results = []
print("| file | bits/weight | SQNR dB | mean cos vs F32 original | min cos | mean cos vs same-dtype lossless |")
print("|---|---|---|---|---|---|")
for t in tags:
    v = json.load(open(f"{out}/{t}.verify.json"))
    mf, nf = cos(f"{out}/{t}.emb-f32.json")
    ms, _ = cos(f"{out}/{t}.emb-self.json")
    bpw = v["bits_per_weight"]
    sq = (v.get("error") or {}).get("sqnr_db")
    results.append(dict(file=t, bits_per_weight=bpw, sqnr_db=sq, mean_cos_f32=mf, min_cos_f32=nf, mean_cos_self=ms))
    sq_text = "exact" if sq is None else f"{sq:.2f}"
    print(f"| {t} | {bpw:.4f} | {sq_text} | {mf:.6f} | {nf:.6f} | {ms:.6f} |")
json.dump(results, open(f"{out}/results.json", "w"), indent=1)
PY
