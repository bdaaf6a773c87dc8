"""What the services' ``…ToPacs`` RPCs share: the DICOMweb budgets, the request's checks before any
fetch, and the answer built from :class:`services.pacs.run.PacsRunResult`.

Both ``Detection/DetectToPacs`` and ``LabelEstimation/EstimateToPacs`` are ``wlcad pacs run`` on a
series of one of the service's configured DICOMweb servers (a request can neither make the service
fetch from nor store to anywhere else), on the model the service holds bound; neither is idempotent
(each call stores new objects), so the gateway never retries them.
"""

from __future__ import annotations

from services.api.pb import image_pb2, pacs_pb2
from services.api.sources import configured_dicomweb_server
from services.core.uids import check_uid
from services.core.version import software_version
from services.core.work_budget import remaining_s
from services.pacs.run import PacsRunResult

#: A call's DICOMweb requests wait at most this long each, and the whole round trip this long —
#: never past the request's own deadline.
PACS_CALL_TIMEOUT_S = 60.0
PACS_TOTAL_TIMEOUT_S = 600.0


def checked_series(series: image_pb2.DicomWebReference, servers: tuple[str, ...]) -> tuple[str, str, str]:
    """(configured base URL, study UID, series UID) of a request's ``series``; an InputError naming
    ``series.<field>`` otherwise, before anything is fetched."""
    base = configured_dicomweb_server(series.base_url, servers, "series.base_url")
    check_uid(series.study_instance_uid, "series.study_instance_uid")
    check_uid(series.series_instance_uid, "series.series_instance_uid")
    return base, series.study_instance_uid, series.series_instance_uid


def call_timeouts() -> dict[str, float]:
    """``timeout_s`` / ``total_timeout_s`` of a :class:`services.pacs.run.PacsRunRequest`: the budgets
    above, cut to what the request has left."""
    return {
        "timeout_s": remaining_s(PACS_CALL_TIMEOUT_S),
        "total_timeout_s": remaining_s(PACS_TOTAL_TIMEOUT_S),
    }


def store_response(result: PacsRunResult) -> pacs_pb2.PacsStoreResponse:
    return pacs_pb2.PacsStoreResponse(
        task=result.task,
        instances_fetched=result.instances_fetched,
        findings=result.findings,
        model_version=result.model_version,
        stored=[
            pacs_pb2.PacsStoredObject(
                kind=o.kind,
                sop_class_uid=o.sop_class_uid,
                series_instance_uid=o.series_instance_uid,
                sop_instance_uid=o.sop_instance_uid,
                found=o.found,
            )
            for o in result.stored
        ],
        all_found=result.all_found,
        software_version=software_version(),
    )
