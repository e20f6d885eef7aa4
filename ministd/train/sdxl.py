"""Training and measuring the book's SDXL-type models on ShapesWorld (chapters 13-14).

    python -m ministd.train.sdxl prepare --kind base --out /work/runs/xl/cache.pt
    python -m ministd.train.sdxl train --kind base --cache /work/runs/xl/cache.pt --out /work/runs/xl
    python -m ministd.train.sdxl prepare --kind refiner --out /work/runs/xlr/cache.pt
    python -m ministd.train.sdxl train --kind refiner --cache /work/runs/xlr/cache.pt --out /work/runs/xlr
    python -m ministd.train.sdxl export --checkpoint /work/runs/xl/last.pt --out data/shapes_xl_unet.safetensors
    python -m ministd.train.sdxl effects --json data/shapes_xl_effects.json

What SDXL (Podell et al. 2023) adds to Stable Diffusion, each reproduced small:

- **Two text encoders** (sec. 2.1): the chapter-07 CLIP (width 128) and a wider
  one trained the same way (``data/shapes_clip_wide``, width 192); each one's
  penultimate hidden states, without the final LayerNorm, are concatenated
  ([B, 77, 320]) for cross-attention, and the wide one's pooled, projected
  vector [B, 192] joins the timestep embedding.
- **Micro-conditioning** (sec. 2.2): the six numbers original_size (h, w),
  crops_coords_top_left (top, left), target_size (h, w) of each training
  picture (:func:`ministd.data.sdxl_sample`), each turned into Fourier features
  of width ``ADDITION_TIME_EMBED_DIM`` and added, with the pooled text, to the
  timestep embedding.
- **Aspect buckets** (sec. 2.3): pictures of 64x64, 48x80 and 80x48; a batch
  holds one bucket.
- **The refiner** (sec. 2.5): a U-Net trained only on the low-noise end of the
  schedule (t < ``REFINER_MAX_T``, SDXL's first 200 of 1000 noise levels), on
  the wide encoder alone, with an aesthetic score in place of target_size. Our
  score is :func:`quality_score`, computed from the pixels; the refiner's
  pictures span a range of it (clean renders and renders degraded by blur,
  noise and off-palette speckles, :func:`degrade`).

Both U-Nets start from the shipped text-to-image U-Net (``data/shapes_unet``,
chapter 08) rather than from scratch, to fit the CPU budget: every weight of
the same shape is copied; the cross-attention keys and values, which now read
320 (base) or 192 (refiner) channels, keep the old weights on the first 128
input channels (base) or start fresh (refiner); the added embedding's last
layer starts at zero, so training begins from the old model exactly (see
:func:`warm_start`). Caption dropout (10%) gives zero text states and a zero
pooled vector, as SDXL's base is used (``force_zeros_for_empty_prompt``).
Training runs unchanged on a CUDA GPU where there is one.

Reading the crops is slow to learn. The crop moves the whole layout, and lower down
the schedule the layout is plain to see in x_t, so the ids carry news only at high
noise (t >= 800), where the plain epsilon loss weights the x0 error by
abar / (1 - abar): 0.04 at t = 800, 0.014 at t = 900 (see :func:`layout_weights`). Two settings put the weight back, and the base's log prints
:func:`crop_reliance` at every checkpoint to show whether it is working:
``--x0-weight-cap`` (the x0 error, capped, at high noise) and ``--high-noise-share``
(part of each batch drawn from t >= ``--high-noise-from``). Measured on a 4,000-picture
cache (``--original-sides 16 128 --max-margin 48``), batch 32: 7,500 steps of cap 20
with no share took the shuffled-minus-true x0 error at t = 900 from 0.0002 to 0.004;
8,000 further steps of cap 50 with half of each batch at t >= 850 (lr 1e-4, added
embedding 2e-3) took it to 0.031, and the mean object shift between crops (0, 0) and
(32, 32) on 32 held-out prompts from (-4.5, -3.1) to (-7.5, -7.4) pixels at step 4,250.

The refiner's score is slow to learn for the same reason as the crops: its columns of the
added embedding start at zero (:func:`warm_start`), and at the U-Net's own learning rate
they stay near it. Measured on an 8,000-picture refiner cache, warm-started from the base,
batch 32, lr 1e-4 (x0 errors on 64 clean held-out latents, by a one-off script; quality
and palette share by ``effects``): after 3,000 steps with ``--added-lr-scale 1`` the x0
error was the same at scores 2.5 and 6.0 (0.0008 at t = 20, 0.0037 at t = 180) and the
refined pictures' quality score moved by 0.001 between them; 2,500 further steps with
``--added-lr-scale 20`` made the two differ (t = 20: 0.0007 at 6.0 against 0.0008 at 2.5;
t = 180: 0.0033 against 0.0041), and the refined pictures' quality came out 4.95 / 5.00 /
5.01 and their palette share 96.9 / 97.1 / 97.3% at scores 2.5 / 4.0 / 6.0 (64 prompts).

Uncut views must be common for crop (0, 0) to mean "nothing is cut": with both margins of
the square bucket uniform in 0..32, 1,702 of 20,000 square pictures lie within 2 pixels of
(0, 0) (``effects``' data shift samples; the earlier caches' 0..48 gave fewer), and the base
put objects too high at (0, 0): 14 of its 21 cut pictures of 64 touched the top edge (a
one-off script). ``prepare --zero-margin-prob 0.5`` makes each axis uncut half of the time
(:func:`ministd.data.sdxl_sample`): 31% of a 10,000-picture cache's square pictures at
exactly (0, 0). 5,000 steps on such a cache from that base (cap 20, 30% at t >= 850) took it
from 67% to 73% wholly in frame at (0, 0) and the crop-16 shift from (-10.3, -7.6) to
(-11.5, -12.1) by step 4,000 (``effects``, 64 prompts).

The size ids are not learned by the whole-network recipe: the base's added embedding maps
original_size 16 and 128 to vectors 0.1 apart (crops (0, 0) and (16, 16): 13 apart), though
its first layer's columns for them are as large as the crops'. The softness a small original
leaves in a 16x16 latent is visible in x_t wherever it matters (t < 400), so knowing the size
lowers the loss very little. ``--trainable conditioning --timesteps 20 400`` trains only the
weights that carry the ids (:func:`conditioning_parameter`) where the softness is decided; a
one-off script doing so (paired cache of the same scenes at original sides 16-20 and
100-128, batch 32, no EMA) moved the embeddings 0.7-1.4 apart, but the pictures' edge
sharpness at original_size 16 against 128 (64 prompts) only to 264 vs 272 after 600 steps at
lr 1e-3 and 270 vs 272 after 1,200 at 2e-3, against 245 vs 290 for ground truth through the VAE.

SDXL's negative micro-conditioning does show what the ids hold: with the other size as the
negative branch's (``negative_original_size`` with ``negative_target_size``), guidance
multiplies the small difference. On the zero-margin run's step-4,000 EMA (``effects``, 64
prompts): original_size 16 against 128 gave sharpness 282.8 vs 283.0 and the 16 softer in
52% of the pairs; with each other's size as the negative, 276.3 vs 288.8 and softer in 92%
(ground truth through the VAE: 245 vs 290, 100%). A negative crop does not help framing:
positive (0, 0) against a negative crop of 16 or 32 pushed objects down and right, and
wholly-in-frame fell from 73% to 67% / 64% (a one-off script, the same prompts).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ministd.schedules import NoiseSchedule
from ministd.train import diffusion_loss, diffusion_loss_terms
from ministd.train.unet import _positive_int
from ministd.train.unet import (has_held_out_triple, learning_rate, save_atomically,
                                training_captions, update_ema)
from ministd.unet import UNet, UNetConfig, shapes_tiny

KINDS = ("base", "refiner")
DATA = Path(__file__).resolve().parents[2] / "data"
CLIP_FILES = {"clip": DATA / "shapes_clip.safetensors", "clip_wide": DATA / "shapes_clip_wide.safetensors"}
ENCODERS = {"base": ("clip", "clip_wide"), "refiner": ("clip_wide",)}
TIME_IDS = {"base": 6, "refiner": 5}          # (h, w, top, left, h, w) / (h, w, top, left, score)
ADDITION_TIME_EMBED_DIM = 64                  # SDXL: 256 for ids up to ~1024 pixels; ours reach 128
REFINER_MAX_T = 200                           # SDXL's refiner: the first 200 of 1000 noise levels
WORLD_SEEDS = {"base": 3_000_031, "refiner": 3_000_037}
CONTEXT_LENGTH = 77


# --------------------------------------------------------------------------- #
# The quality score of chapter 14 and the degradations it ranks
# --------------------------------------------------------------------------- #

QUALITY_DISTANCE = 60.0     # RGB distance at which a pixel stops counting as a palette colour
QUALITY_SCALE = 6.0         # a picture all of palette colours scores 6 (see quality_score)


def quality_score(picture) -> float:
    """How clean a ShapesWorld picture is, from its pixels alone: a number in [0, 6].

    Each pixel counts 1 - d / 60, floored at 0, where d is its RGB distance to the
    nearest palette colour (:data:`ministd.data.PALETTE`); the score is 6 times the
    mean. Blur, noise and off-palette speckles all move pixels off the palette;
    anti-aliased edges blend two colours, so clean renders score 5.5-6 (their
    median about 5.9), not quite 6. The scale puts clean pictures where the
    SDXL refiner's defaults put good ones (diffusers' ``aesthetic_score=6.0``,
    ``negative_aesthetic_score=2.5``): the default asks for a clean picture.

    picture: PIL image or uint8 array [H, W, 3].
    """
    from ministd.train.adherence import palette_distances

    pixels = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"picture must be an RGB image [H, W, 3], got shape {pixels.shape}")
    nearest = palette_distances(pixels).min(-1)
    return float(QUALITY_SCALE * np.clip(1 - nearest / QUALITY_DISTANCE, 0, 1).mean())


def degrade(picture: Image.Image, rng: random.Random) -> Image.Image:
    """A picture made worse at random: each of blur (radius 0.5-1.5), Gaussian noise
    (sigma 4-30 per channel) and off-palette speckles (0.5-6% of pixels set to random
    colours) applied with probability 1/2, at least one of them."""
    kinds = [k for k in ("blur", "noise", "speckles") if rng.random() < 0.5] or [rng.choice(["blur", "noise", "speckles"])]
    if "blur" in kinds:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    array = np.asarray(picture.convert("RGB")).astype(np.float64)
    nrng = np.random.default_rng(rng.getrandbits(32))
    if "noise" in kinds:
        array = array + nrng.normal(0, rng.uniform(4, 30), array.shape)
    if "speckles" in kinds:
        spots = nrng.random(array.shape[:2]) < rng.uniform(0.005, 0.06)
        array[spots] = nrng.integers(0, 256, (int(spots.sum()), 3))
    return Image.fromarray(array.clip(0, 255).round().astype(np.uint8))


# --------------------------------------------------------------------------- #
# The models
# --------------------------------------------------------------------------- #

def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def load_encoders(kind: str) -> list:
    """The frozen text towers a kind reads: base (128-wide CLIP, 192-wide CLIP), refiner (192-wide)."""
    from ministd.text import TinyCLIP

    return [TinyCLIP.from_pretrained(CLIP_FILES[name]).text_encoder.eval().requires_grad_(False)
            for name in ENCODERS[_check_kind(kind)]]


def xl_config(kind: str) -> UNetConfig:
    """shapes_tiny with SDXL's added embedding: cross-attention over the encoders' states side by
    side (128 + 192 = 320 base, 192 refiner); added input = pooled text (192) + 64 x time ids."""
    widths = {"clip": 128, "clip_wide": 192}
    config = shapes_tiny(cross_attention_dim=sum(widths[e] for e in ENCODERS[_check_kind(kind)]))
    config.addition_time_embed_dim = ADDITION_TIME_EMBED_DIM
    config.projection_class_embeddings_input_dim = widths["clip_wide"] + TIME_IDS[kind] * ADDITION_TIME_EMBED_DIM
    return UNetConfig.from_dict(config.to_dict())


@torch.no_grad()
def warm_start(unet: UNet, source: dict[str, torch.Tensor]) -> dict[str, int]:
    """Copy the shipped U-Net's weights into an SDXL-type one (see the module docstring).

    Same-shaped tensors are copied; cross-attention ``to_k`` / ``to_v`` [C, 320] take the
    old [C, 128] on their first 128 input channels and zeros on the rest when the first
    encoder is the old one (base; the refiner's stay as initialised); the added embedding's
    last layer is zeroed, so the new inputs start with no effect. A source that is itself an
    SDXL-type U-Net of this shape (it has an added embedding) is copied whole, its added
    embedding included, so a run can go on from weights exported by an earlier one.

    A refiner may also start from the SDXL-type base ("narrowed"): its ``to_k`` / ``to_v``
    [C, 192] take the base's columns that read the wide encoder (the last 192 of 320, the
    order of ``ENCODERS``), and its added embedding's first layer takes the base's columns
    for the pooled text and the four ids both share (original size, crop); the score's
    columns, where the base reads the target size, start at zero. Returns counts.
    """
    state = unet.state_dict()
    counts = {"copied": 0, "widened": 0, "narrowed": 0, "fresh": 0}
    wide, ids = 192, ADDITION_TIME_EMBED_DIM
    shared = wide + 4 * ids                       # pooled text + (h, w, top, left) features
    for key, value in state.items():
        old = source.get(key)
        if old is not None and old.shape == value.shape:
            value.copy_(old)
            counts["copied"] += 1
        elif (old is not None and old.dim() == 2 and value.shape[0] == old.shape[0]
              and value.shape[1] == 320 and old.shape[1] == 128):
            value.zero_()
            value[:, :128] = old
            counts["widened"] += 1
        elif (old is not None and old.dim() == 2 and value.shape[0] == old.shape[0]
              and value.shape[1] == wide and old.shape[1] == 320):
            value.copy_(old[:, 320 - wide:])
            counts["narrowed"] += 1
        elif (key == "add_embedding.linear_1.weight" and old is not None and value.shape[0] == old.shape[0]
              and value.shape[1] == wide + TIME_IDS["refiner"] * ids and old.shape[1] == wide + TIME_IDS["base"] * ids):
            value.zero_()
            value[:, :shared] = old[:, :shared]
            counts["narrowed"] += 1
        else:
            counts["fresh"] += 1
    if not any(key.startswith("add_embedding.") for key in source):
        unet.add_embedding.linear_2.weight.zero_()
        unet.add_embedding.linear_2.bias.zero_()
    return counts


def text_conditions(encoders: list, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, 77] -> (states [B, 77, sum of widths], pooled [B, 192]) as the SDXL
    pipeline computes them: penultimate layers without the final LayerNorm, side by side;
    the last encoder's projected EOS vector."""
    states, pooled = [], None
    for encoder in encoders:
        out = encoder(input_ids, clip_skip=1, final_layer_norm=False)
        states.append(out.last_hidden_state)
        pooled = out.pooled
    return torch.cat(states, dim=-1), pooled


