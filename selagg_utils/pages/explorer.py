"""The attention explorer for pages without a kernel: precomputed views, sliders and a line of inline script.

A static page (the rendered book) cannot redraw a figure; it can swap pictures. `attention_explorer_html`
draws every view once, small, and returns one HTML snippet with the controls that pick among them.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["attention_explorer_html", "figure_png", "PictureBox", "explorer_widget"]


def _rgb(picture: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] as (H, W, 3) float."""
    return np.repeat(picture[..., None], 3, axis=-1) if picture.ndim == 2 else picture[..., :3]


def _explorer_view(picture: np.ndarray, amap: np.ndarray, box: tuple[int, int] | None, grid: tuple[int, int],
                   size: int) -> tuple[bytes, str]:
    """One precomputed view: the image (query patch outlined) beside the attention over it, as PNG or JPEG."""
    from PIL import Image

    rgb = (_rgb(picture) * 255).round().astype(np.uint8)
    h, w = rgb.shape[:2]
    width = max(1, round(size * w / h))
    scale_up = h <= size
    resample = Image.NEAREST if scale_up else Image.BILINEAR
    base = np.asarray(Image.fromarray(rgb).resize((width, size), resample)).astype(float) / 255
    heat = plt.get_cmap("inferno")(amap / max(float(amap.max()), 1e-12))[..., :3]
    heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((width, size), Image.NEAREST)) / 255
    left = base.copy()
    if box is not None:  # outline the query patch in cyan, 2 px
        r, c = box
        y0, y1 = round(r * size / grid[0]), round((r + 1) * size / grid[0]) - 1
        x0, x1 = round(c * width / grid[1]), round((c + 1) * width / grid[1]) - 1
        for ys, xs in ((slice(y0, y0 + 2), slice(x0, x1 + 1)), (slice(y1 - 1, y1 + 1), slice(x0, x1 + 1)),
                       (slice(y0, y1 + 1), slice(x0, x0 + 2)), (slice(y0, y1 + 1), slice(x1 - 1, x1 + 1))):
            left[ys, xs] = (0.0, 1.0, 1.0)
    right = 0.4 * base + 0.6 * heat  # the same blend as overlay_attention
    gap = np.ones((size, 8, 3))
    both = (np.concatenate([left, gap, right], axis=1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    gray = picture.ndim == 2 or h <= 64  # small lab images compress best losslessly; photographs as JPEG
    Image.fromarray(both).save(buffer, format="PNG" if gray else "JPEG", optimize=True, quality=85)
    return buffer.getvalue(), ("image/png" if gray else "image/jpeg")


#: Inline script of the static explorer: the controls set the index of the one view shown.
_EXPLORER_JS = ("const v=this.querySelectorAll('img');let k=0;"
                "this.querySelectorAll('[data-stride]').forEach(e=>{k+=e.value*e.dataset.stride;});"
                "v.forEach((m,i)=>{m.style.display=i==k?'block':'none';});"
                "this.querySelector('output').textContent=v[k].alt;")


def attention_explorer_html(pictures: list[np.ndarray], maps, n_images: int = 4, max_blocks: int = 6,
                            size: int = 192) -> str:
    """The explorer without a kernel: precomputed views (mean over heads) and sliders, as one HTML snippet.

    `pictures` are the images as `viz.displayable` draws them. Views: the first `n_images` images x up to `max_blocks` blocks (evenly spaced, the last included) x
    two queries ([cls] where the model has one, and the centre patch). A few lines of inline JavaScript
    show the view the controls pick; there is no script file, no network and no kernel.
    """
    layout = maps.layout
    depth = maps.probs.shape[0]
    n_images = min(n_images, maps.probs.shape[1], len(pictures))
    blocks = list(range(depth)) if depth <= max_blocks else sorted(
        {round(i * (depth - 1) / (max_blocks - 1)) for i in range(max_blocks)})
    centre = tuple(g // 2 for g in layout.grid_size)
    queries = ([("cls", "[cls]")] if layout.has_cls else []) + [(centre, f"the centre patch {centre}")]
    views = []
    for image in range(n_images):
        picture = pictures[image]
        for qi, (query, query_name) in enumerate(queries):
            amaps = maps.query_map(query)[:, image].float().mean(1).cpu().numpy()  # (blocks, gh, gw)
            for block in blocks:
                data, mime = _explorer_view(picture, amaps[block], None if query == "cls" else query,
                                            layout.grid_size, size)
                alt = (f"Image {image + 1}, block {block + 1}, query {query_name}: left the image, right where "
                       f"the query looks (mean of heads; brightest = {amaps[block].max():.3f}, "
                       f"1/N = {1 / layout.num_patches:.3f})")
                views.append((base64.b64encode(data).decode("ascii"), mime, alt))
    label = "display: block; margin: 0.2em 0"
    controls = [("image", n_images, len(queries) * len(blocks), [str(i + 1) for i in range(n_images)]),
                ("block", len(blocks), 1, [str(b + 1) for b in blocks])]
    parts = []
    for name, count, stride, ticks in controls:
        parts.append(f'<label style="{label}">{name} <input type="range" min="0" max="{count - 1}" value="0" '
                     f'step="1" data-stride="{stride}" data-axis="{name}" style="vertical-align: middle; '
                     f'width: 12em"> <small>({", ".join(ticks)})</small></label>')
    if len(queries) > 1:
        options = "".join(f'<option value="{i}">{html.escape(q)}</option>' for i, (_, q) in enumerate(queries))
        parts.append(f'<label style="{label}">query <select data-stride="{len(blocks)}" data-axis="query">'
                     f"{options}</select></label>")
    pictures = "".join(f'<img src="data:{mime};base64,{data}" alt="{html.escape(alt)}" '
                       f'style="display: {"block" if i == 0 else "none"}; max-width: 100%; margin: 0.3em 0">'
                       for i, (data, mime, alt) in enumerate(views))
    js = html.escape(_EXPLORER_JS)
    return (f'<div class="selagg-explorer" oninput="{js}" onchange="{js}" '
            f'style="border: 1px solid #ccc; padding: 0.5em 0.8em; margin: 0.5em 0">'
            f'{"".join(parts)}<output style="display: block; font-size: 0.9em">{html.escape(views[0][2])}</output>'
            f"{pictures}</div>")


def figure_png(fig: plt.Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; the figure is closed, so a notebook does not also show it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()



class PictureBox(widgets.VBox):
    """A VBox that also offers static views: HTML (`static_html`, if given) and its picture (image/png)."""

    def __init__(self, children: list, picture: widgets.Image, static_html: str = ""):
        super().__init__(children)
        self.picture = picture
        self.static_html = static_html

    def _repr_mimebundle_(self, **kwargs) -> dict:
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["image/png"] = base64.b64encode(bytes(self.picture.value)).decode("ascii")
        if self.static_html:
            bundle["text/html"] = self.static_html
        bundle["text/plain"] = "An interactive explorer: run the chapter in Jupyter or Colab to use its controls."
        return bundle


def explorer_widget(images: torch.Tensor, maps, draw: Callable[..., plt.Figure], pictures: list[np.ndarray]):
    """`viz.attention_explorer`'s widget: sliders and menus that redraw `draw(images, maps, image, block, head,
    query)`, and, for a page without a kernel, the precomputed views of `pictures` (`attention_explorer_html`)."""
    blocks, n_images, heads = maps.probs.shape[:3]
    queries = list(maps.layout.prefix_names) + [(r, c) for r in range(maps.layout.grid_size[0])
                                                 for c in range(maps.layout.grid_size[1])]
    controls = {"image": widgets.IntSlider(0, 0, n_images - 1, description="image"),
                "block": widgets.IntSlider(blocks, 1, blocks, description="block"),
                "head": widgets.Dropdown(options=["mean", *range(1, heads + 1)], description="head"),
                "query": widgets.Dropdown(options=[(str(q), q) for q in queries], description="query")}
    picture = widgets.Image(format="png")

    def redraw(_=None) -> None:
        c = {name: control.value for name, control in controls.items()}
        picture.value = figure_png(draw(images, maps, c["image"], c["block"] - 1,
                                        None if c["head"] == "mean" else c["head"] - 1, c["query"]))

    for control in controls.values():
        control.observe(redraw, "value")
    redraw()
    return PictureBox([widgets.HBox(list(controls.values())[:2]), widgets.HBox(list(controls.values())[2:]),
                       picture], picture, attention_explorer_html(pictures, maps))
