"""Train, evaluate and export the tiny ShapesWorld CLIP (chapter 07).

    python -m ministd.train.clip train --out /work/runs/clip --steps 2500
    python -m ministd.train.clip evaluate --checkpoint /work/runs/clip/last.pt
    python -m ministd.train.clip export --checkpoint /work/runs/clip/last.pt --out data/shapes_clip.safetensors
    python -m ministd.train.clip evaluate --weights data/shapes_clip.safetensors

The objective is CLIP's (Radford et al. 2021, Figure 3): a batch of B
(picture, caption) pairs gives a B x B matrix of cosine similarities times a
learned scale exp(logit_scale) = 1/temperature; symmetric cross-entropy
(InfoNCE, van den Oord et al. 2018) pulls each picture towards its own
caption and away from the B - 1 others, and each caption likewise.

The text tower is ministd's CLIP text transformer (the real tokenizer and
vocabulary, 77 positions, pooled at EOS, projection), the picture tower a
small strided CNN (:class:`ministd.text.TinyImageEncoder`).

Reproducible and resumable: batch k is pictures k*B ... (k+1)*B - 1 of
``ShapesWorld(seed)`` (one object, the base shapes, the grammar's paraphrased
captions). A checkpoint (model, optimiser, step) is written every
``--save-every`` steps; rerunning the same command continues from it.

Evaluation (held-out world, seed ``HELD_OUT_SEED``):

- retrieval: for each of 100 captions that state every attribute, is the
  best-scoring of the 100 pictures its own (top-1)?
- zero-shot attribute classification, by prompting as CLIP does (prompt
  ensembles): colour = argmax over "a {colour} circle/square/triangle",
  shape = argmax over "a {colour} {shape}" averaged over the colours.
Bar (issue 5): >= 90% top-1 for colour and for shape.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ministd.data import COLORS, SHAPES, ShapesWorld, pil_to_tensor
from ministd.text import CLIPTextConfig, TinyCLIP, TinyCLIPConfig, clip_loss, pack_token_table
from ministd.tokenizer import CLIPTokenizer
from ministd.weights import save_model

HELD_OUT_SEED = 1_000_003
BAR = 0.90


# --------------------------------------------------------------------------- data
def batch_of(world: ShapesWorld, tokenizer: CLIPTokenizer, start: int, size: int):
    """Pictures [B, 3, 64, 64] in [-1, 1], token ids [B, L] (padded to the longest), attributes."""
    images, captions, attrs = [], [], []
    for i in range(start, start + size):
        image, caption, a = world[i]
        images.append(pil_to_tensor(image))
        captions.append(caption)
        attrs.append(a)
    ids = tokenizer(captions, padding="longest").input_ids
    return torch.stack(images), ids, captions, attrs


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------- train
class make_optimizer:
    """Adam for everything; the 49,408-row token table is updated sparsely.

    ShapesWorld captions use a few dozen of the 49,408 tokens. A dense Adam
    step would still touch all 6.3 M numbers of the table every step, so the
    table's gradient is made sparse (only the rows of the batch's tokens) and
    updated by SparseAdam; rows of tokens never seen keep their initial values.
    """

    def __init__(self, model: TinyCLIP, lr: float):
        table = model.text_encoder.embeddings.token_embedding
        table.sparse = True
        rest = [p for p in model.parameters() if p is not table.weight]
        self.optimizers = [torch.optim.Adam(rest, lr=lr), torch.optim.SparseAdam([table.weight], lr=lr)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def clip_config(width: int = 128) -> TinyCLIPConfig:
    """The book's tiny CLIP at text width ``width`` (128: the shipped one; SDXL-type models pair it
    with a wider second encoder, chapter 13): 4 layers, heads of 32 channels, MLP 4x wide."""
    if width % 32 or width < 32:
        raise ValueError(f"width must be a positive multiple of 32, got {width}")
    if width == 128:
        return TinyCLIPConfig()
    text = CLIPTextConfig(hidden_size=width, num_layers=4, num_heads=width // 32, intermediate_size=4 * width,
                          hidden_act="quick_gelu", max_position_embeddings=77, projection_dim=width)
    return TinyCLIPConfig(text=text, embed_dim=width)


def train(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    torch.manual_seed(args.seed)
    config = clip_config(args.width)
    model = TinyCLIP(config)
    optimizer = make_optimizer(model, args.lr)
    step = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config"] != config.to_dict():
            raise SystemExit(f"{ckpt_path} holds a CLIP of another shape; use another --out or the same --width")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resuming from {ckpt_path} at step {step}", flush=True)
    tokenizer = CLIPTokenizer.from_vocab_file()
    world = ShapesWorld(seed=args.seed)
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, desc="clip", mininterval=10)
    t0 = time.time()
    model.train()
    while step < args.steps:
        images, ids, _, _ = batch_of(world, tokenizer, step * args.batch_size, args.batch_size)
        for opt in optimizer.optimizers:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr)
        logits = model(images, ids)
        loss = clip_loss(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            acc = (logits.argmax(1) == torch.arange(len(logits))).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}",
                            temp=f"{1 / model.logit_scale.exp().item():.4f}")
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "config": config.to_dict(), "args": vars(args)}, out / "tmp.pt")
            (out / "tmp.pt").replace(ckpt_path)  # atomic: a kill never leaves half a file
    bar.close()
    print(f"trained to step {step} in {time.time() - t0:.0f} s this session", flush=True)


# --------------------------------------------------------------------------- evaluate
@torch.no_grad()
def text_embeddings(model: TinyCLIP, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return model.encode_text(tokenizer(prompts, padding="longest").input_ids)


@torch.no_grad()
def class_embeddings(model: TinyCLIP, tokenizer: CLIPTokenizer, templates: dict[str, list[str]]) -> torch.Tensor:
    """One unit vector per class: the normalised mean over its prompts (a prompt ensemble)."""
    rows = []
    for prompts in templates.values():
        rows.append(torch.nn.functional.normalize(text_embeddings(model, tokenizer, prompts).mean(0), dim=0))
    return torch.stack(rows)


COLOR_TEMPLATES = {c: [f"a {c} {s}" for s in SHAPES] for c in COLORS}
SHAPE_TEMPLATES = {s: [f"a {c} {s}" for c in COLORS] for s in SHAPES}


@torch.no_grad()
def evaluate(model: TinyCLIP, tokenizer: CLIPTokenizer, n: int = 1000, seed: int = HELD_OUT_SEED,
             retrieval_pool: int = 100) -> dict[str, float]:
    """Held-out metrics: caption->picture retrieval top-1 among ``retrieval_pool``,
    zero-shot colour and shape accuracy by prompt ensembles."""
    model.eval()
    world = ShapesWorld(seed=seed, complete_captions=True)
    images, ids, captions, attrs = batch_of(world, tokenizer, 0, n)
    image_emb = torch.cat([model.encode_image(images[i:i + 250]) for i in range(0, n, 250)])
    text_emb = torch.cat([model.encode_text(ids[i:i + 250]) for i in range(0, n, 250)])
    hits = []
    for start in range(0, n - retrieval_pool + 1, retrieval_pool):
        sims = text_emb[start:start + retrieval_pool] @ image_emb[start:start + retrieval_pool].T
        hits.append((sims.argmax(1) == torch.arange(retrieval_pool)).float())
    color_pred = (image_emb @ class_embeddings(model, tokenizer, COLOR_TEMPLATES).T).argmax(1)
    shape_pred = (image_emb @ class_embeddings(model, tokenizer, SHAPE_TEMPLATES).T).argmax(1)
    color_true = torch.tensor([COLORS.index(a["objects"][0]["color"]) for a in attrs])
    shape_true = torch.tensor([SHAPES.index(a["objects"][0]["shape"]) for a in attrs])
    return {"retrieval_top1": torch.cat(hits).mean().item(),
            "color_top1": (color_pred == color_true).float().mean().item(),
            "shape_top1": (shape_pred == shape_true).float().mean().item(),
            "temperature": 1 / model.logit_scale.exp().item(),
            "n": n, "retrieval_pool": retrieval_pool}


def trained_token_ids(state: dict) -> torch.Tensor:
    """Ids of the token-table rows a checkpoint's training touched: those with second-moment
    state in its SparseAdam (rows no batch contained never got a gradient, so keep their start)."""
    (table_state,) = state["optimizer"]["optimizers"][1]["state"].values()
    return (table_state["exp_avg_sq"] != 0).any(dim=1).nonzero().flatten()


def load_checkpoint(path: str | Path) -> TinyCLIP:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = TinyCLIP(TinyCLIPConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ministd.train.clip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the tiny CLIP")
    t.add_argument("--out", default="/work/runs/clip")
    t.add_argument("--steps", type=int, default=2500)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--width", type=int, default=128, help="text width (128: the shipped CLIP)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--save-every", type=int, default=100)
    e = sub.add_parser("evaluate", help="print held-out retrieval and zero-shot accuracy")
    group = e.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint")
    group.add_argument("--weights")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--threads", type=int, default=1)
    x = sub.add_parser("export", help="write float16 safetensors + JSON config")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", default="data/shapes_clip.safetensors")
    x.add_argument("--trained-rows", action="store_true",
                   help="store only the token-table rows training touched (and their ids)")
    args = parser.parse_args(argv)

    if args.command == "train":
        if args.steps < 1 or args.batch_size < 2:
            parser.error("--steps must be >= 1 and --batch-size >= 2 (contrastive needs negatives)")
        train(args)
    elif args.command == "evaluate":
        torch.set_num_threads(args.threads)
        model = load_checkpoint(args.checkpoint) if args.checkpoint else TinyCLIP.from_pretrained(args.weights)
        metrics = evaluate(model, CLIPTokenizer.from_vocab_file(), n=args.n)
        for key, value in metrics.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        ok = metrics["color_top1"] >= BAR and metrics["shape_top1"] >= BAR
        print(f"bar (colour and shape top-1 >= {BAR:.0%}): {'met' if ok else 'NOT met'}")
        sys.exit(0 if ok else 1)
    else:
        model = load_checkpoint(args.checkpoint)
        out = Path(args.out)
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        training = {"step": state["step"], **{k: v for k, v in state["args"].items()
                                              if k in ("batch_size", "lr", "seed", "steps")}}
        tensors, notes = None, {}
        if args.trained_rows:
            ids = trained_token_ids(state)
            tensors = pack_token_table(model.state_dict(), ids)
            notes = {"_token_table": f"only the {len(ids)} rows training touched are stored (with their ids); "
                                     f"the other {model.config.text.vocab_size - len(ids):,} load as zeros"}
        save_model(model, out, model.config.to_dict(), extra_config={"training": training, **notes},
                   metadata={"format": "pt", "model": "ministd TinyCLIP (ShapesWorld)"}, state_dict=tensors)
        # the numbers the book quotes, measured on the float16 weights as shipped
        shipped = TinyCLIP.from_pretrained(out)
        metrics = evaluate(shipped, CLIPTokenizer.from_vocab_file())
        config = {**model.config.to_dict(), "training": training, **notes,
                  "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}
        out.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.json')}")
        print(json.dumps(config["metrics"]))


if __name__ == "__main__":
    main()
