"""ministd.unet against diffusers' UNet2DConditionModel (test-only reference).

Parity: for each real configuration (SD 1.x, SD 2.x, SDXL base, SDXL refiner,
SD inpainting) a tiny random diffusers model with the real block structure is
built, its weights are loaded into ministd's U-Net through both layouts (a
diffusers folder written by ``save_pretrained``, and the original
``model.diffusion_model.*`` layout), and the outputs are compared in float32.

What the tiny models shrink (everything else is the real structure: number of
levels, ResNet blocks per level, which levels have attention, transformer depth
per level and in the mid block, conv vs linear projections, head-count vs
head-width semantics, SDXL's text_time embedding with 256 Fourier features per
time id, 9 input channels for inpainting):

- channels: 32/64/64/64 instead of 320/640/1280/1280 (SDXL 32/64/96 instead of
  320/640/1280; refiner 32/64/96/96 instead of 384/768/1536/1536);
- heads: SD 1 keeps 8 heads per level (head width 4/8/8); SD 2 / SDXL /
  refiner keep a constant head width, 16 instead of 64;
- context width 24-48 instead of 768/1024/2048/1280, pooled text 16 instead of 1280;
- SDXL's transformer depth pattern [1, 2, 10] + mid 10 and the refiner's 4 are kept as is.

The full-size presets are checked separately, structure only (parameter names
and shapes on the meta device), against the published diffusers configs.

Tolerance: outputs have a std of about 0.6 (checked to lie in 0.3..3). The two
implementations do the same float32 operations, sometimes in a different order
(measured max difference: about 3e-6 for SD 1 / inpainting, about 4e-6 for the
linear-projection models), so we require atol = rtol = 1e-5. The same networks
with ministd.speed's CPU tricks applied are checked in tests/test_speed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

# the reference implementation is a test dependency: a missing one must fail, not skip
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ministd import unet as U
from ministd.weights import WeightsMismatchError

ATOL = RTOL = 1e-5

CA, D = "CrossAttnDownBlock2D", "DownBlock2D"
CU, UP = "CrossAttnUpBlock2D", "UpBlock2D"

# tiny diffusers configs with the real block structure (see the module docstring)
TINY = {
    "sd1": dict(block_out_channels=[32, 64, 64, 64], layers_per_block=2,
                down_block_types=[CA, CA, CA, D], up_block_types=[UP, CU, CU, CU],
                attention_head_dim=8, cross_attention_dim=24),
    "sd2": dict(block_out_channels=[32, 64, 64, 64], layers_per_block=2,
                down_block_types=[CA, CA, CA, D], up_block_types=[UP, CU, CU, CU],
                attention_head_dim=[2, 4, 4, 4],       # head counts (diffusers' naming slip): width 16
                cross_attention_dim=40, use_linear_projection=True, upcast_attention=True),
    "sdxl_base": dict(block_out_channels=[32, 64, 96], layers_per_block=2,
                      down_block_types=[D, CA, CA], up_block_types=[CU, CU, UP],
                      attention_head_dim=[2, 4, 6], transformer_layers_per_block=[1, 2, 10],
                      cross_attention_dim=48, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=16 + 6 * 256),
    "sdxl_refiner": dict(block_out_channels=[32, 64, 96, 96], layers_per_block=2,
                         down_block_types=[D, CA, CA, D], up_block_types=[UP, CU, CU, UP],
                         attention_head_dim=[2, 4, 6, 6], transformer_layers_per_block=4,
                         cross_attention_dim=32, use_linear_projection=True,
                         addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=16 + 5 * 256),
    "sd_inpaint": dict(in_channels=9, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
                       down_block_types=[CA, CA, CA, D], up_block_types=[UP, CU, CU, CU],
                       attention_head_dim=8, cross_attention_dim=24),
}
TIME_IDS = {"sdxl_base": 6, "sdxl_refiner": 5}


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter, none zero (diffusers zero-inits nothing we
    rely on, but this makes sure every path, e.g. proj_out, carries signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):        # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def reference(name: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**TINY[name], sample_size=16).eval()
    randomize_(model, seed)
    return model


def inputs(name: str, model_config, seed: int = 1, batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, model_config.in_channels, size, size, generator=g)
    # fractional timesteps on purpose (Euler samplers use them)
    t = torch.tensor([981.25, 17.0])[:batch]
    text = torch.randn(batch, 7, model_config.cross_attention_dim, generator=g)
    added = None
    if name in TIME_IDS:
        n = TIME_IDS[name]
        pooled = 16
        sizes = torch.tensor([1024.0, 768.0, 0.0, 32.0, 1024.0, 6.0])[:n]
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": sizes.repeat(batch, 1) + torch.arange(batch)[:, None]}
    return latents, t, text, added


def run_reference(model, latents, t, text, added):
    with torch.no_grad():
        return model(latents, t, encoder_hidden_states=text, added_cond_kwargs=added).sample


def run_ours(model, latents, t, text, added):
    with torch.no_grad():
        return model(latents, t, text, added)


# --------------------------------------------------------------------------
# diffusers folder layout
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_parity_diffusers_folder(name, tmp_path):
    ref = reference(name)
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)
    ours = U.UNet.from_pretrained(tmp_path).eval()     # a pipeline-style folder with unet/ inside
    args = inputs(name, ref.config)
    expected = run_reference(ref, *args)
    got = run_ours(ours, *args)
    assert 0.3 < expected.std() < 3, "outputs should have a std of about 1 for the tolerance to mean much"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_parity_tiny_shapes_config(tmp_path):
    """The book's own config, written as a diffusers config, builds the same network in diffusers."""
    config = U.shapes_tiny(cross_attention_dim=32)
    ref_config = config.to_diffusers_config()
    ref = UNet2DConditionModel(**{k: v for k, v in ref_config.items() if not k.startswith("_")}).eval()
    randomize_(ref, 3)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = U.UNet.from_pretrained(tmp_path)
    assert ours.config.block_out_channels == config.block_out_channels
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(3, 4, 16, 16, generator=g)
    text = torch.randn(3, 9, 32, generator=g)
    t = torch.tensor([999, 500, 1])
    torch.testing.assert_close(run_ours(ours, latents, t, text, None),
                               run_reference(ref, latents, t, text, None), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------
# original (ldm / sgm) layout
# --------------------------------------------------------------------------

def ldm_names(cfg: dict) -> list[str]:
    """Parameter names of the original ``openaimodel.UNetModel`` for a diffusers-style config.

    Written independently of ministd's key map, by replaying the original
    constructor: ``input_blocks`` = [conv] + per level ``num_res_blocks`` x
    [ResBlock, SpatialTransformer?] + [Downsample(op)], ``middle_block`` =
    [ResBlock, SpatialTransformer, ResBlock], ``output_blocks`` = per level
    reversed ``num_res_blocks + 1`` x [ResBlock, SpatialTransformer?, Upsample?],
    ``out`` = [GroupNorm, SiLU, conv], ``time_embed`` = [Linear, SiLU, Linear],
    ``label_emb`` = [[Linear, SiLU, Linear]].
    """
    ch, nres = cfg["block_out_channels"], cfg["layers_per_block"]
    attn = [t == CA for t in cfg["down_block_types"]]
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = [depth] * len(ch) if isinstance(depth, int) else depth
    names: list[str] = []

    def wb(prefix):
        names.extend([f"{prefix}.weight", f"{prefix}.bias"])

    def resblock(prefix, cin, cout):
        for sub in ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]:
            wb(f"{prefix}.{sub}")
        if cin != cout:
            wb(f"{prefix}.skip_connection")

    def spatial_transformer(prefix, d):
        wb(f"{prefix}.norm"), wb(f"{prefix}.proj_in")
        for i in range(d):
            b = f"{prefix}.transformer_blocks.{i}"
            for a in ("attn1", "attn2"):
                names.extend([f"{b}.{a}.to_q.weight", f"{b}.{a}.to_k.weight", f"{b}.{a}.to_v.weight"])
                wb(f"{b}.{a}.to_out.0")
            wb(f"{b}.ff.net.0.proj"), wb(f"{b}.ff.net.2")
            for n in ("norm1", "norm2", "norm3"):
                wb(f"{b}.{n}")
        wb(f"{prefix}.proj_out")

    wb("time_embed.0"), wb("time_embed.2")
    if cfg.get("addition_embed_type") == "text_time":
        wb("label_emb.0.0"), wb("label_emb.0.2")
    wb("input_blocks.0.0")
    skip_ch, c, idx = [ch[0]], ch[0], 1
    for level, cout in enumerate(ch):
        for _ in range(nres):
            resblock(f"input_blocks.{idx}.0", c, cout)
            if attn[level]:
                spatial_transformer(f"input_blocks.{idx}.1", depth[level])
            c = cout
            skip_ch.append(c)
            idx += 1
        if level != len(ch) - 1:
            wb(f"input_blocks.{idx}.0.op")
            skip_ch.append(c)
            idx += 1
    resblock("middle_block.0", c, c)
    spatial_transformer("middle_block.1", depth[-1])
    resblock("middle_block.2", c, c)
    idx = 0
    for level in reversed(range(len(ch))):
        for i in range(nres + 1):
            resblock(f"output_blocks.{idx}.0", c + skip_ch.pop(), ch[level])
            c, layer = ch[level], 1
            if attn[level]:
                spatial_transformer(f"output_blocks.{idx}.1", depth[level])
                layer = 2
            if level and i == nres:
                wb(f"output_blocks.{idx}.{layer}.conv")
            idx += 1
    wb("out.0"), wb("out.2")
    return names


