"""Triton kernels, one file per op, each registered on import against the op of the
same name in ``fastdp.ops`` (whose torch reference it must match).

Importing this package never requires a GPU; it needs triton only for the kernels
themselves (CPU tests run them with ``TRITON_INTERPRET=1``).
"""
