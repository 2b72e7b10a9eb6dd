"""Grouped LM head: the Triton kernel (interpreter on the CPU, bf16 on the GPU) against the reference."""
import pytest
import torch

from coral_fast import GroupedLMHead, GroupRouter, RoutedLMHead, VocabGrouping
from coral_fast.kernels._dispatch import interpreter_enabled
from coral_fast.kernels.grouped_head_topk import grouped_head_topk_reference

HAS_CUDA = torch.cuda.is_available()
# CPU tensors through the interpreter (CI); on a GPU machine the bf16 cases below cover the kernel
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


# (V, H, G, M, A, k, grouping): odd V (not a multiple of G or of the vocab tile), M=1 and > 16, A=1 and G
CASES = [
    (1001, 80, 7, 1, 1, 1, "contiguous"),
    (1001, 80, 7, 1, 7, 64, "contiguous"),
    (777, 48, 5, 33, 1, 64, "counts"),  # M > 16: a 64-row block
    (777, 48, 5, 64, 5, 1, "contiguous"),
    (2999, 72, 11, 13, 3, 10, "counts"),
    (613, 40, 3, 17, 2, 33, "contiguous"),
]


def _grouping(kind, V, G):
    if kind == "contiguous":
        return VocabGrouping.contiguous(V, G)
    return VocabGrouping.from_token_counts(torch.rand(V) * 1000, G)


@pytest.mark.interpreter
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


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("gather", [True, False])
def test_triton_row_block_modes(gather, M, seed):
    """Several row blocks per group (M=37 > BLOCK_M=16, rows sharing groups), both row layouts; and
    M=1, whose epilogue runs on the one real row of the 16-row block."""
    from coral_fast.kernels.grouped_head_topk import KernelConfig, grouped_head_topk_triton

    V, H, G, A, k = 389, 24, 5, 2, 7
    grouping = VocabGrouping.contiguous(V, G)
    weight, hidden = torch.randn(V, H), torch.randn(M, H)
    groups = _random_groups(M, A, G, "cpu", shared_pool=3)
    config = KernelConfig(16, 32, 16, 4, 2, 1, gather=gather)
    ids, logprobs = grouped_head_topk_triton(
        hidden, weight, grouping.offsets, grouping.order, groups, k, grouping.max_group_size, config
    )
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=1e-4)


@pytest.mark.interpreter
def test_triton_merge_in_chunks_with_ties(monkeypatch, seed):
    """Many tiles (narrow tiles, chunked merge), k above the tile width, and heavy ties:
    the weight has only 5 distinct rows, so most logits are equal."""
    import coral_fast.kernels.grouped_head_topk as kernel

    monkeypatch.setattr(kernel, "MERGE_BLOCK_P", 16)
    V, H, G, M, A, k = 701, 16, 4, 3, 3, 37
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    weight = torch.randn(5, H)[torch.randint(0, 5, (V,))]
    hidden = torch.randn(M, H)
    groups = _random_groups(M, A, G, "cpu")
    config = kernel.KernelConfig(16, 16, 16, 4, 2, 2, gather=False)
    relaid = GroupedLMHead(weight, grouping).weight
    ids, logprobs = kernel.grouped_head_topk_triton(
        hidden, relaid, grouping.offsets, grouping.order, groups, k, grouping.max_group_size, config
    )
    _assert_topk_matches(ids, logprobs, hidden, weight, grouping, groups, k, atol=1e-4)


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


@pytest.mark.interpreter
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


# --- bad values: ValueError on the CPU with check=True; otherwise invalid rows (ids -1, NaN) --------
def _poison(case, hidden, groups, G):
    """Row 1 made invalid in one way; the other rows stay valid."""
    hidden, groups = hidden.clone(), groups.clone()
    if case == "nan":
        hidden[1, 3] = float("nan")
    elif case == "inf":
        hidden[1, 0] = float("inf")
    elif case == "-inf":
        hidden[1, 2] = float("-inf")
    elif case == "group_out_of_range":
        groups[1, 0] = G
    elif case == "negative_group":
        groups[1, -1] = -1
    elif case == "duplicate_group":
        groups[1, 1] = groups[1, 0]
    return hidden, groups


