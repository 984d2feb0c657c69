"""Worker of tests/test_distributed.py: AdamW steps on a tiny Llama whose seven projections are
fusedlora layers of every format (nf4 nested, fp4, int8, fp8, dense, nf4 blocksize 128, fp4
nested), either in one process (the reference) or as one rank of a DDP or FSDP2 group on gloo.
Each rank takes its share of every batch. Each scenario writes what it saw to `<scenario>-rank<r>.pt`."""

import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

STEPS = 4
SAVE_AFTER = 2  # the fsdp2 scenario saves a DCP checkpoint after this many steps
BATCH = 8
VOCAB = 64
FORMATS = {"q_proj": ("nf4", 64, True), "k_proj": ("fp4", 64, False), "v_proj": ("int8", 64, True),
           "o_proj": ("fp8", 64, True), "gate_proj": ("dense", 64, True), "up_proj": ("nf4", 128, False),
           "down_proj": ("fp4", 64, True)}


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def build(formats: dict = FORMATS):
    import transformers

    import fusedlora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    for name, (fmt, blocksize, nested) in formats.items():
        fusedlora.apply_lora(model, [name], r=4, alpha=8, quant=fmt, blocksize=blocksize, double_quant=nested)
    torch.manual_seed(1)
    for layer in fusedlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return model


def batches():
    generator = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (BATCH, 16), generator=generator) for _ in range(STEPS)]


