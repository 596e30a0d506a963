"""What the whole-sequence F-LSTM, G-LSTM and G∘F-LSTM autograd Functions share: set-up and gradient
tails.

The Functions (:mod:`factorlm.ops.flstm`, :mod:`factorlm.ops.glstm`, :mod:`factorlm.ops.gflstm`) take
``(x, h0, c0, w_a, w_b, bias, w_hr, forget_bias, loop, batch_sizes)`` — x (N, p_in) in the row
layout of :mod:`factorlm.ops._packed` (a (T, B, p_in) tensor is its (T·B, p_in) view), h0 (B, p),
c0 (B, n), two gate weights, bias (4n,) or None in nn.LSTM's gate order, W_hr (p, n) or None, the
constant forget_bias, the time loop (a :class:`factorlm.ops._backend.Recurrence`) and the rows per
step (a tuple of ints, non-increasing) — and return (out (N, p), h_T (B, p), c_T (B, n)), the final
states taken at each sequence's own last step. Each also has ``infer``, with the same arguments: the
forward without autograd, whose scans keep one step's gates and the (B, n) cell states instead of
the whole sequence's (nothing is kept for a backward). :func:`run_layer` is how the public
functions call them, and it calls ``infer`` when no backward can follow (torch.no_grad,
torch.inference_mode, or nothing requiring grad).

F-LSTM is treated as G-LSTM with k = 1 group wherever the two agree, so one helper serves both:
per-row gradients are group-major (k, N, m), group j's slice of each row (F-LSTM's (N, m) is
the (1, N, m) view), and weights are (k, rows, columns) per group.

The time loops compute the gates in torch.nn.LSTM's order [i, f, g, o], the order of the layers'
weight rows and bias, so the scans read the weights as they are (transposed views: nothing is
copied or kept between calls, and a change to a weight, through ``.data`` or not, is seen by the
next call) and the gradients come out in the parameters' own order.

Under autocast (``torch.autocast(device, dtype=torch.bfloat16)``, on x's device type) a layer runs in
the autocast dtype, as torch.nn.LSTM does: :func:`runs_in_autocast_dtype` casts x, the state and the
weights to it once per call (not per step; differentiably: float32 parameters get float32 gradients)
and runs the Function with autocast off, so the scans see one dtype throughout; the backward also runs with autocast off
(:func:`autocast_off`). The time loop is then the one for that dtype: the PyTorch loop on CPU, the
Triton cells on CUDA. impl="extension", asked for by name, keeps float32 (the C++ loop has no bf16
kernel; autocast leaves such ops in float32 too).
"""

from __future__ import annotations

import functools
import inspect
from typing import NoReturn, Sequence

import torch
from torch import Tensor

from factorlm.ops import _backend, _packed

#: positions in the Functions' arguments of the bias and W_hr (for ctx.needs_input_grad)
BIAS_INPUT, WEIGHT_HR_INPUT = 5, 6


