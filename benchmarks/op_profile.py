"""Where the time goes: an operator profile of ministd beside the reference, one call each.

    python benchmarks/op_profile.py unet            # SD 1.5-sized U-Net step, latent 32x32, batch 2
    python benchmarks/op_profile.py unet --side 64
    python benchmarks/op_profile.py vae             # SD VAE decode, 256x256
    python benchmarks/op_profile.py text            # CLIP-L, 77 tokens, batch 2
    python benchmarks/op_profile.py unet --onednn   # what oneDNN (PyTorch's CPU convolution) spends its time on

The first form prints ``torch.profiler``'s table of operators by self time for
both implementations (same weights and inputs as benchmarks/bench.py). The
``--onednn`` form reruns the model in a subprocess with ``ONEDNN_VERBOSE=1``
and adds up oneDNN's own timings by primitive: convolutions, and the reorders
that re-lay weights and activations out into its blocked formats. That is how
the per-call weight re-layout behind ``ministd.speed.FastConv2d`` was found
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import text_pair, unet_pair, vae_pair  # noqa: E402


def calls(which: str, side: int):
    """(ministd call, reference call) as zero-argument functions."""
    g = torch.Generator().manual_seed(0)
    if which == "unet":
        ours, ref, config = unet_pair("sd1")
        x = torch.randn(2, 4, side, side, generator=g)
        ctx = torch.randn(2, 77, config.cross_attention_dim, generator=g)
        t = torch.tensor([500, 500])
        return lambda: ours(x, t, ctx), lambda: ref(x, t, encoder_hidden_states=ctx).sample
    if which == "vae":
        ours, ref = vae_pair()
        z = torch.randn(1, 4, side, side, generator=g)
        return lambda: ours.decode(z), lambda: ref.decode(z).sample
    ours, ref = text_pair()
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    return lambda: ours(ids), lambda: ref(ids)


def operator_tables(which: str, side: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    ours, theirs = calls(which, side)
    with torch.inference_mode():
        ours(), theirs()                                   # warm-up: first calls allocate
        for name, fn in (("ministd", ours), ("reference", theirs)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"===== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def onednn_summary(which: str, side: int, impl: str) -> dict[str, tuple[float, int]]:
    """Milliseconds and calls per oneDNN primitive during one (warm) call of ``impl``."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "import torch\n"
            "from benchmarks.op_profile import calls\n"
            f"fns = calls({which!r}, {side})\n"
            f"fn = fns[{0 if impl == 'ministd' else 1}]\n"
            "with torch.inference_mode():\n"
            "    fn()\n"
            "    print('=== measured call', flush=True)\n"
            "    fn()\n")
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return summarise_onednn(out.split("=== measured call", 1)[-1].splitlines())


def summarise_onednn(lines) -> dict[str, tuple[float, int]]:
    """Add up oneDNN verbose ``exec`` lines: {primitive: (milliseconds, calls)}.

    A line reads ``onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,PROP,MEMORY,ATTRS,AUX,SHAPE,MS``.
    Reorders are split by what they move: a blocked weight layout blocks two
    dimensions (e.g. ``ABcd16b16a``), an activation layout one (``aBcd16b``).
    """
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for line in lines:
        fields = line.split(",")
        if len(fields) < 9 or not line.startswith("onednn_verbose") or fields[3] != "exec":
            continue
        kind = fields[5]
        if kind == "reorder":
            layouts = re.findall(r"blocked:([A-Za-z0-9]+)", fields[8])
            is_weight = any(sum(ch.isupper() for ch in layout) >= 2 for layout in layouts)
            kind = "reorder of a weight" if is_weight else "reorder of activations"
        totals[kind][0] += float(fields[-1])
        totals[kind][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("unet", "vae", "text"))
    parser.add_argument("--side", type=int, default=32, help="latent side for unet / vae (default 32)")
    parser.add_argument("--rows", type=int, default=15, help="operators to list (default 15)")
    parser.add_argument("--onednn", action="store_true", help="sum oneDNN's verbose timings instead")
    args = parser.parse_args(argv)
    if args.side < 8 or args.side % 8:
        parser.error(f"--side must be a positive multiple of 8, got {args.side}")
    print(f"{args.which}, side {args.side}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if not args.onednn:
        operator_tables(args.which, args.side, args.rows)
        return 0
    for impl in ("ministd", "reference"):
        summary = onednn_summary(args.which, args.side, impl)
        total = sum(ms for ms, _ in summary.values())
        print(f"===== {impl}: oneDNN total {total:.0f} ms")
        for kind, (ms, n) in sorted(summary.items(), key=lambda kv: -kv[1][0]):
            print(f"  {kind:<26} {ms:8.1f} ms in {n:4d} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
