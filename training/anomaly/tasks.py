"""Every phantom seed an anomaly model touches, once, per split (like :mod:`training.cade.tasks`).

A case is ``(task, seed, index)`` (:func:`training.data.dataset.generate_case`), so splits with
different seeds never share a case. ``train`` fits the flows and the PCA baseline (normals only,
or all cases as the unlabelled mixture of the two-flow model); ``validation`` calibrates (its
normals' scores) and is the only split looked at while choosing settings; ``test`` is scored once,
by every method in one run, for the reported AUCs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.core.errors import InputError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Seeds:
    train: int
    validation: int
    test: int

    def __post_init__(self) -> None:
        if len({self.train, self.validation, self.test}) != 3:
            raise InputError("splits must not share a seed", field="seeds")

    def of(self, split: Split) -> int:
        return getattr(self, split)


@dataclass(frozen=True)
class DataPlan:
    """Seeds and default case counts per split (about half the phantoms are normal)."""

    seeds: Seeds
    cases: dict[str, int]


PLANS: dict[str, DataPlan] = {
    "cxr-anomaly": DataPlan(Seeds(1301, 1302, 1303), {"train": 600, "validation": 100, "test": 200}),
    "head-ct-anomaly": DataPlan(Seeds(1401, 1402, 1403), {"train": 240, "validation": 60, "test": 120}),
}


def plan_for(task: str) -> DataPlan:
    if task not in PLANS:
        raise InputError(f"unknown anomaly task {task!r}; known: {', '.join(PLANS)}", field="task")
    return PLANS[task]
