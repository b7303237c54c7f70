"""No password, client secret or token reaches a log.

The four services run as processes at DEBUG level, each logging in to PostgreSQL as a login role of its
own made for this test with a random password; the collector reads the simulator with a random client
secret and short-lived UAA tokens (so it fetches several, and one fetch is refused); the api is called
with valid, expired, tampered, foreign-key and malformed JWTs, with a token in the query string, with a
Basic header, and forwards admin commands, one of them to a service that is down. Then every line of
every service's log and of the simulator's (in this process) is searched for each secret."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
import uuid
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt as jose_jwt

from simulator import SimConfig
from simulator.faults import FaultConfig
from simulator.oidc import load_signing_key, mint_token
from tests.conftest import SERVICES
from tests.sim_server import running_sim
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def _jwt_parts(token: str) -> list[str]:
    """The token and its signature: a log holding either has leaked it."""
    return [token, token.rsplit(".", 1)[-1]]


def _tampered(token: str) -> str:
    head, payload, sig = token.split(".")
    return f"{head}.{payload}.{sig[:-6]}{'A' if sig[-6] != 'A' else 'B'}{sig[-5:]}"


def _foreign_key_token(issuer: str, kid: str) -> str:
    """Claims the api would accept, signed by a key the issuer never published (same kid)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    now = int(time.time())
    claims = {"iss": issuer, "sub": "mallory", "aud": "billing-api", "iat": now, "nbf": now, "exp": now + 600,
              "scope": "usage.admin", "customers": []}
    return jose_jwt.encode(claims, pem.decode(), algorithm="RS256", headers={"kid": kid})


async def _create_roles(admin_dsn: str, passwords: dict[str, str], roles: dict[str, str]) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for svc in SERVICES:
            # A member of the service's role: its rights on the service's schema, and a password of its own.
            await conn.execute(f"CREATE ROLE {roles[svc]} LOGIN PASSWORD '{passwords[svc]}' IN ROLE {svc}")
    finally:
        await conn.close()


async def _drop_roles(admin_dsn: str, roles: dict[str, str]) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for role in roles.values():
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f"DROP OWNED BY {role}")
                await conn.execute(f"DROP ROLE {role}")
    finally:
        await conn.close()


