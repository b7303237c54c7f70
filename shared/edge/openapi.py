"""The OpenAPI 3.1 document of a service, generated from its route declarations (``Operation``): paths,
parameters and request bodies from the models that validate them, answers from the models that build
them, and the refusals every route has by what it declares (a scope: 401/403/503; parameters: 422;
a body: 413/415/422; a command: its Idempotency-Key header, 400/409/422, and ``Idempotent-Replayed`` on
its answers, ``shared.edge.idempotency``). The schemas are pydantic's JSON Schema of those models, under
``#/components/schemas``. Nothing in it is written by hand."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.edge.idempotency import KEY_PARAMETER, KEY_REFUSALS, REPLAYED_HEADERS
from shared.edge.params import Params
from shared.edge.problems import PROBLEM, TYPE_BASE, Problem
from shared.edge.routes import JSON, Answer, Operation

__all__ = ["REF", "document"]

REF = "#/components/schemas/{model}"
Mode = Literal["validation", "serialization"]


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM: {"schema": {"$ref": REF.format(model="Problem")}}}}


def _models(ops: Iterable[Operation]) -> list[tuple[type[BaseModel], Mode]]:
    wanted: dict[tuple[type[BaseModel], Mode], None] = {(Problem, "serialization"): None}
    for op in ops:
        if op.body is not None:
            wanted[(op.body, "validation")] = None
        for a in op.answers.values():
            if a.model is not None:
                wanted[(a.model, "serialization")] = None
    return list(wanted)


def _parameters(model: type[Params] | None, where: str, defs: dict[str, Any]) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=REF, mode="validation")
    defs.update(schema.get("$defs", {}))
    out = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        prop = {k: v for k, v in schema["properties"][key].items() if k not in ("title", "description")}
        options = prop.get("anyOf")
        if options and {"type": "null"} in options:  # an optional parameter is absent, never null
            (inner,) = [o for o in options if o != {"type": "null"}]
            prop = {**inner, **({"default": prop["default"]} if prop.get("default") is not None else {})}
        out.append(
            {
                "name": key,
                "in": where,
                "required": where == "path" or f.is_required(),
                "schema": prop,
                "description": f.description or "",
            }
        )
    return out


def _answer(a: Answer, refs: Mapping[tuple[Any, Mode], Any], command: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"description": a.description}
    if a.model is not None:
        out["content"] = {a.media_type: {"schema": refs[(a.model, "serialization")]}}
    elif a.schema is not None:
        out["content"] = {a.media_type: {"schema": dict(a.schema)}}
    headers = {**a.headers, **(REPLAYED_HEADERS if command else {})}
    if headers:
        out["headers"] = {k: dict(v) for k, v in headers.items()}
    return out


def _refusals(op: Operation) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}

    def add(status: int, text: str) -> None:
        found.setdefault(status, []).append(text)

    if op.scope is not None:
        add(401, "No bearer token, or one that does not verify (WWW-Authenticate says why).")
        add(403, f"The token lacks the scope {op.scope}.")
        add(503, "The token issuer's keys cannot be fetched right now.")
    if op.path_params is not None or op.query is not None:
        add(422, "A parameter is missing, unknown, repeated or invalid (invalid-parameter, invalid-cursor).")
    else:
        add(422, "The route takes no query parameters (invalid-parameter).")
    if op.body is not None:
        add(413, "The body is larger than the service's limit (<SVC>_MAX_BODY_BYTES).")
        add(415, "The body is not sent as application/json.")
        add(422, "The body does not validate: strict JSON and the schema (invalid-body).")
    if op.method == "POST" and op.body is None:
        add(413, "The body is larger than the service's limit (<SVC>_MAX_BODY_BYTES).")
    for status, text in op.refusals.items():
        add(status, text)
    if op.command is not None:
        for status, text in KEY_REFUSALS.items():
            add(status, text)
    return found


def _operation(op: Operation, refs: Mapping[tuple[Any, Mode], Any], defs: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.name.lower().replace(" /", "_").replace("/", "_").replace("{", "").replace("}", "")
        .replace("-", "_").replace(".", "_"),
        "security": [{"bearer": [op.scope]}] if op.scope is not None else [],
        "parameters": _parameters(op.path_params, "path", defs) + _parameters(op.query, "query", defs)
        + ([dict(KEY_PARAMETER)] if op.command is not None else []),
        "responses": {},
    }
    description = op.description
    if op.scope is None:
        description = (description + "\n\n" if description else "") + f"Open without a token: {op.open_reason}"
    if description:
        doc["description"] = description
    if op.tags:
        doc["tags"] = list(op.tags)
    if op.command is not None:
        doc["x-command"] = op.command
    if op.body is not None:
        doc["requestBody"] = {
            "required": op.body_required,
            "content": {JSON: {"schema": refs[(op.body, "validation")]}},
        }
    command = op.command is not None
    responses: dict[str, Any] = {str(s): _answer(a, refs, command) for s, a in sorted(op.answers.items())}
    for status, texts in sorted(_refusals(op).items()):
        if str(status) not in responses:
            responses[str(status)] = _problem(" ".join(texts))
    doc["responses"] = responses
    return doc


def document(
    title: str, description: str, operations: Sequence[Operation], *, version: str = "1.0.0"
) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document of ``operations``."""
    refs, top = models_json_schema(_models(operations), ref_template=REF)
    defs: dict[str, Any] = dict(top.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs, defs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": description
            + f"\n\nErrors are application/problem+json; their `type` (under {TYPE_BASE}) names the mistake, the "
            "same in every service. Any route also answers 404 (no such route) and 405 (no such method).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": defs,
        },
    }
