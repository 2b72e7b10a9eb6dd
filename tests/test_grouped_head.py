"""Grouped LM head: the Triton kernel (interpreter on the CPU, bf16 on the GPU) against the reference."""
import pytest
import torch

from coral_fast import GroupedLMHead, GroupRouter, RoutedLMHead, VocabGrouping
from coral_fast.kernels._dispatch import interpreter_enabled
from coral_fast.kernels import grouped_head_topk as _kernel_mod  # noqa: F401  (read by a jit test kernel)
from coral_fast.kernels.grouped_head_topk import grouped_head_topk_reference

HAS_CUDA = torch.cuda.is_available()
# CPU tensors through the interpreter (CI); on a GPU machine the bf16 cases below cover the kernel
needs_triton = pytest.mark.skipif(not interpreter_enabled(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _random_groups(M, A, G, device, shared_pool=None):
    """[M, A] distinct group ids per row; with shared_pool, rows draw from the same few groups."""
    pool = torch.randperm(G)[:shared_pool] if shared_pool else torch.arange(G)
    rows = [pool[torch.randperm(pool.numel())[:A]] for _ in range(M)]
    return torch.stack(rows).to(device)


def _full_logprobs(hidden, weight, grouping, groups):
    """Independent oracle: per row, log-softmax over its active tokens, in original id space, fp64."""
    M = hidden.shape[0]
    out = torch.full((M, grouping.vocab_size), float("-inf"), dtype=torch.float64)
    logits = hidden.double().cpu() @ weight.double().cpu().T  # original id order
    for m in range(M):
        active = torch.isin(grouping.group_of, groups[m].cpu().long())
        out[m, active] = torch.log_softmax(logits[m, active], dim=0)
    return out


def _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol):
    """Tie-proof check: values equal the oracle's top-k; every returned id is active, distinct, and
    carries its own log-prob; ids agree with the oracle wherever values are separated."""
    M = hidden.shape[0]
    assert ids.shape == (M, k) and ids.dtype == torch.int64
    assert logprobs.shape == (M, k) and logprobs.dtype == torch.float32
    ids, logprobs = ids.cpu(), logprobs.cpu().double()
    assert bool(torch.isfinite(logprobs).all()), "unwritten or NaN outputs"
    full = _full_logprobs(hidden, weight, grouping, groups)
    want_vals, want_ids = full.topk(k, dim=1)
    torch.testing.assert_close(logprobs, want_vals, atol=atol, rtol=0)
    assert bool((logprobs[:, 1:] <= logprobs[:, :-1] + 1e-6).all()), "not sorted descending"
    assert bool((ids >= 0).all() and (ids < grouping.vocab_size).all())
    torch.testing.assert_close(full.gather(1, ids), logprobs, atol=atol, rtol=0)
    for m in range(M):
        assert ids[m].unique().numel() == k, f"row {m}: repeated ids"
    gaps = want_vals[:, :-1] - want_vals[:, 1:]
    separated = torch.ones_like(want_vals, dtype=torch.bool)
    separated[:, :-1] &= gaps > 4 * atol
    separated[:, 1:] &= gaps > 4 * atol
    assert torch.equal(ids[separated], want_ids[separated])


# (V, H, G, M, A, k, grouping): odd V (not a multiple of G or of the vocab tile), M=1 and 64, A=1 and G
CASES = [
    (1001, 80, 7, 1, 1, 1, "contiguous"),
    (1001, 80, 7, 1, 7, 64, "contiguous"),
    (777, 48, 5, 64, 1, 64, "counts"),
    (777, 48, 5, 64, 5, 1, "contiguous"),
    (2999, 72, 11, 13, 3, 10, "counts"),
    (613, 40, 3, 17, 2, 33, "contiguous"),
]


def _grouping(kind, V, G):
    if kind == "contiguous":
        return VocabGrouping.contiguous(V, G)
    return VocabGrouping.from_token_counts(torch.rand(V) * 1000, G)


@needs_triton
@pytest.mark.parametrize("V,H,G,M,A,k,kind", CASES)
def test_triton_matches_reference_cpu(V, H, G, M, A, k, kind, seed):
    dtype = torch.float16 if (V + M) % 2 else torch.float32  # interpreter: fp16/fp32 operands only
    grouping = _grouping(kind, V, G)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    hidden = torch.randn(M, H).to(dtype)
    groups = _random_groups(M, A, G, "cpu")
    head = GroupedLMHead(weight, grouping)
    ids = torch.full((M, k), -7, dtype=torch.int64)
    logprobs = torch.full((M, k), float("nan"))
    head.topk(hidden, groups, k, impl="triton", out=(ids, logprobs))
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=2e-4)
    ref_ids, ref_lp = head.topk(hidden, groups, k, impl="reference")
    torch.testing.assert_close(logprobs, ref_lp, atol=2e-4, rtol=0)


