"""Figures for the book, and `show_source` to display package code inside a notebook."""
from __future__ import annotations

import html
import inspect
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

from .checks import SelaggError

__all__ = ["show_source", "diagram", "image_grid", "outline_mask", "attention_grid", "statistic_label",
           "statistics_figure", "attention_explorer_figure", "attention_explorer", "grid_heatmaps",
           "weight_rows", "statistics_table", "glue", "show_table", "displayable"]

#: The width in CSS pixels of the page's column for a cell's output at a 1280 px window (measured in
#: Chromium): a wider picture is shrunk to it, and its text with it.
COLUMN_PX = 676


def show_source(obj) -> None:
    """Display the source code of a package function or class, highlighted, in a notebook."""
    code = inspect.getsource(obj)
    try:
        from IPython.display import Code, display

        # The book wraps these listings to its column (_static/listings.css).
        display(Code(code, language="python"))
    except ImportError:  # outside IPython
        print(code)


def diagram(name: str, *args, **options) -> plt.Figure:
    """One of the book's drawings, by name (`pages.diagrams`: vit_tokens, mae, joint_embedding,
    attention_blocks, abmilp_head, paper_vs_lab), drawn by code in one colour per kind of token."""
    from .pages import diagrams

    return getattr(diagrams, name)(*args, **options)


