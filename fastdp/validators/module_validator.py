"""ModuleValidator: find the modules DP training cannot handle, and replace the fixable ones.

Every submodule is checked, trainable or frozen alike: a frozen (or parameterless) BatchNorm in
train mode still mixes samples, and running statistics are published with the model whatever the
mode. (Opacus checks only modules with trainable parameters, so it accepts a parameterless
BatchNorm whose mixing reaches the gradients of the layers before it; fastdp refuses it.) Checks:

- the model must be in training mode (as Opacus: eval-mode layers such as dropout would not be
  what is trained);
- a validator registered for the module's class (``ModuleValidator.VALIDATORS``,
  ``register_module_validator``), else the built-in ones: modules that mix the samples of a batch
  (BatchNorm), which no per-sample clipping can bound, and the ``check`` of the module's layer
  rule (``fastdp.engine.rules``), which rejects configurations the rule cannot make private
  (Embedding max_norm, InstanceNorm running statistics, ...), with the fix in its message.

``fix`` returns a repaired deep copy, using ``ModuleValidator.FIXERS``.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fastdp.engine.rules import get_rule

from .errors import IllegalModuleConfigurationError, ShouldReplaceModuleError, UnsupportedModuleError

logger = logging.getLogger(__name__)

#: ``fixer(module, **fix_kwargs) -> module``: receives a submodule of ``fix``'s private copy and
#: returns its replacement (or the same module, changed in place or untouched).
Fixer = Callable[..., nn.Module]


def _sample_mixing_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` makes one sample's output depend on other samples (None if it does not)."""
    if isinstance(module, _BatchNorm):
        return (
            "BatchNorm mixes samples of a batch, which per-sample clipping cannot bound; "
            "use ModuleValidator.fix(model) (BatchNorm → GroupNorm)"
        )
    return None


def _group_count(num_channels: int, num_groups: Optional[int]) -> int:
    """``num_groups`` checked against ``num_channels``; by default the largest divisor ≤ 32."""
    if num_groups is None:
        return next(g for g in range(min(32, num_channels), 0, -1) if num_channels % g == 0)
    if not (isinstance(num_groups, int) and num_groups > 0 and num_channels % num_groups == 0):
        raise ValueError(
            f"num_groups={num_groups!r} does not divide a BatchNorm's {num_channels} channels; "
            "pass a num_groups that divides every BatchNorm's channel count, or leave it out"
        )
    return num_groups


_INSTANCE_NORM_OF = {
    nn.BatchNorm1d: nn.InstanceNorm1d,
    nn.BatchNorm2d: nn.InstanceNorm2d,
    nn.BatchNorm3d: nn.InstanceNorm3d,
}


def batch_norm_to_group_norm(
    bn: _BatchNorm, *, num_groups: Optional[int] = None, replace_bn_with_in: bool = False, **_
) -> nn.Module:
    """GroupNorm (or, with ``replace_bn_with_in=True``, InstanceNorm) over the same channels.

    GroupNorm normalises each sample on its own, so it is the usual private stand-in. The
    BatchNorm's running statistics are dropped (they summarise the data and GroupNorm has no use
    for them); the affine parameters start fresh, and stay frozen if they were.
    """
    like = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    if replace_bn_with_in:
        if num_groups is not None:
            raise ValueError("num_groups and replace_bn_with_in=True exclude each other; pass one of them")
        instance_norm = next((i for b, i in _INSTANCE_NORM_OF.items() if isinstance(bn, b)), None)
        if instance_norm is None:
            raise ValueError(f"{type(bn).__name__} has no InstanceNorm counterpart; drop replace_bn_with_in")
        replacement = instance_norm(bn.num_features, eps=bn.eps, affine=bn.affine, **factory)
    else:
        groups = _group_count(bn.num_features, num_groups)
        replacement = nn.GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine, **factory)
    if bn.affine:
        replacement.weight.requires_grad_(bn.weight.requires_grad)
        replacement.bias.requires_grad_(bn.bias.requires_grad)
    return replacement


def instance_norm_without_running_stats(norm: _InstanceNorm, **_) -> nn.Module:
    """The same InstanceNorm, affine parameters included, minus its batch-averaged running statistics."""
    if norm.track_running_stats:
        norm.track_running_stats = False
        norm.running_mean = norm.running_var = norm.num_batches_tracked = None
    return norm


def _dp_layer(name: str) -> Fixer:
    """The fixer that swaps a torch layer for its DP twin ``fastdp.layers.<name>`` (same weights).

    ``fastdp.layers`` is imported when a model first needs it, not here: it imports this module."""

    def fix(module: nn.Module, **_) -> nn.Module:
        from .. import layers

        return getattr(layers, name).from_module(module)

    return fix


def _match_device(original: nn.Module, replacement: nn.Module) -> None:
    """Put a replacement where the module it replaces lived (fixers may build it on the CPU)."""
    like = next(iter(original.parameters()), None)
    if like is None:
        like = next(iter(original.buffers()), None)
    if like is not None and not like.is_meta:
        replacement.to(like.device)


