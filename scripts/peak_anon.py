#!/usr/bin/env python3
"""Runs a command and reports its peak anonymous memory (heap, stacks: what it allocates), apart from the
file-backed pages of the files it maps, which the kernel can drop at any time.

    python3 scripts/peak_anon.py [--json] -- COMMAND ARGS...

Linux only. RssAnon, RssFile and VmHWM are sampled from /proc/PID/status about every millisecond and their
maxima reported; VmHWM is the kernel's own peak of all resident pages, file-backed ones included, so the
anonymous peak is the figure for what the command allocates. Exits with the command's exit code.
"""
import json
import subprocess
import sys
import time


def status(pid: int) -> dict:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def main() -> int:
    args = sys.argv[1:]
    as_json = False
    if args and args[0] == "--json":
        as_json, args = True, args[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    start = time.monotonic()
    proc = subprocess.Popen(args)
    peak_anon = peak_file = hwm = 0
    while proc.poll() is None:
        s = status(proc.pid)
        peak_anon = max(peak_anon, s.get("RssAnon", 0))
        peak_file = max(peak_file, s.get("RssFile", 0))
        hwm = max(hwm, s.get("VmHWM", 0))
        time.sleep(0.001)
    report = {
        "command": args,
        "exit_code": proc.returncode,
        "seconds": round(time.monotonic() - start, 3),
        "peak_anon_kib": peak_anon,
        "peak_file_kib": peak_file,
        "vm_hwm_kib": hwm,
    }
    if as_json:
        print(json.dumps(report))
    else:
        print(
            f"peak anonymous {peak_anon / 1024:.1f} MiB, peak file-backed {peak_file / 1024:.1f} MiB, "
            f"VmHWM {hwm / 1024:.1f} MiB, {report['seconds']} s, exit {proc.returncode}",
            file=sys.stderr,
        )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
