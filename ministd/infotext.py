"""Generation parameters inside a PNG, as the popular web UIs write and read them.

AUTOMATIC1111's stable-diffusion-webui ("A1111"; ``modules/processing.py``,
``create_infotext``) stores how a picture was made in a PNG text chunk named
``parameters``, and its "PNG Info" tab reads it back
(``modules/infotext_utils.py``, ``parse_generation_parameters``). Forge, SD.Next,
image hosts and many viewers read the same layout ("infotext")::

    a red circle, (masterpiece:1.2)
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: v1-5-pruned

- the prompt (it may span several lines);
- ``Negative prompt: ...`` (left out when there is none; it may span lines too);
- one last line of ``Key: value`` pairs joined by ", ", in this order for the
  keys ministd writes: Steps, Sampler, Schedule type (only "Karras"), CFG scale,
  Seed, Size (*width* x *height*), Model (the file or folder name, with "," and
  ":" removed, as A1111 does), Clip skip (A1111's count, only when > 1),
  Emphasis ("None" when a prompt has brackets that were read as plain text:
  A1111 writes its emphasis mode when it is not its default "Original"),
  Refiner, Refiner switch at. A value holding ",", ":" or a line break is
  written as a JSON string in double quotes.

A1111 reads the last line as parameters only when it holds at least three
pairs; otherwise it belongs to the prompt. :func:`parse_infotext` follows that
rule.

Sampler names are A1111's display names (``SAMPLER_NAMES``); Karras sigmas are
the separate "Schedule type: Karras" of A1111 1.9 and later (older files write
"DPM++ 2M Karras", which :func:`sampler_from_infotext` reads as well).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# ministd sampler name -> A1111's display name (modules/sd_samplers_kdiffusion.py,
# sd_samplers_timesteps.py; "DDPM" as Forge names it)
SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
}
PNG_KEY = "parameters"

# one "Key: value" pair of the last line: a key of words, spaces, "-" and "/", then a
# quoted JSON string or anything up to the next comma (as A1111's re_param)
_PAIR = re.compile(r"""
    \s* (\w[\w \-/]+) : \s*       # the key
    ( "(?:\\.|[^\\"])+"            # a value in double quotes (JSON string)
    | [^,]* )                      # or anything up to the next comma
    (?: , | $ )
""", re.X)


def sampler_for_infotext(name: str, karras: bool = False) -> dict[str, str]:
    """ministd sampler name -> {"Sampler": ..., "Schedule type": "Karras"?} as A1111 writes them."""
    key = name.removesuffix("_karras")
    out = {"Sampler": SAMPLER_NAMES.get(key, name)}
    if karras or name.endswith("_karras"):
        out["Schedule type"] = "Karras"
    return out


def sampler_from_infotext(sampler: str, schedule_type: str | None = None) -> str:
    """A1111's "Sampler" (and "Schedule type") -> a name :func:`ministd.samplers.make_sampler` takes."""
    karras = sampler.endswith(" Karras") or (schedule_type or "").lower() == "karras"
    display = sampler.removesuffix(" Karras")
    for ours, theirs in SAMPLER_NAMES.items():
        if theirs == display:
            return ours + ("_karras" if karras else "")
    raise ValueError(f"sampler {sampler!r} has no ministd counterpart; ministd has "
                     f"{', '.join(SAMPLER_NAMES.values())}")


def quote(value) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def model_name(name_or_path: str | Path) -> str:
    """What A1111 writes as "Model": the checkpoint's name without "," and ":"."""
    text = str(name_or_path)
    path = Path(text)
    if text != "shapes":
        text = path.stem if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin", ".pth") else path.name
    return text.replace(",", "").replace(":", "")


def format_infotext(prompt: str, negative_prompt: str | None, params: dict) -> str:
    """The ``parameters`` text: prompt, "Negative prompt: ..." when there is one, then the pairs
    of ``params`` in their order (values that are None are left out)."""
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """The ``parameters`` text -> {"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}.

    Values are strings, as written (quoted ones unquoted); the negative prompt is
    "" when there is none. A1111's rules: the last line is parameters only when it
    holds at least three pairs; lines from "Negative prompt:" on are the negative.
    """
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        result[key] = unquote(value.strip())
    return result


def read_png_parameters(path: str | Path) -> str:
    """The ``parameters`` text chunk of a PNG (FileNotFoundError / ValueError when there is none)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"{path} is a {image.format} picture; generation parameters are read from PNG "
                                 "text chunks only")
            text = getattr(image, "text", {}).get(PNG_KEY)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable PNG picture ({exc})") from None
    if text is None:
        raise ValueError(f"{path} carries no generation parameters (no {PNG_KEY!r} text chunk)")
    return text


def png_info(text: str):
    """A ``PIL.PngImagePlugin.PngInfo`` holding ``text`` as the ``parameters`` chunk (for ``image.save``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, text)
    return info


def is_png(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the PNG signature."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False
