"""Every Triton kernel in kernels/ compiles for H100 (sm_90) down to cubin, in fp32, bf16 and fp16.

CPU tests run the kernels only in triton's interpreter, which never runs the GPU compiler
or ptxas; this test does, ahead of time, for every autotune config (see
tests/compile_kernels_sm90.py, which also prints registers, spills and shared memory per
kernel). The compile runs in a subprocess with the interpreter off: this session sets
TRITON_INTERPRET=1 (tests/conftest.py), and kernels/_triton_utils.py patches the
interpreter when imported under it.

Marked ``compile``: minutes of CPU (ptxas for every variant), so the README's test command
deselects it and .ci/run runs it in a step of its own (``python -m pytest -m compile tests``).
"""

import os
import re
import sys
from pathlib import Path

import pytest

from .subprocesses import run

pytest.importorskip("triton")
pytestmark = pytest.mark.compile

SCRIPT = Path(__file__).with_name("compile_kernels_sm90.py")
SKIP_STATUS = 77


def run_script(tmp_path, *args, code=None, timeout=1200):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTDP_SM90_CACHE_DIR"] = str(tmp_path / "triton-cache")  # fresh: every variant really runs ptxas
    command = [sys.executable, "-c", code] if code else [sys.executable, str(SCRIPT), *args]
    result = run(command, env=env, cwd=SCRIPT.parent, timeout=timeout)  # on timeout the compile workers die too
    if result.returncode == SKIP_STATUS:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    return result


def test_every_kernel_compiles_for_sm90(tmp_path):
    result = run_script(tmp_path, "--jobs", "2")
    print(result.stdout)
    assert result.returncode == 0, f"sm_90 compile failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    assert "FAILED" not in result.stdout
    variants, kernels = map(int, re.search(r"compiling (\d+) variants of (\d+) kernels", result.stdout).groups())
    assert f"{variants}/{variants} compiled" in result.stdout
    assert kernels >= 15  # the kernels in kernels/ when this test was written: discovery finds them all
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("_")}
    assert len(listed) == kernels


def test_a_kernel_missing_from_the_table_fails_naming_it(tmp_path):
    """A new kernel without an entry in KERNELS must fail the compile test, not be skipped."""
    code = ("import sys; import compile_kernels_sm90 as c; del c.KERNELS['_scale_kernel']; "
            "sys.exit(c.main(['--jobs', '1', '--only', 'none']))")
    result = run_script(tmp_path, code=code, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "_scale_kernel" in result.stdout and "no entry in KERNELS" in result.stdout
