"""A JBU stack for features of any channel count: FeatUp's stages without the final C x C fixup.

Every learned part of a JBU stage (range projection, kernel fixup, temperature, spatial sigma)
acts on the guidance image only; the kernels then mix each feature channel alike.  The one
per-channel part of :class:`~featup_adapters.upsamplers.JBUStack` is its final residual 1x1 fixup
``x + 0.1 * fixup_proj(x)``.  :class:`UniversalJBUStack` is a ``JBUStack`` without it
(``fixup_proj`` is None, so ``out = A(source)``), so one set of weights upsamples the features
of any backbone, at any channel count; train one across backbones with
``featup_adapters.training.universal.train_universal``.  It shares ``JBUStack``'s stage plan,
memory budget and row-band tiling (no fixup is trivially fusable).

Example:
    >>> up = UniversalJBUStack().eval()
    >>> up(torch.randn(1, 7, 14, 14), torch.randn(1, 3, 56, 56)).shape
    torch.Size([1, 7, 56, 56])
    >>> up(torch.randn(2, 384, 7, 9), torch.randn(2, 3, 112, 144)).shape
    torch.Size([2, 384, 112, 144])

Saved and loaded like any upsampler (``up.save_pretrained(dir)``,
``UniversalJBUStack.from_pretrained(dir)``, ``featup_adapters.wrap(backbone, dir)``); the shipped
weights load with ``featup_adapters.wrap(backbone, "universal")``.
"""
from __future__ import annotations

import torch

from ._base import register_upsampler_class
from .jbu import JBUStack

__all__ = ["UniversalJBUStack"]


@register_upsampler_class
class UniversalJBUStack(JBUStack):
    """``JBUStack`` stages with no per-channel parameters: ``forward(source: Tensor[B, C, h, w],
    guidance, output_size=None, *, max_memory=None, out_dtype=None) -> Tensor[B, C, H, W]`` for
    any ``C >= 1``.

    Args (keyword-only, as for ``JBUStack``): guidance_dim, key_dim, radius, num_stages,
    max_memory, out_dtype.  There is no ``dim``: ``self.dim`` is None and the result equals a
    ``JBUStack(C)`` with the same stage weights and a zeroed ``fixup_proj``.

    ``universal = True`` marks it as meant for any backbone: ``hub.check_compatible`` does not
    hold the backbone it was trained on against a new one.
    """

    universal = True

    def __init__(self, *, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3,
                 num_stages: int = 4, max_memory=None, out_dtype: torch.dtype | None = None):
        super().__init__(None, guidance_dim=guidance_dim, key_dim=key_dim, radius=radius,
                         num_stages=num_stages, max_memory=max_memory, out_dtype=out_dtype)

    def _check_dim(self, dim):
        return None             # any channel count: forward checks nothing about C

    def _make_fixup(self, dim):
        return None

    def init_kwargs(self) -> dict:
        kw = super().init_kwargs()
        del kw["dim"]
        return kw

    @classmethod
    def from_jbu_stack(cls, stack: JBUStack) -> "UniversalJBUStack":
        """A universal stack with ``stack``'s stage weights (its ``fixup_proj`` is dropped), e.g. to
        start universal training from a per-backbone upsampler."""
        if not isinstance(stack, JBUStack):
            raise TypeError(f"from_jbu_stack: expected a JBUStack, got {type(stack).__name__}")
        new = cls(guidance_dim=stack.guidance_dim, key_dim=stack.key_dim, radius=stack.radius,
                  num_stages=stack.num_stages)
        state = {k: v for k, v in stack.state_dict().items() if not k.startswith("fixup_proj.")}
        new.load_state_dict(state)
        p = next(stack.parameters())
        return new.to(device=p.device, dtype=p.dtype).train(stack.training)

    def extra_repr(self) -> str:
        return (f"any channel count, guidance_dim={self.guidance_dim}, key_dim={self.key_dim}, "
                f"radius={self.radius}, num_stages={self.num_stages}")
