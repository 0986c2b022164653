"""The full-scale path of every chapter, rehearsed offline: timm ViT-B/16 shapes with random weights.

SELAGG_PRETRAINED=0 keeps the full-scale code path but builds the architectures without a
download; SELAGG_DATA points Imagenette at a generated folder with its layout and image sizes;
SELAGG_MAX_IMAGES caps every split, so that the chapters run in minutes on two CPU cores.
Every cell runs, hidden checks included, except two kinds, each tagged and listed here so that a
new one (or a lost tag) fails:
- `trained-claim`: checks of claims about trained models, which random weights cannot make true
  (TRAINED_CLAIMS);
- `scale-independent`: cells whose code reads nothing of the scale (no `S`, `SCALE` or `DEVICE`),
  such as the tiny live training runs, so they compute at full scale exactly what the tiny-scale
  nbval run already checks (SCALE_INDEPENDENT; a test reads their names to hold them to that).
"""
import ast
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from selagg_utils.scaleout.rehearsal import fake_imagenette

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("0*.ipynb"))
#: Small random-weight stand-ins with the token layouts of DINOv2 with registers ([cls] + 4 registers) and
#: I-JEPA (no [cls]); the real ones (ViT-B/14 and ViT-H/14) are too slow for two CPU cores.
MORE_STAND_INS = "random:vit_small_patch14_reg4_dinov2.lvd142m,random:vit_base_patch16_gap_224"
MAX_IMAGES = 10  # per split: 2 images per class (the stand-in has 5 classes, 15 + 4 images of each)

#: The hidden checks the rehearsal drops, per chapter (first line of each cell): claims about trained models.
TRAINED_CLAIMS = {
    "03_joint_embedding": ['# "how far apart the two learned models are under linear probes": the direction at every scale'],
    "04_attention_uniformity": ['assert mae["cls_patch_entropy_norm"][-1] > jea["cls_patch_entropy_norm"][-1], ('],
    "06_selective_aggregation": ["g_mae, sd_mae = gains[S.mim]"],
}
#: Cells the rehearsal leaves to the tiny-scale run (first line of each): they read nothing of the scale.
SCALE_INDEPENDENT = {
    "02_masked_image_modeling": ["config.seed_everything(0)", "assert losses[-10:].mean() < losses[:10].mean()"],
    "03_joint_embedding": ["BATCH = 32", 'assert losses[-10:].mean() < chance - 0.5, ("the live run should end clearly below chance",'],
}
#: The names the setup cell binds from the scale; a scale-independent cell may read none of them.
SCALE_NAMES = {"S", "SCALE", "DEVICE"}
DROPPED = ("trained-claim", "scale-independent")
#: The chapters that probe the three backbones' tokens: rehearsed in test_full_scale_tokens.py, with a feature
#: cache of their own, so that two pytest workers share the rehearsal (`make test` runs a file per worker).
TOKEN_CHAPTERS = ("03_joint_embedding", "05_patch_tokens", "06_selective_aggregation")
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def full_scale_env(tmp_path_factory):
    """Environment of the rehearsal: generated Imagenette, image cap, random weights, own feature cache."""
    data = fake_imagenette(tmp_path_factory.mktemp("data"), train_per_class=15, val_per_class=4, n_classes=5)
    return {"SELAGG_SCALE": "full", "SELAGG_PRETRAINED": "0", "SELAGG_DATA": str(data),
            "SELAGG_MAX_IMAGES": str(MAX_IMAGES), "SELAGG_CACHE": str(tmp_path_factory.mktemp("features")),
            "SELAGG_MORE_BACKBONES": MORE_STAND_INS}


def tagged(nb, tag: str) -> list:
    """The cells carrying a tag."""
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def chapters() -> dict[str, nbformat.NotebookNode]:
    return {name: nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4) for name in CHAPTERS}


def test_the_dropped_checks_are_the_listed_ones():
    found = {name: [c.source.splitlines()[0] for c in tagged(nb, "trained-claim")] for name, nb in chapters().items()}
    assert {k: v for k, v in found.items() if v} == TRAINED_CLAIMS


def test_the_cells_left_to_the_tiny_run_are_the_listed_ones_and_read_nothing_of_the_scale():
    found = {name: tagged(nb, "scale-independent") for name, nb in chapters().items()}
    assert {k: [c.source.splitlines()[0] for c in v] for k, v in found.items() if v} == SCALE_INDEPENDENT
    for name, cells in found.items():
        for cell in cells:
            read = {n.id for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.Name)}
            assert not read & SCALE_NAMES, f"{name}: a scale-independent cell reads {read & SCALE_NAMES}"


def rehearse(name: str, env: dict[str, str], monkeypatch) -> None:
    """Execute one chapter in the rehearsal's environment, without the cells it leaves out."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if not set(DROPPED) & set(c.get("metadata", {}).get("tags", []))]
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3",  # per cell: a loaded 2-core machine is slow
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    TIMES[name] = time.perf_counter() - start
    print(f"{name}: {TIMES[name]:.0f} s at full scale")


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CHAPTERS if c not in TOKEN_CHAPTERS])
def test_chapter_runs_at_full_scale_offline(name, full_scale_env, monkeypatch):
    rehearse(name, full_scale_env, monkeypatch)
