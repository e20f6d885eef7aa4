"""Parity of ministd.text with transformers' CLIP text models (chapter 07).

Tiny randomly initialised encoders in every layout Stable Diffusion uses:
transformers folders (CLIPTextModel, CLIPTextModelWithProjection) and the
original single-file layouts (SD 1.x ``cond_stage_model.transformer.``,
SD 2.x OpenCLIP ``cond_stage_model.model.``, SDXL ``conditioner.embedders.0/1``).
For the single-file layouts the reference weights are produced by diffusers'
own converters (``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint``
from diffusers.loaders.single_file_utils, which run offline), so the key map
is checked against an independent implementation.

Tolerance: float32, atol = rtol = 1e-5 on every hidden state (the networks are
2-3 layers of width 32-64; differences come only from summation order).
"""

from __future__ import annotations

import pytest
import torch

from ministd.text import (CLIPTextConfig, CLIPTextModel, TinyCLIP, TinyCLIPConfig, clip_loss,
                          config_from_openclip, encode_chunked)
from ministd.weights import WeightsMismatchError

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

ATOL = RTOL = 1e-5


def hf_config(act="quick_gelu", layers=3, width=64, heads=4, proj=None, eos=2, vocab=49408):
    return transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        projection_dim=proj or 512, eos_token_id=eos, bos_token_id=49406, pad_token_id=1)


