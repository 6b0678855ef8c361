#!/usr/bin/env python3
"""Compiles kernels/*.cu all the way to SASS (cubin) with NVRTC for real GPU architectures and prints ptxas's
resource report (registers, stack, spills). A developer check that needs no GPU, only an NVRTC library:

    python3 scripts/kernel_sass.py /path/to/libnvrtc.so.12 sm_80 sm_90
"""
import ctypes
import pathlib
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    nvrtc = ctypes.CDLL(sys.argv[1])
    failed = False
    for source in sorted(pathlib.Path(__file__).resolve().parent.parent.glob("kernels/*.cu")):
        for arch in sys.argv[2:]:
            prog = ctypes.c_void_p()
            if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0, None, None):
                print(f"{source.name}: nvrtcCreateProgram failed", file=sys.stderr)
                return 1
            opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++14", b"--ptxas-options=-v"]
            rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            cubin = ctypes.c_size_t()
            if rc == 0:
                nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
            print(f"== {source.name} {arch}: {'ok' if rc == 0 else f'error {rc}'}, cubin {cubin.value} bytes")
            print(log.value.decode(errors="replace").strip())
            nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
            failed |= rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
