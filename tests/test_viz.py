"""What the book's figures and tables give a page without a kernel."""
import base64

import matplotlib.pyplot as plt
import pytest
import torch

from selagg_utils import SelaggError, attention, models, viz
from selagg_utils.pages import explorer as static_explorer
from selagg_utils.pages import figure_text


def test_table_is_escaped_html_with_one_cell_per_column():
    table = viz.Table(["model", "acc <%>"], [["mae", 0.5], ["a&b", 1]])
    html = table._repr_html_()
    assert html.count("<tr>") == 3 and html.count("<td ") == 4 and html.count("nowrap") == 4
    assert "acc &lt;%&gt;" in html and "a&amp;b" in html
    assert repr(table).splitlines()[1] == "|---|---|"


def test_table_refuses_a_row_of_the_wrong_length():
    with pytest.raises(SelaggError, match="2 cells"):
        viz.Table(["a", "b"], [[1, 2, 3]])


def test_figure_png_is_a_png_and_closes_the_figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    png = static_explorer.figure_png(fig)
    assert png.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)


def test_smallest_text_is_measured_in_pixels_as_the_page_shows_it():
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([0, 1])
    ax.set_title("tiny", fontsize=3.6)  # 3.6 pt at 100 dpi: 5 px, in a figure narrower than the column
    try:
        px, text = figure_text.smallest_text_px(fig)
        assert text == "tiny" and px == pytest.approx(5.0) and px < figure_text.MIN_TEXT_PX
        ax.set_title("tiny", fontsize=12)
        assert figure_text.smallest_text_px(fig).px > figure_text.MIN_TEXT_PX  # now the tick labels are smallest
        wide = figure_text.smallest_text_px(fig, column_px=100)  # a picture wider than the column shrinks
        assert wide.px < figure_text.MIN_TEXT_PX and wide.text != "tiny"
        ax.set_visible(False)
        assert figure_text.smallest_text_px(fig) == (float("inf"), "")  # hidden text does not count
    finally:
        plt.close(fig)


def test_hidden_axes_and_empty_labels_are_not_measured():
    fig, (left, right) = plt.subplots(1, 2, figsize=(6, 3))
    left.imshow([[0, 1], [1, 0]])
    left.axis("off")
    right.set_xticks([])
    right.set_yticks([])
    right.set_xlabel("label", fontsize=11)
    try:
        assert figure_text.smallest_text_px(fig).text == "label"
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def explorer():
    model = models.load_backbone("tiny-mae")
    images = torch.rand(2, 1, 32, 32)
    return viz.attention_explorer(images, attention.attention_maps(model, images))


