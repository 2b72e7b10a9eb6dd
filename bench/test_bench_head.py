"""pytest-benchmark view of the grouped LM head (GPU only): `pytest bench/test_bench_head.py --benchmark-only`.

Same cases as `coral-fast bench head` (Llama-3 / Qwen2.5 / Gemma-3 shapes, G=32, 4 active, top-10, bf16;
M=1, 16, 64; shared or random routing). The reported table with the bytes floor comes from
`coral-fast bench head`; this gives the comparison in pytest-benchmark's format (host-timed with a
synchronize, L2 not flushed, so launch overhead shows and small working sets sit in L2).
"""
import pytest
import torch

from coral_fast.benchmarks.head import ACTIVE, CASES, NUM_GROUPS, SHAPES, TOP_K, _groups, _naive_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_WEIGHTS = {}


def _setup(shape, M, routing):
    from coral_fast import GroupedLMHead, VocabGrouping

    V, H = SHAPES[shape]
    if shape not in _WEIGHTS:
        _WEIGHTS.clear()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        weight = (torch.randn(V, H, device="cuda") / H**0.5).bfloat16()
        _WEIGHTS[shape] = (weight, GroupedLMHead(weight, VocabGrouping.contiguous(V, NUM_GROUPS)))
    weight, head = _WEIGHTS[shape]
    gen = torch.Generator().manual_seed(M)
    hidden = torch.randn(M, H, device="cuda").bfloat16()
    groups = _groups(M, routing, gen, "cuda")
    return weight, head, hidden, groups


def _run(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()

    call()
    benchmark.pedantic(call, rounds=30, warmup_rounds=3)


PARAMS = [(s, M, r) for s in SHAPES for (M, r) in CASES]
IDS = [f"{s}_M{M}_{r}" for s, M, r in PARAMS]


@pytest.mark.parametrize("shape,M,routing", PARAMS, ids=IDS)
def test_grouped_head(benchmark, shape, M, routing):
    weight, head, hidden, groups = _setup(shape, M, routing)
    ids, logprobs = head.topk(hidden, groups, TOP_K, impl="triton")
    ref_ids, ref_lp = head.topk(hidden, groups, TOP_K, impl="reference")
    torch.testing.assert_close(logprobs, ref_lp, atol=2e-3, rtol=0)
    _run(benchmark, lambda: head.topk(hidden, groups, TOP_K, impl="triton", check=False))


@pytest.mark.parametrize("shape,M,routing", PARAMS, ids=IDS)
def test_grouped_head_default_checks(benchmark, shape, M, routing):
    """The public call as eager code makes it (check=True): issue 16's eager cost."""
    weight, head, hidden, groups = _setup(shape, M, routing)
    _run(benchmark, lambda: head.topk(hidden, groups, TOP_K))


@pytest.mark.parametrize("shape,M,routing", PARAMS, ids=IDS)
def test_dense_cublas_topk(benchmark, shape, M, routing):
    weight, head, hidden, groups = _setup(shape, M, routing)
    _run(benchmark, lambda: torch.topk(hidden @ weight.T, TOP_K, dim=-1))


@pytest.mark.parametrize("shape,M,routing", [p for p in PARAMS if p[1] <= 16], ids=[i for i, p in zip(IDS, PARAMS) if p[1] <= 16])
def test_naive_gather(benchmark, shape, M, routing):
    weight, head, hidden, groups = _setup(shape, M, routing)
    assert groups.shape[1] == ACTIVE
    _run(benchmark, lambda: _naive_topk(hidden, weight, groups, TOP_K))
