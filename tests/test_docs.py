"""The API reference (docs/, Sphinx) builds without a single warning and covers the public API."""

import re
import sys
from pathlib import Path

import pytest

import fastdp
import fastdp.accountants

from .subprocesses import run

pytest.importorskip("sphinx", reason="the API reference needs sphinx (the [docs] and [test] extras install it)")

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def api_page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    # -W: any warning (a broken docstring, a missing name) fails; -E: no cached environment
    result = run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", str(DOCS), str(out)],
                 timeout=600)
    assert result.returncode == 0, f"sphinx failed or warned:\n{result.stderr[-6000:]}"
    return (out / "api.html").read_text()


def test_docs_build_warning_free(api_page):
    assert "fastdp.PrivacyEngine" in api_page


def test_every_public_name_is_documented(api_page):
    documented = set(re.findall(r'id="(fastdp[\w.]*)"', api_page))
    public = {f"fastdp.{name}" for name in fastdp.__all__ if name != "accountants"}
    public |= {f"fastdp.accountants.{name}" for name in fastdp.accountants.__all__}
    assert not public - documented, f"public names missing from docs/api.rst: {sorted(public - documented)}"
