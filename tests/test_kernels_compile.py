"""Ahead-of-time compile check of every shipped Triton kernel configuration, for sm_90 and sm_80,
on a machine without a GPU (``triton.compile`` with a ``GPUTarget``; resource usage read from the
cubin with the ``cuobjdump`` bundled in Triton).

It catches what the interpreter (``TRITON_INTERPRET=1``) lets through: non-constexpr globals,
type errors of the real code generator, and register spills. Fails on a compile error, on a
stack frame past two 8-byte slots or on local memory (spilled registers live in the stack frame;
checking ``LOCAL`` alone missed spills that ``ptxas -v`` reports: see ``MAX_STACK``), when an
attention kernel at a 16-byte alignment of d or a row kernel whose rows allow it does not load
16 bytes at a time (``LDG.E.128``), and when the GEMM + top-k kernel does not copy its tiles
16 bytes at a time (``LDGSTS ….128``).
Prints registers and shared memory per configuration.

Configurations: every ``BLOCK_D`` that :func:`diffkg_fast.kernels.attention.block_sizes` can
pick (d = 1 … 256), with its ``BLOCK_E``, for float32, bfloat16 and float64 inputs, at every
alignment of d that ``kernels.attention.width_align`` passes (1 … one 16-byte vector), with
dropout and normalisation on (the flags only add code to the same kernels); the backward row
kernel in both tail modes. Diffusion (:mod:`diffkg_fast.kernels.diffusion`): the GEMM + top-k
kernel with its ``TOPK_CONFIG`` tiles, float32 (IEEE and TF32) and bfloat16 (``k`` is a runtime
argument); the training step's two row kernels with and without their optional input / output;
the sampler's step kernel with and without the update and the normalisation; each at the
alignments of its row lengths that ``kernels._align._align`` passes (1 … 16). Size arguments
arrive divided by their alignment and compile without the JIT's divisibility-16 mark, as
DiffKG's H = 1000, E = 89,196 and a width d = 100 arrive.

The compiles run in a child process without ``TRITON_INTERPRET`` (conftest.py sets it for the
interpreter tests, and it changes what ``@triton.jit`` builds at import).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ARCHS = (90, 80)
WIDTHS = (16, 32, 64, 128, 256)  # every BLOCK_D of block_sizes(d), d in [1, 256]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
ALIGNS = (1, 2, 4, 8, 16)  # every value of kernels._align._align
# Size arguments (divided by their alignment) that the compiles leave without a divisibility mark.
SIZES = frozenset({"E_n", "H_k", "E_a", "H_a", "d_a"})
# A stack frame of one or two 8-byte slots is ptxas's own trade, not register pressure: ptxas
# keeps a 64-bit value or two on the stack well below its 255-register limit. With triton 3.9:
# 8 B in 12 of 450 attention entries at 64-96 registers, 16 B (24 B of spill stores) in two
# (backward rows at BLOCK_D = 256 and ALIGN = 2, i.e. d in 130 … 254 with d % 4 = 2, atomic
# tails, sm_80) at 96 registers. maxnreg=128 removed that one at 124 registers (4 resident
# blocks per SM instead of 5), and maxnreg=255 removed the 8-byte slots at 78-112 registers,
# fewer resident warps for one L1-resident store each, so both are allowed; anything larger
# fails (linear_topk bf16 at an unaligned H had a 168-byte frame). Triton 3.6 (the GPU
# machine's): 23 of the 450 attention entries keep 8-16 B.
MAX_STACK = 16
USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _sig(names: str, dt: str, acc: str) -> dict[str, str]:
    """Signature from a compact spec: ``name:kind`` with kind e (input dtype), a (accumulation
    dtype), i (int64 pointer) or n (int32 scalar)."""
    kinds = {"e": f"*{dt}", "a": f"*{acc}", "i": "*i64", "n": "i32"}
    return {n: kinds[k] for n, k in (item.split(":") for item in names.split())}


def _configs():
    yield from _attention_configs()
    yield from _diffusion_configs()


def _diffusion_configs():
    """The diffusion kernels at every alignment ``kernels.diffusion._align`` can pass. Their size
    arguments arrive divided by the alignment: compiled without the JIT's divisibility-16 mark,
    the case of DiffKG's shapes (H = 1000 → H_k = 125, E = 89,196 → E_n = 22,299)."""
    from diffkg_fast.kernels import diffusion as K

    for prec, dt in (("ieee", "fp32"), ("tf32", "fp32"), ("bf16", "bf16")):
        bm, bn, bk, warps, stages = K.TOPK_CONFIG[prec]
        # linear_topk takes 16-byte rows only (H % 4 in fp32, % 8 in bf16). ALIGN_N only sets
        # the bias loads' width: its extremes, and Alibaba's 4 at DiffKG's H.
        for ak in (4, 8, 16) if dt == "fp32" else (8, 16):
            for an in sorted({1, 16} | ({4} if ak == 8 else set())):
                yield (f"linear_topk {prec} align_k={ak} align_n={an}", K._linear_topk_kernel,
                       {**_sig("A:e W:e bias:a cand_val:a cand_idx:i B:n E_n:n H_k:n", dt,
                               "fp32"), "scale": "fp32",
                        **_sig("n_cand:n K:n", dt, "fp32")},
                       {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "TF32": prec == "tf32",
                        "ALIGN_K": ak, "ALIGN_N": an},
                       {"num_warps": warps, "num_stages": stages}, SIZES)
    for align in ALIGNS:
        for has_mask in (False, True):
            yield (f"rows denoise_input fp32 mask={has_mask} align={align}",
                   K._denoise_input_kernel,
                   _sig("x0:e noise:e t:i sa:e sb:e mask:e x_in:e E_a:n", "fp32", "fp32"),
                   {"HAS_MASK": has_mask, "BLOCK": K.ROW_BLOCK, "ALIGN": align},
                   {"num_warps": 8}, SIZES)
        for update in (False, True):
            for norm in (False, True):
                yield (f"rows sampler_step fp32 update={update} norm={norm} align={align}",
                       K._sampler_step_kernel,
                       {**_sig("a:e q:e z:e y:e n:e p:e w1b2:e w2b2:e bias:e H_a:n", "fp32",
                               "fp32"), "c1": "fp32", "c2": "fp32", "bb": "fp32"},
                       {"UPDATE": update, "NORM": norm, "BLOCK": K.STEP_BLOCK, "ALIGN": align},
                       {"num_warps": 4}, SIZES)
        for grad in (False, True):
            yield (f"rows weighted_sq_err fp32 grad={grad} align={align}",
                   K._weighted_sq_err_kernel,
                   _sig("out:e x0:e coef:e sq:e E_a:n", "fp32", "fp32"),
                   {"GRAD": grad, "BLOCK": K.ROW_BLOCK, "ALIGN": align}, {"num_warps": 8},
                   SIZES)


