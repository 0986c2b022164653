"""The page checks themselves: a sound page passes, and each kind of broken page fails with its sentence."""
import pytest
from pagecheck import browser_defects, html_defects

GOOD = """<html><head><script defer src="../_static/mathjax/tex-svg.js"></script></head><body>
<p>Entropy <span class="math notranslate nohighlight">\\(H(p) = -\\sum_j p_j \\ln p_j\\)</span> in nats.</p>
<div class="cell_output docutils container"><div class="output text_html"><table><tr><td>a</td></tr></table></div>
<img alt="_images/fig.png" src="../_images/fig.png" /></div>
<pre>print(x)</pre></body></html>"""

BROKEN = {
    "no figure": (GOOD.replace('<img alt="_images/fig.png" src="../_images/fig.png" />', ""), "no figure"),
    "figure twice": (GOOD.replace('<img alt="_images/fig.png" src="../_images/fig.png" />',
                                  '<img alt="_images/fig.png" src="../_images/fig.png" />' * 2), "twice"),
    "raw table": (GOOD.replace("<table><tr><td>a</td></tr></table>",
                               "<p>| backbone | cls |\n|—|—|\n| mae | 40.4 |</p>"), "Markdown table"),
    "raw table in a printed output": (GOOD.replace("<pre>print(x)</pre>", "")
                                      .replace("<table><tr><td>a</td></tr></table>",
                                               "<pre>| a | b |\n|---|---|\n| 1 | 2 |</pre>"), "Markdown table"),
    "progress bar": (GOOD.replace("<table>", "<pre>extracting tokens:  45%|####5     | 9/20 [00:03&lt;00:04, 2.71it/s]</pre><table>"),
                     "progress bar"),
    "widget gap": (GOOD.replace("<table>", '<script type="application/vnd.jupyter.widget-view+json">{}</script><table>'),
                   "widget view"),
    "traceback": (GOOD.replace("<table>", "<pre>Traceback (most recent call last):\n  File x</pre><table>"), "traceback"),
    "raw math": (GOOD.replace("in nats.", "in nats, $\\ln N$ at most."), "raw LaTeX"),
    "math from a CDN": (GOOD.replace("../_static/mathjax/tex-svg.js",
                                     "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"), "from the network"),
}


def test_a_sound_page_has_no_defect(tmp_path):
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "fig.png").write_bytes(b"\x89PNG")
    (tmp_path / "notebooks").mkdir()
    assert html_defects("04_x", GOOD, tmp_path / "notebooks" / "04_x.html") == []


def test_a_figure_missing_from_the_site_is_named(tmp_path):
    defects = html_defects("04_x", GOOD, tmp_path / "notebooks" / "04_x.html")
    assert len(defects) == 1 and "04_x" in defects[0] and "_images/fig.png" in defects[0]


@pytest.mark.parametrize("kind", BROKEN)
def test_each_broken_page_fails_with_one_sentence_naming_the_chapter(kind):
    html, words = BROKEN[kind]
    defects = html_defects("06_selective_aggregation", html)
    assert len(defects) == 1, defects
    assert defects[0].startswith("06_selective_aggregation: ") and words in defects[0]


SEEN = {"broken": [], "figures": 3, "rawMath": [], "math": 4, "typeset": 4, "mathjax": True, "text": "Results\nmae 0.7",
        "sideways": [], "columnChars": 75.9, "outputPx": 676}


@pytest.mark.parametrize("change, words", [
    ({}, None),
    ({"broken": ["file:///x/_images/a.png"]}, "did not load"),
    ({"figures": 0}, "no figure"),
    ({"mathjax": False}, "MathJax did not load"),
    ({"rawMath": ["\\(H(p)\\)"]}, "raw LaTeX"),
    ({"text": "| a | b |\n|---|---|\n| 1 | 2 |"}, "Markdown table"),
    ({"text": "| a | b | |---|---| | 1 | 2 |"}, "Markdown table"),
    ({"text": "training probes: 100%|██████████| 108/108 [00:04<00:00, 26.1it/s]"}, "progress bar"),
    ({"error": "TypeError: x"}, "MathJax failed"),
    ({"sideways": [{"tag": "pre", "line": "x = compute(" + "a" * 90}]}, "1 block(s) scroll sideways"),
    ({"sideways": [{"tag": "page", "line": ""}, {"tag": "pre", "line": "print(y)"}]}, "'print(y)'"),
    ({"columnChars": 60.2}, "holds only 60.2 characters"),
    ({"outputPx": 600}, "600 px wide"),
])
def test_browser_findings_become_sentences(change, words):
    defects = browser_defects("04_attention_uniformity", {**SEEN, **change})
    if words is None:
        assert defects == []
    else:
        assert len(defects) == 1 and words in defects[0] and defects[0].startswith("04_attention_uniformity: ")


def test_the_figure_checks_assume_the_output_column_the_browser_measures():
    from pagecheck import OUTPUT_COLUMN_PX

    from selagg_utils import viz

    assert viz.COLUMN_PX == OUTPUT_COLUMN_PX
