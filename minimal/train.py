"""A compact fine-tuning loop for noisy-context QA (train split): OpAmp adapters, LoRA, or both (QLoRA on GPU).

The recipe of the OpAmp authors' code (arXiv 2502.12502): loss on the answer tokens only (prompt, gold answer,
end-of-turn token; right-padded), AdamW at lr 2e-4, cosine schedule with 3% warm-up, gradient-norm clipping at 0.5,
LoRA r=64, alpha=16, dropout 0.1 on every linear layer of the blocks (QLoRA: NF4 4-bit, double quantisation).

>>> model, tok, history = adapt("smollm2-135m", training_examples(400), TrainConfig(steps=100), K=10)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, models
from .opamp import add_opamp, opamp_parameters, save_opamp

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
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.grad_accum) < 1 or not (
                self.lr > 0 and 0 <= self.warmup < 1 and self.max_grad_norm > 0):
            raise ValueError(f"need steps, batch_size, grad_accum >= 1, lr > 0, warmup in [0, 1) and "
                             f"max_grad_norm > 0; got {self}")


def training_examples(n: int, noise_ratios=NOISE_RATIOS, seed: int = 0) -> list[dict]:
    """``n`` train-split examples, an equal share per noise ratio, shuffled (seeded)."""
    per, examples = math.ceil(n / len(noise_ratios)), []
    for i, ratio in enumerate(noise_ratios):
        examples += data.generate(per, noise_ratio=ratio, split="train", seed=10_000 * seed + i)
    random.Random(seed).shuffle(examples)
    return examples[:n]


def training_mix(n: int, seed: int = 0, nq_share: float = 0.5) -> list[dict]:
    """The recipe aimed beyond the templates: ``n`` examples, shuffled (seeded), ``nq_share`` of them Natural Questions
    with look-alike passages (``data.nq_examples``), the rest ``family="varied"`` synthetic questions at noise 0 to 0.9.
    None shares a question, passage or phrasing with a test set."""
    if not 0 <= nq_share <= 1:
        raise ValueError(f"nq_share must be in [0, 1], got {nq_share!r}")
    n_nq = round(n * nq_share)
    per = math.ceil((n - n_nq) / len(NOISE_RATIOS))
    examples = data.nq_examples("train", n_nq, seed=seed) if n_nq else []
    for i, ratio in enumerate(NOISE_RATIOS):
        examples += data.generate(per, noise_ratio=ratio, split="train", family="varied",
                                  seed=10_000 * seed + 100 + i)[: max(0, n - n_nq - i * per)]
    random.Random(seed).shuffle(examples)
    return examples[:n]


def encode_example(tokenizer, example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both (L,): prompt + answer + end-of-turn, labels on the answer part."""
    if example.get("split") == "test":
        raise ValueError(f"example {example.get('id')!r} is from the test split: train on split='train' data")
    prompt = data.build_prompt(tokenizer, example).input_ids  # ends with the assistant header
    answer = torch.tensor(tokenizer(example["answers"][0], add_special_tokens=False).input_ids
                          + [tokenizer.eos_token_id], dtype=torch.long)
    return torch.cat([prompt, answer]), torch.cat([torch.full_like(prompt, -100), answer])


def collate(encoded, pad_token_id: int):
    """Right-pad a list of ``(input_ids, labels)``: input_ids, attention_mask, labels, each (B, L)."""
    L = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), L), pad_token_id, dtype=torch.long)
    labels, mask = torch.full_like(input_ids, -100), torch.zeros_like(input_ids)
    for b, (ids, lab) in enumerate(encoded):
        input_ids[b, : len(ids)], labels[b, : len(ids)], mask[b, : len(ids)] = ids, lab, 1
    return input_ids, mask, labels


def prepare_for_training(model, lora: bool = True, r: int = 64, alpha: int = 16, seed: int = 0):
    """Freeze the base model; train LoRA (if ``lora``: on ``LORA_TARGETS``, never on the OpAmp adapters' ``w_down``,
    ``w_up``) and the OpAmp adapters (if any; PEFT freezes them: switched back on). A ``PeftModel`` if ``lora``."""
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA's A matrices are random
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.1, bias="none",
                                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(False)
    for p in opamp_parameters(model):
        p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: add OpAmp adapters (minimal.opamp.add_opamp) or pass lora=True")
    return model