# --------------------------------------------------------------------------- #
# The latent cache: one group per aspect bucket
# --------------------------------------------------------------------------- #

def prepare(args) -> None:
    """Draw ``--n`` SDXL samples (:func:`ministd.data.sdxl_sample`, random buckets), encode them
    with the frozen VAE bucket by bucket, tokenize 2 captions of random forms per picture and
    record their time ids. The refiner's pictures are degraded (:func:`degrade`) with
    probability ``--degrade-prob`` and scored (:func:`quality_score`) after that."""
    from tqdm import tqdm

    from ministd.data import ShapesWorld, pil_to_tensor, sdxl_sample
    from ministd.tokenizer import CLIPTokenizer
    from ministd.vae import AutoencoderKL

    lo, hi = args.original_sides
    if not 16 <= lo <= hi:
        raise ValueError(f"--original-sides must be LOW HIGH with 16 <= LOW <= HIGH, got {lo} {hi}")
    if args.max_margin < 0:
        raise ValueError(f"--max-margin must be >= 0, got {args.max_margin}")
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.load(args.vae).eval()
    tokenizer = CLIPTokenizer.from_vocab_file()
    seed = WORLD_SEEDS[args.kind] if args.seed is None else args.seed
    world = ShapesWorld(seed=seed, objects=(1, 2))
    groups: dict[str, dict[str, list]] = {}
    kept = 0
    index = 0
    bar = tqdm(total=args.n, desc="draw", mininterval=10)
    while kept < args.n:
        attrs = world.attributes(index)[0]
        if has_held_out_triple(attrs):
            index += 1
            continue
        sample = sdxl_sample(world, index, original_sides=tuple(args.original_sides), max_margin=args.max_margin,
                              zero_margin_prob=args.zero_margin_prob)
        picture = sample.image
        rng = random.Random(f"sdxl-{args.kind}:{seed}:{index}")
        if args.kind == "refiner" and rng.random() < args.degrade_prob:
            picture = degrade(picture, rng)
        last = [quality_score(picture)] if args.kind == "refiner" else list(sample.target_size)
        group = groups.setdefault("x".join(map(str, sample.target_size)),
                                  {"pixels": [], "captions": [], "time_ids": []})
        group["pixels"].append(pil_to_tensor(picture))
        group["captions"].append(training_captions(attrs, rng, args.captions))
        group["time_ids"].append([*sample.original_size, *sample.crops_coords_top_left, *last])
        kept += 1
        index += 1
        bar.update(1)
    bar.close()
    buckets = {}
    with torch.no_grad():
        for name, group in groups.items():
            means, stds = [], []
            pixels = torch.stack(group["pixels"])
            for start in tqdm(range(0, len(pixels), args.batch_size), desc=f"encode {name}", mininterval=10):
                posterior = vae.encode(pixels[start:start + args.batch_size])
                means.append(vae.scale_latents(posterior.mean).half())
                stds.append((posterior.std * vae.scaling_factor).half())
            flat = [c for per_picture in group["captions"] for c in per_picture]
            ids = tokenizer(flat, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids
            buckets[name] = {"latent_mean": torch.cat(means), "latent_std": torch.cat(stds),
                             "input_ids": ids.to(torch.int32).view(len(pixels), args.captions, CONTEXT_LENGTH),
                             "time_ids": torch.tensor(group["time_ids"], dtype=torch.float32),
                             "captions": group["captions"]}
    cache = {"buckets": buckets, "meta": {"kind": args.kind, "world_seed": seed, "n": args.n,
                                          "vae": str(args.vae), "degrade_prob": args.degrade_prob,
                                          "original_sides": list(args.original_sides), "max_margin": args.max_margin,
                                          "zero_margin_prob": args.zero_margin_prob}}
    save_atomically(cache, Path(args.out))
    sizes = {k: v["latent_mean"].shape[0] for k, v in buckets.items()}
    print(f"wrote {args.out}: {args.kind} cache, {args.n} pictures by bucket {sizes}")
    if args.kind == "refiner":
        scores = torch.cat([b["time_ids"][:, -1] for b in buckets.values()])
        print(f"quality scores: min {scores.min():.2f}, median {scores.median():.2f}, max {scores.max():.2f}")


def check_cache(cache: dict, kind: str) -> None:
    if "buckets" not in cache or cache.get("meta", {}).get("kind") != kind:
        raise ValueError(f"not a {kind} cache of `python -m ministd.train.sdxl prepare --kind {kind}`")
    for name, b in cache["buckets"].items():
        n = b["latent_mean"].shape[0]
        if b["time_ids"].shape != (n, TIME_IDS[kind]) or b["input_ids"].shape[0] != n:
            raise ValueError(f"cache bucket {name}: latents, input_ids and time_ids must have one row per picture")


def draw_batch(cache: dict, step: int, args) -> tuple:
    """The global batch of ``step`` (deterministic, so a resumed run repeats nothing):
    a bucket drawn in proportion to its pictures, then ``--batch-size`` of them."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    names = sorted(cache["buckets"])
    counts = torch.tensor([cache["buckets"][k]["latent_mean"].shape[0] for k in names], dtype=torch.float)
    bucket = cache["buckets"][names[int(torch.multinomial(counts, 1, generator=g))]]
    idx = torch.randint(0, bucket["latent_mean"].shape[0], (args.batch_size,), generator=g)
    mean, std = bucket["latent_mean"][idx].float(), bucket["latent_std"][idx].float()
    latents = mean + std * torch.randn(mean.shape, generator=g)
    low, high = getattr(args, "timesteps", LATER_DEFAULTS["timesteps"])
    high = min(high, REFINER_MAX_T) if args.kind == "refiner" else high
    t = torch.randint(low, high, (len(idx),), generator=g)
    noise = torch.randn(mean.shape, generator=g)
    ids = bucket["input_ids"][idx].long()
    ids = ids[torch.arange(len(idx)), torch.randint(0, ids.shape[1], (len(idx),), generator=g)]
    keep = (torch.rand(len(idx), generator=g) >= args.uncond_prob).float()   # caption dropout: zeros
    share = getattr(args, "high_noise_share", 0.0)
    if share:   # drawn last, so a run without it gets the very batches it always got
        k = round(share * len(idx))
        t[:k] = torch.randint(args.high_noise_from, 1000, (k,), generator=g)
    return latents, ids, keep, bucket["time_ids"][idx], t, noise


def layout_weights(schedule: NoiseSchedule, t: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-example weights [B] that turn the epsilon MSE into the x0 MSE where the noise is
    high, capped: clamp((1 - abar_t) / abar_t, 1, cap).

    From x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, an error e in the predicted epsilon is an
    error sqrt((1 - abar) / abar) e in the implied x0, so the x0 MSE is the epsilon MSE times
    (1 - abar) / abar = 1 / SNR. The plain epsilon loss (weight 1) therefore gives the layout
    decided at t >= 900, where 1 / SNR > 60, almost no say: that is where SDXL's crop and
    size ids carry information the noisy picture does not, and an epsilon-trained model
    learns to read them only very slowly (see the ``crop_reliance`` log). The weight is
    never below 1 (low noise keeps the epsilon loss) and stops at ``cap`` so the few very
    noisy steps cannot swamp the batch. It is the reverse of min-SNR weighting (Hang et al.
    2023), which caps the easy low-noise end; in spirit it is P2 weighting (Choi et al. 2022,
    "Perception Prioritized Training of Diffusion Models"): the coarse, high-noise stages are
    where content is decided.
    """
    abar = schedule.alphas_cumprod.to(t.device)[t].float()
    return ((1 - abar) / abar).clamp(min=1.0, max=cap)


def training_loss(unet: UNet, latents: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor, noise: torch.Tensor,
                  states: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor,
                  x0_weight_cap: float = 0.0) -> torch.Tensor:
    """The epsilon loss of one batch (:func:`ministd.train.diffusion_loss_terms`), each example's
    MSE weighted by :func:`layout_weights` when ``x0_weight_cap`` > 0 (plain, weight 1, at 0)."""
    terms = diffusion_loss_terms(unet, latents, schedule, t=t, noise=noise, encoder_hidden_states=states,
                                 added_cond={"text_embeds": pooled, "time_ids": time_ids})
    if not x0_weight_cap:
        return terms.loss
    per_example = ((terms.prediction.float() - terms.target.float()) ** 2).flatten(1).mean(dim=1)
    return (layout_weights(schedule, terms.t, x0_weight_cap) * per_example).mean()


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #

TRAINABLE = ("all", "conditioning")
RESUME_KEYS = ("kind", "steps", "seed", "batch_size", "lr", "uncond_prob", "added_lr_scale", "init_from",
               "x0_weight_cap", "high_noise_share", "high_noise_from", "trainable", "timesteps")
# settings added later, as a checkpoint written before them ran
LATER_DEFAULTS = {"x0_weight_cap": 0.0, "high_noise_share": 0.0, "high_noise_from": 850, "trainable": "all",
                  "timesteps": [0, 1000]}


def conditioning_parameter(name: str) -> bool:
    """The weights that carry the timestep and added (pooled text + time ids) embedding into
    the U-Net: the added embedding's MLP and each ResNet block's ``time_emb_proj`` (the
    per-channel shift it adds to the features). ``--trainable conditioning`` trains only
    these: the size phase, where everything else must stay as it is."""
    return name.startswith("add_embedding.") or ".time_emb_proj." in name


def check_train_args(args) -> None:
    """The training recipe's settings, refused before the cache or any weight loads."""
    cap, share, start = (getattr(args, key, LATER_DEFAULTS[key])
                         for key in ("x0_weight_cap", "high_noise_share", "high_noise_from"))
    if not (cap == 0 or 1 <= cap < math.inf):
        raise ValueError(f"--x0-weight-cap must be 0 (the plain epsilon loss) or a finite number >= 1, got {cap}")
    if not 0 <= share <= 1:
        raise ValueError(f"--high-noise-share must be a probability in [0, 1], got {share}")
    if not (isinstance(start, int) and 0 <= start < 1000):
        raise ValueError(f"--high-noise-from must be a timestep in [0, 999], got {start!r}")
    if args.kind == "refiner" and share:
        raise ValueError(f"--high-noise-share is for the base: the refiner trains on t < {REFINER_MAX_T} only")
    low, high = getattr(args, "timesteps", LATER_DEFAULTS["timesteps"])
    if not 0 <= low < high <= 1000:
        raise ValueError(f"--timesteps must be LOW HIGH with 0 <= LOW < HIGH <= 1000, got {low} {high}")
    if args.kind == "refiner" and low >= REFINER_MAX_T:
        raise ValueError(f"--timesteps LOW must be below {REFINER_MAX_T} for the refiner, got {low}")
    if share and high < 1000:
        raise ValueError("--high-noise-share draws from [--high-noise-from, 1000): leave --timesteps HIGH at 1000")
    trainable = getattr(args, "trainable", "all")
    if trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {TRAINABLE}, got {trainable!r}")


def train(args) -> None:
    """One process (CPU threads, or CUDA when available); checkpoints every ``--save-every``
    steps to ``--out/last.pt`` and resumes from it when rerun with the same settings."""
    from tqdm import tqdm

    from ministd.weights import read_safetensors

    check_train_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "last.pt"
    cache = torch.load(args.cache, map_location="cpu", weights_only=False)
    check_cache(cache, args.kind)
    encoders = [e.to(device) for e in load_encoders(args.kind)]
    torch.manual_seed(args.seed)
    unet = UNet(xl_config(args.kind))
    phase = args.init_from.endswith(".pt") if args.init_from else False
    counts = warm_start(unet, read_safetensors(args.init_from)) if args.init_from and not phase else None
    unet = unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    if args.trainable == "conditioning":
        for name, param in unet.named_parameters():
            param.requires_grad_(conditioning_parameter(name))
    # the added embedding (new in the warm start) may learn faster than the copied weights
    added = [p for n, p in unet.named_parameters() if n.startswith("add_embedding.")]
    rest = [p for n, p in unet.named_parameters() if not n.startswith("add_embedding.") and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0}, {"params": added, "lr_scale": args.added_lr_scale}],
                                  lr=args.lr, weight_decay=args.weight_decay)
    step, elapsed = 0, 0.0
    if phase and not ckpt_path.is_file():
        # a further phase: an earlier run's weights and EMA, a fresh optimiser and schedule
        state = torch.load(args.init_from, map_location="cpu", weights_only=False)
        # a conditioning phase refines the weights that ship (the EMA), the rest kept as they are
        unet.load_state_dict(state["ema" if args.trainable == "conditioning" else "unet"])
        ema.load_state_dict(state["ema"])
        elapsed = state["elapsed"]          # its training time counts toward the total
        print(f"starting from the weights of {args.init_from} (step {state['step']})", flush=True)
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        written = {k: state["args"].get(k, LATER_DEFAULTS.get(k)) for k in RESUME_KEYS}
        if any(written[k] != vars(args)[k] for k in RESUME_KEYS):
            sys.exit(f"{ckpt_path} was written with other settings ({written}); use another --out or the same")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resuming from step {step} ({elapsed / 60:.1f} min trained so far)", flush=True)
    elif counts:
        print(f"warm start from {args.init_from}: {counts}", flush=True)
    schedule = NoiseSchedule()
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    log = open(out / "log.txt", "a")
    t0 = time.time()

    def checkpoint(at_step: int) -> None:
        save_atomically({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": at_step, "elapsed": elapsed + time.time() - t0, "args": vars(args),
                         "config": unet.config.to_dict()}, ckpt_path)

    bar = tqdm(total=args.steps, initial=step, desc=f"xl {args.kind}", mininterval=10)
    unet.train()
    while step < args.steps:
        latents, ids, keep, time_ids, t, noise = (x.to(device) for x in draw_batch(cache, step, args))
        with torch.no_grad():
            states, pooled = text_conditions(encoders, ids)
            states, pooled = states * keep[:, None, None], pooled * keep[:, None]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup) * group["lr_scale"]
        loss = training_loss(unet, latents, schedule, t, noise, states, pooled, time_ids, args.x0_weight_cap)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        optimizer.step()
        update_ema(ema, unet, step, args.ema_decay)
        step += 1
        bar.update(1)
        if step % 25 == 0:
            log.write(json.dumps({"step": step, "loss": loss.item(), "time": elapsed + time.time() - t0}) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            checkpoint(step)
            if args.kind == "base" and "64x64" in cache["buckets"]:
                reliance = crop_reliance(ema, encoders, cache)
                log.write(json.dumps({"step": step, "crop_reliance": reliance}) + "\n")
                log.flush()
                print(f"step {step}: x0 error with shuffled crops minus true (EMA): "
                      + ", ".join(f"t={t} {r['shuffled_minus_true']:+.5f} of {r['x0_mse']:.4f}" for t, r in reliance.items()),
                      flush=True)
        if args.stop_after is not None and step >= args.stop_after:
            checkpoint(step)
            print(f"stopping at step {step} as asked (--stop-after); rerun to continue", flush=True)
            break
    bar.close()
    print(f"at step {step}: {(elapsed + time.time() - t0) / 60:.1f} min of training", flush=True)


CROP_RELIANCE_T = (800, 900, 960)     # the noise levels at which a picture's layout is decided


@torch.no_grad()
def crop_reliance(unet: UNet, encoders: list, cache: dict, n: int = 64, timesteps=CROP_RELIANCE_T,
                  seed: int = 0) -> dict[int, dict[str, float]]:
    """Does ``unet`` read the crop ids? On ``n`` pictures of the cache's square bucket (cropped on
    both axes), the x0 error of its prediction at each of ``timesteps`` (epsilon MSE x
    (1 - abar) / abar: at high noise the epsilon loss hides the layout), once with each picture's
    own crops_coords_top_left and once with the crops shuffled among the pictures (sizes
    kept). A model blind to the crops scores exactly 0 on "shuffled_minus_true"; one that uses
    them scores more, since the data move every object with its crop (:func:`data_crop_shift`).
    Returns {t: {"x0_mse": ..., "shuffled_minus_true": ...}}."""
    bucket = cache["buckets"]["64x64"]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(bucket["latent_mean"].shape[0], generator=g)[:n]
    device = next(unet.parameters()).device
    x0 = bucket["latent_mean"][idx].float().to(device)
    true_ids = bucket["time_ids"][idx].to(device)
    shuffled = true_ids.clone()
    shuffled[:, 2:4] = true_ids[torch.randperm(len(idx), generator=g).to(device), 2:4]
    states, pooled = text_conditions(encoders, bucket["input_ids"][idx, 0].long().to(device))
    noise = torch.randn(x0.shape, generator=g).to(device)
    schedule = NoiseSchedule()
    was_training = unet.training
    unet.eval()
    out = {}
    for t in timesteps:
        abar = schedule.alphas_cumprod[t].item()
        step = torch.full((len(idx),), t, device=device)
        err = [diffusion_loss(unet, x0, schedule, t=step, noise=noise, encoder_hidden_states=states,
                              added_cond={"text_embeds": pooled, "time_ids": ids}).item() * (1 - abar) / abar
               for ids in (true_ids, shuffled)]
        out[t] = {"x0_mse": err[0], "shuffled_minus_true": err[1] - err[0]}
    unet.train(was_training)
    return out


def load_checkpoint(path: str | Path, use_ema: bool = True) -> UNet:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = UNet(UNetConfig.from_dict(state["config"]))
    model.load_state_dict(state["ema" if use_ema else "unet"])
    return model.eval()


def export(args) -> None:
    """The EMA weights as float16 safetensors + JSON (with the suggested sampler, DDIM)."""
    from ministd.train.unet import SHIPPED_SCHEDULER

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = load_checkpoint(args.checkpoint)
    model.save(args.out, dtype=torch.float16, extra_config={
        "_scheduler": SHIPPED_SCHEDULER,
        "_ministd": {"kind": state["args"]["kind"], "trained_steps": state["step"],
                     "training_minutes": round(state["elapsed"] / 60, 1), "training_args": state["args"]}})
    print(f"wrote {args.out} (float16 EMA weights of step {state['step']}) and its .json")


# --------------------------------------------------------------------------- #
# The effects of chapters 13-14, measured
# --------------------------------------------------------------------------- #

def edge_sharpness(picture) -> float:
    """How sharp a picture's edges are: the mean Sobel gradient magnitude g (largest over the
    colour channels, as :func:`ministd.data.edge_map`), each pixel weighted by its own g:
    sum(g^2) / sum(g), in RGB units. A soft picture spreads each edge's change over more
    pixels at lower slopes: its sum(g) stays about the same, its sum(g^2) drops. The
    ratio does not depend on how much edge a picture has, only on how steep it is."""
    x = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture).astype(np.float64)
    x = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[0] - 2, x.shape[1] - 2

    def win(dy, dx):
        return x[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (win(-1, 1) + 2 * win(0, 1) + win(1, 1)) - (win(-1, -1) + 2 * win(0, -1) + win(1, -1))
    gy = (win(1, -1) + 2 * win(1, 0) + win(1, 1)) - (win(-1, -1) + 2 * win(-1, 0) + win(-1, 1))
    g = np.sqrt(gx ** 2 + gy ** 2).max(-1)
    return float((g ** 2).sum() / g.sum()) if g.sum() > 0 else 0.0


def object_centroid(picture) -> tuple[float, float] | None:
    """(x, y) of the object pixels' mean (``adherence.object_mask``), None without any."""
    from ministd.train.adherence import object_mask

    mask = object_mask(np.asarray(picture))
    if mask.sum() <= 10:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


# Object pixels the outermost ring may hold in a picture that is not cut by the frame. The
# VAE's reconstructions of ground truth leave a few stray ones: on 96 held-out one-object
# prompts, 95.8% of the reconstructions have none there, 97.9% at most 3 (the renders
# themselves: 100% none); the same scenes cropped by 16 pixels are cut in 28% of them, each
# of those with more than 3 object pixels on the ring. `effects` reports the reconstructions'
# figure beside the model's.
FRAME_TOLERANCE = 3

# The small original_size at which size conditioning is measured. The VAE's round trip
# flattens edge sharpness (:func:`edge_sharpness`): on 48 held-out one-object prompts, renders
# drawn at 16 / 24 / 32 / 64 / 128 pixels and resized to 64 score 198 / 279 / 364 / 545 / 537
# raw but 248 / 279 / 288 / 292 / 293 through the VAE, so below about 24 pixels is the only
# softness a model on these latents can draw (and learn: train on ``--original-sides 16 128``).
SMALL_ORIGINAL = 16


def wholly_in_frame(picture, tolerance: int = FRAME_TOLERANCE) -> bool:
    """Objects drawn, none cut by the picture's edge: at most ``tolerance`` object pixels
    (``adherence.object_mask``) on the outermost pixel ring, and more than 10 in all."""
    from ministd.train.adherence import object_mask

    mask = object_mask(np.asarray(picture))
    ring = mask.copy()
    ring[1:-1, 1:-1] = False
    return bool(mask.sum() > 10 and ring.sum() <= tolerance)


def follows_prompt(picture, text: str) -> bool:
    """A one-object picture in the asked colour (a solid region of it) on the asked background
    (the border's median nearest that palette colour), where the prompt says them."""
    from ministd.data import COLORS, parse_caption
    from ministd.train.adherence import background_color, draws_colors, palette_distances

    said = parse_caption(text)
    pixels = np.asarray(picture)
    ok = draws_colors(pixels, [said["objects"][0]["color"]])
    if said["background"] is not None:
        ok = ok and COLORS[int(palette_distances(background_color(pixels)).argmin())] == said["background"]
    return bool(ok)


def data_crop_shift(n: int = 20000, crop: int = 16, window: int = 2) -> dict:
    """What the training data itself says a crop does: the mean object-centre position (x, y)
    of one-object 64x64 samples cropped by about ``crop`` on both axes, minus that of samples
    cropped by about 0 (each within ``window`` pixels), from :func:`ministd.data.sdxl_sample`'s boxes."""
    from ministd.data import ShapesWorld, sdxl_sample

    world = ShapesWorld(seed=WORLD_SEEDS["base"], objects=1)
    near = {0: [], crop: []}
    for i in range(n):
        s = sdxl_sample(world, i, bucket=(64, 64))
        top, left = s.crops_coords_top_left
        for c in near:
            if abs(top - c) <= window and abs(left - c) <= window:
                x0, y0, x1, y1 = s.boxes[0]
                near[c].append(((x0 + x1) / 2, (y0 + y1) / 2))
    mean = {c: np.mean(v, axis=0) for c, v in near.items()}
    shift = mean[crop] - mean[0]
    return {"dx": float(shift[0]), "dy": float(shift[1]), "samples": [len(near[0]), len(near[crop])]}


def softer_share(soft, sharp) -> float:
    """Share of paired pictures (same prompt, same seed) in which the one of ``soft`` has the
    lower :func:`edge_sharpness`: a paired figure, not swayed by a few very sharp pictures."""
    if len(soft) != len(sharp) or not soft:
        raise ValueError(f"soft and sharp must be equally long, non-empty lists of pictures, got {len(soft)} and {len(sharp)}")
    return float(np.mean([edge_sharpness(a) < edge_sharpness(b) for a, b in zip(soft, sharp)]))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def effects(args) -> dict:
    """Every effect chapters 13-14 claim, on held-out prompts at the pipelines' defaults
    (their DDIM, 20 steps, guidance 5.0), each prompt with its own seed; printed and, with
    ``--json``, written. See chapter 13 / 14 for what each figure means."""
    import ministd
    from ministd.train.adherence import (ONE_OBJECT_FORMS, PAIR_FORMS, draws_colors, is_broken, make_prompts,
                                         palette_share)
    from ministd.data import ShapesWorld, parse_caption, pil_to_tensor, tensor_to_pil

    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = ministd.load_pipeline(args.base)
    refiner = ministd.load_pipeline(args.refiner)
    sd = ministd.load_pipeline("shapes")
    for pipe in (base, refiner, sd):
        pipe.progress_bar = False
    prompts = make_prompts(args.n, forms=ONE_OBJECT_FORMS, seed=args.seed)
    texts, seeds = [p.text for p in prompts], [p.seed for p in prompts]
    steps = args.steps

    def pictures(pipe, height=64, width=64, **kwargs):
        out = []
        for start in range(0, len(texts), args.batch_size):
            batch = slice(start, start + args.batch_size)
            noise = torch.cat([torch.randn((1, 4, height // 4, width // 4), generator=torch.Generator().manual_seed(s))
                               for s in seeds[batch]])
            result = pipe.txt2img(texts[batch], num_inference_steps=steps, height=height, width=width,
                                  latents=noise, **kwargs)
            out += [result.latents] if kwargs.get("output_type") == "latent" else [np.asarray(im) for im in result.images]
        return out

    report: dict = {"n": len(prompts), "steps": steps, "guidance_scale": 5.0, "seed": args.seed}
    # 1. crop conditioning
    plain = pictures(base)
    cropped = pictures(base, crops_coords_top_left=(args.crop, args.crop))
    square_sd = pictures(sd, guidance_scale=5.0)    # trained on whole scenes only: placement without crops
    world = ShapesWorld()
    truth = [np.asarray(world.render(t, seed=s)[0]) for t, s in zip(texts, seeds)]

    def through_vae(arrays):
        """Ground truth as the VAE hands it back: the best any model on these latents can draw."""
        with torch.no_grad():
            x = pil_to_tensor([Image.fromarray(a) for a in arrays])
            return [np.asarray(im) for im in tensor_to_pil(base.vae.decode(base.vae.encode(x).mean).clamp(-1, 1))]
    shifts = [(np.subtract(b, a) if a is not None and b is not None else None)
              for a, b in zip(map(object_centroid, plain), map(object_centroid, cropped))]
    shifts = [s for s in shifts if s is not None]
    report["crop"] = {"crop": args.crop,
                      "wholly_in_frame_at_0": float(np.mean([wholly_in_frame(p) for p in plain])),
                      "wholly_in_frame_at_crop": float(np.mean([wholly_in_frame(p) for p in cropped])),
                      "wholly_in_frame_truth": float(np.mean([wholly_in_frame(p) for p in truth])),
                      "wholly_in_frame_truth_through_vae": float(np.mean([wholly_in_frame(p) for p in through_vae(truth)])),
                      "wholly_in_frame_sd_type": float(np.mean([wholly_in_frame(p) for p in square_sd])),
                      "mean_shift_x": float(np.mean([s[0] for s in shifts])),
                      "mean_shift_y": float(np.mean([s[1] for s in shifts])), "pairs": len(shifts),
                      "training_data_shift": data_crop_shift(n=args.data_samples, crop=args.crop)}
    # 2. size conditioning, at the small original the VAE can still tell apart (SMALL_ORIGINAL)
    small = pictures(base, original_size=(SMALL_ORIGINAL, SMALL_ORIGINAL))
    large = pictures(base, original_size=(128, 128))
    # With SDXL's negative micro-conditioning (diffusers' negative_original_size and
    # negative_target_size, given together) guidance also pushes away from the other size, as
    # it pushes away from the empty prompt: the size's effect is multiplied by guidance_scale.
    small_neg = pictures(base, original_size=(SMALL_ORIGINAL, SMALL_ORIGINAL), negative_original_size=(128, 128),
                         negative_target_size=(64, 64))
    large_neg = pictures(base, original_size=(128, 128), negative_original_size=(SMALL_ORIGINAL, SMALL_ORIGINAL),
                         negative_target_size=(64, 64))
    up = [np.asarray(ShapesWorld(size=SMALL_ORIGINAL).render(t, seed=s)[0].resize((64, 64), Image.Resampling.BICUBIC))
          for t, s in zip(texts, seeds)]
    down = [np.asarray(ShapesWorld(size=128).render(t, seed=s)[0].resize((64, 64), Image.Resampling.BICUBIC))
            for t, s in zip(texts, seeds)]
    vae_up, vae_down = through_vae(up), through_vae(down)
    report["size"] = {f"sharpness_original_{SMALL_ORIGINAL}": _mean(map(edge_sharpness, small)),
                      "sharpness_original_64": _mean(map(edge_sharpness, plain)),
                      "sharpness_original_128": _mean(map(edge_sharpness, large)),
                      f"softer_share_{SMALL_ORIGINAL}_vs_128": softer_share(small, large),
                      f"sharpness_original_{SMALL_ORIGINAL}_negative_128": _mean(map(edge_sharpness, small_neg)),
                      f"sharpness_original_128_negative_{SMALL_ORIGINAL}": _mean(map(edge_sharpness, large_neg)),
                      f"softer_share_{SMALL_ORIGINAL}_vs_128_with_negatives": softer_share(small_neg, large_neg),
                      f"truth_sharpness_{SMALL_ORIGINAL}_upscaled": _mean(map(edge_sharpness, up)),
                      "truth_sharpness_128_downscaled": _mean(map(edge_sharpness, down)),
                      f"truth_softer_share_{SMALL_ORIGINAL}_vs_128": softer_share(up, down),
                      # the VAE's round trip flattens sharpness: these are the figures a model can reach
                      f"truth_through_vae_sharpness_{SMALL_ORIGINAL}_upscaled": _mean(map(edge_sharpness, vae_up)),
                      "truth_through_vae_sharpness_128_downscaled": _mean(map(edge_sharpness, vae_down)),
                      f"truth_through_vae_softer_share_{SMALL_ORIGINAL}_vs_128": softer_share(vae_up, vae_down)}
    # 3. aspect buckets (height, width), against the square pictures and the SD-type model
    report["buckets"] = {}
    for (h, w), pics in (((64, 64), plain), ((48, 80), pictures(base, 48, 80)), ((80, 48), pictures(base, 80, 48))):
        report["buckets"][f"{h}x{w}"] = {"size_ok": all(p.shape[:2] == (h, w) for p in pics),
                                         "follows_prompt": float(np.mean([follows_prompt(p, t) for p, t in zip(pics, texts)])),
                                         "one_object": float(np.mean([_one_object(p) for p in pics]))}
    report["buckets"]["shapes_64x64"] = {"follows_prompt": float(np.mean([follows_prompt(p, t) for p, t in zip(square_sd, texts)])),
                                         "one_object": float(np.mean([_one_object(p) for p in square_sd]))}
    # 4. two objects: does each keep its colour (concept bleeding)?
    pairs = make_prompts(args.n_pairs * len(PAIR_FORMS), forms=PAIR_FORMS, seed=args.seed)
    keep_texts, keep_seeds = texts, seeds
    texts, seeds = [p.text for p in pairs], [p.seed for p in pairs]
    colors = [[o["color"] for o in parse_caption(t)["objects"]] for t in texts]
    report["two_objects"] = {"n": len(pairs),
                             "xl": float(np.mean([draws_colors(p, c) for p, c in zip(pictures(base), colors)])),
                             "shapes": float(np.mean([draws_colors(p, c) for p, c in zip(pictures(sd, guidance_scale=5.0), colors)]))}
    texts, seeds = keep_texts, keep_seeds
    # 5. the refiner: the last 20% of the same 20 steps, and its quality score
    handed = torch.cat(pictures(base, denoising_end=args.handoff, output_type="latent"))
    refined = {}
    for score in args.scores:
        out = []
        for start in range(0, len(texts), args.batch_size):
            batch = slice(start, start + args.batch_size)
            result = refiner.img2img(texts[batch], handed[batch], denoising_start=args.handoff,
                                     num_inference_steps=steps, aesthetic_score=score, seed=args.seed)
            out += [np.asarray(im) for im in result.images]
        refined[score] = out
    alone = plain

    def intact_palette(pics):
        """Palette share over the pictures the base did not break (its layout is fixed by the
        hand-off, so a broken picture stays broken): what the last steps can still clean."""
        return _mean(palette_share(p) for p, b in zip(pics, alone) if not is_broken(b))
    report["refiner"] = {"handoff": args.handoff,
                         "palette_base_alone": _mean(map(palette_share, alone)),
                         "palette_truth": _mean(map(palette_share, truth)),
                         "palette_truth_through_vae": _mean(map(palette_share, through_vae(truth))),
                         "quality_base_alone": _mean(map(quality_score, alone)),
                         "broken_base_alone": int(sum(map(is_broken, alone))),
                         "palette_intact_base_alone": intact_palette(alone),
                         "by_aesthetic_score": {str(s): {"palette": _mean(map(palette_share, pics)),
                                                         "palette_intact": intact_palette(pics),
                                                         "broken": int(sum(map(is_broken, pics))),
                                                         "quality": _mean(map(quality_score, pics)),
                                                         "follows_prompt": float(np.mean([follows_prompt(p, t) for p, t in zip(pics, texts)]))}
                                                for s, pics in refined.items()},
                         "follows_prompt_base_alone": float(np.mean([follows_prompt(p, t) for p, t in zip(alone, texts)]))}
    report["seconds"] = round(time.time() - t0)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _one_object(picture) -> bool:
    from ministd.train.adherence import count_objects

    return count_objects(np.asarray(picture)) == 1


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ministd.train.sdxl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="draw, degrade (refiner), encode and tokenize the training set")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=_positive_int, default=20000)
    p.add_argument("--captions", type=_positive_int, default=2)
    p.add_argument("--seed", type=int, default=None, help="ShapesWorld seed (default: the kind's own)")
    p.add_argument("--degrade-prob", type=_probability, default=0.6)
    p.add_argument("--original-sides", type=_positive_int, nargs=2, default=[16, 128], metavar=("LOW", "HIGH"),
                   help="range of the scenes' original sides in pixels (sdxl_sample); the VAE keeps only the "
                        "softness of originals below ~24 (see SMALL_ORIGINAL)")
    p.add_argument("--max-margin", type=int, default=32, help="widest extra view of square pictures (sdxl_sample)")
    p.add_argument("--zero-margin-prob", type=_probability, default=0.0,
                   help="probability that a square picture's margin is 0 on an axis (sdxl_sample): uncut views")
    p.add_argument("--vae", default=str(DATA / "shapes_vae.safetensors"))
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--threads", type=_positive_int, default=1)
    t = sub.add_parser("train", help="train (resumes from --out/last.pt)")
    t.add_argument("--kind", choices=KINDS, required=True)
    t.add_argument("--cache", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--init-from", default=str(DATA / "shapes_unet.safetensors"),
                   help="weights to start from: an SD-type .safetensors (see warm_start), an earlier "
                        "phase's last.pt (its weights and EMA, a fresh optimiser), or '' for a fresh U-Net")
    t.add_argument("--added-lr-scale", type=_positive_float, default=1.0,
                   help="learning-rate factor for the added (pooled text + time ids) embedding")
    t.add_argument("--x0-weight-cap", type=float, default=LATER_DEFAULTS["x0_weight_cap"],
                   help="weight each example's epsilon MSE by clamp((1 - abar) / abar, 1, CAP), the x0 error "
                        "at high noise (layout_weights); 0: the plain epsilon loss")
    t.add_argument("--high-noise-share", type=_probability, default=LATER_DEFAULTS["high_noise_share"],
                   help="share of each batch (base) whose timesteps are drawn from [--high-noise-from, 1000)")
    t.add_argument("--high-noise-from", type=int, default=LATER_DEFAULTS["high_noise_from"])
    t.add_argument("--timesteps", type=int, nargs=2, default=LATER_DEFAULTS["timesteps"], metavar=("LOW", "HIGH"),
                   help="draw training timesteps from [LOW, HIGH) (the refiner's HIGH stops at its own limit)")
    t.add_argument("--trainable", choices=TRAINABLE, default="all",
                   help="'conditioning': only the added embedding and the blocks' time projections "
                        "(conditioning_parameter), the rest frozen")
    t.add_argument("--steps", type=_positive_int, default=6000)
    t.add_argument("--batch-size", type=_positive_int, default=32)
    t.add_argument("--lr", type=_positive_float, default=2e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--uncond-prob", type=_probability, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=_positive_int, default=100)
    t.add_argument("--stop-after", type=int, default=None)
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("export", help="write a checkpoint's EMA weights to data/")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True)
    f = sub.add_parser("effects", help="measure chapters 13-14's effects on held-out prompts")
    f.add_argument("--base", default="shapes-xl")
    f.add_argument("--refiner", default="shapes-xl-refiner")
    f.add_argument("--n", type=_positive_int, default=64)
    f.add_argument("--n-pairs", type=_positive_int, default=12, help="two-object prompts per pair form")
    f.add_argument("--steps", type=_positive_int, default=20)
    f.add_argument("--crop", type=int, default=16)
    f.add_argument("--handoff", type=float, default=0.8)
    f.add_argument("--data-samples", type=_positive_int, default=20000,
                   help="training samples whose crops give the data's own shift")
    f.add_argument("--scores", type=float, nargs="+", default=[2.5, 4.0, 6.0])
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--batch-size", type=_positive_int, default=32)
    f.add_argument("--threads", type=_positive_int, default=1)
    f.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    {"prepare": prepare, "train": train, "export": export, "effects": effects}[args.command](args)


if __name__ == "__main__":
    main()
