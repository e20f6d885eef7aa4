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

import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ministd import speed
from ministd.data import pil_to_tensor
from ministd.guidance import check_guidance_scale, guided_noise_prediction
from ministd.prompts import chunks_needed, encode_text
from ministd.samplers import Sampler, from_scheduler_config, make_sampler
from ministd.text import CLIPTextModel
from ministd.tokenizer import CLIPTokenizer
from ministd.unet import UNet
from ministd.vae import AutoencoderKL
from ministd.weights import read_json

DATA = Path(__file__).resolve().parent.parent / "data"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# the book's own models (name -> its U-Net's file stem in data/; tokenizer, CLIP and VAE are shared)
SHAPES_UNETS = {"shapes": "shapes_unet", "shapes-depth": "shapes_depth_unet",
                "shapes-xl": "shapes_xl_unet", "shapes-xl-refiner": "shapes_xl_refiner_unet"}
# the SDXL-type ones (chapters 13-14): which of the book's text encoders each reads, in order
SHAPES_XL_ENCODERS = {"shapes_xl_unet": ("shapes_clip", "shapes_clip_wide"),
                      "shapes_xl_refiner_unet": ("shapes_clip_wide",)}


@dataclass
class PipelineOutput:
    """``images``: one entry per picture (PIL, HxWx3 float array in [0, 1], or
    [3, H, W] tensor in [0, 1], by ``output_type``; the latents themselves for
    "latent"); ``latents``: the final latents [B, C, h, w] (scaled, as the U-Net sees them)."""

    images: list
    latents: torch.Tensor


