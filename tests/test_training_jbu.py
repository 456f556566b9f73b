"""train_upsampler end to end with the real pieces: a random-init timm model, JBUStack,
save_pretrained, and wrap(model, upsampler=out_dir)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.timm


def _folder(path, n=3):
    path.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


@pytest.mark.slow
def test_trained_jbu_is_saved_and_used_by_wrap(tmp_path):
    timm = pytest.importorskip("timm")
    from featup_adapters import wrap
    from featup_adapters.training import train_upsampler
    from featup_adapters.upsamplers import JBUStack

    model = timm.create_model("resnet10t", pretrained=False).eval()
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    up = train_upsampler(model, _folder(tmp_path / "data"), steps=2, batch_size=1,
                         image_size=(64, 96), n_jitters=1, out_dir=tmp_path / "run",
                         progress=False, snapshots=True, checkpoint_every=2)
    assert isinstance(up, JBUStack) and not up.training
    # the trainer's hooks are gone from the user's model
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert (tmp_path / "run" / "snapshots" / "step_000002.png").is_file()

    neck = wrap(model, upsampler=str(tmp_path / "run")).eval()
    assert neck.upsampler.config["backbone_id"] == neck.backbone_id
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = up(neck.features(x), x, output_size=(64, 96))
        torch.testing.assert_close(neck(x), expected)


def test_resume_rejects_a_checkpoint_of_another_timm_backbone(tmp_path):
    pytest.importorskip("timm")
    from featup_adapters.training import train_upsampler

    data = _folder(tmp_path / "data", n=1)
    kw = dict(batch_size=1, image_size=64, n_jitters=1, progress=False, snapshots=False, pretrained=False)
    train_upsampler("timm:resnet10t", data, steps=0, out_dir=tmp_path / "a", checkpoint_every=1, **kw)
    assert not (tmp_path / "a" / "checkpoints").exists()    # zero steps: nothing to resume from
    train_upsampler("timm:resnet10t", data, steps=1, out_dir=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="trained for backbone .*resnet10t.* uses backbone .*resnet14t"):
        train_upsampler("timm:resnet14t", data, steps=2, resume=tmp_path / "a", **kw)
