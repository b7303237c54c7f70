"""Checks of answers against the api's OpenAPI document: ``DOC`` (the document the api generates from its
route declarations), ``violations`` (a checker for the JSON Schema subset the document uses) and
``response_schema`` (the schema of one response)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from services.api.app import create_app
from services.api.settings import ApiSettings


def api_document() -> dict[str, Any]:
    """The api's OpenAPI document, as its app serves it at /openapi.json (no I/O: the app is not started)."""
    doc: dict[str, Any] = create_app(ApiSettings(port=0)).state.runtime.openapi_document()
    return doc


DOC = api_document()


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = doc["components"]["schemas"][name]
    return schema


def _type_ok(value: Any, t: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[t]


def violations(value: Any, schema: dict[str, Any], doc: dict[str, Any] = DOC, at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (anyOf, allOf, type, enum, const, pattern, format uuid/date-time,
    minimum, minLength/maxLength, required, properties, additionalProperties, items)."""
    s = _resolve(schema, doc)
    out: list[str] = []
    if "anyOf" in s:
        found = [violations(value, option, doc, at) for option in s["anyOf"]]
        if all(found):
            return [f"{at}: {value!r} matches none of anyOf: {found}"]
    for part in s.get("allOf", []):
        out.extend(violations(value, part, doc, at))
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_type_ok(value, t) for t in types):
            return [f"{at}: {value!r} is not {types}"]
    if "enum" in s and value not in s["enum"]:
        out.append(f"{at}: {value!r} not in {s['enum']}")
    if "const" in s and value != s["const"]:
        out.append(f"{at}: {value!r} != {s['const']!r}")
    if isinstance(value, str):
        if "pattern" in s and not re.search(s["pattern"], value):
            out.append(f"{at}: {value!r} does not match {s['pattern']}")
        if s.get("format") == "uuid":
            try:
                uuid.UUID(value)
            except ValueError:
                out.append(f"{at}: {value!r} is not a uuid")
        if s.get("format") == "date-time":
            try:
                if datetime.fromisoformat(value).tzinfo is None:
                    out.append(f"{at}: {value!r} has no zone")
            except ValueError:
                out.append(f"{at}: {value!r} is not a date-time")
        if len(value) < s.get("minLength", 0) or len(value) > s.get("maxLength", 10**9):
            out.append(f"{at}: length {len(value)} out of bounds")
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in s and value < s["minimum"]:
            out.append(f"{at}: {value} < {s['minimum']}")
        if "maximum" in s and value > s["maximum"]:
            out.append(f"{at}: {value} > {s['maximum']}")
    if isinstance(value, dict):
        props = s.get("properties", {})
        for name in s.get("required", []):
            if name not in value:
                out.append(f"{at}: missing {name}")
        for name, v in value.items():
            if name in props:
                out.extend(violations(v, props[name], doc, f"{at}.{name}"))
            elif s.get("additionalProperties") is False:
                out.append(f"{at}: unexpected property {name}")
            elif isinstance(s.get("additionalProperties"), dict):
                out.extend(violations(v, s["additionalProperties"], doc, f"{at}.{name}"))
    if isinstance(value, list) and "items" in s:
        for i, v in enumerate(value):
            out.extend(violations(v, s["items"], doc, f"{at}[{i}]"))
    return out


def response_schema(path: str, method: str, status: int, media: str = "application/json") -> dict[str, Any]:
    op = DOC["paths"][path][method.lower()]
    resp = op["responses"].get(str(status)) or op["responses"]["default"]
    return resp["content"][media]["schema"]
