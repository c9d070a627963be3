"""Sphinx configuration of fastdp's API reference: ``python -m sphinx -W docs docs/_build/html``.

Pages come from the docstrings (autodoc; Google/NumPy sections through napoleon). The design
notes next to this file (engine.md, distributed.md) are Markdown read on GitHub, not built.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the checkout's fastdp, installed or not

import fastdp  # noqa: E402

project = "fastdp"
author = "fastdp contributors"
copyright = "fastdp contributors, Apache-2.0"  # noqa: A001 - Sphinx's name
release = version = fastdp.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build", "*.md"]
source_suffix = {".rst": "restructuredtext"}

autodoc_member_order = "bysource"
autodoc_typehints = "description"  # signatures stay short; types go with the documented parameters
autodoc_typehints_description_target = "documented"
autodoc_inherit_docstrings = False  # torch's "Define the computation performed at every call" is no doc
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports = ["triton"]  # CPU machines without triton still build the whole reference
napoleon_google_docstring = True
napoleon_numpy_docstring = True

html_theme = "alabaster"
html_title = f"fastdp {release}"
