"""Train the noisy-latent classifier that classifier guidance uses (chapter 09).

    python -m ministd.train.classifier --cache /work/runs/unet/cache.pt --out data/shapes_noisy_classifier.safetensors

Classifier guidance (Dhariwal & Nichol 2021, sec. 4) needs p(y | x_t): a
classifier that has seen pictures at *every* noise level, since the sampler
asks it about x_t at every step. So each training example is a clean
ShapesWorld latent z0 from the U-Net's latent cache (``ministd.train.unet
prepare``), noised to a random timestep with the training schedule,
``x_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps``, and the labels are
the colour and shape of the picture's object (one-object pictures only, so
the label is unambiguous).

Reproducible from ``--seed``: the split, the batches, the timesteps and the
noise all come from seeded generators. The printed accuracy is measured on
held-out cache entries, per noise band: it is near chance at t ≈ 1000 (pure
noise carries no label) and should be high for t < 500.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ministd.data import ShapesWorld
from ministd.guidance import NoisyClassifier, NoisyClassifierConfig
from ministd.schedules import NoiseSchedule


def labelled_latents(cache: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The cache's one-object pictures: latent means [N,4,h,w], stds, and label indices per attribute."""
    meta = cache["meta"]
    world = ShapesWorld(seed=meta["world_seed"], objects=tuple(meta["objects"]))
    config = NoisyClassifierConfig()
    keep, labels = [], {k: [] for k in config.labels}
    for i in range(cache["latent_mean"].shape[0]):
        attrs = world.attributes(i)[0]
        if len(attrs["objects"]) != 1:
            continue
        keep.append(i)
        for k in labels:
            labels[k].append(config.labels[k].index(attrs["objects"][0][k]))
    idx = torch.tensor(keep)
    return (cache["latent_mean"][idx].float(), cache["latent_std"][idx].float(),
            {k: torch.tensor(v) for k, v in labels.items()})


def noisy_batch(mean, std, t, generator, schedule: NoiseSchedule) -> torch.Tensor:
    """A posterior sample z0 ~ q(z|x), noised to timesteps ``t`` [B]."""
    z0 = mean + std * torch.randn(mean.shape, generator=generator)
    return schedule.add_noise(z0, torch.randn(mean.shape, generator=generator), t)


@torch.no_grad()
def accuracy_by_noise(model: NoisyClassifier, mean, std, labels, schedule, seed: int = 1,
                      bands=((0, 250), (250, 500), (500, 750), (750, 1000))) -> dict:
    """Accuracy per attribute in each timestep band, on the given (held-out) latents."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lo, hi in bands:
        t = torch.randint(lo, hi, (mean.shape[0],), generator=g)
        logits = model(noisy_batch(mean, std, t, g, schedule), t)
        out[f"t {lo}-{hi}"] = {k: (v.argmax(1) == labels[k]).float().mean().item() for k, v in logits.items()}
    return out


def main(argv=None) -> None:
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python -m ministd.train.classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/work/runs/unet/cache.pt")
    p.add_argument("--out", default="data/shapes_noisy_classifier.safetensors")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--held-out", type=int, default=1000, help="cache entries kept for measuring accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cache = torch.load(args.cache, map_location="cpu", weights_only=False)
    mean, std, labels = labelled_latents(cache)
    n_train = mean.shape[0] - args.held_out
    if n_train < args.batch_size:
        raise SystemExit(f"the cache has only {mean.shape[0]} one-object pictures; need more than "
                         f"--held-out {args.held_out} + --batch-size {args.batch_size}")
    torch.manual_seed(args.seed)
    model = NoisyClassifier()
    schedule = NoiseSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="classifier", mininterval=10)
    for _ in bar:
        idx = torch.randint(0, n_train, (args.batch_size,), generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        logits = model(noisy_batch(mean[idx], std[idx], t, g, schedule), t)
        loss = sum(F.cross_entropy(v, labels[k][idx]) for k, v in logits.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    minutes = (time.time() - t0) / 60
    model.eval()
    held = slice(n_train, None)
    acc = accuracy_by_noise(model, mean[held], std[held], {k: v[held] for k, v in labels.items()}, schedule)
    for band, values in acc.items():
        print(f"held-out accuracy, {band}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    model.save(args.out, extra_config={"_ministd": {"steps": args.steps, "training_minutes": round(minutes, 1),
                                                    "held_out_accuracy": acc, "args": vars(args)}})
    print(f"wrote {args.out} ({minutes:.1f} min of training)")


if __name__ == "__main__":
    main()
