"""Train and export the book's text-to-image U-Net on ShapesWorld latents (chapter 08).

    python -m ministd.train.unet prepare --vae data/shapes_vae.safetensors --out /work/runs/unet/cache.pt
    python -m ministd.train.unet train --cache /work/runs/unet/cache.pt --clip data/shapes_clip.safetensors \\
        --out /work/runs/unet --steps 3000
    torchrun --nproc_per_node=N -m ministd.train.unet train ...     # several GPUs (or CPU processes)
    python -m ministd.train.unet judge --out /work/runs/unet/judge.pt
    python -m ministd.train.unet export-judge --judge /work/runs/unet/judge.pt --out data/shapes_judge.safetensors
    python -m ministd.train.unet evaluate --checkpoint /work/runs/unet/last.pt   # or no option: the shipped model
    python -m ministd.train.unet export --checkpoint /work/runs/unet/last.pt --out data/shapes_unet.safetensors

This is latent diffusion as in the LDM paper (Rombach et al. 2022, sec. 3.3):
pictures are encoded once by the frozen ShapesWorld VAE (``prepare``), and the
U-Net learns to predict the noise added to their (scaled) latents, given the
caption's token states from the frozen tiny CLIP text encoder (cross-attention,
sec. 3.3 eq. 3). The objective is :func:`ministd.train.diffusion_loss` with SD's
noise schedule (scaled_linear, 1000 steps) and epsilon prediction, optionally
weighted per timestep by min-SNR-gamma (Hang et al. 2023; ``--weighting min_snr``).

Classifier-free guidance (Ho & Salimans 2022) needs one network that also
knows the *unconditional* score: 10% of the captions are replaced by the empty
prompt "" during training (``--uncond-prob``), which is what the pipelines feed
as the negative/unconditional prompt.

Reproducible and resumable:

- the latent cache holds pictures 0 .. n-1 of ``ShapesWorld(seed)`` (posterior
  mean and std of each, scaled; captions and token ids);
- step k reads the global batch k*B .. (k+1)*B-1 of a per-epoch permutation
  seeded by (seed, epoch), and draws its timesteps, noise, posterior noise and
  caption drops from a generator seeded by (seed, k) for the *whole* batch;
  with ``torchrun`` each of the W processes then takes its B/W slice, so any
  number of processes trains the same model up to float rounding
  (DistributedDataParallel averages the gradients);
- a checkpoint (U-Net, EMA copy, optimiser, step, time) is written every
  ``--save-every`` steps; rerunning the same command continues from it;
- ``--init-from`` starts a further phase from another run's weights (as the
  shipped model was trained: see data/README.md).

The shipped weights are the exponential moving average of the training
weights (decay 0.999), as in DDPM and SD.

Quality is measured, not eyeballed: ``evaluate`` (:mod:`ministd.train.adherence`)
generates pictures as a reader does (``load_pipeline("shapes")``, 20 steps, the
default sampler, CFG 7.5) for held-out prompts in every caption form the
grammar allows, reader-style short forms and held-out (colour, shape,
background) triples (:data:`HELD_OUT_TRIPLES`, which ``prepare`` leaves out of
training), and prints issue 15's table: colour and shape of the object (judged
by a small attribute classifier trained on ground-truth renders, ``judge``),
size, position and background where asked, exactly one object, palette
cleanliness, broken pictures and two-object scenes, each beside the same figure
for ground-truth renders of the same prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ministd.schedules import NoiseSchedule
from ministd.train import diffusion_loss
from ministd.unet import UNet, UNetConfig, shapes_tiny

UNCOND_PROMPT = ""
CONTEXT_LENGTH = 77

# (object colour, shape, background) triples never shown in training (``prepare``
# leaves out every picture with such an object), so ``evaluate`` can measure
# whether the model composes words it has only seen apart. Each colour once,
# each shape and background more than once: 8 of the 168 triples.
HELD_OUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "green"), ("green", "circle", "purple"), ("blue", "square", "yellow"),
    ("yellow", "triangle", "black"), ("purple", "square", "orange"), ("orange", "circle", "blue"),
    ("white", "triangle", "red"), ("black", "square", "white"),
)


# --------------------------------------------------------------------------- #
# The latent cache
# --------------------------------------------------------------------------- #

# Short forms readers type that the grammar's own templates do not produce (no
# article, a comma before the background); trained on so that they work too.
READER_FORMS: tuple[str, ...] = ("{color} {shape}", "{color} {shape}, {bg} background",
                                 "{size} {color} {shape} {pos}, {bg} background", "{color} {shape} {pos}")


def has_held_out_triple(attrs: dict) -> bool:
    """Whether a scene shows an object whose (colour, shape, background) is in HELD_OUT_TRIPLES."""
    return any((o["color"], o["shape"], attrs["background"]) in HELD_OUT_TRIPLES for o in attrs["objects"])


def training_captions(attrs: dict, rng, k: int) -> list[str]:
    """``k`` captions of one scene, each in a form drawn uniformly from the grammar's forms
    (ministd.data.CAPTION_FORMS, or the pair forms for two objects) and READER_FORMS."""
    from ministd.data import CAPTION_FORMS, _POSITION_PHRASES, _SHAPE_SYNONYMS, _SIZE_SYNONYMS, write_caption

    out = []
    for _ in range(k):
        if len(attrs["objects"]) == 2:
            out.append(write_caption(attrs, rng, form=rng.choice(["pair_full", "pair_no_bg", "pair_bare"]))[0])
            continue
        form = rng.choice(list(CAPTION_FORMS) + list(READER_FORMS))
        if form in CAPTION_FORMS:
            out.append(write_caption(attrs, rng, form=form)[0])
            continue
        obj = attrs["objects"][0]
        out.append(form.format(color=obj["color"], shape=rng.choice(_SHAPE_SYNONYMS[obj["shape"]]),
                               size=rng.choice(_SIZE_SYNONYMS[obj["size"]]), bg=attrs["background"],
                               pos=rng.choice(_POSITION_PHRASES[obj["position"]])))
    return out


def prepare(args) -> None:
    """Encode ShapesWorld pictures with the frozen VAE and tokenize their captions, once.

    Pictures showing a held-out (colour, shape, background) triple are skipped, so the
    cache holds the first ``--n`` pictures of the world that show none. Each picture
    gets ``--captions`` captions in random forms (:func:`training_captions`); training
    draws one of them per step.
    """
    import random

    from tqdm import tqdm

    from ministd.data import ShapesWorld, draw_scene, pil_to_tensor
    from ministd.tokenizer import CLIPTokenizer
    from ministd.vae import AutoencoderKL

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.load(args.vae).eval()
    tokenizer = CLIPTokenizer.from_vocab_file()
    world = ShapesWorld(seed=args.seed, objects=tuple(args.objects))
    kept = [i for i in range(4 * args.n) if not has_held_out_triple(world.attributes(i)[0])][:args.n]
    means, stds, captions = [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, args.n, args.batch_size), desc="encode", mininterval=10):
            pictures = []
            for i in kept[start:start + args.batch_size]:
                attrs, jitter, _ = world.attributes(i)
                pictures.append(draw_scene(attrs, world.size, jitter))
                captions.append(training_captions(attrs, random.Random(f"captions:{args.seed}:{i}"), args.captions))
            posterior = vae.encode(pil_to_tensor(pictures))
            means.append((vae.scale_latents(posterior.mean)).half())
            stds.append((posterior.std * vae.scaling_factor).half())
    flat = [c for per_picture in captions for c in per_picture]
    ids = tokenizer(flat, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids
    cache = {"latent_mean": torch.cat(means), "latent_std": torch.cat(stds),
             "input_ids": ids.to(torch.int32).view(args.n, args.captions, CONTEXT_LENGTH), "captions": captions,
             "world_index": torch.tensor(kept),
             "uncond_ids": tokenizer([UNCOND_PROMPT], padding="max_length",
                                     max_length=CONTEXT_LENGTH).input_ids[0].to(torch.int32),
             "meta": {"vae": str(args.vae), "world_seed": args.seed, "objects": list(args.objects),
                      "n": args.n, "scaling_factor": vae.scaling_factor, "captions_per_picture": args.captions,
                      "held_out_triples": [list(t) for t in HELD_OUT_TRIPLES]}}
    save_atomically(cache, Path(args.out))
    m = cache["latent_mean"].float()
    print(f"wrote {args.out}: {args.n} latents {tuple(m.shape[1:])} x {args.captions} captions, "
          f"mean {m.mean():.3f}, std {m.std():.3f}")


def check_cache(cache: dict) -> None:
    need = {"latent_mean", "latent_std", "input_ids", "uncond_ids"}
    if need - set(cache):
        raise ValueError(f"latent cache lacks {sorted(need - set(cache))}; make it with `prepare`")
    n = cache["latent_mean"].shape[0]
    if cache["latent_std"].shape != cache["latent_mean"].shape or cache["input_ids"].shape[0] != n:
        raise ValueError("latent cache: latent_mean, latent_std and input_ids must have one row per picture")


# --------------------------------------------------------------------------- #
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
# --------------------------------------------------------------------------- #

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). One process without torchrun; gloo on CPU, NCCL on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #

def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """ema <- d * ema + (1 - d) * model, with d warming up as (1 + step) / (10 + step)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


