"""DDP and FSDP2 (`fully_shard`) in 2 processes on gloo: a few training steps of a small Llama
whose linears are fusedlora nf4 layers give the losses and adapter weights of a single-process run
on the whole batch, the packed weights stay bit-identical (in place and gathered from the shards), and the adapter rank 0 saves loads back."""

import pytest
import torch
import torch.multiprocessing as mp

import fusedlora
from distributed_worker import build, free_port, rank_main, single_process

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    return single_process()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(mode, reference, tmp_path):
    mp.spawn(rank_main, args=(2, mode, str(tmp_path), free_port()), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    assert result["packed_same"] and result["frozen_same_when_gathered"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), atol=1e-5, rtol=1e-5)
    assert result["adapters"].keys() == reference["adapters"].keys()
    for key, value in reference["adapters"].items():
        torch.testing.assert_close(result["adapters"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    loaded = fusedlora.load_adapter(build(), tmp_path / "adapter")
    for key, value in fusedlora.lora_state_dict(loaded).items():
        assert torch.equal(value, result["adapters"][key]), key
