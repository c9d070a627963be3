"""Run a command for a test so that nothing it starts outlives it.

``subprocess.run(..., timeout=...)`` kills only the process it started: workers that process
spawned (a compile pool, the benchmark's per-method processes) keep running after the test.
Here the command leads a process group of its own, and on a timeout, an interrupt or any
other error the whole group is killed before the exception propagates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence


def run(command: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)``,
    killing the command's whole process group on timeout (``TimeoutExpired`` is raised after)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:  # the timeout, Ctrl-C, pytest's own stop: the workers go too
        _kill_group(process.pid)
        process.communicate()
        raise
    _kill_group(process.pid)  # workers the command left behind when it exited
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def python_output(code: str, *, timeout: float = 300) -> str:
    """The stdout of ``python -c code`` in a fresh interpreter (what a new user's process sees);
    a non-zero exit fails the calling test with its stderr."""
    result = run([sys.executable, "-c", code], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout
