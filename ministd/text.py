"""The CLIP text encoder, its weight layouts, and a tiny CLIP for ShapesWorld (chapter 07).

The text transformer of CLIP (Radford et al. 2021, section 2.4; GPT-2 style,
Radford et al. 2019) turns token ids ``[B, 77]`` into vectors ``[B, 77, D]``:

    x_0 = token_embedding[ids] + position_embedding[0..76]
    x_l = x_{l-1} + Attention(LN1(x_{l-1}))      (causal: token i sees 0..i)
    x_l = x_l     + MLP(LN2(x_l))                 MLP = fc2(act(fc1(.)))
    last_hidden_state = final_LN(x_L)
    pooled            = last_hidden_state[EOS position] (@ text_projection)

The same class is every text encoder of Stable Diffusion:

- SD 1.x: OpenAI CLIP ViT-L/14 text tower, D=768, 12 layers, quick-GELU;
- SD 2.x: OpenCLIP ViT-H/14, D=1024, GELU, used up to its penultimate layer
  (diffusers stores 23 of its 24 layers);
- SDXL: CLIP-L (penultimate layer, no final LN) + OpenCLIP bigG/14 (D=1280,
  32 layers, penultimate layer, pooled output projected to 1280).

Weights load from a transformers folder (``config.json`` +
``model.safetensors``) or from the original single-file layouts:
``cond_stage_model.transformer.text_model.*`` (SD 1.x, already in
transformers' names), ``cond_stage_model.model.*`` (OpenCLIP names, SD 2.x),
``conditioner.embedders.0.transformer.*`` / ``conditioner.embedders.1.model.*``
(SDXL; the refiner has bigG at ``embedders.0.model``). Our parameter names are
transformers' names without the ``text_model.`` prefix; the OpenCLIP names are
mapped onto them by :func:`openclip_to_ministd`.

The second half of the file is the tiny contrastive CLIP trained on
ShapesWorld (:class:`TinyCLIP`, :func:`clip_loss`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ministd.weights import (build_on_meta, load_model, load_strict, read_json, read_weights, rename_by_prefix,
                             strip_prefix)

ACTIVATIONS = ("quick_gelu", "gelu")
SHAPES_CLIP_FILE = Path(__file__).resolve().parent.parent / "data" / "shapes_clip.safetensors"


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
@dataclass
class CLIPTextConfig:
    """Sizes of a CLIP text transformer.

    ``eos_token_id`` chooses where the pooled vector is read: ``None`` takes
    the position of the largest id in each row (the original CLIP rule: EOS
    49407 is the largest id), an integer takes the first position holding
    that id. transformers uses argmax whenever its config says
    ``eos_token_id == 2`` (old exports, including the SD checkpoints) and the
    first EOS otherwise; both agree on rows made by the tokenizer.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def clip_l(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text tower (SD 1.x, SDXL's first encoder)."""
        return cls(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                   hidden_act="quick_gelu")

    @classmethod
    def openclip_h(cls, num_layers: int = 23) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14 text tower as SD 2.x uses it (23 of 24 layers)."""
        return cls(hidden_size=1024, num_layers=num_layers, num_heads=16, intermediate_size=4096,
                   hidden_act="gelu")

    @classmethod
    def openclip_bigg(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14 text tower with projection (SDXL's second encoder)."""
        return cls(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                   hidden_act="gelu", projection_dim=1280)

    @classmethod
    def from_transformers(cls, cfg: Mapping) -> "CLIPTextConfig":
        """From a transformers ``config.json`` (CLIPTextModel[WithProjection])."""
        if "text_config" in cfg:  # a whole CLIPModel config
            cfg = {**cfg["text_config"], "architectures": cfg.get("architectures", [])}
        with_projection = any("WithProjection" in a for a in cfg.get("architectures") or [])
        eos = cfg.get("eos_token_id", 2)
        return cls(vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg["hidden_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                   intermediate_size=cfg["intermediate_size"],
                   hidden_act=cfg.get("hidden_act", "quick_gelu"),
                   max_position_embeddings=cfg.get("max_position_embeddings", 77),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
                   projection_dim=cfg.get("projection_dim", 512) if with_projection else None,
                   eos_token_id=None if eos == 2 else eos)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# the transformer
# ---------------------------------------------------------------------------
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's fast approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding, [B, L] -> [B, L, D]."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017): softmax(QK^T/sqrt(d) + mask) V."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; mask [B or 1, 1, L, L] additive (0 or -inf) -> [B, L, D].

        softmax(q kᵀ / sqrt(D/h) + mask) v per head, computed by PyTorch's fused
        ``scaled_dot_product_attention``: the same formula in one kernel, without
        keeping the [B, h, L, L] scores around (Vaswani et al. 2017, eq. 1).
        """
        B, L, D = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, h, L, D/h]
            return t.view(B, L, h, D // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)     # [B, h, L, D/h]
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: fc2(act(fc1(x))), width D -> 4D -> D."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN1 x), then x + mlp(LN2 x)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of ``num_layers`` transformer layers, and nothing else.

    A container with no ``forward`` of its own: ``CLIPTextModel.forward`` walks
    ``encoder.layers`` itself, because it keeps every layer's output
    (``hidden_states``, which ``clip_skip`` picks from). The module exists so that the
    parameter names are transformers' (``encoder.layers.3.mlp.fc1.weight``, under
    transformers' ``text_model.`` prefix), which lets a transformers or diffusers text
    encoder load with no key map (chapter 07; OpenCLIP's names are mapped below).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))


@dataclass
class CLIPTextOutput:
    """What the text encoder returns.

    last_hidden_state: [B, L, D] the sequence the U-Net attends to (final LN
                       applied unless asked otherwise; see ``clip_skip``)
    hidden_states:     tuple of num_layers + 1 tensors [B, L, D]: the embeddings,
                       then the output of every layer (no final LN)
    pooled:            [B, P] projected EOS vector if the model has a projection,
                       else [B, D] (final-LN'd last layer at the EOS position)
    pooler_output:     [B, D] the EOS vector before any projection
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    pooled: torch.Tensor
    pooler_output: torch.Tensor = field(repr=False)


class CLIPTextModel(nn.Module):
    """CLIP's text transformer, optionally with its projection (``projection_dim``)."""

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        self.config = config or CLIPTextConfig()
        self.embeddings = CLIPTextEmbeddings(self.config)
        self.encoder = CLIPEncoder(self.config)
        self.final_layer_norm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
        if self.config.projection_dim is not None:
            self.text_projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False)
        else:
            self.text_projection = None

    def attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B or 1, 1, L, L]: -inf above the diagonal (causal),
        and on padded key positions when ``attention_mask`` [B, L] is given."""
        L = input_ids.shape[1]
        blocked = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).triu(1)[None, None]
        if attention_mask is not None:
            blocked = blocked | (attention_mask[:, None, None, :] == 0)
        return torch.zeros(blocked.shape, dtype=dtype, device=input_ids.device).masked_fill(
            blocked, torch.finfo(dtype).min)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index [B] of the token whose vector is pooled (see CLIPTextConfig)."""
        if self.config.eos_token_id is None:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                clip_skip: int = 0, final_layer_norm: bool = True) -> CLIPTextOutput:
        """Encode token ids [B, L] (L <= max_position_embeddings).

        Args:
            attention_mask: optional [B, L] of 1 (token) / 0 (padding). Stable
                Diffusion does not pass it: padding tokens are attended to.
            clip_skip: how many final layers ``last_hidden_state`` skips. 0 is
                the last layer; 1 the penultimate (the "clip skip 2" of popular
                UIs, SD 2.x and SDXL; same meaning as diffusers' ``clip_skip=1``).
            final_layer_norm: apply the final LayerNorm to that layer (SD 1.x and
                SD 2.x do; SDXL takes the penultimate layer without it).
        """
        self._check_ids(input_ids, attention_mask, clip_skip)
        x = self.embeddings(input_ids)
        mask = self.attention_mask(input_ids, attention_mask, x.dtype)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        chosen = hidden_states[-1 - clip_skip]
        last = self.final_layer_norm(chosen) if final_layer_norm else chosen
        final = self.final_layer_norm(hidden_states[-1])
        pooler_output = final[torch.arange(final.shape[0], device=final.device), self.eos_positions(input_ids)]
        pooled = self.text_projection(pooler_output) if self.text_projection is not None else pooler_output
        return CLIPTextOutput(last, tuple(hidden_states), pooled, pooler_output)

    def _check_ids(self, input_ids, attention_mask, clip_skip) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor [batch, length], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the "
                             f"{self.config.max_position_embeddings} positions of this encoder; "
                             "truncate, or use the tokenizer's chunked mode and encode_chunked()")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                             f"input_ids shape {tuple(input_ids.shape)}")
        if not 0 <= clip_skip < self.config.num_layers:
            raise ValueError(f"clip_skip must be in [0, {self.config.num_layers - 1}], got {clip_skip}")

    # ------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "CLIPTextModel":
        """Load a transformers ``text_encoder/`` folder (config.json + model.safetensors, or its shards).

        Built on the meta device; the tensors are read once, in ``dtype``.
        """
        folder = Path(folder)
        config = CLIPTextConfig.from_transformers(read_json(folder / "config.json"))
        model = build_on_meta(lambda: cls(config))
        model.load_transformers_state_dict(read_weights(folder, "model", dtype=dtype), source=str(folder))
        return model

    def load_transformers_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                                     source: str = "state dict") -> None:
        """Load transformers' names (``text_model.*`` + ``text_projection.weight``)."""
        load_strict(self, transformers_to_ministd(state_dict), source=source,
                    ignore_unexpected=("embeddings.position_ids",))

    @classmethod
    def from_single_file(cls, state_dict: Mapping[str, torch.Tensor], prefix: str,
                         config: CLIPTextConfig | None = None, num_layers: int | None = None,
                         source: str = "single file") -> "CLIPTextModel":
        """Build and load a text encoder stored under ``prefix`` in an original checkpoint.

        ``prefix`` ending in ``transformer.`` is the transformers layout (SD 1.x
        ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``);
        ending in ``model.`` is OpenCLIP's (SD 2.x ``cond_stage_model.model.``, SDXL
        ``conditioner.embedders.1.model.``, refiner ``conditioner.embedders.0.model.``).
        ``config`` defaults to CLIP-L for the first and to sizes read from the
        tensors for OpenCLIP. ``num_layers`` keeps only the first layers (SD 2.x: 23).
        With ``config.projection_dim=None`` a stored ``text_projection`` is skipped
        (SD 2.x keeps one it never uses).
        """
        part = strip_prefix(state_dict, prefix)
        if not part:
            raise ValueError(f"no tensors under prefix {prefix!r} in {source}")
        if prefix.endswith("model.") and "positional_embedding" in part:
            sd = openclip_to_ministd(part)
            config = config or config_from_openclip(part)
        else:
            sd = transformers_to_ministd(part)
            config = config or CLIPTextConfig.clip_l()
        if num_layers is not None:
            if not 1 <= num_layers <= config.num_layers:
                raise ValueError(f"num_layers must be in [1, {config.num_layers}], got {num_layers}")
            config = CLIPTextConfig(**{**config.to_dict(), "num_layers": num_layers})
            sd = {k: v for k, v in sd.items()
                  if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= num_layers)}
        model = cls(config)
        ignore = ["embeddings.position_ids", "logit_scale"]
        if config.projection_dim is None:  # SD 2.x files carry a projection the U-Net never uses
            ignore.append("text_projection.weight")
        load_strict(model, sd, source=f"{source} [{prefix}]", ignore_unexpected=ignore)
        return model