def image_grid(images: torch.Tensor, titles: list[str] | None = None, ncols: int = 8, size: float = 1.4,
               cmap: str = "gray", suptitle: str | None = None) -> plt.Figure:
    """A grid of (N, C, H, W) images in [0, 1] (gray with C = 1, or RGB) or (N, H, W) with optional titles."""
    imgs = images.permute(0, 2, 3, 1) if images.ndim == 4 and images.shape[1] == 3 else (
        images[:, 0] if images.ndim == 4 else images)
    n = len(imgs)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(imgs[i].detach().cpu().numpy(), cmap=cmap, vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def outline_mask(ax: plt.Axes, mask: torch.Tensor, patch_size: int, color: str = "red") -> None:
    """Draw the outline of the patches where `mask` (gh, gw) is True on an image axis."""
    m = mask.cpu().numpy().astype(bool)
    for r, c in zip(*np.nonzero(m)):
        y, x = r * patch_size - 0.5, c * patch_size - 0.5
        edges = [((x, x + patch_size), (y, y), r == 0 or not m[r - 1, c]),
                 ((x, x + patch_size), (y + patch_size, y + patch_size), r == m.shape[0] - 1 or not m[r + 1, c]),
                 ((x, x), (y, y + patch_size), c == 0 or not m[r, c - 1]),
                 ((x + patch_size, x + patch_size), (y, y + patch_size), c == m.shape[1] - 1 or not m[r, c + 1])]
        for xs, ys, draw in edges:
            if draw:
                ax.plot(xs, ys, color=color, lw=1)


# ----------------------------------------------------------------------------- attention (chapter 04)
def overlay_attention(ax: plt.Axes, image: torch.Tensor, attention: torch.Tensor, vmax: float | None = None,
                      alpha: float = 0.6, cmap: str = "inferno"):
    """Draw an image with a (gh, gw) attention map over it; returns the map's artist for a colour bar."""
    shown = displayable(image)
    h, w = shown.shape[:2]
    ax.imshow(shown, cmap="gray")
    artist = ax.imshow(attention.detach().float().cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=vmax,
                       extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def attention_grid(image: torch.Tensor, maps: torch.Tensor, title: str, size: float = 1.1,
                   block_ids: list[int] | None = None) -> plt.Figure:
    """A blocks x heads grid of (blocks, heads, gh, gw) attention maps over one image, on one colour scale."""
    blocks, heads = maps.shape[:2]
    block_ids = list(range(blocks)) if block_ids is None else block_ids
    vmax = float(maps.max())
    fig, axes = plt.subplots(blocks, heads, figsize=(size * heads + 1.3, size * blocks + 0.5), squeeze=False,
                             layout="constrained")
    for b in range(blocks):
        for h in range(heads):
            artist = overlay_attention(axes[b, h], image, maps[b, h], vmax=vmax)
            if b == 0:
                axes[b, h].set_title(f"head {h + 1}", fontsize=9)
        axes[b, 0].set_ylabel(f"block {block_ids[b] + 1}", fontsize=9)
    fig.colorbar(artist, ax=axes, shrink=0.6).set_label("attention probability", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


#: What a reader reads for each statistic of `attention.STATISTICS`: table headers, plot titles.
STATISTIC_LABELS: dict[str, str] = {
    "cls_self": "[cls] self-attention", "cls_to_patch": "[cls] attention to patches (mass)",
    "cls_patch_entropy": "[cls] attention entropy (nats)", "cls_patch_entropy_norm": "[cls] attention entropy (normalised)",
    "cls_object_share": "[cls] attention on the object (share)", "patch_self": "patch self-attention",
    "patch_to_cls": "patch attention to [cls]", "patch_to_registers": "patch attention to registers",
    "patch_patch_entropy": "patch attention entropy (nats)", "patch_patch_entropy_norm": "patch attention entropy (normalised)",
    "cls_residual_ratio": "[cls] attention-to-residual ratio", "patch_residual_ratio": "patch attention-to-residual ratio"}


def statistic_label(statistic: str) -> str:
    """The plain-English name of a statistic (its own name if it has none)."""
    return STATISTIC_LABELS.get(statistic, statistic)


def block_curves(results: dict, statistic: str, ax: plt.Axes | None = None, legend: bool = True) -> plt.Figure:
    """One statistic per block, one line per model: `results` maps a model name to its AttentionStatistics."""
    alone = ax is None
    fig, ax = plt.subplots(figsize=(5, 3.2)) if alone else (ax.figure, ax)
    for name, stats in results.items():
        if statistic in stats:
            blocks = np.arange(1, stats.depth + 1)
            ax.plot(blocks, stats[statistic], marker="o", ms=4, label=name)
            ax.set_xticks(blocks)
    if statistic.endswith("_norm"):
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="uniform")
    ax.set_ylim(bottom=0)  # every statistic is non-negative; a zero baseline keeps small gaps small
    ax.set_xlabel("block", fontsize=9)
    ax.set_title(textwrap.fill(statistic_label(statistic), 24), fontsize=9)
    ax.tick_params(labelsize=9)
    if legend:
        ax.legend(fontsize=9)
    if alone:
        fig.tight_layout()
    return fig


def statistics_figure(results: dict, statistics: list[str], ncols: int = 3, title: str | None = None) -> plt.Figure:
    """Small multiples: one panel per statistic (those measured), the models overlaid, one shared legend."""
    shown = [s for s in statistics if any(s in stats for stats in results.values())]
    nrows = -(-(len(shown) + 1) // ncols)  # one more slot, for the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.4, 2.15 * nrows + 0.3), layout="constrained", squeeze=False)
    handles: dict[str, object] = {}
    for ax, statistic in zip(axes.flat, shown):
        block_curves(results, statistic, ax=ax, legend=False)
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    axes.flat[len(shown)].legend(list(handles.values()), list(handles), loc="center", fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def attention_explorer_figure(images: torch.Tensor, maps, image: int = 0, block: int = -1, head: int | None = None,
                              query="cls") -> plt.Figure:
    """The image with its query token marked, beside the query's attention over the patches (head None: mean)."""
    layout = maps.layout
    block = block % maps.probs.shape[0]
    amap = maps.query_map(query)[block, image]
    amap = amap.mean(0) if head is None else amap[head]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.5, 3.6))
    left.imshow(displayable(images[image]), cmap="gray")
    left.set_xticks([])
    left.set_yticks([])
    index = maps.query_index(query) - layout.num_prefix_tokens
    if index >= 0:  # a patch query: outline it
        ph, pw = (s / g for s, g in zip(displayable(images[image]).shape[:2], layout.grid_size))
        r, c = divmod(index, layout.grid_size[1])
        left.add_patch(plt.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="cyan", lw=2))
    left.set_title(f"image {image}, query {query}")
    artist = overlay_attention(right, images[image], amap)
    fig.colorbar(artist, ax=right, label="attention probability")
    right.set_title(f"Block {block + 1}, {'mean of heads' if head is None else f'Head {head + 1}'}")
    return fig


def attention_explorer(images: torch.Tensor, maps):
    """An ipywidgets explorer of `AttentionMaps`: pick the image, block, head and query token.

    Its picture is `attention_explorer_figure`, redrawn on every change (`pages.explorer`); without
    a kernel (the rendered book, a viewer without widgets) it shows precomputed views and sliders.
    """
    from .pages.explorer import explorer_widget

    return explorer_widget(images, maps, attention_explorer_figure, [displayable(i) for i in images[:4]])


def grid_heatmaps(maps: dict[str, torch.Tensor], title: str, label: str, vmin: float | None = None,
                  vmax: float | None = None, size: float = 2.2) -> plt.Figure:
    """One (gh, gw) map per panel on a shared colour scale, e.g. probe accuracy per patch position; 7.4 in wide at most."""
    values = torch.stack([m.detach().float().cpu() for m in maps.values()])
    vmin = float(values.min()) if vmin is None else vmin
    vmax = float(values.max()) if vmax is None else vmax
    width = min(7.4, size * len(maps) + 1.0)
    fig, axes = plt.subplots(1, len(maps), figsize=(width, (width - 1.0) / len(maps) + 0.9), squeeze=False,
                             layout="constrained")
    for i, (ax, (name, m)) in enumerate(zip(axes[0], maps.items())):
        artist = ax.imshow(m.detach().float().cpu().numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("patch column", fontsize=9)
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.set_ylabel("patch row", fontsize=9)
    bar = fig.colorbar(artist, ax=axes, shrink=0.8)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def weight_rows(images: torch.Tensor, rows: dict[str, torch.Tensor], object_masks: torch.Tensor | None = None,
                patch_size: int | None = None, size: float = 1.1) -> plt.Figure:
    """Images in columns, one row of (B, gh, gw) patch weights per method, each row on its own colour scale."""
    n = len(images)
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n + 2.0, size * len(rows) + 0.6), squeeze=False)
    for r, (name, weights) in enumerate(rows.items()):
        vmax = float(weights.max())
        for i in range(n):
            artist = overlay_attention(axes[r, i], images[i], weights[i], vmax=vmax)
            if object_masks is not None and patch_size is not None:
                outline_mask(axes[r, i], object_masks[i], patch_size, color="cyan")
        axes[r, 0].set_ylabel(name, fontsize=11)
        bar = fig.colorbar(artist, ax=axes[r].tolist(), shrink=0.9, pad=0.02)
        bar.ax.tick_params(labelsize=11)
        bar.set_label("weight", fontsize=11)
    return fig