BAD_ROWS = ["nan", "inf", "-inf", "group_out_of_range", "negative_group", "duplicate_group"]


@pytest.mark.parametrize("case", BAD_ROWS[:3])
def test_non_finite_hidden_refused_on_cpu(case):
    V, H, G = 100, 8, 5
    head = GroupedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G))
    hidden, groups = _poison(case, torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [4, 0]]), G)
    with pytest.raises(ValueError, match="NaN or inf"):
        head.topk(hidden, groups, 5)
    lm = RoutedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        lm.topk(hidden, 5)


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 20])
@pytest.mark.parametrize("case", ["nan", "inf", "group_out_of_range", "duplicate_group", "k_above_active"])
def test_invalid_rows_agree_without_check(case, M, seed):
    """check=False (what CUDA gets in either mode): the bad row is ids -1, log-probs NaN from the kernel
    and the reference alike, and the other rows are what they are without it. M=1: the one-row path."""
    V, H, G, A, k = 613, 16, 6, 3, 7
    if case == "k_above_active":
        G = 61  # groups of ~10 tokens: k past a row's 3 groups stays within the Triton path's k <= 64
    grouping = VocabGrouping.from_token_counts(torch.rand(V), G)
    head = GroupedLMHead(torch.randn(V, H) / H**0.5, grouping)
    hidden, groups = torch.randn(max(M, 2), H), _random_groups(max(M, 2), A, G, "cpu", shared_pool=4)
    bad_hidden, bad_groups = _poison(case, hidden, groups, G)
    if case == "k_above_active":
        bad_groups[1] = torch.argsort(grouping.group_sizes)[:A]  # the smallest groups: too few tokens
        k = int(grouping.group_sizes[bad_groups[1]].sum()) + 1
    if M == 1:  # the poisoned row alone
        hidden, groups, bad_hidden, bad_groups = hidden[1:2], groups[1:2], bad_hidden[1:2], bad_groups[1:2]
    bad = 0 if M == 1 else 1
    ref = head.topk(bad_hidden, bad_groups, k, impl="reference", check=False)
    got = head.topk(bad_hidden, bad_groups, k, impl="triton", check=False)
    for ids, lp in (ref, got):
        assert bool((ids[bad] == -1).all()) and bool(lp[bad].isnan().all())
    torch.testing.assert_close(got[1], ref[1], atol=2e-4, rtol=0, equal_nan=True)  # other rows: same rule
    assert torch.equal(got[0] == -1, ref[0] == -1)
    if case != "k_above_active" and M > 1:  # the other rows as they are without the bad one
        good = torch.arange(hidden.shape[0]) != bad
        clean = head.topk(hidden, groups, k, impl="reference")
        torch.testing.assert_close(got[1][good], clean[1][good], atol=2e-4, rtol=0)


# --- eager launches: kernels/_launch.py ------------------------------------------------------------
class _FakeCompiled:
    """Stands in for a triton CompiledKernel: records what its launcher was called with."""

    def __init__(self):
        self.function, self.packed_metadata, self.calls = object(), object(), []

    def run(self, *launch):
        self.calls.append(launch)


class _FakeJit:
    """Stands in for a @triton.jit kernel: `fn[grid](**kwargs)` is Triton's launch (counted)."""

    arg_names = ["x_ptr", "N", "stride_x", "BLOCK"]

    def __init__(self):
        self.normal, self.compiled = [], _FakeCompiled()

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.normal.append((grid, kwargs))
            return self.compiled
        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    """Direct launches allowed on CPU tensors, a fake stream: the launcher's cache logic alone."""
    from coral_fast.kernels import _launch

    monkeypatch.setattr(_launch, "direct_launch_allowed", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 7, raising=False)
    monkeypatch.setattr(_launch, "_broken", False)
    return _launch