def batch_indices(step: int, batch_size: int, n: int, seed: int, perms: dict) -> torch.Tensor:
    """Global sample indices of ``step``: positions step*B .. step*B+B-1 of per-epoch permutations."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        mask = positions.div(n, rounding_mode="floor") == epoch
        out[mask] = perms[epoch][positions[mask] % n]
    return out


def draw_batch(cache: dict, step: int, args, perms: dict):
    """The whole global batch of ``step``: latents [B,4,h,w], ids [B,77], t [B], noise [B,4,h,w]."""
    n = cache["latent_mean"].shape[0]
    idx = batch_indices(step, args.batch_size, n, args.seed, perms)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    mean, std = cache["latent_mean"][idx].float(), cache["latent_std"][idx].float()
    latents = mean + std * torch.randn(mean.shape, generator=g)       # a posterior sample z ~ q(z|x)
    t = torch.randint(0, 1000, (len(idx),), generator=g)
    noise = torch.randn(mean.shape, generator=g)
    drop = torch.rand(len(idx), generator=g) < args.uncond_prob       # caption dropout for CFG
    ids = cache["input_ids"][idx].long()
    if ids.dim() == 3:          # several captions per picture: one drawn per step
        ids = ids[torch.arange(len(idx)), torch.randint(0, ids.shape[1], (len(idx),), generator=g)]
    ids[drop] = cache["uncond_ids"].long()
    return latents, ids, t, noise


def build_unet(args, context_dim: int) -> UNet:
    config = shapes_tiny(cross_attention_dim=context_dim)
    config.block_out_channels = tuple(args.channels)
    config.attention_levels = (True,) * len(args.channels)
    config.transformer_layers_per_block = (1,) * len(args.channels)
    config.layers_per_block = args.layers_per_block
    config = UNetConfig.from_dict(config.to_dict())     # re-validate
    return UNet(config)


def load_text_encoder(path: str):
    """The frozen text tower of the tiny CLIP (``data/shapes_clip.safetensors`` + .json)."""
    from ministd.text import TinyCLIP

    encoder = TinyCLIP.from_pretrained(path).text_encoder.eval()
    return encoder.requires_grad_(False)


def save_atomically(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)      # a kill never leaves half a file


def restore(ckpt_path: Path, args, unet, ema, optimizer, verbose: bool = True) -> tuple[int, float]:
    """Continue from ``ckpt_path`` if it exists: (step, seconds trained so far); (0, 0.0) otherwise."""
    if not ckpt_path.is_file():
        return 0, 0.0
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    keep = ("steps", "seed", "batch_size", "lr", "channels", "layers_per_block", "uncond_prob", "weighting")
    defaults = {"weighting": "uniform"}     # checkpoints written before the option existed
    written = {k: state["args"].get(k, defaults.get(k)) for k in keep}
    if any(written[k] != vars(args)[k] for k in keep):
        sys.exit(f"{ckpt_path} was written with other settings ({written}); "
                 "use another --out or the same arguments")
    unet.load_state_dict(state["unet"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    if verbose:
        print(f"resuming from step {state['step']} ({state['elapsed'] / 60:.1f} min trained so far)", flush=True)
    return state["step"], state["elapsed"]


def train(args) -> None:
    """The training loop (see the module docstring); every process of a torchrun runs it."""
    from tqdm import tqdm

    rank, world_size, device = setup_distributed()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of processes {world_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "last.pt"

    cache = torch.load(args.cache, map_location="cpu", weights_only=False)
    check_cache(cache)
    text_encoder = load_text_encoder(args.clip).to(device)
    torch.manual_seed(args.seed)                       # the same initial U-Net in every process
    unet = build_unet(args, text_encoder.config.hidden_size).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, elapsed = restore(ckpt_path, args, unet, ema, optimizer, verbose=rank == 0)
    if step == 0 and args.init_from:
        # a further phase: another run's weights (and EMA), a fresh optimiser and schedule
        state = torch.load(args.init_from, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        elapsed = state["elapsed"]          # training time so far counts toward the total
        if rank == 0:
            print(f"starting from the weights of {args.init_from} (step {state['step']})", flush=True)
    model = unet
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device.index] if device.type == "cuda" else None)
    schedule = NoiseSchedule()             # SD's scaled_linear schedule, 1000 steps
    share = args.batch_size // world_size
    mine = slice(rank * share, (rank + 1) * share)
    perms: dict = {}

    def checkpoint(at_step: int) -> None:
        if rank == 0:
            save_atomically({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": at_step, "elapsed": elapsed + time.time() - t0, "args": vars(args),
                             "config": unet.config.to_dict(), "world_size": world_size}, ckpt_path)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
        log = open(out / "log.txt", "a")
    bar = tqdm(total=args.steps, initial=step, desc="unet", mininterval=10, disable=rank != 0)
    t0 = time.time()
    unet.train()
    while step < args.steps:
        if args.stop_after is not None and step >= args.stop_after:
            checkpoint(step)
            if rank == 0:
                print(f"stopping at step {step} as asked (--stop-after); rerun to continue", flush=True)
            break
        latents, ids, t, noise = draw_batch(cache, step, args, perms)
        latents, ids, t, noise = (x[mine].to(device) for x in (latents, ids, t, noise))
        with torch.no_grad():
            states = text_encoder(ids).last_hidden_state
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = diffusion_loss(model, latents, schedule, t=t, noise=noise, encoder_hidden_states=states,
                              weighting=args.weighting, snr_gamma=args.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()                     # DDP averages the gradients of all processes here
        torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        optimizer.step()
        update_ema(ema, unet, step, args.ema_decay)
        step += 1
        bar.update(1)
        if rank == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if step % 25 == 0:
                log.write(json.dumps({"step": step, "loss": loss.item(),
                                      "time": elapsed + time.time() - t0}) + "\n")
                log.flush()
        if step % args.save_every == 0 or step == args.steps:
            checkpoint(step)
    bar.close()
    if rank == 0:
        print(f"at step {step}: {(elapsed + time.time() - t0) / 60:.1f} min of training "
              f"({world_size} process{'es' if world_size > 1 else ''})", flush=True)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def load_checkpoint(path: str | Path, use_ema: bool = True) -> UNet:
    """The U-Net of a training checkpoint (EMA weights by default), float32, eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = UNet(UNetConfig.from_dict(state["config"]))
    model.load_state_dict(state["ema" if use_ema else "unet"])
    return model.eval()


