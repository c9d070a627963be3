"""The package itself: lazy top-level imports that keep every public name, and its metadata files."""

import importlib
from pathlib import Path

import pytest

import fastdp

from .subprocesses import python_output

ROOT = Path(__file__).resolve().parent.parent

# what `from fastdp import X` gave in 0.1.0, before imports became lazy
PUBLIC_NAMES = ["PrivacyEngine", "GradSampleModule", "GradSampleModuleFastGradientClipping", "DPOptimizer", "DPDataLoader", "BatchMemoryManager",
                "make_graphed_dp_step", "check_sample_independence", "ModuleValidator", "LayerRule", "register_rule",
                "register_rule_by_name", "register_grad_sampler", "DPLSTM", "DPGRU", "DPRNN", "DPMultiheadAttention"]


def test_import_fastdp_loads_neither_torch_nor_scipy():
    code = "import sys, fastdp; print(sorted(m for m in ('numpy', 'scipy', 'torch') if m in sys.modules))"
    assert python_output(code).strip() == "[]"


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_every_public_name_is_the_defining_modules_object(name):
    assert name in fastdp.__all__
    value = getattr(fastdp, name)
    assert value is getattr(importlib.import_module(value.__module__), name)
    namespace = {}
    exec(f"from fastdp import {name}", namespace)  # noqa: S102 - the import statement users write
    assert namespace[name] is getattr(fastdp, name)


def test_all_lists_exactly_the_public_names():
    assert set(fastdp.__all__) == set(PUBLIC_NAMES) | {"accountants"}


def test_subpackages_are_attributes_on_first_access():
    assert fastdp.accountants is importlib.import_module("fastdp.accountants")
    assert fastdp.losses.per_sample_lm_loss is importlib.import_module("fastdp.losses").per_sample_lm_loss
    assert {"accountants", "losses", "PrivacyEngine"} <= set(dir(fastdp))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        fastdp.no_such_name  # noqa: B018


def test_version_matches_the_project_metadata():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{fastdp.__version__}"' in text


@pytest.mark.parametrize("name", ["LICENSE", "CHANGELOG.md", "fastdp/py.typed"])
def test_release_files_exist(name):
    assert (ROOT / name).is_file()


def test_a_fresh_process_fixes_recurrent_layers_with_nothing_else_imported():
    """Lazy imports must not lose import-time registrations: ModuleValidator.fix needs the DP layers."""
    code = ("from torch import nn; from fastdp import ModuleValidator; "
            "fixed = ModuleValidator.fix(nn.Sequential(nn.LSTM(3, 4), nn.GRU(4, 4), nn.MultiheadAttention(4, 2))); "
            "print([type(m).__name__ for m in fixed])")
    assert python_output(code).strip() == "['DPLSTM', 'DPGRU', 'DPMultiheadAttention']"