def random_ids(batch=3, pad_id=49407, seed=0):
    """Token rows shaped like the tokenizer's: BOS, words, EOS, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, 77), dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, 60, (1,), generator=g))
        ids[i, 0] = 49406
        ids[i, 1:n + 1] = torch.randint(1, 49000, (n,), generator=g)
        ids[i, n + 1] = 49407
        mask[i, :n + 2] = 1
    return ids, mask


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (LayerNorms too), larger than the default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def assert_hidden_close(ours, ref_hidden, ref_last, ref_pooled):
    assert len(ours.hidden_states) == len(ref_hidden)
    for a, b in zip(ours.hidden_states, ref_hidden):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.last_hidden_state, ref_last, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.pooled, ref_pooled, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------ transformers folders
@pytest.mark.parametrize("act,eos,pad", [("quick_gelu", 2, 49407), ("gelu", 49407, 0)])
def test_clip_text_model_folder(tmp_path, act, eos, pad):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(hf_config(act=act, eos=eos)).eval()
    randomize(ref, 1)
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    assert ours.config.hidden_act == act and ours.config.projection_dim is None
    ids, _ = random_ids(pad_id=pad)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert_hidden_close(o, r.hidden_states, r.last_hidden_state, r.pooler_output)
    # clip skip 1 = penultimate layer + final LN (diffusers' SD 1.x clip_skip=1)
    with torch.no_grad():
        skipped = ours(ids, clip_skip=1).last_hidden_state
    torch.testing.assert_close(skipped, ref.final_layer_norm(r.hidden_states[-2]),
                               atol=ATOL, rtol=RTOL)


def test_clip_text_model_with_projection_folder_and_attention_mask(tmp_path):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModelWithProjection(hf_config(act="gelu", proj=48, eos=49407)).eval()
    randomize(ref, 2)
    ref.save_pretrained(tmp_path / "text_encoder_2")
    ours = CLIPTextModel.from_pretrained(tmp_path / "text_encoder_2")
    assert ours.config.projection_dim == 48
    ids, mask = random_ids(batch=4, pad_id=0)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
        rm = ref(ids, attention_mask=mask, output_hidden_states=True)
        om = ours(ids, attention_mask=mask)
    assert o.pooled.shape == (4, 48)
    assert_hidden_close(o, r.hidden_states, r.last_hidden_state, r.text_embeds)
    assert_hidden_close(om, rm.hidden_states, rm.last_hidden_state, rm.text_embeds)
    # SDXL: penultimate layer, no final LN
    with torch.no_grad():
        sdxl = ours(ids, clip_skip=1, final_layer_norm=False).last_hidden_state
    torch.testing.assert_close(sdxl, r.hidden_states[-2], atol=ATOL, rtol=RTOL)


# ------------------------------------------------------ single-file layouts
@pytest.mark.parametrize("prefix", ["cond_stage_model.transformer.", "conditioner.embedders.0.transformer."])
def test_single_file_transformers_layout(prefix):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(hf_config()).eval()
    randomize(ref, 3)
    # real files say prefix + "text_model.*" (transformers 5 saves CLIPTextModel without
    # "text_model." and adds it back when loading such files)
    checkpoint = {prefix + "text_model." + k: v for k, v in ref.state_dict().items()}
    checkpoint["model.diffusion_model.some.unet.weight"] = torch.zeros(2)  # other networks in the file
    # diffusers' converter is the independent key map for the reference
    converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    assert all(k.startswith("text_model.") for k in converted)
    ref2 = transformers.CLIPTextModel(hf_config()).eval()
    ref2.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    config = CLIPTextConfig(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256)
    ours = CLIPTextModel.from_single_file(checkpoint, prefix, config=config)
    ids, _ = random_ids()
    with torch.no_grad():
        r = ref2(ids, output_hidden_states=True)
        o = ours(ids)
    assert_hidden_close(o, r.hidden_states, r.last_hidden_state, r.pooler_output)


def openclip_checkpoint(prefix: str, width=64, layers=3, proj=40, seed=4) -> dict[str, torch.Tensor]:
    """Random tensors with OpenCLIP's text-tower names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1, offset=0.0):
        return torch.randn(shape, generator=g) * scale + offset

    sd = {"token_embedding.weight": rnd(49408, width), "positional_embedding": rnd(77, width),
          "ln_final.weight": rnd(width, offset=1.0), "ln_final.bias": rnd(width),
          "text_projection": rnd(width, proj), "logit_scale": torch.tensor(4.6)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": rnd(width, offset=1.0), b + "ln_1.bias": rnd(width),
                   b + "attn.in_proj_weight": rnd(3 * width, width), b + "attn.in_proj_bias": rnd(3 * width),
                   b + "attn.out_proj.weight": rnd(width, width), b + "attn.out_proj.bias": rnd(width),
                   b + "ln_2.weight": rnd(width, offset=1.0), b + "ln_2.bias": rnd(width),
                   b + "mlp.c_fc.weight": rnd(4 * width, width), b + "mlp.c_fc.bias": rnd(4 * width),
                   b + "mlp.c_proj.weight": rnd(width, 4 * width), b + "mlp.c_proj.bias": rnd(width)})
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("prefix", ["cond_stage_model.model.", "conditioner.embedders.1.model.",
                                    "conditioner.embedders.0.model."])
