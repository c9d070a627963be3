"""Import ``opacus`` as fastdp: a meta-path alias for running Opacus's own test suite against fastdp.

Installed on import when ``FASTDP_OPACUS_TESTS`` is set (a pytest plugin:
``python -m pytest -p bench.opacus_alias ...``). Every
``opacus`` / ``opacus.X.Y`` resolves to the module object ``fastdp`` / ``fastdp.X.Y`` (the same
object under both names, so ``isinstance`` and monkeypatching behave), except ``opacus.tests*``,
which load from the unpacked Opacus sdist given by ``FASTDP_OPACUS_TESTS`` (its ``opacus/tests``
folder). A name fastdp lacks fails as ``ModuleNotFoundError: No module named 'opacus.X'``.

Dev-time only (``bench/opacus_suite.py``); nothing in fastdp imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types


class OpacusAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, tests_dir: str | None):
        self.tests_dir = tests_dir

    def find_spec(self, name, path=None, target=None):
        if name != "opacus" and not name.startswith("opacus."):
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[1] == "tests":
            return self._test_spec(name, parts[2:])
        try:
            module = importlib.import_module("fastdp" + name[len("opacus"):])
        except ModuleNotFoundError as error:
            if error.name is not None and (error.name == "fastdp" or error.name.startswith("fastdp.")):
                return None  # fastdp has no such module: "No module named 'opacus.X'"
            raise
        spec = importlib.machinery.ModuleSpec(name, self, is_package=hasattr(module, "__path__"))
        spec._fastdp_module = module  # noqa: SLF001 (read back in create_module)
        return spec

    def _test_spec(self, name, rest):
        if self.tests_dir is None:
            return None
        base = os.path.join(self.tests_dir, *rest)
        if os.path.isdir(base) and os.path.exists(os.path.join(base, "__init__.py")):
            return importlib.util.spec_from_file_location(
                name, os.path.join(base, "__init__.py"), submodule_search_locations=[base]
            )
        if os.path.exists(base + ".py"):
            return importlib.util.spec_from_file_location(name, base + ".py")
        return None

    def create_module(self, spec):
        return spec._fastdp_module

    def exec_module(self, module):
        pass


def install(tests_dir: str) -> OpacusAlias:
    for finder in sys.meta_path:
        if isinstance(finder, OpacusAlias):
            return finder
    finder = OpacusAlias(tests_dir)
    sys.meta_path.insert(0, finder)
    return finder


def _stub_torchvision_ops() -> None:
    """A torchvision wheel built for another torch (PyPI's are CUDA builds) fails to register its
    compiled ops' fake kernels at import; the tests only use its models, transforms and FakeData,
    which are plain Python. Skip that registration so ``import torchvision`` works."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
    except RuntimeError:
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")


def _limit_hypothesis_examples() -> None:
    """``FASTDP_SUITE_MAX_EXAMPLES=N``: hypothesis tests draw at most N examples (both targets alike), so the
    suite fits a 2-core machine; it must be set before the test modules are imported (their @settings
    inherit it)."""
    limit = int(os.environ.get("FASTDP_SUITE_MAX_EXAMPLES", "0") or 0)
    if limit > 0:
        from hypothesis import settings

        settings.register_profile("fastdp-opacus-suite", max_examples=limit)
        settings.load_profile("fastdp-opacus-suite")


_stub_torchvision_ops()
_limit_hypothesis_examples()
if os.environ.get("FASTDP_OPACUS_TESTS"):  # unset: the plugin only fixes torchvision (the run on Opacus itself)
    install(os.environ["FASTDP_OPACUS_TESTS"])
