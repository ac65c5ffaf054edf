"""The live-tensor counter behind benchmarks/memory.py --tensor-peak: its figure stands in for a
GPU's max_memory_allocated, so it must count what is alive and forget what is freed."""
import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location("bench_memory", Path(__file__).parents[1] / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(memory)

MB = 2**20


def test_counts_live_storages_and_their_peak():
    held = torch.zeros(MB // 4)  # 1 MB, alive before counting starts
    with memory.LiveTensorBytes([held]) as live:
        assert live.now == MB
        a = torch.ones(2 * MB // 4)  # +2 MB
        b = a[10:].mul_(2)  # a view, in place: no new storage
        c = a + 1  # +2 MB
        assert live.now == 5 * MB
        del a, b, c  # both 2 MB storages freed
        d = torch.empty(MB // 4, dtype=torch.float64)  # +2 MB
        assert live.now == 3 * MB
        assert live.peak == 5 * MB
        e = torch.zeros(1)
        with pytest.warns(UserWarning, match="resized"):
            torch.add(torch.ones(MB // 4), 1, out=e)  # out= grows e's 4-byte storage to 1 MB in place
        assert live.now == 3 * MB + MB
        del d, e
    assert live.now == MB


def test_counts_training_state_of_a_step():
    lin = torch.nn.Linear(256, 1024)  # 1 MB of weight, 4 kB of bias
    opt = torch.optim.AdamW(lin.parameters())
    params = sum(p.numel() * 4 for p in lin.parameters())
    with memory.LiveTensorBytes(list(lin.parameters())) as live:
        lin(torch.randn(8, 256)).square().mean().backward()
        opt.step()
    # weights, their gradients and AdamW's two moments stay alive after the step (and its step counts)
    assert 4 * params <= live.now <= 4 * params + 64
    assert live.peak > live.now  # the activations and temporaries of the step came and went
