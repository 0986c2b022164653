"""The executed book as a reader gets it: every chapter page checked as HTML and in headless Chromium.

Needs `--book-html _build/html` (`make test` builds the book from its own nbval run and passes it).
Full-page screenshots land in _build/screenshots/. Chromium comes from Debian's `chromium` and
`chromium-driver` packages (.ci/run installs them); selenium from requirements-dev.txt.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pagecheck import BROWSER_PROBE, browser_defects, html_defects

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
MIN_FIGURES_IN_BOOK = 30


@pytest.fixture(scope="session")
def html_dir(request) -> Path:
    option = request.config.getoption("--book-html")
    if option is None:
        pytest.skip("no built book given: run `make test` (or pass --book-html _build/html after `make book`)")
    folder = Path(option).resolve()
    if not (folder / "index.html").is_file():
        pytest.fail(f"{folder} holds no built book (no index.html); build it with `make book` first.")
    return folder


def page_of(html_dir: Path, chapter: str) -> Path:
    page = html_dir / "notebooks" / f"{chapter}.html"
    assert page.is_file(), f"{chapter}: no page in the built book ({page} is missing)."
    return page


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_page_html_shows_what_the_chapter_computed(html_dir, chapter):
    page = page_of(html_dir, chapter)
    defects = html_defects(chapter, page.read_text(errors="replace"), page)
    assert not defects, " ".join(defects)


def test_book_has_enough_figures_and_its_own_mathjax(html_dir):
    import re

    counts = {c: len(re.findall(r'<img[^>]+src="[^"]*_images/', page_of(html_dir, c).read_text(errors="replace")))
              for c in CHAPTERS}
    print("figures per chapter:", counts, "total:", sum(counts.values()))
    assert sum(counts.values()) >= MIN_FIGURES_IN_BOOK, f"the book has {sum(counts.values())} figures: {counts}"
    assert (html_dir / "_static" / "mathjax" / "tex-svg.js").is_file(), "the book ships no MathJax of its own."


def _browser():
    """A headless Chromium driven by selenium, or a skip that says how to install what is missing."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: `pip install -r requirements-dev.txt`.")
    if not (chromium and driver):
        pytest.skip("no Chromium here: install it with `apt-get install chromium chromium-driver` "
                    "(.ci/run does) to check the pages in a real browser.")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,900", "--allow-file-access-from-files"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_page_in_chromium_loads_every_image_and_typesets_every_formula(html_dir, browser, chapter):
    page = page_of(html_dir, chapter)
    browser.get(page.as_uri())  # file://, as on a workshop laptop without a server or network
    seen = browser.execute_async_script(BROWSER_PROBE)
    shots = html_dir.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(height, 900), 30000))
    browser.save_screenshot(str(shots / f"{chapter}.png"))
    browser.set_window_size(1280, 900)
    print(f"{chapter}: the code column holds {seen.get('columnChars') or 0:.1f} characters")
    defects = browser_defects(chapter, seen)
    assert not defects, " ".join(defects)


def test_diagrams_are_on_their_pages_with_alt_text_and_caption(html_dir):
    import html
    import re

    from test_diagrams import diagram_cells

    cells = diagram_cells()
    assert cells, "no chapter draws a diagram"
    for chapter, meta, _ in cells:
        figure = meta["mystnb"]["figure"]["name"]
        page = page_of(html_dir, chapter).read_text(errors="replace")
        found = re.search(rf'<figure[^>]*id="{figure}"[^>]*>(.*?)</figure>', page, re.S)
        assert found, f"{chapter}: diagram {figure} is not on the page"
        img = re.search(r'<img[^>]*src="[^"]*_images/[^>]*>', found.group(1))
        alt = re.search(r'alt="([^"]*)"', img.group(0)) if img else None
        assert alt and html.unescape(alt.group(1)) == meta["mystnb"]["image"]["alt"], f"{chapter}: {figure} lost its alt text"
        assert "<figcaption" in found.group(1), f"{chapter}: {figure} has no caption"


def test_attention_explorer_moves_without_a_kernel(html_dir, browser):
    """Chapter 4's explorer on the static page: a slider shows another precomputed view, no kernel."""
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(page_of(html_dir, "04_attention_uniformity").as_uri())
    explorers = browser.find_elements(By.CSS_SELECTOR, ".selagg-explorer")
    assert len(explorers) == 1, f"chapter 4 shows {len(explorers)} static attention explorers, not one"
    explorer = explorers[0]
    size = len(explorer.get_attribute("outerHTML"))
    assert size < 1_500_000, f"the explorer adds {size / 1e6:.1f} MB to the page"

    def shown() -> tuple[str, str]:
        views = [v for v in explorer.find_elements(By.TAG_NAME, "img") if v.is_displayed()]
        assert len(views) == 1, f"the explorer shows {len(views)} views at once"
        assert explorer.find_element(By.TAG_NAME, "output").text == views[0].get_attribute("alt")
        return views[0].get_attribute("src"), views[0].get_attribute("alt")

    def where(alt: str) -> tuple[str, str]:
        return re.match(r"Image (\d+), block (\d+)", alt).groups()

    broken = browser.execute_script("return [...arguments[0].querySelectorAll('img')]"
                                    ".filter(i => !i.complete || i.naturalWidth === 0).length", explorer)
    assert broken == 0, f"{broken} of the explorer's views do not decode"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", explorer)
    image_slider, block_slider = explorer.find_elements(By.CSS_SELECTOR, 'input[type="range"]')
    first = shown()
    block_slider.send_keys(Keys.ARROW_RIGHT)
    second = shown()
    assert second[0] != first[0], "moving the block slider did not change the picture"
    assert where(second[1])[0] == where(first[1])[0] and where(second[1])[1] != where(first[1])[1]
    image_slider.send_keys(Keys.ARROW_RIGHT)
    third = shown()
    assert third[0] != second[0] and where(third[1]) == (str(int(where(second[1])[0]) + 1), where(second[1])[1])
