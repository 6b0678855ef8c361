#!/usr/bin/env bash
# Codebook-mode quality on real all-MiniLM-L6-v2, measured through the file. For each dtype:
#   - convert with --codebook-bits B --fixed-rate (2^B codewords, indices rANS-coded) and with --codebook-bits R
#     (rate-targeted: each tensor at most R bits/weight) for B, R = 2, 3, 4;
#   - convert rate-targeted at equal size, tensor by tensor (one --tensor-bits rule per tensor): at the
#     fixed-rate file's size of each tensor, and at its size with B-bit (fixed-length) indices;
#   - convert rate-targeted at the bits/weight of RTN-g128-clip (B + (16 + B)/128) and of NF4-b64 (4.25);
#   - read per-tensor SQNR and bits/weight (params + block payloads: every byte the codec stores for the
#     tensor) from `neuzip verify --against --json`, and the baselines RTN-g128-clip (B = 2, 3, 4) and NF4-b64
#     on the same tensors from `neuzip analyze --sweep --codebook-bits 4 --fixed-rate --json`;
#   - print medians over the codebook tensors (1-D tensors and embeddings stay lossless) and medians of
#     per-tensor SQNR differences, then the sentence-embedding cosine (examples/embedding_check) against the
#     F32 original at 4, 3 and 2 bits; also with the embedding tables quantized at the same rate
#     (--tensor-bits '*embeddings*=R'), whose whole-file bits/weight compare with the lossy mode's.
# Default error weights (|w| + sigma), groups of 128, 4 row clusters.
#
# Usage: scripts/codebook_quality.sh [DIR=data/minilm] [OUT=target/codebook-quality]   (DTYPES="f32 bf16")
# Prints Markdown tables; writes OUT/results.json and OUT/convert_seconds.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-data/minilm}
OUT=${2:-target/codebook-quality}
mkdir -p "$OUT"
cargo build --release --quiet --bin neuzip --example embedding_check
NZ=target/release/neuzip
EMB=target/release/examples/embedding_check
: > "$OUT/convert_seconds.txt"

# convert TAG SRC ARGS...: converts, verifies, and logs the conversion's wall time.
convert() {
    local tag=$1 src=$2
    shift 2
    local start end
    start=$(date +%s.%N)
    "$NZ" convert "$src" -o "$OUT/$tag.nzt" --force -q "$@" > /dev/null
    end=$(date +%s.%N)
    echo "$tag $(python3 -c "print(f'{$end - $start:.1f}')")" >> "$OUT/convert_seconds.txt"
    "$NZ" verify "$OUT/$tag.nzt" --against "$src" --json > "$OUT/$tag.verify.json"
}

# rules_from SRC VERIFY_JSON WHAT B: one --tensor-bits rule per codebook tensor of a fixed-rate file, at its
# size in the file (WHAT=file) or with B-bit indices (WHAT=fixed-length: B bits per index, f16 scales per group
# of 128, 4 codebooks of 2^B f16 entries, 2-bit cluster ids, the f32 tensor scale).
rules_from() {
    python3 - "$@" <<'PY'
import json, math, struct, sys
src, path, what, b = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(src, "rb") as f:
    shapes = {k: v["shape"] for k, v in json.loads(f.read(struct.unpack("<Q", f.read(8))[0])).items()
              if k != "__metadata__"}
for t in json.load(open(path))["tensors"]:
    if t["codec"] != "codebook":
        continue
    n = t["error"]["elements"]
    if what == "file":
        bits = t["bits_per_weight"] + 8 * t["params_bytes"] / n
    else:
        cols = shapes[t["name"]][-1]
        rows = n // cols
        side = 16 * rows * math.ceil(cols / 128) + 16 * 4 * 2**b + 2 * rows + 32
        bits = b + side / n
    # Rounded down so the rule's budget is at most the size compared with.
    print(f"--tensor-bits={t['name']}={math.floor(bits * 1e6) / 1e6}")
PY
}

