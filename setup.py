"""Build script. Package metadata lives in pyproject.toml; this file adds the compiled parts.

The C++ extension of csrc/ (``torch.ops.diffkg_fast.csr_spmm`` / ``csr_propagate``) is built
ahead of time as ``diffkg_fast._C`` when torch is importable at build time, i.e. with
``pip install --no-build-isolation`` (or ``pip wheel --no-build-isolation``); its CUDA kernels
(csrc/cuda/*.cu) only when that torch has CUDA and nvcc is found. With build isolation (a plain
``pip install -e .``) torch is absent here and nothing is compiled: the first call of a kernel
backend then builds the extension with torch's JIT loader (diffkg_fast/ops/_extension.py; the
CUDA part too under the same condition), from the sources shipped as package data
(diffkg_fast/csrc/) or the checkout's csrc/. The extension is
``optional``: a failed compile (no compiler) warns and leaves a working pure-Python package.
``DIFFKG_FAST_NO_EXTENSION=1`` skips it.
"""

import glob
import os

from setuptools import setup


def _extension():
    if os.environ.get("DIFFKG_FAST_NO_EXTENSION"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:  # build isolation: no torch, no ahead-of-time build
        return {}
    sources = ["csrc/spmm.cpp", "csrc/cpu/spmm_cpu.cpp", "csrc/attention.cpp",
               "csrc/cpu/attention_cpu.cpp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and ce.CUDA_HOME is not None
    kwargs = dict(
        define_macros=[("DIFFKG_FAST_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
        optional=True,
    )
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the architecture from (a CPU build node with a CUDA torch): torch's
        # builder would fail with an IndexError, so name the cards this project targets, A100
        # and H100/H200, plus PTX for newer ones.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    if use_cuda:
        ext = ce.CUDAExtension("diffkg_fast._C", sources + cuda_sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = kwargs["extra_compile_args"]["cxx"]
        ext = ce.CppExtension("diffkg_fast._C", sources, **kwargs)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": ce.BuildExtension}}


setup(**_extension())
