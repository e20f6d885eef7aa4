"""ControlNet: steering a frozen U-Net with an extra picture (chapter 16).

``down, mid = controlnet(latents, t, encoder_hidden_states, controlnet_cond, conditioning_scale)``

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models". The idea (their section 3): keep the trained U-Net locked,
make a *trainable copy* of its encoder half, feed that copy the noisy latents
*plus* the condition (edges, a pose, a depth map), and add what the copy
computes back into the locked U-Net's skip connections through convolutions
whose weights start at zero. Implemented here:

- the trainable copy (sec. 3.1): ``conv_in``, the timestep embedding (and
  SDXL's added embedding), ``down_blocks`` and ``mid_block``, the very classes
  of :mod:`ministd.unet`, so :meth:`ControlNetModel.from_unet` can copy a
  U-Net's weights in one ``load_state_dict``;
- the condition encoder E(c) (sec. 3.2, "a tiny network ... to encode
  image-space conditions ... into feature maps"): ``controlnet_cond_embedding``,
  3x3 convolutions with SiLU that take the control image from pixel resolution
  down to latent resolution (stride 2 between widths 16, 32, 96, 256: 8x for SD),
  added to ``conv_in``'s output;
- the zero convolutions (sec. 3.1, eq. 2): one 1x1 convolution per skip
  (``controlnet_down_blocks.N``) and one for the mid block
  (``controlnet_mid_block``), initialised to zero, so at the start of training
  the ControlNet adds exactly nothing and the U-Net draws what it drew before
  (the test ``from_unet`` checks it);
- ``conditioning_scale`` multiplies every residual (the web UIs' "control
  weight"); the pipelines add the residuals of several ControlNets (sec. 4.3,
  "multiple conditions"), and switch a ControlNet on only for a fraction of the
  steps (``control_guidance_start`` / ``end``).

The picture, for SD 1.5 at 512x512 (latents 64x64x4, control image 512x512x3)::

    control image [B,3,512,512] -controlnet_cond_embedding-> [B,320,64,64] --+
    latents [B,4,64,64] -conv_in-> [B,320,64,64] ---------------------------(+)
    down level 0..3 and mid block, exactly as the U-Net's encoder half
    each of the 12 skips -controlnet_down_blocks.N (1x1, zero-init)-> down residual N
    mid block output     -controlnet_mid_block     (1x1, zero-init)-> mid residual

    unet(latents, t, text, down_block_additional_residuals=down,
         mid_block_additional_residual=mid)      # residuals added to the U-Net's skips and mid

Parameter names are those of diffusers' ``ControlNetModel``, so a diffusers
folder (config.json + diffusion_pytorch_model.safetensors) loads as is; the
original single files (lllyasviel's ``control_model.*`` keys: ``input_blocks``,
``middle_block``, ``zero_convs.N.0``, ``middle_block_out.0``,
``input_hint_block.*``) load through the prefix table :func:`original_prefixes`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ministd import speed
from ministd import unet as _unet
from ministd.unet import DIFFUSERS_WEIGHTS, UNet, UNetConfig, build_encoder_half
from ministd.weights import (WeightsMismatchError, build_on_meta, load_model, load_strict, read_json,
                             read_weights, rename_by_prefix, save_model, strip_prefix, write_safetensors)

DATA = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"shapes-edges": DATA / "shapes_edges_controlnet.safetensors"}   # name -> weights (+ .json config)
ORIGINAL_PREFIX = "control_model."        # the key prefix of lllyasviel's original files


# --------------------------------------------------------------------------
# Configuration: the U-Net's, plus the condition encoder's
# --------------------------------------------------------------------------


@dataclass
class ControlNetConfig(UNetConfig):
    """A :class:`UNetConfig` (the encoder half it copies; the up-path fields are unused)
    plus the condition encoder's shape.

    ``conditioning_embedding_out_channels``: widths of the condition encoder; it
    halves the image size between each two, so (16, 32, 96, 256) takes a
    512x512 control image to 64x64, SD's latent size (the VAE's factor 8).
    ``conditioning_channel_order``: "rgb", or "bgr" for the few models trained on
    OpenCV's channel order (diffusers' ``controlnet_conditioning_channel_order``).
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_channel_order: str = "rgb"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.conditioning_embedding_out_channels = tuple(int(c) for c in self.conditioning_embedding_out_channels)
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels needs at least one width")
        if self.conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"conditioning_channel_order must be 'rgb' or 'bgr', "
                             f"got {self.conditioning_channel_order!r}")

    @property
    def conditioning_factor(self) -> int:
        """How many control-image pixels make one latent pixel (8 for SD's ControlNets)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def num_skips(self) -> int:
        """Skips of the encoder half: conv_in's output, each ResnetBlock's, each Downsample's."""
        return 1 + self.num_levels * self.layers_per_block + (self.num_levels - 1)

    @classmethod
    def from_unet_config(cls, config: UNetConfig, **conditioning) -> "ControlNetConfig":
        return cls(**{**dataclasses.asdict(config), **conditioning})

    def to_diffusers_config(self) -> dict[str, Any]:
        """The equivalent diffusers ``config.json`` (ControlNetModel)."""
        cfg = super().to_diffusers_config()
        for name in ("up_block_types", "out_channels", "sample_size", "center_input_sample"):
            cfg.pop(name)
        cfg.update(_class_name="ControlNetModel", conditioning_channels=self.conditioning_channels,
                   conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
                   controlnet_conditioning_channel_order=self.conditioning_channel_order,
                   global_pool_conditions=False)
        return cfg


