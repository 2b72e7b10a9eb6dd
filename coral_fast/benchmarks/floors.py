"""What a decode step can cost at best on this GPU: the floors under the engine's targets.

    python -m coral_fast.benchmarks.floors [--configs llama3.2-1b,llama3.1-8b,qwen2.5-7b] [--rows 1,61] [--out F.md]

For each model shape it times, in one run and as CUDA-graph replays (median of CUDA-event timings):
- copy bandwidth (a 2 GiB device-to-device copy, bytes read + written) and read bandwidth (a sum over
  8 GiB, bytes read): the two ways to turn weight bytes into a floor;
- an empty kernel in a graph (the fixed cost every step pays at least once);
- the chain of every weight matrix of the model as cuBLAS products (`x @ W.T`, bf16) for M rows, one
  graph: no norms, rotary, attention or host work, just the weights read through the products a decoder
  step needs. It is what a plain step (M=1) or a verify step (M=61 tree tokens) costs when everything
  but the weights is free: a target below it needs faster products, not a leaner loop.
The weights are random bf16 (timing does not depend on values) and are far larger than L2.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

# (hidden, intermediate, layers, q heads, kv heads, head_dim, vocab, tied): the shapes of the real configs
CONFIGS = {
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "llama3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 128, 152064, False),
    "gemma3-1b": (1152, 6912, 26, 4, 1, 256, 262144, True),
}


def time_graph_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median ms of one replay of a CUDA graph capturing fn()."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def weight_shapes(hidden, inter, layers, heads, kv_heads, head_dim, vocab, tied) -> list[tuple[int, int]]:
    """[(out, in)] of every product of one decoder step: fused q/k/v, o, fused gate/up, down per layer,
    then the LM head (the embedding lookup reads one row: not counted)."""
    per_layer = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden),
                 (hidden, inter)]
    return per_layer * layers + [(vocab, hidden)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coral_fast.benchmarks.floors", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rows", default="1,61", help="M rows per product (1 = plain step, 61 = root + 60-node tree)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("floors: needs a CUDA GPU", file=sys.stderr)
        return 2
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"floors: unknown config(s) {unknown}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    rows = [int(m) for m in args.rows.split(",")]
    dev = torch.device("cuda")
    lines = [f"# Decode-step floors ({torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
             f"{datetime.date.today()})", ""]

    src = torch.randn(512 << 20, device=dev)  # 2 GiB of fp32 (a uint8 copy runs at 2/3 of this rate)
    dst = torch.empty_like(src)
    copy_ms = time_graph_ms(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 4 / (copy_ms / 1e3)
    del src, dst
    big = torch.ones(4 << 30, dtype=torch.bfloat16, device=dev)  # 8 GiB
    rows_of_big = big.view(1024, -1)
    acc = torch.empty(1024, dtype=torch.float32, device=dev)
    read_ms = time_graph_ms(lambda: torch.sum(rows_of_big, dim=1, dtype=torch.float32, out=acc), reps=10)
    read_bw = big.numel() * 2 / (read_ms / 1e3)
    del big
    one = torch.zeros(1, device=dev)
    empty_us = time_graph_ms(lambda: one.add_(1.0), reps=50) * 1e3
    lines += [f"- copy bandwidth {copy_bw / 1e12:.2f} TB/s (2 GiB, read + written); read bandwidth "
              f"{read_bw / 1e12:.2f} TB/s (sum over 8 GiB); one tiny kernel in a graph {empty_us:.1f} us (the replay's launch included)", "",
              "| config | weights GB | M | products | bytes / copy BW ms | bytes / read BW ms | cuBLAS chain ms "
              "| chain / copy floor | effective TB/s |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        shapes = weight_shapes(*CONFIGS[name])
        weights = [torch.randn(o, i, dtype=torch.bfloat16, device=dev) * 0.02 for o, i in shapes]
        nbytes = sum(w.numel() * 2 for w in weights)
        for M in rows:
            inputs = {i: torch.randn(M, i, dtype=torch.bfloat16, device=dev) for _, i in shapes}
            outs = [torch.empty(M, w.shape[0], dtype=torch.bfloat16, device=dev) for w in weights]

            def chain():
                for w, out in zip(weights, outs):
                    torch.matmul(inputs[w.shape[1]], w.T, out=out)

            ms = time_graph_ms(chain, reps=15)
            floor_copy = nbytes / copy_bw * 1e3
            line = (f"| {name} | {nbytes / 1e9:.2f} | {M} | {len(weights)} | {floor_copy:.3f} | "
                    f"{nbytes / read_bw * 1e3:.3f} | {ms:.3f} | {ms / floor_copy:.2f}x | {nbytes / ms / 1e9:.2f} |")
            lines.append(line)
            print(line, flush=True)
            del inputs, outs
        del weights
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
