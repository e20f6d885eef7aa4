"""Parity of ministd.tokenizer with transformers' CLIPTokenizer (chapter 06).

The reference is built from the very same vocabulary file: vocab.json and
merges.txt are derived from data/bpe_simple_vocab_16e6.txt.gz in a tmp folder
the standard way (merges = lines 1 .. 48,894; vocab = byte characters, the
same with "</w>", each merge joined, then the two special tokens), written
here independently of ministd's own derivation.

transformers 5.x has a single CLIPTokenizer (CLIPTokenizerFast is the same
class, backed by the Rust `tokenizers` library): NFC, whitespace collapse,
lower case, CLIP's split pattern, byte-level BPE with "</w>". It no longer
uses ftfy, so the parity reference for our default ``cleanup="nfc"`` is that
class; ``cleanup="ftfy"`` is checked by giving the reference the ftfy-fixed text.

Ids and attention masks must be *identical* (integers: no tolerance).
"""

from __future__ import annotations

import gzip
import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from ministd.tokenizer import (BOS_TOKEN, CLIPTokenizer, DEFAULT_VOCAB_FILE, EOS_TOKEN,
                               bytes_to_unicode)

transformers = pytest.importorskip("transformers")

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"


# --------------------------------------------------------------- fixtures
def write_hf_tokenizer_files(folder: Path, pad_token: str = EOS_TOKEN) -> Path:
    """vocab.json + merges.txt (+ tokenizer_config.json) from CLIP's gz file."""
    lines = gzip.open(DEFAULT_VOCAB_FILE).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    # the GPT-2 / CLIP byte table, spelled out again here on purpose
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": pad_token, "model_max_length": 77, "bos_token": BOS_TOKEN,
         "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return write_hf_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def hf_tok(hf_folder):
    return transformers.CLIPTokenizer.from_pretrained(str(hf_folder))


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_vocab_file()


