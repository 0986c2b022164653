"""The one exception type the package raises for a reader's mistake."""
from __future__ import annotations

__all__ = ["SelaggError"]


class SelaggError(ValueError):
    """An error meant for the reader: one sentence that says what was wrong and what to do.

    In Jupyter it shows as that sentence alone, without a traceback (IPython calls
    `_render_traceback_`); scripts print it and exit with status 2.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]
