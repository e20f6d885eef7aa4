"""Pipelines: prompt -> tokens -> text states -> guided sampler loop -> VAE decode.

:class:`StableDiffusionPipeline` joins the pieces of chapters 01-09 into the
text-to-image procedure of Rombach et al. 2022 ("High-Resolution Image
Synthesis with Latent Diffusion Models", section 3.3), with classifier-free
guidance (Ho & Salimans 2022) and SDEdit-style image-to-image (Meng et al.
2022). It follows the reference pipelines step by step, so that the same
prompt, latents, sampler and guidance give the same picture as diffusers'
``StableDiffusionPipeline`` (``tests/test_pipelines.py``).

One difference on purpose: ``guidance_scale`` below 1 still runs both
branches (0 is the unconditional model, 1 the conditional one), so the book's
CFG sweeps mean what the equation says; the reference pipelines switch
guidance off for any scale <= 1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ministd import speed
from ministd.data import pil_to_tensor
from ministd.guidance import check_guidance_scale, guided_noise_prediction
from ministd.samplers import Sampler, from_scheduler_config, make_sampler
from ministd.text import CLIPTextModel
from ministd.tokenizer import CLIPTokenizer
from ministd.unet import UNet
from ministd.vae import AutoencoderKL

DATA = Path(__file__).resolve().parent.parent / "data"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """``images``: one entry per picture (PIL, HxWx3 float array in [0, 1], or
    [3, H, W] tensor in [0, 1], by ``output_type``; the latents themselves for
    "latent"); ``latents``: the final latents [B, C, h, w] (scaled, as the U-Net sees them)."""

    images: list
    latents: torch.Tensor


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


def _check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with fresh OS entropy when it is None
    (without touching torch's global random state)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator("cpu").manual_seed(int(seed))


class StableDiffusionPipeline:
    """Text-to-image and image-to-image with an SD 1.x / 2.x-structured model.

    Components keep the reference names: ``tokenizer``, ``text_encoder``,
    ``unet``, ``vae``, ``scheduler`` (a :class:`ministd.samplers.Sampler`).
    ``clip_skip`` picks an earlier text-encoder layer (0 = last, as SD 1.x).
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet,
                 vae: AutoencoderKL, scheduler: Sampler, clip_skip: int = 0):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.clip_skip = clip_skip
        self.progress_bar = True

    # -------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "StableDiffusionPipeline":
        """Load a diffusers-layout folder (``model_index.json`` + one folder per component)."""
        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
        index = json.loads(index_path.read_text())
        missing = [c for c in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks the component folder(s) {missing}")
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return cls(tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                   text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype),
                   unet=UNet.from_pretrained(folder / "unet", dtype=dtype),
                   vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype),
                   scheduler=from_scheduler_config(scheduler_config))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: str | torch.device) -> "StableDiffusionPipeline":
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device)
        return self

    @property
    def latent_factor(self) -> int:
        """Pixel sides must be multiples of this: VAE factor × U-Net factor."""
        return self.vae.downsampling_factor * self.unet.config.downsample_factor

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae.downsampling_factor

    # ---------------------------------------------------------------- text
    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text states [B, 77, D] (the U-Net's ``encoder_hidden_states``)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True).input_ids.to(self.device)
        return self.text_encoder(ids, clip_skip=self.clip_skip).last_hidden_state

    # --------------------------------------------------------------- checks
    def _check_size(self, height, width) -> tuple[int, int]:
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        f = self.latent_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < f or value % f:
                raise ValueError(f"{name} must be a positive multiple of {f} pixels for this model, got {value!r}")
        return int(height), int(width)

    def _check_latents(self, latents, shape) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {tuple(shape)}, got {got}")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor, got dtype {latents.dtype}")
        return latents

    def _sampler(self, sampler: str | Sampler | None) -> Sampler:
        """A fresh sampler: the model's own, or another one with the same training schedule."""
        if sampler is None:
            return make_sampler(self.scheduler.name, config=self.scheduler.config)
        if isinstance(sampler, Sampler):
            return sampler
        if isinstance(sampler, str):
            return make_sampler(sampler, config=self.scheduler.config)
        raise ValueError(f"sampler must be a sampler name or a Sampler, got {type(sampler).__name__}")

    def _conditions(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale):
        prompts = _prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; "
                                 "give one negative prompt per prompt (or a single string for one prompt)")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        check_guidance_scale(guidance_scale)
        cond = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = None
        if guidance_scale != 1.0:
            uncond = self.encode_prompt(negatives).repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond

    # ----------------------------------------------------------------- loop
    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                sampler: Sampler, guidance_scale: float, guidance_rescale: float = 0.0,
                callback: Callable | None = None, generator: torch.Generator | None = None,
                timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The reverse process: run ``sampler`` over its timesteps with guidance.

        latents [B, C, h, w] already scaled for the first step; cond/uncond
        [B, 77, D]. ``callback(step, t, latents, x0_pred)`` sees every step.
        """
        steps = sampler.timesteps if timesteps is None else timesteps
        for i, t in enumerate(tqdm(steps, disable=not self.progress_bar, desc="sampling", leave=False)):
            x = sampler.scale_model_input(latents, t)
            noise_pred = guided_noise_prediction(self.unet, x, t, cond, uncond, guidance_scale, guidance_rescale)
            out = sampler.step(noise_pred, t, latents, generator=generator)
            latents = out.prev_sample
            if callback is not None:
                callback(i, t, latents, out.pred_original_sample)
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list:
        """Scaled latents -> pictures of ``output_type`` (values in [0, 1] for np / pt)."""
        if output_type == "latent":
            return list(latents)
        images = self.vae.decode(self.vae.unscale_latents(latents))
        images = (images.float() / 2 + 0.5).clamp(0, 1).cpu()
        if output_type == "pt":
            return list(images)
        array = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return list(array)
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    # -------------------------------------------------------------- txt2img
    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                num_inference_steps: int = 20, guidance_scale: float = 7.5, height: int | None = None,
                width: int | None = None, seed: int | None = None, latents: torch.Tensor | None = None,
                sampler: str | Sampler | None = None, callback: Callable | None = None,
                output_type: str = "pil", num_images_per_prompt: int = 1, guidance_rescale: float = 0.0,
                generator: torch.Generator | None = None) -> PipelineOutput:
        """Draw pictures for ``prompt``.

        ``seed`` draws the initial latents as
        ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``
        (float32 on the CPU, then moved), as the reference does; ``latents``
        overrides it. ``generator`` (for ancestral samplers' noise) defaults
        to the seed's generator, continued after the initial draw.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        height, width = self._check_size(height, width)
        _check_seed(seed)
        sampler = self._sampler(sampler)
        sampler.set_timesteps(num_inference_steps)
        batch = len(_prompt_list(prompt, "prompt")) * num_images_per_prompt
        f = self.vae.downsampling_factor
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            generator = generator or _seeded_generator(seed)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:
            latents = self._check_latents(latents, shape)
        cond, uncond = self._conditions(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
        latents = latents.to(self.device, self.unet.dtype) * sampler.init_noise_sigma
        latents = self.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale,
                               callback, generator)
        return PipelineOutput(self.decode(latents, output_type), latents)

    __call__ = txt2img

    # -------------------------------------------------------------- img2img
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.75,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 20,
                guidance_scale: float = 7.5, seed: int | None = None, sampler: str | Sampler | None = None,
                callback: Callable | None = None, output_type: str = "pil", guidance_rescale: float = 0.0,
                generator: torch.Generator | None = None) -> PipelineOutput:
        """SDEdit (Meng et al. 2022): noise ``image`` part-way, then denoise towards ``prompt``.

        ``strength`` in [0, 1] is the fraction of the schedule that is run:
        0 returns the image (through the VAE), 1 ignores it. ``image``: a PIL
        image or a [B, 3, H, W] tensor in [-1, 1].
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0 or math.isnan(strength):
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        _check_seed(seed)
        pixels = self._image_tensor(image)
        self._check_size(pixels.shape[-2], pixels.shape[-1])
        sampler = self._sampler(sampler)
        sampler.set_timesteps(num_inference_steps, strength=strength)
        prompts = _prompt_list(prompt, "prompt")
        if pixels.shape[0] not in (1, len(prompts)):
            raise ValueError(f"image holds {pixels.shape[0]} pictures for {len(prompts)} prompts")
        cond, uncond = self._conditions(prompts, negative_prompt, 1, guidance_scale)
        generator = generator or _seeded_generator(seed)
        with torch.inference_mode():
            posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype))
            init = self.vae.scale_latents(posterior.sample(generator))
        init = init.expand(len(prompts), *init.shape[1:]) if init.shape[0] == 1 else init
        timesteps = sampler.timesteps
        if len(timesteps) == 0:  # strength 0: nothing to denoise
            return PipelineOutput(self.decode(init, output_type), init)
        noise = torch.randn(init.shape, generator=generator, dtype=torch.float32).to(init.device, init.dtype)
        latents = sampler.add_noise(init, noise, timesteps[:1])
        latents = self.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale,
                               callback, generator)
        return PipelineOutput(self.decode(latents, output_type), latents)

    def _image_tensor(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return pil_to_tensor(image)[None]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            return pil_to_tensor(list(image))
        if isinstance(image, torch.Tensor) and image.ndim in (3, 4):
            return image[None] if image.ndim == 3 else image
        raise ValueError("image must be a PIL image, a list of them, or a [B, 3, H, W] tensor in [-1, 1]")


# ---------------------------------------------------------------------- loading

def load_pipeline(name_or_path: str | Path = "shapes", dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None, optimize: bool | None = None) -> StableDiffusionPipeline:
    """The shipped ShapesWorld model ("shapes"), a diffusers folder, or a single file.

    Nothing is downloaded: paths are local. ``optimize`` (default: on unless the
    environment says ``MINISTD_SPEED=0``) applies :func:`ministd.speed.optimize` to
    the U-Net and the VAE: same weights and outputs, faster on CPUs (chapter 10).
    """
    if str(name_or_path) == "shapes":
        pipe = load_shapes_pipeline(dtype)
    else:
        path = Path(name_or_path)
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_folder(path, dtype=dtype)
        elif path.is_file():
            raise NotImplementedError(
                f"{path.name}: single-file checkpoints arrive with ministd.checkpoints (chapter 15); "
                "convert it to a diffusers folder or load a folder for now")
        else:
            raise FileNotFoundError(f"no model at {path}: give 'shapes', a diffusers folder "
                                    "(with model_index.json) or a .safetensors file")
    if speed.enabled_by_default() if optimize is None else optimize:
        speed.optimize(pipe.unet)
        speed.optimize(pipe.vae)
    return pipe.to(device) if device is not None else pipe


def load_shapes_pipeline(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The book's own text-to-image model, trained on ShapesWorld (files in data/)."""
    config_path = DATA / "shapes_unet.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            "the shipped ShapesWorld text-to-image model (data/shapes_unet.safetensors) has not been "
            "trained yet; see data/README.md")
    config = json.loads(config_path.read_text())
    from ministd.text import TinyCLIP
    from ministd.vae import load_shapes_vae

    clip = TinyCLIP.from_pretrained(DATA / "shapes_clip.safetensors", dtype=dtype)
    unet = UNet.load(DATA / "shapes_unet.safetensors", config_path, dtype=dtype)
    scheduler = from_scheduler_config(config["_scheduler"]) if "_scheduler" in config else make_sampler("ddim")
    return StableDiffusionPipeline(tokenizer=CLIPTokenizer.from_vocab_file(), text_encoder=clip.text_encoder,
                                   unet=unet, vae=load_shapes_vae(dtype), scheduler=scheduler)
