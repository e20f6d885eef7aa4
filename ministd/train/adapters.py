"""Train the book's small additions to the shipped text-to-image model (chapter 16).

    python -m ministd.train.adapters textual-inversion --out /work/runs/star      # the "<star>" word
    python -m ministd.train.adapters lora --out /work/runs/outline_lora --targets all --rank 8
    python -m ministd.train.adapters hypernetwork --out /work/runs/outline_hn     # the same style, A1111's way
    python -m ministd.train.adapters controlnet --out /work/runs/edges            # edges -> pictures
    python -m ministd.train.adapters depth --out /work/runs/depth                 # SD 2-depth's U-Net
    python -m ministd.train.adapters export --checkpoint /work/runs/outline_lora/last.pt   # into data/
    (data/README.md has the exact commands of the shipped files and what they printed)
    python -m ministd.train.adapters evaluate --json data/shapes_adapters_eval.json

Every run starts from ``ministd.load_pipeline("shapes")`` (U-Net, VAE and text
encoder frozen) and trains only its own few parameters with the denoising
objective of the base model (:func:`ministd.train.diffusion_loss`: SD's
schedule, epsilon prediction), on pictures it renders and encodes itself:

- **textual inversion** (Gal et al. 2022, sec. 3): one-object pictures of the
  star, the shape the base model never saw, with the word "star" of their
  captions replaced by the new token ``<star>``; only that token's row of the
  token-embedding table learns (started at the mean of the rows of "circle",
  "square" and "triangle": "some shape"); with ``--lora-rank r`` a LoRA on
  every U-Net layer learns beside it (pivotal tuning: the frozen U-Net cannot
  draw a shape it never learned, whatever its input says);
- **LoRA** (Hu et al. 2021) on the U-Net's attention projections or
  (``--targets all``, as shipped) on every Linear and Conv2d of it, and
- **a hypernetwork** (A1111's: MLPs before to_k / to_v), on the same
  pictures drawn in the "outlined" style (:func:`ministd.data.draw_scene`)
  with their ordinary captions: the style is learned without a trigger word,
  so it should show at scale (strength) 1 and not at 0 (measured: see below);
- **ControlNet** (Zhang et al. 2023, sec. 3): the trainable copy of the U-Net's
  encoder (:meth:`ministd.controlnet.ControlNetModel.from_unet`) learns from
  (picture, caption, :func:`ministd.data.edge_map` of the picture); half of
  the captions are replaced by "" so that the edges alone must say where
  things are (the paper's sec. 3.3 does the same);
- **the depth U-Net** (SD 2-depth): a copy of the whole U-Net with a fifth,
  zero-initialised input channel (:func:`ministd.depth.depth_unet`) is
  fine-tuned on (picture, caption, :func:`ministd.data.draw_depth` of the
  scene, prepared as the pipeline prepares it: :func:`ministd.depth.prepare_depth_map`).

Runs are resumable (``last.pt`` every ``--save-every`` steps; rerun the same
command), deterministic given ``--seed`` (batch k draws from a generator
seeded by (seed, k)), and run unchanged on a CUDA GPU (``--device``).

``evaluate`` measures each file in data/ as a reader uses it (the pipeline's
own sampler, 20 steps, guidance 7.5, held-out seeds and prompts of several
forms) with figures read off the pixels (:mod:`ministd.train.adherence`'s
object mask; no classifier trained on stars is needed):

- *star*: the object's solidity (its area over the area of its convex hull) is
  under STAR_SOLIDITY: a five-pointed star fills ~0.6 of its hull, a circle,
  square or triangle 0.85 or more; checked on ground-truth renders in the report;
- *colour*: the most common nearest palette colour of the object's pixels;
- *outlined*: the object's hollowness, the share of background-coloured
  pixels inside its outer boundary (filled ~0, outlined ~0.5);
- *edges obeyed*: the intersection over union of the drawn object's mask with
  the mask of the ground-truth picture whose edges were given;
- *depth obeyed*: the same IoU against the objects of the depth map given, for
  prompts that recolour the scene (is the new colour drawn too?), with the base
  model's txt2img and img2img as the comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ministd.schedules import NoiseSchedule
from ministd.train import diffusion_loss

DATA = Path(__file__).resolve().parents[2] / "data"
STAR_TOKEN = "<star>"
KINDS = ("textual-inversion", "lora", "hypernetwork", "controlnet", "depth")
SHIPPED_FILES = {"textual-inversion": DATA / "shapes_star_embedding.safetensors",
                 "lora": DATA / "shapes_outline_lora.safetensors",
                 "hypernetwork": DATA / "shapes_outline_hypernetwork.safetensors",
                 "controlnet": DATA / "shapes_edges_controlnet.safetensors",
                 "depth": DATA / "shapes_depth_unet.safetensors"}
TUNED_STAR_FILE = DATA / "shapes_star_tuned_embedding.safetensors"     # + shapes_star_tuned_lora.safetensors
TRAIN_SEEDS = {"textual-inversion": 3_000_017, "lora": 3_000_019, "hypernetwork": 3_000_019,
               "controlnet": 3_000_023, "depth": 3_000_029}
EVAL_SEED = 1_000_003          # the held-out world of ministd.train.unet (no model trained on it)
STAR_SOLIDITY = 0.75          # ground truth: stars 0.55-0.67, circles, squares, triangles 0.85-1.0
OUTLINED_HOLLOWNESS = 0.1     # ground truth: filled 0.0, outlined 0.99 above it (1- and 2-object scenes)
UNCOND_PROMPT = ""


# --------------------------------------------------------------------------- #
# Training examples
# --------------------------------------------------------------------------- #

@dataclass
class Examples:
    """Encoded training pictures: latent posterior mean / std [N, 4, h, w] (scaled), token ids
    [N, k, 77] (k captions per picture), and for ControlNet the control images [N, 3, H, W] in [0, 1]
    (uint8 0/1), for the depth U-Net its depth channel [N, 1, h, w] in [-1, 1]."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    input_ids: torch.Tensor
    controls: torch.Tensor | None = None