def _warn_truncated(prompts: Sequence[str], truncated: Sequence[str]) -> None:
    """The reference's truncation warning, with the way out, shown at the reader's line."""
    level, frame = 1, sys._getframe(0)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("ministd", "torch"):
        frame, level = frame.f_back, level + 1
    for prompt, lost in zip(prompts, truncated):
        if lost:
            head = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            tail = lost if len(lost) <= 60 else lost[:60] + "..."
            warnings.warn(f"prompt {head!r} is longer than CLIP's 75 tokens: the end was dropped, as the "
                          f"reference does ({tail!r}); pass long_prompts=True to encode it in 75-token "
                          "windows, as the web UIs do", stacklevel=level)


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
    ``clip_skip`` picks an earlier text-encoder layer (0 = last, as SD 1.x), the
    default of every call's ``clip_skip=`` (diffusers' count: the UIs' "clip skip
    2" is ``clip_skip=1``). Every call also takes ``long_prompts=True`` (prompts
    over 75 tokens in 75-token windows, as the web UIs) and ``emphasis=True``
    (``(word:1.2)``, ``(word)``, ``[word]``); see :mod:`ministd.prompts`.
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
        self.vae_tile_size: int | None = None     # pixels; None: the VAE sees the whole picture

    # -------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "StableDiffusionPipeline":
        """Load a diffusers-layout folder (``model_index.json`` + one folder per component)."""
        folder = Path(folder)
        index = _read_index(folder)
        if index.get("_class_name") in SDXL_CLASSES or "text_encoder_2" in index:
            raise ValueError(f"{folder} is an SDXL pipeline ({index.get('_class_name')}); load it with "
                             "load_pipeline or StableDiffusionXLPipeline.from_folder")
        missing = [c for c in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks the component folder(s) {missing}")
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
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

    # ------------------------------------------------ large pictures, small machines
    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Encode and decode pictures in overlapping tiles of ``tile_size`` pixels (default: the
        VAE's ``sample_size``, 512 for SD), blended at the seams (:meth:`AutoencoderKL.decode`).

        The VAE's activations grow with the picture (SD's decoder: 128 x 1024 x 1024 floats
        at its last level for a 1024-pixel picture); tiles bound them. Pictures no larger than
        a tile are processed whole, exactly as without tiling.
        """
        f = self.vae.downsampling_factor
        tile_size = self.vae.config.sample_size if tile_size is None else tile_size
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < f or tile_size % f:
            raise ValueError(f"tile_size must be a positive multiple of the VAE's factor {f} (pixels), "
                             f"got {tile_size!r}")
        self.vae_tile_size = tile_size

    def disable_vae_tiling(self) -> None:
        self.vae_tile_size = None

    def enable_attention_chunking(self, query_chunk: int = 4096) -> None:
        """Attention in chunks of ``query_chunk`` query tokens (same result, less memory where a
        kernel writes out the score matrix; :meth:`UNet.set_attention_chunk`)."""
        self.unet.set_attention_chunk(query_chunk)

    def disable_attention_chunking(self) -> None:
        self.unet.set_attention_chunk(None)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pictures [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/f, W/f] in the U-Net's dtype:
        a posterior *sample* drawn from ``generator``, as the reference does
        (diffusers' ``retrieve_latents(..., sample_mode="sample")``)."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype), tile_size=self.vae_tile_size)
        return self.vae.scale_latents(posterior.sample(generator)).to(self.unet.dtype)

    # --------------------------------------- adapters (chapter 16: ministd.adapters)
    def load_lora(self, path, scale: float = 1.0, name: str | None = None, allow_pickle: bool = False) -> str:
        """Apply a LoRA file (kohya / A1111 or diffusers / PEFT layout) on the fly; returns its name."""
        from ministd import adapters

        return adapters.load_lora(self, path, scale=scale, name=name, allow_pickle=allow_pickle)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all, ``name=None``): the networks are bitwise what they were."""
        from ministd import adapters

        adapters.unload_lora(self, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        from ministd import adapters

        adapters.set_lora_scale(self, name, scale)

    def load_textual_inversion(self, path, token: str | None = None, allow_pickle: bool = False) -> list[str]:
        """Add an embedding's token(s) to the tokenizer(s) and its rows to the text encoder(s)."""
        from ministd import adapters

        return adapters.load_textual_inversion(self, path, token=token, allow_pickle=allow_pickle)

    def load_hypernetwork(self, path, strength: float = 1.0, allow_pickle: bool = False):
        """Apply an A1111 hypernetwork (MLPs on the context before to_k / to_v) at ``strength``."""
        from ministd import adapters

        return adapters.load_hypernetwork(self, path, strength=strength, allow_pickle=allow_pickle)

    def unload_hypernetwork(self) -> None:
        from ministd import adapters

        adapters.unload_hypernetwork(self)

    # ---------------------------------------------------------------- text
    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str], clip_skip: int | None = None, long_prompts: bool = False,
                      emphasis: bool = False, num_chunks: int | None = None) -> torch.Tensor:
        """Prompts -> text states [B, 77, D] (the U-Net's ``encoder_hidden_states``).

        By default as the reference: at most 75 tokens, the rest cut off with a
        warning. ``long_prompts``: [B, N * 77, D] (at least ``num_chunks``
        windows); ``emphasis``: the ``(word:1.2)`` syntax; ``clip_skip`` None:
        ``self.clip_skip``. See :mod:`ministd.prompts`.
        """
        prompts = list(prompts)
        clip_skip = self._check_text_options(clip_skip, long_prompts, emphasis)
        enc = encode_text(self.tokenizer, self.text_encoder, prompts, clip_skip=clip_skip,
                          long_prompts=long_prompts, emphasis=emphasis, num_chunks=num_chunks, device=self.device)
        _warn_truncated(prompts, enc.truncated)
        return enc.states

    def _text_layers(self) -> int:
        """How many layers ``clip_skip`` may skip, plus one."""
        return self.text_encoder.config.num_layers

    def _check_text_options(self, clip_skip, long_prompts, emphasis) -> int:
        """The clip skip to use (the pipeline's own when None), after checking all three options."""
        clip_skip = self.clip_skip if clip_skip is None else clip_skip
        layers = self._text_layers()
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) \
                or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be an integer in [0, {layers - 1}] for this text encoder (0 = the "
                             f"model's usual layer; the web UIs' 'clip skip N' is N - 1), got {clip_skip!r}")
        for name, value in (("long_prompts", long_prompts), ("emphasis", emphasis)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        return int(clip_skip)

    def _chunks(self, texts: list[str], long_prompts: bool, emphasis: bool) -> int | None:
        """With long prompts: the window count that fits every text (prompt and negative alike)."""
        if not long_prompts:
            return None
        tokenizer = self.tokenizer if self.tokenizer is not None else self.tokenizer_2
        return chunks_needed(tokenizer, texts, emphasis)

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

    def _initial_noise(self, prompt, num_images_per_prompt: int, height: int, width: int, seed: int | None,
                       latents: torch.Tensor | None, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Generator | None]:
        """The starting latents [B, C, h, w] (float32 on the CPU: the seed's draw, or ``latents``
        checked) and the generator the sampler goes on with."""
        batch = len(_prompt_list(prompt, "prompt")) * num_images_per_prompt
        f = self.vae.downsampling_factor
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        if latents is not None:
            return self._check_latents(latents, shape), generator
        generator = generator or _seeded_generator(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32), generator

    def _sampler(self, sampler: str | Sampler | None) -> Sampler:
        """A fresh sampler: the model's own, or another one with the same training schedule."""
        if sampler is None:
            return make_sampler(self.scheduler.name, config=self.scheduler.config)
        if isinstance(sampler, Sampler):
            return sampler
        if isinstance(sampler, str):
            return make_sampler(sampler, config=self.scheduler.config)
        raise ValueError(f"sampler must be a sampler name or a Sampler, got {type(sampler).__name__}")

    def _conditions(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale, clip_skip=None,
                    long_prompts=False, emphasis=False):
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
        self._check_text_options(clip_skip, long_prompts, emphasis)
        options = dict(clip_skip=clip_skip, long_prompts=long_prompts, emphasis=emphasis,
                       num_chunks=self._chunks(prompts + negatives, long_prompts, emphasis))
        cond = self.encode_prompt(prompts, **options).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = None
        if guidance_scale != 1.0:
            uncond = self.encode_prompt(negatives, **options).repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond

    # ----------------------------------------------------------------- loop
    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                sampler: Sampler, guidance_scale: float, guidance_rescale: float = 0.0,
                callback: Callable | None = None, generator: torch.Generator | None = None,
                timesteps: torch.Tensor | None = None, added_cond: dict | None = None,
                controls: list[Control] | None = None, control_steps: int | None = None,
                model: Callable | None = None) -> torch.Tensor:
        """The reverse process: run ``sampler`` over its timesteps with guidance.

        latents [B, C, h, w] already scaled for the first step; cond/uncond
        [B, 77, D] ([B, N * 77, D] with long prompts). ``callback(step, t, latents,
        x0_pred)`` sees every step.
        ``added_cond``: SDXL's extra U-Net inputs, stacked [uncond, cond] along
        the batch when guidance runs both branches.
        ``controls``: ControlNets steering the U-Net (chapter 16; :class:`Control`), each on
        for its fraction of ``control_steps`` steps (default: the steps run here).
        ``model``: the network called instead of ``self.unet``, with the U-Net's signature
        (depth-to-image attaches its depth channel this way: :func:`ministd.depth.with_depth`).
        """
        steps = sampler.timesteps if timesteps is None else timesteps
        extra = {} if added_cond is None else {"added_cond": added_cond}
        for i, t in enumerate(tqdm(steps, disable=not self.progress_bar, desc="sampling", leave=False)):
            x = sampler.scale_model_input(latents, t)
            net = model or self.unet
            net = net if not controls else controlled_unet(net, controls, i, control_steps or len(steps))
            noise_pred = guided_noise_prediction(net, x, t, cond, uncond, guidance_scale, guidance_rescale,
                                                 **extra)
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
        tile = None if self.vae_tile_size is None else self.vae_tile_size // self.vae.downsampling_factor
        images = self.vae.decode(self.vae.unscale_latents(latents), tile_size=tile)
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
                generator: torch.Generator | None = None, clip_skip: int | None = None, long_prompts: bool = False,
                emphasis: bool = False, controlnet=None, control_image=None,
                controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                control_guidance_start: float | Sequence[float] = 0.0,
                control_guidance_end: float | Sequence[float] = 1.0) -> PipelineOutput:
        """Draw pictures for ``prompt``.

        ``seed`` draws the initial latents as
        ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``
        (float32 on the CPU, then moved), as the reference does; ``latents``
        overrides it. ``generator`` (for ancestral samplers' noise) defaults
        to the seed's generator, continued after the initial draw.
        ``clip_skip`` (None: ``self.clip_skip``; the UIs' "clip skip 2" is 1),
        ``long_prompts`` and ``emphasis``: how the prompts are read, see
        :mod:`ministd.prompts`.

        ``controlnet`` (or a list of them) with ``control_image`` (one per ControlNet)
        steers the picture (chapter 16, :mod:`ministd.controlnet`); height and width then
        default to the first control image's size. See :meth:`prepare_controls`.
        """
        self._check_plain_unet()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        controls = check_controls(controlnet, control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end)
        if controls:   # as the reference: the picture's size defaults to the first control image's
            height = controls[0].size()[0] if height is None else height
            width = controls[0].size()[1] if width is None else width
        height, width = self._check_size(height, width)
        _check_seed(seed)
        sampler = self._sampler(sampler)
        sampler.set_timesteps(num_inference_steps)
        latents, generator = self._initial_noise(prompt, num_images_per_prompt, height, width, seed, latents,
                                                 generator)
        controls = self.prepare_controls(controls, height, width, len(_prompt_list(prompt, "prompt")),
                                         num_images_per_prompt)
        cond, uncond = self._conditions(prompt, negative_prompt, num_images_per_prompt, guidance_scale,
                                        clip_skip, long_prompts, emphasis)
        latents = latents.to(self.device, self.unet.dtype) * sampler.init_noise_sigma
        latents = self.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale,
                               callback, generator, controls=controls)
        return PipelineOutput(self.decode(latents, output_type), latents)

    __call__ = txt2img

    # -------------------------------------------------------------- img2img
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.75,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 20,
                guidance_scale: float = 7.5, seed: int | None = None, sampler: str | Sampler | None = None,
                callback: Callable | None = None, output_type: str = "pil", guidance_rescale: float = 0.0,
                generator: torch.Generator | None = None, clip_skip: int | None = None, long_prompts: bool = False,
                emphasis: bool = False, controlnet=None, control_image=None,
                controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                control_guidance_start: float | Sequence[float] = 0.0,
                control_guidance_end: float | Sequence[float] = 1.0) -> PipelineOutput:
        """SDEdit (Meng et al. 2022): noise ``image`` part-way, then denoise towards ``prompt``.

        ``strength`` in [0, 1] is the fraction of the schedule that is run, as in
        diffusers' StableDiffusionImg2ImgPipeline: min(int(N * strength), N) steps
        (times the sampler's order), from noise added at the first of them. When
        that is 0 steps (strength 0, or N * strength < 1) the image's round trip
        through the VAE is returned, with a warning. Strength 1 starts from pure
        noise, as txt2img (the reference's img2img noises the picture to its first
        timestep instead, which keeps sqrt(alpha_bar) ~ 8% of it with "leading"
        spacing). ``image``: a PIL image or a [B, 3, H, W] tensor in [-1, 1];
        the VAE encodes it to a posterior sample drawn from the seed's generator.
        ``clip_skip``, ``long_prompts``, ``emphasis``: as in txt2img. ``controlnet`` and the
        control options: as in txt2img (the control images take the picture's size), as
        diffusers' StableDiffusionControlNetImg2ImgPipeline.
        """
        self._check_plain_unet()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0 or math.isnan(strength):
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        _check_seed(seed)
        controls = check_controls(controlnet, control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end)
        pixels = self._image_tensor(image)
        self._check_size(pixels.shape[-2], pixels.shape[-1])
        sampler = self._sampler(sampler)
        sampler.set_timesteps(num_inference_steps, strength=strength)
        prompts = _prompt_list(prompt, "prompt")
        if pixels.shape[0] not in (1, len(prompts)):
            raise ValueError(f"image holds {pixels.shape[0]} pictures for {len(prompts)} prompts")
        controls = self.prepare_controls(controls, pixels.shape[-2], pixels.shape[-1], len(prompts), 1)
        cond, uncond = self._conditions(prompts, negative_prompt, 1, guidance_scale, clip_skip, long_prompts,
                                        emphasis)
        generator = generator or _seeded_generator(seed)
        init = self.encode_image(pixels, generator)
        init = init.expand(len(prompts), *init.shape[1:]) if init.shape[0] == 1 else init
        timesteps = sampler.timesteps
        if len(timesteps) == 0 or int(num_inference_steps * strength) == 0:  # PNDM would keep 1 warm-up entry
            warnings.warn(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising "
                          "step to run: returning the image's round trip through the VAE", stacklevel=2)
            return PipelineOutput(self.decode(init, output_type), init)
        noise = torch.randn(init.shape, generator=generator, dtype=torch.float32).to(init.device, init.dtype)
        if strength == 1:  # pure noise, as txt2img: the picture is not used
            latents = noise * sampler.init_noise_sigma
        else:
            latents = sampler.add_noise(init, noise, timesteps[:1])
        latents = self.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale,
                               callback, generator, controls=controls)
        return PipelineOutput(self.decode(latents, output_type), latents)

    # -------------------------------------------------------------- inpaint
    def inpaint(self, prompt: str | Sequence[str], image, mask_image, strength: float = 1.0,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 20,
                guidance_scale: float = 7.5, seed: int | None = None, sampler: str | Sampler | None = None,
                callback: Callable | None = None, output_type: str = "pil",
                generator: torch.Generator | None = None, padding_mask_crop: int | None = None,
                paste_back: bool = False, mask_blur: float = 0.0, mask_dilate: int = 0,
                height: int | None = None, width: int | None = None,
                guidance_rescale: float = 0.0, clip_skip: int | None = None, long_prompts: bool = False,
                emphasis: bool = False) -> PipelineOutput:
        """Repaint ``image`` where ``mask_image`` is white, keep it where black (chapter 12).

        A 4-channel U-Net inpaints by latent blending, a 9-channel inpainting U-Net
        by its extra inputs (mask + masked-image latents); both as diffusers'
        StableDiffusionInpaintPipeline (see :mod:`ministd.inpaint`).

        - image: PIL picture (or list) or [B, 3, H, W] tensor in [-1, 1]; mask_image:
          PIL, array or tensor of the same H×W, values in [0, 1], binarised at 0.5.
        - strength: as img2img (1: the masked area starts from pure noise).
        - padding_mask_crop: "only masked": crop around the mask plus this many
          pixels, inpaint the crop at height×width (default the model's size), paste
          it back (PIL picture and mask only).
        - paste_back: copy the input's unmasked pixels over the decoded result.
        - mask_dilate: grow the mask by this many pixels; mask_blur: feather it
          (Gaussian sigma in pixels) for a soft latent blend and a soft paste-back.
        - clip_skip, long_prompts, emphasis: as in txt2img.
        """
        from ministd.inpaint import inpaint

        self._check_text_options(clip_skip, long_prompts, emphasis)

        return inpaint(self, prompt, image, mask_image, strength=strength, negative_prompt=negative_prompt,
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                       sampler=sampler, callback=callback, output_type=output_type, generator=generator,
                       padding_mask_crop=padding_mask_crop, paste_back=paste_back, mask_blur=mask_blur,
                       mask_dilate=mask_dilate, height=height, width=width, guidance_rescale=guidance_rescale,
                       text_options=dict(clip_skip=clip_skip, long_prompts=long_prompts, emphasis=emphasis))

    # ------------------------------------------------------------ depth2img
    def depth2img(self, prompt: str | Sequence[str], image, depth_map=None, strength: float = 0.8,
                  negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 20,
                  guidance_scale: float = 7.5, seed: int | None = None, sampler: str | Sampler | None = None,
                  callback: Callable | None = None, output_type: str = "pil",
                  generator: torch.Generator | None = None, guidance_rescale: float = 0.0) -> PipelineOutput:
        """Redraw ``image`` for ``prompt`` keeping its depth, with a depth U-Net (SD 2-depth,
        ``load_pipeline("shapes-depth")``); ``depth_map`` None reads it off the picture.
        See :func:`ministd.depth.depth2img` (chapter 16)."""
        from ministd.depth import depth2img

        return depth2img(self, prompt, image, depth_map=depth_map, strength=strength,
                         negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, sampler=sampler, callback=callback,
                         output_type=output_type, generator=generator, guidance_rescale=guidance_rescale)

    def _check_plain_unet(self) -> None:
        """txt2img and img2img need a U-Net that takes latents alone."""
        config = self.unet.config
        if config.in_channels == 9:
            raise ValueError("this is a 9-channel inpainting U-Net: use pipe.inpaint(prompt, image, mask_image)")
        if config.in_channels == config.out_channels + 1:
            raise ValueError("this is a depth U-Net (latents + a depth channel): use "
                             "pipe.depth2img(prompt, image, depth_map=None, strength=0.8)")

    def _image_tensor(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return pil_to_tensor(image)[None]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            return pil_to_tensor(list(image))
        if isinstance(image, torch.Tensor) and image.ndim in (3, 4):
            return image[None] if image.ndim == 3 else image
        raise ValueError("image must be a PIL image, a list of them, or a [B, 3, H, W] tensor in [-1, 1]")

    def prepare_controls(self, controls: list[Control] | None, height: int, width: int, num_prompts: int,
                         num_images_per_prompt: int) -> list[Control] | None:
        """Control images -> [B, 3, height, width] tensors in [0, 1] on the U-Net's device and dtype.

        As diffusers' ``StableDiffusionControlNetPipeline.prepare_image``: an image of
        another size is resized to the picture's (PIL: Lanczos; tensors: nearest), RGB,
        values in [0, 1] (*not* moved to [-1, 1] as pictures for the VAE are); one image
        serves every prompt, or one per prompt, each repeated ``num_images_per_prompt``
        times. An image whose aspect ratio differs from the picture's is refused
        rather than stretched. Each ControlNet that says its shape (``config``) must fit
        this U-Net and VAE. Everything is checked before any network runs.
        """
        if not controls:
            return None
        batch = num_prompts * num_images_per_prompt
        prepared = []
        for n, control in enumerate(controls):
            self._check_controlnet_fits(control.net, n)
            image = control.pixels(height, width, n)
            if image.shape[0] == 1:
                image = image.repeat(batch, 1, 1, 1)
            elif image.shape[0] == num_prompts:
                image = image.repeat_interleave(num_images_per_prompt, dim=0)
            else:
                raise ValueError(f"control_image{_nth(n, len(controls))} holds {image.shape[0]} pictures for "
                                 f"{num_prompts} prompts: give one, or one per prompt")
            prepared.append(dataclasses.replace(control, image=image.to(self.device, self.unet.dtype)))
        return prepared

    def _check_controlnet_fits(self, net, n: int) -> None:
        config, mine = getattr(net, "config", None), self.unet.config
        for field in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels"):
            theirs = getattr(config, field, None)
            if theirs is not None and theirs != getattr(mine, field):
                raise ValueError(f"controlnet{_nth(n)} was made for a U-Net with {field}={theirs}, this "
                                 f"pipeline's U-Net has {getattr(mine, field)}: it belongs to another model")
        factor = getattr(net, "conditioning_factor", None)
        if factor is not None and factor != self.vae.downsampling_factor:
            raise ValueError(f"controlnet{_nth(n)}'s condition encoder shrinks the control image {factor}x, this "
                             f"pipeline's VAE {self.vae.downsampling_factor}x: they cannot meet at the latents")


# --------------------------------------------------------- ControlNet (chapter 16)
# The pipelines only call the ControlNets they are given, as
# ``net(x, t, encoder_hidden_states, controlnet_cond, conditioning_scale) -> (down, mid)``;
# the network itself is ministd.controlnet's, which belongs to a later chapter.


@dataclass
class Control:
    """One ControlNet's part in a run: the network, its control image (as given, then
    :meth:`StableDiffusionPipeline.prepare_controls` makes it [B, 3, H, W] in [0, 1]),
    its scale, and the fraction of the steps it is on for, [start, end]."""

    net: Callable
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, num_steps: int) -> bool:
        """diffusers' ``controlnet_keep``: on at step i of N when [i/N, (i+1)/N] lies inside [start, end]
        (a scale of 0 switches it off too: it would add zeros)."""
        return self.start <= step / num_steps and (step + 1) / num_steps <= self.end and self.scale != 0

    def size(self) -> tuple[int, int]:
        """(height, width) of the control image as given."""
        image = self.image[0] if isinstance(self.image, (list, tuple)) else self.image
        if isinstance(image, Image.Image):
            return image.height, image.width
        return tuple(image.shape[-2:])

    def pixels(self, height: int, width: int, n: int = 0) -> torch.Tensor:
        """The control image as [B, 3, height, width] float32 in [0, 1] (see ``prepare_controls``)."""
        h, w = self.size()
        if (h, w) != (height, width) and h * width != w * height:
            raise ValueError(f"control_image{_nth(n)} is {h}x{w} pixels, the picture {height}x{width}: the aspect "
                             f"ratios differ (it would be stretched); give a control image of the picture's shape")
        if isinstance(self.image, torch.Tensor):
            image = self.image[None] if self.image.ndim == 3 else self.image
            image = image.float()
            if (h, w) != (height, width):
                image = F.interpolate(image, size=(height, width))       # nearest, as the reference
            return image
        images = self.image if isinstance(self.image, (list, tuple)) else [self.image]
        images = [im.resize((width, height), Image.LANCZOS) if im.size != (width, height) else im for im in images]
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _nth(n: int, count: int = 2) -> str:
    return f" {n}" if count > 1 else ""


