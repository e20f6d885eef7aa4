"""ministd against the reference implementation (diffusers / transformers), same machine, same run.

    python benchmarks/bench.py            # the full set (about 15 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick    # under 2 minutes: smaller inputs, fewer repeats
    python benchmarks/bench.py --memory   # also peak memory (fresh subprocesses)
    python benchmarks/bench.py --only unet,pipeline
    python benchmarks/bench.py --only unet-bf16       # the bfloat16 U-Net rows alone
    python benchmarks/bench.py --only shapes --compile   # the book's model, eager and torch.compile'd

Both implementations get identical configs, weights (copied from the reference
model, which uses the same parameter names) and inputs; ministd's models have
``ministd.speed`` applied, as ``load_pipeline`` does. Runs alternate in pairs,
ours-theirs, theirs-ours, ... so that neither side always runs right after the
other (caches, allocator state) and a slow moment of the machine hits both.
Printed per row: the median seconds of each side and the ratio ministd /
reference (the median over >= 5 pairs, < 1 means ministd is faster) with its
spread (smallest and largest pair); for U-Net steps also the GFLOP of one call
(torch.utils.flop_counter) and each side's speed as a fraction of this
machine's own matmul peak in that dtype (a 4096 x 4096 GEMM, best of 5, same
threads, measured in the same run). The first line names the CPU and its
bfloat16 units (avx512_bf16, amx_bf16). Nothing here asserts a timing; results
and their explanation are in benchmarks/RESULTS.md.

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


PEAK_GFLOPS: dict[torch.dtype, float] = {}   # this machine's matmul peak, measured in this run


def matmul_peak(dtype: torch.dtype, side: int = 4096) -> float:
    """GFLOP/s of one side x side GEMM in ``dtype``, best of 5, at the current thread count."""
    if dtype not in PEAK_GFLOPS:
        a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
        with torch.inference_mode():
            best = min(_timeit(lambda: a @ b, 6)[1:])
        PEAK_GFLOPS[dtype] = 2 * side ** 3 / best / 1e9
        print(f"matmul peak, {str(dtype).removeprefix('torch.'):<9} {side}x{side}: {PEAK_GFLOPS[dtype]:7.0f} GFLOP/s",
              flush=True)
    return PEAK_GFLOPS[dtype]


def count_flops(fn) -> int:
    """Floating-point operations of one call (matmuls and convolutions; torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return counter.get_total_flops()


def compare(name: str, ours, theirs, pairs: int = 5, warmup: int = 1, dtype: torch.dtype | None = None,
            flops: int | None = None) -> dict:
    """Time two zero-argument callables in ``pairs`` alternating pairs; print and return the summary.

    The ratio is the median over pairs of ministd / reference (< 1: ministd faster), with
    the smallest and largest pair's ratio as its spread. With ``dtype`` and ``flops``, each
    side's speed is also printed as a fraction of this machine's matmul peak in that dtype.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            ours()
            theirs()
        t_ours, t_theirs = [], []
        for i in range(pairs):
            first, second = ((ours, t_ours), (theirs, t_theirs))[:: 1 if i % 2 == 0 else -1]
            for fn, times in (first, second):
                times += _timeit(fn, 1)
    ratios = sorted(a / b for a, b in zip(t_ours, t_theirs))
    row = {"benchmark": name, "pairs": pairs, "ministd_median": statistics.median(t_ours), "ministd_min": min(t_ours),
           "reference_median": statistics.median(t_theirs), "reference_min": min(t_theirs),
           "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}
    peak = ""
    if dtype is not None and flops:
        gflops = matmul_peak(dtype)
        row["gflop"] = flops / 1e9
        row["ministd_peak_fraction"] = flops / row["ministd_median"] / 1e9 / gflops
        row["reference_peak_fraction"] = flops / row["reference_median"] / 1e9 / gflops
        peak = (f"   {flops / 1e9:.0f} GFLOP: {row['ministd_peak_fraction']:.0%} / "
                f"{row['reference_peak_fraction']:.0%} of peak")
    print(f"{name:<56} ministd {row['ministd_median']:8.4f} s   reference {row['reference_median']:8.4f} s   "
          f"ratio {row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}, {pairs} pairs){peak}", flush=True)
    return row


# ------------------------------------------------------------------ the models

@functools.cache  # built once per process: the pipeline benchmark reuses them
def unet_pair(config_name: str = "sd1", width: float = 1.0):
    """ministd's U-Net (with ministd.speed applied, as load_pipeline does) and diffusers', same
    weights; ``width`` scales every level's channels (0.5: SD 1.5's levels at 160-640)."""
    import diffusers
    from ministd import speed
    from ministd import unet as U

    config = getattr(U, config_name)()
    config.block_out_channels = tuple(int(c * width) for c in config.block_out_channels)
    ref = diffusers.UNet2DConditionModel(**config.to_diffusers_config()).eval()
    ours = U.UNet(config).eval()
    ours.load_state_dict(ref.state_dict())
    return speed.optimize(ours), ref, config


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
    from ministd import speed
    return speed.optimize(ours), ref


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

def _unet_step(width: float, side: int, dtype: torch.dtype, quick: bool, rows: list, label: str) -> dict:
    ours, ref, config = unet_pair("sd1", width)
    if dtype != torch.float32:
        ours, ref = copy.deepcopy(ours).to(dtype), copy.deepcopy(ref).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g).to(dtype)
    ctx = torch.randn(2, 77, config.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([500, 500])
    run_ref = lambda: ref(x, t, encoder_hidden_states=ctx).sample
    row = compare(f"U-Net step SD1.5 {label}, {str(dtype).removeprefix('torch.')}, latent {side}, batch 2",
                  lambda: ours(x, t, ctx), run_ref, pairs=3 if quick else 5, dtype=dtype,
                  flops=count_flops(run_ref))
    rows.append(row)
    return row


def bench_unet(quick: bool, rows: list):
    """SD 1.5's U-Net at full widths (320-1280) and half widths (160-640), float32."""
    _unet_step(0.5, 32, torch.float32, quick, rows, "half widths")
    _unet_step(1.0, 32, torch.float32, quick, rows, "full widths")
    if not quick:
        _unet_step(1.0, 64, torch.float32, quick, rows, "full widths")


