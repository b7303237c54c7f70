"""The ``correction`` field of ``usage.charges.v3`` (a re-rating's revisions: its job id and reason): the contract
and the msgspec mirror read it alike, an ordinary batch writes it as null, a v2 body (without it) still decodes,
and a bad correction refuses the whole message with a reason naming the field."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from shared.batches import Correction, decode_charges, encode_charges
from shared.contracts import ChargesComputed, CorrectionRef
from tests.unit.test_batches import charges_doc

JOB = uuid.UUID("0190a2b4-0000-7000-8000-000000000001")


def raw(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def test_an_ordinary_batch_writes_no_correction_field() -> None:
    d = charges_doc(2)
    assert "correction" not in d  # its bytes are those it had before the field existed
    got = decode_charges(raw(d))
    assert got.rejected == [] and got.message is not None and got.message.correction is None
    assert ChargesComputed.model_validate(d).correction is None


def test_a_correction_is_read_by_the_contract_and_the_mirror_and_written_back_the_same() -> None:
    d = charges_doc(2)
    d["correction"] = {"id": str(JOB), "reason": "October's cfapps price was 10% too high"}
    contract = ChargesComputed.model_validate_json(raw(d))
    assert contract.correction == CorrectionRef(id=JOB, reason="October's cfapps price was 10% too high")
    got = decode_charges(raw(d))
    assert got.rejected == [] and got.message is not None
    assert got.message.correction == Correction(JOB, "October's cfapps price was 10% too high")
    assert json.loads(encode_charges(got.message)) == d


def test_a_v2_body_without_the_field_still_decodes() -> None:
    d = charges_doc(2)
    d["schema_version"] = 2
    got = decode_charges(raw(d))
    assert got.rejected == [] and got.message is not None
    assert got.message.schema_version == 2 and got.message.correction is None
    del d["schema_version"]  # a v3 body that leaves it out reads as null too
    assert ChargesComputed.model_validate({**d, "schema_version": 3}).correction is None


@pytest.mark.parametrize(
    ("correction", "field"),
    [
        ({"id": str(JOB), "reason": ""}, "correction.reason"),
        ({"id": str(JOB), "reason": "x" * 501}, "correction.reason"),
        ({"id": "not-a-uuid", "reason": "why"}, "correction.id"),
        ({"id": str(JOB)}, "correction.reason"),
        ({"id": str(JOB), "reason": "why", "by": "someone"}, "correction.by"),
        ("a reason alone", "correction"),
    ],
)
def test_a_bad_correction_refuses_the_whole_message_with_a_clear_reason(correction: Any, field: str) -> None:
    d = charges_doc(2)
    d["correction"] = correction
    got = decode_charges(raw(d))
    assert got.message is None
    (rejected,) = got.rejected
    assert rejected.positions == ()  # the whole message
    assert rejected.reason.startswith("invalid ChargesComputed: ") and field in rejected.reason, rejected.reason
    with pytest.raises(ValidationError):
        ChargesComputed.model_validate(d)
