"""Guidance: the CFG combination, guidance rescale (against diffusers), classifier guidance (against
an analytic gradient), and batching both branches in one call."""

import json
import math

import pytest
import torch

from ministd.guidance import (check_guidance_scale, classifier_free_guidance, classifier_guidance,
                              guided_noise_prediction, rescale_guidance)


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


def test_cfg_endpoints_and_line():
    uncond, cond = _pair()
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 1.0), cond)
    # the guided prediction lies on the line through both, s units of (cond - uncond) from uncond
    out = classifier_free_guidance(uncond, cond, 7.5)
    torch.testing.assert_close(out - uncond, 7.5 * (cond - uncond), rtol=1e-6, atol=1e-6)


def test_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    uncond, cond = _pair(1)
    guided = classifier_free_guidance(uncond, cond, 9.0)
    for phi in (0.0, 0.3, 0.7, 1.0):
        torch.testing.assert_close(rescale_guidance(guided, cond, phi),
                                   rescale_noise_cfg(guided, cond, guidance_rescale=phi),
                                   rtol=1e-6, atol=1e-6)  # float32, same arithmetic
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_rescale"):
        rescale_guidance(guided, cond, 1.5)


def test_one_batch_for_both_branches():
    calls = []

    def model(x, t, context, **kwargs):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2))[:, None, None, None]

    latents, _ = _pair(2)
    cond, uncond = torch.full((2, 77, 8), 2.0), torch.full((2, 77, 8), -1.0)
    out = guided_noise_prediction(model, latents, 10, cond, uncond, guidance_scale=3.0)
    assert calls == [4]  # one call with the doubled batch
    torch.testing.assert_close(out, -latents + 3.0 * (2 * latents + latents))
    calls.clear()
    only = guided_noise_prediction(model, latents, 10, cond, uncond, guidance_scale=1.0)
    assert calls == [2]
    torch.testing.assert_close(only, 2 * latents)


def test_classifier_guidance_uses_the_gradient_of_log_p():
    # a linear classifier has an analytic gradient: d/dx log softmax(Wx)_y = W_y - sum_k p_k W_k
    torch.manual_seed(0)
    W = torch.randn(3, 4 * 8 * 8) * 0.1
    classifier = lambda x, t: x.flatten(1) @ W.T
    x, eps = _pair(3)
    labels = torch.tensor([2, 0])
    alpha_bar = torch.tensor([0.3, 0.3])
    out = classifier_guidance(eps, x, torch.tensor([500, 500]), classifier, labels, alpha_bar, scale=4.0)
    p = torch.softmax(classifier(x, None), dim=-1)
    grad = (W[labels] - p @ W).reshape_as(x)
    expected = eps - 4.0 * math.sqrt(1 - 0.3) * grad
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(classifier_guidance(eps, x, 0, classifier, labels, 0.3, scale=0.0), eps)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "7", None, True])
def test_bad_guidance_scale(bad):
    with pytest.raises(ValueError, match="guidance_scale"):
        check_guidance_scale(bad)


# --------------------------------------------------------------------------- #
# The noisy classifier (classifier guidance's p(y | x_t))
# --------------------------------------------------------------------------- #

def test_noisy_classifier_shapes_labels_and_round_trip(tmp_path):
    from ministd.data import COLORS, SHAPES
    from ministd.guidance import NoisyClassifier, NoisyClassifierConfig

    torch.manual_seed(0)
    model = NoisyClassifier(NoisyClassifierConfig(channels=(32, 32))).eval()
    x = torch.randn(3, 4, 16, 16)
    logits = model(x, torch.tensor([0, 500, 999]))
    assert logits["color"].shape == (3, len(COLORS)) and logits["shape"].shape == (3, len(SHAPES))
    torch.testing.assert_close(model(x, 500)["color"][1], logits["color"][1])   # scalar t is broadcast
    assert model.label_index("color", ["red", "blue"]).tolist() == [COLORS.index("red"), COLORS.index("blue")]
    with pytest.raises(ValueError, match="color labels must be among"):
        model.label_index("color", ["teal"])
    with pytest.raises(ValueError, match="attribute must be one of"):
        model.head("size")
    model.save(tmp_path / "c.safetensors")
    loaded = NoisyClassifier.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(loaded.head("shape")(x, 7), model(x, 7)["shape"], atol=2e-2, rtol=1e-2)  # float16 file


def test_classifier_guidance_with_the_noisy_classifier_raises_log_p():
    """A small step along the guided direction makes the wanted class more likely."""
    from ministd.guidance import NoisyClassifier, NoisyClassifierConfig, classifier_guidance

    torch.manual_seed(0)
    clf = NoisyClassifier(NoisyClassifierConfig(channels=(32, 32))).eval()
    x, t = torch.randn(4, 4, 16, 16), torch.tensor(300)
    labels = clf.label_index("color", ["red", "green", "blue", "white"])
    eps = torch.zeros_like(x)
    guided = classifier_guidance(eps, x, t, clf.head("color"), labels, alpha_bar_t=0.5, scale=1.0)
    # eps_hat = -sqrt(1 - a) * grad: moving x against eps_hat climbs log p(y | x)
    def log_p(z):
        return torch.log_softmax(clf(z, t)["color"], -1)[torch.arange(4), labels]
    with torch.no_grad():
        step = 0.05 * guided / guided.abs().amax(dim=(1, 2, 3), keepdim=True)   # gradients of a random net are tiny
        assert (log_p(x - step) > log_p(x) + 1e-4).all()
        assert (log_p(x + step) < log_p(x) - 1e-4).all()


def test_classifier_training_script_runs_and_saves(tmp_path):
    """Three steps on a small cache built from real ShapesWorld attributes (random latents)."""
    from ministd.guidance import NoisyClassifier
    from ministd.train import classifier as C

    g = torch.Generator().manual_seed(0)
    n = 400
    cache = {"latent_mean": torch.randn(n, 4, 8, 8, generator=g).half(),
             "latent_std": torch.full((n, 4, 8, 8), 0.05).half(),
             "meta": {"world_seed": 3, "objects": [1, 2]}}
    torch.save(cache, tmp_path / "cache.pt")
    mean, std, labels = C.labelled_latents(cache)
    from ministd.data import ShapesWorld
    world = ShapesWorld(seed=3, objects=(1, 2))
    singles = [i for i in range(n) if len(world.attributes(i)[0]["objects"]) == 1]
    assert mean.shape[0] == len(singles) and 0 < len(singles) < n
    first = world.attributes(singles[0])[0]["objects"][0]
    assert NoisyClassifier().config.labels["shape"][labels["shape"][0]] == first["shape"]
    C.main(["--cache", str(tmp_path / "cache.pt"), "--out", str(tmp_path / "c.safetensors"), "--steps", "3",
            "--batch-size", "16", "--held-out", "50", "--threads", "1"])
    meta = json.loads((tmp_path / "c.json").read_text())["_ministd"]
    assert set(meta["held_out_accuracy"]) == {"t 0-250", "t 250-500", "t 500-750", "t 750-1000"}
    NoisyClassifier.load(tmp_path / "c.safetensors")
