"""Triton kernels, one file per op, each registered on import against the op of the
same name in ``fastdp.ops`` (whose torch reference it must match).

Importing this package imports every kernel module in it (so a new kernel file
needs no list to be edited). It never requires a GPU: CPU tests run the kernels
with ``TRITON_INTERPRET=1``. ``fastdp.ops.load_kernels`` imports it on first need.
"""

import importlib
import pkgutil

# From a checkout, this folder is also importable as a top-level ``kernels`` package, which
# other libraries probe for (transformers looks for the HF ``kernels`` package that way);
# only as ``fastdp.kernels`` does it register anything, so kernels are never registered twice.
if __name__ == "fastdp.kernels":
    for _module in pkgutil.iter_modules(__path__):
        if not _module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{_module.name}")
