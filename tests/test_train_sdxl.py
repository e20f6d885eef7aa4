"""The book's SDXL-type models (ministd.train.sdxl, chapters 13-14): data, warm start,
training loop, the quality score and the effect measures."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import ministd.train.sdxl as X
from ministd.data import PALETTE, ShapesWorld
from ministd.unet import UNet
from ministd.weights import read_safetensors


def _render(caption="a large red circle in the center on a blue background", seed=0, size=64):
    return ShapesWorld(size=size).render(caption, seed=seed)[0]


# --------------------------------------------------------------------------- quality score

def test_quality_score_ranks_degradations():
    clean = _render()
    assert X.quality_score(Image.new("RGB", (16, 16), PALETTE["green"])) == pytest.approx(6.0)
    score = X.quality_score(clean)
    assert 5.5 < score < 6.0
    blurred = X.quality_score(clean.filter(ImageFilter.GaussianBlur(1.5)))
    noisy = np.asarray(clean).astype(float) + np.random.default_rng(0).normal(0, 25, (64, 64, 3))
    noisy = X.quality_score(noisy.clip(0, 255).astype(np.uint8))
    assert score > blurred > 4.0 and score - noisy > 1.5, (score, blurred, noisy)
    grey = Image.new("RGB", (8, 8), (128, 128, 128))          # 128 is about 90 from every palette colour
    assert X.quality_score(grey) == 0.0
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        X.quality_score(np.zeros((8, 8)))


def test_degrade_is_seeded_and_lowers_the_score():
    clean = _render()
    a, b = X.degrade(clean, random.Random(3)), X.degrade(clean, random.Random(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    scores = [X.quality_score(X.degrade(clean, random.Random(k))) for k in range(20)]
    assert max(scores) < X.quality_score(clean) and min(scores) < 4.5


# --------------------------------------------------------------------------- models

def test_configs_follow_the_encoders():
    base, refiner = X.xl_config("base"), X.xl_config("refiner")
    assert base.cross_attention_dim == 128 + 192 and refiner.cross_attention_dim == 192
    assert base.projection_class_embeddings_input_dim == 192 + 6 * 64
    assert refiner.projection_class_embeddings_input_dim == 192 + 5 * 64
    with pytest.raises(ValueError, match="kind must be one of"):
        X.xl_config("turbo")


@torch.no_grad()
def test_warm_start_begins_as_the_shipped_unet():
    """The widened keys/values read the old 128 channels only and the added embedding starts at
    zero, so the new U-Net computes the old one's output whatever the wide encoder and the time
    ids say (float32; atol 1e-5: the same sums in another order)."""
    source = read_safetensors(X.DATA / "shapes_unet.safetensors", dtype=torch.float32)
    old = UNet.load(X.DATA / "shapes_unet.safetensors").float().eval()
    new = UNet(X.xl_config("base"))
    counts = X.warm_start(new, source)
    assert counts["widened"] == 2 * 10 and counts["fresh"] == 4    # to_k, to_v of 10 transformers; add_embedding
    new.eval()
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([50, 700])
    added = {"text_embeds": torch.randn(2, 192, generator=g), "time_ids": torch.tensor([[32., 32, 16, 0, 64, 64]] * 2)}
    wide = torch.cat([states, torch.randn(2, 77, 192, generator=g)], dim=-1)
    torch.testing.assert_close(new(x, t, wide, added_cond=added), old(x, t, states), atol=1e-5, rtol=0)
    refiner = UNet(X.xl_config("refiner"))
    counts = X.warm_start(refiner, source)
    assert counts["widened"] == 0 and counts["fresh"] == 2 * 10 + 4
    assert not refiner.add_embedding.linear_2.weight.any()


@torch.no_grad()
def test_text_conditions_are_the_pipelines():
    """What training feeds the U-Net equals what StableDiffusionXLPipeline.encode_prompt gives it."""
    from ministd.pipelines import StableDiffusionXLPipeline
    from ministd.samplers import make_sampler
    from ministd.tokenizer import CLIPTokenizer
    from ministd.vae import load_shapes_vae

    encoders = X.load_encoders("base")
    tok = CLIPTokenizer.from_vocab_file()
    pipe = StableDiffusionXLPipeline(tok, encoders[0], CLIPTokenizer.from_vocab_file(), encoders[1],
                                     UNet(X.xl_config("base")), load_shapes_vae(), make_sampler("ddim"))
    prompts = ["a red circle", "two objects: a small blue square at the top left and a green triangle"]
    states, pooled = pipe.encode_prompt(prompts)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ours, ours_pooled = X.text_conditions(encoders, ids)
    assert ours.shape == (2, 77, 320) and ours_pooled.shape == (2, 192)
    assert torch.equal(ours, states) and torch.equal(ours_pooled, pooled)


# --------------------------------------------------------------------------- data and training

@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    for kind in X.KINDS:
        X.main(["prepare", "--kind", kind, "--out", str(root / f"{kind}.pt"), "--n", "18", "--batch-size", "8",
                "--degrade-prob", "0.5"])
    return root


def test_prepare_groups_by_bucket_with_time_ids(caches):
    from ministd.data import SDXL_BUCKETS

    base = torch.load(caches / "base.pt", weights_only=False)
    assert base["meta"]["kind"] == "base"
    assert sum(b["latent_mean"].shape[0] for b in base["buckets"].values()) == 18
    for name, bucket in base["buckets"].items():
        h, w = map(int, name.split("x"))
        assert (h, w) in SDXL_BUCKETS
        assert bucket["latent_mean"].shape[1:] == (4, h // 4, w // 4)
        ids = bucket["time_ids"]
        assert ids.shape[1] == 6 and (ids[:, 4] == h).all() and (ids[:, 5] == w).all()
        # original sizes: a scene of 16-128 pixels (the default), or the canvas it was widened to (square bucket)
        assert (ids[:, :2].min(1).values >= 16).all() and (ids[:, :2] <= 192).all() and (ids[:, 2:4] >= 0).all()
    refiner = torch.load(caches / "refiner.pt", weights_only=False)
    scores = torch.cat([b["time_ids"][:, 4] for b in refiner["buckets"].values()])
    assert scores.max() <= 6.0 and scores.min() < 5.0          # a range of quality (degraded ones)
    with pytest.raises(ValueError, match="not a base cache"):
        X.check_cache(refiner, "base")


def start_weights():
    start = UNet(X.xl_config("base"))
    X.warm_start(start, read_safetensors(X.DATA / "shapes_unet.safetensors", dtype=torch.float32))
    return start.state_dict()


def _train_args(caches, kind, out, *extra):
    return ["train", "--kind", kind, "--cache", str(caches / f"{kind}.pt"), "--out", str(out), "--steps", "4",
            "--batch-size", "4", "--lr", "1e-3", "--warmup", "1", "--save-every", "2", *extra]


def test_batches_hold_one_bucket_and_the_refiners_noise_is_low(caches):
    import argparse

    cache = torch.load(caches / "refiner.pt", weights_only=False)
    args = argparse.Namespace(seed=0, batch_size=6, kind="refiner", uncond_prob=0.5)
    for step in range(10):
        latents, ids, keep, time_ids, t, noise = X.draw_batch(cache, step, args)
        assert latents.shape == noise.shape and latents.shape[0] == 6 and time_ids.shape == (6, 5)
        assert (t < X.REFINER_MAX_T).all() and set(keep.tolist()) <= {0.0, 1.0}
        again = X.draw_batch(cache, step, args)
        assert torch.equal(again[0], latents) and torch.equal(again[4], t)


def test_a_high_noise_share_redraws_only_the_first_timesteps_of_each_batch(caches):
    import argparse

    cache = torch.load(caches / "base.pt", weights_only=False)
    plain = argparse.Namespace(seed=0, batch_size=8, kind="base", uncond_prob=0.1)   # as older runs had it
    off = argparse.Namespace(**vars(plain), high_noise_share=0.0, high_noise_from=850)
    share = argparse.Namespace(**vars(plain), high_noise_share=0.5, high_noise_from=900)
    highs = []
    for step in range(12):
        a, b, c = (X.draw_batch(cache, step, args) for args in (plain, off, share))
        assert all(torch.equal(x, y) for x, y in zip(a, b))             # share 0: the very same batches
        assert all(torch.equal(x, y) for i, (x, y) in enumerate(zip(a, c)) if i != 4)
        assert torch.equal(a[4][4:], c[4][4:]) and (c[4][:4] >= 900).all() and (c[4][:4] < 1000).all()
        highs.append(a[4][:4])
    assert (torch.cat(highs) < 900).any()          # without the share those places were drawn from all of [0, 1000)


def test_a_timestep_range_bounds_the_draws_and_its_default_keeps_the_old_batches(caches):
    import argparse

    cache = torch.load(caches / "base.pt", weights_only=False)
    plain = argparse.Namespace(seed=0, batch_size=8, kind="base", uncond_prob=0.1)   # as older runs had it
    full = argparse.Namespace(**vars(plain), timesteps=[0, 1000])
    low = argparse.Namespace(**vars(plain), timesteps=[20, 400])
    drawn = []
    for step in range(12):
        a, b, c = (X.draw_batch(cache, step, args) for args in (plain, full, low))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(torch.equal(x, y) for i, (x, y) in enumerate(zip(a, c)) if i != 4)
        drawn.append(c[4])
    drawn = torch.cat(drawn)
    assert drawn.min() >= 20 and drawn.max() < 400 and len(drawn.unique()) > 50


def test_a_conditioning_phase_moves_only_the_conditioning_weights(caches, tmp_path):
    """--trainable conditioning starts from the earlier run's EMA and trains only the added
    embedding and the time projections: every other weight ends exactly where it started."""
    threads = torch.get_num_threads()
    try:
        X.main(_train_args(caches, "base", tmp_path / "first", "--steps", "1"))
        X.main(["train", "--kind", "base", "--cache", str(caches / "base.pt"), "--out", str(tmp_path / "size"),
                "--init-from", str(tmp_path / "first" / "last.pt"), "--trainable", "conditioning",
                "--timesteps", "20", "400", "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)
    before = torch.load(tmp_path / "first" / "last.pt", weights_only=False)["ema"]
    after = torch.load(tmp_path / "size" / "last.pt", weights_only=False)
    moved = {k for k, v in after["unet"].items() if not torch.equal(v, before[k])}
    assert moved and all(X.conditioning_parameter(k) for k in moved)
    assert any(k.startswith("add_embedding.") for k in moved) and any(".time_emb_proj." in k for k in moved)
    assert all(torch.equal(v, before[k]) for k, v in after["ema"].items() if not X.conditioning_parameter(k))


def test_layout_weights_make_the_epsilon_loss_the_x0_loss_at_high_noise():
    from ministd.schedules import NoiseSchedule

    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise, guess = (torch.randn(5, 4, 6, 6, generator=g) for _ in range(3))
    t = torch.tensor([10, 300, 600, 900, 990])

    def model(x_t, timesteps, **kwargs):          # any fixed epsilon prediction will do
        assert set(kwargs) == {"encoder_hidden_states", "added_cond"}
        return guess

    abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    x0_guess = (x_t - (1 - abar).sqrt() * guess) / abar.sqrt()      # the prediction's implied x0
    x0_mse = ((x0_guess - x0) ** 2).flatten(1).mean(1)
    eps_mse = ((guess - noise) ** 2).flatten(1).mean(1)
    states, pooled, ids = torch.zeros(5, 77, 320), torch.zeros(5, 192), torch.zeros(5, 6)

    def loss(cap):
        return X.training_loss(model, x0, schedule, t, noise, states, pooled, ids, cap)

    torch.testing.assert_close(loss(0.0), eps_mse.mean(), rtol=1e-6, atol=0)            # plain epsilon loss
    # uncapped: the x0 error wherever 1 / SNR >= 1 (t >= 600 here), the epsilon error below (t <= 300)
    low = (1 - abar.flatten()) / abar.flatten() < 1
    assert low.tolist() == [True, True, False, False, False]
    torch.testing.assert_close(loss(1e9), torch.where(low, eps_mse, x0_mse).mean(), rtol=1e-5, atol=0)
    capped = torch.where(low, eps_mse, torch.minimum(x0_mse, 20 * eps_mse))
    torch.testing.assert_close(loss(20.0), capped.mean(), rtol=1e-5, atol=0)
    assert X.layout_weights(schedule, t, 20.0).tolist()[-2:] == [20.0, 20.0]


def test_warm_start_from_an_sdxl_type_unet_keeps_its_added_embedding():
    torch.manual_seed(0)
    trained = UNet(X.xl_config("base"))
    torch.nn.init.normal_(trained.add_embedding.linear_2.weight, std=0.5)
    fresh = UNet(X.xl_config("base"))
    counts = X.warm_start(fresh, trained.state_dict())
    assert counts["fresh"] == counts["widened"] == 0
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


@torch.no_grad()
def test_a_refiner_warm_started_from_the_base_computes_the_base_on_the_wide_encoder():
    """Narrowed from a random SDXL-type base whose target-size columns are zeroed (so that
    the ids the two U-Nets do not share cannot matter), the refiner given the wide encoder's
    states and (h, w, top, left, any score) equals the base given [zeros | those states] and
    the same four ids (float32; atol 1e-5). Taking any other 192 of the 320 columns, or other
    id columns, fails this."""
    torch.manual_seed(0)
    base = UNet(X.xl_config("base")).eval()
    for module in base.modules():       # every weight random, so a wrong column shows
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05)
    source = {k: v.clone() for k, v in base.state_dict().items()}
    d = X.ADDITION_TIME_EMBED_DIM
    source["add_embedding.linear_1.weight"][:, 192 + 4 * d:] = 0
    base.load_state_dict(source)
    refiner = UNet(X.xl_config("refiner")).eval()
    counts = X.warm_start(refiner, source)
    assert counts["narrowed"] == 2 * 10 + 1 and counts["fresh"] == 0
    g = torch.Generator().manual_seed(1)
    x, wide = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 192, generator=g)
    pooled, t = torch.randn(2, 192, generator=g), torch.tensor([30, 150])
    ids = torch.tensor([[64.0, 64, 8, 0], [128.0, 96, 0, 16]])
    expected = base(x, t, torch.cat([torch.zeros(2, 77, 128), wide], dim=-1),
                    added_cond={"text_embeds": pooled, "time_ids": torch.cat([ids, torch.full((2, 2), 64.0)], 1)})
    for score in (2.5, 6.0):
        got = refiner(x, t, wide, added_cond={"text_embeds": pooled,
                                              "time_ids": torch.cat([ids, torch.full((2, 1), score)], 1)})
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_crop_reliance_is_zero_for_a_crop_blind_unet_and_not_for_one_that_reads_crops(caches):
    cache = torch.load(caches / "base.pt", weights_only=False)
    encoders = X.load_encoders("base")
    unet = UNet(X.xl_config("base"))
    unet.load_state_dict(start_weights())          # warm start: the added embedding's output is zero
    blind = X.crop_reliance(unet, encoders, cache, timesteps=(900,))
    assert blind[900]["shuffled_minus_true"] == 0.0 and blind[900]["x0_mse"] > 0
    torch.manual_seed(0)
    torch.nn.init.normal_(unet.add_embedding.linear_2.weight, std=0.5)    # now the time ids move every block
    reading = X.crop_reliance(unet, encoders, cache, timesteps=(800, 900))
    # only the crops are shuffled (the bucket's target size is the same for all): a nonzero gap
    assert all(abs(r["shuffled_minus_true"]) > 1e-4 for r in reading.values()), reading
    assert unet.training                                                   # left as it was found


@pytest.mark.slow
def test_training_resumes_exactly_and_exports(caches, tmp_path):
    """Stopped after step 2 and rerun, a run ends where an uninterrupted one does (bit for bit:
    one process, the same batches); the export loads as a U-Net of the same function."""
    threads = torch.get_num_threads()
    try:
        X.main(_train_args(caches, "base", tmp_path / "straight"))
        X.main(_train_args(caches, "base", tmp_path / "resumed", "--stop-after", "2"))
        assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["step"] == 2
        X.main(_train_args(caches, "base", tmp_path / "resumed"))
        with pytest.raises(SystemExit, match="other settings"):
            X.main(_train_args(caches, "base", tmp_path / "resumed", "--seed", "1"))
        # a checkpoint written before the recipe settings existed resumes as the plain recipe, only
        written = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
        for key in X.LATER_DEFAULTS:
            del written["args"][key]
        torch.save(written, tmp_path / "resumed" / "last.pt")
        X.main(_train_args(caches, "base", tmp_path / "resumed"))
        with pytest.raises(SystemExit, match="other settings"):
            X.main(_train_args(caches, "base", tmp_path / "resumed", "--x0-weight-cap", "20"))
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(v, b["unet"][k]) for k, v in a["unet"].items())
    # a further phase starts from the earlier run's weights (one step moves them only a little)
    # with its own optimiser, and counts the earlier run's training time
    try:
        X.main(["train", "--kind", "base", "--cache", str(caches / "base.pt"), "--out", str(tmp_path / "phase2"),
                "--init-from", str(tmp_path / "straight" / "last.pt"), "--steps", "1", "--batch-size", "4",
                "--lr", "1e-5", "--added-lr-scale", "10", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)
    c = torch.load(tmp_path / "phase2" / "last.pt", weights_only=False)
    assert c["step"] == 1 and c["elapsed"] > a["elapsed"]
    w = "conv_in.weight"
    assert 0 < (c["unet"][w] - a["unet"][w]).abs().max() < 1e-4 < (a["unet"][w] - start_weights()[w]).abs().max()
    start = UNet(X.xl_config("base"))
    X.warm_start(start, read_safetensors(X.DATA / "shapes_unet.safetensors", dtype=torch.float32))
    assert (a["unet"]["add_embedding.linear_2.weight"] - start.add_embedding.linear_2.weight).abs().max() > 1e-4
    X.main(["export", "--checkpoint", str(tmp_path / "straight" / "last.pt"), "--out", str(tmp_path / "xl.safetensors")])
    exported = UNet.load(tmp_path / "xl.safetensors").float().eval()
    assert exported.config.addition_time_embed_dim == X.ADDITION_TIME_EMBED_DIM
    ema = X.load_checkpoint(tmp_path / "straight" / "last.pt")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 12, 20, generator=g), torch.randn(1, 77, 320, generator=g)
    added = {"text_embeds": torch.randn(1, 192, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 48, 80]])}
    with torch.no_grad():
        torch.testing.assert_close(exported(x, torch.tensor([500]), ctx, added_cond=added),
                                   ema(x, torch.tensor([500]), ctx, added_cond=added), atol=5e-3, rtol=0)  # float16


# --------------------------------------------------------------------------- effect measures

def test_effect_measures_on_ground_truth():
    centre = np.asarray(_render())
    assert X.wholly_in_frame(centre)
    cut = np.asarray(_render("a large red circle at the top left on a blue background").crop((16, 16, 80, 80)))
    assert not X.wholly_in_frame(cut)
    # stray object pixels on the outermost ring: up to FRAME_TOLERANCE (3) are the VAE's border
    # artefacts, one more is a cut; a second ring in from the edge does not count
    for stray, in_frame in ((3, True), (4, False)):
        speckled = centre.copy()
        speckled[0, 20:20 + stray] = PALETTE["red"]
        assert X.wholly_in_frame(speckled) == in_frame, stray
        assert not X.wholly_in_frame(speckled, tolerance=0)
    inner = centre.copy()
    inner[1, 20:40] = PALETTE["red"]
    assert X.wholly_in_frame(inner, tolerance=0)
    # the same picture moved 6 pixels right and 4 down (background colour filled in)
    moved = np.full_like(centre, PALETTE["blue"])
    moved[4:, 6:] = centre[:-4, :-6]
    (x0, y0), (x1, y1) = X.object_centroid(centre), X.object_centroid(moved)
    assert (x1 - x0, y1 - y0) == pytest.approx((6, 4), abs=0.01)
    assert X.object_centroid(np.full_like(centre, PALETTE["blue"])) is None
    # a soft picture (a 32-pixel render enlarged) has lower edge sharpness than a sharp one
    soft = _render(size=32).resize((64, 64), Image.Resampling.BICUBIC)
    sharp = _render(size=128).resize((64, 64), Image.Resampling.BICUBIC)
    assert X.edge_sharpness(soft) < 0.8 * X.edge_sharpness(sharp)
    assert X.follows_prompt(centre, "a red circle on a blue background")
    assert not X.follows_prompt(centre, "a green circle") and not X.follows_prompt(centre, "a red circle, yellow background")


def test_the_softer_share_counts_pairs_whose_first_picture_is_softer():
    captions = ["a large red circle in the center on a blue background", "a huge yellow square on a black background",
                "a medium green triangle at the top left on a white background", "a big purple disc at the bottom"]
    soft = [_render(c, seed=k, size=16).resize((64, 64), Image.Resampling.BICUBIC) for k, c in enumerate(captions)]
    sharp = [_render(c, seed=k, size=128).resize((64, 64), Image.Resampling.BICUBIC) for k, c in enumerate(captions)]
    assert X.softer_share(soft, sharp) == 1.0 and X.softer_share(sharp, soft) == 0.0
    assert X.softer_share(soft, soft) == 0.0                        # a tie is not softer
    assert X.softer_share(soft[:2] + sharp[2:], sharp[:2] + soft[2:]) == 0.5
    with pytest.raises(ValueError, match="soft and sharp must be equally long"):
        X.softer_share(soft, sharp[:3])


def test_only_a_small_original_stays_soft_through_the_vae():
    """Why size conditioning is measured at SMALL_ORIGINAL (16) against 128: the VAE's round
    trip keeps the softness of a 16-pixel original enlarged, but not of a 32-pixel one."""
    from ministd.data import pil_to_tensor, tensor_to_pil
    from ministd.vae import AutoencoderKL

    vae = AutoencoderKL.load(X.DATA / "shapes_vae.safetensors").eval()
    captions = ["a large red circle in the center on a blue background", "a huge yellow square on a black background",
                "a medium green triangle at the top left on a white background", "a big purple disc at the bottom"]

    def through_vae(side):
        pictures = [_render(c, seed=k, size=side).resize((64, 64), Image.Resampling.BICUBIC) for k, c in enumerate(captions)]
        with torch.no_grad():
            out = tensor_to_pil(vae.decode(vae.encode(pil_to_tensor(pictures)).mean).clamp(-1, 1))
        return np.mean([X.edge_sharpness(p) for p in out]), np.mean([X.edge_sharpness(p) for p in pictures])

    (small, small_raw), (mid, mid_raw), (large, large_raw) = through_vae(X.SMALL_ORIGINAL), through_vae(32), through_vae(128)
    assert small_raw < mid_raw < 0.8 * large_raw         # raw: each enlargement is softer
    assert small < 0.92 * large                          # through the VAE a 16-pixel original still is
    assert abs(mid - large) < 0.05 * large, (mid, large)  # a 32-pixel one no longer is


def test_the_training_data_moves_objects_with_the_crop():
    shift = X.data_crop_shift(n=3000, crop=16, window=3)
    assert min(shift["samples"]) > 20
    assert shift["dx"] < -3 and shift["dy"] < -3, shift


@pytest.mark.parametrize("argv, message", [
    (["prepare", "--kind", "base", "--out", "x.pt", "--degrade-prob", "1.5"], "must be a probability in [0, 1]"),
    (["train", "--kind", "base", "--cache", "c.pt", "--out", "o", "--uncond-prob", "-0.1"], "must be a probability"),
    (["train", "--kind", "base", "--cache", "c.pt", "--out", "o", "--added-lr-scale", "0"], "must be a finite number > 0"),
    (["train", "--kind", "turbo", "--cache", "c.pt", "--out", "o"], "invalid choice: 'turbo'"),
    (["train", "--kind", "base", "--cache", "c.pt", "--out", "o", "--high-noise-share", "1.5"], "must be a probability"),
    (["train", "--kind", "base", "--cache", "c.pt", "--out", "o", "--trainable", "unet"], "invalid choice: 'unet'"),
    (["prepare", "--kind", "base", "--out", "x.pt", "--zero-margin-prob", "2"], "must be a probability in [0, 1]"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        X.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--original-sides", "8", "128"], "--original-sides must be"),
                                            (["--original-sides", "64", "32"], "--original-sides must be"),
                                            (["--max-margin", "-1"], "--max-margin must be >= 0")])
def test_bad_sample_recipe_is_refused_before_the_vae_loads(extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        X.main(["prepare", "--kind", "base", "--out", str(tmp_path / "c.pt"), "--vae", str(tmp_path / "none"), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--x0-weight-cap", "0.5"], "--x0-weight-cap must be 0 .* or a finite number >= 1"),
    (["--x0-weight-cap", "inf"], "--x0-weight-cap must be"),
    (["--high-noise-from", "1000"], r"--high-noise-from must be a timestep in \[0, 999\]"),
    (["--high-noise-from", "-1"], "--high-noise-from must be"),
    (["--kind", "refiner", "--high-noise-share", "0.5"], "--high-noise-share is for the base"),
    (["--timesteps", "500", "400"], "--timesteps must be LOW HIGH with 0 <= LOW < HIGH <= 1000"),
    (["--timesteps", "0", "1001"], "--timesteps must be LOW HIGH"),
    (["--kind", "refiner", "--timesteps", "300", "400"], "--timesteps LOW must be below 200 for the refiner"),
    (["--high-noise-share", "0.5", "--timesteps", "0", "400"], "leave --timesteps HIGH at 1000"),
])
def test_bad_training_recipe_is_refused_before_the_cache_loads(extra, message, tmp_path):
    argv = ["train", "--kind", "base", "--cache", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(ValueError, match=message):        # not FileNotFoundError: nothing was read yet
        X.main(argv)
