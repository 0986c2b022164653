"""Safe checkpoint files: safetensors weights + a JSON manifest whose sha256 is checked on load."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SelaggError


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(weights: str | os.PathLike) -> Path:
    """The manifest that sits beside a weights file: `x.safetensors` -> `x.json`."""
    return Path(weights).with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], manifest: dict) -> dict:
    """Write weights (safetensors) and manifest (JSON, with the weights' sha256); returns the manifest."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp))
    manifest = {**manifest, "weights": path.name, "sha256": sha256_of(path)}
    _atomic_write(manifest_path(path), lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a weights file, or a clear error if it is missing."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise SelaggError(f"Checkpoint {path} has no manifest {mpath.name} beside it; it cannot be verified.")
    return json.loads(mpath.read_text())


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Verified (state_dict, manifest): refuses a file whose sha256 differs from its manifest."""
    path = Path(path)
    if not path.is_file():
        raise SelaggError(f"No checkpoint file at {path}.")
    manifest = read_manifest(path)
    actual = sha256_of(path)
    if actual != manifest.get("sha256"):
        raise SelaggError(f"Checkpoint {path.name} does not match its manifest (sha256 {actual[:12]}… "
                          f"instead of {str(manifest.get('sha256'))[:12]}…): refusing to load a changed or damaged file.")
    return load_file(str(path)), manifest


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