def load_prompts() -> list[str]:
    """The parity corpus: tests/data/prompts.txt (one JSON string per line,
    so control characters and newlines survive) plus generated long prompts."""
    prompts = [json.loads(line) for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    rng = random.Random(0)
    words = [p for p in prompts if len(p) < 40]
    for _ in range(20):  # very long prompts, 60-200 words, beyond 77 tokens
        prompts.append(", ".join(rng.choice(words) for _ in range(rng.randint(15, 60))))
    return prompts


PROMPTS = load_prompts()


# ------------------------------------------------------------------ tests
def test_corpus_is_large_and_varied():
    assert len(PROMPTS) >= 500
    joined = "".join(PROMPTS)
    for needle in ("😀", "é", "猫", "кот", "&amp;", "  ", "(red:1.3)", "1990", "ß", "\t"):
        assert needle in joined, needle
    assert sum(len(p) > 400 for p in PROMPTS) >= 20


def test_vocab_matches_reference_files(tok, hf_folder):
    vocab = json.loads((hf_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok) == len(vocab) == 49408
    assert tok.encoder == vocab
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.encoder["!"] == 0
    assert bytes_to_unicode()[ord(" ")] == "Ġ"


def test_ids_identical_to_transformers_on_corpus(tok, hf_tok):
    mismatches = []
    for prompt in PROMPTS:
        ours = tok.encode(prompt)
        ref = hf_tok(prompt)["input_ids"]
        if ours != ref:
            mismatches.append((prompt, ours, ref))
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r:.600}"


def test_batches_identical_to_transformers(tok, hf_tok):
    """padding="max_length", truncation=True, 77 tokens: ids and masks identical."""
    for start in range(0, len(PROMPTS), 64):
        batch = PROMPTS[start:start + 64]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = tok(batch, padding="max_length", max_length=77, truncation=True)
        ref = hf_tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert ours.input_ids.dtype == torch.long and ours.input_ids.shape == (len(batch), 77)
        assert torch.equal(ours.input_ids, ref["input_ids"])
        assert torch.equal(ours.attention_mask, ref["attention_mask"])


def test_padding_longest_identical(tok, hf_tok):
    batch = PROMPTS[:40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tok(batch, padding="longest", truncation=True)
    ref = hf_tok(batch, padding="longest", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, ref["input_ids"])
    assert torch.equal(ours.attention_mask, ref["attention_mask"])


def test_decode_identical_to_transformers(tok, hf_tok):
    for prompt in PROMPTS[:300]:
        ids = tok.encode(prompt)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), prompt


def test_from_pretrained_folder_and_bang_padding(tmp_path, hf_tok):
    """SD 2.x / SDXL tokenizer_2: pad with "!" (id 0); read from a tokenizer/ folder."""
    folder = write_hf_tokenizer_files(tmp_path / "tokenizer_2", pad_token="!")
    ours = CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == 0
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert ref.pad_token_id == 0
    batch = ["a red circle", "", "a blue square on a green background!"]
    enc = ours(batch)
    ref_enc = ref(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, ref_enc["input_ids"])
    assert torch.equal(enc.attention_mask, ref_enc["attention_mask"])
    assert enc.input_ids[0, 5:].eq(0).all()  # BOS a red circle EOS, then "!" padding
    assert enc.input_ids[2, 8] == 0  # the wart: a typed "!" is the pad token too
    mismatches = [p for p in PROMPTS if ours.encode(p) != ref(p)["input_ids"]]
    assert not mismatches, mismatches[:3]


def test_ftfy_cleanup_matches_reference_on_fixed_text(hf_tok):
    import ftfy

    tok_ftfy = CLIPTokenizer.from_vocab_file(cleanup="ftfy")
    for prompt in PROMPTS[:300]:
        assert tok_ftfy.encode(prompt) == hf_tok(ftfy.fix_text(prompt))["input_ids"], prompt
    # ftfy straightens curly quotes and narrows full-width letters
    assert tok_ftfy.encode("“ＡＢＣ”") == tok_ftfy.encode('"abc"')


def test_truncation_warns_with_count(tok):
    prompt = " ".join(["red"] * 80)  # 80 words -> 80 tokens, 75 fit
    with pytest.warns(UserWarning, match=r"5 token\(s\) were dropped"):
        enc = tok(prompt)
    assert enc.num_truncated == [5]
    assert enc.input_ids[0, -1].item() == tok.eos_token_id
    with pytest.raises(ValueError, match="truncation=True or chunked=True"):
        tok(prompt, truncation=False)


def test_chunked_mode(tok):
    body = tok.encode(" ".join(["red"] * 80) + " circle", add_special_tokens=False)
    enc = tok([" ".join(["red"] * 80) + " circle", "a cat"], chunked=True)
    assert enc.input_ids.shape == (2, 2, 77)
    first, second = enc.input_ids[0]
    assert first[0] == tok.bos_token_id and first[76] == tok.eos_token_id
    assert first[1:76].tolist() == body[:75]
    assert second[1:1 + len(body) - 75].tolist() == body[75:]
    assert enc.attention_mask[0, 1].sum() == len(body) - 75 + 2
    # the short prompt's second chunk is empty: BOS EOS and padding
    assert enc.input_ids[1, 1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]


def test_from_ids_frames_as_call_and_pads_chunks(tok):
    prompts = [" ".join(["red"] * 80) + " circle", "a cat"]
    bodies = [tok.encode(p, add_special_tokens=False) for p in prompts]
    with pytest.warns(UserWarning, match="dropped"):
        by_text = tok(prompts)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # warn=False: the caller reports the cut
        by_ids = tok.from_ids(bodies, warn=False)
    assert torch.equal(by_text.input_ids, by_ids.input_ids) and by_ids.num_truncated == [6, 0]
    assert tok.chunks_needed(bodies) == 2 and tok.chunks_needed([[]]) == 1
    chunked = tok.from_ids(bodies, chunked=True)
    assert torch.equal(chunked.input_ids, tok(prompts, chunked=True).input_ids)
    # num_chunks: at least that many windows, the extra ones empty (BOS, EOS, padding)
    padded = tok(prompts, chunked=True, num_chunks=3)
    assert padded.input_ids.shape == (2, 3, 77)
    assert torch.equal(padded.input_ids[:, :2], chunked.input_ids)
    assert torch.equal(padded.input_ids[:, 2], tok(["", ""]).input_ids)
    with pytest.raises(ValueError, match="num_chunks"):
        tok("a", chunked=True, num_chunks=0)
    with pytest.raises(ValueError, match="bodies"):
        tok.from_ids([])


def test_spaces_and_words(tok):
    """The space is part of a token ("</w>"), so word boundaries change the ids."""
    assert tok.tokenize("butterfly") == ["butterfly</w>"]
    assert tok.tokenize("butter fly") == ["butter</w>", "fly</w>"]
    assert tok.encode("a   red\n\tCIRCLE") == tok.encode("a red circle")
    assert tok.encode("") == [49406, 49407]
    assert tok.tokenize("1990") == ["1</w>", "9</w>", "9</w>", "0</w>"]
    # special tokens count only when typed exactly
    assert tok.encode("a <|endoftext|>") == [49406, 320, 49407, 49407]
    assert 49407 not in tok.encode("<|ENDOFTEXT|>")[1:-1]


def test_token_spans_cover_the_cleaned_text(tok):
    text = "A dreambeach at 4pm 🦩, (red:1.3) <|endoftext|>"
    spans = tok.token_spans(text)
    assert [s.id for s in spans] == tok.encode(text)[1:-1]
    cleaned = tok.clean(text)
    covered = set()
    for s in spans:
        assert cleaned[s.start:s.end] == s.text and s.text.strip()
        covered.update(range(s.start, s.end))
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    assert covered == {i for i, ch in enumerate(cleaned) if not ch.isspace()}
    assert [s.text for s in spans if s.text == "🦩"] == ["🦩"] * 2  # one emoji, two byte tokens
    assert spans[-1].id == tok.eos_token_id


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a", 1]])
def test_bad_prompts_are_rejected(tok, bad):
    with pytest.raises(ValueError, match="prompt must be a str|text must be"):
        tok(bad)


def test_lone_surrogate_rejected(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a red \ud800 circle")


def test_control_characters_tokenized_like_reference(tok, hf_tok):
    text = "a red\x00circle\x07 on \x1b[0m blue"
    assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="max")
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=1)
    with pytest.raises(ValueError, match="cleanup"):
        CLIPTokenizer.from_vocab_file(cleanup="none")
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained("/nonexistent/tokenizer")


