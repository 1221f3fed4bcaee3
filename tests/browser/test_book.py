"""Every page of the built book (``_build/html``) in headless Chromium, served over HTTP on 127.0.0.1.

Per page: no console errors (SEVERE), no broken images (naturalWidth > 0), no broken internal links
(a page or anchor that does not exist), math typeset by MathJax (``mjx-container``, no ``mjx-merror``,
no raw ``\\(`` left in the text); and search finds a word of the book. The browser reaches nothing but
127.0.0.1 (every other host fails to resolve): external links, images and scripts are listed at the end
of the run, never fetched, so the result does not depend on the network. A screenshot of a page with
math goes to ``_build/screens/``.

``make browser`` builds the book and runs this; it skips, saying why, where the book is not built or
Chromium, chromedriver or selenium is missing (``tools/browser_deps.sh`` installs them in CI).
Settings: ADLIB_CHROMIUM, ADLIB_CHROMEDRIVER (paths), ADLIB_BOOK_HTML (the built book).
"""

from __future__ import annotations

import functools
import html.parser
import os
import shutil
import threading
import warnings
from collections import defaultdict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOK = Path(os.environ.get("ADLIB_BOOK_HTML", ROOT / "_build" / "html"))
SCREENS = ROOT / "_build" / "screens"
SEARCH_WORD = "anomaly"
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}
EXTERNAL: dict[str, set[str]] = defaultdict(set)  # url -> pages; printed by conftest.py


def _pages() -> list[str]:
    if not (BOOK / "index.html").is_file():
        return []
    return sorted(
        p.relative_to(BOOK).as_posix()
        for p in BOOK.rglob("*.html")
        if not SKIP_DIRS & set(p.relative_to(BOOK).parts[:-1])
    )


PAGES = _pages()


