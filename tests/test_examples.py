"""examples/train_fsdp2.py under torchrun on gloo (2 CPU processes): it trains, checkpoints the
adapters and optimizer with DCP, resumes from the checkpoint exactly (the resumed run's last loss
is the uninterrupted run's) and saves an adapter that loads."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedlora

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_fsdp2.py"


def _train(checkpoints: Path, steps: int) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT),
               "--tiny", "--steps", str(steps), "--save-every", "2", "--seq-len", "32", "--micro-batch", "2",
               "--checkpoints", str(checkpoints)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"step (\d+) loss ([\d.]+)", output)}


def test_the_fsdp2_example_trains_checkpoints_and_resumes(tmp_path):
    straight = _losses(_train(tmp_path / "straight", 4))
    assert sorted(straight) == [1, 2, 3, 4] and straight[4] < straight[1]
    _train(tmp_path / "resumed", 2)
    second = _train(tmp_path / "resumed", 4)
    assert "resumed at step 2" in second
    resumed = _losses(second)
    assert sorted(resumed) == [3, 4]
    assert resumed[4] == pytest.approx(straight[4], rel=1e-5)
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    loaded = fusedlora.load_adapter(model, tmp_path / "resumed" / "adapter")
    assert len(fusedlora.lora_layers(loaded)) == 14
    assert all(torch.count_nonzero(layer.lora_B.weight) > 0 for layer in fusedlora.lora_layers(loaded).values())
