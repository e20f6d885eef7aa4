"""Depth-to-image: Stable Diffusion 2's depth model, on ShapesWorld (chapter 16).

SD 2 "depth" (stabilityai/stable-diffusion-2-depth) is the SD 2 U-Net
fine-tuned with one more input channel: the picture's relative depth as MiDaS
estimates it (DPT-Hybrid, Ranftl et al. 2021; larger = nearer), resized to the
latent grid and stretched to [-1, 1] per picture. Sampling is img2img (SDEdit,
Meng et al. 2022: noise the picture's latents part-way, then denoise) where
every U-Net call sees ``cat([x_t, depth])``: the prompt may change colours,
materials, style, while the depth keeps where things are and how near they are.
The extra channel's input weights start at zero (:func:`depth_unet`), so the
fine-tune starts from exactly the text-to-image model (the same trick as the
9-channel inpainting U-Net of chapter 12 and ControlNet's zero convolutions).

Checked against diffusers 0.42.1's ``StableDiffusionDepth2ImgPipeline``
(``prepare_depth_map``, the denoising loop; ``tests/test_depth.py``), with one
documented difference inherited from our img2img: ``strength=1`` starts from
pure noise (the reference noises the picture to its first timestep, which
keeps a little of it), so at strength 1 only the depth and the prompt speak.

ShapesWorld is flat, so its depth is a stage set (:func:`ministd.data.draw_depth`):
background at 0, each object a cut-out at a depth that grows with its size.
Readers' photos need a depth estimator (MiDaS, DPT, Depth Anything); for
ShapesWorld pictures :func:`estimate_depth` reads the depth off the pixels by
the same rule, which is what ``depth2img(..., depth_map=None)`` uses.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ministd.data import NEAREST_EXTENT
from ministd.inpaint import to_batch
from ministd.pipelines import (OUTPUT_TYPES, PipelineOutput, StableDiffusionPipeline, _check_seed, _prompt_list,
                               _seeded_generator)
from ministd.samplers import Sampler
from ministd.unet import UNet


def is_depth_unet(unet: UNet) -> bool:
    """A depth U-Net takes one channel more than it predicts: latents + depth."""
    return unet.config.in_channels == unet.config.out_channels + 1


def depth_unet(unet: UNet) -> UNet:
    """SD 2-depth's surgery: a copy of ``unet`` with one more input channel whose ``conv_in``
    weights are zero, so that it computes exactly what ``unet`` does until it is fine-tuned.
    Same dtype, device and (:mod:`ministd.speed`) kernels as ``unet``."""
    from ministd import speed

    config = dataclasses.replace(unet.config, in_channels=unet.config.in_channels + 1)
    new = UNet(config).to(device=unet.device, dtype=unet.dtype)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    w = state["conv_in.weight"]                              # [C, in, 3, 3]
    state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    new.load_state_dict(state)
    return speed.optimize(new) if speed.is_optimized(unet) else new


# --------------------------------------------------------------------- depth maps
def _depth_tensor(depth_map) -> torch.Tensor:
    """A depth map in any of the accepted forms -> float32 [B, H, W]."""
    if isinstance(depth_map, Image.Image):
        depth_map = [depth_map]
    if isinstance(depth_map, (list, tuple)) and depth_map and all(isinstance(d, Image.Image) for d in depth_map):
        depth_map = np.stack([np.asarray(d.convert("F") if d.mode not in ("F", "I") else d, dtype=np.float32)
                              for d in depth_map])
    if isinstance(depth_map, np.ndarray):
        depth_map = torch.from_numpy(np.ascontiguousarray(depth_map))
    if not isinstance(depth_map, torch.Tensor) or depth_map.ndim not in (2, 3, 4) \
            or (depth_map.ndim == 4 and depth_map.shape[1] != 1):
        shape = tuple(depth_map.shape) if hasattr(depth_map, "shape") else type(depth_map).__name__
        raise ValueError("depth_map must be a tensor or array [H, W], [B, H, W] or [B, 1, H, W] "
                         f"(or a one-channel PIL image), got {shape}")
    depth = depth_map.float().cpu()
    depth = depth[None] if depth.ndim == 2 else depth[:, 0] if depth.ndim == 4 else depth
    if min(depth.shape[-2:]) < 2:
        raise ValueError(f"depth_map must be at least 2x2, got {tuple(depth.shape[-2:])}")
    if not torch.isfinite(depth).all():
        raise ValueError("depth_map holds NaN or infinite values")
    return depth


def prepare_depth_map(depth_map, size: tuple[int, int]) -> torch.Tensor:
    """Depth [B, H, W] (or [H, W], [B, 1, H, W], arrays, one-channel PIL) -> the U-Net's
    depth channel [B, 1, h, w] at latent ``size``: bicubic resize, then per picture
    2 (d - min) / (max - min) - 1, as diffusers' ``prepare_depth_map``. A flat map
    (max = min, where the reference divides by zero) says nothing is nearer than
    anything else: it becomes -1 everywhere, the background's value."""
    depth = F.interpolate(_depth_tensor(depth_map)[:, None], size=tuple(size), mode="bicubic",
                          align_corners=False)
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    span = depth.amax(dim=(1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, 2 * (depth - low) / span.clamp_min(1e-12) - 1, torch.full_like(depth, -1.0))


def estimate_depth(picture) -> np.ndarray:
    """ShapesWorld's depth estimator: the depth map of a picture read off its pixels.

    picture: PIL RGB or uint8 [H, W, 3]. Object pixels are those unlike the
    border's colour (:func:`ministd.train.adherence.object_mask`); an object is a
    4-connected region of more than MIN_REGION object pixels of one nearest palette
    colour (objects of a scene differ in colour, so two touching ones stay two),
    at the depth :func:`ministd.data.draw_depth` gives an object of its size: half
    its bounding box's longer side, over NEAREST_EXTENT of the picture's side.
    Object pixels in no such region (anti-aliased edges) take their nearest
    neighbour's depth. Returns float32 [H, W] in [0, 1], background 0. On
    ShapesWorld renders it agrees with the true depth map (tests/test_depth.py);
    on a photo it is no depth estimator (use MiDaS, DPT or Depth Anything).
    """
    from ministd.train.adherence import MIN_REGION, label_regions, object_mask, palette_distances

    pixels = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"picture must be an RGB image [H, W, 3], got shape {pixels.shape}")
    objects = object_mask(pixels)
    nearest = palette_distances(pixels).argmin(-1)
    depth = np.zeros(pixels.shape[:2], dtype=np.float32)
    side = max(pixels.shape[:2])
    for color in np.unique(nearest[objects]):
        labels, n = label_regions(objects & (nearest == color))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if len(ys) > MIN_REGION:
                half_extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / 2
                depth[ys, xs] = min(1.0, half_extent / side / NEAREST_EXTENT)
    for _ in range(2):                      # edge pixels: the largest depth among their 8 neighbours
        todo = objects & (depth == 0)
        if not todo.any():
            break
        padded = np.pad(depth, 1)
        around = np.max([padded[1 + dy:1 + dy + depth.shape[0], 1 + dx:1 + dx + depth.shape[1]]
                         for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        depth[todo] = around[todo]
    return depth


# --------------------------------------------------------------------- the pipeline
def _check_call(pipe, strength, output_type, seed) -> None:
    if not is_depth_unet(pipe.unet):
        raise ValueError(f"depth2img needs a depth U-Net (in_channels = out_channels + 1 = "
                         f"{pipe.unet.config.out_channels + 1}); this one takes {pipe.unet.config.in_channels}: "
                         "load one with ministd.load_pipeline('shapes-depth')")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or math.isnan(strength) \
            or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    _check_seed(seed)


def with_depth(unet: UNet, depth: torch.Tensor) -> Callable:
    """The U-Net as the sampler calls it, the depth channel [B, 1, h, w] attached to every input
    (repeated over the [uncond, cond] halves when guidance doubles the batch)."""
    def model(x, t, encoder_hidden_states, **extra):
        d = depth.repeat(x.shape[0] // depth.shape[0], 1, 1, 1).to(x)
        return unet(torch.cat([x, d], dim=1), t, encoder_hidden_states, **extra)
    return model


def depth2img(pipe: StableDiffusionPipeline, prompt: str | Sequence[str], image, depth_map=None,
              strength: float = 0.8, negative_prompt: str | Sequence[str] | None = None,
              num_inference_steps: int = 20, guidance_scale: float = 7.5, seed: int | None = None,
              sampler: str | Sampler | None = None, callback: Callable | None = None, output_type: str = "pil",
              generator: torch.Generator | None = None, guidance_rescale: float = 0.0) -> PipelineOutput:
    """Redraw ``image`` for ``prompt`` keeping its depth (diffusers' StableDiffusionDepth2ImgPipeline).

    image: a PIL picture (or list) or [B, 3, H, W] tensor in [-1, 1]. depth_map: None
    (read off the picture by :func:`estimate_depth`) or [B, H, W] / [H, W] depth,
    larger = nearer, any size (resized and normalised by :func:`prepare_depth_map`).
    strength in [0, 1]: the fraction of the schedule run, as img2img (1: pure noise,
    only the depth and the prompt decide). Random draws from ``generator`` (default:
    the seed's) in the reference's order: the VAE sample of the picture, then the noise.
    """
    _check_call(pipe, strength, output_type, seed)
    prompts = _prompt_list(prompt, "prompt")
    pixels = pipe._image_tensor(image)
    height, width = pipe._check_size(pixels.shape[-2], pixels.shape[-1])
    if pixels.shape[0] not in (1, len(prompts)):
        raise ValueError(f"image holds {pixels.shape[0]} pictures for {len(prompts)} prompts (give 1 or {len(prompts)})")
    if depth_map is None:
        pictures = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        depth_map = np.stack([estimate_depth(p) for p in pictures])
    f = pipe.vae.downsampling_factor
    depth = to_batch(prepare_depth_map(depth_map, (height // f, width // f)), len(prompts), "depth_map")
    depth = depth.to(pipe.device, pipe.unet.dtype)
    sampler = pipe._sampler(sampler)
    sampler.set_timesteps(num_inference_steps, strength=strength)
    cond, uncond = pipe._conditions(prompts, negative_prompt, 1, guidance_scale)
    generator = generator or _seeded_generator(seed)
    init = to_batch(pipe.encode_image(pixels, generator), len(prompts), "image")
    if len(sampler.timesteps) == 0 or int(num_inference_steps * strength) == 0:
        warnings.warn(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising "
                      "step to run: returning the image's round trip through the VAE", stacklevel=2)
        return PipelineOutput(pipe.decode(init, output_type), init)
    noise = torch.randn(init.shape, generator=generator, dtype=torch.float32).to(init.device, init.dtype)
    if strength == 1:
        latents = noise * sampler.init_noise_sigma
    else:
        latents = sampler.add_noise(init, noise, sampler.timesteps[:1])
    latents = pipe.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale, callback, generator,
                           model=with_depth(pipe.unet, depth))
    return PipelineOutput(pipe.decode(latents, output_type), latents)
