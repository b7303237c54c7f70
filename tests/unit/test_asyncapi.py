"""The AsyncAPI documents that internal teams read (docs/asyncapi/*.json) are the ones FastStream generates
from the services' declared subscribers and publishers, and they describe every topic with its contract."""

from __future__ import annotations

from typing import Any

from cli import asyncapi
from shared.contracts import (
    AlertRaised,
    ChargesComputed,
    ChargesComputedV2,
    MeasurementsTaken,
    MeasurementTaken,
    OrgAssigned,
    TransactionPosted,
)
from shared.topics import ALERTS, ASSIGNMENTS, CHARGES, CHARGES_V2, READINGS, READINGS_V1, TRANSACTIONS, dlq


def test_the_committed_documents_are_what_the_code_generates() -> None:
    generated = asyncapi.documents()
    for name, doc in generated.items():
        committed = (asyncapi.DOCS / f"{name}.json").read_bytes()
        assert committed == asyncapi.render(doc), (
            f"docs/asyncapi/{name}.json differs from the code: run `billing asyncapi --write` and commit it"
        )
    assert sorted(p.stem for p in asyncapi.DOCS.glob("*.json")) == sorted(generated)


def _operations(doc: dict[str, Any]) -> dict[str, str]:
    """channel address -> 'send' or 'receive'."""
    channels = doc["channels"]
    out = {}
    for op in doc["operations"].values():
        name = op["channel"]["$ref"].split("/")[-1]
        out[channels[name]["address"]] = op["action"]
    return out


def _payload_title(doc: dict[str, Any], address: str) -> str:
    channel = next(c for c in doc["channels"].values() if c["address"] == address)
    ref = next(iter(channel["messages"].values()))["$ref"].split("/")[-1]
    payload = doc["components"]["messages"][ref]["payload"]
    if "$ref" in payload:
        return str(payload["$ref"].split("/")[-1])
    return str(payload.get("title", ""))


def test_every_topic_is_documented_by_who_sends_and_who_receives_it_with_its_contract() -> None:
    docs = asyncapi.documents()
    assert _operations(docs["collector"]) == {READINGS: "send"}
    assert _operations(docs["pricer"]) == {
        READINGS: "receive", READINGS_V1: "receive", CHARGES: "send", dlq(READINGS): "send", dlq(READINGS_V1): "send",
        ASSIGNMENTS: "receive", dlq(ASSIGNMENTS): "send",  # the ledger's org assignments, for rate cards
    }
    assert _operations(docs["ledger"]) == {
        CHARGES: "receive",
        CHARGES_V2: "receive",  # until its retention has passed
        TRANSACTIONS: "send",
        ALERTS: "send",
        ASSIGNMENTS: "send",
        dlq(CHARGES): "send",
        dlq(CHARGES_V2): "send",
    }
    assert _operations(docs["api"]) == {
        CHARGES: "receive", TRANSACTIONS: "receive", dlq(CHARGES): "send", dlq(TRANSACTIONS): "send",
        ALERTS: "receive", dlq(ALERTS): "send",  # alerts: delivered to webhooks
        CHARGES_V2: "receive", dlq(CHARGES_V2): "send",  # the previous version, drained
    }
    assert _payload_title(docs["collector"], READINGS) == MeasurementsTaken.__name__
    assert _payload_title(docs["pricer"], READINGS) == MeasurementsTaken.__name__
    assert _payload_title(docs["pricer"], READINGS_V1) == MeasurementTaken.__name__
    assert _payload_title(docs["pricer"], CHARGES) == ChargesComputed.__name__
    assert _payload_title(docs["ledger"], CHARGES) == ChargesComputed.__name__
    assert _payload_title(docs["ledger"], CHARGES_V2) == ChargesComputedV2.__name__
    assert _payload_title(docs["ledger"], TRANSACTIONS) == TransactionPosted.__name__
    assert _payload_title(docs["ledger"], ASSIGNMENTS) == OrgAssigned.__name__
    assert _payload_title(docs["pricer"], ASSIGNMENTS) == OrgAssigned.__name__
    assert _payload_title(docs["api"], ALERTS) == AlertRaised.__name__
    assert _payload_title(docs["api"], CHARGES) == ChargesComputed.__name__
    assert _payload_title(docs["api"], CHARGES_V2) == ChargesComputedV2.__name__


def test_the_batch_schemas_carry_the_contract_field_descriptions() -> None:
    schemas = asyncapi.documents()["pricer"]["components"]["schemas"]
    charges = schemas["ChargesComputed"]["properties"]
    for field in ("resource_id", "revision", "price", "amount_numerator", "amount_denominator", "shard"):
        assert field in charges
    assert "position in `prices`" in charges["price"]["description"]
    assert "crc32" in schemas["MeasurementsTaken"]["properties"]["shard"]["description"]