def _which(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


# --- the server and the browser ---------------------------------------------------------------


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports what matters itself
        pass


@pytest.fixture(scope="session")
def book() -> Path:
    if not PAGES:
        pytest.skip(f"built book not found ({BOOK / 'index.html'} missing): run `make book` first, or `make browser`")
    return BOOK


@pytest.fixture(scope="session")
def base_url(book):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(book)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def driver(book):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    chromium = _which("ADLIB_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    chromedriver = _which("ADLIB_CHROMEDRIVER", "chromedriver")
    if not chromium or not chromedriver:
        missing = [n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if not p]
        pytest.skip(f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver (CI does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--hide-scrollbars",
                # Only the local server resolves: the test never touches the network.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    yield drv
    drv.quit()


# --- what the static files hold (targets of links) --------------------------------------------


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" or (key == "name" and tag == "a"):
                self.ids.add(value or "")


@functools.lru_cache(maxsize=None)
def _ids(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def _local_target(book: Path, path: str) -> Path | None:
    target = book / unquote(path).lstrip("/")
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


# --- JavaScript run in the page ----------------------------------------------------------------

WAIT_READY = """
const done = arguments[arguments.length - 1];
(async () => {
  const out = {mathjax: null, mathjaxError: null};
  const script = [...document.scripts].find(s => /mathjax/i.test(s.src));
  out.mathjax = script ? script.src : null;
  const t0 = Date.now();
  while (script && !(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() - t0 < 15000)
    await new Promise(r => setTimeout(r, 100));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (e) { out.mathjaxError = String(e); }
  }
  for (const img of document.images) img.loading = "eager";
  await Promise.all([...document.images].map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); setTimeout(r, 15000); })));
  done(out);
})();
"""

INSPECT = """
const abs = u => { try { return new URL(u, document.baseURI).href; } catch (e) { return u; } };
const clone = document.body.cloneNode(true);
clone.querySelectorAll("pre, code, script, style, textarea, mjx-container, .highlight").forEach(e => e.remove());
const text = clone.textContent;
return {
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, w: i.naturalWidth, alt: i.alt})),
  links: [...document.querySelectorAll("a[href]")].map(a => a.getAttribute("href")).map(h => [h, abs(h)]),
  resources: [...document.querySelectorAll("link[href], script[src], source[src], iframe[src]")]
      .map(e => abs(e.getAttribute("href") || e.getAttribute("src"))),
  mathNodes: document.querySelectorAll(".math, span.math, div.math").length,
  mjx: document.querySelectorAll("mjx-container").length,
  merrors: [...document.querySelectorAll("mjx-merror")].map(e => e.getAttribute("data-mjx-error") || e.textContent).slice(0, 5),
  raw: ["\\\\(", "\\\\[", "\\\\begin{"].filter(d => text.includes(d)).map(d => {
      const i = text.indexOf(d); return text.slice(Math.max(0, i - 30), i + 50).replace(/\\s+/g, " "); }),
};
"""


def _problems(drv, book: Path, base_url: str, page: str) -> list[str]:
    drv.get_log("browser")  # drop what an earlier page left
    drv.get(base_url + page)
    ready = drv.execute_async_script(WAIT_READY)
    info = drv.execute_script(INSPECT)
    problems: list[str] = []
    local = urlsplit(base_url).netloc

    for entry in drv.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        if "ERR_NAME_NOT_RESOLVED" in message and local not in message.split(" ", 1)[0]:
            EXTERNAL[message.split(" ", 1)[0]].add(page)  # an external resource, blocked on purpose
            continue
        if message.startswith(f"{base_url}favicon.ico ") and "404" in message:
            continue  # Chromium asks for /favicon.ico by itself where a page names no icon: not the book's request
        problems.append(f"console error: {message}")

    for img in info["images"]:
        parts = urlsplit(img["src"])
        if parts.scheme in ("http", "https") and parts.netloc != local:
            EXTERNAL[img["src"]].add(page)
        elif img["w"] == 0:
            problems.append(f"broken image: {img['src']} (alt={img['alt']!r})")

    for url in info["resources"]:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc != local:
            EXTERNAL[url].add(page)
        elif parts.scheme in ("http", "https") and _local_target(book, parts.path) is None:
            problems.append(f"missing resource: {parts.path}")

    for href, url in info["links"]:
        parts = urlsplit(url)
        if parts.scheme in ("mailto", "javascript", "tel", "data"):
            continue
        if parts.netloc != local:
            EXTERNAL[url].add(page)
            continue
        target = _local_target(book, parts.path)
        if target is None:
            problems.append(f"broken link: {href!r} -> {parts.path} does not exist")
        elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _ids(target):
            problems.append(f"broken anchor: {href!r} -> no id {parts.fragment!r} in {target.relative_to(book)}")

    mathjax = ready["mathjax"] or ""
    if mathjax and urlsplit(mathjax).netloc != local:
        if info["mathNodes"]:
            warnings.warn(f"{page}: math not checked, MathJax comes from {mathjax} (no local copy: npm was "
                          "missing at build time, see tools/fetch_mathjax.sh)")
    else:
        if ready["mathjaxError"]:
            problems.append(f"MathJax failed: {ready['mathjaxError']}")
        if info["mathNodes"] and not info["mjx"]:
            problems.append(f"math not rendered: {info['mathNodes']} math elements, no mjx-container "
                            f"(MathJax script: {mathjax or 'none'})")
        problems += [f"MathJax error in formula: {e}" for e in info["merrors"]]
        problems += [f"raw TeX left in the text: ...{r}..." for r in info["raw"]]
    return list(dict.fromkeys(problems))


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES or ["(book not built)"])
def test_page(page, book, base_url, driver):
    problems = _problems(driver, book, base_url, page)
    assert not problems, f"{page}: {len(problems)} problem(s)\n  " + "\n  ".join(problems)


def test_search_finds_results(book, base_url, driver):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base_url}search.html?q={SEARCH_WORD}")
    items = WebDriverWait(driver, 30).until(
        lambda d: d.find_elements("css selector", "#search-results ul.search li")
        or (d.find_elements("css selector", "#search-results p.search-summary")
            and d.find_element("css selector", "#search-results p.search-summary").text.strip() and [None]),
        message=f"search.html?q={SEARCH_WORD}: no results and no summary after 30 s",
    )
    hits = [i for i in items if i is not None]
    assert hits, f"search.html?q={SEARCH_WORD} found nothing: {driver.find_element('id', 'search-results').text!r}"


def test_math_screenshot(book, base_url, driver):
    """A picture of rendered math for a person to look at: _build/screens/<page>.png."""
    counts = {p: (book / p).read_text(encoding="utf-8", errors="replace").count('class="math') for p in PAGES}
    page = max(counts, key=counts.get, default=None)  # the page with the most math
    if page is None or not counts[page]:
        pytest.skip("no page with math")
    driver.get(base_url + page)
    driver.execute_async_script(WAIT_READY)
    driver.execute_script("const m = document.querySelector('mjx-container') || document.querySelector('.math');"
                          "if (m) m.scrollIntoView({block: 'center'});")
    SCREENS.mkdir(parents=True, exist_ok=True)
    out = SCREENS / (page.replace("/", "_").removesuffix(".html") + ".png")
    assert driver.save_screenshot(str(out)), f"could not write {out}"
    # The formula itself must be ink on paper: MathJax's output, not an empty box or raw TeX in a span.
    formula = driver.execute_script("return document.querySelector('mjx-container');")
    assert formula is not None, f"{page}: {counts[page]} math elements, but none was typeset by MathJax"
    import io

    import numpy as np
    from PIL import Image

    gray = np.asarray(Image.open(io.BytesIO(formula.screenshot_as_png)).convert("L"), dtype=float)
    ink = float((gray < 128).mean())
    assert min(gray.shape) >= 8 and 0.005 < ink < 0.6, \
        f"{page}: the first typeset formula is {gray.shape} px with {ink:.1%} dark pixels: not a rendered formula"
