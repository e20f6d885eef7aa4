"""CLIP's byte-level BPE tokenizer, written from scratch (chapter 06).

A prompt reaches the text encoder as a row of integers. CLIP (Radford et al.,
"Learning Transferable Visual Models From Natural Language Supervision", 2021,
section 2.4 and its ``simple_tokenizer.py``) gets them in five steps:

1. **clean up** the text: Unicode NFC, every run of whitespace -> one space,
   lower case (optionally ftfy's fixes and HTML unescaping, see ``cleanup``);
2. **split** it into words with a regular expression: runs of letters, single
   digits, runs of other symbols, and the English contractions ('s, 't, ...);
3. **bytes to unicode**: every word becomes its UTF-8 bytes, each byte shown as
   one printable character, so any text (emoji, CJK, ...) can be tokenized and
   there is never an unknown token;
4. **byte-pair merges**: the word starts as single characters, the last one
   marked with ``</w>`` ("end of word"); the pair of neighbours with the
   lowest rank in the merge list is fused, again and again, until no listed
   pair is left (Sennrich et al. 2016, "Neural Machine Translation of Rare
   Words with Subword Units");
5. **ids**: each final piece is looked up in the vocabulary, and the row is
   framed by ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407),
   truncated or padded to the context length of 77.

The vocabulary is the real one, ``data/bpe_simple_vocab_16e6.txt.gz`` (MIT,
(c) OpenAI): 256 byte characters, the same with ``</w>``, 48,894 merges and the
two special tokens = 49,408 ids. A diffusers ``tokenizer/`` folder
(``vocab.json`` + ``merges.txt``) holds the same information.

Shapes: ``tokenizer(prompts, padding="max_length")`` returns
``input_ids`` and ``attention_mask`` as LongTensors ``[B, 77]`` (or
``[B, n_chunks, 77]`` in chunked mode).
"""

from __future__ import annotations

import gzip
import html
import json
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77

# The real vocabulary ships with the package data.
DEFAULT_VOCAB_FILE = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# How many lines of the merge file CLIP uses: the vocabulary has room for
# 49,408 ids = 256 bytes + 256 bytes with </w> + merges + 2 special tokens.
NUM_MERGES = 49152 - 256 - 2

# CLIP's word splitter: the special tokens, English contractions, runs of
# letters, ONE digit at a time (so "1990" is four words), runs of anything
# else that is not a space. \p{L} / \p{N} (Unicode letters / numbers) need
# the `regex` package.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# A special-token string the splitter finds *after* cleanup (someone typed
# "<|ENDOFTEXT|>") is ordinary text: transformers' byte-level step cuts it
# again with GPT-2's pattern into "<|", "endoftext", "|>".
SUBWORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]+|[^\s\p{L}\p{N}]+""")
WHITESPACE = regex.compile(r"\s+")

CLEANUPS = ("nfc", "ftfy", "ftfy+html")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to one printable Unicode character.

    Printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for
    themselves; the other 68 (control characters, space, ...) are moved to
    U+0100 upwards, so that the merge file never contains whitespace or
    invisible characters. The space byte 0x20 becomes "Ġ" (U+0120).
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def read_merges_gz(path: str | Path = DEFAULT_VOCAB_FILE) -> list[tuple[str, str]]:
    """The merge list of CLIP's ``bpe_simple_vocab_16e6.txt.gz``, in rank order.

    Line 0 is a version header; lines 1 .. 48,894 are the merges CLIP uses
    (the file holds more, which CLIP ignores).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP vocabulary file at {path}")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]


def vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary: bytes, bytes + ``</w>``, each merge result, BOS, EOS.

    The order fixes the ids: "!" = 0, ..., "<|startoftext|>" = 49406,
    "<|endoftext|>" = 49407 for the real merge list.
    """
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


@dataclass
class Encoding:
    """What the tokenizer returns for a batch of prompts.

    input_ids:      LongTensor [B, L] (chunked mode: [B, n_chunks, 77])
    attention_mask: LongTensor, same shape, 1 for real tokens (BOS, words,
                    the first EOS) and 0 for padding
    num_truncated:  tokens dropped per prompt by truncation
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_truncated: list[int]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in ("input_ids", "attention_mask"):
            raise KeyError(f"Encoding has 'input_ids' and 'attention_mask', not {key!r}")
        return getattr(self, key)

    def keys(self):
        return ["input_ids", "attention_mask"]


