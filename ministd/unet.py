"""The noise predictor: a U-Net with self- and cross-attention (chapters 05 and 08).

``eps = unet(latents, timestep, encoder_hidden_states, added_cond=None)``

The network of Stable Diffusion (Rombach et al., 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", appendix and the ``ldm`` code), which
grew out of the DDPM U-Net (Ho et al., 2020) and the "improved DDPM"/ADM U-Net
(Nichol & Dhariwal, 2021; Dhariwal & Nichol, 2021). One class covers SD 1.x,
SD 2.x, SDXL base and refiner (Podell et al., 2023, "SDXL"), the 9-channel
inpainting variant and the book's tiny ShapesWorld model; what differs between
them is data, a :class:`UNetConfig`.

The picture, for SD 1.5 at 512x512 (latents 64x64x4)::

    latents [B,4,64,64] -conv_in-> [B,320,64,64]
    down level 0 (64x64, 320 ch)  : 2 x (ResnetBlock + SpatialTransformer), downsample
    down level 1 (32x32, 640 ch)  : 2 x (ResnetBlock + SpatialTransformer), downsample
    down level 2 (16x16, 1280 ch) : 2 x (ResnetBlock + SpatialTransformer), downsample
    down level 3 (8x8,  1280 ch)  : 2 x ResnetBlock
    mid (8x8)                     : ResnetBlock, SpatialTransformer, ResnetBlock
    up levels 3..0                : 3 x (concat skip, ResnetBlock [+ SpatialTransformer]), upsample
    -> GroupNorm, SiLU, conv_out -> eps [B,4,64,64]

Every ResnetBlock also receives the timestep embedding (what noise level are
we at?), and every SpatialTransformer lets each latent pixel attend to the
other pixels (self-attention) and to the prompt's token vectors
(cross-attention): that is where the text steers the image.

Parameter names follow the diffusers layout (``down_blocks.0.resnets.0.conv1``)
so a diffusers ``unet/`` folder loads as is; :func:`original_key_map` maps them
to the original ``model.diffusion_model.*`` names (``input_blocks.1.0.in_layers.2``)
of single-file checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ministd.weights import (DIFFUSERS_WEIGHTS, WeightsMismatchError, build_on_meta, load_model, load_strict,
                             read_json, read_safetensors, read_weights, rename_by_prefix, save_model, strip_prefix)

# --------------------------------------------------------------------------
# Configuration: data, not subclasses
# --------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Everything that distinguishes one U-Net from another.

    Per-level tuples have one entry per resolution level (``len(block_out_channels)``);
    the up path mirrors the down path level by level.

    Attention heads come in two flavours, as in the real models: SD 1.x fixes the
    *number* of heads (8 at every level, so the head width grows 40/80/160),
    SD 2.x and SDXL fix the *head width* (64, so the number of heads grows).
    Give exactly one of ``num_heads`` (int or per level) and ``head_dim``.

    Field names are diffusers' (``UNet2DConditionModel``) where they say what
    they hold; three say it more plainly here, translated in one place
    (:func:`from_diffusers_config`, :meth:`to_diffusers_config`):
    ``attention_levels`` (diffusers: ``down_block_types``, "CrossAttnDownBlock2D"
    or "DownBlock2D" per level), ``num_heads`` / ``head_dim`` (diffusers'
    ``attention_head_dim`` holds head *counts* for every family, a historical
    slip) and ``mid_transformer_depth`` (diffusers ties it to the last level's).
    """

    in_channels: int = 4                      # 9 for inpainting: latents + mask + masked-image latents
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2                 # ResnetBlocks per down level (up levels have one more)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)   # transformer blocks per SpatialTransformer, per level
    mid_transformer_depth: int = 1
    num_heads: int | tuple[int, ...] | None = 8
    head_dim: int | None = None
    cross_attention_dim: int = 768            # width of the text states (the "context")
    use_linear_projection: bool = False       # SpatialTransformer proj_in/out: 1x1 conv (SD1) or linear (SD2+)
    upcast_attention: bool = False            # compute attention in float32 even for half-precision models
    addition_time_embed_dim: int | None = None   # SDXL: each time id -> 256 Fourier features
    # SDXL ("adm_in_channels" in the original code): pooled text width + addition_time_embed_dim x time ids
    projection_class_embeddings_input_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64                     # default latent height/width (pipelines use it)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        levels = len(self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if isinstance(self.transformer_layers_per_block, int):
            self.transformer_layers_per_block = (self.transformer_layers_per_block,) * levels
        self.transformer_layers_per_block = tuple(int(d) for d in self.transformer_layers_per_block)
        if isinstance(self.num_heads, (list, tuple)):
            self.num_heads = tuple(int(h) for h in self.num_heads)
        for name in ("attention_levels", "transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} must have one entry per level ({levels}), "
                                 f"got {getattr(self, name)}")
        if isinstance(self.num_heads, tuple) and len(self.num_heads) != levels:
            raise ValueError(f"num_heads must be an int or have one entry per level ({levels}), "
                             f"got {self.num_heads}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("give exactly one of num_heads (SD 1.x style) and head_dim (SD 2.x/SDXL style)")
        if (self.addition_time_embed_dim is None) != (self.projection_class_embeddings_input_dim is None):
            raise ValueError("addition_time_embed_dim and projection_class_embeddings_input_dim go together "
                             "(SDXL-type U-Nets)")
        for level, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels[{level}]={channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
            if self.attention_levels[level] or level == levels - 1:
                self.heads_at(level)   # validates the head split

    # -- derived numbers ---------------------------------------------------
    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding: 4 x the first level's channels (1280 for SD)."""
        return 4 * self.block_out_channels[0]

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Latent height and width must be multiples of this (2 per downsampling)."""
        return 2 ** (self.num_levels - 1)

    @property
    def is_sdxl_type(self) -> bool:
        """True when the U-Net needs ``added_cond`` (pooled text + time ids)."""
        return self.projection_class_embeddings_input_dim is not None

    def heads_at(self, level: int) -> int:
        """Number of attention heads at ``level`` (the mid block uses the last level's)."""
        channels = self.block_out_channels[level]
        if self.head_dim is not None:
            if channels % self.head_dim:
                raise ValueError(f"level {level}: {channels} channels do not split into heads of width "
                                 f"head_dim={self.head_dim}")
            return channels // self.head_dim
        heads = self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads
        if channels % heads:
            raise ValueError(f"level {level}: {channels} channels do not split into num_heads={heads} heads")
        return heads

    def _heads_for_config(self, level: int) -> int:
        # levels without attention have no heads; diffusers still wants a number there
        if self.attention_levels[level] or level == self.num_levels - 1:
            return self.heads_at(level)
        if self.head_dim is not None:
            return max(1, self.block_out_channels[level] // self.head_dim)
        return self.num_heads if isinstance(self.num_heads, int) else self.num_heads[level]

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    # names this config used before it took diffusers' (files written then still load)
    OLD_NAMES: ClassVar[dict[str, str]] = {"transformer_depth": "transformer_layers_per_block",
                                           "addition_embed_dim": "projection_class_embeddings_input_dim"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        d = {cls.OLD_NAMES.get(k, k): v for k, v in d.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The equivalent diffusers ``unet/config.json`` (UNet2DConditionModel).

        diffusers' ``attention_head_dim`` holds head *counts* for SD 2.x/SDXL (a
        historical naming slip), so both flavours are written as head counts.
        """
        levels = self.num_levels
        heads = [self._heads_for_config(i) for i in range(levels)]
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)]
        depth = list(self.transformer_layers_per_block[:-1]) + [self.mid_transformer_depth]
        if self.transformer_layers_per_block[-1] != self.mid_transformer_depth and self.attention_levels[-1]:
            raise ValueError("diffusers ties the last level's transformer depth to the mid block's; "
                             "this config cannot be written as a diffusers config")
        cfg: dict[str, Any] = {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "down_block_types": down, "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "transformer_layers_per_block": depth,
            "attention_head_dim": heads if len(set(heads)) > 1 else heads[0],
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
            "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
            "sample_size": self.sample_size, "center_input_sample": False,
        }
        if self.is_sdxl_type:
            cfg.update(addition_embed_type="text_time",
                       addition_time_embed_dim=self.addition_time_embed_dim,
                       projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
        return cfg


# diffusers config fields whose other values this U-Net does not implement: field -> allowed values
_DIFFUSERS_MUST_BE: dict[str, tuple] = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_padding": (1,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "addition_embed_type": (None, "text_time"),
    "dropout": (0, 0.0),
}


def from_diffusers_config(config: Mapping[str, Any]) -> UNetConfig:
    """Read a diffusers ``unet/config.json`` (UNet2DConditionModel) into a :class:`UNetConfig`.

    Unsupported options (class embeddings, ControlNet-style extras, ...) raise a
    ValueError naming the field, rather than building a silently different network.
    """
    for name, allowed in _DIFFUSERS_MUST_BE.items():
        value = config.get(name, allowed[0])
        if isinstance(value, list) and name == "only_cross_attention":
            value = any(value)
        if value not in allowed:
            raise ValueError(f"diffusers config field {name}={value!r} is not supported; allowed: {list(allowed)}")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if set(down) - known:
        raise ValueError(f"down_block_types {down}: only {sorted(known)} are supported")
    attention = tuple(b == "CrossAttnDownBlock2D" for b in down)
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != mirrored:
        raise ValueError(f"up_block_types {up} must mirror down_block_types (expected {mirrored})")
    levels = len(down)
    channels = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    if len(channels) != levels:
        raise ValueError(f"block_out_channels {channels} must have one entry per down block ({levels})")
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ValueError(f"layers_per_block={lpb}: only one count for every level is supported")
        lpb = lpb[0]
    cross = config.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        if len(set(cross)) != 1:
            raise ValueError(f"cross_attention_dim={cross}: one context width for every level is supported")
        cross = cross[0]
    depth = config.get("transformer_layers_per_block", 1)
    depth = (depth,) * levels if isinstance(depth, int) else tuple(depth)
    if any(not isinstance(d, int) for d in depth):
        raise ValueError(f"transformer_layers_per_block={depth}: nested per-layer lists are not supported")
    # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (both are head counts)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = int(heads) if isinstance(heads, int) else tuple(int(h) for h in heads)
    add_type = config.get("addition_embed_type")
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_out_channels=channels,
        layers_per_block=lpb,
        attention_levels=attention,
        transformer_layers_per_block=depth,
        mid_transformer_depth=depth[-1],
        num_heads=heads,
        head_dim=None,
        cross_attention_dim=cross,
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        upcast_attention=bool(config.get("upcast_attention", False)),
        addition_time_embed_dim=config.get("addition_time_embed_dim") if add_type else None,
        projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim") if add_type else None,
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=int(config.get("freq_shift", 0)),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        sample_size=_first(config.get("sample_size")) or 64,
    )


def _first(value):
    """Some configs give sizes as [height, width]; we keep one number."""
    return value[0] if isinstance(value, (list, tuple)) else value


# -- presets (the real checkpoints' structure, from their published unet/config.json;
#    tests/test_unet.py::test_presets_match_published_structure checks each) --

def sd1() -> UNetConfig:
    """Stable Diffusion 1.x: 8 heads everywhere, 1x1-conv projections, CLIP-L context (768)."""
    return UNetConfig(num_heads=8, cross_attention_dim=768, sample_size=64)


def sd2() -> UNetConfig:
    """Stable Diffusion 2.x (768-v): head width 64, linear projections, OpenCLIP-H context (1024).

    ``upcast_attention`` is on because SD 2.1 overflows in float16 attention otherwise.
    """
    return UNetConfig(num_heads=None, head_dim=64, cross_attention_dim=1024,
                      use_linear_projection=True, upcast_attention=True, sample_size=96)


def sd_inpaint() -> UNetConfig:
    """SD 1.x inpainting: 9 input channels (4 noisy latents + 1 mask + 4 masked-image latents)."""
    return dataclasses.replace(sd1(), in_channels=9)


def sdxl_base() -> UNetConfig:
    """SDXL base 1.0: three levels, no attention at the top level, 1/2/10 transformer blocks,
    2048-wide context (CLIP-L + bigG), pooled text + 6 time ids added to the time embedding."""
    return UNetConfig(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True),
                      transformer_layers_per_block=(1, 2, 10), mid_transformer_depth=10,
                      num_heads=None, head_dim=64, cross_attention_dim=2048,
                      use_linear_projection=True, addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=1280 + 6 * 256, sample_size=128)


def sdxl_refiner() -> UNetConfig:
    """SDXL refiner 1.0: 384 base channels, four levels, attention at levels 1-2 with depth 4,
    bigG context (1280), pooled text + 5 time ids (sizes, crop and aesthetic score)."""
    return UNetConfig(block_out_channels=(384, 768, 1536, 1536),
                      attention_levels=(False, True, True, False),
                      transformer_layers_per_block=(4, 4, 4, 4), mid_transformer_depth=4,
                      num_heads=None, head_dim=64, cross_attention_dim=1280,
                      use_linear_projection=True, addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=1280 + 5 * 256, sample_size=128)


def shapes_tiny(cross_attention_dim: int = 128) -> UNetConfig:
    """The book's ShapesWorld model: 16x16x4 latents (64x64 images, VAE downsampling 4).

    Three levels (16x16, 8x8, 4x4 with 32/64/128 channels), one ResnetBlock per
    level (two on the way up), and attention at every level, so even the
    finest 16x16 grid can look up which colour word belongs to which shape.
    About 4.3 million parameters and 0.9 GFLOP per latent for a training
    step (forward + backward), so an hour of two CPU cores trains it.
    ``cross_attention_dim`` is the width of the tiny CLIP's text states (128).

    GroupNorm uses 8 groups, not SD's 32: with 32 channels that would leave one
    channel per group, and a per-channel normalisation right after the
    timestep is added (see :class:`ResnetBlock`) would erase it.
    """
    return UNetConfig(block_out_channels=(32, 64, 128), layers_per_block=1,
                      attention_levels=(True, True, True), transformer_layers_per_block=(1, 1, 1),
                      mid_transformer_depth=1, num_heads=None, head_dim=32,
                      cross_attention_dim=cross_attention_dim, use_linear_projection=True,
                      norm_num_groups=8, sample_size=16)


SHAPES_UNET_FILE = Path(__file__).resolve().parent.parent / "data" / "shapes_unet.safetensors"


def shapes_empty_prompt_states(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The text states [1, 77, 128] of the empty prompt "" for the shipped ShapesWorld model.

    The model was trained with 10% of captions replaced by "", so with these
    states it draws *unconditionally*. They are stored beside the weights
    (data/shapes_unet_empty_prompt.safetensors, written by
    ``ministd.train.unet export``) so that chapter 05 can run the model before
    the text encoder is introduced in chapter 07.
    """
    path = SHAPES_UNET_FILE.with_name(SHAPES_UNET_FILE.stem + "_empty_prompt.safetensors")
    return read_safetensors(path)["encoder_hidden_states"].to(dtype)


PRESETS = {"sd1": sd1, "sd2": sd2, "sd_inpaint": sd_inpaint, "sdxl_base": sdxl_base,
           "sdxl_refiner": sdxl_refiner, "shapes_tiny": shapes_tiny}


# --------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [N] -> [N, dim] float32.

    The Transformer's positional encoding (Vaswani et al., 2017, sec. 3.5) used
    for noise levels (Ho et al., 2020): frequencies
    ``w_i = max_period ** (-i / (dim/2 - freq_shift))`` for i < dim/2, features
    ``[sin(t w), cos(t w)]``; SD puts the cosines first (``flip_sin_to_cos``).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP that lifts the sinusoidal features: Linear -> SiLU -> Linear ([N, in] -> [N, dim])."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------
# Convolutional pieces
# --------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """Residual block with timestep injection (Ho et al., 2020; He et al., 2016).

    h = conv1(SiLU(GroupNorm(x))) + Linear(SiLU(temb))  (the noise level, per channel)
    out = shortcut(x) + conv2(SiLU(GroupNorm(h)))
    x [B, C_in, H, W], temb [B, T] -> [B, C_out, H, W]. The shortcut is a 1x1
    conv when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int,
                 groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + shortcut


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3x3 conv: [B,C,H,W] -> [B,C,H/2,W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double height and width (nearest neighbour, then a 3x3 conv): [B,C,H,W] -> [B,C,2H,2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # older PyTorch releases have no bfloat16 kernel for nearest-neighbour upsampling
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype)
        return self.conv(x)


# --------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al., 2017, sec. 3.2).

    Queries come from the image tokens x [B, N, D]; keys and values from
    ``context`` [B, T, D_ctx] (cross-attention: the text) or from x itself
    (self-attention, ``context=None``). Per head:
    softmax(Q K^T / sqrt(d)) V, computed by
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    ``probs_hook``: when set, the attention probabilities [B, heads, N, T] are
    computed explicitly and handed to it (the book's attention maps); when
    None (default) nothing extra is computed.

    ``query_chunk``: when set, the queries go through in chunks of that many
    tokens (each chunk attends to every key, so the result is the same): a
    kernel that writes out the [N, T] score matrix then holds only
    [query_chunk, T] of it at a time. Self-attention of SD 1.5 at 1024x1024
    has N = T = 16384 tokens: a float32 score matrix of 1 GiB per head.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int,
                 context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.upcast = heads, dim_head, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        # a list so the output projection is named "to_out.0", as in the checkpoints
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.probs_hook = None
        self.query_chunk: int | None = None

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)   # [B, heads, n, d]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            # scores of SD 2.x overflow float16: do the softmax(QK^T)V in float32
            q, k, v = q.float(), k.float(), v.float()
        if self.probs_hook is None and self.query_chunk is not None and q.shape[2] > self.query_chunk:
            out = torch.cat([F.scaled_dot_product_attention(part, k, v)
                             for part in q.split(self.query_chunk, dim=2)], dim=2)
        elif self.probs_hook is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-1, -2)) * self.dim_head ** -0.5
            probs = scores.float().softmax(dim=-1).to(q.dtype)        # [B, heads, N, T]
            self.probs_hook(probs)
            out = probs @ v
        b, _, n, _ = out.shape
        out = out.to(dtype).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer, 2020): x -> a * GELU(g) where [a, g] = Linear(x) split in two."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x wider hidden layer: [B, N, D] -> [B, N, D].

    ``net`` is [GEGLU, Dropout, Linear] so the weights are named ``net.0.proj``
    and ``net.2`` as in the checkpoints.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the text, feed-forward.

    x = x + attn1(LN(x));  x = x + attn2(LN(x), context);  x = x + ff(LN(x))
    x [B, N, D], context [B, T, D_ctx] -> [B, N, D].
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Attention over the pixels of a feature map (the LDM paper's "SpatialTransformer").

    GroupNorm, project in (1x1 conv or linear), flatten [B,C,H,W] -> [B, H*W, C]
    tokens, ``depth`` TransformerBlocks, project out, unflatten, add the input.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int,
                 groups: int = 32, linear_projection: bool = False, upcast: bool = False):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, channels // heads, context_dim, upcast) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)        # pixels become tokens
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        # back to [B, C, H, W] in the standard memory layout: left as a permuted view, the
        # following convolutions and additions take slower strided paths (measured ~15%
        # of a tiny U-Net step on CPU)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        if not self.linear_projection:
            x = self.proj_out(x)
        return x + residual


# --------------------------------------------------------------------------
# The levels of the U
# --------------------------------------------------------------------------


def _attentions(config: UNetConfig, level: int, channels: int, count: int) -> nn.ModuleList | None:
    if not config.attention_levels[level]:
        return None
    return nn.ModuleList(
        SpatialTransformer(channels, config.heads_at(level), config.transformer_layers_per_block[level],
                           config.cross_attention_dim, config.norm_num_groups,
                           config.use_linear_projection, config.upcast_attention)
        for _ in range(count))


class DownBlock(nn.Module):
    """One level of the encoder path: ``layers_per_block`` x (ResnetBlock [+ SpatialTransformer]),
    then (except at the last level) a Downsample. Every intermediate output is kept as a skip."""

    def __init__(self, config: UNetConfig, level: int, in_channels: int, out_channels: int):
        super().__init__()
        n, g, e = config.layers_per_block, config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config.time_embed_dim, g, e)
            for i in range(n))
        self.attentions = _attentions(config, level, out_channels, n)
        last = level == config.num_levels - 1
        self.downsamplers = None if last else nn.ModuleList([Downsample(out_channels)])

    def forward(self, x, temb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """The bottom of the U: ResnetBlock, SpatialTransformer, ResnetBlock."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c, t, g, e = config.block_out_channels[-1], config.time_embed_dim, config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(c, c, t, g, e), ResnetBlock(c, c, t, g, e)])
        self.attentions = nn.ModuleList([SpatialTransformer(
            c, config.heads_at(config.num_levels - 1), config.mid_transformer_depth,
            config.cross_attention_dim, g, config.use_linear_projection, config.upcast_attention)])

    def forward(self, x, temb, context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One level of the decoder path: ``layers_per_block + 1`` x (concatenate a skip,
    ResnetBlock [+ SpatialTransformer]), then (except at the top level) an Upsample.

    Skips are consumed last-in first-out, so each level meets the activations
    of its own resolution from the encoder.
    """

    def __init__(self, config: UNetConfig, level: int, skip_channels: list[int],
                 in_channels: int, out_channels: int):
        super().__init__()
        g, e = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels,
                        config.time_embed_dim, g, e)
            for i, skip in enumerate(skip_channels))
        self.attentions = _attentions(config, level, out_channels, len(skip_channels))
        self.upsamplers = None if level == 0 else nn.ModuleList([Upsample(out_channels)])

    def forward(self, x, temb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


# --------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------


class CrossAttentionMaps:
    """Cross-attention probabilities recorded during a forward pass (see :meth:`UNet.cross_attention_maps`).

    ``records``: list of (layer name, probs [B, h*w, T]) averaged over heads,
    in the order the layers ran. ``latent_size`` is the (H, W) of the input latents.
    """

    def __init__(self) -> None:
        self.records: list[tuple[str, torch.Tensor]] = []
        self.latent_size: tuple[int, int] | None = None

    def per_token(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Average over every layer, resized to ``size`` (default: latent size): [B, T, H, W].

        The maps of one token tell where in the image that word was looked up
        (Hertz et al., 2022, "Prompt-to-Prompt", sec. 3.1).
        """
        if not self.records or self.latent_size is None:
            raise ValueError("no cross-attention was recorded: run the U-Net inside cross_attention_maps()")
        H, W = self.latent_size
        size = size or (H, W)
        total = None
        for _, probs in self.records:
            b, n, t = probs.shape
            f = int(round(math.sqrt(H * W / n)))          # this layer's downsampling factor
            m = probs.float().transpose(1, 2).reshape(b, t, H // f, W // f)
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            total = m if total is None else total + m
        return total / len(self.records)


def build_encoder_half(module: nn.Module, config: UNetConfig) -> list[int]:
    """Give ``module`` the encoder half of a U-Net, under diffusers' names: ``conv_in``,
    ``time_embedding``, ``add_embedding`` (SDXL-type, else None), ``down_blocks`` and
    ``mid_block``. Returns the channel count of every skip connection, in order
    (conv_in's output is the first). :class:`UNet` builds its down path with it, and
    :class:`ministd.controlnet.ControlNetModel` its trainable copy, so the two always match.
    """
    ch = config.block_out_channels
    module.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
    module.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim)
    module.add_embedding = (TimestepEmbedding(config.projection_class_embeddings_input_dim, config.time_embed_dim)
                            if config.is_sdxl_type else None)
    module.down_blocks = nn.ModuleList()
    skip_channels = [ch[0]]
    for level, out in enumerate(ch):
        block = DownBlock(config, level, ch[max(level - 1, 0)], out)
        module.down_blocks.append(block)
        skip_channels += [out] * config.layers_per_block
        if block.downsamplers is not None:
            skip_channels.append(out)
    module.mid_block = MidBlock(config)
    return skip_channels


class UNet(nn.Module):
    """The noise-prediction U-Net of Stable Diffusion, built from a :class:`UNetConfig`.

    ``unet(latents, timestep, encoder_hidden_states, added_cond=None)``:

    - latents [B, C_in, H, W] (H, W multiples of ``config.downsample_factor``)
    - timestep: int/float, 0-d tensor or [B] tensor (fractional values allowed)
    - encoder_hidden_states [B, T, cross_attention_dim]: the text states
    - added_cond (SDXL-type only): {"text_embeds": [B, P], "time_ids": [B, N]}
      with P + N * addition_time_embed_dim = projection_class_embeddings_input_dim
      (SDXL base: P=1280, N=6; refiner: P=1280, N=5)

    returns the prediction [B, C_out, H, W] (epsilon or v, as the model was trained).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        skip_channels = build_encoder_half(self, config)

        self.up_blocks = nn.ModuleList()
        in_ch = ch[-1]
        for level in reversed(range(config.num_levels)):
            n = config.layers_per_block + 1
            mine, skip_channels = skip_channels[-n:][::-1], skip_channels[:-n]
            self.up_blocks.append(UpBlock(config, level, mine, in_ch, ch[level]))
            in_ch = ch[level]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)
        self._maps: CrossAttentionMaps | None = None   # set only inside cross_attention_maps()

    # -- properties --------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    # -- the forward pass --------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_cond: Mapping[str, torch.Tensor] | None = None,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """``down_block_additional_residuals`` (one per skip, shaped as the skips) and
        ``mid_block_additional_residual`` (shaped as the mid block's output) are added to
        the skips and to the bottom of the U: how a ControlNet steers the U-Net
        (:mod:`ministd.controlnet`, chapter 16; diffusers' names)."""
        self._check_inputs(latents, encoder_hidden_states, added_cond)
        emb = self.embed_time(timestep, latents.shape[0], latents.dtype, latents.device)
        if self.add_embedding is not None:
            emb = emb + self.embed_added_cond(added_cond, emb.dtype)
        context = encoder_hidden_states.to(latents.dtype)
        if self._maps is not None:
            self._maps.latent_size = tuple(latents.shape[-2:])

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, context, skips)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals must hold one tensor per skip ({len(skips)}), "
                                 f"got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid_block(x, emb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            x = block(x, emb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def embed_time(self, timestep, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Timestep(s) -> [B, time_embed_dim]: sinusoidal features, then the MLP."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be a number or a tensor of shape [] or [{batch}] "
                             f"(one per latent); got shape {list(t.shape)}")
        t = t.reshape(-1).expand(batch)
        features = timestep_embedding(t, self.config.block_out_channels[0],
                                      self.config.flip_sin_to_cos, self.config.freq_shift)
        return self.time_embedding(features.to(dtype))

    def embed_added_cond(self, added_cond: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """SDXL's extra conditioning (Podell et al., 2023, sec. 2.2): each time id (original size,
        crop, target size or aesthetic score) -> 256 Fourier features, concatenated after the
        pooled text vector, then an MLP: [B, P + 256 N] -> [B, time_embed_dim]."""
        text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
        b, n = time_ids.shape
        fourier = timestep_embedding(time_ids.reshape(-1), self.config.addition_time_embed_dim,
                                     self.config.flip_sin_to_cos, self.config.freq_shift)
        vector = torch.cat([text_embeds.float(), fourier.reshape(b, -1)], dim=-1)
        return self.add_embedding(vector.to(dtype))

    def _check_inputs(self, latents, encoder_hidden_states, added_cond) -> None:
        c = self.config
        if latents.ndim != 4 or latents.shape[1] != c.in_channels:
            raise ValueError(f"latents must have shape [B, {c.in_channels}, H, W]; got {list(latents.shape)}")
        b, _, h, w = latents.shape
        f = c.downsample_factor
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"latents height and width must be positive multiples of {f} (this U-Net halves "
                             f"them {c.num_levels - 1} times); got {h}x{w}")
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
                or encoder_hidden_states.shape[2] != c.cross_attention_dim):
            raise ValueError(f"encoder_hidden_states must have shape [{b}, T, {c.cross_attention_dim}] "
                             f"(batch {b}, context width {c.cross_attention_dim}); "
                             f"got {list(encoder_hidden_states.shape)}")
        if not c.is_sdxl_type:
            if added_cond is not None:
                raise ValueError("added_cond must be None: this U-Net has no additional (SDXL) embeddings")
            return
        need = (f"added_cond={{'text_embeds': [{b}, P], 'time_ids': [{b}, N]}} with "
                f"P + {c.addition_time_embed_dim}*N = {c.projection_class_embeddings_input_dim} "
                "(SDXL base: P=1280, N=6; refiner: P=1280, N=5)")
        if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError(f"this SDXL-type U-Net needs {need}")
        te, ti = added_cond["text_embeds"], added_cond["time_ids"]
        if (te.ndim != 2 or ti.ndim != 2 or te.shape[0] != b or ti.shape[0] != b
                or te.shape[1] + c.addition_time_embed_dim * ti.shape[1] != c.projection_class_embeddings_input_dim):
            raise ValueError(f"this SDXL-type U-Net needs {need}; got text_embeds {list(te.shape)}, "
                             f"time_ids {list(ti.shape)}")

    def set_attention_chunk(self, query_chunk: int | None) -> None:
        """Run every attention layer's queries in chunks of ``query_chunk`` tokens (None: all at once).

        The output is the same (see :class:`Attention`); memory for attention
        scores drops to [query_chunk, T] per head, for large pictures on small machines.
        """
        if query_chunk is not None and (isinstance(query_chunk, bool) or not isinstance(query_chunk, int)
                                        or query_chunk < 1):
            raise ValueError(f"query_chunk must be a positive int (tokens) or None, got {query_chunk!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.query_chunk = query_chunk

    # -- attention maps ----------------------------------------------------
    @contextlib.contextmanager
    def cross_attention_maps(self) -> Iterator[CrossAttentionMaps]:
        """Record every cross-attention's probabilities while the block runs.

        >>> with unet.cross_attention_maps() as maps:
        ...     eps = unet(latents, t, text_states)
        >>> maps.per_token().shape       # [B, T, H, W]

        Outside the block the attention layers use the fused kernel and record nothing.
        """
        maps = CrossAttentionMaps()
        layers = [(name, m) for name, m in self.named_modules()
                  if isinstance(m, Attention) and name.endswith("attn2")]

        def recorder(name):
            return lambda probs: maps.records.append((name, probs.detach().mean(dim=1)))

        for name, module in layers:
            module.probs_hook = recorder(name)
        self._maps = maps
        try:
            yield maps
        finally:
            for _, module in layers:
                module.probs_hook = None
            self._maps = None

    # -- loading -----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> "UNet":
        """Load a diffusers ``unet/`` folder (config.json + diffusion_pytorch_model.safetensors,
        or sharded with an ``.index.json``). A pipeline folder with a ``unet/`` subfolder works too.

        The network is built on the meta device and takes the file's tensors, each
        read once in ``dtype`` (default: as stored, floating-point ones as float32).
        """
        folder = Path(folder)
        if (folder / "unet" / "config.json").is_file():
            folder = folder / "unet"
        config = from_diffusers_config(read_json(folder / "config.json"))
        model = build_on_meta(lambda: cls(config))
        load_strict(model, read_weights(folder, DIFFUSERS_WEIGHTS, dtype=dtype or torch.float32), source=str(folder))
        return model

    @classmethod
    def from_original(cls, state_dict: Mapping[str, torch.Tensor], config: UNetConfig | None = None,
                      dtype: torch.dtype | None = None, source: str = "original checkpoint") -> "UNet":
        """Load the original (CompVis / Stability ``ldm``/``sgm``) layout.

        ``state_dict`` is a whole single-file checkpoint (keys ``model.diffusion_model.*``;
        the VAE and text encoder entries are ignored) or the U-Net part without the prefix.
        The original files carry no config: ``config`` says which network it is, or
        (None) it is read off the weights by :func:`config_from_original`.
        """
        if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
            state_dict = strip_prefix(state_dict, ORIGINAL_PREFIX)
        if config is None:
            config = config_from_original(state_dict)
        model = cls(config)
        model.load_original_state_dict(state_dict, source)
        return model.to(dtype) if dtype is not None else model

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                                 source: str = "original checkpoint") -> None:
        """Copy weights named in the original layout (no prefix) into this model, strictly.

        Errors name keys as they are written in the original file.
        """
        to_original = original_key_map(self)
        to_ours = {v: k for k, v in to_original.items()}
        renamed = {to_ours.get(k, k): v for k, v in state_dict.items()}
        try:
            load_strict(self, renamed, source=source)
        except WeightsMismatchError as err:
            name = lambda k: to_original.get(k, k)   # noqa: E731
            raise WeightsMismatchError(
                source, [name(k) for k in err.missing], [name(k) for k in err.unexpected],
                [(name(k), f, m) for k, f, m in err.mismatched]) from None

    @classmethod
    def load(cls, weights: str | Path | None = None, config: str | Path | None = None,
             dtype: torch.dtype = torch.float32) -> "UNet":
        """Load a ``name.safetensors`` + ``name.json`` pair written by :meth:`save`.

        With no ``weights``: the book's ShapesWorld model, data/shapes_unet.safetensors.
        """
        weights = Path(weights) if weights is not None else SHAPES_UNET_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"no U-Net weights at {weights}"
                                    + ("; the ShapesWorld model is trained by ministd.train.unet (see data/README.md)"
                                       if weights == SHAPES_UNET_FILE else ""))
        return load_model(weights, lambda fields: cls(UNetConfig.from_dict(fields)), dtype=dtype, config=config)

    def save(self, weights: str | Path, dtype: torch.dtype | None = torch.float16,
             extra_config: Mapping[str, Any] | None = None) -> None:
        """Write weights (float16 by default) and the config as ``.safetensors`` + ``.json``
        (:func:`ministd.weights.save_model`)."""
        save_model(self, weights, self.config.to_dict(), dtype=dtype, extra_config=extra_config)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights named in the original layout (without the prefix)."""
        to_original = original_key_map(self)
        return {to_original[k]: v for k, v in self.state_dict().items()}


def read_diffusers_weights(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model folder: one safetensors file or index-listed shards."""
    return read_weights(folder, DIFFUSERS_WEIGHTS, dtype=dtype)