# The sampler the shipped model suggests: DDIM on the training schedule (SD's
# scaled_linear betas, epsilon prediction), in diffusers' scheduler_config form.
SHIPPED_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                     "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                     "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                     "clip_sample": False}


def export(args) -> None:
    """Write the EMA weights as float16 safetensors + JSON config (data/shapes_unet.*).

    Beside them goes ``<name>_empty_prompt.safetensors``: the text encoder's
    states for the empty prompt [1, 77, D] (float32), so chapter 05 can run the
    model unconditionally before text encoders have been introduced.
    """
    from ministd.tokenizer import CLIPTokenizer
    from ministd.weights import write_safetensors

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = load_checkpoint(args.checkpoint)
    model.save(args.out, dtype=torch.float16, extra_config={
        "_scheduler": SHIPPED_SCHEDULER,
        "_ministd": {"trained_steps": state["step"], "training_minutes": round(state["elapsed"] / 60, 1),
                     "processes": state.get("world_size", 1), "training_args": state["args"]}})
    encoder = load_text_encoder(args.clip)
    ids = CLIPTokenizer.from_vocab_file()([UNCOND_PROMPT], padding="max_length", max_length=CONTEXT_LENGTH,
                                          truncation=True).input_ids
    with torch.no_grad():
        empty = encoder(ids).last_hidden_state
    empty_path = Path(args.out).with_name(Path(args.out).stem + "_empty_prompt.safetensors")
    write_safetensors(empty_path, {"encoder_hidden_states": empty}, dtype=torch.float32)
    print(f"wrote {args.out} (float16 EMA weights), its .json and {empty_path.name}")


