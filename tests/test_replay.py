"""Eager calls replayed from CUDA graphs (coral_fast/kernels/_replay.py): the cache's logic on the CPU
through a fake capture/replay backend, the two ops wired to it (the interpreter), and on the GPU the
real graphs against the direct launch."""

import pytest
import torch

from coral_fast import DraftTree, tree_attention
from coral_fast.grouping import VocabGrouping
from coral_fast.head import GroupedLMHead
from coral_fast.kernels import _replay
from coral_fast.kernels import grouped_head_topk as head_kernel
from coral_fast.kernels import tree_attention as ta
from coral_fast.kernels._replay import CudaGraphBackend, EagerGraphs


class FakeGraphs:
    """Capture = run once and keep the outputs; replay = run again on the static inputs and write the
    kept outputs (what a CUDA graph does to its static buffers)."""

    def __init__(self, usable=True, fail=False):
        self.ok, self.fail, self.runs = usable, fail, 0

    def usable(self, device):
        return self.ok

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = fn()

        def replay():
            self.runs += 1
            for kept, new in zip(outputs, fn()):
                kept.copy_(new)

        return replay, outputs


def matmul_op(cache, x, w, scale=1.0, out=None, bias=None):
    """A toy op: x streamed (and an optional streamed bias), w resident; counts its direct launches."""
    def launch(streamed, resident, out):
        (x, bias), (w,) = streamed, resident
        y = x @ w * scale + (0 if bias is None else bias)
        if out is None:
            return (y,)
        out[0].copy_(y)
        return out

    return cache("matmul", launch, (x, bias), (w,), (scale,), out)[0]


def test_key_streamed_by_layout_resident_by_address():
    cache = EagerGraphs(backend=FakeGraphs())
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    cpu = x.device

    def key(x, w, config=(1.0,), bias=None):
        return cache.key("matmul", cpu, config, (x, bias), (w,))

    assert key(x, w) == key(torch.randn(3, 4), w)  # another streamed tensor of the same layout
    assert key(x, w) != key(torch.randn(3, 5)[:, :4], w)  # strides
    assert key(x, w) != key(torch.randn(2, 4), w) and key(x, w) != key(x.double(), w)  # shape, dtype
    assert key(x, w) != key(x, w, bias=torch.zeros(5)) and key(x, w) != key(x, w, config=(2.0,))
    assert key(x, w) != key(x, w.clone())  # another resident tensor: another graph
    assert key(x, w) != key(x, w[:3]) and key(x, w) != key(x, w.as_strided((4, 5), (1, 4)))  # same address, other view


def test_seen_twice_then_replayed_with_fresh_inputs():
    backend = FakeGraphs()
    cache = EagerGraphs(backend=backend)
    w = torch.randn(4, 5)
    results = []
    for call in range(5):
        x = torch.randn(3, 4)
        results.append((x, matmul_op(cache, x, w)))
        assert cache.captures == (call >= 1) and cache.replays == max(0, call)
    for x, y in results:  # each call's own result, none overwritten by a later replay
        assert torch.equal(y, x @ w)
    assert len({y.data_ptr() for _, y in results}) == 5
    assert backend.runs == 4


def test_resident_read_in_place_and_new_resident_new_graph():
    cache = EagerGraphs(backend=FakeGraphs())
    w, x = torch.randn(4, 5), torch.randn(3, 4)
    for _ in range(3):
        matmul_op(cache, x, w)
    w.mul_(-2)  # an in-place update: the graph reads the weight where it lies
    assert torch.equal(matmul_op(cache, x, w), x @ w) and cache.captures == 1
    w2 = torch.randn(4, 5)
    for _ in range(3):
        assert torch.equal(matmul_op(cache, x, w2), x @ w2)
    assert cache.captures == 2 and len(cache.graphs) == 2


def test_out_and_optional_streamed_and_config():
    cache = EagerGraphs(backend=FakeGraphs())
    w = torch.randn(4, 5)
    for _ in range(3):
        x, bias = torch.randn(3, 4), torch.randn(5)
        out = torch.full((3, 5), float("nan"))
        got = matmul_op(cache, x, w, scale=0.5, bias=bias, out=(out,))
        assert got is out and torch.equal(out, x @ w * 0.5 + bias)
    assert cache.replays == 2
    assert torch.equal(matmul_op(cache, x, w, scale=3.0), x @ w * 3.0)  # another config: its first call
    assert cache.replays == 2


