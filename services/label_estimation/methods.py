"""The registry of label-estimation methods: one entry each, read by the pipeline, the service's
``Describe`` and model checks, and the CLI's ``--method`` choices.

Adding a method is one :class:`Method` in :data:`METHODS`; nothing else dispatches on its name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.core.errors import InputError
from services.core.lesion_mask import LesionMask
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.core.work_budget import checkpoint
from services.label_estimation.random_walker import random_walker_mask
from services.label_estimation.shapes import prompt_ellipsoid_mask, sphere_mask
from services.label_estimation.threshold import threshold_mask
from services.label_estimation.unet import MODEL_NAME, InferFunction, unet_masks


class SegmentationModel(Protocol):
    """A served model as a method needs it (``services.label_estimation.model.UnetModel``)."""

    @property
    def infer(self) -> InferFunction: ...

    version: str
    max_batch: int


@dataclass(frozen=True)
class MethodMask:
    """One lesion's mask from a method, with the model's own confidence where it has one."""

    mask: LesionMask
    mean_probability_inside: float | None = None


MaskFunction = Callable[[Volume, Sequence[LesionPrompt], "SegmentationModel | None"], list[MethodMask]]


@dataclass(frozen=True)
class Method:
    """A way to turn prompts into masks. ``model`` names the model it needs from the repository;
    ``volumetric`` methods refuse single-slice images (a radiograph)."""

    name: str
    summary: str
    masks: MaskFunction
    model: str | None = None
    volumetric: bool = False


def _each(function: Callable[[Volume, LesionPrompt], LesionMask]) -> MaskFunction:
    """A rule-based method applied lesion by lesion."""

    def run(
        image: Volume, prompts: Sequence[LesionPrompt], model: SegmentationModel | None
    ) -> list[MethodMask]:
        masks = []
        for number, prompt in enumerate(prompts, start=1):
            checkpoint(f"lesion {number} of {len(prompts)}")  # an abandoned request stops here
            masks.append(MethodMask(function(image, prompt)))
        return masks

    return run


def _unet(
    image: Volume, prompts: Sequence[LesionPrompt], model: SegmentationModel | None
) -> list[MethodMask]:
    if model is None:
        raise InputError("the unet method needs an inference backend", field="method")
    results = unet_masks(image, prompts, model.infer, model.max_batch)
    return [MethodMask(r.mask, round(r.mean_probability_inside, 4)) for r in results]


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("sphere", "a ball of the stated diameter at the centre", _each(sphere_mask)),
        Method("ellipsoid", "an ellipsoid of the stated axes (or the sphere)", _each(prompt_ellipsoid_mask)),
        Method("threshold", "the thresholded component at the centre, filled", _each(threshold_mask)),
        Method("random-walker", "random-walker segmentation seeded by the prompt", _each(random_walker_mask)),
        Method(
            "unet",
            "the generic 3D U-Net on the size-normalised VOI",
            _unet,
            model=MODEL_NAME,
            volumetric=True,
        ),
    )
}


def method_named(name: str) -> Method:
    """The method called ``name``: the one place a method name is checked.

    Raises:
        InputError: ``method`` names no method.
    """
    method = METHODS.get(name)
    if method is None:
        raise InputError(f"unknown method {name[:32]!r}; choose one of {', '.join(METHODS)}", field="method")
    return method
