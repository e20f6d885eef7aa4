"""ControlNet (chapter 16): ministd.controlnet against diffusers' ControlNetModel and
StableDiffusionControlNetPipeline, on tiny random models.

What is proved, and to what tolerance:

- the network: residuals equal diffusers' ControlNetModel's to 1e-5 (float32; in
  practice bitwise) for an SD 1.x-type and an SDXL-type tiny config, and the
  U-Net's ``down_block_additional_residuals`` / ``mid_block_additional_residual``
  equal diffusers' UNet2DConditionModel's with the same residuals (1e-5);
- the files: a folder saved by diffusers loads strictly (a stray or missing key is
  refused); the original single-file layout, written here by a converter of the
  test's own (itself checked by diffusers' ``convert_controlnet_checkpoint``),
  loads to the same weights; ``from_unet`` copies diffusers' ``from_unet``;
- the pipeline: txt2img / img2img with one ControlNet and with two (residuals
  summed), with conditioning scales and control_guidance_start / end, equal
  diffusers' StableDiffusionControlNet(Img2Img)Pipeline to 2e-5 on [0, 1] pixels
  (the pipeline tolerance of tests/test_pipelines.py), and each such check is
  shown able to fail (another scale moves the picture by > 100x the tolerance);
- a ControlNet made by ``from_unet`` adds exactly nothing (bitwise the plain picture);
- bad input is refused with a ValueError before any network runs.
"""

import ast
import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ministd
from ministd import controlnet as cn_module
from ministd.controlnet import ControlNetModel, load_controlnet
from ministd.pipelines import load_pipeline
from ministd.weights import WeightsMismatchError, write_safetensors
from test_pipelines import NEGATIVE, PROMPTS, folder  # noqa: F401  (folder: the tiny SD 1.x pipeline fixture)
from test_sdxl_pipelines import folders  # noqa: F401  (folders: the tiny SDXL base and refiner)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

ATOL_NET = 1e-5       # one network call, float32
ATOL = 2e-5           # whole pipelines, pixels in [0, 1] (as tests/test_pipelines.py)
TINY = dict(in_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=16,
            cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
TINY_XL = dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
               cross_attention_dim=32, attention_head_dim=2, use_linear_projection=True,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), transformer_layers_per_block=(1, 2),
               addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=16 + 6 * 8)


