"""Data-parallel training: 2 CPU processes (gloo) under torchrun end with identical weights."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import os, sys
    import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
    from PIL import Image
    from featup_adapters.training import train_upsampler

    out = sys.argv[1]
    rank = int(os.environ["RANK"])

    class PatchSource(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(123)
            self.conv = nn.Conv2d(3, 8, 8, 8)
            self.feature_dim, self.stride, self.backbone_id = 8, 8, "tiny-patch"
            self.mean = self.std = (0.5, 0.5, 0.5)
        def features(self, x):
            return torch.tanh(self.conv(x))

    class GuidedUp(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(7 + rank)          # different on each rank: DDP must sync them
            self.guide = nn.Conv2d(11, 8, 3, padding=1)
        def forward(self, source, guidance, output_size=None):
            hr = F.interpolate(source, size=output_size, mode="bilinear", align_corners=False)
            return hr + self.guide(torch.cat([F.adaptive_avg_pool2d(guidance, output_size), hr], 1))

    data = os.path.join(out, "data")
    if rank == 0:
        os.makedirs(data, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(f"{data}/{i}.png")
    torch.distributed.init_process_group("gloo")     # only to wait for the data; trainer reuses it
    torch.distributed.barrier()
    hist = []
    up = train_upsampler(PatchSource(), data, steps=4, batch_size=1, image_size=(32, 48), upsampler=GuidedUp(),
                         n_jitters=1, max_pad=4, progress=False, snapshots=False, log_every=1,
                         out_dir=os.path.join(out, "run"), history=hist)
    torch.save({"state": up.state_dict(), "loss": [r["loss"] for r in hist]},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
''')


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    torch.manual_seed(7)
    init = torch.nn.Conv2d(11, 8, 3, padding=1).weight
    assert not torch.equal(init, r0["state"]["guide.weight"])           # it trained
    assert r0["loss"] == r1["loss"]                                      # logged loss is averaged
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()      # rank 0 wrote it
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["step"] == 4
