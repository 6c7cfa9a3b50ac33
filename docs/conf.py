"""Sphinx configuration of the kvmspec documentation site (`make docs`).

The pages are Markdown, read by MyST-Parser, shown with the furo theme. The local extension
docs/_ext/kvmspec_docs.py makes the site part of the test suite: it runs every page's
examples, draws the ``kvmspec-show`` pictures, checks the rule catalogue's citations and that
the generated pages (rules.md, kernel-index.md) are current, and turns links to repository
files into links to their source. `make docs` builds with warnings as errors
(``sphinx-build -W --keep-going -n``), so any of these failing fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The extension and the shared example runner live in _ext; the page generators
# (make_rules.py, make_kernel_index.py) beside this file.
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS)]

project = "kvmspec"
author = "the kvmspec authors"
copyright = "the kvmspec authors; GPL-2.0-only"

extensions = ["myst_parser", "kvmspec_docs"]
source_suffix = {".md": "markdown"}
root_doc = "index"
# Only Markdown pages are sources; the generators, the extension and the picture inputs are
# not pages (examples/ is read by the kvmspec-show directive, trace-schema.json is a download).
exclude_patterns = ["_build", "_ext", "examples"]

# attrs_inline gives a table cell an anchor (rules.md: ``[M7]{#rule-m7}``); heading anchors
# let pages link to a section as ``page.md#its-title``.
myst_enable_extensions = ["attrs_inline"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "kvmspec: the KVM memory subsystem, executable"
html_static_path: list[str] = []

# --- The site extension's settings -----------------------------------------------------------

# Where a link in a page to a repository file that is not a page (``../reference/x86/mmu.py``,
# ``../../spec/rules.py#RULES``) goes. Empty (the default): the build renders each linked file
# into the site itself, highlighted, one anchor per line (``#L42``) and per class or function
# (``#KvmMemslots.hva_to_memslots``), under ``_source/``; this works offline, from a copy of
# the built site, and needs no hosting. Set it to a repository browser's URL prefix for a
# published site, e.g. ``"https://git.example.org/kvmspec/blob/main/"``: links then go to
# ``PREFIX + path`` with ``#L<line>`` for a class or function. A link to a file that does not
# exist is a build error either way; a link out of the repository (to ../shared/, beside it)
# is shown as the path, in code style, since the site cannot serve it.
kvmspec_source_url = ""

# The folder beside the repository with the seed threads (seeds/) and the measurements on the
# real kernel (kvm-reference/): the rule catalogue's quotes and sections are checked in it.
kvmspec_shared = str(DOCS.parent.parent / "shared")
