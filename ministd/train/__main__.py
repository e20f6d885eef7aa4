"""``python -m ministd.train {vae,clip,unet,classifier,adapters,sdxl} ...``: route to the training script of each shipped model."""

import importlib
import sys

MODELS = ("vae", "clip", "unet", "classifier", "adapters", "sdxl")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m ministd.train {{{','.join(MODELS)}}} [options]\n"
              "       python -m ministd.train MODEL --help   for the options of one model")
        return 0
    if argv[0] not in MODELS:
        print(f"ministd.train: error: unknown model {argv[0]!r}; choose one of {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"ministd.train.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
