"""Train, evaluate and export the ShapesWorld VAE (chapter 04).

    python -m ministd.train.vae train --out /work/runs/vae --steps 2500
    torchrun --standalone --nproc_per_node 2 -m ministd.train.vae train ...   (data-parallel, gloo)
    python -m ministd.train.vae evaluate --checkpoint /work/runs/vae/last.pt
    python -m ministd.train.vae export --checkpoint /work/runs/vae/last.pt --out data/shapes_vae.safetensors
    python -m ministd.train.vae evaluate --weights data/shapes_vae.safetensors --json data/shapes_vae_eval.json

The objective is the KL-regularised autoencoder of the LDM paper (Rombach et
al. 2022, appendix G) without its adversarial and perceptual terms, which a
world of flat-coloured shapes does not need:

    loss = mean |x − x̂| + mean (x − x̂)² + kl_weight · KL(q(z|x) ‖ N(0, I)) / (3·H·W)

The KL is summed over the latent numbers of each picture and divided by the
number of pixel values, so ``kl_weight`` means what it means in LDM (1e-6
there, relative to a reconstruction loss summed over pixels). x̂ is decoded
from a *sample* z ~ q(z|x) (the reparameterisation trick).

Reproducible and resumable: batch k is pictures k·B … (k+1)·B − 1 of
``ShapesWorld(seed)`` (one- and two-object scenes, every shape including the
held-out star, since an autoencoder should draw any picture), and the
posterior noise of step k comes from a generator seeded with (seed, k). A
checkpoint (model, optimiser, learning-rate schedule, step) is written every
``--save-every`` steps; rerunning the same command continues from it.

Longer training runs in phases: ``--init-from`` starts a new run (fresh
optimiser and one-cycle schedule, new ``--seed`` so new pictures) from the
weights of an earlier one. ``--foreground-weight w`` multiplies the loss on
pixels that are not background by (1 + w), renormalised per picture, so small
objects (1 % of a picture) are not sacrificed to the background.

``--decoder-only`` fine-tunes the decoder with the encoder frozen, which is
what Stability did for SD's "ft-MSE" VAE (the improved VAE files people swap
in): the latent space, and so every U-Net trained on it, stays valid.
``--palette-weight w`` adds w × a per-pixel cross-entropy that asks each flat
pixel's reconstruction to be nearer its own palette colour than any other
(logits −‖x̂ − colour‖² / 0.02): it targets "yellow came back orange" directly,
which L1 and MSE only see as a small error on a few pixels.

Quality bar (issue 4): on held-out pictures (another ShapesWorld seed),
PSNR ≥ 30 dB and every object's colour preserved. ``evaluate`` prints both.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ministd.data import ALL_SHAPES, PALETTE, ShapesWorld, pil_to_tensor
from ministd.vae import AutoencoderKL, VAEConfig

TRAIN_SEED_OFFSET = 0       # training pictures: ShapesWorld(seed = --seed)
HELD_OUT_SEED = 1_000_003   # evaluation pictures: a world the model never saw
PSNR_BAR = 30.0

# The palette in [-1, 1], [K, 3], and its names, for colour checks.
_COLOR_NAMES = list(PALETTE)
_PALETTE_T = torch.tensor([PALETTE[c] for c in _COLOR_NAMES], dtype=torch.float32) / 127.5 - 1


def shapes_vae_config(channels=(32, 64, 128), layers_per_block: int = 1) -> VAEConfig:
    """The book's VAE: downsampling 2^(len(channels)-1), 4 latent channels, 64×64 pictures."""
    return VAEConfig(block_out_channels=tuple(channels), layers_per_block=layers_per_block,
                     latent_channels=4, norm_num_groups=32, sample_size=64,
                     scaling_factor=1.0, force_upcast=False)


def training_world(seed: int, size: int = 64) -> ShapesWorld:
    return ShapesWorld(seed=seed + TRAIN_SEED_OFFSET, size=size, objects=(1, 2), shapes=ALL_SHAPES)


def held_out_world(size: int = 64) -> ShapesWorld:
    return ShapesWorld(seed=HELD_OUT_SEED, size=size, objects=(1, 2), shapes=ALL_SHAPES)