for dtype in ${DTYPES:-f32}; do
    src="$DIR/model-$dtype.safetensors"
    for b in 2 3 4; do
        convert "$dtype-fixed$b" "$src" --codebook-bits "$b" --fixed-rate
        convert "$dtype-rate$b" "$src" --codebook-bits "$b"
    done
    for b in 2 3 4; do
        mapfile -t rules < <(rules_from "$src" "$OUT/$dtype-fixed$b.verify.json" fixed-length "$b")
        convert "$dtype-rate-at-fixedlen$b" "$src" --codebook-bits 8 "${rules[@]}"
        if [ "$b" -gt 2 ]; then
            # At 2 bits some fixed-rate tensors take under 2 bits/weight, below the smallest rate.
            mapfile -t rules < <(rules_from "$src" "$OUT/$dtype-fixed$b.verify.json" file "$b")
            convert "$dtype-rate-at-fixedfile$b" "$src" --codebook-bits 8 "${rules[@]}"
        fi
    done
    convert "$dtype-rate-rtn3" "$src" --codebook-bits 3.1484375
    convert "$dtype-rate-rtn4" "$src" --codebook-bits 4.15625
    convert "$dtype-rate-nf4" "$src" --codebook-bits 4.25
    for r in 3 4; do
        convert "$dtype-rate$r-emb" "$src" --codebook-bits "$r" --tensor-bits "*embeddings*=$r"
    done
    "$NZ" analyze "$src" --sweep --codebook-bits 4 --fixed-rate --json -q > "$OUT/$dtype-baselines.json"
    candidates=()
    for tag in fixed4 rate4 rate4-emb fixed3 rate3 rate3-emb fixed2 rate2; do
        candidates+=(--candidate "$OUT/$dtype-$tag.nzt")
    done
    "$EMB" --reference "$DIR/model-f32.safetensors" "${candidates[@]}" --json > "$OUT/$dtype-embeddings.json"
done

