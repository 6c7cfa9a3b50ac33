"""The site's pictures, as a reader's browser shows them: headless Chromium (Debian's
chromium package) renders a docs page with ``kvmspec-show`` pictures.

* The page is the tour or seed chapter with the most pictures (a picture of a failure, with
  its timeline, first among equals).
* ``--dump-dom`` gives the page's DOM after its scripts ran: it must hold one inline
  ``<svg class="kvmspec-show">`` per directive of the page, each drawing the model's state
  with the classes of the show API (``kvmspec.fuzz.show.CSS_CLASSES``), a failure with its
  rules and timeline where the directive planted a bug.
* A screenshot of the first picture must not be blank: many colours, and much of it not
  background. ``--screenshot`` alone cannot take it: headless Chromium captures the top of
  the page and does not scroll to a fragment, and the pictures are far down the chapters.
  So the test drives the same browser through the DevTools protocol on a pipe
  (``--remote-debugging-pipe``, no network) and captures the picture's own rectangle.

The site is built into a temporary folder, unless docs/_build/html is newer than every
source of the site (`make docs` just built it, as .ci/run does before the tests): then that
build is used, so CI does not build twice. Without chromium the tests are skipped, saying so.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kvmspec.fuzz.show import CSS_CLASSES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILT = DOCS / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
ANSWER_SECONDS = 60
DIRECTIVE = re.compile(r"^\s*```+\{kvmspec-show\}", re.MULTILINE)
# What a picture draws, by kind: at least one of these in every picture.
STATE_CLASSES = {"kvmspec-memslot", "kvmspec-pte", "kvmspec-table", "kvmspec-hpte-free"}

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


# --- The site and the page ------------------------------------------------------------------


def _newest_source() -> float:
    """When a source of the site last changed: the pages, the extension and the example
    inputs in docs/, and the code the examples and pictures run."""
    folders = [DOCS, ROOT / "reference", ROOT / "spec", ROOT / "fuzz"]
    return max(
        path.stat().st_mtime
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file() and "_build" not in path.parts and "__pycache__" not in path.parts
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built site: `make docs`'s if it is current, else a fresh build."""
    pages = list(BUILT.rglob("*.html")) if BUILT.is_dir() else []
    if pages and max(page.stat().st_mtime for page in pages) > _newest_source():
        return BUILT
    output = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-n",
            "-q",
            "-b",
            "html",
            DOCS,
            output,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, f"the site does not build:\n{build.stderr}"
    return output


@dataclass(frozen=True)
class Page:
    """A chapter with pictures: its name (``seeds/001-...``) and its directives."""

    name: str
    pictures: int
    failures: int


def picture_page() -> Page:
    """The tour or seed chapter with the most pictures; among equals, the one with the most
    pictures of a failure (``:bug:``), then by name."""
    found = []
    for path in sorted([*DOCS.glob("tour/*.md"), *DOCS.glob("seeds/*.md")]):
        text = path.read_text(encoding="utf-8")
        pictures = len(DIRECTIVE.findall(text))
        if pictures:
            failures = len(re.findall(r"\{kvmspec-show\}[^`]*?:bug:", text))
            name = path.relative_to(DOCS).with_suffix("").as_posix()
            found.append(Page(name, pictures, failures))
    assert found, "no tour or seed chapter has a kvmspec-show picture"
    return max(found, key=lambda page: (page.pictures, page.failures, page.name))


# --- The DOM --------------------------------------------------------------------------------


@dataclass
class Picture:
    """An inline <svg class="kvmspec-show"> of the DOM, and the classes inside it."""

    classes: set[str]
    elements: int


