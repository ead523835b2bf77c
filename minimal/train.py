"""A compact fine-tuning loop for noisy-context QA: OpAmp adapters, LoRA, or both (QLoRA on GPU).

The recipe follows the OpAmp authors' code (arXiv 2502.12502): loss on the answer tokens only,
AdamW at lr 2e-4, cosine schedule with 3% warm-up, gradient-norm clipping at 0.5, LoRA r=64,
alpha=16, dropout 0.1 on every other linear layer (QLoRA: NF4 4-bit with double quantisation
on a GPU). Training data come from ``data.generate(..., split="train")``, whose people never
occur in the shipped test sets.

>>> model, tok = load_model()
>>> add_opamp(model, K=10)                       # minimal.opamp
>>> model = prepare_for_training(model, lora=True)  # LoRA on q/k/v/o/gate/up/down, adapters trainable
>>> history = train(model, tok, training_examples(400), TrainConfig(steps=100))
>>> history["loss"][:3]

One training example is the chat-templated prompt (``data.build_prompt``) followed by the gold
answer as the assistant's reply and the end-of-turn token; labels are -100 everywhere but on
the answer and that final token. Batches are right-padded, so every sequence's positions start
at 0, as they do in left-padded generation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .models import compute_dtype
from .opamp import opamp_parameters

__all__ = [
    "TrainConfig",
    "training_examples",
    "training_mix",
    "encode_example",
    "collate",
    "prepare_for_training",
    "check_qlora",
    "load_model_4bit",
    "train",
    "adapt",
    "cli_train_opamp",
    "add_parser",
    "LORA_TARGETS",
]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOISE_RATIOS = (0.0, 0.5, 0.8, 0.9)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (defaults: the authors' recipe, except steps and batch)."""

    steps: int = 100  # optimizer steps
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    warmup: float = 0.03  # fraction of the steps
    max_grad_norm: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form notes saved with the metrics

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")


# ----------------------------------------------------------------------------- data


def training_examples(n: int, noise_ratios=NOISE_RATIOS, seed: int = 0) -> list[dict]:
    """``n`` train-split examples, an equal share per noise ratio, shuffled (seeded)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    noise_ratios = tuple(noise_ratios)
    if not noise_ratios:
        raise ValueError("noise_ratios must name at least one ratio in [0, 1)")
    per = math.ceil(n / len(noise_ratios))
    examples = []
    for i, ratio in enumerate(noise_ratios):
        examples += data.generate(per, noise_ratio=ratio, gold_position="random", split="train",
                                  seed=10_000 * seed + i)
    random.Random(seed).shuffle(examples)
    return examples[:n]


def training_mix(n: int, seed: int = 0, nq_share: float = 0.5) -> list[dict]:
    """The recipe that aims beyond the templates: ``n`` examples, shuffled (seeded), of which
    ``nq_share`` are real-text questions (``data.nq_examples("train")``: Natural Questions with
    look-alike passages, noise ratios 0 / 0.5 / 0.8) and the rest synthetic questions in varied
    phrasings with two-sentence documents (``family="varied"``, noise ratios 0 / 0.5 / 0.8 / 0.9).
    None of it shares a question, passage, relation or phrasing with the test sets."""
    if not 0 <= nq_share <= 1:
        raise ValueError(f"nq_share must be in [0, 1], got {nq_share!r}")
    n_nq = round(n * nq_share)
    per = math.ceil((n - n_nq) / len(NOISE_RATIOS))
    examples = data.nq_examples("train", n_nq, seed=seed) if n_nq else []
    for i, ratio in enumerate(NOISE_RATIOS):
        examples += data.generate(per, noise_ratio=ratio, gold_position="random", split="train",
                                  family="varied", seed=10_000 * seed + 100 + i)[: max(0, n - n_nq - i * per)]
    random.Random(seed).shuffle(examples)
    return examples[:n]


def encode_example(tokenizer, example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both (L,): prompt + answer + end-of-turn; labels only on the answer part."""
    if example.get("split") == "test":
        raise ValueError(f"example {example.get('id')!r} is from the test split: train on split='train' data")
    prompt = data.build_prompt(tokenizer, example).input_ids  # ends with the assistant header
    answer = tokenizer(example["answers"][0], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    answer = torch.tensor(answer, dtype=torch.long)
    input_ids = torch.cat([prompt, answer])
    labels = torch.cat([torch.full_like(prompt, -100), answer])
    return input_ids, labels


def collate(encoded, pad_token_id: int):
    """Right-pad a list of ``(input_ids, labels)``: returns input_ids, attention_mask, labels, each (B, L)."""
    L = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), L), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), L), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), L), dtype=torch.long)
    for b, (ids, lab) in enumerate(encoded):
        input_ids[b, : len(ids)], labels[b, : len(ids)], mask[b, : len(ids)] = ids, lab, 1
    return input_ids, mask, labels