def _check_control_image(image, n: int, count: int) -> None:
    name = f"control_image{_nth(n, count)}"
    if isinstance(image, Image.Image):
        return
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        if len({i.size for i in image}) > 1:
            raise ValueError(f"{name}: the pictures of one control image batch must share one size, got "
                             f"{sorted({i.size for i in image})}")
        return
    if (isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] == 3
            and image.is_floating_point()):
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"{name} must hold values in [0, 1] (control images are not moved to [-1, 1] as "
                             f"pictures for the VAE are); got [{float(image.min()):.3g}, {float(image.max()):.3g}]")
        return
    got = f"a tensor of shape {list(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
    raise ValueError(f"{name} must be a PIL image, a list of them, or a float tensor [3, H, W] / [B, 3, H, W] in "
                     f"[0, 1]; got {got}")


def _per_net(value, name: str, count: int, low: float | None = None, high: float | None = None) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} ControlNet(s): give one number, "
                         "or one per ControlNet")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (low is not None and v < low) or (high is not None and v > high):
            bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
            raise ValueError(f"{name} must be a finite number{bounds} (or one per ControlNet), got {value!r}")
    return [float(v) for v in values]


def check_controls(controlnet, control_image, scale, start, end) -> list[Control] | None:
    """The ControlNet arguments of txt2img / img2img, checked, as one :class:`Control` per network.

    ``controlnet``: a network or a list of them (their residuals are added, as diffusers'
    MultiControlNetModel); ``control_image``: for one network an image (or a batch), for a
    list a list with one image per network; ``scale``, ``start``, ``end``: a number for
    all, or one per network, with 0 <= start < end <= 1.
    """
    if controlnet is None and control_image is None:
        return None
    if controlnet is None or control_image is None:
        given, missing = ("controlnet", "control_image") if control_image is None else \
            ("control_image", "controlnet")
        raise ValueError(f"{given} was given without {missing}: a ControlNet needs its control image and "
                         "the other way round")
    several = isinstance(controlnet, (list, tuple))
    nets = list(controlnet) if several else [controlnet]
    if not nets or not all(callable(n) for n in nets):
        raise ValueError("controlnet must be a ControlNet (ministd.load_controlnet) or a non-empty list of them")
    if several:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
            count = len(control_image) if isinstance(control_image, (list, tuple)) else "not a list"
            raise ValueError(f"{len(nets)} ControlNets need a list of {len(nets)} control images, one each "
                             f"(got {count})")
        images = list(control_image)
    else:
        images = [control_image]
    for n, image in enumerate(images):
        _check_control_image(image, n, len(nets))
    scales = _per_net(scale, "controlnet_conditioning_scale", len(nets))
    starts = _per_net(start, "control_guidance_start", len(nets), 0.0, 1.0)
    ends = _per_net(end, "control_guidance_end", len(nets), 0.0, 1.0)
    for s, e in zip(starts, ends):
        if s >= e:
            raise ValueError(f"control_guidance_start ({s}) must be smaller than control_guidance_end ({e})")
    return [Control(*args) for args in zip(nets, images, scales, starts, ends)]


