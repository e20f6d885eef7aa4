"""Inpainting: repaint a picture inside a mask and keep it outside (chapter 12).

Two ways to make a diffusion model fill a hole, both as in diffusers'
``StableDiffusionInpaintPipeline`` (checked against diffusers 0.42.1, the
parity tests are ``tests/test_inpaint.py``):

1. **Latent blending, for any 4-channel model** (RePaint, Lugmayr et al. 2022;
   the "known region" trick of SDEdit, Meng et al. 2022). The model never sees
   the mask. After every sampler step the part of the latents outside the mask
   is thrown away and replaced by the *original* latents, noised to the level
   the next step expects::

       latents = (1 - m) * add_noise(x0_image, noise, t_next) + m * latents

   with m = 1 where the picture is repainted, ``noise`` the same draw that
   started the chain, and t_next the next entry of the sampler's timesteps; after
   the last step there is no t_next and the clean ``x0_image`` is pasted in.
   The outside is kept exactly in latent space; the inside only learns about
   it through the U-Net's receptive field, which is why seams can show.
2. **The 9-channel inpainting U-Net** (SD 1.5/2 inpainting, fine-tuned from
   the text-to-image model with 5 extra zero-initialised input channels). At
   every step the U-Net sees ``cat(latents, mask, masked_image_latents)`` along
   the channels: 4 + 1 + 4 = 9, where ``mask`` is the binary mask at latent size
   and ``masked_image_latents`` = scaling_factor · VAE(image with the masked
   pixels set to 0, i.e. grey). Nothing is blended: the model itself was trained
   to keep the unmasked part.

The mask convention is the reference's: white (>= 0.5) = repaint, black = keep.
An all-black mask is refused (nothing to repaint); an all-white one repaints
everything (txt2img at strength 1, img2img below).
Masks are binarised at 0.5 at full resolution and resized to latent size with
nearest-neighbour sampling (``F.interpolate``'s default, as diffusers does).
Optional extras: dilation (grow the mask by some pixels), feathering (a
Gaussian-blurred copy of the mask, used for a soft latent blend and a soft
paste-back), paste-back of the unmasked input pixels after decoding (the VAE
round trip changes them a little otherwise), "only masked" inpainting
(``padding_mask_crop``: crop around the mask, inpaint that crop at the model's
working size, paste it back) and outpainting (:func:`outpaint_canvas`).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ministd.data import pil_to_tensor
from ministd.guidance import guided_noise_prediction
from ministd.pipelines import (OUTPUT_TYPES, PipelineOutput, StableDiffusionPipeline, _check_seed, _prompt_list,
                               _seeded_generator)
from ministd.samplers import Sampler

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


# --------------------------------------------------------------------- masks
def mask_to_tensor(mask_image) -> torch.Tensor:
    """A mask picture -> float32 [B, 1, H, W] in [0, 1] (white = 1 = repaint).

    Accepts a PIL image (or a list of them), a numpy array [H, W], [H, W, C] or
    [B, H, W, C] (channels last, as pictures), or a tensor [H, W], [C, H, W] or
    [B, C, H, W] (channels first). C must be 1, or 3 equal colour channels (a grey
    RGB picture); PIL RGBA masks use their colour channels, the alpha is ignored
    (as diffusers' ``convert("L")``). uint8 values are divided by 255, 16-bit ones
    (PIL "I;16" / "I", numpy uint16) by 65535; floats must already lie in [0, 1].
    """
    if isinstance(mask_image, (list, tuple)) and mask_image and all(isinstance(m, Image.Image) for m in mask_image):
        return torch.cat([mask_to_tensor(m) for m in mask_image])
    if isinstance(mask_image, Image.Image):
        return _to_unit(_pil_mask_array(mask_image))[None, None]
    if isinstance(mask_image, np.ndarray):
        array = mask_image if mask_image.ndim != 2 else mask_image[..., None]
        if array.ndim not in (3, 4):
            raise ValueError(f"a numpy mask must be [H, W], [H, W, C] or [B, H, W, C], got shape {mask_image.shape}")
        array = array[None] if array.ndim == 3 else array
        return _one_channel(_to_unit(array).permute(0, 3, 1, 2))
    if isinstance(mask_image, torch.Tensor):
        t = mask_image.detach().cpu()
        if t.ndim not in (2, 3, 4):
            raise ValueError(f"a tensor mask must be [H, W], [C, H, W] or [B, C, H, W], got shape {tuple(t.shape)}")
        t = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
        return _one_channel(_to_unit(t))
    raise ValueError(f"mask_image must be a PIL image, a numpy array or a tensor, got {type(mask_image).__name__}")


def _pil_mask_array(mask: Image.Image) -> np.ndarray:
    """[H, W] array of one channel; colour masks must be grey (equal channels)."""
    if mask.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit(mask)
    if mask.mode in ("L", "1", "F"):
        return np.asarray(mask.convert("L") if mask.mode == "1" else mask)
    rgb = np.asarray(mask.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise ValueError(f"mask_image ({mask.mode}) has colour channels that differ: a mask is one channel "
                         "(white = repaint, black = keep); draw it in grey or convert it with .convert('L')")
    return rgb[..., 0]


def _sixteen_bit(image: Image.Image) -> np.ndarray:
    """A 16-bit grey PIL picture ("I;16", or "I" as PIL opens 16-bit PNGs) as uint16 [H, W]
    (PIL's own convert("L") would clip every value above 255 to white)."""
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"a {image.mode} picture must hold 16-bit values (0..65535)")
    return values.astype(np.uint16)


def _to_unit(values) -> torch.Tensor:
    """uint8 (/255), uint16 (/65535), bool or float values in [0, 1] -> float32 tensor."""
    if isinstance(values, np.ndarray):
        if values.dtype == np.uint16:
            return torch.from_numpy(values.astype(np.float32) / 65535)
        values = torch.from_numpy(values.copy())
    if values.dtype == torch.uint8:
        return values.float() / 255
    if values.dtype == torch.bool:
        return values.float()
    if not values.is_floating_point():
        raise ValueError(f"a mask must be float in [0, 1], bool, uint8 or uint16, got dtype {values.dtype}")
    values = values.float()
    if values.numel() and not (torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise ValueError(f"mask values must lie in [0, 1] (white = 1 = repaint), got [{float(values.min()):.3g}, "
                         f"{float(values.max()):.3g}]; from [-1, 1] use (m + 1) / 2, from 0..255 use m / 255")
    return values


def _one_channel(mask: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 1, H, W]: C = 1, or 3 identical channels."""
    c = mask.shape[1]
    if c == 1:
        return mask
    if c == 3 and torch.equal(mask[:, :1].expand_as(mask), mask):
        return mask[:, :1]
    raise ValueError(f"mask_image must have one channel (or three equal ones, a grey RGB picture); it has {c} "
                     + ("that differ: a colour picture is not a mask" if c == 3 else "channels"))


def binarize_mask(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """0 where mask < threshold, 1 elsewhere (diffusers' ``VaeImageProcessor.binarize``). Same shape."""
    return (mask >= threshold).to(mask.dtype)


def dilate_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow the white region of [B, 1, H, W] by ``pixels`` in every direction (a square max filter)."""
    if pixels == 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def feather_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [B, 1, H, W] with standard deviation ``sigma`` pixels (edges replicated).

    Used as a soft mask: the repainted region fades into the kept one over
    about 2·sigma pixels on both sides of the edge (so it reaches outside the
    binary mask by up to 3·sigma).
    """
    if sigma == 0:
        return mask
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(mask)
    out = F.pad(mask, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Full-resolution mask [B, 1, H, W] -> latent size [B, 1, h, w] by nearest-neighbour sampling.

    As diffusers' ``prepare_mask_latents``: each latent cell takes the value of
    the top-left pixel of its f×f block, so a binary mask stays binary.
    """
    return F.interpolate(mask, size=size)


def prepare_mask(mask: torch.Tensor, dilate: int = 0, blur: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask in [0, 1] [B, 1, H, W] -> (binary mask for the model, soft mask for blending and paste-back).

    binary = dilate(binarise(mask)); soft = feather(binary, blur) with ``blur``,
    binary when only dilated, and the mask as given otherwise (a reader's own
    soft edges are kept for the paste-back, as diffusers' overlay does).
    """
    _check_count(dilate, "mask_dilate")
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not 0 <= blur < math.inf:
        raise ValueError(f"mask_blur must be a number of pixels >= 0, got {blur!r}")
    binary = dilate_mask(binarize_mask(mask), int(dilate))
    if blur:
        return binary, feather_mask(binary, float(blur))
    return binary, binary if dilate else mask


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer number of pixels >= 0, got {value!r}")


# ------------------------------------------------------------- the method
def blend_latents(latents: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                  sampler: Sampler, next_timestep: torch.Tensor) -> torch.Tensor:
    """The latent-blend rule, after one sampler step (all tensors [B, 4, h, w], mask [B, 1, h, w]).

    Outside the mask, replace the latents by the original ones noised to
    ``next_timestep`` (a 1-element tensor: the timestep the next step starts
    from) with the chain's own starting ``noise``; after the last step
    (``next_timestep`` empty) by the clean original latents.
    """
    known = image_latents if len(next_timestep) == 0 else sampler.add_noise(image_latents, noise, next_timestep)
    mask = mask.to(latents)
    return (1 - mask) * known + mask * latents


def nine_channel_input(latents: torch.Tensor, mask: torch.Tensor, masked_image_latents: torch.Tensor) -> torch.Tensor:
    """The inpainting U-Net's input [B, 9, h, w] = cat(latents [B,4], mask [B,1], masked-image latents [B,4]).

    ``latents`` is the sampler's scaled model input; the order is diffusers'
    (and the original ``hybrid`` conditioning of the SD inpainting checkpoints).
    """
    return torch.cat([latents, mask.to(latents), masked_image_latents.to(latents)], dim=1)


def steps_due(num_inference_steps: int, strength: float) -> int:
    """Denoising steps that ``strength`` asks for: min(int(N · strength), N), as the reference."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def inpaint_latents(pipe: StableDiffusionPipeline, pixels: torch.Tensor, mask: torch.Tensor, prompt,
                    negative_prompt=None, strength: float = 1.0, num_inference_steps: int = 20,
                    guidance_scale: float = 7.5, guidance_rescale: float = 0.0, sampler=None,
                    generator: torch.Generator | None = None, callback: Callable | None = None,
                    blend_mask: torch.Tensor | None = None, text_options: dict | None = None) -> torch.Tensor:
    """Run the inpainting chain; return the final scaled latents [B, 4, h, w].

    pixels [1 or B, 3, H, W] in [-1, 1]; mask [1 or B, 1, H, W] binary (1 =
    repaint). ``blend_mask`` (optional, [.., 1, H, W] in [0, 1]): a soft mask for
    the 4-channel latent blend instead of the binary one, area-averaged to latent
    size. Random draws from ``generator`` in the reference's order, so a seed gives
    diffusers' picture: VAE sample of the image (4-channel models, or strength < 1),
    the starting noise, then the VAE sample of the masked image. ``text_options``:
    ``clip_skip`` / ``long_prompts`` / ``emphasis`` for the prompts (:mod:`ministd.prompts`).
    """
    prompts = _prompt_list(prompt, "prompt")
    batch = len(prompts)
    sampler = pipe._sampler(sampler)
    sampler.set_timesteps(num_inference_steps, strength=strength)
    timesteps = sampler.timesteps
    cond, uncond = pipe._conditions(prompts, negative_prompt, 1, guidance_scale, **(text_options or {}))
    nine = pipe.unet.config.in_channels == 9
    f = pipe.vae.downsampling_factor
    size = (pixels.shape[-2] // f, pixels.shape[-1] // f)
    shape = (batch, pipe.unet.config.out_channels, *size)

    image_latents = None
    if not nine or strength < 1:
        image_latents = to_batch(pipe.encode_image(pixels, generator), batch, "image")
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(pipe.device, pipe.unet.dtype)
    if strength == 1:  # pure noise, as txt2img: the picture under the mask is not used at all
        latents = noise * sampler.init_noise_sigma
    else:
        latents = sampler.add_noise(image_latents, noise, timesteps[:1])
    masked = pixels * (mask < 0.5)  # masked pixels set to 0 (grey)
    if nine:
        masked_latents = to_batch(pipe.encode_image(masked, generator), batch, "image")
    else:  # the reference encodes the masked picture here too and never uses it: draw the same numbers
        torch.randn((masked.shape[0], shape[1], *size), generator=generator, device=generator.device,
                    dtype=pipe.vae.dtype)
    small = latent_mask(mask, size) if blend_mask is None else F.interpolate(blend_mask, size=size, mode="area")
    small = to_batch(small.to(pipe.device, pipe.unet.dtype), batch, "mask_image")

    with torch.inference_mode():
        for i, t in enumerate(tqdm(timesteps, disable=not pipe.progress_bar, desc="inpainting", leave=False)):
            x = sampler.scale_model_input(latents, t)
            if nine:
                x = nine_channel_input(x, small, masked_latents)
            noise_pred = guided_noise_prediction(pipe.unet, x, t, cond, uncond, guidance_scale, guidance_rescale)
            out = sampler.step(noise_pred, t, latents, generator=generator)
            latents = out.prev_sample
            if not nine:
                latents = blend_latents(latents, image_latents, noise, small, sampler, timesteps[i + 1: i + 2])
            if callback is not None:
                callback(i, t, latents, out.pred_original_sample)
    return latents


def to_batch(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Repeat a batch of 1 to ``batch``; a batch of ``batch`` passes."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"{name} holds {x.shape[0]} pictures for {batch} prompts (give 1 or {batch})")
    return x.expand(batch, *x.shape[1:])


# ----------------------------------------------------------------- the call
def inpaint(pipe: StableDiffusionPipeline, prompt: str | Sequence[str], image, mask_image, strength: float = 1.0,
            negative_prompt=None, num_inference_steps: int = 20, guidance_scale: float = 7.5,
            seed: int | None = None, sampler: str | Sampler | None = None, callback: Callable | None = None,
            output_type: str = "pil", generator: torch.Generator | None = None,
            padding_mask_crop: int | None = None, paste_back: bool = False, mask_blur: float = 0.0,
            mask_dilate: int = 0, height: int | None = None, width: int | None = None,
            guidance_rescale: float = 0.0, text_options: dict | None = None) -> PipelineOutput:
    """Repaint ``image`` where ``mask_image`` is white; see the module docstring and
    :meth:`ministd.pipelines.StableDiffusionPipeline.inpaint` for the arguments."""
    _check_call(pipe, strength, num_inference_steps, output_type, seed, paste_back, padding_mask_crop)
    generator = generator or _seeded_generator(seed)
    run = dict(prompt=prompt, negative_prompt=negative_prompt, strength=float(strength),
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               guidance_rescale=guidance_rescale, sampler=sampler, generator=generator, callback=callback,
               text_options=text_options)
    if padding_mask_crop is not None:
        return _inpaint_crop(pipe, image, mask_image, padding_mask_crop, height, width, mask_dilate, mask_blur,
                             output_type, run)
    pixels = picture_tensor(pipe, image)
    h, w = pixels.shape[-2:]
    if (height or h, width or w) != (h, w):
        raise ValueError(f"height/width ({height}, {width}) differ from the picture's size ({h}, {w}): without "
                         "padding_mask_crop the picture is inpainted at its own size; resize it first")
    pipe._check_size(h, w)
    binary, soft = prepare_mask(_check_mask(mask_to_tensor(mask_image), (h, w), pixels.shape[0]),
                                mask_dilate, mask_blur)
    latents = _latents(pipe, pixels, binary, soft if mask_blur else None, run)
    if output_type == "latent":
        return PipelineOutput(list(latents), latents)
    pictures = torch.stack(pipe.decode(latents, "pt"))
    if paste_back:
        pictures = paste_unmasked(pictures, (pixels.float().cpu() + 1) / 2, soft.float().cpu())
    return PipelineOutput(_as_output_type(pictures, output_type), latents)


def _check_call(pipe, strength, num_inference_steps, output_type, seed, paste_back, padding_mask_crop) -> None:
    from ministd.pipelines import StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        raise NotImplementedError("inpainting with SDXL pipelines is not built yet; use an SD 1.x / 2.x model")
    if pipe.unet.config.in_channels not in (4, 9):
        raise ValueError(f"inpaint needs a U-Net with 4 (latent blend) or 9 (inpainting model) input channels; "
                         f"this one has {pipe.unet.config.in_channels}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    _check_seed(seed)
    if not isinstance(paste_back, bool):
        raise ValueError(f"paste_back must be True or False, got {paste_back!r}")
    if paste_back and output_type == "latent":
        raise ValueError("paste_back works on decoded pictures; it cannot be used with output_type='latent'")
    if padding_mask_crop is not None:
        _check_count(padding_mask_crop, "padding_mask_crop")
        if output_type == "latent":
            raise ValueError("padding_mask_crop pastes the inpainted crop into the picture: it needs an output "
                             "picture type ('pil', 'np' or 'pt'), not 'latent'")


def picture_tensor(pipe: StableDiffusionPipeline, image) -> torch.Tensor:
    """The picture as [B, 3, H, W] in [-1, 1]: PIL (RGB; RGBA loses its alpha, grey is repeated;
    16-bit grey is divided by 65535 instead of being clipped by PIL), a list of PIL, or a tensor."""
    if isinstance(image, Image.Image) and image.mode in SIXTEEN_BIT_MODES:
        grey = _to_unit(_sixteen_bit(image))
        return (grey * 2 - 1).expand(3, -1, -1)[None].contiguous()
    pixels = pipe._image_tensor(image)
    if pixels.shape[1] != 3:
        raise ValueError(f"image must have 3 colour channels, got {pixels.shape[1]} (shape {tuple(pixels.shape)})")
    return pixels


def _check_mask(mask: torch.Tensor, size: Sequence[int], pictures: int = 1) -> torch.Tensor:
    """``mask`` [B, 1, H, W] must have the picture's size (H, W), and hold no empty mask."""
    if tuple(mask.shape[-2:]) != tuple(size):
        raise ValueError(f"mask_image is {mask.shape[-1]}×{mask.shape[-2]} (width×height) but image is "
                         f"{size[1]}×{size[0]}: they must have the same size")
    if mask.shape[0] not in (1, pictures) and pictures != 1:
        raise ValueError(f"mask_image holds {mask.shape[0]} masks for {pictures} pictures")
    empty = (binarize_mask(mask).flatten(1).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask {empty} selects no pixel (no value >= 0.5): there is nothing to inpaint; white "
                         "(1) marks what to repaint, black (0) what to keep")
    return mask


def _latents(pipe, pixels, binary, blend_mask, run) -> torch.Tensor:
    """The inpainted latents, or the picture's own when ``strength`` leaves no step to run."""
    if steps_due(run["num_inference_steps"], run["strength"]) == 0:
        return _no_step(pipe, pixels, run)
    return inpaint_latents(pipe, pixels, binary, blend_mask=blend_mask, **run)


def _no_step(pipe, pixels, run) -> torch.Tensor:
    warnings.warn(f"strength={run['strength']} with num_inference_steps={run['num_inference_steps']} leaves no "
                  "denoising step to run: returning the input's round trip through the VAE", stacklevel=5)
    batch = len(_prompt_list(run["prompt"], "prompt"))
    return to_batch(pipe.encode_image(pixels, run["generator"]), batch, "image")


def paste_unmasked(pictures: torch.Tensor, originals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pictures·m + originals·(1 − m): the input's own pixels where the mask keeps them.

    pictures [B, 3, H, W] and originals [1 or B, 3, H, W] in [0, 1]; mask
    [1 or B, 1, H, W] in [0, 1] (soft masks cross-fade). The VAE round trip
    otherwise changes the kept pixels slightly.
    """
    return pictures * mask + originals * (1 - mask)


def _as_output_type(pictures: torch.Tensor, output_type: str) -> list:
    """[B, 3, H, W] in [0, 1] -> list of PIL / HxWx3 arrays / [3, H, W] tensors (as ``pipe.decode``)."""
    if output_type == "pt":
        return list(pictures)
    array = pictures.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return list(array)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


# --------------------------------------------------------- "only masked" crop
def _inpaint_crop(pipe, image, mask_image, pad, height, width, mask_dilate, mask_blur, output_type, run):
    """diffusers' ``padding_mask_crop``: inpaint a crop around the mask at (height, width), paste it back.

    As in the reference the pasting works on 8-bit PIL pictures (Lanczos resize,
    alpha compositing), so "np" / "pt" outputs hold multiples of 1/255.
    """
    if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
        raise ValueError("padding_mask_crop works on one PIL picture and one PIL mask (as diffusers); got "
                         f"{type(image).__name__} and {type(mask_image).__name__}")
    height, width = pipe._check_size(height, width)
    original = image.convert("RGB")
    mask = _check_mask(mask_to_tensor(mask_image), (original.height, original.width))
    if mask_dilate or mask_blur:
        mask_image = Image.fromarray((prepare_mask(mask, mask_dilate, mask_blur)[1][0, 0] * 255).round()
                                     .numpy().astype(np.uint8))
    box = crop_region(mask_image, width, height, pad)
    crop = resize_and_fill(original.crop(box), width, height)
    crop_mask = mask_to_tensor(resize_and_fill(mask_image.convert("L").crop(box), width, height))
    if binarize_mask(crop_mask).sum() == 0:
        raise ValueError("the mask vanishes when its crop is resized to the working size; use a larger mask")
    latents = _latents(pipe, pil_to_tensor(crop)[None], binarize_mask(crop_mask), crop_mask if mask_blur else None,
                       run)
    generated = pipe.decode(latents, "pil")
    pictures = [overlay(mask_image, original, g, box) for g in generated]
    return PipelineOutput(_as_output_type(torch.stack([pil_to_tensor(p) for p in pictures]) / 2 + 0.5, output_type)
                          if output_type != "pil" else pictures, latents)


def crop_region(mask_image: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around every non-zero mask pixel, grown by ``pad`` pixels and
    then to the aspect ratio width:height, kept inside the picture.

    A port of diffusers' ``VaeImageProcessor.get_crop_region`` (same rounding).
    """
    mask = np.asarray(mask_image.convert("L"))
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise ValueError("the mask is empty: there is no region to crop")
    x1, y1 = int(max(cols[0] - pad, 0)), int(max(rows[0] - pad, 0))
    x2, y2 = int(min(cols[-1] + 1 + pad, w)), int(min(rows[-1] + 1 + pad, h))
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide for the working size: take more rows
        y1, y2 = _grow(y1, y2, (x2 - x1) / ratio, h)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * ratio, w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, desired: float, limit: int) -> tuple[int, int]:
    """Widen [a, b) to about ``desired`` around its centre, shifted back inside [0, limit]."""
    diff = int(desired - (b - a))
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit ``image`` inside width×height keeping its aspect ratio (Lanczos), centred, the
    leftover strips filled by stretching its edge rows/columns (diffusers' ``_resize_and_fill``)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def _resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover width×height keeping the aspect ratio (Lanczos), centred (diffusers' ``_resize_and_crop``)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def overlay(mask_image: Image.Image, original: Image.Image, generated: Image.Image,
            box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Paste ``generated`` (resized into ``box`` when given) under the kept part of ``original``.

    The original's alpha is 255 − mask, so black mask pixels show the original
    exactly and grey ones cross-fade (diffusers' ``apply_overlay``).
    """
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_image.convert("L")))
    kept = kept.convert("RGBA")
    if box is not None:
        x, y, x2, y2 = box
        canvas = Image.new("RGBA", (width, height))
        canvas.paste(_resize_and_crop(generated, x2 - x, y2 - y), (x, y))
        generated = canvas.convert("RGB")
    out = generated.convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")


# --------------------------------------------------------------- outpainting
def outpaint_canvas(image: Image.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                    fill: str | tuple[int, int, int] = "edge", overlap: int = 0,
                    multiple: int | None = None) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas for outpainting: returns (bigger picture, its mask), both PIL.

    The new border (``left``/``top``/``right``/``bottom`` pixels) is filled with
    ``fill``: "edge" (repeat the outermost pixels), "reflect" (mirror the picture)
    or an RGB colour; the mask is white on the border and on ``overlap`` pixels
    of the old picture along each extended side (so the seam is repainted too),
    black elsewhere. ``multiple`` (e.g. ``pipe.latent_factor``) grows the right and
    bottom borders until both sides are multiples of it.
    """
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom), ("overlap", overlap)):
        _check_count(value, name)
    if multiple is not None:
        _check_count(multiple, "multiple")
        right += -(image.width + left + right) % multiple
        bottom += -(image.height + top + bottom) % multiple
    if not left + top + right + bottom:
        raise ValueError("outpaint_canvas needs at least one border to add (left, top, right or bottom > 0)")
    if 2 * overlap >= min(image.size):
        raise ValueError(f"overlap={overlap} would mask the whole {image.width}×{image.height} picture")
    rgb = np.asarray(image.convert("RGB"))
    pads = ((top, bottom), (left, right), (0, 0))
    if fill in ("edge", "reflect"):
        canvas = np.pad(rgb, pads, mode=fill if fill == "edge" else "symmetric")
    elif isinstance(fill, (tuple, list)) and len(fill) == 3 and all(isinstance(v, int) and 0 <= v < 256 for v in fill):
        canvas = np.stack([np.pad(rgb[..., c], pads[:2], constant_values=fill[c]) for c in range(3)], axis=-1)
    else:
        raise ValueError(f"fill must be 'edge', 'reflect' or an (r, g, b) colour of 0..255 ints, got {fill!r}")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    y0, x0 = top + (overlap if top else 0), left + (overlap if left else 0)
    y1 = top + image.height - (overlap if bottom else 0)
    x1 = left + image.width - (overlap if right else 0)
    mask[y0:y1, x0:x1] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)