def _attention_configs():
    """The attention kernels at every width class and every alignment of d that
    ``kernels.attention.width_align`` passes for the dtype (1 … one 16-byte vector), d divided
    by it and unmarked: the case of d = 100 (fp32: d_a = 25)."""
    from diffkg_fast.kernels import attention as K

    for dt in DTYPES:
        acc = "fp64" if dt == "fp64" else "fp32"
        f64 = dt == "fp64"
        for block_d in WIDTHS:
            block_e, bd = K.block_sizes(block_d)
            assert bd == block_d
            top = K.width_align(block_d, DTYPES[dt])
            for align in (a for a in ALIGNS if a <= top):
                common = {"IS_F64": f64, "BLOCK_E": block_e, "BLOCK_D": block_d, "ALIGN": align}
                tag = f"{dt} d{block_d} align={align}"
                yield (f"forward {tag}", K._rgat_forward_kernel,
                       _sig("E:e P1:e P2:e rowptr:i col:i rel:i mask:e y:e lse:a norm:a d_a:n",
                            dt, acc),
                       {"HAS_MASK": True, "NORMALIZE": True, **common}, {}, SIZES)
                for atomic in (False, True):
                    yield (f"backward_rows {tag} atomic={atomic}",
                           K._rgat_backward_rows_kernel,
                           _sig("gy:e E:e P1:e P2:e rowptr:i col:i rel:i mask:e y:e lse:a "
                                "norm:a G:a dE:a a_buf:a ds_buf:a d_a:n", dt, acc),
                           {"HAS_MASK": True, "NORMALIZE": True, "TAIL_ATOMIC": atomic,
                            **common}, {}, SIZES)
                yield (f"backward_tails {tag}", K._rgat_backward_tails_kernel,
                       _sig("G:a P2:e rel:i row:i t_rowptr:i t_edge:i a_buf:a ds_buf:a dE:a "
                            "d_a:n", dt, acc), common, {}, SIZES)
                for partial in (False, True):  # atomics / deterministic partial sums
                    yield (f"backward_rel {tag} partial={partial}", K._rgat_backward_rel_kernel,
                           _sig("E:e col:i row:i r_edge:i c_rel:i c_start:i c_end:i ds_buf:a "
                                "dP1:a dP2:a d_a:n", dt, acc),
                           {"PARTIAL": partial, **common}, {}, SIZES)
                sum_args = {"IS_F64": f64, "BLOCK_C": block_e, "BLOCK_D": block_d,
                            "ALIGN": align}
                yield (f"backward_rel_sum {tag}", K._rgat_rel_sum_kernel,
                       _sig("part1:a part2:a r_first:i r_count:i dP1:a dP2:a d_a:n", dt, acc),
                       sum_args, {}, SIZES)