def star_captions(attrs: dict, rng: random.Random, k: int) -> list[str]:
    """``k`` captions of a star picture in random forms, the word "star" written as ``<star>``."""
    from ministd.train.unet import training_captions

    return [re.sub(r"\bstar\b", STAR_TOKEN, c) for c in training_captions(attrs, rng, k)]


def make_examples(pipe, kind: str, n: int, seed: int, captions_per_picture: int = 4,
                  batch_size: int = 64) -> Examples:
    """Render ``n`` pictures of ``ShapesWorld(seed)`` for ``kind``, encode them once with the VAE."""
    from ministd.data import ShapesWorld, draw_depth, draw_scene, edge_map, pil_to_tensor
    from ministd.depth import prepare_depth_map
    from ministd.train.unet import training_captions

    world = ShapesWorld(seed=seed, shapes=("star",)) if kind == "textual-inversion" else \
        ShapesWorld(seed=seed, objects=(1, 2))
    style = "outlined" if kind in ("lora", "hypernetwork") else "filled"
    write = star_captions if kind == "textual-inversion" else training_captions
    means, stds, controls, captions = [], [], [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            pictures, depths = [], []
            for i in range(start, min(n, start + batch_size)):
                attrs, jitter, _ = world.attributes(i)
                pictures.append(draw_scene(attrs, world.size, jitter, style=style))
                depths.append(draw_depth(attrs, world.size, jitter))
                captions += write(attrs, random.Random(f"adapter-captions:{seed}:{i}"), captions_per_picture)
            posterior = pipe.vae.encode(pil_to_tensor(pictures).to(pipe.device))
            means.append(pipe.vae.scale_latents(posterior.mean).cpu())
            stds.append((posterior.std * pipe.vae.scaling_factor).cpu())
            if kind == "controlnet":
                controls.append(pil_to_tensor([edge_map(p) for p in pictures]).add(1).div(2).to(torch.uint8))
            elif kind == "depth":
                controls.append(prepare_depth_map(np.stack(depths), tuple(means[-1].shape[-2:])))
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids
    return Examples(torch.cat(means), torch.cat(stds), ids.view(n, captions_per_picture, 77),
                    torch.cat(controls) if controls else None)


def draw_batch(examples: Examples, step: int, batch_size: int, seed: int, uncond_prob: float, uncond_ids):
    """Batch ``step``: (latents, ids, t, noise, controls or None), from a generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = examples.latent_mean.shape[0]
    idx = torch.randint(0, n, (batch_size,), generator=g)
    mean, std = examples.latent_mean[idx], examples.latent_std[idx]
    latents = mean + std * torch.randn(mean.shape, generator=g)          # z ~ q(z | x)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    noise = torch.randn(mean.shape, generator=g)
    ids = examples.input_ids[idx, torch.randint(0, examples.input_ids.shape[1], (batch_size,), generator=g)].clone()
    drop = torch.rand(batch_size, generator=g) < uncond_prob
    ids[drop] = uncond_ids
    controls = None if examples.controls is None else examples.controls[idx].float()
    return latents, ids, t, noise, controls


# --------------------------------------------------------------------------- #
# What each kind trains
# --------------------------------------------------------------------------- #

class Trainable:
    """What one kind of adapter adds to the frozen pipeline: its parameters, the model call
    the loss sees, and the tensors a checkpoint keeps."""

    def __init__(self, pipe, kind: str, args):
        from ministd import adapters

        self.pipe, self.kind = pipe, kind
        g = torch.Generator().manual_seed(args.seed)
        if kind == "textual-inversion":
            table = pipe.text_encoder.embeddings.token_embedding
            words = [pipe.tokenizer.encode(w)[1] for w in ("circle", "square", "triangle")]
            start = table.weight[words].detach().mean(0, keepdim=True).repeat(args.vectors, 1)
            adapters.load_textual_inversion(pipe, start, token=STAR_TOKEN)
            self.first = table.num_embeddings - args.vectors
            table.weight.requires_grad_(True)
            self.frozen_rows = table.weight.detach()[:self.first].clone()
            self.params = [table.weight]
            if getattr(args, "lora_rank", 0):        # the U-Net learns too: "pivotal tuning" (see the docstring)
                self.lora = adapters.new_lora(pipe, rank=args.lora_rank, alpha=args.lora_rank, targets=None,
                                              name="star", generator=g)
                adapters.add_lora(pipe, self.lora)
                self.params += self._lora_params()
        elif kind == "lora":
            targets = None if getattr(args, "targets", "attention") == "all" else adapters.ATTENTION_PROJECTIONS
            self.lora = adapters.new_lora(pipe, rank=args.rank, alpha=args.rank, targets=targets, name="outline",
                                          generator=g)
            adapters.add_lora(pipe, self.lora)
            self.params = self._lora_params()
        elif kind == "hypernetwork":
            widths = sorted({m.to_k.in_features for m in pipe.unet.modules() if isinstance(m, adapters.Attention)})
            # A1111's usual choice: w -> 2w -> w, ReLU between (not after the last layer)
            options = adapters.HypernetworkOptions(layer_structure=[1, 2, 1], activation_func="relu",
                                                   activate_output=False)
            self.hypernetwork = adapters.Hypernetwork(widths, options, name="outline").init_weights(generator=g)
            adapters.add_hypernetwork(pipe, self.hypernetwork)
            self.params = list(self.hypernetwork.parameters())
            self.hypernetwork.requires_grad_(True).train()
        elif kind == "controlnet":
            from ministd.controlnet import ControlNetModel

            widths = tuple(16 * 2 ** i for i in range(int(np.log2(pipe.vae.downsampling_factor)) + 1))
            with torch.random.fork_rng():                 # the condition encoder's initial weights, from --seed
                torch.manual_seed(args.seed)
                self.controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=widths)
            self.controlnet.to(pipe.device).train()
            self.params = list(self.controlnet.parameters())
        elif kind == "depth":                             # the whole U-Net learns, from the base's weights
            from ministd.depth import depth_unet

            self.unet = depth_unet(pipe.unet).train().requires_grad_(True)
            self.params = list(self.unet.parameters())
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def _lora_params(self) -> list[torch.Tensor]:
        params = [p for layer in self.lora.layers.values() for p in (layer.down, layer.up)]
        for p in params:
            p.requires_grad_(True)
        return params

    def model(self, controls):
        """The callable the loss sees: (x_t, t, encoder_hidden_states) -> predicted noise."""
        unet = self.pipe.unet
        if self.kind == "depth":
            from ministd.depth import with_depth

            return with_depth(self.unet, controls)
        if self.kind != "controlnet":
            return unet

        def steered(x_t, t, encoder_hidden_states):
            down, mid = self.controlnet(x_t, t, encoder_hidden_states, controls)
            return unet(x_t, t, encoder_hidden_states, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)
        return steered

    def after_step(self) -> None:
        if self.kind == "textual-inversion":          # only the new rows may move
            with torch.no_grad():
                self.pipe.text_encoder.embeddings.token_embedding.weight[:self.first] = self.frozen_rows

    def zero_frozen_grads(self) -> None:
        if self.kind == "textual-inversion":
            self.params[0].grad[:self.first] = 0

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, by name (what a checkpoint and an export keep)."""
        if self.kind in ("textual-inversion", "lora") and hasattr(self, "lora"):
            lora = {f"{t}.{part}": getattr(layer, part).detach().clone()
                    for t, layer in self.lora.layers.items() for part in ("down", "up")}
        if self.kind == "textual-inversion":
            rows = {"vectors": self.params[0].detach()[self.first:].clone()}
            return rows | {"lora." + k: v for k, v in lora.items()} if hasattr(self, "lora") else rows
        if self.kind == "lora":
            return lora
        return {k: v.detach().clone() for k, v in self._module().state_dict().items()}

    def _module(self) -> torch.nn.Module:
        return {"hypernetwork": getattr(self, "hypernetwork", None), "controlnet": getattr(self, "controlnet", None),
                "depth": getattr(self, "unet", None)}[self.kind]

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        if self.kind == "textual-inversion":
            self.params[0][self.first:] = state["vectors"]
        prefix = "lora." if self.kind == "textual-inversion" else ""
        if hasattr(self, "lora"):
            for t, layer in self.lora.layers.items():
                layer.down.copy_(state[f"{prefix}{t}.down"])
                layer.up.copy_(state[f"{prefix}{t}.up"])
        if self.kind in ("textual-inversion", "lora"):
            return
        self._module().load_state_dict(state)


def base_pipeline(device: str | None = None):
    """The shipped text-to-image pipeline in float32, every network frozen."""
    import ministd

    pipe = ministd.load_pipeline("shapes", device=device)
    pipe.progress_bar = False
    for net in (pipe.unet, pipe.vae, pipe.text_encoder):
        net.eval().requires_grad_(False)
    return pipe


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #

def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then constant (the small runs of the web UIs' trainers)."""
    return peak * min(1.0, (step + 1) / max(1, warmup))


def settings(args) -> dict:
    """The command-line settings of a run, as JSON-able values."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def train(args) -> None:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "last.pt"
    pipe = base_pipeline(args.device)
    trainable = Trainable(pipe, args.kind, args)
    optimizer = torch.optim.AdamW(trainable.params, lr=args.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        kept = ("kind", "seed", "n", "batch_size", "lr", "warmup", "rank", "targets", "vectors", "lora_rank")   # --steps may grow
        if any(k in state["args"] and state["args"][k] != settings(args).get(k) for k in kept):   # older runs lack some
            sys.exit(f"{ckpt} was written with other settings; use another --out or the same arguments")
        trainable.load(state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resuming from step {step} ({elapsed / 60:.1f} min trained so far)", flush=True)
    t0 = time.time()
    examples = make_examples(pipe, args.kind, args.n, TRAIN_SEEDS[args.kind] + args.seed)
    print(f"{args.n} training pictures encoded in {time.time() - t0:.0f} s", flush=True)
    uncond_ids = pipe.tokenizer([UNCOND_PROMPT], padding="max_length", max_length=77).input_ids[0]
    schedule = NoiseSchedule()
    log = open(out / "log.txt", "a")
    (out / "args.json").write_text(json.dumps(settings(args), indent=2))

    def checkpoint(at: int) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"trained": trainable.state(), "optimizer": optimizer.state_dict(), "step": at,
                    "elapsed": elapsed + time.time() - t0, "args": settings(args)}, tmp)
        tmp.replace(ckpt)

    t0 = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=args.kind, mininterval=10)
    while step < args.steps:
        latents, ids, t, noise, controls = (None if x is None else x.to(pipe.device) for x in
                                            draw_batch(examples, step, args.batch_size, args.seed,
                                                       args.uncond_prob, uncond_ids))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        states = pipe.text_encoder(ids).last_hidden_state
        loss = diffusion_loss(trainable.model(controls), latents, schedule, t=t, noise=noise,
                              encoder_hidden_states=states)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainable.zero_frozen_grads()
        torch.nn.utils.clip_grad_norm_(trainable.params, 1.0)
        optimizer.step()
        trainable.after_step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0:
            log.write(json.dumps({"step": step, "loss": loss.item(), "time": elapsed + time.time() - t0}) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            checkpoint(step)
    bar.close()
    print(f"at step {step}: {(elapsed + time.time() - t0) / 60:.1f} min of training", flush=True)


# --------------------------------------------------------------------------- #
# Export: the files readers' tools read
# --------------------------------------------------------------------------- #

def star_lora_file(embedding: Path) -> Path:
    """Where the U-Net LoRA trained with an embedding goes: beside it, ``<stem>_lora.safetensors``."""
    return embedding.with_name(embedding.stem.removesuffix("_embedding") + "_lora.safetensors")


def export(args) -> Path:
    """Write a checkpoint's adapter in the layout its kind is traded in (float16 unless said)."""
    from ministd import adapters
    from ministd.weights import write_safetensors

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    kind, trained_args = state["args"]["kind"], argparse.Namespace(**state["args"])
    out = Path(args.out or SHIPPED_FILES[kind])
    dtype = torch.float32 if kind == "textual-inversion" else torch.float16
    pipe = base_pipeline("cpu")
    trainable = Trainable(pipe, kind, trained_args)
    trainable.load(state["trained"])
    if kind == "textual-inversion":                  # diffusers' learned_embeds layout: {token: [n, D]}
        write_safetensors(out, {STAR_TOKEN: state["trained"]["vectors"]}, dtype=dtype)
        if hasattr(trainable, "lora"):               # and the U-Net's part beside it, kohya's layout
            adapters.save_lora(pipe, trainable.lora, star_lora_file(out), dtype=torch.float16)
            print(f"wrote {star_lora_file(out)}")
    elif kind == "lora":
        adapters.save_lora(pipe, trainable.lora, out, dtype=dtype)
    elif kind == "hypernetwork":
        adapters.save_hypernetwork(trainable.hypernetwork, out, dtype=dtype)
    elif kind == "controlnet":                       # the book's pair name.safetensors + name.json
        trainable.controlnet.save(out, dtype=dtype)
    else:                                            # a whole U-Net, as the base model's pair
        from ministd.train.unet import SHIPPED_SCHEDULER

        trainable.unet.save(out, dtype=dtype, extra_config={
            "_scheduler": SHIPPED_SCHEDULER,
            "_ministd": {"trained_steps": state["step"], "training_minutes": round(state["elapsed"] / 60, 1),
                         "training_args": state["args"], "fine_tuned_from": "shapes_unet"}})
    print(f"wrote {out} ({out.stat().st_size:,} bytes) from step {state['step']}")
    return out


# --------------------------------------------------------------------------- #
# Measuring what the files do
# --------------------------------------------------------------------------- #

def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points [N, 2] (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def main_object(picture: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of object pixels, as a mask [H, W] (all False if none)."""
    from ministd.train.adherence import label_regions, object_mask

    labels, n = label_regions(object_mask(picture))
    if n == 0:
        return np.zeros(picture.shape[:2], dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(sizes.argmax())


def filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: everything not reachable from the border outside it."""
    from ministd.train.adherence import label_regions

    labels, _ = label_regions(~mask)
    border = set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist()) - {0}
    return mask | ~np.isin(labels, list(border))


def solidity(picture: np.ndarray) -> float:
    """Area of the main object (holes filled) over the area of its convex hull (pixel squares' corners)."""
    mask = filled(main_object(picture))
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return float("nan")
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return float(mask.sum() / max(convex_hull_area(corners), 1.0))


def hollowness(picture: np.ndarray) -> float:
    """Share of the main object's filled area that is not object pixels (filled ~0, outlined ~0.5)."""
    mask = main_object(picture)
    area = filled(mask).sum()
    return float(1 - mask.sum() / area) if area else float("nan")


def object_color(picture: np.ndarray) -> str | None:
    """The most common nearest palette colour of the main object's pixels."""
    from ministd.data import COLORS
    from ministd.train.adherence import palette_distances

    mask = main_object(picture)
    if not mask.any():
        return None
    return COLORS[int(np.bincount(palette_distances(picture[mask]).argmin(-1), minlength=len(COLORS)).argmax())]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, batch: int = 32,
              **kwargs) -> list[np.ndarray]:
    """Pictures (uint8 [64, 64, 3]) for prompts, prompt i from seed seeds[i], as a reader gets them."""
    out = []
    for s in range(0, len(prompts), batch):
        latents = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
                             for seed in seeds[s:s + batch]])
        extra = {k: (v[s:s + batch] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        result = pipe.txt2img(prompts[s:s + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                              latents=latents, **extra)
        out += [np.asarray(im.convert("RGB")) for im in result.images]
    return out


def star_prompts(n: int, seed: int = EVAL_SEED) -> list[tuple[str, str]]:
    """(prompt with the word STAR, asked colour): colour, background and form drawn per prompt."""
    from ministd.data import COLORS, POSITIONS, _fix_articles

    forms = ("a {c} STAR on a {b} background", "{c} STAR", "a {c} STAR", "a large {c} STAR on a {b} background",
             "{c} STAR, {b} background", "a small {c} STAR in the {p}", "a {b} background with a {c} STAR",
             "a {c} STAR in the center against a {b} background")
    rng = random.Random(f"star-prompts:{seed}")
    out = []
    for i in range(n):
        c, b = rng.sample(COLORS, 2)
        p = rng.choice([q for q in POSITIONS if q != "center"])
        out.append((_fix_articles(forms[i % len(forms)].format(c=c, b=b, p=p)), c))
    return out


def _uint8(pictures) -> list[np.ndarray]:
    return [np.asarray(p.convert("RGB") if hasattr(p, "convert") else p) for p in pictures]


def evaluate_star(path: Path, tuned: Path | None, n: int, steps: int, guidance_scale: float) -> dict:
    """How often "<star>" draws a star in the asked colour: the plain word "star" on the base
    model, the embedding alone (``path``), and an embedding trained with a U-Net LoRA (``tuned``,
    its LoRA beside it: :func:`star_lora_file`), each on a fresh pipeline."""
    from ministd.data import ShapesWorld

    prompts = star_prompts(n)
    seeds = [EVAL_SEED + i for i in range(n)]
    truth = ShapesWorld(seed=EVAL_SEED, shapes=("circle", "square", "triangle", "star"))
    gt = [(truth[i][0], truth[i][2]["objects"][0]["shape"]) for i in range(400)]
    gt_star = [solidity(np.asarray(p)) < STAR_SOLIDITY for p, _ in gt]
    result = {"n": n, "steps": steps, "guidance_scale": guidance_scale, "star_solidity_below": STAR_SOLIDITY,
              "ground_truth_star_recall": float(np.mean([s for s, (_, sh) in zip(gt_star, gt) if sh == "star"])),
              "ground_truth_false_star": float(np.mean([s for s, (_, sh) in zip(gt_star, gt) if sh != "star"]))}
    variants = [("base_word_star", None, "star"), ("embedding", path, STAR_TOKEN)]
    if tuned is not None and tuned.is_file():
        variants.append(("embedding_and_lora", tuned, STAR_TOKEN))
    for label, embedding, word in variants:
        pipe = base_pipeline("cpu")
        if embedding is not None:
            pipe.load_textual_inversion(embedding)
        if label == "embedding_and_lora":
            pipe.load_lora(star_lora_file(embedding))
        pictures = _generate(pipe, [p.replace("STAR", word) for p, _ in prompts], seeds, steps, guidance_scale)
        stars = [solidity(p) < STAR_SOLIDITY for p in pictures]
        colors = [object_color(p) == c for p, (_, c) in zip(pictures, prompts)]
        result[label] = {"star": float(np.mean(stars)), "color": float(np.mean(colors)),
                         "star_and_color": float(np.mean([a and b for a, b in zip(stars, colors)])),
                         "mean_solidity": float(np.nanmean([solidity(p) for p in pictures]))}
    return result


def style_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    from ministd.train.adherence import make_prompts

    return [p.text for p in make_prompts(n, seed=seed)]


def evaluate_style(pipe, kind: str, path: Path, n: int, steps: int, guidance_scale: float,
                   scales=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Hollowness of the pictures at each LoRA scale / hypernetwork strength, and colour kept."""
    from ministd.data import ShapesWorld, draw_scene

    prompts = [p for p in style_prompts(4 * n) if " and " not in p][:n]
    seeds = [EVAL_SEED + i for i in range(n)]
    world = ShapesWorld(seed=EVAL_SEED)
    reference = {style: float(np.nanmean([hollowness(np.asarray(draw_scene(world.attributes(i)[0], style=style)))
                                          for i in range(200)])) for style in ("filled", "outlined")}
    result = {"n": n, "steps": steps, "guidance_scale": guidance_scale, "ground_truth_hollowness": reference,
              "by_scale": {}}
    if kind == "lora":
        name = pipe.load_lora(path, scale=0.0)
    else:
        network = pipe.load_hypernetwork(path, strength=0.0)
    for scale in scales:
        if kind == "lora":
            pipe.set_lora_scale(name, scale)
        else:
            network.strength = scale
        pictures = _generate(pipe, prompts, seeds, steps, guidance_scale)
        values = [hollowness(p) for p in pictures]
        result["by_scale"][str(scale)] = {"hollowness": float(np.nanmean(values)),
                                          "outlined": float(np.mean([v > OUTLINED_HOLLOWNESS for v in values]))}
    if kind == "lora":
        pipe.unload_lora()
    else:
        pipe.unload_hypernetwork()
    return result


def evaluate_controlnet(pipe, path: Path, n: int, steps: int, guidance_scale: float) -> dict:
    """IoU of the drawn object with the object whose edges were given, with and without the ControlNet."""
    import ministd
    from ministd.data import ShapesWorld, edge_map, pil_to_tensor
    from ministd.train.adherence import object_mask

    world = ShapesWorld(seed=EVAL_SEED + 7, objects=(1, 2))
    pictures, captions = zip(*[(world[i][0], world[i][1]) for i in range(n)])
    controls = pil_to_tensor([edge_map(p) for p in pictures]).add(1).div(2)
    truth = [object_mask(np.asarray(p)) for p in pictures]
    seeds = [EVAL_SEED + i for i in range(n)]
    controlnet = ministd.load_controlnet(path)
    result = {"n": n, "steps": steps, "guidance_scale": guidance_scale}
    for label, kwargs in (("caption_only", {}), ("controlnet", {"controlnet": controlnet, "control_image": controls}),
                          ("controlnet_empty_prompt", {"controlnet": controlnet, "control_image": controls})):
        texts = list(captions) if label != "controlnet_empty_prompt" else [""] * n
        drawn = _generate(pipe, texts, seeds, steps, guidance_scale, **kwargs)
        ious = [iou(object_mask(d), m) for d, m in zip(drawn, truth)]
        result[label] = {"mean_iou": float(np.mean(ious)), "median_iou": float(np.median(ious)),
                         "share_iou_above_0.5": float(np.mean([v > 0.5 for v in ious]))}
    return result


def recoloured(attrs: dict, rng: random.Random) -> dict:
    """The same scene (shapes, sizes, places) in new colours, none of them the old ones where
    the palette allows: what a reader asks depth-to-image for ("keep the layout, change the rest")."""
    from ministd.data import COLORS

    old = {attrs["background"], *(o["color"] for o in attrs["objects"])}
    colors = rng.sample([c for c in COLORS if c not in old], len(attrs["objects"]) + 1)
    return {"background": colors[-1], "objects": [o | {"color": c} for o, c in zip(attrs["objects"], colors)]}


def depth_scenes(n: int, seed: int = EVAL_SEED + 11) -> list[dict]:
    """Held-out one- and two-object scenes: the picture, its depth map, a recolouring caption
    (any form) and the recoloured ground truth with the objects' mask."""
    from ministd.data import ShapesWorld, draw_depth, draw_scene, write_caption
    from ministd.train.adherence import object_mask

    world, out = ShapesWorld(seed=seed, objects=(1, 2)), []
    for i in range(n):
        attrs, jitter, _ = world.attributes(i)
        rng = random.Random(f"depth-eval:{seed}:{i}")
        new = recoloured(attrs, rng)
        truth = draw_scene(new, world.size, jitter)
        out.append({"picture": draw_scene(attrs, world.size, jitter), "depth": draw_depth(attrs, world.size, jitter),
                    "prompt": write_caption(new, rng)[0], "color": new["objects"][0]["color"],
                    "one_object": len(attrs["objects"]) == 1, "mask": object_mask(np.asarray(truth))})
    return out


def evaluate_depth(path: Path, n: int, steps: int, guidance_scale: float, strength: float = 0.8,
                   batch: int = 32) -> dict:
    """Do the drawn objects sit where the depth map puts them? IoU of the drawn objects' mask with the
    depth map's objects, and whether the asked (new) colour was drawn (one-object scenes), for the
    depth U-Net at the pipeline's default strength and at 1 (depth and prompt only), with the depth
    read off the picture (:func:`ministd.depth.estimate_depth`), and for the base model's txt2img
    (the caption's words only) and img2img at the same strength."""
    from ministd.train.adherence import object_mask
    from ministd.unet import UNet

    scenes = depth_scenes(n)
    base, depth_pipe = base_pipeline("cpu"), base_pipeline("cpu")
    depth_pipe.unet = UNet.load(path).eval()
    runs = {"base_txt2img": lambda s, g: base.txt2img([x["prompt"] for x in s], num_inference_steps=steps,
                                                      guidance_scale=guidance_scale, generator=g),
            f"base_img2img_{strength}": lambda s, g: base.img2img(
                [x["prompt"] for x in s], [x["picture"] for x in s], strength=strength,
                num_inference_steps=steps, guidance_scale=guidance_scale, generator=g)}
    for label, kwargs in ((f"depth2img_{strength}", {"strength": strength}), ("depth2img_1.0", {"strength": 1.0}),
                          (f"depth2img_{strength}_estimated_depth", {"strength": strength, "estimate": True})):
        def run(s, g, kwargs=kwargs):
            depth = None if kwargs.get("estimate") else np.stack([x["depth"] for x in s])
            return depth_pipe.depth2img([x["prompt"] for x in s], [x["picture"] for x in s], depth_map=depth,
                                        strength=kwargs["strength"], num_inference_steps=steps,
                                        guidance_scale=guidance_scale, generator=g)
        runs[label] = run
    result = {"n": n, "steps": steps, "guidance_scale": guidance_scale,
              "one_object_scenes": sum(x["one_object"] for x in scenes)}
    for label, run in runs.items():
        drawn = []
        for k in range(0, n, batch):
            drawn += _uint8(run(scenes[k:k + batch], torch.Generator().manual_seed(EVAL_SEED + k)).images)
        ious = [iou(object_mask(d), x["mask"]) for d, x in zip(drawn, scenes)]
        colors = [object_color(d) == x["color"] for d, x in zip(drawn, scenes) if x["one_object"]]
        result[label] = {"mean_iou": float(np.mean(ious)), "share_iou_above_0.5": float(np.mean([v > 0.5 for v in ious])),
                         "new_color": float(np.mean(colors))}
    return result


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = base_pipeline("cpu")
    report, t0 = {}, time.time()
    kinds = [k for k in args.kinds.split(",")]
    for kind in kinds:
        path = SHIPPED_FILES[kind] if kind not in args.files else Path(args.files[kind])
        if kind == "textual-inversion":
            tuned = Path(args.files.get("star-tuned", TUNED_STAR_FILE))
            report["textual_inversion"] = evaluate_star(path, tuned, args.n, args.steps, args.guidance_scale)
        elif kind in ("lora", "hypernetwork"):
            report[kind] = evaluate_style(pipe, kind, path, args.n, args.steps, args.guidance_scale)
        elif kind == "controlnet":
            report["controlnet"] = evaluate_controlnet(pipe, path, args.n, args.steps, args.guidance_scale)
        else:
            report["depth"] = evaluate_depth(path, args.n, args.steps, args.guidance_scale)
        print(json.dumps({kind: report[kind.replace("-", "_")]}, indent=1), flush=True)
    report["seconds"] = round(time.time() - t0)
    if args.json:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        Path(args.json).write_text(json.dumps({**old, **report}, indent=1) + "\n")
    return report


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

DEFAULTS = {  # kind -> (steps, batch size, lr, pictures, caption dropout)
    "textual-inversion": (400, 16, 5e-3, 64, 0.0),
    "lora": (800, 32, 1e-3, 2000, 0.1),
    "hypernetwork": (800, 32, 1e-3, 2000, 0.1),
    "controlnet": (2500, 32, 2e-4, 5000, 0.5),
    "depth": (3000, 32, 2e-4, 10000, 0.1),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ministd.train.adapters", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in KINDS:
        steps, batch, lr, n, uncond = DEFAULTS[kind]
        p = sub.add_parser(kind, help=f"train the {kind} of chapter 16")
        p.set_defaults(kind=kind, func=train)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch-size", type=int, default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--warmup", type=int, default=20)
        p.add_argument("--n", type=int, default=n, help="training pictures rendered")
        p.add_argument("--uncond-prob", type=float, default=uncond)
        p.add_argument("--rank", type=int, default=4, help="LoRA rank")
        p.add_argument("--targets", choices=("attention", "all"), default="attention",
                       help="LoRA: the attention projections only, or every Linear and Conv2d of the U-Net")
        p.add_argument("--vectors", type=int, default=1, help="textual-inversion vectors")
        p.add_argument("--lora-rank", type=int, default=0,
                       help="textual inversion: also train a LoRA of this rank on every U-Net layer")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--save-every", type=int, default=50)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--device", default=None)
    p = sub.add_parser("export", help="write a checkpoint's adapter file (into data/ by default)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None)
    p.set_defaults(func=export)
    p = sub.add_parser("evaluate", help="measure the shipped files")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--file", action="append", default=[], metavar="KIND=PATH")
    p.set_defaults(func=evaluate)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        args.files = dict(f.split("=", 1) for f in args.file)
    args.func(args)


if __name__ == "__main__":
    main()
