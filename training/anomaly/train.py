"""Train one Glow flow on an anomaly task's training split (one core, progress bar, seeded).

``--data normal`` fits p(x | normal) on the training normals; ``--data mixture`` fits p(x) on every
training case with its label ignored (the unlabelled mix of the two-flow posterior). ``--init``
starts from another run's flow: the two flows of the posterior both continue from the same normal
Glow for the same number of steps, so their difference reflects the data they saw, not two
independent random trainings.

The loss is bits per dimension of the uniformly dequantised image: x = (level + u) / 256, u ~ U[0, 1),
centred to [−0.5, 0.5]; −log p(x) in nats becomes bits/dim as (−log p + D·ln 256) / (D·ln 2).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from services.anomaly.tasks import anomaly_task
from training.anomaly.data import load_split
from training.anomaly.glow import Glow
from training.anomaly.tasks import plan_for

CHECKPOINT = "flow.pt"


def bits_per_dim(log_px: torch.Tensor, dims: int, levels: int = 256) -> torch.Tensor:
    """Discrete bits/dim of the quantised image from the continuous log-density (nats) of x ∈ [0, 1]."""
    return (-log_px + dims * math.log(levels)) / (dims * math.log(2.0))


def dequantise_uniform(levels: np.ndarray, n_levels: int, rng: torch.Generator) -> torch.Tensor:
    x = torch.from_numpy(levels.astype(np.float32))
    return (x + torch.rand(x.shape, generator=rng)) / n_levels


def save_flow(flow: Glow, path: Path, meta: dict) -> None:
    torch.save({"config": flow.config(), "state": flow.state_dict(), "meta": meta}, path)


def load_flow(path: Path) -> tuple[Glow, dict]:
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    flow = Glow(**data["config"])
    flow.load_state_dict(data["state"])
    return flow.eval(), data.get("meta", {})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=["cxr-anomaly", "head-ct-anomaly"])
    parser.add_argument("--data", choices=["normal", "mixture"], default="normal")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, help="start from this run's flow.pt")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps-per-level", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = anomaly_task(args.task)
    plan = plan_for(args.task)
    train = load_split(args.task, plan.seeds.train, plan.cases["train"])
    images = train.normals() if args.data == "normal" else train.levels
    images = images.reshape(len(images), 1, *spec.spatial)
    if args.init:
        flow, _ = load_flow(args.init)
        flow.train()
    else:
        flow = Glow(spec.dims, args.levels, args.steps_per_level, args.hidden, seed=args.seed).train()
    optimiser = torch.optim.Adam(flow.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    noise = torch.Generator().manual_seed(args.seed)
    dims = int(np.prod(spec.spatial))
    losses: list[float] = []
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(range(args.steps), desc=f"glow {args.task} {args.data}")
    for step in bar:
        batch = images[rng.choice(len(images), args.batch_size, replace=len(images) < args.batch_size)]
        x = dequantise_uniform(batch, spec.levels, noise) - 0.5
        for group in optimiser.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = bits_per_dim(flow.log_prob(x), dims, spec.levels).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
        optimiser.step()
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(bpd=f"{np.mean(losses[-20:]):.4f}")
    seconds = time.perf_counter() - started
    meta = {
        "task": args.task,
        "data": args.data,
        "train_seed": plan.seeds.train,
        "train_cases": len(images),
        "init": str(args.init) if args.init else "",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "threads": args.threads,
        "first_bpd": round(float(np.mean(losses[:20])), 4),
        "final_bpd": round(float(np.mean(losses[-50:])), 4),
        "command": "python -m training.anomaly.train " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    save_flow(flow.eval(), args.out / CHECKPOINT, meta)
    (args.out / "train.json").write_text(json.dumps(meta, indent=1) + "\n")
    (args.out / "losses.npy").write_bytes(np.asarray(losses, np.float32).tobytes())
    print(json.dumps(meta))
    return meta


if __name__ == "__main__":
    main()
