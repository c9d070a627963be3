"""An Opacus user switches by changing the import: Opacus's public import paths exist in fastdp."""

import importlib

import pytest

OPACUS_IMPORTS = {
    "": ["PrivacyEngine", "GradSampleModule"],
    ".privacy_engine": ["PrivacyEngine"],
    ".validators": ["ModuleValidator"],
    ".validators.module_validator": ["ModuleValidator"],
    ".utils.batch_memory_manager": ["BatchMemoryManager"],
    ".utils.uniform_sampler": ["UniformWithReplacementSampler", "DistributedUniformWithReplacementSampler"],
    ".layers": ["DPLSTM", "DPGRU", "DPRNN", "DPMultiheadAttention"],
    ".accountants": ["RDPAccountant", "PRVAccountant", "GaussianAccountant", "IAccountant", "create_accountant"],
    ".accountants.utils": ["get_noise_multiplier"],
    ".accountants.rdp": ["RDPAccountant"],
    ".accountants.analysis.rdp": ["compute_rdp", "get_privacy_spent"],
    ".data_loader": ["DPDataLoader"],
    ".optimizers": ["DPOptimizer"],
    ".grad_sample": ["GradSampleModule", "register_grad_sampler"],
    ".distributed": ["DifferentiallyPrivateDistributedDataParallel"],
}


@pytest.mark.parametrize("path", sorted(OPACUS_IMPORTS))
def test_opacus_import_path_exists(path):
    module = importlib.import_module("fastdp" + path)
    missing = [name for name in OPACUS_IMPORTS[path] if not hasattr(module, name)]
    assert not missing, f"fastdp{path} lacks {missing}"


def test_aliases_are_the_same_objects():
    import fastdp
    from fastdp.data_loader import DPDataLoader
    from fastdp.grad_sample import GradSampleModule

    assert DPDataLoader is fastdp.DPDataLoader and GradSampleModule is fastdp.GradSampleModule
