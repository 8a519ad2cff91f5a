"""Attention kernels per variant: forward + backward time and TFLOP/s at the 0.6b shape, gate included.

    python bench/attention_kernels.py                                  # B=8, H=10, T=2048, D=128, bf16
    python bench/attention_kernels.py --flex-options '{"USE_TMA": true}'

Each row runs the model's own CausalSelfAttention.attend_and_gate (the kernel and the variant's gate, no
projections) compiled, then the backward of a loss on the gated output and on the gate, so a kernel only
counts for a variant when it gives that variant's gate and its gradient: sdpa (cuDNN) returns no LSE, so
vanilla and sink, whose gates are functions of the LSE, need flex; gated could use either, and `backend:
auto` takes the faster. TFLOP/s counts the causal half of the work: 2·B·H·T²·D forward, 2.5x backward.
The time is the median of --repeats timings of --iters calls each (clocks and other tenants move single ones).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from model.attention import VARIANTS  # noqa: E402
from model.gpt import CausalSelfAttention, GPTConfig  # noqa: E402

KERNELS = ("sdpa", "flex")


def attention_step(layer: CausalSelfAttention):
    """q, k, v, x -> a scalar that depends on the attention output and on the gate."""

    def step(q, k, v, x):
        y, gate = layer.attend_and_gate(x, q, k, v)
        return y.float().square().mean() + gate.mean()

    return torch.compile(step)


def time_ms(fn, inputs, warmup: int, iters: int, repeats: int) -> float:
    """Milliseconds per forward + backward: the median over `repeats` of CUDA-event timings of `iters` calls."""
    for _ in range(warmup):
        fn(*inputs).backward()
    timings = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(*inputs).backward()
        end.record()
        torch.cuda.synchronize()
        timings.append(start.elapsed_time(end) / iters)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", nargs="+", default=list(VARIANTS))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flex-options", type=json.loads, default=None, help="kernel_options for flex, as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_kernels.py needs a CUDA GPU")
    B, H, T, D = args.batch_size, args.heads, args.seq_len, args.head_dim
    flops = 2 * B * H * T * T * D * (1 + 2.5)  # causal: half of 4·B·H·T²·D forward; backward 2.5x forward
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} T={T} D={D} bf16, fwd+bwd")
    print(f"# flex kernel_options: {args.flex_options}")
    print("| variant | kernel | ms | TFLOP/s |\n|---|---|---|---|")
    for attention in args.attention:
        for kernel in args.kernels:
            if kernel == "sdpa" and VARIANTS[attention].needs_lse:
                print(f"| {attention} | {kernel} | - | no LSE: cannot give this gate |")
                continue
            cfg = GPTConfig(n_embd=H * D, n_head=H, seq_len=T, attention=attention, backend=kernel)
            cfg.flex_kernel_options = args.flex_options
            layer = CausalSelfAttention(cfg).cuda()
            g = torch.Generator(device="cuda").manual_seed(0)
            qkv = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
            qkv = [t.requires_grad_(True) for t in qkv]
            x = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16, generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ms = time_ms(attention_step(layer), (*qkv, x), args.warmup, args.iters, args.repeats)
            print(f"| {attention} | {kernel} | {ms:.2f} | {flops / ms / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
