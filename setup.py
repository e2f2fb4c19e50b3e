"""Builds the optional C++ CPU kernels; all package metadata lives in pyproject.toml.

The extension is optional: without a working C++17 compiler the package still installs (with
a warning) and bitnet_train.kernels.cpu falls back to its pure-torch reference.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

cpu_kernels = Pybind11Extension(
    "bitnet_train._cpu_kernels",
    sorted(glob("kernels/cpu/*.cpp")),
    include_dirs=["kernels/cpu"],
    depends=glob("kernels/cpu/*.h"),
    cxx_std=17,
    extra_compile_args=["-O3", "-ffp-contract=off"],
    optional=True,
)

setup(ext_modules=[cpu_kernels])
