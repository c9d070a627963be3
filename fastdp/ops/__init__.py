"""The single dispatch point for every op that a Triton or CUDA kernel may replace.

Each op is defined once with its pure-torch reference (which also serves CPU users)
via ``@op("name")``; kernel modules add faster implementations with
``register_impl("name", "triton" | "cuda", fn)``. At call time the backend is
chosen from ``FASTDP_BACKEND`` (``torch``, ``triton`` or ``cuda``: that backend wherever
an op has it, the torch reference elsewhere, logged once per op) or, when unset,
automatically: CUDA tensors get the fastest registered kernel, everything else
the torch reference.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pkgutil
from typing import Callable, Dict

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "cuda")
_IMPLS: Dict[str, Dict[str, Callable]] = {}
_FORCED_ONLY: set = set()  # (op, backend) pairs that automatic dispatch skips


def register_impl(name: str, backend: str, fn: Callable, *, automatic: bool = True) -> None:
    """Add a kernel implementation of op ``name`` for ``backend``.

    ``automatic=False``: run it only when FASTDP_BACKEND asks for ``backend``; automatic
    dispatch on CUDA tensors keeps the next choice (for a kernel not yet measured faster
    than the torch path, e.g. a GEMM against cuBLAS).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if name not in _IMPLS:
        raise ValueError(f"unknown op {name!r}; known ops: {sorted(_IMPLS)}")
    _IMPLS[name][backend] = fn
    if automatic:
        _FORCED_ONLY.discard((name, backend))
    else:
        _FORCED_ONLY.add((name, backend))


def requested_backend() -> str | None:
    """The backend forced by FASTDP_BACKEND, or None for automatic choice."""
    value = os.environ.get("FASTDP_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"FASTDP_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _first_tensor(args):
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


_kernels_loaded = False
_fallbacks_logged: set = set()


def declared_ops() -> list:
    """Every op's name, after importing every module of this package (each declares its ops)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return sorted(_IMPLS)


def load_kernels() -> None:
    """Register the kernels once: every op is declared first, then its implementations added.

    Triton kernels (``fastdp.kernels``) register themselves on import, when triton is installed;
    the CUDA extension (``fastdp.csrc``, which imports nothing from here) hands over its
    implementations, given the torch references it falls back to where it cannot load.
    Called on first need (a CUDA tensor, or FASTDP_BACKEND=triton|cuda), so CPU users never
    pay for the import.
    """
    global _kernels_loaded
    if _kernels_loaded:
        return
    _kernels_loaded = True
    declared_ops()
    if importlib.util.find_spec("triton") is None:
        logger.info("fastdp: triton is not installed; ops run their torch references")
    else:
        importlib.import_module("fastdp.kernels")
    if importlib.util.find_spec("fastdp.csrc") is not None:
        csrc = importlib.import_module("fastdp.csrc")
        references = {name: impls["torch"] for name, impls in _IMPLS.items()}
        for name, impl in csrc.implementations(references).items():
            register_impl(name, "cuda", impl)


def select_impl(name: str, *args) -> Callable:
    impls = _IMPLS[name]
    forced = requested_backend()
    tensor = _first_tensor(args)
    if forced not in (None, "torch") or (tensor is not None and tensor.is_cuda):
        load_kernels()
    if forced is not None:
        if forced in impls:
            return impls[forced]
        if name not in _fallbacks_logged:  # e.g. conv's clipped gradient is cuDNN's own weight gradient
            _fallbacks_logged.add(name)
            logger.info("fastdp: op %s has no %s implementation; it runs its torch reference", name, forced)
        return impls["torch"]
    if tensor is not None and tensor.is_cuda:
        for backend in ("cuda", "triton"):
            if backend in impls and (name, backend) not in _FORCED_ONLY:
                return impls[backend]
    return impls["torch"]


def op(name: str):
    """Declare an op by its torch reference; returns the dispatching function."""

    def decorate(torch_fn: Callable) -> Callable:
        _IMPLS.setdefault(name, {})["torch"] = torch_fn

        @functools.wraps(torch_fn)
        def dispatch(*args, **kwargs):
            return select_impl(name, *args)(*args, **kwargs)

        dispatch.torch_reference = torch_fn
        return dispatch

    return decorate


def uses_torch_reference(name: str, *args) -> bool:
    """Whether op ``name`` would run its torch reference on these arguments."""
    return select_impl(name, *args) is _IMPLS[name]["torch"]


def available_impls(name: str) -> Dict[str, Callable]:
    load_kernels()
    return dict(_IMPLS[name])