def bench_vae(quick: bool, rows: list):
    ours, ref = vae_pair()
    g = torch.Generator().manual_seed(0)
    for side in ((32,) if quick else (32, 64)):
        z = torch.randn(1, 4, side, side, generator=g)
        rows.append(compare(f"VAE decode SD, {side * 8}x{side * 8}", lambda: ours.decode(z),
                            lambda: ref.decode(z).sample, pairs=3 if quick else 5))


def bench_text(quick: bool, rows: list):
    ours, ref = text_pair()
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0))
    rows.append(compare("text encoder CLIP-L, 77 tokens, batch 2", lambda: ours(ids), lambda: ref(ids),
                        pairs=5 if quick else 15))


def bench_unet_bf16(quick: bool, rows: list):
    """The U-Net step in bfloat16 (both implementations cast alike), and ministd's bfloat16
    step against its own float32 step (the speed-up the bf16 units give).

    With --quick, skipped on an x86 CPU without bfloat16 units (no avx512_bf16 / amx_bf16 in
    /proc/cpuinfo): there torch emulates bfloat16, one step takes many minutes, and CI's
    quick run would spend its time on a figure that only says "no bf16 units here"."""
    flags = _cpu_flags()
    if quick and flags is not None and "avx2" in flags and not flags & {"avx512_bf16", "amx_bf16"}:
        print("U-Net step bfloat16: skipped with --quick on this CPU (no avx512_bf16 / amx_bf16: "
              "bfloat16 is emulated); run without --quick to time it", flush=True)
        return
    for width, label in ((0.5, "half widths"),) + (() if quick else ((1.0, "full widths"),)):
        low = _unet_step(width, 32, torch.bfloat16, quick, rows, label)
        full = next((r for r in rows if r["benchmark"] == low["benchmark"].replace("bfloat16", "float32")), None)
        if full is None:
            full = _unet_step(width, 32, torch.float32, quick, rows, label)
        speedup = full["ministd_median"] / low["ministd_median"]
        print(f"  ministd bfloat16 vs its own float32, {label}: {speedup:.2f}x faster", flush=True)
        rows.append({"benchmark": f"ministd bf16 speed-up, {label}", "speedup": speedup})