def check_qlora() -> None:
    """ValueError unless 4-bit QLoRA can run here: a CUDA GPU and bitsandbytes."""
    if not torch.cuda.is_available():
        raise ValueError("4-bit QLoRA needs a CUDA GPU; on CPU train in full precision (the smoke and cpu profiles do)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("4-bit QLoRA needs bitsandbytes: pip install bitsandbytes (the notebooks' setup cell does)")


def load_model_4bit(name: str = "Qwen/Qwen2.5-0.5B-Instruct"):
    """``(model, tokenizer)`` with NF4 4-bit weights and double quantisation (QLoRA), on CUDA.
    Add OpAmp afterwards, so the adapters stay fp32. ValueError without CUDA or bitsandbytes."""
    check_qlora()
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    path, dtype = models.default_model_path() if name == models.DEFAULT_MODEL else name, models.compute_dtype("cuda")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = models.pretrained(path, quantization_config=quant, dtype=dtype,
                              device_map={"": int(os.environ.get("LOCAL_RANK", 0))})  # one GPU per process
    models.check_supported(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), models.load_tokenizer(path)


def train(model, tokenizer, examples: list[dict], config: TrainConfig | None = None, *, progress: bool = True,
          accelerator=None, desc: str = "train") -> dict:
    """Train the parameters that require grad; returns ``{"loss": [...], "lr": [...], "seconds": s}``.

    A step: ``grad_accum`` micro-batches of ``batch_size`` examples (seeded shuffle, cycled), loss = mean cross-entropy
    on answer tokens, clip the gradient norm, AdamW, cosine lr after linear warm-up; CUDA autocasts to ``compute_dtype``
    (fp16: gradient scaler). Under ``accelerate`` each process takes every world_size-th example. Ends in eval mode."""
    from transformers import get_cosine_schedule_with_warmup

    config = config or TrainConfig()
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    torch.manual_seed(config.seed)
    params, device = [p for p in model.parameters() if p.requires_grad], next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup * config.steps), config.steps)
    if accelerator is not None:
        # The scheduler stays ours: accelerate's wrapper would step it once per process at every step.
        model, optimizer = accelerator.prepare(model, optimizer)
        examples = examples[accelerator.process_index :: accelerator.num_processes]
        device, progress = accelerator.device, progress and accelerator.is_main_process
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    use_autocast = device.type == "cuda" and accelerator is None  # accelerate handles its own precision
    amp_dtype = models.compute_dtype(device)  # bf16 where the GPU has it, else fp16 (Colab's T4)
    scaler = torch.amp.GradScaler("cuda", enabled=use_autocast and amp_dtype == torch.float16)  # fp16 needs it
    history, start = {"loss": [], "lr": []}, time.time()
    model.train()
    for step in (bar := tqdm(range(config.steps), desc=desc, disable=not progress)):
        total = 0.0
        for micro in range(config.grad_accum):  # batch_size examples at a time, cycling through the shuffled order
            first = (step * config.grad_accum + micro) * config.batch_size
            idx = [order[i % len(order)] for i in range(first, first + config.batch_size)]
            encoded = collate([encode_example(tokenizer, examples[i]) for i in idx], tokenizer.pad_token_id)
            input_ids, mask, labels = (t.to(device) for t in encoded)
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
    history["seconds"] = time.time() - start
    model.eval()
    return history


def adapt(model_name: str, examples: list[dict], config: TrainConfig, *, K=None, stride: int = 1,
          adapter_dim: int = 64, lora: bool = True, lora_r: int = 64, lora_alpha: int = 16, qlora: bool = False,
          accelerator=None, progress: bool = True, desc: str = "train"):
    """A fresh model with OpAmp (if ``K`` is given; else LoRA only: the control), trained: ``(model, tokenizer,
    history)``. One seed, LoRA init and batch order with or without OpAmp. ``qlora``: 4-bit NF4 base; else fp32."""
    # Under accelerate the main process loads first: a first use may write the model cache.
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        device = accelerator.device if accelerator is not None else "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = (load_model_4bit(model_name) if qlora else  # else fp32 master weights
                            models.load_model(model_name, device=device, dtype=torch.float32))
    torch.manual_seed(config.seed)
    if K is not None:
        add_opamp(model, K=K, adapter_dim=adapter_dim, stride=stride)
    model = prepare_for_training(model, lora=lora, r=lora_r, alpha=lora_alpha, seed=config.seed)
    history = train(model, tokenizer, examples, config, progress=progress, accelerator=accelerator, desc=desc)
    return model, tokenizer, history


