"""Sphinx configuration for scbert-tl."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import date
from importlib.metadata import version as _pkg_version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

project = "scbert-tl"
author = "scbert-tl developers"
copyright = f"{date.today():%Y}, {author}"
try:
    release = _pkg_version("scbert-tl")
except Exception:  # noqa: BLE001 - building from a source tree that is not installed
    release = "0.1.0"
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

# tutorials live in notebooks/ at the repository root; they are rendered from a copy
_tutorials = HERE / "tutorials"
_tutorials.mkdir(exist_ok=True)
for nb in sorted((HERE.parent / "notebooks").glob("*.ipynb")):
    shutil.copy(nb, _tutorials / nb.name)

autosummary_generate = True
autodoc_member_order = "groupwise"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# Returns sections are prose (types live in signatures): render them as text, not as a type name
napoleon_custom_sections = [("Returns", "prose_returns")]
always_document_param_types = True

myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
nb_execution_mode = "off"  # notebooks are executed by the test suite; their committed outputs are rendered
nb_output_stderr = "remove"

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
html_static_path = ["_static"]

intersphinx_mapping = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}

html_theme = "sphinx_book_theme"
html_title = "scbert-tl"
html_theme_options = {
    "repository_url": "https://github.com/scverse/scbert-tl",
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}

nitpicky = True
nitpick_ignore = [
    ("py:class", "torch.nn.modules.module.Module"),
    # the protocol pp.bin types a model with, so that preprocessing imports no model; its docstring names ScBERT
    ("py:class", "scbert_tl.pp._binning.ModelPanel"),
]

# Without network (SCBERT_DOCS_OFFLINE=1, as in CI) other projects' inventories cannot be fetched:
# references into them are then left unlinked instead of failing the -W build.
if os.environ.get("SCBERT_DOCS_OFFLINE"):
    extensions.remove("sphinx.ext.intersphinx")
    nitpick_ignore_regex = [
        (
            "py:.*",
            r"(anndata|numpy|np|pandas|pd|torch|matplotlib|scipy|scanpy|sc|collections|typing|pathlib|os|sp)\..*",
        ),
        ("py:class", r"(AnnData|Axes|Figure|DataFrame|Path|PathLike|Tensor|Generator|ndarray|spmatrix)"),
        ("py:class", r"(optional|default.*)"),
    ]