# ---------------------------------------------------------------------------
# key maps: transformers and OpenCLIP names -> ours
# ---------------------------------------------------------------------------
# transformers' names -> ours: the same modules, without the "text_model." level
TRANSFORMERS_PREFIXES = {"text_model.": ""}

# OpenCLIP's names -> ours, inside transformer.resblocks.{i}. -> encoder.layers.{i}.
OPENCLIP_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def transformers_to_ministd(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``text_model.X`` -> ``X`` (:data:`TRANSFORMERS_PREFIXES`); ``text_projection.weight`` stays."""
    return {rename_by_prefix(k, TRANSFORMERS_PREFIXES): v for k, v in state_dict.items()}


def openclip_prefixes(num_layers: int) -> dict[str, str]:
    """The key map from OpenCLIP's text tower, as a table: OpenCLIP prefix (or whole key) -> ours."""
    table = {"token_embedding.": "embeddings.token_embedding.",
             "positional_embedding": "embeddings.position_embedding.weight",   # a bare parameter [L, D]
             "ln_final.": "final_layer_norm.",
             "text_projection": "text_projection.weight"}                      # transposed, see below
    for i in range(num_layers):
        table.update({f"transformer.resblocks.{i}.{a}.": f"encoder.layers.{i}.{b}."
                      for a, b in OPENCLIP_BLOCK_NAMES.items()})
    return table


def openclip_to_ministd(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map OpenCLIP's text-tower names (prefix already removed) onto ours.

    Names follow :func:`openclip_prefixes`; two tensors change form too:

    - ``attn.in_proj_weight`` [3D, D] stacks the q, k, v projections (the layout
      of ``torch.nn.MultiheadAttention``): split in thirds;
    - ``text_projection`` is a bare matrix used as ``x @ P`` [D, P]; ours is an
      ``nn.Linear`` computing ``x @ W.T``, so W = P.T.
    Anything else (``logit_scale``, unknown names) is passed through so the
    strict loader reports it.
    """
    layers = [int(m.group(1)) for k in state_dict if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))]
    table = openclip_prefixes(max(layers) + 1 if layers else 0)
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if m:
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = chunk.contiguous()
        elif key == "text_projection":
            out[table[key]] = value.T.contiguous()
        else:
            out[rename_by_prefix(key, table)] = value
    return out


def config_from_openclip(state_dict: Mapping[str, torch.Tensor], head_dim: int = 64) -> CLIPTextConfig:
    """Read the sizes of an OpenCLIP text tower from its tensors.

    The head count is not stored anywhere in the weights; OpenCLIP's text
    towers use heads of width 64 (H: 1024/16, bigG: 1280/20), the default here.
    """
    vocab, width = state_dict["token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.resblocks."))
    proj = state_dict.get("text_projection")
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_layers=layers,
                          num_heads=max(1, width // head_dim),
                          intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                          hidden_act="gelu",
                          max_position_embeddings=state_dict["positional_embedding"].shape[0],
                          projection_dim=None if proj is None else proj.shape[1])


def encode_chunked(text_encoder: CLIPTextModel, input_ids: torch.Tensor, **kwargs) -> CLIPTextOutput:
    """Encode a long prompt cut into windows by the tokenizer's chunked mode.

    input_ids [B, N, 77] -> last_hidden_state [B, N*77, D]: each window is
    encoded on its own and the sequences are concatenated (what popular UIs
    do for prompts over 75 tokens). ``pooled`` comes from the first window;
    ``hidden_states`` are concatenated the same way.
    """
    if input_ids.dim() != 3:
        raise ValueError(f"input_ids must be [batch, chunks, length], got {tuple(input_ids.shape)}")
    B, N, L = input_ids.shape
    out = text_encoder(input_ids.reshape(B * N, L), **kwargs)

    def join(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, N * L, -1)

    return CLIPTextOutput(join(out.last_hidden_state), tuple(join(h) for h in out.hidden_states),
                          out.pooled.reshape(B, N, -1)[:, 0], out.pooler_output.reshape(B, N, -1)[:, 0])


# ---------------------------------------------------------------------------
# the tiny contrastive CLIP for ShapesWorld
# ---------------------------------------------------------------------------
@dataclass
class TinyCLIPConfig:
    """A small CLIP: the text transformer above + a small convolutional image encoder."""

    text: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
        hidden_act="quick_gelu", max_position_embeddings=77, projection_dim=128))
    image_size: int = 64
    image_channels: tuple[int, ...] = (16, 32, 64, 128)
    embed_dim: int = 128
    init_temperature: float = 0.07   # CLIP's initial tau; logit_scale = log(1/tau)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TinyCLIPConfig":
        return cls(text=CLIPTextConfig(**d["text"]), image_size=d["image_size"],
                   image_channels=tuple(d["image_channels"]), embed_dim=d["embed_dim"],
                   init_temperature=d["init_temperature"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_channels"] = list(self.image_channels)
        return d


class TinyImageEncoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> embeddings [B, embed_dim].

    Strided 3x3 convolutions with GroupNorm and SiLU halve the resolution at
    each stage; the feature map is flattened (so position survives, unlike
    global pooling) and projected.
    """

    def __init__(self, config: TinyCLIPConfig):
        super().__init__()
        layers, c_in = [], 3
        for c in config.image_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.image_channels)
        self.projection = nn.Linear(c_in * side * side, config.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(images).flatten(1))


class TinyCLIP(nn.Module):
    """Text and image towers mapping into one space; ``logit_scale`` = log(1/temperature)."""

    def __init__(self, config: TinyCLIPConfig | None = None):
        super().__init__()
        self.config = config or TinyCLIPConfig()
        if self.config.text.projection_dim != self.config.embed_dim:
            raise ValueError("text.projection_dim must equal embed_dim "
                             f"({self.config.text.projection_dim} != {self.config.embed_dim})")
        self.text_encoder = CLIPTextModel(self.config.text)
        self.image_encoder = TinyImageEncoder(self.config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / self.config.init_temperature)))
        self.init_text_weights()

    @torch.no_grad()
    def init_text_weights(self) -> None:
        """CLIP's initialisation of the text tower (OpenAI ``model.py``): small
        embeddings (std 0.02 tokens, 0.01 positions) and weights of std ~ width^-0.5,
        so that no layer dominates the residual stream at the start."""
        text, width = self.text_encoder, self.config.text.hidden_size
        nn.init.normal_(text.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(text.embeddings.position_embedding.weight, std=0.01)
        block_std = width ** -0.5 * (2 * self.config.text.num_layers) ** -0.5
        for layer in text.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.normal_(proj.weight, std=width ** -0.5)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=block_std)
            nn.init.normal_(layer.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(layer.mlp.fc2.weight, std=block_std)
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(text.text_projection.weight, std=width ** -0.5)

    @classmethod
    def from_pretrained(cls, weights: str | Path | None = None, dtype: torch.dtype = torch.float32) -> "TinyCLIP":
        """Load a tiny CLIP written by ``python -m ministd.train.clip export``: a
        ``name.safetensors`` file and its ``name.json`` config next to it.

        ``weights`` is that file, or a folder holding it, as every other
        ``from_pretrained`` takes a folder: in a folder, ``shapes_clip.safetensors``
        if present, else its only ``.safetensors`` file (so ``"data"`` works).
        Default: the shipped ShapesWorld CLIP, ``data/shapes_clip.safetensors``
        (weights stored as float16).
        """
        weights = Path(weights) if weights is not None else SHAPES_CLIP_FILE
        if weights.is_dir():
            named = weights / SHAPES_CLIP_FILE.name
            found = [named] if named.is_file() else sorted(weights.glob("*.safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(f"{weights} must hold {SHAPES_CLIP_FILE.name} or exactly one .safetensors "
                                        f"file (with its .json beside it); found {[f.name for f in found]}")
            weights = found[0]
        return load_model(weights, lambda fields: cls(TinyCLIPConfig.from_dict(fields)), dtype=dtype,
                          transform=lambda tensors, fields: unpack_token_table(tensors, fields["text"]["vocab_size"]))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, E] unit vectors."""
        return F.normalize(self.text_encoder(input_ids).pooled, dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unit vectors."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Similarity logits [B_images, B_texts] = exp(logit_scale) * cos."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP caps the scale at 100
        return scale * self.encode_image(images) @ self.encode_text(input_ids).T


TOKEN_TABLE = "text_encoder.embeddings.token_embedding.weight"
TOKEN_ROWS, TOKEN_IDS = TOKEN_TABLE.removesuffix("weight") + "rows", TOKEN_TABLE.removesuffix("weight") + "ids"


def pack_token_table(state: Mapping[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A TinyCLIP state dict with its token table [V, D] replaced by the rows ``ids`` [K] (int64)
    and those rows [K, D]: ShapesWorld trains a few dozen of CLIP's 49,408 rows, the rest stay at
    their random start and no caption reads them (DESIGN.md's budget allows storing only these)."""
    ids = torch.as_tensor(ids, dtype=torch.int64).unique(sorted=True)
    rest = {k: v for k, v in state.items() if k != TOKEN_TABLE}
    return rest | {TOKEN_ROWS: state[TOKEN_TABLE][ids].clone(), TOKEN_IDS: ids}


def unpack_token_table(tensors: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_token_table` at load: the full table [vocab_size, D], the stored
    rows in place and zeros elsewhere. A file with the whole table passes unchanged."""
    if TOKEN_IDS not in tensors:
        return tensors
    rows, ids = tensors.pop(TOKEN_ROWS), tensors.pop(TOKEN_IDS).long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{TOKEN_IDS} holds ids outside 0..{vocab_size - 1}")
    table = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    return tensors | {TOKEN_TABLE: table}


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Figure 3).

    ``logits[i, j]`` scores image i against text j; the matching pairs lie
    on the diagonal. Cross-entropy picks the right text for each image and
    the right image for each text; the loss is the mean of the two.
    """
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