def original_state_dict(name: str, ref: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """An original-layout state dict holding ``ref``'s weights.

    The correspondence original name -> diffusers name is discovered by running
    diffusers' own converter on placeholder tensors (each holding its index),
    so it is neither ministd's key map nor a second hand-written one.
    """
    cfg = dict(TINY[name])
    names = ldm_names(cfg)
    placeholders = {U.ORIGINAL_PREFIX + n: torch.tensor([float(i)]) for i, n in enumerate(names)}
    converted = convert_ldm_unet_checkpoint(placeholders, cfg)
    target = ref.state_dict()
    assert sorted(converted) == sorted(target), "the replayed original layout must convert to every diffusers key"
    index_to_diffusers = {int(v.item()): k for k, v in converted.items()}
    assert len(index_to_diffusers) == len(names), "every original key is used exactly once"
    return {names[i]: target[k].clone() for i, k in index_to_diffusers.items()}


@pytest.mark.parametrize("name", list(TINY))
def test_parity_original_layout(name):
    ref = reference(name, seed=5)
    original = original_state_dict(name, ref)
    # a whole single-file checkpoint: the U-Net under its prefix, plus other networks' entries
    checkpoint = {U.ORIGINAL_PREFIX + k: v for k, v in original.items()}
    checkpoint["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)

    # diffusers' converter into a fresh diffusers model (strict) ...
    ref2 = UNet2DConditionModel(**TINY[name], sample_size=16).eval()
    ref2.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dict(TINY[name])), strict=True)
    # ... and ministd's own key map into ours
    config = U.from_diffusers_config(dict(TINY[name]))
    ours = U.UNet.from_original(checkpoint, config).eval()

    args = inputs(name, ref.config, seed=6)
    expected = run_reference(ref2, *args)
    torch.testing.assert_close(expected, run_reference(ref, *args), atol=0, rtol=0)
    torch.testing.assert_close(run_ours(ours, *args), expected, atol=ATOL, rtol=RTOL)
    # and back: ours written in the original layout is exactly the file we read
    back = ours.original_state_dict()
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("name", list(TINY))
def test_config_read_off_original_weights(name):
    """The structure read from the original-layout names and shapes builds the same network."""
    ref = reference(name, seed=5)
    original = original_state_dict(name, ref)
    expected = U.from_diffusers_config(dict(TINY[name]))
    found = U.config_from_original(original, num_heads=expected.num_heads, upcast_attention=expected.upcast_attention,
                                   sample_size=expected.sample_size)
    assert shapes(U.UNet(found)) == shapes(U.UNet(expected))
    for level in range(expected.num_levels):
        if expected.attention_levels[level]:
            assert found.heads_at(level) == expected.heads_at(level)
    assert found.in_channels == expected.in_channels and found.is_sdxl_type == expected.is_sdxl_type


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd_inpaint", "sdxl_base", "sdxl_refiner"])
def test_config_read_off_full_size_original_names(name):
    """On the real models' shapes (meta tensors), the default head rule gives the real heads."""
    preset = U.PRESETS[name]()
    with torch.device("meta"):
        original = U.UNet(preset).original_state_dict()
    found = U.config_from_original(original)
    levels = range(preset.num_levels)
    assert found.block_out_channels == preset.block_out_channels
    assert found.attention_levels == preset.attention_levels
    assert [found.heads_at(i) for i in levels if preset.attention_levels[i]] == \
        [preset.heads_at(i) for i in levels if preset.attention_levels[i]]
    assert [found.transformer_layers_per_block[i] for i in levels if preset.attention_levels[i]] == \
        [preset.transformer_layers_per_block[i] for i in levels if preset.attention_levels[i]]
    for field in ("in_channels", "layers_per_block", "mid_transformer_depth", "cross_attention_dim",
                  "use_linear_projection", "upcast_attention", "projection_class_embeddings_input_dim", "sample_size"):
        assert getattr(found, field) == getattr(preset, field), field


