"""PrivacyEngine: Opacus's entry point, on fastdp's one-backward engine.

``make_private`` wraps the model (GradSampleModule), the optimizer (DPOptimizer)
and the data loader (Poisson DPDataLoader), wires the optimizer's clipping policy
into the model and the accountant into the optimizer. Training code stays plain:
``loss.backward(); optimizer.step()``.

Checkpoints (``save_checkpoint``) hold the *unwrapped* model's state dict (no ``_module.``
prefix), so ``model.load_state_dict(torch.load(path)["module_state_dict"])`` restores a plain
model; ``load_checkpoint`` accepts both that and Opacus's prefixed keys.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Union

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
from .grad_sample.grad_sample_module import GradSampleHooks
from .grad_sample.gsm_no_op import GradSampleModuleNoOp
from .optimizers import DPOptimizer, FSDPDPOptimizer, get_optimizer_class
from .utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from .validators import ModuleValidator
from .utils.secure_random import SecureRandom


class PrivacyEngine:
    """Makes a model, optimizer and data loader private and keeps the privacy accountant.

    Args:
        accountant: "prv" (default), "rdp", "pld" or "gdp" (an approximation; see
            ``make_private_with_epsilon``), or a name registered with ``register_accountant``.
        secure_mode: Poisson sampling and noise draw from the OS CSPRNG (``fastdp.utils.secure_random``)
            instead of torch's generator; slower, unseedable (no ``noise_generator``).
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.secure_rng = SecureRandom() if self.secure_mode else None
        self.dataset = None  # the dataset of the first make_private: accounting is per dataset

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
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Optional[torch.Generator] = None,
        grad_sample_mode: str = "bk",
        criterion: Optional[nn.Module] = None,
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        strict: bool = False,
        padded_batch_size: Optional[int] = None,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        **clipping_kwargs,
    ):
        """Make ``module``, ``optimizer`` and ``data_loader`` private; returns their private counterparts.

        Returns ``(module, optimizer, data_loader)``: the model wrapped in a ``GradSampleModule`` (or, with
        ``wrap_model=False``, a ``GradSampleHooks`` for cleanup while you keep using your model), a
        ``DPOptimizer`` (``DPPerLayerOptimizer`` / ``AdaClipDPOptimizer`` for those clippings) and a
        Poisson ``DPDataLoader``. With ``grad_sample_mode="ghost"`` (Opacus), a 4-tuple
        ``(module, optimizer, criterion, data_loader)`` whose criterion returns per-sample losses
        (``DPLossFastGradientClipping``; its ``backward()`` is one backward).

        Args:
            module: the model; its trainable parameters must be the optimizer's. A DDP / DPDDP /
                FSDP2 (``fully_shard``) model trains across processes (``docs/distributed.md``).
            optimizer: any torch optimizer over ``module.parameters()``.
            data_loader: the training data; replaced by a Poisson loader of the same mean batch size
                (``sample_rate = 1 / len(data_loader)``) unless ``poisson_sampling=False``.
            noise_multiplier: σ, the noise std in units of the clipping bound.
            max_grad_norm: C, the bound on each sample's gradient norm (a list of per-parameter bounds
                for ``clipping="per_layer"``).
            batch_first: whether inputs are ``[batch, ...]`` (else ``[T, batch, ...]``).
            loss_reduction: "mean" or "sum", as your loss combines the samples of a batch.
            poisson_sampling: False keeps ``data_loader`` (the accountants then only approximate ε);
                several backward passes per step are then allowed (distinct batches, as Opacus).
            clipping: "flat", "per_layer", "automatic" or "adaptive" (see ``DPOptimizer``).
            noise_generator: a seeded ``torch.Generator`` for the noise and the sampling (not in secure mode).
            grad_sample_mode: "bk" (default: per-sample norms without per-sample gradients, one backward),
                "hooks" or "ew" (materialise ``p.grad_sample`` like Opacus), "functorch", Opacus's
                "ghost" (= "bk"), or "no_op" (nothing computed: you set ``p.grad_sample`` and the optimizer
                clips those rows, trusted to be one per sample).
            criterion: the loss, checked against ``loss_reduction`` (and wrapped for "ghost").
            wrap_model: False: the engine hooks into ``module`` itself and you keep calling it; the first
                return value is then a ``GradSampleHooks`` (``cleanup()`` detaches it).
            rand_on_empty: an empty Poisson batch becomes one made-up 0/1 sample (see ``DPDataLoader``).
            strict: True: a layer without a fastdp rule is an error instead of the torch.func fallback.
            padded_batch_size: fixed-shape masked Poisson batches (see ``DPDataLoader``).
            grad_scaler: fp16 training with a ``torch.amp.GradScaler`` (see ``DPOptimizer.attach_grad_scaler``).
            **clipping_kwargs: the chosen clipping's keywords (adaptive: ``target_unclipped_quantile``,
                ``clipbound_learning_rate``, ``min_clipbound``, ``max_clipbound``, ``unclipped_num_std``;
                automatic: ``stability``) and the optimizer's ``keep_summed_grad`` (keep ``p.summed_grad`` after
                the step, as Opacus does, in a second gradient-sized buffer; by default only in the modes that
                materialise per-sample gradients); any other keyword is an error.
        """
        loss_reduction = check_loss_reduction(loss_reduction)
        if clipping != "per_layer":  # per-layer bounds are a list, checked by the optimizer
            max_grad_norm = check_max_grad_norm(max_grad_norm)
        ghost = grad_sample_mode == "ghost"
        no_op = grad_sample_mode == "no_op"  # Opacus: you set p.grad_sample, the optimizer clips it
        mode = "bk" if no_op else check_mode("hooks" if grad_sample_mode == "ew" else grad_sample_mode)
        distributed = distributed_context(module)  # DDP/DPDDP (unwrapped here) or FSDP2; see fastdp.distributed
        if distributed is not None:
            module = distributed.module
        _check_optimizer_params(module, optimizer)
        if criterion is not None and getattr(criterion, "reduction", loss_reduction) != loss_reduction:
            raise ValueError(
                f"criterion.reduction={criterion.reduction!r} but loss_reduction={loss_reduction!r}; make them agree"
            )
        if noise_generator is not None and self.secure_mode:
            raise ValueError(
                "noise_generator is not allowed with secure_mode=True (a seeded generator makes the noise "
                "predictable); drop it, or use PrivacyEngine(secure_mode=False) for reproducible runs"
            )
        if isinstance(module, GradSampleHooks):
            module = module.grad_sample_module
        if isinstance(module, GradSampleModule):
            _check_existing_module(module, batch_first=batch_first, loss_reduction=loss_reduction)
        ModuleValidator.validate(module._module if isinstance(module, GradSampleModule) else module, strict=True)
        check_noise_multiplier(noise_multiplier)
        self._note_dataset(data_loader)
        wrapped_here = not isinstance(module, (GradSampleModule, GradSampleModuleNoOp))
        if wrapped_here and no_op:
            module = GradSampleModuleNoOp(module, batch_first=batch_first, loss_reduction=loss_reduction)
        elif wrapped_here:
            module = GradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction, mode=mode, strict=strict)
        try:
            wired = self._wire(
                module, optimizer, data_loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
                noise_generator=noise_generator, ghost=ghost, criterion=criterion,
                padded_batch_size=padded_batch_size, clipping_kwargs=clipping_kwargs, distributed=distributed,
                batch_first=batch_first, rand_on_empty=rand_on_empty,
            )
            if grad_scaler is not None:
                wired[1].attach_grad_scaler(grad_scaler)
            if not wrap_model:
                wired = (GradSampleHooks.around(wired[0]),) + tuple(wired[1:])
            return wired
        except Exception:
            if wrapped_here:  # all or nothing: leave the caller's model as it was
                module.to_standard_module()
            raise

    def _wire(self, module, optimizer, data_loader, *, noise_multiplier, max_grad_norm, loss_reduction,
              poisson_sampling, clipping, noise_generator, ghost, criterion, padded_batch_size, clipping_kwargs,
              distributed=None, batch_first=True, rand_on_empty=False):
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
            noise_generator = self.secure_rng
        if poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(
                data_loader, generator=noise_generator, padded_batch_size=padded_batch_size,
                distributed=distributed is not None, batch_first=batch_first, rand_on_empty=rand_on_empty,
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

        if isinstance(optimizer, DPOptimizer):  # re-wrapping: the noise must be added once
            optimizer = optimizer.original_optimizer
        optimizer_class = get_optimizer_class(clipping, distributed is not None, "ghost" if ghost else None)
        placement = {}
        if distributed is not None:  # sums the ranks' clipped sums in one collective, noise on one rank
            if distributed.kind == "fsdp":
                optimizer_class = FSDPDPOptimizer
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
        if isinstance(module, GradSampleModule):  # "no_op": nothing to attach, the optimizer clips p.grad_sample
            dp_optimizer.attach(module)
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        if ghost:
            criterion = criterion if criterion is not None else nn.CrossEntropyLoss(reduction=loss_reduction)
            return module, dp_optimizer, DPLossFastGradientClipping(module, dp_optimizer, criterion, loss_reduction), data_loader
        return module, dp_optimizer, data_loader

    def _note_dataset(self, data_loader: DataLoader) -> None:
        if self.dataset is None:
            self.dataset = data_loader.dataset
        elif self.dataset is not data_loader.dataset:
            warnings.warn(
                "PrivacyEngine: make_private got another dataset than before; the accountant adds up the steps "
                "of both as if they were one dataset's (use a new PrivacyEngine for another dataset)",
                UserWarning,
            )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: Union[float, List[float]],
        **kwargs,
    ):
        """``make_private`` with the smallest σ whose ε after ``epochs`` epochs is at most ``target_epsilon``.

        The σ is calibrated with this engine's accountant when its ε is an upper bound ("prv", "rdp",
        "pld"). With "gdp", whose CLT ε is an approximation that can under-report (q = 0.1, 20 steps,
        target 2: the σ GDP picks has a true ε of 2.9), σ is calibrated with PRV instead and a warning
        says so: the budget is met rigorously, and ``get_epsilon`` still reports GDP's approximation.

        Args:
            module, optimizer, data_loader: as ``make_private``.
            target_epsilon: the ε to reach (not exceed) after ``epochs`` epochs.
            target_delta: the δ of that (ε, δ) guarantee.
            epochs: how many epochs you will train: ``int(epochs * len(data_loader))`` steps at sample
                rate ``1 / len(data_loader)``.
            max_grad_norm: as ``make_private``.
            **kwargs: ``epsilon_tolerance`` (how far below the target the search may stop, default 0.01)
                and every other keyword of ``make_private``.
        """
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
        """ε spent so far at this ``delta``, by this engine's accountant (an upper bound except for "gdp")."""
        return self.accountant.get_epsilon(delta=delta)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        *,
        path,
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        checkpoint_dict: Optional[Dict[str, Any]] = None,
        module_state_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_save_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Save the model (unwrapped: loadable into the plain model), the optimizer (and its clipping
        bound), the noise and clipping-bound schedulers and the full accountant history in one file.

        Args:
            path: a file path or a writable binary file object.
            module: the model (a GradSampleModule, GradSampleHooks or plain module: the same keys).
            optimizer: the DPOptimizer (its wrapped optimizer's state and ``max_grad_norm``).
            noise_scheduler, grad_clip_scheduler: ``fastdp.schedulers`` objects to save.
            checkpoint_dict: more entries to save (returned by ``load_checkpoint``).
            module_state_dict_kwargs: keywords of ``module.state_dict()``.
            torch_save_kwargs: keywords of ``torch.save``.
        """
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = _unwrapped(module).state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
            if isinstance(optimizer, DPOptimizer) and optimizer.clipping != "per_layer":
                checkpoint["max_grad_norm"] = optimizer.max_grad_norm  # adaptive clipping moves it
        if noise_scheduler is not None:
            checkpoint["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            checkpoint["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(
        self,
        *,
        path,
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_load_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_load_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote (or Opacus's checkpoints, whose model keys carry the
        wrapper's ``_module.`` prefix); returns the remaining entries of the checkpoint.

        Args:
            path: a file path or a readable binary file object.
            module: the model to load into (wrapped or not).
            optimizer: the optimizer to restore (warned about when only one of it and its state exists).
            noise_scheduler, grad_clip_scheduler: schedulers to restore.
            module_load_dict_kwargs: keywords of ``module.load_state_dict()``.
            torch_load_kwargs: keywords of ``torch.load`` (default ``weights_only=False``).
        """
        checkpoint = torch.load(path, **{"weights_only": False, **(torch_load_kwargs or {})})
        state = checkpoint.pop("module_state_dict")
        if state and all(key.startswith("_module.") for key in state):  # an Opacus (wrapped) checkpoint
            state = type(state)((key[len("_module."):], value) for key, value in state.items())
        _unwrapped(module).load_state_dict(state, **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(checkpoint.pop("privacy_accountant_state_dict"))
        optimizer_state = checkpoint.pop("optimizer_state_dict", None)
        max_grad_norm = checkpoint.pop("max_grad_norm", None)
        if optimizer is not None and optimizer_state:
            optimizer.load_state_dict(optimizer_state)
            if isinstance(optimizer, DPOptimizer) and max_grad_norm is not None:
                optimizer.max_grad_norm = max_grad_norm
        elif (optimizer is not None) != bool(optimizer_state):
            warnings.warn(
                "load_checkpoint: " + ("the checkpoint has no optimizer state" if optimizer is not None else
                                       "the checkpoint has an optimizer state but no optimizer was given"),
                UserWarning,
            )
        for scheduler, key in ((noise_scheduler, "noise_scheduler_state_dict"),
                               (grad_clip_scheduler, "grad_clip_scheduler_state_dict")):
            scheduler_state = checkpoint.pop(key, None)
            if scheduler is not None and scheduler_state is not None:
                scheduler.load_state_dict(scheduler_state)
        return checkpoint


def _unwrapped(module: nn.Module) -> nn.Module:
    """The user's model inside a GradSampleModule / GradSampleHooks (the module itself otherwise)."""
    if isinstance(module, GradSampleHooks):
        return module._module
    return module._module if isinstance(module, GradSampleModule) else module


def _check_existing_module(module: GradSampleModule, *, batch_first: bool, loss_reduction: str) -> None:
    if module.batch_first != batch_first or module.loss_reduction != loss_reduction:
        raise ValueError(
            f"the GradSampleModule passed to make_private has batch_first={module.batch_first}, "
            f"loss_reduction={module.loss_reduction!r} but make_private got batch_first={batch_first}, "
            f"loss_reduction={loss_reduction!r}; pass the plain model, or make them agree"
        )


def _check_optimizer_params(module: nn.Module, optimizer: Optimizer) -> None:
    module_params = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in module_params:
                raise ValueError(
                    f"Module parameters are different than optimizer Parameters: the optimizer holds one of shape "
                    f"{tuple(p.shape)} that is not in module; build the optimizer from module.parameters() of the "
                    "model you pass to make_private (after ModuleValidator.fix)"
                )
