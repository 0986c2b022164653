"""The book's diagrams, drawn by code: tokens of a ViT, MAE, the two-view setup, attention blocks, AbMILP."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

__all__ = ["COLOURS", "vit_tokens", "mae", "joint_embedding", "attention_blocks", "abmilp_head", "ALL"]

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
    ax.set_title(title, fontsize=11)
    return fig, ax


def _token(ax: Axes, x: float, y: float, kind: str, label: str = "", w: float = 0.42, h: float = 0.42) -> None:
    """One token as a coloured square with its symbol inside."""
    ax.add_patch(Rectangle((x, y), w, h, facecolor=COLOURS[kind], edgecolor="black", lw=0.8))
    if label:
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=8)


def _box(ax: Axes, x: float, y: float, w: float, h: float, label: str, kind: str = "module") -> None:
    """A rounded box for a module or a loss, its name centred inside."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", facecolor=COLOURS[kind],
                                edgecolor="black", lw=1))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
           style: str = "-|>", colour: str = "black") -> None:
    """An arrow from start to end, with an optional label above its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=1.2))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", va="bottom",
                fontsize=8)


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
    _picture(ax, 0.3, 0.8, 1.8)
    ax.text(1.2, 0.45, "image cut into a\n$g_h \\times g_w$ grid of $N$ patches", ha="center", va="top", fontsize=8)
    _arrow(ax, (2.3, 1.7), (3.5, 1.7), "flatten: $P$ values\nper patch")
    x = 3.7
    for i, label in enumerate(["1", "2", "…", "N"]):
        ax.add_patch(Rectangle((x + 0.5 * i, 1.2), 0.42, 1.0, facecolor="white", edgecolor="black", lw=0.8))
        ax.text(x + 0.5 * i + 0.21, 1.7, label, ha="center", va="center", fontsize=8)
    ax.text(x + 0.96, 0.95, "$N$ patches, $P$ values each", ha="center", va="top", fontsize=8)
    _arrow(ax, (5.8, 1.7), (6.9, 1.7), "linear map $P \\to D$\n+ position")
    x = 7.05
    tokens = [("cls", "[cls]")] + [("register", f"$r_{k + 1}$") for k in range(registers)]
    tokens += [("patch", "$h_1$"), ("patch", "$h_2$"), ("patch", "…"), ("patch", "$h_N$")]
    for i, (kind, label) in enumerate(tokens):
        _token(ax, x + 0.5 * i, 1.2, kind, label, h=1.0)
    end = x + 0.5 * len(tokens) - 0.08
    prefix_end = x + 0.5 * (1 + registers) - 0.08
    ax.annotate("", (x, 2.4), (prefix_end, 2.4), arrowprops=dict(arrowstyle="|-|", lw=0.8))
    ax.text((x + prefix_end) / 2, 2.5, f"prefix: [cls] + $R$ = {registers}\nregisters", ha="center",
            va="bottom", fontsize=8)
    ax.annotate("", (prefix_end + 0.08, 2.4), (end, 2.4), arrowprops=dict(arrowstyle="|-|", lw=0.8))
    ax.text((prefix_end + end) / 2, 2.5, "$N$ patch tokens", ha="center", va="bottom", fontsize=8)
    ax.text((x + end) / 2, 0.95, "$T = N + R + 1$ tokens of width $D$", ha="center", va="top", fontsize=9)
    return fig


def mae(hidden: frozenset[int] = frozenset({0, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15})) -> plt.Figure:
    """MAE: the encoder sees the visible patches only, the decoder fills in the hidden ones, loss on those."""
    fig, ax = _canvas(12.8, 3.7, "Masked autoencoder (MAE)")
    _picture(ax, 0.3, 0.9, 1.8, hidden=set(hidden))
    ax.text(1.2, 0.55, "hidden patches (grey)\nare dropped", ha="center", va="top", fontsize=8)
    visible = [i for i in range(16) if i not in hidden]
    _arrow(ax, (2.3, 1.8), (3.0, 1.8))
    x = 3.1
    _token(ax, x, 1.2, "cls", "[cls]", h=1.2)
    for k, i in enumerate(visible):
        _token(ax, x + 0.5 * (k + 1), 1.2, "patch", f"$h_{{{i + 1}}}$", h=1.2)
    ax.text(x + 0.5 * (len(visible) + 1) / 2, 2.65, "[cls] is carried along;\nno loss reads it",
            ha="center", va="bottom", fontsize=8)
    enc_x = x + 0.5 * (len(visible) + 1) + 0.15
    _arrow(ax, (enc_x - 0.1, 1.8), (enc_x + 0.3, 1.8))
    _box(ax, enc_x + 0.35, 1.2, 1.4, 1.2, "encoder\n(ViT, visible\ntokens only)")
    _arrow(ax, (enc_x + 1.85, 1.8), (enc_x + 2.35, 1.8))
    _box(ax, enc_x + 2.45, 1.2, 1.9, 1.2, "decoder\n(+ one mask token\nper hidden patch)")
    _token(ax, enc_x + 3.2, 2.75, "hidden", "[M]", w=0.4, h=0.4)
    _arrow(ax, (enc_x + 3.4, 2.73), (enc_x + 3.4, 2.45))
    _arrow(ax, (enc_x + 4.45, 1.8), (enc_x + 4.85, 1.8))
    _picture(ax, enc_x + 4.95, 1.0, 1.6)
    ax.text(enc_x + 5.75, 0.75, "every patch\npredicted", ha="center", va="top", fontsize=8)
    _box(ax, enc_x + 4.45, 2.85, 2.6, 0.45, "loss on hidden patches only", kind="loss")
    return fig


def joint_embedding() -> plt.Figure:
    """The two-view joint-embedding setup: two augmented views, one encoder each, [cls] embeddings pulled together."""
    fig, ax = _canvas(11, 3.8, "Joint-embedding architecture (JEA): two views, one summary")
    _picture(ax, 0.3, 1.2, 1.4)
    ax.text(1.0, 1.0, "image", ha="center", va="top", fontsize=8)
    for y, name, enc in ((2.45, "view 1", "encoder\n(student)"), (0.35, "view 2", "encoder\n(teacher or\nshared weights)")):
        _arrow(ax, (1.8, 1.9), (2.8, y + 0.5), "augment" if y > 1 else "")
        ax.add_patch(Rectangle((2.9, y), 1.0, 1.0, facecolor=COLOURS["patch"], edgecolor="black", lw=0.8,
                               hatch="//" if y > 1 else ".."))
        ax.text(3.4, y - 0.05, name, ha="center", va="top", fontsize=8)
        _arrow(ax, (4.0, y + 0.5), (4.6, y + 0.5))
        _box(ax, 4.7, y, 1.5, 1.0, enc)
        _arrow(ax, (6.3, y + 0.5), (6.9, y + 0.5))
        _token(ax, 7.0, y + 0.25, "cls", "[cls]", w=0.55, h=0.5)
        _arrow(ax, (7.65, y + 0.5), (8.1, y + 0.5), "project")
        _token(ax, 8.2, y + 0.25, "cls", "$z_1$" if y > 1 else "$z_2$", w=0.5, h=0.5)
    _arrow(ax, (8.45, 2.65), (8.45, 1.35), style="<|-|>", colour=COLOURS["loss"])
    _box(ax, 8.95, 1.55, 1.9, 0.8, "pull together\n(other images:\npush apart)", kind="loss")
    ax.text(5.45, 1.85, "patch tokens: no loss on them", ha="center", va="center", fontsize=8, style="italic")
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
        ax.text(x0 - 0.1, corner(i, 0)[1] + cell / 2, label, ha="right", va="center", fontsize=8)
        ax.text(corner(0, i)[0] + cell / 2, y0 + T * cell + 0.1, label, ha="center", va="bottom", fontsize=8)
    ax.text(x0 + T * cell / 2, y0 + T * cell + 0.45, "key $j$ (whom the token attends to)", ha="center",
            fontsize=9)
    ax.text(x0 - 0.75, y0 + T * cell / 2, "query $i$ (the token that attends)", rotation=90, ha="center",
            va="center", fontsize=9)
    right = x0 + T * cell + 0.3
    ax.add_patch(Rectangle(corner(T - 1, 1 + registers), num_patches * cell, num_patches * cell, fill=False,
                           edgecolor="black", lw=1.6))
    notes = [(0, "[cls] row: what [cls] reads\n(its self-attention, then [cls]→patch)"),
             (registers, "register rows: what registers read"),
             (T - num_patches // 2 - 1, "patch–patch block ($N \\times N$,\noutlined): patches reading patches")]
    for row, text in notes:
        ax.text(right, corner(row, 0)[1] + cell / 2, text, ha="left", va="center", fontsize=8)
    bottom = y0 - 0.15
    ax.text(x0 + cell / 2, bottom, "[cls] column:\npatch→[cls]", ha="right", va="top", fontsize=8)
    ax.text(x0 + (1 + registers / 2) * cell, bottom, "register\ncolumns", ha="left", va="top", fontsize=8)
    ax.text(x0 + (1 + registers + num_patches / 2) * cell, bottom, "every row sums to 1", ha="left",
            va="top", fontsize=8, style="italic")
    return fig


def abmilp_head(num_patches: int = 5) -> plt.Figure:
    """AbMILP: patch tokens -> one score each -> softmax weights -> weighted sum -> linear classifier."""
    fig, ax = _canvas(11, 3.9, "The AbMILP head over frozen patch tokens")
    weights = [0.05, 0.1, 0.6, 0.2, 0.05][:num_patches]
    labels = [f"$h_{i + 1}$" for i in range(num_patches)]
    labels[-1] = "$h_N$"
    y_rows = [0.4 + 0.62 * (num_patches - 1 - i) for i in range(num_patches)]
    ax.text(0.55, y_rows[0] + 0.65, "patch tokens\n([cls] unused)", ha="center", va="bottom", fontsize=8)
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
        ax.text(5.7, y + 0.22, f"$w_{{{labels[i][3:-1]}}}$", ha="right", va="center", fontsize=8)
    ax.text(6.35, y_rows[0] + 0.65, "weights, sum to 1", ha="center", va="bottom", fontsize=8)
    _arrow(ax, (7.0, 1.8), (7.25, 1.8))
    _box(ax, 7.3, 1.35, 1.45, 0.9, "weighted sum\n$z = \\sum_i w_i h_i$")
    _arrow(ax, (8.85, 1.8), (9.25, 1.8))
    _box(ax, 9.35, 1.35, 1.4, 0.9, "linear classifier\n$D \\to C$ classes")
    ax.text(8.0, 1.0, "$z$ has width $D$", ha="center", va="top", fontsize=8)
    return fig


# Every diagram by the name the chapters and tests use.
ALL = {"vit_tokens": vit_tokens, "mae": mae, "joint_embedding": joint_embedding,
       "attention_blocks": attention_blocks, "abmilp_head": abmilp_head}