@needs_triton
@pytest.mark.parametrize("fuse", [False, True])
def test_triton_row_blocks_fused_and_not(fuse, seed):
    """Several row blocks per group (M=37 > BLOCK_M=16, rows sharing groups), H not a multiple of the
    K step (masked K tail), merged by a merge kernel per row or by the last program (fused)."""
    import coral_fast.kernels.grouped_head_topk as kernel

    V, H, G, M, A, k = 389, 24, 5, 37, 2, 7
    grouping = VocabGrouping.contiguous(V, G)
    weight, hidden = torch.randn(V, H), torch.randn(M, H)
    groups = _random_groups(M, A, G, "cpu", shared_pool=3)
    config = kernel.KernelConfig(16, 32, 16, 4, 2, 1, fuse_merge=fuse)
    ids = torch.full((M, k), -7, dtype=torch.int64)
    logprobs = torch.full((M, k), float("nan"))
    kernel.grouped_head_topk_triton(
        hidden, weight, grouping.offsets, grouping.order, groups, k, grouping.max_group_size, config,
        out=(ids, logprobs),
    )
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=1e-4)
    if fuse:  # the last program resets the arrival counter for the next launch
        assert int(kernel._counter(torch.device("cpu"))[0]) == 0


@needs_triton
@pytest.mark.parametrize("fuse", [False, True])
def test_triton_merge_in_chunks_with_ties(monkeypatch, fuse, seed):
    """Many tiles (narrow tiles, tile partials and candidate keys merged in several chunks), k above
    the tile width, and heavy ties: the weight has only 5 distinct rows, so most logits are equal."""
    import coral_fast.kernels.grouped_head_topk as kernel

    monkeypatch.setattr(kernel, "MERGE_BLOCK_P", 16)
    monkeypatch.setattr(kernel, "MERGE_BLOCK_C", 64)
    V, H, G, M, A, k = 701, 16, 4, 3, 3, 37
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    weight = torch.randn(5, H)[torch.randint(0, 5, (V,))]
    hidden = torch.randn(M, H)
    groups = _random_groups(M, A, G, "cpu")
    config = kernel.KernelConfig(16, 16, 16, 4, 2, 2, fuse_merge=fuse)
    relaid = GroupedLMHead(weight, grouping).weight
    ids, logprobs = kernel.grouped_head_topk_triton(
        hidden, relaid, grouping.offsets, grouping.order, groups, k, grouping.max_group_size, config
    )
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=1e-4)


@needs_triton
def test_triton_fused_repeated_calls_and_poison(seed):
    """The fused path called back to back on fresh inputs: every call's outputs are fully written
    (poisoned before) and right, so the counter is back at zero after each launch."""
    import coral_fast.kernels.grouped_head_topk as kernel

    V, H, G, A, k = 1001, 80, 7, 3, 10  # V odd, not a multiple of G or of the tile
    grouping = VocabGrouping.contiguous(V, G)
    weight = (torch.randn(V, H) / H**0.5).half()
    head = GroupedLMHead(weight, grouping)
    config = kernel.KernelConfig(16, 128, 32, 4, 2, 2, fuse_merge=True)
    for _ in range(3):
        hidden = torch.randn(1, H).half()
        groups = _random_groups(1, A, G, "cpu")
        ids = torch.full((1, k), -7, dtype=torch.int64)
        logprobs = torch.full((1, k), float("nan"))
        kernel.grouped_head_topk_triton(hidden, head.weight, head.offsets, head.order, groups, k,
                                        head.max_group_size, config, out=(ids, logprobs))
        _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=2e-4)
        assert int(kernel._counter(torch.device("cpu"))[0]) == 0


