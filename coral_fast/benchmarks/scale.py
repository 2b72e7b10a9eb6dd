"""`bench e2e --scale`: the loop's cost at 1B-8B shapes, on random weights of real configs built on the device.

A round's cost does not depend on the weights (acceptance does, and comes from the real models), so random
weights answer "what does a round cost against a plain step" without a download. Per config:

- plain step: the engine's `plain=True` decode, ms a token; its floor = the bytes a step must read (every
  weight once; the input embedding's lookup reads one row, so an untied embedding is not counted) divided by
  the copy bandwidth measured in the same run (a large device-to-device copy, bytes read + written);
- verify and draft ms a round (always speculative, random draft), the draft with the grouped head (the
  default: active_groups of num_groups) and with a dense head; the verify floor is the plain floor (the
  weights read once); the draft floor = depth x (draft layer + fc + the head rows it reads: active/num groups
  of the LM head, or all of it for the dense head);
- R = round / plain step, the floor ratio (draft floor + verify floor) / plain floor, and the projected
  speed-up over plain decoding tau / R for the given taus;
- a profile of a round (`--profile CONFIG`, CUDA only): kernels from torch.profiler grouped by the engine step
  that launched them and by kind, against the round's wall time (gaps = wall - kernel sum).
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import tempfile
import time

import torch

from coral_fast.benchmarks import report

_LLAMA_ROPE = {"rope_type": "default", "rope_theta": 500_000.0}  # llama3 frequency scaling: same cost, left out
_GEMMA_ROPE = {"full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
               "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}}

# name -> (transformers config class, its arguments): the shapes of the published configs
SCALE_CONFIGS = {
    "llama3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters=_LLAMA_ROPE)),
    "llama3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters=_LLAMA_ROPE)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    "gemma3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rms_norm_eps=1e-6,
        max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        rope_parameters=_GEMMA_ROPE, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4
        + ["sliding_attention"] * 2)),
}


def build_model(config, device, dtype=torch.bfloat16):
    """A causal LM of `config` ((class name, kwargs)) with random weights, allocated on `device` directly."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = config
    cfg = getattr(transformers, cls_name)(**kwargs, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval().requires_grad_(False)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter once (tied ones once); an untied input embedding is
    only looked up (one row), so it is left out."""
    total = _bytes(model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - (_bytes([embed]) if embed.data_ptr() != head.data_ptr() else 0)


def draft_bytes_per_level(draft, dense: bool) -> int:
    """Bytes one tree level of the draft reads: fc + the decoder layer + the head rows of the active groups
    (all of the head when dense) + the router."""
    head = draft.lm_head_weight
    cfg = draft.config
    head_share = 1.0 if dense else cfg.active_groups / cfg.num_groups
    router = getattr(draft.head, "router", None)
    return (_bytes(draft.fc.parameters()) + _bytes(draft.layer.parameters()) + int(_bytes([head]) * head_share)
            + (_bytes(router.parameters()) if isinstance(router, torch.nn.Module) else 0))


def copy_bandwidth(device, nbytes: int | None = None) -> float:
    """Bytes / s of a device-to-device copy (bytes read + written), median of 10."""
    on_cuda = str(device).startswith("cuda")
    nbytes = nbytes or (2 << 30 if on_cuda else 64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        if on_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:])


# --- the profile of a round ------------------------------------------------------------------------------
_KINDS = [  # (kind, kernel-name pattern), first match wins
    ("head", r"grouped_head|merge_topk|head_topk"),
    ("attention", r"tree_attention|attn|flash|fmha|sdpa|cudnn"),
    ("gemm", r"gemm|gemv|nvjet|xmma|cutlass|splitk|cublas|matmul|_mm_|tem_fused|dot_kernel"),
    ("select", r"topk|sort|radix|scan|cumsum|bitonic|argmax|argmin|max_|multinomial"),
    ("move", r"copy|index|gather|scatter|cat_|memcpy|memset|fill|elementwise_kernel_with_index|where"),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, pattern in _KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def _label(step: str, kind: str) -> str:
    """The issue's buckets: the draft's steps -> draft layer / head / tree building; the target's (verify,
    plain) -> target layers (GEMMs) / attention / norms etc. / accept+commit+KV writes."""
    if step == "draft":  # the draft's steps: tree levels (and the catch-up extension)
        return {"head": "draft: head (grouped top-k)", "select": "draft: tree building",
                "move": "draft: tree building"}.get(kind, "draft: draft layer")
    if step == "target":
        return {"gemm": "target layers (GEMMs)", "attention": "target: attention",
                "select": "accept/commit, KV writes", "move": "accept/commit, KV writes"}.get(kind,
                                                                                         "target: norms, rotary, activations")
    return "accept/commit (other steps)"


STEP_TAG = "coral_step:"


def _parse_trace(path: str):
    """Kernels of a chrome trace with the engine step that launched each: [(name, dur_us, step)], step = the
    name passed to `Engine.run` (a `coral_step:<name>` range around it, see profile_round), "" if none."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    steps = [e for e in events if e.get("name", "").startswith(STEP_TAG)]
    step_of = {}
    for rt in runtime:
        corr = rt.get("args", {}).get("correlation")
        enclosing = [s for s in steps if s.get("tid") == rt.get("tid") and s["ts"] <= rt["ts"]
                     and s["ts"] + s["dur"] >= rt["ts"] + rt["dur"]]
        if corr is not None and enclosing:
            step_of[corr] = min(enclosing, key=lambda s: s["dur"])["name"][len(STEP_TAG):]
    return [(k["name"], k["dur"], step_of.get(k.get("args", {}).get("correlation"), "")) for k in kernels]