# --------------------------------------------------------------------------- #
# Judging prompt adherence
# --------------------------------------------------------------------------- #

CLASSIFIER_SEED = 2_000_003     # ground-truth pictures the judge learns from
HELD_OUT_SEED = 1_000_003       # prompts (and pictures) neither the U-Net nor the judge trained on
ADHERENCE_BAR = 0.85            # issue 6: colour and shape each >= 85% at guidance 7.5
JUDGE_BAR = 0.99                # the judge's own accuracy on ground-truth pictures


def judged_attributes() -> dict[str, tuple[str, ...]]:
    """What the judge reads off a one-object picture, and the possible answers."""
    from ministd.data import COLORS, POSITIONS, SHAPES, SIZES

    return {"color": COLORS, "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
            "background": COLORS}


class AttributeClassifier(torch.nn.Module):
    """The judge: a small CNN, picture [B, 3, 64, 64] in [-1, 1] -> one logit vector per attribute.

    Four stride-2 conv stages (GroupNorm, SiLU), flattened (position matters)
    into a shared hidden layer, then one linear head per attribute.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128), hidden: int = 256):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [torch.nn.Conv2d(c_in, c, 3, stride=2, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU()]
            c_in = c
        side = 64 // 2 ** len(channels)
        self.features = torch.nn.Sequential(*layers, torch.nn.Flatten(),
                                            torch.nn.Linear(c_in * side * side, hidden), torch.nn.SiLU())
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, len(v)) for k, v in judged_attributes().items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The judged attributes of each picture, as words."""
        names = judged_attributes()
        logits = self(images)
        picks = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: names[k][picks[k][i]] for k in names} for i in range(images.shape[0])]


