"""Progress bars: shown to a reader, off wherever TQDM_DISABLE is set (book builds, tests), in notebooks too."""
import pytest
import tqdm.notebook
import tqdm.std

from selagg_utils import config


@pytest.mark.parametrize("bar_class", [tqdm.std.tqdm, tqdm.notebook.tqdm], ids=["terminal", "notebook"])
@pytest.mark.parametrize("env, enabled, shown", [("1", True, False), ("", True, True), ("", False, False),
                                                 ("true", True, False), ("0", True, True)])
def test_bar_honours_tqdm_disable_and_the_callers_switch(bar_class, env, enabled, shown, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", env)
    monkeypatch.setattr(config, "tqdm", bar_class)
    if shown and bar_class is tqdm.notebook.tqdm:
        pytest.skip("a shown notebook bar needs a running kernel")
    bar = config.progress_bar(range(3), enabled=enabled)
    assert bar.disable is (not shown)
    assert list(bar) == [0, 1, 2]
