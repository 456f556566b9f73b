"""The attention downsampler equals its definition (spec section 5), written out here."""
import pytest
import torch
import torch.nn.functional as F

from featup_adapters.training.downsamplers import AttentionDownsampler


def definition(ds: AttentionDownsampler, hr, out_size):
    """FeatUp's formulation: blur by two depthwise convolutions, Dropout, a 1x1 convolution to one
    logit map, softmax over each k x k patch (times w, plus b), patches unfolded and weighted."""
    k = ds.kernel_size
    h, w = out_size
    if tuple(hr.shape[-2:]) != (h * k, w * k):
        hr = F.interpolate(hr, size=(h * k, w * k), mode="bilinear", align_corners=False)
    B, C = hr.shape[:2]
    t = torch.arange(-2, 3, dtype=hr.dtype)
    g = torch.exp(-t * t / 2)
    g = g / g.sum()
    x = F.pad(hr, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, 5).repeat(C, 1, 1, 1), groups=C)
    src = F.conv2d(x, g.view(1, 1, 5, 1).repeat(C, 1, 1, 1), groups=C)
    drop, conv = ds.attention_net
    logit_map = F.conv2d(drop(src), conv.weight, conv.bias)                  # [B, 1, H, W]
    logits = F.unfold(logit_map, k, stride=k).view(B, k * k, h, w).permute(0, 2, 3, 1)
    attn = torch.softmax(logits * ds.w + ds.b, dim=-1)                       # [B, h, w, k*k]
    patches = F.unfold(hr, k, stride=k).view(B, C, k * k, h, w)
    return torch.einsum("bcnhw,bhwn->bchw", patches, attn)


@pytest.mark.parametrize("shape,out_size,k", [((2, 5, 8, 12), (2, 3), 4), ((1, 3, 7, 9), (2, 2), 4),
                                              ((2, 4, 14, 14), (2, 2), 7)])
@pytest.mark.parametrize("training", [False, True])
def test_forward_and_gradients_equal_the_definition(shape, out_size, k, training):
    torch.manual_seed(0)
    ds = AttentionDownsampler(shape[1], k).double().train(training)
    with torch.no_grad():
        for p in ds.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    hr = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for fn in (lambda: ds(hr, out_size), lambda: definition(ds, hr, out_size)):
        torch.manual_seed(7)                       # the same dropout mask for both
        out = fn()
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                [hr, *ds.parameters()])
        outs.append(out)
        grads.append(g)
    assert outs[0].shape == (shape[0], shape[1], *out_size)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
