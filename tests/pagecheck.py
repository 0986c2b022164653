"""Checks of the built book's pages: what a reader would see as broken, one sentence per defect.

`html_defects` reads a page's HTML (cheap, no browser); `browser_defects` reads what Chromium
rendered (images decoded, formulas typeset). Both return sentences that name the chapter.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

# A header row, then a separator row: |---|---| (or |—|—| once smart quotes turned --- into a dash).
_RULE = r"\s*:?(?:-{3,}|[—–]+):?\s*\|"
# ... or two separator cells in a row, as a browser shows a raw table folded into one paragraph.
RAW_TABLE = re.compile(rf"^\s*\|.*\|\s*\n\s*\|(?:{_RULE})+\s*$|\|{_RULE}{_RULE}", re.M)
PROGRESS = re.compile(r"\d+%\|[^\n]*\||\d[\d.]*\s?(?:it/s|s/it)\b")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w*(?:Error|Exception): ", re.M)
RAW_MATH = re.compile(r"\$[^$\n]*\\[A-Za-z]+[^$\n]*\$|\\\(|\\\)|\\\[|\\\]")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
EXTERNAL_ASSET = re.compile(r"""<(?:script|link)\b[^>]*(?:src|href)=["'](?:https?:)?//[^"']+\.(?:js|css)\b""", re.I)


class _Visible(HTMLParser):
    """The text a reader sees, less code listings and formulas; images with their sources."""

    SKIPPED = {"script", "style", "pre", "code", "head"}

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.output_text: list[str] = []
        self.images: list[str] = []
        self.output_images: list[list[str]] = []  # per cell output: the images it shows
        self._skip: list[str] = []
        self._output_depth: list[int] = []
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "img":
            self.images.append(a.get("src") or "")
            if self._output_depth:
                self.output_images[-1].append(a.get("src") or "")
        if tag in ("br", "img", "meta", "link", "input", "hr"):
            return
        self._depth += 1
        if tag in self.SKIPPED or "math" in classes:
            self._skip.append(tag)
        elif "cell_output" in classes:
            self._output_depth.append(self._depth)
            self.output_images.append([])

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "link", "input", "hr"):
            return
        if self._output_depth and self._output_depth[-1] == self._depth:
            self._output_depth.pop()
        if self._skip and self._skip[-1] == tag:
            self._skip.pop()
        self._depth -= 1

    def handle_data(self, data):
        if self._output_depth:
            self.output_text.append(data)  # outputs: <pre> included (tracebacks, printed tables)
        if not self._skip:
            self.text.append(data)


def _outputs_text(html: str) -> str:
    """Text inside cell outputs, <pre> blocks included."""
    parser = _Visible()
    parser.SKIPPED = {"script", "style", "head"}
    parser.feed(html)
    return "".join(parser.output_text)


def _found(chapter: str, checks: list[tuple[re.Pattern, str, int]], text: str) -> list[str]:
    """One sentence per pattern that occurs in the text: what it means, and the start of what matched."""
    return [f"{chapter}: {what} ({m.group(0).strip()[:width]!r})." for pattern, what, width in checks
            if (m := pattern.search(text))]


def html_defects(chapter: str, html: str, page: Path | None = None) -> list[str]:
    """Defects readable from a page's HTML: missing figures, raw tables, progress bars, tracebacks, raw math."""
    parser = _Visible()
    parser.feed(html)
    visible, outputs = "".join(parser.text), _outputs_text(html)
    defects = []
    figures = [src for src in parser.images if "_images/" in src]
    if not figures:
        defects.append(f"{chapter}: the page has no figure (no <img> from _images/); is the kernel's inline "
                       "backend silenced (MPLBACKEND=Agg)?")
    if page is not None:
        for src in figures:
            target = (page.parent / src.split("#")[0].split("?")[0]).resolve()
            if not target.is_file() or target.stat().st_size == 0:
                defects.append(f"{chapter}: the figure {src} is missing or empty in the built site.")
    for shown in parser.output_images:
        twice = sorted({src for src in shown if shown.count(src) > 1 and "_images/" in src})
        if twice:
            defects.append(f"{chapter}: a cell shows the same figure twice ({twice[0]}); end the cell with "
                           "plt.show() rather than an expression that returns the figure.")
            break
    defects += (_found(chapter, [(RAW_TABLE, "a Markdown table is shown raw in the text", 60)], visible)
                or _found(chapter, [(RAW_TABLE, "a Markdown table is shown raw in an output", 60)], outputs))
    defects += _found(chapter, [(PROGRESS, "a progress bar was saved into the page", 40)], visible + "\n" + outputs)
    if WIDGET_VIEW in html:
        defects.append(f"{chapter}: a widget view is embedded (a blank gap or empty controls without a kernel).")
    defects += _found(chapter, [(TRACEBACK, "an error or traceback is shown in an output", 60)], outputs)
    defects += _found(chapter, [(RAW_MATH, "a formula is left as raw LaTeX in the text", 40)], visible)
    defects += _found(chapter, [(EXTERNAL_ASSET, "the page loads a script or style sheet from the network", 80)], html)
    return defects


