"""``factorlm doctor``: the loop each device and dtype gets, why a faster one is missing, and a
check of every loop against the per-step reference that fails when a loop is wrong."""

from __future__ import annotations

from factorlm.cli import main
from factorlm.ops import _backend, _extension, _scan_torch


def test_doctor_names_the_loops_and_checks_each(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    expected_cpu = "extension" if _extension.is_available() else "torch"
    assert f"impl='auto' picks: cpu float32 -> {expected_cpu}; cpu bfloat16 -> torch" in out
    for loop in ("torch", expected_cpu):
        for layer in ("FLSTM(8, 16, proj 8, rank 4, 2 layers)", "GLSTM(8, 16, proj 8, groups 2, 2 layers)",
                      "DiagonalLSTM(8, 16, proj 8, 2 layers)"):
            assert f"ok    {loop:9s} cpu  {layer}: max difference" in out
    assert "WRONG" not in out


def test_doctor_says_why_the_extension_is_missing(monkeypatch, capsys, fresh_extension_state):
    monkeypatch.setenv(_extension.DISABLE_ENV, "1")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    environment = next(line for line in out.splitlines() if line.startswith("environment: "))
    assert "FACTORLM_NO_EXTENSION=1" in environment  # beside any other variable set (OMP_NUM_THREADS, ...)
    assert ("C++ recurrence (CPU): NOT available (disabled by FACTORLM_NO_EXTENSION=1); F-LSTM and G-LSTM on CPU "
            "run the pure-PyTorch loop") in out
    assert "unset FACTORLM_NO_EXTENSION to use it" in out
    assert "cpu float32 -> torch" in out


def test_doctor_fails_when_a_loop_computes_something_else(monkeypatch, capsys):
    def off_by_a_little(gates, c_prev, c, m, addend=None):
        _scan_torch._cell_forward(gates, c_prev, c, m, addend)
        m.mul_(1 + 1e-6)  # a wrong cell output, far smaller than any real bug

    wrong = _scan_torch.TORCH_CELL_MATH._replace(forward=off_by_a_little)
    monkeypatch.setattr(_backend, "TORCH_LOOP", _backend._pytorch_loop("torch", wrong))
    assert main(["doctor"]) == 1
    captured = capsys.readouterr()
    assert "WRONG torch     cpu  FLSTM(8, 16, proj 8, rank 4, 2 layers)" in captured.out
    assert "WRONG torch     cpu  GLSTM" in captured.out
    assert "a time loop disagrees with the reference (lines marked WRONG)" in captured.err


def test_bf16_counts_as_native_only_where_pytorch_may_use_the_hardware(monkeypatch):
    from factorlm import machine

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(machine, "cpu_capability", lambda: "AVX512")
    assert machine.native_bf16()
    monkeypatch.setattr(machine, "cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not machine.native_bf16()
    monkeypatch.setattr(machine, "cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not machine.native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert machine.native_bf16()
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"fp", "asimd", "bf16"})  # ARM
    assert machine.native_bf16()
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    assert not machine.native_bf16()