def test_original_layout_errors_name_original_keys():
    ref = reference("sdxl_base", seed=5)
    original = original_state_dict("sdxl_base", ref)
    del original["label_emb.0.2.weight"]
    original["input_blocks.99.0.in_layers.0.weight"] = torch.ones(3)
    original["middle_block.1.proj_in.weight"] = torch.ones(5, 5)
    config = U.from_diffusers_config(dict(TINY["sdxl_base"]))
    with pytest.raises(WeightsMismatchError) as info:
        U.UNet.from_original(original, config)
    err = info.value
    assert err.missing == ["label_emb.0.2.weight"]
    assert err.unexpected == ["input_blocks.99.0.in_layers.0.weight"]
    assert [m[0] for m in err.mismatched] == ["middle_block.1.proj_in.weight"]
    assert "label_emb.0.2.weight" in str(err)


def test_diffusers_folder_errors_list_keys(tmp_path):
    ref = reference("sd1")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = U.from_diffusers_config(ref.config)
    config.cross_attention_dim = 16        # the file's attn2.to_k/to_v have 24 input columns
    model = U.UNet(config)
    from ministd.weights import load_strict
    with pytest.raises(WeightsMismatchError, match="attn2.to_k.weight"):
        load_strict(model, U.read_diffusers_weights(tmp_path))


