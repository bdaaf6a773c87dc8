"""Realistic lesion phantoms with exact masks and radiologist-style weak labels (issue 3).

``write_dataset(task, n, seed, out)`` is the entry point (also ``wlcad phantom``); ``TASKS`` lists
the generators. See docs/phantoms.md for what each family models and the measured realism numbers.
"""

from training.data.dataset import TASKS, generate_case, write_dataset

__all__ = ["TASKS", "generate_case", "write_dataset"]