def test_mixed_dtype_inputs_copied_in_as_bytes_unless_strided():
    """Several streamed tensors of mixed dtypes go in through one copy of byte views; a strided one
    keeps the per-tensor copy. Either way each replay sees this call's values."""
    def scaled_op(cache, x, shift):  # x float streamed, shift int streamed
        def launch(streamed, resident, out):
            x, shift = streamed
            return (x * 2 + shift,)
        return cache("scaled", launch, (x, shift), (), (), None)[0]

    for strided in (False, True):
        cache = EagerGraphs(backend=FakeGraphs())
        for _ in range(4):
            x = torch.randn(5, 6)[:, ::2] if strided else torch.randn(5, 3)
            shift = torch.randint(-9, 9, (5, 3), dtype=torch.int32)
            assert torch.equal(scaled_op(cache, x, shift), x * 2 + shift)
        (graph,) = cache.graphs.values()
        assert cache.replays == 3 and graph.as_bytes == (not strided)



def test_several_outputs_cloned_as_one_buffer():
    """An op with outputs of mixed dtypes and odd sizes: each replayed call returns its own values, as
    views of one fresh buffer (one clone), and `out` is filled too."""
    def argmax_op(cache, x, out=None):
        def launch(streamed, resident, out):
            values, ids = streamed[0].max(dim=1)
            if out is None:
                return values, ids
            out[0].copy_(values)
            out[1].copy_(ids)
            return out
        return cache("argmax", launch, (x,), (), (), out)

    cache = EagerGraphs(backend=FakeGraphs())
    results = []
    for _ in range(4):
        x = torch.randn(7, 3)
        results.append((x, argmax_op(cache, x)))
    (graph,) = cache.graphs.values()
    assert cache.captures == 1 and cache.replays == 3 and graph.packed is not None
    for x, (values, ids) in results:  # none overwritten by a later replay
        want_values, want_ids = x.max(dim=1)
        assert torch.equal(values, want_values) and torch.equal(ids, want_ids) and ids.dtype == torch.int64
    values, ids = results[-1][1]
    assert values.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()
    assert values.untyped_storage().data_ptr() != graph.packed.data_ptr()
    out = (torch.full((7,), float("nan")), torch.full((7,), -5, dtype=torch.int64))
    x = torch.randn(7, 3)
    assert argmax_op(cache, x, out=out) is not None and cache.replays == 4
    assert torch.equal(out[0], x.max(dim=1).values) and torch.equal(out[1], x.max(dim=1).indices)

def test_lru_eviction_and_no_recapture_of_evicted_keys():
    cache = EagerGraphs(capacity=2, remember=4, backend=FakeGraphs())
    weights = [torch.randn(4, 5) for _ in range(3)]
    x = torch.randn(3, 4)
    for _ in range(3):
        for w in weights:  # three keys in turn through two slots
            assert torch.equal(matmul_op(cache, x, w), x @ w)
    assert cache.captures == 3  # the first key's graph was evicted by the third, never captured again
    kept = {key[-1][0][0] for key in cache.graphs}  # the first resident tensor's address
    assert kept == {weights[1].data_ptr(), weights[2].data_ptr()}
    before = cache.replays
    matmul_op(cache, x, weights[0])
    assert cache.replays == before and cache.captures == 3
    for _ in range(6):  # `remember` bounds the counts of keys without a graph
        matmul_op(cache, x, torch.randn(4, 5))
    assert len(cache.seen) == 4


