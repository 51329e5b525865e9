"""The CUDA SpMM kernels of csrc/cuda/spmm_kernels.cuh, run on the CPU (no GPU needed).

tests/cuda_emu/cuda_emu.h emulates the CUDA subset the kernels use: lanes are fibers run in
lockstep, ``__shfl_sync`` is a two-round exchange, launches run every warp of the grid (forward,
reverse or shuffled order), ``launch_kernel`` calls the emulator instead of ``<<<...>>>``. The
driver tests/cuda_emu/spmm_emu_test.cpp runs the real launchers (``launch_csr_spmm``,
``launch_csr_propagate``: every kernel, the long-row chunk list, the workspace bound) against a
dense float64 product, with AddressSanitizer and UBSan (out-of-bounds workspace or gathers,
misaligned vector loads), and checks bitwise repeatability under other warp orders. Two builds:
the shipped constants (long rows past 256 nonzeros, chunks of 128) and small ones (40 / 16)
that put many chunk boundaries in small graphs and run every VEC / COLS variant.

What this cannot show: timing, memory ordering between warps, and anything of the torch binding
(spmm_cuda.cu); test_spmm_cuda_compile.py compiles those, the GPU tests there run them.
Mutations of the kernels that this test caught when written (each made it fail): a row's last
chunk left out of the sum; a chunk's end off by one; the long-row threshold off by one (a row
done twice); a row listing one chunk too few; the warp kernel's grid one block short for an odd
number of rows (after the driver gained such a graph); a lane leaving before a shuffle; vector
loads on misaligned rows (UBSan); a workspace bound without each long row's partly filled chunk
(ASan)."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
BUILDS = {
    "shipped": [],
    "small": ["-DDIFFKG_FAST_LONG_ROW=40", "-DDIFFKG_FAST_CHUNK=16"],
}
FLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=undefined", "-Wall", "-Wextra",
         "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc' / 'cuda'}"]


def _build_and_run(gxx: str, name: str, out_dir: Path) -> tuple[str, int, str]:
    exe = out_dir / f"spmm_emu_{name}"
    res = subprocess.run([gxx, *FLAGS, *BUILDS[name], str(EMU / "spmm_emu_test.cpp"), "-o",
                          str(exe)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        return name, res.returncode, f"compile failed:\n{res.stdout}\n{res.stderr}"
    # detect_leaks=0: the abandoned fibers of a failed warp are not leaks worth reporting.
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    return name, run.returncode, run.stdout + run.stderr


@pytest.mark.slow
def test_cuda_kernels_run_on_the_emulator(tmp_path: Path) -> None:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the CUDA kernels are not run on the CPU emulator")
    with ThreadPoolExecutor(len(BUILDS)) as pool:  # ~20 s compile + ~20 s run each, 2 cores
        results = list(pool.map(lambda n: _build_and_run(gxx, n, tmp_path), BUILDS))
    for name, _, text in results:
        print(f"--- {name} build\n{text}")
    failed = [f"{name} (exit {rc}):\n{text[-4000:]}" for name, rc, text in results if rc != 0]
    assert not failed, "\n".join(failed)
    small = next(text for name, _, text in results if name == "small")
    assert "variants: float 9, double 6" in small, small  # every kernel variant ran
