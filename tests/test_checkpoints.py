"""Single original checkpoint files: inspect, load_single_file, the bad inputs, ``ministd info``.

Parity. Tiny random SD 1.x, SD 2.x, SDXL base and SDXL refiner pipelines are
built with diffusers and transformers and saved as diffusers folders (the reference). The test then
writes each as a single file in the original CompVis layout with its *own*
converter (below, written from the ldm / OpenCLIP module structure, not from
ministd's key maps), checks that diffusers' own single-file loader reads that
file back to exactly the reference's weights (so the file really is the
original layout), and checks that ministd's :func:`load_single_file` gives
the reference's pictures.

A single file stores no config, so the tiny models follow the rules the real
families follow and ministd relies on: SD 1.x U-Nets 8 heads, SD 2.x U-Nets
heads 64 wide, CLIP text encoders heads 64 wide, GroupNorm in 32 groups,
quick-GELU (SD 1.x) / GELU (SD 2.x), and the SD 2.x file one text layer more
than the pipeline runs (SD 2.x uses the penultimate layer). SDXL's likewise
(section "SDXL" below): U-Net heads 64 wide, CLIP-L with quick-GELU and
OpenCLIP bigG with GELU, 64-wide heads, its projection, every layer kept.

Tolerance: |difference| <= 2e-5 on pixel values in [0, 1] in float32, as in
tests/test_pipelines.py (same arithmetic in a slightly different order);
single networks (the 9-channel U-Net) atol = rtol = 1e-5; the SDXL base's
latents handed to the refiner atol 2e-5, rtol 1e-4 (as tests/test_sdxl_pipelines.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ministd
from ministd import checkpoints as C
from test_tokenizer import write_hf_tokenizer_files

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ATOL = 2e-5
UNET_ATOL = UNET_RTOL = 1e-5
PROMPTS = ["a small red circle in the top left", "a big blue box"]
NEGATIVE = ["blurry", ""]
CA, D, CU, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# tiny configs that follow each family's rules (module docstring)
TINY_UNET = {
    "sd1": dict(block_out_channels=(32, 64, 64), attention_head_dim=8, cross_attention_dim=64),
    "sd2": dict(block_out_channels=(64, 64, 128), attention_head_dim=[1, 1, 2],   # head counts: 64 wide
                cross_attention_dim=64, use_linear_projection=True, upcast_attention=True),
}
TINY_TEXT = {"sd1": "quick_gelu", "sd2": "gelu"}
PAD = {"sd1": "<|endoftext|>", "sd2": "!"}


# --------------------------------------------------------------------------
# the test's own converter: diffusers / transformers names -> the original layout
# --------------------------------------------------------------------------

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            # SDXL's added vector (pooled text + time ids): sgm's label_emb = [[Linear, SiLU, Linear]]
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_original(sd: dict, cfg) -> dict:
    """diffusers UNet2DConditionModel -> ``model.diffusion_model.*`` of ldm's UNetModel.

    ldm keeps flat lists: input_blocks = [conv_in] + per level n x [ResBlock,
    SpatialTransformer?] + [Downsample ``op``]; middle_block = [ResBlock,
    SpatialTransformer, ResBlock]; output_blocks = per level, bottom first,
    (n + 1) x [ResBlock, SpatialTransformer?, Upsample?]; out = [GroupNorm, SiLU, conv].
    """
    n = cfg["layers_per_block"] + 1
    attention = [t == CA for t in cfg["down_block_types"]]

    def block(kind, rest):  # inside one ResBlock or SpatialTransformer
        return ".".join([RESNET[rest[0]]] + rest[1:]) if kind == "resnets" else ".".join(rest)

    out = {}
    for key, value in sd.items():
        p = key.split(".")
        top = next((t for t in (p[0], ".".join(p[:2])) if t in UNET_TOP), None)
        if top is not None:
            name = f"{UNET_TOP[top]}.{p[-1]}"
        elif p[0] == "mid_block":
            index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
            name = f"middle_block.{index}.{block(p[1], p[3:])}"
        elif p[0] == "down_blocks":
            level, kind, j = int(p[1]), p[2], int(p[3])
            if kind == "downsamplers":
                name = f"input_blocks.{(level + 1) * n}.0.op.{p[-1]}"
            else:
                name = f"input_blocks.{1 + level * n + j}.{0 if kind == 'resnets' else 1}.{block(kind, p[4:])}"
        else:  # up_blocks, numbered from the bottom level
            level, kind, j = int(p[1]), p[2], int(p[3])
            if kind == "upsamplers":
                slot = 2 if attention[len(attention) - 1 - level] else 1
                name = f"output_blocks.{level * n + n - 1}.{slot}.conv.{p[-1]}"
            else:
                name = f"output_blocks.{level * n + j}.{0 if kind == 'resnets' else 1}.{block(kind, p[4:])}"
        out["model.diffusion_model." + name] = value
    return out


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(sd: dict, levels: int, prefix: str = "first_stage_model.") -> dict:
    """diffusers AutoencoderKL -> ldm's ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}`` names
    (decoder levels counted from the top, attention projections as 1x1 convs)."""
    out = {}
    for key, value in sd.items():
        name = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
        if m:
            part, kind, level, what, j, rest = m.groups()
            level = int(level) if kind == "down" else levels - 1 - int(level)
            name = (f"{part}.{kind}.{level}.block.{j}.{rest}" if what == "resnets"
                    else f"{part}.{kind}.{level}.{what[:-2]}.{rest}")
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", name)
        if m:
            name = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", name)
        if m:
            name = f"{m.group(1)}.mid.attn_1.{VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and m.group(2) != "group_norm":
                value = value[:, :, None, None]
        out[prefix + name] = value
    return out


def clip_to_original(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers CLIPTextModel -> SD 1.x's ``cond_stage_model.transformer.text_model.*`` (+ position ids),
    or SDXL's first encoder with ``prefix="conditioner.embedders.0.transformer."``."""
    out = {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_to_openclip(sd: dict, seed: int = 7, p: str = "cond_stage_model.model.", sdxl: bool = False) -> dict:
    """transformers CLIPTextModel with n layers -> SD 2.x's ``cond_stage_model.model.*`` with n + 1:
    OpenCLIP's fused q/k/v ``in_proj``, plus the last block, the text projection and the
    temperature that SD 2.x stores and never runs (random here).

    ``sdxl``: a CLIPTextModelWithProjection -> SDXL's bigG under ``p`` (``conditioner.embedders.1.model.``,
    the refiner's ``conditioner.embedders.0.model.``) with its n layers and its own projection, stored
    as OpenCLIP's bare matrix P [D, P_out] used as x @ P (transformers' Linear weight transposed)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    g = torch.Generator().manual_seed(seed)
    for i in range(layers + (0 if sdxl else 1)):
        src, dst = f"encoder.layers.{min(i, layers - 1)}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            fused = torch.cat([sd[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"])
            block = {f"attn.in_proj_{kind}": fused,
                     **{f"{theirs}.{kind}": sd[f"{src}{ours}.{kind}"] for ours, theirs in OPENCLIP.items()}}
            for name, value in block.items():
                out[dst + name] = value if i < layers else torch.randn(value.shape, generator=g)
    width = out[p + "ln_final.weight"].shape[0]
    out[p + "text_projection"] = sd["text_projection.weight"].T if sdxl else torch.randn(width, width, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out


SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1"]


def to_single_file(pipe, family: str) -> dict:
    """A whole diffusers pipeline -> one original-layout state dict, with the schedule buffers
    released files carry (ldm: betas, alphas_cumprod, ...; sgm, SDXL: the denoiser's sigmas)."""
    levels = len(pipe.vae.config.block_out_channels)
    out = {**unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
           **vae_to_original(pipe.vae.state_dict(), levels)}
    if family == "sd1":
        out.update(clip_to_original(pipe.text_encoder.state_dict()))
    elif family == "sd2":
        out.update(clip_to_openclip(pipe.text_encoder.state_dict()))
    elif family == "sdxl_base":
        out.update(clip_to_original(pipe.text_encoder.state_dict(), prefix="conditioner.embedders.0.transformer."))
        out.update(clip_to_openclip(pipe.text_encoder_2.state_dict(), p="conditioner.embedders.1.model.", sdxl=True))
    else:  # the refiner: bigG alone, first in its list of embedders
        out.update(clip_to_openclip(pipe.text_encoder_2.state_dict(), p="conditioner.embedders.0.model.", sdxl=True))
    if family.startswith("sdxl"):
        out["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    else:
        out.update({name: torch.linspace(0.001, 0.02, 1000) for name in SCHEDULE_BUFFERS})
    return out


def write(path, tensors: dict):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# --------------------------------------------------------------------------
# tiny reference pipelines
# --------------------------------------------------------------------------

def tiny_unet(family: str, in_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4,
                                          layers_per_block=2, down_block_types=(CA, CA, D),
                                          up_block_types=(UP, CU, CU), **TINY_UNET[family])
    return _shaken(unet)


def tiny_vae(seed: int = 0, **config):
    torch.manual_seed(seed)
    return _shaken(diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2,
                                           latent_channels=4, sample_size=16, **config))


def tiny_text_encoder(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return _shaken(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act=TINY_TEXT[family], bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)))


def _shaken(module):
    """Random init, then every weight moved off its init value (no zero or unit tensors)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def tiny_pipeline(family: str, root, in_channels: int = 4, unet=None):
    tok_dir = write_hf_tokenizer_files(root / f"hf_tok_{family}", pad_token=PAD[family])
    tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                           pad_token=PAD[family], model_max_length=77)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    set_alpha_to_one=False)
    scheduler = (diffusers.PNDMScheduler(skip_prk_steps=True, **schedule) if family == "sd1" else
                 diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **schedule))
    return diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(family), tokenizer=tokenizer,
        unet=unet if unet is not None else tiny_unet(family, in_channels), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family_case(request, tmp_path_factory):
    """(family, reference diffusers pipeline, its folder, the single original file)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    ref = tiny_pipeline(family, root)
    ref.save_pretrained(root / "folder", safe_serialization=True)
    ref.set_progress_bar_config(disable=True)
    path = write(root / "model.safetensors", to_single_file(ref, family))
    return family, ref, root / "folder", path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The SD 1.x case alone, with its tensors as a dict (for the bad-input variants)."""
    root = tmp_path_factory.mktemp("sd1_only")
    ref = tiny_pipeline("sd1", root)
    ref.save_pretrained(root / "folder", safe_serialization=True)
    tensors = to_single_file(ref, "sd1")
    return ref, root / "folder", write(root / "model.safetensors", tensors), tensors


def _load(path, **kwargs):
    pipe = C.load_single_file(path, **kwargs)
    pipe.progress_bar = False
    return pipe


# --------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------

def test_the_test_file_is_the_original_layout(family_case):
    """diffusers' own single-file loader reads the test's file back to the reference's weights."""
    family, ref, folder, path = family_case
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        assert sorted(a) == sorted(b), name
        for key in a:
            assert torch.equal(a[key], b[key].reshape(a[key].shape)), f"{name}: {key}"


def test_txt2img_from_a_single_file_matches_diffusers(family_case):
    family, ref, folder, path = family_case
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # an explicit prediction type: no warning
        ours = _load(path, prediction_type="v_prediction" if family == "sd2" else None)
    assert ours.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    assert type(ref.scheduler).__name__ == {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler"}[ours.scheduler.name]
    assert ours.tokenizer.pad_token == PAD[family]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=5, guidance_scale=7.5, height=16, width=16, output_type="np")
    expected = ref(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(), **kwargs).images
    got = np.stack(ours.txt2img(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(), **kwargs).images)
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(got - expected).max() <= ATOL, np.abs(got - expected).max()
    # the check can fail: another guidance scale moves the pictures far more than the tolerance
    other = np.stack(ours.txt2img(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(),
                                  **{**kwargs, "guidance_scale": 3.0}).images)
    assert np.abs(other - expected).max() > 100 * ATOL


def test_sd2_prediction_type_follows_diffusers_rule_and_warns(family_case):
    family, ref, folder, path = family_case
    if family != "sd2":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _load(path).scheduler.config.prediction_type == "epsilon"
        return
    with pytest.warns(UserWarning, match="prediction_type='v_prediction' or 'epsilon'"):
        pipe = _load(path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.sample_size == 96            # 768-pixel default for SD 2.x v-models
    assert _load(path, prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"
    # a folder's scheduler config (config=) says it too, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load(path, config=folder).scheduler.config.prediction_type == "v_prediction"


def test_inpainting_unet_from_a_single_file_matches_diffusers(tmp_path):
    ref = tiny_pipeline("sd1", tmp_path, in_channels=9)
    path = write(tmp_path / "inpaint.safetensors", to_single_file(ref, "sd1"))
    info = C.inspect(path)
    assert info.family == "sd1" and info.in_channels == 9 and info.inpainting
    assert "inpainting" in info.family_name
    ours = C.load_single_file(path)
    assert ours.unet.config.in_channels == 9
    g = torch.Generator().manual_seed(3)
    x, states = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        expected = ref.unet(x, t, states).sample
        got = ours.unet(x, t, states)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=UNET_ATOL, rtol=UNET_RTOL)


def test_weights_arrive_once_in_the_dtype_asked(sd1):
    """bfloat16: every tensor read straight into bfloat16 (the VAE too: bfloat16 has float32's
    range, and diffusers upcasts the decoder for float16 only), nothing left on the meta
    device, values equal to the file's, rounded; float16 keeps the decoder in float32."""
    ref, folder, path, tensors = sd1
    pipe = C.load_single_file(path, dtype=torch.bfloat16)
    for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae)):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    half = C.load_single_file(path, dtype=torch.float16).vae
    assert {p.dtype for p in half.decoder.parameters()} == {torch.float32}
    assert {p.dtype for p in half.encoder.parameters()} == {torch.float16}
    every = [*pipe.unet.parameters(), *pipe.vae.parameters(), *pipe.text_encoder.parameters()]
    assert not any(p.is_meta for p in every)
    original = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    ours = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.equal(ours, tensors[original].to(torch.bfloat16))
    out = pipe.txt2img("a red circle", num_inference_steps=2, height=16, width=16, seed=0, output_type="np")
    assert np.isfinite(out.images[0]).all()


