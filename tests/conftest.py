"""Test-session setup shared by every test module.

Without a GPU, Triton kernels run in triton's interpreter (``TRITON_INTERPRET=1``), which
must be set before triton is first imported; kernel tests compare them with their torch
references on CPU tensors. With a GPU the kernels run for real.

Compile-only checks (``@pytest.mark.compile``: ptxas/nvcc for sm_90, minutes of CPU, no GPU
needed) are deselected by the README's test command (``-m "not compile"``); .ci/run runs them
in a step of their own.
"""

import os
import signal

import torch

# A SIGTERM (the `timeout` that bounds each step of .ci/run) stops the session like Ctrl-C, so
# cleanup runs: tests/subprocesses.py then kills the process groups of the commands it started.
signal.signal(signal.SIGTERM, signal.default_int_handler)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 convolutions and matmuls in IEEE fp32 (cuDNN defaults to TF32): tests compare with
    # fp32 references at fp32 tolerances
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