def profile_round(gen, ids, new_tokens: int, log) -> dict:
    """torch.profiler over a few rounds (always speculative): kernel time per round by engine step and kind."""
    from torch.profiler import ProfilerActivity, profile

    from coral_fast.benchmarks.e2e import synchronize

    device = ids.device
    gen.generate(ids, new_tokens, ignore_eos=True)
    synchronize(device)
    t = time.perf_counter()
    r = gen.generate(ids, new_tokens, ignore_eos=True)
    synchronize(device)
    wall_round_us = 1e6 * (time.perf_counter() - t - r.prefill_time_s) / max(1, r.rounds)
    engine = gen.engine
    run = engine.run

    def tagged_run(name, *a, **kw):  # the step's name on the CPU side, inherited by the kernels it launches
        with torch.profiler.record_function(STEP_TAG + name):
            return run(name, *a, **kw)

    engine.run = tagged_run
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            r = gen.generate(ids, new_tokens, ignore_eos=True)
            synchronize(device)
    finally:
        del engine.run  # back to the class's method
    rounds = max(1, r.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        kernels = [k for k in _parse_trace(trace) if k[2] != "prefill"]  # the request's, not a round's
    buckets: dict[str, float] = {}
    per_step: dict[str, list] = {}
    for name, dur, step in kernels:
        group = "draft" if step in ("draft", "extend") else "target" if step in ("verify", "plain") else "other"
        label = _label(group, kernel_kind(name))
        buckets[label] = buckets.get(label, 0.0) + dur / rounds
        per_step.setdefault(step or "(no step)", [0, 0.0])
        per_step[step or "(no step)"][0] += 1 / rounds
        per_step[step or "(no step)"][1] += dur / rounds
    steps = [dict(step=k, kernels=v[0], us=v[1]) for k, v in per_step.items()]
    kernel_us = sum(buckets.values())
    rows = [dict(part=k, us=v, share=v / wall_round_us) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])]
    rows.append(dict(part="gaps (wall - kernel sum)", us=wall_round_us - kernel_us,
                     share=(wall_round_us - kernel_us) / wall_round_us))
    top: dict[str, list] = {}
    for name, dur, _ in kernels:
        top.setdefault(name, [0.0, 0])
        top[name][0] += dur / rounds
        top[name][1] += 1 / rounds
    top_rows = [dict(kernel=n[:90], kind=kernel_kind(n), us=v[0], count=v[1])
                for n, v in sorted(top.items(), key=lambda kv: -kv[1][0])[:15]]
    log(f"  profile: {rounds} rounds, wall {wall_round_us:.0f} us a round, kernels {kernel_us:.0f} us")
    return dict(rounds=rounds, wall_round_us=wall_round_us, kernel_us=kernel_us, rows=rows, steps=steps, top=top_rows)


