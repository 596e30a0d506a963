"""factorlm.nn.ConvLSTM: every gate parameterization against an independent float64 reference of the dense
ConvLSTM (Shi et al. 2015) with the kernel it composes to, gradcheck, state handling, counts, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factorlm.errors import ConfigWarning, InputShapeError
from factorlm.nn import ConvLSTM, ConvLSTMCell

GATE_ARGS = {"dense": {}, "separable": {}, "grouped": {"groups": 2}, "bottleneck": {"rank": 3}}


def reference(x, layers, hx=None, forget_bias=1.0):
    """The ConvLSTM from its equations, one step at a time: the gate map one convolution over
    cat([x_t, h]). x (T, N, C, H, W); layers: per layer (W, b or None, peephole (3, C_h) or None).
    Returns output and the per-layer final (h, c)."""
    finals = []
    for layer, (w, b, peep) in enumerate(layers):
        c_h = w.shape[0] // 4
        shape = (x.shape[1], c_h, *x.shape[3:])
        h, c = hx[layer] if hx is not None else (x.new_zeros(shape), x.new_zeros(shape))
        outs = []
        for x_t in x:
            a = F.conv2d(torch.cat([x_t, h], 1), w, b, padding=w.shape[-1] // 2)
            a_i, a_f, a_g, a_o = a.chunk(4, 1)
            if peep is not None:
                a_i = a_i + peep[0, :, None, None] * c
                a_f = a_f + peep[1, :, None, None] * c
            c = torch.sigmoid(a_f + forget_bias) * c + torch.sigmoid(a_i) * torch.tanh(a_g)
            if peep is not None:
                a_o = a_o + peep[2, :, None, None] * c
            h = torch.sigmoid(a_o) * torch.tanh(c)
            outs.append(h)
        x = torch.stack(outs)
        finals.append((h, c))
    return x, finals


def composed_kernel(cell: ConvLSTMCell) -> torch.Tensor:
    """The dense (4C_h, C_in + C_h, k, k) kernel a cell's gate map equals, by plain indexing."""
    c_in, c_h, k = cell.in_channels, cell.hidden_channels, cell.kernel_size
    if cell.gates == "dense":
        return cell.weight
    if cell.gates == "separable":  # W[o, c] = P[o, c] · D[c]
        return cell.weight_pointwise[:, :, None, None] * cell.weight_depthwise[:, 0][None]
    if cell.gates == "bottleneck":  # W[o, c] = Σ_r W2[o, r] W1[r, c]
        return torch.einsum("or,rcij->ocij", cell.weight_w2, cell.weight_w1)
    g = cell.groups  # grouped: block-diagonal, group j's gate rows read only its x and h slices
    w = cell.weight.new_zeros(4 * c_h, c_in + c_h, k, k)
    xs, hs = c_in // g, c_h // g
    for j in range(g):
        for q in range(4):  # gate q of group j's cells: stored at rows j·4hs + q·hs, dense rows q·C_h + j·hs
            block = cell.weight[j * 4 * hs + q * hs: j * 4 * hs + (q + 1) * hs]
            rows = slice(q * c_h + j * hs, q * c_h + (j + 1) * hs)
            w[rows, j * xs:(j + 1) * xs] = block[:, :xs]
            w[rows, c_in + j * hs: c_in + (j + 1) * hs] = block[:, xs:]
    return w


def reference_layers(model: ConvLSTM):
    return [(composed_kernel(c), c.bias, c.weight_peephole) for c in model.cells]


@pytest.mark.parametrize("gates", list(GATE_ARGS))
@pytest.mark.parametrize("peephole", [False, True])
def test_every_gate_map_is_the_dense_convlstm_of_its_composed_kernel(gates, peephole):
    torch.manual_seed(0)
    model = ConvLSTM(2, [4, 2], [3, 5], num_layers=2, gates=gates, peephole=peephole, **GATE_ARGS[gates]).double()
    x = torch.randn(3, 2, 2, 6, 5, dtype=torch.float64)
    h0 = [torch.randn(2, c, 6, 5, dtype=torch.float64) for c in (4, 2)]
    c0 = [torch.randn(2, c, 6, 5, dtype=torch.float64) for c in (4, 2)]
    out, (h_n, c_n) = model(x, (tuple(h0), tuple(c0)))
    ref, finals = reference(x, reference_layers(model), hx=list(zip(h0, c0)))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for layer, (h, c) in enumerate(finals):
        torch.testing.assert_close(h_n[layer], h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_n[layer], c, rtol=1e-12, atol=1e-12)