#: The content column at a 1280 px window holds this many characters of the code font (measured in
#: Chromium: a code cell's listing is 640 px wide inside its padding, a character of the 14 px
#: monospace font 8.43 px, so 75.9; printed outputs hold 76). A longer code line scrolls sideways.
#: `BROWSER_PROBE` measures it again on every page (`columnChars`); tests/test_notebook_style.py
#: holds every visible code line to it, and pyproject.toml's ruff line-length is the same number.
CODE_COLUMN_CHARS = 75

# Run in the page by the browser test: what the reader's browser made of it.
BROWSER_PROBE = r"""
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
ready.then(() => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const figures = [...document.images].filter(i => i.src.includes('_images/')).length;
  const mathSpans = [...document.querySelectorAll('.math')];
  const rawMath = mathSpans.filter(e => !e.querySelector('mjx-container') && /\\[(\[]/.test(e.textContent))
                           .map(e => e.textContent.slice(0, 40));
  // Sideways scrolling: code listings, printed outputs and any other box in the article whose content
  // is wider than the box; for each, the first line that does not fit (in the box's own font).
  const article = document.querySelector('article') || document.querySelector('main') || document.body;
  const ruler = document.createElement('canvas').getContext('2d');
  const inner = e => { const s = getComputedStyle(e);
                       return e.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight); };
  const firstWide = e => {
    ruler.font = getComputedStyle(e).font;
    const lines = (e.innerText || e.textContent || '').split('\n');
    const wide = lines.find(l => ruler.measureText(l).width > inner(e) + 1);
    return (wide === undefined ? lines.reduce((a, b) => (b.length > a.length ? b : a), '') : wide).slice(0, 120);
  };
  const scrolls = [...article.querySelectorAll('*')].filter(e => {
    if (e.scrollWidth <= e.clientWidth + 1) return false;
    const overflow = getComputedStyle(e).overflowX;
    return e.tagName === 'PRE' || overflow === 'auto' || overflow === 'scroll';
  }).filter((e, _, all) => !all.some(o => o !== e && e.contains(o)));  // the innermost box that scrolls
  const sideways = scrolls.map(e => ({tag: e.tagName.toLowerCase(), line: firstWide(e)}));
  if (document.documentElement.scrollWidth > document.documentElement.clientWidth + 1)
    sideways.push({tag: 'page', line: ''});
  // The content column in characters of the code font: a code listing's width inside its padding.
  const listing = article.querySelector('div.cell_input pre') || article.querySelector('pre');
  let columnChars = null;
  if (listing) {
    ruler.font = getComputedStyle(listing).font;
    columnChars = inner(listing) / (ruler.measureText('0'.repeat(100)).width / 100);
  }
  done({broken, figures, rawMath, math: mathSpans.length, typeset: document.querySelectorAll('mjx-container').length,
        mathjax: !!window.MathJax, text: document.body.innerText, sideways, columnChars});
}).catch(e => done({error: String(e)}));
"""


def browser_defects(chapter: str, seen: dict) -> list[str]:
    """Defects in what the browser rendered: undecoded images, untypeset formulas, raw text, sideways scrolling."""
    if "error" in seen:
        return [f"{chapter}: the page's MathJax failed in the browser ({seen['error'][:80]})."]
    defects = []
    if seen["broken"]:
        defects.append(f"{chapter}: {len(seen['broken'])} image(s) did not load, e.g. {seen['broken'][0]}.")
    if not seen["figures"]:
        defects.append(f"{chapter}: the browser shows no figure on the page.")
    if seen["math"] and not seen["mathjax"]:
        defects.append(f"{chapter}: MathJax did not load, so every formula shows as raw LaTeX.")
    elif seen["rawMath"]:
        defects.append(f"{chapter}: {len(seen['rawMath'])} formula(s) left as raw LaTeX, e.g. {seen['rawMath'][0]!r}.")
    sideways = seen.get("sideways") or []
    if sideways:
        first = next((s for s in sideways if s["line"]), sideways[0])
        defects.append(f"{chapter}: {len(sideways)} block(s) scroll sideways at a 1280 px window, e.g. a "
                       f"<{first['tag']}> with the line {first['line'][:80]!r}; keep code and printed lines "
                       f"within {CODE_COLUMN_CHARS} characters (`make format`).")
    if seen.get("columnChars") is not None and seen["columnChars"] < CODE_COLUMN_CHARS:
        defects.append(f"{chapter}: a code listing holds only {seen['columnChars']:.1f} characters at a 1280 px "
                       f"window, fewer than CODE_COLUMN_CHARS = {CODE_COLUMN_CHARS}; lower it (and ruff's line-length).")
    return defects + _found(chapter, [(RAW_TABLE, "a Markdown table is shown raw", 60),
                                      (PROGRESS, "a progress bar is visible", 40),
                                      (TRACEBACK, "an error or traceback is visible", 60)], seen["text"])
