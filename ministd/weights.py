"""Weights and configs in local files: reading, checking, loading, saving (chapter 04).

Every network in ministd (VAE, text encoders, U-Net, the small helpers of the
book) is saved and loaded through this module, so there is one way to do it:

- :func:`save_model` writes ``name.safetensors`` (the weights, float16 by
  default) and ``name.json`` (the config) side by side; :func:`load_model`
  reads such a pair back.
- :func:`read_safetensors` reads a file's tensors once, each straight into the
  dtype asked for; :func:`weight_files` finds a folder's file or its shards
  (``*.safetensors.index.json``), as diffusers and transformers write them.
- :func:`load_strict` checks every key and shape before anything is loaded:
  a file that does not fit raises :class:`WeightsMismatchError` listing
  exactly what is missing, unexpected or mis-shaped, and the module is left
  untouched. A network built with :func:`build_on_meta` (PyTorch's ``meta``
  device: shapes, no memory, no random initialisation) takes the file's
  tensors as its parameters, so loading holds each weight once, in its final
  dtype, never a random copy beside it.

Nothing here downloads anything: paths are local files or folders.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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
    """Load ``state_dict`` into ``module`` only if every key and shape matches.

    A module built on the meta device (:func:`build_on_meta`) takes the tensors
    themselves as its parameters (``load_state_dict(assign=True)``: no copy, in
    the tensors' dtype); a module with real parameters gets the values copied
    in, cast to each parameter's dtype and device. ``ignore_unexpected`` lists
    key prefixes that may be present in the file and are skipped (for example
    position-id buffers that some exporters save).
    """
    own = module.state_dict()
    skip = tuple(ignore_unexpected)
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own and not (skip and k.startswith(skip)))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
                  for k in sorted(own) if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing, unexpected, mismatched)
    if any(t.is_meta for t in own.values()):
        module.load_state_dict({k: state_dict[k].contiguous() for k in own}, strict=True, assign=True)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:  # state outside the state dict cannot come from a file
            raise RuntimeError(f"{source}: {left[:3]} were not loaded (not in the state dict)")
        return
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state_dict[key].to(dtype=target.dtype, device=target.device))


def build_on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a network on the meta device: every shape, no memory, no random initialisation.

    Loading then hands it the file's tensors (:func:`load_strict`), so a 4 GB
    model never exists twice in memory.
    """
    with torch.device("meta"):
        return build()


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


def rename_by_prefix(key: str, table: Mapping[str, str]) -> str:
    """``key`` renamed by a prefix table: its longest prefix that ``table`` holds is replaced.

    Tables map names as one layout writes them to names as another does,
    module by module, e.g. ``{"input_blocks.1.0.in_layers.0.": "down_blocks.0.resnets.0.norm1."}``
    (prefixes end with "."; a whole key may be an entry too). A key that no entry
    matches is returned unchanged, so a strict load then reports it by name.
    Every key map of ministd (U-Net, VAE and text encoders in the original
    single-file layout) is such a table, printable and scanned by eye.
    """
    if key in table:
        return table[key]
    cut = len(key)
    while (cut := key.rfind(".", 0, cut)) != -1:
        new = table.get(key[:cut + 1])
        if new is not None:
            return new + key[cut + 1:]
    return key


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed.

    Single-file checkpoints keep every network in one dict under prefixes such
    as ``first_stage_model.`` (VAE) or ``model.diffusion_model.`` (U-Net).
    """
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------
# safetensors files: the table of contents, then the tensors
# ---------------------------------------------------------------------------

# safetensors dtype code -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
MAX_HEADER_BYTES = 100_000_000      # the limit the safetensors library itself sets


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file, as its header describes it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, int] | None = None   # safetensors: its bytes' [begin, end) from the file's start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Every tensor's name, shape and dtype, and the metadata, from a ``.safetensors`` header.

    The format (github.com/huggingface/safetensors): 8 bytes, a little-endian
    unsigned length N; N bytes of JSON ``{name: {"dtype": "F16", "shape": [320, 4, 3, 3],
    "data_offsets": [begin, end]}, ..., "__metadata__": {...}}``; then the raw
    tensor bytes, offsets counted from the end of the header. Reads N + 8 bytes
    and checks that the file is one (not empty, not text, not a renamed
    pickle, not cut short), raising ValueError naming the file otherwise.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            what = "empty file" if size == 0 else f"not a safetensors file, or a truncated one: only {size} bytes"
            raise ValueError(f"{path}: {what}; a .safetensors file starts with the 8-byte length of its header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file ({_what_it_starts_like(head, n, size)})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file, or a damaged one (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    end_of_data = 0
    for name, item in header.items():
        entry, (begin, end) = _header_entry(path, name, item, data_start=8 + n)
        entries[name] = entry
        end_of_data = max(end_of_data, end)
    data_bytes = size - 8 - n
    if end_of_data > data_bytes:
        raise ValueError(f"{path}: truncated: its header describes {end_of_data:,} bytes of tensors but only "
                         f"{data_bytes:,} follow (an interrupted download or copy?)")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _header_entry(path: Path, name: str, item, data_start: int) -> tuple[TensorEntry, tuple[int, int]]:
    """One header item -> TensorEntry, checking that its byte range fits its shape and dtype."""
    try:
        dtype, itemsize = SAFETENSORS_DTYPES[item["dtype"]]
        shape = tuple(int(s) for s in item["shape"])
        begin, end = (int(o) for o in item["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: damaged safetensors header at tensor {name!r}: {str(item)[:120]}") from None
    entry = TensorEntry(shape, dtype, (data_start + begin, data_start + end))
    if end - begin != entry.numel * itemsize or begin < 0:
        raise ValueError(f"{path}: damaged safetensors header: tensor {name!r} {list(shape)} {item['dtype']} "
                         f"needs {entry.numel * itemsize} bytes, its offsets give {end - begin}")
    return entry, (begin, end)


def _what_it_starts_like(head: bytes, n: int, size: int) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive: probably a pickled PyTorch checkpoint (.ckpt) with the wrong name"
    if head[:1] == b"\x80":
        return "it starts like a Python pickle: probably a .ckpt/.bin file with the wrong name"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it starts with text {head.decode('ascii')!r}"
    return f"its first 8 bytes give a header of {n:,} bytes, but the file has {size:,}"


def _check_suffix(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors file, got {path.name!r} "
                         "(pickled .ckpt/.bin files are not loaded: they can run code)")


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None,
                     keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a local ``.safetensors`` file (on the CPU), each read once.

    With ``dtype``, floating-point tensors come out in that dtype: one already
    in it comes straight from the memory-mapped file; one to convert is read
    into a buffer of its own, converted, and the buffer dropped, so memory
    peaks at the converted weights plus one tensor (no float32 copy of a
    model on its way to bfloat16). ``keys`` reads only those tensors.
    The header is checked first (:func:`read_safetensors_header`): an empty,
    truncated or text file raises ValueError naming it.
    """
    path = Path(path)
    _check_suffix(path)
    entries, _ = read_safetensors_header(path)
    wanted = list(entries) if keys is None else list(keys)
    absent = [k for k in wanted if k not in entries]
    if absent:
        raise KeyError(f"{path} has no tensors {absent[:5]}")
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as mapped, open(path, "rb") as raw:
        for key in wanted:
            entry = entries[key]
            if dtype is None or entry.dtype == dtype or not entry.dtype.is_floating_point:
                out[key] = mapped.get_tensor(key)
            else:
                out[key] = read_tensor_bytes(raw, entry).to(dtype)
    return out


def read_tensor_bytes(raw, entry: TensorEntry) -> torch.Tensor:
    """One tensor read from an open file at the byte range its header gives (into fresh memory:
    reading through the memory map would keep every page it touched resident until closed)."""
    begin, end = entry.offsets
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    raw.seek(begin)
    if buffer.numel() and raw.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise ValueError(f"{raw.name}: truncated while reading (the file changed since its header was read?)")
    return buffer.view(entry.dtype).reshape(entry.shape)


# diffusers' file stem for a model folder's weights (transformers' is "model")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def weight_files(folder: str | Path, stem: str) -> list[Path]:
    """The safetensors file(s) of one model folder: ``stem.safetensors``, or the shards that
    ``stem.safetensors.index.json`` lists (diffusers: stem ``diffusion_pytorch_model``;
    transformers: ``model``). A folder holding one other ``.safetensors`` file gives that one."""
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' {{tensor name: shard file}}")
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FileNotFoundError(f"no {stem}.safetensors (nor its .index.json shards) in {folder}; "
                            f"safetensors files there: {[p.name for p in found]}")


def read_weights(folder: str | Path, stem: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (:func:`weight_files`), each read once in ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder, stem):
        state.update(read_safetensors(file, dtype=dtype))
    return state


# ---------------------------------------------------------------------------
# The book's own models: name.safetensors + name.json
# ---------------------------------------------------------------------------

def save_model(module: torch.nn.Module, path: str | Path, config: Mapping[str, Any],
               dtype: torch.dtype | None = torch.float16, extra_config: Mapping[str, Any] | None = None,
               metadata: dict[str, str] | None = None,
               state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``path`` (weights, float16 by default) and ``path`` with ``.json`` (the config).

    Keys of ``extra_config`` start with "_" by convention (training notes such as the
    step or the data); they are kept in the JSON and ignored by the loaders.
    ``state_dict``: the tensors to write, when not ``module.state_dict()`` as it is
    (e.g. a token table stored as its trained rows, :func:`ministd.text.pack_token_table`).
    """
    path = Path(path)
    write_safetensors(path, module.state_dict() if state_dict is None else state_dict, dtype=dtype,
                      metadata=metadata)
    text = json.dumps({**config, **(extra_config or {})}, indent=2) + "\n"
    path.with_suffix(".json").write_text(text, encoding="utf-8")


def load_model(path: str | Path, build: Callable[[dict], torch.nn.Module], dtype: torch.dtype = torch.float32,
               config: str | Path | None = None, ignore_unexpected: Iterable[str] = (),
               transform: Callable[[dict, dict], dict] | None = None) -> torch.nn.Module:
    """Load a pair written by :func:`save_model`, in ``dtype`` and eval mode.

    ``build(config_dict)`` makes the network from the JSON config (keys starting
    with "_" removed); it is built on the meta device and takes the file's
    tensors, read once in ``dtype``. ``config`` names the JSON file when it is
    not next to the weights. ``transform(tensors, config_dict)`` may rewrite the
    tensors before the strict load (e.g. expand a token table stored as its rows).
    """
    path = Path(path)
    _check_suffix(path)
    read_safetensors_header(path)            # a broken weights file is named before anything is built
    fields = {k: v for k, v in read_json(config if config is not None else path.with_suffix(".json")).items()
              if not k.startswith("_")}
    model = build_on_meta(lambda: build(fields))
    tensors = read_safetensors(path, dtype=dtype)
    if transform is not None:
        tensors = transform(tensors, fields)
    load_strict(model, tensors, source=str(path), ignore_unexpected=ignore_unexpected)
    return model.eval()