def test_openai_cleanup_unescapes_html(hf_tok):
    """cleanup="ftfy+html" is OpenAI's / OpenCLIP's: ftfy, then HTML unescaped twice."""
    import html

    import ftfy

    tok_openai = CLIPTokenizer.from_vocab_file(cleanup="ftfy+html")
    for prompt in ["a cat &amp; a dog", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; twice", "“quoted”"]:
        fixed = html.unescape(html.unescape(ftfy.fix_text(prompt)))
        assert tok_openai.encode(prompt) == hf_tok(fixed)["input_ids"], prompt
    assert tok_openai.encode("a cat &amp; a dog") == tok_openai.encode("a cat & a dog")


def test_special_tokens_map_with_dict_pad_and_keep_specials(tmp_path):
    folder = write_hf_tokenizer_files(tmp_path / "tok")
    (folder / "tokenizer_config.json").unlink()
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False}}), encoding="utf-8")
    tok2 = CLIPTokenizer.from_pretrained(folder)
    assert tok2.pad_token_id == 0 and tok2.model_max_length == 77
    ids = tok2.encode("a red circle")
    assert tok2.decode(ids, skip_special_tokens=False) == "<|startoftext|>a red circle <|endoftext|>"


def test_reads_tokenizer_json_as_transformers_5_saves_it(tmp_path, hf_tok, tok):
    # transformers 5 writes only tokenizer.json; the ids must not change
    hf_tok.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists()
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    for prompt in ["a red circle", "Butterfly, 8k, (red:1.3)!", "dreambeach on mars"]:
        assert loaded.encode(prompt) == tok.encode(prompt) == hf_tok(prompt).input_ids
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
