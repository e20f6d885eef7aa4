"""Teaching a trained model new things: LoRA, textual inversion, hypernetworks (chapter 16).

Each technique leaves the released weights alone and adds a small thing that
readers trade as a file. This module reads those files in the layouts the
popular tools write (kohya / A1111 / ComfyUI, diffusers / PEFT) and applies
them to ministd's own networks: no second implementation of the model.

**LoRA** (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", sec. 4.1). A frozen layer ``h = W x`` (W [out, in]) learns a change
of rank r << min(in, out), written as two thin matrices, *down* A [r, in]
(kohya ``lora_down``, PEFT ``lora_A``) and *up* B [out, r] (``lora_up``,
``lora_B``)::

    h = W x + scale * (alpha / r) * B (A x)        = (W + scale * alpha/r * B A) x

``alpha`` is stored in the file (per layer; r when absent, so alpha/r = 1);
``scale`` is the reader's slider (A1111's ``<lora:name:0.8>``). For a
convolution W [out, in, kh, kw] (kohya's "LoCon" layers), A is a convolution
with W's own kernel size, stride and padding [r, in, kh, kw] and B a 1x1
convolution [out, r, 1, 1]; the merged kernel is B A over the channels.

ministd applies a LoRA **on the fly**: every targeted ``nn.Linear`` /
``nn.Conv2d`` gets a forward hook that adds ``scale * alpha/r * B(A(x))`` to
its output; no weight is ever written. Hence ``unload_lora`` removes the hooks
and the model is *bitwise* what it was; several LoRAs stack (their terms add,
each with its own scale); ``set_lora_scale`` acts at the next call; and the
parameter names and ``state_dict`` never change. The price is two thin
products per adapted layer and call, where a merged W + ΔW would cost nothing
(:meth:`LoRALayer.delta_weight` gives that ΔW, for merging by hand).

*How a LoRA file names a layer.*
kohya (A1111, ComfyUI, CivitAI files) writes
``lora_unet_<module path with "." as "_">.lora_down.weight`` / ``.lora_up.weight``
/ ``.alpha``; ``lora_te_`` for the text encoder of SD 1.x / 2.x, ``lora_te1_``
and ``lora_te2_`` for SDXL's two. The U-Net path is diffusers' for SD 1.x / 2.x
(``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) and the
original sgm code's for SDXL (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``);
text-encoder paths are transformers' (``text_model_encoder_layers_0_self_attn_q_proj``).
diffusers / PEFT writes ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``
(``text_encoder.``, ``text_encoder_2.``), older diffusers ``.lora.down.weight``,
``.lora_linear_layer.down.weight`` or ``attn1.processor.to_q_lora.down.weight``;
alpha comes from ``.alpha`` keys or PEFT's config in the safetensors metadata
(``lora_adapter_metadata``), else r.
Underscores cannot be turned back into dots by a rule (``down_blocks_0``,
``to_out_0``, ``time_emb_proj``), so :func:`lora_name_table` lists every
Linear / Conv2d of *this* model under every spelling and a file's name is
looked up there. Every key of a file must be used: an unknown layer, a shape
that does not fit (an SDXL LoRA on SD 1.5), a LyCORIS/DoRA variant or a
whole-model checkpoint is an error naming the key and the file, raised
before anything is applied.

**Textual inversion** (Gal et al. 2022, "An Image is Worth One Word:
Personalizing Text-to-Image Generation using Textual Inversion", sec. 3). A new
word S* gets its own row v* [D] in the text encoder's token-embedding table,
learned with the diffusion loss while everything else stays frozen. An
embedding may hold n vectors; they become the tokens ``tok``, ``tok_1``, ...,
``tok_{n-1}``, and ``tok`` in a prompt (or a negative prompt) stands for all
n, as in diffusers and A1111. Files: A1111 ``{"string_to_param": {"*": [n, D]},
"name": ...}`` (.pt) or ``{"emb_params": [n, D]}`` (.safetensors); diffusers
``{token: [D] or [n, D]}`` (learned_embeds); SDXL ``{"clip_l": [n, 768],
"clip_g": [n, 1280]}`` for its two encoders. An added token is matched in the
prompt exactly as written (case matters), before the prompt is lower-cased.

**Hypernetworks** (NovelAI's, as AUTOMATIC1111/stable-diffusion-webui
implements them, ``modules/hypernetworks/hypernetwork.py``:
``HypernetworkModule.forward``, ``apply_single_hypernetwork``). For each width
w of what an attention layer's keys and values are computed from (768: the
CLIP-L text of cross-attention; 320 / 640 / 1280: the image tokens of
self-attention), a pair of small MLPs f_k, f_v (w -> 2w -> w by default)
changes that context c [B, T, w] before ``to_k`` and ``to_v``::

    k = to_k(c + strength * f_k(c)),    v = to_v(c + strength * f_v(c))

Against LoRA: LoRA adds a low-rank ΔW to chosen weights; a hypernetwork
reshapes the *input* of every key/value projection of a width, nonlinearly,
with one MLP shared by all layers of that width. A1111 saves them as pickles
(``{768: (state_k, state_v), ..., "layer_structure": [1, 2, 1], ...}``),
read here only with ``allow_pickle=True``; ministd's safetensors form holds the
same: tensors ``"{width}.{0 = key, 1 = value}.linear.{i}.{weight|bias}"`` and
the options as JSON strings in the metadata (:func:`save_hypernetwork`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping

import regex
import torch
import torch.nn.functional as F
from torch import nn

from ministd.text import CLIPTextModel
from ministd.unet import Attention, original_key_map
from ministd.weights import load_strict, read_safetensors, read_safetensors_header, write_safetensors

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
DATA = Path(__file__).resolve().parent.parent / "data"
# the book's own adapters for the shipped "shapes" model (trained by ministd.train.adapters; data/README.md)
SHIPPED: dict[str, dict[str, Path]] = {
    "textual inversion": {"shapes-star": DATA / "shapes_star_embedding.safetensors",
                          "shapes-star-tuned": DATA / "shapes_star_tuned_embedding.safetensors"},
    "LoRA": {"shapes-outline": DATA / "shapes_outline_lora.safetensors",
             "shapes-star-tuned": DATA / "shapes_star_tuned_lora.safetensors"},
    "hypernetwork": {"shapes-outline": DATA / "shapes_outline_hypernetwork.safetensors"},
}
TEXT_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


# ---------------------------------------------------------------------------
# reading adapter files
# ---------------------------------------------------------------------------
def read_adapter_file(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """The contents of a ``.safetensors`` file (tensors, metadata) or, with
    ``allow_pickle=True``, of a pickled ``.pt``/``.ckpt``/``.bin`` (read with
    ``torch.load(weights_only=True)``: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path), read_safetensors_header(path)[1]
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: expected a .safetensors file (or a pickled {'/'.join(PICKLE_SUFFIXES)} "
                         f"with allow_pickle=True), got a {suffix or 'suffix-less'} file")
    if not allow_pickle:
        raise ValueError(f"{path}: a pickled file ({suffix}); opening a pickle can run any code it holds, so "
                         "ministd does not by default. Convert it to .safetensors, or pass allow_pickle=True to "
                         "read it with torch.load(weights_only=True), which accepts tensors only")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds; all mean "not readable"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: cannot be read as a tensors-only pickle "
                         f"(torch.load(weights_only=True) says: {first[:200]})") from None
    if not isinstance(contents, dict):
        raise ValueError(f"{path}: holds a {type(contents).__name__}, expected a dict")
    return contents, {}