python3 - "$OUT" ${DTYPES:-f32} <<'PY'
import json, statistics, sys
out, dtypes = sys.argv[1], sys.argv[2:]
median = statistics.median
results = {}
for dtype in dtypes:
    def load(tag):
        v = json.load(open(f"{out}/{dtype}-{tag}.verify.json"))
        per = {}
        for t in v["tensors"]:
            if t["codec"] == "codebook":
                n = t["error"]["elements"]
                per[t["name"]] = dict(sqnr=t["error"]["sqnr_db"],
                                      bits=t["bits_per_weight"] + 8 * t["params_bytes"] / n)
        return per, v["bits_per_weight"], v["error"]["sqnr_db"]
    runs = {}
    for tag in ["fixed2", "fixed3", "fixed4", "rate2", "rate3", "rate4", "rate-at-fixedlen2",
                "rate-at-fixedlen3", "rate-at-fixedlen4", "rate-at-fixedfile3", "rate-at-fixedfile4",
                "rate-rtn3", "rate-rtn4", "rate-nf4"]:
        runs[tag] = load(tag)
    # With the embeddings quantized too: more codebook tensors, so only whole-file figures are shown.
    whole_file = {tag: load(tag) for tag in ["rate3-emb", "rate4-emb"]}
    sweep = json.load(open(f"{out}/{dtype}-baselines.json"))
    for b in sweep["baselines"]:
        name = f"rtn{b['bits']}" if b["method"] == "rtn-g128-clip" else "nf4"
        runs[name] = ({t["name"]: dict(sqnr=t["sqnr_db"], bits=t["bits_per_weight"])
                       for t in b["per_tensor"]}, None, None)
    tensors = sorted(runs["fixed4"][0])
    for tag, (per, _, _) in runs.items():
        assert sorted(per) == tensors, f"{tag}: other tensors"
    def med(tag, key):
        return median(runs[tag][0][t][key] for t in tensors)
    def diff(a, b):
        return median(runs[a][0][t]["sqnr"] - runs[b][0][t]["sqnr"] for t in tensors)
    print(f"\n## {dtype}: {len(tensors)} codebook tensors (medians over them)\n")
    print("| run | median bits/weight (tensor, all metadata) | max bits/weight | median SQNR dB | whole file bits/weight |")
    print("|---|---|---|---|---|")
    rows = {}
    for tag, (per, file_bpw, _) in runs.items():
        mx = max(per[t]["bits"] for t in tensors)
        rows[tag] = dict(median_bits=med(tag, "bits"), max_bits=mx, median_sqnr=med(tag, "sqnr"),
                         file_bits=file_bpw)
        fb = "-" if file_bpw is None else f"{file_bpw:.4f}"
        print(f"| {tag} | {med(tag, 'bits'):.4f} | {mx:.4f} | {med(tag, 'sqnr'):.2f} | {fb} |")
    checks = [
        ("4 bits: fixed-rate B=4 vs NF4-b64 (>= 0)", "fixed4", "nf4", 0.0),
        ("4 bits: rate-targeted R=4.25 (NF4's bits) vs NF4-b64 (>= 0)", "rate-nf4", "nf4", 0.0),
        ("4 bits: rate-targeted R=4 vs NF4-b64 (>= 0)", "rate4", "nf4", 0.0),
        ("4 bits: fixed-rate B=4 vs RTN-4 (>= +0.3)", "fixed4", "rtn4", 0.3),
        ("4 bits: rate-targeted R=4.156 (RTN-4's bits) vs RTN-4 (>= +0.3)", "rate-rtn4", "rtn4", 0.3),
        ("4 bits: rate-targeted R=4 vs RTN-4 (>= +0.3)", "rate4", "rtn4", 0.3),
        ("3 bits: fixed-rate B=3 vs RTN-3 (>= +0.5)", "fixed3", "rtn3", 0.5),
        ("3 bits: rate-targeted R=3.148 (RTN-3's bits) vs RTN-3 (>= +0.5)", "rate-rtn3", "rtn3", 0.5),
        ("3 bits: rate-targeted R=3 vs RTN-3 (>= +0.5)", "rate3", "rtn3", 0.5),
        ("2 bits: fixed-rate B=2 vs RTN-2 (report)", "fixed2", "rtn2", None),
        ("2 bits: rate-targeted R=2 vs RTN-2 (report)", "rate2", "rtn2", None),
    ]
    for b in (2, 3, 4):
        checks.append((f"{b} bits: rate-targeted at the fixed-length-index size vs fixed-rate B={b} (>= +1.5)",
                       f"rate-at-fixedlen{b}", f"fixed{b}", 1.5))
    for b in (3, 4):
        checks.append((f"{b} bits: rate-targeted at the fixed-rate file's size vs fixed-rate B={b} (>= +1.5)",
                       f"rate-at-fixedfile{b}", f"fixed{b}", 1.5))
    print("\n| comparison (median of per-tensor SQNR differences) | dB | target |")
    print("|---|---|---|")
    check_rows = []
    for what, a, b, need in checks:
        d = diff(a, b)
        verdict = "report" if need is None else ("met" if d >= need else "NOT met")
        check_rows.append(dict(check=what, median_gain_db=d, required_db=need, verdict=verdict))
        print(f"| {what} | {d:+.2f} | {verdict} |")
    emb = json.load(open(f"{out}/{dtype}-embeddings.json"))
    print("\n| file | whole file bits/weight | mean cos vs F32 original | min cos |")
    print("|---|---|---|---|")
    cos_rows = []
    for c in emb["candidates"]:
        tag = c["path"].split("/")[-1].removesuffix(".nzt")
        short = tag.split("-", 1)[1]
        bpw = (runs.get(short) or whole_file[short])[1]
        cos_rows.append(dict(file=tag, file_bits=bpw, mean_cos=c["mean_cosine"], min_cos=c["min_cosine"]))
        print(f"| {tag} | {bpw:.4f} | {c['mean_cosine']:.6f} | {c['min_cosine']:.6f} |")
    for tag, (per, file_bpw, file_sqnr) in whole_file.items():
        print(f"\n{tag}: {len(per)} codebook tensors, whole file {file_bpw:.4f} bits/weight, SQNR {file_sqnr:.2f} dB")
        rows[tag] = dict(codebook_tensors=len(per), file_bits=file_bpw, file_sqnr=file_sqnr)
    results[dtype] = dict(runs=rows, checks=check_rows, cosine=cos_rows)
json.dump(results, open(f"{out}/results.json", "w"), indent=1)
PY