def from_diffusers_config(config: Mapping[str, Any]) -> ControlNetConfig:
    """Read a diffusers ControlNetModel ``config.json``. The fields it shares with the U-Net
    are read by :func:`ministd.unet.from_diffusers_config` (a ControlNet has no up path,
    so the mirror of its down path stands in for ``up_block_types``)."""
    name = config.get("_class_name", "ControlNetModel")
    if name != "ControlNetModel":
        raise ValueError(f"config.json describes a {name}, not a ControlNetModel")
    if config.get("global_pool_conditions", False):
        raise ValueError("global_pool_conditions=True (the 'shuffle' kind of ControlNet, run in guess mode) "
                         "is not supported")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    mirror = ["CrossAttnUpBlock2D" if b == "CrossAttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    shared = _unet.from_diffusers_config({**config, "up_block_types": mirror})
    return ControlNetConfig.from_unet_config(
        shared, conditioning_channels=int(config.get("conditioning_channels", 3)),
        conditioning_embedding_out_channels=tuple(config.get("conditioning_embedding_out_channels")
                                                  or (16, 32, 96, 256)),
        conditioning_channel_order=config.get("controlnet_conditioning_channel_order", "rgb"))


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------


class ControlNetConditioningEmbedding(nn.Module):
    """The condition encoder E(c): control image [B, 3, H, W] -> features [B, C0, H/f, W/f].

    conv_in (3x3) then, between each two widths, a 3x3 conv and a stride-2 3x3 conv,
    each followed by SiLU; conv_out (3x3, zero-initialised) gives ``conv_in``'s
    width of the U-Net. ``blocks`` alternates [same width, halve size], as in diffusers
    (same name) and the original ``input_hint_block`` (the paper's text says 4x4
    kernels; the released code and models use these 3x3 ones).
    """

    def __init__(self, out_channels: int, conditioning_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        _zero(self.conv_out)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """A zero convolution (the paper's eq. 2): weight and bias start at 0."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetModel(nn.Module):
    """A trainable copy of a U-Net's encoder half, joined to it through zero convolutions.

    ``controlnet(latents, timestep, encoder_hidden_states, controlnet_cond,
    conditioning_scale=1.0, added_cond=None)``:

    - latents [B, C_in, h, w], timestep, encoder_hidden_states [B, T, D], added_cond:
      exactly what the U-Net it steers receives;
    - controlnet_cond [B, 3, h * f, w * f]: the control image in [0, 1] (f =
      ``config.conditioning_factor``, 8 for SD: the picture's own size);

    returns (down residuals: one [B, C, h', w'] per skip of the U-Net, in the U-Net's
    order; mid residual [B, C_last, h / 2^(L-1), w / 2^(L-1)]), each times
    ``conditioning_scale``: the ``down_block_additional_residuals`` and
    ``mid_block_additional_residual`` of :meth:`ministd.unet.UNet.forward`.
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        # the trainable copy: the U-Net's encoder half, built by the U-Net's own code
        skip_channels = build_encoder_half(self, config)
        # what the copy adds: the condition encoder in front, the zero convolutions behind
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(ch[0], config.conditioning_channels,
                                                               config.conditioning_embedding_out_channels)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in skip_channels)
        self.controlnet_mid_block = _zero(nn.Conv2d(ch[-1], ch[-1], 1))

    # the U-Net's own code for its inputs: these read only config, conv_in, time_embedding and add_embedding
    embed_time = UNet.embed_time
    embed_added_cond = UNet.embed_added_cond
    _check_unet_inputs = UNet._check_inputs
    dtype = UNet.dtype          # properties: conv_in's weight's dtype and device
    device = UNet.device

    @property
    def conditioning_factor(self) -> int:
        return self.config.conditioning_factor

    def forward(self, latents: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0,
                added_cond: Mapping[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        self._check_unet_inputs(latents, encoder_hidden_states, added_cond)
        self._check_cond(latents, controlnet_cond)
        emb = self.embed_time(timestep, latents.shape[0], latents.dtype, latents.device)
        if self.add_embedding is not None:
            emb = emb + self.embed_added_cond(added_cond, emb.dtype)
        context = encoder_hidden_states.to(latents.dtype)
        if self.config.conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)

        x = self.conv_in(latents) + self.controlnet_cond_embedding(controlnet_cond.to(latents.dtype))
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, context, skips)
        x = self.mid_block(x, emb, context)

        down = [zero_conv(skip) * conditioning_scale for skip, zero_conv in zip(skips, self.controlnet_down_blocks)]
        return down, self.controlnet_mid_block(x) * conditioning_scale

    def _check_cond(self, latents: torch.Tensor, cond: torch.Tensor) -> None:
        b, _, h, w = latents.shape
        f, c = self.config.conditioning_factor, self.config.conditioning_channels
        if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (b, c, h * f, w * f):
            got = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"controlnet_cond must have shape [{b}, {c}, {h * f}, {w * f}] (the control image at "
                             f"{f}x the latents' {h}x{w}: this ControlNet's condition encoder downsamples by "
                             f"{f}); got {got}")

    # -- making one --------------------------------------------------------
    @classmethod
    def from_unet(cls, unet: UNet, conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                  conditioning_channels: int = 3) -> "ControlNetModel":
        """The start of training (sec. 3.1): the encoder half copied from ``unet``, the
        condition encoder freshly initialised (its last conv at zero) and the zero
        convolutions at zero, so the residuals are exactly 0 until training moves them."""
        config = ControlNetConfig.from_unet_config(
            unet.config, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
        with torch.device(unet.device):
            model = cls(config).to(unet.dtype)
        copied = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
        encoder = {k: v for k, v in unet.state_dict().items() if k.startswith(copied)}
        missing, unexpected = model.load_state_dict(encoder, strict=False)
        assert not unexpected and all(k.startswith("controlnet_") for k in missing), (missing, unexpected)
        return model

    # -- loading and saving ------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> "ControlNetModel":
        """Load a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors,
        or shards), strictly: every name and shape must be a ControlNetModel's."""
        folder = Path(folder)
        if (folder / "controlnet" / "config.json").is_file():     # a pipeline folder's controlnet/
            folder = folder / "controlnet"
        config = from_diffusers_config(read_json(folder / "config.json"))
        model = build_on_meta(lambda: cls(config))
        load_strict(model, read_weights(folder, DIFFUSERS_WEIGHTS, dtype=dtype or torch.float32), source=str(folder))
        return model.eval()

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / f"{DIFFUSERS_WEIGHTS}.safetensors", self.state_dict(), dtype=dtype)
        (folder / "config.json").write_text(json.dumps(self.config.to_diffusers_config(), indent=2) + "\n")

    @classmethod
    def from_original(cls, state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig | None = None,
                      source: str = "original ControlNet file") -> "ControlNetModel":
        """Load the original layout (``control_model.*`` keys, or the same without the prefix).

        The file carries no config: ``config`` says which network it is, or (None) it is
        read off the weights (:func:`config_from_original`). Errors name keys as the file does.
        """
        if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
            state_dict = strip_prefix(state_dict, ORIGINAL_PREFIX)
        config = config or config_from_original(state_dict)
        model = build_on_meta(lambda: cls(config))
        to_original = original_key_map(model)
        to_ours = {v: k for k, v in to_original.items()}
        try:
            load_strict(model, {to_ours.get(k, k): v for k, v in state_dict.items()}, source=source)
        except WeightsMismatchError as err:
            name = lambda k: to_original.get(k, k)   # noqa: E731
            raise WeightsMismatchError(source, [name(k) for k in err.missing], [name(k) for k in err.unexpected],
                                       [(name(k), f, m) for k, f, m in err.mismatched]) from None
        return model.eval()

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights named as in the original files (without ``control_model.``)."""
        to_original = original_key_map(self)
        return {to_original[k]: v for k, v in self.state_dict().items()}

    def save(self, weights: str | Path, dtype: torch.dtype | None = torch.float16,
             extra_config: Mapping[str, Any] | None = None) -> None:
        """The book's pair ``name.safetensors`` + ``name.json`` (:func:`ministd.weights.save_model`)."""
        save_model(self, weights, self.config.to_dict(), dtype=dtype, extra_config=extra_config)

    @classmethod
    def load(cls, weights: str | Path, dtype: torch.dtype = torch.float32) -> "ControlNetModel":
        """Read a pair written by :meth:`save`."""
        return load_model(weights, lambda fields: cls(ControlNetConfig.from_dict(fields)), dtype=dtype)


# --------------------------------------------------------------------------
# The original single-file layout, as a table
# --------------------------------------------------------------------------

ENCODER_MODULES = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


def original_prefixes(config: ControlNetConfig) -> dict[str, str]:
    """Our module prefix -> the original file's (without ``control_model.``).

    The encoder half is named as in the U-Net's original layout
    (:func:`ministd.unet.original_prefixes`: ``input_blocks``, ``middle_block``,
    ``time_embed``). The additions are flat lists in the original code
    (lllyasviel/ControlNet ``cldm/cldm.py``): ``zero_convs.N.0`` (one per skip),
    ``middle_block_out.0``, and ``input_hint_block``, a Sequential of
    [conv, SiLU, conv, SiLU, ..., conv] whose even entries are the convolutions:
    0 -> conv_in, 2, 4, ... -> blocks.0, 1, ..., the last -> conv_out (14 for SD's
    four widths). Checked against diffusers' ``convert_controlnet_checkpoint``
    (tests/test_controlnet.py).
    """
    table = {ours: theirs for ours, theirs in _unet.original_prefixes(config).items()
             if ours.startswith(ENCODER_MODULES)}
    hint = "controlnet_cond_embedding."
    n_convs = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    table[f"{hint}conv_in."] = "input_hint_block.0."
    for i in range(n_convs):
        table[f"{hint}blocks.{i}."] = f"input_hint_block.{2 * i + 2}."
    table[f"{hint}conv_out."] = f"input_hint_block.{2 * n_convs + 2}."
    for i in range(config.num_skips):
        table[f"controlnet_down_blocks.{i}."] = f"zero_convs.{i}.0."
    table["controlnet_mid_block."] = "middle_block_out.0."
    return table


def original_key_map(model: ControlNetModel) -> dict[str, str]:
    """Every parameter name of ``model`` -> its name in the original layout (no prefix)."""
    table = original_prefixes(model.config)
    return {k: rename_by_prefix(k, table) for k in model.state_dict()}


def config_from_original(state_dict: Mapping[str, torch.Tensor], **unet_options) -> ControlNetConfig:
    """Read a ControlNet's structure off original-layout weights (keys without the prefix).

    The encoder half by :func:`ministd.unet.config_from_original` (``unet_options``: its
    head-count and norm options); a ControlNet has no output layer, whose shape that
    reader takes ``out_channels`` from, so it is lent an empty one (the field is unused
    here). The condition encoder's widths are the output widths of
    ``input_hint_block.0`` and of each stride-2 convolution (entries 4, 8, 12, ...).
    """
    if "input_hint_block.0.weight" not in state_dict:
        raise ValueError("not an original-layout ControlNet: expected input_hint_block.0.weight "
                         f"(after the {ORIGINAL_PREFIX!r} prefix); {_keys_look_like(state_dict)}")
    in_channels = state_dict["input_blocks.0.0.weight"].shape[1] if "input_blocks.0.0.weight" in state_dict else 4
    lent = {**state_dict, "out.2.weight": torch.empty(in_channels, device="meta")}
    shared = _unet.config_from_original(lent, **unet_options)
    widths = [state_dict["input_hint_block.0.weight"].shape[0]]
    while f"input_hint_block.{4 * len(widths)}.weight" in state_dict and \
            f"input_hint_block.{4 * len(widths) + 2}.weight" in state_dict:
        widths.append(state_dict[f"input_hint_block.{4 * len(widths)}.weight"].shape[0])
    return ControlNetConfig.from_unet_config(
        shared, conditioning_channels=state_dict["input_hint_block.0.weight"].shape[1],
        conditioning_embedding_out_channels=tuple(widths))


def _keys_look_like(keys) -> str:
    keys = sorted(keys)
    return f"its {len(keys)} keys look like {keys[:3]}" if keys else "it holds no tensors"


# --------------------------------------------------------------------------
# The front door
# --------------------------------------------------------------------------


def load_controlnet(path_or_name: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None,
                    config: ControlNetConfig | Mapping | str | Path | None = None,
                    allow_pickle: bool = False, optimize: bool | None = None) -> ControlNetModel:
    """A ControlNet from a diffusers folder, an original single file, or the book's own ("shapes-edges").

    - a folder: diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``;
      a pipeline folder's ``controlnet/`` is found too);
    - a ``.safetensors`` file: the original layout (``control_model.*`` or the same keys
      without the prefix), or a diffusers weights file beside its ``config.json``;
    - pickled ``.pth`` / ``.ckpt`` / ``.bin`` files, as most original ControlNets are
      published, only with ``allow_pickle=True`` (read by ``torch.load(weights_only=True)``,
      as :mod:`ministd.checkpoints` does): opening a pickle can run code.

    ``config`` (single files only, which carry none): a :class:`ControlNetConfig`, a
    diffusers ControlNet config (dict, or the path of its config.json); by default the
    structure is read off the weights, with the real models' head-count rule
    (:func:`config_from_original`). ``optimize``: as :func:`ministd.load_pipeline`
    (:func:`ministd.speed.optimize`: the same weights and outputs, faster on CPUs).
    """
    model = _load(path_or_name, dtype, config, allow_pickle)
    if speed.enabled_by_default() if optimize is None else optimize:
        speed.optimize(model)
    return model.to(device) if device is not None else model


def _load(path_or_name, dtype, config, allow_pickle) -> ControlNetModel:
    name = str(path_or_name)
    if name in SHIPPED:
        weights = SHIPPED[name]
        if not weights.is_file():
            raise FileNotFoundError(f"the shipped ControlNet {name!r} (data/{weights.name}) has "
                                    "not been trained yet; see data/README.md")
        return ControlNetModel.load(weights, dtype=dtype)
    path = Path(path_or_name)
    if path.is_dir():
        if config is not None:
            raise ValueError(f"config applies to single files only; the folder {path} has its own config.json")
        model = ControlNetModel.from_pretrained(path, dtype=dtype)
    elif path.is_file():
        if isinstance(config, (str, Path)):
            config = read_json(config)
        if config is not None and not isinstance(config, ControlNetConfig):
            config = from_diffusers_config(config)
        model = _load_single_file(path, dtype, allow_pickle, config)
    else:
        raise FileNotFoundError(f"no ControlNet at {path}: give a diffusers folder (config.json + "
                                f"{DIFFUSERS_WEIGHTS}.safetensors), an original .safetensors file, "
                                f"or one of the book's own: {sorted(SHIPPED)}")
    return model


def _load_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool,
                      config: ControlNetConfig | None) -> ControlNetModel:
    from ministd.checkpoints import _Tensors   # chapter 15: safetensors header first, pickles only on request

    tensors = _Tensors.open(path, allow_pickle)
    keys = list(tensors.entries)
    if "controlnet_cond_embedding.conv_in.weight" in keys:          # diffusers' names
        if (path.parent / "config.json").is_file():
            return ControlNetModel.from_pretrained(path.parent, dtype=dtype)
        if path.with_suffix(".json").is_file():                      # the book's pair (ControlNetModel.save)
            return ControlNetModel.load(path, dtype=dtype)
        raise ValueError(f"{path} holds a diffusers ControlNet's weights (controlnet_cond_embedding.*) but no "
                         f"config.json lies beside it (nor {path.with_suffix('.json').name}): load the folder "
                         "it came from")
    hinted = [k for k in keys if k.endswith("input_hint_block.0.weight")]
    if not hinted or hinted[0] not in (f"{ORIGINAL_PREFIX}input_hint_block.0.weight", "input_hint_block.0.weight"):
        if any(k.startswith("model.diffusion_model.") for k in keys):
            what = "a whole Stable Diffusion checkpoint (model.diffusion_model.*): load it with load_pipeline"
        elif any("lora" in k for k in keys[:50]):
            what = "a LoRA: apply it with pipe.load_lora"
        else:
            what = _keys_look_like(keys)
        raise ValueError(f"{path} is not a ControlNet: expected the original layout "
                         f"({ORIGINAL_PREFIX}input_hint_block.0.weight, {ORIGINAL_PREFIX}zero_convs.*) or "
                         f"diffusers' (controlnet_cond_embedding.*, controlnet_down_blocks.*); {what}")
    state = tensors.load({k: k for k in keys}, dtype)
    return ControlNetModel.from_original(state, config, source=str(path))