def test_switched_off_unusable_or_failed_capture_launches_directly(monkeypatch):
    monkeypatch.setenv("CORAL_FAST_EAGER_GRAPHS", "0")
    off = EagerGraphs(backend=FakeGraphs())
    monkeypatch.setenv("CORAL_FAST_EAGER_GRAPHS", "1")
    on = EagerGraphs(backend=FakeGraphs())
    assert not off.enabled and on.enabled
    unusable = EagerGraphs(backend=FakeGraphs(usable=False))
    failing = EagerGraphs(backend=FakeGraphs(fail=True))
    w, x = torch.randn(4, 5), torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        for _ in range(4):
            for cache in (off, unusable, failing):
                assert torch.equal(matmul_op(cache, x, w), x @ w)
    for cache in (off, unusable, failing):
        assert cache.captures == cache.replays == 0 and not cache.graphs
    assert list(failing.seen.values()) == [_replay._NEVER]  # tried once, not again
    assert not CudaGraphBackend().usable(torch.device("cpu"))


def _tree(num_nodes, device="cuda"):
    parents = (torch.rand(num_nodes) * (torch.arange(num_nodes) + 1)).floor().long() - 1
    return DraftTree.from_parents(parents, device=device)


# --- the two ops wired to it, through the interpreter ---------------------------------------------------
@pytest.fixture
def fake_cache(monkeypatch):
    cache = EagerGraphs(backend=FakeGraphs())
    monkeypatch.setattr(head_kernel, "eager_graphs", cache)
    monkeypatch.setattr(ta, "eager_graphs", cache)
    return cache


@pytest.mark.interpreter
def test_ops_replay_equals_direct_interpreter(fake_cache, one_thread, seed):
    q, k, v = (torch.randn(1, 4, 9, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    for _ in range(3):
        tree = _tree(9, "cpu")
        q.normal_()
        fake_cache.enabled = False
        want = tree_attention(q, k, v, tree, impl="triton")
        fake_cache.enabled = True
        out = torch.full_like(q, float("nan"))
        got = tree_attention(q, k, v, tree, impl="triton", out=out)
        assert got is out and torch.equal(got, want)
    assert fake_cache.captures == 1 and fake_cache.replays == 2

    V, H, G, M = 301, 48, 7, 3
    head = GroupedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G))
    for _ in range(3):
        hidden, groups = torch.randn(M, H), torch.stack([torch.randperm(G)[:2] for _ in range(M)])
        fake_cache.enabled = False
        want = head.topk(hidden, groups, 5, impl="triton")
        fake_cache.enabled = True
        got = head.topk(hidden, groups, 5, impl="triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fake_cache.captures == 2 and fake_cache.replays == 4


@pytest.mark.interpreter
def test_tree_attention_checks_once_per_replay_key_interpreter(fake_cache, one_thread, monkeypatch, seed):
    """With a DraftTree, a replay skips the checks its key fixes (shapes, dtypes, config) and still makes
    the ones it does not (a kv_len tensor's values, `out`); a new layout is checked in full."""
    calls = []
    full_check = ta._validate
    monkeypatch.setattr(ta, "_validate", lambda *args: calls.append(1) or full_check(*args))
    q, k, v = (torch.randn(1, 4, 7, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16))
    kv_len = torch.tensor([21])
    for _ in range(3):
        tree = _tree(7, "cpu")
        got = tree_attention(q, k, v, tree, impl="triton", kv_len=kv_len)
        want = ta.tree_attention_reference(q, k, v, tree.mask, kv_len=kv_len)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert len(calls) == 2 and fake_cache.captures == 1 and fake_cache.replays == 2
    with pytest.raises(ValueError, match="kv_len values"):  # same key: the values are still read back
        tree_attention(q, k, v, tree, impl="triton", kv_len=torch.tensor([31]))
    with pytest.raises(ValueError, match="out must be"):
        tree_attention(q, k, v, tree, impl="triton", kv_len=kv_len, out=torch.empty(1, 4, 7, 8))
    assert len(calls) == 2 and fake_cache.replays == 2  # both refused before a replay
    with pytest.raises(ValueError, match="the tree has 7 nodes"):  # another layout: the full checks
        tree_attention(q[:, :, :6], k, v, _tree(7, "cpu"), impl="triton", kv_len=kv_len)
    assert len(calls) == 3


@pytest.mark.interpreter
def test_head_checks_once_per_replay_key_interpreter(fake_cache, one_thread, monkeypatch, seed):
    """GroupedLMHead.topk: the layout checks run until a graph serves the key; a replay still checks the
    values (CPU, check=True) and `out`, which the key does not fix."""
    from coral_fast import head as head_module

    calls = []
    full_check = head_module._check_layout
    monkeypatch.setattr(head_module, "_check_layout", lambda *args: calls.append(1) or full_check(*args))
    V, H, G, M = 211, 32, 5, 3
    head = GroupedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G))
    groups = torch.stack([torch.randperm(G)[:2] for _ in range(M)])
    for _ in range(3):
        hidden = torch.randn(M, H)
        got = head.topk(hidden, groups, 4, impl="triton")
        want = head.topk(hidden, groups, 4, impl="reference")
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-5)
    assert fake_cache.captures == 1 and fake_cache.replays == 2
    layout_checks = len(calls)
    assert layout_checks == 2 + 3  # the two calls before the graph, and the three reference calls
    bad = torch.randn(M, H)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="row 1 holds NaN"):  # same key: the values are still checked
        head.topk(bad, groups, 4, impl="triton")
    with pytest.raises(ValueError, match="out ids must be"):  # and out (the kernels would write past it)
        head.topk(hidden, groups, 4, impl="triton", out=(torch.empty(M, 3, dtype=torch.int64), torch.empty(M, 4)))
    assert len(calls) == layout_checks and fake_cache.replays == 2
    with pytest.raises(ValueError, match="hidden size mismatch"):  # another layout: the full checks
        head.topk(torch.randn(M, H + 1), groups, 4, impl="triton")


