"""Runs on a real CUDA GPU (pytest marker `gpu`): every lab's smoke run with --device cuda, and the
training labs again with --precision fp16, the Colab T4's path (fp16 + GradScaler), which a GPU
with native bf16 (A100, H100, H200) would otherwise never take. Skipped without CUDA: these are
the only tests that may skip for want of hardware. For real-data timings on a GPU use
`python tests/gpu_runs.py` (README, "On a GPU")."""
import json

import pytest
import torch

from conftest import REPO, all_labs, run_lab

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

LABS = all_labs()
IDS = [f"{p.parent.name}/{p.name}" for p in LABS]


def takes_precision(lab) -> bool:
    return '"--precision"' in lab.read_text(encoding="utf-8")


@pytest.mark.parametrize("precision", ["auto", "fp16"])
@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_smoke_run_on_cuda(lab, precision, tmp_path):
    if precision != "auto" and not takes_precision(lab):
        pytest.skip("not a training lab: no --precision flag")
    args = ["--smoke", "--device", "cuda", "--out-dir", tmp_path / "out", "--data-dir", tmp_path / "data"]
    if takes_precision(lab):
        args += ["--precision", precision]
    result = run_lab(str(lab.relative_to(REPO)), *args)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda")
