"""ministd against the reference implementation (diffusers / transformers), same machine, same run.

    python benchmarks/bench.py            # the full set (about 15 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick    # under 2 minutes: smaller inputs, fewer repeats
    python benchmarks/bench.py --memory   # also peak memory (fresh subprocesses)
    python benchmarks/bench.py --only unet,pipeline
    python benchmarks/bench.py --only unet-bf16       # bfloat16 (not in the default set)
    python benchmarks/bench.py --only shapes --compile   # the book's model, eager and torch.compile'd

Both implementations get identical configs, weights (copied from the reference
model, which uses the same parameter names) and inputs. Runs alternate in the
order ours-theirs, theirs-ours, ... so that neither side always runs right
after the other (caches, allocator state) and a slow moment of the machine
hits both. Printed: min and median seconds of each, and the ratio ministd /
reference of the medians (< 1 means ministd is faster). Nothing here asserts
a timing; results and their explanation are in benchmarks/RESULTS.md.

Peak memory (``--memory``, Linux) runs each measurement in a fresh subprocess
holding only that implementation's model, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and reports how far one call's peak resident size
(``VmHWM``) rose above the loaded weights: for the first call, and the median
of three more (the sampling loop's steady state).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _timeit(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, ours, theirs, repeats: int, warmup: int = 1) -> dict:
    """Time two zero-argument callables, interleaved; print and return the summary."""
    with torch.inference_mode():
        for _ in range(warmup):
            ours()
            theirs()
        t_ours, t_theirs = [], []
        for i in range(repeats):
            if i % 2 == 0:
                t_ours += _timeit(ours, 1)
                t_theirs += _timeit(theirs, 1)
            else:
                t_theirs += _timeit(theirs, 1)
                t_ours += _timeit(ours, 1)
    row = {"benchmark": name, "ministd_min": min(t_ours), "ministd_median": statistics.median(t_ours),
           "reference_min": min(t_theirs), "reference_median": statistics.median(t_theirs)}
    row["ratio"] = row["ministd_median"] / row["reference_median"]
    print(f"{name:<52} ministd {row['ministd_median']:8.4f} s (min {row['ministd_min']:.4f})   "
          f"reference {row['reference_median']:8.4f} s (min {row['reference_min']:.4f})   "
          f"ratio {row['ratio']:.3f}", flush=True)
    return row


# ------------------------------------------------------------------ the models

@functools.cache  # built once per process: the pipeline benchmark reuses them
def unet_pair(config_name: str = "sd1"):
    import diffusers
    from ministd import unet as U

    config = getattr(U, config_name)()
    ref = diffusers.UNet2DConditionModel(**config.to_diffusers_config()).eval()
    ours = U.UNet(config).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref, config


@functools.cache  # built once per process: the pipeline benchmark reuses them
def vae_pair():
    import diffusers
    from ministd.vae import AutoencoderKL, VAEConfig

    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32).eval()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@functools.cache  # built once per process: the pipeline benchmark reuses them
def text_pair():
    import transformers
    from ministd.text import CLIPTextConfig, CLIPTextModel

    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)).eval()
    ours = CLIPTextModel(CLIPTextConfig.clip_l()).eval()
    ours.load_transformers_state_dict(ref.state_dict())
    return ours, ref


def pipeline_pair(folder: Path):
    """The SD 1.5-sized random model as two complete text-to-image pipelines (DDIM sampler).

    The tokenizer files (vocab.json, merges.txt) are written into ``folder`` from
    the CLIP vocabulary ministd ships, for transformers' tokenizer to read.
    """
    import diffusers
    import transformers
    from ministd.pipelines import StableDiffusionPipeline
    from ministd.samplers import from_scheduler_config
    from ministd.tokenizer import CLIPTokenizer, read_merges_gz, vocab_from_merges

    merges = read_merges_gz()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab_from_merges(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    unet, ref_unet, _ = unet_pair("sd1")
    vae, ref_vae = vae_pair()
    text, ref_text = text_pair()
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref = diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=ref_text, unet=ref_unet, scheduler=scheduler,
        tokenizer=transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                             pad_token="<|endoftext|>", model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline(CLIPTokenizer.from_pretrained(folder), text, unet, vae,
                                   from_scheduler_config({"_class_name": "DDIMScheduler", **scheduler.config}))
    ours.progress_bar = False
    return ours, ref


# ------------------------------------------------------------------ benchmarks

def bench_unet(quick: bool, rows: list):
    ours, ref, config = unet_pair("sd1")
    g = torch.Generator().manual_seed(0)
    for side in ((32,) if quick else (32, 64)):
        x = torch.randn(2, 4, side, side, generator=g)
        ctx = torch.randn(2, 77, config.cross_attention_dim, generator=g)
        t = torch.tensor([500, 500])
        rows.append(compare(f"U-Net step SD1.5, latent {side}x{side}, batch 2", lambda: ours(x, t, ctx),
                            lambda: ref(x, t, encoder_hidden_states=ctx).sample,
                            repeats=4 if quick else (8 if side == 32 else 4)))


def bench_vae(quick: bool, rows: list):
    ours, ref = vae_pair()
    g = torch.Generator().manual_seed(0)
    for side in ((32,) if quick else (32, 64)):
        z = torch.randn(1, 4, side, side, generator=g)
        rows.append(compare(f"VAE decode SD, {side * 8}x{side * 8}", lambda: ours.decode(z),
                            lambda: ref.decode(z).sample, repeats=2 if quick else (6 if side == 32 else 3)))


def bench_text(quick: bool, rows: list):
    ours, ref = text_pair()
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0))
    rows.append(compare("text encoder CLIP-L, 77 tokens, batch 2", lambda: ours(ids), lambda: ref(ids),
                        repeats=6 if quick else 30))


def bench_unet_bf16(quick: bool, rows: list):
    """The U-Net step in bfloat16 (both implementations cast alike). Not in the default set."""
    ours, ref, config = unet_pair("sd1")
    ours, ref = copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for side in ((32,) if quick else (32, 64)):
        x = torch.randn(2, 4, side, side, generator=g).bfloat16()
        ctx = torch.randn(2, 77, config.cross_attention_dim, generator=g).bfloat16()
        t = torch.tensor([500, 500])
        rows.append(compare(f"U-Net step SD1.5 bfloat16, latent {side}x{side}, batch 2", lambda: ours(x, t, ctx),
                            lambda: ref(x, t, encoder_hidden_states=ctx).sample, repeats=4))


def bench_pipeline(quick: bool, rows: list):
    """Prompt -> picture with CFG 7.5 and DDIM, both pipelines from the same start latents."""
    import tempfile

    side, steps = (128, 4) if quick else (256, 20)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = pipeline_pair(Path(tmp))
    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    prompt = "a photograph of an astronaut riding a horse"
    kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, height=side, width=side, output_type="np")
    run_ours = lambda: ours.txt2img(prompt, latents=latents, **kwargs).images[0]
    run_ref = lambda: ref(prompt, latents=latents, **kwargs).images[0]
    with torch.inference_mode():
        gap = float(abs(run_ours() - run_ref()).max())
    print(f"  (same picture: max |ministd - reference| = {gap:.1e} on pixel values in [0, 1])")
    rows.append(compare(f"txt2img SD1.5-sized, {side}x{side}, {steps} DDIM steps, CFG", run_ours, run_ref,
                        repeats=2, warmup=0))


def bench_shapes(quick: bool, rows: list, compile_unet: bool = False):
    """The shipped ShapesWorld model, prompt -> 64x64 picture (target < 0.5 s on 2 cores).

    ``compile_unet``: also time it after ``pipe.unet.compile()`` (torch.compile, opt-in):
    the first call pays the compilation, printed separately.
    """
    from ministd.pipelines import load_pipeline

    try:
        pipe = load_pipeline("shapes")
    except FileNotFoundError as exc:
        print(f"shapes model end to end: skipped ({exc})")
        return
    pipe.progress_bar = False
    picture = lambda: pipe.txt2img("a red circle", num_inference_steps=20, guidance_scale=7.5, seed=0)
    for compiled in ((False, True) if compile_unet else (False,)):
        if compiled:
            pipe.unet.compile()
        first = _timeit(picture, 1)[0]
        times = _timeit(picture, 3 if quick else 10)
        name = "shapes model, prompt -> image, 20 steps, CFG" + (", compiled" if compiled else "")
        print(f"{name:<52} ministd {statistics.median(times):8.4f} s (min {min(times):.4f}); target < 0.5 s"
              + (f"; first call {first:.1f} s" if compiled else ""), flush=True)
        rows.append({"benchmark": "shapes end to end" + (" compiled" if compiled else ""),
                     "ministd_median": statistics.median(times), "ministd_min": min(times), "first_call": first})


# ------------------------------------------------------------------ memory

_MEMORY_CODE = """
import gc, sys, torch
sys.path.insert(0, {root!r})
from benchmarks.bench import unet_pair, vae_pair

