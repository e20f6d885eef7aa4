"""Prompts as readers write them: clip skip, long prompts, ``(word:1.2)`` emphasis.

The pipelines (chapter 10) encode a prompt the way the reference (diffusers)
does: BOS + at most 75 tokens + EOS, the rest cut off with a warning. Prompts
found on the web are written for the popular web UIs (AUTOMATIC1111's
stable-diffusion-webui, "A1111", and the UIs that copy it), which read them
differently. Three of their conventions are options of every pipeline call
(``txt2img``, ``img2img``, ``inpaint``):

``clip_skip=`` (None: the pipeline's ``clip_skip`` attribute, 0 by default)
    How many final text-encoder layers to skip; the chosen layer still gets
    the final LayerNorm for SD 1.x / 2.x, as in diffusers, whose ``clip_skip``
    means the same number (``hidden_states[-(clip_skip + 1)]``, then
    ``final_layer_norm``; SDXL: ``hidden_states[-(clip_skip + 2)]``, no
    LayerNorm). The UIs count differently: their "Clip skip" setting is
    ``CLIP_stop_at_last_layers`` = N, default 1, and takes ``hidden_states[-N]``
    (+ final LayerNorm) for SD 1.x. So **UI "clip skip 2" = ministd
    ``clip_skip=1`` = diffusers ``clip_skip=1``**, and UI "clip skip N" is
    ``clip_skip=N - 1`` here. SD 2.x (its 24th layer is not stored) and SDXL
    (penultimate layer built in) already read the penultimate layer at
    ``clip_skip=0``; A1111 by default keeps them there whatever its setting
    (some forks count from 2 for them), while ministd and diffusers skip
    ``clip_skip`` more layers.

``long_prompts=True``
    A1111's rule for prompts over 75 tokens: the tokens are cut into windows of
    75, each framed by BOS/EOS and padded to 77, each window encoded on its
    own, and the states concatenated: ``[B, N * 77, D]``. The U-Net's cross
    attention reads a context of any length. For classifier-free guidance the
    prompt and the negative prompt get the same N: the shorter one is padded
    with empty windows (BOS, EOS, padding), which is the encoding of "" that
    A1111 pads with. SDXL's pooled vector comes from the first window, as in
    A1111. Not copied: A1111 by default moves the words after a comma near a
    window's end into the next window ("comma padding backtrack", 20 tokens)
    and reads the keyword ``BREAK`` as "start a new window"; here the windows
    are exactly 75 tokens and ``BREAK`` is a word.

``emphasis=True``
    A1111's attention syntax (``modules/prompt_parser.py``,
    ``parse_prompt_attention``): ``(text)`` multiplies the weight of ``text`` by
    1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3;
    brackets nest and multiply; an unclosed bracket weighs everything after it;
    ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the characters themselves;
    neighbouring pieces of equal weight are joined. Each piece is tokenized on
    its own and every token gets its piece's weight (BOS, EOS and padding:
    1.0). After the encoder, its "Original" emphasis (``modules/sd_emphasis.py``,
    ``EmphasisOriginal``) multiplies each token's hidden state by its weight and
    then rescales the whole window so that its mean is what it was before::

        z' = z * w[:, None];   z'' = z' * (mean(z) / mean(z'))

    The means are over one window (77 tokens x D channels) of one prompt;
    A1111 takes them over the batch of prompts it encodes together, which is
    the same for one prompt at a time (and keeps a picture independent of the
    other prompts in its batch here). Weights 1.0 everywhere give the plain
    encoding exactly. SDXL: applied to each encoder's states before they are
    concatenated; the pooled vector is not weighted (as in A1111).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ministd.text import CLIPTextModel, encode_chunked
from ministd.tokenizer import CLIPTokenizer

ROUND_FACTOR = 1.1        # "(text)"
SQUARE_FACTOR = 1 / 1.1   # "[text]"

# One token of the emphasis syntax per match: an escaped character, a lone
# backslash, an opening bracket, ":weight)" (closes a round bracket with an
# explicit weight), a closing bracket, a run of plain text, or a lone colon.
_EMPHASIS_TOKEN = re.compile(r"""
      \\[()\[\]\\]
    | \\
    | [(\[]
    | :\s*([+-]?[.\d]+)\s*\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
""", re.X)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.2) [circle]"`` -> ``[("a ", 1.0), ("red", 1.2), (" ", 1.0), ("circle", 1/1.1)]``.

    A1111's attention rule (see the module docstring). A ")" or "]" without its
    opening bracket, and ":1.2)" outside round brackets, are plain text.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}")
    pieces: list[list] = []            # [text, weight], weights scaled in place
    rounds: list[int] = []             # where the range of each open "(" starts in pieces
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])      # "\(" -> "(", a lone "\" -> nothing
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"emphasis weight {weight!r} in {text!r:.80} is not a number; write e.g. "
                                 "(word:1.2), or \\( \\) for literal brackets") from None
            scale(rounds.pop(), factor)
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND_FACTOR)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE_FACTOR)
        else:
            pieces.append([token, 1.0])
    for start in rounds:                   # unclosed brackets weigh everything after them
        scale(start, ROUND_FACTOR)
    for start in squares:
        scale(start, SQUARE_FACTOR)
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, float(w)) for t, w in merged] or [("", 1.0)]


def weighted_ids(tokenizer: CLIPTokenizer, text: str, emphasis: bool = True) -> tuple[list[int], list[float]]:
    """Token ids of ``text`` (no BOS/EOS) and one weight per token.

    With ``emphasis`` each piece of :func:`parse_emphasis` is tokenized on its
    own (as A1111 does); without it the text is tokenized as it is, weights 1.
    """
    if not emphasis:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids, [1.0] * len(ids)
    ids, weights = [], []
    for piece, weight in parse_emphasis(text):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def window_weights(weights: Sequence[float], num_chunks: int | None, max_length: int) -> list[float]:
    """The weight of every position the encoder sees: BOS, EOS and padding 1.0.

    ``num_chunks`` None: one truncated row of ``max_length``; otherwise that many
    windows of ``max_length - 2`` tokens each, concatenated.
    """
    room = max_length - 2
    windows = 1 if num_chunks is None else num_chunks
    row = []
    for c in range(windows):
        body = list(weights[c * room:(c + 1) * room])
        row += [1.0, *body, 1.0] + [1.0] * (room - len(body))
    return row


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor, window: int) -> torch.Tensor:
    """A1111's "Original" emphasis: ``states`` [B, N * window, D] times ``weights``
    [B, N * window], then each window of each prompt rescaled to its former mean.

    Computed in float32; windows whose weights are all 1 are returned unchanged.
    """
    B, length, D = states.shape
    if weights.shape != (B, length) or length % window:
        raise ValueError(f"weights {tuple(weights.shape)} must be [batch, length] = {(B, length)}, "
                         f"the length a multiple of {window}")
    x = states.float().reshape(B, length // window, window, D)
    w = weights.to(x.device, torch.float32).reshape(B, length // window, window, 1)
    weighted = x * w
    restored = weighted * (x.mean(dim=(2, 3), keepdim=True) / weighted.mean(dim=(2, 3), keepdim=True))
    changed = (w != 1).any(dim=2, keepdim=True)
    out = torch.where(changed, restored, x)
    return out.reshape(B, length, D).to(states.dtype)


@dataclass
class TextEncoding:
    """What :func:`encode_text` returns.

    states:    [B, 77, D], or [B, N * 77, D] with long prompts (emphasis applied)
    pooled:    [B, P] the encoder's pooled output (of the first window)
    truncated: per prompt, the text cut off by truncation ("" when nothing was)
    """

    states: torch.Tensor
    pooled: torch.Tensor
    truncated: list[str]


def chunks_needed(tokenizer: CLIPTokenizer, prompts: Sequence[str], emphasis: bool = False) -> int:
    """How many 75-token windows the longest of ``prompts`` needs (at least 1)."""
    return tokenizer.chunks_needed([weighted_ids(tokenizer, p, emphasis)[0] for p in prompts])


def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str],
                clip_skip: int = 0, final_layer_norm: bool = True, long_prompts: bool = False,
                emphasis: bool = False, num_chunks: int | None = None,
                device: torch.device | str | None = None) -> TextEncoding:
    """Prompts -> text states with the options of the module docstring.

    ``clip_skip`` and ``final_layer_norm`` go to the encoder as they are (the
    SDXL pipeline asks for 1 + its clip skip, without LayerNorm).
    ``num_chunks`` (long prompts only): at least this many windows.
    Without ``long_prompts`` and ``emphasis`` this is the reference's encoding.
    """
    prompts = list(prompts)
    if device is None:
        device = next(text_encoder.parameters()).device
    pairs = [weighted_ids(tokenizer, p, emphasis) for p in prompts]
    bodies = [ids for ids, _ in pairs]
    length = tokenizer.model_max_length
    kwargs = dict(clip_skip=clip_skip, final_layer_norm=final_layer_norm)
    if long_prompts:
        enc = tokenizer.from_ids(bodies, chunked=True, num_chunks=num_chunks)
        out = encode_chunked(text_encoder, enc.input_ids.to(device), **kwargs)
        windows = enc.input_ids.shape[1]
    else:
        enc = tokenizer.from_ids(bodies, padding="max_length", truncation=True, warn=False)
        out = text_encoder(enc.input_ids.to(device), **kwargs)
        windows = None
    states = out.last_hidden_state
    if emphasis:
        weights = torch.tensor([window_weights(w, windows, length) for _, w in pairs])
        states = apply_emphasis(states, weights, length)
    truncated = [tokenizer.decode(body[length - 2:]) if n else "" for body, n in zip(bodies, enc.num_truncated)]
    return TextEncoding(states, out.pooled, truncated)
