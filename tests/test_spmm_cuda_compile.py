"""Compile check of the CUDA SpMM sources in csrc/cuda/ with nvcc, on a machine without a GPU.

What it checks:
- csrc/cuda/spmm_kernels.cuh (plain CUDA C++, no torch headers) through a tiny driver that
  instantiates the host launcher for float and double, hence every kernel variant shipped
  (float: VEC 1/2/4 x COLS 1/2/4; double: VEC 1/2 x COLS 1/2/4; each as the warp-per-row, the
  long-row chunk and the chunk-sum kernel; and the chunk-list kernel), for sm_80 and sm_90 with
  `nvcc -Xptxas -v`. Fails on a compile error, on a missing variant, on spill stores or loads
  (> 0 bytes) and on a stack frame (> 0 bytes: for these kernels it could only mean the
  accumulators went to local memory). Prints registers per kernel per arch.
- csrc/cuda/spmm_cuda.cu, the torch binding, against the CPU torch wheel's own headers (it ships
  ATen/ and c10/cuda/ headers but not the generated c10/cuda/impl/cuda_cmake_macros.h, whose
  only content is an export macro: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it) with
  `nvcc --cuda` for sm_90: preprocessing, the EDG C++ front end on the host code (full semantic
  check of the TORCH_CHECKs, dispatch and registration), cicc and ptxas on the device code.
  Not done here: the host compiler's own compile of the binding and the link against
  libc10_cuda / libtorch_cuda, which a CPU wheel lacks: that happens in the extension build on a
  machine with a CUDA torch.
Not checked here: the numbers (tests/test_spmm_cuda_emu.py runs the same kernels on a CPU
emulator of the warp; a GPU is still the judge). On a GPU machine, test_cuda_kernels_match_dense
and test_cuda_long_rows_match_dense below run every kernel variant against a dense product
(skipped without a CUDA device or when the extension was built without csrc/cuda).

The compile check is skipped only when nvcc is absent. The binding compile (~30 s) runs in
parallel with the kernel compiles (~3 s per arch).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = ("sm_80", "sm_90")
# Every kernel variant the launcher can pick: (dtype, VEC, COLS).
VARIANTS = {("f", v, c) for v in (1, 2, 4) for c in (1, 2, 4)} | {
    ("d", v, c) for v in (1, 2) for c in (1, 2, 4)
}

DRIVER = """\
#include "spmm_kernels.cuh"
namespace k = diffkg_fast::cuda;
#define INSTANTIATE(T)                                                                      \\
  template void k::launch_csr_spmm<T>(const int64_t*, const int64_t*, const T*, const T*, T*, \\
                                      int64_t, int64_t, const k::LongRowWork<T>&,           \\
                                      cudaStream_t);                                        \\
  template void k::launch_csr_propagate<T>(const int64_t*, const int64_t*, const T*,        \\
                                           const T*, T*, T*, T*, int64_t, int64_t, int64_t, \\
                                           const k::LongRowWork<T>&, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(double)
"""

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
VARIANT = re.compile(r"csr_spmm_(warp_row|chunk|chunk_sum)_kernelI([fd])Li(\d+)ELi(\d+)E")
KERNELS = ("warp_row", "chunk", "chunk_sum")  # short rows; long rows' chunks; their sum


def find_nvcc() -> str | None:
    for cand in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def parse_ptxas(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(kernel, arch): {"regs", "stack", "spill_st", "spill_ld"}} from `-Xptxas -v` output."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    key = None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            key = (m.group(1), m.group(2))
            out[key] = {}
        elif key and (m := PROPS.search(line)):
            out[key].update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]))
        elif key and (m := REGS.search(line)):
            out[key]["regs"] = int(m[1])
    return out


def check_kernels(stats: dict[tuple[str, str], dict[str, int]], archs: tuple[str, ...]) -> None:
    for (name, arch), s in sorted(stats.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = VARIANT.search(name)
        label = (f"{m[1]} {'float' if m[2] == 'f' else 'double'} VEC={m[3]} COLS={m[4]}"
                 if m else name)
        print(
            f"{arch} {label}: {s.get('regs')} registers, stack {s.get('stack')} B, "
            f"spill {s.get('spill_st')}/{s.get('spill_ld')} B"
        )
    bad = {
        k: s
        for k, s in stats.items()
        if set(s) != {"regs", "stack", "spill_st", "spill_ld"}
        or s["spill_st"]
        or s["spill_ld"]
        or s["stack"]
    }
    assert not bad, f"spills, local memory or unparsed ptxas output: {bad}"
    for arch in archs:
        assert any("csr_list_long_rows_kernel" in name for name, a in stats if a == arch), (
            f"{arch}: the chunk-list kernel was not compiled")
        for kernel in KERNELS:
            found = {
                (m[2], int(m[3]), int(m[4]))
                for name, a in stats
                if a == arch and (m := VARIANT.search(name)) and m[1] == kernel
            }
            assert found == VARIANTS, (
                f"{arch} {kernel}: variants {sorted(found)} != {sorted(VARIANTS)}")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


@pytest.mark.slow
def test_spmm_cuda_sources_compile(tmp_path: Path) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin): the CUDA sources are not compiled")

    # The binding (slow: torch headers) starts first and runs beside the kernel compiles.
    inc = [Path(p) for p in cpp_ext.include_paths()]
    binding = None
    if (inc[0] / "c10" / "cuda" / "CUDAGuard.h").is_file():
        cmd = [nvcc, "-std=c++20", "-arch=sm_90", "--cuda", "-Xptxas", "-v"]
        if not (inc[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
            cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
        cmd += [f"-I{p}" for p in inc]
        cmd += [str(CUDA_DIR / "spmm_cuda.cu"), "-o", str(tmp_path / "binding.cu.ii")]
        binding = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    try:
        driver = tmp_path / "driver.cu"
        driver.write_text(DRIVER)
        stats = {}
        for arch in ARCHS:
            res = run(
                [
                    nvcc,
                    "-std=c++17",
                    f"-arch={arch}",
                    "-cubin",
                    "-Xptxas",
                    "-v",
                    f"-I{CUDA_DIR}",
                    str(driver),
                    "-o",
                    str(tmp_path / f"driver_{arch}.cubin"),
                ]
            )
            assert res.returncode == 0, f"nvcc {arch} failed:\n{res.stdout}\n{res.stderr}"
            stats.update(parse_ptxas(res.stdout + res.stderr))
        check_kernels(stats, ARCHS)

        if binding is None:
            print("torch has no c10/cuda headers: spmm_cuda.cu not compiled here")
            return
        text, _ = binding.communicate(timeout=240)
        assert binding.returncode == 0, f"nvcc spmm_cuda.cu failed:\n{text}"
        check_kernels(parse_ptxas(text), ("sm_90",))
        print("spmm_cuda.cu: host front end + device code for sm_90 ok")
    finally:
        if binding is not None and binding.poll() is None:
            binding.kill()
            binding.wait()


def _csr(n: int, seed: int, dtype, density: float = 0.15, long_rows: dict[int, int] | None = None):
    """A square CSR with an empty row, a full row 0 (longer than 64: three 32-pair chunks) and
    random rows; ``long_rows`` {row: nnz} sets those rows' first nnz entries. Values scaled by
    1/degree so that powers of A stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(n, n, generator=g) < density).to(torch.float64)
    dense[1] = 0
    dense[0] = 1
    for r, k in (long_rows or {}).items():
        dense[r] = 0
        dense[r, :k] = 1
    dense = dense * torch.rand(n, n, generator=g, dtype=torch.float64)
    dense = dense / dense.sum(1, keepdim=True).clamp_min(1.0)
    mask = dense != 0
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = mask.sum(1).cumsum(0)
    # nonzero() and boolean indexing both walk row-major: CSR order.
    return rowptr, mask.nonzero()[:, 1].contiguous(), dense[mask].to(dtype), dense