def test_use_ema_loads_the_ema_copy(sd1, tmp_path):
    ref, folder, path, tensors = sd1
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 0.5
           for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    path = write(tmp_path / "with_ema.safetensors",
                 {**tensors, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    assert C.inspect(path).has_ema
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(C.load_single_file(path).unet.conv_out.weight, tensors[key])
    assert torch.equal(C.load_single_file(path, use_ema=True).unet.conv_out.weight, tensors[key] + 0.5)
    front_door = ministd.load_pipeline(path, use_ema=True, optimize=False)       # load_pipeline passes it on
    assert torch.equal(front_door.unet.conv_out.weight, tensors[key] + 0.5)
    with pytest.raises(ValueError, match="no EMA copy"):
        C.load_single_file(sd1[2], use_ema=True)


@pytest.mark.parametrize("layout", ["original", "diffusers", "folder"])
def test_a_separate_vae_replaces_the_files_own(sd1, tmp_path, layout):
    ref, folder, path, tensors = sd1
    other = tiny_vae(seed=11)
    if layout == "original":
        vae = write(tmp_path / "vae.safetensors", vae_to_original(other.state_dict(), 2, prefix=""))
    elif layout == "diffusers":
        vae = write(tmp_path / "vae.safetensors", other.state_dict())
    else:
        other.save_pretrained(tmp_path / "vae")
        vae = tmp_path / "vae"
    pipe = C.load_single_file(path, vae=vae)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(x), other.decode(x).sample, atol=1e-5, rtol=1e-4)
    # without the file's own VAE, vae= is what makes it loadable
    no_vae = {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}
    bare = write(tmp_path / "no_vae.safetensors", no_vae)
    with pytest.raises(ValueError, match="vae="):
        C.load_single_file(bare)
    assert C.load_single_file(bare, vae=vae).vae is not None


def test_config_overrides_what_the_weights_cannot_show(tmp_path):
    """A fine-tune that breaks SD 1.x's 8-heads rule loads right with config= (a folder or a dict)."""
    torch.manual_seed(0)
    unet = _shaken(diffusers.UNet2DConditionModel.from_config({**tiny_unet("sd1").config, "attention_head_dim": 4}))
    ref = tiny_pipeline("sd1", tmp_path, unet=unet)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    path = write(tmp_path / "four_heads.safetensors", to_single_file(ref, "sd1"))
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        expected = ref.unet(x, 500, states).sample
        wrong = C.load_single_file(path).unet(x, 500, states)      # the weights fit 8 heads just as well
        by_folder = C.load_single_file(path, config=tmp_path / "folder").unet(x, 500, states)
        config = json.loads((tmp_path / "folder" / "unet" / "config.json").read_text())
        by_dict = C.load_single_file(path, config={"unet": config}).unet(x, 500, states)
    assert (wrong - expected).abs().max() > 1e-3
    torch.testing.assert_close(by_folder, expected, atol=UNET_ATOL, rtol=UNET_RTOL)
    torch.testing.assert_close(by_dict, expected, atol=UNET_ATOL, rtol=UNET_RTOL)
    with pytest.raises(ValueError, match="unknown component"):
        C.load_single_file(path, config={"unett": config})


def test_load_pipeline_takes_a_single_file(sd1, tmp_path):
    import ministd

    ref, folder, path, tensors = sd1
    pipe = ministd.load_pipeline(path, prediction_type="epsilon", config=folder)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    torch.save(tensors, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        ministd.load_pipeline(tmp_path / "model.ckpt")
    assert ministd.load_pipeline(tmp_path / "model.ckpt", allow_pickle=True).unet is not None


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------

def test_inspect_a_single_file_reads_only_the_header(sd1, monkeypatch):
    ref, folder, path, tensors = sd1
    monkeypatch.setattr(C._Tensors, "load", lambda *a, **k: pytest.fail("inspect read tensors"))
    info = C.inspect(path)
    assert (info.family, info.layout, info.in_channels, info.prediction_type) == ("sd1", "single file", 4, None)
    counts = {name: sum(p.numel() for p in getattr(ref, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert {n: c.parameters for n, c in info.components.items()} == counts
    assert all(c.dtypes == {"float32": c.tensors} for c in info.components.values())
    assert sum(info.skipped.values()) == len(SCHEDULE_BUFFERS) + 1       # + the position ids
    text = info.summary()
    assert "SD 1.x" in text and f"{counts['unet']:,}" in text


def test_inspect_a_folder(family_case):
    family, ref, folder, path = family_case
    info = C.inspect(folder)
    assert (info.family, info.layout, info.in_channels) == (family, "diffusers folder", 4)
    assert info.prediction_type == ref.scheduler.config.prediction_type
    assert info.components["unet"].parameters == sum(p.numel() for p in ref.unet.parameters())


def _sdxl_like(path, refiner: bool):
    """The few keys that identify an SDXL file (tiny shapes; enough for the family check)."""
    tensors = {C.UNET_MARKER: torch.zeros(32, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 8),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}
    if refiner:
        tensors["conditioner.embedders.0.model.positional_embedding"] = torch.zeros(77, 64)
    else:
        tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"] = torch.zeros(77, 64)
        tensors["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 64)
    return write(path, tensors)


@pytest.mark.parametrize("refiner", [False, True])
def test_sdxl_files_are_recognised_from_their_keys(tmp_path, refiner):
    path = _sdxl_like(tmp_path / "xl.safetensors", refiner)
    info = C.inspect(path)
    assert info.family == ("sdxl_refiner" if refiner else "sdxl_base")
    assert set(info.components) == ({"unet", "vae", "text_encoder_2"} if refiner
                                    else {"unet", "vae", "text_encoder", "text_encoder_2"})
    with pytest.raises(ValueError, match="missing key"):     # a few keys only: refused, naming what lacks
        C.load_single_file(path)


# --------------------------------------------------------------------------
# SDXL base and refiner from single files
# --------------------------------------------------------------------------

# The tiny SDXL models follow the rules a file cannot store: U-Net heads 64 wide (1 head at
# 64 channels, 2 at 128), 32 GroupNorm groups, text encoders with 64-wide heads (CLIP-L 64
# wide, bigG 128: the widths must differ, as 768 and 1280 do, for diffusers' loader to tell
# them apart), quick-GELU / GELU. The Fourier width of the time ids (SDXL: 256) and the
# pooled width (SDXL: 1280) are read off the shapes, so they shrink freely.
XL_TIME_DIM = 8
XL_POOLED = 32                 # bigG's projection: 128 -> 32, not square, so a transpose shows
XL_TEXT = {"text_encoder": dict(hidden_size=64, hidden_act="quick_gelu", pad_token_id=49407),
           "text_encoder_2": dict(hidden_size=128, hidden_act="gelu", pad_token_id=0)}
XL_UNET = {  # real: base 320 x [1, 2, 4], attention at levels 1, 2; refiner 384 x [1, 2, 4, 4], at 1, 2
    "sdxl_base": dict(block_out_channels=(32, 64, 128), down_block_types=(D, CA, CA), up_block_types=(CU, CU, UP),
                      attention_head_dim=[1, 1, 2], transformer_layers_per_block=[1, 1, 2],
                      cross_attention_dim=64 + 128),
    "sdxl_refiner": dict(block_out_channels=(32, 64, 128), down_block_types=(D, CA, D), up_block_types=(UP, CU, UP),
                         attention_head_dim=[1, 1, 2], transformer_layers_per_block=2, cross_attention_dim=128),
}
XL_TIME_IDS = {"sdxl_base": 6, "sdxl_refiner": 5}


def tiny_xl_text_encoder(name: str, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, intermediate_size=2 * XL_TEXT[name]["hidden_size"],
                                      num_hidden_layers=2, num_attention_heads=XL_TEXT[name]["hidden_size"] // 64,
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                      projection_dim=XL_POOLED, **XL_TEXT[name])
    cls = transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else transformers.CLIPTextModel
    return _shaken(cls(cfg))


def tiny_xl_unet(family: str, seed: int):
    torch.manual_seed(seed)
    return _shaken(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_DIM,
        projection_class_embeddings_input_dim=XL_POOLED + XL_TIME_IDS[family] * XL_TIME_DIM, **XL_UNET[family]))


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """{"sdxl_base" / "sdxl_refiner": (reference pipeline read back from its folder, folder, file, tensors)}."""
    root = tmp_path_factory.mktemp("sdxl")
    toks = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        folder = write_hf_tokenizer_files(root / f"hf_{name}", pad_token=pad)
        toks[name] = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                                pad_token=pad, model_max_length=77)
    text_encoder, text_encoder_2 = tiny_xl_text_encoder("text_encoder", 1), tiny_xl_text_encoder("text_encoder_2", 2)
    vae = tiny_vae(seed=3, scaling_factor=0.13025, force_upcast=True)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipes = {
        "sdxl_base": diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=toks["tokenizer"],
            tokenizer_2=toks["tokenizer_2"], unet=tiny_xl_unet("sdxl_base", 4), scheduler=scheduler,
            force_zeros_for_empty_prompt=True),
        "sdxl_refiner": diffusers.StableDiffusionXLImg2ImgPipeline(   # the same bigG and VAE, as released
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
            tokenizer_2=toks["tokenizer_2"], unet=tiny_xl_unet("sdxl_refiner", 5), scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False),
    }
    out = {}
    for family, pipe in pipes.items():
        pipe.save_pretrained(root / family, safe_serialization=True)
        tensors = to_single_file(pipe, family)
        ref = type(pipe).from_pretrained(root / family)
        ref.set_progress_bar_config(disable=True)
        out[family] = (ref, root / family, write(root / f"{family}.safetensors", tensors), tensors)
    return out


def _xl_components(family: str) -> tuple[str, ...]:
    return ("unet", "vae", "text_encoder_2") + (("text_encoder",) if family == "sdxl_base" else ())


@pytest.mark.parametrize("family", ["sdxl_base", "sdxl_refiner"])
def test_the_sdxl_test_files_are_the_original_layout(xl, family):
    """diffusers' own single-file loader reads the test's SDXL files back to the reference's weights."""
    ref, folder, path, _ = xl[family]
    theirs = type(ref).from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in _xl_components(family):
        a, b = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        assert sorted(a) == sorted(b), name
        for key in a:
            assert torch.equal(a[key], b[key].reshape(a[key].shape)), f"{name}: {key}"


def _xl_pipe(path):
    import ministd

    pipe = ministd.load_pipeline(path)
    pipe.progress_bar = False
    return pipe


@pytest.mark.parametrize("family", ["sdxl_base", "sdxl_refiner"])
def test_sdxl_files_load_with_the_family_rules(xl, family):
    from ministd.pipelines import StableDiffusionXLPipeline

    ref, folder, path, tensors = xl[family]
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # nothing to guess for SDXL: no warning
        pipe = _xl_pipe(path)
    assert type(pipe) is StableDiffusionXLPipeline
    assert pipe.is_refiner == pipe.requires_aesthetics_score == (family == "sdxl_refiner")
    assert pipe.force_zeros_for_empty_prompt == (family == "sdxl_base") == ref.config.force_zeros_for_empty_prompt
    assert pipe.tokenizer_2.pad_token == "!"
    if family == "sdxl_base":
        assert pipe.tokenizer.pad_token == "<|endoftext|>"
        assert pipe.text_encoder.config.hidden_act == "quick_gelu" and pipe.text_encoder.text_projection is None
    else:
        assert pipe.tokenizer is None and pipe.text_encoder is None
    te2 = pipe.text_encoder_2.config
    assert (te2.hidden_act, te2.num_layers, te2.num_heads, te2.projection_dim) == ("gelu", 2, 2, XL_POOLED)
    unet = pipe.unet.config
    assert (unet.head_dim, unet.upcast_attention, unet.addition_time_embed_dim) == (64, False, XL_TIME_DIM)
    assert unet.sample_size == 128                                  # SDXL's 1024-pixel default
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.force_upcast) == (0.13025, True)
    assert pipe.scheduler.name == "euler"
    for key in ("timestep_spacing", "steps_offset", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert getattr(pipe.scheduler.config, key) == ref.scheduler.config[key], key
    # the pooled text: bigG's last layer, final LN, projection (text.py's own single-file loader agrees)
    from ministd.text import CLIPTextModel

    prefix = C.SINGLE_FILE_PREFIXES[family]["text_encoder_2"]
    alone = CLIPTextModel.from_single_file(tensors, prefix).eval()
    ids = torch.tensor(ref.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    with torch.no_grad():
        expected = ref.text_encoder_2(ids, output_hidden_states=True)
        got, got_alone = pipe.text_encoder_2(ids), alone(ids)
    torch.testing.assert_close(got.pooled, expected.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_alone.pooled, expected.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.hidden_states[-2], expected.hidden_states[-2], atol=1e-5, rtol=1e-5)
    # config= a folder: its configs and tokenizers instead of the rules (same network here)
    by_folder = C.load_single_file(path, config=folder)
    assert type(by_folder) is StableDiffusionXLPipeline
    a, b = by_folder.unet, pipe.unet
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert [a.config.heads_at(i) for i in (1, 2)] == [b.config.heads_at(i) for i in (1, 2)]
    assert a.config.addition_time_embed_dim == XL_TIME_DIM
    assert by_folder.text_encoder_2.config.eos_token_id == 49407          # the folder's, not the rule's
    # float16: every weight read as float16 but the VAE decoder, kept in float32 (SDXL's VAE overflows)
    half = C.load_single_file(path, dtype=torch.float16)
    assert {p.dtype for p in half.unet.parameters()} == {p.dtype for p in half.text_encoder_2.parameters()} \
        == {torch.float16}
    assert {p.dtype for p in half.vae.decoder.parameters()} == {torch.float32}


def test_sdxl_scheduler_is_diffusers_single_file_default():
    """What diffusers 0.42 builds for an SDXL file without a config (single_file_utils: Euler over
    SCHEDULER_DEFAULT_CONFIG), and what the base and refiner folders ship."""
    from diffusers.loaders.single_file_utils import SCHEDULER_DEFAULT_CONFIG

    import inspect

    fields = set(inspect.signature(diffusers.EulerDiscreteScheduler.__init__).parameters) - {"self"}

    def euler(config):
        return {k: v for k, v in diffusers.EulerDiscreteScheduler.from_config(config).config.items() if k in fields}

    for family in ("sdxl_base", "sdxl_refiner"):
        assert C.SCHEDULERS[family]["_class_name"] == "EulerDiscreteScheduler"
        assert euler(C.SCHEDULERS[family]) == euler(SCHEDULER_DEFAULT_CONFIG)
        assert C.SCHEDULERS[family]["timestep_spacing"] == "leading" and C.SCHEDULERS[family]["steps_offset"] == 1


@pytest.mark.parametrize("negative", [None, ["blurry", ""]], ids=["zeroed-negative", "negative-prompt"])
def test_sdxl_base_txt2img_from_a_single_file_matches_diffusers(xl, negative):
    ref, folder, path, _ = xl["sdxl_base"]
    ours = _xl_pipe(path)
    kwargs = dict(num_inference_steps=5, guidance_scale=6.0, height=16, width=16, output_type="np")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = ref(PROMPTS, negative_prompt=negative, latents=latents.clone(), **kwargs).images
    got = np.stack(ours.txt2img(PROMPTS, negative_prompt=negative, latents=latents.clone(), **kwargs).images)
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(got - expected).max() <= ATOL, np.abs(got - expected).max()
    other = np.stack(ours.txt2img(PROMPTS, negative_prompt=["a green triangle"] * 2, latents=latents.clone(),
                                  **kwargs).images)
    assert np.abs(other - expected).max() > 100 * ATOL


def test_sdxl_base_to_refiner_hand_off_from_single_files(xl):
    ref_base, _, base_path, _ = xl["sdxl_base"]
    ref_refiner, _, refiner_path, _ = xl["sdxl_refiner"]
    base, refiner = _xl_pipe(base_path), _xl_pipe(refiner_path)
    common = dict(num_inference_steps=6, guidance_scale=5.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref_latents = ref_base(PROMPTS, latents=latents.clone(), denoising_end=0.8, output_type="latent", height=16,
                           width=16, **common).images
    our_latents = base.txt2img(PROMPTS, latents=latents.clone(), denoising_end=0.8, output_type="latent", height=16,
                               width=16, **common).latents
    torch.testing.assert_close(our_latents, ref_latents, atol=2e-5, rtol=1e-4)
    expected = ref_refiner(PROMPTS, image=ref_latents, denoising_start=0.8, output_type="np", aesthetic_score=7.0,
                           negative_aesthetic_score=2.0, **common).images
    got = np.stack(refiner.img2img(PROMPTS, our_latents, denoising_start=0.8, output_type="np", aesthetic_score=7.0,
                                   negative_aesthetic_score=2.0, **common).images)
    assert np.abs(got - expected).max() <= ATOL, np.abs(got - expected).max()
    other = np.stack(refiner.img2img(PROMPTS, our_latents, denoising_start=0.8, output_type="np",
                                     aesthetic_score=1.0, negative_aesthetic_score=9.0, **common).images)
    assert np.abs(other - expected).max() > 5 * ATOL    # the scores reach the U-Net (1.4e-4: small, 8 features)
    other = np.stack(refiner.img2img(["a green triangle"] * 2, our_latents, denoising_start=0.8, output_type="np",
                                     aesthetic_score=7.0, negative_aesthetic_score=2.0, **common).images)
    assert np.abs(other - expected).max() > 10 * ATOL   # and so does its text (4.5e-4: 2 of 6 steps run)
    unrefined = np.stack(refiner.decode(our_latents, "np"))
    assert np.abs(unrefined - expected).max() > 100 * ATOL   # the refiner's steps do run


@pytest.mark.parametrize("family", ["sdxl_base", "sdxl_refiner"])
def test_inspect_an_sdxl_file(xl, family):
    ref, folder, path, tensors = xl[family]
    info = C.inspect(path)
    assert (info.family, info.layout, info.in_channels, info.unknown) == (family, "single file", 4, [])
    counts = {name: sum(p.numel() for p in getattr(ref, name).parameters()) for name in _xl_components(family)}
    assert {n: c.parameters for n, c in info.components.items()} == counts
    assert sum(info.skipped.values()) == 2 + (family == "sdxl_base")    # sigmas, logit_scale (+ position ids)
    assert C.inspect(folder).family == family
    out = _cli("info", path)
    assert out.returncode == 0, out.stderr
    assert C.FAMILY_NAMES[family] in out.stdout and f"{counts['text_encoder_2']:,}" in out.stdout
    assert "conditioner.embedders" in out.stdout and "logit_scale" not in out.stdout


def test_family_arguments_are_refused_clearly(xl, sd1):
    """SDXL-only arguments to an SD 1.x pipeline fail (TypeError, naming the argument); SD-only use
    of SDXL pipelines the reverse: txt2img on a refiner, inpaint on SDXL."""
    sd = C.load_single_file(sd1[2])
    for argument in (dict(original_size=(16, 16)), dict(target_size=(16, 16)), dict(denoising_end=0.8)):
        with pytest.raises(TypeError, match=next(iter(argument))):
            sd.txt2img("a red circle", num_inference_steps=1, height=16, width=16, **argument)
    image = torch.zeros(1, 3, 16, 16)
    for argument in (dict(denoising_start=0.8), dict(aesthetic_score=6.0)):
        with pytest.raises(TypeError, match=next(iter(argument))):
            sd.img2img("a red circle", image, num_inference_steps=1, **argument)
    refiner = _xl_pipe(xl["sdxl_refiner"][2])
    with pytest.raises(ValueError, match="use img2img"):
        refiner.txt2img("a red circle", height=16, width=16)
    base = _xl_pipe(xl["sdxl_base"][2])
    with pytest.raises(NotImplementedError, match="SDXL"):
        base.inpaint("a red circle", image, torch.ones(1, 1, 16, 16))


def test_bad_sdxl_files(xl, tmp_path, monkeypatch):
    """An SDXL inpainting file (not loadable yet) and networks of different models in one file are
    refused before any weight is read, naming the file."""
    _, _, base_path, base = xl["sdxl_base"]
    _, _, _, refiner = xl["sdxl_refiner"]
    nine = write(tmp_path / "xl_inpaint.safetensors", {**base, C.UNET_MARKER: torch.zeros(32, 9, 3, 3)})
    assert C.inspect(nine).inpainting
    unet = {k: v for k, v in refiner.items() if k.startswith("model.diffusion_model.")}
    mixed = write(tmp_path / "mixed.safetensors", {**{k: v for k, v in base.items()
                                                     if not k.startswith("model.diffusion_model.")}, **unet})
    monkeypatch.setattr(C._Tensors, "load", lambda *a, **k: pytest.fail("tensors were read"))
    for path, message in [(nine, "SDXL inpainting checkpoint"),
                          (mixed, "added vector is 72 wide, which is not the 32-wide pooled text plus 6")]:
        with pytest.raises(ValueError, match=message) as err:
            C.load_single_file(path)
        assert str(path) in str(err.value)


# --------------------------------------------------------------------------
# bad input: ValueError / FileNotFoundError naming the file, before any weight is read
# --------------------------------------------------------------------------

def _variant(tensors, drop=(), **replace):
    out = {k: v for k, v in tensors.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in replace.items()})
    return out


BAD_FILES = {
    "empty": (lambda t, p: p.write_bytes(b""), "empty file"),
    "truncated": (lambda t, p: p.write_bytes(p.read_bytes()[:-1000]), "truncated"),
    "cut in the header": (lambda t, p: p.write_bytes(p.read_bytes()[:100]), "not a safetensors file"),
    "text": (lambda t, p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
             "starts with text 'version "),
    "renamed pickle": (lambda t, p: torch.save(t, p), "zip archive: probably a pickled"),
    "lora": (lambda t, p: write(p, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}),
             "LoRA adapter .*not a Stable Diffusion checkpoint.*base checkpoint"),
    "peft lora": (lambda t, p: write(p, {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}),
                  "LoRA adapter"),
    "sd3": (lambda t, p: write(p, {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias":
                                   torch.zeros(8)}), "Stable Diffusion 3"),
    "flux": (lambda t, p: write(p, {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8)}), "Flux"),
    "no unet": (lambda t, p: write(p, {"something.else": torch.zeros(2)}), "no U-Net key"),
    "no text encoder": (lambda t, p: write(p, {k: v for k, v in t.items() if not k.startswith("cond_stage")}),
                        "no text encoder under any known prefix"),
    "unknown key": (lambda t, p: write(p, _variant(t, model_ema_x=torch.zeros(1), **{"extra__stuff": torch.zeros(3)})),
                    "no known extra: extra.stuff"),
    "missing key": (lambda t, p: write(p, _variant(t, drop=["model.diffusion_model.middle_block.2.out_layers.3.bias"])),
                    r"missing keys \(1\):\n    middle_block.2.out_layers.3.bias"),
    "wrong shape": (lambda t, p: write(p, _variant(t, **{
        "model.diffusion_model.middle_block__0__in_layers__2__weight": torch.zeros(64, 64, 1, 1)})),
        r"middle_block.0.in_layers.2.weight: file has \(64, 64, 1, 1\), model expects \(64, 64, 3, 3\)"),
    "wrong text shape": (lambda t, p: write(p, _variant(t, **{
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight": torch.zeros(64, 100)})),
        r"(?s)text encoder.*encoder.layers.1.mlp.fc2.weight: file has \(64, 100\)"),
    "nine-channel other": (lambda t, p: write(p, _variant(t, **{C.UNET_MARKER: torch.zeros(32, 8, 3, 3)})),
                           "8 would be InstructPix2Pix"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_before_any_weight_is_read(case, sd1, tmp_path, monkeypatch):
    ref, folder, path, tensors = sd1
    make, message = BAD_FILES[case]
    bad = tmp_path / "model.safetensors"
    if case in ("truncated", "cut in the header"):
        bad.write_bytes(path.read_bytes())
    make(tensors, bad)
    monkeypatch.setattr(C._Tensors, "load", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(ValueError, match=message) as err:
        C.load_single_file(bad)
    assert str(bad) in str(err.value)
    if case not in ("missing key", "wrong shape", "wrong text shape", "unknown key"):   # inspect describes those
        with pytest.raises(ValueError, match=message):
            C.inspect(bad)


def test_missing_paths_and_wrong_suffixes(sd1, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.inspect(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.load_single_file(tmp_path / "absent.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"GGUF....")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        C.load_single_file(tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="vae="):
        C.load_single_file(sd1[2], vae=tmp_path / "absent_vae.safetensors")
    with pytest.raises(FileNotFoundError, match="config="):
        C.load_single_file(sd1[2], config=tmp_path / "absent_folder")


def test_pickles_are_refused_unless_asked_and_then_read_tensors_only(sd1, tmp_path):
    ref, folder, path, tensors = sd1
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1000}, ckpt)
    with pytest.raises(ValueError, match=r"pickled checkpoint \(.ckpt\).*allow_pickle=True.*weights_only=True"):
        C.load_single_file(ckpt)
    with pytest.raises(ValueError, match="allow_pickle"):
        C.inspect(ckpt)
    assert C.inspect(ckpt, allow_pickle=True).family == "sd1"
    pipe = C.load_single_file(ckpt, allow_pickle=True)
    assert torch.equal(pipe.unet.conv_out.weight, tensors["model.diffusion_model.out.2.weight"])
    # weights_only refuses anything but tensors and plain containers
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tensors, "callback": warnings.WarningMessage}, evil)
    with pytest.raises(ValueError, match=r"evil.ckpt: cannot be read as a tensors-only"):
        C.load_single_file(evil, allow_pickle=True)


def test_bad_folders(sd1, tmp_path):
    import shutil

    from ministd.pipelines import load_pipeline

    ref, folder, path, tensors = sd1
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "unet" / "config.json").write_text('{"in_channels": 4,')
    with pytest.raises(ValueError, match=r"broken/unet/config.json is not valid JSON"):
        load_pipeline(broken)
    with pytest.raises(ValueError, match=r"unet/config.json is not valid JSON"):
        C.inspect(broken)
    (broken / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json holds a JSON list"):
        load_pipeline(broken)
    lacking = tmp_path / "lacking"
    shutil.copytree(folder, lacking)
    shutil.rmtree(lacking / "vae")
    with pytest.raises(FileNotFoundError, match=r"\['vae'\]"):
        C.inspect(lacking)
    with pytest.raises(FileNotFoundError, match="vae"):
        load_pipeline(lacking)
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline"):
        C.inspect(other)


# --------------------------------------------------------------------------
# python -m ministd info
# --------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ministd", *map(str, args)], capture_output=True, text=True)


def test_cli_info(sd1, tmp_path):
    ref, folder, path, tensors = sd1
    out = _cli("info", path)
    assert out.returncode == 0, out.stderr
    assert "SD 1.x" in out.stdout and "single file" in out.stdout and "float32" in out.stdout
    unet = sum(p.numel() for p in ref.unet.parameters())
    assert f"{unet:,}" in out.stdout
    out = _cli("info", folder)
    assert out.returncode == 0 and "diffusers folder" in out.stdout and "epsilon" in out.stdout
    (tmp_path / "bad.safetensors").write_text("hello")
    for target, message in [(tmp_path / "bad.safetensors", "not a safetensors file"),
                            (tmp_path / "nowhere", "no checkpoint at"),
                            (_sdxl_like(tmp_path / "xl.safetensors", False), None)]:
        out = _cli("info", target)
        if message is None:                     # SDXL: described from the keys alone
            assert out.returncode == 0 and "SDXL base" in out.stdout
            continue
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
