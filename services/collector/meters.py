"""Meters: what the collector measures, behind one small interface so more can be added.

A meter reads Cloud Foundry and returns one ``RawMeasurement`` per billable resource. Bad input from CF
(a missing field, an unknown relationship) is recorded on the affected measurement and counted; it never
stops the reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import Counter

from services.collector.cf_client import CFClient

__all__ = [
    "DEFAULT_METERS",
    "AppsMeter",
    "Hierarchy",
    "Meter",
    "MeterResult",
    "RawMeasurement",
    "ServicesMeter",
    "read_hierarchy",
]

BAD_INPUT = Counter("collector_bad_input_total", "Resources from CF with missing or inconsistent fields", ["meter"])

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RawMeasurement:
    meter: str
    resource_id: str
    resource_name: str
    resource_kind: str
    space_id: str
    value: int
    unit: str
    errors: str | None = None


@dataclass
class Hierarchy:
    """Orgs and spaces by guid: name, and a space's org."""

    orgs: dict[str, str] = field(default_factory=dict)
    spaces: dict[str, tuple[str, str]] = field(default_factory=dict)  # guid -> (org guid, name)


@dataclass
class MeterResult:
    measurements: list[RawMeasurement]
    spaces: dict[str, tuple[str, str]] = field(default_factory=dict)  # spaces seen through include=space


class Meter(Protocol):
    name: str
    unit: str

    async def measure(self, cf: CFClient, at: datetime | None) -> MeterResult: ...


def _guid_of(rel: Any) -> str | None:
    """``{"data": {"guid": ...}}`` -> guid, or None when absent or malformed."""
    try:
        g = rel["data"]["guid"]
        return g if isinstance(g, str) and g else None
    except (KeyError, TypeError):
        return None


async def read_hierarchy(cf: CFClient, at: datetime | None) -> Hierarchy:
    orgs, _ = await cf.list_all("/v3/organizations", at=at)
    spaces, _ = await cf.list_all("/v3/spaces", at=at)
    h = Hierarchy()
    for o in orgs:
        if isinstance(o.get("guid"), str):
            h.orgs[o["guid"]] = str(o.get("name") or "")
    for s in spaces:
        if isinstance(s.get("guid"), str):
            h.spaces[s["guid"]] = (
                _guid_of((s.get("relationships") or {}).get("organization")) or "",
                str(s.get("name") or ""),
            )
    return h


class AppsMeter:
    """``cfapps``: for every STARTED app, the sum over its processes of instances × memory_in_mb (MB)."""

    name = "cfapps"
    unit = "MB"

    async def measure(self, cf: CFClient, at: datetime | None) -> MeterResult:
        spaces: dict[str, tuple[str, str]] = {}
        memory: dict[str, int] = {}
        problems: dict[str, list[str]] = {}
        async for page, _ in cf.pages("/v3/processes", at=at):
            for p in page:
                href = ((p.get("links") or {}).get("app") or {}).get("href")
                app_guid = (
                    href.rstrip("/").rsplit("/", 1)[-1] if isinstance(href, str) and "/v3/apps/" in href else None
                )
                if app_guid is None:
                    BAD_INPUT.labels(self.name).inc()
                    continue  # a process that names no app cannot be billed to anything
                inst, mem = p.get("instances"), p.get("memory_in_mb")
                if (
                    not isinstance(inst, int)
                    or not isinstance(mem, int)
                    or isinstance(inst, bool)
                    or inst < 0
                    or mem < 0
                ):
                    problems.setdefault(app_guid, []).append(f"process {p.get('guid')}: bad instances/memory_in_mb")
                    continue
                memory[app_guid] = memory.get(app_guid, 0) + inst * mem

        out: list[RawMeasurement] = []
        async for page, included in cf.pages("/v3/apps", {"include": "space"}, at=at):
            for s in included.get("spaces", []):
                if isinstance(s.get("guid"), str):
                    spaces[s["guid"]] = (
                        _guid_of((s.get("relationships") or {}).get("organization")) or "",
                        str(s.get("name") or ""),
                    )
            for a in page:
                m = self._measure_app(a, memory, problems)
                if m is not None:
                    out.append(m)
        return MeterResult(out, spaces)

    def _measure_app(self, a: Json, memory: dict[str, int], problems: dict[str, list[str]]) -> RawMeasurement | None:
        guid = a.get("guid")
        if not isinstance(guid, str) or not guid:
            BAD_INPUT.labels(self.name).inc()
            return None
        errors = list(problems.get(guid, []))
        state = a.get("state")
        if state not in ("STARTED", "STOPPED"):
            errors.append(f"app state {state!r} unknown")
        elif state == "STOPPED":
            return None
        space = _guid_of((a.get("relationships") or {}).get("space"))
        if space is None:
            errors.append("app has no space relationship")
        if errors:
            BAD_INPUT.labels(self.name).inc()
        return RawMeasurement(
            meter=self.name,
            resource_id=guid,
            resource_name=str(a.get("name") or ""),
            resource_kind="",
            space_id=space or "",
            value=memory.get(guid, 0) if state == "STARTED" else 0,
            unit=self.unit,
            errors="; ".join(errors) or None,
        )


class ServicesMeter:
    """``cfservices``: every managed service instance, value 1, resource kind = its service plan guid."""

    name = "cfservices"
    unit = "instance"

    async def measure(self, cf: CFClient, at: datetime | None) -> MeterResult:
        out: list[RawMeasurement] = []
        async for page, _ in cf.pages("/v3/service_instances", {"type": "managed"}, at=at):
            for si in page:
                m = self._measure_instance(si)
                if m is not None:
                    out.append(m)
        return MeterResult(out)

    def _measure_instance(self, si: Json) -> RawMeasurement | None:
        guid = si.get("guid")
        if not isinstance(guid, str) or not guid:
            BAD_INPUT.labels(self.name).inc()
            return None
        if si.get("type", "managed") != "managed":
            return None
        rel = si.get("relationships") or {}
        plan, space = _guid_of(rel.get("service_plan")), _guid_of(rel.get("space"))
        errors = [
            m
            for m, bad in (("no service_plan relationship", plan is None), ("no space relationship", space is None))
            if bad
        ]
        if errors:
            BAD_INPUT.labels(self.name).inc()
        return RawMeasurement(
            meter=self.name,
            resource_id=guid,
            resource_name=str(si.get("name") or ""),
            resource_kind=plan or "",
            space_id=space or "",
            value=1,
            unit=self.unit,
            errors="; ".join(errors) or None,
        )


DEFAULT_METERS: Sequence[Meter] = (AppsMeter(), ServicesMeter())
