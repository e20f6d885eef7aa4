"""Plotting helpers shared by the chapters (matplotlib).

Each returns the matplotlib Figure it drew, so a chapter can show it, a test
can inspect it, and the rendered book gets a static picture.
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image


def _as_array(image) -> np.ndarray:
    """PIL image, [3,H,W] tensor in [-1, 1] or HxW(x3) array -> array for imshow."""
    if isinstance(image, Image.Image):
        return np.asarray(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
            return t.squeeze(-1).numpy() if t.shape[-1] == 1 else t.numpy()
        return t.numpy()
    return np.asarray(image)


def show_images(images: Sequence, titles: Sequence[str] | None = None, cols: int | None = None,
                size: float = 2.0, suptitle: str | None = None, cmap: str | None = None,
                wrap: int = 28) -> plt.Figure:
    """Show pictures in a grid with optional titles (wrapped to ``wrap`` characters)."""
    images = list(images)
    if not images:
        raise ValueError("images must not be empty")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles has {len(titles)} entries for {len(images)} images")
    cols = cols or min(len(images), 6)
    rows = math.ceil(len(images) / cols)
    title_lines = 0
    if titles is not None:
        title_lines = max(len(_wrap(t, wrap).splitlines()) for t in titles)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * (size + 0.18 * title_lines)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, image in enumerate(images):
        ax = axes.flat[k]
        ax.imshow(_as_array(image), cmap=cmap, interpolation="nearest")
        if titles is not None:
            ax.set_title(_wrap(titles[k], wrap), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    """Break ``text`` into lines of at most ``width`` characters at spaces; the line
    breaks already in it stay."""
    out = []
    for paragraph in str(text).split("\n"):
        lines, line = [], ""
        for word in paragraph.split():
            if len(line) + len(word) + 1 > width and line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        out += [*lines, line]
    return "\n".join(out)


def pipeline_diagram() -> plt.Figure:
    """Boxes and arrows: prompt -> tokenizer -> text encoder -> U-Net loop -> VAE decoder -> picture."""
    steps = [("prompt", "#eeeeee"), ("tokenizer\n(ch. 06)", "#cfe2f3"), ("text encoder\n(ch. 07)", "#cfe2f3"),
             ("U-Net × N steps\n+ sampler, CFG\n(ch. 03, 08, 09)", "#f9cb9c"),
             ("VAE decoder\n(ch. 04)", "#d9ead3"), ("picture", "#eeeeee")]
    fig, ax = plt.subplots(figsize=(11, 2.2))
    ax.set_xlim(0, len(steps) * 2)
    ax.set_ylim(0, 2)
    ax.axis("off")
    for k, (label, colour) in enumerate(steps):
        x = k * 2 + 0.1
        ax.add_patch(plt.Rectangle((x, 0.5), 1.6, 1.0, facecolor=colour, edgecolor="black"))
        ax.text(x + 0.8, 1.0, label, ha="center", va="center", fontsize=9)
        if k:
            ax.annotate("", xy=(x, 1.0), xytext=(x - 0.4, 1.0), arrowprops=dict(arrowstyle="->"))
    ax.text(7.0, 0.2, "noise (latents) goes in here, and is denoised step by step", ha="center", fontsize=8)
    ax.annotate("", xy=(7.0, 0.5), xytext=(7.0, 0.3), arrowprops=dict(arrowstyle="->"))
    fig.tight_layout()
    return fig