def rows_by_group(t: Tensor, k: int) -> Tensor:
    """(R, m) -> its (k, R, m/k) view: group j's column slice of every row."""
    rows, width = t.shape
    return t.view(rows, k, width // k).transpose(0, 1)


def finish_forward(ctx, loop, batch_sizes: tuple[int, ...], bias: Tensor | None, saved: tuple, out: Tensor,
                   cells: Tensor):
    """Keep what the backward needs; return (out (N, p), h_T (B, p), c_T (B, n)), the final states
    read at each sequence's last step. cells (B + N, n) holds c0 first, then one row per row of out."""
    ctx.save_for_backward(*saved)
    ctx.has_bias = bias is not None
    ctx.loop = loop
    ctx.batch_sizes = batch_sizes
    batch = batch_sizes[0]
    if _packed.is_uniform(batch_sizes):
        return out, out[-batch:].clone(), cells[-batch:].clone()
    last = _packed.last_step_rows(batch_sizes, out.device)
    return out, out.index_select(0, last), cells.index_select(0, last + batch)


def check_arguments(name: str, x: Tensor, h0: Tensor, c0: Tensor, weight_hr: Tensor | None,
                    expected: dict[str, tuple[Tensor | None, tuple[int, ...]]]) -> None:
    """ValueError naming the bad argument unless h0 (B, p), c0 (B, n) and every weight in ``expected``
    (name -> (tensor or None, the shape it must have)) agree, and all share x's dtype and device.

    The scans index raw buffers from these sizes, so a mis-sized weight would read or write outside
    them: it is refused here, before any of them is touched.
    """
    for arg, t in (("h0", h0), ("c0", c0)):
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D (B, ·), got shape {tuple(t.shape)}")
    if c0.shape[0] != h0.shape[0]:
        raise ValueError(f"{name}: h0 {tuple(h0.shape)} and c0 {tuple(c0.shape)} must have the same batch size")
    if weight_hr is None and h0.shape[1] != c0.shape[1]:
        raise ValueError(f"{name}: without weight_hr, h0 {tuple(h0.shape)} and c0 {tuple(c0.shape)} must both be "
                         f"(B, n)")
    dtype, device = x.dtype, x.device  # read once: this runs at every call, token by token in generation
    for arg, t in (("h0", h0), ("c0", c0)):
        if t.dtype != dtype or t.device != device:
            _mismatch(name, arg, t, x)
    for arg, (t, shape) in expected.items():
        if t is None:
            continue
        if t.shape != shape:
            raise ValueError(f"{name}: {arg} must have shape {shape} for x (…, {x.shape[-1]}), h0 "
                             f"{tuple(h0.shape)}, c0 {tuple(c0.shape)}; got {tuple(t.shape)}")
        if t.dtype != dtype or t.device != device:
            _mismatch(name, arg, t, x)


def _mismatch(name: str, arg: str, t: Tensor, x: Tensor) -> NoReturn:
    raise ValueError(f"{name}: {arg} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; they must match")


def finish_inference(batch_sizes: tuple[int, ...], out: Tensor, cells: Tensor):
    """(out (N, p), h_T (B, p), c_T (B, n)) of an inference scan, whose cells (B, n) are already
    each sequence's final cell state."""
    batch = batch_sizes[0]
    if _packed.is_uniform(batch_sizes):
        return out, out[-batch:].clone(), cells
    return out, out.index_select(0, _packed.last_step_rows(batch_sizes, out.device)), cells


def _needs_graph(tensors) -> bool:
    """Whether autograd will want a backward through a layer with these inputs and weights."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def incoming(dout: Tensor, dh_last: Tensor, dc_last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first three arguments of every backward scan: the incoming gradients, contiguous."""
    return dout.contiguous(), dh_last.contiguous(), dc_last.contiguous()


# MKL runs a product whose output is tall and narrow, (M, N) with N of a few dozen, at a fraction of
# the speed of the same product computed as its (N, M) transpose, narrow side as rows: on the AVX2
# EPYC, G-LSTM k=8 p=64's weight gradient (8, 128, 8) took 581 µs as (4nk, pk) and 115 µs as
# (pk, 4nk); k=8 p=256 n=2048 B=128, 16.0 -> 11.2 ms. Wider outputs gain nothing (F-LSTM's
# (8192, 128) is 3% slower transposed), hence the threshold. The result is then a transposed view.
NARROW_WEIGHT_GRAD = 32
# dL/dx must end up (N, p_in) row-major, so computing it transposed costs a copy: worth it only
# for the narrowest groups (p_in/k = 8: 430 -> 138 µs; 16 and 32 are even or slower).
NARROW_INPUT_GRAD = 8


def _narrow_side_first(rows: int, cols: int, narrow: int) -> bool:
    """Whether a (rows, cols) product output is computed as its transpose: cols <= narrow < rows."""
    return cols <= narrow < rows


def _bmm_narrow_side_first(a: Tensor, b: Tensor, narrow: int) -> Tensor:
    """bmm(a, b) (k, M, N); when N <= ``narrow`` < M, computed as bmm(b^T, a^T) and returned as
    its transposed view."""
    if _narrow_side_first(a.shape[1], b.shape[2], narrow):
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


def input_grad(d: Tensor, w_in: Tensor, x_shape) -> Tensor:
    """dL/dx (N, p_in) from d (k, N, m), the gradient at x's image, and the input-side
    weights (k, m, p_in/k): one bmm over all rows."""
    return _bmm_narrow_side_first(d, w_in, NARROW_INPUT_GRAD).transpose(0, 1).reshape(x_shape)


def input_weight_grad(d: Tensor, x: Tensor) -> Tensor:
    """Σ_rows d^T·x per group: (k, m, p_in/k) from d (k, N, m) and x (N, p_in)."""
    return _bmm_narrow_side_first(d.transpose(1, 2), rows_by_group(x, d.shape[0]), NARROW_WEIGHT_GRAD)


def grouped_weight_grad(d: Tensor, z: Tensor) -> Tensor:
    """Σ_rows d^T·z per group: (k, m, r) from d (k, N, m) and z (k, N, r), both already group-major
    (G∘F-LSTM's W2 gradient from its gate gradients and the factor outputs z)."""
    return _bmm_narrow_side_first(d.transpose(1, 2), z, NARROW_WEIGHT_GRAD)


def previous_h_grad(d: Tensor, h0: Tensor, out: Tensor, batch_sizes: tuple[int, ...]) -> Tensor:
    """Σ_rows d_row^T·h_{t-1} per group: (k, m, p/k) from d (k, N, m), h0 (B, p), out (N, p).

    The first B rows (step 0) read h0; every later row reads a row of out. For a padded batch that
    is out[:N-B], so two bmms need no copy; a packed batch gathers those rows first. Narrow groups
    are summed as the transposed (k, p/k, m), for the reason given at NARROW_WEIGHT_GRAD.
    """
    k, _, m = d.shape
    batch = h0.shape[0]
    transposed = _narrow_side_first(m, h0.shape[1] // k, NARROW_WEIGHT_GRAD)

    def accumulate(grad: Tensor | None, d_rows: Tensor, h_rows: Tensor) -> Tensor:
        a, b = (rows_by_group(h_rows, k).transpose(1, 2), d_rows) if transposed else (d_rows.transpose(1, 2),
                                                                                        rows_by_group(h_rows, k))
        return torch.bmm(a, b) if grad is None else grad.baddbmm_(a, b)

    grad = accumulate(None, d[:, :batch], h0)
    previous = previous_rows(h0, out, batch_sizes)
    if previous is not None:
        grad = accumulate(grad, d[:, batch:], previous)
    return grad.transpose(1, 2) if transposed else grad


def previous_rows(h0: Tensor, out: Tensor, batch_sizes: tuple[int, ...]) -> Tensor | None:
    """h_{t-1} of every row after step 0, (N - B, p): out[:N-B] for a padded batch (a view), the
    gathered rows for a packed one; None when there is one step only."""
    batch = h0.shape[0]
    if out.shape[0] == batch:
        return None
    if _packed.is_uniform(batch_sizes):
        return out[:-batch]
    return out.index_select(0, _packed.previous_step_rows(batch_sizes, out.device))


# The C++ backward sums the gate weights' and the bias's gradients every few steps from a ring of
# dgates that stays in cache, when it is handed the rows that multiply them (scan.cpp,
# kWeightGradRows); a whole sequence's dgates smaller than this stays in the caches anyway, and one
# product over all rows is then faster (F-LSTM r=32, p=64, n=256, B=32, T=20, dgates 2.6 MB:
# 3.5 -> 3.8 ms a forward + backward with the ring; at 84 MB, n = 2048 and B = 128, it saved 5-15%).
WEIGHT_GRAD_RING_MIN_BYTES = 8 << 20


def ring_rows(rows: Tensor | None, gates: Tensor, wanted: bool) -> Tensor | None:
    """``rows`` (the products' other operand, kept by the forward) to hand the backward scan, so
    that it sums the weight gradients step by step; None when they are not ``wanted`` or the whole
    sequence's gates are below WEIGHT_GRAD_RING_MIN_BYTES."""
    if not wanted or rows is None or gates.numel() * gates.element_size() < WEIGHT_GRAD_RING_MIN_BYTES:
        return None
    return rows


def grouped_gate_weight_grads(d: Tensor, x: Tensor, h0: Tensor, out: Tensor, batch_sizes: tuple[int, ...],
                              with_bias: bool, operand: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """G-LSTM's weight and bias gradients in one bmm: Σ_rows [x_row; h_{t-1}; 1]^T·d_row per group
    from d (k, N, m), x (N, p_in), h0 (B, p), out (N, p). Returns views of its rows: dL/dW_ih^T
    (k, p_in/k, m), dL/dW_hh^T (k, p/k, m) and, with ``with_bias``, Σ_rows d (k, m), the bias
    gradient (else None). ``operand``: those rows (k, N, p_in/k + p/k + 1), when the forward's
    loop kept them (the C++ loop's joined step product); else they are gathered here.

    d is the backward's largest tensor (k·N·4n/k values); three products (W_ih, W_hh, a sum for the
    bias) read and pack it three times. One product over the rows' [x; h; 1], a copy of under
    p_in + p + k values per row, reads it once: G-LSTM k=8 p=256 n=2048 B=128, 28.2 -> 19.9 ms;
    k=4, 50.9 -> 34.8 ms (AVX2 EPYC). Narrow side first, as at NARROW_WEIGHT_GRAD: the other
    orientation is slower at every size measured.
    """
    k, rows, _ = d.shape
    batch = h0.shape[0]
    pk_in, pk = x.shape[1] // k, h0.shape[1] // k
    if operand is None:
        operand = d.new_empty(k, rows, pk_in + pk + int(with_bias))
        operand[:, :, :pk_in] = rows_by_group(x, k)
        operand[:, :batch, pk_in : pk_in + pk] = rows_by_group(h0, k)
        previous = previous_rows(h0, out, batch_sizes)
        if previous is not None:
            operand[:, batch:, pk_in : pk_in + pk] = rows_by_group(previous, k)
        if with_bias:
            operand[:, :, -1] = 1
    elif not with_bias:  # the kept rows end in the column of ones
        operand = operand[:, :, : pk_in + pk]
    return split_gate_weight_grads(torch.bmm(operand.transpose(1, 2), d), x.shape[1], h0.shape[1], with_bias)


def split_gate_weight_grads(grads: Tensor, p_in: int, p: int, with_bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Views of the rows of grads (k, p_in/k + p/k [+ 1], m) = Σ_rows [x; h_{t-1}; 1]^T·d: dL/dW_ih^T,
    dL/dW_hh^T and, with ``with_bias``, the bias gradient (the last row), else None."""
    k = grads.shape[0]
    pk_in, pk = p_in // k, p // k
    return grads[:, :pk_in], grads[:, pk_in : pk_in + pk], (grads[:, pk_in + pk] if with_bias else None)


def bias_and_projection_grads(ctx, dgates: Tensor, dh: Tensor, m: Tensor, w_hr: Tensor | None,
                              bias_sums: Tensor | None = None) -> tuple:
    """The backward's last five results: dL/dbias (G·n,) in nn.LSTM order, dL/dW_hr (p, n), and None
    for forget_bias, the loop and batch_sizes. dgates (k, N, G·n/k) pre-activation gradients
    (group j's [i, f, g, o] of its cells, [i, g, o] with G = 3 coupled gates), dh (N, p) = total
    dL/dh_t, m (N, n) the projection's input; bias_sums (k, G·n/k), Σ_rows dgates, when the
    caller has it already (dgates may then be None)."""
    need = ctx.needs_input_grad
    dbias = dw_hr = None
    if need[BIAS_INPUT] and ctx.has_bias:
        sums = dgates.sum(1) if bias_sums is None else bias_sums
        k, four_nk = sums.shape
        gates = four_nk * k // m.shape[-1]  # G: the gate rows over n
        # (k, G, nk) -> the bias's gate-major (G, k, nk) (for F-LSTM, k = 1, a view: no copy)
        dbias = sums.view(k, gates, four_nk // gates).transpose(0, 1).reshape(-1)
    if need[WEIGHT_HR_INPUT] and w_hr is not None:
        rows = m.shape[0]
        dw_hr = dh.view(rows, -1).t() @ m.view(rows, -1)
    return dbias, dw_hr, None, None, None


def check_num_gates(name: str, num_gates) -> int:
    """num_gates if it is 4 (an LSTM's [i, f, g, o]) or 3 (coupled input and forget gates,
    [i, g, o]); else ValueError naming it."""
    if num_gates not in (3, 4) or isinstance(num_gates, bool):
        raise ValueError(f"{name}: num_gates must be 4 (gates [i, f, g, o]) or 3 (coupled input and forget gates, "
                         f"[i, g, o]), got {num_gates!r}")
    return int(num_gates)


def autocast_dtype(x: Tensor, impl: str) -> torch.dtype | None:
    """The dtype a layer call on x runs in under autocast: the autocast dtype of x's device type while
    autocast is on there; else None, and also for impl "extension" (see the module doc) and for float64
    x, which autocast leaves alone in every op."""
    device_type = x.device.type
    if (impl == "extension" or not x.is_floating_point() or x.dtype == torch.float64
            or not torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)



def runs_in_autocast_dtype(layer_function):
    """``layer_function`` (flstm_layer / glstm_layer, flstm_step / glstm_step) made to run in the autocast dtype under autocast:
    its floating-point tensor arguments (x, the state, the weights) cast once, before its argument
    checks (a stacked layer's x arrives in bf16 while its h0 is the caller's float32), and the call run
    with autocast off. The casts are autograd ops: float32 parameters get float32 gradients."""
    # where ``impl`` sits among the positional arguments, read once from the signature: the layer
    # functions take it, the step functions do not (their argument there is num_gates)
    names = list(inspect.signature(layer_function).parameters)
    impl_position = names.index("impl") if "impl" in names else None

    @functools.wraps(layer_function)
    def call(*args, **kwargs):
        if not torch.is_autocast_enabled(args[0].device.type):  # the usual case in one check: batch-1
            return layer_function(*args, **kwargs)               # generation calls this at every token
        impl = kwargs.get("impl", "auto")
        if impl_position is not None and len(args) > impl_position:
            impl = args[impl_position]
        dtype = autocast_dtype(args[0], impl)
        # autocast off inside either way: a layer that stays in its own dtype (impl "extension",
        # float64) must not have its Python-side products (the diagonal layer's input GEMM) turned
        # into bf16 ones that its C++ scan then meets beside float32 weights
        with torch.autocast(args[0].device.type, enabled=False):
            if dtype is None:
                return layer_function(*args, **kwargs)
            cast = [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in args]
            return layer_function(*cast, **kwargs)

    return call


def autocast_off(backward):
    """A Function's ``backward(ctx, *grads)`` run with autocast off on the gradients' device type:
    a backward called inside an autocast region (autograd carries the region into it) would
    otherwise get some products in another dtype than the buffers they meet."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return backward(ctx, *grads)

    return run


def run_layer(function, x: Tensor, h0: Tensor, c0: Tensor, weights: tuple, forget_bias: float, impl: str,
              batch_sizes: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor, Tensor]:
    """``function`` (FLSTMFunction, GLSTMFunction or GFLSTMFunction) over x (T, B, p_in), or over
    packed rows (N, p_in) when ``batch_sizes`` is given; returns output in x's layout, h_T (B, p),
    c_T (B, n).

    torch.func transforms (vmap, grad, jacrev, ...) are refused here, by name: the Functions have
    no vmap rule, and their backward is a time loop over preallocated buffers.

    """
    if torch.compiler.is_compiling():
        return _run_layer_outside_graph(function, x, h0, c0, weights, forget_bias, impl, batch_sizes)
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            "factorlm's fast path does not support torch.func transforms (vmap, grad, jacrev, ...); set "
            "layer.impl = 'reference' (plain PyTorch ops) on the layers to transform, e.g. "
            "factorlm.nn.set_impl(model, 'reference')"
        )
    if batch_sizes is None:
        if x.dim() != 3:
            raise ValueError(f"x must be (T, B, p_in), or packed rows (N, p_in) with batch_sizes; got shape "
                             f"{tuple(x.shape)} without batch_sizes")
        steps, batch, p_in = x.shape
        sizes = (batch,) * steps
        rows = x.reshape(steps * batch, p_in)
    else:
        if x.dim() != 2:
            raise ValueError(f"with batch_sizes, x must be packed rows (N, p_in), got shape {tuple(x.shape)}")
        sizes = _packed.as_batch_sizes(batch_sizes, x.shape[0], h0.shape[0])
        rows = x
    loop = _backend.select(x, impl)
    if _needs_graph((rows, h0, c0, *weights)):
        out, h, c = function.apply(rows, h0, c0, *weights, float(forget_bias), loop, sizes)
    else:  # no_grad / inference_mode / frozen weights: nothing kept for a backward
        out, h, c = function.infer(rows, h0, c0, *weights, float(forget_bias), loop, sizes)
    return (out if batch_sizes is not None else out.view(x.shape[0], x.shape[1], -1)), h, c


# torch.compile: the time loop is a hand-written recurrence that writes into preallocated buffers and
# calls the C++ loop or Triton kernels, and it already does each step's gate math in one fused pass;
# tracing it would unroll T steps into the graph and recompile for every new length, for nothing.
# Dynamo leaves this call out of the graph (one graph break per layer) and runs it as it is (inside,
# is_compiling() is False). Eager calls do not go through the wrapper, which costs a few µs a call
# (felt in batch-1 generation).
@torch.compiler.disable
def _run_layer_outside_graph(*args):
    return run_layer(*args)
