"""Build script: the Python packages, with kernels/ shipped as ``fastdp.kernels``.

Metadata and dependencies live in pyproject.toml. The CUDA extension in csrc/ is
added here once it has sources (built when CUDA torch and nvcc are present,
otherwise JIT-built with ninja on first GPU use).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastdp", "fastdp.*"]) + ["fastdp.kernels"],
    package_dir={"fastdp.kernels": "kernels"},
)
