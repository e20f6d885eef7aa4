"""Command line: ``python -m ministd {shapes,render,generate,info} ...``.

Errors in the arguments (and models or pictures that cannot be used) print one
line that says what is allowed and exit with status 2 (no traceback), like any
well-behaved Unix tool.

``generate`` draws a picture with the shipped model, a diffusers folder or a
single file of any family ministd loads (SD 1.x, SD 2.x, SDXL base; an SDXL
refiner after the base with ``--refiner``), shows a progress bar, and writes
the generation parameters into the PNG in the web UIs' layout
(:mod:`ministd.infotext`), which ``info`` prints back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: 'prog: error: message'."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(limit: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {limit}, got {text!r}")
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {limit}, got {value}")
        return value
    return check


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed from 0 to 2**63-1, got {text!r}")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer seed from 0 to 2**63-1, got {value}")
    return value


def _generation_seed(text: str) -> int:
    """A seed, or -1 for a random one (the web UIs' convention); the one used is written in the PNG."""
    if text.strip() == "-1":
        return -1
    return _seed(text)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value


def _side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}")
    if not 8 <= value <= 8192:
        raise argparse.ArgumentTypeError(f"expected a number of pixels from 8 to 8192, got {value}")
    return value


def _clip_skip(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise argparse.ArgumentTypeError(f"output must end in .png, .jpg or .webp, got {text!r}")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ministd", description="Stable Diffusion from first principles.")
    sub = parser.add_subparsers(dest="command", metavar="{shapes,render,generate,info}", parser_class=_Parser)

    shapes = sub.add_parser("shapes", help="render a captioned grid of ShapesWorld samples")
    shapes.add_argument("--n", type=_positive_int(1024), default=16, help="number of samples (1-1024)")
    shapes.add_argument("--seed", type=_seed, default=0, help="world seed (default 0)")
    shapes.add_argument("--objects", type=int, choices=(1, 2), default=1, help="objects per picture")
    shapes.add_argument("--scale", type=_positive_int(8), default=2, help="upscale each 64px picture")
    shapes.add_argument("-o", "--output", type=_output_path, default=Path("shapes.png"),
                        help="where to write the grid (default shapes.png)")

    render = sub.add_parser("render", help="draw a caption you wrote into its ground-truth picture")
    render.add_argument("caption", help='e.g. "a large yellow triangle at the bottom"')
    render.add_argument("--seed", type=_seed, default=0, help="fills attributes the caption leaves out")
    render.add_argument("-o", "--output", type=_output_path, default=Path("render.png"))

    gen = sub.add_parser("generate", help="text to image with a model (the shipped one by default)")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="shapes",
                     help='"shapes", a diffusers folder or a .safetensors file (SD 1.x, SD 2.x, SDXL base)')
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--sampler", default=None,
                     help='e.g. "euler_a" or "Euler a", "dpmpp_2m_karras" or "DPM++ 2M Karras", "ddim" '
                          "(default: the model's own)")
    gen.add_argument("--steps", type=_positive_int(1000), default=20)
    gen.add_argument("--guidance-scale", type=_number, default=None,
                     help="classifier-free guidance scale (default 7.5; 5.0 for SDXL)")
    gen.add_argument("--seed", type=_generation_seed, default=0, help="-1 draws a random seed (default 0)")
    gen.add_argument("--width", type=_side, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--height", type=_side, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--refiner", default=None, help="an SDXL refiner (folder or file) that finishes the picture")
    gen.add_argument("--refiner-start", type=_fraction, default=None,
                     help="fraction of the schedule where the refiner takes over (default 0.8)")
    gen.add_argument("--clip-skip", type=_clip_skip, default=None,
                     help="text-encoder layers to skip (ministd/diffusers count: the web UIs' 'clip skip 2' is 1)")
    gen.add_argument("--long-prompts", action="store_true",
                     help="read prompts over 75 tokens in 75-token windows, as the web UIs do")
    gen.add_argument("--emphasis", action="store_true", help="read (word:1.2), (word), [word] as the web UIs do")
    gen.add_argument("-o", "--output", type=_output_path, default=Path("out.png"))

    info = sub.add_parser("info", help="describe a checkpoint without loading it, or print a PNG's parameters")
    info.add_argument("path", help="a diffusers folder, a single .safetensors file, or a PNG made by generate "
                                   "(or by a web UI)")
    info.add_argument("--raw", action="store_true", help="for a PNG: print the parameters text as stored")
    info.add_argument("--allow-pickle", action="store_true",
                      help="also read pickled .ckpt/.bin/.pt files (with torch.load(weights_only=True))")
    return parser