# --------------------------------------------------------------------------
# full-size presets: structure against the published diffusers configs
# --------------------------------------------------------------------------

# the fields of the published unet/config.json files that decide the structure
PUBLISHED = {
    "sd1": dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                down_block_types=[CA, CA, CA, D], up_block_types=[UP, CU, CU, CU], layers_per_block=2,
                in_channels=4, sample_size=64),
    "sd2": dict(attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                cross_attention_dim=1024, down_block_types=[CA, CA, CA, D], up_block_types=[UP, CU, CU, CU],
                use_linear_projection=True, upcast_attention=True, sample_size=96),
    "sd_inpaint": dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                       down_block_types=[CA, CA, CA, D], up_block_types=[UP, CU, CU, CU], in_channels=9),
    "sdxl_base": dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                      attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                      cross_attention_dim=2048, down_block_types=[D, CA, CA], up_block_types=[CU, CU, UP],
                      projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
                      use_linear_projection=True, sample_size=128),
    "sdxl_refiner": dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                         attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
                         cross_attention_dim=1280, down_block_types=[D, CA, CA, D],
                         up_block_types=[UP, CU, CU, UP], projection_class_embeddings_input_dim=2560,
                         transformer_layers_per_block=4, use_linear_projection=True, sample_size=128),
}
# total parameter counts of the real U-Nets
PARAMS = {"sd1": 859_520_964, "sd2": 865_910_724, "sd_inpaint": 859_535_364,
          "sdxl_base": 2_567_463_684, "sdxl_refiner": 2_259_526_660}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_match_published_structure(name):
    with torch.device("meta"):
        ref = UNet2DConditionModel(**PUBLISHED[name])
        preset = U.UNet(U.PRESETS[name]())
        from_json = U.UNet(U.from_diffusers_config(PUBLISHED[name]))
        # the preset written as a diffusers config builds the same diffusers network
        back = UNet2DConditionModel(**{k: v for k, v in U.PRESETS[name]().to_diffusers_config().items()
                                       if not k.startswith("_")})
    assert shapes(preset) == shapes(ref)
    assert shapes(from_json) == shapes(ref)
    assert shapes(back) == shapes(ref)
    assert sum(p.numel() for p in preset.parameters()) == PARAMS[name]
    # original-layout names are unique and cover every parameter
    assert len(set(U.original_key_map(preset).values())) == len(shapes(ref))