JIT_PROBE = """\
import sys, torch
sys.modules["diffkg_fast._C"] = None  # as after a plain `pip install` (build isolation)
from diffkg_fast.ops import _extension as ext
ext.load_extension()
keys = [k for k in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key("diffkg_fast::csr_spmm", k)]
print("registered", keys, ext._STATE.get("how"))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None or cpp_ext.CUDA_HOME is None,
                    reason="needs a CUDA build of torch and nvcc (the device mirror, a GPU host)")
def test_jit_build_compiles_the_cuda_kernels(tmp_path: Path) -> None:
    """Without the ahead-of-time build, the first call compiles csrc/cuda/ with the CPU sources
    (no GPU needed: registration is what is checked), into its own cache entry."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", JIT_PROBE], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "registered ['CPU', 'CUDA'] jit" in r.stdout, r.stdout + r.stderr[-4000:]
    assert "building the diffkg_fast CPU + CUDA extension" in r.stderr
    assert (tmp_path / "diffkg_fast_cuda").is_dir()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_kernels_match_dense(dtype: str) -> None:
    """On a GPU: every VEC / COLS variant (d from 1 to 600, 16-byte aligned and misaligned x),
    one- and multi-tile rows, empty and long rows, csr_propagate for 0..3 layers, against a
    dense float64 product. Skipped without CUDA or without the CUDA kernels registered."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from diffkg_fast.ops._extension import cuda_kernels_registered, load_extension

    try:
        load_extension()
    except RuntimeError as exc:
        pytest.skip(f"extension not built: {exc}")
    if not cuda_kernels_registered():
        pytest.skip("the extension was built without csrc/cuda (no CUDA kernel registered)")
    dt = getattr(torch, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dt == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    n = 70
    rowptr, col, val, dense = _csr(n, seed=3, dtype=dt)
    parts = (rowptr.cuda(), col.cuda(), val.cuda())
    ops = torch.ops.diffkg_fast
    for d in (1, 7, 31, 64, 100, 128, 257, 600):
        x64 = torch.randn(n, d, dtype=torch.float64)
        # A 16-byte-aligned x and a contiguous one offset by one element (scalar path).
        aligned = x64.to(dt).cuda()
        shifted = torch.empty(n * d + 1, dtype=dt, device="cuda")[1:].view(n, d)
        shifted.copy_(aligned)
        ref = dense @ x64.to(dt).double()
        for x in (aligned, shifted):
            out = ops.csr_spmm(*parts, x)
            torch.testing.assert_close(out.double().cpu(), ref, **tol, msg=f"spmm d={d}")
            total, power = x64.to(dt).double(), x64.to(dt).double()
            for layers in range(4):
                if layers:
                    power = dense @ power
                    total = total + power
                out = ops.csr_propagate(*parts, x, layers)
                torch.testing.assert_close(
                    out.double().cpu(), total, **tol, msg=f"propagate d={d} layers={layers}"
                )
    # Empty graph and zero width.
    empty = torch.zeros(1, dtype=torch.int64, device="cuda")
    none = torch.zeros(0, dtype=torch.int64, device="cuda")
    x = torch.randn(0, 5, dtype=dt, device="cuda")
    assert ops.csr_spmm(empty, none, none.to(dt), x).shape == (0, 5)
    z = torch.zeros(n, 0, dtype=dt, device="cuda")
    assert ops.csr_spmm(*parts, z).shape == (n, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_long_rows_match_dense(dtype: str) -> None:
    """On a GPU: rows past kLongRow = 256 nonzeros are cut into chunks of kChunk = 128 (the
    chunk list, the chunk kernel, the chunk sum). Rows of 256 (the warp kernel's last length),
    257 (the first long one), 384 (three whole chunks) and 385, long rows side by side (their
    slots in the list then depend on the schedule), the 2600-long full row 0, every VEC / COLS
    variant, spmm and propagate (the fused sum, in place; the list is made once per call),
    against a dense float64 product; and the result is the same bitwise on a second call (no
    atomics on the data, partials added in chunk order)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from diffkg_fast.ops._extension import cuda_kernels_registered, load_extension

    load_extension()
    if not cuda_kernels_registered():
        pytest.skip("the extension was built without csrc/cuda (no CUDA kernel registered)")
    dt = getattr(torch, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dt == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    n = 2600
    rowptr, col, val, dense = _csr(n, seed=5, dtype=dt, density=0.004,
                                   long_rows={3: 257, 4: 256, 5: 384, 6: 385, 7: 1800, 300: 2000,
                                              1500: 1100})
    deg = (rowptr[1:] - rowptr[:-1]).tolist()
    assert deg[0] == n and deg[3] == 257 and deg[4] == 256 and deg[5] == 384 and deg[1] == 0
    parts = (rowptr.cuda(), col.cuda(), val.cuda())
    ops = torch.ops.diffkg_fast
    for d in (1, 7, 64, 128, 600):
        x64 = torch.randn(n, d, dtype=torch.float64)
        aligned = x64.to(dt).cuda()
        shifted = torch.empty(n * d + 1, dtype=dt, device="cuda")[1:].view(n, d)
        shifted.copy_(aligned)
        xd = x64.to(dt).double()
        ref = dense @ xd
        for x in (aligned, shifted):
            out = ops.csr_spmm(*parts, x)
            torch.testing.assert_close(out.double().cpu(), ref, **tol, msg=f"spmm d={d}")
            assert torch.equal(ops.csr_spmm(*parts, x), out), f"spmm d={d} not deterministic"
            total = xd + ref + dense @ ref
            out = ops.csr_propagate(*parts, x, 2)
            torch.testing.assert_close(out.double().cpu(), total, **tol, msg=f"propagate d={d}")
