"""The full-scale rehearsal of the chapters that probe the backbones' tokens (see test_full_scale.py).

A file of its own so that `make test`'s two pytest workers, which take a file each, share the
rehearsal; these chapters share one feature cache, as a reader's run does.
"""
import pytest
from test_full_scale import TOKEN_CHAPTERS, full_scale_env, rehearse  # noqa: F401 (a fixture)


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKEN_CHAPTERS)
def test_chapter_that_probes_tokens_runs_at_full_scale_offline(name, full_scale_env, monkeypatch):
    rehearse(name, full_scale_env, monkeypatch)
