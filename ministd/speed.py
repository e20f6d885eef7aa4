"""How fast, and why (chapter 10): every CPU speed trick of ministd, in one place, behind one switch.

The network modules (``ministd.vae``, ``ministd.unet``) are plain PyTorch, written
to be read. This module makes a *loaded* model faster for inference without
changing its weights, its parameter names or (beyond float rounding) its
outputs, by swapping the class of some submodules for a subclass with a
faster ``forward``:

- every ``nn.Conv2d`` -> :class:`FastConv2d`: a small feature map goes through
  whichever of PyTorch's two CPU convolution kernels is faster *for that layer on
  this machine*, measured once (see below);
- ResNet blocks of the U-Net and the VAE -> in-place SiLU on the fresh GroupNorm
  output, and residual sums into the convolution's fresh output (fewer
  feature-map-sized buffers);
- GEGLU -> the gate's product written into GELU's fresh output.

The in-place forms run only when no gradient is recorded
(``torch.is_grad_enabled()`` false); with autograd on, each fast module runs the
plain ``forward`` it inherits, so training through an optimised model is exact.

``optimize(model)`` applies all of it (the pipelines call it when they load a
model), ``restore(model)`` undoes it, and ``MINISTD_SPEED=0`` in the environment
(or ``load_pipeline(..., optimize=False)``) keeps the plain modules.

**Why the convolution choice is measured, not a rule.** PyTorch's default CPU
convolution (oneDNN) re-lays each weight out into a blocked format on every
call; ``aten::thnn_conv2d`` unfolds the patches (im2col) and does one GEMM with
the weight as stored. Which is faster depends on the layer *and the CPU*: on
an Intel Xeon with AMX im2col won for every layer of SD 1.5 on maps of <= 512
positions (batch x height x width); on an AMD EPYC (AVX-512 BF16, no AMX; 32 MB
L3) it won only where the weight is larger than the cache (1280 -> 1280 x 3 x 3 is
59 MB in float32: 0.45x oneDNN's time on 4x4 maps) and lost 1.1-2x on every
640-channel layer (benchmarks/RESULTS.md). A fixed threshold that helps one
machine slows the other, so :class:`FastConv2d` times both kernels the first
time it meets a (layer shape, input shape, dtype) on a small map (best of three
alternating calls each) and remembers the faster one for the process
(:data:`CHOICES`); im2col must be at least 10% faster, so a near tie keeps
``nn.Conv2d``'s own kernel. Large maps always keep
oneDNN: there the re-layout is a small part of the work.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ministd import unet as _unet
from ministd import vae as _vae

# Maps with at most this many positions (batch * height * width) are candidates for
# im2col; above it oneDNN was faster for every layer measured on both CPUs.
MAX_IM2COL_POSITIONS = 1024
KERNELS = ("onednn", "im2col")
IM2COL_MARGIN = 0.9      # im2col must take under 90% of oneDNN's time to be chosen

# (weight shape, stride, padding, input shape, dtype) -> "onednn" | "im2col", per process
CHOICES: dict[tuple, str] = {}
_forced: str | None = None


def enabled_by_default() -> bool:
    """False when the environment says ``MINISTD_SPEED=0`` (plain modules everywhere)."""
    return os.environ.get("MINISTD_SPEED", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def force_kernel(kernel: str | None) -> Iterator[None]:
    """Within the block every eligible :class:`FastConv2d` uses ``kernel`` ("onednn" or
    "im2col"; None: measure as usual). Tests use it to check both paths compute the same."""
    global _forced
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    before, _forced = _forced, kernel
    try:
        yield
    finally:
        _forced = before


def _fastest_seconds(a, b, repeats: int = 3) -> tuple[float, float]:
    """Best time of ``a`` and of ``b`` over ``repeats`` alternating calls each, after one warm-up
    call each: the minimum, because another process can only make a call slower."""
    a(), b()                                 # the first calls pay for allocation
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], best[1]


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, in CPU inference on small maps, runs the kernel measured faster here."""

    def _eligible(self, x: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in (torch.float32, torch.bfloat16)
                and x.shape[0] * x.shape[2] * x.shape[3] <= MAX_IM2COL_POSITIONS
                and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple))

    def _im2col(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.thnn_conv2d(x, self.weight, self.kernel_size, self.bias, self.stride, self.padding)

    def _choose(self, x: torch.Tensor) -> str:
        if _forced is not None:
            return _forced
        key = (tuple(self.weight.shape), self.stride, self.padding, tuple(x.shape), x.dtype)
        if key not in CHOICES:
            onednn, im2col = _fastest_seconds(lambda: F.conv2d(x, self.weight, self.bias, self.stride, self.padding),
                                              lambda: self._im2col(x))
            # nn.Conv2d's own kernel unless im2col is clearly faster: a near tie is not worth a change
            CHOICES[key] = "im2col" if im2col < IM2COL_MARGIN * onednn else "onednn"
        return CHOICES[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._eligible(x) and self._choose(x) == "im2col":
            return self._im2col(x)
        return super().forward(x)


class FastUNetResnetBlock(_unet.ResnetBlock):
    """:class:`ministd.unet.ResnetBlock` with in-place SiLU and residual sums in inference."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x, temb)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))     # GroupNorm's output is fresh
        h += self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class FastVAEResnetBlock(_vae.ResnetBlock):
    """:class:`ministd.vae.ResnetBlock` with in-place SiLU and residual sum in inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class FastGEGLU(_unet.GEGLU):
    """:class:`ministd.unet.GEGLU` writing a * GELU(g) into GELU's fresh output in inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)


# plain class -> its fast subclass (exact types: a subclass of these stays as it is)
FAST: dict[type, type] = {nn.Conv2d: FastConv2d, _unet.ResnetBlock: FastUNetResnetBlock,
                          _vae.ResnetBlock: FastVAEResnetBlock, _unet.GEGLU: FastGEGLU}
PLAIN: dict[type, type] = {fast: plain for plain, fast in FAST.items()}


def optimize(model: nn.Module) -> nn.Module:
    """Swap the submodules of ``model`` (in place) for their fast forms; returns ``model``.

    Only classes change: parameters, buffers, names and ``state_dict`` stay the same.
    """
    for module in model.modules():
        fast = FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: every fast submodule gets its plain class back."""
    for module in model.modules():
        plain = PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
    return model


def is_optimized(model: nn.Module) -> bool:
    return any(type(m) in PLAIN for m in model.modules())