def test_single_file_openclip_layout(prefix):
    """SD 2.x / SDXL bigG / refiner bigG: fused in_proj split, projection transposed."""
    checkpoint = openclip_checkpoint(prefix)
    ref = transformers.CLIPTextModelWithProjection(hf_config(act="gelu", proj=40, eos=2)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(ref, checkpoint, prefix=prefix)
    if "text_projection.weight" not in converted:  # diffusers skips it for SD 2.x (unused there)
        converted["text_projection.weight"] = checkpoint[prefix + "text_projection"].T
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not unexpected and missing in ([], ["text_model.embeddings.position_ids"])
    ours = CLIPTextModel.from_single_file(checkpoint, prefix, config=CLIPTextConfig(
        hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256, hidden_act="gelu",
        projection_dim=40))
    ids, _ = random_ids(pad_id=0)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert_hidden_close(o, r.hidden_states, r.last_hidden_state, r.text_embeds)


def test_openclip_sd2_drops_last_layer_like_diffusers():
    """SD 2.x: diffusers keeps 23 of 24 layers; num_layers=n-1 does the same."""
    prefix = "cond_stage_model.model."
    checkpoint = openclip_checkpoint(prefix, layers=3)
    ref = transformers.CLIPTextModel(hf_config(act="gelu", layers=2, eos=2)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(ref, checkpoint, prefix=prefix)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    keep = set(ref.state_dict())
    assert set(converted) - keep == {"encoder.layers.2." + k for k in (
        "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
        "self_attn.out_proj.weight", "self_attn.out_proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")}  # diffusers drops text_projection for SD 2.x
    ref.load_state_dict({k: v for k, v in converted.items() if k in keep}, strict=True)
    ours = CLIPTextModel.from_single_file(checkpoint, prefix, num_layers=2, config=CLIPTextConfig(
        hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256, hidden_act="gelu"))
    ids, _ = random_ids(pad_id=0)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert_hidden_close(o, r.hidden_states, r.last_hidden_state, r.pooler_output)


def test_config_from_openclip_reads_sizes():
    checkpoint = openclip_checkpoint("", width=128, layers=2, proj=32)
    cfg = config_from_openclip(checkpoint)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
            cfg.projection_dim, cfg.hidden_act) == (128, 2, 2, 512, 32, "gelu")


# ------------------------------------------------------------ errors, misc
def test_mismatched_keys_are_listed():
    prefix = "cond_stage_model.model."
    checkpoint = openclip_checkpoint(prefix)
    del checkpoint[prefix + "ln_final.bias"]
    checkpoint[prefix + "transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError) as err:
        CLIPTextModel.from_single_file(checkpoint, prefix, config=CLIPTextConfig(
            hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256, hidden_act="gelu",
            projection_dim=40))
    assert err.value.missing == ["final_layer_norm.bias"]
    assert err.value.unexpected == ["transformer.resblocks.0.attn.extra"]     # named as the file writes it
    with pytest.raises(ValueError, match="no tensors under prefix"):
        CLIPTextModel.from_single_file(checkpoint, "cond_stage_model.transformer.")


def test_bad_inputs():
    model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2,
                                         intermediate_size=32))
    with pytest.raises(ValueError, match="input_ids must lie"):
        model(torch.tensor([[0, 100]]))
    with pytest.raises(ValueError, match="more than the 77 positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="clip_skip"):
        model(torch.zeros(1, 5, dtype=torch.long), clip_skip=2)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=10, num_heads=3)


def test_encode_chunked_matches_per_window():
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)).eval()
    a, _ = random_ids(batch=2, seed=1)
    b, _ = random_ids(batch=2, seed=2)
    ids = torch.stack([a, b], dim=1)  # [2 prompts, 2 windows, 77]
    with torch.no_grad():
        out = encode_chunked(model, ids)
        first, second = model(a), model(b)
    assert out.last_hidden_state.shape == (2, 154, 32)
    torch.testing.assert_close(out.last_hidden_state[:, :77], first.last_hidden_state)
    torch.testing.assert_close(out.last_hidden_state[:, 77:], second.last_hidden_state)
    torch.testing.assert_close(out.pooled, first.pooled)


