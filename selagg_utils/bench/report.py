"""Bench rows for reading: an aligned text table, an HTML table in a notebook, a bar chart of images/s."""
from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rows import BenchRow

__all__ = ["show", "plot_rows"]

TABLE_COLUMNS = (("step", "step", "{}"), ("batch", "batch_size", "{}"), ("precision", "precision", "{}"),
                 ("median ms", "median_ms", "{:.1f}"), ("IQR ms", "iqr_ms", "{:.1f}"),
                 ("images/s", "images_per_s", "{:,.0f}"), ("GFLOP/image", "gflop_per_image", "{:.3g}"),
                 ("TFLOP/s", "tflops", "{:.3g}"), ("% peak", "pct_of_peak", "{:.1f}"), ("MB", "memory_mb", "{:,.0f}"),
                 ("params", "params", "{:,}"), ("speed-up", "speedup", "{:.2f}x"), ("compared with", "versus", "{}"),
                 ("status", "status", "{}"))


def table_cells(rows: list[BenchRow]) -> tuple[list[str], list[list[str]]]:
    """The column titles and the formatted cells of the rows ("-" where a row has no value)."""
    cells = []
    for row in rows:
        values = []
        for _, attr, fmt in TABLE_COLUMNS:
            value = getattr(row, attr)
            values.append("-" if value is None or value == "" else fmt.format(value))
        cells.append(values)
    return [title for title, _, _ in TABLE_COLUMNS], cells


def table_notes(rows: list[BenchRow]) -> list[str]:
    """The lines printed under a table: the device, what the memory column measures, each row's note."""
    footer = sorted({f"device: {r.device}" for r in rows} | {f"MB: {r.memory_kind}" for r in rows if r.memory_kind})
    footer.append("median ms: per call of the step (a batch, or a whole epoch for epoch rows)")
    lines = footer + [f"{r.step}: {r.note}" for r in rows if r.note]
    return [textwrap.fill(line, 75, subsequent_indent="  ") for line in lines]  # fits the page's column


def format_table(rows: list[BenchRow]) -> str:
    """The rows as an aligned text table, with the device and what the memory column measures underneath."""
    header, cells = table_cells(rows)
    cells = [header, *cells]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 2, 12, 13) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + table_notes(rows))


# Columns that describe the setting rather than the measurement: when every row shares the value,
# a notebook shows it once under the table, so that the table fits the page.
SHARED_COLUMNS = ("batch", "precision", "GFLOP/image", "params")


def show(rows: list[BenchRow]) -> None:
    """Show the rows as a table: HTML in a notebook (columns without a value, a status all "ok", or a
    setting every row shares, left out of the table and named under it), aligned text elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(format_table(rows))
        return
    from ..viz import Table, show_table

    header, cells = table_cells(rows)
    same = [i for i in range(len(header)) if header[i] in SHARED_COLUMNS and len(cells) > 1
            and len({row[i] for row in cells}) == 1]
    kept = [i for i in range(len(header)) if any(row[i] != "-" for row in cells) and i not in same
            and not (header[i] == "status" and all(row[i] == "ok" for row in cells))]
    show_table(Table([header[i] for i in kept], [[row[i] for i in kept] for row in cells]))
    shared = [f"{header[i]} {cells[0][i]}" for i in same if cells[0][i] != "-"]
    every = [textwrap.fill(f"every row: {', '.join(shared)}", 75, subsequent_indent="  ")] if shared else []
    print("\n".join(every + table_notes(rows)))


def plot_rows(rows: list[BenchRow], ax=None, title: str | None = None, log: bool = False):
    """A horizontal bar chart of images/s per step (skipped and out-of-memory steps shown empty), optionally on a log axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    labels = [r.step if r.ok else f"{r.step} ({r.status[:40]})" for r in rows]
    values = [r.images_per_s or 0.0 for r in rows]
    bars = ax.barh(range(len(rows)), values, color=["tab:blue" if r.ok else "lightgray" for r in rows])
    for bar, r in zip(bars, rows):
        if r.ok and r.pct_of_peak:
            ax.annotate(f" {r.pct_of_peak:.0f}% of peak", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        va="center", fontsize=10)
    ax.set_yticks(range(len(rows)), labels, fontsize=10)
    ax.invert_yaxis()
    if log:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide
    ax.set_xlabel("images per second (higher is better)" + (", log scale" if log else ""))
    ax.set_title(title or (f"{rows[0].model} on {rows[0].device}" if rows else ""), fontsize=11)
    ax.figure.tight_layout()
    return ax