def shipped_file(path_or_name, kind: str):
    """The data/ file of a shipped adapter name of ``kind`` (a key of SHIPPED); anything else unchanged."""
    if not isinstance(path_or_name, str) or path_or_name not in SHIPPED[kind]:
        return path_or_name
    path = SHIPPED[kind][path_or_name]
    if not path.is_file():
        raise FileNotFoundError(f"the shipped {kind} {path_or_name!r} (data/{path.name}) has not been trained "
                                "yet; see data/README.md")
    return path


def _contents(path_or_state, allow_pickle: bool, kind: str) -> tuple[dict, dict[str, str], str]:
    """(contents, metadata, a name for messages) of a file path, a shipped name of ``kind``,
    or an in-memory dict."""
    if isinstance(path_or_state, Mapping):
        return dict(path_or_state), {}, "the given state dict"
    contents, metadata = read_adapter_file(shipped_file(path_or_state, kind), allow_pickle)
    return contents, metadata, str(path_or_state)


def _what_else(keys: Iterable[str]) -> str | None:
    """If the keys are those of another kind of file, say which (else None)."""
    keys = list(keys)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys) or "conv_in.weight" in keys or "text_model.embeddings.token_embedding.weight" in keys:
        return "a whole-model checkpoint, not an adapter: load it with ministd.load_pipeline"
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        return "a textual-inversion embedding: load it with load_textual_inversion"
    if any(regex.fullmatch(r"\d+\.[01]\.linear.*", k) for k in keys):
        return "a hypernetwork: load it with load_hypernetwork"
    return None


# ---------------------------------------------------------------------------
# LoRA: the layers and their hooks
# ---------------------------------------------------------------------------
class LoRALayer(nn.Module):
    """The low-rank change of one Linear / Conv2d: x -> (alpha / r) * up(down(x)).

    down: [r, in] (Linear) or [r, in, kh, kw] (Conv2d, with the target's stride,
          padding and dilation); up: [out, r] or [out, r, 1, 1].
    ``forward`` takes what the target takes (x [..., in] or [B, in, H, W]) and
    returns what it returns, without the user's scale.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, target: nn.Module):
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.alpha = float(alpha)
        self.conv = ({"stride": target.stride, "padding": target.padding, "dilation": target.dilation}
                     if isinstance(target, nn.Conv2d) else None)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            low = F.linear(F.linear(x, self.down), self.up)
        else:
            low = F.conv2d(F.conv2d(x, self.down, **self.conv), self.up)
        return (self.alpha / self.rank) * low

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) B A, shaped like the target's weight ([out, in] or [out, in, kh, kw])."""
        merged = self.up.flatten(1) @ self.down.flatten(1)              # [out, in * kh * kw]
        return (self.alpha / self.rank) * merged.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclasses.dataclass