def test_head_semantics():
    assert [U.sd1().heads_at(i) for i in range(3)] == [8, 8, 8]          # head width 40/80/160
    assert [U.sd2().heads_at(i) for i in range(4)] == [5, 10, 20, 20]   # head width 64
    assert [U.sdxl_base().heads_at(i) for i in (1, 2)] == [10, 20]
    assert [U.sdxl_refiner().heads_at(i) for i in (1, 2)] == [12, 24]
    with pytest.raises(ValueError, match="exactly one"):
        U.UNetConfig(num_heads=8, head_dim=64)


def test_from_diffusers_config_rejects_unsupported():
    with pytest.raises(ValueError, match="class_embed_type"):
        U.from_diffusers_config({**TINY["sd1"], "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        U.from_diffusers_config({**TINY["sd1"], "resnet_time_scale_shift": "scale_shift"})


def test_config_dict_round_trip():
    for make in U.PRESETS.values():
        config = make()
        assert U.UNetConfig.from_dict(config.to_dict()) == config
    # files written before the config took diffusers' names still load, to the same config
    back = {new: old for old, new in U.UNetConfig.OLD_NAMES.items()}
    old = {back.get(k, k): v for k, v in U.sdxl_base().to_dict().items()}
    assert "transformer_depth" in old and "addition_embed_dim" in old
    assert U.UNetConfig.from_dict(old) == U.sdxl_base()


# --------------------------------------------------------------------------
# timesteps, bad input, attention maps
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd1():
    ref = reference("sd1")
    ours = U.UNet(U.from_diffusers_config(ref.config)).eval()
    ours.load_state_dict(ref.state_dict())
    return ours


def test_timestep_forms(tiny_sd1):
    latents, _, text, _ = inputs("sd1", tiny_sd1.config)
    full = run_ours(tiny_sd1, latents, torch.tensor([500, 500]), text, None)
    for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500.0, 500.0])):
        torch.testing.assert_close(run_ours(tiny_sd1, latents, t, text, None), full, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"\[\] or \[2\]"):
        tiny_sd1(latents, torch.tensor([1, 2, 3]), text)


def test_timestep_embedding_values():
    # t = 1 and dim 4: frequencies 10000**(-i/2), i = 0, 1 -> [cos 1, cos .01, sin 1, sin .01]
    emb = U.timestep_embedding(torch.tensor([1.0]), 4)
    expected = torch.tensor([[torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01)),
                              torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01))]])
    torch.testing.assert_close(emb, expected)
    assert torch.equal(U.timestep_embedding(torch.tensor([3.0]), 4, flip_sin_to_cos=False),
                       U.timestep_embedding(torch.tensor([3.0]), 4)[:, [2, 3, 0, 1]])


def test_bad_input(tiny_sd1):
    latents, t, text, _ = inputs("sd1", tiny_sd1.config)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_sd1(latents[..., :12, :12], t, text)
    with pytest.raises(ValueError, match=r"\[2, T, 24\]"):
        tiny_sd1(latents, t, text[..., :20])
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        tiny_sd1(torch.cat([latents, latents], dim=1), t, text)
    with pytest.raises(ValueError, match="must be None"):
        tiny_sd1(latents, t, text, {"text_embeds": torch.zeros(2, 16), "time_ids": torch.zeros(2, 6)})


def test_sdxl_needs_added_cond():
    config = U.from_diffusers_config(dict(TINY["sdxl_base"]))
    model = U.UNet(config).eval()
    latents, t, text, added = inputs("sdxl_base", config)
    with pytest.raises(ValueError, match="time_ids"):
        model(latents, t, text)
    with pytest.raises(ValueError, match=r"P \+ 256\*N = 1552"):
        model(latents, t, text, {"text_embeds": added["text_embeds"], "time_ids": added["time_ids"][:, :5]})
    run_ours(model, latents, t, text, added)


