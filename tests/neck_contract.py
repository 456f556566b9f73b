"""Checks every wrapped backbone must pass (used by test_adapters_*.py and test_neck.py).

``check_wrapped(model, images, reference, ...)`` wraps ``model`` and verifies, for ``images``:
  * the output is ``[B, C, H, W]`` at the image size;
  * the low-res features equal ``reference(model, images)`` (the backbone's own features, reshaped
    by the test itself) bit for bit;
  * the guidance the upsampler got is the very tensor the backbone received;
  * calling the backbone directly while wrapped returns exactly its normal output;
  * gradients reach every upsampler parameter (the backbone is frozen);
  * after ``remove()`` no hook is left anywhere in the backbone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import featup_adapters


class RecordingUpsampler(nn.Module):
    """A learnable stand-in upsampler (1x1 conv, guidance-gated, then bilinear) that records its inputs."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)
        self.gate = nn.Conv2d(3, 1, 1)
        self.seen = []

    def forward(self, source, guidance, output_size=None):
        self.seen.append((source, guidance, output_size))
        up = F.interpolate(self.proj(source), size=output_size, mode="bilinear", align_corners=False)
        gate = torch.sigmoid(self.gate(F.interpolate(guidance, size=output_size, mode="bilinear",
                                                     align_corners=False)))
        return up * gate


def hook_counts(model: nn.Module):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs),
                   len(m._forward_pre_hooks_with_kwargs)) for name, m in model.named_modules()}


def _plain_output(out):
    """Tensors of a model output (tensor, tuple, ModelOutput) in a comparable form."""
    if torch.is_tensor(out):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    flat = []
    for item in out:
        flat.extend(_plain_output(item) if not torch.is_tensor(item) else [item])
    return flat


def direct_call(model, images, call=None):
    return [t.detach() for t in _plain_output(call(model, images) if call else model(images))]


def check_wrapped(model: nn.Module, images: torch.Tensor, reference, *, channels: int, layer=None,
                  call=None, backbone_id=None, guidance_is_input=True):
    """Wrap ``model`` and run every check of the module docstring; returns ``(neck, hr, lr)``."""
    model.eval().requires_grad_(False)  # frozen, as when training an upsampler: gradients stop at the features
    normal = direct_call(model, images, call)
    # same grad mode as the neck's forward: under no_grad, torch's MultiheadAttention takes a fast
    # path whose results differ in the last bits
    expected = reference(model, images).detach()
    before = hook_counts(model)  # after the reference: transformers may install its own capture hooks
    upsampler = RecordingUpsampler(channels)
    neck = featup_adapters.wrap(model, upsampler, layer=layer)
    try:
        assert neck.feature_dim == channels
        if backbone_id is not None:
            assert neck.backbone_id == backbone_id
        hr, lr = neck(images, return_lowres=True)
        B, _, H, W = images.shape
        assert tuple(hr.shape) == (B, channels, H, W)
        assert lr.dtype == expected.dtype and tuple(lr.shape) == tuple(expected.shape)
        assert torch.equal(lr, expected), "low-res features differ from the backbone's own features"
        assert torch.equal(neck.features(images), expected)
        _, guidance, size = upsampler.seen[0]
        assert size == (H, W)
        if guidance_is_input:
            assert guidance is images
        # the backbone called directly, while wrapped, returns its normal output
        wrapped = direct_call(model, images, call)
        assert len(wrapped) == len(normal)
        assert all(torch.equal(a, b) for a, b in zip(wrapped, normal))
        assert neck._store == {}, "a direct backbone call must not store anything"
        # gradients reach the upsampler
        hr.square().mean().backward()
        for name, p in upsampler.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for upsampler.{name}"
    finally:
        neck.remove()
    assert hook_counts(model) == before, "hooks left in the backbone after remove()"
    return neck, hr, lr


def tokens_to_map(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """The test's own reshape: drop ``prefix`` tokens of ``[B, N, C]`` and lay the rest row-major."""
    patches = tokens[:, prefix:]
    assert patches.shape[1] == h * w, (patches.shape, h, w)
    return patches.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
