"""Training loop of the generic segmenter: type-balanced batches, BigAug stack, Dice + BCE loss."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.label_unet.augment import training_transforms
from training.label_unet.network import CHANNELS, build_network
from training.label_unet.voi_set import VoiSet


@dataclass
class TrainingSettings:
    steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 0
    channels: tuple[int, ...] = CHANNELS
    device: str = "cpu"
    threads: int | None = None
    #: Processes augmenting samples in parallel with the training step (0 = in the training process).
    workers: int = 1


@dataclass
class TrainingHistory:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class AugmentedVois(IterableDataset):
    """An endless stream of augmented (image, target) pairs, lesion types drawn uniformly.

    Drawing the type first keeps a type with many small lesions from dominating; each worker has
    its own seeded generator and transform state, so a run is reproducible for a worker count.
    """

    def __init__(self, samples: VoiSet, seed: int) -> None:
        self.samples = samples
        self.seed = seed
        types = sorted(set(samples.lesion_types))
        self.members = [np.array([i for i, s in enumerate(samples.lesion_types) if s == t]) for t in types]

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # workers share the machine with the training step
        rng = np.random.default_rng([self.seed, worker])
        transforms = training_transforms(self.seed * 1000 + worker)
        while True:
            members = self.members[rng.integers(len(self.members))]
            row = int(rng.choice(members))
            sample = transforms(
                {
                    "image": torch.as_tensor(self.samples.images[row]),
                    "label": torch.as_tensor(self.samples.targets[row]),
                }
            )
            yield torch.as_tensor(sample["image"]).float(), (torch.as_tensor(sample["label"]) > 0.5).float()


def train_segmenter(
    samples: VoiSet, settings: TrainingSettings, progress: Callable[[int, float], None] | None = None
) -> tuple[torch.nn.Module, TrainingHistory]:
    if len(samples) == 0:
        raise ValueError("no training samples")
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    network = build_network(settings.channels).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    # One-cycle: short warm-up, then anneal; a smoke run of a few steps keeps a constant rate.
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=settings.learning_rate, total_steps=settings.steps, pct_start=0.1
        )
        if settings.steps >= 20
        else None
    )
    loss_function = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5)
    loader = DataLoader(
        AugmentedVois(samples, settings.seed),
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        persistent_workers=settings.workers > 0,
    )
    history = TrainingHistory()
    start = time.perf_counter()
    network.train()
    for step, (images, targets) in zip(range(settings.steps), loader, strict=False):
        images, targets = images.to(device), targets.to(device)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_function(network(images), targets)
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        history.losses.append(float(loss.detach()))
        if progress:
            progress(step, history.losses[-1])
    history.seconds = time.perf_counter() - start
    return network.eval(), history
