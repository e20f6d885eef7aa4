"""LoRA, textual inversion and hypernetworks (ministd.adapters, chapter 16).

Tiny random ministd pipelines (SD 1.x-type: conv proj_in, one text encoder;
SDXL-type: linear proj_in, two text encoders of widths 16 and 24) in float64,
so that "applied on the fly" can be compared with "merged by hand" tightly.

- LoRA: applied = hand-merged W + scale * alpha / r * up @ down on every kind
  of layer (Linear, 1x1 and 3x3 convolutions, strided ones), float64,
  atol = rtol = 1e-10; the kohya, PEFT and older diffusers layouts of one LoRA
  give bitwise the same outputs; unloading restores bitwise; two LoRAs stack;
  SDXL ``lora_te1_`` / ``lora_te2_`` / sgm-named U-Net keys reach the layers
  named by hand; our layer for each key of a kohya file equals the one
  diffusers' own converter (``lora_state_dict`` + its PEFT renaming, no peft
  needed) finds, for every Linear/Conv2d of both pipelines; saving in the
  kohya layout round-trips; bad files are refused with nothing applied;
  and against diffusers' own loader with peft (``load_lora_weights`` +
  ``fuse_lora(lora_scale=0.7)``, kohya and PEFT files, on a tiny diffusers SD
  pipeline): the same U-Net prediction and text states (float32, atol 1e-5).
- Textual inversion: every file format, multi-vector expansion in prompts and
  negative prompts, and diffusers' ``load_textual_inversion`` on a tiny
  diffusers SD pipeline: the same text states (float32, atol 1e-5, the
  tolerance of the text-encoder parity tests) and token ids.
- Hypernetworks: attention with a hypernetwork equals the A1111 formula by
  hand (float64, 1e-12); strength 0 and unloading are bitwise no-ops; A1111's
  pickled dict (with activation, LayerNorm and dropout places) and ministd's
  safetensors form load to the same MLPs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ministd import adapters as A
from ministd import speed
from ministd.pipelines import StableDiffusionPipeline, StableDiffusionXLPipeline
from ministd.text import CLIPTextConfig, CLIPTextModel
from ministd.tokenizer import CLIPTokenizer
from ministd.unet import Attention, UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

MERGE_TOL = 1e-10        # float64: on-the-fly vs merged, summation order only
HYPER_TOL = 1e-12        # float64: one attention layer against the formula by hand
PARITY_ATOL = 1e-5       # float32 text states against diffusers / transformers


# --------------------------------------------------------------------------
# tiny pipelines
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers():
    return CLIPTokenizer.from_vocab_file(), CLIPTokenizer.from_vocab_file(pad_token="!")


def _encoder(width: int, projection: int | None = None, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=width, num_layers=2, num_heads=2, intermediate_size=2 * width,
                                        projection_dim=projection)).double().eval()


def sd_pipe(tokenizers, context: int = 16) -> StableDiffusionPipeline:
    """SD 1.x-type: 1x1-conv proj_in, channels 8 -> 16 (so conv_shortcut), context ``context``."""
    torch.manual_seed(1)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, True),
                           transformer_layers_per_block=(1, 1), num_heads=2, cross_attention_dim=context,
                           norm_num_groups=4, sample_size=8)).double().eval()
    # vae and scheduler are not used by the adapters (nothing here samples)
    return StableDiffusionPipeline(copy.deepcopy(tokenizers[0]), _encoder(context), unet, None, None)


def xl_pipe(tokenizers) -> StableDiffusionXLPipeline:
    """SDXL-type: no attention at level 0, linear proj_in, encoders 16 + 24 wide, pooled 8, 6 time ids."""
    torch.manual_seed(2)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, True),
                           transformer_layers_per_block=(1, 2), mid_transformer_depth=2, num_heads=None, head_dim=4,
                           cross_attention_dim=40, use_linear_projection=True, norm_num_groups=4,
                           addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4, sample_size=8)).double().eval()
    return StableDiffusionXLPipeline(copy.deepcopy(tokenizers[0]), _encoder(16, seed=3),
                                     copy.deepcopy(tokenizers[1]), _encoder(24, projection=8, seed=4), unet, None, None)


def inputs(pipe, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    out = dict(latents=torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), timestep=torch.tensor([10, 700]),
               encoder_hidden_states=torch.randn(2, 5, c.cross_attention_dim, generator=g, dtype=torch.float64))
    if c.is_sdxl_type:
        out["added_cond"] = {"text_embeds": torch.randn(2, 8, generator=g, dtype=torch.float64),
                             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2, dtype=torch.float64)}
    return out


IDS = torch.tensor([[49406, 320, 1746, 3309, 49407] + [49407] * 4, [49406, 3309, 49407] + [0] * 6])


@torch.no_grad()
def outputs(pipe) -> list[torch.Tensor]:
    """What every network of ``pipe`` computes on fixed inputs."""
    outs = [pipe.unet(**inputs(pipe))]
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            out = getattr(pipe, name)(IDS)
            outs += [out.last_hidden_state, out.pooled]
    return outs


def assert_all_close(got, want, tol=MERGE_TOL):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def assert_all_equal(got, want):
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def gap(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


# --------------------------------------------------------------------------
# LoRA helpers: files written here, merged by hand here
# --------------------------------------------------------------------------
def modules(pipe) -> dict[str, nn.Module]:
    """"unet.<path>" / "text_encoder.<path>" -> every Linear / Conv2d (the test's own walk)."""
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            out.update({f"{name}.{p}": m for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
    return out


def random_lora(pipe, targets, rank=2, alpha=3.0, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{target: (down [r, in, ...], up [out, r, ...], alpha)} with random down *and* up."""
    g = torch.Generator().manual_seed(seed)
    found, out = modules(pipe), {}
    for t in targets:
        w = found[t].weight
        down = torch.randn(rank, *w.shape[1:], generator=g, dtype=torch.float64) * 0.3
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g, dtype=torch.float64) * 0.3
        out[t] = (down, up, alpha)
    return out


def kohya_name(target: str, two_encoders: bool = False) -> str:
    """The kohya spelling for SD 1.x (diffusers U-Net names) written out by the test."""
    net, path = target.split(".", 1)
    if net == "unet":
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if two_encoders else "lora_te_", "text_encoder_2": "lora_te2_"}[net]
    return prefix + "text_model_" + path.replace(".", "_")


def as_kohya(lora) -> dict[str, torch.Tensor]:
    out = {}
    for t, (down, up, alpha) in lora.items():
        out |= {kohya_name(t) + ".lora_down.weight": down, kohya_name(t) + ".lora_up.weight": up,
                kohya_name(t) + ".alpha": torch.tensor(alpha)}
    return out


def peft_name(target: str) -> str:
    net, path = target.split(".", 1)
    return target if net == "unet" else f"{net}.text_model.{path}"


def merged(pipe, *loras_and_scales):
    """A deep copy of ``pipe`` with W += scale * alpha / r * up @ down for each LoRA, by hand."""
    copy_ = copy.deepcopy(pipe)
    found = modules(copy_)
    for m in found.values():              # a copy taken while LoRAs are loaded would carry their hooks
        m._forward_hooks.clear()
    with torch.no_grad():
        for lora, scale in loras_and_scales:
            for t, (down, up, alpha) in lora.items():
                w = found[t].weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                w += scale * alpha / down.shape[0] * delta
    return copy_


def every_target(pipe) -> list[str]:
    return sorted(modules(pipe))


# --------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------
def test_kohya_lora_equals_the_hand_merged_weights(tokenizers, tmp_path):
    pipe = sd_pipe(tokenizers)
    kinds = {type(m).__name__ + (str(m.kernel_size) + str(m.stride) if isinstance(m, nn.Conv2d) else "")
             for m in modules(pipe).values()}
    assert {"Linear", "Conv2d(1, 1)(1, 1)", "Conv2d(3, 3)(1, 1)", "Conv2d(3, 3)(2, 2)"} <= kinds
    lora = random_lora(pipe, every_target(pipe))
    reference = outputs(merged(pipe, (lora, 0.7)))
    base = outputs(pipe)
    save_file(as_kohya(lora), str(tmp_path / "style.safetensors"))
    name = A.load_lora(pipe, tmp_path / "style.safetensors", scale=0.7)
    assert name == "style" and len(pipe.loras["style"].layers) == len(lora)
    got = outputs(pipe)
    assert_all_close(got, reference)
    assert gap(got, base) > 1e-2                      # the LoRA does change every network
    assert gap(got[1:], base[1:]) > 1e-2              # ... including the text encoder
    # the hooks survive ministd.speed's faster modules (class swaps, in-place sums on fresh outputs)
    speed.optimize(pipe.unet)
    assert speed.is_optimized(pipe.unet)
    assert_all_close(outputs(pipe), reference)


def test_text_encoder_lora_changes_the_prompt_states(tokenizers):
    pipe = sd_pipe(tokenizers)
    lora = random_lora(pipe, [t for t in every_target(pipe) if t.startswith("text_encoder.")], seed=5)
    prompts = ["a red circle", "a big blue box"]
    base, want = pipe.encode_prompt(prompts), merged(pipe, (lora, 1.0)).encode_prompt(prompts)
    A.load_lora(pipe, as_kohya(lora), name="te")
    got = pipe.encode_prompt(prompts)
    torch.testing.assert_close(got, want, atol=MERGE_TOL, rtol=MERGE_TOL)
    assert float((got - base).abs().max()) > 1e-2


def test_kohya_peft_and_old_diffusers_layouts_give_the_same_outputs(tokenizers, tmp_path):
    pipe = sd_pipe(tokenizers)
    targets = every_target(pipe)
    lora = random_lora(pipe, targets, rank=3, alpha=1.5)
    A.load_lora(pipe, as_kohya(lora))
    want = outputs(pipe)
    A.unload_lora(pipe)

    peft = {}
    for t, (down, up, _) in lora.items():
        peft |= {peft_name(t) + ".lora_A.weight": down, peft_name(t) + ".lora_B.weight": up}
    config = {f"{net}.{k}": v for net in ("unet", "text_encoder") for k, v in
              {"r": 3, "lora_alpha": 1.5, "alpha_pattern": {}, "rank_pattern": {}}.items()}
    save_file(peft, str(tmp_path / "peft.safetensors"), metadata={"lora_adapter_metadata": json.dumps(config)})

    old = {}      # diffusers 0.2x: .lora.down/.up (+ .alpha), attention processors for the U-Net's attention
    processor = {"to_q": "processor.to_q_lora", "to_k": "processor.to_k_lora", "to_v": "processor.to_v_lora",
                 "to_out.0": "processor.to_out_lora"}
    for t, (down, up, alpha) in lora.items():
        stem, last = peft_name(t), None
        for ours, theirs in processor.items():
            if stem.endswith("." + ours):
                last = stem[: -len(ours)] + theirs
        if last is not None:
            old |= {last + ".down.weight": down, last + ".up.weight": up}
        else:
            old |= {stem + ".lora.down.weight": down, stem + ".lora.up.weight": up}
        old[stem + ".alpha"] = torch.tensor(alpha)
    assert any(".processor.to_out_lora.down.weight" in k for k in old)

    for source in (tmp_path / "peft.safetensors", old):
        A.load_lora(pipe, source, name="other")
        assert_all_equal(outputs(pipe), want)
        A.unload_lora(pipe)
    # without alphas, PEFT means alpha = r: a different (larger) change
    A.load_lora(pipe, peft, name="no-alpha")
    assert gap(outputs(pipe), want) > 1e-3


def test_peft_alpha_pattern_is_honoured(tokenizers, tmp_path):
    pipe = sd_pipe(tokenizers)
    special = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    lora = random_lora(pipe, [special, "unet.conv_in"], alpha=2.0)
    want = outputs(merged(pipe, ({special: (*lora[special][:2], 0.5), "unet.conv_in": lora["unet.conv_in"]}, 1.0)))
    layers = {f"{t}.lora_{ab}.weight": m.contiguous()
              for t, (d, u, _) in lora.items() for ab, m in (("A", d), ("B", u))}
    config = {"unet.r": 2, "unet.lora_alpha": 2.0,
              "unet.alpha_pattern": {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": 0.5}}
    save_file(layers, str(tmp_path / "p.safetensors"), metadata={"lora_adapter_metadata": json.dumps(config)})
    A.load_lora(pipe, tmp_path / "p.safetensors")
    assert_all_close(outputs(pipe), want)


def test_unload_restores_the_model_bitwise(tokenizers):
    pipe = sd_pipe(tokenizers)
    before, state = outputs(pipe), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    A.load_lora(pipe, as_kohya(random_lora(pipe, every_target(pipe))), name="a")
    A.load_lora(pipe, as_kohya(random_lora(pipe, every_target(pipe)[:10], seed=1)), name="b", scale=-2.0)
    assert list(pipe.unet.state_dict()) == list(state)            # names unchanged while loaded
    A.unload_lora(pipe)
    assert_all_equal(outputs(pipe), before)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in state.items())
    assert not any(m._forward_hooks for m in modules(pipe).values()) and pipe.loras == {}


def test_two_loras_stack_each_with_its_own_scale(tokenizers):
    pipe = sd_pipe(tokenizers)
    targets = every_target(pipe)
    a, b = random_lora(pipe, targets[::2], seed=1), random_lora(pipe, targets[::3], rank=1, alpha=0.75, seed=2)
    both, more_a, only_b = (outputs(merged(pipe, *pairs)) for pairs in
                            (((a, 0.5), (b, -1.2)), ((a, 2.0), (b, -1.2)), ((b, -1.2),)))
    A.load_lora(pipe, as_kohya(a), scale=0.5, name="a")
    A.load_lora(pipe, as_kohya(b), scale=-1.2, name="b")
    assert_all_close(outputs(pipe), both)
    A.set_lora_scale(pipe, "a", 2.0)
    assert_all_close(outputs(pipe), more_a)
    A.set_lora_scale(pipe, "a", 0.0)
    assert_all_close(outputs(pipe), only_b)
    A.unload_lora(pipe, "a")
    assert_all_close(outputs(pipe), only_b)
    assert list(pipe.loras) == ["b"]


def test_sdxl_keys_reach_the_layers_they_name(tokenizers):
    pipe = xl_pipe(tokenizers)
    # names written by hand from the sgm U-Net (input_blocks: 0 conv_in, 1 level-0 resnet, 2 downsampler,
    # 3 level-1 resnet + transformer; output_blocks 0-1 level 1, 2-3 level 0) and transformers' CLIP
    by_hand = {
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k":
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_input_blocks_3_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1",
        "lora_unet_input_blocks_2_0_op": "unet.down_blocks.0.downsamplers.0.conv",
        "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_1_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_0_0_skip_connection": "unet.up_blocks.0.resnets.0.conv_shortcut",
        "lora_unet_label_emb_0_2": "unet.add_embedding.linear_2",
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj": "text_encoder.encoder.layers.1.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "text_encoder_2.encoder.layers.0.mlp.fc1",
        "lora_te2_text_projection": "text_encoder_2.text_projection",
    }
    lora = random_lora(pipe, by_hand.values())
    file = {}
    for key, t in by_hand.items():
        down, up, alpha = lora[t]
        file |= {key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(alpha)}
    base = outputs(pipe)
    A.load_lora(pipe, file, scale=0.9, name="xl")
    assert sorted(pipe.loras["xl"].layers) == sorted(by_hand.values())
    got = outputs(pipe)
    assert_all_close(got, outputs(merged(pipe, (lora, 0.9))))
    assert all(gap([g], [b]) > 1e-3 for g, b in zip(got, base))       # U-Net and both encoders changed
    # te1 keys only: text_encoder_2 untouched (and the reverse)
    A.unload_lora(pipe)
    A.load_lora(pipe, {k: v for k, v in file.items() if k.startswith("lora_te1_")}, name="te1")
    got = outputs(pipe)
    assert gap(got[1:3], base[1:3]) > 1e-3 and torch.equal(got[3], base[3]) and torch.equal(got[4], base[4])


def _diffusers_targets(pipe, kohya: dict) -> dict[str, str]:
    """kohya key -> module, as diffusers 0.42 reads the file (no peft: its conversion functions only)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.utils.state_dict_utils import StateDictType as T
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    cls = diffusers.StableDiffusionXLPipeline if pipe.unet.config.is_sdxl_type else diffusers.StableDiffusionPipeline
    out = {}
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:   # one layer at a time: keys stay traceable
        stem = key.removesuffix(".lora_down.weight")
        one = {key: kohya[key], stem + ".lora_up.weight": kohya[stem + ".lora_up.weight"]}
        converted, _ = cls.lora_state_dict(one, unet_config=pipe.unet.config)
        (name,) = [k for k in converted if ".down." in k]
        net, rest = name.split(".", 1)
        if net == "unet":                 # as load_lora_into_unet
            (name,) = convert_unet_state_dict_to_peft({name: 0})
        else:                             # as _load_lora_into_text_encoder (its format guess made explicit)
            (rest,) = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
                {rest: 0}, original_type=T.DIFFUSERS_OLD), original_type=T.DIFFUSERS)
            name = f"{net}.{rest.removeprefix('text_model.')}"
        out[key] = name.split(".lora_A.")[0]
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_our_layer_for_every_kohya_key_is_the_one_diffusers_finds(tokenizers, family):
    pipe = sd_pipe(tokenizers) if family == "sd1" else xl_pipe(tokenizers)
    lora = A.new_lora(pipe, targets=None, networks=("unet", "text_encoder", "text_encoder_2"))  # every layer
    assert len(lora.layers) == len(every_target(pipe))
    kohya = A.lora_to_kohya(pipe, lora)          # SD 1.x: diffusers names; SDXL: sgm names, lora_te1_/te2_
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya) == (family == "sdxl")
    table = A.lora_name_table(pipe)
    ours = {k: table[k.removesuffix(".lora_down.weight")] for k in kohya if k.endswith(".lora_down.weight")}
    theirs = _diffusers_targets(pipe, kohya)
    assert ours == theirs and len(ours) == len(every_target(pipe))


def test_save_lora_in_the_kohya_layout_round_trips(tokenizers, tmp_path):
    for pipe in (sd_pipe(tokenizers), xl_pipe(tokenizers)):
        lora = A.new_lora(pipe, rank=2, alpha=1.0, networks=("unet", "text_encoder", "text_encoder_2"),
                          name="mine", generator=torch.Generator().manual_seed(0))
        for layer in lora.layers.values():
            nn.init.normal_(layer.up, std=0.2)                       # as if trained
        A.add_lora(pipe, lora)
        A.set_lora_scale(pipe, "mine", 0.8)
        want = outputs(pipe)
        path = A.save_lora(pipe, "mine", tmp_path / "mine.safetensors")
        A.unload_lora(pipe)
        A.load_lora(pipe, path, scale=0.8)
        assert_all_equal(outputs(pipe), want)
        keys = set(A.read_adapter_file(path)[0])
        te = ("lora_te1_", "lora_te2_") if isinstance(pipe, StableDiffusionXLPipeline) else ("lora_te_",)
        assert all(k.startswith(("lora_unet_", *te)) for k in keys) and any(k.endswith(".alpha") for k in keys)
        A.unload_lora(pipe)


def test_a_pickled_lora_needs_the_opt_in(tokenizers, tmp_path):
    pipe = sd_pipe(tokenizers)
    lora = random_lora(pipe, every_target(pipe)[:6])
    torch.save(as_kohya(lora), tmp_path / "old.pt")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        A.load_lora(pipe, tmp_path / "old.pt")
    A.load_lora(pipe, tmp_path / "old.pt", allow_pickle=True)
    assert_all_close(outputs(pipe), outputs(merged(pipe, (lora, 1.0))))


def _bad_lora_files(pipe, tokenizers, case):
    good = as_kohya(random_lora(pipe, every_target(pipe)[:4]))
    first = next(iter(good))
    sdxl_like = {}
    if case == "SDXL LoRA on SD 1.x":     # the same layer name, the context 40 wide instead of 16
        xl = xl_pipe(tokenizers)
        sdxl_like = as_kohya(random_lora(xl, ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]))
    return {
        "unknown layer": ({**good, "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8)},
                          "lora_unet_down_blocks_7_attentions_0_proj_in"),
        "SDXL LoRA on SD 1.x": ({**good, **sdxl_like}, r"another model"),
        "second encoder on SD 1.x": ({**good, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                      torch.ones(2, 16)}, "lora_te2_"),
        "up missing": ({k: v for k, v in good.items() if k != first.replace("lora_down", "lora_up")},
                       "needs both a down and an up"),
        "LyCORIS": ({**good, first.replace("lora_down.weight", "hada_w1_a"): torch.ones(2, 2)}, "LoHa"),
        "stray tensor": ({**good, "lora_unet_conv_in.something": torch.ones(1)}, "not part of a LoRA layer"),
        "whole model": ({"model.diffusion_model.conv_in.weight": torch.ones(8, 4, 3, 3)}, "whole-model checkpoint"),
        "embedding": ({"emb_params": torch.ones(2, 16)}, "textual-inversion embedding"),
    }


@pytest.mark.parametrize("case", ["unknown layer", "SDXL LoRA on SD 1.x", "second encoder on SD 1.x", "up missing",
                                  "LyCORIS", "stray tensor", "whole model", "embedding"])
def test_bad_lora_files_are_refused_with_nothing_applied(tokenizers, tmp_path, case):
    pipe = sd_pipe(tokenizers)
    state, message = _bad_lora_files(pipe, tokenizers, case)[case]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    before = outputs(pipe)
    with pytest.raises(ValueError, match=message) as err:
        A.load_lora(pipe, path)
    assert str(path) in str(err.value)
    assert not getattr(pipe, "loras", None) and not any(m._forward_hooks for m in modules(pipe).values())
    assert_all_equal(outputs(pipe), before)


def test_lora_arguments_are_checked(tokenizers):
    pipe = sd_pipe(tokenizers)
    state = as_kohya(random_lora(pipe, every_target(pipe)[:2]))
    A.load_lora(pipe, state, name="x")
    with pytest.raises(ValueError, match="already loaded"):
        A.load_lora(pipe, state, name="x")
    with pytest.raises(ValueError, match="no LoRA named 'y'"):
        A.unload_lora(pipe, "y")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        A.set_lora_scale(pipe, "x", float("nan"))
    with pytest.raises(FileNotFoundError):
        A.load_lora(pipe, "no/such/file.safetensors")


# --------------------------------------------------------------------------
# Textual inversion
# --------------------------------------------------------------------------
def _ti_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    v3, v1 = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    save_file({"emb_params": v3}, str(tmp_path / "shapes-star.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v3}, "name": "<star>", "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "a1111.pt")
    save_file({"<cat>": v1}, str(tmp_path / "learned_embeds.safetensors"))
    return {  # case -> (source, kwargs, tokens expected, vectors expected)
        "A1111 safetensors (emb_params), token from the file name":
            (tmp_path / "shapes-star.safetensors", {}, ["shapes-star", "shapes-star_1", "shapes-star_2"], v3),
        "A1111 .pt (string_to_param + name)": (tmp_path / "a1111.pt", {"allow_pickle": True},
                                                ["<star>", "<star>_1", "<star>_2"], v3),
        "diffusers {token: vector}": (tmp_path / "learned_embeds.safetensors", {}, ["<cat>"], v1[None]),
        "token= overrides": ({"<cat>": v1}, {"token": "<dog>"}, ["<dog>"], v1[None]),
        "a bare tensor": (v3[:2], {"token": "<two>"}, ["<two>", "<two>_1"], v3[:2]),
    }


@pytest.mark.parametrize("case", ["A1111 safetensors (emb_params), token from the file name",
                                  "A1111 .pt (string_to_param + name)", "diffusers {token: vector}",
                                  "token= overrides", "a bare tensor"])
def test_textual_inversion_formats(tokenizers, tmp_path, case):
    pipe = sd_pipe(tokenizers)
    source, kwargs, tokens, vectors = _ti_formats(tmp_path)[case]
    rows = pipe.text_encoder.embeddings.token_embedding.num_embeddings
    assert A.load_textual_inversion(pipe, source, **kwargs) == tokens
    ids = [pipe.tokenizer.encoder[t] for t in tokens]
    assert ids == list(range(rows, rows + len(tokens)))
    table = pipe.text_encoder.embeddings.token_embedding.weight
    assert torch.equal(table[ids], vectors.double()) and pipe.text_encoder.config.vocab_size == rows + len(tokens)
    assert pipe.tokenizer.encode(f"a {tokens[0]} circle")[2:2 + len(tokens)] == ids
    assert pipe.tokenizer.decode(pipe.tokenizer.encode(f"a {tokens[0]} circle")) == "a " + " ".join(tokens) + " circle"


def test_a1111_pt_embedding_needs_the_opt_in(tokenizers, tmp_path):
    source = _ti_formats(tmp_path)["A1111 .pt (string_to_param + name)"][0]
    with pytest.raises(ValueError, match="allow_pickle=True"):
        A.load_textual_inversion(sd_pipe(tokenizers), source)


def test_sdxl_embedding_fills_both_encoders(tokenizers, tmp_path):
    pipe = xl_pipe(tokenizers)
    g = torch.Generator().manual_seed(1)
    state = {"clip_l": torch.randn(2, 16, generator=g), "clip_g": torch.randn(2, 24, generator=g)}
    save_file(state, str(tmp_path / "xl-word.safetensors"))
    base, base_pooled = pipe.encode_prompt(["a xl-word circle"])
    assert A.load_textual_inversion(pipe, tmp_path / "xl-word.safetensors") == ["xl-word", "xl-word_1"]
    for tok, enc, key in (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g")):
        ids = [getattr(pipe, tok).encoder[t] for t in ("xl-word", "xl-word_1")]
        assert torch.equal(getattr(pipe, enc).embeddings.token_embedding.weight[ids], state[key].double())
    states, pooled = pipe.encode_prompt(["a xl-word circle"])
    assert states.shape == base.shape and float((states - base).abs().max()) > 1e-3
    assert float((pooled - base_pooled).abs().max()) > 1e-3          # the second encoder saw the word too


def test_multi_vector_token_expands_in_prompts_and_negative_prompts(tokenizers):
    pipe = sd_pipe(tokenizers)
    vectors = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    tokens = A.load_textual_inversion(pipe, {"<star>": vectors})
    star = [pipe.tokenizer.encoder[t] for t in tokens]
    tok = pipe.tokenizer
    body = tok.encode("a red", add_special_tokens=False) + star + tok.encode("on blue", add_special_tokens=False)
    row = [tok.bos_token_id, *body, tok.eos_token_id]
    ids = torch.tensor([row + [tok.pad_token_id] * (77 - len(row))])
    assert torch.equal(tok(["a red <star> on blue"]).input_ids, ids)
    by_hand = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(pipe.encode_prompt(["a red <star> on blue"]), by_hand, atol=0, rtol=0)
    # the negative prompt goes through the same encoder path: "<star>" alone, and "<star>_1" on its own
    assert tok.encode("<star>", add_special_tokens=False) == star
    assert tok.encode("<star>_1 blurry", add_special_tokens=False)[0] == star[1]
    negative = pipe.encode_prompt(["<star>", ""])
    assert float((negative[0] - negative[1]).abs().max()) > 1e-3
    # the pooled vector still comes from the EOS, not from the new (larger) ids
    assert torch.equal(pipe.text_encoder.eos_positions(ids), torch.tensor([len(row) - 1]))


def _diffusers_sd(root):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from test_tokenizer import write_hf_tokenizer_files

    torch.manual_seed(0)
    folder = write_hf_tokenizer_files(root / "tok")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                                  sample_size=8)
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                            unet=unet, scheduler=scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(root / "folder", safe_serialization=True)
    return ref, root / "folder"


def test_textual_inversion_matches_diffusers(tmp_path):
    import ministd

    ref, folder = _diffusers_sd(tmp_path)
    ours = ministd.load_pipeline(folder, optimize=False)
    embedding = {"<cat-toy>": torch.randn(3, 32, generator=torch.Generator().manual_seed(3))}
    ref.load_textual_inversion(embedding)
    assert A.load_textual_inversion(ours, embedding) == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    prompt, negative = "a photo of <cat-toy> on a table", "<cat-toy>, blurry"
    for text in (prompt, negative):
        converted = ref.maybe_convert_prompt(text, ref.tokenizer)
        assert ours.tokenizer([text]).input_ids.tolist() == ref.tokenizer(
            [converted], padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        want, want_negative = ref.encode_prompt(prompt, "cpu", 1, True, negative)
    torch.testing.assert_close(ours.encode_prompt([prompt]), want, atol=PARITY_ATOL, rtol=PARITY_ATOL)
    torch.testing.assert_close(ours.encode_prompt([negative]), want_negative, atol=PARITY_ATOL, rtol=PARITY_ATOL)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_matches_diffusers_load_lora_weights_and_fuse_lora(tmp_path, layout):
    """diffusers' own loader (with peft, as readers run it): ``load_lora_weights`` then
    ``fuse_lora(lora_scale=0.7)`` merges the LoRA into the weights; ministd applies it on the
    fly at scale 0.7. Same U-Net prediction and text states (float32, atol 1e-5)."""
    pytest.importorskip("peft")
    import ministd

    ref, folder = _diffusers_sd(tmp_path)
    ours = ministd.load_pipeline(folder, optimize=False)
    # what kohya's trainers and PEFT target: attention and feed-forward Linears, the U-Net's
    # ResNet and (down/up) sampler convolutions, the text encoder's projections and MLPs
    targets = [t for t in every_target(ours) if "time_emb" not in t and not t.startswith(("unet.conv_in",
                                                                                          "unet.conv_out"))]
    assert {"unet.down_blocks.0.resnets.0.conv1", "unet.down_blocks.0.downsamplers.0.conv",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "text_encoder.encoder.layers.1.mlp.fc2"} <= set(targets)
    lora = {t: tuple(x.float() if torch.is_tensor(x) else x for x in v)
            for t, v in random_lora(ours, targets, rank=2, alpha=3.0, seed=4).items()}
    if layout == "kohya":
        state = {k: v.contiguous() for k, v in as_kohya(lora).items()}
        save_file(state, str(tmp_path / "style.safetensors"))
    else:
        state = {}
        for t, (down, up, _) in lora.items():
            state |= {peft_name(t) + ".lora_A.weight": down.contiguous(),
                      peft_name(t) + ".lora_B.weight": up.contiguous()}
        config = {}                   # PEFT's LoraConfig per network, as diffusers writes it
        for net in ("unet", "text_encoder"):
            names = sorted({peft_name(t).split(".", 1)[1] if net == "unet" else t.rsplit(".", 1)[1]
                            for t in lora if t.startswith(net + ".")})    # the text encoder's as diffusers writes them
            config |= {f"{net}.{k}": v for k, v in {"r": 2, "lora_alpha": 3.0, "alpha_pattern": {},
                                                     "rank_pattern": {}, "target_modules": names}.items()}
        save_file(state, str(tmp_path / "style.safetensors"),
                  metadata={"lora_adapter_metadata": json.dumps(config)})
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    prompts = ["a red circle", "a big blue box"]
    with torch.no_grad():
        before = ref.unet(x, t, ref.encode_prompt(prompts, "cpu", 1, False)[0]).sample
        ref.load_lora_weights(str(tmp_path / "style.safetensors"))
        ref.fuse_lora(lora_scale=0.7)
        want_states = ref.encode_prompt(prompts, "cpu", 1, False)[0]
        want = ref.unet(x, t, want_states).sample
    ours.load_lora(tmp_path / "style.safetensors", scale=0.7)
    got_states = ours.encode_prompt(prompts)
    torch.testing.assert_close(got_states, want_states, atol=PARITY_ATOL, rtol=PARITY_ATOL)
    with torch.no_grad():
        got = ours.unet(x, t, got_states)
    torch.testing.assert_close(got, want, atol=PARITY_ATOL, rtol=PARITY_ATOL)
    assert float((want - before).abs().max()) > 100 * PARITY_ATOL      # the LoRA changed the prediction


def test_bad_embeddings_are_refused_with_nothing_changed(tokenizers):
    pipe, xl = sd_pipe(tokenizers), xl_pipe(tokenizers)
    rows, vocab = pipe.text_encoder.embeddings.token_embedding.num_embeddings, len(pipe.tokenizer)
    cases = [
        (pipe, {"<wide>": torch.ones(2, 24)}, {}, r"24 wide, but text_encoder is 16 wide"),
        (pipe, {"a": torch.ones(16), "b": torch.ones(16)}, {}, "not a textual-inversion embedding"),
        (pipe, {"<|endoftext|>": torch.ones(16)}, {}, "already in the vocabulary of tokenizer"),
        (pipe, {"clip_l": torch.ones(1, 16), "clip_g": torch.ones(1, 24)}, {"token": "<x>"}, "SDXL embedding"),
        (xl, {"<one>": torch.ones(16)}, {}, "one-encoder embedding"),
        (xl, {"clip_l": torch.ones(2, 16), "clip_g": torch.ones(1, 24)}, {"token": "<x>"},
         "different numbers of vectors"),
        (pipe, {"lora_unet_conv_in.lora_down.weight": torch.ones(1), "x": torch.ones(1)}, {}, "not a textual"),
        (pipe, torch.ones(16), {}, "needs token="),
    ]
    for target, state, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            A.load_textual_inversion(target, state, **kwargs)
    assert pipe.text_encoder.embeddings.token_embedding.num_embeddings == rows and len(pipe.tokenizer) == vocab
    A.load_textual_inversion(pipe, {"<new>": torch.ones(2, 16)})
    with pytest.raises(ValueError, match="'<new>_1' is already in the vocabulary"):
        A.load_textual_inversion(pipe, {"<new>_1": torch.ones(16)})
    with pytest.raises(ValueError, match="'<new>' is already in the vocabulary"):
        A.load_textual_inversion(pipe, {"<new>": torch.ones(16)})


# --------------------------------------------------------------------------
# Hypernetworks
# --------------------------------------------------------------------------
def _random_hypernetwork(widths, options=None, seed=0) -> A.Hypernetwork:
    return A.Hypernetwork(widths, options).double().init_weights(std=0.3, generator=torch.Generator().manual_seed(seed))


def _attention_by_hand(attn: Attention, x, context_k, context_v):
    """softmax(q k^T / sqrt(d)) v with the layer's weights, bypassing its modules (and their hooks)."""
    def heads(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, attn.dim_head).transpose(1, 2)
    q = heads(F.linear(x, attn.to_q.weight))
    k, v = heads(F.linear(context_k, attn.to_k.weight)), heads(F.linear(context_v, attn.to_v.weight))
    probs = (q @ k.transpose(-1, -2) / attn.dim_head ** 0.5).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


def test_hypernetwork_is_the_a1111_formula(tokenizers):
    pipe = sd_pipe(tokenizers, context=12)           # widths: image tokens 8 (level 0), 16 (level 1); text 12
    options = A.HypernetworkOptions(layer_structure=[1, 2, 1], activation_func="relu", activate_output=False)
    hn = _random_hypernetwork([8, 12], options)
    A.add_hypernetwork(pipe, hn)
    hn.strength = 0.6
    g = torch.Generator().manual_seed(0)

    def f(index, c):                                  # A1111: Linear(w, 2w), ReLU, Linear(2w, w)
        first, second = hn.layers[str(c.shape[-1])][index].linear[0], hn.layers[str(c.shape[-1])][index].linear[2]
        return F.linear(torch.relu(F.linear(c, first.weight, first.bias)), second.weight, second.bias)

    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)          # image tokens of level 0
    text = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for attn, context in ((block.attn1, x), (block.attn2, text)):          # self- and cross-attention
            want = _attention_by_hand(attn, x, context + 0.6 * f(0, context), context + 0.6 * f(1, context))
            got = attn(x, None if attn is block.attn1 else text)
            torch.testing.assert_close(got, want, atol=HYPER_TOL, rtol=HYPER_TOL)
    level1 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1     # width 16: not in the file
    assert not level1.to_k._forward_pre_hooks and block.attn2.to_v._forward_pre_hooks


def test_hypernetwork_strength_zero_and_unload_are_exact(tokenizers):
    pipe = sd_pipe(tokenizers, context=12)
    before = outputs(pipe)
    hn = A.add_hypernetwork(pipe, _random_hypernetwork([8, 12, 16]))
    hn.strength = 0.0
    assert_all_equal(outputs(pipe), before)
    hn.strength = 1.0
    assert gap(outputs(pipe), before) > 1e-3
    A.unload_hypernetwork(pipe)
    assert_all_equal(outputs(pipe), before)
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules()) and pipe.hypernetworks == []


def _a1111_mlp(width: int, seed: int) -> nn.Sequential:
    """What A1111 builds for layer_structure [1, 2, 2, 1], relu, layer norm, use_dropout, activate_output False:
    [Linear, ReLU, LayerNorm, Dropout(0.3), Linear, ReLU, LayerNorm, Linear, LayerNorm] (written out here)."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.LayerNorm(2 * width), nn.Dropout(0.3),
                        nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.LayerNorm(2 * width),
                        nn.Linear(2 * width, width), nn.LayerNorm(width))
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return mlp.double().eval()


def test_a1111_pickle_and_safetensors_forms_load_the_same_mlps(tokenizers, tmp_path):
    mlps = {w: (_a1111_mlp(w, 2 * w), _a1111_mlp(w, 2 * w + 1)) for w in (8, 12)}
    a1111 = {w: tuple({"linear." + n: t for n, t in m.state_dict().items()} for m in pair)   # module.linear
             for w, pair in mlps.items()}
    a1111 |= {"layer_structure": [1, 2, 2, 1], "activation_func": "relu", "is_layer_norm": True,
              "use_dropout": True, "last_layer_dropout": False, "activate_output": False, "weight_initialization":
              "Normal", "step": 1000, "name": "style", "sd_checkpoint": None, "sd_checkpoint_name": None}
    torch.save(a1111, tmp_path / "style.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        A.read_hypernetwork(tmp_path / "style.pt")
    hn = A.read_hypernetwork(tmp_path / "style.pt", allow_pickle=True)
    assert hn.name == "style" and hn.widths == [8, 12]
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for index in (0, 1):
        torch.testing.assert_close(hn.layers["12"][index].double()(x, 0.7), x + 0.7 * mlps[12][index](x),
                                   atol=HYPER_TOL, rtol=HYPER_TOL)
    path = A.save_hypernetwork(hn, tmp_path / "style.safetensors")
    again = A.read_hypernetwork(path)
    assert again.options == hn.options and again.name == "style"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), hn.state_dict().values()))
    # and applied to a pipeline both give the same pictures' worth of numbers
    pipe = sd_pipe(tokenizers, context=12)
    A.load_hypernetwork(pipe, tmp_path / "style.pt", strength=0.8, allow_pickle=True)
    want = outputs(pipe)
    A.unload_hypernetwork(pipe)
    A.load_hypernetwork(pipe, path, strength=0.8)
    assert_all_equal(outputs(pipe), want)


def test_bad_hypernetworks_are_refused(tokenizers, tmp_path):
    pipe = sd_pipe(tokenizers, context=12)
    save_file(_random_hypernetwork([768]).tensors(), str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ValueError, match=r"widths \[768\].*widths \[8, 12, 16\]"):
        A.load_hypernetwork(pipe, tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match="is not a hypernetwork layer.*a LoRA|not a hypernetwork layer"):
        A.load_hypernetwork(pipe, {"lora_unet_conv_in.lora_down.weight": torch.ones(1)})
    broken = _random_hypernetwork([8]).tensors()
    broken["8.0.linear.1.weight"] = broken.pop("8.0.linear.0.weight")
    with pytest.raises(ValueError, match="8.0"):
        A.load_hypernetwork(pipe, broken)
    with pytest.raises(ValueError, match="layer_structure must start and end with 1"):
        A.HypernetworkOptions(layer_structure=[2, 1])
    assert not getattr(pipe, "hypernetworks", None)


def test_pipeline_methods_are_the_adapters_functions(tokenizers, tmp_path):
    """``pipe.load_lora`` / ``set_lora_scale`` / ``unload_lora`` / ``load_textual_inversion`` /
    ``load_hypernetwork`` (DESIGN.md's API) do what ministd.adapters' functions do."""
    pipe, twin = sd_pipe(tokenizers), sd_pipe(tokenizers)
    before = outputs(pipe)
    lora = as_kohya(random_lora(pipe, every_target(pipe)))
    save_file(lora, str(tmp_path / "style.safetensors"))
    assert pipe.load_lora(tmp_path / "style.safetensors", scale=0.5) == "style"
    A.load_lora(twin, tmp_path / "style.safetensors", scale=0.5)
    assert_all_equal(outputs(pipe), outputs(twin))
    pipe.set_lora_scale("style", 0.0)
    assert_all_equal(outputs(pipe), before)
    pipe.unload_lora()
    A.unload_lora(twin)
    assert pipe.loras == {}
    vector = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(3))
    assert pipe.load_textual_inversion({"<thing>": vector}) == A.load_textual_inversion(twin, {"<thing>": vector})
    assert pipe.tokenizer.encode("a <thing>") == twin.tokenizer.encode("a <thing>")
    path = A.save_hypernetwork(_random_hypernetwork([pipe.unet.config.cross_attention_dim]), tmp_path / "h.safetensors")
    pipe.load_hypernetwork(path, strength=0.3)
    A.load_hypernetwork(twin, path, strength=0.3)
    assert_all_equal(outputs(pipe), outputs(twin))
    pipe.unload_hypernetwork()
    assert_all_equal(outputs(pipe), before)
