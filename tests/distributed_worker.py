"""Worker of tests/test_distributed.py: a few AdamW steps on a tiny Llama whose linear layers are
fusedlora nf4 layers, either in one process (the reference) or as one rank of a 2-process DDP or
FSDP2 group on gloo. Each rank takes its half of every batch."""

import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

STEPS = 4
BATCH = 8


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def build():
    import transformers

    import fusedlora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    fusedlora.apply_lora(model, "all-linear", r=4, alpha=8, quant="nf4")
    torch.manual_seed(1)
    for layer in fusedlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return model


def batches():
    generator = torch.Generator().manual_seed(123)
    return [torch.randint(0, 64, (BATCH, 16), generator=generator) for _ in range(STEPS)]


def _train(model, optimizer, rows):
    losses = []
    for ids in batches():
        ids = ids[rows]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def single_process() -> dict:
    import fusedlora

    model = build()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = _train(model, optimizer, slice(None))
    return {"losses": [loss.item() for loss in losses], "adapters": fusedlora.lora_state_dict(model)}


def rank_main(rank: int, world: int, mode: str, out_dir: str, port: int) -> None:
    import fusedlora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build()
    packed_before = {name: [t.clone() for t in layer.weight.tensors()]
                     for name, layer in fusedlora.lora_layers(model).items()}
    frozen_before = {key: value.clone() for key, value in model.state_dict().items() if "lora_" not in key}
    if mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        trained = fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    half = BATCH // world
    losses = _train(trained, optimizer, slice(rank * half, (rank + 1) * half))
    for loss in losses:
        dist.all_reduce(loss)
    adapters = fusedlora.lora_state_dict(model)
    # The frozen weights, packed ones included, stay bit-identical when the model's full state
    # dict is gathered from its shards (FSDP2) or replicas (DDP).
    packed_same = all(torch.equal(a, b) for name, layer in fusedlora.lora_layers(model).items()
                      for a, b in zip(packed_before[name], layer.weight.tensors()))
    gathered = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    frozen_same = all(torch.equal(gathered[key], value) for key, value in frozen_before.items())
    fusedlora.save_adapter(model, os.path.join(out_dir, "adapter"))
    if rank == 0:
        torch.save({"losses": [loss.item() / world for loss in losses], "adapters": adapters,
                    "packed_same": packed_same, "frozen_same_when_gathered": frozen_same},
                   os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()