@dataclass
class TokenSpan:
    """One token of a prompt and the stretch of the cleaned text it covers."""

    id: int
    token: str      # the vocabulary entry, in byte-to-unicode characters ("Ġ", "</w>" ...)
    text: str       # the cleaned text it covers (a multi-byte character may be shared)
    start: int      # character offsets into the cleaned text
    end: int


class CLIPTokenizer:
    """CLIP's byte-level BPE with its special tokens, truncation and padding.

    Args:
        merges: the merge list in rank order (first = most frequent pair).
        vocab: token -> id; by default derived from ``merges`` as CLIP does.
        pad_token: ``"<|endoftext|>"`` (SD 1.x, SDXL's first tokenizer) or
            ``"!"`` (id 0: SD 2.x, SDXL's ``tokenizer_2``).
        model_max_length: context length, 77 for every CLIP text encoder.
        cleanup: ``"nfc"`` (default; what transformers' CLIPTokenizer does:
            NFC, whitespace collapse, lower case), ``"ftfy"`` (ftfy.fix_text
            first, as transformers' older slow tokenizer did when ftfy was
            installed) or ``"ftfy+html"`` (also unescapes HTML entities twice,
            as OpenAI's and OpenCLIP's own tokenizers do). They differ only on
            unusual text: curly quotes, full-width letters, ``&amp;``, mojibake.
    """

    def __init__(self, merges: list[tuple[str, str]], vocab: dict[str, int] | None = None,
                 pad_token: str = EOS_TOKEN, model_max_length: int = CONTEXT_LENGTH,
                 cleanup: str = "nfc"):
        if cleanup not in CLEANUPS:
            raise ValueError(f"cleanup must be one of {CLEANUPS}, got {cleanup!r}")
        if model_max_length < 2:
            raise ValueError(f"model_max_length must be >= 2 (room for BOS and EOS), got {model_max_length}")
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.encoder = dict(vocab) if vocab is not None else vocab_from_merges(merges)
        self.decoder = {i: t for t, i in self.encoder.items()}
        if not isinstance(pad_token, str) or not pad_token:
            raise ValueError(f"pad_token must be a non-empty str such as '<|endoftext|>' or '!', got {pad_token!r}")
        for name in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if name not in self.encoder:
                raise ValueError(f"token {name!r} is not in the vocabulary")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id = self.encoder[BOS_TOKEN]
        self.eos_token_id = self.encoder[EOS_TOKEN]
        self.pad_token = pad_token
        self.pad_token_id = self.encoder[pad_token]
        self.model_max_length = model_max_length
        self.cleanup = cleanup
        self.cache: dict[str, tuple[str, ...]] = {}  # BPE result per byte-encoded word
        # Special tokens typed exactly in a prompt are kept whole, before any
        # cleanup. This includes the pad token: with pad "!" (SD 2.x), every
        # "!" in a prompt becomes id 0, the same id as padding (as in transformers).
        specials = sorted({BOS_TOKEN, EOS_TOKEN, pad_token}, key=len, reverse=True)
        self.special_tokens = specials
        self.special_pattern = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        # words added after training (textual inversion, chapter 16): token -> the entries it stands for
        self.added_tokens: dict[str, list[str]] = {}

    def add_tokens(self, tokens: Sequence[str], first_id: int) -> None:
        """Teach the tokenizer new words: ``tokens[k]`` gets id ``first_id + k``.

        Like the special tokens, an added token typed in a prompt is kept whole
        (before cleanup, case as typed), and ``tokens[0]`` stands for all of
        them: a 3-vector embedding ``<star>`` adds ``<star>``, ``<star>_1``,
        ``<star>_2``, and "a <star>" encodes to all three ids (diffusers'
        multi-vector textual inversion). The text encoder must get rows for these ids.
        """
        tokens = list(tokens)
        for k, token in enumerate(tokens):
            self.encoder[token] = first_id + k
            self.decoder[first_id + k] = token
            self.added_tokens[token] = [token]
        self.added_tokens[tokens[0]] = tokens
        self.special_tokens = sorted({*self.special_tokens, *tokens}, key=len, reverse=True)
        self.special_pattern = regex.compile("(" + "|".join(regex.escape(t) for t in self.special_tokens) + ")")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_vocab_file(cls, path: str | Path = DEFAULT_VOCAB_FILE, **kwargs) -> "CLIPTokenizer":
        """The tokenizer from CLIP's ``bpe_simple_vocab_16e6.txt.gz``."""
        return cls(read_merges_gz(path), **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "CLIPTokenizer":
        """Read a diffusers/transformers ``tokenizer/`` folder.

        It holds ``vocab.json`` (token -> id), ``merges.txt`` (a ``#version``
        line, then one "left right" pair per line) and usually
        ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the pad
        token ("!" for SD 2.x and SDXL's ``tokenizer_2``).
        """
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines
                      if line.strip() and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json: "
                                    "not a CLIP tokenizer folder")
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        pad = settings.get("pad_token", EOS_TOKEN)
        if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
            pad = pad["content"]
        kwargs.setdefault("pad_token", pad)
        max_len = settings.get("model_max_length", CONTEXT_LENGTH)
        if isinstance(max_len, int) and max_len < 10_000:  # transformers writes 1e30 for "no limit"
            kwargs.setdefault("model_max_length", max_len)
        return cls(merges, vocab=vocab, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    # ------------------------------------------------------------ the 5 steps
    def clean_segment(self, text: str) -> str:
        """Step 1 on plain text: (ftfy,) NFC, one space per whitespace run, lower case."""
        if self.cleanup != "nfc":
            import ftfy  # a package dependency, imported late so "nfc" needs nothing

            text = ftfy.fix_text(text)
            if self.cleanup == "ftfy+html":
                text = html.unescape(html.unescape(text))
        text = unicodedata.normalize("NFC", text)
        text = WHITESPACE.sub(" ", text).strip()
        return lowercase(text)

    def parts(self, text: str) -> list[tuple[str, bool]]:
        """The prompt as (cleaned text, False) and (special token, True) parts."""
        out = []
        for i, part in enumerate(self.special_pattern.split(check_prompt(text))):
            if i % 2 == 1:
                out += [(p, True) for p in self.added_tokens.get(part, [part])]
            elif cleaned := self.clean_segment(part):
                out.append((cleaned, False))
        return out

    def clean(self, text: str) -> str:
        """Step 1: the text the splitter sees (lower-cased, spaces collapsed)."""
        return " ".join(part for part, _ in self.parts(text))

    def words(self, text: str) -> list[str]:
        """Steps 1-2: the cleaned prompt split into CLIP's words."""
        return [w for part, special in self.parts(text)
                for w in ([part] if special else self.split_words(part))]

    @staticmethod
    def split_words(cleaned: str) -> list[str]:
        """Step 2 on cleaned text: CLIP's pattern (see WORD_PATTERN)."""
        words = []
        for word in WORD_PATTERN.findall(cleaned):
            words += SUBWORD_PATTERN.findall(word) if word in (BOS_TOKEN, EOS_TOKEN) else [word]
        return words

    def bpe(self, word: str) -> tuple[str, ...]:
        """Step 4: merge the characters of one byte-encoded word.

        Start from single characters with ``</w>`` on the last one; fuse the
        adjacent pair of lowest merge rank everywhere it occurs; repeat until
        no adjacent pair is in the merge list. Results are cached per word.
        """
        if word in self.cache:
            return self.cache[word]
        pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(pieces) > 1:
            pairs = {(a, b) for a, b in zip(pieces, pieces[1:])}
            best = min(pairs, key=lambda p: self.merge_ranks.get(p, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = merged
        self.cache[word] = tuple(pieces)
        return self.cache[word]

    def byte_encode(self, word: str) -> str:
        """Step 3: the UTF-8 bytes of ``word``, one printable character per byte."""
        return "".join(self.byte_encoder[b] for b in word.encode("utf-8"))

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of ``text`` (no BOS/EOS), e.g. ["a</w>", "butterfly</w>"]."""
        pieces = []
        for part, special in self.parts(text):
            if special:
                pieces.append(part)
            else:
                for word in self.split_words(part):
                    pieces += self.bpe(self.byte_encode(word))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Step 5: ids of ``text`` framed by BOS/EOS (no truncation, no padding)."""
        ids = [self.encoder[piece] for piece in self.tokenize(text)]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.decoder[int(i)] for i in ids]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text back from ids: join pieces, ``</w>`` -> space, bytes -> UTF-8.

        Decoding gives the *cleaned* prompt (lower case, single spaces), and
        CLIP's splitting loses the spaces between symbols and words, so
        "a photo, 4k" decodes to "a photo , 4 k".
        """
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        special = {self.bos_token_id, self.eos_token_id}
        words, run = [], []
        for i in [*ids, None]:                    # added tokens are words of their own, not bytes
            if i is None or self.decoder[i] in self.added_tokens:
                words.append(self._decode_bytes([j for j in run if not (skip_special_tokens and j in special)]))
                words.append(self.decoder[i] if i is not None else "")
                run = []
            else:
                run.append(i)
        return " ".join(w for w in words if w)

    def _decode_bytes(self, ids: list[int]) -> str:
        # "<", "/", "w", ">" are byte characters themselves, so the whole
        # string turns back into bytes and the word ends become spaces after.
        raw = bytes(self.byte_decoder[c] for c in "".join(self.decoder[i] for i in ids))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def token_spans(self, text: str) -> list[TokenSpan]:
        """Each token of ``text`` (no BOS/EOS) with the span of cleaned text it covers.

        Spans are character offsets into ``self.clean(text)``. A token that
        holds only some bytes of a character (an emoji split in two) covers
        that whole character, so neighbouring spans can overlap.
        """
        spans, offset = [], 0
        for part, special in self.parts(text):
            if special:
                spans.append(TokenSpan(self.encoder[part], part, part, offset, offset + len(part)))
            else:
                for match in WORD_PATTERN.finditer(part):
                    if match.group() in (BOS_TOKEN, EOS_TOKEN):  # typed in another case
                        for sub in SUBWORD_PATTERN.finditer(match.group()):
                            spans += self._spans_of_word(sub.group(), offset + match.start() + sub.start())
                    else:
                        spans += self._spans_of_word(match.group(), offset + match.start())
            offset += len(part) + 1  # parts are joined by one space in clean()
        return spans

    def _spans_of_word(self, word: str, start: int) -> list[TokenSpan]:
        # byte i of the word belongs to character byte_to_char[i]
        byte_to_char = [ci for ci, ch in enumerate(word) for _ in ch.encode("utf-8")]
        spans, b = [], 0
        for piece in self.bpe(self.byte_encode(word)):
            n_bytes = len(piece.removesuffix(END_OF_WORD))
            lo, hi = byte_to_char[b], byte_to_char[b + n_bytes - 1] + 1
            spans.append(TokenSpan(self.encoder[piece], piece, word[lo:hi], start + lo, start + hi))
            b += n_bytes
        return spans

    # ------------------------------------------------------------- batching
    def __call__(self, text, padding: bool | str = "max_length", max_length: int | None = None,
                 truncation: bool = True, chunked: bool = False,
                 return_tensors: str = "pt", num_chunks: int | None = None) -> Encoding:
        """Tokenize one prompt or a list of prompts into a batch.

        Args:
            text: a string or a list of strings ("" is the unconditional prompt).
            padding: "max_length" (pad every row to ``max_length``), "longest"
                (to the longest row) or False (rows must then have equal length).
            max_length: row length, default ``model_max_length`` (77).
            truncation: keep BOS + the first ``max_length - 2`` tokens + EOS and
                warn how many were dropped. With ``truncation=False`` a prompt
                longer than ``max_length`` is an error unless ``chunked``.
            chunked: opt-in long prompts as popular UIs do: the tokens are cut into
                windows of ``max_length - 2``, each framed by BOS/EOS and padded,
                giving ``input_ids [B, n_chunks, max_length]`` (n_chunks = the most
                any prompt needs; shorter prompts get extra empty chunks).
                Encode each chunk and concatenate the hidden states
                (:func:`ministd.text.encode_chunked`).
            num_chunks: chunked mode only: at least this many chunks (empty ones
                appended), so that a prompt and its negative prompt get the same
                count, as classifier-free guidance needs.

        Returns:
            :class:`Encoding` with ``input_ids`` and ``attention_mask``.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if len(prompts) == 0:
            raise ValueError("text is an empty list: give at least one prompt")
        self._check_framing(padding, max_length, num_chunks)
        bodies = [self.encode(p, add_special_tokens=False) for p in prompts]
        return self.from_ids(bodies, padding=padding, max_length=max_length, truncation=truncation,
                             chunked=chunked, num_chunks=num_chunks, _stacklevel=3)

    def _check_framing(self, padding, max_length, num_chunks) -> None:
        if padding not in ("max_length", "longest", False, True):
            raise ValueError(f"padding must be 'max_length', 'longest' or False, got {padding!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int)
                                       or num_chunks < 1):
            raise ValueError(f"num_chunks must be a positive int or None, got {num_chunks!r}")

    def from_ids(self, bodies: list[list[int]], padding: bool | str = "max_length", max_length: int | None = None,
                 truncation: bool = True, chunked: bool = False, num_chunks: int | None = None,
                 warn: bool = True, _stacklevel: int = 2) -> Encoding:
        """Frame, truncate or chunk, and pad rows of token ids exactly as ``__call__`` does text.

        ``bodies``: one list of ids per prompt, without BOS/EOS (what
        ``encode(text, add_special_tokens=False)`` gives, or pieces put together
        by hand, as the emphasis parser of :mod:`ministd.prompts` does).
        ``warn=False`` leaves the truncation warning to the caller
        (``num_truncated`` says what was cut).
        """
        self._check_framing(padding, max_length, num_chunks)
        if not isinstance(bodies, (list, tuple)) or not bodies:
            raise ValueError("bodies must be a non-empty list of lists of token ids (one per prompt)")
        if padding is True:
            padding = "longest"
        max_length = self.model_max_length if max_length is None else max_length
        room = max_length - 2
        if chunked:
            return self._chunked(bodies, max_length, num_chunks or 1)

        rows, dropped = [], []
        for i, body in enumerate(bodies):
            if len(body) > room:
                if not truncation:
                    raise ValueError(f"prompt {i} has {len(body) + 2} tokens, more than max_length="
                                     f"{max_length}; use truncation=True or chunked=True")
                dropped.append(len(body) - room)
            else:
                dropped.append(0)
            rows.append([self.bos_token_id, *body[:room], self.eos_token_id])
        for i, n in enumerate(dropped):
            if n and warn:
                lost = self.decode(bodies[i][room:])
                warnings.warn(f"prompt {i} is longer than CLIP's {max_length}-token context: "
                              f"{n} token(s) were dropped: {lost!r}", stacklevel=_stacklevel)
        length = max_length if padding == "max_length" else max(len(r) for r in rows)
        if padding is False and len({len(r) for r in rows}) > 1:
            raise ValueError("prompts have different token counts; use padding='max_length' or 'longest'")
        ids, mask = self._pad(rows, length)
        return Encoding(ids, mask, dropped)

    def _pad(self, rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask

    def chunks_needed(self, bodies: list[list[int]], max_length: int | None = None) -> int:
        """How many windows of ``max_length - 2`` tokens the longest body needs (at least 1)."""
        room = (self.model_max_length if max_length is None else max_length) - 2
        return max(1, max((len(b) + room - 1) // room for b in bodies))

    def _chunked(self, bodies: list[list[int]], max_length: int, num_chunks: int = 1) -> Encoding:
        room = max_length - 2
        n_chunks = max(num_chunks, self.chunks_needed(bodies, max_length))
        ids = torch.empty((len(bodies), n_chunks, max_length), dtype=torch.long)
        mask = torch.empty_like(ids)
        for i, body in enumerate(bodies):
            rows = [[self.bos_token_id, *body[c * room:(c + 1) * room], self.eos_token_id]
                    for c in range(n_chunks)]
            ids[i], mask[i] = self._pad(rows, max_length)
        return Encoding(ids, mask, [0] * len(bodies))


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a Hugging Face ``tokenizer.json`` (what transformers 5
    saves instead of vocab.json + merges.txt). Merges are stored either as
    "left right" strings or as [left, right] pairs, depending on the version."""
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{path} does not describe a BPE tokenizer (model.type={model.get('type')!r})")
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def lowercase(text: str) -> str:
    """Lower case one character at a time, as transformers' tokenizer does.

    Python's ``str.lower`` follows Unicode's "final sigma" rule (a capital
    sigma at the end of a word becomes "ς"); the Rust ``tokenizers`` library
    behind transformers' CLIPTokenizer lowers each character on its own and
    writes "σ". We follow the reference; only Greek text notices.
    """
    if text.isascii():
        return text.lower()
    return "".join(ch.lower() for ch in text)


def check_prompt(text) -> str:
    """A prompt must be a ``str`` that can be written as UTF-8.

    The empty string is valid (it is the unconditional prompt of
    classifier-free guidance). Control characters are allowed and tokenized
    as bytes, as CLIP does; lone surrogates (half of a UTF-16 pair, e.g. from
    a broken copy-paste) cannot be encoded and are rejected.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}: {text!r:.60}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"prompt contains an invalid character {text[exc.start]!r} at position "
                         f"{exc.start} (a lone UTF-16 surrogate); it cannot be encoded as UTF-8") from None
    return text
