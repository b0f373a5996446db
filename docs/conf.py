"""Sphinx configuration of the exml_fast documentation (MyST Markdown, furo, autodoc/autosummary).

`make docs` builds it with warnings as errors. The tables of results and the pages of recorded runs are generated
from benches/results/**/*.json at build time by the local extension _ext/exml_records.py.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # this checkout's exml_fast, not another install

import exml_fast  # noqa: E402

project = "exml_fast"
author = "the exml_fast authors"
release = exml_fast.__version__
version = release
copyright = "2026, the exml_fast authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "exml_records",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4

autosummary_generate = True
# _templates/autosummary/own_members_class.rst: a class page without the tables of inherited members, for classes
# that inherit another library's (the Avalanche integration's strategy and plugin), whose docstrings are that
# library's to document and not written for this site's reST.
templates_path = ["_templates"]
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Docstrings quote shapes and formulas in plain text; they are not Sphinx cross-references.
nitpicky = False

html_theme = "furo"
html_title = f"exml_fast {release}"
html_static_path = []

# An attribute named in two classes (``meta``) is ambiguous to the Python domain; the first match is right.
suppress_warnings = ["ref.python"]

# The docstrings are written for `help()` (plain text with Google-style sections), not for reST. Three habits of
# that text trip docutils, and they are mended here rather than in the code: |x| for an absolute value or a size
# (a reST substitution), an indented block right under a line ending in a colon, and a line of prose straight
# after the field list napoleon made of an Args section.
import re  # noqa: E402

_BARS = re.compile(r"(?<![`\\|])\|([^|`\s][^|`]*?)\|(?![`|_])")


_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+")  # a list item's marker, up to its text


def _indent(line):
    return len(line) - len(line.lstrip())


def _mend_docstring(app, what, name, obj, options, lines):
    out, in_fields, literal, quoted, bullet = [], False, None, None, None
    for line in lines:
        stripped = line.strip()
        if literal is not None and stripped and _indent(line) <= literal:
            literal = None
        if literal is None:
            if "``" not in line:
                line = _BARS.sub(r"\\|\1\\|", line)
            if re.match(r"^:param\s*:\s*$", line):  # a name list's trailing comma
                continue
            field = re.match(r"^:param (\S+ .+):\s*$", line)  # napoleon read a sentence as a parameter
            if field:
                out.append("")
                line, stripped = field.group(1), field.group(1)
            prev = out[-1] if out else ""
            item = _ITEM.match(line)
            if item:
                bullet = len(item.group(0))
            elif stripped and bullet is not None and _indent(line) < bullet:
                bullet = None
            continues_item = bullet is not None and not item and _indent(line) == bullet
            if stripped and prev.strip() and not continues_item:
                if in_fields and not line.startswith((" ", ":")):
                    out.append("")
                elif (_indent(line) > _indent(prev) and not in_fields and not prev.lstrip().startswith(":")):
                    out.append("")  # the indented lines become a block quote ...
                    quoted = _indent(prev)
                elif quoted is not None and _indent(line) <= quoted:
                    out.append("")  # ... which ends where the text comes back
                    quoted = None
            if line.startswith(":"):
                in_fields = True
            elif stripped and not line.startswith(" "):
                in_fields = False
            if stripped.endswith("::"):
                literal = _indent(line)
        out.append(line)
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", _mend_docstring)
