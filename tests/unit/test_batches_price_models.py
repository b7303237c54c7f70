"""shared/batches.py and shared/contracts.py on usage.charges.v3: prices with a model and bands.

What readers rely on: a flat price's terms are the v2 bytes (no model, no bands written), so a v2 body
decodes as a v3 batch of flat prices and is re-encoded byte for byte as it was; a graduated or volume price
carries its bands as exact strings; an item of such a price has amount 0/1, and one with any other amount is
refused on its own with its reason while the others go on; a price whose model or bands cannot exist refuses
the whole message, with the same verdict from the contract (pydantic) and from the fast mirror (msgspec).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from shared.batches import Charges, decode_charges, encode_charges, read_as_written
from shared.contracts import ChargesComputed, ChargesComputedV2
from tests.unit.test_batches import charges_doc, raw

GRADUATED = {
    "id": str(uuid.UUID(int=8)),
    "microcredits_per_unit": 0,
    "unit": 1024,
    "model": "graduated",
    "bands": [
        {"up_to": "1000", "microcredits_per_unit": 0},
        {"up_to": "4001/2", "microcredits_per_unit": 1370, "flat_fee": 250},
        {"up_to": None, "microcredits_per_unit": 1000},
    ],
}


def v3_doc() -> dict[str, Any]:
    """Three items: 0 of the flat price (exact amount), 1 and 2 of a graduated price (amount 0/1)."""
    d = charges_doc(3)
    assert d["schema_version"] == 3
    d["prices"].append(GRADUATED)
    for i in (1, 2):
        d["price"][i] = 1
        d["amount_numerator"][i] = 0
        d["amount_denominator"][i] = 1
    return d


def test_a_flat_price_is_written_as_in_v2_and_a_v2_body_decodes_and_re_encodes_byte_for_byte() -> None:
    d = charges_doc(3)
    (price,) = d["prices"]
    assert set(price) == {"id", "microcredits_per_unit", "unit"}  # no model, no bands: the v2 terms
    d["schema_version"] = 2
    assert "correction" not in d  # an ordinary batch writes none: a v2 body
    body = json.dumps(d, separators=(",", ":")).encode()
    ChargesComputedV2.model_validate_json(body)  # what the pricer wrote on usage.charges.v2
    got = decode_charges(body)
    assert got.rejected == [] and got.message is not None
    assert got.message.schema_version == 2
    assert got.message.prices[0].model == "flat" and got.message.prices[0].bands is None
    assert encode_charges(got.message) == encode_charges(read_as_written(body, Charges))
    assert encode_charges(got.message) == body


def test_a_graduated_price_and_its_items_of_amount_0_over_1_are_read_by_the_contract_and_the_mirror() -> None:
    d = v3_doc()
    ChargesComputed.model_validate(d)
    got = decode_charges(raw(d))
    assert got.rejected == [] and got.message is not None
    terms = got.message.prices[1]
    assert terms.model == "graduated" and terms.bands is not None
    assert [(b.up_to, b.microcredits_per_unit, b.flat_fee) for b in terms.bands] == [
        ("1000", 0, 0), ("4001/2", 1370, 250), (None, 1000, 0)
    ]
    again = json.loads(encode_charges(got.message))
    assert again["prices"][1]["bands"][0] == {"up_to": "1000", "microcredits_per_unit": 0}  # fee 0 omitted
    assert again["prices"][1]["bands"][2] == {"up_to": None, "microcredits_per_unit": 1000}  # null edge kept
    ChargesComputed.model_validate(again)


@pytest.mark.parametrize(("numerator", "denominator"), [(5, 1), (0, 2), (1370, 1024)])
def test_an_item_of_a_graduated_price_with_an_amount_is_refused_alone(numerator: int, denominator: int) -> None:
    d = v3_doc()
    d["amount_numerator"][2] = numerator
    d["amount_denominator"][2] = denominator
    with pytest.raises(ValidationError, match="item 2 of a graduated price must have amount 0/1"):
        ChargesComputed.model_validate(d)
    got = decode_charges(raw(d))
    assert got.message is not None and got.message.resource_id == d["resource_id"][:2]
    (rej,) = got.rejected
    assert rej.positions == (2,)
    assert rej.reason == (
        f"item 2: an item of a graduated price must have amount 0/1 (the ledger prices it), not "
        f"{numerator}/{denominator}"
    )
    assert rej.value is not None and read_as_written(rej.value, Charges).resource_id == [d["resource_id"][2]]


def test_the_flat_items_of_a_batch_with_a_graduated_price_keep_their_exact_amounts() -> None:
    d = v3_doc()
    assert d["amount_numerator"][0] > 0 and d["amount_denominator"][0] > 1
    got = decode_charges(raw(d))
    assert got.rejected == [] and got.message is not None
    assert (got.message.amount_numerator[0], got.message.amount_denominator[0]) == (
        d["amount_numerator"][0], d["amount_denominator"][0]
    )


def _bands(*bands: tuple[Any, int, int]) -> list[dict[str, Any]]:
    return [{"up_to": u, "microcredits_per_unit": r, "flat_fee": f} for u, r, f in bands]


PRICE_DEFECTS: list[tuple[str, dict[str, Any], str]] = [
    ("flat with bands", {"model": "flat", "bands": _bands((None, 5, 0))}, "a flat price has no bands"),
    ("volume without bands", {"model": "volume"}, "needs bands"),
    ("edges not increasing", {"bands": _bands(("10", 1, 0), ("5", 1, 0), (None, 1, 0))}, "increase strictly"),
    ("last band closed", {"bands": _bands(("10", 1, 0), ("20", 1, 0))}, "open-ended"),
    ("an open band before the last", {"bands": _bands((None, 1, 0), (None, 1, 0))}, "open-ended"),
    ("no bands", {"bands": []}, "at least one band"),
    ("a float edge", {"bands": _bands(("2.5", 1, 0), (None, 1, 0))}, "up_to"),
    ("a zero denominator", {"bands": _bands(("5/0", 1, 0), (None, 1, 0))}, "up_to"),
    ("a numeric edge", {"bands": _bands((10, 1, 0), (None, 1, 0))}, "up_to"),
    ("33 bands", {"bands": _bands(*[(str(i + 1), 1, 0) for i in range(32)], (None, 1, 0))}, "32"),
]


@pytest.mark.parametrize(("change", "words"), [c[1:] for c in PRICE_DEFECTS], ids=[c[0] for c in PRICE_DEFECTS])
def test_a_price_whose_model_cannot_exist_refuses_the_whole_message(change: dict[str, Any], words: str) -> None:
    d = v3_doc()
    d["prices"][1] = {k: v for k, v in GRADUATED.items() if k != "bands"} | change
    if d["prices"][1]["model"] == "flat":
        for i in (1, 2):
            d["price"][i] = 1
    with pytest.raises(ValidationError):
        ChargesComputed.model_validate(d)
    got = decode_charges(raw(d))
    assert got.message is None
    (rej,) = got.rejected
    assert rej.positions == () and rej.value is None
    assert rej.reason.startswith("invalid ChargesComputed") and words in rej.reason, rej.reason


def test_a_price_without_a_model_is_flat() -> None:
    got = decode_charges(raw(charges_doc(5)))
    assert got.rejected == [] and got.message is not None
    assert [(p.model, p.bands) for p in got.message.prices] == [("flat", None)]