# --------------------------------------------------------------------------
# The original single-file layout
# --------------------------------------------------------------------------

ORIGINAL_PREFIX = "model.diffusion_model."

# inside a ResnetBlock: our name -> the original ResBlock's Sequential indices
RESNET_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

# modules outside the levels: ours -> original
FIXED_ORIGINAL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                  "mid_block.attentions.0": "middle_block.1"}


def original_prefixes(config: UNetConfig) -> dict[str, str]:
    """The key map to the original layout, as a table: our module prefix -> the original's.

    The original U-Net keeps flat lists: ``input_blocks`` = [conv_in, then per
    level ``layers_per_block`` x [ResBlock, SpatialTransformer?] and a
    [Downsample]], ``middle_block`` = [ResBlock, SpatialTransformer, ResBlock],
    ``output_blocks`` = per level ``layers_per_block + 1`` x
    [ResBlock, SpatialTransformer?, Upsample?], counted from the bottom level
    (as our ``up_blocks``). Inside a SpatialTransformer the names are the same
    in both layouts; inside a ResBlock they follow :data:`RESNET_ORIGINAL`.
    Print it to read it: ``for ours, theirs in original_prefixes(sd1()).items(): ...``.
    """
    table = {f"{ours}.": f"{theirs}." for ours, theirs in FIXED_ORIGINAL.items()}

    def resnet(ours: str, theirs: str) -> None:
        table.update({f"{ours}.{a}.": f"{theirs}.{b}." for a, b in RESNET_ORIGINAL.items()})

    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    per_level, last = config.layers_per_block + 1, config.num_levels - 1
    for level in range(config.num_levels):
        for j in range(config.layers_per_block):
            index = 1 + level * per_level + j
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            if config.attention_levels[level]:
                table[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{index}.1."
        if level < last:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{(level + 1) * per_level}.0.op."
    for level in range(config.num_levels):            # up_blocks count from the bottom level
        attends = config.attention_levels[last - level]
        for j in range(per_level):
            index = level * per_level + j
            resnet(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0")
            if attends:
                table[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{index}.1."
        if level < last:
            table[f"up_blocks.{level}.upsamplers.0.conv."] = \
                f"output_blocks.{index}.{2 if attends else 1}.conv."
    return table


def original_key_map(model: UNet) -> dict[str, str]:
    """Every parameter name of ``model`` -> its name in the original layout (no prefix)."""
    table = original_prefixes(model.config)
    return {k: rename_by_prefix(k, table) for k in model.state_dict()}


def config_from_original(state_dict: Mapping[str, torch.Tensor], num_heads: int | tuple[int, ...] | None = None,
                         head_dim: int | None = None, addition_time_embed_dim: int = 256,
                         norm_num_groups: int = 32, upcast_attention: bool | None = None,
                         sample_size: int | None = None) -> UNetConfig:
    """Read a U-Net's structure off its original-layout weights (keys without the prefix).

    Channels, levels, blocks per level, which levels attend, transformer depths,
    context width, projection kind, input channels and SDXL's added vector all
    show in the names and shapes. Head counts do not (they only split a matrix),
    nor do the GroupNorm groups: unless given, the real models' rule is used
    (768-wide context: SD 1.x, 8 heads; otherwise head width 64), and SD 2.x's
    1024-wide context turns on ``upcast_attention``.
    """
    def has(key: str) -> bool:
        return key in state_dict

    if not has("input_blocks.0.0.weight") or not has("middle_block.1.proj_in.weight"):
        raise ValueError("not an original-layout U-Net: expected keys input_blocks.0.0.weight and "
                         "middle_block.1.proj_in.weight (strip the 'model.diffusion_model.' prefix first)")
    n_input = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("input_blocks."))
    levels = 1 + sum(1 for k in state_dict if k.startswith("input_blocks.") and k.endswith(".0.op.weight"))
    per_level, rest = divmod(n_input - levels, levels)      # n_input = 1 + levels*lpb + (levels-1)
    if rest or per_level < 1:
        raise ValueError(f"cannot split {n_input} input blocks into {levels} levels")

    def depth(prefix: str) -> int:
        blocks = {k.split(".")[len(prefix.split(".")) + 1] for k in state_dict
                  if k.startswith(prefix + ".transformer_blocks.")}
        return len(blocks)

    channels, attention, depths = [], [], []
    for level in range(levels):
        first = f"input_blocks.{1 + level * (per_level + 1)}"
        channels.append(state_dict[f"{first}.0.out_layers.3.weight"].shape[0])
        attention.append(has(f"{first}.1.proj_in.weight"))
        depths.append(depth(f"{first}.1") if attention[-1] else 1)
    mid_depth = depth("middle_block.1")
    if not attention[-1]:
        depths[-1] = mid_depth
    context = state_dict["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    if num_heads is None and head_dim is None:
        num_heads, head_dim = (8, None) if context == 768 else (None, 64)
    sdxl = has("label_emb.0.0.weight")
    if sample_size is None:
        sample_size = 128 if sdxl else 96 if context == 1024 else 64
    return UNetConfig(
        in_channels=state_dict["input_blocks.0.0.weight"].shape[1],
        out_channels=state_dict["out.2.weight"].shape[0],
        block_out_channels=tuple(channels), layers_per_block=per_level,
        attention_levels=tuple(attention), transformer_layers_per_block=tuple(depths), mid_transformer_depth=mid_depth,
        num_heads=num_heads, head_dim=head_dim, cross_attention_dim=context,
        use_linear_projection=state_dict["middle_block.1.proj_in.weight"].ndim == 2,
        upcast_attention=(context == 1024) if upcast_attention is None else upcast_attention,
        addition_time_embed_dim=addition_time_embed_dim if sdxl else None,
        projection_class_embeddings_input_dim=state_dict["label_emb.0.0.weight"].shape[1] if sdxl else None,
        norm_num_groups=norm_num_groups, sample_size=sample_size)