def shaken(module, seed=0, amount=0.05):
    """Random init, then every weight moved off it: the zero convolutions too, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * amount)
    return module.eval()


def reference_controlnet(seed=0, **config):
    torch.manual_seed(seed)
    return shaken(diffusers.ControlNetModel(**{**TINY, **config}), seed)


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- the network

@pytest.mark.parametrize("config", [TINY, TINY_XL], ids=["sd1", "sdxl"])
def test_residuals_match_diffusers(config, tmp_path):
    ref = reference_controlnet(**config)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_controlnet(tmp_path)
    g = torch.Generator().manual_seed(1)
    x, text, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), \
        torch.rand(2, 3, 64, 64, generator=g)
    added = None
    if "addition_embed_type" in config:
        added = {"text_embeds": torch.randn(2, 16, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        rd, rm = ref(x, 321, text, cond, conditioning_scale=0.7, added_cond_kwargs=added, return_dict=False)
        od, om = ours(x, 321, text, cond, 0.7, added_cond=added)
        other, _ = ours(x, 321, text, torch.rand(2, 3, 64, 64, generator=g), 0.7, added_cond=added)
    assert len(od) == len(rd) == ours.config.num_skips
    assert max_diff(od, rd) <= ATOL_NET and float((om - rm).abs().max()) <= ATOL_NET
    assert max_diff(other, rd) > 100 * ATOL_NET          # the control image matters: the check can fail


def test_unet_takes_additional_residuals(folder):  # noqa: F811
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    ours = load_pipeline(folder, optimize=False).unet
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    controlnet = ControlNetModel.from_unet(ours)
    with torch.no_grad():
        shapes = [r.shape for r in controlnet(x, 5, text, torch.zeros(2, 3, 64, 64))[0]]
        down = [torch.randn(s, generator=g) for s in shapes]
        mid = torch.randn(2, 64, 1, 1, generator=g)
        expected = ref(x, 5, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours(x, 5, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours(x, 5, text)
        zeros = ours(x, 5, text, down_block_additional_residuals=[torch.zeros_like(d) for d in down],
                     mid_block_additional_residual=torch.zeros_like(mid))
    assert float((got - expected).abs().max()) <= ATOL_NET
    assert float((got - plain).abs().max()) > 100 * ATOL_NET
    assert torch.equal(zeros, plain)
    with pytest.raises(ValueError, match="one tensor per skip"):
        ours(x, 5, text, down_block_additional_residuals=down[:-1])


def test_from_unet_is_diffusers_from_unet_and_adds_nothing(folder):  # noqa: F811
    ours = load_pipeline(folder, optimize=False)
    ours.progress_bar = False
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16)).state_dict()
    cn = ControlNetModel.from_unet(ours.unet, conditioning_embedding_out_channels=(8, 16))
    state = cn.state_dict()
    assert sorted(state) == sorted(ref)
    copied = [k for k in state if not k.startswith("controlnet_cond_embedding.") or "conv_out" in k]
    assert all(torch.equal(state[k], ref[k]) for k in copied)   # encoder copied, zero convs zero in both
    with torch.no_grad():
        down, mid = cn(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 32), torch.rand(1, 3, 16, 16))
    assert all(not d.any() for d in down) and not mid.any()
    kwargs = dict(num_inference_steps=3, guidance_scale=6.0, output_type="np", seed=3)
    plain = ours.txt2img(PROMPTS[0], **kwargs).images[0]
    steered = ours.txt2img(PROMPTS[0], controlnet=cn, control_image=torch.rand(3, 16, 16), **kwargs).images[0]
    assert np.array_equal(plain, steered)


# ---------------------------------------------------------------------------- the files

def test_diffusers_folder_loads_strictly(tmp_path, monkeypatch):
    ref = reference_controlnet(conditioning_embedding_out_channels=(8, 16))
    ref.save_pretrained(tmp_path / "cn", safe_serialization=True)
    ours = load_controlnet(tmp_path / "cn")
    ref_state = ref.state_dict()
    assert sorted(ours.state_dict()) == sorted(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())
    assert ours.config.conditioning_factor == 2
    # our config, written back in diffusers' words, builds the same network in diffusers
    again = diffusers.ControlNetModel.from_config(ours.config.to_diffusers_config())
    again.load_state_dict(ours.state_dict(), strict=True)
    # the book's own pair (name.safetensors + name.json), as "shapes-edges" will ship
    ours.save(tmp_path / "edges.safetensors", dtype=None)
    monkeypatch.setitem(cn_module.SHIPPED, "shapes-edges", tmp_path / "edges.safetensors")
    shipped = load_controlnet("shapes-edges")
    assert all(torch.equal(v, ref_state[k]) for k, v in shipped.state_dict().items())
    # the weights file alone is found through the config beside it
    assert torch.equal(load_controlnet(tmp_path / "cn" / "diffusion_pytorch_model.safetensors").conv_in.weight,
                       ref_state["conv_in.weight"])
    # strict: one stray key, one missing key
    for change in ({"extra.weight": torch.zeros(1)}, None):
        state = dict(ref_state)
        state.update(change) if change else state.pop("controlnet_mid_block.bias")
        write_safetensors(tmp_path / "bad" / "diffusion_pytorch_model.safetensors", state)
        (tmp_path / "bad" / "config.json").write_text((tmp_path / "cn" / "config.json").read_text())
        with pytest.raises(WeightsMismatchError, match="extra.weight" if change else "controlnet_mid_block.bias"):
            load_controlnet(tmp_path / "bad")


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_original(state, layers_per_block, hint_convs):
    """diffusers ControlNetModel names -> lllyasviel's cldm names (this test's own converter,
    written from the original code's module lists, one rule per line)."""
    per = layers_per_block + 1
    rules = [
        (r"time_embedding\.linear_1\.", lambda m: "time_embed.0."),
        (r"time_embedding\.linear_2\.", lambda m: "time_embed.2."),
        (r"add_embedding\.linear_1\.", lambda m: "label_emb.0.0."),
        (r"add_embedding\.linear_2\.", lambda m: "label_emb.0.2."),
        (r"conv_in\.", lambda m: "input_blocks.0.0."),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{RESNET[m[3]]}."),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m[1]) + 1) * per}.0.op."),
        (r"mid_block\.resnets\.(\d)\.(\w+)\.", lambda m: f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}."),
        (r"mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"controlnet_down_blocks\.(\d+)\.", lambda m: f"zero_convs.{m[1]}.0."),
        (r"controlnet_mid_block\.", lambda m: "middle_block_out.0."),
        (r"controlnet_cond_embedding\.conv_in\.", lambda m: "input_hint_block.0."),
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}."),
        (r"controlnet_cond_embedding\.conv_out\.", lambda m: f"input_hint_block.{2 * hint_convs + 2}."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, new in rules:
            m = re.match(pattern, key)
            if m:
                out[new(m) + key[m.end():]] = value
                break
        else:
            raise AssertionError(f"no rule for {key}")
    return out


def test_original_single_file_loads_equal(tmp_path):
    ref = reference_controlnet()          # SD's four condition-encoder widths: input_hint_block.0 ... 14
    ref_state = ref.state_dict()
    original = to_original(ref_state, layers_per_block=2, hint_convs=6)
    assert "input_hint_block.14.weight" in original and "zero_convs.11.0.weight" in original
    # the test's converter agrees with diffusers' own (original -> diffusers)
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    back = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in original.items()},
                                         {"layers_per_block": 2})
    assert sorted(back) == sorted(ref_state) and all(torch.equal(back[k], ref_state[k]) for k in back)
    # ministd reads the file, with and without the prefix, and writes the same names back
    for prefix in ("control_model.", ""):
        path = tmp_path / f"cn{len(prefix)}.safetensors"
        write_safetensors(path, {prefix + k: v for k, v in original.items()})
        ours = load_controlnet(path, config=dict(ref.config))   # head counts are not in the file
        assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())
    assert ours.original_state_dict().keys() == original.keys()
    # the structure read off the weights alone (given what no weight shows: heads and norm groups)
    read = cn_module.config_from_original(original, num_heads=4, norm_num_groups=16)
    assert read.to_dict() == {**cn_module.from_diffusers_config(dict(ref.config)).to_dict(), "sample_size": 64}
    assert read.conditioning_embedding_out_channels == (16, 32, 96, 256)
    # a missing tensor is named as the file names it
    broken = {k: v for k, v in original.items() if k != "zero_convs.3.0.bias"}
    write_safetensors(tmp_path / "broken.safetensors", broken)
    with pytest.raises(WeightsMismatchError, match=r"zero_convs\.3\.0\.bias"):
        load_controlnet(tmp_path / "broken.safetensors", config=dict(ref.config))