def _captioned_grid(n: int, seed: int, objects: int, scale: int):
    """A grid of samples with their captions written under each picture."""
    from PIL import Image, ImageDraw
    from ministd.data import ShapesWorld

    world = ShapesWorld(seed=seed, objects=objects)
    cols = min(n, 4)
    rows = -(-n // cols)
    side = 64 * scale
    text_h = 44
    sheet = Image.new("RGB", (cols * (side + 8) + 8, rows * (side + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        image, caption, _ = world[i]
        r, c = divmod(i, cols)
        x, y = 8 + c * (side + 8), 8 + r * (side + text_h + 8)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        lines, line = [], ""
        for word in caption.split():  # wrap to the picture's width
            trial = f"{line} {word}".strip()
            if draw.textlength(trial) > side and line:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
        draw.multiline_text((x, y + side + 2), "\n".join(lines[:3]), fill="black", spacing=1)
    return sheet


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())          # one line, whatever the error says


class _UsageError(ValueError):
    pass


def _generate(args, parser) -> int:
    """txt2img (and the SDXL base -> refiner hand-off); the PNG carries the parameters."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ministd generate: warning: {_one_line(message)}", file=sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        image, text = _draw(args)
    except (FileNotFoundError, NotImplementedError, ValueError, OSError) as exc:   # _UsageError too
        parser.exit(2, f"ministd generate: error: {_one_line(exc)}\n")
    finally:
        warnings.showwarning = previous
    from ministd.infotext import png_info

    if args.output.suffix.lower() == ".png":
        image.save(args.output, pnginfo=png_info(text))
        print(f"wrote {args.output}")
    else:
        image.save(args.output)
        print(f"wrote {args.output} (generation parameters are kept in PNG files only)")
    print(text)
    return 0


def _draw(args):
    """Load, check, generate; returns (picture, parameters text)."""
    import inspect
    import random

    from ministd.infotext import format_infotext, model_name, sampler_for_infotext
    from ministd.pipelines import StableDiffusionXLPipeline, load_pipeline

    if args.refiner_start is not None and args.refiner is None:
        raise _UsageError("--refiner-start needs --refiner PATH (an SDXL refiner)")
    pipe = load_pipeline(args.model)
    sdxl = isinstance(pipe, StableDiffusionXLPipeline)
    if sdxl and pipe.is_refiner:
        raise _UsageError(f"{args.model} is an SDXL refiner: it only finishes pictures; give an SDXL base as "
                          "--model and this one as --refiner")
    refiner = None
    if args.refiner is not None:
        if not sdxl:
            raise _UsageError(f"--refiner continues an SDXL base, but {args.model} is not one")
        refiner = load_pipeline(args.refiner)
        if not (isinstance(refiner, StableDiffusionXLPipeline) and refiner.is_refiner):
            raise _UsageError(f"--refiner {args.refiner} is not an SDXL refiner (its model index or keys say "
                              "otherwise); give an SDXL refiner folder or file")
    sampler = pipe._sampler(args.sampler)                 # checks the name before any work
    guidance = args.guidance_scale
    if guidance is None:
        guidance = inspect.signature(pipe.txt2img).parameters["guidance_scale"].default
    seed = random.randrange(2**32) if args.seed == -1 else args.seed
    text_options = dict(clip_skip=args.clip_skip, long_prompts=args.long_prompts, emphasis=args.emphasis)
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=guidance, seed=seed, sampler=args.sampler, **text_options)
    pipe.progress_bar = True
    start = 0.8 if args.refiner_start is None else args.refiner_start
    if refiner is None:
        out = pipe.txt2img(args.prompt, height=args.height, width=args.width, **common)
    else:
        refiner.progress_bar = True
        base = pipe.txt2img(args.prompt, height=args.height, width=args.width, denoising_end=start,
                            output_type="latent", **common)
        out = refiner.img2img(args.prompt, base.latents, denoising_start=start, **common)
    image = out.images[0]
    clip_skip = pipe.clip_skip if args.clip_skip is None else args.clip_skip
    params = {"Steps": args.steps, **sampler_for_infotext(sampler.name, sampler.config.use_karras_sigmas),
              "CFG scale": guidance, "Seed": seed, "Size": f"{image.width}x{image.height}",
              "Model": model_name(args.model),
              "Clip skip": clip_skip + 1 if clip_skip else None,   # the web UIs count from 1
              # A1111 writes its emphasis mode when a prompt has brackets and the mode is not its
              # default; "None" (brackets are plain text) is what ministd does without --emphasis
              "Emphasis": "None" if not args.emphasis and any(c in args.prompt + (args.negative_prompt or "")
                                                              for c in "([") else None,
              "Refiner": model_name(args.refiner) if refiner is not None else None,
              "Refiner switch at": start if refiner is not None else None}
    return image, format_infotext(args.prompt, args.negative_prompt, params)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "shapes":
        _captioned_grid(args.n, args.seed, args.objects, args.scale).save(args.output)
        print(f"wrote {args.n} ShapesWorld samples to {args.output}")
        return 0
    if args.command == "render":
        from ministd.data import ShapesWorld
        try:
            image, attrs = ShapesWorld().render(args.caption, seed=args.seed)
        except ValueError as exc:
            parser.exit(2, f"ministd render: error: {exc}\n")
        image.save(args.output)
        print(f"wrote {args.output}: {attrs}")
        return 0
    if args.command == "generate":
        return _generate(args, parser)
    if args.command == "info":
        from ministd import infotext

        try:
            if infotext.is_png(args.path) or Path(args.path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                text = infotext.read_png_parameters(args.path)
                if args.raw:
                    print(text)
                else:
                    for key, value in infotext.parse_infotext(text).items():
                        print(f"{key}: {value}")
                return 0
            from ministd.checkpoints import inspect

            print(inspect(args.path, allow_pickle=args.allow_pickle).summary())
        except (FileNotFoundError, ValueError, OSError) as exc:
            parser.exit(2, f"ministd info: error: {_one_line(exc)}\n")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