SHAPES_JUDGE_FILE = Path(__file__).resolve().parents[2] / "data" / "shapes_judge.safetensors"


def load_judge(path: str | Path = SHAPES_JUDGE_FILE) -> AttributeClassifier:
    """The judge from a training file (``judge --out x.pt``) or shipped float16 weights (.safetensors)."""
    from ministd.weights import load_strict, read_safetensors

    path = Path(path)
    judge = AttributeClassifier()
    if path.suffix == ".safetensors":
        load_strict(judge, read_safetensors(path), source=path.name)
    else:
        judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["judge"])
    return judge.float().eval()


def export_judge(args) -> None:
    """Ship the judge as float16 safetensors (data/shapes_judge.safetensors), re-measured after rounding."""
    from ministd.weights import write_safetensors

    judge = load_judge(args.judge)
    write_safetensors(args.out, judge.state_dict(), dtype=torch.float16)
    accuracy = judge_accuracy(load_judge(args.out), n=args.n)
    print(f"wrote {args.out}; accuracy of the float16 file on held-out ground truth: "
          + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))


def ground_truth_batch(world, start: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pictures start..start+size-1 of a one-object world, and the index of each true attribute."""
    from ministd.data import pil_to_tensor

    names = judged_attributes()
    images, labels = [], {k: [] for k in names}
    for i in range(start, start + size):
        image, _, attrs = world[i]
        images.append(pil_to_tensor(image))
        record = {**attrs["objects"][0], "background": attrs["background"]}
        for k in names:
            labels[k].append(names[k].index(record[k]))
    return torch.stack(images), {k: torch.tensor(v) for k, v in labels.items()}


def judge_accuracy(judge: AttributeClassifier, n: int = 1000, batch_size: int = 250, vae=None) -> dict[str, float]:
    """The judge's accuracy per attribute on ground-truth pictures of the held-out world.

    With ``vae``, on their reconstructions (decode of the posterior mean)
    instead: the best a latent model can score, and a check that the judge
    is not thrown by the VAE's small blurs.
    """
    from ministd.data import SHAPES, ShapesWorld

    world = ShapesWorld(seed=HELD_OUT_SEED, objects=1, shapes=SHAPES)
    judge.eval()
    hits = {k: 0 for k in judged_attributes()}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            images, labels = ground_truth_batch(world, start, min(batch_size, n - start))
            if vae is not None:
                images = vae.decode(vae.encode(images).mode()).float().clamp(-1, 1)
            for k, logits in judge(images).items():
                hits[k] += (logits.argmax(-1) == labels[k]).sum().item()
    return {k: v / n for k, v in hits.items()}


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation for the judge: a random mild blur and pixel noise per picture,
    so that it judges generated pictures (decoded latents are a little soft) by their
    content, not by perfectly sharp edges. Colours are left alone: they are the point."""
    b = images.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"),
                                         kernel, groups=3)
    amount = torch.rand(b, 1, 1, 1, generator=generator)          # 0 = sharp ... 1 = blurred
    noise = 0.1 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    return (images + amount * (blurred - images) + noise).clamp(-1, 1)


