"""Label estimation's one conversion to and from ``wlcad.v1`` messages (service and client alike).

The service turns :class:`LesionEstimate` into ``LesionResult`` here, and the client turns it back
here, so nothing the proto carries is dropped on the way and no field is read by a string key.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.api import limits
from services.api.convert import measurements_from_proto, measurements_to_proto, pack_mask, unpack_mask
from services.api.pb import label_estimation_pb2 as pb
from services.core.errors import InputError
from services.core.lesion_mask import LesionMask
from services.core.lesion_prompt import LesionPrompt
from services.core.volume import Volume
from services.label_estimation.pipeline import LesionEstimate, QualityCheck


def prompts_from_proto(
    lesions: Sequence[pb.LesionPrompt], limit: int = limits.MAX_LESIONS
) -> list[LesionPrompt]:
    """The weak labels of a request, each checked once by :class:`LesionPrompt` (errors carry the
    request path, ``lesions[i].<field>``); their fit to the image is checked by the pipeline."""
    if not lesions:
        raise InputError("give at least one lesion", field="lesions")
    if len(lesions) > limit:
        raise InputError(f"at most {limit} lesions per request, got {len(lesions)}", field="lesions")
    prompts = []
    for index, lesion in enumerate(lesions):
        try:
            prompts.append(
                LesionPrompt(
                    tuple(lesion.center_mm),
                    lesion.diameter_mm,
                    lesion.lesion_id,
                    tuple(lesion.axes_mm) if lesion.axes_mm else None,
                )
            )
        except InputError as exc:
            raise InputError(exc.message, field=f"lesions[{index}].{exc.field}") from exc
    return prompts


#: A lesion type is free text (the manifest's vocabulary), bounded like SEG's segment description.
MAX_LESION_TYPE_CHARS = 64


def lesion_types(lesions: Sequence[pb.LesionPrompt]) -> dict[int, str]:
    """``lesion_id`` → its prompt's ``lesion_type`` (only the prompts that give one), checked:
    printable text of at most :data:`MAX_LESION_TYPE_CHARS` characters (it goes into DICOM)."""
    types = {}
    for index, lesion in enumerate(lesions):
        text = lesion.lesion_type.strip()
        if not text:
            continue
        if len(text) > MAX_LESION_TYPE_CHARS or not text.isprintable() or "\\" in text:
            raise InputError(
                f"must be printable text of at most {MAX_LESION_TYPE_CHARS} characters, without a backslash",
                field=f"lesions[{index}].lesion_type",
            )
        types[lesion.lesion_id] = text
    return types


def prompts_to_proto(prompts: Sequence[LesionPrompt]) -> list[pb.LesionPrompt]:
    return [
        pb.LesionPrompt(
            lesion_id=p.lesion_id,
            center_mm=list(p.center_mm),
            diameter_mm=p.diameter_mm,
            axes_mm=list(p.axes_mm or ()),
        )
        for p in prompts
    ]


def quality_to_proto(qc: QualityCheck) -> pb.QualityCheck:
    message = pb.QualityCheck(
        passed=qc.passed,
        empty=qc.empty,
        diameter_ratio=qc.diameter_ratio or 0.0,
        center_offset_mm=qc.center_offset_mm or 0.0,
    )
    if qc.mean_probability_inside is not None:
        message.mean_probability_inside = qc.mean_probability_inside
    return message


def quality_from_proto(message: pb.QualityCheck) -> QualityCheck:
    measured = not message.empty
    return QualityCheck(
        passed=message.passed,
        empty=message.empty,
        diameter_ratio=message.diameter_ratio if measured else None,
        center_offset_mm=message.center_offset_mm if measured else None,
        mean_probability_inside=(
            message.mean_probability_inside if message.HasField("mean_probability_inside") else None
        ),
    )


def estimate_to_proto(estimate: LesionEstimate) -> pb.LesionResult:
    tight = estimate.mask.tight()
    return pb.LesionResult(
        lesion_id=estimate.lesion_id,
        method=estimate.method,
        mask=pack_mask(tight.start_xyz, tight.mask_zyx),
        measurements=measurements_to_proto(estimate.measurements),
        qc=quality_to_proto(estimate.qc),
        model_version=estimate.model_version or "",
    )


def estimates_from_proto(
    image: Volume, prompts: Sequence[LesionPrompt], response: pb.EstimateResponse
) -> list[LesionEstimate]:
    """The pipeline's own result objects, rebuilt on the client's copy of the image grid, so the
    output writers (label map, SEG, CIRCUS labels) run unchanged on the client."""
    by_id = {p.lesion_id: p for p in prompts}
    estimates = []
    for lesion in response.lesions:
        if lesion.lesion_id not in by_id:
            raise InputError(
                f"the response names lesion {lesion.lesion_id}, not asked for", field="lesion_id"
            )
        start, mask = unpack_mask(lesion.mask)
        estimates.append(
            LesionEstimate(
                lesion_id=lesion.lesion_id,
                method=lesion.method,
                prompt=by_id[lesion.lesion_id],
                mask=LesionMask(image, start, mask),
                qc=quality_from_proto(lesion.qc),
                measurements=measurements_from_proto(lesion.measurements),
                model_version=lesion.model_version or None,
            )
        )
    return estimates