def _compile(name, fn, signature, constexprs, options, unmarked, arch
             ) -> tuple[str, int, tuple[int, ...], bool, bool]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # What the JIT specialises for torch tensors (16-byte aligned) and d a multiple of 16: every
    # argument divisible by 16, which is what lets the row loads vectorise; the size arguments
    # in ``unmarked`` get no mark. (Float scalars take no divisibility.)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, kind) in enumerate(signature.items())
             if kind != "fp32" and arg not in unmarked}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                        attrs=attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = USAGE.findall(out)
    assert usage, f"{name} sm_{arch}: no resource line in\n{out}"
    # cp.async copies of 16 bytes (the GEMM's tiles into shared memory), e.g.
    # LDGSTS.E.BYPASS.128 on sm_90, LDGSTS.E.BYPASS.LTC128B.128 on sm_80.
    async128 = re.search(r"LDGSTS\.E\.[.\w]*128\b", sass) is not None
    return name, arch, tuple(int(v) for v in usage[-1]), "LDG.E.128" in sass, async128


def _compile_all() -> list[tuple[str, int, tuple[int, ...], bool, bool]]:
    defaults = ({}, frozenset())  # options, unmarked
    jobs = [(*cfg, *defaults[len(cfg) - 4:], arch) for cfg in _configs() for arch in ARCHS]
    # Two threads: triton.compile spends most of its time in ptxas, a child process.
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda j: _compile(*j), jobs))


@pytest.mark.skipif(not CUOBJDUMP.is_file(), reason="Triton without its bundled cuobjdump")
def test_every_kernel_config_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) == len(list(_configs())) * len(ARCHS)
    bad, slots = [], []
    for name, arch, (reg, stack, shared, local), vec128, async128 in results:
        print(f"sm_{arch} {name}: {reg} registers, stack {stack} B, shared {shared} B, "
              f"local {local} B, 16-byte loads {vec128}, 16-byte cp.async {async128}")
        # Spilled registers live in the stack frame; none of these kernels has a local array
        # or a call, so a frame is spills.
        if local or stack > MAX_STACK:
            bad.append(f"sm_{arch} {name}: stack {stack} B, local {local} B (spill)")
        elif stack:
            slots.append(f"sm_{arch} {name}")
        # The attention kernels at a 16-byte alignment of d and BLOCK_D >= 32 (at 16 a thread's
        # slice of a bf16 tile is 8 bytes), and the row kernels where the row length allows
        # (ALIGN >= 4 fp32 elements), must load 16 bytes per instruction.
        if name.startswith(("forward", "backward")):
            dt, width, align = re.search(r" (\w+) d(\d+) align=(\d+)", name).groups()
            must128 = int(align) * DTYPES[dt].itemsize == 16 and int(width) >= 32
        else:
            must128 = name.startswith("rows ") and int(name.split("align=")[-1]) >= 4
        if must128 and not vec128:
            bad.append(f"sm_{arch} {name}: no LDG.E.128 in the SASS (loads not vectorised)")
        if name.startswith("linear_topk") and not async128:
            bad.append(f"sm_{arch} {name}: no 16-byte cp.async (GEMM tiles not vectorised)")
    print(f"{len(slots)} configurations keep a stack frame of at most {MAX_STACK} B: {slots}")
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
