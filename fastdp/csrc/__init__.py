"""fastdp's CUDA extension (sources in the repository's csrc/): loading it, and its ops' implementations.

``fastdp.ops.load_kernels`` imports this package on first need (a CUDA tensor, or
FASTDP_BACKEND=cuda) and registers what ``implementations`` returns; this package imports
nothing from ``fastdp.ops`` (the dispatch point depends on its providers, not the other way).
Without a GPU there are none, and a log line says the pure-torch path runs. With one, they are
the ``cuda`` implementations of ``lstm_cell_pointwise`` and ``gru_cell_pointwise``; the
extension itself is loaded on their first call, so only models with recurrent layers pay for it:

1. ``fastdp._C``, built by setup.py where CUDA torch and nvcc are present
   (``pip install --no-build-isolation -e .`` builds it in place);
2. else JIT-built with ninja by ``torch.utils.cpp_extension.load`` (about a minute, once:
   the build folder is ``TORCH_EXTENSIONS_DIR`` when set, else torch's cache folder);
3. else (no nvcc, no sources, a failed build) the torch reference, with a warning saying why.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Callable, Dict

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

#: the extension's sources: csrc/ at the repository root (a source checkout or editable install)
SOURCES_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCE_FILES = ("bindings.cpp", "rnn_cells.cu")
JIT_NAME = "fastdp_cuda_ext"

_extension = None
_loaded = False


def _jit_build():
    from torch.utils import cpp_extension

    sources = [SOURCES_DIR / name for name in SOURCE_FILES]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        logger.warning("fastdp.csrc: no prebuilt fastdp._C and no sources to JIT-build (%s missing); "
                       "LSTM/GRU cells run the pure-torch path", ", ".join(missing))
        return None
    if cpp_extension.CUDA_HOME is None:
        logger.warning("fastdp.csrc: no prebuilt fastdp._C and no CUDA toolkit (nvcc) to JIT-build it; "
                       "LSTM/GRU cells run the pure-torch path")
        return None
    logger.info("fastdp.csrc: JIT-building the CUDA extension with ninja (once; build folder: "
                "TORCH_EXTENSIONS_DIR if set, else torch's cache)")
    start = time.perf_counter()
    module = cpp_extension.load(
        name=JIT_NAME, sources=[str(path) for path in sources],
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False,
    )
    logger.info("fastdp.csrc: CUDA extension ready after %.0f s", time.perf_counter() - start)
    return module


def load_extension():
    """The extension module (prebuilt, else JIT-built), or None; tried once per process."""
    global _extension, _loaded
    if not _loaded:
        _loaded = True
        try:
            _extension = importlib.import_module("fastdp._C")
            logger.info("fastdp.csrc: using the prebuilt CUDA extension fastdp._C")
        except ImportError:
            try:
                _extension = _jit_build()
            except Exception as error:  # a compiler error must not stop training: the torch path is exact
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                logger.warning("fastdp.csrc: JIT build of the CUDA extension failed (%s); LSTM/GRU cells run "
                               "the pure-torch path", reason)
                _extension = None
    return _extension


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (one time step of [B, T, ·]); the last dimension must be contiguous."""
    return t if t.dim() == 2 and t.stride(-1) == 1 else t.contiguous()


def _common_dtype(*tensors: torch.Tensor):
    """One dtype for the kernel (autocast gives bf16 gates with an fp32 initial state)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(_row_major(t.to(dtype)) for t in tensors)


class LSTMCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, gh, c_prev):
        gx, gh, c_prev = _common_dtype(gx, gh, c_prev)
        h, c, gates = load_extension().lstm_cell_forward(gx, gh, c_prev)
        ctx.save_for_backward(gates, c_prev, c)
        return h, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_c):
        gates, c_prev, c = ctx.saved_tensors
        grad_h, grad_c = (g.to(c.dtype).contiguous() for g in (grad_h, grad_c))
        grad_gates, grad_c_prev = load_extension().lstm_cell_backward(grad_h, grad_c, gates, c_prev, c)
        return grad_gates, grad_gates, grad_c_prev  # gates = gx + gh: one gradient for both


class GRUCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, gh, h_prev):
        gx, gh, h_prev = _common_dtype(gx, gh, h_prev)
        h, saved = load_extension().gru_cell_forward(gx, gh, h_prev)
        ctx.save_for_backward(saved, h_prev)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        saved, h_prev = ctx.saved_tensors
        return tuple(load_extension().gru_cell_backward(grad_h.to(h_prev.dtype).contiguous(), saved, h_prev))


def _kernel_or(function, reference: Callable) -> Callable:
    """``function.apply`` on CUDA tensors once the extension loads, else ``reference`` (exact).

    Its ``resolve(gx)`` says which of the two runs: ``fastdp.ops.rnn_cells.cell_impl`` asks once
    per sequence, so the recurrence calls the kernel (or the reference) directly and the layers
    log the true choice."""

    def resolve(gx: torch.Tensor) -> Callable:
        return function.apply if gx.is_cuda and load_extension() is not None else reference

    def implementation(gx: torch.Tensor, gh: torch.Tensor, state: torch.Tensor):
        return resolve(gx)(gx, gh, state)

    implementation.resolve = resolve
    return implementation


def implementations(references: Dict[str, Callable]) -> Dict[str, Callable]:
    """The ``cuda`` implementations by op name, for ``fastdp.ops`` to register: none without a GPU.

    ``references``: each op's torch reference by name, run where the extension cannot load."""
    if not torch.cuda.is_available():
        logger.info("fastdp.csrc: no GPU; the CUDA extension is not loaded and LSTM/GRU cells run the pure-torch path")
        return {}
    return {
        "lstm_cell_pointwise": _kernel_or(LSTMCellFunction, references["lstm_cell_pointwise"]),
        "gru_cell_pointwise": _kernel_or(GRUCellFunction, references["gru_cell_pointwise"]),
    }


def extension_available() -> bool:
    """Whether the fused kernels can run here (loads or builds the extension on first call)."""
    return torch.cuda.is_available() and load_extension() is not None