def add_parser(subparsers):
    """OpAmp adapters on every --stride-th layer (none with --no-opamp), LoRA on the linears (none with --no-lora),
    4-bit base with --qlora; trains on train-split questions and writes to DIR adapters/ (load_opamp), lora/ (PEFT)
    and metrics.json (arguments, loss per step, time, a sha256 of every process's weights). Data parallel, a GPU each:

      accelerate launch --num_processes 2 --mixed_precision bf16 -m minimal train-opamp \\
          --model Qwen/Qwen2.5-0.5B-Instruct --qlora --K 10 --steps 500 --out results/opamp-qwen
    """
    p = subparsers.add_parser("train-opamp", help="train OpAmp adapters (+ LoRA) on noisy-context QA",
                              description=add_parser.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or Hub id (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    for flag, default, what in [
            ("--K", 10.0, "OpAmp CMRR"), ("--lr", 2e-4, "learning rate"), ("--adapter-dim", 64, "adapter hidden size"),
            ("--stride", 1, "OpAmp on every stride-th layer"), ("--steps", 100, "optimizer steps"),
            ("--batch-size", 4, "examples per micro-batch"), ("--grad-accum", 1, "micro-batches per step"),
            ("--lora-r", 64, "LoRA rank"), ("--lora-alpha", 16, "LoRA alpha"), ("--seed", 0, "seed")]:
        p.add_argument(flag, type=type(default), default=default, help=what + " (default: %(default)s)")
    for flag, what in [("--no-opamp", "LoRA only: the fair control"), ("--no-lora", "train the OpAmp adapters only"),
                       ("--qlora", "4-bit NF4 base model (CUDA + bitsandbytes)")]:
        p.add_argument(flag, action="store_true", help=what)
    p.set_defaults(func=cli)
    return p


def cli(args) -> int:
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch / torchrun
        from accelerate import Accelerator

        # Without CUDA the processes talk over gloo on the CPU (else each would train alone).
        accelerator = Accelerator(gradient_accumulation_steps=1, cpu=not torch.cuda.is_available())
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         seed=args.seed)
    examples = training_examples(args.steps * args.batch_size * args.grad_accum, seed=args.seed)
    model, _, history = adapt(
        args.model, examples, config, K=None if args.no_opamp else args.K, stride=args.stride,
        adapter_dim=args.adapter_dim, lora=not args.no_lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        qlora=args.qlora, accelerator=accelerator)

    # Every process hashes its own trainable weights (names, dtypes, shapes, bytes); the hashes are
    # gathered, so the main process can tell whether all copies ended identical.
    digest, trained = hashlib.sha256(), [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, p in trained:
        t = p.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {t.dtype} {tuple(p.shape)}\n".encode() + t.view(torch.uint8).numpy().tobytes())
    fingerprint = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64)  # 32 bytes as 4 int64
    if accelerator is not None:
        fingerprint = accelerator.gather(fingerprint.to(accelerator.device)).cpu()
    fingerprints = [row.numpy().tobytes().hex() for row in fingerprint.reshape(-1, 4)]  # one per process
    if accelerator is not None and not accelerator.is_main_process:
        return 0
    identical = len(set(fingerprints)) == 1
    if len(fingerprints) > 1:
        print(f"trainable weights identical on all {len(fingerprints)} processes: {identical} (sha256 "
              f"{', '.join(f[:12] for f in fingerprints)}){'' if identical else '; WARNING: saving the main process'}")
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    if not args.no_opamp:
        save_opamp(model, out / "adapters")
    if not args.no_lora:
        model.save_pretrained(out / "lora")
    trainable = sum(p.numel() for _, p in trained)
    metrics = dict(args=vars(args), config=asdict(config), trainable_parameters=trainable, **history,
                   processes=len(fingerprints), weights_sha256_per_process=fingerprints,
                   weights_identical_on_all_processes=identical)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(f"{args.model}, opamp {'off' if args.no_opamp else f'K={args.K}'}, lora {not args.no_lora}: final loss "
          f"{history['loss'][-1]:.4f} after {args.steps} steps, {len(examples)} examples, {history['seconds']:.0f} s, "
          f"{trainable / 1e6:.2f}M trainable parameters; wrote {out}")
    return 0