@needs_triton
def test_packed_keys_order_negative_and_inf():
    """The merge's int64 keys order logits like floats: negatives, zeros, -inf, ties by row."""
    import triton
    import triton.language as tl

    kernel = _kernel_mod

    @triton.jit
    def roundtrip(val_ptr, row_ptr, key_ptr, out_val_ptr, out_row_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        key = _kernel_mod._pack_key(tl.load(val_ptr + offs), tl.load(row_ptr + offs))
        tl.store(key_ptr + offs, key)
        val, row = _kernel_mod._unpack_key(key)
        tl.store(out_val_ptr + offs, val)
        tl.store(out_row_ptr + offs, row)

    vals = torch.tensor([-3.5, -0.0, 0.0, 1e-30, -1e-30, 2.0, float("-inf"), 7.25, -7.25, 2.0, 5e3, -5e3,
                         0.5, -0.5, 1.0, -1.0])
    rows = torch.tensor([5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 2**31 - 1], dtype=torch.int32)
    keys = torch.empty(16, dtype=torch.int64)
    out_val, out_row = torch.empty(16), torch.empty(16, dtype=torch.int32)
    roundtrip[(1,)](vals, rows, keys, out_val, out_row, N=16)
    assert torch.equal(out_val, vals) and torch.equal(out_row, rows)
    by_key = keys.argsort()
    by_val = sorted(range(16), key=lambda i: (vals[i].item(), rows[i].item()))
    assert by_key.tolist() == by_val
    assert bool((keys > kernel.MIN_KEY_HOST).all())


def test_reference_matches_oracle(seed):
    V, H, G, M, A, k = 1203, 32, 10, 9, 4, 20
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    weight, hidden = torch.randn(V, H), torch.randn(M, H)
    groups = _random_groups(M, A, G, "cpu", shared_pool=6)
    ids, logprobs = GroupedLMHead(weight, grouping).topk(hidden, groups, k, impl="reference")
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=1e-4)


def test_contiguous_grouping_does_not_copy_weight():
    weight = torch.randn(100, 8)
    assert GroupedLMHead(weight, VocabGrouping.contiguous(100, 7)).weight.data_ptr() == weight.data_ptr()
    lm = RoutedLMHead(weight, VocabGrouping.contiguous(100, 7), 2)
    assert lm.weight.data_ptr() == weight.data_ptr() and lm.relaid_weight is None


