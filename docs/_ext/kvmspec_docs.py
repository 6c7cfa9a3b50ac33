"""The kvmspec site extension: the docs are checked like code while the site is built.

* **Executed examples.** Every page's ```python blocks run and must print their ```output
  block; ```jsonl traces replay on the reference; ```json blocks parse (doc_examples.py, the
  same code tests/test_docs.py runs). A page with such blocks is read again on every build,
  so a change to the model cannot leave an example stale.
* **Pictures.** The ``kvmspec-show`` directive draws the model's state after a trace or a
  harness input with ``kvmspec.fuzz.show.render_svg`` and puts the SVG inline in the page::

      ```{kvmspec-show} examples/arm64-stage2.bin
      :step: 12
      :bug: seed-001-flush-shadow-all-emptied
      :caption: The stage-2 tree after the guest touched three pages
      ```

* **The rule catalogue.** Every rule must cite something that is there (make_rules.py's
  ``citation_problems``), and docs/rules.md and docs/kernel-index.md must be what their
  generators write now.
* **Links to the repository.** A link in a page to a file of the repository that is not a
  page (``../../reference/x86/mmu.py``, ``../../spec/rules.py#rule``) goes to the file's
  source: a highlighted copy in the site (``_source/...``) or, when ``kvmspec_source_url`` is
  set, the repository browser (conf.py says which and why).

Each failure is a warning at FILE:LINE, and `make docs` treats warnings as errors.
"""

from __future__ import annotations

import ast
import html
import importlib
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote

import make_kernel_index
import make_rules
from doc_examples import check_blocks, code_blocks_in, is_live
from docutils import nodes
from docutils.parsers.rst import directives
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import RegexLexer
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.token import Comment, Keyword, Name, Number, Punctuation, String, Whitespace
from pygments.util import ClassNotFound
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.transforms import SphinxTransform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from kvmspec.spec.rules import RULES

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
SOURCE_PAGES = "_source"
STATIC = Path(__file__).resolve().parent / "static"


# --- What the build remembers about each page ---------------------------------------------


@dataclass
class PageRecord:
    """What the extension learnt about one page when it read it: whether it has anything
    to run (examples, traces, pictures), and which repository files it links to."""

    live: bool = False
    sources: set[str] = field(default_factory=set)


def _records(env: BuildEnvironment) -> dict[str, PageRecord]:
    if not hasattr(env, "kvmspec_pages"):
        env.kvmspec_pages = {}  # type: ignore[attr-defined]
    records: dict[str, PageRecord] = env.kvmspec_pages  # type: ignore[attr-defined]
    return records


def _record(env: BuildEnvironment, docname: str) -> PageRecord:
    return _records(env).setdefault(docname, PageRecord())