def test_arg_key_follows_triton_specialisation():
    from coral_fast.kernels._launch import _Unkeyable, arg_key

    buf = torch.zeros(64, dtype=torch.float32)
    assert arg_key(buf) == arg_key(torch.zeros(3, dtype=torch.float32))  # aligned fp32 either way
    assert arg_key(buf[1:]) != arg_key(buf)  # 4 bytes off: not 16-byte aligned
    assert arg_key(buf.half()) != arg_key(buf)
    assert arg_key(48) == arg_key(4096) != arg_key(47)  # divisible by 16 or not
    assert arg_key(1) != arg_key(3) and arg_key(3) == arg_key(5)
    assert arg_key(2**31) != arg_key(32) and arg_key(-16) != arg_key(16)
    assert arg_key(0.5) == arg_key(2.0) and arg_key(True) != arg_key(False) and arg_key(None) is None
    with pytest.raises(_Unkeyable):
        arg_key("a string")


def test_direct_launch_refused_off_cuda_and_when_switched_off(monkeypatch):
    from coral_fast.kernels import _launch

    assert not _launch.direct_launch_allowed(torch.device("cpu"))
    monkeypatch.setattr(_launch, "_ENV_ON", False)
    assert not _launch.direct_launch_allowed(torch.device("cuda"))
    monkeypatch.setattr(_launch, "_ENV_ON", True)
    monkeypatch.setattr(_launch, "_broken", True)
    assert not _launch.direct_launch_allowed(torch.device("cuda"))


def test_launcher_caches_per_specialisation(fake_cuda):
    fn = _FakeJit()
    launch = fake_cuda.Launcher(fn, dynamic=("x_ptr", "stride_x"))
    meta = {"N": 100, "BLOCK": 64, "num_warps": 4}
    x, y = torch.zeros(64), torch.ones(64)
    launch((3,), meta, x, 16, device=x.device)
    assert len(fn.normal) == 1 and launch.direct_launches == 0
    launch((3,), meta, y, 32, device=y.device)  # same specialisation: the compiled kernel's own launcher
    assert len(fn.normal) == 1 and launch.direct_launches == 1
    grid0, grid1, grid2, stream, function, packed, launch_metadata, _, _, *args = fn.compiled.calls[0]
    assert (grid0, grid1, grid2, stream) == (3, 1, 1, 7) and function is fn.compiled.function
    assert args[0] is y and args[1:] == [100, 32, 64]  # parameters in the kernel's order
    for x_new, stride in ((x[1:], 16), (x, 17), (x.double(), 16), (x, 1)):  # each a new specialisation
        launch((3,), meta, x_new, stride, device=x.device)
    assert len(fn.normal) == 5 and launch.direct_launches == 1
    other_meta = dict(meta)  # equal values, another dict: another key (metas are cached per shape)
    launch((3,), other_meta, x, 16, device=x.device)
    assert len(fn.normal) == 6
    for entry in launch.entries.values():  # no caller tensor is held past its call
        assert not any(isinstance(a, torch.Tensor) for a in entry[4])


def test_launcher_falls_back(fake_cuda, monkeypatch):
    fn = _FakeJit()
    launch = fake_cuda.Launcher(fn, dynamic=("x_ptr", "stride_x"))
    meta = {"N": 100, "BLOCK": 64}
    x = torch.zeros(64)
    launch((1,), meta, x, 16, device=x.device, direct=False)  # the custom ops' launches: never cached
    launch((1,), meta, x, 16, device=x.device, direct=False)
    assert len(fn.normal) == 2 and not launch.entries
    launch((1,), meta, "not keyable", 16, device=x.device)  # unknown argument type: Triton's launch
    assert not launch.entries

    def wrong_signature(*launch_args):
        raise TypeError("launcher takes other arguments")

    launch((1,), meta, x, 16, device=x.device)
    monkeypatch.setattr(fn.compiled, "run", wrong_signature)
    launch.entries = {key: (e[0], wrong_signature, *e[2:]) for key, e in launch.entries.items()}
    launch((1,), meta, x, 16, device=x.device)  # another triton's launcher: give up direct launches
    assert fake_cuda._broken and len(fn.normal) == 5 and not launch.entries
    with pytest.raises(ValueError, match="no parameters"):
        fake_cuda.Launcher(fn, dynamic=("y_ptr",))


