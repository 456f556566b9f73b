"""The detectron2 neck: every shipped config builds on CPU, trains and infers on non-square images."""
import glob
import math
import os
import sys

import pytest
import torch

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config  # noqa: E402

from integrations.detectron2 import FeatUpBackbone, GuidanceNorm, add_featup_config  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "integrations", "detectron2", "configs")
CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
                 if not os.path.basename(p).startswith("Base-"))
NUM_CLASSES = 5
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 32,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES, "INPUT.CROP.ENABLED", False,
    "MODEL.FEATUP.ADAPTER.SPEC", "timm:vit_tiny_patch16_224", "MODEL.FEATUP.ADAPTER.PRETRAINED", False,
]


def tiny_cfg(path):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_featup_config(cfg)
    cfg.merge_from_file(path)
    if cfg.MODEL.FEATUP.BOTTOM_UP == "build_featup_adapter_backbone":
        pytest.importorskip("timm")
    cfg.merge_from_list(TINY)
    return cfg


def batch(gen):
    # two non-square images of different sizes (detectron2 pads them to the size divisibility)
    out = []
    for h, w in ((70, 100), (64, 90)):
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=gen).float(),
                    "sem_seg": torch.randint(0, NUM_CLASSES, (h, w), generator=gen),
                    "height": h, "width": w})
    return out


def test_configs_are_shipped():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "semantic_R_50_FeatUp_JBU_1x.yaml" in names and "deeplab_v3_R_50_FeatUp_JBU_ade20k.yaml" in names


def test_backbone_is_registered():
    assert "build_featup_backbone" in BACKBONE_REGISTRY
    assert "build_featup_adapter_backbone" in BACKBONE_REGISTRY


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_trains_and_infers_on_cpu(path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = tiny_cfg(path)
    model = build_model(cfg)
    backbone = model.backbone
    assert isinstance(backbone, FeatUpBackbone)
    # the head works at stride 4 or finer on upsampled features
    assert all(s.stride <= 4 for k, s in backbone.output_shape().items() if k.endswith("_up"))

    data = batch(gen)
    model.train()
    losses = model(data)
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    loss.backward()
    jbu_params = {n: p for n, p in backbone.upsamplers.named_parameters()}
    if cfg.MODEL.FEATUP.UPSAMPLER == "jbu":
        assert jbu_params, "a JBU upsampler has parameters"
        # every stage is used (stages = log2(stride ratio)), so every JBU parameter gets a gradient
        for name, p in jbu_params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        range_temp = [p.grad for n, p in jbu_params.items() if n.endswith("up1.range_temp")]
        assert range_temp and range_temp[0] is not None and range_temp[0].abs() > 0
    else:
        assert not jbu_params

    # output_shape() agrees with what forward returns, on a padded non-square input
    model.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = backbone(x)
        outputs = model(data)
    shapes = backbone.output_shape()
    assert set(feats) == set(shapes)
    for name, spec in shapes.items():
        assert feats[name].shape[1] == spec.channels, name
        assert feats[name].shape[-2:] == (math.ceil(96 / spec.stride), math.ceil(128 / spec.stride)), name
    for item, out in zip(data, outputs):
        assert out["sem_seg"].shape == (NUM_CLASSES, item["height"], item["width"])
        assert torch.isfinite(out["sem_seg"]).all()


def test_guidance_is_the_image_in_the_upsamplers_normalization():
    mean_bgr, std_bgr = [103.53, 116.28, 123.675], [1.0, 1.0, 1.0]
    dst_mean, dst_std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    rgb = torch.rand(2, 3, 8, 12) * 255
    bgr_normalized = (rgb.flip(1) - torch.tensor(mean_bgr).view(1, 3, 1, 1)) / torch.tensor(std_bgr).view(1, 3, 1, 1)
    g = GuidanceNorm(mean_bgr, std_bgr, "BGR", dst_mean, dst_std)(bgr_normalized)
    expected = (rgb - torch.tensor(dst_mean).view(1, 3, 1, 1)) / torch.tensor(dst_std).view(1, 3, 1, 1)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-4)
    assert GuidanceNorm(mean_bgr, std_bgr, "BGR")(bgr_normalized) is bgr_normalized  # no target: as is