async def test_no_password_client_secret_or_token_appears_in_any_log(
    infra, database, topic_prefix, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    suffix = uuid.uuid4().hex[:8]
    roles = {svc: f"{svc}_secrets_{suffix}" for svc in SERVICES}
    passwords = {svc: f"pw{secrets.token_hex(12)}" for svc in SERVICES}
    client_secret = f"cs{secrets.token_urlsafe(24)}"
    pg = urlsplit(database.admin_dsn)

    def dsn(svc: str) -> str:
        return f"postgresql://{roles[svc]}:{passwords[svc]}@{pg.hostname}:{pg.port}{pg.path}"

    config = SimConfig(seed=5, orgs=2, apps=30, services=8, client_secret=client_secret, token_ttl_seconds=4)
    issued: list[str] = []  # every UAA access token the simulator hands out
    jwts: list[str] = []  # every JWT this test sends
    statuses: dict[str, int] = {}
    logs = tmp_path / "logs"
    await _create_roles(database.admin_dsn, passwords, roles)
    try:
        async with running_sim(config) as (sim_url, sim):
            sim.config.issuer = sim_url
            issue = sim.tokens.issue

            def recording_issue(ttl_seconds: int):  # type: ignore[no-untyped-def]
                token = issue(ttl_seconds)
                issued.append(token.access_token)
                return token

            monkeypatch.setattr(sim.tokens, "issue", recording_issue)
            for name, value in {
                "COLLECTOR_CF_API_URL": sim_url, "COLLECTOR_UAA_URL": sim_url, "COLLECTOR_CLIENT_SECRET": client_secret,
                "COLLECTOR_RETRY_ATTEMPTS": "2", "COLLECTOR_TOKEN_REFRESH_MARGIN_SECONDS": "0",
                **{f"{svc.upper()}_OIDC_ISSUER": sim_url for svc in SERVICES},
                **{f"{svc.upper()}_LOG_LEVEL": "DEBUG" for svc in SERVICES},
            }.items():
                monkeypatch.setenv(name, value)
            stack = Stack(dsn, topic_prefix, logs)
            try:
                await stack.start(*SERVICES)
                await _exercise(stack, sim, sim_url, jwts, statuses)
            finally:
                stack.stop()
    finally:
        await _drop_roles(database.admin_dsn, roles)

    # What the run must have done, or finding nothing would prove nothing.
    assert len(issued) >= 2, issued
    assert statuses == EXPECTED_STATUSES, statuses
    lines = {path.name: path.read_text(errors="replace").splitlines() for path in sorted(logs.glob("*.log"))}
    assert set(lines) == {f"{svc}.log" for svc in SERVICES}
    assert all(len(v) >= 3 for v in lines.values()), {k: len(v) for k, v in lines.items()}
    # The simulator runs in this process: its records, not those of this test's own HTTP client.
    lines["simulator (in-process)"] = [
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.name.startswith(("simulator", "uvicorn"))
    ]
    assert any("UAA refused" in line for line in lines["collector.log"]), "the refused token fetch was not logged"

    basic_uaa = base64.b64encode(f"{config.client_id}:{client_secret}".encode()).decode()
    needles: dict[str, str] = {
        **{f"{svc} database password": pw for svc, pw in passwords.items()},
        "collector client secret": client_secret,
        "collector's Basic credentials for UAA": basic_uaa,
        "Basic header sent to the api": BASIC_VALUE,
        **{f"UAA access token #{i}": t for i, t in enumerate(issued)},
        **{f"JWT #{i // 2} {'token' if i % 2 == 0 else 'signature'}": part
           for i, part in enumerate(p for t in jwts for p in _jwt_parts(t))},
    }
    leaks = [
        f"{source}: {what}: {line[:300]}"
        for source, source_lines in lines.items()
        for line in source_lines
        for what, needle in needles.items()
        if needle in line
    ]
    assert leaks == [], "secrets in logs:\n" + "\n".join(leaks)


BASIC_VALUE = "Basic " + base64.b64encode(f"admin:pw{secrets.token_hex(8)}".encode()).decode()

EXPECTED_STATUSES = {
    "reading": 201,
    "reading again, with a fresh token": 201,
    "reading while CF fails": 201,
    "reading with the secret refused": 201,
    "valid admin token": 200,
    "admin command forwarded": 201,
    "admin reading forwarded": 200,
    "valid reader token": 200,
    "expired token": 401,
    "tampered signature": 401,
    "foreign key": 401,
    "not a JWT": 401,
    "JWT-looking garbage": 401,
    "Basic header": 401,
    "token in the query string only": 401,
    "token in the query string and the header": 422,
    "forwarded to a service that is down": 502,
}


async def _exercise(stack: Stack, sim: object, sim_url: str, jwts: list[str], statuses: dict[str, int]) -> None:
    from simulator.state import SimState

    assert isinstance(sim, SimState)
    collector, api = stack.url("collector"), stack.url("api")
    kid = load_signing_key().kid
    admin = mint_token(["usage.admin", "usage.read"], issuer=sim_url, subject="secrets-admin")
    jwts.append(admin)
    bearer = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(timeout=60) as c:

        async def call(label: str, method: str, url: str, **kw: object) -> httpx.Response:
            resp = await c.request(method, url, **kw)  # type: ignore[arg-type]
            statuses[label] = resp.status_code
            return resp

        # The collector fetches a UAA token with its secret, then a fresh one once the first expired.
        first = await call(
            "reading", "POST", f"{collector}/internal/readings", headers=bearer, json={"hour": "2026-10-01T04:00:00Z"}
        )
        assert first.json()["errors"] == [], first.text
        await asyncio.sleep(4.5)
        again = await call("reading again, with a fresh token", "POST", f"{collector}/internal/readings",
                           headers=bearer,
                           json={"hour": "2026-10-01T05:00:00Z"})
        assert again.json()["errors"] == [], again.text
        # Error paths: CF answering 5xx, then UAA refusing the client secret.
        sim.faults.replace(FaultConfig(error_rate=1.0))
        failing = await call("reading while CF fails", "POST", f"{collector}/internal/readings", headers=bearer,
                             json={"hour": "2026-10-01T06:00:00Z"})
        assert failing.json()["errors"], failing.text
        sim.faults.replace(FaultConfig())
        sim.config.client_secret = "rotated"
        await asyncio.sleep(4.5)
        refused = await call("reading with the secret refused", "POST", f"{collector}/internal/readings",
                             headers=bearer,
                             json={"hour": "2026-10-01T07:00:00Z"})
        assert any("UAA refused" in e for e in refused.json()["errors"]), refused.text

        await call("valid admin token", "GET", f"{api}/v1/customers", headers=bearer)
        tier = await call("admin command forwarded", "POST", f"{api}/admin/tiers", headers=bearer,
                          json={"name": "secrets", "credits_per_period": 1_000_000})
        assert tier.status_code == 201, tier.text
        await call("admin reading forwarded", "GET", f"{api}/admin/readings", headers=bearer)
        customer = str(uuid.uuid4())
        reader = mint_token(["usage.read"], customers=[customer], issuer=sim_url, subject="secrets-reader")
        expired = mint_token(["usage.read"], customers=[customer], issuer=sim_url, now=int(time.time()) - 7200, ttl=60)
        foreign = _foreign_key_token(sim_url, kid)
        tampered = _tampered(reader)
        garbage = "eyJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(40) + "." + secrets.token_urlsafe(40)
        jwts.extend([reader, expired, foreign, tampered, garbage])
        await call("valid reader token", "GET", f"{api}/v1/customers", headers={"Authorization": f"Bearer {reader}"})
        balance = f"{api}/v1/customers/{customer}/balance"
        for label, token in (("expired token", expired), ("tampered signature", tampered), ("foreign key", foreign),
                             ("not a JWT", "not-a-jwt-" + secrets.token_hex(8)), ("JWT-looking garbage", garbage)):
            await call(label, "GET", balance, headers={"Authorization": f"Bearer {token}"})
        await call("Basic header", "GET", balance, headers={"Authorization": BASIC_VALUE})
        await call("token in the query string only", "GET", f"{balance}?access_token={reader}")
        await call("token in the query string and the header", "GET", f"{api}/v1/customers/{customer}/usage",
                   params={"access_token": reader, "from": "2026-10-01T04:00:00Z", "to": "2026-10-02T04:00:00Z"},
                   headers={"Authorization": f"Bearer {reader}"})
        # An admin command the api cannot deliver: its owner is down.
        stack.procs["pricer"].terminate()
        stack.procs["pricer"].wait(30)
        await call("forwarded to a service that is down", "GET", f"{api}/admin/prices", headers=bearer,
                   params={"meter": "cfapps"})
    await asyncio.sleep(0.5)  # let the services write what they log about the last requests

