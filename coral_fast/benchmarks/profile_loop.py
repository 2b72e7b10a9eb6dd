"""Where a round's time goes (GPU): per-step graph replay times (draft, verify, plain step), kernel counts and the top kernels, for the
plain captured engine and the compiled one, plus a tree-shape sweep. Device-tool script:

    source dev/device_setup.sh && python -m coral_fast.benchmarks.profile_loop --out $OUT
    python -m coral_fast.benchmarks.profile_loop --attn-sweep --variants "" --out $OUT     # tree-attention configs only
"""
import argparse
import json
import os
import statistics
import time

import torch


def _ready(gen, ids):
    """A valid engine state after the prompt `ids`: prefilled, the draft caught up."""
    eng = gen.engine
    eng.reset(ids, 0.0, None)
    eng.prefill(ids.shape[0])
    eng.catch_up()
    return eng


def replay_ms(gen, ids, step, n=40):
    """Median ms of one replay of step `step` ("draft", "verify" or "plain"), the state restored each time."""
    eng = _ready(gen, ids)
    saved = eng.save_positions()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if step == "verify":
            eng.run("draft")
        a.record()
        eng.run(step)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        eng.restore_positions(saved)
    return statistics.median(times)


def kernel_table(gen, ids, log, rows=14):
    from torch.profiler import ProfilerActivity, profile

    eng = _ready(gen, ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eng.run("draft")
            eng.run("verify")
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    log(f"  kernels per round (draft + verify): {count / 3:.0f}, GPU time per round {total / 3 / 1e3:.3f} ms")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        log(f"    {e.self_device_time_total / 3:9.1f} us  x{e.count / 3:5.0f}  {e.key[:110]}")


def _graph_us(fn, calls=20, reps=7):
    """Median us per call of `calls` back-to-back calls captured in one CUDA graph."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()  # noqa: E702
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)


def attn_sweep(log, shapes=((9, 3, 64), (4, 1, 256)), T=61, S=1088, kv_lens=(100, 200, 400, 1000)):
    """Tree-attention launch configs at the loop's shapes: a static buffer of S slots, the prefix length kv_len a device tensor. `default` is the shipped rule (dynamic_len: one key
    block a split), `static rule` what the rule for a known length would pick (the loop's choice before)."""
    from coral_fast.kernels.tree_attention import TreeAttentionConfig, _tree_attention_triton
    from coral_fast.tree import ancestor_mask, pack_mask_bits

    torch.manual_seed(0)
    parents = torch.tensor([-1] * 10 + [i // 5 for i in range(T - 10)])
    bits = pack_mask_bits(ancestor_mask(parents).cuda())[None]
    for hq, hkv, d in shapes:
        q = torch.randn(1, hq, T, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, S, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        new_cfg = TreeAttentionConfig.for_shape(1, hkv, hq // hkv * T, S, d, q.device, True)
        old_cfg = TreeAttentionConfig.for_shape(1, hkv, hq // hkv * T, S, d, q.device, False)
        old = dict(block_m=old_cfg.block_m, block_n=old_cfg.block_n, num_warps=old_cfg.num_warps,
                   num_stages=old_cfg.num_stages, num_splits=old_cfg.num_splits)
        log(f"attn sweep Hq={hq} Hkv={hkv} D={d} T={T} S={S}: default {new_cfg}; static rule {old_cfg}")
        for kv in kv_lens:
            kv_len = torch.tensor([kv], device="cuda")
            ref = _tree_attention_triton(q, k, v, bits, d**-0.5, kv_len, None, None)
            line = []
            for bm in (16, 32, 64):
                for splits in (1, 4, 8, 17, 34):
                    for bn, nw in ((64, 4), (32, 4)):
                        cfg = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=2, num_splits=splits)
                        try:
                            out = _tree_attention_triton(q, k, v, bits, d**-0.5, kv_len, None, None, **cfg)
                            err = (out.float() - ref.float()).abs().max().item()
                            t = _graph_us(lambda: _tree_attention_triton(q, k, v, bits, d**-0.5, kv_len, None, None, **cfg))
                            line.append((t, bm, bn, nw, splits, err))
                        except Exception as e:  # noqa: BLE001
                            log(f"  cfg {cfg} failed: {str(e)[:80]}")
            t_new = _graph_us(lambda: _tree_attention_triton(q, k, v, bits, d**-0.5, kv_len, None, None))
            t_old = _graph_us(lambda: _tree_attention_triton(q, k, v, bits, d**-0.5, kv_len, None, None, **old))
            line.sort()
            log(f"  kv_len={kv}: default {t_new:.1f} us, static rule {t_old:.1f} us; best: " + "; ".join(
                f"{t:.1f}us bm{bm} bn{bn} w{nw} s{sp} err{e:.0e}" for t, bm, bn, nw, sp, e in line[:5]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="out")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--variants", default="graphs,compile")
    p.add_argument("--trees", default="6,10,60")
    p.add_argument("--sweep-variant", default="graphs")
    p.add_argument("--sweep", default="")
    p.add_argument("--attn-sweep", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "profile.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")

    if args.attn_sweep:
        attn_sweep(log)
        if not args.variants:  # the sweep alone: no model needed
            return
    from coral_fast.benchmarks.e2e import PROMPTS, prompt_ids
    from coral_fast.draft import DraftModel
    from coral_fast.generate import SpeculativeGenerator, TreeConfig
    from coral_fast.generate_cli import shipped_draft
    from coral_fast.fusion import unfuse_projections
    from coral_fast.models import load_target

    model, tok = load_target(args.model, dtype=torch.bfloat16, device="cuda")
    model.generation_config.eos_token_id = None
    draft = DraftModel.from_pretrained(shipped_draft(args.model), model)
    prompts = [prompt_ids(tok, t, model.config.vocab_size, "cuda", i) for i, t in enumerate(PROMPTS)]
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} model {args.model}")
    results = []

    def run(variant, tree, profile_it):
        d, k, t = tree
        t0 = time.perf_counter()
        # variant: graphs | compile, "-nofuse": q/k/v and gate/up as separate products (coral_fast.fusion)
        fuse = not variant.endswith("-nofuse")
        if not fuse:
            unfuse_projections(model)
            unfuse_projections(draft)
        gen = SpeculativeGenerator(model, draft, TreeConfig(d, k, t), eos_token_id=[], adaptive=False,
                                   mode="compile" if variant.startswith("compile") else "graphs", fuse=fuse)
        gen.warmup()
        setup = time.perf_counter() - t0
        eng = gen.engine
        dm, vm = replay_ms(gen, prompts[0], "draft"), replay_ms(gen, prompts[0], "verify")
        pm = replay_ms(gen, prompts[0], "plain")
        rows = []
        for ids in prompts:
            gen.generate(ids, args.new_tokens)
            torch.cuda.synchronize()
            a = time.perf_counter()
            r = gen.generate(ids, args.new_tokens)
            torch.cuda.synchronize()
            rows.append(dict(tok_s=len(r.token_ids) / (time.perf_counter() - a), tau=r.mean_accepted_length,
                             prefill_ms=1e3 * r.prefill_time_s, rounds=r.rounds))
        torch.cuda.synchronize()
        a = time.perf_counter()
        for _ in range(5):
            eng.reset(prompts[0], 0.0, None)
            eng.prefill(prompts[0].shape[0])
        torch.cuda.synchronize()
        pre = (time.perf_counter() - a) / 5 * 1e3
        med = lambda key: statistics.median(x[key] for x in rows)  # noqa: E731
        res = dict(variant=variant, tree=tree, setup_s=round(setup, 1), draft_ms=round(dm, 3), verify_ms=round(vm, 3),
                   plain_ms=round(pm, 3),
                   tok_s=round(med("tok_s"), 1), tau=round(med("tau"), 3), prefill_ms=round(pre, 2),
                   per_prompt=[round(x["tok_s"]) for x in rows])
        log(json.dumps(res))
        results.append(res)
        if profile_it:
            kernel_table(gen, prompts[0], log)
        return gen

    tree0 = tuple(int(x) for x in args.trees.split(","))
    for variant in args.variants.split(","):
        run(variant, tree0, True)
        torch._dynamo.reset()
    for spec in filter(None, args.sweep.split(";")):
        run(args.sweep_variant, tuple(int(x) for x in spec.split(",")), False)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
