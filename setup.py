"""Builds the optional C++ CPU kernels; all package metadata lives in pyproject.toml.

The extension is optional: without a working C++17 compiler the package still installs (with
a warning) and bitnet_train.kernels.cpu falls back to its pure-torch reference.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import setup


class BuildExt(build_ext):
    """Adds -O3, and OpenMP where the compiler has it (otherwise the kernels run on one thread)."""

    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            flags = ["-O3"]
            if has_flag(self.compiler, "-fopenmp"):
                flags.append("-fopenmp")
            for ext in self.extensions:
                ext.extra_compile_args += flags
                ext.extra_link_args += [f for f in flags if f == "-fopenmp"]
        super().build_extensions()


cpu_kernels = Pybind11Extension(
    "bitnet_train._cpu_kernels",
    sorted(glob("kernels/cpu/*.cpp")),
    include_dirs=["kernels/cpu"],
    depends=glob("kernels/cpu/*.h"),
    cxx_std=17,
    optional=True,
)

setup(ext_modules=[cpu_kernels], cmdclass={"build_ext": BuildExt})
