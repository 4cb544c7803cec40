"""Builds the native packed-ternary kernel (encoder.kernel._tq2k); everything else is in pyproject.toml."""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":  # MSVC: no GCC target pragmas; the reference path still compiles
    compile_args, link_args = ["/O2", "/openmp"], []
else:
    # No -march: SIMD paths are enabled per function (target pragmas) and picked at run time by CPUID,
    # so the wheel runs on any x86-64 (and builds elsewhere with only the reference path used).
    compile_args = ["-O3", "-std=c11", "-fopenmp", "-fno-math-errno", "-Wall"]
    link_args = ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "encoder.kernel._tq2k",
            sources=[f"encoder/kernel/{name}.c" for name in ("tq2k_module", "tq2k_ref", "tq2k_avx2", "tq2k_avx512")],
            depends=["encoder/kernel/tq2k.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
)