def test_unknown_in_feature_is_a_clear_error():
    cfg = tiny_cfg(os.path.join(CONFIG_DIR, "semantic_R_50_bilinear_1x.yaml"))
    cfg.MODEL.FEATUP.IN_FEATURES = ["res9"]
    with pytest.raises(ValueError, match=r"expected MODEL.FEATUP.IN_FEATURES among the bottom-up outputs .*res5.*res9"):
        build_model(cfg)


def test_out_stride_coarser_than_the_feature_is_rejected():
    cfg = tiny_cfg(os.path.join(CONFIG_DIR, "semantic_R_50_bilinear_1x.yaml"))
    cfg.MODEL.FEATUP.OUT_STRIDE = 64
    with pytest.raises(ValueError, match=r"OUT_STRIDE <= stride of 'res5' \(32\), got 64"):
        build_model(cfg)


def test_frozen_bottom_up_gets_no_gradient_but_the_upsampler_does():
    cfg = tiny_cfg(os.path.join(CONFIG_DIR, "semantic_R_50_FeatUp_JBU_1x.yaml"))
    cfg.MODEL.FEATUP.FREEZE_BOTTOM_UP = True
    model = build_model(cfg).train()
    sum(model(batch(torch.Generator().manual_seed(1))).values()).backward()
    assert all(p.grad is None for p in model.backbone.bottom_up.parameters())
    assert all(not p.requires_grad for p in model.backbone.bottom_up.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.upsamplers.parameters())


def test_train_net_mapper_reads_palette_masks_as_class_indices(tmp_path):
    from featup_adapters.tasks.seg_data import TextureMosaic, write_voc_folder
    from integrations.detectron2.train_net import SemSegDatasetMapper, load_index_mask, register_sem_seg_folder
    from detectron2.data import DatasetCatalog

    ds = TextureMosaic(2, (32, 48), seed=0)
    write_voc_folder(str(tmp_path), [ds[i] for i in range(2)])     # VOC palette ("P") PNG masks
    name = register_sem_seg_folder(f"featup_test_{os.getpid()}={tmp_path}/JPEGImages:{tmp_path}/SegmentationClass")
    records = DatasetCatalog.get(name)
    assert len(records) == 2
    cfg = tiny_cfg(os.path.join(CONFIG_DIR, "semantic_R_50_bilinear_1x.yaml"))
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 32, 48        # no resize
    out = SemSegDatasetMapper(cfg, is_train=False)(records[0])
    assert out["image"].shape == (3, 32, 48)
    assert torch.equal(out["sem_seg"], ds[0][1])                     # indices, not palette luminance
    assert torch.equal(torch.from_numpy(load_index_mask(records[0]["sem_seg_file_name"])), ds[0][1])
    with pytest.raises(ValueError, match=r"expected --register-sem-seg NAME=IMAGE_DIR:MASK_DIR, got 'oops'"):
        register_sem_seg_folder("oops")


def test_saved_upsampler_loads_from_config_and_a_wrong_channel_count_is_named(tmp_path):
    from featup_adapters.upsamplers import JBUStack

    torch.manual_seed(0)
    saved = JBUStack(512, num_stages=3)                     # ResNet-18 res5: 512 channels, 32 -> 4
    with torch.no_grad():
        saved.up1.range_temp.fill_(0.7)
    saved.save_pretrained(str(tmp_path / "jbu512"))
    cfg = tiny_cfg(os.path.join(CONFIG_DIR, "semantic_R_50_FeatUp_JBU_1x.yaml"))
    cfg.MODEL.FEATUP.UPSAMPLER = str(tmp_path / "jbu512")
    cfg.MODEL.FEATUP.FREEZE_UPSAMPLER = True
    up = build_model(cfg).backbone.upsamplers["res5"]
    for k, v in saved.state_dict().items():
        assert torch.equal(up.state_dict()[k], v), k
    assert all(not p.requires_grad for p in up.parameters())

    JBUStack(64).save_pretrained(str(tmp_path / "jbu64"))
    cfg.MODEL.FEATUP.UPSAMPLER = str(tmp_path / "jbu64")
    with pytest.raises(ValueError, match=r"64.*512|512.*64"):
        build_model(cfg)