def test_cross_attention_maps(tiny_sd1):
    latents, t, text, _ = inputs("sd1", tiny_sd1.config)
    plain = run_ours(tiny_sd1, latents, t, text, None)

    # capture the inputs of the first cross-attention to recompute its probabilities by hand
    first = tiny_sd1.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen = {}
    handle = first.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args))
    with tiny_sd1.cross_attention_maps() as maps:
        recorded = run_ours(tiny_sd1, latents, t, text, None)
    handle.remove()
    torch.testing.assert_close(recorded, plain, atol=ATOL, rtol=RTOL)   # explicit softmax vs fused kernel

    n_layers = sum(1 for n, m in tiny_sd1.named_modules() if n.endswith("attn2"))
    assert len(maps.records) == n_layers
    name, probs = maps.records[0]
    assert name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert probs.shape == (2, 16 * 16, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 256))
    x, context = seen["x"]
    q = first.to_q(x).view(2, 256, 8, 4).transpose(1, 2)
    k = first.to_k(context).view(2, 7, 8, 4).transpose(1, 2)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).mean(1)
    torch.testing.assert_close(probs, by_hand, atol=1e-6, rtol=1e-5)

    per_token = maps.per_token()
    assert per_token.shape == (2, 7, 16, 16)
    torch.testing.assert_close(per_token.sum(1), torch.ones(2, 16, 16), atol=1e-5, rtol=1e-5)
    # off again: no hook left behind
    assert all(m.probs_hook is None for m in tiny_sd1.modules() if isinstance(m, U.Attention))


def test_upcast_attention_half_precision():
    """bfloat16 with upcast_attention stays close to float32 (coarse: bfloat16 has 8 mantissa bits)."""
    config = U.from_diffusers_config(dict(TINY["sd2"]))
    model = U.UNet(config).eval()
    randomize_(model, 7)
    latents, t, text, _ = inputs("sd2", config)
    full = run_ours(model, latents, t, text, None)
    half = run_ours(copy.deepcopy(model).to(torch.bfloat16), latents.bfloat16(), t, text.bfloat16(), None)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_save_and_load_round_trip(tmp_path, tiny_sd1):
    tiny_sd1.save(tmp_path / "u.safetensors", dtype=None, extra_config={"_ministd": {"steps": 3}})
    back = U.UNet.load(tmp_path / "u.safetensors")
    assert back.config == tiny_sd1.config
    latents, t, text, _ = inputs("sd1", tiny_sd1.config)
    torch.testing.assert_close(run_ours(back, latents, t, text, None),
                               run_ours(tiny_sd1, latents, t, text, None), atol=0, rtol=0)
    tiny_sd1.save(tmp_path / "h.safetensors")          # float16 by default, for data/
    half = U.UNet.load(tmp_path / "h.safetensors", dtype=torch.float16)
    assert half.dtype == torch.float16


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no U-Net weights at .*nope.safetensors"):
        U.UNet.load(tmp_path / "nope.safetensors")


def test_shipped_empty_prompt_states_match_the_text_encoder():
    """data/shapes_unet_empty_prompt.safetensors is what the shipped tiny CLIP makes of "" (chapter 05)."""
    from ministd.text import TinyCLIP
    from ministd.tokenizer import CLIPTokenizer
    from ministd.unet import shapes_empty_prompt_states

    ids = CLIPTokenizer.from_vocab_file()([""], padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        expected = TinyCLIP.from_pretrained().text_encoder.eval()(ids).last_hidden_state
    torch.testing.assert_close(shapes_empty_prompt_states(), expected, atol=1e-5, rtol=1e-5)


def test_attention_in_query_chunks_is_the_same_attention(tiny_sd1):
    """``set_attention_chunk(n)`` splits the queries of every attention layer into chunks of n
    tokens; each chunk sees every key, so the output is the same up to float32 summation
    order (|diff| <= 1e-5, outputs of size ~1), including chunk sizes that do not divide N."""
    latents, t, text, added = inputs("sd1", tiny_sd1.config)
    with torch.no_grad():
        whole = tiny_sd1(latents, t, text)
        for chunk in (1, 5, 64):
            tiny_sd1.set_attention_chunk(chunk)
            try:
                assert (tiny_sd1(latents, t, text) - whole).abs().max() <= 1e-5
            finally:
                tiny_sd1.set_attention_chunk(None)
    layers = [m for m in tiny_sd1.modules() if isinstance(m, U.Attention)]
    assert layers and all(m.query_chunk is None for m in layers)
    with pytest.raises(ValueError, match="query_chunk must be a positive int"):
        tiny_sd1.set_attention_chunk(2.5)