def palette_loss(recon: torch.Tensor, images: torch.Tensor, pixel_weight: torch.Tensor,
                 tol: float = 0.04, temperature: float = 0.02) -> torch.Tensor:
    """Cross-entropy of each flat pixel's palette colour, from its reconstruction.   [B, 3, H, W] each.

    Flat pixels are those of ``images`` within ``tol`` of a palette colour (not
    the anti-aliased rims); the logits are −‖x̂ − colour_k‖² / ``temperature``.
    Weighted by ``pixel_weight`` [B, 1, H, W] and averaged over flat pixels.
    """
    palette = _PALETTE_T.to(recon).T.reshape(1, 3, -1, 1, 1)              # [1, 3, K, 1, 1]
    dist_rec = (recon.unsqueeze(2) - palette).pow(2).sum(1)                # [B, K, H, W]
    close = (images.unsqueeze(2) - palette).abs().amax(1) < tol            # [B, K, H, W]
    flat = close.any(1)                                                    # [B, H, W]
    target = close.float().argmax(1)
    ce = F.cross_entropy(-dist_rec / temperature, target, reduction="none")
    w = pixel_weight[:, 0] * flat
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def vae_loss(model: AutoencoderKL, images: torch.Tensor, kl_weight: float,
             noise: torch.Tensor | None = None, pixel_weight: torch.Tensor | None = None,
             palette_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L1 + MSE reconstruction of a posterior sample + weighted KL (see module docstring).

    ``noise`` is the ε of z = mean + std·ε (drawn here when None).
    ``pixel_weight`` [B, 1, H, W] (optional) weights the reconstruction terms per
    pixel, normalised so a weight of 1 everywhere is the plain loss.
    """
    posterior = model.encode(images)
    if noise is None:
        noise = torch.randn_like(posterior.mean)
    recon = model.decode(posterior.mean + posterior.std * noise)
    w = torch.ones_like(images[:, :1]) if pixel_weight is None else pixel_weight
    w = w / w.mean(dim=[1, 2, 3], keepdim=True)  # per picture, so sharding a batch changes nothing
    l1 = ((recon - images).abs() * w).mean()
    mse = ((recon - images).pow(2) * w).mean()
    kl = posterior.kl().mean() / images[0].numel()
    loss = l1 + mse + kl_weight * kl
    parts = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
    if palette_weight:
        pal = palette_loss(recon, images, w)
        loss = loss + palette_weight * pal
        parts["palette"] = pal.item()
    return loss, parts


def foreground_mask(images: torch.Tensor, backgrounds: list[str]) -> torch.Tensor:
    """[B, 1, H, W]: 1 where a pixel is not (exactly) its picture's background colour.

    Used by ``--foreground-weight`` to give small objects more say in the loss:
    a small star covers 1 % of the picture, so a plain mean lets it fade.
    """
    bg = torch.stack([_PALETTE_T[_COLOR_NAMES.index(c)] for c in backgrounds]).view(-1, 3, 1, 1)
    return ((images - bg).abs().amax(1, keepdim=True) > 0.04).float()


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #

def _make_optimizer(model, lr: float, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    # One-cycle (Smith & Topin 2018): warm up for 10 %, cosine down to lr/1e4.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                div_factor=25.0, final_div_factor=400.0)
    return opt, sched


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return int(os.environ.get("RANK", "0")), world


def _average_gradients(model, world: int) -> None:
    """All-reduce the gradients (one flat buffer) and divide by the number of processes."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train(args) -> None:
    """Train (or resume) the VAE; under ``torchrun --nproc_per_node N`` each process takes B/N pictures.

    Data-parallel runs compute the same step as one process (same pictures,
    same posterior noise, gradients averaged), up to float summation order.
    """
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    rank, n_proc = _distributed()
    if args.batch_size % n_proc:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {n_proc} processes")
    local = args.batch_size // n_proc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    config = shapes_vae_config(args.channels, args.layers_per_block)
    torch.manual_seed(args.seed)
    model = AutoencoderKL(config)
    if args.decoder_only:  # freeze the latent space: encoder and its 1x1 conv
        model.encoder.requires_grad_(False)
        if model.quant_conv is not None:
            model.quant_conv.requires_grad_(False)
    opt, sched = _make_optimizer(model, args.lr, args.steps)
    start, elapsed = 0, 0.0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["args"]["steps"] != args.steps or state["args"]["seed"] != args.seed or state["config"] != asdict(config):
            sys.exit(f"{ckpt_path} was written with other settings ({state['args']}); "
                     "use another --out or the same arguments")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, elapsed = state["step"], state["elapsed"]
        if rank == 0:
            print(f"resuming from step {start} ({elapsed / 60:.1f} min trained so far)")
    elif args.init_from and str(args.init_from).endswith(".safetensors"):
        # A further phase from shipped weights (e.g. data/shapes_vae.safetensors, float16): the
        # float16 values are what every latent cache was encoded with, so --decoder-only keeps them
        shipped = AutoencoderKL.load(args.init_from)
        if {**asdict(shipped.config), "scaling_factor": 1.0} != asdict(config):   # export measures the factor
            sys.exit(f"{args.init_from} has another model config: {asdict(shipped.config)}")
        model.load_state_dict(shipped.state_dict())
        if rank == 0:
            print(f"starting from the shipped weights {args.init_from}")
    elif args.init_from:
        # A second phase: start from another run's weights with a fresh optimiser and schedule.
        state = torch.load(args.init_from, map_location="cpu", weights_only=False)
        if state["config"] != asdict(config):
            sys.exit(f"{args.init_from} has another model config: {state['config']}")
        model.load_state_dict(state["model"])
        elapsed = state["elapsed"]  # training time so far counts toward the total
        if rank == 0:
            print(f"starting from the weights of {args.init_from} (step {state['step']})")
    world = training_world(args.seed)
    model.train()
    lead = rank == 0
    if lead:
        (out / "args.json").write_text(json.dumps({**vars(args), "processes": n_proc}, indent=2))
        log = open(out / "log.txt", "a")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="vae", mininterval=10,
               disable=not lead)
    t0 = time.time()
    for step in bar:
        if args.stop_after is not None and step >= args.stop_after:
            if lead:
                _save(ckpt_path, model, opt, sched, step, elapsed + time.time() - t0, args, config)
                print(f"stopping at step {step} as asked (--stop-after); rerun to continue")
            return
        # This process's share of batch `step`, and the matching slice of the batch's noise.
        first = step * args.batch_size + rank * local
        samples = [world[first + i] for i in range(local)]
        images = pil_to_tensor([im for im, _, _ in samples])
        weight = None
        if args.foreground_weight:
            weight = 1 + args.foreground_weight * foreground_mask(images, [a["background"] for _, _, a in samples])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        h = images.shape[-1] // config.downsampling_factor
        noise = torch.randn(args.batch_size, config.latent_channels, h, h, generator=gen)
        loss, parts = vae_loss(model, images, args.kl_weight, noise[rank * local:(rank + 1) * local], weight,
                               args.palette_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if n_proc > 1:
            _average_gradients(model, n_proc)
            stats = torch.tensor([loss.item(), parts["l1"], parts["mse"], parts["kl"]])
            torch.distributed.all_reduce(stats)
            stats /= n_proc
            parts = {"l1": stats[1].item(), "mse": stats[2].item(), "kl": stats[3].item()}
            loss = stats[0]
        opt.step()
        sched.step()
        if not lead:
            continue
        psnr = -10 * math.log10(parts["mse"] / 4)  # MSE in [-1,1] units -> PSNR on [0, 1]
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if (step + 1) % 25 == 0:
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), **parts, "batch_psnr": psnr,
                                  "time": elapsed + time.time() - t0}) + "\n")
            log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            _save(ckpt_path, model, opt, sched, step + 1, elapsed + time.time() - t0, args, config)
            if (step + 1) % (args.save_every * 4) == 0 or step + 1 == args.steps:
                _save(out / f"step{step + 1:06d}.pt", model, opt, sched, step + 1,
                      elapsed + time.time() - t0, args, config)
    if lead:
        print(f"done: {args.steps} steps, {(elapsed + time.time() - t0) / 60:.1f} min of training")


