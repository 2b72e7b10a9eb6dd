"""pytest-benchmark view of tree attention (GPU only): `pytest bench/test_bench_attention.py --benchmark-only`.

The reported table with the floor and FlexAttention comes from `coral-fast bench attention`; this file
gives the same comparison in pytest-benchmark's format (warm L2, host-timed, so launch overhead shows).
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 64, 8192), (8, 64, 8192), (1, 16, 2048)]  # (B, T, L), Llama-3-8B heads 32/8/128


def _inputs(batch, num_queries, prefix_len):
    from coral_fast import DraftTree

    torch.manual_seed(0)
    parents = (torch.rand(num_queries) * (torch.arange(num_queries) + 1)).floor().long() - 1
    tree = DraftTree.from_parents(parents, device="cuda")
    q = torch.randn(batch, 32, num_queries, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, 8, prefix_len + num_queries, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    full_mask = torch.cat([torch.ones(num_queries, prefix_len, dtype=torch.bool, device="cuda"), tree.mask], 1)
    return tree, q, k, v, full_mask


def _run(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()

    call()
    benchmark.pedantic(call, rounds=50, warmup_rounds=5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_L{}".format(*s))
def test_tree_attention(benchmark, shape):
    from coral_fast import tree_attention

    tree, q, k, v, full_mask = _inputs(*shape)
    out = torch.empty_like(q)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True)
    tree_attention(q, k, v, tree, check=False, out=out)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 2e-2
    _run(benchmark, lambda: tree_attention(q, k, v, tree, check=False, out=out))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_L{}".format(*s))
def test_tree_attention_default_checks(benchmark, shape):
    """The public call as eager code makes it (check=True, a bool mask): issue 16's eager cost."""
    from coral_fast import tree_attention

    tree, q, k, v, full_mask = _inputs(*shape)
    _run(benchmark, lambda: tree_attention(q, k, v, tree.mask))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_L{}".format(*s))
def test_sdpa_tree_mask(benchmark, shape):
    tree, q, k, v, full_mask = _inputs(*shape)
    _run(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True))
