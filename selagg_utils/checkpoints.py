"""Safe checkpoint files: safetensors weights + a JSON manifest whose sha256 is checked on load."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SelaggError

__all__ = ["sha256_of", "manifest_path", "TEMPORARY", "host_tag", "temporary_prefix", "process_alive",
           "remove_orphaned_temporaries", "save_checkpoint", "read_manifest", "load_checkpoint", "sub_state",
           "read_weights_file", "WRAPPER_NESTS", "WRAPPER_PREFIXES", "unwrapped_state"]


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


#: A temporary file's name: `.<final name>.<host>-<pid>.<random>.tmp`, so that a later run can tell an
#: orphan (its writer is gone) from a file another process is writing right now.
TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def host_tag() -> str:
    """Eight hex digits that name this machine in temporary file names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_prefix(path: Path) -> str:
    """The start of the name of a temporary file written on the way to `path`."""
    return f".{path.name}.{host_tag()}-{os.getpid()}."


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Delete temporary files whose writer died (this machine) or that are older than a day (other machines)."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        match = TEMPORARY.match(tmp.name)
        try:
            if match and match["host"] == host_tag():
                orphan = not process_alive(int(match["pid"]))
            else:
                orphan = time.time() - tmp.stat().st_mtime > max_age_s
            if orphan:
                tmp.unlink()
                removed.append(tmp)
        except (FileNotFoundError, PermissionError):  # renamed or removed meanwhile; another user's, in a shared folder
            continue
    return removed


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
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
    """The manifest of a weights file: a JSON object with a sha256 string, or a clear error."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise SelaggError(f"Checkpoint {path} has no manifest {mpath.name} beside it; it cannot be verified.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SelaggError(f"The manifest {mpath} is not valid JSON ({err.__class__.__name__}); a manifest is a JSON "
                          "object written by save_checkpoint: restore it or save the checkpoint again.") from None
    sha = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        found = "no JSON object" if not isinstance(manifest, dict) else "no 64-digit hex sha256"
        raise SelaggError(f"The manifest {mpath} holds {found}; a manifest is a JSON object with the weights' "
                          "sha256, as save_checkpoint writes it: restore it or save the checkpoint again.")
    return manifest


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
    return read_weights_file(path), manifest


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def read_weights_file(path: str | os.PathLike) -> dict:
    """The tensors of a .safetensors file, or what a .pth/.bin file holds (read with weights_only), or a SelaggError
    naming the file when it is empty, truncated or not such a file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # SafetensorError, UnpicklingError, EOFError, RuntimeError, OSError: a file it cannot read
        if "Unsupported global" in str(err):  # a training checkpoint with Python objects (its arguments, say)
            raise SelaggError(f"{path.name} holds Python objects besides tensors (such as training arguments), which "
                              "are never unpickled here, for safety; save the model's weights alone: "
                              "torch.save(checkpoint['model'], path), or as .safetensors.") from None
        what = "safetensors" if path.suffix == ".safetensors" else "PyTorch (torch.save)"
        raise SelaggError(f"Could not read {path.name} as a {what} weights file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'}); the file is empty, "
                          "truncated or of another kind: download or save it again.") from None


#: Where training repositories nest a model's weights in a checkpoint (MAE: 'model'; DINO: 'teacher').
WRAPPER_NESTS = ("model", "state_dict", "teacher", "model_ema", "module")
#: Prefixes training code puts before a model's weight names (DistributedDataParallel, DINO, this book's files).
WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "teacher.", "encoder.")


def unwrapped_state(state, own: set[str], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a checkpoint with a known nesting ('model', 'state_dict', ...) and wrapper prefixes
    ('module.', 'backbone.', ...) removed, as far as they do not belong to the model's own names (`own`), and
    the steps taken, in words."""
    steps = []
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        nest = next((k for k in WRAPPER_NESTS if isinstance(state.get(k), dict)), None)
        if nest is None:
            kinds = sorted({type(v).__name__ for v in state.values() if not isinstance(v, torch.Tensor)})
            raise SelaggError(f"{source} holds {', '.join(kinds)} values besides tensors but none of the known "
                              f"places of a model's weights ({', '.join(map(repr, WRAPPER_NESTS))}); save the "
                              "model's state_dict alone (torch.save(model.state_dict(), path)).")
        steps.append(f"took the weights under {nest!r}")
        state = state[nest]
    if not isinstance(state, dict) or not state:
        raise SelaggError(f"{source} holds no named tensors; save a model's state_dict (safetensors or torch.save).")
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            inside = [k for k in state if k.startswith(prefix)]
            if inside and not own & set(inside) and (len(inside) == len(state) or not own & set(state)):
                others = sorted(k for k in state if not k.startswith(prefix))
                dropped = f", leaving out {len(others)} weights outside it ({', '.join(others[:2])}" \
                          f"{', ...' if len(others) > 2 else ''})" if others else ""
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                steps.append(f"removed the prefix {prefix!r}{dropped}")
                changed = True
    return state, steps