def test_tiny_clip_loss_learns_a_toy_problem():
    """A few steps of symmetric InfoNCE on 8 image/text pairs lower the loss."""
    torch.manual_seed(0)
    cfg = TinyCLIPConfig(text=CLIPTextConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64, projection_dim=16),
                         image_size=16, image_channels=(8, 16), embed_dim=16)
    model = TinyCLIP(cfg)
    images = torch.randn(8, 3, 16, 16)
    ids = torch.randint(1, 60, (8, 6))
    ids[:, -1] = 63  # "EOS": the largest id, where the pooled vector is read
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = clip_loss(model(images, ids)).item()
    for _ in range(15):
        loss = clip_loss(model(images, ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1.5 and loss.item() < 0.5 * first
    # the loss of a perfect diagonal is ~0, of uniform logits log(B)
    assert clip_loss(torch.eye(8) * 100).item() < 1e-6
    torch.testing.assert_close(clip_loss(torch.zeros(8, 8)), torch.log(torch.tensor(8.0)))


# ------------------------------------------------------------ the tiny CLIP script
@pytest.mark.slow
def test_training_resumes_exactly(tmp_path):
    """2 steps + resume to 3 steps gives the same weights as 3 steps in one go."""
    from ministd.train.clip import load_checkpoint, main

    common = ["--batch-size", "4", "--save-every", "100", "--threads", "1", "--lr", "1e-3"]
    main(["train", "--out", str(tmp_path / "a"), "--steps", "3", *common])
    main(["train", "--out", str(tmp_path / "b"), "--steps", "2", *common])
    main(["train", "--out", str(tmp_path / "b"), "--steps", "3", *common])
    a = load_checkpoint(tmp_path / "a" / "last.pt").state_dict()
    b = load_checkpoint(tmp_path / "b" / "last.pt").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    fresh = TinyCLIP().state_dict()
    assert not torch.equal(a["logit_scale"], fresh["logit_scale"])  # it did train


def test_shipped_clip_meets_its_bar():
    """data/shapes_clip.safetensors: >= 90% zero-shot colour and shape on 300 held-out pictures."""
    from ministd.text import SHAPES_CLIP_FILE
    from ministd.tokenizer import CLIPTokenizer
    from ministd.train.clip import evaluate

    if not SHAPES_CLIP_FILE.is_file():
        pytest.fail(f"{SHAPES_CLIP_FILE} is missing")
    model = TinyCLIP.from_pretrained()
    metrics = evaluate(model, CLIPTokenizer.from_vocab_file(), n=300)
    assert metrics["color_top1"] >= 0.9 and metrics["shape_top1"] >= 0.9, metrics


def test_tiny_clip_from_pretrained_takes_a_file_or_a_folder(tmp_path):
    """Like every other from_pretrained, TinyCLIP's takes a folder (its one .safetensors file with
    the .json sidecar, or shapes_clip.safetensors among others) as well as the file itself."""
    from ministd.weights import save_model

    torch.manual_seed(0)
    cfg = TinyCLIPConfig(text=CLIPTextConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64, projection_dim=16),
                         image_size=16, image_channels=(8, 16), embed_dim=16)
    model = TinyCLIP(cfg)
    folder = tmp_path / "clip"
    folder.mkdir()
    save_model(model, folder / "tiny.safetensors", cfg.to_dict(), dtype=torch.float32)
    expected = model.state_dict()
    for source in (folder / "tiny.safetensors", folder, str(folder)):
        loaded = TinyCLIP.from_pretrained(source).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), source
    # several files: the folder must say which (shapes_clip.safetensors is the book's name)
    save_model(model, folder / "other.safetensors", cfg.to_dict(), dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="exactly one"):
        TinyCLIP.from_pretrained(folder)
    save_model(model, folder / "shapes_clip.safetensors", cfg.to_dict(), dtype=torch.float32)
    assert TinyCLIP.from_pretrained(folder).config == cfg
    # the shipped model: default, its file, and the data/ folder all give the same weights
    from ministd.text import SHAPES_CLIP_FILE
    a = TinyCLIP.from_pretrained().state_dict()
    for source in (SHAPES_CLIP_FILE, SHAPES_CLIP_FILE.parent):
        b = TinyCLIP.from_pretrained(source).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------ token tables stored as their trained rows
def _tiny_clip_config() -> TinyCLIPConfig:
    return TinyCLIPConfig(text=CLIPTextConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                              intermediate_size=64, projection_dim=16),
                          image_size=16, image_channels=(8, 16), embed_dim=16)


