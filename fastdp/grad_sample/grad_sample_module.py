"""Opacus's ``opacus.grad_sample.grad_sample_module``: the GradSampleModule classes by mode, and
``GradSampleHooks`` (``make_private(wrap_model=False)``: train the original model object).

``fastdp.GradSampleModule`` defaults to "bk" (per-sample norms without per-sample gradients: no
``p.grad_sample``); Opacus's defaults to "hooks". ``HooksGradSampleModule`` (what
``get_gsm_class("hooks")`` returns) is the engine in "hooks" mode: ``p.grad_sample`` after each
backward, as Opacus.
"""

from __future__ import annotations

from torch import nn

from ..engine.grad_sample_module import GradSampleModule


class HooksGradSampleModule(GradSampleModule):
    """GradSampleModule whose default mode is "hooks" (``force_functorch=True``: "functorch")."""

    default_mode = "hooks"

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = False, force_functorch: bool = False, **kwargs):
        kwargs.setdefault("mode", "functorch" if force_functorch else self.default_mode)
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
                         force_functorch=force_functorch, **kwargs)


class GradSampleHooks:
    """The engine attached to ``model`` itself, for code that must keep calling the original model
    (``make_private(wrap_model=False)``; models with a custom ``__getattr__``). The routing is done in
    place on the submodules, as always; forward hooks on ``model`` do the wrapper's per-forward
    bookkeeping (the batch size, grad-free forwards, the Hugging Face loss check).

    Use ``model`` for training and this object for ``cleanup()`` (or the wrapper's other methods,
    which it forwards).
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = False, force_functorch: bool = False, mode: str = "hooks", _module=None):
        self._gsm = _module if _module is not None else GradSampleModule(
            m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
            force_functorch=force_functorch, mode="functorch" if force_functorch else mode,
        )
        self._module = self._gsm._module
        gsm = self._gsm

        self._handles = [  # what the wrapper's forward does around the model's (the HF loss check is the engine's own)
            self._module.register_forward_pre_hook(lambda module, args, kwargs: gsm._begin_forward(args, kwargs),
                                                   with_kwargs=True),
            self._module.register_forward_hook(lambda module, args, output: gsm._end_forward(), always_call=True),
        ]

    @classmethod
    def around(cls, module: GradSampleModule) -> "GradSampleHooks":
        """Hooks for an existing GradSampleModule (make_private builds one, then returns this)."""
        return cls(module._module, _module=module)

    @property
    def grad_sample_module(self) -> GradSampleModule:
        return self._gsm

    @property
    def hooks_enabled(self) -> bool:
        return bool(self._handles) and self._gsm.hooks_enabled

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._gsm.remove_hooks()

    def cleanup(self) -> None:
        """Detach the engine from the model: plain (non-private) gradients again, no fastdp attributes."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._gsm.cleanup()

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_gsm", "_module", "_handles"):
            raise AttributeError(name)
        return getattr(self._gsm, name)


__all__ = ["GradSampleModule", "HooksGradSampleModule", "GradSampleHooks"]
