"""Tree attention: the Triton kernel (interpreter on the CPU, bf16 on the GPU) against the reference."""

import pytest
import torch

from coral_fast import DraftTree, tree_attention
from coral_fast.kernels.tree_attention import (
    _tree_attention_triton,
    pack_tree_mask,
    tree_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_parents(num_nodes, generator=None):
    """parents[i] uniform in [-1, i): random shapes of trees, chains and bushes alike."""
    if num_nodes == 0:
        return torch.zeros(0, dtype=torch.int64)
    upper = torch.arange(num_nodes) + 1  # choices -1 .. i-1
    return (torch.rand(num_nodes, generator=generator) * upper).floor().to(torch.int64) - 1


def random_tree(num_nodes, device=DEVICE):
    return DraftTree.from_parents(random_parents(num_nodes), device=device)


def naive_attention(q, k, v, visible, scale):
    """float64, one (batch, head, query) at a time: an independent check of the reference itself."""
    batch, num_q_heads, num_queries, _ = q.shape
    group = num_q_heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_q_heads):
            for i in range(num_queries):
                keys = visible[b][i]
                s = (k[b, h // group, keys].double() @ q[b, h, i].double()) * scale
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // group, keys].double()
    return out


def make_inputs(batch, num_q_heads, num_kv_heads, num_queries, num_slots, head_dim, dtype, device=DEVICE):
    q = torch.randn(batch, num_q_heads, num_queries, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, num_kv_heads, num_slots, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, num_kv_heads, num_slots, head_dim, dtype=dtype, device=device)
    return q, k, v


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output (unwritten or masked-out row)"
    return ((out - ref).norm() / ref.norm()).item()


def test_reference_matches_naive_loops(seed):
    batch, num_q_heads, num_kv_heads, num_queries, prefix, head_dim = 2, 4, 2, 6, 5, 16
    q, k, v = make_inputs(batch, num_q_heads, num_kv_heads, num_queries, prefix + num_queries, head_dim, torch.float32, "cpu")
    trees = [random_tree(num_queries, "cpu") for _ in range(batch)]
    mask = torch.stack([t.mask for t in trees])
    visible = [[torch.cat([torch.ones(prefix, dtype=torch.bool), mask[b, i]]) for i in range(num_queries)] for b in range(batch)]
    want = naive_attention(q, k, v, visible, 0.3)
    got = tree_attention_reference(q, k, v, mask, scale=0.3)
    assert rel_err(got, want) < 1e-6


# (B, Hq, Hkv, T, L, D, dtype): odd sizes, GQA groups of 1/3/4, T = 1 and 128, every head dim
CASES = [
    (2, 4, 2, 7, 45, 64, torch.float32),
    (1, 3, 1, 1, 10, 64, torch.float16),  # plain decode: a single query
    (3, 9, 3, 13, 29, 64, torch.float16),  # SmolLM2 heads
    (2, 2, 2, 33, 100, 128, torch.float32),
    (1, 4, 1, 20, 70, 256, torch.float16),  # Gemma 3 270M heads
    (1, 1, 1, 128, 3, 32, torch.float32),  # the largest tree, tiny prefix
    (2, 2, 1, 5, 0, 16, torch.float16),  # no prefix at all
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_T{}_L{}_D{}_{}".format(*c[:6], str(c[6])[6:]))
def test_triton_matches_reference(case, seed):
    batch, num_q_heads, num_kv_heads, num_queries, prefix, head_dim, dtype = case
    q, k, v = make_inputs(batch, num_q_heads, num_kv_heads, num_queries, prefix + num_queries, head_dim, dtype)
    # a different tree per sequence in one case, one shared tree in the others
    if batch > 1 and num_queries > 10:
        mask = torch.stack([random_tree(num_queries).mask for _ in range(batch)])
    else:
        mask = random_tree(num_queries).mask
    out = torch.full_like(q, float("nan"))
    tree_attention(q, k, v, mask, impl="triton", out=out)
    ref = tree_attention_reference(q, k, v, mask)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_prefix_merge(num_splits, seed):
    """Flash-decoding splits (forced): partial results merged by log-sum-exp, one split tree-only."""
    q, k, v = make_inputs(2, 6, 2, 11, 83 + 11, 64, torch.float32)
    tree = random_tree(11)
    out = _tree_attention_triton(q, k, v, pack_tree_mask(tree.mask), 0.125, None, None, None, num_splits=num_splits, block_n=16)
    ref = tree_attention_reference(q, k, v, tree.mask, scale=0.125)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_draft_tree_argument_and_custom_scale(seed):
    q, k, v = make_inputs(1, 4, 2, 9, 40, 64, torch.float16)
    tree = random_tree(9)
    out = tree_attention(q, k, v, tree, impl="triton", scale=0.05)
    ref = tree_attention_reference(q, k, v, tree.mask, scale=0.05)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_static_cache_with_kv_len(seed):
    """Static buffers [B, Hkv, S_max, D]: only kv_len[b] slots valid; the rest is NaN and must not be read."""
    batch, num_q_heads, num_kv_heads, num_queries, s_max, head_dim = 3, 4, 2, 8, 150, 64
    q, k, v = make_inputs(batch, num_q_heads, num_kv_heads, num_queries, s_max, head_dim, torch.float32)
    kv_len = torch.tensor([8, 77, 150], dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(kv_len.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    mask = torch.stack([random_tree(num_queries).mask for _ in range(batch)])
    out = torch.full_like(q, float("nan"))
    tree_attention(q, k, v, mask, impl="triton", kv_len=kv_len, out=out)
    for b, n in enumerate(kv_len.tolist()):
        ref = tree_attention_reference(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], mask[b])
        assert rel_err(out[b : b + 1], ref) < TOL[torch.float32]
    # splits sized from S_max: those past a short sequence exit, the merge skips them
    out2 = _tree_attention_triton(q, k, v, pack_tree_mask(mask), 0.125, kv_len, None, None, num_splits=4, block_n=16)
    ref_all = tree_attention_reference(q, k.nan_to_num(), v.nan_to_num(), mask, scale=0.125, kv_len=kv_len)
    assert rel_err(out2, ref_all) < TOL[torch.float32]


def test_int_kv_len(seed):
    q, k, v = make_inputs(2, 2, 1, 6, 64, 64, torch.float16)
    tree = random_tree(6)
    out = tree_attention(q, k, v, tree.mask, impl="triton", kv_len=41)
    ref = tree_attention_reference(q, k[:, :, :41], v[:, :, :41], tree.mask)
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("per_batch_positions", [False, True])
def test_sliding_window(per_batch_positions, seed):
    """Gemma 3 local layers: prefix slot j visible iff j > position - window; tree keys by the mask only."""
    batch, num_q_heads, num_kv_heads, num_queries, prefix, head_dim, window = 2, 4, 1, 10, 90, 64, 37
    q, k, v = make_inputs(batch, num_q_heads, num_kv_heads, num_queries, prefix + num_queries, head_dim, torch.float32)
    tree = random_tree(num_queries)
    positions = prefix + tree.depth
    if per_batch_positions:
        positions = torch.stack([positions, positions - 3])
    out = _tree_attention_triton(q, k, v, tree.mask_bits.unsqueeze(0), 0.125, None, window, positions, block_n=16, num_splits=3)
    ref = tree_attention_reference(q, k, v, tree.mask, scale=0.125, window=window, query_positions=positions)
    assert rel_err(out, ref) < TOL[torch.float32]
    # the window really hides keys: without it the answer differs
    assert rel_err(tree_attention_reference(q, k, v, tree.mask, scale=0.125), ref) > 1e-3
    out = tree_attention(q, k, v, tree.mask, impl="triton", window=window, query_positions=positions)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_out_with_strides(seed):
    """Writing into a [B, T, H, D] buffer seen as [B, H, T, D] (what an HF attention function returns)."""
    q, k, v = make_inputs(2, 4, 2, 5, 30, 64, torch.float16)
    tree = random_tree(5)
    buf = torch.full((2, 5, 4, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    tree_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, tree.mask, impl="triton", out=buf.transpose(1, 2))
    ref = tree_attention_reference(q, k, v, tree.mask)
    assert rel_err(buf.transpose(1, 2), ref) < TOL[torch.float16]


def test_auto_on_cpu_is_reference(seed):
    q, k, v = make_inputs(1, 2, 1, 4, 12, 64, torch.float32, "cpu")
    tree = random_tree(4, "cpu")
    assert torch.equal(tree_attention(q, k, v, tree.mask), tree_attention_reference(q, k, v, tree.mask))


def test_bad_inputs_raise():
    q, k, v = make_inputs(1, 4, 2, 4, 10, 64, torch.float32, "cpu")
    mask = random_tree(4, "cpu").mask
    with pytest.raises(ValueError, match="4-D"):
        tree_attention(q[0], k, v, mask)
    with pytest.raises(ValueError, match="4-D"):
        tree_attention(q.tolist(), k, v, mask)
    with pytest.raises(ValueError, match="4-D"):
        tree_attention(q, k[0], v, mask)
    with pytest.raises(ValueError, match="the tree has 5 nodes"):
        tree_attention(q, k, v, random_tree(5, "cpu"))
    with pytest.raises(ValueError, match="DraftTree"):
        tree_attention(q, k, v, object())
    with pytest.raises(ValueError, match="share a dtype"):
        tree_attention(q, k.half(), v, mask)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention(q[:, :3], k, v, mask)
    with pytest.raises(ValueError, match="head dim"):
        tree_attention(q[..., :48], k[..., :48], v[..., :48], mask)
    with pytest.raises(ValueError, match="same shape"):
        tree_attention(q, k, v[:, :, :9], mask)
    with pytest.raises(ValueError, match="bool"):
        tree_attention(q, k, v, mask.float())
    with pytest.raises(ValueError, match=r"\[T, T\]"):
        tree_attention(q, k, v, mask[:3, :3])
    not_tree = mask.clone()
    not_tree[0, 3] = True
    with pytest.raises(ValueError, match="lower-triangular"):
        tree_attention(q, k, v, not_tree)
    no_diag = mask.clone()
    no_diag[2, 2] = False
    with pytest.raises(ValueError, match="lower-triangular"):
        tree_attention(q, k, v, no_diag)
    with pytest.raises(ValueError, match="query_positions"):
        tree_attention(q, k, v, mask, window=8)
    with pytest.raises(ValueError, match="kv_len"):
        tree_attention(q, k, v, mask, kv_len=torch.tensor([11]))
    with pytest.raises(ValueError, match="kv_len"):
        tree_attention(q, k, v, mask, kv_len=3)
    with pytest.raises(ValueError, match="impl"):
        tree_attention(q, k, v, mask, impl="cuda")
    with pytest.raises(ValueError, match="1 to 128"):
        big = torch.zeros(1, 1, 129, 64)
        tree_attention(big, big, big, torch.ones(129, 129, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape",
    [(1, 32, 8, 64, 2048, 128), (8, 32, 8, 16, 512, 128), (2, 9, 3, 64, 700, 64), (2, 4, 1, 64, 1500, 256), (3, 8, 8, 1, 4000, 128), (1, 4, 2, 128, 300, 64)],
)
def test_cuda_bf16_matches_reference(shape, seed):
    batch, num_q_heads, num_kv_heads, num_queries, prefix, head_dim = shape
    q, k, v = make_inputs(batch, num_q_heads, num_kv_heads, num_queries, prefix + num_queries, head_dim, torch.bfloat16, "cuda")
    mask = torch.stack([random_tree(num_queries, "cuda").mask for _ in range(batch)])
    out = torch.full_like(q, float("nan"))
    tree_attention(q, k, v, mask, out=out)
    ref = tree_attention_reference(q.float(), k.float(), v.float(), mask)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes_with_window(dtype, seed):
    q, k, v = make_inputs(2, 4, 1, 40, 1200, 256, dtype, "cuda")
    tree = random_tree(40, "cuda")
    positions = 1200 - 40 + tree.depth
    out = tree_attention(q, k, v, tree, kv_len=torch.tensor([1200, 1000], device="cuda"), window=512, query_positions=positions)
    ref = tree_attention_reference(q, k, v, tree.mask, kv_len=torch.tensor([1200, 1000], device="cuda"), window=512, query_positions=positions)
    assert rel_err(out, ref) < TOL[dtype] * (5 if dtype == torch.float32 else 1)


@pytest.mark.cuda
def test_cuda_graph_capture_with_kv_len(seed):
    """check=False and a device kv_len: the call captures in a CUDA graph and replays for new lengths."""
    batch, s_max, num_queries = 2, 3000, 24
    q, k, v = make_inputs(batch, 9, 3, num_queries, s_max, 64, torch.bfloat16, "cuda")
    tree = random_tree(num_queries, "cuda")
    kv_len = torch.tensor([500, 2900], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    tree_attention(q, k, v, tree, kv_len=kv_len, check=False, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tree_attention(q, k, v, tree, kv_len=kv_len, check=False, out=out)
    for lengths in ([500, 2900], [24, 1777], [3000, 64]):
        kv_len.copy_(torch.tensor(lengths, dtype=torch.int32))
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        ref = tree_attention_reference(q.float(), k.float(), v.float(), tree.mask, kv_len=kv_len)
        assert rel_err(out, ref) < TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------- masks
def _chain_mask(num_nodes, device="cpu"):
    return DraftTree.from_parents(list(range(-1, num_nodes - 1)), device=device).mask


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_mask_not_ancestor_closed(impl, seed):
    """Lower-triangular with a True diagonal but a node that sees its parent and not its grandparent:
    refused with check=True; with check=False the kernel computes what the mask says, like the reference."""
    T = 7
    q, k, v = make_inputs(1, 4, 2, T, 20, 16, torch.float32, DEVICE)
    mask = _chain_mask(T, DEVICE)
    mask[5, 2] = False  # 5 sees 4 and 3, which see 2
    with pytest.raises(ValueError, match="ancestor-closed"):
        tree_attention(q, k, v, mask, impl=impl)
    out = tree_attention(q, k, v, mask, impl=impl, check=False)
    assert rel_err(out, tree_attention_reference(q, k, v, mask)) < TOL[torch.float32]


@pytest.mark.interpreter
def test_checked_mask_is_reused_until_written(seed):
    """The same mask tensor is checked and packed once; an in-place write makes it new again."""
    import coral_fast.kernels.tree_attention as ta

    q, k, v = make_inputs(1, 2, 1, 5, 12, 16, torch.float32, DEVICE)
    mask = random_tree(5).mask.clone()
    first = tree_attention(q, k, v, mask, impl="triton")
    calls = []
    real = ta.mask_problem
    try:
        ta.mask_problem = lambda m: calls.append(1) or real(m)
        assert torch.equal(tree_attention(q, k, v, mask, impl="triton"), first)
        assert not calls
        mask[4, 4] = False  # in place: the version counter moves, and the diagonal is broken
        with pytest.raises(ValueError, match="diagonal"):
            tree_attention(q, k, v, mask, impl="triton")
        assert calls, "an in-place write must trigger a new check"
    finally:
        ta.mask_problem = real


def test_pack_mask_bits_lives_with_the_kernel():
    import coral_fast.kernels.tree_attention as ta
    import coral_fast.tree as tree_module

    assert tree_module.pack_mask_bits is ta.pack_mask_bits
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(ta.repeat_kv(x, 3)[:, 4], x[:, 1]) and ta.repeat_kv(x, 1) is x


# --- eager launches: kernels/_launch.py (its cache logic is tested in test_grouped_head.py) ----------
@pytest.mark.interpreter
def test_interpreter_takes_triton_launch(seed):
    from coral_fast.kernels import tree_attention as ta

    q, k, v = make_inputs(1, 4, 2, 9, 40, 16, torch.float32, "cpu")
    tree = random_tree(9, "cpu")
    before = ta._launch_split.direct_launches
    for _ in range(2):
        out = tree_attention(q, k, v, tree, impl="triton")
    assert ta._launch_split.direct_launches == before and not ta._launch_split.entries
    assert rel_err(out, tree_attention_reference(q, k, v, tree.mask)) < TOL[torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("heads,head_dim,num_queries", [((32, 8), 128, 64), ((9, 3), 64, 37), ((4, 1), 256, 13)])
def test_direct_launch_equals_triton_launch_gpu(heads, head_dim, num_queries, monkeypatch, seed):
    """Eager bf16 calls through the direct launcher give bit-identical results to Triton's launch: two
    different inputs in a row, a KV buffer of another length, a bool mask, a window with kv_len."""
    from coral_fast.kernels import _launch
    from coral_fast.kernels import tree_attention as ta

    monkeypatch.setattr(ta.eager_graphs, "enabled", False)  # launches, not graph replays (test_replay.py)
    num_q_heads, num_kv_heads = heads
    tree = random_tree(num_queries, "cuda")

    def both(*args, **kwargs):
        monkeypatch.setattr(_launch, "_ENV_ON", False)
        want = tree_attention(*args, **kwargs)
        monkeypatch.setattr(_launch, "_ENV_ON", True)
        before = ta._launch_split.direct_launches
        got = tree_attention(*args, **kwargs)
        return want, got, ta._launch_split.direct_launches - before

    direct = 0
    for slots in (3001, 3001, 5000, 777):  # the same buffer size twice, then other KV buffers
        q, k, v = make_inputs(1, num_q_heads, num_kv_heads, num_queries, slots, head_dim, torch.bfloat16, "cuda")
        tree_attention(q, k, v, tree)  # a new shape's first call takes Triton's launch
        for mask in (tree, tree.mask):
            want, got, used = both(q, k, v, mask)
            assert torch.equal(got, want)
            assert rel_err(got, tree_attention_reference(q, k, v, tree.mask)) < TOL[torch.bfloat16]
            direct += used
    assert direct >= 6
    q, k, v = make_inputs(2, num_q_heads, num_kv_heads, num_queries, 1500, head_dim, torch.bfloat16, "cuda")
    kv_len = torch.tensor([1500, 900], device="cuda")
    positions = torch.stack([torch.arange(num_queries) + 1400, torch.arange(num_queries) + 800]).cuda()
    for _ in range(2):
        want, got, used = both(q, k, v, tree, kv_len=kv_len, window=512, query_positions=positions)
        assert torch.equal(got, want)
    assert used == 1
    ref = tree_attention_reference(q, k, v, tree.mask, kv_len=kv_len, window=512, query_positions=positions)
    assert rel_err(got, ref) < TOL[torch.bfloat16]