def test_groups_1_and_a_full_rank_bottleneck_reproduce_the_dense_cell():
    torch.manual_seed(1)
    dense = ConvLSTMCell(3, 2, 3, gates="dense").double()
    grouped = ConvLSTMCell(3, 2, 3, gates="grouped", groups=1).double()
    with pytest.warns(ConfigWarning, match="not fewer than the dense"):
        bottleneck = ConvLSTMCell(3, 2, 3, gates="bottleneck", rank=8).double()  # r = 4·C_h: full rank
    with torch.no_grad():
        grouped.weight.copy_(dense.weight)  # one group: the stored kernel is the dense one
        grouped.bias.copy_(dense.bias)
        bottleneck.weight_w1.copy_(dense.weight)  # W1 = W, W2 = I
        bottleneck.weight_w2.copy_(torch.eye(8, dtype=torch.float64))
        bottleneck.bias.copy_(dense.bias)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    hx = (torch.randn(2, 2, 5, 4, dtype=torch.float64), torch.randn(2, 2, 5, 4, dtype=torch.float64))
    want = dense(x, hx)
    for cell in (grouped, bottleneck):
        for got, expected in zip(cell(x, hx), want):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gates", list(GATE_ARGS))
def test_gradcheck(gates):
    torch.manual_seed(2)
    model = ConvLSTM(2, 2, 3, gates=gates, peephole=True, **GATE_ARGS[gates]).double()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(2, 1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 1, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(model, dict(zip(names, ps)), (x, (h0, c0)))
        return out, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def test_cell_is_one_step_of_the_layer_and_zero_state_by_default():
    layer = ConvLSTM(2, 3, 3, gates="separable").double()
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64)
    out, (h_n, c_n) = layer(x)
    h, c = layer.cells[0](x[0])
    torch.testing.assert_close(h, out[0])
    torch.testing.assert_close(c, c_n[0])