class LoRA:
    """One LoRA: its layers by target ("unet.<path>", "text_encoder.<path>", ...), name and scale."""

    name: str
    layers: dict[str, LoRALayer]
    scale: float = 1.0
    source: str = ""
    handles: list = dataclasses.field(default_factory=list, repr=False)

    def parameters(self) -> Iterable[nn.Parameter]:
        """Every down and up matrix (what an optimiser trains)."""
        for layer in self.layers.values():
            yield from layer.parameters()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _components(pipe) -> dict[str, nn.Module]:
    """The networks of ``pipe`` a LoRA may change, under their diffusers names."""
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def lora_targets(pipe) -> dict[str, nn.Module]:
    """Every layer a LoRA may adapt: "unet.down_blocks.0.attentions.0.proj_in" -> nn.Conv2d, ..."""
    return {f"{component}.{path}": module for component, model in _components(pipe).items()
            for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def _registry(pipe, name: str) -> dict | list:
    """The pipeline's ``loras`` dict / ``hypernetworks`` list, created on first use."""
    if getattr(pipe, name, None) is None:
        setattr(pipe, name, {} if name == "loras" else [])
    return getattr(pipe, name)


def add_lora(pipe, lora: LoRA) -> str:
    """Hook every layer of ``lora`` into ``pipe``'s networks; returns its name.

    Each target's output becomes output + lora.scale * layer(input); the
    LoRA's tensors move to the target's dtype and device.
    """
    loras = _registry(pipe, "loras")
    if lora.name in loras:
        raise ValueError(f"a LoRA named {lora.name!r} is already loaded; unload it or pass another name=")
    targets = lora_targets(pipe)
    missing = [t for t in lora.layers if t not in targets]
    if missing:
        raise ValueError(f"LoRA {lora.name!r} adapts layers this pipeline lacks: {missing[:5]}")
    for target, layer in lora.layers.items():
        weight = targets[target].weight
        layer.to(device=weight.device, dtype=weight.dtype)
        lora.handles.append(targets[target].register_forward_hook(_add_low_rank(lora, layer)))
    loras[lora.name] = lora
    return lora.name


def _add_low_rank(lora: LoRA, layer: LoRALayer) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if lora.scale == 0:
            return None                                   # None: the output stays as it is
        _follow(layer, module.weight)
        return output + lora.scale * layer(args[0])
    return hook


def _follow(adapter: nn.Module, weight: torch.Tensor) -> None:
    """Move an adapter to its layer's device and dtype (the pipeline may have moved since loading)."""
    first = next(adapter.parameters())
    if first.device != weight.device or first.dtype != weight.dtype:
        adapter.to(device=weight.device, dtype=weight.dtype)


def unload_lora(pipe, name: str | None = None) -> None:
    """Remove one LoRA (``name``) or all of them (None): the model is bitwise as before."""
    loras = _registry(pipe, "loras")
    if name is not None and name not in loras:
        raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {sorted(loras)})")
    for key in [name] if name is not None else list(loras):
        lora = loras.pop(key)
        for handle in lora.handles:
            handle.remove()
        lora.handles.clear()


def set_lora_scale(pipe, name: str, scale: float) -> None:
    """Change a loaded LoRA's scale (0 switches it off); takes effect at the next call."""
    loras = _registry(pipe, "loras")
    if name not in loras:
        raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {sorted(loras)})")
    loras[name].scale = _check_number(scale, "scale")


def _check_number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------
# LoRA: file layouts
# ---------------------------------------------------------------------------
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"),
                  "text_encoder_2": ("lora_te2_",)}

# how a key of a LoRA file ends -> which tensor it holds (checked in this order)
LORA_ROLES: list[tuple[str, str]] = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),                    # kohya
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),                        # PEFT
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # diffusers 0.2x
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),                    # diffusers 0.2x
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),                    # diffusers attention processors
    (".alpha", "alpha"),
]
# old diffusers attention-processor names (".../attn1.processor.to_q_lora.down.weight") -> module names
PROCESSOR_NAMES = {"processor.to_q": "to_q", "processor.to_k": "to_k", "processor.to_v": "to_v",
                   "processor.to_out": "to_out.0", "self_attn.to_q": "self_attn.q_proj",
                   "self_attn.to_k": "self_attn.k_proj", "self_attn.to_v": "self_attn.v_proj",
                   "self_attn.to_out": "self_attn.out_proj"}
# how the tensor names (after the layer's name) of LoRA variants ministd does not read begin
UNSUPPORTED = {"hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a Tucker core (LyCORIS)",
               "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "oft_": "OFT (LyCORIS)",
               "diff": "a full weight difference (LyCORIS)"}


def _transformers_path(path: str) -> str:
    """A text-encoder module path, ours -> transformers' (we drop ``text_model.``;
    see :func:`ministd.text.transformers_to_ministd`)."""
    return path if path.startswith("text_projection") else "text_model." + path


def _original_paths(unet: nn.Module) -> dict[str, str]:
    """U-Net module paths, ours (= diffusers') -> the original ldm / sgm code's."""
    return {key.removesuffix(".weight"): name.removesuffix(".weight")
            for key, name in original_key_map(unet).items() if key.endswith(".weight")}