# --- one config ----------------------------------------------------------------------------------------
def measure_config(name, config, args, bandwidth, log, profile: bool = False) -> dict:
    from coral_fast.benchmarks.e2e import make_generator, timed
    from coral_fast.draft import DraftModel

    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_model(config, device)
    build_s = time.perf_counter() - t0
    V = model.config.vocab_size
    ids = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0)).to(device)
    N = args.scale_tokens
    w_bytes = weight_bytes(model)
    depth = args.tree[0]
    row = dict(config=name, params_b=sum(p.numel() for p in model.parameters()) / 1e9, weight_gb=w_bytes / 1e9,
               build_s=build_s, mode=args.scale_mode, tree=",".join(map(str, args.tree)), new_tokens=N,
               copy_tb_s=bandwidth / 1e12, plain_floor_ms=1e3 * w_bytes / bandwidth)
    log(f"{name}: {row['params_b']:.2f} B params, {row['weight_gb']:.2f} GB a step, built in {build_s:.1f} s")
    profile_result = None
    for head in ("grouped", "dense"):
        torch.manual_seed(0)
        draft = DraftModel.random_init(model, **({"grouping": "dense"} if head == "dense" else {}))
        gen = make_generator(model, draft, args.tree, args.scale_mode, adaptive=False)
        try:
            warm = gen.warmup()
        except Exception as e:
            if head == "grouped":
                raise
            log(f"  dense head failed: {type(e).__name__}: {e}")  # the grouped numbers still count
            for key in ("warmup_s", "draft_ms", "draft_floor_ms", "round_ms", "engine_round_ms", "tau"):
                row[f"dense_{key}"] = float("nan")
            break
        r, wall = timed(lambda: gen.generate(ids, N, ignore_eos=True), device)
        rounds = max(1, r.rounds)
        row[f"{head}_warmup_s"] = warm
        row[f"{head}_draft_ms"] = 1e3 * r.draft_time_s / rounds
        row[f"{head}_draft_floor_ms"] = 1e3 * depth * draft_bytes_per_level(draft, head == "dense") / bandwidth
        row[f"{head}_round_ms"] = 1e3 * (wall - r.prefill_time_s) / rounds
        row[f"{head}_engine_round_ms"] = 1e3 * gen.round_time_s
        row[f"{head}_tau"] = r.mean_accepted_length
        if head == "grouped":
            row["verify_ms"] = 1e3 * r.verify_time_s / rounds
            row["verify_floor_ms"] = row["plain_floor_ms"]
            p, p_wall = timed(lambda: gen.generate(ids, N, plain=True, ignore_eos=True), device)
            steps = getattr(p, "plain_steps", 0) or N - 1  # the first token comes from the prefill
            row["plain_ms"] = 1e3 * (p_wall - p.prefill_time_s) / steps
            row["engine_plain_ms"] = 1e3 * gen.plain_step_time_s
            row["ttft_ms"] = 1e3 * p.prefill_time_s
            if profile:
                try:
                    profile_result = profile_round(gen, ids, min(N, 24), log)
                except Exception as e:  # the config's numbers still count
                    log(f"  profile failed: {type(e).__name__}: {e}")
        log(f"  {head} head: warm-up {warm:.1f} s, draft {row[f'{head}_draft_ms']:.3f} ms (floor "
            f"{row[f'{head}_draft_floor_ms']:.3f}), round {row[f'{head}_round_ms']:.3f} ms"
            + (f", verify {row['verify_ms']:.3f} ms, plain step {row['plain_ms']:.3f} ms (floor "
               f"{row['plain_floor_ms']:.3f})" if head == "grouped" else ""))
        del gen, draft
        gc.collect()
    row["R"] = row["grouped_round_ms"] / row["plain_ms"]
    row["R_dense"] = row["dense_round_ms"] / row["plain_ms"]
    row["floor_ratio"] = (row["grouped_draft_floor_ms"] + row["verify_floor_ms"]) / row["plain_floor_ms"]
    row["plain_over_floor"] = row["plain_ms"] / row["plain_floor_ms"]
    row["verify_over_floor"] = row["verify_ms"] / row["verify_floor_ms"]
    row["draft_over_floor"] = row["grouped_draft_ms"] / row["grouped_draft_floor_ms"]
    row["R_over_floor_ratio"] = row["R"] / row["floor_ratio"]
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(row=row, profile=profile_result)


