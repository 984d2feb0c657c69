"""`python -m fusedlora demo`: a short, honest CPU demonstration of the API.

A frozen two-layer MLP is quantized to NF4 and given LoRA adapters, which then learn a
low-rank change of its behaviour (a "teacher": the same MLP with a rank-4 update per layer).
It prints the loss before and after, the trainable share, the weight memory and throughput.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .model import apply_lora, lora_layers, trainable_summary


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def run_demo(steps: int = 300, width: int = 256, hidden: int = 1024, batch: int = 64, rank: int = 16,
             seed: int = 0, device: str = "cpu") -> dict:
    """Train the adapters for `steps` steps and return the figures the demo prints."""
    torch.manual_seed(seed)
    student = _mlp(width, hidden).to(device)
    teacher = _mlp(width, hidden).to(device)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            n, k = layer.weight.shape
            layer.weight += 0.5 * (torch.randn(n, 4, device=device) @ torch.randn(4, k, device=device)) / k**0.5
    teacher.requires_grad_(False)
    dense_bytes = sum(p.numel() * p.element_size() for p in student.parameters())

    apply_lora(student, "all-linear", r=rank, alpha=2 * rank, quant="nf4")
    summary = trainable_summary(student)
    weight_bytes = sum(layer.weight.nbytes for layer in lora_layers(student).values())
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    eval_x = torch.randn(1024, width, device=device)

    def eval_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(student(eval_x), teacher(eval_x)).item()

    loss_before = eval_loss()
    start = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="training adapters", unit="step")):
        x = torch.randn(batch, width, device=device)
        loss = F.mse_loss(student(x), teacher(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - start
    return {
        "summary": summary,
        "loss_before": loss_before,
        "loss_after": eval_loss(),
        "dense_weight_bytes": dense_bytes,
        "nf4_weight_bytes": weight_bytes,
        "rows_per_second": steps * batch / seconds,
    }


def main(steps: int) -> None:
    figures = run_demo(steps=steps)
    print(f"\n{figures['summary']}")
    print(f"frozen weights: {figures['dense_weight_bytes'] / 2**20:.2f} MiB as fp32 -> "
          f"{figures['nf4_weight_bytes'] / 2**20:.2f} MiB as nf4 (with nested absmax)")
    print(f"held-out MSE to the teacher: {figures['loss_before']:.4f} before -> {figures['loss_after']:.4f} after")
    print(f"throughput: {figures['rows_per_second']:,.0f} rows/s forward+backward+step (CPU reference backend)")