def bench_pipeline(quick: bool, rows: list):
    """Prompt -> picture with SD 1.5-sized random weights, CFG 7.5, DDIM, both pipelines from the
    same start latents: 256x256 with 4 steps and 512x512 with 2 steps (128x128 with 2 if quick)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = pipeline_pair(Path(tmp))
    prompt = "a photograph of an astronaut riding a horse"
    for side, steps in (((128, 2),) if quick else ((256, 4), (512, 2))):
        latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
        kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, height=side, width=side, output_type="np")
        run_ours = lambda: ours.txt2img(prompt, latents=latents, **kwargs).images[0]
        run_ref = lambda: ref(prompt, latents=latents, **kwargs).images[0]
        with torch.inference_mode():
            gap = float(abs(run_ours() - run_ref()).max())
        print(f"  (same picture: max |ministd - reference| = {gap:.1e} on pixel values in [0, 1])")
        rows.append(compare(f"txt2img SD1.5-sized, {side}x{side}, {steps} DDIM steps, CFG", run_ours, run_ref,
                            pairs=3 if quick else 5, warmup=0))


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


def _cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo, None where there is no such file (macOS, Windows)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))


def cpu_description() -> str:
    """The CPU's model name and its bfloat16-relevant flags, from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = _cpu_flags() or set()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(shown) or 'no AVX-512'})"


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


_WRITE_FOLDER_CODE = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from benchmarks.bench import pipeline_pair
_, ref = pipeline_pair(Path({folder!r}) / "vocab")
ref.save_pretrained({folder!r})
"""

_LOAD_CODE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

impl, folder, dtype = {impl!r}, {folder!r}, getattr(torch, {dtype!r})
prompt = "a photograph of an astronaut riding a horse"
kwargs = dict(num_inference_steps=2, guidance_scale=7.5, height=512, width=512, output_type="np")
start = time.perf_counter()
if impl == "ministd":
    import ministd
    pipe = ministd.load_pipeline(folder, dtype=dtype)
    load_s = time.perf_counter() - start
    pipe.progress_bar = False
    run = lambda: pipe.txt2img(prompt, seed=0, **kwargs)
else:
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
loaded_mb = status_mb("VmHWM")
with torch.inference_mode():
    run()
print(json.dumps({{"load_s": load_s, "peak_loaded_mb": loaded_mb, "peak_mb": status_mb("VmHWM")}}))
"""


