"""Real checkpoints: what a file holds, and loading single original files (chapter 15).

    info = inspect("v1-5-pruned-emaonly.safetensors")   # the header only: no weights are read
    print(info.summary())                                 # family, layout, parameters per network
    pipe = load_single_file("v1-5-pruned-emaonly.safetensors", dtype=torch.float16)
    pipe = ministd.load_pipeline("v1-5-pruned-emaonly.safetensors")   # the same, through the front door
    base = ministd.load_pipeline("sd_xl_base_1.0.safetensors")           # SDXL: a StableDiffusionXLPipeline

Stable Diffusion reaches readers in two layouts:

- a **diffusers folder**: ``model_index.json`` and one folder per component
  (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), each
  with its own config; loaded by :meth:`ministd.pipelines.StableDiffusionPipeline.from_folder`;
- a **single original file**, as the training code saved it (CompVis ``ldm`` for
  SD 1.x/2.x, Stability ``sgm`` for SDXL): one flat dict of tensors, each
  network under a prefix (:data:`SINGLE_FILE_PREFIXES`), and no config at all.

A single file's configs are therefore read off the tensors' names and shapes
(channels, levels, layers, widths all show), and what the tensors cannot show
comes from the family's own rules (:data:`FAMILY_RULES`, :data:`TEXT_ENCODERS`):
SD 1.x U-Nets use 8 attention heads, SD 2.x and SDXL U-Nets and every CLIP
text encoder heads 64 wide; CLIP-L (SD 1.x, SDXL's first encoder) uses
quick-GELU, OpenCLIP (SD 2.x's ViT-H, SDXL's bigG) GELU; SD 2.x runs its text
encoder to the penultimate layer and stores one layer more, SDXL keeps every
layer of bigG (its pooled output reads the last one); the VAE normalises in
groups of 32 and scales latents by 0.18215 (SDXL: 0.13025); SDXL's U-Net
embeds 6 size-and-crop numbers (the refiner 5, with the aesthetic score), so
the width of each of their Fourier embeddings follows from the added-vector
width. A file that breaks those rules (a fine-tune with other head counts, a
tiny test model) loads with ``config=`` naming a diffusers folder (or a dict)
with the right configs.

Everything is checked before any weight is read: the safetensors header
(:func:`read_safetensors_header`) gives every name, shape and dtype, the
networks are built on PyTorch's ``meta`` device (no memory), and their names
and shapes compared with the file's. Only then is each tensor read, once,
straight into the dtype asked for, and handed to the network as its parameter
(``load_state_dict(assign=True)``): no random initialisation to overwrite, no
float32 copy on the way to float16.

Released files carry a few extras that are not network weights (the training
noise schedule, EMA copies, CLIP's position ids); they are skipped by name
(:data:`KNOWN_EXTRAS`). Any other key the networks do not use, or any key they
need and the file lacks, is an error that names it.

Pickled checkpoints (``.ckpt``, ``.bin``, ``.pt``) can run arbitrary code when
opened, so they are refused unless ``allow_pickle=True``, which reads them with
``torch.load(weights_only=True)`` (tensors and plain containers only).

SD 1.x / SD 2.x files load as a :class:`ministd.pipelines.StableDiffusionPipeline`,
SDXL base and refiner files as a :class:`ministd.pipelines.StableDiffusionXLPipeline`
(the refiner with its one text encoder, ``tokenizer``/``text_encoder`` None).
SDXL inpainting files (9-channel) are recognised but not loaded: ministd has
no SDXL inpainting pipeline yet.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ministd.samplers import from_scheduler_config
from ministd.text import CLIPTextConfig, CLIPTextModel, openclip_to_ministd, transformers_to_ministd
from ministd.tokenizer import CLIPTokenizer
from ministd.unet import ORIGINAL_PREFIX, UNet, UNetConfig, config_from_original, from_diffusers_config, original_key_map
from ministd.vae import (SD_SCALING_FACTOR, SDXL_SCALING_FACTOR, AutoencoderKL, VAEConfig,
                         convert_original_vae_state_dict)
from ministd.weights import (TensorEntry, WeightsMismatchError, build_on_meta, dtype_name, read_json,
                             read_safetensors, read_safetensors_header)

# ---------------------------------------------------------------------------
# Families and layouts, as data
# ---------------------------------------------------------------------------

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl_base": "SDXL base", "sdxl_refiner": "SDXL refiner"}

# Where each network lives in a single original file (the ldm / sgm training code's module names;
# diffusers' loaders/single_file_utils.py reads the same).
SINGLE_FILE_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."},          # transformers' CLIP names
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.model."},                # OpenCLIP names
    "sdxl_base": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                  "text_encoder": "conditioner.embedders.0.transformer.",
                  "text_encoder_2": "conditioner.embedders.1.model."},
    "sdxl_refiner": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                     "text_encoder_2": "conditioner.embedders.0.model."},
}

# The text encoder's prefix tells the families apart (the U-Net alone could be
# any of them at a small size). Checked in this order: the first match wins.
FAMILY_MARKERS: list[tuple[str, str]] = [
    ("sdxl_base", "conditioner.embedders.1.model."),
    ("sdxl_refiner", "conditioner.embedders.0.model."),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
]

UNET_MARKER = ORIGINAL_PREFIX + "input_blocks.0.0.weight"     # [320, C_in, 3, 3]: C_in 4, or 9 for inpainting

# What the weights cannot show, per family (SD 1.5, SD 2.1, SDXL 1.0, from their diffusers configs):
#   unet_heads / unet_head_dim: 8 heads at every level (SD 1.x), or heads 64 wide (the rest);
#   upcast_attention: attention scores in float32 (SD 2.x: black pictures in float16 without);
#   image_size: the picture side it was trained at (SD 2.x v-models: 768, see default_image_size);
#   vae_scaling_factor: latents = VAE mean x this; time_ids: how many numbers SDXL's U-Net embeds
#   besides the pooled text (base: original size, crop, target size; refiner: the aesthetic
#   score instead of the target size); pipeline: the flags of its diffusers folder's model_index.json.
FAMILY_RULES: dict[str, dict] = {
    "sd1": dict(unet_heads=8, unet_head_dim=None, upcast_attention=False, image_size=512,
                vae_scaling_factor=SD_SCALING_FACTOR, time_ids=None, pipeline={}),
    "sd2": dict(unet_heads=None, unet_head_dim=64, upcast_attention=True, image_size=512,
                vae_scaling_factor=SD_SCALING_FACTOR, time_ids=None, pipeline={}),
    "sdxl_base": dict(unet_heads=None, unet_head_dim=64, upcast_attention=False, image_size=1024,
                      vae_scaling_factor=SDXL_SCALING_FACTOR, time_ids=6,
                      pipeline=dict(force_zeros_for_empty_prompt=True, requires_aesthetics_score=False)),
    "sdxl_refiner": dict(unet_heads=None, unet_head_dim=64, upcast_attention=False, image_size=1024,
                         vae_scaling_factor=SDXL_SCALING_FACTOR, time_ids=5,
                         pipeline=dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)),
}

# The text encoders of each family and what their weights cannot show (their transformers /
# OpenCLIP configs and tokenizer files): names: the layout under the prefix ("transformers":
# text_model.*, as saved by transformers; "openclip": fused q/k/v in_proj, ln_final,
# positional_embedding); act: the MLP's activation; drop_last_layer: the file stores one layer the pipeline never runs (SD 2.x uses
# the penultimate; SDXL's bigG keeps all, its pooled output reads the last); projection: load
# the text projection (SDXL's pooled vector) instead of skipping it; pad_token: its tokenizer's.
CLIP_L = dict(names="transformers", act="quick_gelu", drop_last_layer=False, projection=False,
              pad_token="<|endoftext|>")
OPENCLIP_H = dict(names="openclip", act="gelu", drop_last_layer=True, projection=False, pad_token="!")
OPENCLIP_BIGG = dict(names="openclip", act="gelu", drop_last_layer=False, projection=True, pad_token="!")
TEXT_ENCODERS: dict[str, dict[str, dict]] = {
    "sd1": {"text_encoder": CLIP_L},
    "sd2": {"text_encoder": OPENCLIP_H},
    "sdxl_base": {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG},
    "sdxl_refiner": {"text_encoder_2": OPENCLIP_BIGG},
}
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

TEXT_HEAD_DIM = 64          # every CLIP / OpenCLIP text encoder of SD: heads 64 wide
VAE_NORM_GROUPS = 32


def default_image_size(family: str, prediction_type: str) -> int:
    """The picture side a model was trained at: 1024 for SDXL, 768 for SD 2.x v-models (768-v), else 512."""
    return 768 if family == "sd2" and prediction_type == "v_prediction" else FAMILY_RULES[family]["image_size"]


# The scheduler each family's diffusers folder ships (SD 1.5: PNDM; SD 2.1: DDIM; SDXL base and
# refiner 1.0: Euler). For SDXL this is also diffusers' single-file default (diffusers 0.42,
# loaders/single_file_utils.py: SCHEDULER_DEFAULT_CONFIG + EulerDiscreteScheduler for xl_base/xl_refiner).
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}
SDXL_SCHEDULE = {"_class_name": "EulerDiscreteScheduler", **SD_SCHEDULE, "interpolation_type": "linear",
                 "use_karras_sigmas": False, "prediction_type": "epsilon"}
SCHEDULERS: dict[str, dict] = {
    "sd1": {"_class_name": "PNDMScheduler", **SD_SCHEDULE, "prediction_type": "epsilon"},
    "sd2": {"_class_name": "DDIMScheduler", **SD_SCHEDULE, "prediction_type": "v_prediction"},
    "sdxl_base": SDXL_SCHEDULE,
    "sdxl_refiner": SDXL_SCHEDULE,
}

_SCHEDULE = "the training noise schedule (rebuilt from the scheduler config)"
_EMA = "the EMA copy of the U-Net (use_ema=True loads it instead)"
# Keys of released files that are not network weights: glob pattern -> what it is.
KNOWN_EXTRAS: dict[str, str] = {
    "betas": _SCHEDULE, "alphas_cumprod": _SCHEDULE, "alphas_cumprod_prev": _SCHEDULE,
    "sqrt_alphas_cumprod": _SCHEDULE, "sqrt_one_minus_alphas_cumprod": _SCHEDULE,
    "log_one_minus_alphas_cumprod": _SCHEDULE, "sqrt_recip_alphas_cumprod": _SCHEDULE,
    "sqrt_recipm1_alphas_cumprod": _SCHEDULE, "posterior_variance": _SCHEDULE,
    "posterior_log_variance_clipped": _SCHEDULE, "posterior_mean_coef1": _SCHEDULE,
    "posterior_mean_coef2": _SCHEDULE, "lvlb_weights": _SCHEDULE,
    "logvar": "the per-timestep loss weights of training",
    "model_ema.*": _EMA,
    "*.position_ids": "CLIP's constant position ids 0..76",
    "cond_stage_model.model.logit_scale": "CLIP's contrastive temperature (unused for text encoding)",
    "cond_stage_model.model.text_projection": "SD 2.x's text projection (its U-Net reads the states before it)",
    "conditioner.embedders.*.model.logit_scale": "CLIP's contrastive temperature (unused for text encoding)",
    "denoiser.sigmas": "the training noise levels (rebuilt from the scheduler config)",
}

# Other kinds of file a reader may hand over: a key containing the marker -> what it is.
OTHER_FILES: list[tuple[str, str]] = [
    ("lora_unet_", "a LoRA adapter (kohya layout)"),
    ("lora_te", "a LoRA adapter (kohya layout)"),
    (".lora_down.", "a LoRA adapter"),
    (".lora_A.", "a LoRA adapter (PEFT layout)"),
    (".lora.down.", "a LoRA adapter (diffusers layout)"),
    ("joint_blocks.", "a Stable Diffusion 3 model (MMDiT)"),
    ("double_blocks.", "a Flux model"),
    ("control_model.", "a ControlNet"),
    ("string_to_param", "a textual-inversion embedding"),
    ("emb_params", "a textual-inversion embedding"),
]
_LORA_HINT = "an adapter, not a whole model: load a base checkpoint and apply the adapter to it"
_SUPPORTED = ("ministd loads SD 1.x, SD 2.x, SDXL base and SDXL refiner checkpoints "
              "(and SD 1.x / 2.x 9-channel inpainting ones)")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------------------
# Reading a file's table of contents (no tensors)
# ---------------------------------------------------------------------------

class _Tensors:
    """The tensors of one checkpoint file: names, shapes and dtypes at once; values on demand."""

    def __init__(self, path: Path, entries: dict[str, TensorEntry], metadata: Mapping[str, str],
                 values: Mapping[str, torch.Tensor] | None = None, global_step: int | None = None):
        self.path = path
        self.entries = entries
        self.metadata = dict(metadata)
        self.global_step = global_step
        self._values = values            # pickles: already in memory (memory-mapped where possible)

    @classmethod
    def open(cls, path: Path, allow_pickle: bool = False) -> "_Tensors":
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ValueError(
                    f"{path}: a pickled checkpoint ({path.suffix}); opening a pickle can run any code it "
                    "holds, so ministd does not by default. Convert it to .safetensors, or pass "
                    "allow_pickle=True (command line: --allow-pickle) to read it with "
                    "torch.load(weights_only=True), which accepts tensors only")
            return cls._open_pickle(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file (or a pickled .ckpt/.bin/.pt with "
                             f"allow_pickle=True), got a {path.suffix or 'suffix-less'} file")
        entries, metadata = read_safetensors_header(path)
        return cls(path, entries, metadata)

    @classmethod
    def _open_pickle(cls, path: Path) -> "_Tensors":
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):            # old (non-zip) format: no memory map
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling raises many kinds; all mean "not readable"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: cannot be read as a tensors-only PyTorch checkpoint "
                             f"(torch.load(weights_only=True) says: {first[:200]})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
        global_step = obj.get("global_step") if isinstance(obj.get("global_step"), int) else None
        state = obj.get("state_dict", obj)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: its 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
        values = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        entries = {k: TensorEntry(tuple(v.shape), v.dtype) for k, v in values.items()}
        return cls(path, entries, {}, values, global_step)

    def meta(self, keys: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """{new name: empty meta tensor with the file tensor's shape} for ``keys`` = {file key: new name}."""
        return {new: torch.empty(self.entries[k].shape, dtype=self.entries[k].dtype, device="meta")
                for k, new in keys.items()}

    def load(self, keys: Mapping[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{new name: tensor} read from the file once, floating-point ones in ``dtype``
        (:func:`ministd.weights.read_safetensors`)."""
        if self._values is not None:
            return {new: self._cast(self._values[k], dtype) for k, new in keys.items()}
        tensors = read_safetensors(self.path, dtype=dtype, keys=keys)
        return {new: tensors.pop(key) for key, new in keys.items()}

    @staticmethod
    def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t


# ---------------------------------------------------------------------------
# What is it?  inspect()
# ---------------------------------------------------------------------------

@dataclass
class ComponentInfo:
    """One network of a checkpoint: where it lives, how big it is, how it is stored."""

    name: str
    where: str                      # the prefix in a single file, the folder in a diffusers folder
    tensors: int = 0
    parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)   # dtype name -> number of tensors

    def add(self, entry: TensorEntry) -> None:
        self.tensors += 1
        self.parameters += entry.numel
        name = dtype_name(entry.dtype)
        self.dtypes[name] = self.dtypes.get(name, 0) + 1


@dataclass
class CheckpointInfo:
    """What :func:`inspect` found: family, layout, and each network's size and dtypes."""

    path: Path
    layout: str                     # "single file" | "diffusers folder"
    family: str                     # a key of FAMILY_NAMES
    in_channels: int                # U-Net input channels: 4, or 9 for inpainting
    prediction_type: str | None     # as the folder's scheduler says; None: a single file does not say
    components: dict[str, ComponentInfo]
    skipped: dict[str, int] = field(default_factory=dict)     # why a key is not a weight -> how many
    unknown: list[str] = field(default_factory=list)          # keys that belong to nothing known
    has_ema: bool = False

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def family_name(self) -> str:
        name = FAMILY_NAMES[self.family]
        return f"{name} inpainting (9-channel U-Net)" if self.inpainting else name

    def summary(self) -> str:
        """A few lines for people: what :command:`python -m ministd info` prints."""
        lines = [f"{self.path}", f"  layout:     {self.layout}", f"  family:     {self.family_name}"]
        if self.prediction_type is not None:
            lines.append(f"  prediction: {self.prediction_type}")
        elif self.family == "sd2" and not self.inpainting:
            lines.append("  prediction: not recorded in the file (SD 2.x 768-v: v_prediction, "
                         "SD 2.x base 512: epsilon)")
        lines.append(f"  {'component':<16}{'parameters':>15}  dtypes")
        for comp in self.components.values():
            dtypes = ", ".join(f"{d}" if len(comp.dtypes) == 1 else f"{d} ({n} tensors)"
                               for d, n in comp.dtypes.items()) or "-"
            lines.append(f"  {comp.name:<16}{comp.parameters:>15,}  {dtypes}   [{comp.where}]")
        total = sum(c.parameters for c in self.components.values())
        lines.append(f"  {'total':<16}{total:>15,}")
        if self.has_ema:
            lines.append("  has an EMA copy of the U-Net (model_ema.*; load it with use_ema=True)")
        for why, count in self.skipped.items():
            lines.append(f"  skipped: {count} tensor(s): {why}")
        if self.unknown:
            shown = ", ".join(self.unknown[:5]) + (f", ... ({len(self.unknown)} in all)" if len(self.unknown) > 5 else "")
            lines.append(f"  unknown keys (loading will refuse them): {shown}")
        return "\n".join(lines)


def inspect(path: str | Path, allow_pickle: bool = False) -> CheckpointInfo:
    """Describe a checkpoint without loading its weights.

    ``path``: a diffusers folder (``model_index.json``) or a single original
    file (``.safetensors``; ``.ckpt``/``.bin``/``.pt`` only with ``allow_pickle``).
    Raises FileNotFoundError for a missing path and ValueError (naming the file)
    for anything that is not an SD checkpoint: damaged files, LoRA adapters,
    other model families.
    """
    path = Path(path)
    if path.is_dir():
        return _inspect_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a diffusers folder (with model_index.json) "
                                "or a single .safetensors file")
    tensors = _Tensors.open(path, allow_pickle)
    return _inspect_tensors(tensors)


def detect_family(entries: Mapping[str, TensorEntry], path: Path) -> tuple[str, int]:
    """(family, U-Net input channels) of a single file, from its key names and one shape.

    Raises ValueError saying what the file is when it is not an SD checkpoint.
    """
    for marker, what in OTHER_FILES:
        hit = next((k for k in entries if marker in k), None)
        if hit is not None:
            hint = _LORA_HINT if "LoRA" in what else _SUPPORTED
            raise ValueError(f"{path}: this is {what} (key {hit!r}), not a Stable Diffusion checkpoint; {hint}")
    if UNET_MARKER not in entries:
        raise ValueError(f"{path}: not a Stable Diffusion checkpoint in the original layout: no U-Net key "
                         f"{UNET_MARKER!r}{_first_keys_hint(entries)}")
    family = next((f for f, marker in FAMILY_MARKERS if any(k.startswith(marker) for k in entries)), None)
    if family is None:
        prefixes = sorted({m for _, m in FAMILY_MARKERS})
        raise ValueError(f"{path}: has a U-Net but no text encoder under any known prefix {prefixes}; "
                         f"{_SUPPORTED}{_first_keys_hint(entries)}")
    in_channels = entries[UNET_MARKER].shape[1]
    if in_channels not in (4, 9):
        raise ValueError(f"{path}: its U-Net takes {in_channels} input channels; ministd knows 4 (text to image) "
                         "and 9 (inpainting); 8 would be InstructPix2Pix, which it does not load")
    return family, in_channels


def _first_keys_hint(entries: Mapping[str, TensorEntry]) -> str:
    keys = sorted(entries)[:3]
    return f" (its first keys: {keys})" if keys else " (it holds no tensors)"


def _extra_reason(key: str) -> str | None:
    """Why ``key`` is not a network weight, when it is a known extra; else None."""
    return next((why for pattern, why in KNOWN_EXTRAS.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _inspect_tensors(tensors: _Tensors) -> CheckpointInfo:
    family, in_channels = detect_family(tensors.entries, tensors.path)
    prefixes = SINGLE_FILE_PREFIXES[family]
    components = {name: ComponentInfo(name, prefix) for name, prefix in prefixes.items()}
    skipped: dict[str, int] = {}
    unknown = []
    for key, entry in tensors.entries.items():
        why = _extra_reason(key)
        owner = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
        elif owner is not None:
            components[owner].add(entry)
        else:
            unknown.append(key)
    return CheckpointInfo(tensors.path, "single file", family, in_channels, None,
                          {n: c for n, c in components.items() if c.tensors}, skipped, sorted(unknown),
                          has_ema=any(k.startswith("model_ema.diffusion_model") for k in tensors.entries))


# diffusers folders -------------------------------------------------------------

FOLDER_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")
SUPPORTED_PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                              "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
                              "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def _inspect_folder(folder: Path) -> CheckpointInfo:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
    index = read_json(index_path)
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_PIPELINE_CLASSES:
        raise ValueError(f"{index_path}: pipeline class {cls_name!r} is not supported; {_SUPPORTED} "
                         f"(pipeline classes {list(SUPPORTED_PIPELINE_CLASSES)})")
    listed = [c for c in FOLDER_COMPONENTS if isinstance(index.get(c), list) and index[c][0] is not None]
    missing = [c for c in listed if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: model_index.json lists component folder(s) {missing} that are missing")
    unet_config = read_json(folder / "unet" / "config.json")
    if "text_encoder_2" in listed:
        family = "sdxl_base" if "text_encoder" in listed else "sdxl_refiner"
    else:
        act = read_json(folder / "text_encoder" / "config.json").get("hidden_act", "quick_gelu")
        family = "sd2" if act == "gelu" else "sd1"
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    components = {}
    for name in listed:
        if name.startswith("tokenizer") or name == "scheduler":
            continue
        comp = ComponentInfo(name, f"{name}/")
        for weights in sorted((folder / name).glob("*.safetensors")):
            for entry in read_safetensors_header(weights)[0].values():
                comp.add(entry)
        if not comp.tensors:
            comp.dtypes = {"(no .safetensors weights)": 0}
        components[name] = comp
    return CheckpointInfo(folder, "diffusers folder", family, int(unet_config.get("in_channels", 4)),
                          scheduler.get("prediction_type", "epsilon"), components)


# ---------------------------------------------------------------------------
# Configs from the tensors (and the family's rules)
# ---------------------------------------------------------------------------

def _shape(sd: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{where}: missing key {key!r}")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix.{i}.`` there are (1 + the largest i)."""
    found = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
    return 1 + max(found) if found else 0


def text_config_from_weights(sd: Mapping[str, torch.Tensor], rules: Mapping, where: str,
                             layers: int | None = None) -> CLIPTextConfig:
    """A CLIP text encoder's config from its weights in ministd's names (transformers' without ``text_model.``).

    vocab x width from the token embedding [V, D], context length from the
    position embedding [77, D], layers counted, MLP width from ``fc1`` [I, D],
    the projection's width from ``text_projection`` [P, D] when ``rules`` (an
    entry of :data:`TEXT_ENCODERS`) keep it; heads 64 wide and the activation
    by those rules. ``layers`` keeps only the first ones (SD 2.x: all but the last).
    """
    vocab, width = _shape(sd, "embeddings.token_embedding.weight", where)
    if width % TEXT_HEAD_DIM:
        raise ValueError(f"{where}: text width {width} is not a multiple of the 64-wide heads of SD's text "
                         "encoders; give config= with the text encoder's config.json")
    stored = _count(sd, "encoder.layers.")
    projection = _shape(sd, "text_projection.weight", where)[0] if rules["projection"] else None
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_layers=stored if layers is None else layers,
                          num_heads=width // TEXT_HEAD_DIM,
                          intermediate_size=_shape(sd, "encoder.layers.0.mlp.fc1.weight", where)[0],
                          hidden_act=rules["act"], projection_dim=projection,
                          max_position_embeddings=_shape(sd, "embeddings.position_embedding.weight", where)[0])


def vae_config_from_weights(sd: Mapping[str, torch.Tensor], image_size: int, where: str,
                            scaling_factor: float = SD_SCALING_FACTOR) -> VAEConfig:
    """An AutoencoderKL config from its weights in diffusers' names.

    Levels and their channels from ``encoder.down_blocks.{i}.resnets.0.conv2``,
    blocks per level counted, latent channels from ``decoder.conv_in`` [C, z, 3, 3];
    GroupNorm's 32 groups by SD's rule, ``scaling_factor`` by the family's
    (0.18215 SD 1.x / 2.x, 0.13025 SDXL); ``image_size`` becomes the default tile side.
    Decoding stays in float32 under float16 weights (``force_upcast``), as the reference does.
    """
    levels = _count(sd, "encoder.down_blocks.")
    if levels == 0:
        raise ValueError(f"{where}: no encoder.down_blocks: not an AutoencoderKL")
    channels = [_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", where)[0] for i in range(levels)]
    return VAEConfig(in_channels=_shape(sd, "encoder.conv_in.weight", where)[1],
                     out_channels=_shape(sd, "decoder.conv_out.weight", where)[0],
                     block_out_channels=tuple(channels),
                     layers_per_block=_count(sd, "encoder.down_blocks.0.resnets."),
                     latent_channels=_shape(sd, "decoder.conv_in.weight", where)[1],
                     norm_num_groups=VAE_NORM_GROUPS, scaling_factor=scaling_factor, force_upcast=True,
                     mid_block_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
                     use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
                     sample_size=image_size)


def unet_config_from_weights(sd: Mapping[str, torch.Tensor], family: str, prediction_type: str,
                             where: str, pooled_dim: int | None = None) -> UNetConfig:
    """The U-Net config from original-layout weights (see :func:`ministd.unet.config_from_original`),
    with the family's heads rule and its default picture size (:func:`default_image_size`, in latents).

    SDXL: the added vector ``label_emb.0.0.weight`` [C, A] is the pooled text (``pooled_dim``,
    the second text encoder's projection) followed by ``time_ids`` Fourier embeddings of equal
    width, so that width is (A - pooled_dim) / time_ids (256 in SDXL 1.0: 2816 = 1280 + 6 x 256,
    refiner 2560 = 1280 + 5 x 256).
    """
    rules = FAMILY_RULES[family]
    size = default_image_size(family, prediction_type) // 8
    time_dim = 256
    if rules["time_ids"] is not None:
        if "label_emb.0.0.weight" not in sd:
            raise ValueError(f"{where}: an {FAMILY_NAMES[family]} file whose U-Net has no added-vector "
                             "embedding (label_emb.0.0.weight): not an SDXL U-Net")
        added = sd["label_emb.0.0.weight"].shape[1]
        time_dim, rest = divmod(added - pooled_dim, rules["time_ids"])
        if rest or time_dim < 1:
            raise ValueError(f"{where}: the U-Net's added vector is {added} wide, which is not the "
                             f"{pooled_dim}-wide pooled text plus {rules['time_ids']} equal time-id embeddings")
    try:
        return config_from_original(sd, num_heads=rules["unet_heads"], head_dim=rules["unet_head_dim"],
                                    addition_time_embed_dim=time_dim, norm_num_groups=32,
                                    upcast_attention=rules["upcast_attention"], sample_size=size)
    except KeyError as err:
        raise ValueError(f"{where}: missing key {err.args[0]!r}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}; if this model breaks {FAMILY_NAMES[family]}'s rules, "
                         "give config= with the unet's config.json") from None


# ---------------------------------------------------------------------------
# Building a network on the meta device and loading it
# ---------------------------------------------------------------------------

@dataclass
class _Plan:
    """One network, checked and ready to load: built on the meta device, with the file keys it reads."""

    name: str
    model: nn.Module                                  # on the meta device until loaded
    source: _Tensors                                  # the file it reads
    keys: dict[str, str]                              # file key -> the name ``convert`` expects
    convert: Callable[[dict], dict]                   # those names -> the model's parameter names

    def load(self, dtype: torch.dtype) -> nn.Module:
        """Read the tensors (once, in ``dtype``) and make them the model's parameters."""
        state = {k: v.contiguous() for k, v in self.convert(self.source.load(self.keys, dtype)).items()}
        self.model.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:  # state outside the state dict would need building for real
            raise RuntimeError(f"{self.name}: {left[:3]} were not loaded")
        self.model.eval()
        if isinstance(self.model, AutoencoderKL) and dtype == torch.float16 and self.model.config.force_upcast:
            self.model.upcast_decoder()       # decodes in float32 under float16 (not bfloat16: float32's range)
        return self.model


def _check(model: nn.Module, converted: Mapping[str, torch.Tensor], where: str,
           name_back: Callable[[str], str] = lambda k: k) -> None:
    """Names and shapes of ``converted`` must be exactly the model's: else WeightsMismatchError
    (keys named by ``name_back``, e.g. as the file writes them)."""
    own = model.state_dict()
    missing = sorted(name_back(k) for k in own if k not in converted)
    unexpected = sorted(name_back(k) for k in converted if k not in own)
    mismatched = [(name_back(k), tuple(converted[k].shape), tuple(own[k].shape))
                  for k in sorted(own) if k in converted and converted[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(where, missing, unexpected, mismatched)


def _unet_plan(tensors: _Tensors, keys: dict[str, str], family: str, prediction_type: str,
               override: Mapping | None, pooled_dim: int | None = None) -> _Plan:
    """``keys``: file key -> original-layout name without the prefix (``input_blocks.0.0.weight``);
    ``pooled_dim``: SDXL's pooled text width (the second text encoder's projection)."""
    where = f"{tensors.path} [U-Net, {ORIGINAL_PREFIX}]"
    meta = tensors.meta(keys)
    config = (from_diffusers_config(override) if override is not None
              else unet_config_from_weights(meta, family, prediction_type, where, pooled_dim))
    model = build_on_meta(lambda: UNet(config))
    to_original = original_key_map(model)
    to_ours = {v: k for k, v in to_original.items()}

    def convert(sd: dict) -> dict:
        return {to_ours.get(k, k): v for k, v in sd.items()}

    _check(model, convert(meta), where, name_back=lambda k: to_original.get(k, k))
    return _Plan("unet", model, tensors, keys, convert)


def _vae_plan(tensors: _Tensors, keys: dict[str, str], image_size: int, override: Mapping | None,
              original_layout: bool = True, scaling_factor: float = SD_SCALING_FACTOR) -> _Plan:
    """``keys``: file key -> VAE name in the original layout without ``first_stage_model.``
    (``encoder.down.0.block.0.conv1.weight``), or in diffusers' (``encoder.down_blocks.0.resnets.0...``)."""
    where = f"{tensors.path} [VAE, {'original' if original_layout else 'diffusers'} layout]"
    convert = convert_original_vae_state_dict if original_layout else dict
    meta = convert(tensors.meta(keys))
    config = (VAEConfig.from_dict(override) if override is not None
              else vae_config_from_weights(meta, image_size, where, scaling_factor))
    model = build_on_meta(lambda: AutoencoderKL(config))
    _check(model, meta, where)
    return _Plan("vae", model, tensors, keys, convert)


TEXT_CONVERTERS = {"transformers": transformers_to_ministd, "openclip": openclip_to_ministd}


def _text_plan(tensors: _Tensors, keys: dict[str, str], family: str, name: str, override: Mapping | None,
               skipped: dict[str, str]) -> _Plan:
    """``keys``: file key -> name without the text encoder's prefix; ``name``: ``text_encoder`` or
    ``text_encoder_2`` (its rules: :data:`TEXT_ENCODERS`). Layers past the config's (SD 2.x's
    last, which it never runs) are dropped from ``keys`` and noted in ``skipped``."""
    rules = TEXT_ENCODERS[family][name]
    where = f"{tensors.path} [{name.replace('_', ' ')}, {SINGLE_FILE_PREFIXES[family][name]}]"   # "text encoder 2"
    convert = TEXT_CONVERTERS[rules["names"]]
    meta = convert(tensors.meta(keys))
    if override is not None:
        config = CLIPTextConfig.from_transformers(override)
    else:
        stored = _count(meta, "encoder.layers.")
        drop = rules["drop_last_layer"] and stored > 1
        config = text_config_from_weights(meta, rules, where, layers=stored - 1 if drop else None)
    if rules["drop_last_layer"]:
        layer_prefix = "transformer.resblocks." if rules["names"] == "openclip" else "text_model.encoder.layers."
        for key, short in list(keys.items()):
            if short.startswith(layer_prefix) and int(short[len(layer_prefix):].split(".")[0]) >= config.num_layers:
                skipped[key] = f"the text encoder's layers from {config.num_layers} on (SD 2.x runs the penultimate)"
                del keys[key]
        meta = convert(tensors.meta(keys))
    model = build_on_meta(lambda: CLIPTextModel(config))
    _check(model, meta, where)
    return _Plan(name, model, tensors, keys, convert)


def _vae_file_plan(vae: Path, image_size: int, override: Mapping | None, scaling_factor: float) -> _Plan:
    """``vae=`` a .safetensors file, in the original layout (with or without ``first_stage_model.``)
    or in diffusers' (a ``vae/diffusion_pytorch_model.safetensors``)."""
    tensors = _Tensors.open(vae)
    keys = {k: k.removeprefix("first_stage_model.") for k in tensors.entries if _extra_reason(k) is None}
    diffusers_layout = any(".down_blocks." in k or ".up_blocks." in k for k in keys.values())
    original_layout = any(".down." in k or ".up." in k for k in keys.values())
    if not diffusers_layout and not original_layout:
        raise ValueError(f"vae={vae}: not a VAE: expected keys such as encoder.down.0.block.0.conv1.weight "
                         "(original layout) or encoder.down_blocks.0.resnets.0.conv1.weight (diffusers)"
                         + _first_keys_hint(tensors.entries))
    return _vae_plan(tensors, keys, image_size, override, original_layout=not diffusers_layout,
                     scaling_factor=scaling_factor)


# ---------------------------------------------------------------------------
# load_single_file()
# ---------------------------------------------------------------------------

def _split_keys(tensors: _Tensors, family: str, use_ema: bool, own_vae: bool
                ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """File keys -> {network: {file key: key without its prefix}}, plus {skipped key: why}.

    Raises ValueError naming the keys that belong to no network and are no known extra.
    """
    prefixes = SINGLE_FILE_PREFIXES[family]
    parts: dict[str, dict[str, str]] = {name: {} for name in prefixes}
    skipped: dict[str, str] = {}
    unknown, ema = [], []
    for key in tensors.entries:
        owner = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        why = _extra_reason(key)
        if use_ema and key.startswith("model_ema."):
            ema.append(key)
        elif owner == "vae" and own_vae:
            skipped[key] = "the file's own VAE (vae= replaces it)"
        elif why is not None:
            skipped[key] = why
        elif owner is not None:
            parts[owner][key] = key[len(prefixes[owner]):]
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:10]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise ValueError(f"{tensors.path}: keys that belong to no {FAMILY_NAMES[family]} network and are no "
                         f"known extra: {shown}")
    for name in ("unet",) + (() if own_vae else ("vae",)):
        if not parts[name]:
            hint = "; give a separate VAE file with vae=" if name == "vae" else ""
            raise ValueError(f"{tensors.path}: no {name} weights under {prefixes[name]!r}{hint}")
    if use_ema:
        parts["unet"] = _ema_unet_keys(tensors, parts["unet"], ema, skipped)
    return parts, skipped


EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def _ema_unet_keys(tensors: _Tensors, unet: dict[str, str], ema: list[str], skipped: dict[str, str]
                   ) -> dict[str, str]:
    """use_ema=True: the U-Net's file keys taken from its EMA copy instead.

    The ldm code names the EMA copy of ``model.diffusion_model.input_blocks.0.0.weight``
    ``model_ema.diffusion_modelinput_blocks00weight`` (the name after ``model.``, dots removed).
    """
    wanted = {"model_ema." + ("diffusion_model." + name).replace(".", ""): name for name in unet.values()}
    present = set(ema)
    if not present & wanted.keys():
        raise ValueError(f"{tensors.path}: use_ema=True, but the file has no EMA copy of the U-Net (model_ema.*); "
                         "many released files are the EMA weights already ('emaonly'): load it without use_ema")
    missing = sorted(wanted.keys() - present)
    strays = sorted(present - wanted.keys() - set(EMA_BOOKKEEPING))
    if missing or strays:
        raise ValueError(f"{tensors.path}: the EMA copy of the U-Net does not match its weights: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(strays)} unknown (e.g. {strays[:3]})")
    skipped.update({k: "the EMA's bookkeeping" for k in present & set(EMA_BOOKKEEPING)})
    skipped.update({k: "the training (non-EMA) U-Net: use_ema=True loads the EMA copy" for k in unet})
    return wanted


def _prediction_type(family: str, in_channels: int, asked: str | None, scheduler: Mapping | None,
                     tensors: _Tensors) -> str:
    """What the U-Net predicts. SD 2.x files do not say; this follows diffusers' single-file rule."""
    if asked is not None:
        if asked not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {asked!r}")
        return asked
    if scheduler is not None and "prediction_type" in scheduler:
        return scheduler["prediction_type"]
    if family == "sd2" and in_channels == 4:
        # diffusers 0.42 (loaders/single_file_utils.py, _legacy_load_scheduler): SD 2.x is v_prediction
        # unless the checkpoint's global_step is 875000 (SD 2.0 base); its default path takes the
        # scheduler of stabilityai/stable-diffusion-2-1 (v_prediction). Safetensors carry no global_step.
        guess = "epsilon" if tensors.global_step == 875000 else "v_prediction"
        warnings.warn(
            f"{tensors.path.name}: an SD 2.x checkpoint, whose file does not record what its U-Net predicts; "
            f"assuming prediction_type={guess!r} (diffusers' rule: SD 2.x 768-v models predict v, "
            "the 512 base models epsilon). Pass prediction_type='v_prediction' or 'epsilon' to choose; "
            "the wrong one gives washed-out or noisy pictures.", UserWarning, stacklevel=3)
        return guess
    return "epsilon"


_CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                 "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json",
                 "scheduler": "scheduler/scheduler_config.json"}
_TOKENIZERS = ("tokenizer", "tokenizer_2")


def _config_override(config: str | Path | Mapping | None) -> dict:
    """``config=``: a diffusers folder (its component configs, and tokenizer/, tokenizer_2/ if present)
    or a dict {"unet": {...}, "vae": {...}, "text_encoder": {...}, "text_encoder_2": {...},
    "scheduler": {...}} of the same JSON contents (tokenizers as folder paths)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(_CONFIG_FILES) - set(_TOKENIZERS))
        if unknown:
            raise ValueError(f"config= has unknown component(s) {unknown}; allowed: "
                             f"{sorted(_CONFIG_FILES) + list(_TOKENIZERS)}")
        return dict(config)
    folder = Path(config)
    if not folder.is_dir():
        raise FileNotFoundError(f"config={folder}: expected a diffusers folder with component configs "
                                f"({', '.join(_CONFIG_FILES.values())}) or a dict")
    found = {name: read_json(folder / rel) for name, rel in _CONFIG_FILES.items() if (folder / rel).is_file()}
    if not found:
        raise FileNotFoundError(f"config={folder}: none of {list(_CONFIG_FILES.values())} is there")
    found.update({name: folder / name for name in _TOKENIZERS if (folder / name).is_dir()})
    return found


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                     vae: str | Path | None = None, config: str | Path | Mapping | None = None,
                     use_ema: bool = False, allow_pickle: bool = False):
    """Load an SD 1.x / SD 2.x (or their 9-channel inpainting) or SDXL base / refiner single file.

    Args:
        path: the ``.safetensors`` file (``.ckpt``/``.bin``/``.pt`` only with ``allow_pickle``).
        dtype: every weight is read once, straight into this dtype (under float16 the VAE
            decoder is kept in float32, as the reference's SDXL pipeline does; bfloat16 has
            float32's range and decodes as it is).
        prediction_type: "epsilon" or "v_prediction". SD 2.x files do not record it;
            without it, diffusers' single-file rule decides (v_prediction, except for a
            pickled SD 2.0 base file at global_step 875000) and a warning says how to choose.
        vae: a separate VAE to use instead of the file's (e.g. the ft-MSE VAE, or SDXL's
            fp16-fix VAE): a ``.safetensors`` file in the original or the diffusers layout,
            or a diffusers ``vae/`` folder.
        config: a diffusers folder or a dict whose configs replace those read off the
            weights (for files that break their family's rules).
        use_ema: load the U-Net's EMA copy (``model_ema.*``) instead of its training weights.
        allow_pickle: read pickled files with ``torch.load(weights_only=True)``.

    Returns a :class:`ministd.pipelines.StableDiffusionPipeline` (SD 1.x / 2.x) or a
    :class:`ministd.pipelines.StableDiffusionXLPipeline` (SDXL base: both text encoders,
    ``force_zeros_for_empty_prompt``; refiner: ``text_encoder_2`` only,
    ``requires_aesthetics_score``), with the scheduler the family's diffusers folder
    ships (:data:`SCHEDULERS`). Raises FileNotFoundError / ValueError naming the file
    and what was expected (before reading any weight) for files that are damaged, of
    another kind or family, or whose keys or shapes do not fit.
    """
    from ministd.pipelines import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    tensors = _Tensors.open(path, allow_pickle)
    family, in_channels = detect_family(tensors.entries, path)
    if family.startswith("sdxl") and in_channels == 9:
        raise ValueError(f"{path}: an SDXL inpainting checkpoint (9-channel U-Net); ministd has no SDXL "
                         "inpainting pipeline yet (SDXL base and refiner files load, and SD 1.x / 2.x inpainting)")
    overrides = _config_override(config)
    prediction = _prediction_type(family, in_channels, prediction_type, overrides.get("scheduler"), tensors)
    parts, skipped = _split_keys(tensors, family, use_ema, own_vae=vae is not None)
    rules = FAMILY_RULES[family]

    # every check before any weight is read
    image_size = default_image_size(family, prediction)
    texts = [_text_plan(tensors, parts[name], family, name, overrides.get(name), skipped)
             for name in TEXT_ENCODERS[family]]
    pooled = texts[-1].model.config.projection_dim
    plans = [_unet_plan(tensors, parts["unet"], family, prediction, overrides.get("unet"), pooled), *texts]
    _check_context(path, plans[0].model.config.cross_attention_dim, [t.model.config for t in texts])
    vae_folder = None
    if vae is None:
        plans.append(_vae_plan(tensors, parts["vae"], image_size, overrides.get("vae"),
                               scaling_factor=rules["vae_scaling_factor"]))
    elif Path(vae).is_dir():
        vae_folder = Path(vae)                       # a diffusers vae/ folder: its own config and loader
    elif Path(vae).is_file():
        plans.append(_vae_file_plan(Path(vae), image_size, overrides.get("vae"), rules["vae_scaling_factor"]))
    else:
        raise FileNotFoundError(f"vae={vae}: no such file or folder")

    models = {plan.name: plan.load(dtype) for plan in plans}
    if vae_folder is not None:
        models["vae"] = AutoencoderKL.from_pretrained(vae_folder, dtype=dtype)
    scheduler = from_scheduler_config({**(overrides.get("scheduler") or SCHEDULERS[family]),
                                       "prediction_type": prediction})
    tokenizers = {}
    for name, text_rules in TEXT_ENCODERS[family].items():
        tok = TOKENIZER_OF[name]
        tokenizers[tok] = (CLIPTokenizer.from_pretrained(overrides[tok]) if tok in overrides
                           else CLIPTokenizer.from_vocab_file(pad_token=text_rules["pad_token"]))
    if rules["time_ids"] is None:
        return StableDiffusionPipeline(tokenizer=tokenizers["tokenizer"], text_encoder=models["text_encoder"],
                                       unet=models["unet"], vae=models["vae"], scheduler=scheduler)
    return StableDiffusionXLPipeline(tokenizer=tokenizers.get("tokenizer"), text_encoder=models.get("text_encoder"),
                                     tokenizer_2=tokenizers["tokenizer_2"], text_encoder_2=models["text_encoder_2"],
                                     unet=models["unet"], vae=models["vae"], scheduler=scheduler,
                                     **rules["pipeline"])


def _check_context(path: Path, context: int, text_configs: list[CLIPTextConfig]) -> None:
    """The U-Net attends to the text encoders' states side by side (SDXL: 768 + 1280 = 2048)."""
    widths = [c.hidden_size for c in text_configs]
    if context != sum(widths):
        raise ValueError(f"{path}: the U-Net attends to {context}-wide text states, but its text encoder(s) "
                         f"give {' + '.join(map(str, widths))}; the file mixes networks of different models")
