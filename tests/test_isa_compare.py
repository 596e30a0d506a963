"""benchmarks/isa_compare.py: which instruction sets it runs, and the side-by-side table it builds
(the children, real benchmarks, are replaced by canned payloads here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import isa_compare  # noqa: E402


def test_only_sets_at_or_below_the_cpus_own_run():
    assert isa_compare.runnable("avx2", "AVX512") is None
    assert isa_compare.runnable("default", "AVX2") is None
    assert "AVX2 only" in isa_compare.runnable("avx512", "AVX2")
    assert isa_compare.runnable("default", "SVE256") is None  # ARM: only the portable baseline
    assert "not x86" in isa_compare.runnable("avx2", "SVE256")


def _payload(capability: str, speedup: float) -> dict:
    row = dict(p=64, n=256, B=32, layer="GLSTM k=4", theoretical_speedup=3.0, speedup=speedup,
               speedup_ratio=speedup / 3.0, forward_speedup=speedup, batch1_speedup=1.5)
    return {"machine": {"cpu_capability": capability}, "matmul_peak_gflops": {"torch.matmul": 180.0},
            "c++ extension": True, "rows": [row]}


def test_table_puts_each_set_side_by_side_and_flags_a_restriction_that_did_not_take(monkeypatch, tmp_path, capsys):
    ran = []

    def fake_child(script, isa, forwarded, out):
        ran.append((script, isa, forwarded))
        # the default child reports AVX2: as if ATEN_CPU_CAPABILITY had been ignored
        return _payload("AVX2", {"avx2": 2.6, "default": 2.1}[isa])

    monkeypatch.setattr(isa_compare, "native_capability", lambda: "AVX2")
    monkeypatch.setattr(isa_compare, "run_child", fake_child)
    payload = isa_compare.main(["--shape", "64,256,32", "--inference", "--out", str(tmp_path / "isa.json")])
    out = capsys.readouterr()
    assert "skipping avx512: this CPU has AVX2 only" in out.err
    assert [(s, i) for s, i, _ in ran] == [("layer_speed.py", "avx2"), ("inference_speed.py", "avx2"),
                                            ("layer_speed.py", "default"), ("inference_speed.py", "default")]
    assert ran[0][2] == ["--shape=64,256,32", "--repeats", "10"]
    assert "| 64 | 256 | 32 | GLSTM k=4 | 3.00 | 2.60× (87%) | 2.10× (70%) |" in out.out
    assert "| 64 | 256 | 32 | GLSTM k=4 | 3.00 | 2.60× / 1.50× | 2.10× / 1.50× |" in out.out
    assert "default: get_cpu_capability() = AVX2 **(asked for DEFAULT: the restriction did not take)**" in out.out
    assert "avx2: get_cpu_capability() = AVX2, torch.matmul" in out.out
    assert set(payload["isas"]) == {"avx2", "default"} and (tmp_path / "isa.json").exists()


def test_isolated_and_interleaved_timings_get_a_column_per_set(monkeypatch, tmp_path, capsys):
    def fake_child(script, isa, forwarded, out):
        payload = _payload(isa.upper(), {"avx512": 2.7, "avx2": 2.4}[isa])
        row = payload["rows"][0]
        payload["modes"] = ["isolated", "interleaved"]
        row.update(isolated_speedup=row["speedup"], isolated_ratio=row["speedup_ratio"],
                   interleaved_speedup=row["speedup"] - 0.3, interleaved_ratio=(row["speedup"] - 0.3) / 3.0)
        return payload

    monkeypatch.setattr(isa_compare, "native_capability", lambda: "AVX512")
    monkeypatch.setattr(isa_compare, "run_child", fake_child)
    isa_compare.main(["--isa", "avx512", "--isa", "avx2", "--out", str(tmp_path / "isa.json")])
    out = capsys.readouterr().out
    assert ("| p | n | B | layer | theory | avx512: isolated speedup (ratio) | avx2: isolated speedup (ratio) | "
            "avx512: interleaved speedup (ratio) | avx2: interleaved speedup (ratio) |") in out
    assert "| 64 | 256 | 32 | GLSTM k=4 | 3.00 | 2.70× (90%) | 2.40× (80%) | 2.40× (80%) | 2.10× (70%) |" in out


def test_no_runnable_set_is_an_error_naming_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(isa_compare, "native_capability", lambda: "AVX2")
    with pytest.raises(SystemExit):
        isa_compare.main(["--isa", "avx512"])
    assert "none of avx512 can run on this CPU (AVX2)" in capsys.readouterr().err