class Table:
    """A small table that shows as HTML in a notebook and in the book, and as Markdown text elsewhere."""

    # Inline, so that Jupyter, Colab and the book all draw the same compact table; a wide table gets
    # a smaller font, and only short cells refuse to wrap, so it fits the page where it can.
    STYLE = {"table": "border-collapse: collapse; margin: 0.4em 0",
             "th": "padding: 0.25em 0.5em; border-bottom: 1px solid #888; text-align: left; vertical-align: bottom",
             "td": "padding: 0.2em 0.5em; text-align: left"}
    SHORT = 14

    def __init__(self, header: list[str], rows: list[list], title: str | None = None):
        self.title = title
        self.header = [str(h) for h in header]
        self.rows = [[str(c) for c in row] for row in rows]
        if any(len(row) != len(self.header) for row in self.rows):
            raise SelaggError(f"Every row of a table needs {len(self.header)} cells, one per column of "
                              f"{self.header}; pad short rows (e.g. with '-').")

    def _repr_html_(self) -> str:
        narrow = "; padding-left: 0.25em; padding-right: 0.25em" if len(self.header) > 8 else ""

        def cell(tag: str, text: str) -> str:  # long names may break after "_" or "/"
            keep = "; white-space: nowrap" if tag == "td" and len(text) <= self.SHORT else ""
            text = html.escape(text).replace("_", "_<wbr>").replace("/", "/<wbr>")
            return f'<{tag} style="{self.STYLE[tag]}{keep}{narrow}">{text}</{tag}>'

        def row(tag: str, cells: list[str]) -> str:
            return "<tr>" + "".join(cell(tag, c) for c in cells) + "</tr>"

        size = "0.92em" if len(self.header) <= 8 else "0.8em"
        caption = f'<caption style="text-align: left">{html.escape(self.title)}</caption>' if self.title else ""
        return (f'<table class="selagg-table" style="{self.STYLE["table"]}; font-size: {size}">{caption}'
                f'<thead>{row("th", self.header)}</thead><tbody>{"".join(row("td", r) for r in self.rows)}</tbody>'
                "</table>")

    def _repr_markdown_(self) -> str:
        return (f"{self.title}\n\n" if self.title else "") + markdown_table(self.header, self.rows)

    __repr__ = _repr_markdown_


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table as text."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def statistics_table(stats, statistics: list[str], digits: int = 3) -> Table:
    """One model's attention statistics (an AttentionStatistics) as a Table: a row per block, a column per statistic.

    Columns carry the statistics' plain-English labels (`STATISTIC_LABELS`).
    """
    names = [s for s in statistics if s in stats]
    rows = [[b + 1, *(f"{stats[s][b]:.{digits}f}" for s in names)] for b in range(stats.depth)]
    return Table(["block", *map(statistic_label, names)], rows, title=f"{stats.name}: {stats.n_images} images, "
                                                f"{stats.layout.num_patches} patches")


def glue(name: str, text: str | plt.Figure) -> str | plt.Figure:
    """Store `text` (or a figure) under `name` for the book's pages ({glue:text}, {glue:figure} there); returns it.
    A no-op without myst-nb (Colab)."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return text
    myst_glue(name, text, display=False)
    return text


def show_table(header: list[str] | Table, rows: list[list] | None = None) -> None:
    """Display a table: HTML in a notebook and in the rendered book, Markdown text outside IPython."""
    table = header if isinstance(header, Table) else Table(header, rows)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # no IPython: Markdown text
        print(table)
        return
    (display if get_ipython() is not None else print)(table)


def displayable(image: torch.Tensor) -> np.ndarray:
    """An image tensor (C, H, W) in [0, 1] as an array imshow can draw: (H, W) gray or (H, W, 3), clamped.

    Normalised model inputs must be de-normalised first (`transforms.displayable`); stretching each image
    to its own minimum and maximum would change its colours and contrast.
    """
    img = image.detach().float().cpu().clamp(0, 1)
    if img.ndim == 3 and img.shape[0] == 1:
        return img[0].numpy()
    return (img.permute(1, 2, 0) if img.ndim == 3 else img).numpy()