def lora_name_table(pipe) -> dict[str, str]:
    """Every name a LoRA file may give a layer of ``pipe`` -> our target path.

    Built from the model's own modules, so underscored kohya names are looked
    up, never parsed. Per Linear / Conv2d of each network:

    ========== ============================================ =====================================
    network    kohya (dots -> underscores)                  diffusers / PEFT
    ========== ============================================ =====================================
    unet       lora_unet_ + diffusers path, or original path unet. + diffusers path
    text_enc.  lora_te_ / lora_te1_ + transformers path      text_encoder. + transformers or our path
    text_enc_2 lora_te2_ + transformers path                 text_encoder_2. + transformers or our path
    ========== ============================================ =====================================
    """
    table: dict[str, str] = {}

    def add(name: str, target: str) -> None:
        if table.setdefault(name, target) != target:          # cannot happen with these spellings
            raise RuntimeError(f"LoRA name {name!r} would mean both {table[name]} and {target}")

    for component, model in _components(pipe).items():
        originals = _original_paths(model) if component == "unet" else {}
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            target = f"{component}.{path}"
            kohya = [path, originals[path]] if component == "unet" else [_transformers_path(path)]
            peft = [path] if component == "unet" else [_transformers_path(path), path]
            for name in kohya:
                for prefix in KOHYA_PREFIXES[component]:
                    add(prefix + name.replace(".", "_"), target)
            for name in peft:
                add(f"{component}.{name}", target)
    return table


def _split_key(key: str) -> tuple[str, str] | None:
    """A LoRA file key -> (the layer's name in the file, "down" | "up" | "alpha"), or None."""
    for ending, role in LORA_ROLES:
        if key.endswith(ending):
            name = key[: -len(ending)]
            if ending.startswith("_lora."):
                for old, new in PROCESSOR_NAMES.items():
                    if name.endswith("." + old):
                        name = name[: -len(old)] + new
                        break
            return name, role
    return None


def _group_lora_keys(state: Mapping, table: Mapping[str, str], source: str) -> dict[str, dict]:
    """{target: {"down": tensor, "up": tensor, "alpha"?: tensor, "keys": [...]}}, every key used."""
    if not any(isinstance(k, str) and _split_key(k) for k in state):
        other = _what_else(str(k) for k in state)
        raise ValueError(f"{source} is not a LoRA: " + (other or "no key ends in .lora_down.weight, "
                         f".lora_A.weight or .lora.down.weight (first keys: {list(state)[:3]})"))
    groups: dict[str, dict] = {}
    for key, value in state.items():
        for marker, what in UNSUPPORTED.items():
            if any(part.startswith(marker) for part in str(key).split(".")[1:]):
                raise ValueError(f"{source}: key {key!r} belongs to {what}, a LoRA variant ministd does not read")
        split = _split_key(key) if isinstance(key, str) else None
        if split is None or not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: key {key!r} is not part of a LoRA layer (expected names ending in "
                             ".lora_down.weight / .lora_up.weight / .alpha, or .lora_A.weight / .lora_B.weight)")
        name, role = split
        if name not in table:
            raise ValueError(f"{source}: key {key!r} names a layer {name!r} that this pipeline does not have "
                             "(a LoRA for another kind of model, or a network this pipeline lacks?)")
        group = groups.setdefault(table[name], {"keys": []})
        group[role] = value
        group["keys"].append(key)
    for target, group in groups.items():
        if "down" not in group or "up" not in group:
            raise ValueError(f"{source}: layer {target} has {group['keys']} but needs both a down and an up matrix")
    return groups


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """PEFT's LoraConfig per network from diffusers' ``lora_adapter_metadata`` (may be empty)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = json.loads(raw)
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if f"{component}.lora_alpha" in config:
            out[component] = {"lora_alpha": config[f"{component}.lora_alpha"],
                              "alpha_pattern": config.get(f"{component}.alpha_pattern") or {}}
    return out


def _alpha(group: dict, target: str, rank: int, peft: Mapping[str, dict]) -> float:
    """alpha of one layer: its ``.alpha`` key (0 means r, as in kohya), PEFT's config, or r."""
    if "alpha" in group:
        alpha = float(group["alpha"])
        return alpha if alpha != 0 else float(rank)
    component, path = target.split(".", 1)
    config = peft.get(component)
    if config is None:
        return float(rank)
    names = (path,) if component == "unet" else (path, _transformers_path(path))
    for pattern, alpha in config["alpha_pattern"].items():   # PEFT matches a pattern as a name suffix
        if any(n == pattern or n.endswith("." + pattern) for n in names):
            return float(alpha)
    return float(config["lora_alpha"])


