"""What OpAmp adapters cost a whole model: prefill and per-token decoding, as ratios to the base.

    python kernels/bench_opamp_model.py                      # SmolLM2-135M, 512-token prefill, CPU
    python kernels/bench_opamp_model.py --tokens 256 --stride 3 --repeats 5

One process, one model, side by side: the base model (the hook installed, nothing attached:
stock SDPA attention) and the same model with OpAmp on every ``--stride``-th layer. The two
are measured alternately (base, OpAmp, base, OpAmp, ...) and the median of each is reported,
so that other work on a shared machine slows both alike. Prefill: one forward pass over
``--tokens`` tokens (batch 1, no grad). Decode: ``--decode`` single-token steps with the KV
cache after that prefill, time per token. The target for the prefill ratio is <= 1.3x.

On CPU the OpAmp layers run two fused softmax attentions (PyTorch SDPA) plus four small
adapters; on CUDA they run the fused Triton kernel (``minimal.triton_opamp``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from minimal import hooks, load_model
from minimal.opamp import OpAmpCalibration, add_opamp, opamp_layers


def prefill_seconds(model, ids):
    sync(ids)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    sync(ids)
    return time.perf_counter() - start


def decode_seconds_per_token(model, ids, steps):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(ids)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(ids)
    return (time.perf_counter() - start) / steps


def sync(t):
    if t.is_cuda:
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=512, help="prefill length (default: %(default)s)")
    p.add_argument("--decode", type=int, default=16, help="decoding steps timed (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements each (default: %(default)s)")
    p.add_argument("--stride", type=int, default=1, help="OpAmp on every stride-th layer (default: %(default)s)")
    p.add_argument("--K", type=float, default=10.0)
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(args.model, device=device)
    modules = hooks.install(model)
    torch.manual_seed(0)
    layers = add_opamp(model, K=args.K, stride=args.stride)
    with torch.no_grad():  # trained-looking adapters (the cost does not depend on the values)
        for cal in layers.values():
            for a in (cal.q1, cal.q2, cal.k1, cal.k2):
                a.w_up.weight.normal_(0, 0.02)

    def attach(on: bool):  # the same adapters on and off: minimal.hooks' one recipe
        hooks.detach(model, OpAmpCalibration)
        if on:
            hooks.attach(model, layers)

    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.tokens), device=device)
    times = {(name, what): [] for name in ("base", "opamp") for what in ("prefill", "decode")}
    for name, on in (("base", False), ("opamp", True)):  # warm-up, untimed
        attach(on)
        prefill_seconds(model, ids[:, :64])
    for _ in range(args.repeats):
        for name, on in (("base", False), ("opamp", True)):
            attach(on)
            times[name, "prefill"].append(prefill_seconds(model, ids))
            times[name, "decode"].append(decode_seconds_per_token(model, ids, args.decode))
    attach(True)
    assert len(opamp_layers(model)) == len(layers)

    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"{args.model} on {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}; OpAmp K={args.K} on {len(layers)} of {len(modules)} layers (stride {args.stride}); "
          f"median of {args.repeats} alternating runs")
    print(f"{'':>22} {'base':>10} {'OpAmp':>10} {'ratio':>7}")
    for what, label, unit, scale in (("prefill", f"prefill {args.tokens} tokens", "s", 1),
                                     ("decode", f"decode, per token", "ms", 1000)):
        b, o = med["base", what] * scale, med["opamp", what] * scale
        print(f"{label:>22} {b:9.3f}{unit:<1} {o:9.3f}{unit:<1} {o / b:6.2f}x")
    ratio = med["opamp", "prefill"] / med["base", "prefill"]
    print(f"prefill ratio {ratio:.2f}x: {'within' if ratio <= 1.3 else 'ABOVE'} the 1.3x target")
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    print("ranges (s): " + "; ".join(f"{n} {w} {lo:.3f}-{hi:.3f}" for (n, w), (lo, hi) in spread.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