@pytest.mark.interpreter
def test_interpreter_takes_triton_launch(seed):
    from coral_fast.kernels import grouped_head_topk as kernel

    V, H, G, M = 301, 48, 7, 3
    weight = torch.randn(V, H)
    head = GroupedLMHead(weight, VocabGrouping.contiguous(V, G))
    before = kernel._launch_partials.direct_launches
    for _ in range(2):
        ids, _ = head.topk(torch.randn(M, H), _random_groups(M, 2, G, "cpu"), 5, impl="triton")
    assert kernel._launch_partials.direct_launches == before and not kernel._launch_partials.entries


@pytest.mark.cuda
@pytest.mark.parametrize("V,H,G,M,A,k", [(5003, 160, 9, 1, 3, 10), (20011, 640, 16, 7, 4, 17), (32000, 4096, 32, 1, 4, 10)])
def test_direct_launch_equals_triton_launch_gpu(V, H, G, M, A, k, monkeypatch, seed):
    """Eager bf16 calls through the direct launcher give bit-identical results to Triton's launch: two
    different inputs in a row, an unaligned hidden view, then a new weight (another head)."""
    from coral_fast.kernels import _launch
    from coral_fast.kernels import grouped_head_topk as kernel

    monkeypatch.setattr(kernel.eager_graphs, "enabled", False)  # launches, not graph replays (test_replay.py)

    def both(head, hidden, groups):
        monkeypatch.setattr(_launch, "_ENV_ON", False)
        want = head.topk(hidden, groups, k)
        monkeypatch.setattr(_launch, "_ENV_ON", True)
        before = kernel._launch_partials.direct_launches
        got = head.topk(hidden, groups, k)
        return want, got, kernel._launch_partials.direct_launches - before

    grouping = VocabGrouping.contiguous(V, G)
    head = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device="cuda") * 0.05, grouping)
    head.topk(torch.randn(M, H, dtype=torch.bfloat16, device="cuda"), _random_groups(M, A, G, "cuda"), k)
    direct = 0
    for trial in range(3):
        hidden = torch.randn(M, H + 1, dtype=torch.bfloat16, device="cuda")
        hidden = hidden[:, 1:] if trial == 2 else hidden[:, :H].contiguous()  # trial 2: a 2-byte-offset view
        groups = _random_groups(M, A, G, "cuda")
        (want_ids, want_lp), (ids, lp), used = both(head, hidden, groups)
        assert torch.equal(ids, want_ids) and torch.equal(lp, want_lp)
        direct += used
        _assert_topk_matches(ids, lp, hidden.float(), head.weight.float(), grouping, groups, k, atol=2e-2)
    # at least one aligned call went direct (the H200 run saw 1 of 2 at M=1: a per-call argument can fall
    # in another specialisation class, whose first call then takes Triton's launch); equality is the point
    assert direct >= 1
    head2 = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device="cuda"), grouping)
    hidden, groups = torch.randn(M, H, dtype=torch.bfloat16, device="cuda"), _random_groups(M, A, G, "cuda")
    (want_ids, want_lp), (ids, lp), used = both(head2, hidden, groups)
    assert used == 1 and torch.equal(ids, want_ids) and torch.equal(lp, want_lp)
    _assert_topk_matches(ids, lp, hidden.float(), head2.weight.float(), grouping, groups, k, atol=2e-2)