@needs_triton
def test_triton_check_false_same_result(seed):
    V, H, G, M, A, k = 515, 32, 4, 3, 2, 5
    grouping = VocabGrouping.contiguous(V, G)
    weight, hidden = torch.randn(V, H), torch.randn(M, H)
    groups = _random_groups(M, A, G, "cpu").int()
    head = GroupedLMHead(weight, grouping)
    a = head.topk(hidden, groups, k, impl="triton", check=True)
    b = head.topk(hidden, groups, k, impl="triton", check=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "case,match",
    [
        ("group_out_of_range", "lie in"),
        ("negative_group", "lie in"),
        ("duplicate_group", "duplicate"),
        ("hidden_size", "hidden size"),
        ("hidden_dtype", "dtype"),
        ("groups_dtype", "int32 or int64"),
        ("groups_rows", r"\[M, A\]"),
        ("k_too_large", "active vocabulary"),
        ("k_zero", "positive"),
        ("k_above_triton_limit", "limit"),
        ("device", "device"),
        ("too_many_groups", "active groups"),
    ],
)
def test_bad_inputs_raise(case, match):
    V, H, G = 100, 8, 5  # groups of 20 tokens
    head = GroupedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G))
    hidden, groups, k, impl = torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [4, 0]]), 5, "reference"
    if case == "group_out_of_range":
        groups[1, 1] = G
    elif case == "negative_group":
        groups[0, 0] = -1
    elif case == "duplicate_group":
        groups[2] = torch.tensor([3, 3])
    elif case == "hidden_size":
        hidden = torch.randn(3, H + 1)
    elif case == "hidden_dtype":
        hidden = torch.ones(3, H, dtype=torch.int64)
    elif case == "groups_dtype":
        groups = groups.float()
    elif case == "groups_rows":
        groups = groups[:2]
    elif case == "k_too_large":
        groups, k = groups[:, :1], 21
    elif case == "k_zero":
        k = 0
    elif case == "k_above_triton_limit":
        k, impl = 65, "triton"
        if not interpreter_enabled():
            pytest.skip("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    elif case == "device":
        hidden = torch.randn(3, H, device="meta")
    elif case == "too_many_groups":
        groups = torch.arange(G + 1).repeat(3, 1)
    with pytest.raises(ValueError, match=match):
        head.topk(hidden, groups, k, impl=impl)


def test_bad_construction_raises():
    g = VocabGrouping.contiguous(100, 5)
    with pytest.raises(ValueError, match="rows"):
        GroupedLMHead(torch.randn(99, 8), g)
    with pytest.raises(ValueError, match="dtype"):
        GroupedLMHead(torch.ones(100, 8, dtype=torch.int32), g)
    with pytest.raises(ValueError, match="active_groups"):
        RoutedLMHead(torch.randn(100, 8), g, 6)


def test_router_select_shapes_and_order(seed):
    router = GroupRouter(24, 9)
    hidden = torch.randn(2, 5, 24)
    scores = router(hidden)
    assert scores.shape == (2, 5, 9)
    sel = router.select(hidden, 3)
    assert sel.shape == (2, 5, 3) and sel.dtype == torch.int64
    torch.testing.assert_close(scores.gather(-1, sel), scores.topk(3, dim=-1).values)
    with pytest.raises(ValueError):
        router.select(hidden, 10)
    with pytest.raises(ValueError, match="hidden size"):
        router(torch.randn(3, 23))


def test_routed_head_drop_in(seed):
    V, H, G, a, M, k = 301, 16, 6, 2, 5, 7
    weight = torch.randn(V, H)
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    lm = RoutedLMHead(weight, grouping, a)
    hidden = torch.randn(M, H)
    torch.testing.assert_close(lm(hidden), hidden @ weight.T)  # forward = dense logits, original ids
    assert lm.router_logits(hidden).shape == (M, G)
    groups = lm.select_groups(hidden)
    assert groups.shape == (M, a)
    ids, logprobs = lm.topk(hidden, k)
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=1e-4)
    # the target's weight is not saved, nor the layout buffers: the router only
    state = lm.state_dict()
    assert state and all(key.startswith("router.") for key in state)
    # a saved router + grouping restore the same head; switching groupings re-lays the weight
    other = VocabGrouping.from_token_counts(torch.rand(V), G)
    donor = RoutedLMHead(weight, other, a)
    lm.load_state_dict(donor.state_dict())
    lm.set_grouping(VocabGrouping.from_state_dict(other.state_dict()))
    torch.testing.assert_close(lm.topk(hidden, k)[1], donor.topk(hidden, k)[1])
    assert torch.equal(lm.order, other.order)


# --- GPU (bf16) ----------------------------------------------------------------------------------
GPU_CASES = [
    # (V, H, G, M, A, k, grouping, shared_pool)
    (50021, 576, 32, 1, 1, 1, "contiguous", None),
    (50021, 576, 32, 1, 32, 64, "contiguous", None),
    (50021, 576, 32, 64, 1, 64, "counts", None),
    (50021, 576, 32, 64, 32, 1, "contiguous", None),
    (40961, 1000, 17, 64, 4, 10, "counts", 6),
    (33333, 4096, 32, 16, 4, 10, "contiguous", None),
    (262144, 640, 32, 5, 4, 64, "contiguous", 5),
]


@pytest.mark.cuda
@pytest.mark.parametrize("V,H,G,M,A,k,kind,pool", GPU_CASES)
def test_triton_bf16_gpu(V, H, G, M, A, k, kind, pool, seed):
    grouping = _grouping(kind, V, G)
    weight = (torch.randn(V, H, device="cuda") / H**0.5).bfloat16()
    hidden = torch.randn(M, H, device="cuda").bfloat16()
    groups = _random_groups(M, A, G, "cuda", shared_pool=pool)
    head = GroupedLMHead(weight, grouping)
    ids = torch.full((M, k), -7, dtype=torch.int64, device="cuda")
    logprobs = torch.full((M, k), float("nan"), device="cuda")
    head.topk(hidden, groups, k, impl="triton", out=(ids, logprobs))
    torch.cuda.synchronize()
    # bf16 operands, fp32 accumulation: only the summation order differs from the fp64 oracle
    _assert_topk_matches(ids, logprobs, hidden.float(), weight.float(), grouping, groups, k, atol=2e-3)
    ref_ids, ref_lp = grouped_head_topk_reference(
        hidden, head.weight, head.offsets, head.order, groups, k
    )
    torch.testing.assert_close(logprobs, ref_lp, atol=2e-3, rtol=0)
