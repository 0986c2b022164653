"""Checks shared by the package: finite numbers, digests of tensors, and validated numbers from a reader.

The rule they serve: every fault ends either in the correct result or in one `SelaggError` sentence
(what was wrong, what is accepted, what to do), and never loses work already done.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["SelaggError"]

#: Bits of the exponent of each half-precision format: all set means inf or NaN.
_EXPONENT_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity (fast: one reduction, no boolean copy of the tensor)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype in _EXPONENT_BITS:  # halves: test the exponent bits, much faster on a CPU than isfinite
        bits = tensor.detach().cpu().contiguous().view(torch.int16).numpy()
        mask = np.int16(_EXPONENT_BITS[tensor.dtype])
        return not bool(((bits & mask) == mask).any())
    # a sum is NaN or infinite as soon as one element is (token values are far from float32's range)
    return bool(torch.isfinite(tensor.detach().sum(dtype=torch.float64 if tensor.dtype == torch.float64 else None)))


def first_nonfinite_item(tensor: torch.Tensor) -> int | None:
    """Index along the first dimension of the first item holding a NaN or an infinity, or None."""
    if all_finite(tensor):
        return None
    bad = ~torch.isfinite(tensor.detach().float()).reshape(len(tensor), -1).all(1)
    return int(bad.nonzero()[0, 0])


def check_finite_items(tensor: torch.Tensor, what: str, offset: int = 0, remedy: str = "") -> None:
    """Raise a SelaggError naming the first item (counted from `offset`) of a batch that is not finite."""
    index = first_nonfinite_item(tensor)
    if index is not None:
        raise SelaggError(f"{what} {offset + index} contains NaN or infinite values, which would turn every number "
                          f"computed from it into noise; only finite values are accepted"
                          f"{'; ' + remedy if remedy else ''}.")


def notice(message: str) -> None:
    """Tell the reader, in one line, about a fault the package repaired on its own."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- numbers a reader passes
def whole_number(value, name: str, minimum: int, remedy: str) -> int:
    """`value` as an int when it is a whole number >= minimum (not a bool), else a SelaggError."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise SelaggError(f"{name}={value!r} is not accepted: it must be a whole number of at least {minimum}; "
                          f"{remedy}.")
    return int(value)


def whole_number_fields(options, rules: dict[str, tuple[int, str]]) -> None:
    """Check each named field of a frozen dataclass with `whole_number` (rules: name -> (minimum, remedy)) and store
    it back as a plain int, as JSON and the index files write it."""
    for name, (minimum, remedy) in rules.items():
        object.__setattr__(options, name, whole_number(getattr(options, name), name, minimum, remedy))


def options_object(value, kind: type, name: str, example: str, default=None):
    """`value` when it is a `kind` (`default` for None, when one is given), else a SelaggError naming the class."""
    if value is None and default is not None:
        return default
    if not isinstance(value, kind):
        where = f"{kind.__module__.rsplit('.', 1)[-1]}.{kind.__name__}"
        raise SelaggError(f"{name} must be an instance of {where}, not {type(value).__name__}; build one, e.g. "
                          f"{example}.")
    return value


def real_number(value, name: str, minimum: float, remedy: str, strictly: bool = False,
                maximum: float | None = None) -> float:
    """`value` as a float when it is a finite number within the bounds, else a SelaggError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value > minimum if strictly else value >= minimum) \
        and (maximum is None or value < maximum)
    if not ok:
        bound = f"{'greater than' if strictly else 'at least'} {minimum:g}" + \
                (f" and below {maximum:g}" if maximum is not None else "")
        raise SelaggError(f"{name}={value!r} is not accepted: it must be a finite number {bound}; {remedy}.")
    return float(value)


#: The spellings an environment variable may use for yes and no.
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(var: str, default: bool) -> bool:
    """A yes/no environment variable: unset or empty gives `default`; 1/true/yes/on and 0/false/no/off in any case;
    anything else a SelaggError."""
    raw = os.environ.get(var, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE_WORDS or raw in FALSE_WORDS:
        return raw in TRUE_WORDS
    raise SelaggError(f"{var}={os.environ[var]!r} is not accepted: give one of {', '.join(TRUE_WORDS)} or "
                      f"{', '.join(FALSE_WORDS)}, or unset it.")


def sequence_of(values, name: str, example: str) -> tuple:
    """`values` as a tuple when it is a list, tuple, range or array (read once, never consumed), else a SelaggError:
    a generator or iterator would be used up by its check and leave nothing to train with."""
    if isinstance(values, (list, tuple, range, np.ndarray, torch.Tensor)):
        return tuple(values.tolist() if isinstance(values, (np.ndarray, torch.Tensor)) else values)
    raise SelaggError(f"{name}={values!r} is not accepted: give a list or tuple (a generator or iterator is used "
                      f"up once read), e.g. {name}={example}.")


class SelaggError(ValueError):
    """An error meant for the reader: one sentence that says what was wrong and what to do.

    In Jupyter it shows as that sentence alone, without a traceback (IPython calls
    `_render_traceback_`); scripts print it and exit with status 2.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


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


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                 described: str = "the model its manifest describes") -> None:
    """load_state_dict, all or nothing: one clear sentence when names or shapes do not fit the model."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
             if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                                         f"missing: {', '.join(missing[:3])}" if missing else "",
                                         f"unexpected: {', '.join(unexpected[:3])}" if unexpected else ""]))
        raise SelaggError(f"The weights in {source} do not fit {described} ({detail}; {len(missing)} missing, "
                          f"{len(unexpected)} unexpected); give the checkpoint of that architecture, or name the "
                          "architecture the file was trained with.")
    model.load_state_dict(state)
