"""tests/subprocesses.py: a test's command never leaves processes behind."""

import os
import subprocess
import sys
import time

import pytest

from .subprocesses import run

SPAWN_AND_WAIT = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(120)
"""


def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (a zombie awaiting its reaper counts as ended)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_timeout_kills_the_workers_the_command_started(tmp_path):
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", SPAWN_AND_WAIT, str(pid_file)], timeout=15)  # time to start both
    assert _gone(int(pid_file.read_text()))


def test_output_and_status_come_back():
    result = run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                 timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