class ModuleValidator:
    """Checks a model for modules DP training cannot handle, and fixes the fixable ones."""

    #: module class (or base class) → fixer, applied by ``fix`` to every submodule of that class
    #: (an extension point). nn.LSTM / nn.GRU / nn.RNN / nn.MultiheadAttention become DPLSTM /
    #: DPGRU / DPRNN / DPMultiheadAttention; their rules make the torch layers errors until fixed
    #: (their fused forward hides the per-sample gradients).
    FIXERS: Dict[type, Fixer] = {
        **{cls: batch_norm_to_group_norm for cls in (
            _BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)},
        **{cls: instance_norm_without_running_stats for cls in (
            _InstanceNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
        nn.LSTM: _dp_layer("DPLSTM"),
        nn.GRU: _dp_layer("DPGRU"),
        nn.RNN: _dp_layer("DPRNN"),
        nn.MultiheadAttention: _dp_layer("DPMultiheadAttention"),
    }

    #: module class → ``validator(module) -> [UnsupportedModuleError, ...]``, run instead of the built-in
    #: checks for modules of that class (nearest registered class in the MRO); see ``register_module_validator``.
    #: The classes fastdp refuses or replaces are listed with ``builtin_validator`` (fastdp's own checks).
    VALIDATORS: Dict[type, Callable[[nn.Module], List[UnsupportedModuleError]]] = {}

    @classmethod
    def _fixer(cls, module: nn.Module) -> Optional[Fixer]:
        """The fixer of ``module``'s class or of its nearest registered base class."""
        return next((cls.FIXERS[c] for c in type(module).__mro__ if c in cls.FIXERS), None)

    @classmethod
    def _reason(cls, module: nn.Module) -> Optional[str]:
        """Why DP training cannot handle ``module`` as configured (None if it can)."""
        reason = _sample_mixing_reason(module)
        rule = get_rule(module)
        if reason is not None or rule is None:
            return reason
        try:
            rule.check(module)
        except ValueError as error:
            return f"{error}; or use ModuleValidator.fix(model)" if cls._fixer(module) else str(error)
        return None

    @classmethod
    def _builtin_errors(cls, path: str, module: nn.Module) -> List[UnsupportedModuleError]:
        """fastdp's own checks of one module: sample mixing, then its layer rule's configuration check."""
        reason = cls._reason(module)
        if reason is None:
            return []
        module_type = type(module).__name__
        replaced = cls._fixer(module) is not None and not isinstance(module, _InstanceNorm)  # IN: fixed in place
        if _sample_mixing_reason(module) is not None or replaced:
            kind = ShouldReplaceModuleError
        else:
            kind = IllegalModuleConfigurationError
        return [kind(f"{path or '<root>'} ({module_type}): {reason}", module_path=path, module_type=module_type)]

    @classmethod
    def _module_errors(cls, path: str, module: nn.Module) -> List[UnsupportedModuleError]:
        """A registered validator's errors for ``module``, else the built-in checks' (each naming the path)."""
        validator = next((cls.VALIDATORS[c] for c in type(module).__mro__ if c in cls.VALIDATORS), None)
        if validator is None or validator is builtin_validator:
            return cls._builtin_errors(path, module)
        errors = list(validator(module))
        for error in errors:
            if isinstance(error, UnsupportedModuleError) and error.module_path is None:
                error.module_path, error.module_type = path, type(module).__name__
        return errors

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> List[UnsupportedModuleError]:
        """One UnsupportedModuleError per problem (a submodule, or the model not in training mode);
        ``strict=True`` raises them as one UnsupportedModuleError listing all in ``errors``."""
        errors: List[UnsupportedModuleError] = []
        if not module.training:
            errors.append(IllegalModuleConfigurationError(
                "<root>: the model is in eval mode; DP training needs model.train() (as Opacus)",
                module_path="", module_type=type(module).__name__,
            ))
        for path, submodule in module.named_modules():
            errors.extend(cls._module_errors(path, submodule))
        if strict and errors:
            listing = "\n  ".join(str(error) for error in errors)
            raise UnsupportedModuleError(
                f"{len(errors)} module(s) cannot be trained with DP as configured:\n  {listing}", errors=errors
            )
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        """Whether ``validate`` finds nothing to object to."""
        return not cls.validate(module)

    @classmethod
    def fix(cls, module: nn.Module, **kwargs) -> nn.Module:
        """A deep copy of ``module`` with every submodule that has a fixer replaced; ``module`` is untouched.

        ``kwargs`` go to every fixer: ``num_groups`` (GroupNorm groups per former BatchNorm; default
        the largest divisor of its channels ≤ 32) or ``replace_bn_with_in=True`` (InstanceNorm instead).
        """
        return cls._fix_tree(copy.deepcopy(module), "", kwargs, {})

    @classmethod
    def _fix_tree(cls, module: nn.Module, path: str, kwargs: dict, done: Dict[int, nn.Module]) -> nn.Module:
        """``module`` fixed, top down; ``done`` maps shared submodules to one shared fix."""
        if id(module) in done:
            return done[id(module)]
        fixer = cls._fixer(module)
        fixed = module if fixer is None else fixer(module, **kwargs)
        if fixed is module:  # kept (maybe changed in place): its children may still need fixing
            for name, child in list(module._modules.items()):  # not named_children: it skips repeats
                if child is None:
                    continue
                fixed_child = cls._fix_tree(child, f"{path}.{name}" if path else name, kwargs, done)
                if fixed_child is not child:
                    setattr(module, name, fixed_child)
        else:
            _match_device(module, fixed)
            logger.info("Replaced sub_module %s : %s with %s", path or "<root>", module, fixed)
        done[id(module)] = fixed
        return fixed

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """``fix`` then ``validate(strict=True)``: the fixed copy, or an error naming what is left."""
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed


def builtin_validator(module: nn.Module) -> List[UnsupportedModuleError]:
    """fastdp's own checks of one module (what ``ModuleValidator.validate`` runs for it, path ``""``)."""
    return ModuleValidator._builtin_errors("", module)


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
             nn.InstanceNorm3d, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention):
    ModuleValidator.VALIDATORS[_cls] = builtin_validator
