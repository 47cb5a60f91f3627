"""`make bench-trunk`: training throughput of a shared trunk run once per batch vs once per task.

The seeds' reference code ran the whole trunk once per task; `deeplab_resnet` runs it once
per batch and feeds every head from the same features. This benchmark trains the same
3-task NYUv2-shaped model (13-class segmentation, depth, surface normals; dilated ResNet +
ASPP heads; random data of NYUv2's 288×384 size) both ways with the framework's task
losses, Adam and mixed precision (fp16 autocast + GradScaler on CUDA, bf16 autocast on
CPU, or `--precision 32`), and reports images/s and the GPU memory the training steps
add on top of the weights (peak allocated minus what was allocated before). The two variants take
turns in each of `--rounds` rounds (best round kept), so a load change hits both alike.
Writes `bench/trunk.json` and `bench/trunk.md`.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlsparse.benchmarks.export import NYU_TASKS
from mtlsparse.io import atomic_write_text, write_json

PRECISIONS = ("mixed", "32")


def nyu_batch(batch: int, height: int, width: int, device: torch.device,
              seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """Random images and targets in the dataset's formats: class map, positive depth, unit normals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=g)
    normal = torch.randn(batch, 3, height, width, generator=g)
    targets = {"seg": torch.randint(0, NYU_TASKS["seg"].num_classes, (batch, height, width), generator=g),
               "depth": torch.rand(batch, 1, height, width, generator=g) * 9 + 0.5,
               "normal": normal / normal.norm(dim=1, keepdim=True)}
    return x.to(device), {k: v.to(device) for k, v in targets.items()}


def build_model(depth: int, width: float, height: int, image_width: int, trunk_per_task: bool) -> nn.Module:
    from mtlsparse.models.deeplab import DeepLabResNet

    torch.manual_seed(0)
    return DeepLabResNet(NYU_TASKS, (3, height, image_width), depth=depth, width=width, trunk_per_task=trunk_per_task)


class Trainer:
    """Adam training steps on one fixed batch, with the chosen precision on the chosen device."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got '{precision}'")
        self.model, self.device = model.to(device).train(), device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.mixed = precision == "mixed"
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mixed and device.type == "cuda")

    def step(self, x: Tensor, targets: dict[str, Tensor]) -> float:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed):
            out = self.model(x)
        loss = sum(task.loss(out[name].float(), targets[name]) for name, task in NYU_TASKS.items())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def images_per_s(self, x: Tensor, targets: dict[str, Tensor], steps: int, warmup: int) -> float:
        for _ in range(warmup):
            self.step(x, targets)
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step(x, targets)
        synchronize(self.device)
        return steps * x.shape[0] / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(depth: int, width: float, height: int, image_width: int, batch: int, steps: int, warmup: int,
            rounds: int, precision: str, device: torch.device) -> dict:
    """Best-of-`rounds` images/s (and CUDA step memory) for trunk-once and trunk-per-task training."""
    x, targets = nyu_batch(batch, height, image_width, device)
    result: dict = {"depth": depth, "width": width, "height": height, "image_width": image_width, "batch": batch,
                    "steps": steps, "warmup": warmup, "rounds": rounds, "precision": precision,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "threads": torch.get_num_threads(), "tasks": list(NYU_TASKS)}
    trainers = {variant: Trainer(build_model(depth, width, height, image_width, variant == "per_task"), device,
                                 precision) for variant in ("shared", "per_task")}
    speeds: dict[str, list[float]] = {variant: [] for variant in trainers}
    for r in range(rounds):  # the variants take turns in every round
        for variant, trainer in trainers.items():
            if device.type == "cuda" and r == 0:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            speeds[variant].append(trainer.images_per_s(x, targets, steps, warmup if r == 0 else 0))
            if device.type == "cuda" and r == 0:  # optimizer state + activations of this variant's steps
                result[f"{variant}_step_mem_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    for variant, values in speeds.items():
        result[f"{variant}_images_per_s"] = max(values)
    result["speedup"] = result["shared_images_per_s"] / result["per_task_images_per_s"]
    return result


def markdown(r: dict, note: str) -> str:
    def memory(variant: str) -> str:
        value = r.get(f"{variant}_step_mem_gib")
        return "—" if value is None else f"{value:.2f}"

    threads = f" ({r['threads']} threads)" if r["device"] == "cpu" else ""
    lines = [f"Trunk benchmark: `deeplab_resnet` ResNet-{r['depth']} (width {r['width']}, output stride 8), 3 tasks "
             f"(seg 13 classes, depth, normals), {r['height']}×{r['image_width']} random NYUv2-shaped batches of "
             f"{r['batch']}, Adam, precision {r['precision']}, device {r['device']}{threads}; best of "
             f"{r['rounds']} rounds × {r['steps']} steps after {r['warmup']} warm-up. {note}", "",
             "| trunk runs | images/s | GPU memory of the training steps (GiB) |", "|---|---|---|",
             f"| once per batch (mtlsparse) | {r['shared_images_per_s']:.2f} | {memory('shared')} |",
             f"| once per task (reference code) | {r['per_task_images_per_s']:.2f} | {memory('per_task')} |", "",
             f"Speed-up of running the trunk once: **{r['speedup']:.2f}×** images/s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth (18 | 34 | 50)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of the model")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--image-width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="mixed", choices=PRECISIONS,
                        help="mixed: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    parser.add_argument("--note", default="", help="free text for the table caption (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    row = measure(args.depth, args.width, args.height, args.image_width, args.batch, args.steps, args.warmup,
                  args.rounds, args.precision, device)
    results = {"row": row, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "note": args.note}
    write_json(args.out / "trunk.json", results)
    atomic_write_text(args.out / "trunk.md", markdown(row, args.note))
    print(markdown(row, args.note))


if __name__ == "__main__":
    main()
