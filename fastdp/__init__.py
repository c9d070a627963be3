"""fastdp: differentially private training for PyTorch at the speed of non-private training."""

__version__ = "0.1.0"

from . import accountants  # noqa: E402,F401
