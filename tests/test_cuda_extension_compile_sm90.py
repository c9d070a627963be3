"""csrc/rnn_cells.cu compiles for H100 (sm_90) with nvcc, with no GPU needed.

The CUDA extension's own tests (tests/test_cuda_extension.py) need a GPU; this one checks,
wherever nvcc is installed, that the kernels and their launchers still compile, with torch's
own nvcc flags and headers. A CPU build of torch ships the CUDA headers but not the one that
its CMake generates (c10/cuda/impl/cuda_cmake_macros.h); the test writes that one-line header.
Marked ``compile`` (about a minute of CPU): .ci/run runs it in its step of compile checks.
"""

import shutil
from pathlib import Path

import pytest

from .subprocesses import run

pytestmark = pytest.mark.compile

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [Path(CUDA_HOME) / "bin" / "nvcc"] if CUDA_HOME else []
    candidates += [Path(p) for p in filter(None, [shutil.which("nvcc")])]
    return next((str(p) for p in candidates if p.is_file()), None)


def test_rnn_cell_kernels_compile_for_sm90(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc here (CUDA toolkit not installed)")
    includes = include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in includes):
        shim = tmp_path / "include" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [str(tmp_path / "include"), *includes]
    command = [nvcc, "-c", str(CSRC / "rnn_cells.cu"), "-o", str(tmp_path / "rnn_cells.o"),
               "-arch=sm_90", "-O3", "-std=c++20", *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes)]
    result = run(command, timeout=1200)
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    assert (tmp_path / "rnn_cells.o").stat().st_size > 0
