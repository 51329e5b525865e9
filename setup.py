"""Build script. Package metadata lives in pyproject.toml; this file exists for the compiled parts.

The C++/CUDA extension in csrc/ (the CSR propagation ops) is added here once it exists; until
then the package is pure Python plus Triton sources.
"""

from setuptools import setup

setup()