def _save(path: Path, model, opt, sched, step: int, elapsed: float, args, config) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "elapsed": elapsed, "args": vars(args), "config": asdict(config)}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path: str | Path) -> AutoencoderKL:
    """The model of a training checkpoint (float32, eval mode)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = AutoencoderKL(VAEConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #

def psnr(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-picture PSNR in dB on the [0, 1] scale: 10·log10(1 / MSE); [B]."""
    mse = ((recon.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def nearest_palette_color(rgb: torch.Tensor) -> list[str]:
    """Names of the palette colours nearest to each row of ``rgb`` [N, 3] in [-1, 1]."""
    return [_COLOR_NAMES[i] for i in torch.cdist(rgb.float(), _PALETTE_T).argmin(1).tolist()]


def color_check(image: torch.Tensor, recon: torch.Tensor, attrs: dict, tol: float = 0.04) -> list[dict]:
    """Does each object (and the background) keep its colour after the round trip?

    The region of a colour is every pixel of the *original* whose RGB is
    within ``tol`` (in [-1, 1] units) of that palette colour: the flat inside
    of the shape, without its anti-aliased rim. The region's mean colour in
    the reconstruction must be nearest to the same palette colour, and we also
    report the fraction of its pixels that individually are.
    """
    results = []
    items = [(o["color"], f"{o['color']} {o['shape']}") for o in attrs["objects"]]
    items.append((attrs["background"], f"{attrs['background']} background"))
    pixels = image.flatten(1).T        # [H·W, 3]
    rec = recon.clamp(-1, 1).flatten(1).T
    for color, what in items:
        target = _PALETTE_T[_COLOR_NAMES.index(color)]
        mask = (pixels - target).abs().max(1).values < tol
        if mask.sum() == 0:   # an object entirely hidden or too small to have a flat inside
            results.append({"what": what, "color": color, "pixels": 0, "ok": True, "got": color, "pixel_acc": 1.0})
            continue
        got = nearest_palette_color(rec[mask].mean(0, keepdim=True))[0]
        per_pixel = nearest_palette_color(rec[mask])
        acc = sum(c == color for c in per_pixel) / len(per_pixel)
        results.append({"what": what, "color": color, "pixels": int(mask.sum()), "ok": got == color,
                        "got": got, "pixel_acc": acc})
    return results


@torch.no_grad()
def evaluate(model: AutoencoderKL, n: int = 256, batch_size: int = 32, verbose: bool = True) -> dict:
    """PSNR and colour preservation on ``n`` held-out pictures (deterministic: posterior mode)."""
    world = held_out_world()
    model = model.eval()
    psnrs, objects_ok, objects, bg_ok, pixel_accs, failures, latents = [], 0, 0, 0, [], [], []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        samples = [world[i] for i in idx]
        images = pil_to_tensor([s[0] for s in samples])
        z = model.encode(images).mode()
        latents.append(z)
        recon = model.decode(z).float()
        psnrs.append(psnr(images, recon))
        for k, (_, _, attrs) in enumerate(samples):
            for r in color_check(images[k], recon[k], attrs):
                pixel_accs.append(r["pixel_acc"])
                if r["what"].endswith("background"):
                    bg_ok += r["ok"]
                else:
                    objects += 1
                    objects_ok += r["ok"]
                if not r["ok"]:
                    failures.append(f"picture {idx[k]}: {r['what']} came back {r['got']}")
    p = torch.cat(psnrs)
    z = torch.cat(latents)
    report = {
        "n_images": n, "psnr_mean": p.mean().item(), "psnr_min": p.min().item(),
        "psnr_median": p.median().item(), "objects": objects, "objects_color_ok": objects_ok,
        "backgrounds_color_ok": bg_ok, "mean_pixel_color_accuracy": sum(pixel_accs) / len(pixel_accs),
        "color_failures": failures, "latent_mean": z.mean().item(), "latent_std": z.std().item(),
        "suggested_scaling_factor": 1.0 / z.std().item(),
    }
    report["meets_bar"] = report["psnr_mean"] >= PSNR_BAR and objects_ok == objects and bg_ok == n
    if verbose:
        print(format_report(report))
    return report


def format_report(r: dict) -> str:
    lines = [
        f"held-out pictures: {r['n_images']} (ShapesWorld seed {HELD_OUT_SEED}, 1-2 objects, all shapes)",
        f"PSNR: mean {r['psnr_mean']:.2f} dB, median {r['psnr_median']:.2f} dB, min {r['psnr_min']:.2f} dB "
        f"(bar: mean >= {PSNR_BAR:.0f} dB)",
        f"object colours preserved: {r['objects_color_ok']}/{r['objects']}; "
        f"backgrounds: {r['backgrounds_color_ok']}/{r['n_images']}; "
        f"pixels nearest their true palette colour: {100 * r['mean_pixel_color_accuracy']:.2f} %",
        f"latents (posterior mean): mean {r['latent_mean']:.3f}, std {r['latent_std']:.3f} "
        f"-> scaling factor 1/std = {r['suggested_scaling_factor']:.4f}",
    ]
    lines += [f"  colour changed: {f}" for f in r["color_failures"][:10]]
    lines.append("quality bar met" if r["meets_bar"] else "quality bar NOT met")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #

def export(args) -> None:
    """Write float16 weights + config (with the measured scaling factor) and re-check them."""
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    print("float32 checkpoint:")
    r32 = evaluate(model, n=args.n)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    start = state["args"].get("init_from")
    if state["args"].get("decoder_only") and start and str(start).endswith(".safetensors") and Path(start).is_file():
        # the encoder was frozen: the latent space, and with it the scaling factor every model
        # trained on it uses, stays the starting VAE's (re-measuring would move it by rounding)
        model.config.scaling_factor = AutoencoderKL.load(start).config.scaling_factor
        print(f"decoder-only run: keeping the scaling factor {model.config.scaling_factor} of {start}")
    else:
        model.config.scaling_factor = round(r32["suggested_scaling_factor"], 5)
    model.save(args.out, dtype=torch.float16, extra_config={
        "_ministd": {"trained_steps": state["step"], "training_minutes": round(state["elapsed"] / 60, 1),
                     "training_args": state["args"]}})
    print(f"\nwrote {args.out} (float16) and its .json; re-evaluating the float16 file:")
    r16 = evaluate(AutoencoderKL.load(args.out), n=args.n)
    if not r16["meets_bar"]:
        print("WARNING: the float16 weights do not meet the bar")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ministd.train.vae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the ShapesWorld VAE")
    t.add_argument("--out", default="/work/runs/vae")
    t.add_argument("--steps", type=int, default=2500)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3, help="peak of the one-cycle schedule")
    t.add_argument("--kl-weight", type=float, default=1e-6)
    t.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[32, 64, 128])
    t.add_argument("--layers-per-block", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--foreground-weight", type=float, default=0.0,
                   help="extra loss weight on pixels that are not background (0: plain mean)")
    t.add_argument("--decoder-only", action="store_true",
                   help="train the decoder only (the encoder, and so the latent space, stays as loaded)")
    t.add_argument("--palette-weight", type=float, default=0.0,
                   help="weight of the per-pixel palette-colour cross-entropy (0 = off)")
    t.add_argument("--init-from", default=None,
                   help="start from the weights of this checkpoint (new optimiser and schedule)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop this run at this step (checkpointed); rerunning continues")
    e = sub.add_parser("evaluate", help="PSNR and colour check on held-out pictures")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a training checkpoint (.pt)")
    g.add_argument("--weights", help="shipped weights (.safetensors with a .json beside it)")
    e.add_argument("--n", type=int, default=256)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", default=None,
                   help="also write the report here (data/shapes_vae_eval.json, which chapter 04 reads)")
    x = sub.add_parser("export", help="write float16 weights + config for data/")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", default="data/shapes_vae.safetensors")
    x.add_argument("--n", type=int, default=256)
    x.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)
    elif args.command == "evaluate":
        torch.set_num_threads(args.threads)
        model = load_checkpoint(args.checkpoint) if args.checkpoint else AutoencoderKL.load(args.weights)
        report = evaluate(model, n=args.n)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "weights": args.weights or args.checkpoint, "command": "python -m ministd.train.vae "
                + " ".join(argv if argv is not None else sys.argv[1:]), **report}, indent=1) + "\n")
            print(f"wrote {args.json}")
    else:
        export(args)


if __name__ == "__main__":
    main()