def test_explorer_offers_its_current_view_as_a_picture_beside_the_widget(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == bytes(explorer.picture.value)
    assert bytes(explorer.picture.value).startswith(b"\x89PNG")
    assert "run the chapter" in bundle["text/plain"]


def test_explorer_picture_text_is_legible_on_the_page():
    model = models.load_backbone("tiny-mae")
    images = torch.rand(2, 1, 32, 32)
    maps = attention.attention_maps(model, images)
    for query in ("cls", (3, 4)):
        fig = viz.attention_explorer_figure(images, maps, query=query)
        px, text = figure_text.smallest_text_px(fig, dpi=100)  # the dpi figure_png saves at
        plt.close(fig)
        assert px >= figure_text.MIN_TEXT_PX, f"the explorer's picture shows {text!r} at {px:.1f} px on the page"


def test_explorer_redraws_its_picture_when_a_control_moves(explorer):
    before = bytes(explorer.picture.value)
    explorer.children[0].children[0].value = 1          # the image slider
    assert bytes(explorer.picture.value) != before
    assert not plt.get_fignums()                        # every drawn figure was closed


def test_explorer_bundle_carries_a_static_explorer_for_pages_without_a_kernel(explorer):
    bundle = explorer._repr_mimebundle_()
    assert bundle["text/html"] == explorer.static_html and 'type="range"' in bundle["text/html"]


def test_static_explorer_has_one_view_per_image_block_and_query_and_no_outside_script():
    import html as html_module
    import re

    model = models.load_backbone("tiny-mae")
    images = torch.rand(3, 1, 32, 32)
    maps = attention.attention_maps(model, images)
    depth = len(model.blocks)
    page = static_explorer.attention_explorer_html([viz.displayable(i) for i in images], maps, n_images=2, max_blocks=depth, size=64)
    views = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert len(views) == 2 * depth * 2                               # images x blocks x ([cls], centre patch)
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data, _ in views)
    assert page.count("display: block; max-width") == 1              # one view shown at a time
    sliders = re.findall(r'<input type="range" min="0" max="(\d+)"[^>]*data-stride="(\d+)"', page)
    assert sliders == [("1", str(2 * depth)), (str(depth - 1), "1")]  # image, block
    assert 'data-stride="' + str(depth) + '"' in page and "<select" in page   # the query
    assert "<script" not in page and "http" not in page and len(page) < 400_000
    first, later = html_module.unescape(views[0][1]), html_module.unescape(views[-1][1])
    assert first.startswith("Image 1, block 1, query [cls]") and "Image 2, block " + str(depth) in later
    few = static_explorer.attention_explorer_html([viz.displayable(i) for i in images], maps, n_images=1, max_blocks=3)
    assert few.count("<img") == 3 * 2 and re.search(rf"\(1, \d, {depth}\)", few)  # first and last included


def test_statistics_figure_draws_one_panel_per_measured_statistic_and_a_legend():
    model = models.load_backbone("tiny-jea")
    stats = attention.attention_statistics(model, [torch.rand(2, 1, 32, 32)], name="tiny-jea", progress=False)
    fig = viz.statistics_figure({"tiny-jea": stats}, ["cls_self", "cls_object_share", "patch_self"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["[cls] self-attention", "patch self-attention"]  # no masks: no object share
    assert fig.axes[2].get_legend() is not None
    plt.close(fig)


def test_statistics_table_has_a_row_per_block_and_only_measured_columns(explorer):
    model = models.load_backbone("tiny-jea")
    stats = attention.attention_statistics(model, [torch.rand(3, 1, 32, 32)], name="tiny-jea", progress=False)
    table = viz.statistics_table(stats, ["cls_self", "cls_object_share"])  # no masks: no object share
    assert table.header == ["block", "[cls] self-attention"] and len(table.rows) == len(model.blocks)
    assert table.rows[-1] == [str(len(model.blocks)), f"{stats['cls_self'][-1]:.3f}"]
    assert "<caption" in table._repr_html_() and "tiny-jea: 3 images, 64 patches" in repr(table)


def test_bench_table_in_a_notebook_leaves_out_columns_without_values(monkeypatch, capsys):
    import IPython

    from selagg_utils.bench import report as bench_report
    from selagg_utils.bench import rows as bench_rows

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(viz, "show_table", shown.append)
    rows = [bench_rows.BenchRow(step="eager", device="cpu", model="m", batch_size=8, precision="fp32", median_ms=2.0)]
    bench_report.show(rows)
    (table,) = shown
    assert table.header == ["step", "batch", "precision", "median ms"]
    assert table.rows == [["eager", "8", "fp32", "2.0"]]
    assert "device: cpu" in capsys.readouterr().out


def test_bench_table_in_a_notebook_names_a_setting_every_row_shares_once(monkeypatch, capsys):
    import IPython

    from selagg_utils.bench import report as bench_report
    from selagg_utils.bench import rows as bench_rows

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(viz, "show_table", shown.append)
    rows = [bench_rows.BenchRow(step=s, device="cpu", model="m", batch_size=64, precision=p, median_ms=ms, params=10)
            for s, p, ms in (("eager", "fp32", 2.0), ("autocast", "bf16", 1.0))]
    bench_report.show(rows)
    (table,) = shown
    assert table.header == ["step", "precision", "median ms"]
    assert "every row: batch 64, params 10" in capsys.readouterr().out
