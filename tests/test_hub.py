"""save_pretrained / load_upsampler round trips, the pretrained registry, compatibility checks."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import featup_adapters
from featup_adapters import hub
from featup_adapters.hub import CheckpointError, IncompatibleUpsamplerError
from featup_adapters.upsamplers import (InterpolateUpsampler, JBUStack, JointBilateralUpsampler,
                                        make_upsampler)
from test_featup_checkpoint import random_featup_state, write_featup_checkpoint

warnings.filterwarnings("ignore", message=".*runs the pure PyTorch reference.*")


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(hub._REGISTRY)
    yield
    hub._REGISTRY.clear()
    hub._REGISTRY.update(saved)


def _trained_stack(dim=8, seed=0):
    stack = JBUStack(dim)
    stack.load_state_dict(random_featup_state(dim, seed=seed))
    return stack.eval()


def test_save_and_load_round_trip(tmp_path):
    stack = _trained_stack()
    out = stack.save_pretrained(tmp_path / "up", backbone_id="timm/resnet18.a1_in1k",
                                layer="layer4", use_norm=True, extra={"steps": 100})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class"] == "JBUStack" and cfg["init"]["dim"] == 8 and cfg["num_stages"] == 4
    assert cfg["library_version"] == featup_adapters.__version__
    loaded = hub.load_upsampler(out)
    assert isinstance(loaded, JBUStack) and loaded.dim == 8
    for key in ("backbone_id", "layer", "use_norm", "extra", "class", "dim"):
        assert loaded.config[key] == cfg[key]
    src, img = torch.randn(1, 8, 3, 4), torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(src, img), stack(src, img))


@pytest.mark.parametrize("make", [lambda: make_upsampler("bicubic"),
                                  lambda: JointBilateralUpsampler(key_dim=8, radius=2)])
def test_every_upsampler_round_trips(tmp_path, make):
    up = make()
    up.save_pretrained(tmp_path / "u")
    back = hub.load_upsampler(str(tmp_path / "u"))
    assert type(back) is type(up) and back.init_kwargs() == up.init_kwargs()
    for (k, a), (_, b) in zip(up.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_overwrite_is_atomic_and_tampering_is_detected(tmp_path):
    d = tmp_path / "up"
    _trained_stack(seed=1).save_pretrained(d)
    _trained_stack(seed=2).save_pretrained(d)          # overwrite in place
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(hub.load_upsampler(d).up1.range_temp, _trained_stack(seed=2).up1.range_temp)
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        hub.load_upsampler(d)


def test_loading_rejects_unknown_things(tmp_path, monkeypatch):
    try:                                      # a repo-id-like name is also looked up on the Hub:
        import huggingface_hub.constants      # offline here, so only the (empty) cache is read
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    except ImportError:
        pass
    with pytest.raises(CheckpointError, match=r"unknown upsampler 'nope/nothing': not a registered "
                                              r"name \(registered: .*featup/dino16.*not a URL, "
                                              r"not a Hugging Face Hub model"):
        hub.load_upsampler("nope/nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        hub.load_upsampler(tmp_path / "empty")
    with pytest.raises(TypeError, match="JBUStack"):
        hub.save_upsampler(torch.nn.Linear(2, 2), tmp_path / "x")


def test_baseline_names_load():
    up = hub.load_upsampler("bilinear")
    assert isinstance(up, InterpolateUpsampler) and up.kind == "bilinear"


def test_featup_release_table():
    assert len(hub.PRETRAINED) == 12
    e = hub.PRETRAINED["featup/dinov2"]
    assert e.source == ("https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/"
                        "pretrained/dinov2_jbu_stack_cocostuff.ckpt")
    assert e.use_norm and e.dim == 384
    e = hub.PRETRAINED["featup/resnet50-no-norm"]
    assert e.source.endswith("/pretrained/no_norm/resnet50_jbu_stack_cocostuff.ckpt")
    assert not e.use_norm and e.dim == 2048
    assert {e.dim for n, e in hub.PRETRAINED.items() if "clip" in n} == {512}
    names = {e.file_name for e in hub.PRETRAINED.values()}
    assert len(names) == 12                     # norm / no_norm never share a cache file


@pytest.mark.parametrize("backbone,name", [
    ("timm/vit_small_patch16_224.dino", "featup/dino16"),
    ("hf-hub:timm/vit_small_patch16_224.dino", "featup/dino16"),
    ("timm/vit_small_patch14_dinov2.lvd142m", "featup/dinov2"),
    ("facebook/dinov2-small", "featup/dinov2"),
    ("open_clip/ViT-B-16", "featup/clip"),
    ("timm/resnet50", "featup/resnet50"),
    ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "featup/vit"),
    ("timm/convnext_tiny", None)])
def test_pretrained_for_backbone(backbone, name):
    assert hub.pretrained_for(backbone) == name


def test_registered_upsampler_loads_by_name_and_wins_over_featup(tmp_path):
    _trained_stack(dim=384).save_pretrained(tmp_path / "mine",
                                            backbone_id="timm/vit_small_patch16_224.dino")
    hub.register_upsampler("mine/dino", tmp_path / "mine")
    assert hub.pretrained_for("timm/vit_small_patch16_224.dino") == "mine/dino"
    up = hub.load_upsampler("mine/dino")
    assert up.config["name"] == "mine/dino" and up.dim == 384
    listed = {e["name"]: e for e in hub.list_upsamplers()}
    assert listed["mine/dino"]["backbone_ids"] == ["timm/vit_small_patch16_224.dino"]
    assert listed["mine/dino"]["dim"] == 384
    with pytest.warns(UserWarning, match="overwriting"):
        hub.register_upsampler("mine/dino", tmp_path / "mine")


def test_registered_url_downloads_through_hub_cache(tmp_path, monkeypatch):
    p = random_featup_state(16, seed=3)
    ckpt = write_featup_checkpoint(tmp_path / "x_jbu_stack_cocostuff.ckpt", p, monkeypatch,
                                   use_norm=False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        hub.register_upsampler("test/url", ckpt.resolve().as_uri(), backbone_id="my/backbone")
        up = hub.load_upsampler("test/url", progress=False)
    finally:
        torch.hub.set_dir(old)
    assert isinstance(up, JBUStack) and up.dim == 16 and up.config["use_norm"] is False
    assert up.config["backbone_id"] == "my/backbone"
    assert any((tmp_path / "hub" / "checkpoints").iterdir())
    hub.check_compatible(up, dim=16, backbone_id="my/backbone")


def test_check_compatible_names_both_sides(tmp_path):
    up = _trained_stack(dim=8)
    up.save_pretrained(tmp_path / "u", backbone_id="timm/resnet18")
    up = hub.load_upsampler(tmp_path / "u")
    hub.check_compatible(up, dim=8, backbone_id="TIMM/resnet18")
    with pytest.raises(IncompatibleUpsamplerError, match=r"expects 8-channel features, but "
                                                         r"backbone timm/resnet18 gives 16"):
        hub.check_compatible(up, dim=16, backbone_id="timm/resnet18")
    with pytest.raises(IncompatibleUpsamplerError, match=r"trained for backbone timm/resnet18, "
                                                         r"but the wrapped backbone is timm/resnet50"):
        hub.check_compatible(up, dim=8, backbone_id="timm/resnet50")
    hub.check_compatible(make_upsampler("bilinear"), dim=3, backbone_id="anything")


def test_shipped_weights_register_themselves(tmp_path):
    _trained_stack(dim=8).save_pretrained(tmp_path / "default_model", backbone_id="my/default")
    hub._register_shipped_weights(tmp_path)
    assert hub.pretrained_for("my/default") == "default_model"
    assert {e["name"]: e["kind"] for e in hub.list_upsamplers()}["default_model"] == "local"


def test_saving_keeps_metadata_of_a_loaded_featup_checkpoint(tmp_path, monkeypatch):
    p = random_featup_state(8, seed=6)
    ckpt = write_featup_checkpoint(tmp_path / "c.ckpt", p, monkeypatch, use_norm=True)
    stack = hub.load_upsampler(str(ckpt))
    stack.save_pretrained(tmp_path / "copy", backbone_id="timm/vit_small_patch16_224.dino")
    back = hub.load_upsampler(tmp_path / "copy")
    assert back.config["use_norm"] is True
    assert back.config["backbone_id"] == "timm/vit_small_patch16_224.dino"
