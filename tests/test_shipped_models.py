"""The shipped ShapesWorld models, checked against ground truth.

The scripts (``ministd.train.unet evaluate``, ``ministd.train.classifier``)
measure the full bars on 200+ prompts; these tests re-measure small samples in
CI so that a broken file, loader or pipeline fails loudly:

1. the shipped judge (data/shapes_judge.safetensors) reads held-out
   *ground-truth* pictures correctly, so it is a judge independent of the
   U-Net;
2. that judge then reads the pipeline's pictures for held-out complete
   captions at guidance 7.5, and most must match the caption;
3. the noisy classifier that classifier guidance uses reads colour from the
   VAE latents of ground-truth pictures at low noise.
"""

from __future__ import annotations

import pytest
import torch

from ministd.data import SHAPES, ShapesWorld, pil_to_tensor
from ministd.guidance import NoisyClassifier
from ministd.pipelines import load_pipeline
from ministd.train.unet import judge_accuracy, load_judge

HELD_OUT_SEED = 1_000_003    # the evaluation world of ministd.train.unet (never trained on)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("shapes")
    pipe.progress_bar = False
    return pipe


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def _judge(judge, pipe, latents, attribute):
    """The judge's reading of ``attribute`` for scaled latents [B, 4, 16, 16], decoded by the pipeline."""
    images = pipe.vae.decode(pipe.vae.unscale_latents(latents)).float().clamp(-1, 1)
    return [p[attribute] for p in judge.predict(images)]


def _held_out(n):
    world = ShapesWorld(seed=HELD_OUT_SEED, objects=1, shapes=SHAPES, complete_captions=True)
    return [world[i] for i in range(n)]


def test_judge_reads_ground_truth():
    """Bar: >= 99% on every attribute of 300 held-out ground-truth pictures (the float16 file)."""
    accuracy = judge_accuracy(load_judge(), n=300, batch_size=100)
    assert min(accuracy.values()) >= 0.99, accuracy


@torch.no_grad()
def test_noisy_classifier_reads_colour_from_ground_truth_latents(pipe):
    """Bar: >= 95% colour on the VAE latents of 128 held-out pictures at t = 0 and t = 200."""
    classifier = NoisyClassifier.load()
    items = _held_out(128)
    latents = pipe.vae.scale_latents(pipe.vae.encode(pil_to_tensor([im for im, _, _ in items])).mode())
    truth = [attrs["objects"][0]["color"] for _, _, attrs in items]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    from ministd.schedules import NoiseSchedule
    for t in (0, 200):
        x_t = NoiseSchedule().add_noise(latents, noise, torch.full((len(items),), t))
        picks = classifier(x_t, t)["color"].argmax(1).tolist()
        accuracy = sum(classifier.config.labels["color"][i] == c for i, c in zip(picks, truth)) / len(items)
        assert accuracy >= 0.95, f"t={t}: {accuracy:.3f}"


@torch.no_grad()
def test_shipped_model_follows_held_out_prompts(pipe, judge):
    """Bar: >= 80% colour and >= 80% shape on 48 held-out captions (15 DDIM steps, CFG 7.5).

    (The script's bar is 85% on 200 prompts with 30 steps and its own judge;
    this smaller sample in CI allows for sampling error.)
    """
    items = _held_out(48)
    out = pipe.txt2img([c for _, c, _ in items], seed=0, num_inference_steps=15, guidance_scale=7.5,
                       output_type="latent")
    latents = torch.stack(out.images)
    for attribute in ("color", "shape"):
        got = _judge(judge, pipe, latents, attribute)
        truth = [attrs["objects"][0][attribute] for _, _, attrs in items]
        accuracy = sum(a == b for a, b in zip(got, truth)) / len(items)
        assert accuracy >= 0.80, f"{attribute}: {accuracy:.3f}"


@torch.no_grad()
def test_guidance_scale_zero_ignores_the_prompt(pipe, judge):
    """At scale 0 the model is unconditional: asking for red gives red far less often than at 7.5.

    (Chance is about 1 in 8; at 7.5 at least two thirds must be red.)"""
    prompts = ["a red circle"] * 24
    reds = {}
    for scale in (0.0, 7.5):
        latents = torch.stack(pipe.txt2img(prompts, seed=1, num_inference_steps=12, guidance_scale=scale,
                                           output_type="latent").images)
        reds[scale] = _judge(judge, pipe, latents, "color").count("red")
    assert reds[7.5] >= 16 and reds[0.0] <= 8, reds