def test_loading_errors(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:            # a shipped name whose file is not there
        patch.setitem(cn_module.SHIPPED, "shapes-edges", tmp_path / "missing.safetensors")
        with pytest.raises(FileNotFoundError, match="not been trained yet"):
            load_controlnet("shapes-edges")
    with pytest.raises(FileNotFoundError, match="no ControlNet"):
        ministd.load_controlnet(tmp_path / "absent")
    write_safetensors(tmp_path / "sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a ControlNet.*load_pipeline"):
        load_controlnet(tmp_path / "sd.safetensors")
    write_safetensors(tmp_path / "other.safetensors", {"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"not a ControlNet.*encoder\.conv_in\.weight"):
        load_controlnet(tmp_path / "other.safetensors")
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1)}, tmp_path / "cn.pth")
    with pytest.raises(ValueError, match="pickle"):
        load_controlnet(tmp_path / "cn.pth")


def test_pipelines_only_call_the_controlnet():
    """Chapter 10's module imports nothing of chapter 16's at module level."""
    tree = ast.parse(inspect.getsource(ministd.pipelines))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [getattr(n, "module", None) or n.names[0].name for n in top]
    assert not any("controlnet" in (name or "") for name in names)
    assert ministd.MODULE_CHAPTER["controlnet"] == 16 and ministd.chapter_of("ministd.controlnet") == 16


