"""ministd: Stable Diffusion from first principles.

A compact, complete, readable package that grows chapter by chapter with the
book in ``notebooks/``. Every module belongs to the chapter that introduces
it (``MODULE_CHAPTER`` below); a chapter imports only modules owned by itself
or an earlier chapter, and ``tests/test_notebooks.py`` enforces that rule.
"""

from __future__ import annotations

__version__ = "0.1.0"

# module (relative to the package) -> the chapter that introduces it
MODULE_CHAPTER: dict[str, int] = {
    "data": 0,            # ShapesWorld renderer, captions, image helpers
    "viz": 0,             # plotting helpers (grids, strips, curves)
    "widgets": 0,         # ipywidgets apps; each slider is backed by a plain function
    "schedules": 1,       # beta schedules, forward process, prediction conversions
    "train": 2,           # the diffusion training objective (train/__init__.py)
    "samplers": 3,        # DDPM, DDIM, PLMS, Euler, Euler a, Heun, DPM-Solver++ 2M
    "weights": 4,         # reading safetensors / configs, strict loading with clear errors
    "vae": 4,             # AutoencoderKL
    "train.vae": 4,       # training the ShapesWorld VAE
    "unet": 5,            # the noise-predicting U-Net (used as a black box in 05, opened in 08)
    "tokenizer": 6,       # CLIP byte-level BPE
    "text": 7,            # CLIP text transformer (+ tiny contrastive CLIP)
    "train.clip": 7,      # training the ShapesWorld CLIP
    "train.unet": 8,      # training the ShapesWorld text-to-image U-Net
    "train.adherence": 10,  # evaluating the text-to-image model as readers use it (issue 15)
    "guidance": 9,        # classifier-free and classifier guidance
    "train.classifier": 9,  # training the noisy-latent classifier for classifier guidance
    "pipelines": 10,      # txt2img, img2img, inpaint, SDXL base + refiner
    "speed": 10,          # CPU speed tricks applied to loaded models (one switch)
    "prompts": 10,        # prompts as the web UIs read them: clip skip, long prompts, (word:1.2) emphasis
    "inpaint": 12,
    "train.sdxl": 13,     # the SDXL-type base and refiner on ShapesWorld: data, warm start, quality score, effects        # masks, latent blending, 9-channel inpainting, only-masked crop, outpainting
    "checkpoints": 15,    # loading real checkpoints: diffusers folders and single files
    "infotext": 15,       # generation parameters in a PNG, in the web UIs' layout (the command line)
    "adapters": 16,       # LoRA, textual inversion, hypernetworks: files readers trade, on ministd's networks
    "controlnet": 16,     # ControlNet: a trainable copy of the U-Net's down path, joined by zero convolutions
    "depth": 16,          # depth-to-image: SD 2-depth's fifth input channel, depth maps, depth2img
    "train.adapters": 16,  # training and measuring the book's embedding, LoRAs, hypernetwork, ControlNet, depth U-Net
}


def chapter_of(module: str) -> int:
    """Chapter that owns ``module`` ("ministd.vae", "vae" or "ministd.train.vae")."""
    name = module.removeprefix("ministd.").removeprefix("ministd")
    while name:
        if name in MODULE_CHAPTER:
            return MODULE_CHAPTER[name]
        name = name.rpartition(".")[0]
    if module in ("ministd", ""):
        return 0
    raise KeyError(f"module {module!r} has no owning chapter in ministd.MODULE_CHAPTER")


def load_pipeline(name_or_path: str = "shapes", **kwargs):
    """Load a pipeline ("shapes", "shapes-depth", a diffusers folder or a single file).

    ``ministd.pipelines.load_pipeline`` (chapter 10), imported on first use so that
    ``import ministd`` stays light for the chapters before it.
    """
    from ministd.pipelines import load_pipeline as _load

    return _load(name_or_path, **kwargs)


def load_controlnet(path_or_name, **kwargs):
    """Load a ControlNet (a diffusers folder, an original single file, or "shapes-edges").

    ``ministd.controlnet.load_controlnet`` (chapter 16), imported on first use.
    """
    from ministd.controlnet import load_controlnet as _load

    return _load(path_or_name, **kwargs)
