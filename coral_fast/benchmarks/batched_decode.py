"""Where the data pipeline's decode time goes: `BatchedGenerator` steps timed on a model of the target's shape.

    python -m coral_fast.benchmarks.batched_decode [--shape smollm2] [--rows 256,512] [--cache 1024,4096]
        [--modes graphs,eager] [--prompt 200] [--old FILE] [--waves 4] [--mean-answer 128] [--out DIR]

The weights are random (bf16; a step's time does not depend on them) and eos is an id the model never
emits, so every row decodes every step. For each (mode, rows, cache length): one warm-up `generate`
(compile + capture apart), then the median over 3 calls of `generate` with 16 and with 80 new tokens;
a step costs (t80 - t16) / 64. Beside it the floors of a step over the read bandwidth: the weights
once plus the keys/values of the filled slots (prompt + 48 new tokens a row, the mean over the timed
steps), and plus the whole static cache (what attention over every slot reads, masked or not); tokens/s
= rows / step. `--old FILE`: a Python file with an earlier `BatchedGenerator` (mode "compile"), timed in
the same run as a baseline row. torch._dynamo's counters (graph breaks, recompiles, CUDA-graph skips)
are printed after each compiled configuration. `--out DIR`: batched_decode.md/json.

`--waves N` adds continuous batching (mode graphs, each rows x cache): N x rows prompts whose answers
end at random lengths (each prompt's budget drawn from a geometric distribution of mean
`--mean-answer`, at most 512: a random model's own eos would decide nothing, it seldom emits one),
decoded in one call (stopped rows take the next prompts) against N calls of `rows` prompts each
(every call runs until its longest answer ends), on the same generator; answer tokens / s of each and
the share of identical answers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

# (hidden, intermediate, layers, q heads, kv heads, vocab): the real configs' shapes
SHAPES = {"smollm2": (576, 1536, 30, 9, 3, 49152), "gemma3-270m": (640, 2048, 18, 4, 1, 262144)}
READ_TBS = {"H200": 4.8, "H100": 3.35}  # nominal; the floors benchmark measures the real one


def build_model(shape: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def time_generate(gen, prompts, new_tokens: int, eos: int, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.generate(prompts, new_tokens, [eos], 0, sync_every=10**9)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coral_fast.benchmarks.batched_decode")
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--rows", default="256,512")
    p.add_argument("--cache", default="1024,4096")
    p.add_argument("--modes", default="graphs,eager")
    p.add_argument("--old", help="a file with an earlier BatchedGenerator: timed too, mode compile")
    p.add_argument("--prompt", type=int, default=200, help="prompt tokens of every row")
    p.add_argument("--waves", type=int, default=0, help="continuous batching: N x rows prompts in one call vs N calls")
    p.add_argument("--mean-answer", type=int, default=128, help="with --waves: mean answer budget (tokens)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("batched_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch._dynamo.utils import counters

    from coral_fast.training.batched import BatchedGenerator

    torch.manual_seed(0)
    model = build_model(args.shape, "cuda")
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    head_dim = hidden // heads
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    name = torch.cuda.get_device_name()
    tbs = next((v for k, v in READ_TBS.items() if k in name), 3.35)
    import transformers

    rows_out, lines = [], []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    emit(f"{name}; torch {torch.__version__}; transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}; "
         f"shape {args.shape}, random bf16 weights, prompt {args.prompt} tokens a row, eos never emitted\n")
    variants = [("coral_tree", BatchedGenerator, mode) for mode in args.modes.split(",")]
    if args.old:
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_batched", args.old)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        variants.append(("old (HF StaticCache)", module.BatchedGenerator, "compile"))
    emit(f"| generator | mode | rows | cache | warm-up s | ms / step | floor ms: weights + filled KV | "
         f"floor ms: weights + whole cache | tokens/s (all rows decoding) |\n|---|---|---|---|---|---|---|---|---|")
    for label, cls, mode in variants:
        for rows in map(int, args.rows.split(",")):
            for cache in map(int, args.cache.split(",")):
                counters.clear()
                gen = cls(model, rows, cache, mode)
                prompts = [torch.randint(1, vocab - 1, (args.prompt,)).tolist() for _ in range(rows)]
                t0 = time.perf_counter()
                gen.generate(prompts, 16, [vocab], 0, sync_every=10**9)
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                short = time_generate(gen, prompts, 16, vocab)
                long = time_generate(gen, prompts, 80, vocab)
                step_ms = (long - short) / 64 * 1e3
                slot_bytes = 2 * layers * rows * kv * head_dim * 2  # K and V of one slot of every row
                filled_ms = (weight_bytes + slot_bytes * (args.prompt + 48)) / (tbs * 1e12) * 1e3
                whole_ms = (weight_bytes + slot_bytes * cache) / (tbs * 1e12) * 1e3
                emit(f"| {label} | {mode} | {rows} | {cache} | {warm:.1f} | {step_ms:.2f} | {filled_ms:.2f} | {whole_ms:.2f} "
                     f"| {rows / step_ms * 1e3:.0f} |")
                rows_out.append(dict(generator=label, mode=mode, rows=rows, cache=cache, warmup_s=round(warm, 2),
                                     step_ms=round(step_ms, 3), floor_filled_ms=round(filled_ms, 3),
                                     floor_whole_cache_ms=round(whole_ms, 3), tok_s=round(rows / step_ms * 1e3),
                                     counters={k: dict(v) for k, v in counters.items() if v}))
                if mode == "compile":
                    print("counters:", json.dumps({k: dict(v) for k, v in counters.items() if v}, default=str), flush=True)
                del gen
                torch.cuda.empty_cache()
    waves = []
    if args.waves > 0:
        never = [vocab - 1]  # an eos id no prompt holds; the budgets end the answers
        emit(f"\n{args.waves} x rows prompts, answers of random budgets (geometric, mean {args.mean_answer}, at most "
             f"512 tokens), "
             f"mode graphs\n\n| rows | cache | answer tokens | one call (continuous) s | {args.waves} calls of rows prompts s "
             f"| continuous tok/s | calls tok/s | ratio | identical answers |\n|---|---|---|---|---|---|---|---|---|")
        for rows in map(int, args.rows.split(",")):
            for cache in map(int, args.cache.split(",")):
                gen = BatchedGenerator(model, rows, cache, "graphs")
                prompts = [torch.randint(1, vocab - 1, (args.prompt,)).tolist() for _ in range(rows * args.waves)]
                draws = torch.distributions.Geometric(probs=torch.tensor(1.0 / args.mean_answer)).sample((len(prompts),))
                budgets = [int(b) for b in (draws + 1).clamp(max=512)]
                gen.generate(prompts[:rows], 16, never, 0)  # capture
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                one = gen.generate(prompts, 512, never, 0, budgets=budgets)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                calls = [a for w in range(args.waves) for a in gen.generate(
                    prompts[w * rows:(w + 1) * rows], 512, never, 0, budgets=budgets[w * rows:(w + 1) * rows])]
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                tokens, calls_tokens = sum(map(len, one)), sum(map(len, calls))
                same = sum(a == b for a, b in zip(one, calls)) / len(one)
                emit(f"| {rows} | {cache} | {tokens} | {t1 - t0:.2f} | {t2 - t1:.2f} | {tokens / (t1 - t0):.0f} "
                     f"| {calls_tokens / (t2 - t1):.0f} | {(t2 - t1) / (t1 - t0):.2f}x | {same:.0%} |")
                waves.append(dict(rows=rows, cache=cache, answer_tokens=tokens, continuous_s=round(t1 - t0, 3),
                                  calls_s=round(t2 - t1, 3), calls_tokens=calls_tokens, identical=round(same, 4)))
                del gen
                torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "batched_decode.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "batched_decode.json"), "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                           date=time.strftime("%Y-%m-%d"), shape=args.shape, rows=rows_out, waves=waves), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