class PictureFinder(html.parser.HTMLParser):
    """The kvmspec-show pictures of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.pictures: list[Picture] = []
        self.depth = 0  # of <svg> elements, inside a picture

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        if tag == "svg" and "kvmspec-show" in classes and self.depth == 0:
            self.pictures.append(Picture(set(), 0))
            self.depth = 1
        elif self.depth:
            self.pictures[-1].classes |= classes
            self.pictures[-1].elements += 1
            self.depth += tag == "svg"

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg" and self.depth:
            self.depth -= 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth:
            self.pictures[-1].classes |= set((dict(attrs).get("class") or "").split())
            self.pictures[-1].elements += 1


def dump_dom(url: str, profile: Path) -> str:
    assert CHROMIUM is not None
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


# --- The screenshot, through the DevTools protocol on a pipe -------------------------------


class DevTools:
    """Headless Chromium driven through ``--remote-debugging-pipe``: commands go in on its
    file descriptor 3, answers and events come out on 4, each a JSON message ended by NUL."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()

        def wire() -> None:  # in the child: the pipes become its descriptors 3 and 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=wire,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.session = ""

    def _messages(self) -> Iterator[dict[str, Any]]:
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._answers], [], [], ANSWER_SECONDS)
                assert ready, f"chromium did not answer in {ANSWER_SECONDS} s"
                chunk = os.read(self._answers, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            message, self._buffer = self._buffer.split(b"\0", 1)
            yield json.loads(message)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command (to the attached page, once there is one); its result."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            command["sessionId"] = self.session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        for message in self._messages():
            if message.get("id") == self._next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                result: dict[str, Any] = message["result"]
                return result
        raise AssertionError("unreachable: _messages() never ends")

    def wait_for(self, event: str) -> None:
        for message in self._messages():
            if message.get("method") == event:
                return

    def open(self, url: str, width: int, height: int) -> None:
        """Open ``url`` in a new page of ``width`` x ``height`` and wait for it to load."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.send("Page.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"][
            "value"
        ]

    def screenshot(self, clip: dict[str, float]) -> bytes:
        """A PNG of a rectangle of the page, wherever it is (no scrolling needed)."""
        data = self.send(
            "Page.captureScreenshot",
            format="png",
            clip={**clip, "scale": 1},
            captureBeyondViewport=True,
        )["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        try:
            self.session = ""
            self.send("Browser.close")
        finally:
            os.close(self._commands)
            os.close(self._answers)
            self.process.wait(timeout=30)


FIRST_PICTURE = """(() => {
    const box = document.querySelector("svg.kvmspec-show").getBoundingClientRect();
    return {x: box.left + window.scrollX, y: box.top + window.scrollY,
            width: box.width, height: box.height};
})()"""


# --- The tests ------------------------------------------------------------------------------


def test_the_chosen_page_has_pictures() -> None:
    """The page the browser tests open is a chapter with pictures."""
    page = picture_page()
    assert page.pictures >= 1 and page.name.startswith(("tour/", "seeds/")), page


def picture_problems(dom: str, page: Page) -> list[str]:
    """What is wrong with the pictures of a page's DOM (nothing, when all is well)."""
    finder = PictureFinder()
    finder.feed(dom)
    if len(finder.pictures) != page.pictures:
        return [
            f"{page.name}: {page.pictures} kvmspec-show directives, "
            f"{len(finder.pictures)} <svg class=kvmspec-show> in the browser's DOM"
        ]
    problems = []
    for number, picture in enumerate(finder.pictures):
        drawn = {name for name in picture.classes if name.startswith("kvmspec-")}
        if "kvmspec-title" not in drawn:
            problems.append(f"picture {number} has no title")
        if not drawn & STATE_CLASSES:
            problems.append(f"picture {number} draws no state: {sorted(drawn)}")
        if not drawn <= set(CSS_CLASSES):
            problems.append(f"picture {number}: not show API classes {drawn - set(CSS_CLASSES)}")
        if picture.elements <= 20:
            problems.append(f"picture {number} has only {picture.elements} elements")
    failures = [p for p in finder.pictures if "kvmspec-failure" in p.classes]
    if len(failures) != page.failures:
        problems.append(f"{len(failures)} pictures of a failure, {page.failures} :bug: options")
    for picture in failures:
        if not {"kvmspec-rule", "kvmspec-timeline-step", "kvmspec-failing"} <= picture.classes:
            problems.append("a failure without its rule or timeline")
    return problems


def blank(png: bytes) -> str | None:
    """Why a screenshot is blank (too few colours, or nearly all background), or None."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = list(image.get_flattened_data())
    colours = Counter(pixels)
    background, count = colours.most_common(1)[0]
    drawn = 1 - count / len(pixels)
    if len(colours) < 16:
        return f"{len(colours)} colours"
    if drawn < 0.05:
        return f"only {drawn:.1%} of the pixels differ from the background {background}"
    return None


@needs_chromium
def test_the_page_holds_the_pictures_as_inline_svg(site: Path, tmp_path: Path) -> None:
    page = picture_page()
    dom = dump_dom((site / f"{page.name}.html").as_uri(), tmp_path / "profile")
    assert picture_problems(dom, page) == []


@needs_chromium
def test_the_first_picture_is_drawn_on_the_screen(site: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    page = picture_page()
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        browser.open((site / f"{page.name}.html").as_uri(), 1280, 1000)
        box = browser.evaluate(FIRST_PICTURE)
        assert box["width"] > 200 and box["height"] > 100, f"the picture is {box}"
        png = browser.screenshot(box)
    finally:
        browser.close()
    (tmp_path / "picture.png").write_bytes(png)  # to look at when the test fails
    assert blank(png) is None, f"the screenshot of the first picture is blank: {blank(png)}"


# The checks above catch what they are for (they run without a browser).


def _png(image: Image.Image) -> bytes:
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()


def test_a_blank_or_nearly_blank_screenshot_is_caught() -> None:
    white = Image.new("RGB", (400, 300), "white")
    assert blank(_png(white)) == "1 colours"
    for x in range(16):  # a few coloured pixels: still blank
        white.putpixel((x, 0), (x * 16, 0, 0))
    assert "differ from the background" in str(blank(_png(white)))
    drawn = Image.effect_mandelbrot((400, 300), (-2, -1.2, 1, 1.2), 64).convert("RGB")
    assert blank(_png(drawn)) is None


def test_missing_or_empty_pictures_are_caught() -> None:
    page = Page("seeds/x", pictures=1, failures=1)
    shapes = "".join('<rect class="kvmspec-pte"/>' for _ in range(30))
    good = (
        '<svg class="kvmspec-show"><text class="kvmspec-title">t</text>'
        '<g class="kvmspec-failure"><text class="kvmspec-rule">r</text></g>'
        '<rect class="kvmspec-timeline-step kvmspec-failing"/>' + shapes + "</svg>"
    )
    assert picture_problems(f"<p>{good}</p>", page) == []
    assert picture_problems("<p>no picture</p>", page)
    assert picture_problems(good.replace("kvmspec-failure", "kvmspec-note"), page)
    assert picture_problems(good.replace("kvmspec-pte", "kvmspec-label"), page)
    assert picture_problems(good.replace("kvmspec-pte", "kvmspec-pte kvmspec-blob"), page)
