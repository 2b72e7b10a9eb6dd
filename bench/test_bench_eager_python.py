"""The Python an eager drop-in call runs before and after its replay, without a GPU:
`TRITON_INTERPRET=1 pytest bench/test_bench_eager_python.py --benchmark-only`.

The replay cache (`coral_fast/kernels/_replay.py`) gets a backend whose capture runs the launch once and
whose replay does nothing, so a timed call is the op's checks, the replay key, the copy-in, the clone
and the unpacking of its outputs: the host work that `coral_fast.benchmarks.eager_host` measures on the
GPU beside the launch floors (there multiplied by a slower host CPU; bench/results/eager_host_h100.md).
"""
import pytest
import torch

from coral_fast import DraftTree, tree_attention
from coral_fast.grouping import VocabGrouping
from coral_fast.head import GroupedLMHead
from coral_fast.kernels import _replay
from coral_fast.kernels import grouped_head_topk as head_kernel
from coral_fast.kernels import tree_attention as attention_kernel
from coral_fast.kernels._dispatch import interpreter_enabled

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="set TRITON_INTERPRET=1 (impl='triton' on CPU)")


class _NoReplay:
    """Capture: run once (the outputs become the static buffers); replay: nothing."""

    def usable(self, device):
        return True

    def capture(self, fn, device):
        outputs = fn()
        return (lambda: None), outputs


@pytest.fixture
def no_replay(monkeypatch):
    cache = _replay.EagerGraphs(backend=_NoReplay())
    monkeypatch.setattr(head_kernel, "eager_graphs", cache)
    monkeypatch.setattr(attention_kernel, "eager_graphs", cache)
    return cache


def _timed(benchmark, cache, call):
    for _ in range(3):  # seen twice, then captured: the timed calls replay
        call()
    benchmark.pedantic(call, rounds=2000, warmup_rounds=50)
    assert cache.replays > 2000


def test_tree_attention_draft_tree(benchmark, no_replay):
    torch.manual_seed(0)
    tree = DraftTree.from_parents([-1] + [i // 2 for i in range(15)])
    q, k, v = torch.randn(1, 4, 16, 64), torch.randn(1, 1, 80, 64), torch.randn(1, 1, 80, 64)
    _timed(benchmark, no_replay, lambda: tree_attention(q, k, v, tree, impl="triton"))


def test_grouped_head_topk(benchmark, no_replay):
    torch.manual_seed(0)
    V, H, G = 4096, 64, 32
    head = GroupedLMHead(torch.randn(V, H), VocabGrouping.contiguous(V, G))
    hidden, groups = torch.randn(1, H), torch.randperm(G)[:4][None]
    _timed(benchmark, no_replay, lambda: head.topk(hidden, groups, 10, impl="triton", check=False))