# ----------------------------------------------------------------------------- model


def prepare_for_training(model, lora: bool = True, r: int = 64, alpha: int = 16, dropout: float = 0.1,
                         seed: int = 0):
    """Freeze the base model; train LoRA (if ``lora``) and the OpAmp adapters (if any).

    LoRA goes on every linear layer of the transformer blocks (``LORA_TARGETS``), never on the
    OpAmp adapters (their layers are named ``w_down``/``w_up``). PEFT freezes every non-LoRA
    parameter, the adapters included, so they are switched back on afterwards. Returns the
    model to train (a ``PeftModel`` when ``lora``).
    """
    if lora:
        from peft import LoraConfig, get_peft_model

        for name, value in (("r", r), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoRA {name} must be an integer >= 1, got {value!r}")
        torch.manual_seed(seed)  # LoRA's A matrices are random
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                            bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    for p in opamp_parameters(model):
        p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: add OpAmp adapters (minimal.opamp.add_opamp) or pass lora=True")
    return model


def check_qlora() -> None:
    """ValueError unless 4-bit QLoRA can run here: a CUDA GPU and bitsandbytes."""
    if not torch.cuda.is_available():
        raise ValueError("4-bit QLoRA needs a CUDA GPU (bitsandbytes NF4); on CPU train in full precision "
                         "(without --qlora; the smoke and cpu profiles do)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("4-bit QLoRA needs bitsandbytes: pip install bitsandbytes (the notebooks' setup cell "
                         "installs it on a GPU runtime)")


def load_model_4bit(name: str = "Qwen/Qwen2.5-0.5B-Instruct"):
    """``(model, tokenizer)`` with NF4 4-bit weights and double quantisation (QLoRA), on CUDA.

    Add OpAmp afterwards: the adapters are created after quantisation, so they stay fp32.
    Raises ValueError without CUDA or without bitsandbytes.
    """
    check_qlora()
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from . import models

    if name in models.TINY_CONFIGS:
        raise ValueError(f"{name!r} is a random test model; 4-bit loading takes a Hub id or {models.DEFAULT_MODEL!r}")
    path = name
    if name == models.DEFAULT_MODEL:
        path = str(models._offline_folder()) if models.gguf_available() else models.DEFAULT_HUB_ID
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=models.compute_dtype("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # one GPU per process under accelerate launch
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=models.compute_dtype("cuda"),
                                                 device_map={"": local_rank})
    tokenizer = AutoTokenizer.from_pretrained(path)
    models.check_supported(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


# ----------------------------------------------------------------------------- the loop


def train(model, tokenizer, examples: list[dict], config: TrainConfig | None = None, *, progress: bool = True,
          accelerator=None, desc: str = "train") -> dict:
    """Train the parameters that require grad; returns ``{"loss": [...], "lr": [...], "seconds": s}``.

    One step: ``grad_accum`` micro-batches of ``batch_size`` examples (cycling through
    ``examples`` in a seeded shuffled order), loss = mean cross-entropy over answer tokens,
    then clip the gradient norm, AdamW, cosine learning rate after a linear warm-up. Autocast
    on CUDA to ``models.compute_dtype`` (bf16, or fp16 with a gradient scaler on older GPUs).
    ``accelerator``: an ``accelerate.Accelerator`` for several GPUs (each
    process takes every world_size-th example). The model is left in eval mode.
    """
    from transformers import get_cosine_schedule_with_warmup

    config = config or TrainConfig()
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: call prepare_for_training(model) first")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup * config.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    if accelerator is not None:
        if len(examples) < accelerator.num_processes:  # the same test on every process: all raise or none
            raise ValueError(f"{len(examples)} examples for {accelerator.num_processes} processes: "
                             "each process needs at least one")
        # The scheduler stays ours: accelerate's wrapper would step it once per process at every
        # optimizer step, but config.steps already counts the steps each process takes.
        model, optimizer = accelerator.prepare(model, optimizer)
        examples = examples[accelerator.process_index :: accelerator.num_processes]
        device = accelerator.device
        progress = progress and accelerator.is_main_process

    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    cursor = 0

    def next_batch():
        nonlocal cursor
        idx = [order[(cursor + i) % len(order)] for i in range(config.batch_size)]
        cursor += config.batch_size
        batch = collate([encode_example(tokenizer, examples[i]) for i in idx], tokenizer.pad_token_id)
        return [t.to(device) for t in batch]

    use_autocast = device.type == "cuda" and accelerator is None  # accelerate handles its own precision
    amp_dtype = compute_dtype(device)  # bf16 where the GPU has it, else fp16 (Colab's T4)
    scaler = torch.amp.GradScaler("cuda", enabled=use_autocast and amp_dtype == torch.float16)  # fp16 needs it
    history = {"loss": [], "lr": []}
    start = time.time()
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for _ in bar:
        total = 0.0
        for _ in range(config.grad_accum):
            input_ids, mask, labels = next_batch()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_autocast):
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss / config.grad_accum
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                scaler.scale(loss).backward()
            total += loss.item()
        if accelerator is not None:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        else:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        history["lr"].append(scheduler.get_last_lr()[0])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history["loss"].append(total)
        bar.set_postfix(loss=f"{total:.3f}")
    model.eval()
    history["seconds"] = time.time() - start
    return history


def adapt(model_name: str, examples: list[dict], config: TrainConfig, *, K=None, stride: int = 1,
          lora: bool = True, lora_r: int = 64, lora_alpha: int = 16, qlora: bool = False, progress: bool = True,
          desc: str = "train"):
    """Load a fresh model, add OpAmp (if ``K`` is given, else LoRA only: the control), train.

    Returns ``(model, tokenizer, history)``. The same ``config.seed`` gives the same LoRA
    initialisation and the same batches with or without OpAmp, so runs differ only in OpAmp.
    ``qlora``: 4-bit NF4 base (CUDA + bitsandbytes); else fp32, on CUDA when available.
    """
    from .models import load_model
    from .opamp import add_opamp

    if qlora:
        model, tokenizer = load_model_4bit(model_name)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(model_name, device=device, dtype=torch.float32)  # fp32 master weights
    torch.manual_seed(config.seed)
    if K is not None:
        add_opamp(model, K=K, stride=stride)
    model = prepare_for_training(model, lora=lora, r=lora_r, alpha=lora_alpha, seed=config.seed)
    history = train(model, tokenizer, examples, config, progress=progress, desc=desc)
    return model, tokenizer, history


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers):
    """Register ``train-opamp`` on ``python -m minimal``'s subparsers."""
    p = subparsers.add_parser("train-opamp", help="train OpAmp adapters (+ LoRA) on noisy-context QA",
                              description=cli_train_opamp.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=_run)
    return p


def _arguments(p):
    p.add_argument("--model", default="smollm2-135m", help="model name or Hub id (default: %(default)s)")
    p.add_argument("--K", type=float, default=10.0, help="OpAmp CMRR (default: %(default)s)")
    p.add_argument("--no-opamp", action="store_true", help="LoRA only: the fair control")
    p.add_argument("--adapter-dim", type=int, default=64, help="adapter hidden size (default: %(default)s)")
    p.add_argument("--stride", type=int, default=1, help="OpAmp on every stride-th layer (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default: steps x batch x accum)")
    p.add_argument("--noise-ratios", type=float, nargs="+", default=list(NOISE_RATIOS),
                   help="noise ratios mixed in the training data (default: %(default)s)")
    p.add_argument("--no-lora", action="store_true", help="train the OpAmp adapters only")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default: %(default)s)")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base model (CUDA + bitsandbytes)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--eval-per-cell", type=int, default=0,
                   help="after training, evaluate on test_1hop with this many examples per cell (default: skip)")
    p.add_argument("--out", required=True, help="output folder")