def train_judge(args) -> None:
    """Train the attribute classifier on ground-truth renders; print its held-out accuracy."""
    from tqdm import tqdm

    from ministd.data import SHAPES, ShapesWorld

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    judge = AttributeClassifier()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr)
    world = ShapesWorld(seed=CLASSIFIER_SEED + args.seed, objects=1, shapes=SHAPES)
    generator = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc="judge", mininterval=10):
        images, labels = ground_truth_batch(world, step * args.batch_size, args.batch_size)
        images = degrade(images, generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup=50)
        logits = judge(images)
        loss = sum(torch.nn.functional.cross_entropy(logits[k], labels[k]) for k in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    accuracy = judge_accuracy(judge, n=args.n)
    save_atomically({"judge": judge.state_dict(), "accuracy": accuracy, "args": vars(args)}, Path(args.out))
    print("judge accuracy on held-out ground truth: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))


@torch.no_grad()
def generate_latents(unet: UNet, text_encoder, tokenizer, prompts: list[str], guidance_scale: float = 7.5,
                     num_inference_steps: int = 30, sampler: str = "ddim",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample latents [B, 4, h, w] for ``prompts`` with classifier-free guidance
    (Ho & Salimans 2022): eps = eps(x, "") + s * (eps(x, prompt) - eps(x, "")).

    The training schedule (SD's scaled_linear) is the samplers' default."""
    from ministd.samplers import make_sampler

    walker = make_sampler(sampler)
    walker.set_timesteps(num_inference_steps)

    def states(texts):
        ids = tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids
        return text_encoder(ids.to(unet.device)).last_hidden_state

    context = torch.cat([states([UNCOND_PROMPT] * len(prompts)), states(prompts)])
    size = unet.config.sample_size
    shape = (len(prompts), unet.config.out_channels, size, size)
    x = torch.randn(shape, generator=generator).to(unet.device) * walker.init_noise_sigma
    for t in walker.timesteps:
        model_input = walker.scale_model_input(x, t)
        eps_uncond, eps_cond = unet(torch.cat([model_input, model_input]), t, context).chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = walker.step(eps, t, x, generator=generator).prev_sample
    return x


def prompt_adherence(unet: UNet, vae, text_encoder, tokenizer, judge: AttributeClassifier, n: int = 200,
                     guidance_scale: float = 7.5, num_inference_steps: int = 30, sampler: str = "ddim",
                     batch_size: int = 50, seed: int = 0) -> dict[str, float]:
    """Fraction of generated pictures whose judged attributes match the held-out prompt.

    Prompts are the complete captions (every attribute stated) of ``n``
    one-object pictures of the held-out world.
    """
    from ministd.data import SHAPES, ShapesWorld

    world = ShapesWorld(seed=HELD_OUT_SEED, objects=1, shapes=SHAPES, complete_captions=True)
    generator = torch.Generator().manual_seed(seed)
    hits = {k: 0 for k in judged_attributes()}
    judge.eval()
    for start in range(0, n, batch_size):
        items = [world[i] for i in range(start, min(start + batch_size, n))]
        latents = generate_latents(unet, text_encoder, tokenizer, [c for _, c, _ in items], guidance_scale,
                                   num_inference_steps, sampler, generator)
        images = vae.decode(vae.unscale_latents(latents))
        for (_, _, attrs), judged in zip(items, judge.predict(images.float().clamp(-1, 1).cpu())):
            truth = {**attrs["objects"][0], "background": attrs["background"]}
            for k in hits:
                hits[k] += judged[k] == truth[k]
    return {k: v / n for k, v in hits.items()}


def attribute_entropy(judgements: list[dict[str, str]], attributes=("color", "size", "position", "background")) -> float:
    """Diversity of a set of pictures: the mean, over ``attributes``, of the entropy (bits) of the
    judged values. 0 when every picture looks alike; log2(8) = 3 bits is the most colours can give."""
    total = 0.0
    for k in attributes:
        counts = torch.tensor([sum(j[k] == v for j in judgements) for v in {j[k] for j in judgements}], dtype=torch.float)
        p = counts / counts.sum()
        total += float(-(p * p.log2()).sum())
    return total / len(attributes)


def guidance_sweep(args) -> None:
    """Prompt adherence and diversity as functions of the guidance scale, written to a JSON file.

    Adherence: as :func:`prompt_adherence` (``--n`` held-out complete captions).
    Diversity: :func:`attribute_entropy` of ``--seeds`` pictures of the
    under-specified prompt "a circle" (colour, size, position and background free).
    """
    from ministd.text import TinyCLIP
    from ministd.tokenizer import CLIPTokenizer
    from ministd.vae import AutoencoderKL

    torch.set_num_threads(args.threads)
    unet = UNet.load(args.weights)
    vae = AutoencoderKL.load(args.vae).eval()
    text_encoder = TinyCLIP.from_pretrained(args.clip).text_encoder.eval()
    tokenizer = CLIPTokenizer.from_vocab_file()
    judge = load_judge(args.judge)
    rows = []
    for scale in args.scales:
        adherence = prompt_adherence(unet, vae, text_encoder, tokenizer, judge, n=args.n, guidance_scale=scale,
                                     num_inference_steps=args.steps, sampler=args.sampler, seed=args.seed)
        with torch.no_grad():
            latents = generate_latents(unet, text_encoder, tokenizer, ["a circle"] * args.seeds, scale, args.steps,
                                       args.sampler, torch.Generator().manual_seed(args.seed + 1))
            judged = judge.predict(vae.decode(vae.unscale_latents(latents)).float().clamp(-1, 1))
        rows.append({"guidance_scale": scale, **adherence, "diversity_bits": attribute_entropy(judged)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"prompts": args.n, "diversity_seeds": args.seeds, "steps": args.steps, "sampler": args.sampler,
              "weights": str(args.weights), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def evaluate(args) -> None:
    """Issue 15's evaluation of the model as a reader uses it (:mod:`ministd.train.adherence`):
    print the table, write it as JSON to ``--out``; exit 1 if a target is missed."""
    from ministd.train import adherence

    torch.set_num_threads(args.threads)
    sys.exit(0 if adherence.evaluate(args) else 1)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _guidance_scales(text: str) -> list[float]:
    """``--scales`` of ``sweep``: "0,1,7.5" -> [0.0, 1.0, 7.5]; each must be finite and >= 0."""
    try:
        scales = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales must be comma-separated numbers, got {text!r}") from None
    bad = [s for s in scales if not math.isfinite(s) or s < 0]
    if bad:
        raise argparse.ArgumentTypeError(f"--scales must be finite numbers >= 0, got {bad}")
    return scales


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ministd.train.unet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="encode ShapesWorld pictures with the VAE into a latent cache")
    p.add_argument("--vae", default="data/shapes_vae.safetensors")
    p.add_argument("--out", default="/work/runs/unet/cache.pt")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0, help="ShapesWorld seed of the training pictures")
    p.add_argument("--objects", type=_ints, default=[1, 2], help="objects per scene: 1, 2 or 1,2")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--captions", type=_positive_int, default=4, help="captions per picture, in random forms")
    p.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("train", help="train (or resume) the U-Net; works under torchrun")
    t.add_argument("--cache", default="/work/runs/unet/cache.pt")
    t.add_argument("--clip", default="data/shapes_clip.safetensors")
    t.add_argument("--out", default="/work/runs/unet")
    t.add_argument("--steps", type=_positive_int, default=3000)
    t.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    t.add_argument("--weighting", choices=("uniform", "min_snr"), default="uniform",
                   help="loss weight per timestep: uniform, or min-SNR-gamma (Hang et al. 2023)")
    t.add_argument("--snr-gamma", type=float, default=5.0)
    t.add_argument("--channels", type=_ints, default=list(shapes_tiny().block_out_channels))
    t.add_argument("--layers-per-block", type=int, default=shapes_tiny().layers_per_block)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--init-from", default=None,
                   help="start a new phase from another run's checkpoint (weights + EMA; fresh optimiser, "
                        "learning-rate schedule and, with a new --seed, new batches)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop this run at this step (checkpointed); rerunning continues")
    j = sub.add_parser("judge", help="train the attribute classifier that judges prompt adherence")
    j.add_argument("--out", default="/work/runs/unet/judge.pt")
    j.add_argument("--steps", type=int, default=1500)
    j.add_argument("--batch-size", type=int, default=64)
    j.add_argument("--lr", type=float, default=1e-3)
    j.add_argument("--n", type=int, default=1000, help="held-out ground-truth pictures to measure it on")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--threads", type=int, default=2)
    from ministd.train import adherence as A

    e = sub.add_parser("evaluate", help="prompt adherence of the model as a reader uses it (issue 15), to JSON")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a training checkpoint (EMA weights are used) instead of the shipped U-Net")
    which.add_argument("--weights", help="U-Net weights (.safetensors with its .json) instead of the shipped U-Net")
    e.add_argument("--judge", default=str(SHAPES_JUDGE_FILE), help="the judge: shipped .safetensors or a judge .pt")
    e.add_argument("--n", type=A.positive_int, default=A.DEFAULT_N, help="prompts, shared evenly over --forms")
    e.add_argument("--forms", type=A.form_ids, default=A.FORMS,
                   help="comma-separated caption form ids (default: all): " + ", ".join(A.FORMS))
    e.add_argument("--guidance-scale", type=A.guidance_scale, default=7.5)
    e.add_argument("--steps", type=A.positive_int, default=20)
    e.add_argument("--sampler", type=A.sampler_name, default=None, help="default: the model's own (DDIM)")
    e.add_argument("--seed", type=int, default=0, help="prompt i draws its noise from seed + i")
    e.add_argument("--threads", type=A.positive_int, default=2)
    e.add_argument("--out", default="data/shapes_unet_eval.json")
    x = sub.add_parser("export", help="write float16 EMA weights + config for data/")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", default="data/shapes_unet.safetensors")
    x.add_argument("--clip", default="data/shapes_clip.safetensors")
    w = sub.add_parser("sweep", help="adherence and diversity over guidance scales, to JSON (chapter 09)")
    w.add_argument("--weights", default="data/shapes_unet.safetensors")
    w.add_argument("--vae", default="data/shapes_vae.safetensors")
    w.add_argument("--clip", default="data/shapes_clip.safetensors")
    w.add_argument("--judge", default=str(SHAPES_JUDGE_FILE))
    w.add_argument("--scales", type=_guidance_scales, default=[0, 1, 2, 3, 5, 7.5, 10, 15],
                   help="comma-separated guidance scales, each a finite number >= 0")
    w.add_argument("--n", type=int, default=200)
    w.add_argument("--seeds", type=int, default=64)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--sampler", default="ddim")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--out", default="data/shapes_guidance_sweep.json")
    xj = sub.add_parser("export-judge", help="write the judge as float16 safetensors for data/")
    xj.add_argument("--judge", default="/work/runs/unet/judge.pt")
    xj.add_argument("--out", default="data/shapes_judge.safetensors")
    xj.add_argument("--n", type=int, default=1000, help="held-out ground-truth pictures to re-measure it on")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.n < 1 or any(o not in (1, 2) for o in args.objects):
            parser.error("--n must be >= 1 and --objects made of 1 and 2")
        prepare(args)
    elif args.command == "train":
        if args.steps < 1 or args.batch_size < 1 or not 0 <= args.uncond_prob < 1:
            parser.error("--steps and --batch-size must be >= 1, --uncond-prob in [0, 1)")
        train(args)
    elif args.command == "judge":
        train_judge(args)
    elif args.command == "evaluate":
        evaluate(args)
    elif args.command == "sweep":
        guidance_sweep(args)
    elif args.command == "export-judge":
        export_judge(args)
    else:
        export(args)


if __name__ == "__main__":
    main()