def _fit_to(module: nn.Module, down: torch.Tensor, up: torch.Tensor, key: str, source: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check (and reshape 1x1 <-> 2-D) down [r, in, ...] and up [out, r, ...] against the target's weight."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        down, up = (t.flatten(1) if t.dim() == 4 and t.shape[2:] == (1, 1) else t for t in (down, up))
    elif down.dim() == 2 and weight.shape[2:] == (1, 1):
        down, up = down[:, :, None, None], up[:, :, None, None]
    rank = down.shape[0] if down.dim() >= 2 else -1
    want_down = (rank, *weight.shape[1:])
    want_up = (weight.shape[0], rank) + (1,) * (weight.dim() - 2)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise ValueError(
            f"{source}: LoRA layer {key!r} has down {list(down.shape)} and up {list(up.shape)}, but the "
            f"{type(module).__name__} it names has weight {list(weight.shape)} and needs down {list(want_down)}, "
            f"up {list(want_up)}: a LoRA made for another model (an SDXL LoRA on SD 1.x, or the reverse?)")
    return down, up


def read_lora(pipe, path_or_state, name: str | None = None, scale: float = 1.0,
              allow_pickle: bool = False) -> LoRA:
    """A LoRA file (kohya or diffusers/PEFT layout) or state dict -> a :class:`LoRA` for ``pipe``.

    Everything is checked here (names, shapes, unknown keys); nothing is applied.
    """
    state, metadata, source = _contents(path_or_state, allow_pickle, "LoRA")
    groups = _group_lora_keys(state, lora_name_table(pipe), source)
    targets, peft = lora_targets(pipe), _peft_alphas(metadata)
    layers = {}
    for target, group in sorted(groups.items()):
        down, up = _fit_to(targets[target], group["down"], group["up"], group["keys"][0], source)
        weight = targets[target].weight
        layers[target] = LoRALayer(down.to(weight.dtype).clone(), up.to(weight.dtype).clone(),
                                   _alpha(group, target, down.shape[0], peft), targets[target]).requires_grad_(False)
    if name is None:
        name = Path(path_or_state).stem if not isinstance(path_or_state, Mapping) else "lora"
    return LoRA(name, layers, _check_number(scale, "scale"), source)


def load_lora(pipe, path_or_state, scale: float = 1.0, name: str | None = None,
              allow_pickle: bool = False) -> str:
    """Apply a LoRA file on the fly (see the module docstring); returns its name.

    ``path_or_state``: a file, a state dict, or a shipped name (``"shapes-outline"``: the
    outlined style; ``"shapes-star-tuned"``: the U-Net half of the tuned star, with its
    embedding). ``name`` defaults to the file's stem; a second LoRA under another name
    stacks on the first. ``scale`` multiplies its change (0 = off).
    """
    return add_lora(pipe, read_lora(pipe, path_or_state, name=name, scale=scale, allow_pickle=allow_pickle))


# ---------------------------------------------------------------------------
# LoRA: making and saving (the book trains its own)
# ---------------------------------------------------------------------------
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def new_lora(pipe, rank: int = 4, alpha: float | None = None, targets: Iterable[str] | None = ATTENTION_PROJECTIONS,
             networks: Iterable[str] = ("unet",), name: str = "lora",
             generator: torch.Generator | None = None) -> LoRA:
    """A fresh LoRA to train: down random (Kaiming-uniform, as kohya), up zero, so that it
    starts as the base model (Hu et al. 2021, sec. 4.1). ``targets``: module-name endings
    to adapt (None: every Linear and Conv2d); ``networks``: which of "unet", "text_encoder",
    "text_encoder_2"."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    suffixes, networks = (None if targets is None else tuple("." + t for t in targets)), set(networks)
    layers = {}
    for target, module in lora_targets(pipe).items():
        if target.split(".", 1)[0] in networks and (suffixes is None or target.endswith(suffixes)):
            weight = module.weight
            down = torch.empty(rank, *weight.shape[1:], dtype=weight.dtype)
            bound = 1 / math.sqrt(down[0].numel())                  # kaiming_uniform_(a=sqrt(5))
            down.uniform_(-bound, bound, generator=generator)
            up = torch.zeros(weight.shape[0], rank, *([1] * (weight.dim() - 2)), dtype=weight.dtype)
            layers[target] = LoRALayer(down, up, rank if alpha is None else alpha, module)
    if not layers:
        raise ValueError(f"no layer of {sorted(networks)} ends in any of {targets}")
    return LoRA(name, layers)


def _kohya_name(pipe, target: str) -> str:
    """Our target path -> the kohya key stem the tools expect for this kind of pipeline."""
    component, path = target.split(".", 1)
    if component == "unet":
        if pipe.unet.config.is_sdxl_type:                     # kohya trains SDXL on the sgm U-Net
            path = _original_paths(pipe.unet)[path]
        return "lora_unet_" + path.replace(".", "_")
    two_encoders = getattr(pipe, "text_encoder_2", None) is not None
    prefix = {"text_encoder": "lora_te1_" if two_encoders else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + _transformers_path(path).replace(".", "_")


def lora_to_kohya(pipe, lora: LoRA) -> dict[str, torch.Tensor]:
    """The kohya layout of ``lora``: ``<stem>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
    out = {}
    for target, layer in lora.layers.items():
        stem = _kohya_name(pipe, target)
        out[stem + ".lora_down.weight"] = layer.down.detach()
        out[stem + ".lora_up.weight"] = layer.up.detach()
        out[stem + ".alpha"] = torch.tensor(layer.alpha, dtype=layer.down.dtype)
    return out


def save_lora(pipe, lora: LoRA | str, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``lora`` (or a loaded one, by name) as a kohya-layout ``.safetensors``,
    readable by A1111, ComfyUI, diffusers and :func:`load_lora`."""
    if isinstance(lora, str):
        lora = _registry(pipe, "loras")[lora]
    ranks = sorted({layer.rank for layer in lora.layers.values()})
    alphas = sorted({layer.alpha for layer in lora.layers.values()})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
                "ss_network_alpha": str(alphas[0] if len(alphas) == 1 else alphas), "ministd_name": lora.name}
    write_safetensors(path, lora_to_kohya(pipe, lora), dtype=dtype, metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------------------
# Textual inversion
# ---------------------------------------------------------------------------
def add_embedding_rows(text_encoder: CLIPTextModel, vectors: torch.Tensor, eos_token_id: int) -> int:
    """Append ``vectors`` [n, D] to the token-embedding table [V, D]; returns V, the first new id.

    The pooled vector is then read at the first ``eos_token_id`` (the tokenizer's)
    rather than at the largest id, which could now be a new token; for rows
    made by the tokenizer without new tokens both rules pick the same place.
    """
    table = text_encoder.embeddings.token_embedding
    first = table.num_embeddings
    weight = torch.cat([table.weight.detach(), vectors.to(table.weight)], dim=0)
    table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
    table.num_embeddings = weight.shape[0]
    eos = text_encoder.config.eos_token_id
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=weight.shape[0],
                                              eos_token_id=eos_token_id if eos is None else eos)
    return first


def read_embedding(path_or_state, token: str | None = None, allow_pickle: bool = False
                   ) -> tuple[str, dict[str, torch.Tensor], str]:
    """An embedding file or state dict -> (token, {"clip_l" | "clip_g" | "vectors": [n, D]}, source).

    The token is ``token`` if given, else the file's own (A1111 ``name``, the
    diffusers key), else the file's stem.
    """
    if isinstance(path_or_state, torch.Tensor):
        state, source = {"emb_params": path_or_state}, "the given tensor"
        if token is None:
            raise ValueError("an embedding given as a bare tensor needs token=")
    else:
        state, _, source = _contents(path_or_state, allow_pickle, "textual inversion")
    stem = Path(path_or_state).stem if isinstance(path_or_state, (str, Path)) else None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "clip_l" in state or "clip_g" in state:                        # SDXL (A1111 / kohya)
        vectors = {k: state[k] for k in ("clip_l", "clip_g") if k in state}
        found = None
    elif "emb_params" in state:                                       # A1111 / kohya .safetensors
        vectors, found = {"vectors": state["emb_params"]}, state.get("name")
    elif "string_to_param" in state:                                  # A1111 .pt
        params = dict(state["string_to_param"])
        if len(params) != 1:
            raise ValueError(f"{source}: string_to_param holds {len(params)} entries, expected one ('*')")
        vectors, found = {"vectors": next(iter(params.values()))}, state.get("name")
    elif len(state) == 1 and len(tensors) == 1:                       # diffusers {token: vector}
        found, vector = next(iter(tensors.items()))
        vectors = {"vectors": vector}
    else:
        other = _what_else(str(k) for k in state)
        raise ValueError(f"{source}: not a textual-inversion embedding "
                         + (f"({other})" if other else f"in a known format (keys {list(state)[:5]}; expected "
                            "'emb_params', 'string_to_param', 'clip_l'/'clip_g', or one {token: vector})"))
    vectors = {k: _as_rows(v, source) for k, v in vectors.items()}
    token = token or (found if isinstance(found, str) else None) or stem
    if not token:
        raise ValueError(f"{source} names no token; pass token=")
    return token, vectors, source


def _as_rows(vector, source: str) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor) or vector.dim() not in (1, 2) or vector.numel() == 0:
        raise ValueError(f"{source}: an embedding must be a tensor [D] or [n, D], got "
                         f"{list(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__}")
    return vector.detach().reshape(-1, vector.shape[-1]).float()


def _assign(pipe, vectors: dict[str, torch.Tensor], source: str) -> list[tuple[str, str, torch.Tensor]]:
    """(tokenizer name, text encoder name, vectors [n, D]) for each encoder of ``pipe`` the embedding feeds."""
    present = [(t, e) for t, e in TEXT_ENCODERS if getattr(pipe, e, None) is not None]
    if "vectors" in vectors:
        if len(present) != 1:
            raise ValueError(f"{source}: a one-encoder embedding (SD 1.x / 2.x), but this pipeline has the text "
                             f"encoders {[e for _, e in present]}; an SDXL embedding holds 'clip_l' and 'clip_g'")
        return [(*present[0], vectors["vectors"])]
    if getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError(f"{source}: an SDXL embedding ('clip_l', 'clip_g'), but this pipeline has one text encoder")
    wanted = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    out = []
    for tok, enc in present:
        if wanted[enc] not in vectors:
            raise ValueError(f"{source}: an SDXL embedding without {wanted[enc]!r}, needed for {enc}")
        out.append((tok, enc, vectors[wanted[enc]]))
    return out


def load_textual_inversion(pipe, path_or_state, token: str | None = None, allow_pickle: bool = False) -> list[str]:
    """Add a learned word to ``pipe``'s tokenizer(s) and text encoder(s); returns the tokens added.

    The book's own: ``"shapes-star"`` (the word ``<star>``, learned with the U-Net frozen) and
    ``"shapes-star-tuned"`` (learned together with the LoRA of the same name).

    ``path_or_state``: a ``.safetensors`` file (or a pickled ``.pt``/``.bin`` with
    ``allow_pickle=True``), a state dict, or a tensor [n, D] with ``token``.
    n vectors add ``token, token_1, ..., token_{n-1}``; ``token`` in a prompt
    stands for all of them. Checked before anything changes: the tokens must be
    new to every tokenizer, the width must match each encoder.
    """
    token, vectors, source = read_embedding(path_or_state, token, allow_pickle)
    plan = _assign(pipe, vectors, source)
    counts = {rows.shape[0] for _, _, rows in plan}
    if len(counts) != 1:
        raise ValueError(f"{source}: 'clip_l' and 'clip_g' hold different numbers of vectors ({sorted(counts)})")
    n = counts.pop()
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
    for tok_name, enc_name, rows in plan:
        tokenizer, encoder = getattr(pipe, tok_name), getattr(pipe, enc_name)
        width = encoder.embeddings.token_embedding.embedding_dim
        if rows.shape[1] != width:
            raise ValueError(f"{source}: the embedding's vectors are {rows.shape[1]} wide, but {enc_name} is "
                             f"{width} wide (an embedding for another model: SD 1.x 768, SD 2.x 1024, "
                             "SDXL 768 + 1280)")
        for t in tokens:
            if t in tokenizer.encoder:
                raise ValueError(f"token {t!r} is already in the vocabulary of {tok_name}; choose another "
                                 "with token=")
        if max(tokenizer.decoder) >= encoder.embeddings.token_embedding.num_embeddings:
            raise ValueError(f"{tok_name} has ids beyond {enc_name}'s embedding table: they do not belong together")
    for tok_name, enc_name, rows in plan:
        tokenizer = getattr(pipe, tok_name)
        tokenizer.add_tokens(tokens, add_embedding_rows(getattr(pipe, enc_name), rows, tokenizer.eos_token_id))
    return tokens


# ---------------------------------------------------------------------------
# Hypernetworks (A1111)
# ---------------------------------------------------------------------------
# A1111's activation names: its own short list, then every torch.nn activation by its lower-cased class name
ACTIVATIONS: dict[str, type] = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
                                "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
ACTIVATIONS.update({name.lower(): cls for name, cls in vars(nn.modules.activation).items()
                    if isinstance(cls, type) and issubclass(cls, nn.Module) and name.lower() not in ACTIVATIONS
                    and cls.__module__ == "torch.nn.modules.activation"})


@dataclasses.dataclass
class HypernetworkOptions:
    """The shape of every MLP of a hypernetwork, with A1111's names and its defaults for old files.

    layer_structure: widths as multiples of w, first and last 1 ([1, 2, 1]: w -> 2w -> w);
    activation_func: after each Linear but the last (and the last too with
        ``activate_output``); None or "linear": none; is_layer_norm: a LayerNorm
    after each; dropout_structure: dropout after Linear i+1 when entry i+1 > 0
    (identity in inference, but it takes a place in the layer numbering).
    """

    layer_structure: list[float] = dataclasses.field(default_factory=lambda: [1, 2, 1])
    activation_func: str | None = None
    is_layer_norm: bool = False
    activate_output: bool = True
    dropout_structure: list[float] | None = None

    def __post_init__(self):
        s = self.layer_structure
        if len(s) < 2 or s[0] != 1 or s[-1] != 1:
            raise ValueError(f"layer_structure must start and end with 1, got {s}")
        if self.activation_func not in (None, *ACTIVATIONS):
            raise ValueError(f"unknown activation_func {self.activation_func!r}; known: {sorted(ACTIVATIONS)}")
        if self.dropout_structure is None:
            self.dropout_structure = [0.0] * len(s)
        if len(self.dropout_structure) != len(s):
            raise ValueError(f"dropout_structure {self.dropout_structure} must have one entry per entry of "
                             f"layer_structure {s}")

    @classmethod
    def from_a1111(cls, state: Mapping) -> "HypernetworkOptions":
        """The options of an A1111 file (``Hypernetwork.load``'s defaults for missing ones)."""
        structure = list(state.get("layer_structure") or [1, 2, 1])
        dropout = state.get("dropout_structure")
        if dropout is None:        # A1111's parse_dropout_structure
            if state.get("use_dropout", False):
                dropout = [0] + [0.3] * (len(structure) - 3) + [0.3 if state.get("last_layer_dropout") else 0] + [0]
            else:
                dropout = [0] * len(structure)
        return cls(structure, state.get("activation_func"), bool(state.get("is_layer_norm", False)),
                   bool(state.get("activate_output", True)), [float(d) for d in dropout])


class HypernetworkModule(nn.Module):
    """One MLP of a hypernetwork (names as A1111's: ``linear.0.weight``, ...).

    forward: x [B, T, w] -> x + strength * linear(x)   (A1111's HypernetworkModule.forward)
    """

    def __init__(self, width: int, options: HypernetworkOptions):
        super().__init__()
        s, layers = options.layer_structure, []
        for i in range(len(s) - 1):
            layers.append(nn.Linear(int(width * s[i]), int(width * s[i + 1])))
            last = i == len(s) - 2
            if options.activation_func not in (None, "linear") and (options.activate_output or not last):
                layers.append(ACTIVATIONS[options.activation_func]())
            if options.is_layer_norm:
                layers.append(nn.LayerNorm(int(width * s[i + 1])))
            if options.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(options.dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return x + strength * self.linear(x)


class Hypernetwork(nn.Module):
    """For each context width, two MLPs: ``layers[str(w)][0]`` for keys, ``[1]`` for values."""

    def __init__(self, widths: Iterable[int], options: HypernetworkOptions | None = None,
                 name: str = "hypernetwork", strength: float = 1.0):
        super().__init__()
        self.options = options or HypernetworkOptions()
        self.layers = nn.ModuleDict({str(w): nn.ModuleList([HypernetworkModule(w, self.options),
                                                            HypernetworkModule(w, self.options)])
                                     for w in sorted(set(widths))})
        self.name, self.strength, self.handles = name, strength, []

    @property
    def widths(self) -> list[int]:
        return sorted(int(w) for w in self.layers)

    @torch.no_grad()
    def init_weights(self, std: float = 0.01, generator: torch.Generator | None = None) -> "Hypernetwork":
        """A1111's "Normal" initialisation: weights N(0, std), biases 0 (LayerNorm: weight N(0, std) too)."""
        for p_name, p in self.named_parameters():
            if p_name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """ministd's safetensors keys: "{width}.{0|1}.linear.{i}.{weight|bias}"."""
        return {k.removeprefix("layers."): v for k, v in self.state_dict().items()}


def _hypernetwork_layers(state: Mapping) -> dict[int, tuple[Mapping, Mapping]]:
    """A1111's int-keyed layers {width: (state_k, state_v)}, old "linear1"/"linear2" names renamed."""
    old = {"linear1.": "linear.0.", "linear2.": "linear.1."}

    def renamed(sd: Mapping) -> dict:
        return {next((new + k[len(o):] for o, new in old.items() if k.startswith(o)), k): v for k, v in sd.items()}

    return {w: (renamed(pair[0]), renamed(pair[1])) for w, pair in state.items() if isinstance(w, int)}


def read_hypernetwork(path_or_state, allow_pickle: bool = False, name: str | None = None) -> Hypernetwork:
    """An A1111 hypernetwork (.pt with ``allow_pickle=True``, or its dict) or ministd's safetensors form."""
    state, metadata, source = _contents(path_or_state, allow_pickle, "hypernetwork")
    if any(isinstance(k, int) for k in state):                         # A1111's own dict
        layers = _hypernetwork_layers(state)
        options = HypernetworkOptions.from_a1111(state)
        name = name or state.get("name")
    else:                                                              # "{width}.{0|1}.linear...."
        options = HypernetworkOptions.from_a1111({k: json.loads(v) for k, v in metadata.items()
                                                  if k in ("layer_structure", "activation_func", "is_layer_norm",
                                                           "activate_output", "dropout_structure")})
        layers = {}
        for key, value in state.items():
            match = regex.fullmatch(r"(\d+)\.([01])\.(.+)", str(key))
            if match is None:
                other = _what_else(str(k) for k in state)
                raise ValueError(f"{source}: key {key!r} is not a hypernetwork layer ('<width>.<0|1>.linear.<i>."
                                 "weight')" + (f"; the file is {other}" if other else ""))
            layers.setdefault(int(match[1]), ({}, {}))[int(match[2])][match[3]] = value
        name = name or metadata.get("name")
    if not layers:
        raise ValueError(f"{source}: no hypernetwork layers found")
    stem = Path(path_or_state).stem if not isinstance(path_or_state, Mapping) else "hypernetwork"
    hypernetwork = Hypernetwork(layers, options, name=name or stem)
    for width, pair in layers.items():
        for index, part in enumerate(pair):
            load_strict(hypernetwork.layers[str(width)][index], part, source=f"{source} [{width}.{index}]")
    return hypernetwork.eval().requires_grad_(False)


def save_hypernetwork(hypernetwork: Hypernetwork, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ministd's safetensors form (tensors + the options as JSON strings in the metadata)."""
    options = dataclasses.asdict(hypernetwork.options)
    metadata = {k: json.dumps(v) for k, v in options.items()} | {"name": hypernetwork.name}
    write_safetensors(path, hypernetwork.tensors(), dtype=dtype, metadata=metadata)
    return Path(path)


def _transform_context(hypernetwork: Hypernetwork, index: int) -> Callable:
    """A forward pre-hook for to_k (index 0) or to_v (1): context c -> c + strength * f(c)."""
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if hypernetwork.strength == 0:
            return None                                   # None: the input stays as it is
        (context,) = args
        mlp = hypernetwork.layers[str(context.shape[-1])][index]
        _follow(mlp, module.weight)
        return (mlp(context, hypernetwork.strength),)
    return hook


def add_hypernetwork(pipe, hypernetwork: Hypernetwork) -> Hypernetwork:
    """Hook ``hypernetwork`` before to_k / to_v of every U-Net attention layer whose context
    width it has (self- and cross-attention alike, as A1111); several chain in order. The MLPs
    run in the U-Net's dtype and device."""
    attention = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    matched = [m for m in attention if str(m.to_k.in_features) in hypernetwork.layers]
    if not matched:
        widths = sorted({m.to_k.in_features for m in attention})
        raise ValueError(f"hypernetwork {hypernetwork.name!r} has MLPs for widths {hypernetwork.widths}, but this "
                         f"U-Net's attention layers read contexts of widths {widths}: made for another model?")
    weight = pipe.unet.conv_in.weight
    hypernetwork.to(device=weight.device, dtype=weight.dtype)
    for m in matched:
        hypernetwork.handles.append(m.to_k.register_forward_pre_hook(_transform_context(hypernetwork, 0)))
        hypernetwork.handles.append(m.to_v.register_forward_pre_hook(_transform_context(hypernetwork, 1)))
    _registry(pipe, "hypernetworks").append(hypernetwork)
    return hypernetwork


def load_hypernetwork(pipe, path_or_state, strength: float = 1.0, allow_pickle: bool = False) -> Hypernetwork:
    """Apply an A1111 hypernetwork (a file, a state dict, or the book's ``"shapes-outline"``) at
    ``strength`` (0 = no change; ``.strength`` may be changed later)."""
    hypernetwork = read_hypernetwork(path_or_state, allow_pickle)
    hypernetwork.strength = _check_number(strength, "strength")
    return add_hypernetwork(pipe, hypernetwork)


def unload_hypernetwork(pipe) -> None:
    """Remove every hypernetwork: the U-Net is bitwise as before."""
    hypernetworks = _registry(pipe, "hypernetworks")
    for hypernetwork in hypernetworks:
        for handle in hypernetwork.handles:
            handle.remove()
        hypernetwork.handles.clear()
    hypernetworks.clear()
