"""The benchmark harness on the CPU: the quick run's JSON, table and plot; providers checked before
they are timed; the saved-bytes accounting; the pytest-benchmark cases; bench/gpu_check.sh."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fusedlora.benchmark.cases import Case, default_cases, order_cases, parse_shapes
from fusedlora.benchmark.memory import saved_activation_bytes
from fusedlora.benchmark.providers import CaseTensors, Layer, Provider, providers
from fusedlora.benchmark.report import derived, flops, summary, table
from fusedlora.benchmark.runner import MEMORY_DROPOUT, CaseRunner
from fusedlora.benchmark.timing import Clock, Timing

ROOT = Path(__file__).resolve().parents[1]
CASE = Case("tiny", 8, 64, 96, 4, "nf4")


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kwargs)


def _without_interpreter() -> dict:
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def test_quick_cpu_run_writes_json_table_and_plot(tmp_path):
    result = _run("-m", "fusedlora", "bench", "--quick", "--out", str(tmp_path), env=_without_interpreter())
    assert result.returncode == 0, result.stderr
    assert "CPU timing (perf_counter), median of 20" in result.stdout
    # fusedlora's CPU path (its reference backend) is what the summary reports on a CPU.
    summary_lines = result.stdout.split("summary (")[1].splitlines()
    assert any("tiny 256->384 M=64 r=16 nf4" in line and " reference " in line for line in summary_lines)
    # The cost model's estimates for the headline GPU cases, labelled a model.
    assert "MODEL estimates for H200" in result.stdout and "not measurements" in result.stdout
    recorded = json.loads(next(tmp_path.glob("bench-*-cpu.json")).read_text())
    assert next(tmp_path.glob("bench-*-cpu.png")).stat().st_size > 1000
    meta = recorded["meta"]
    assert meta["commit"] and meta["date"] and meta["device"].startswith("CPU") and meta["versions"]["torch"]
    assert meta["complete"] and meta["cases_done"] == meta["cases_total"] == len(default_cases(gpu=False, quick=True))
    assert recorded["ceilings"]["copy_gb_per_s"] > 0 and recorded["ceilings"]["bf16_matmul_tflop_per_s"] > 0
    by_provider = {}
    for row in recorded["results"]:
        by_provider.setdefault(row["provider"], []).append(row)
    for name in ("reference", "floor"):
        for row in by_provider[name]:
            assert row["status"] == "ok" and 0 < row["forward_ms"] and 0 < row["forward_backward_ms"]
            assert row["times_floor"] > 0
    assert all(row["status"].startswith("unavailable") for row in by_provider["fusedlora-triton"])
    assert all(row["check_error"] < 3e-2 for row in by_provider["reference"])
    layouts = recorded["ceilings"]["bf16_matmul_tflop_per_s_by_layout"]
    assert recorded["ceilings"]["bf16_matmul_tflop_per_s"] == max(layouts.values()) and len(layouts) == 2
    estimates = {(e["backend"], e["case"]): e for e in recorded["model"]["estimates"]}
    training = estimates[("triton", "up_proj 4096->14336 M=8192 r=16 nf4")]
    assert training["model_ratio_to_bf16"] > 1.0 and training["target_ratio_to_bf16"] == 1.10
    assert 0 < estimates[("triton", "q_proj 4096->4096 M=1 r=16 nf4")]["model_copy_fraction"] < 1


def test_the_cpu_run_says_why_it_prints_no_model(tmp_path):
    result = _run("-m", "fusedlora", "bench", "--quick", "--shapes", "tiny", "--rows", "1", "--reps", "2",
                  "--warmup", "0", "--providers", "reference", "--out", str(tmp_path),
                  env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert "model: TRITON_INTERPRET=1 is set" in result.stdout
    assert "unavailable" in json.loads(next(tmp_path.glob("bench-*-cpu.json")).read_text())["model"]
    summarized = _run("-m", "fusedlora", "bench", "--summarize", str(next(tmp_path.glob("bench-*-cpu.json"))),
                      "--model", env=_without_interpreter())
    assert summarized.returncode == 0 and "this run is a CPU run" in summarized.stdout, summarized.stderr


def _measured(provider: str, case: Case, forward_ms: float, forward_backward_ms: float) -> dict:
    return {"provider": provider, "status": "ok", "case": dict(case.__dict__), "forward_ms": forward_ms,
            "backward_ms": forward_backward_ms - forward_ms, "forward_backward_ms": forward_backward_ms,
            "spread_ms": {"forward": 0.01, "backward": 0.01, "forward_backward": 0.01}, "weight_bytes": 10**7,
            "saved_bytes": case.m * (case.k + case.rank) * 2, "peak_bytes": None, "check_error": 0.0}


def test_a_gpu_run_gets_the_model_beside_each_measured_headline_figure(tmp_path):
    """What bench/gpu_check.sh does after measuring: `--summarize JSON --model` on an sm_90 run."""
    training, decode = Case("q_proj", 8192, 4096, 4096, 16, "nf4"), Case("q_proj", 1, 4096, 4096, 16, "nf4")
    results = [_measured("fusedlora-triton", training, 1.0, 3.0), _measured("fusedlora-triton", decode, 0.04, 0.1),
               _measured("fusedlora-cuda", decode, 0.05, 0.1), _measured("floor", training, 0.4, 0.8),
               _measured("fusedlora-triton", Case("tiny", 8, 64, 96, 16, "nf4"), 1, 2)]
    ceilings = {"copy_gb_per_s": 4000.0, "bf16_matmul_tflop_per_s": 700.0}
    meta = {"capability": "9.0", "complete": True, "commit": "x", "device": "NVIDIA H200"}
    path = tmp_path / "bench-gpu-cuda.json"
    path.write_text(json.dumps({"meta": meta, "ceilings": ceilings, "results": derived(results, ceilings)}))
    result = _run("-m", "fusedlora", "bench", "--summarize", str(path), "--model", env=_without_interpreter())
    assert result.returncode == 0, result.stderr[-4000:]
    recorded = json.loads(path.read_text())
    rows = {(row["provider"], row["case"]["shape"], row["case"]["m"]): row for row in recorded["results"]}
    for key, measured in ((("fusedlora-triton", "q_proj", 8192), 3.0), (("fusedlora-triton", "q_proj", 1), 0.04),
                          (("fusedlora-cuda", "q_proj", 1), 0.05)):
        row = rows[key]
        assert row["model_ms"] > 0 and row["measured_over_model"] == pytest.approx(measured / row["model_ms"])
    assert rows[("fusedlora-cuda", "q_proj", 1)]["model_ms"] != rows[("fusedlora-triton", "q_proj", 1)]["model_ms"]
    assert "model_ms" not in rows[("floor", "q_proj", 8192)]  # the model describes fusedlora's kernels only
    assert "model_ms" not in rows[("fusedlora-triton", "tiny", 8)]  # nor shapes outside the headline
    assert recorded["model"]["arch"] == 90 and "this run's GPU is" not in result.stdout
    training_row = rows[("fusedlora-triton", "q_proj", 8192)]
    assert f"{training_row['model_ms']:9.3f} {training_row['measured_over_model']:10.2f}" in result.stdout


def test_the_summary_prefers_a_gpu_backend_and_shows_one_that_failed():
    case = Case("q_proj", 8192, 4096, 4096, 16, "nf4")
    ceilings = {"copy_gb_per_s": 4000.0, "bf16_matmul_tflop_per_s": 700.0}
    reference, triton = _measured("reference", case, 2.0, 6.0), _measured("fusedlora-triton", case, 1.0, 3.0)
    lines = lambda rows: [line for line in summary(derived(rows, ceilings), ceilings).splitlines()  # noqa: E731
                          if case.label in line]
    assert " fusedlora-triton " in lines([reference, triton])[0]
    failed = {**triton, "status": "disagrees: error 0.5 > 0.03 of the reference"}
    assert lines([reference, failed]) == [f"  {case.label:44s} {'fusedlora-triton':17s} {failed['status']}"]
    unavailable = {**triton, "status": "unavailable: no GPU"}
    assert " reference " in lines([reference, unavailable])[0]
    # A forced regime is not what users get: it stays out of the summary however fast it ran.
    forced = _measured("fusedlora-triton-workspace", case, 0.5, 1.5)
    assert " fusedlora-triton " in lines([reference, triton, forced])[0]
    assert lines([reference, failed, forced]) == [f"  {case.label:44s} {'fusedlora-triton':17s} {failed['status']}"]


def test_timing_reports_outliers_and_phases_that_disagree():
    assert Timing((1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0)).outliers == 1
    assert Timing((1.0, 1.1, 0.9, 1.0, 1.05, 0.95)).outliers == 0
    case = Case("tiny", 33, 64, 96, 4, "nf4")
    agreeing = _measured("reference", case, 1.0, 3.0)
    disagreeing = {**_measured("peft-dense", case, 1.0, 3.0), "backward_ms": 5.0, "outliers": {"forward": 2}}
    rows = {row["provider"]: row for row in derived([agreeing, disagreeing], {"copy_gb_per_s": 1.0,
                                                                              "bf16_matmul_tflop_per_s": 1.0})}
    assert rows["reference"]["phases_agree"] and not rows["peft-dense"]["phases_agree"]
    decode = derived([{**disagreeing, "case": dict(Case("tiny", 8, 64, 96, 4, "nf4").__dict__)}],
                     {"copy_gb_per_s": 1.0, "bf16_matmul_tflop_per_s": 1.0})
    assert "phases_agree" not in decode[0]  # decode times its forward without autograd: not comparable
    text = table(list(rows.values()), "clock", {"copy_gb_per_s": 1.0, "bf16_matmul_tflop_per_s": 1.0})
    assert "fwd + bwd - f+b = +3.000 ms" in text and "outlier runs (beyond Q3 + 3 IQR; the median is the figure): forward 2" in text


def test_a_provider_that_disagrees_is_reported_not_timed():
    def wrong(case, tensors, dropout):
        layer = providers(["reference"])[0].build(case, tensors, dropout)
        return Layer(lambda x: 1.1 * layer.forward(x), layer.trainable, layer.resident, layer.weight_fmt,
                     layer.weight_bytes)

    broken = Provider("broken", lambda case, device: None, wrong)
    (measurement,) = CaseRunner(Clock(torch.device("cpu"), warmup=1, reps=2), [broken]).run(CASE)
    assert measurement.status.startswith("disagrees") and measurement.forward_ms is None


def test_a_provider_that_fails_is_reported():
    def failing(case, tensors, dropout):
        raise RuntimeError("no kernel for this")

    (measurement,) = CaseRunner(Clock(torch.device("cpu"), warmup=1, reps=2),
                                [Provider("failing", lambda case, device: None, failing)]).run(CASE)
    assert measurement.status == "failed: RuntimeError: no kernel for this"


def test_providers_are_checked_without_dropout_and_timed_with_the_run_s():
    built = []

    def recording(case, tensors, dropout):
        built.append(dropout)
        return providers(["reference"])[0].build(case, tensors, dropout)

    clock = Clock(torch.device("cpu"), warmup=1, reps=2)
    (measurement,) = CaseRunner(clock, [Provider("recording", lambda case, device: None, recording)], 0.25).run(CASE)
    assert measurement.status == "ok" and measurement.forward_backward_ms > 0
    assert built == [0.0, 0.25, MEMORY_DROPOUT]  # the check, the timed layer, the saved-bytes layer
    result = _run("-m", "fusedlora", "bench", "--dropout", "1.5", "--device", "cpu")
    assert result.returncode != 0 and "--dropout must be a number in [0, 1), got 1.5" in result.stderr


def test_summarize_names_a_file_it_cannot_read(tmp_path):
    (tmp_path / "other.json").write_text("[1, 2]")
    for path in (tmp_path / "missing.json", tmp_path / "other.json"):
        result = _run("-m", "fusedlora", "bench", "--summarize", str(path))
        assert result.returncode != 0 and f"--summarize {path}: not a benchmark result" in result.stderr
        assert "Traceback" not in result.stderr


def test_fused_saves_x_and_u_only_where_peft_also_saves_the_dropout():
    tensors = CaseTensors.random(CASE, torch.device("cpu"), copies=1)
    x = tensors.xs[0].clone().requires_grad_()
    fused = providers(["reference"])[0].build(CASE, tensors, 0.1)
    x_bytes, u_bytes, seed_bytes, backend_bytes = CASE.m * CASE.k * 2, CASE.m * CASE.rank * 2, 8, 8
    assert saved_activation_bytes(fused.forward, x, fused.resident) == x_bytes + u_bytes + seed_bytes + backend_bytes
    pytest.importorskip("peft")
    peft_dense = providers(["peft-dense"])[0].build(CASE, tensors, 0.1)
    assert saved_activation_bytes(peft_dense.forward, x, peft_dense.resident) > x_bytes + u_bytes + seed_bytes + backend_bytes


def test_measured_case_has_every_figure():
    clock = Clock(torch.device("cpu"), warmup=1, reps=3)
    rows = {m.provider: m for m in CaseRunner(clock, providers(["reference", "floor"])).run(CASE)}
    for row in rows.values():
        assert row.status == "ok" and len(row.spread_ms) == 3 and row.weight_bytes > 0 and row.saved_bytes >= 0
    assert rows["floor"].weight_bytes == CASE.n * CASE.k * 2
    blocks = CASE.n * CASE.k // 64  # nf4, blocksize 64, nested: codes, absmax codes, 1 nested absmax, map, offset
    assert rows["reference"].weight_bytes == CASE.n * CASE.k // 2 + blocks + 4 + 256 * 4 + 4


def test_flops_count():
    case = dict(m=4, k=8, n=16, rank=2)
    assert flops(case, "floor") == {"forward": 1024, "backward": 1024, "forward_backward": 2048}
    assert flops(case, "fusedlora-triton")["forward"] == 1024 + 2 * 4 * 2 * (8 + 16)


def test_case_lists():
    gpu = default_cases(gpu=True, quick=False)
    assert len(gpu) == 4 * 5 * 2 * 4 and gpu[0].m == 8192 and gpu[0].fmt == "nf4" and gpu[0].rank == 16
    assert default_cases(gpu=False, quick=True)[0].shape == "tiny"
    assert parse_shapes("q_proj,100x200") == {"q_proj": (4096, 4096), "100x200": (100, 200)}
    with pytest.raises(ValueError, match="unknown shape"):
        parse_shapes("qproj")
    decode = order_cases([Case("a", 2048, 8, 8, 16, "dense"), Case("a", 1, 8, 8, 16, "int8")])
    assert decode[0].m == 1


def test_summary_reads_the_headline_cases():
    row = {"provider": "fusedlora-triton", "status": "ok", "case": dict(Case("q_proj", 8192, 4096, 4096, 16, "nf4").__dict__),
           "forward_backward_ms": 2.0, "times_floor": 1.05, "speedup_vs": {"reference": 1.8, "peft-bnb": 2.5},
           "weight_gb_per_s": 100.0, "fraction_of_copy": 0.1, "saved_bytes": 8192 * (4096 + 16) * 2}
    text = summary([row], {"copy_gb_per_s": 1000.0, "bf16_matmul_tflop_per_s": 100.0})
    assert "q_proj 4096->4096 M=8192 r=16 nf4" in text and "1.05" in text and "2.50" in text and "1.000" in text


def test_pytest_benchmark_cases_run():
    result = _run("-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                  "--benchmark-min-rounds=2", "--benchmark-max-time=0.01", "--benchmark-warmup=off")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def _gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.sh would run for real")
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **env}, timeout=120)


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of a module `fusedlora_probe`."""
    wheel = folder / "fusedlora_probe-0.1-py3-none-any.whl"
    info = "fusedlora_probe-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fusedlora_probe.py", "")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fusedlora-probe\nVersion: 0.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_gpu_check_fails_clearly_without_a_gpu(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    result = _gpu_check(tmp_path / "out", WHEELS=str(wheels))
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stdout
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "no CUDA GPU is visible" in log and "installed fusedlora_probe-0.1-py3-none-any.whl" in log


def test_gpu_check_says_so_when_its_python_cannot_run(tmp_path):
    result = _gpu_check(tmp_path / "out", PYTHON=str(tmp_path / "no-such-python"))
    assert result.returncode == 2 and "could not run the import check" in result.stdout, result.stdout


def test_gpu_check_names_every_missing_module_in_one_line(tmp_path):
    bare = tmp_path / "bare-python"  # the same interpreter without its site-packages: no torch, no triton
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    result = _gpu_check(tmp_path / "out", PYTHON=str(bare), PYTHONPATH="")
    assert result.returncode == 2
    (line,) = [line for line in result.stdout.splitlines() if "has no module" in line]
    assert all(name in line for name in ("torch", "triton", "numpy", "safetensors", "tqdm")), line
    assert "nothing was checked" in line and line in (tmp_path / "out" / "gpu_check.log").read_text()
