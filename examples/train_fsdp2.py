"""Fine-tune a Hugging Face Llama with fusedlora adapters on an nf4 base, sharded by FSDP2.

Once, quantize the checkpoint (one of its files in memory at a time):

    python -c "import fusedlora.loading as l; l.quantize_checkpoint('Meta-Llama-3-70B', 'llama-3-70b-nf4')"

Then train on every GPU; each rank reads only its shards of the base, the blocks recompute their
activations in backward, and the adapters and optimizer are checkpointed with
torch.distributed.checkpoint (the frozen base is not: it is the quantized checkpoint). A run
started again with the same --checkpoints folder resumes from its last checkpoint:

    torchrun --nproc-per-node=8 examples/train_fsdp2.py --model llama-3-70b-nf4 --data train.txt \\
        --checkpoints ckpt --steps 1000

On a CPU, a smoke run with a tiny random Llama and random tokens (gloo):

    torchrun --nproc-per-node=2 examples/train_fsdp2.py --tiny --steps 4 --checkpoints /tmp/ckpt
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fusedlora


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a folder written by fusedlora.loading.quantize_checkpoint")
    source.add_argument("--tiny", action="store_true", help="a tiny random Llama (smoke runs)")
    parser.add_argument("--data", help="a text file to train on (with --model); default random tokens")
    parser.add_argument("--checkpoints", required=True, help="folder of the DCP checkpoints (resumed from)")
    parser.add_argument("--adapter", help="where to save the adapter at the end (default <checkpoints>/adapter)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    return parser.parse_args(argv)


def build_model(args, device: torch.device) -> torch.nn.Module:
    """The model with nf4 LoRA layers, activation checkpointing, each block and the root
    `fully_shard`-ed with bf16 compute; the base read shard by shard from --model."""
    if args.tiny:
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)  # the same random base on every rank
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.AutoConfig.from_pretrained(args.model)
        with fusedlora.meta_parameters():
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    fusedlora.apply_lora(model, "all-linear", r=args.r, alpha=2 * args.r, quant="nf4")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if args.model:
        torch.manual_seed(0)  # load_checkpoint_shards draws the new adapters: alike on every rank
        fusedlora.load_checkpoint_shards(model, args.model, device=device)
    return model


def batches(args, vocab: int, rank: int, world: int):
    """This rank's share of each step's batch: (micro_batch, seq_len) token ids."""
    if args.data:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        with open(args.data) as text:
            ids = torch.tensor(tokenizer(text.read())["input_ids"])
        span = args.micro_batch * args.seq_len
        for step in range(args.steps):
            start = (step * world + rank) * span % max(len(ids) - span, 1)
            yield ids[start:start + span].view(args.micro_batch, args.seq_len)
    else:
        for step in range(args.steps):
            generator = torch.Generator().manual_seed(step * world + rank)
            yield torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=generator)


def trainable_state(model, optimizer) -> dict:
    """The adapters and AdamW's state, sharded (the frozen base is left out: it never changes)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": {key: value for key, value in model_state.items() if ".lora_" in key}, "optim": optim_state}


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build_model(args, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    latest = os.path.join(args.checkpoints, "latest.json")
    start = 0
    if os.path.exists(latest):
        with open(latest) as handle:
            start = json.load(handle)["step"]
        state = trainable_state(model, optimizer)
        dcp.load(state, checkpoint_id=os.path.join(args.checkpoints, f"step-{start}"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        if rank == 0:
            print(f"resumed at step {start}")
    for step, ids in enumerate(batches(args, model.config.vocab_size, rank, world)):
        if step < start:
            continue
        began = time.perf_counter()
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        if rank == 0:
            tokens = ids.numel() * world / (time.perf_counter() - began)
            print(f"step {step + 1} loss {loss.item() / world:.6f} tokens/s {tokens:.0f}", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            dcp.save(trainable_state(model, optimizer), checkpoint_id=os.path.join(args.checkpoints, f"step-{step + 1}"))
            if rank == 0:
                with open(latest, "w") as handle:
                    json.dump({"step": step + 1}, handle)
    fusedlora.save_adapter(model, args.adapter or os.path.join(args.checkpoints, "adapter"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