def purge_page(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    _records(env).pop(docname, None)


def merge_pages(
    app: Sphinx, env: BuildEnvironment, docnames: set[str], other: BuildEnvironment
) -> None:
    for docname in docnames:
        if docname in _records(other):
            _records(env)[docname] = _records(other)[docname]


def reread_live_pages(
    app: Sphinx, env: BuildEnvironment, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    """Pages that run the model or link into it are read again on every build: the model
    may have changed under an unchanged page."""
    return sorted(
        docname
        for docname, record in _records(env).items()
        if (record.live or record.sources) and docname not in removed
    )


class JsonLinesLexer(RegexLexer):
    """A kvmspec trace: one JSON object a line, and ``#`` comment lines."""

    name = "JSON Lines"
    aliases: ClassVar[list[str]] = ["jsonl"]
    tokens: ClassVar[dict[str, Any]] = {
        "root": [
            (r"^\s*#.*$", Comment.Single),
            (r'"(\\.|[^"\\])*"(?=\s*:)', Name.Tag),
            (r'"(\\.|[^"\\])*"', String.Double),
            (r"-?\d+(\.\d+)?([eE][+-]?\d+)?", Number),
            (r"\b(true|false|null)\b", Keyword.Constant),
            (r"[{}\[\],:]", Punctuation),
            (r"\s+", Whitespace),
        ]
    }


# --- Executed examples ---------------------------------------------------------------------


def check_examples(app: Sphinx, docname: str, source: list[str]) -> None:
    """Run the page's examples, traces and JSON; each problem is a warning at its line."""
    path = Path(app.env.doc2path(docname))
    blocks = code_blocks_in(source[0], path)
    _record(app.env, docname).live = is_live(blocks) or "{kvmspec-show}" in source[0]
    for problem in check_blocks(blocks):
        logger.warning(problem.message, location=(docname, problem.line))


# --- Pictures ------------------------------------------------------------------------------


class KvmspecShow(SphinxDirective):
    """``kvmspec-show PATH``: the picture ``kvmspec show PATH --svg`` draws, inline.

    PATH is relative to docs/. ``:step: N`` stops after N steps, ``:bug: NAME`` plants a
    seed bug of kvmspec.fuzz.seed_bugs first, ``:caption:`` is shown under the picture. An
    input that does not exist or that the show API refuses (ShowError) is a build error."""

    required_arguments = 1
    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {
        "step": directives.nonnegative_int,
        "bug": directives.unchanged_required,
        "caption": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        relative = self.arguments[0]
        path = Path(self.env.srcdir) / relative
        if not path.is_file():
            raise self.error(f"kvmspec-show: no input docs/{relative}")
        self.env.note_dependency(str(path))
        try:  # imported when a page draws, so the rest of the site builds without it
            show = importlib.import_module("kvmspec.fuzz.show")
        except ImportError as error:
            raise self.error(f"kvmspec-show: the show API is missing: {error}") from None
        try:
            svg = show.render_svg(path, step=self.options.get("step"), bug=self.options.get("bug"))
        except show.ShowError as error:
            raise self.error(f"kvmspec-show docs/{relative}: {error}") from None
        if not isinstance(svg, str) or "<svg" not in svg:
            raise self.error(f"kvmspec-show docs/{relative}: render_svg returned no SVG")
        anchor = f"kvmspec-show-{self.env.new_serialno('kvmspec-show')}"
        figure = nodes.figure(classes=["kvmspec-show"], ids=[anchor])
        self.set_source_info(figure)
        inline_svg = scoped_ids(_without_prolog(svg), anchor)
        figure += nodes.raw("", f'<div class="kvmspec-show-svg">{inline_svg}</div>', format="html")
        caption = self.options.get("caption")
        if caption:
            text, messages = self.parse_inline(caption, lineno=self.lineno)
            figure += nodes.caption(caption, "", *text)
            return [figure, *messages]
        return [figure]


def _without_prolog(svg: str) -> str:
    """The SVG element alone: an XML declaration or DOCTYPE is not allowed inside HTML."""
    return svg[svg.index("<svg") :]


def scoped_ids(svg: str, prefix: str) -> str:
    """The SVG with its ids (and the references to them) prefixed, so that two pictures on
    one page cannot take each other's markers, gradients or clip paths."""
    names = set(re.findall(r'(?<=\s)id="([^"]+)"', svg))
    if not names:
        return svg
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    svg = re.sub(rf'(?<=\s)id="({alternatives})"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(rf"url\(#({alternatives})\)", rf"url(#{prefix}-\1)", svg)
    return re.sub(rf'href="#({alternatives})"', rf'href="#{prefix}-\1"', svg)


# --- Links to repository files -------------------------------------------------------------

MARKDOWN_LINK = re.compile(r"\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")


def _fragments(source: str) -> dict[str, list[str]]:
    """For each link destination of a Markdown page (without its fragment), the fragments it
    is written with, in order (MyST drops the fragment of a link to a file)."""
    found: dict[str, list[str]] = defaultdict(list)
    for match in MARKDOWN_LINK.finditer(source):
        path, _, fragment = unquote(match.group(1)).partition("#")
        found[path].append(fragment)
    return found


@dataclass(frozen=True)
class SourceFile:
    """A text file of the repository that pages link to, and the anchors it has."""

    path: str  # relative to the repository root

    @property
    def absolute(self) -> Path:
        return ROOT / self.path

    def lines(self) -> list[str]:
        return self.absolute.read_text(encoding="utf-8", errors="replace").splitlines()

    def definitions(self) -> dict[str, int]:
        """Qualified name of each class and function of a Python file -> its first line."""
        if self.absolute.suffix != ".py":
            return {}
        found: dict[str, int] = {}

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = [child.lineno] + [d.lineno for d in child.decorator_list]
                    found.setdefault(prefix + child.name, min(lines))
                    walk(child, f"{prefix}{child.name}.")

        walk(ast.parse(self.absolute.read_text(encoding="utf-8")), "")
        return found

    def line_of(self, fragment: str) -> int | None:
        """The line an anchor (``L42`` or a qualified name) points to; None if there is no
        such anchor."""
        if re.fullmatch(r"L\d+", fragment):
            line = int(fragment[1:])
            return line if 1 <= line <= len(self.lines()) else None
        return self.definitions().get(fragment)


class RepositoryLinks(SphinxTransform):
    """Turn links to repository files that are not pages into links to their source.

    MyST makes a link to an existing file a download, and a link to a missing one an
    unresolved reference; both are replaced here, before downloads are collected. Files in
    docs/ other than Python stay downloads (trace-schema.json, the example inputs)."""

    default_priority = 400

    def apply(self, **kwargs: Any) -> None:
        docname = self.env.docname
        source = Path(self.env.doc2path(docname))
        fragments = _fragments(source.read_text(encoding="utf-8"))
        for node in [link for link in self.document.findall(nodes.Element) if _is_file_link(link)]:
            written = node["reftarget"]
            path, _, fragment = written.partition("#")
            if isinstance(node, addnodes.download_reference) and fragments.get(path):
                fragment = fragments[path].pop(0)
            self._replace(node, docname, source.parent, path, fragment)

    def _replace(
        self, node: nodes.Element, docname: str, folder: Path, path: str, fragment: str
    ) -> None:
        target = Path(os.path.normpath(folder / path))
        if not target.is_relative_to(ROOT):
            # Beside the repository (../shared/): the site cannot serve it, so the path is
            # shown; it is checked where the folder it is in is present.
            if not target.exists() and _beside_folder(target).is_dir():
                logger.warning(f"link to {path}, which does not exist", location=node)
            node.replace_self(_code_reference(node, path))
            return
        relative = target.relative_to(ROOT).as_posix()
        if target.is_relative_to(DOCS) and target.suffix != ".py":
            return  # a page (MyST resolves it) or a download in docs/
        if not target.exists():
            logger.warning(f"link to {relative}, which does not exist", location=node)
            node.replace_self(_code_reference(node, path))
            return
        if target.is_dir():
            node.replace_self(_code_reference(node, path))
            return
        source_file = SourceFile(relative)
        line = source_file.line_of(fragment) if fragment else None
        if fragment and line is None:
            logger.warning(
                f"link to {relative}#{fragment}: {relative} has no line or definition {fragment!r}",
                location=node,
            )
        _record(self.env, docname).sources.add(relative)
        base = self.config.kvmspec_source_url
        if base:
            uri = base + relative + (f"#L{line}" if line else "")
        else:
            page = f"{SOURCE_PAGES}/{relative}"
            uri = self.app.builder.get_relative_uri(docname, page)
            uri += f"#{fragment}" if fragment and line else ""
        reference = nodes.reference("", "", refuri=uri, internal=not base)
        reference += [_without_download_class(child.deepcopy()) for child in node.children]
        node.replace_self(reference)


def _beside_folder(target: Path) -> Path:
    """The folder beside the repository that ``target`` is in (``/work/shared`` for
    ``/work/shared/seeds/x.txt``), or ``target`` itself when it is not beside it."""
    if not target.is_relative_to(ROOT.parent):
        return target
    return ROOT.parent / target.relative_to(ROOT.parent).parts[0]


def _is_file_link(node: nodes.Element) -> bool:
    if isinstance(node, addnodes.download_reference):
        return True
    return (
        isinstance(node, addnodes.pending_xref)
        and node.get("reftype") == "myst"
        and node.get("refdomain") is None
        and not str(node.get("reftarget", "")).startswith("#")
        and "/" in str(node.get("reftarget", ""))
    )


def _code_reference(node: nodes.Element, path: str) -> nodes.Node:
    text = node.astext() or path
    return nodes.literal(text, text, classes=["kvmspec-path"])


def _without_download_class(node: nodes.Node) -> nodes.Node:
    if isinstance(node, nodes.Element):
        node["classes"] = [name for name in node["classes"] if name != "download"]
    return node


def source_pages(app: Sphinx) -> Iterator[tuple[str, dict[str, Any], str]]:
    """A highlighted page for every repository file a page links to (when the site serves
    the source itself): every line has the anchor ``L<n>``, every class and function of a
    Python file its qualified name."""
    if app.config.kvmspec_source_url or app.builder.format != "html":
        return
    wanted = sorted({path for record in _records(app.env).values() for path in record.sources})
    for relative in wanted:
        source_file = SourceFile(relative)
        if source_file.absolute.is_file():
            body = _highlighted(source_file)
            yield f"{SOURCE_PAGES}/{relative}", {"title": relative, "body": body}, "page.html"


def _highlighted(source_file: SourceFile) -> str:
    text = source_file.absolute.read_text(encoding="utf-8", errors="replace")
    try:
        lexer = get_lexer_for_filename(source_file.path, stripnl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False)
    lines = highlight(text, lexer, HtmlFormatter(nowrap=True)).splitlines()
    named: dict[int, list[str]] = defaultdict(list)
    for qualname, line in source_file.definitions().items():
        named[line].append(qualname)
    rows = []  # each a block of its own, so no newline between them
    for number, code in enumerate(lines, start=1):
        anchors = "".join(f'<span id="{html.escape(name)}"></span>' for name in named[number])
        rows.append(
            f'<span class="kvmspec-line" id="L{number}">{anchors}'
            f'<a class="kvmspec-lineno" href="#L{number}">{number}</a>{code}</span>'
        )
    return (
        f"<h1>{html.escape(source_file.path)}</h1>\n"
        f'<div class="highlight kvmspec-source"><pre>{"".join(rows)}</pre></div>'
    )


# --- The generated pages and the citations --------------------------------------------------


def check_catalogue(app: Sphinx) -> None:
    """Fail the build on a stale rules.md or kernel-index.md, and on a rule that cites
    nothing or something that is not there."""
    generated = (
        ("rules.md", "make_rules.py", make_rules.render),
        ("kernel-index.md", "make_kernel_index.py", make_kernel_index.render),
    )
    for name, script, render in generated:
        page = DOCS / name
        current = page.read_text(encoding="utf-8") if page.is_file() else ""
        if current != render():
            logger.warning(
                f"docs/{name} is stale: run `.venv/bin/python docs/{script}` and commit it",
                location=f"{page}:1",
            )
    shared = Path(app.config.kvmspec_shared)
    if not make_rules.shared_documents_present(shared):
        logger.info(
            f"kvmspec: the seed threads or FINDINGS.md are not under {shared}:"
            " the quotes and measured sections they hold are unchecked"
        )
    for rule_id, problem in make_rules.citation_problems(RULES, shared):
        where = f"{make_rules.RULES_SOURCE}:{make_rules.rule_line(rule_id)}"
        logger.warning(f"rule {rule_id} {problem}", location=where)


def add_static_path(app: Sphinx, config: Any) -> None:
    config.html_static_path.append(str(STATIC))


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("kvmspec_source_url", "", "env", types=frozenset({str}))
    app.add_config_value(
        "kvmspec_shared", str(ROOT.parent / "shared"), "env", types=frozenset({str})
    )
    app.add_lexer("jsonl", JsonLinesLexer)
    app.add_directive("kvmspec-show", KvmspecShow)
    app.add_transform(RepositoryLinks)
    app.connect("config-inited", add_static_path)
    app.connect("builder-inited", check_catalogue)
    app.connect("source-read", check_examples)
    app.connect("env-get-outdated", reread_live_pages)
    app.connect("env-purge-doc", purge_page)
    app.connect("env-merge-info", merge_pages)
    app.connect("html-collect-pages", source_pages)
    app.add_css_file("kvmspec.css")
    return {"version": "1", "env_version": 1, "parallel_read_safe": True}