def cli_train_opamp(argv=None) -> int:
    """``python -m minimal train-opamp --model NAME --K 10 --steps N --out DIR``

    Adds OpAmp adapters to every --stride-th layer (none with --no-opamp), LoRA on the other
    linears (none with --no-lora), QLoRA with --qlora (CUDA + bitsandbytes), trains on
    train-split noisy-context QA, and writes to DIR:

      adapters/opamp_config.json, adapters/adapters.safetensors   the OpAmp adapters (load_opamp)
      lora/                                                       the LoRA weights (PEFT format)
      metrics.json                                                arguments, loss per step, time,
                                                                  and accuracy if --eval-per-cell

    Several GPUs: the same command under Hugging Face accelerate, one process per GPU (data
    parallel; each process trains on its share of the examples, gradients are averaged):

      accelerate launch --num_processes 2 --mixed_precision bf16 -m minimal train-opamp \\
          --model Qwen/Qwen2.5-0.5B-Instruct --qlora --K 10 --steps 500 --out results/opamp-qwen
    """
    parser = argparse.ArgumentParser(prog="python -m minimal train-opamp", description=cli_train_opamp.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return _run(parser.parse_args(argv))


def _run(args) -> int:
    import contextlib
    import hashlib

    from . import evaluate
    from .models import load_model
    from .opamp import add_opamp, save_opamp

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch / torchrun
        from accelerate import Accelerator

        # Without CUDA, the processes talk over gloo on the CPU (accelerate would otherwise
        # leave each one training alone).
        accelerator = Accelerator(gradient_accumulation_steps=1, cpu=not torch.cuda.is_available())
    main = accelerator is None or accelerator.is_main_process
    # The main process loads first: a first use may write the model cache, which must not be raced.
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if args.qlora:
            model, tokenizer = load_model_4bit(args.model)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if accelerator is not None:
                device = accelerator.device
            model, tokenizer = load_model(args.model, device=device, dtype=torch.float32)  # fp32 master weights
    torch.manual_seed(args.seed)
    if not args.no_opamp:
        add_opamp(model, K=args.K, adapter_dim=args.adapter_dim, stride=args.stride)
    model = prepare_for_training(model, lora=not args.no_lora, r=args.lora_r, alpha=args.lora_alpha,
                                 dropout=args.lora_dropout, seed=args.seed)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         seed=args.seed)
    n = args.n_train or args.steps * args.batch_size * args.grad_accum
    examples = training_examples(n, args.noise_ratios, seed=args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main:
        print(f"model={args.model}  opamp={'off' if args.no_opamp else f'K={args.K}'}  lora={not args.no_lora}  "
              f"qlora={args.qlora}  trainable={trainable / 1e6:.2f}M  examples={len(examples)}  steps={args.steps}")
    history = train(model, tokenizer, examples, config, accelerator=accelerator)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)

    # Every process hashes its own trainable weights (names, dtypes, shapes and bytes); the
    # hashes are gathered, so the main process can tell whether all copies ended identical.
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name} {t.dtype} {tuple(p.shape)}\n".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    fingerprint = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64)  # 32 bytes as 4 int64
    if accelerator is not None:
        fingerprint = accelerator.gather(fingerprint.to(accelerator.device)).cpu()
    fingerprints = [row.numpy().tobytes().hex() for row in fingerprint.reshape(-1, 4)]  # one per process
    if not main:
        return 0
    identical = len(set(fingerprints)) == 1
    if len(fingerprints) > 1:
        print(f"trainable weights identical on all {len(fingerprints)} processes: {identical} "
              f"(sha256 {', '.join(f[:12] for f in fingerprints)})")
        if not identical:
            print("WARNING: the processes' weights differ; the saved ones are the main process's")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_opamp:
        save_opamp(model, out / "adapters")
    if not args.no_lora:
        model.save_pretrained(out / "lora")
    metrics = dict(args=vars(args), config=asdict(config), trainable_parameters=trainable, **history,
                   processes=len(fingerprints), weights_sha256_per_process=fingerprints,
                   weights_identical_on_all_processes=identical)
    if args.eval_per_cell:
        tests = evaluate.select_per_cell(data.load_test_set("test_1hop"), args.eval_per_cell)
        records = evaluate.evaluate(model, tokenizer, tests, attention=False)
        metrics["accuracy_by_noise_ratio"] = evaluate.accuracy_grid(records, by=("noise_ratio",))
        for row in metrics["accuracy_by_noise_ratio"]:
            print(f"noise ratio {row['noise_ratio']}: {100 * row['accuracy']:.1f}% "
                  f"[{100 * row['low']:.0f}-{100 * row['high']:.0f}] (n={row['n']})")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(f"final loss {history['loss'][-1]:.4f} after {args.steps} steps in {history['seconds']:.0f} s; wrote {out}")
    return 0