def controlled_unet(unet: UNet, controls: list[Control], step: int, num_steps: int) -> Callable:
    """The U-Net with the ControlNets that are on at ``step`` added in: a function with the
    U-Net's call shape, ``(x, t, encoder_hidden_states, **extra) -> prediction``.

    Each ControlNet sees what the U-Net sees (the latents, both guidance halves, the
    text); under classifier-free guidance its control image goes to both halves, as
    the reference's default (no "guess mode"). The residuals of several ControlNets
    are summed, then added to the U-Net's skips and mid block.
    """
    active = [c for c in controls if c.active(step, num_steps)]
    if not active:
        return unet

    def with_control(x, t, encoder_hidden_states, **extra):
        down = mid = None
        for control in active:
            image = control.image
            if image.shape[0] != x.shape[0]:           # both guidance halves: [image; image]
                image = torch.cat([image] * (x.shape[0] // image.shape[0]))
            d, m = control.net(x, t, encoder_hidden_states, image, control.scale, **extra)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return unet(x, t, encoder_hidden_states, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, **extra)

    return with_control


# ------------------------------------------------------------------- SDXL

def _size_pair(value, name: str) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{name} must be a pair of non-negative integers (height, width) or (top, left), "
                         f"got {value!r}")
    return int(value[0]), int(value[1])


def _check_fraction(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1 (or None), got {value!r}")
    return float(value)


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base and refiner (Podell et al. 2023): two text encoders and micro-conditioning.

    - Text: each encoder's penultimate hidden states, *without* the final
      LayerNorm, concatenated along the channels ([B, 77, 768 + 1280] for the
      base); the pooled, projected output of the second encoder ([B, 1280])
      goes to the U-Net's added embedding as ``text_embeds``. The refiner has
      only the second encoder (``tokenizer`` and ``text_encoder`` are None).
    - Micro-conditioning (sec. 2.2): ``time_ids`` = original_size (h, w) +
      crops_coords_top_left (top, left) + target_size (h, w) for the base; the
      refiner replaces target_size by one aesthetic score (5 numbers).
    - With ``force_zeros_for_empty_prompt`` (the base's folders) and no negative
      prompt, the unconditional branch gets zero text states and pooled vector.
    - Ensemble of experts (sec. 2.5): the base's ``txt2img(..., denoising_end=0.8,
      output_type="latent")`` stops where the refiner's ``img2img(prompt, latents,
      denoising_start=0.8)`` takes over, on the same timestep list.
    """

    def __init__(self, tokenizer: CLIPTokenizer | None, text_encoder: CLIPTextModel | None,
                 tokenizer_2: CLIPTokenizer, text_encoder_2: CLIPTextModel, unet: UNet, vae: AutoencoderKL,
                 scheduler: Sampler, force_zeros_for_empty_prompt: bool = True,
                 requires_aesthetics_score: bool = False, clip_skip: int = 0):
        if (tokenizer is None) != (text_encoder is None):
            raise ValueError("tokenizer and text_encoder must both be given (SDXL base) or both be None (refiner)")
        super().__init__(tokenizer, text_encoder, unet, vae, scheduler, clip_skip)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score
        expected = 5 if requires_aesthetics_score else 6
        if unet.config.addition_time_embed_dim is None:
            raise ValueError("an SDXL pipeline needs an SDXL U-Net (with addition_embed_type 'text_time'); "
                             "this one has none: load it as a StableDiffusionPipeline")
        got = (unet.config.projection_class_embeddings_input_dim - text_encoder_2.config.projection_dim) // unet.config.addition_time_embed_dim
        if got != expected:
            raise ValueError(f"this U-Net embeds {got} time ids, but requires_aesthetics_score="
                             f"{requires_aesthetics_score} means {expected} (6 for the base, 5 for the refiner)")

    @property
    def is_refiner(self) -> bool:
        return self.requires_aesthetics_score

    def to(self, device: str | torch.device) -> "StableDiffusionXLPipeline":
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if module is not None:
                module.to(device)
        return self

    # ---------------------------------------------------------------- text
    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str], clip_skip: int | None = None, long_prompts: bool = False,
                      emphasis: bool = False, num_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (text states [B, 77, D1 + D2] or [B, 77, D2], pooled [B, P] of the second encoder).

        ``clip_skip`` counts layers beyond the penultimate one SDXL always takes
        (diffusers' count); ``long_prompts`` gives [B, N * 77, ...] with the same
        N for both encoders, the pooled vector of the first window; ``emphasis``
        weights each encoder's states. See :mod:`ministd.prompts`.
        """
        prompts = list(prompts)
        clip_skip = self._check_text_options(clip_skip, long_prompts, emphasis)
        if long_prompts:
            num_chunks = max(num_chunks or 1, self._chunks(prompts, long_prompts, emphasis))
        states, pooled, truncated = [], None, None
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        for tokenizer, encoder in pairs:
            if encoder is None:
                continue
            enc = encode_text(tokenizer, encoder, prompts, clip_skip=1 + clip_skip, final_layer_norm=False,
                              long_prompts=long_prompts, emphasis=emphasis, num_chunks=num_chunks,
                              device=self.device)
            states.append(enc.states)
            pooled = enc.pooled
            truncated = truncated or enc.truncated
        _warn_truncated(prompts, truncated)
        return torch.cat(states, dim=-1), pooled

    def _text_layers(self) -> int:
        # SDXL reads the penultimate layer at clip_skip=0: one layer fewer to skip
        return min(e.config.num_layers for e in (self.text_encoder, self.text_encoder_2) if e is not None) - 1

    def _conditions(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale, clip_skip=None,
                    long_prompts=False, emphasis=False):
        """(cond, uncond, pooled, negative pooled): uncond / negative pooled None without guidance."""
        prompts = _prompt_list(prompt, "prompt")
        if negative_prompt is not None:
            negatives = _prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; "
                                 "give one negative prompt per prompt (or a single string for one prompt)")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        check_guidance_scale(guidance_scale)
        self._check_text_options(clip_skip, long_prompts, emphasis)
        negatives = negatives if negative_prompt is not None else [""] * len(prompts)
        options = dict(clip_skip=clip_skip, long_prompts=long_prompts, emphasis=emphasis,
                       num_chunks=self._chunks(prompts + negatives, long_prompts, emphasis))
        n = num_images_per_prompt
        cond, pooled = (x.repeat_interleave(n, dim=0) for x in self.encode_prompt(prompts, **options))
        if guidance_scale == 1.0:
            return cond, None, pooled, None
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return cond, torch.zeros_like(cond), pooled, torch.zeros_like(pooled)
        uncond, neg_pooled = (x.repeat_interleave(n, dim=0) for x in self.encode_prompt(negatives, **options))
        return cond, uncond, pooled, neg_pooled

    def _added_cond(self, pooled, neg_pooled, ids: list[float], neg_ids: list[float]) -> dict:
        """The U-Net's added inputs, [uncond; cond] stacked when guidance runs both branches."""
        def time_ids(values, batch):
            return torch.tensor([values], dtype=pooled.dtype, device=self.device).repeat(batch, 1)
        b = pooled.shape[0]
        if neg_pooled is None:
            return {"text_embeds": pooled, "time_ids": time_ids(ids, b)}
        return {"text_embeds": torch.cat([neg_pooled, pooled]),
                "time_ids": torch.cat([time_ids(neg_ids, b), time_ids(ids, b)])}

    def _time_ids(self, original_size, crops, target_size, aesthetic_score) -> list[float]:
        last = (aesthetic_score,) if self.requires_aesthetics_score else target_size
        return [float(v) for v in (*original_size, *crops, *last)]

    # -------------------------------------------------------------- txt2img
    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                num_inference_steps: int = 20, guidance_scale: float = 5.0, height: int | None = None,
                width: int | None = None, seed: int | None = None, latents: torch.Tensor | None = None,
                sampler: str | Sampler | None = None, callback: Callable | None = None,
                output_type: str = "pil", num_images_per_prompt: int = 1, guidance_rescale: float = 0.0,
                generator: torch.Generator | None = None, original_size: tuple[int, int] | None = None,
                crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                negative_original_size: tuple[int, int] | None = None,
                negative_crops_coords_top_left: tuple[int, int] = (0, 0),
                negative_target_size: tuple[int, int] | None = None,
                denoising_end: float | None = None, clip_skip: int | None = None, long_prompts: bool = False,
                emphasis: bool = False, controlnet=None, control_image=None,
                controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                control_guidance_start: float | Sequence[float] = 0.0,
                control_guidance_end: float | Sequence[float] = 1.0) -> PipelineOutput:
        """SDXL base text-to-image. The size conditions default to the picture's own size
        (height, width) and no crop, as the reference does; the ``negative_*`` forms apply
        when both negative sizes are given (otherwise the positive ones are repeated, as in
        the reference). ``denoising_end`` in (0, 1) stops after the steps whose
        timestep is >= round(T - denoising_end * T) (hand the rest to the refiner).
        ``clip_skip``, ``long_prompts``, ``emphasis``: see :meth:`encode_prompt`. ControlNets
        (SDXL ones): as :meth:`StableDiffusionPipeline.txt2img`, as diffusers'
        StableDiffusionXLControlNetPipeline (their steps counted over the whole schedule,
        also when ``denoising_end`` stops early)."""
        if self.is_refiner:
            raise ValueError("this is an SDXL refiner: it only continues pictures; use img2img(prompt, image "
                             "or latents, denoising_start=...) instead of txt2img")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        controls = check_controls(controlnet, control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end)
        if controls:   # as the reference: the picture's size defaults to the first control image's
            height = controls[0].size()[0] if height is None else height
            width = controls[0].size()[1] if width is None else width
        height, width = self._check_size(height, width)
        denoising_end = _check_fraction(denoising_end, "denoising_end")
        original_size = _size_pair(original_size or (height, width), "original_size")
        target_size = _size_pair(target_size or (height, width), "target_size")
        crops = _size_pair(crops_coords_top_left, "crops_coords_top_left")
        ids = neg_ids = self._time_ids(original_size, crops, target_size, None)
        # As the reference's base pipeline: the negative branch gets its own size conditions only
        # when both negative sizes are given; otherwise it repeats the positive ones.
        if negative_original_size is not None and negative_target_size is not None:
            neg_ids = self._time_ids(_size_pair(negative_original_size, "negative_original_size"),
                                     _size_pair(negative_crops_coords_top_left, "negative_crops_coords_top_left"),
                                     _size_pair(negative_target_size, "negative_target_size"), None)
        elif negative_original_size is not None or negative_target_size is not None:
            warnings.warn("negative_original_size and negative_target_size are used only together (as in "
                          "diffusers); with one of them the negative branch repeats the positive conditions",
                          stacklevel=2)
        _check_seed(seed)
        sampler = self._sampler(sampler)
        sampler.set_timesteps(num_inference_steps)
        timesteps = sampler.timesteps
        if denoising_end is not None:
            T = sampler.config.num_train_timesteps
            cutoff = int(round(T - denoising_end * T))
            timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        latents, generator = self._initial_noise(prompt, num_images_per_prompt, height, width, seed, latents,
                                                 generator)
        controls = self.prepare_controls(controls, height, width, len(_prompt_list(prompt, "prompt")),
                                         num_images_per_prompt)
        cond, uncond, pooled, neg_pooled = self._conditions(prompt, negative_prompt, num_images_per_prompt,
                                                            guidance_scale, clip_skip, long_prompts, emphasis)
        latents = latents.to(self.device, self.unet.dtype) * sampler.init_noise_sigma
        latents = self.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale, callback,
                               generator, timesteps=timesteps,
                               added_cond=self._added_cond(pooled, neg_pooled, ids, neg_ids),
                               controls=controls, control_steps=len(sampler.timesteps))
        return PipelineOutput(self.decode(latents, output_type), latents)

    __call__ = txt2img

    # -------------------------------------------------------------- img2img
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.3,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 20,
                guidance_scale: float = 5.0, seed: int | None = None, sampler: str | Sampler | None = None,
                callback: Callable | None = None, output_type: str = "pil", guidance_rescale: float = 0.0,
                generator: torch.Generator | None = None, denoising_start: float | None = None,
                original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                target_size: tuple[int, int] | None = None,
                negative_original_size: tuple[int, int] | None = None,
                negative_crops_coords_top_left: tuple[int, int] = (0, 0),
                negative_target_size: tuple[int, int] | None = None,
                aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                clip_skip: int | None = None, long_prompts: bool = False, emphasis: bool = False) -> PipelineOutput:
        """SDEdit with SDXL's conditions, or the refiner's hand-off.

        ``image``: a picture (PIL or [B, 3, H, W] in [-1, 1]), or latents [B, 4, h, w]
        as the base returns them with ``output_type="latent"`` (used as they are).
        ``denoising_start`` in (0, 1) replaces ``strength``: run only the steps whose
        timestep is < round(T - denoising_start * T) (one more for 2nd-order samplers
        when the count is even, as the reference does), and add no noise: the input
        is already at that noise level. ``clip_skip``, ``long_prompts``, ``emphasis``:
        see :meth:`encode_prompt`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0 or math.isnan(strength):
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        denoising_start = _check_fraction(denoising_start, "denoising_start")
        for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        _check_seed(seed)
        self._check_text_options(clip_skip, long_prompts, emphasis)
        prompts = _prompt_list(prompt, "prompt")
        generator = generator or _seeded_generator(seed)
        init = self._initial_latents(image, len(prompts), generator)
        f = self.vae.downsampling_factor
        height, width = init.shape[-2] * f, init.shape[-1] * f
        original_size = _size_pair(original_size or (height, width), "original_size")
        target_size = _size_pair(target_size or (height, width), "target_size")
        ids = self._time_ids(original_size, _size_pair(crops_coords_top_left, "crops_coords_top_left"),
                             target_size, aesthetic_score)
        neg_ids = self._time_ids(_size_pair(negative_original_size or original_size, "negative_original_size"),
                                 _size_pair(negative_crops_coords_top_left, "negative_crops_coords_top_left"),
                                 _size_pair(negative_target_size or target_size, "negative_target_size"),
                                 negative_aesthetic_score)
        sampler = self._sampler(sampler)
        if denoising_start is None:
            sampler.set_timesteps(num_inference_steps, strength=strength)
        else:
            sampler.set_timesteps(num_inference_steps)
            T = sampler.config.num_train_timesteps
            remaining = int((sampler.timesteps < int(round(T - denoising_start * T))).sum())
            if sampler.order == 2 and remaining % 2 == 0:
                remaining += 1
            sampler.set_begin_index(len(sampler.timesteps) - remaining)
        timesteps = sampler.timesteps
        if len(timesteps) == 0:
            return PipelineOutput(self.decode(init, output_type), init)
        cond, uncond, pooled, neg_pooled = self._conditions(prompts, negative_prompt, 1, guidance_scale, clip_skip,
                                                            long_prompts, emphasis)
        latents = init
        if denoising_start is None:
            noise = torch.randn(init.shape, generator=generator, dtype=torch.float32).to(init.device, init.dtype)
            latents = sampler.add_noise(init, noise, timesteps[:1])
        latents = self.denoise(latents, cond, uncond, sampler, guidance_scale, guidance_rescale, callback,
                               generator, added_cond=self._added_cond(pooled, neg_pooled, ids, neg_ids))
        return PipelineOutput(self.decode(latents, output_type), latents)

    def _initial_latents(self, image, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents [batch, 4, h, w] of ``image`` (latents pass through unchanged)."""
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self.unet.config.out_channels:
            init = image.to(self.device, self.unet.dtype)
        else:
            pixels = self._image_tensor(image)
            self._check_size(pixels.shape[-2], pixels.shape[-1])
            init = self.encode_image(pixels, generator)
        if init.shape[0] not in (1, batch):
            raise ValueError(f"image holds {init.shape[0]} pictures for {batch} prompts")
        return init.expand(batch, *init.shape[1:]) if init.shape[0] == 1 else init

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "StableDiffusionXLPipeline":
        """Load an SDXL base or refiner diffusers folder (``model_index.json`` names the components)."""
        folder = Path(folder)
        index = _read_index(folder)
        needed = ["tokenizer_2", "text_encoder_2", "unet", "vae", "scheduler"]
        first = index.get("text_encoder") not in (None, [None, None])
        if first:
            needed += ["tokenizer", "text_encoder"]
        missing = [c for c in needed if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks the component folder(s) {missing}")
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        return cls(tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer") if first else None,
                   text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype) if first else None,
                   tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
                   text_encoder_2=CLIPTextModel.from_pretrained(folder / "text_encoder_2", dtype=dtype),
                   unet=UNet.from_pretrained(folder / "unet", dtype=dtype),
                   vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype),
                   scheduler=from_scheduler_config(scheduler_config),
                   force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                   requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))