def scale_markdown(result: dict) -> str:
    fmt = report.fmt
    lines = ["# Scale: a round against a plain step at 1B-8B shapes (random weights of real configs)", ""]
    lines += report._env_lines(result["env"])
    rows = result["rows"]
    if rows:
        r0 = rows[0]
        lines += [f"Mode {r0['mode']}, tree {r0['tree']}, {r0['new_tokens']} new tokens after a 64-token prompt, random "
                  f"draft (tau ~ 1: round costs only), always speculative. Copy bandwidth "
                  f"{fmt(r0['copy_tb_s'], '.2f')} TB/s (bytes read + written); floors = bytes / that. Times in ms.", "",
                  "| config | weights GB | plain step (floor) | verify (floor) | draft grouped (floor) | draft dense (floor) | "
                  "round grouped | round dense | **R** | floor ratio | R / floor ratio | warm-up s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['config']} | {r['weight_gb']:.2f} | {r['plain_ms']:.3f} ({r['plain_floor_ms']:.3f}, "
                f"{r['plain_over_floor']:.2f}x) | {r['verify_ms']:.3f} ({r['verify_floor_ms']:.3f}, {r['verify_over_floor']:.2f}x) | "
                f"{r['grouped_draft_ms']:.3f} ({r['grouped_draft_floor_ms']:.3f}, {r['draft_over_floor']:.2f}x) | "
                f"{r['dense_draft_ms']:.3f} ({r['dense_draft_floor_ms']:.3f}) | {r['grouped_round_ms']:.3f} | "
                f"{r['dense_round_ms']:.3f} | **{r['R']:.2f}** | {r['floor_ratio']:.2f} | {r['R_over_floor_ratio']:.2f} | "
                f"{r['grouped_warmup_s']:.0f} + {r['dense_warmup_s']:.0f} |")
        taus = result["taus"]
        lines += ["", "Projected speed-up over plain decoding, tau / R (grouped head; dense head in brackets):", "",
                  "| config | " + " | ".join(f"tau {t:g}" for t in taus) + " |", "|---|" + "---|" * len(taus)]
        for r in rows:
            lines.append(f"| {r['config']} | " + " | ".join(f"{t / r['R']:.2f}x ({t / r['R_dense']:.2f}x)" for t in taus) + " |")
        lines += ["", "R = round / plain step (wall times of whole requests, per round / per token); floor ratio = "
                  "(draft floor + verify floor) / plain floor. plain floor = weight bytes / copy bandwidth (untied input "
                  "embedding excluded: one row is read); verify floor = the same; draft floor = depth x (fc + layer + "
                  "active share of the LM head + router).", ""]
    for name, prof in result["profiles"].items():
        lines += [f"## Where a round goes: {name} (torch.profiler, {prof['rounds']} rounds, us a round)", "",
                  f"Wall {prof['wall_round_us']:.0f} us a round (unprofiled run), kernels {prof['kernel_us']:.0f} us.", "",
                  "| part | us / round | share of wall |", "|---|---|---|"]
        lines += [f"| {r['part']} | {r['us']:.0f} | {100 * r['share']:.1f}% |" for r in prof["rows"]]
        lines += ["", "By engine step (`Engine.run` name; extend = the draft catching up):", "",
                  "| step | kernels / round | us / round |", "|---|---|---|"]
        lines += [f"| {s['step']} | {s['kernels']:.0f} | {s['us']:.0f} |" for s in prof["steps"]]
        lines += ["", "| top kernels | kind | us / round | count / round |", "|---|---|---|---|"]
        lines += [f"| `{t['kernel']}` | {t['kind']} | {t['us']:.0f} | {t['count']:.1f} |" for t in prof["top"]]
        lines.append("")
    return "\n".join(lines)


