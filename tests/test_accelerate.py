"""``train-opamp`` under ``accelerate launch`` with two processes on the CPU (gloo, data parallel).

Checks that (a) both processes end with identical trainable weights, each process's own
sha256 of them, gathered, not a flag, and (b) what the main process saved reloads
(``load_opamp`` + ``PeftModel.from_pretrained`` onto a fresh tiny-llama, same seed) into
exactly those weights and gives the same logits as the trained model.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process unless accelerate is
configured for mpirun; ``--multi_gpu`` goes through torch.distributed.run, which starts two,
and with no CUDA visible ``train-opamp`` puts them on the CPU with gloo.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minimal import load_model
from minimal.opamp import add_opamp, load_opamp, opamp_layers
from minimal.train import collate, encode_example, prepare_for_training, training_examples

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(K=10.0, adapter_dim=8, stride=1, lora_r=4, lora_alpha=16, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(named_parameters) -> str:
    """The same recipe as train-opamp's per-process fingerprint, written out independently."""
    h = hashlib.sha256()
    for name, p in named_parameters:
        t = p.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(p.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _launch(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMAL_PROFILE="smoke", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "minimal", "train-opamp", "--model", "tiny-llama", "--steps", "2", "--batch-size", "1",
           "--K", str(ARGS["K"]), "--adapter-dim", str(ARGS["adapter_dim"]), "--stride", str(ARGS["stride"]),
           "--lora-r", str(ARGS["lora_r"]), "--lora-alpha", str(ARGS["lora_alpha"]), "--seed", str(ARGS["seed"]),
           "--out", str(out)]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"accelerate launch timed out after 300 s\n--- stdout\n{err.stdout}\n"
                             f"--- stderr\n{err.stderr}") from None
    assert run.returncode == 0, f"rc={run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    return run


def test_two_processes_end_identical_and_the_saved_weights_reload(tmp_path):
    run = _launch(tmp_path)
    log = f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    # (a) two processes, each hashed its own weights; the gathered hashes agree element by element
    assert metrics["processes"] == 2, log
    per_process = metrics["weights_sha256_per_process"]
    assert len(per_process) == 2 and all(len(h) == 64 for h in per_process), per_process
    assert per_process[0] == per_process[1], per_process
    assert metrics["weights_identical_on_all_processes"] is True
    assert "trainable weights identical on all 2 processes: True" in run.stdout, log
    assert metrics["lr"][1] > 0  # the second step learned (the first is the warm-up's lr = 0)

    # the reference: the model the training processes built, holding the saved tensors verbatim
    reference, tok = load_model("tiny-llama", seed=ARGS["seed"])
    torch.manual_seed(ARGS["seed"])
    add_opamp(reference, K=ARGS["K"], adapter_dim=ARGS["adapter_dim"], stride=ARGS["stride"])
    reference = prepare_for_training(reference, lora=True, r=ARGS["lora_r"], alpha=ARGS["lora_alpha"],
                                     seed=ARGS["seed"])
    untrained = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    saved = {f"layers.{i}.{k}": t for i, cal in opamp_layers(reference).items() for k, t in cal.state_dict().items()}
    adapters = load_file(str(tmp_path / "adapters" / "adapters.safetensors"))
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert set(adapters) == set(saved)
    with torch.no_grad():
        for k, t in saved.items():
            t.copy_(adapters[k])
        lora_params = {n: p for n, p in reference.named_parameters() if "lora_" in n}
        assert {n.replace(".default", "") for n in lora_params} == set(lora)
        for n, p in lora_params.items():
            p.copy_(lora[n.replace(".default", "")])
    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    assert {n for n, _ in trained} == set(untrained)
    assert _sha256(trained) == per_process[0] == per_process[1]  # the saved weights are every process's
    assert any(not torch.equal(p, untrained[n]) for n, p in trained)  # and training moved them

    # (b) the official loaders rebuild the same trainable weights and the same logits
    from peft import PeftModel

    assert json.loads((tmp_path / "adapters" / "opamp_config.json").read_text())["model"] == "tiny-llama"
    fresh, _ = load_model("tiny-llama", seed=ARGS["seed"])
    load_opamp(fresh, tmp_path / "adapters")  # checks the recorded model name
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    reloaded = [(n, p) for n, p in loaded.named_parameters() if "lora_" in n or ".calibration." in n]
    assert _sha256(reloaded) == per_process[0]

    input_ids, mask, _ = collate([encode_example(tok, e) for e in training_examples(2, seed=1)], tok.pad_token_id)
    with torch.no_grad():
        got = loaded(input_ids=input_ids, attention_mask=mask).logits
        want = reference.eval()(input_ids=input_ids, attention_mask=mask).logits
        base = load_model("tiny-llama", seed=ARGS["seed"])[0](input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - base).abs().max() > 1e-6  # the trained adapters change the logits
