"""The book's diagrams, drawn by code: tokens of a ViT, MAE, the two-view setup, attention blocks, AbMILP."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

__all__ = ["COLOURS", "vit_tokens", "mae", "joint_embedding", "attention_blocks", "abmilp_head", "PAPER_HEADLINE", "headline_chart", "paper_vs_lab", "ALL"]

# One colour per kind of token, the same in every diagram (Okabe-Ito, readable with colour blindness).
COLOURS = {
    "cls": "#E69F00",       # [cls]
    "register": "#CC79A7",  # register tokens
    "patch": "#56B4E9",     # patch tokens and visible patches
    "hidden": "#BBBBBB",    # hidden (masked) patches
    "module": "#F2F2F2",    # a network module (encoder, decoder, head)
    "loss": "#D55E00",      # a loss or an objective
    "weight": "#009E73",    # pooling weights
}

# Text sizes in points. Diagrams are about 9 to 11 inches wide and shown scaled to the page
# column (about 700 px), so SMALL is the least that stays 9 px or more on the page.
SMALL, BODY, TITLE = 10.5, 11.5, 13

# A 4 x 4 digit-like picture (1 = ink) that stands for "an image" in the diagrams.
_PICTURE = [[0, 1, 1, 0],
            [0, 0, 1, 0],
            [0, 1, 0, 0],
            [0, 1, 1, 1]]


def _canvas(width: float, height: float, title: str) -> tuple[plt.Figure, Axes]:
    """A blank figure whose data units are inches, with a title and no axes."""
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=TITLE)
    return fig, ax


def _token(ax: Axes, x: float, y: float, kind: str, label: str = "", w: float = 0.42, h: float = 0.42) -> None:
    """One token as a coloured square with its symbol inside."""
    ax.add_patch(Rectangle((x, y), w, h, facecolor=COLOURS[kind], edgecolor="black", lw=0.8))
    if label:
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=SMALL)


def _box(ax: Axes, x: float, y: float, w: float, h: float, label: str, kind: str = "module") -> None:
    """A rounded box for a module or a loss, its name centred inside."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", facecolor=COLOURS[kind],
                                edgecolor="black", lw=1))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=BODY)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
           style: str = "-|>", colour: str = "black") -> None:
    """An arrow from start to end, with an optional label above its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=1.2))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", va="bottom",
                fontsize=SMALL)


def _picture(ax: Axes, x: float, y: float, size: float, hidden: set[int] = frozenset(),
             kind: str = "patch") -> None:
    """The 4 x 4 picture cut into patches; hidden patches are grey, numbered in row-major order."""
    cell = size / 4
    for r in range(4):
        for c in range(4):
            i = 4 * r + c
            ink = _PICTURE[r][c]
            face = COLOURS["hidden"] if i in hidden else ("#333333" if ink else COLOURS[kind])
            ax.add_patch(Rectangle((x + c * cell, y + (3 - r) * cell), cell, cell, facecolor=face,
                                   edgecolor="white", lw=1.2))


def vit_tokens(registers: int = 2) -> plt.Figure:
    """Image -> patch grid -> patch tokens, [cls] and registers in front: the T = N + R + 1 tokens."""
    fig, ax = _canvas(11, 3.4, "A ViT's token sequence")
    _picture(ax, 0.3, 0.9, 1.6)
    ax.text(1.1, 0.7, "image cut into a\n$g_h \\times g_w$ grid\nof $N$ patches", ha="center", va="top",
            fontsize=SMALL)
    _arrow(ax, (2.05, 1.7), (2.95, 1.7), "flatten")
    x = 3.05
    for i, label in enumerate(["1", "2", "…", "N"]):
        ax.add_patch(Rectangle((x + 0.5 * i, 1.2), 0.42, 1.0, facecolor="white", edgecolor="black", lw=0.8))
        ax.text(x + 0.5 * i + 0.21, 1.7, label, ha="center", va="center", fontsize=SMALL)
    ax.text(x + 0.96, 0.95, "$N$ patches,\n$P$ values each", ha="center", va="top", fontsize=SMALL)
    _arrow(ax, (5.15, 1.7), (6.45, 1.7), "linear map\n+ position")
    x, step = 6.55, 0.6
    tokens = [("cls", "[cls]")] + [("register", f"$r_{k + 1}$") for k in range(registers)]
    tokens += [("patch", "$h_1$"), ("patch", "$h_2$"), ("patch", "…"), ("patch", "$h_N$")]
    for i, (kind, label) in enumerate(tokens):
        _token(ax, x + step * i, 1.2, kind, label, w=0.54, h=1.0)
    end = x + step * len(tokens) - 0.06
    prefix_end = x + step * (1 + registers) - 0.06
    ax.annotate("", (x, 2.4), (prefix_end, 2.4), arrowprops=dict(arrowstyle="|-|", lw=0.8))
    ax.text((x + prefix_end) / 2, 2.5, f"prefix: [cls]\n+ $R$ = {registers} registers", ha="center",
            va="bottom", fontsize=SMALL)
    ax.annotate("", (prefix_end + 0.06, 2.4), (end, 2.4), arrowprops=dict(arrowstyle="|-|", lw=0.8))
    ax.text((prefix_end + end) / 2, 2.5, "$N$ patch tokens", ha="center", va="bottom", fontsize=SMALL)
    ax.text((x + end) / 2, 0.95, "$T = N + R + 1$ tokens\nof width $D$", ha="center", va="top",
            fontsize=BODY)
    return fig


def mae(hidden: frozenset[int] = frozenset({0, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15})) -> plt.Figure:
    """MAE: the encoder sees the visible patches only, the decoder fills in the hidden ones, loss on those."""
    fig, ax = _canvas(12, 3.9, "Masked autoencoder (MAE)")
    _picture(ax, 0.3, 1.0, 1.6, hidden=set(hidden))
    ax.text(1.1, 0.8, "hidden patches\n(grey) are dropped", ha="center", va="top", fontsize=SMALL)
    visible = [i for i in range(16) if i not in hidden]
    _arrow(ax, (2.05, 1.8), (2.45, 1.8))
    x, step = 2.55, 0.52
    _token(ax, x, 1.2, "cls", "[cls]", w=0.48, h=1.2)
    for k, i in enumerate(visible):
        _token(ax, x + step * (k + 1), 1.2, "patch", f"$h_{{{i + 1}}}$", w=0.46, h=1.2)
    strip_end = x + step * (len(visible) + 1)
    ax.text((x + strip_end) / 2, 2.6, "[cls] is carried\nalong; no loss\nreads it", ha="center",
            va="bottom", fontsize=SMALL)
    enc = strip_end + 0.4
    _arrow(ax, (strip_end, 1.8), (enc - 0.05, 1.8))
    _box(ax, enc, 1.2, 1.6, 1.2, "encoder\n(ViT, visible\ntokens only)")
    dec = enc + 2.1
    _arrow(ax, (enc + 1.65, 1.8), (dec - 0.05, 1.8))
    _box(ax, dec, 1.2, 2.0, 1.2, "decoder\n(+ one mask\ntoken per\nhidden patch)")
    _token(ax, dec + 0.25, 2.75, "hidden", "[M]", w=0.5, h=0.4)
    _arrow(ax, (dec + 0.5, 2.73), (dec + 0.5, 2.45))
    out = dec + 2.5
    _arrow(ax, (dec + 2.05, 1.8), (out - 0.05, 1.8))
    _picture(ax, out, 1.0, 1.6)
    ax.text(out + 0.8, 0.8, "every patch\npredicted", ha="center", va="top", fontsize=SMALL)
    _box(ax, out - 1.45, 3.0, 3.1, 0.45, "loss on hidden patches only", kind="loss")
    return fig


def joint_embedding() -> plt.Figure:
    """The two-view joint-embedding setup: two augmented views, one encoder each, [cls] embeddings pulled together."""
    fig, ax = _canvas(11, 3.8, "Joint-embedding architecture (JEA): two views, one summary")
    _picture(ax, 0.3, 1.2, 1.4)
    ax.text(1.0, 1.0, "image", ha="center", va="top", fontsize=SMALL)
    for y, name, enc in ((2.45, "view 1", "encoder\n(student)"), (0.35, "view 2", "encoder\n(teacher or\nshared weights)")):
        _arrow(ax, (1.8, 1.9), (2.8, y + 0.5), "augment" if y > 1 else "")
        ax.add_patch(Rectangle((2.9, y), 1.0, 1.0, facecolor=COLOURS["patch"], edgecolor="black", lw=0.8,
                               hatch="//" if y > 1 else ".."))
        ax.text(3.4, y - 0.05, name, ha="center", va="top", fontsize=SMALL)
        _arrow(ax, (4.0, y + 0.5), (4.6, y + 0.5))
        _box(ax, 4.6, y, 1.75, 1.0, enc)
        _arrow(ax, (6.45, y + 0.5), (6.95, y + 0.5))
        _token(ax, 7.0, y + 0.25, "cls", "[cls]", w=0.62, h=0.5)
        _arrow(ax, (7.67, y + 0.5), (8.15, y + 0.5))
        ax.text(7.9, y + 0.85, "project", ha="center", va="bottom", fontsize=SMALL)
        _token(ax, 8.2, y + 0.25, "cls", "$z_1$" if y > 1 else "$z_2$", w=0.5, h=0.5)
    _arrow(ax, (8.45, 2.65), (8.45, 1.35), style="<|-|>", colour=COLOURS["loss"])
    _box(ax, 8.95, 1.45, 1.9, 1.0, "pull together\n(other images:\npush apart)", kind="loss")
    ax.text(5.45, 1.85, "patch tokens: no loss on them", ha="center", va="center", fontsize=SMALL, style="italic")
    return fig


def attention_blocks(num_patches: int = 6, registers: int = 1) -> plt.Figure:
    """One head's T x T attention matrix A split into [cls] row and column, register rows/columns, patch-patch block."""
    fig, ax = _canvas(8.5, 5.9, "The blocks of one head's attention matrix $A$ ($T \\times T$)")
    T = 1 + registers + num_patches
    cell, x0, y0 = 0.5, 2.0, 0.9
    kinds = ["cls"] + ["register"] * registers + ["patch"] * num_patches

    def corner(row: int, col: int) -> tuple[float, float]:
        return x0 + col * cell, y0 + (T - 1 - row) * cell

    for r in range(T):
        for c in range(T):
            row_kind, col_kind = kinds[r], kinds[c]
            kind = row_kind if row_kind != "patch" else col_kind
            alpha = 0.9 if "cls" in (row_kind, col_kind) else (0.7 if kind == "register" else 0.35)
            ax.add_patch(Rectangle(corner(r, c), cell, cell, facecolor=COLOURS[kind], alpha=alpha,
                                   edgecolor="white", lw=1))
    labels = ["[cls]"] + [f"$r_{k + 1}$" for k in range(registers)] + [f"{i + 1}" for i in range(num_patches)]
    labels[-2] = "…"
    labels[-1] = "$N$"
    for i, label in enumerate(labels):
        ax.text(x0 - 0.1, corner(i, 0)[1] + cell / 2, label, ha="right", va="center", fontsize=SMALL)
        ax.text(corner(0, i)[0] + cell / 2, y0 + T * cell + 0.1, label, ha="center", va="bottom", fontsize=SMALL)
    ax.text(x0 + T * cell / 2, y0 + T * cell + 0.45, "key $j$ (whom the token attends to)", ha="center",
            fontsize=BODY)
    ax.text(x0 - 0.75, y0 + T * cell / 2, "query $i$ (the token that attends)", rotation=90, ha="center",
            va="center", fontsize=BODY)
    right = x0 + T * cell + 0.3
    ax.add_patch(Rectangle(corner(T - 1, 1 + registers), num_patches * cell, num_patches * cell, fill=False,
                           edgecolor="black", lw=1.6))
    notes = [(0, "[cls] row: what [cls] reads\n(its self-attention, then [cls]→patch)"),
             (registers, "register rows: what registers read"),
             (T - num_patches // 2 - 1, "patch–patch block ($N \\times N$,\noutlined): patches reading patches")]
    for row, text in notes:
        ax.text(right, corner(row, 0)[1] + cell / 2, text, ha="left", va="center", fontsize=SMALL)
    bottom = y0 - 0.15
    ax.text(x0 + cell / 2, bottom, "[cls] column:\npatch→[cls]", ha="right", va="top", fontsize=SMALL)
    ax.text(x0 + (1 + registers / 2) * cell, bottom, "register\ncolumns", ha="left", va="top", fontsize=SMALL)
    ax.text(x0 + (1 + registers + num_patches / 2) * cell, bottom, "every row sums to 1", ha="left",
            va="top", fontsize=SMALL, style="italic")
    return fig


def abmilp_head(num_patches: int = 5) -> plt.Figure:
    """AbMILP: patch tokens -> one score each -> softmax weights -> weighted sum -> linear classifier."""
    fig, ax = _canvas(11, 3.9, "The AbMILP head over frozen patch tokens")
    weights = [0.05, 0.1, 0.6, 0.2, 0.05][:num_patches]
    labels = [f"$h_{i + 1}$" for i in range(num_patches)]
    labels[-1] = "$h_N$"
    y_rows = [0.4 + 0.62 * (num_patches - 1 - i) for i in range(num_patches)]
    ax.text(0.55, y_rows[0] + 0.65, "patch tokens\n([cls] unused)", ha="center", va="bottom", fontsize=SMALL)
    for i, y in enumerate(y_rows):
        _token(ax, 0.3, y, "patch", labels[i], w=0.5, h=0.45)
        _arrow(ax, (0.85, y + 0.22), (1.55, y + 0.22))
    _box(ax, 1.6, y_rows[-1], 1.4, y_rows[0] + 0.45 - y_rows[-1], "scorer\nLinear($D$, 1)\n$s_i = v^\\top h_i + b$")
    _arrow(ax, (3.1, 1.8), (3.6, 1.8))
    _box(ax, 3.7, 1.35, 1.1, 0.9, "softmax\nover $i$")
    _arrow(ax, (4.9, 1.8), (5.3, 1.8))
    for i, (y, w) in enumerate(zip(y_rows, weights)):
        ax.add_patch(Rectangle((5.75, y + 0.05), 1.0 * w / max(weights), 0.35, facecolor=COLOURS["weight"],
                               edgecolor="black", lw=0.6))
        ax.text(5.7, y + 0.22, f"$w_{{{labels[i][3:-1]}}}$", ha="right", va="center", fontsize=SMALL)
    ax.text(6.35, y_rows[0] + 0.65, "weights, sum to 1", ha="center", va="bottom", fontsize=SMALL)
    _arrow(ax, (6.95, 1.8), (7.2, 1.8))
    _box(ax, 7.25, 1.35, 1.5, 0.9, "weighted sum\n$z = \\sum_i w_i h_i$")
    _arrow(ax, (8.82, 1.8), (9.08, 1.8))
    _box(ax, 9.15, 1.35, 1.75, 0.9, "linear classifier\n$D \\to C$ classes")
    ax.text(8.0, 1.0, "$z$ has width $D$", ha="center", va="top", fontsize=SMALL)
    return fig


# The paper's headline as the book quotes it: MAE ViT-B/16, ImageNet-1k linear probing, top-1 %.
# 67.8 is the [cls] probe of MAE's PyTorch re-implementation as quoted by Beyond [cls]; 71.6 is
# Beyond [cls]'s own AbMILP result.
PAPER_HEADLINE = {"[cls] token": 67.8, "selective aggregation\n(AbMILP on patch tokens)": 71.6}


def headline_chart() -> plt.Figure:
    """The paper's headline as a bar chart: MAE's linear probe with [cls] and with selective aggregation."""
    fig, ax = plt.subplots(figsize=(7.2, 3.2))
    (cls_name, cls_value), (agg_name, agg_value) = PAPER_HEADLINE.items()
    rows = [2, 1]  # top to bottom: [cls], then selective aggregation; row 0 holds the JEA note
    ax.barh(rows, [cls_value, agg_value], color=[COLOURS["cls"], COLOURS["weight"]], edgecolor="black",
            height=0.6)
    ax.text(cls_value + 1, rows[0], f"{cls_value:.1f} %", va="center", fontsize=BODY)
    ax.text(agg_value + 1, rows[1], f"{agg_value:.1f} %  (+{agg_value - cls_value:.1f} points)",
            va="center", fontsize=BODY, color="black")
    ax.text(1, 0, "almost unchanged by selective aggregation", va="center", fontsize=BODY,
            style="italic")
    ax.set_yticks([2, 1, 0], [f"MAE: {cls_name}", f"MAE: {agg_name}",
                              "joint-embedding models\n(DINO, iBOT, MoCo v3)"], fontsize=SMALL)
    ax.set_xlim(0, 100)
    ax.set_ylim(-0.5, 2.5)
    ax.set_xlabel("ImageNet-1k top-1 accuracy of a linear probe (%)", fontsize=BODY)
    ax.tick_params(axis="x", labelsize=SMALL)
    ax.set_title("The paper's headline: ViT-B/16, frozen features", fontsize=TITLE)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def paper_vs_lab(lab: dict[str, tuple[float, float]], title: str) -> plt.Figure:
    """Grouped bars of [cls] probe and AbMILP accuracy: the paper's MAE first, then the lab's models (fractions)."""
    cls_value, agg_value = PAPER_HEADLINE.values()
    accuracies = {"the paper:\nMAE ViT-B/16,\nImageNet-1k": (cls_value / 100, agg_value / 100), **lab}
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = range(len(accuracies))
    for k, (name, color) in enumerate((("[cls] probe", "tab:gray"), ("AbMILP", "tab:orange"))):
        values = [100 * pair[k] for pair in accuracies.values()]
        bars = ax.bar([i + (k - 0.5) * 0.38 for i in x], values, 0.38, label=name, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=10, padding=2)
    ax.set_xticks(x, list(accuracies), fontsize=10)
    ax.set_ylabel("test accuracy (%)", fontsize=11)
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.tick_params(axis="y", labelsize=10)
    ax.axvline(0.5, color="k", ls=":", lw=1)  # the paper's model first, then the lab's
    ax.set_title(title, fontsize=12)
    ax.legend(fontsize=10, loc="upper right", ncols=2)
    fig.tight_layout()
    return fig


# Every diagram by the name the chapters and tests use.
ALL = {"vit_tokens": vit_tokens, "mae": mae, "joint_embedding": joint_embedding,
       "attention_blocks": attention_blocks, "abmilp_head": abmilp_head}