def bench_load(quick: bool, rows: list):
    """Loading a diffusers folder and drawing one 512x512 picture (2 DDIM steps, CFG), SD 1.5-sized
    random weights (4.1 GB in float32), each in a fresh process: load time (warm file cache: the
    folder was just written) and peak resident memory, after loading and after the picture, per
    dtype. SDXL base and refiner figures are computed from their parameter counts (meta device).
    Skipped with --quick (it writes a 4 GB folder)."""
    import importlib.util
    import tempfile

    bench_load_computed(rows)
    if quick:
        print("load + peak memory, SD 1.5-sized folder: skipped with --quick (writes 4 GB)")
        return
    low_mem = importlib.util.find_spec("accelerate") is not None
    print(f"  (diffusers loads {'with' if low_mem else 'without'} accelerate installed: "
          f"{'its low-memory path' if low_mem else 'random init, then copy'})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "sd15")
        subprocess.run([sys.executable, "-c", _WRITE_FOLDER_CODE.format(root=str(ROOT), folder=folder)],
                       check=True, capture_output=True)
        for dtype in ("float32", "bfloat16"):
            found: dict[str, list[dict]] = {"ministd": [], "reference": []}
            for _ in range(2):                  # alternate, twice: load times vary with the machine
                for impl in found:
                    code = _LOAD_CODE.format(root=str(ROOT), impl=impl, folder=folder, dtype=dtype)
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                    if out.returncode:
                        raise RuntimeError(f"{impl} {dtype} load failed:\n{out.stderr[-2000:]}")
                    found[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
            summary = {impl: {"load_s": min(r["load_s"] for r in runs),
                              "peak_loaded_mb": max(r["peak_loaded_mb"] for r in runs),
                              "peak_mb": max(r["peak_mb"] for r in runs)} for impl, runs in found.items()}
            ours, ref = summary["ministd"], summary["reference"]
            print(f"load SD1.5-sized folder, {dtype:<8}: ministd {ours['load_s']:5.2f} s, peak "
                  f"{ours['peak_loaded_mb'] / 1024:5.2f} GB loaded / {ours['peak_mb'] / 1024:5.2f} GB after a picture"
                  f"   reference {ref['load_s']:5.2f} s, {ref['peak_loaded_mb'] / 1024:5.2f} / "
                  f"{ref['peak_mb'] / 1024:5.2f} GB   ratio load {ours['load_s'] / ref['load_s']:.2f}, "
                  f"peak {ours['peak_mb'] / ref['peak_mb']:.2f}", flush=True)
            rows.append({"benchmark": f"load SD1.5-sized folder {dtype}", "accelerate": low_mem, **summary})
        by_dtype = {r["benchmark"].split()[-1]: r["ministd"]["peak_mb"] for r in rows
                    if r["benchmark"].startswith("load SD1.5")}
        print(f"  ministd peak, bfloat16 / float32: {by_dtype['bfloat16'] / by_dtype['float32']:.2f}")


def bench_load_computed(rows: list):
    """Parameters per component and the memory their weights need per dtype, from the configs
    (networks built on the meta device: nothing allocated)."""
    from ministd import unet as U
    from ministd.text import CLIPTextConfig, CLIPTextModel
    from ministd.vae import AutoencoderKL, VAEConfig
    from ministd.weights import build_on_meta

    def count(build) -> int:
        return sum(p.numel() for p in build_on_meta(build).parameters())

    vae = count(lambda: AutoencoderKL(VAEConfig()))
    families = {
        "SD 1.5": {"unet": count(lambda: U.UNet(U.sd1())), "text": count(lambda: CLIPTextModel(CLIPTextConfig.clip_l())),
                   "vae": vae},
        "SDXL base": {"unet": count(lambda: U.UNet(U.sdxl_base())),
                      "text": count(lambda: CLIPTextModel(CLIPTextConfig.clip_l()))
                      + count(lambda: CLIPTextModel(CLIPTextConfig.openclip_bigg())), "vae": vae},
        "SDXL refiner": {"unet": count(lambda: U.UNet(U.sdxl_refiner())),
                         "text": count(lambda: CLIPTextModel(CLIPTextConfig.openclip_bigg())), "vae": vae},
    }
    for name, parts in families.items():
        total = sum(parts.values())
        print(f"weights of {name:<12}: U-Net {parts['unet'] / 1e6:7.1f} M, text {parts['text'] / 1e6:6.1f} M, "
              f"VAE {parts['vae'] / 1e6:5.1f} M parameters = {total * 4 / 2**30:5.2f} GB float32, "
              f"{total * 2 / 2**30:5.2f} GB bfloat16/float16", flush=True)
        rows.append({"benchmark": f"weights {name}", "parameters": parts, "gb_float32": total * 4 / 2**30})


BENCHMARKS = {"text": bench_text, "vae": bench_vae, "unet": bench_unet, "pipeline": bench_pipeline,
              "shapes": bench_shapes, "unet-bf16": bench_unet_bf16, "load": bench_load}
DEFAULT = ["text", "vae", "unet", "unet-bf16", "pipeline", "shapes", "load"]


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

    print(f"{time.strftime('%Y-%m-%d')} | {cpu_description()} | "
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
