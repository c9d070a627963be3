"""PrivacyEngine: Opacus's entry point, on fastdp's one-backward engine.

``make_private`` wraps the model (GradSampleModule), the optimizer (DPOptimizer)
and the data loader (Poisson DPDataLoader), wires the optimizer's clipping policy
into the model and the accountant into the optimizer. Training code stays plain:
``loss.backward(); optimizer.step()``.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .accountants import create_accountant, get_noise_multiplier
from .accountants.validation import check_noise_multiplier
from .data import DPDataLoader
from .data.data_loader import distributed_sample_rate
from .distributed import check_same_on_all_ranks, distributed_context, prepare_module
from .engine.clipping import check_max_grad_norm
from .engine.grad_sample_module import GradSampleModule, check_loss_reduction, check_mode
from .optimizers import DistributedDPOptimizer, DPOptimizer, FSDPDPOptimizer
from .validators import ModuleValidator
from .utils.secure_random import SecureRandom


class _PassThroughCriterion(nn.Module):
    """What Opacus's ghost mode returns as criterion: here the plain loss (one backward suffices)."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, *args, **kwargs):
        return self.criterion(*args, **kwargs)


class PrivacyEngine:
    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        """``secure_mode=True``: Poisson sampling and noise draw from the OS CSPRNG
        (``fastdp.utils.secure_random``) instead of torch's generator; slower, unseedable."""
        self.accountant = create_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.secure_rng = SecureRandom() if self.secure_mode else None

    # -- compatibility helpers ------------------------------------------------------------------
    @staticmethod
    def get_compatible_module(module: nn.Module) -> nn.Module:
        """A fixed copy of ``module`` (BatchNorm → GroupNorm, ...), validated."""
        module = ModuleValidator.fix(module)
        ModuleValidator.validate(module, strict=True)
        return module

    @staticmethod
    def is_compatible(*, module: nn.Module, optimizer: Optional[Optimizer] = None, data_loader: Optional[DataLoader] = None) -> bool:
        return ModuleValidator.is_valid(module)

    @staticmethod
    def validate(*, module: nn.Module, optimizer: Optional[Optimizer] = None, data_loader: Optional[DataLoader] = None) -> None:
        ModuleValidator.validate(module, strict=True)

    # -- make_private ---------------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Optional[torch.Generator] = None,
        grad_sample_mode: str = "bk",
        criterion: Optional[nn.Module] = None,
        strict: bool = False,
        padded_batch_size: Optional[int] = None,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        **clipping_kwargs,
    ):
        """Returns ``(module, optimizer, data_loader)``; with grad_sample_mode="ghost" (Opacus),
        ``(module, optimizer, criterion, data_loader)`` where criterion is the plain loss.
        ``padded_batch_size``: fixed-shape masked Poisson batches (see ``DPDataLoader``).
        ``grad_scaler``: fp16 training with a ``torch.amp.GradScaler`` (see ``DPOptimizer.attach_grad_scaler``)."""
        loss_reduction = check_loss_reduction(loss_reduction)
        if clipping != "per_layer":  # per-layer bounds are a list, checked by the optimizer
            max_grad_norm = check_max_grad_norm(max_grad_norm)
        ghost = grad_sample_mode == "ghost"
        mode = check_mode(grad_sample_mode)
        distributed = distributed_context(module)  # DDP/DPDDP (unwrapped here) or FSDP2; see fastdp.distributed
        if distributed is not None:
            module = distributed.module
        _check_optimizer_params(module, optimizer)
        if criterion is not None and getattr(criterion, "reduction", loss_reduction) != loss_reduction:
            raise ValueError(
                f"criterion.reduction={criterion.reduction!r} but loss_reduction={loss_reduction!r}; make them agree"
            )
        ModuleValidator.validate(module, strict=True)
        check_noise_multiplier(noise_multiplier)
        wrapped_here = not isinstance(module, GradSampleModule)
        if wrapped_here:
            module = GradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction, mode=mode, strict=strict)
        try:
            wired = self._wire(
                module, optimizer, data_loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
                noise_generator=noise_generator, ghost=ghost, criterion=criterion,
                padded_batch_size=padded_batch_size, clipping_kwargs=clipping_kwargs, distributed=distributed,
            )
            if grad_scaler is not None:
                wired[1].attach_grad_scaler(grad_scaler)
            return wired
        except Exception:
            if wrapped_here:  # all or nothing: leave the caller's model as it was
                module.to_standard_module()
            raise

    def _wire(self, module, optimizer, data_loader, *, noise_multiplier, max_grad_norm, loss_reduction,
              poisson_sampling, clipping, noise_generator, ghost, criterion, padded_batch_size, clipping_kwargs,
              distributed=None):
        """Loader, optimizer and accountant around an already wrapped module."""
        if distributed is not None:
            check_same_on_all_ranks(
                distributed, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                loss_reduction=loss_reduction, clipping=clipping, poisson_sampling=poisson_sampling,
                secure_mode=self.secure_mode, dataset_size=len(data_loader.dataset), steps=len(data_loader),
                sampler=type(getattr(data_loader.batch_sampler, "sampler", data_loader.batch_sampler)).__name__,
                parameters=[tuple(p.shape) for group in optimizer.param_groups for p in group["params"]],
            )
            prepare_module(distributed, module)
        if self.secure_mode:
            if noise_generator is not None:
                raise ValueError(
                    "noise_generator is not allowed with secure_mode=True (a seeded generator makes the noise "
                    "predictable); drop it, or use PrivacyEngine(secure_mode=False) for reproducible runs"
                )
            noise_generator = self.secure_rng
        if poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(
                data_loader, generator=noise_generator, padded_batch_size=padded_batch_size,
                distributed=distributed is not None,
            )
            sample_rate = data_loader.sample_rate
        elif padded_batch_size is not None:
            raise ValueError("padded_batch_size pads Poisson batches; it needs poisson_sampling=True")
        else:
            warnings.warn(
                "poisson_sampling=False: the accountants assume Poisson sampling, so the reported epsilon is "
                "only an approximation for fixed-size shuffled batches",
                RuntimeWarning,
            )
            sample_rate = distributed_sample_rate(data_loader) if distributed is not None else 1 / len(data_loader)
        expected_batch_size = len(data_loader.dataset) * sample_rate  # E[B]: the unbiased divisor of a sum

        optimizer_class, placement = DPOptimizer, {}
        if distributed is not None:  # sums the ranks' clipped sums in one collective, noise on one rank
            optimizer_class = FSDPDPOptimizer if distributed.kind == "fsdp" else DistributedDPOptimizer
            placement = {"process_group": distributed.process_group}
        dp_optimizer = optimizer_class(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            secure_mode=self.secure_mode,
            clipping=clipping,
            **placement,
            **clipping_kwargs,
        )
        if poisson_sampling:  # one step is one sampled batch: a second backward before step() is an error
            module.forbid_grad_accumulation()
        else:
            module.allow_grad_accumulation()
        dp_optimizer.attach(module)
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        if ghost:
            return module, dp_optimizer, _PassThroughCriterion(criterion or nn.CrossEntropyLoss(reduction=loss_reduction)), data_loader
        return module, dp_optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        **kwargs,
    ):
        """``make_private`` with the smallest σ whose ε after ``epochs`` is at most ``target_epsilon``."""
        sample_rate = 1 / len(data_loader)
        if len(self.accountant.history) > 0:
            warnings.warn(
                "make_private_with_epsilon: this PrivacyEngine's accountant already spent budget; the returned "
                "noise multiplier assumes a fresh start, so the total epsilon will exceed target_epsilon",
                UserWarning,
            )
        calibration = self.accountant.mechanism()
        if not self.accountant.is_upper_bound:
            calibration = "prv"  # a budget is met by a rigorous bound, never by an approximation
            warnings.warn(
                f"make_private_with_epsilon: the {self.accountant.mechanism()!r} accountant's epsilon is an "
                "approximation that can under-report, so sigma is calibrated with the PRV accountant (its true "
                "epsilon is at most target_epsilon); this engine's get_epsilon() still reports the approximation",
                UserWarning,
            )
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            epochs=epochs,
            accountant=calibration,
            epsilon_tolerance=kwargs.pop("epsilon_tolerance", 0.01),
        )
        return self.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        return self.accountant.get_epsilon(delta=delta)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        *,
        path,
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        checkpoint_dict: Optional[Dict[str, Any]] = None,
        module_state_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_save_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
    ) -> None:
        """Model, optimizer (and its clipping bound) and the full accountant history in one file."""
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
            if isinstance(optimizer, DPOptimizer) and optimizer.clipping != "per_layer":
                checkpoint["max_grad_norm"] = optimizer.max_grad_norm  # adaptive clipping moves it
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(
        self,
        *,
        path,
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        module_load_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_load_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
    ) -> Dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote; returns the remaining entries of the checkpoint."""
        checkpoint = torch.load(path, **{"weights_only": False, **(torch_load_kwargs or {})})
        module.load_state_dict(checkpoint.pop("module_state_dict"), **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(checkpoint.pop("privacy_accountant_state_dict"))
        optimizer_state = checkpoint.pop("optimizer_state_dict", None)
        max_grad_norm = checkpoint.pop("max_grad_norm", None)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            if isinstance(optimizer, DPOptimizer) and max_grad_norm is not None:
                optimizer.max_grad_norm = max_grad_norm
        return checkpoint


def _check_optimizer_params(module: nn.Module, optimizer: Optimizer) -> None:
    module_params = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in module_params:
                raise ValueError(
                    f"optimizer holds a parameter of shape {tuple(p.shape)} that is not in module; build the "
                    "optimizer from module.parameters() of the model you pass to make_private"
                )
