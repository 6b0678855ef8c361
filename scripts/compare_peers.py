"""Side-by-side sizes on the same files: neuzip vs zipnn (if installed) vs zstd -3 / -19 (if on PATH).

Usage: python3 scripts/compare_peers.py data/minilm   (after scripts/demo.sh)
Bits per weight = 8 * compressed bytes / total elements; peers compress the tensor data and are charged the
safetensors header uncompressed, as neuzip stores it verbatim.
"""
import json, os, shutil, struct, subprocess, sys, tempfile

d = sys.argv[1] if len(sys.argv) > 1 else "data/minilm"
neuzip = "target/release/neuzip"
rows = []
for dtype, zdt in (("f32", "float32"), ("bf16", "bfloat16"), ("f16", "float16")):
    src = os.path.join(d, f"model-{dtype}.safetensors")
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = raw[: 8 + n], raw[8 + n :]
    meta = json.loads(raw[8 : 8 + n])
    elements = 0
    for k, v in meta.items():
        if k != "__metadata__":
            e = 1
            for s in v["shape"]:
                e *= s
            elements += e
    bpw = lambda size: 8 * size / elements
    row = {"dtype": dtype, "elements": elements}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.nzt")
        subprocess.run([neuzip, "convert", src, "-o", out, "-q"], check=True, capture_output=True)
        row["neuzip"] = bpw(os.path.getsize(out))
        if shutil.which("zstd"):
            for level in (3, 19):
                z = subprocess.run(["zstd", f"-{level}", "-c", src], check=True, capture_output=True).stdout
                row[f"zstd-{level}"] = bpw(len(z))
    try:
        from zipnn import ZipNN

        z = ZipNN(input_format="byte", bytearray_dtype=zdt)
        row["zipnn"] = bpw(len(header) + len(z.compress(data)))
    except Exception as e:  # zipnn missing or failing: say so
        row["zipnn"] = f"unavailable ({type(e).__name__})"
    rows.append(row)
cols = ["dtype", "neuzip", "zipnn", "zstd-3", "zstd-19"]
print(" ".join(f"{c:>10}" for c in cols))
for r in rows:
    print(" ".join(f"{r.get(c, '-'):>10.4f}" if isinstance(r.get(c), float) else f"{str(r.get(c, '-')):>10}" for c in cols))