def plot_scale(result: dict, path) -> str | None:
    """ms per config: plain step, verify, draft (grouped, dense), each beside its floor; None without matplotlib."""
    plt = report.pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    parts = [("plain step", "plain_ms", "plain_floor_ms"), ("verify", "verify_ms", "verify_floor_ms"),
             ("draft, grouped head", "grouped_draft_ms", "grouped_draft_floor_ms"),
             ("draft, dense head", "dense_draft_ms", "dense_draft_floor_ms")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for j, (label, key, floor) in enumerate(parts):
        xs = [i + (j - 1.5) * width for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width=width, label=label)
        ax.scatter(xs, [r[floor] for r in rows], marker="_", s=300, color="black", zorder=3,
                   label="bytes floor" if j == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{r['config']}\nR {r['R']:.2f} (floor {r['floor_ratio']:.2f})" for r in rows],
                  fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(f"a round's parts against a plain step, random weights ({result['env']['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_scale(result: dict, out_dir: str, plot: bool = False) -> dict:
    base = os.path.join(out_dir, "e2e_scale")
    report.write_json(result, base + ".json")
    rows = [dict(level="config", **r) for r in result["rows"]]
    for name, prof in result["profiles"].items():
        rows += [dict(level="profile", config=name, part=p["part"], us=p["us"], share=p["share"]) for p in prof["rows"]]
    report.write_csv(rows, base + ".csv")
    md = scale_markdown(result)
    paths = dict(json=base + ".json", csv=base + ".csv", md=base + ".md")
    if plot and result["rows"]:
        if plot_scale(result, base + ".png"):
            paths["png"] = base + ".png"
        else:
            md += "\n(No plot: matplotlib is not installed here.)\n"
    with open(base + ".md", "w") as f:
        f.write(md)
    return paths


def run_scale(names, args, env, taus, log, configs=None) -> dict:
    """Measure each named config (from `configs`, default SCALE_CONFIGS); results files rewritten after each."""
    configs = configs or SCALE_CONFIGS
    bandwidth = copy_bandwidth(args.device)
    log(f"scale: copy bandwidth {bandwidth / 1e12:.3f} TB/s (bytes read + written)")
    result = dict(env=env, copy_bytes_s=bandwidth, taus=sorted(set(taus)), rows=[], profiles={})
    for name in names:
        try:
            out = measure_config(name, configs[name], args, bandwidth, log, profile=name == args.profile)
        except Exception as e:  # the other configs' numbers still count
            import traceback

            traceback.print_exc()
            log(f"scale: {name} failed: {type(e).__name__}: {e}")
            gc.collect()
            if str(args.device).startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        result["rows"].append(out["row"])
        if out["profile"]:
            result["profiles"][name] = out["profile"]
        paths = write_scale(result, args.out_dir)
    if result["rows"]:
        paths = write_scale(result, args.out_dir, plot=True)
        log(open(paths["md"]).read())
    return result