# ---------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def nets(folder):  # noqa: F811
    """Two diffusers ControlNets for the tiny pipeline (condition encoder 2x, as its VAE), and ministd's copies."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    refs = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        refs.append(shaken(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)),
                           seed, amount=0.1))
    ours = []
    for i, ref in enumerate(refs):
        ref.save_pretrained(folder.parent / f"cn{i}", safe_serialization=True)
        ours.append(load_controlnet(folder.parent / f"cn{i}"))
    return refs, ours


@pytest.fixture(scope="module")
def ours(folder):  # noqa: F811
    pipe = load_pipeline(folder)
    pipe.progress_bar = False
    return pipe


def control_images():
    g = torch.Generator().manual_seed(5)
    edges = (torch.rand(16, 16, 3, generator=g) > 0.7).numpy().astype(np.uint8) * 255
    return Image.fromarray(edges), torch.rand(1, 3, 16, 16, generator=g)


def reference_pipe(folder, controlnet, cls="StableDiffusionControlNetPipeline", ddim=True):  # noqa: F811
    pipe = getattr(diffusers, cls).from_pretrained(folder, controlnet=controlnet, safety_checker=None,
                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if ddim:
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


CASES = {
    # name: (which nets, scale, start, end, sampler: ddim or the folder's PNDM)
    "one": ((0,), 0.8, 0.0, 1.0, "ddim"),
    "one_window_pndm": ((0,), 1.3, 0.2, 0.7, None),
    "two": ((0, 1), [0.6, 1.2], [0.0, 0.2], [0.8, 1.0], "ddim"),   # both on at steps 1-3: summed
}


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(case, folder, nets, ours):  # noqa: F811
    which, scale, start, end, sampler = CASES[case]
    refs, mine = nets
    edges, soft = control_images()
    several = len(which) > 1
    images = [edges, soft][:len(which)] if several else edges
    ref_nets = [refs[i] for i in which] if several else refs[0]
    our_nets = [mine[i] for i in which] if several else mine[0]
    reference = reference_pipe(folder, ref_nets, ddim=sampler == "ddim")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(num_inference_steps=5, guidance_scale=7.5, output_type="np", controlnet_conditioning_scale=scale,
                  control_guidance_start=start, control_guidance_end=end)
    expected = reference(PROMPTS, negative_prompt=NEGATIVE, image=images, latents=latents.clone(), **common).images
    run = lambda **kw: np.stack(ours.txt2img(PROMPTS, negative_prompt=NEGATIVE, controlnet=our_nets,  # noqa: E731
                                             control_image=images, latents=latents.clone(), sampler=sampler,
                                             **{**common, **kw}).images)
    got = run()
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(got - expected).max() <= ATOL, np.abs(got - expected).max()
    other = run(controlnet_conditioning_scale=[0.0] * len(which) if several else 0.0)
    assert np.abs(other - expected).max() > 100 * ATOL      # the ControlNet(s) moved the picture


def test_control_image_resized_and_img2img_match_diffusers(folder, nets, ours):  # noqa: F811
    refs, mine = nets
    edges, _ = control_images()
    small = edges.resize((8, 8))                        # resized to the picture's 16x16 (Lanczos), as diffusers
    reference = reference_pipe(folder, refs[1])
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    expected = reference(PROMPTS[1], image=small, height=16, width=16, generator=torch.Generator().manual_seed(7),
                         **kwargs).images[0]
    got = ours.txt2img(PROMPTS[1], controlnet=mine[1], control_image=small, height=16, width=16, seed=7,
                       sampler="ddim", **kwargs).images[0]
    assert np.abs(got - expected).max() <= ATOL
    # img2img: diffusers' StableDiffusionControlNetImg2ImgPipeline
    ref_i2i = reference_pipe(folder, refs[0], cls="StableDiffusionControlNetImg2ImgPipeline")
    picture = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    expected = ref_i2i(PROMPTS[0], image=picture, control_image=edges, strength=0.6, controlnet_conditioning_scale=0.9,
                       generator=torch.Generator().manual_seed(9), num_inference_steps=10, guidance_scale=6.0,
                       output_type="np").images[0]
    run = lambda scale: ours.img2img(PROMPTS[0], picture * 2 - 1, strength=0.6, controlnet=mine[0],  # noqa: E731
                                     control_image=edges, controlnet_conditioning_scale=scale,
                                     generator=torch.Generator().manual_seed(9), num_inference_steps=10,
                                     guidance_scale=6.0, output_type="np", sampler="ddim").images[0]
    assert np.abs(run(0.9) - expected).max() <= ATOL
    assert np.abs(run(0.0) - expected).max() > 100 * ATOL


BAD = [
    (dict(control_image="edges"), "without controlnet"),
    (dict(controlnet="net"), "without control_image"),
    (dict(controlnet="two", control_image=["img"]), "list of 2 control images"),
    (dict(controlnet="two", control_image=["img", "img"], controlnet_conditioning_scale=[1.0]), "2 ControlNet"),
    (dict(controlnet="net", control_image="img", control_guidance_start=0.6, control_guidance_end=0.4), "smaller"),
    (dict(controlnet="net", control_image="img", control_guidance_end=1.5), r"in \[0.0, 1.0\]"),
    (dict(controlnet="net", control_image="img", control_guidance_start=-0.1), "control_guidance_start"),
    (dict(controlnet="net", control_image=Image.new("RGB", (16, 8))), "aspect ratio"),
    (dict(controlnet="net", control_image=torch.zeros(1, 3, 16, 16) - 1), r"\[0, 1\]"),
    (dict(controlnet="net", control_image=np.zeros((16, 16, 3))), "PIL image"),
    (dict(controlnet="net", control_image=torch.zeros(3, 3, 16, 16)), "3 pictures for 1 prompts"),
    (dict(controlnet="net", control_image="img", controlnet_conditioning_scale=float("nan")), "scale"),
    (dict(controlnet="other", control_image="img"), "block_out_channels"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_before_the_network(kwargs, message, nets, ours, monkeypatch):
    _, mine = nets
    calls = []
    for module in (ours.unet, *mine):
        monkeypatch.setattr(module, "forward", lambda *a, **k: calls.append(1))
    other = ControlNetModel(cn_module.ControlNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                                                       attention_levels=(True, True), transformer_layers_per_block=1,
                                                       norm_num_groups=16, cross_attention_dim=32, num_heads=2,
                                                       conditioning_embedding_out_channels=(8, 16)))
    lookup = {"net": mine[0], "two": [mine[0], mine[1]], "other": other, "img": control_images()[0]}
    args = {k: ([lookup.get(i, i) for i in v] if isinstance(v, list) else lookup.get(v, v) if isinstance(v, str) else v)
            for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        ours.txt2img("a red circle", num_inference_steps=2, height=16, width=16, **args)
    assert not calls, "a network ran before the input was checked"


def test_sdxl_txt2img_matches_diffusers(folders):  # noqa: F811
    """SDXL: the ControlNet gets the U-Net's added conditions too (pooled text, time ids), and its
    steps are counted over the whole schedule when denoising_end stops early (as diffusers)."""
    base_dir = folders[0]
    unet = diffusers.UNet2DConditionModel.from_pretrained(base_dir / "unet")
    torch.manual_seed(12)
    ref_cn = shaken(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), 12, 0.1)
    ref_cn.save_pretrained(base_dir.parent / "cn_xl", safe_serialization=True)
    reference = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(base_dir, controlnet=ref_cn)
    reference.set_progress_bar_config(disable=True)
    ours = ministd.load_pipeline(base_dir)
    ours.progress_bar = False
    cn = load_controlnet(base_dir.parent / "cn_xl")
    edges, _ = control_images()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=5, guidance_scale=6.0, output_type="np", controlnet_conditioning_scale=0.9,
                  control_guidance_end=0.8, denoising_end=0.7)
    expected = reference(PROMPTS, image=edges, latents=latents.clone(), **kwargs).images
    got = np.stack(ours.txt2img(PROMPTS, controlnet=cn, control_image=edges, latents=latents.clone(),
                                **kwargs).images)
    assert np.abs(got - expected).max() <= ATOL, np.abs(got - expected).max()
    other = np.stack(ours.txt2img(PROMPTS, controlnet=cn, control_image=edges, latents=latents.clone(),
                                  **{**kwargs, "controlnet_conditioning_scale": 0.0}).images)
    assert np.abs(other - expected).max() > 100 * ATOL
