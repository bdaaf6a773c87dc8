"""Reader verdicts on candidates, from CIRCUS LesionCandidates feedback or a plain JSON map.

CIRCUS (utrad-ical/circus) stores a plug-in job's feedback as entries
``{"feedbackId", "isConsensual", "userEmail", "data": {<feedbackKey>: ...}, "actionLog", "createdAt"}``
(``circus-api/src/schemas/pluginJobFeedback.yaml``; ``GET /api/plugin-jobs/:jobId/feedback`` returns
the list). A LesionCandidates display's value is ``[{"id": <candidate id>, "value": <listener value>}]``
(``circus-ui-kit/src/cs/displays/LesionCandidates.tsx``): ``id`` is the candidate's own ``id`` or, without
one, its index in ``results.lesionCandidates`` (``normalizeCandidates``); ``value`` is what the feedback
listener reported — for a ``Choice`` listener with string options, the chosen option's *index*
(``normalizeChoiceOption``), which ``choices`` maps to a verdict (default ``TP,FP``: 0 = TP, 1 = FP).

Accepted documents, keyed on candidate ids (0-based) or ranks (1-based):

* a CIRCUS feedback list or one entry: the consensual entry, else the only personal one;
* an entry's ``data`` (``{"lesionCandidates": [...]}``) or the bare ``[{"id", "value"}]`` list;
* a plain map ``{"<rank>": "TP" | "FP" | "skip"}`` (ranks as CIRCUS and ``wlcad detect`` order them).

The reader's e-mail in a CIRCUS entry is never read into a result or a log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.core.errors import InputError

Verdict = Literal["TP", "FP", "skip"]
VERDICTS: tuple[Verdict, ...] = ("TP", "FP", "skip")
DEFAULT_FEEDBACK_KEY = "lesionCandidates"
DEFAULT_CHOICES: tuple[str, ...] = ("TP", "FP")


@dataclass(frozen=True)
class Verdicts:
    """``by``: ``"id"`` (0-based CIRCUS candidate ids) or ``"rank"`` (1-based); ``source``: which form."""

    by: Literal["id", "rank"]
    verdicts: dict[int, Verdict]
    source: str


def _verdict(value: Any, choices: Sequence[str], field: str) -> Verdict:
    if isinstance(value, bool):
        raise InputError(f"a verdict cannot be a boolean ({value})", field=field)
    if isinstance(value, int):
        if not 0 <= value < len(choices):
            raise InputError(
                f"choice index {value} is not one of 0..{len(choices) - 1} ({choices})", field=field
            )
        value = choices[value]
    if isinstance(value, str):
        for verdict in VERDICTS:
            if value.strip().lower() == verdict.lower():
                return verdict
    raise InputError(f"must be TP, FP or skip (or a choice index), got {str(value)[:32]!r}", field=field)


def parse_choices(text: str) -> tuple[str, ...]:
    """``"TP,FP,skip"`` → the verdict of each Choice index."""
    choices = tuple(part.strip() for part in text.split(","))
    for i, choice in enumerate(choices):
        _verdict(choice, (), f"choices[{i}]")
    if len(choices) < 2:
        raise InputError("needs at least two choices (e.g. TP,FP)", field="choices")
    return choices


def _entry(entries: list[Any]) -> dict[str, Any]:
    """The consensual entry, else the only personal one."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
            raise InputError("a CIRCUS feedback entry needs a 'data' object", field=f"feedback[{i}]")
    consensual = [e for e in entries if e.get("isConsensual") is True]
    if len(consensual) == 1:
        return consensual[0]
    if len(consensual) > 1:
        raise InputError("holds more than one consensual entry", field="feedback")
    if len(entries) == 1:
        return entries[0]
    raise InputError(
        f"holds {len(entries)} personal entries and no consensual one: register a consensual feedback in "
        "CIRCUS (or pass one entry)",
        field="feedback",
    )


def _id_list(items: Any, choices: Sequence[str], field: str) -> dict[int, Verdict]:
    if not isinstance(items, list):
        raise InputError("must be a list of {id, value}", field=field)
    out: dict[int, Verdict] = {}
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or "id" not in item or "value" not in item:
            raise InputError("needs 'id' and 'value'", field=where)
        cid = item["id"]
        if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
            raise InputError(f"id must be an integer ≥ 0, got {cid!r}", field=where)
        if cid in out:
            raise InputError(f"candidate id {cid} appears twice", field=where)
        out[cid] = _verdict(item["value"], choices, f"{where}.value")
    return out


def parse_verdicts(
    document: Any, *, feedback_key: str = DEFAULT_FEEDBACK_KEY, choices: Sequence[str] = DEFAULT_CHOICES
) -> Verdicts:
    """The verdicts in any accepted form (see the module docstring)."""
    if isinstance(document, list) and document and all(isinstance(e, dict) and "data" in e for e in document):
        document = _entry(document)
    if isinstance(document, dict) and "data" in document and isinstance(document["data"], dict):
        document = _entry([document])["data"]
        if feedback_key not in document:
            raise InputError(f"the feedback has no {feedback_key!r} display", field="feedback_key")
        return Verdicts("id", _id_list(document[feedback_key], choices, feedback_key), "circus-entry")
    if isinstance(document, dict) and feedback_key in document:
        return Verdicts("id", _id_list(document[feedback_key], choices, feedback_key), "circus-data")
    if isinstance(document, list):
        return Verdicts("id", _id_list(document, choices, "feedback"), "circus-list")
    if isinstance(document, dict):
        out: dict[int, Verdict] = {}
        for key, value in document.items():
            text = str(key).strip()
            if not text.isdigit() or int(text) < 1:
                raise InputError(
                    f"keys are candidate ranks (1, 2, …), got {str(key)[:32]!r}", field="feedback"
                )
            if int(text) in out:
                raise InputError(f"rank {int(text)} appears twice", field="feedback")
            out[int(text)] = _verdict(value, choices, f"feedback[{text}]")
        if not out:
            raise InputError("holds no verdicts", field="feedback")
        return Verdicts("rank", out, "plain")
    raise InputError(f"is not a feedback document (a {type(document).__name__})", field="feedback")