def probe_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(model, optimizer, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def base_state(state: dict) -> dict:
    """The frozen entries of a state dict (everything but the adapters)."""
    return {key: value for key, value in state.items() if "lora_" not in key}


def single_process() -> dict:
    import fusedlora

    model = build()
    base = {key: value.clone() for key, value in base_state(model.state_dict()).items()}
    optimizer = _optimizer(model)
    losses = [_step(model, optimizer, ids).item() for ids in batches()]
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits
    return {"losses": losses, "adapters": fusedlora.lora_state_dict(model), "base": base, "logits": logits}


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _storage_facts(model) -> dict:
    """Per LoRA layer: the bytes of its frozen storage this rank holds, and whether it is sharded."""
    import fusedlora
    from fusedlora.storage import is_sharded, storage_names

    return {name: {"bytes": sum(_local_bytes(getattr(layer, field)) for field in storage_names(layer)),
                   "sharded": is_sharded(layer)}
            for name, layer in fusedlora.lora_layers(model).items()}


def _watch_forwards(model) -> list:
    """Record, at each LoRA layer's forward, whether its storage is whole plain tensors in their
    packed dtypes (gathered by FSDP2 for the layer, never dequantized)."""
    import fusedlora
    from fusedlora.storage import STORAGE_PREFIX, stored_form

    seen = []

    def record(layer, args):
        layout = layer._weight_layout
        for field, like in zip(layout.tensor_fields, layout.tensors()):
            stored = getattr(layer, STORAGE_PREFIX + field)
            seen.append(not isinstance(stored, DTensor) and stored.shape == stored_form(layout, like).shape
                        and (stored.dtype in (torch.uint8, torch.int8) or layout.fmt == "dense"))

    for layer in fusedlora.lora_layers(model).values():
        layer.register_forward_pre_hook(record)
    return seen


def _adapter_bytes(model, optimizer) -> dict:
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    states = [optimizer.state[p] for p in lora]
    return {"adapters": sum(_local_bytes(p) for p in lora),
            "gradients": sum(_local_bytes(p.grad) for p in lora),
            "optimizer": sum(_local_bytes(s[k]) for s in states for k in ("exp_avg", "exp_avg_sq"))}


def _shard(model, mixed_precision: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else None)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def _full_base(model) -> tuple[dict, dict]:
    """The model's full state dict gathered from its shards, as `get_model_state_dict` with
    `full_state_dict=True` gathers it, except that float8 shards travel as their bytes: gloo has
    no float8 collectives (NCCL has). Returns (its frozen entries, all of it)."""
    gathered = {}
    for key, value in get_model_state_dict(model).items():
        if isinstance(value, DTensor) and value.dtype == torch.float8_e4m3fn:
            value = DTensor.from_local(value.to_local().view(torch.uint8), value.device_mesh, value.placements,
                                       shape=value.shape, stride=value.stride()).full_tensor().view(value.dtype)
        elif isinstance(value, DTensor):
            value = value.full_tensor()
        gathered[key] = value.detach().cpu()
    return base_state(gathered), gathered


def _dcp_state(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def rank_main(rank: int, world: int, scenario: str, out_dir: str, port: int) -> None:
    """One rank of `scenario`: "ddp", "fsdp2" (train, save a DCP checkpoint midway, gather, cast),
    "resume" (load that checkpoint at this world size, finish the steps) or "mixed" (FSDP2 with
    bf16 MixedPrecisionPolicy)."""
    import fusedlora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build()
    if scenario == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        trained = _shard(model, mixed_precision=scenario == "mixed")
    optimizer = _optimizer(trained)
    seen = _watch_forwards(model)
    share = BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    first = 0
    if scenario == "resume":
        state = _dcp_state(trained, optimizer)
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
        set_model_state_dict(trained, state["model"])
        set_optimizer_state_dict(trained, optimizer, state["optim"])
        first = SAVE_AFTER
    losses = []
    for step, ids in enumerate(batches()[first:], start=first):
        loss = _step(trained, optimizer, ids[rows])
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if scenario == "fsdp2" and step + 1 == SAVE_AFTER:
            dcp.save(_dcp_state(trained, optimizer), checkpoint_id=os.path.join(out_dir, "dcp"))
    result = {"losses": losses, "storage": _storage_facts(model), "bytes": _adapter_bytes(trained, optimizer),
              "gathered_in_forward": all(seen) and bool(seen)}
    result["base"], full = _full_base(trained)
    result["adapters"] = {key: value for key, value in full.items() if "lora_" in key}
    if scenario == "fsdp2":
        if rank == 0:
            torch.save(full, os.path.join(out_dir, "full_state.pt"))
        trained.to(torch.bfloat16)
        result["base_after_cast"], _ = _full_base(trained)
    if scenario == "ddp":
        fusedlora.save_adapter(model, os.path.join(out_dir, "adapter"))
    torch.save(result, os.path.join(out_dir, f"{scenario}-rank{rank}.pt"))
    dist.destroy_process_group()


def big_config():
    """A Llama of about 180 MB as nf4 + bf16 embeddings: big against what one rank should read."""
    import transformers

    return transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                    torch_dtype=torch.bfloat16)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (now) or VmHWM (its peak;
    unlike ru_maxrss, not inherited from the process that spawned this one)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def low_memory_rank(rank: int, world: int, checkpoint: str, out_dir: str, port: int) -> None:
    """Build the big Llama on the meta device, shard it, read this rank's rows of `checkpoint`;
    record the growth of peak RSS, the gathered frozen weights and the loss of a probe batch."""
    import transformers
    import transformers.models.llama.modeling_llama  # imported before measuring: code, not weights

    import fusedlora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    before = _status_kib("VmRSS")
    with fusedlora.meta_parameters():
        model = transformers.LlamaForCausalLM(big_config()).to(torch.bfloat16)
    fusedlora.apply_lora(model, "all-linear", r=8, quant="nf4")
    trained = _shard(model, mixed_precision=False)
    torch.manual_seed(5)
    missing = fusedlora.load_checkpoint_shards(trained, checkpoint)
    grown = _status_kib("VmHWM") - before
    ids = probe_ids()
    with torch.no_grad():
        loss = trained(input_ids=ids, labels=ids).loss
    base, full = _full_base(trained)
    if rank == 0:
        adapters = {key: value for key, value in full.items() if ".lora_" in key}
        torch.save({"grown_bytes": grown * 1024, "base": base, "loss": loss.item(), "missing": missing,
                    "adapters": adapters},
                   os.path.join(out_dir, "lowmem-rank0.pt"))
    dist.destroy_process_group()


def refusals_rank(rank: int, world: int, out_dir: str, port: int) -> None:
    """What a sharded model refuses, each with a message saying what to do instead: a merge, a
    rank-0 broadcast load, an assign-load into meta shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    import fusedlora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    said = {}

    def attempt(name, call):
        try:
            call()
            said[name] = None
        except Exception as err:  # each refusal's message is what the test checks
            said[name] = str(err)
        dist.barrier()

    no_fp8 = {**FORMATS, "o_proj": ("int8", 64, True)}  # gloo has no float8 collectives
    model = build(no_fp8)
    full = model.state_dict()
    trained = _shard(model, mixed_precision=False)
    layer = trained.model.layers[0].self_attn.q_proj
    attempt("merge", layer.merge)
    attempt("broadcast", lambda: set_model_state_dict(
        trained, full if rank == 0 else {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                     strict=False)))
    with fusedlora.meta_parameters():
        empty = build(no_fp8)
    _shard(empty, mixed_precision=False)
    attempt("assign", lambda: empty.load_state_dict(get_model_state_dict(trained), strict=False, assign=True))
    torch.save(said, os.path.join(out_dir, f"refusals-rank{rank}.pt"))
    dist.destroy_process_group()
