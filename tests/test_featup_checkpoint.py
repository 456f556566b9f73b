"""FeatUp checkpoints load into JBUStack and give FeatUp's numbers; bad or unsafe files are refused.

The oracle below is a separate, plain implementation of spec sections 2-3 (unfold everything, as
FeatUp does), written from the spec and not from the library code.  It takes a FeatUp-style
state dict, so the same random weights drive both.
"""
from __future__ import annotations

import os
import sys
import types
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featup_adapters.hub import CheckpointError, load_featup_checkpoint
from featup_adapters.upsamplers import JBUStack

# ------------------------------------------------------------------------------------------------
# oracle: spec sections 2-3 with nn.Unfold, from a FeatUp state dict (keys without "upsampler.")
# ------------------------------------------------------------------------------------------------


def _conv1x1(x, p, name):
    w, b = p[name + ".weight"], p[name + ".bias"]
    return torch.einsum("oi,bihw->bohw", w[:, :, 0, 0], x) + b[None, :, None, None]


def oracle_stage(p, pre, source, guidance, r=3):
    B, _, H, W = guidance.shape
    C = source.shape[1]
    k = 2 * r + 1
    q = _conv1x1(F.gelu(_conv1x1(guidance, p, pre + "range_proj.0")), p, pre + "range_proj.3")
    K = q.shape[1]
    neighbours = F.unfold(F.pad(q, [r] * 4, mode="reflect"), k).view(B, K, k * k, H, W)
    temp = p[pre + "range_temp"].exp().clamp(1e-4, 1e4)
    rng = torch.softmax(temp * (neighbours * q[:, :, None]).sum(1), dim=1)   # [B, k*k, H, W]
    d = torch.linspace(-1, 1, k, dtype=guidance.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    spatial = torch.exp(-(dx ** 2 + dy ** 2) / (2 * p[pre + "sigma_spatial"] ** 2))
    kern = rng * spatial.reshape(1, k * k, 1, 1)
    kern = kern / kern.sum(1, keepdim=True).clamp(min=1e-7)
    fix_in = torch.cat([kern, guidance], dim=1)
    kern = kern + 0.1 * _conv1x1(F.gelu(_conv1x1(fix_in, p, pre + "fixup_proj.0")), p,
                                 pre + "fixup_proj.3")
    hr = F.interpolate(source, (H, W), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(hr, [r] * 4, mode="reflect"), k).view(B, C, k * k, H, W)
    return (patches * kern[:, None]).sum(2)


def oracle_stack(p, source, image, stages=4):
    x = source
    for i in range(1, stages + 1):
        h, w = x.shape[-2:]
        x = oracle_stage(p, f"up{i}.", x, F.adaptive_avg_pool2d(image, (2 * h, 2 * w)))
    return x + 0.1 * _conv1x1(x, p, "fixup_proj.1")


def random_featup_state(dim, seed=0, stages=4, key_dim=32, r=3):
    """FeatUp-shaped upsampler weights with random, non-init values."""
    g = torch.Generator().manual_seed(seed)
    k2 = (2 * r + 1) ** 2

    def rnd(*shape, scale=0.5):
        return torch.randn(*shape, generator=g) * scale

    p = {}
    for i in range(1, stages + 1):
        pre = f"up{i}."
        p[pre + "range_temp"] = torch.rand((), generator=g) * 1.5 - 0.5
        p[pre + "sigma_spatial"] = torch.rand((), generator=g) + 0.5
        for name, o, c in (("range_proj.0", key_dim, 3), ("range_proj.3", key_dim, key_dim),
                           ("fixup_proj.0", k2, k2 + 3), ("fixup_proj.3", k2, k2)):
            p[f"{pre}{name}.weight"] = rnd(o, c, 1, 1, scale=1.0 / c ** 0.5)
            p[f"{pre}{name}.bias"] = rnd(o, scale=0.2)
    p["fixup_proj.1.weight"] = rnd(dim, dim, 1, 1, scale=1.0 / dim ** 0.5)
    p["fixup_proj.1.bias"] = rnd(dim, scale=0.2)
    return p


# ------------------------------------------------------------------------------------------------
# Lightning-like checkpoint files
# ------------------------------------------------------------------------------------------------

def _fake_module(monkeypatch, name):
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules or getattr(sys.modules[sub], "_featup_fake", False):
            mod = types.ModuleType(sub)
            mod._featup_fake = True
            monkeypatch.setitem(sys.modules, sub, mod)
    return sys.modules[name]


def _lightning_metadata(monkeypatch):
    """Objects of the kinds a real Lightning file carries, pickled under Lightning/omegaconf names
    (fake modules, so neither package is needed)."""
    data = _fake_module(monkeypatch, "lightning_fabric.utilities.data")
    dictconfig = _fake_module(monkeypatch, "omegaconf.dictconfig")

    class AttributeDict(dict):
        pass

    class DictConfig:
        def __init__(self, content):
            self._content = content

        def __getstate__(self):
            return {"_content": self._content, "_metadata": {"flags": {}}}

        def __setstate__(self, state):
            self.__dict__.update(state)

    for cls, mod in ((AttributeDict, data), (DictConfig, dictconfig)):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    hparams = AttributeDict(model_type="dino16", n_jitters=5, lr=1e-3,
                            cfg=DictConfig({"batch_size": 4, "max_pad": 20}))
    return {
        "epoch": 7, "global_step": 2000, "pytorch-lightning_version": "1.9.5",
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 8}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {
            "best_model_score": torch.tensor(0.25), "best_model_path": "/ckpt/epoch=7.ckpt",
            "kth_value": np.float64(0.5), "dirpath": "/ckpt"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(2000.0),
                                            "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-3, "params": [0]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hparams,
        "counts": defaultdict(int, {"a": 1}),
    }


def write_featup_checkpoint(path, ups_state, monkeypatch, *, use_norm=True, dim=None):
    """A FeatUp-format Lightning checkpoint: upsampler.*, model.* (with model.1.norm.* for the
    norm variant), downsampler.*, scale_net.* and Lightning metadata."""
    dim = dim or ups_state["fixup_proj.1.weight"].shape[0]
    state = {f"upsampler.{k}": v.clone() for k, v in ups_state.items()}
    state["model.0.model.patch_embed.proj.weight"] = torch.randn(dim, 3, 16, 16)
    state["model.0.model.norm.weight"] = torch.ones(dim)
    if use_norm:
        state["model.1.norm.weight"] = torch.ones(dim)
        state["model.1.norm.bias"] = torch.zeros(dim)
    state["downsampler.kernel_params"] = torch.randn(16, 16)
    state["scale_net.weight"] = torch.randn(1, dim, 1, 1)
    ckpt = {"state_dict": state, **_lightning_metadata(monkeypatch)}
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def featup_ckpt(tmp_path, monkeypatch):
    p = random_featup_state(24, seed=1)
    path = write_featup_checkpoint(tmp_path / "dino16_jbu_stack_cocostuff.ckpt", p, monkeypatch)
    return path, p


def test_loaded_checkpoint_matches_independent_unfold_implementation(featup_ckpt):
    path, p = featup_ckpt
    stack = load_featup_checkpoint(path).eval()
    assert isinstance(stack, JBUStack)
    assert (stack.dim, stack.num_stages) == (24, 4)
    g = torch.Generator().manual_seed(3)
    source = torch.randn(2, 24, 6, 9, generator=g)                 # non-square
    image = torch.randn(2, 3, 96, 144, generator=g)                # 16x the features
    with torch.no_grad():
        ours = stack(source, image)
        want = oracle_stack(p, source, image)
    assert ours.shape == (2, 24, 96, 144)
    assert (ours - want).abs().max().item() <= 1e-5


def test_checkpoint_reports_layernorm_variant(featup_ckpt, tmp_path, monkeypatch):
    path, p = featup_ckpt
    stack = load_featup_checkpoint(path)
    assert stack.config["use_norm"] is True
    assert stack.config["norm"]["type"] == "LayerNorm"
    assert {"model", "downsampler", "scale_net"} <= set(stack.config["dropped_prefixes"])
    no_norm = write_featup_checkpoint(tmp_path / "no_norm.ckpt", p, monkeypatch, use_norm=False)
    assert load_featup_checkpoint(no_norm).config["use_norm"] is False


def test_checkpoint_loads_from_file_url_through_hub_cache(featup_ckpt, tmp_path):
    path, p = featup_ckpt
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        url = path.resolve().as_uri()
        stack = load_featup_checkpoint(url, progress=False)
        cached = list((tmp_path / "hub" / "checkpoints").iterdir())
        assert len(cached) == 1 and cached[0].name.endswith(path.name)
        assert stack.config["source"] == url
        again = load_featup_checkpoint(url, progress=False)       # served from the cache
        assert torch.equal(again.up2.range_proj[0].weight, stack.up2.range_proj[0].weight)
    finally:
        torch.hub.set_dir(old)


def test_strict_loading_names_every_offending_key(tmp_path, monkeypatch):
    p = random_featup_state(16, seed=2)
    del p["up3.sigma_spatial"]
    p["up2.range_proj.0.weight"] = torch.randn(32, 4, 1, 1)
    p["up2.surprise"] = torch.zeros(5)
    path = write_featup_checkpoint(tmp_path / "bad.ckpt", p, monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_featup_checkpoint(path)
    msg = str(err.value)
    assert "missing key upsampler.up3.sigma_spatial (expected shape [])" in msg
    assert "unexpected key upsampler.up2.surprise (shape [5])" in msg
    assert ("shape mismatch for upsampler.up2.range_proj.0.weight: expected [32, 3, 1, 1], "
            "got [32, 4, 1, 1]") in msg


def test_strict_loading_checks_expected_channel_count(featup_ckpt):
    path, _ = featup_ckpt
    with pytest.raises(CheckpointError, match=r"fixup_proj\.1\.weight: expected \[32, 32, 1, 1\], "
                                              r"got \[24, 24, 1, 1\]"):
        load_featup_checkpoint(path, dim=32)


def test_not_a_checkpoint_gives_clear_error(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_featup_checkpoint(text)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, other)
    with pytest.raises(CheckpointError, match=r"not a FeatUp JBU checkpoint: no 'upsampler\.\*'"):
        load_featup_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_featup_checkpoint(tmp_path / "missing.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_featup_checkpoint(tmp_path / "tensor.pt")


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsShell, _RunsEval])
def test_checkpoint_that_embeds_code_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    state = {f"upsampler.{k}": v for k, v in random_featup_state(8).items()}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*(system|eval)"):
        load_featup_checkpoint(path)
    assert not marker.exists()


def test_bare_state_dict_and_legacy_format_load(tmp_path):
    p = random_featup_state(8, seed=4)
    path = tmp_path / "legacy.pt"
    torch.save({f"upsampler.{k}": v for k, v in p.items()}, path,
               _use_new_zipfile_serialization=False)
    stack = load_featup_checkpoint(path)
    assert torch.equal(stack.fixup_proj[1].weight, p["fixup_proj.1.weight"])
