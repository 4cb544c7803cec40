"""Builds the native packed-ternary kernel (encoder.kernel._tq2k); everything else is in pyproject.toml."""

import glob
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    raise RuntimeError("the tq2k kernel needs GCC (target pragmas, __builtin_cpu_supports); MSVC is not supported")
# No -march: SIMD paths are enabled per function (GCC target pragmas) and picked at run time by CPUID,
# so the build runs on any x86-64; on other architectures only the reference path is compiled in.
compile_args = ["-O3", "-std=c11", "-pthread", "-fno-math-errno", "-Wall"]
link_args = ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "encoder.kernel._tq2k",
            sources=sorted(glob.glob("encoder/kernel/*.c")),  # the Makefile re-installs when these change
            depends=sorted(glob.glob("encoder/kernel/*.h")),
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
)
