"""Command line: ``python -m ministd {shapes,render,generate,info} ...``.

Errors in the arguments print one line that says what is allowed and exit
with status 2 (no traceback), like any well-behaved Unix tool.
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
    gen.add_argument("--model", default="shapes", help='"shapes", a diffusers folder or a .safetensors file')
    gen.add_argument("--steps", type=_positive_int(1000), default=20)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--seed", type=_seed, default=0)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("-o", "--output", type=_output_path, default=Path("out.png"))

    info = sub.add_parser("info", help="describe a checkpoint (family, layout, sizes) without loading it")
    info.add_argument("path", help="a diffusers folder or a single .safetensors file")
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
        from ministd.pipelines import load_pipeline
        try:
            pipe = load_pipeline(args.model)
            out = pipe.txt2img(args.prompt, negative_prompt=args.negative_prompt,
                               num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                               seed=args.seed)
        except (FileNotFoundError, NotImplementedError, ValueError) as exc:
            parser.exit(1 if isinstance(exc, (FileNotFoundError, NotImplementedError)) else 2,
                        f"ministd generate: error: {exc}\n")
        out.images[0].save(args.output)
        print(f"wrote {args.output}")
        return 0
    if args.command == "info":
        from ministd.checkpoints import inspect
        try:
            print(inspect(args.path, allow_pickle=args.allow_pickle).summary())
        except (FileNotFoundError, ValueError, OSError) as exc:
            message = " ".join(str(exc).split())          # one line, whatever the error says
            parser.exit(2, f"ministd info: error: {message}\n")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
