"""Guidance: the CFG combination, guidance rescale (against diffusers), classifier guidance (against
an analytic gradient), and batching both branches in one call."""

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
