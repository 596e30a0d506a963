"""factorlm.ops._memory: the pool the fast paths take their large buffers from.

The pool must never hand out memory that something still refers to (a buffer, a view of it, a
tensor autograd saved), must reuse what nothing refers to (so a layer's call makes no page faults
whatever ran before it), must keep within its capacity, and must say what is wrong with a bad
FACTORLM_BUFFER_POOL_MB.
"""

from __future__ import annotations

import resource

import pytest
import torch

import factorlm.nn as fnn
from factorlm.nn.registry import cell_class
from factorlm.ops import _extension, _memory

MB = 1 << 20
LIKE = torch.empty(0)


@pytest.fixture
def pool(monkeypatch):
    """A fresh pool of 64 MiB in place of the process's."""
    fresh = _memory.BufferPool()
    if _memory._storage_use_count() is None:
        pytest.skip("this torch cannot count a storage's references: the pool is off")
    monkeypatch.setattr(_memory, "POOL", fresh)
    monkeypatch.setenv(_memory.POOL_ENV, "64")
    return fresh


def test_a_buffer_nothing_refers_to_is_reused_one_in_use_never(pool):
    a = _memory.empty(MB, like=LIKE)  # 4 MB
    assert a.shape == (MB,) and a.dtype == torch.float32
    address = a.data_ptr()
    b = _memory.empty(MB, like=LIKE)
    assert b.data_ptr() != address  # a is alive
    view = a[10:20]
    del a
    c = _memory.empty(MB, like=LIKE)
    assert c.data_ptr() not in (address, b.data_ptr())  # a view of a keeps it in use
    del view
    d = _memory.empty(1000, 1000, like=LIKE)  # another shape that fits the same entry
    assert d.data_ptr() == address and d.shape == (1000, 1000)
    assert len(pool) == 3


def test_entries_serve_any_dtype_and_wastes_at_most_a_quarter(pool):
    a = _memory.empty(3 * MB // 8, like=torch.empty(0, dtype=torch.float64))  # 3 MB -> a 4 MB entry
    address = a.data_ptr()
    del a
    assert _memory.empty(3 * MB // 4, like=LIKE).data_ptr() == address  # 3 MB of float32
    b = _memory.empty(3 * MB // 4, like=LIKE)
    del b
    assert _memory.empty(MB // 4, like=LIKE).data_ptr() != address  # 1 MB: a 2 MB entry, not the 4 MB one


def test_small_buffers_and_other_devices_bypass_the_pool(pool):
    _memory.empty(1000, like=LIKE)
    assert len(pool) == 0


def test_the_pool_keeps_within_its_capacity(pool, monkeypatch):
    monkeypatch.setenv(_memory.POOL_ENV, "8")
    a = _memory.empty(MB, like=LIKE)  # 4 MB
    b = _memory.empty(MB, like=LIKE)  # 4 MB: the pool is full
    c = _memory.empty(MB, like=LIKE)  # both in use: allocated outside the pool
    assert len(pool) == 2 and pool.held_bytes == 8 * MB
    assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3
    del a, b
    d = _memory.empty(3 * MB // 2, like=LIKE)  # 6 MB: free entries dropped to make room
    assert len(pool) == 1 and pool.held_bytes == 6 * MB
    del c, d
    assert _memory.release() == 6 * MB and len(pool) == 0


def test_room_is_made_by_dropping_a_free_entry_wherever_it_sits(pool, monkeypatch):
    monkeypatch.setenv(_memory.POOL_ENV, "8")
    small = _memory.empty(MB // 2, like=LIKE)  # 2 MB, the pool's first entry
    large = _memory.empty(MB, like=LIKE)  # 4 MB, its second: the first dropped below
    del small, large
    wanted = _memory.empty(3 * MB // 2, like=LIKE)  # 6 MB: 2 + 4 + 6 > 8, so the 4 MB entry goes
    assert len(pool) == 2 and pool.held_bytes == 8 * MB
    assert wanted.untyped_storage().nbytes() >= 6 * MB


def test_release_keeps_the_entries_in_use(pool):
    a = _memory.empty(MB, like=LIKE)
    b = _memory.empty(MB, like=LIKE)
    del b
    assert pool.release() == 4 * MB
    assert len(pool) == 1
    a.fill_(1)


def test_capacity_zero_turns_the_pool_off_and_a_bad_value_is_named(pool, monkeypatch):
    monkeypatch.setenv(_memory.POOL_ENV, "0")
    _memory.empty(MB, like=LIKE)
    assert len(pool) == 0
    for bad in ("lots", "-5", "1.5"):
        monkeypatch.setenv(_memory.POOL_ENV, bad)
        with pytest.raises(ValueError, match=rf"FACTORLM_BUFFER_POOL_MB must be a whole number of MiB >= 0 .*"
                                             rf"got '{bad}'"):
            _memory.empty(MB, like=LIKE)
    monkeypatch.delenv(_memory.POOL_ENV)
    assert _memory.capacity() > 0


@pytest.mark.parametrize("impl", ["torch", "extension"])
@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_graphs_alive_together_never_share_pooled_buffers(pool, impl, cell):
    """Two forwards whose graphs are alive at once, then both backwards, at sizes whose buffers come
    from the pool (float64 gates of 10 MB): outputs and gradients equal the per-step reference's."""
    if impl == "extension" and not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    torch.manual_seed(0)
    args = dict(rank=16) if cell == "flstm" else dict(groups=4)
    layer = cell_class(cell)(32, 512, proj_size=32, **args).double()
    layer.impl = impl
    reference = cell_class(cell)(32, 512, proj_size=32, **args).double()
    reference.load_state_dict(layer.state_dict())
    reference.impl = "reference"
    xs = [torch.randn(20, 64, 32, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    outs = [layer(x)[0] for x in xs]
    assert len(pool) > 0
    for x, out in zip(xs, outs):
        out.sum().backward()
    for x, out in zip(xs, outs):
        x_ref = x.detach().clone().requires_grad_()
        out_ref = reference(x_ref)[0]
        out_ref.sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for name, parameter in layer.named_parameters():  # both calls' gradients, summed
        torch.testing.assert_close(parameter.grad, dict(reference.named_parameters())[name].grad, rtol=1e-9,
                                   atol=1e-9)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.parametrize("impl", ["torch", "extension"])
def test_a_layer_call_after_a_dense_layer_touches_no_fresh_pages(pool, impl, monkeypatch):
    """The regression the pool fixes: the fast layer's buffers (gates of 42 MB here) were fresh
    memory at every call, faulted in page by page (about 1,060 faults, huge pages, without the
    pool; many more where the kernel has none), and more so after a torch.nn.LSTM had run and
    glibc had given the freed heap back. With the pool the call reuses its buffers."""
    if impl == "extension" and not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    monkeypatch.setenv(_memory.POOL_ENV, "512")
    torch.manual_seed(0)
    layer = fnn.FLSTM(128, 2048, proj_size=128, rank=128)
    layer.impl = impl
    dense = torch.nn.LSTM(128, 2048, proj_size=128)
    x = torch.randn(20, 64, 128, requires_grad=True)

    def step(module):
        module(x)[0].sum().backward()

    for _ in range(2):
        step(layer)
        step(dense)
    before = _minor_faults()
    step(layer)
    assert _minor_faults() - before < 200
