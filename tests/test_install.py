"""The Colab install path: the package's wheel, installed with --no-deps next to a torch that is already there.

Colab brings its own torch; `%pip install` of the book's package must not replace it, and the wheel
must carry the tiny checkpoints so that a chapter runs from any folder.
"""
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes, scripts or builds: `make test` runs them, `make check` not

ROOT = Path(__file__).resolve().parents[1]
SMOKE = """
import sys, pathlib, torch, selagg_utils
from selagg_utils import data, extraction, features, linear_eval, models
assert pathlib.Path(selagg_utils.__file__).is_relative_to(sys.prefix), selagg_utils.__file__
model = models.load_backbone("tiny-mae")
train = data.load_dataset("cluttered-digits", "train", n_images=300)
test = data.load_dataset("cluttered-digits", "test", n_images=200)
options = extraction.ExtractOptions(batch_size=100, progress=False, dtype=torch.float32)
((tr,), ytr), ((te,), yte) = (extraction.extract_blocks(model, s, [None], options) for s in (train, test))
print(torch.__version__, torch.__file__)
print(float(linear_eval.ridge_accuracy(tr[:, 0], ytr, te[:, 0], yte)))
"""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_wheel_installs_without_replacing_torch_and_runs_a_probe_outside_the_repository(tmp_path):
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                str(ROOT))
    assert built.returncode == 0, built.stderr[-3000:]
    packaging_warnings = [line for line in (built.stdout + built.stderr).splitlines()
                          if "Warning" in line and "Location" not in line]
    assert not packaging_warnings, packaging_warnings
    (wheel,) = (tmp_path / "dist").glob("selagg_utils-*.whl")

    # A fresh environment that already has torch (and the rest), as a Colab runtime has.
    env_dir = tmp_path / "colab"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = run(str(python), "-c", "import torch; print(torch.__version__, torch.__file__)").stdout

    installed = run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    smoke = run(str(python), "-c", SMOKE, cwd=outside)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    torch_line, accuracy = smoke.stdout.strip().splitlines()[-2:]
    assert torch_line == before.strip(), "installing the wheel changed the torch the environment had"
    assert float(accuracy) > 0.15, f"a ridge probe on tiny-mae's [cls] reached only {accuracy} (chance is 0.1)"
