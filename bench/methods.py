"""The training-step methods the benchmark compares, one ``prepare`` function each.

``prepare(spec, x, y, run) -> Prepared`` builds everything a method needs (wrapping,
optimizer, buffers) outside the timed region and returns a ``step()`` that does one
whole training step on the fixed batch ``(x, y)``: forward, backward, clipping, noise and
the optimizer step. A step may return its own duration in seconds; microbatching does,
because it times only some of the samples and extrapolates.

Every DP method uses σ = NOISE_MULTIPLIER, C = MAX_GRAD_NORM, flat clipping (except
fastdp-bk-per_layer: per-parameter bounds whose 2-norm is C), the mean
loss, and a fixed batch: the batch size is B every step (no Poisson sampling), so the
step cost is measured, not the data loader.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 1e-3

#: fastdp methods that force one backend; the value goes into FASTDP_BACKEND of the subprocess
BACKEND_OF_METHOD = {"fastdp-bk-torch": "torch", "fastdp-bk-triton": "triton", "fastdp-bk-cuda": "cuda"}
OPACUS_METHODS = ("opacus-hooks", "opacus-ghost", "opacus-functorch")


class MethodUnavailable(RuntimeError):
    """The method cannot run here (a library or a DP layer is missing); becomes an error row."""


@dataclass
class Prepared:
    step: Callable[[], Optional[float]]
    note: str = ""
    extrapolated: bool = False


@dataclass
class RunSettings:
    """What a method needs to know about the run."""

    device: torch.device
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    microbatch_samples: Optional[int] = None  # overrides the model's cap; 0 = the whole batch

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LEARNING_RATE)


def _one_batch_loader(x, y) -> torch.utils.data.DataLoader:
    """A loader whose one batch is (x, y): make_private reads the batch size from it; it is never iterated."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])


def _plain_step(model, optimizer, criterion, x, y, run, keep_grads: bool = False) -> Callable[[], None]:
    def step():
        with run.autocast():
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)

    return step


def _add_noise_and_step(params, summed, optimizer, batch_size: int) -> None:
    """The end of a hand-written DP step: p.grad = (sum of clipped grads + σC·N(0, I)) / B, then step."""
    for p, grad_sum in zip(params, summed):
        noise = torch.randn_like(grad_sum) * (NOISE_MULTIPLIER * MAX_GRAD_NORM)
        p.grad = (grad_sum + noise).div_(batch_size).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _clip_factors(norms: torch.Tensor) -> torch.Tensor:
    return (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)


# -- methods ------------------------------------------------------------------------------------
def nonprivate(spec, x, y, run) -> Prepared:
    model = spec.model
    return Prepared(_plain_step(model, _sgd(model.parameters()), spec.criterion(), x, y, run))


def nonprivate_kept_grads(spec, x, y, run) -> Prepared:
    """Non-private training whose gradients stay allocated between steps (``zero_grad(set_to_none=False)``,
    as with DDP's ``gradient_as_bucket_view`` or a flat gradient buffer): the memory baseline for a DP
    optimizer that keeps its gradients in one persistent buffer."""
    model = spec.model
    return Prepared(_plain_step(model, _sgd(model.parameters()), spec.criterion(), x, y, run, keep_grads=True))


def _torch_rnn_layers(model: nn.Module) -> List[str]:
    """Names of torch's own recurrent layers left in ``model`` (no DP replacement was applied)."""
    return [
        type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase) and type(m).__module__.startswith("torch.")
    ]


def _make_private(spec, x, y, mode: str, clipping: str = "flat"):
    """(private model, DP optimizer, note) for fastdp in ``mode`` with the benchmark's σ, C and batch."""
    from fastdp import ModuleValidator, PrivacyEngine

    model = ModuleValidator.fix(spec.model)  # e.g. nn.LSTM → fastdp's DP layer, where one exists
    note = ""
    left = _torch_rnn_layers(model)
    if left:
        note = (f"{', '.join(sorted(set(left)))} left as is by fastdp.ModuleValidator.fix (no fastdp DP layer): "
                "the engine's torch.func fallback handles it")
    optimizer = _sgd(model.parameters())
    max_grad_norm = MAX_GRAD_NORM
    if clipping == "per_layer":  # one bound per parameter with ‖bounds‖₂ = C: the noise of flat clipping
        count = sum(p.requires_grad for p in model.parameters())
        max_grad_norm = [MAX_GRAD_NORM / count**0.5] * count
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="poisson_sampling=False")
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=_one_batch_loader(x, y),
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=max_grad_norm,
            poisson_sampling=False, grad_sample_mode=mode, clipping=clipping,
        )
    return model, optimizer, note


