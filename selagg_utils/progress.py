"""Progress bars that a reader sees and a build or test log does not."""
from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["progress_bar", "bars_disabled"]

_OFF = {"1", "true", "yes", "on"}


def bars_disabled() -> bool:
    """True when the environment asks for no progress bars (TQDM_DISABLE=1), as book builds and tests do."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in _OFF


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A `tqdm.auto` bar, off when `enabled` is False or TQDM_DISABLE is set.

    tqdm's notebook bar ignores TQDM_DISABLE and an explicit `disable=` overrides it everywhere,
    so the package asks here instead of passing `disable=not progress` itself.
    """
    return tqdm(iterable, disable=not enabled or bars_disabled(), **kwargs)