def status_mb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

which, impl = {which!r}, {impl!r}
torch.manual_seed(0)
with torch.inference_mode():
    if which == 'unet':
        ours, ref, config = unet_pair.__wrapped__('sd1')
        x = torch.randn(2, 4, 64, 64); ctx = torch.randn(2, 77, config.cross_attention_dim)
        t = torch.tensor([500, 500])
        call = (lambda: ours(x, t, ctx)) if impl == 'ministd' else (lambda: ref(x, t, encoder_hidden_states=ctx))
    else:
        ours, ref = vae_pair.__wrapped__()
        z = torch.randn(1, 4, 64, 64)
        call = (lambda: ours.decode(z)) if impl == 'ministd' else (lambda: ref.decode(z))
    if impl == 'ministd':
        del ref
    else:
        del ours
    gc.collect()
    for _ in range(4):
        base = status_mb('VmRSS')
        open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current size
        call()
        print(status_mb('VmHWM') - base)
"""


def bench_memory(rows: list):
    for which in ("unet", "vae"):
        extra = {}
        for impl in ("ministd", "reference"):
            code = _MEMORY_CODE.format(root=str(ROOT), which=which, impl=impl)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peaks = [float(v) for v in out.stdout.split()[-4:]]
            # the first call also grows the allocator's pools; later ones are the sampling loop's
            extra[impl] = {"first": peaks[0], "steady": statistics.median(peaks[1:])}
        for when in ("first", "steady"):
            ours, theirs = extra["ministd"][when], extra["reference"][when]
            print(f"peak memory above the weights, {which:<4} {when + ' call' + ('s' if when == 'steady' else ''):<12}: "
                  f"ministd {ours:6.0f} MB   reference {theirs:6.0f} MB   ratio {ours / max(theirs, 1):.3f}", flush=True)
        rows.append({"benchmark": f"peak memory {which}", **extra})


BENCHMARKS = {"text": bench_text, "vae": bench_vae, "unet": bench_unet, "pipeline": bench_pipeline,
              "shapes": bench_shapes, "unet-bf16": bench_unet_bf16}
DEFAULT = ["text", "vae", "unet", "pipeline", "shapes"]     # unet-bf16 only when asked for


def _benchmark_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown or value!r}; choose from {list(BENCHMARKS)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (< 2 min)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (subprocesses)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the shapes model with its U-Net under torch.compile (about a minute to compile)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--only", type=_benchmark_names, default=DEFAULT,
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    print(f"{time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()} | "
          f"{torch.get_num_threads()} threads | torch {torch.__version__} | diffusers {diffusers.__version__} | "
          f"transformers {transformers.__version__}", flush=True)
    rows: list[dict] = []
    for name in args.only:
        if name == "shapes":
            bench_shapes(args.quick, rows, compile_unet=args.compile)
        else:
            BENCHMARKS[name](args.quick, rows)
    if args.memory:
        bench_memory(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
