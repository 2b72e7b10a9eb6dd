"""Gemma 3 270M's greedy text on the GPU by every path the project decodes it with (HF bf16, the batched data
generator eager / graphs at 4 and 512 rows, the engine), each against HF fp32: the agreeing prefix per prompt and
the text. A kernel fault shows as one path apart; a tokenizer fault as noise on every path, HF's included."""
import torch

from coral_fast import DraftModel, SpeculativeGenerator, TreeConfig
from coral_fast.benchmarks.e2e import common_prefix
from coral_fast.models import load_target
from coral_fast.training.batched import BatchedGenerator

TITLES = ["Writing a resume\n\n", "Search engines\n\n", "Magnetism\n\n"]
N = 24


def hf_greedy(model, prompts):
    return [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=N, do_sample=False)[0, len(p):].tolist() for p in prompts]


def show(name, outs, truth, tok):
    print(f"{name:34s} agree {[common_prefix(o, t) for o, t in zip(outs, truth)]} {tok.decode(outs[0])[:70]!r}", flush=True)


m32, tok = load_target("gemma3-270m", dtype=torch.float32, device="cuda")
prompts = [tok(t)["input_ids"] for t in TITLES]
truth = hf_greedy(m32, prompts)
show("hf fp32", truth, truth, tok)
for dtype in (torch.float32, torch.bfloat16):
    m = m32 if dtype == torch.float32 else load_target("gemma3-270m", dtype=dtype, device="cuda")[0]
    tag = str(dtype).split(".")[-1]
    if dtype != torch.float32:
        show(f"hf {tag}", hf_greedy(m, prompts), truth, tok)
    for mode, impl, rows in [("eager", "reference", 4), ("eager", "auto", 4), ("graphs", "auto", 4), ("graphs", "auto", 512), ("eager", "auto", 512)]:
        try:
            gen = BatchedGenerator(m, batch_size=rows, max_len=1024, mode=mode)
            gen.impl = impl
            show(f"batched {tag} {mode} {impl} rows={rows}", gen.generate(prompts, N, [1, 106], 0), truth, tok)
        except Exception as e:  # noqa: BLE001
            print(f"batched {tag} {mode} {impl} rows={rows}: {type(e).__name__}: {e}", flush=True)
    try:
        draft = DraftModel.from_pretrained("coral_fast/drafts/gemma3-270m", m)
        for mode in ("eager", "graphs"):
            for plain in (True, False):
                g = SpeculativeGenerator(m, draft, TreeConfig(depth=6, topk=10, total_tokens=60), mode=mode)
                outs = [list(g.generate(p, max_new_tokens=N, plain=plain, ignore_eos=True).token_ids)[:N] for p in prompts]
                show(f"engine {tag} {mode} plain={plain}", outs, truth, tok)
    except Exception as e:  # noqa: BLE001
        print(f"engine {tag}: {type(e).__name__}: {e}", flush=True)