# --- the GPU: real graphs against the direct launch -----------------------------------------------------
@pytest.fixture
def gpu_cache(monkeypatch):
    cache = EagerGraphs()
    monkeypatch.setattr(head_kernel, "eager_graphs", cache)
    monkeypatch.setattr(ta, "eager_graphs", cache)
    return cache


def _direct(cache, fn):
    cache.enabled = False
    try:
        return fn()
    finally:
        cache.enabled = True


def _poisoned(*tensors):
    for t in tensors:
        t.fill_(-7) if t.dtype == torch.int64 else t.fill_(float("nan"))
    return tensors


@pytest.mark.cuda
@pytest.mark.parametrize("V,H,G,M,A,k", [(5003, 160, 9, 1, 3, 10), (20011, 640, 16, 7, 4, 17),
                                          (128256, 4096, 32, 1, 4, 10)])
def test_head_replay_equals_direct_gpu(V, H, G, M, A, k, gpu_cache, seed):
    grouping = VocabGrouping.contiguous(V, G)
    head = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device="cuda") * 0.05, grouping)

    def inputs():
        groups = torch.stack([torch.randperm(G)[:A] for _ in range(M)]).cuda()
        return torch.randn(M, H, dtype=torch.bfloat16, device="cuda"), groups

    results = []
    for _ in range(8):  # fresh inputs every call: no stale result
        hidden, groups = inputs()
        got = head.topk(hidden, groups, k)
        want = _direct(gpu_cache, lambda: head.topk(hidden, groups, k))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        results.append((got, want))
    assert gpu_cache.captures == 1 and gpu_cache.replays == 7
    for got, want in results:  # returned tensors are the caller's: later replays left them alone
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len({got[0].data_ptr() for got, _ in results}) == len(results)

    out = _poisoned(torch.empty(M, k, dtype=torch.int64, device="cuda"), torch.empty(M, k, device="cuda"))
    hidden, groups = inputs()
    got = head.topk(hidden, groups, k, out=out)
    want = _direct(gpu_cache, lambda: head.topk(hidden, groups, k))
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])

    head.weight.mul_(-1)  # in place: the graph reads the new values
    got = head.topk(hidden, groups, k)
    want = _direct(gpu_cache, lambda: head.topk(hidden, groups, k))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert gpu_cache.captures == 1

    head2 = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device="cuda") * 0.05, grouping)
    for _ in range(3):  # a new weight: a new graph
        hidden, groups = inputs()
        got = head2.topk(hidden, groups, k)
        want = _direct(gpu_cache, lambda: head2.topk(hidden, groups, k))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert gpu_cache.captures == 2