def fastdp_method(mode: str, clipping: str = "flat"):
    def prepare(spec, x, y, run) -> Prepared:
        model, optimizer, note = _make_private(spec, x, y, mode, clipping)
        return Prepared(_plain_step(model, optimizer, spec.criterion(), x, y, run), note=note)

    return prepare


# -- whole steps captured in one CUDA graph (launch overhead gone; CUDA only) ---------------------
def _require_cuda(run, method: str) -> None:
    if run.device.type != "cuda":
        raise MethodUnavailable(f"{method} replays a CUDA graph: CUDA only")


def nonprivate_cudagraph(spec, x, y, run) -> Prepared:
    """The non-private step as one CUDA graph (torch's whole-network recipe): the graphed baseline."""
    _require_cuda(run, "nonprivate-cudagraph")
    model, criterion = spec.model, spec.criterion()
    optimizer = _sgd(model.parameters())
    warmup = _plain_step(model, optimizer, criterion, x, y, run)
    side = torch.cuda.Stream(run.device)
    side.wait_stream(torch.cuda.current_stream(run.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            warmup()
    torch.cuda.current_stream(run.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with run.autocast():
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    return Prepared(graph.replay)


def fastdp_cudagraph(spec, x, y, run) -> Prepared:
    """fastdp bk through fastdp.make_graphed_dp_step: each step copies the batch in and replays."""
    from fastdp import make_graphed_dp_step

    _require_cuda(run, "fastdp-bk-cudagraph")
    model, optimizer, note = _make_private(spec, x, y, "bk")
    criterion = spec.criterion()

    def loss_and_backward(batch):
        inputs, targets = batch
        with run.autocast():
            loss = criterion(model(inputs), targets)
        loss.backward()
        return loss.detach()

    graphed = make_graphed_dp_step(loss_and_backward, optimizer)
    return Prepared(lambda: graphed((x, y)), note=note)


def microbatch(spec, x, y, run) -> Prepared:
    """One sample at a time through autograd; clip its gradient; add it to a running sum.

    With a cap k < B only k samples are run each step and the per-sample part is scaled
    by B / k; the noise + optimizer part is timed as is.
    """
    model = spec.model
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once: grads sum over uses
    optimizer = _sgd(params)
    criterion = spec.criterion()
    batch = x.shape[0]
    cap = run.microbatch_samples if run.microbatch_samples is not None else spec.microbatch_samples
    samples = batch if not cap else min(batch, cap)
    summed = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def step() -> float:
        run.sync()
        start = time.perf_counter()
        for grad_sum in summed:
            grad_sum.zero_()
        for i in range(samples):
            with run.autocast():
                loss = criterion(model(x[i : i + 1]), y[i : i + 1])
            grads = [g.float() for g in torch.autograd.grad(loss, params)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            torch._foreach_add_(summed, torch._foreach_mul(grads, _clip_factors(norm)))
        run.sync()
        per_sample_part = time.perf_counter() - start
        start = time.perf_counter()
        _add_noise_and_step(params, summed, optimizer, batch)
        run.sync()
        return per_sample_part * batch / samples + (time.perf_counter() - start)

    extrapolated = samples < batch
    note = f"extrapolated: timed {samples} of {batch} samples per step" if extrapolated else ""
    return Prepared(step, note=note, extrapolated=extrapolated)


def torchfunc(spec, x, y, run) -> Prepared:
    """Per-sample gradients by torch.func (vmap of grad over functional_call), clip, sum, noise."""
    from torch.func import functional_call, grad, vmap

    model = spec.model
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = _sgd(params)
    criterion = spec.criterion()
    batch = x.shape[0]

    def sample_loss(weights, x_i, y_i):
        with run.autocast():
            return criterion(functional_call(model, weights, (x_i.unsqueeze(0),)), y_i.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step() -> None:
        grads = per_sample_grads({name: p.detach() for name, p in named.items()}, x, y)
        grads = [grads[name].float() for name in named]
        norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads]), dim=0)
        factors = _clip_factors(norms)
        summed = [torch.einsum("b,b...->...", factors, g) for g in grads]
        del grads
        _add_noise_and_step(params, summed, optimizer, batch)

    return Prepared(step)


def _replace_rnn_layers(model: nn.Module, make: Dict[type, Callable[[nn.Module], nn.Module]]) -> int:
    """Swap every torch layer of a type in ``make`` (e.g. nn.LSTM) for ``make[type](layer)``; returns how many."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in make:
                setattr(parent, name, make[type(child)](child))
                swapped += 1
    return swapped


def opacus_method(mode: str):
    def prepare(spec, x, y, run) -> Prepared:
        if importlib.util.find_spec("opacus") is None:
            raise MethodUnavailable("opacus not installed")
        from opacus import PrivacyEngine
        from opacus.layers import DPGRU, DPLSTM
        from opacus.validators import ModuleValidator

        def opacus_layer(dp_class):
            return lambda rnn: dp_class(rnn.input_size, rnn.hidden_size, num_layers=rnn.num_layers, bias=rnn.bias,
                                        batch_first=rnn.batch_first, bidirectional=rnn.bidirectional).to(x.device)

        model = spec.model
        _replace_rnn_layers(model, {nn.LSTM: opacus_layer(DPLSTM), nn.GRU: opacus_layer(DPGRU)})
        model = ModuleValidator.fix(model)
        optimizer = _sgd(model.parameters())
        criterion = spec.criterion()
        kwargs = dict(
            module=model, optimizer=optimizer, data_loader=_one_batch_loader(x, y),
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
            grad_sample_mode=mode,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "ghost":  # Opacus returns a criterion that runs both backward passes
                model, optimizer, criterion, _ = PrivacyEngine().make_private(criterion=criterion, **kwargs)
            else:
                model, optimizer, _ = PrivacyEngine().make_private(**kwargs)
        return Prepared(_plain_step(model, optimizer, criterion, x, y, run))

    return prepare


METHODS: Dict[str, Callable] = {
    "nonprivate": nonprivate,
    "nonprivate-kept-grads": nonprivate_kept_grads,
    "fastdp-bk": fastdp_method("bk"),
    "fastdp-hooks": fastdp_method("hooks"),
    "fastdp-functorch": fastdp_method("functorch"),
    "fastdp-bk-per_layer": fastdp_method("bk", clipping="per_layer"),
    **{name: fastdp_method("bk") for name in BACKEND_OF_METHOD},
    "nonprivate-cudagraph": nonprivate_cudagraph,
    "fastdp-bk-cudagraph": fastdp_cudagraph,
    "microbatch": microbatch,
    "torchfunc": torchfunc,
    "opacus-hooks": opacus_method("hooks"),
    "opacus-ghost": opacus_method("ghost"),
    "opacus-functorch": opacus_method("functorch"),
}


def fastdp_backends(device_type: str) -> List[str]:
    """The fastdp backends worth a row of their own: none on CPU (torch is the only one there);
    on CUDA torch, triton if importable, cuda if any op has a CUDA-extension kernel."""
    if device_type != "cuda":
        return []
    backends = ["torch"]
    if importlib.util.find_spec("triton") is not None:
        backends.append("triton")
    from fastdp import ops

    if any("cuda" in ops.available_impls(name) for name in ops.declared_ops()):
        backends.append("cuda")
    return backends


def default_methods(device_type: str) -> List[str]:
    """All methods for this device, non-private first (the baseline of every ratio)."""
    names = ["nonprivate", "fastdp-bk", "fastdp-hooks", "fastdp-functorch"]
    names += [f"fastdp-bk-{backend}" for backend in fastdp_backends(device_type)]
    if device_type == "cuda":
        names += ["nonprivate-cudagraph", "fastdp-bk-cudagraph"]
    return names + ["microbatch", "torchfunc", *OPACUS_METHODS]
