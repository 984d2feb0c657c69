"""`python -m fusedlora bench-model` on the CPU with the tiny preset: every stack's first loss is
checked against PEFT on the dense base before it is timed, the JSON has the layer benchmark's
schema, and a stack that computes something else is reported, not timed."""

import json

import pytest
import torch

from fusedlora.benchmark import whole_model

pytest.importorskip("transformers")
pytest.importorskip("peft")
STACKS = "peft-dense,floor,fusedlora-reference,peft-bnb,torchao-nf4"


def test_the_tiny_run_checks_then_times_every_stack(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "2", "--checkpointing",
            "--stacks", STACKS, "--out", str(tmp_path)]
    assert whole_model.main(argv) == 0
    (written,) = tmp_path.glob("bench-model-*-cpu.json")
    recorded = json.loads(written.read_text())
    assert set(recorded) == {"meta", "ceilings", "results"} and recorded["meta"]["complete"]
    rows = {row["provider"]: row for row in recorded["results"]}
    assert set(rows) == set(STACKS.split(","))
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["case"]["checkpointing"] and row["case"]["shape"] == "tiny"
        if name not in ("peft-dense", "floor"):
            assert row["check_error"] <= whole_model.OUTPUT_TOLERANCE, row
    assert rows["floor"]["times_floor"] == 1.0 and rows["fusedlora-reference"]["speedup_vs"].keys() == {
        "peft-bnb", "peft-dense"}
    assert 0 < rows["fusedlora-reference"]["lora_share"] <= 1 and rows["peft-dense"]["lora_share"] is None
    assert (tmp_path / written.name.replace(".json", ".png")).exists() or pytest.importorskip("matplotlib") is None


def test_a_stack_that_computes_something_else_is_not_timed(monkeypatch):
    correct = whole_model.stacks()

    def broken(base, values):  # the LoRA term twice over: B doubled
        return correct["fusedlora-reference"](base, {name: (a, 2 * b) for name, (a, b) in values.items()})

    monkeypatch.setattr(whole_model, "stacks", lambda: {**correct, "fusedlora-broken": broken})
    monkeypatch.setattr(whole_model, "_why_not", lambda name, device: None)
    rows = whole_model.measure("tiny", torch.device("cpu"), ["peft-dense", "floor", "fusedlora-broken"], 2, 1, False)
    row = next(row for row in rows if row["provider"] == "fusedlora-broken")
    assert row["status"].startswith("disagrees: first-step logits") and "tokens_per_s" not in row
    assert row["check_error"] > 0.8


def test_without_a_reference_nothing_is_compared(monkeypatch):
    monkeypatch.setattr(whole_model, "REFERENCES", ())  # as if neither PEFT nor the PyTorch path could run
    rows = whole_model.measure("tiny", torch.device("cpu"), ["peft-bnb"], 2, 1, False)
    row = next(row for row in rows if row["provider"] == "peft-bnb")
    assert row["status"].startswith("unchecked:") and "tokens_per_s" not in row
