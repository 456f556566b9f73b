"""Hugging Face conventions: ``Class.from_pretrained(dir_or_repo_id)`` (eval mode),
``push_to_hub``, ``load_upsampler`` / ``wrap`` with a Hub repo id, all offline: local folders, a
pre-filled Hugging Face cache with ``HF_HUB_OFFLINE=1``, and a recording stand-in for the upload.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import featup_adapters
from featup_adapters import hub
from featup_adapters.hub import CheckpointError
from featup_adapters.upsamplers import (InterpolateUpsampler, JBUStack, JointBilateralUpsampler,
                                        UpsamplerMixin, make_upsampler)
from test_featup_checkpoint import random_featup_state

huggingface_hub = pytest.importorskip("huggingface_hub")

warnings.filterwarnings("ignore", message=".*runs the pure PyTorch reference.*")

ROOT = Path(__file__).resolve().parent.parent
REV = "0123456789abcdef0123456789abcdef01234567"


def _stack(dim=8, seed=0):
    stack = JBUStack(dim)
    stack.load_state_dict(random_featup_state(dim, seed=seed))
    return stack


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class TinyCNN(nn.Module):
    """Stride-4 features with 8 channels at ``stage``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.stage(self.stem(x)).mean((2, 3))


def fill_hf_cache(cache: Path, repo_id: str, folder: Path, rev: str = REV) -> Path:
    """Lay out ``folder``'s files as the Hugging Face cache holds a downloaded repo:
    ``models--user--repo/snapshots/<rev>/<files>`` and ``refs/main`` naming ``rev``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, with the Hub switched off (as HF_HUB_OFFLINE=1 does)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------------------
# local folders, both ways
# ------------------------------------------------------------------------------------------------

def test_upsampler_classes_are_hub_mixins():
    for cls in (JBUStack, JointBilateralUpsampler, InterpolateUpsampler):
        assert issubclass(cls, huggingface_hub.ModelHubMixin)
        assert callable(cls.from_pretrained) and callable(cls.push_to_hub)


def test_from_pretrained_reads_a_saved_folder_in_eval_mode(tmp_path):
    stack = _stack()
    stack.save_pretrained(tmp_path / "up", backbone_id="timm/resnet18", layer="layer4")
    for src in (tmp_path / "up", str(tmp_path / "up"), tmp_path / "up" / "config.json"):
        back = JBUStack.from_pretrained(src)
        assert isinstance(back, JBUStack) and not back.training
        assert _same_weights(back, stack) and back.config["backbone_id"] == "timm/resnet18"
    # the common base accepts any registered class; a specific class only its own kind
    assert isinstance(UpsamplerMixin.from_pretrained(tmp_path / "up"), JBUStack)
    with pytest.raises(CheckpointError, match="holds a JBUStack, not an instance of "
                                              "InterpolateUpsampler"):
        InterpolateUpsampler.from_pretrained(tmp_path / "up")
    with pytest.raises(TypeError, match=r"unexpected arguments \['dim'\]"):
        JBUStack.from_pretrained(tmp_path / "up", dim=16)


def test_folders_written_before_the_hub_mixin_still_load():
    # the shipped upsampler was saved by the library before from_pretrained existed
    shipped = hub.WEIGHTS_DIR / "efficientnet_lite0"
    a = JBUStack.from_pretrained(shipped)
    b = hub.load_upsampler(shipped)
    assert not a.training and _same_weights(a, b) and a.dim == 320


def test_from_pretrained_saved_folders_load_with_load_upsampler(tmp_path):
    up = JointBilateralUpsampler(key_dim=8, radius=2)
    out = up.save_pretrained(tmp_path / "u", model_card_kwargs={})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    back = hub.load_upsampler(out)
    assert type(back) is JointBilateralUpsampler and _same_weights(back, up) and not back.training
    card = (out / "README.md").read_text()
    assert "library_name: featup_adapters" in card and "JointBilateralUpsampler" in card


def test_from_pretrained_refuses_bad_arguments(tmp_path, offline_cache):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="got an empty string"):
        JBUStack.from_pretrained("")
    with pytest.raises(CheckpointError, match=r"file\.txt is not a folder with a saved upsampler"):
        JBUStack.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(CheckpointError, match=r"nope is not a folder .*\(no such folder\)"):
        JBUStack.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"nobody/nothing: config\.json is not in the Hugging "
                                              r"Face cache .* offline"):
        JBUStack.from_pretrained("nobody/nothing")


# ------------------------------------------------------------------------------------------------
# a pre-filled Hugging Face cache, offline
# ------------------------------------------------------------------------------------------------

def test_a_repo_id_loads_from_the_hugging_face_cache(tmp_path, offline_cache):
    stack = _stack(seed=3)
    stack.save_pretrained(tmp_path / "saved", backbone_id="my/tiny_cnn", layer="stage")
    snap = fill_hf_cache(offline_cache, "user/repo", tmp_path / "saved")
    a = JBUStack.from_pretrained("user/repo")
    b = hub.load_upsampler("user/repo")
    c = JBUStack.from_pretrained("user/repo", revision=REV)
    for up in (a, b, c):
        assert isinstance(up, JBUStack) and not up.training and _same_weights(up, stack)
        assert Path(up.config["path"]) == snap


def test_wrap_takes_a_repo_id(tmp_path, offline_cache):
    stack = _stack(seed=4)
    stack.save_pretrained(tmp_path / "saved", backbone_id="my/tiny_cnn", layer="stage")
    fill_hf_cache(offline_cache, "user/tiny-up", tmp_path / "saved")
    torch.manual_seed(0)
    backbone = TinyCNN().eval()
    image = torch.rand(1, 3, 32, 32)
    with featup_adapters.wrap(backbone, "user/tiny-up", layer="stage",
                              backbone_id="my/tiny_cnn") as neck:
        assert isinstance(neck.upsampler, JBUStack) and _same_weights(neck.upsampler, stack)
        with torch.no_grad():
            got = neck(image)
    feats = backbone.stage(backbone.stem(image))
    with torch.no_grad():
        want = stack.eval()(feats, image)
    assert got.shape == (1, 8, 32, 32) and torch.allclose(got, want, atol=1e-6)


def test_a_cached_repo_that_is_no_upsampler_says_so(tmp_path, offline_cache):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fill_hf_cache(offline_cache, "user/bert", tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"config\.json is not a featup_adapters upsampler "
                                              r"config"):
        hub.load_upsampler("user/bert")


def test_hf_hub_offline_from_the_environment(tmp_path):
    # the user's way: HF_HOME pointing at a filled cache and HF_HUB_OFFLINE=1, in a fresh process
    _stack(seed=5).save_pretrained(tmp_path / "saved")
    fill_hf_cache(tmp_path / "home" / "hub", "user/env-repo", tmp_path / "saved")
    script = textwrap.dedent("""
        import socket, sys
        def refuse(*a, **k):
            raise OSError("network access is blocked in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import featup_adapters
        up = featup_adapters.JBUStack.from_pretrained("user/env-repo")
        via_hub = featup_adapters.load_upsampler("user/env-repo")
        print(type(up).__name__, up.training, up.config["path"], via_hub.dim)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    name, training, path, dim = r.stdout.split()
    assert (name, training, dim) == ("JBUStack", "False", "8")
    assert Path(path).is_relative_to(tmp_path / "home" / "hub" / "models--user--env-repo")


# ------------------------------------------------------------------------------------------------
# push_to_hub, with the upload recorded instead of sent
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def recorded_uploads(tmp_path, monkeypatch):
    calls = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None,
                      revision=None, create_pr=None, **kwargs):
        copy = tmp_path / "uploaded" / str(len(calls))
        shutil.copytree(folder_path, copy)
        calls.append(("upload_folder", repo_id, repo_type, commit_message, revision, copy))
        return f"https://huggingface.co/{repo_id}/commit/{REV}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_weights_config_and_card(recorded_uploads):
    stack = _stack(seed=6)
    url = stack.push_to_hub("user/my-upsampler", backbone_id="timm/resnet18", layer="layer4",
                            commit_message="first", private=True)
    assert url.endswith(REV)
    (_, repo, private, exist_ok), up = recorded_uploads
    assert (repo, private, exist_ok) == ("user/my-upsampler", True, True)
    _, repo, repo_type, message, _, folder = up
    assert (repo, repo_type, message) == ("user/my-upsampler", "model", "first")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["backbone_id"] == "timm/resnet18" and cfg["layer"] == "layer4"
    assert "user/my-upsampler" in (folder / "README.md").read_text()
    back = hub.load_upsampler(folder)                # what was uploaded loads back
    assert _same_weights(back, stack)


def test_save_pretrained_with_push_to_hub_uploads_that_folder(tmp_path, recorded_uploads):
    stack = _stack(seed=7)
    url = stack.save_pretrained(tmp_path / "up", backbone_id="my/net", push_to_hub=True,
                                repo_id="user/from-save")
    assert "user/from-save" in url
    _, upload = recorded_uploads
    assert upload[1] == "user/from-save"
    assert json.loads((upload[-1] / "config.json").read_text())["backbone_id"] == "my/net"
    assert (tmp_path / "up" / "README.md").is_file()


def test_push_to_hub_of_a_baseline_and_the_config_argument(recorded_uploads):
    make_upsampler("bilinear").push_to_hub("user/bilinear")
    folder = recorded_uploads[-1][-1]
    assert json.loads((folder / "config.json").read_text())["class"] == "InterpolateUpsampler"
    with pytest.raises(TypeError, match="the config is built from the module"):
        _stack().save_pretrained(folder.parent / "x", config={"dim": 3})