def test_token_table_stored_as_its_trained_rows(tmp_path):
    import json

    from ministd.text import TOKEN_IDS, TOKEN_ROWS, TOKEN_TABLE, pack_token_table, unpack_token_table
    from ministd.weights import read_safetensors, save_model

    torch.manual_seed(0)
    cfg = _tiny_clip_config()
    model = TinyCLIP(cfg)
    ids = torch.tensor([63, 3, 7, 3])                      # any order, repeats allowed
    path = tmp_path / "packed.safetensors"
    save_model(model, path, cfg.to_dict(), dtype=torch.float32, extra_config={"_token_table": "rows"},
               state_dict=pack_token_table(model.state_dict(), ids))
    stored = read_safetensors(path)
    assert TOKEN_TABLE not in stored and stored[TOKEN_IDS].tolist() == [3, 7, 63]
    assert stored[TOKEN_IDS].dtype == torch.int64 and stored[TOKEN_ROWS].shape == (3, 32)
    loaded = TinyCLIP.from_pretrained(path).state_dict()
    table, want = loaded[TOKEN_TABLE], model.state_dict()[TOKEN_TABLE]
    assert torch.equal(table[[3, 7, 63]], want[[3, 7, 63]])
    others = torch.ones(64, dtype=torch.bool)
    others[[3, 7, 63]] = False
    assert table[others].abs().max() == 0                  # rows no caption reads come back as zeros
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items() if k != TOKEN_TABLE)
    assert json.loads(path.with_suffix(".json").read_text())["_token_table"] == "rows"
    with pytest.raises(ValueError, match="ids outside 0..63"):
        unpack_token_table({TOKEN_ROWS: torch.zeros(1, 32), TOKEN_IDS: torch.tensor([64])}, 64)


@pytest.mark.slow
def test_trained_token_ids_are_the_rows_the_batches_used(tmp_path):
    from ministd.data import ShapesWorld
    from ministd.tokenizer import CLIPTokenizer
    from ministd.train.clip import batch_of, clip_config, main, trained_token_ids

    main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--width", "64",
          "--threads", "1", "--save-every", "100"])
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    tokenizer, world = CLIPTokenizer.from_vocab_file(), ShapesWorld(seed=0)
    used = set(batch_of(world, tokenizer, 0, 4)[1].flatten().tolist()) | set(batch_of(world, tokenizer, 4, 4)[1]
                                                                             .flatten().tolist())
    assert set(trained_token_ids(state).tolist()) == used
    torch.manual_seed(0)                                   # the run's starting weights
    start = TinyCLIP(clip_config(64)).state_dict()["text_encoder.embeddings.token_embedding.weight"]
    table = state["model"]["text_encoder.embeddings.token_embedding.weight"]
    rest = torch.ones(len(table), dtype=torch.bool)
    rest[sorted(used)] = False
    assert torch.equal(table[rest], start[rest]) and not torch.equal(table[~rest], start[~rest])
    # a run resumed with another width is refused, not silently mixed
    with pytest.raises(SystemExit, match="another shape"):
        main(["train", "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--width", "96",
              "--threads", "1"])
    with pytest.raises(ValueError, match="width must be a positive multiple of 32, got 100"):
        clip_config(100)


def test_shipped_wide_clip_meets_the_bar_and_stores_every_row_captions_use():
    """data/shapes_clip_wide (issue 18's second text encoder, 192 wide): >= 90% zero-shot colour
    and shape on 300 held-out pictures, and no caption of the world reads a row it does not store."""
    from ministd.data import ShapesWorld
    from ministd.text import SHAPES_CLIP_FILE, TOKEN_IDS
    from ministd.tokenizer import CLIPTokenizer
    from ministd.train.clip import evaluate
    from ministd.weights import read_safetensors

    path = SHAPES_CLIP_FILE.with_name("shapes_clip_wide.safetensors")
    model = TinyCLIP.from_pretrained(path)
    assert model.config.text.hidden_size == 192
    tokenizer = CLIPTokenizer.from_vocab_file()
    metrics = evaluate(model, tokenizer, n=300)
    assert metrics["color_top1"] >= 0.9 and metrics["shape_top1"] >= 0.9, metrics
    stored = set(read_safetensors(path)[TOKEN_IDS].tolist())
    used = {n: set(tokenizer([ShapesWorld(seed=7, objects=n)[i][1] for i in range(300)],
                             padding="longest").input_ids.flatten().tolist()) for n in (1, 2)}
    assert used[1] <= stored                     # the CLIP learned from one-object captions: all there
    # two-object captions add only "and", which no CLIP training caption had: its row loads as zeros
    assert used[2] - stored == set(tokenizer.encode("and")[1:-1])