@pytest.mark.cuda
@pytest.mark.parametrize("heads,head_dim,num_queries,slots", [((32, 8), 128, 64, 8256), ((9, 3), 64, 37, 3001),
                                                             ((4, 1), 256, 13, 777)])
def test_tree_attention_replay_equals_direct_gpu(heads, head_dim, num_queries, slots, gpu_cache, seed):
    num_q_heads, num_kv_heads = heads
    shape = (1, num_kv_heads, slots, head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    results = []
    for call in range(8):  # fresh queries and trees; bool masks on odd calls (checked, packed, copied in)
        q = torch.randn(1, num_q_heads, num_queries, head_dim, dtype=torch.bfloat16, device="cuda")
        tree = _tree(num_queries)
        mask = tree.mask if call % 2 else tree
        got = tree_attention(q, k, v, mask)
        want = _direct(gpu_cache, lambda: tree_attention(q, k, v, mask))
        assert torch.equal(got, want)
        results.append((got, want))
    assert gpu_cache.captures == 1 and gpu_cache.replays == 7
    assert all(torch.equal(got, want) for got, want in results)

    out = _poisoned(torch.empty(1, num_q_heads, num_queries, head_dim, dtype=torch.bfloat16, device="cuda"))[0]
    assert tree_attention(q, k, v, tree, out=out) is out
    assert torch.equal(out, _direct(gpu_cache, lambda: tree_attention(q, k, v, tree)))

    k[:, :, : slots // 2].normal_()  # the cache written in place: the graph reads it where it lies
    got = tree_attention(q, k, v, tree)
    assert torch.equal(got, _direct(gpu_cache, lambda: tree_attention(q, k, v, tree)))
    assert gpu_cache.captures == 1

    # a static buffer with device lengths, a window and positions: all streamed
    k2 = torch.randn(2, num_kv_heads, slots, head_dim, dtype=torch.bfloat16, device="cuda")
    v2 = torch.randn_like(k2)
    for lengths in ([slots, num_queries], [slots // 2, slots - 5], [num_queries + 1, slots // 3]):
        q2 = torch.randn(2, num_q_heads, num_queries, head_dim, dtype=torch.bfloat16, device="cuda")
        kv_len = torch.tensor(lengths, device="cuda")
        positions = (kv_len[:, None] - num_queries + torch.arange(num_queries, device="cuda")).long()
        kwargs = dict(kv_len=kv_len, window=300, query_positions=positions, check=False)
        got = tree_attention(q2, k2, v2, tree, **kwargs)
        assert torch.equal(got, _direct(gpu_cache, lambda: tree_attention(q2, k2, v2, tree, **kwargs)))
    assert gpu_cache.captures == 2


@pytest.mark.cuda
def test_inside_user_capture_and_side_streams_launch_directly_gpu(gpu_cache, seed):
    """The user's own capture (warm-up on a side stream, as torch documents) gets the ops' launches."""
    V, H, G = 5003, 160, 9
    head = GroupedLMHead(torch.randn(V, H, dtype=torch.bfloat16, device="cuda"), VocabGrouping.contiguous(V, G))
    hidden, groups = torch.randn(1, H, dtype=torch.bfloat16, device="cuda"), torch.tensor([[0, 4, 7]], device="cuda")
    q = torch.randn(1, 8, 16, 64, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(1, 2, 1000, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    tree = _tree(16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            head.topk(hidden, groups, 10)
            tree_attention(q, k, v, tree)
    torch.cuda.current_stream().wait_stream(stream)
    assert gpu_cache.captures == gpu_cache.replays == 0 and not gpu_cache.seen
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, logprobs = head.topk(hidden, groups, 10)
        attended = tree_attention(q, k, v, tree)
    assert gpu_cache.captures == gpu_cache.replays == 0
    for _ in range(3):
        hidden.normal_()
        q.normal_()
        _poisoned(ids, logprobs, attended)
        graph.replay()
        want_ids, want_logprobs = _direct(gpu_cache, lambda: head.topk(hidden, groups, 10))
        assert torch.equal(ids, want_ids) and torch.equal(logprobs, want_logprobs)
        assert torch.equal(attended, _direct(gpu_cache, lambda: tree_attention(q, k, v, tree)))
