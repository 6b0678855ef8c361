#!/usr/bin/env python3
"""Whole-process wall time of `neuzip convert` / `neuzip decompress` against `zstd -3` / `zstd -d` on the same
file, measured in the same run, interleaved (one of each per round) so that load on a shared machine hits both
alike. Prints medians and the ratios. neuzip fsyncs its output before giving it a name (a crash never leaves a
partial file); zstd does not, so zstd is also timed followed by `sync FILE` (fsync of its output, as neuzip
does), the like-for-like comparison; `cp` of the original followed by `sync` is the floor for any tool that
writes those bytes durably.

    python3 scripts/wall_vs_zstd.py FILE.safetensors [--rounds N] [--threads T] [--json]

`--threads` is passed to neuzip and, as -T, to zstd (default: all cores for both). Outputs go to a temporary
directory that is removed afterwards.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NEUZIP = os.path.join(HERE, "..", "target", "release", "neuzip")


def timed(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nzt, back = os.path.join(tmp, "m.nzt"), os.path.join(tmp, "back.safetensors")
        zst, zback = os.path.join(tmp, "m.zst"), os.path.join(tmp, "zback.safetensors")
        copy = os.path.join(tmp, "copy.safetensors")
        t = str(a.threads)
        jobs = {
            "neuzip convert": [NEUZIP, "convert", a.file, "-o", nzt, "--force", "-q", "--threads", t],
            "zstd -3": ["zstd", "-3", f"-T{t}", "-q", "-f", a.file, "-o", zst],
            "zstd -3 + sync": ["sh", "-c", f'zstd -3 -T{t} -q -f "$0" -o "$1" && sync "$1"', a.file, zst],
            "neuzip decompress": [NEUZIP, "decompress", nzt, "-o", back, "--force", "-q", "--threads", t],
            "zstd -d": ["zstd", "-d", "-q", "-f", zst, "-o", zback],
            "zstd -d + sync": ["sh", "-c", 'zstd -d -q -f "$0" -o "$1" && sync "$1"', zst, zback],
            # The floor for any tool that writes the original bytes and makes them durable.
            "cp + sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', a.file, copy],
        }
        times = {k: [] for k in jobs}
        for k, cmd in jobs.items():  # warm-up, and the inputs of the decoders
            timed(cmd)
        for _ in range(a.rounds):
            for k, cmd in jobs.items():
                times[k].append(timed(cmd))
        subprocess.run(["cmp", back, a.file], check=True)
        sizes = {"neuzip": os.path.getsize(nzt), "zstd -3": os.path.getsize(zst)}
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "file": a.file,
        "bytes": os.path.getsize(a.file),
        "threads": a.threads,
        "rounds": a.rounds,
        "median_seconds": med,
        "compressed_bytes": sizes,
        "convert_over_zstd3": med["neuzip convert"] / med["zstd -3"],
        "decompress_over_zstd_d": med["neuzip decompress"] / med["zstd -d"],
        "convert_over_zstd3_sync": med["neuzip convert"] / med["zstd -3 + sync"],
        "decompress_over_zstd_d_sync": med["neuzip decompress"] / med["zstd -d + sync"],
        "decompress_over_copy_sync": med["neuzip decompress"] / med["cp + sync"],
    }
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{a.file}: {report['bytes']} bytes, {a.threads} threads, median of {a.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:<18} {v * 1000:8.1f} ms")
    print(f"  convert / zstd -3    = {report['convert_over_zstd3']:.2f}  (below 1: neuzip faster)")
    print(f"  decompress / zstd -d = {report['decompress_over_zstd_d']:.2f}")
    print(f"  convert / (zstd -3 + sync)    = {report['convert_over_zstd3_sync']:.2f}")
    print(f"  decompress / (zstd -d + sync) = {report['decompress_over_zstd_d_sync']:.2f}")
    print(f"  decompress / (cp + sync)      = {report['decompress_over_copy_sync']:.2f}")
    print(f"  sizes: neuzip {sizes['neuzip']}, zstd -3 {sizes['zstd -3']}")


if __name__ == "__main__":
    main()
