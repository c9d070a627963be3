"""Privacy accountants for the Poisson-subsampled Gaussian mechanism (Opacus-compatible).

- ``RDPAccountant`` ("rdp"): Rényi DP, a valid bound, cheap.
- ``PRVAccountant`` ("prv"): numerical composition with error bars (upper bound returned).
- ``PLDAccountant`` ("pld"): privacy-loss distributions, pessimistic discretisation.
- ``GaussianAccountant`` ("gdp"): CLT approximation; can under-report ε.
"""

from .accountant import IAccountant
from .gdp import GaussianAccountant
from .pld import PLDAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant
from .registry import available_accountants, create_accountant, register_accountant
from .utils import get_noise_multiplier

for _cls in (RDPAccountant, GaussianAccountant, PRVAccountant, PLDAccountant):
    register_accountant(_cls.mechanism(), _cls)

__all__ = [
    "IAccountant",
    "RDPAccountant",
    "GaussianAccountant",
    "PRVAccountant",
    "PLDAccountant",
    "available_accountants",
    "create_accountant",
    "register_accountant",
    "get_noise_multiplier",
]
