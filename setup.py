"""Build script: the Python packages, with kernels/ shipped as ``fastdp.kernels``.

Metadata and dependencies live in pyproject.toml. The CUDA extension in csrc/ becomes
``fastdp._C`` when CUDA torch and nvcc are present (``pip install --no-build-isolation .``,
so that the build sees the installed torch; FASTDP_BUILD_CUDA=0 skips it). Anywhere else it
is left out and never breaks the install: fastdp JIT-builds it with ninja on first GPU use.
"""

import os

from setuptools import find_packages, setup


def cuda_extension() -> dict:
    """``ext_modules``/``cmdclass`` for fastdp._C when CUDA torch and nvcc are present, else {}."""
    if os.environ.get("FASTDP_BUILD_CUDA", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # an isolated build environment has no torch
        return {}
    nvcc = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc:  # CPU torch cannot link a CUDA extension, nvcc or not
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed build leaves the extension out (the JIT build or the torch path takes over)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001  (compiler errors come as several types)
                print(f"fastdp: building {ext.name} failed ({error}); it will be JIT-built on first GPU use")

    extension = CUDAExtension(
        "fastdp._C", ["csrc/bindings.cpp", "csrc/rnn_cells.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}, optional=True,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    packages=find_packages(include=["fastdp", "fastdp.*"]) + ["fastdp.kernels"],
    package_dir={"fastdp.kernels": "kernels"},
    package_data={"fastdp": ["py.typed"]},  # PEP 561: the package's annotations are meant for type checkers
    **cuda_extension(),
)