def _read_index(folder: Path) -> dict:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
    return read_json(index_path)


SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def pipeline_from_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The pipeline a diffusers folder describes: SDXL (base or refiner) when its
    model_index.json names an SDXL class or a second text encoder, SD 1.x / 2.x otherwise."""
    index = _read_index(Path(folder))
    if index.get("_class_name") in SDXL_CLASSES or "text_encoder_2" in index:
        return StableDiffusionXLPipeline.from_folder(folder, dtype)
    return StableDiffusionPipeline.from_folder(folder, dtype)


# ---------------------------------------------------------------------- loading

def load_pipeline(name_or_path: str | Path = "shapes", dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None, optimize: bool | None = None,
                  prediction_type: str | None = None, vae: str | Path | None = None,
                  config: str | Path | dict | None = None, use_ema: bool = False,
                  allow_pickle: bool = False) -> StableDiffusionPipeline:
    """A shipped ShapesWorld model ("shapes"; "shapes-xl" and "shapes-xl-refiner", chapters
    13-14; "shapes-depth", chapter 16), a diffusers folder, or a single file.

    Nothing is downloaded: paths are local. ``prediction_type``, ``vae``, ``config``,
    ``use_ema`` (load a file's EMA copy of the U-Net) and ``allow_pickle`` are
    for single files (:func:`ministd.checkpoints.load_single_file`). ``optimize`` (default: on unless the
    environment says ``MINISTD_SPEED=0``) applies :func:`ministd.speed.optimize` to
    the U-Net and the VAE: same weights and outputs, faster on CPUs (chapter 10).
    """
    file_only = {"prediction_type": prediction_type, "vae": vae, "config": config, "use_ema": use_ema,
                 "allow_pickle": allow_pickle}
    given = [name for name, value in file_only.items() if value not in (None, False)]
    if given and (str(name_or_path) in SHAPES_UNETS or Path(name_or_path).is_dir()):
        # a folder (and the shipped model) says all of this itself: refuse rather than ignore
        raise ValueError(f"{', '.join(given)} apply to single checkpoint files only; {name_or_path} is "
                         f"{'a shipped model' if str(name_or_path) in SHAPES_UNETS else 'a diffusers folder'}, "
                         "whose own configs (scheduler/scheduler_config.json, vae/) decide them")
    if str(name_or_path) in SHAPES_UNETS:
        pipe = load_shapes_pipeline(dtype, SHAPES_UNETS[str(name_or_path)])
    else:
        path = Path(name_or_path)
        if path.is_dir():
            pipe = pipeline_from_folder(path, dtype=dtype)
        elif path.is_file():  # a single original file: ministd.checkpoints (chapter 15) reads it
            from ministd.checkpoints import load_single_file

            pipe = load_single_file(path, dtype=dtype, prediction_type=prediction_type, vae=vae,
                                    config=config, use_ema=use_ema, allow_pickle=allow_pickle)
        else:
            raise FileNotFoundError(f"no model at {path}: give 'shapes', a diffusers folder "
                                    "(with model_index.json) or a .safetensors file")
    if speed.enabled_by_default() if optimize is None else optimize:
        speed.optimize(pipe.unet)
        speed.optimize(pipe.vae)
    return pipe.to(device) if device is not None else pipe


def load_shapes_pipeline(dtype: torch.dtype = torch.float32, unet: str = "shapes_unet") -> StableDiffusionPipeline:
    """The book's own model, trained on ShapesWorld (files in data/): tokenizer, tiny CLIP and
    VAE, with the U-Net ``data/<unet>.safetensors`` (+ ``.json``): one of SHAPES_UNETS' values."""
    config_path = DATA / f"{unet}.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"the shipped ShapesWorld U-Net data/{unet}.safetensors has not been trained yet; see data/README.md")
    config = json.loads(config_path.read_text())
    from ministd.text import TinyCLIP
    from ministd.vae import load_shapes_vae

    model = UNet.load(DATA / f"{unet}.safetensors", config_path, dtype=dtype)
    scheduler = from_scheduler_config(config["_scheduler"]) if "_scheduler" in config else make_sampler("ddim")
    if unet in SHAPES_XL_ENCODERS:
        # SDXL-type (chapter 13): both tiny CLIPs (the refiner: the wide one only), zeros for an
        # unconditional branch without a negative prompt, as its training's caption dropout
        encoders = [TinyCLIP.from_pretrained(DATA / f"{name}.safetensors", dtype=dtype).text_encoder
                    for name in SHAPES_XL_ENCODERS[unet]]
        first = encoders[0] if len(encoders) == 2 else None
        return StableDiffusionXLPipeline(
            tokenizer=CLIPTokenizer.from_vocab_file() if first is not None else None, text_encoder=first,
            tokenizer_2=CLIPTokenizer.from_vocab_file(), text_encoder_2=encoders[-1], unet=model,
            vae=load_shapes_vae(dtype), scheduler=scheduler, force_zeros_for_empty_prompt=True,
            requires_aesthetics_score=first is None)
    clip = TinyCLIP.from_pretrained(DATA / "shapes_clip.safetensors", dtype=dtype)
    return StableDiffusionPipeline(tokenizer=CLIPTokenizer.from_vocab_file(), text_encoder=clip.text_encoder,
                                   unet=model, vae=load_shapes_vae(dtype), scheduler=scheduler)
