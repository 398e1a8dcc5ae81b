"""Sphinx configuration of fedask-jax's documentation: the design document (Markdown, myst-parser), the README
(its ```pycon blocks run as doctests) and the API reference generated from the docstrings (autodoc, napoleon).

Build (tests/test_docs.py runs both, with warnings as errors):

    sphinx-build -W -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx.domains.python import PyXRefRole
from sphinx.ext.doctest import DoctestDirective

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fedask_jax  # noqa: E402  (after the path: the checkout's package, not an installed copy)

project = "fedask-jax"
copyright = "fedask-jax authors"
release = version = fedask_jax.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.doctest"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

# The docstrings are Google style; `Attributes:` become :ivar: fields, so that a dataclass field is not described
# twice (once by napoleon, once by autodoc as a member).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"undoc-members": True}
# In the docstrings `x` is code (the package's convention, as in Markdown), and a dotted name of the package in
# backticks is a cross-reference that must resolve (`_package_reference`).
default_role = "fedask-ref"

# README.md's ```pycon blocks are doctests: the `doctest` builder runs them, GitHub highlights them.
myst_fence_as_directive = ["pycon"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class _PyconDirective(DoctestDirective):
  """```pycon, a doctest under the name GitHub highlights (sphinx.ext.doctest only knows `doctest`)."""

  def run(self):
    self.name = "doctest"
    return super().run()


_py_obj = PyXRefRole()


def _package_reference(name, rawtext, text, lineno, inliner, options=None, content=None):
  """The default role: `fedask_jax.x.y` links to that object and warns (so -W fails the build) when it does not
  exist; another identifier (`client_update`) links when Sphinx finds it from the current module, else stays
  code; anything else (`fold_in(round_key, t)`) is code."""
  if not _IDENTIFIER.fullmatch(text):
    return [nodes.literal(rawtext, text)], []
  result, messages = _py_obj("py:obj", rawtext, text, lineno, inliner, options or {}, content or [])
  for node in result:
    for ref in node.findall(lambda n: n.tagname == "pending_xref"):
      ref["refwarn"] = text.startswith("fedask_jax.")
  return result, messages


def _skip_member(app, what, name, obj, skip, options):
  # NamedTuple fields repeat the class docstring's field list as "Alias for field number k".
  doc = getattr(obj, "__doc__", None) or ""
  if doc.startswith("Alias for field number"):
    return True
  return None


def _alias_package_names(app, env):
  """Register `fedask_jax.pkg.name` as another name of `fedask_jax.pkg.module.name` (and of its members) for every
  name a package imports from its modules, so that a reference may use the name users import."""
  domain = env.get_domain("py")
  objects = domain.objects
  missing = object()
  for name, entry in list(objects.items()):
    module, _, attr = name.rpartition(".")
    if entry.objtype == "module" or module not in domain.modules or module not in sys.modules:
      continue
    obj = getattr(sys.modules[module], attr, missing)
    parent = module
    while "." in parent:
      parent = parent.rpartition(".")[0]
      alias = f"{parent}.{attr}"
      if getattr(sys.modules.get(parent), attr, missing) is not obj or alias in objects:
        continue
      for member, member_entry in list(objects.items()):
        if member == name or member.startswith(name + "."):
          objects.setdefault(alias + member[len(name) :], member_entry._replace(aliased=True))


def setup(app):
  app.add_role("fedask-ref", _package_reference)
  app.add_directive("pycon", _PyconDirective)
  app.connect("autodoc-skip-member", _skip_member)
  app.connect("env-updated", _alias_package_names)