@pytest.mark.parametrize("gates", ["grouped", "bottleneck"])
def test_stateful_chunks_equal_one_pass(gates):
    layer = ConvLSTM(2, [2, 4], 3, num_layers=2, gates=gates, peephole=True, **GATE_ARGS[gates]).double()
    x = torch.randn(5, 2, 2, 4, 3, dtype=torch.float64)
    whole, (h_all, c_all) = layer(x)
    first, state = layer(x[:2])
    second, (h_n, c_n) = layer(x[2:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    for a, b in zip(h_n + c_n, h_all + c_all):  # different channels per layer: tuples of tensors
        torch.testing.assert_close(a, b)
    uniform = ConvLSTM(2, 3, 3, num_layers=2).double()  # equal channels: stacked (L, N, C, H, W), as nn.LSTM
    whole, (h_all, c_all) = uniform(x)
    assert h_all.shape == (2, 2, 3, 4, 3)
    first, state = uniform(x[:3])
    second, (h_n, c_n) = uniform(x[3:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(c_n, c_all)


def test_batch_first_parity():
    torch.manual_seed(3)
    layer = ConvLSTM(1, 2, 3, num_layers=2, gates="separable").double()
    first = ConvLSTM(1, 2, 3, num_layers=2, gates="separable", batch_first=True).double()
    first.load_state_dict(layer.state_dict())
    x = torch.randn(3, 2, 1, 4, 4, dtype=torch.float64)
    out, (h, c) = layer(x)
    out_bf, (h_bf, c_bf) = first(x.transpose(0, 1))
    torch.testing.assert_close(out_bf, out.transpose(0, 1))
    torch.testing.assert_close(h_bf, h)
    torch.testing.assert_close(c_bf, c)


def test_exact_parameter_and_multiply_add_counts_and_no_dead_parameters():
    # in 3, hidden 4, k 3: C = 7 inputs to the gate map, 16 gate channels, bias 16, peepholes 3·4
    expected = {"dense": 16 * 7 * 9 + 16, "separable": 7 * 9 + 16 * 7 + 16, "bottleneck": 5 * (7 * 9 + 16) + 16}
    for gates, params in expected.items():
        cell = ConvLSTMCell(3, 4, 3, gates=gates, rank=5 if gates == "bottleneck" else None)
        assert sum(p.numel() for p in cell.parameters()) == cell.num_parameters() == params, gates
        assert cell.macs_per_frame(6, 5) == 30 * (params - 16), gates
    grouped = ConvLSTMCell(4, 4, 3, gates="grouped", groups=2, peephole=True, bias=False)
    assert sum(p.numel() for p in grouped.parameters()) == grouped.num_parameters() == 16 * 8 * 9 // 2 + 12
    assert grouped.macs_per_frame(2, 2) == 4 * (16 * 8 * 9 // 2 + 12)
    layer = ConvLSTM(2, [3, 4], [3, 1], num_layers=2)
    assert layer.num_parameters() == (12 * 5 * 9 + 12) + (16 * 7 + 16) == sum(p.numel() for p in layer.parameters())
    assert layer.macs_per_frame(3, 3) == 9 * (12 * 5 * 9 + 16 * 7)
    for gates, kw in GATE_ARGS.items():  # every parameter reaches the output
        model = ConvLSTM(2, 2, 3, num_layers=2, gates=gates, peephole=True, **kw)
        out, (h, c) = model(torch.randn(2, 1, 2, 4, 4))
        (out.sum() + c.sum()).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (gates, name)


def test_errors_are_one_line_and_name_the_value():
    cases = [
        (lambda: ConvLSTM(1, 2, 4), "kernel_size must be odd (padding k // 2 keeps the image size only for odd k), got 4"),
        (lambda: ConvLSTM(1, 2, [3, 2], num_layers=2), "kernel_size[1] must be odd"),
        (lambda: ConvLSTM(1, [2, 2, 2], 3), "hidden_channels has 3 entries [2, 2, 2] but num_layers=1"),
        (lambda: ConvLSTM(1, 2, 3, gates="sparse"), "gates must be one of dense, separable, grouped, bottleneck, got 'sparse'"),
        (lambda: ConvLSTM(1, 2, 3, groups=2), "groups=2 applies to gates='grouped' only, not gates='dense'"),
        (lambda: ConvLSTM(1, 2, 3, gates="separable", rank=2), "rank=2 applies to gates='bottleneck' only"),
        (lambda: ConvLSTM(1, 2, 3, gates="grouped"), "gates='grouped' needs groups"),
        (lambda: ConvLSTM(1, 2, 3, gates="bottleneck"), "gates='bottleneck' needs rank"),
        (lambda: ConvLSTM(4, 6, 3, gates="grouped", groups=4), "groups=4 must divide in_channels 4 and hidden_channels 6; here 1, 2"),
        (lambda: ConvLSTM(2, [2, 3], 3, num_layers=2, gates="grouped", groups=2),
         "ConvLSTM layer 1: groups=2 must divide in_channels 2 and hidden_channels 3"),
        (lambda: ConvLSTM(1, 2, 3, forget_bias=float("nan")), "forget_bias must be a finite number, got nan"),
        (lambda: ConvLSTM(1, 2, 3, dropout=2.0), "dropout must be a number in [0, 1], got 2.0"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as info:
            make()
        assert message in str(info.value) and "\n" not in str(info.value), (message, str(info.value))
    layer = ConvLSTM(2, [3, 4], 3, num_layers=2)
    x = torch.randn(2, 1, 2, 4, 4)
    shape_cases = [
        (lambda: layer(torch.randn(2, 2, 4, 4)), "ConvLSTM expects a 5-D input (T, N, C, H, W), got (2, 2, 4, 4)"),
        (lambda: layer(torch.randn(2, 1, 3, 4, 4)), "ConvLSTM expects 2 input channels, got 3"),
        (lambda: layer(x, (torch.zeros(2, 1, 3, 4, 4), torch.zeros(2, 1, 3, 4, 4))),
         "h_0 must be a tuple of 2 tensors (one per layer: the layers have different hidden_channels [3, 4])"),
        (lambda: layer(x, ((torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 5)), (torch.zeros(1, 3, 4, 4),) * 2)),
         "h_0[1] must have shape (1, 4, 4, 4), got (1, 4, 4, 5)"),
        (lambda: ConvLSTM(2, 3, 3)(x, (torch.zeros(1, 1, 3, 4, 4), torch.zeros(2, 1, 3, 4, 4))),
         "c_0 must have shape (1, 1, 3, 4, 4), got (2, 1, 3, 4, 4)"),
        (lambda: layer.cells[0](torch.randn(1, 3, 4, 4)), "ConvLSTMCell expects x of shape (N, 2, H, W), got (1, 3, 4, 4)"),
    ]
    for call, message in shape_cases:
        with pytest.raises(InputShapeError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


def test_repr_shows_non_defaults_and_dropout_acts_between_layers_only():
    layer = ConvLSTM(1, [2, 3], 3, num_layers=2, gates="bottleneck", rank=2, dropout=1.0, batch_first=True)
    assert "ConvLSTMCell(1, 2, kernel_size=3, gates='bottleneck', rank=2)" in repr(layer)
    assert "1, [2, 3], kernel_size=3, num_layers=2, batch_first=True, dropout=1" in repr(layer)
    x1, x2 = torch.randn(2, 1, 2, 1, 4, 4)
    # dropout 1 zeroes layer 0's output in training: layer 1 sees zeros whatever the input
    torch.testing.assert_close(layer(x1)[0], layer(x2)[0])
    assert layer(x1)[0].abs().sum() > 0  # the last layer's output is not dropped
    layer.eval()
    assert not torch.allclose(layer(x1)[0], layer(x2)[0])
