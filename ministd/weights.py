"""Reading weights and configs from local files, and loading them strictly.

Every model in ministd (VAE, text encoders, U-Net) loads weights through
:func:`load_strict`, so a file whose keys or shapes do not match the network
raises :class:`WeightsMismatchError` listing exactly what is missing,
unexpected or mis-shaped, and the module is left untouched: nothing is ever
loaded half-way.

Nothing here downloads anything: paths are local files or folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file


class WeightsMismatchError(ValueError):
    """Raised when a state dict does not fit a module; lists every problem."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]]):
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        super().__init__(self._message())

    def _message(self, limit: int = 20) -> str:
        def block(title: str, items: list[str]) -> str:
            if not items:
                return ""
            shown = "\n    ".join(items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        shapes = [f"{k}: file has {tuple(f)}, model expects {tuple(m)}"
                  for k, f, m in self.mismatched]
        return (f"weights from {self.source} do not match the model; nothing was loaded"
                + block("missing keys", self.missing)
                + block("unexpected keys", self.unexpected)
                + block("shape mismatches", shapes))


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                source: str = "state dict", ignore_unexpected: Iterable[str] = ()) -> None:
    """Copy ``state_dict`` into ``module`` only if every key and shape matches.

    Values are cast to each parameter's dtype and device. ``ignore_unexpected``
    lists key prefixes that may be present in the file and are skipped (for
    example position-id buffers that some exporters save).
    """
    own = module.state_dict()
    skip = tuple(ignore_unexpected)
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own and not (skip and k.startswith(skip)))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
                  for k in sorted(own) if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing, unexpected, mismatched)
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state_dict[key].to(dtype=target.dtype, device=target.device))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local ``.safetensors`` file (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors file, got {path.name!r} "
                         "(pickled .ckpt/.bin files are not loaded: they can run code)")
    return load_file(str(path), device="cpu")


def write_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                      dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
    """Save ``state_dict`` (optionally cast to ``dtype``, e.g. float16 for data/)."""
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .detach().contiguous().cpu() for k, v in state_dict.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    Path(path).chmod(0o644)  # safetensors writes owner-only files; shipped data is world-readable


def read_json(path: str | Path) -> dict:
    """A JSON config file as a dict, with a clear error when it is absent or broken.

    A file that is not valid JSON, or holds something other than an object
    ``{...}``, raises ValueError naming the file and the place of the fault.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a JSON config file: it is not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                         "expected a config object {...}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected a config object {{...}}")
    return value


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed.

    Single-file checkpoints keep every network in one dict under prefixes such
    as ``first_stage_model.`` (VAE) or ``model.diffusion_model.`` (U-Net).
    """
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
