"""Sphinx configuration of the API reference, built offline from the docstrings: ``make docs``."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import sys

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import monai_protoseg
import monai_protoseg.attribution
import monai_protoseg.handlers
import monai_protoseg.weak

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
# Subpackages with a page of their own: what the top-level package re-exports from them is described there, once.
SUBPACKAGE_PAGES = {"monai_protoseg.handlers", "monai_protoseg.attribution", "monai_protoseg.weak"}

project = "monai_protoseg"
author = "monai_protoseg contributors"
copyright = "monai_protoseg contributors, Apache-2.0"
release = monai_protoseg.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# Google-style "Args:" and "Returns:" sections; members in the order of each package's __all__.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" of dataclasses as fields, not a second description of each attribute
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_typehints = "description"
# The README's headings become targets of its "#section" links.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"monai_protoseg {release}"


def link_repository_files(app, relative_path: pathlib.Path, parent_docname: str, content: list[str]) -> None:
    """Point the README's links to repository files (bundle guides, benchmark results, the notebook) one folder up,
    from ``docs/``, as ``path:`` links: Sphinx copies each file into the site as a download."""

    def relink(match: re.Match) -> str:
        target = match.group(1)
        return f"](path:../{target})" if (REPOSITORY / target.split("#")[0]).is_file() else match.group(0)

    if relative_path.name == "README.md":
        content[0] = re.sub(r"\]\((?!#|[a-z]+:)([^)\s]+)\)", relink, content[0])


def skip_subpackage_names(app, what: str, name: str, obj: object, skip: bool, options) -> bool | None:
    """On the top-level package's page, leave out what a subpackage with its own page exports (the handlers)."""
    if app.env.docname == "api/monai_protoseg" and what == "module":
        if any(getattr(sys.modules[package], name, None) is obj for package in SUBPACKAGE_PAGES):
            return True
    return None


def constant_docstring(package: str, name: str, value: object) -> list[str]:
    """The docstring under the assignment of ``package.name`` in the submodule that defines it (empty if none)."""
    for module in list(sys.modules.values()):
        module_name = getattr(module, "__name__", "")
        if module_name.startswith(package + ".") and vars(module).get(name) is value:
            docstring = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", name))
            if docstring:
                return list(docstring)
    return []


class PublicData(SphinxDirective):
    """``.. public-data:: package``: the constants of the package's ``__all__`` with their docstrings (autodoc
    describes the classes and functions a package re-exports, not its constants)."""

    required_arguments = 1

    def run(self) -> list:
        package = importlib.import_module(self.arguments[0])
        lines = []
        for name in package.__all__:
            value = getattr(package, name)
            if inspect.isclass(value) or inspect.isroutine(value):
                continue
            docstring = constant_docstring(package.__name__, name, value)
            if not docstring:
                logging.getLogger(__name__).warning(
                    f"{package.__name__}.{name} has no docstring under its assignment", location=self.get_location()
                )
            lines += [] if lines else [".. rubric:: Constants", ""]
            lines += [f".. py:data:: {name}", f"   :module: {package.__name__}", ""]
            lines += [f"   {line}" for line in docstring] + [""]
        return self.parse_text_to_nodes("\n".join(lines))


def setup(app) -> None:
    app.add_directive("public-data", PublicData)
    app.connect("include-read", link_repository_files)
    app.connect("autodoc-skip-member", skip_subpackage_names)
