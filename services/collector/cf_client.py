"""A Cloud Foundry v3 API client: UAA client credentials with refresh before expiry, pagination,
timeouts, and retries with backoff on 5xx and timeouts."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from shared.clock import as_utc

__all__ = ["CFAuthError", "CFBadResponse", "CFClient", "CFError", "CFUnavailable"]

log = logging.getLogger(__name__)

Json = dict[str, Any]


class CFError(RuntimeError):
    """Cloud Foundry could not be read."""


class CFUnavailable(CFError):
    """5xx answers or timeouts, still after every retry."""


class CFAuthError(CFError):
    """UAA refused the client credentials, or CF refused a fresh token."""


class CFBadResponse(CFError):
    """An answer that is not the JSON the v3 API documents."""


class _Retryable(Exception):
    """A 5xx answer: worth another try."""


class CFClient:
    def __init__(
        self,
        api_url: str,
        uaa_url: str,
        client_id: str,
        client_secret: str,
        *,
        timeout: float = 30.0,
        attempts: int = 5,
        refresh_margin: float = 60.0,
        per_page: int = 5000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api = api_url.rstrip("/")
        self._uaa = uaa_url.rstrip("/")
        self._client_id = client_id
        self._secret = client_secret
        self._attempts = attempts
        self._margin = refresh_margin
        self.per_page = per_page
        self._token: str | None = None
        self._expires_at = 0.0
        self.requests = 0
        self.token_fetches = 0
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
            headers={"Accept": "application/json", "User-Agent": "billing-collector"},
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def _fetch_token(self) -> None:
        self.token_fetches += 1
        resp = await self._send(
            "POST",
            f"{self._uaa}/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(self._client_id, self._secret),
        )
        if resp.status_code in (400, 401, 403):
            raise CFAuthError(f"UAA refused the client credentials of {self._client_id!r} ({resp.status_code})")
        body = self._json(resp)
        try:
            self._token = str(body["access_token"])
            ttl = float(body.get("expires_in", 0))
        except (KeyError, TypeError, ValueError):
            raise CFBadResponse("UAA token answer lacks access_token/expires_in") from None
        # Refresh ahead of expiry, but never sooner than half the lifetime.
        self._expires_at = time.monotonic() + max(ttl - self._margin, ttl / 2)

    async def _authorization(self) -> str:
        if self._token is None or time.monotonic() >= self._expires_at:
            await self._fetch_token()
        return f"bearer {self._token}"

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request with retries on 5xx, timeouts and connection errors."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._attempts),
                wait=wait_exponential_jitter(initial=0.2, max=5.0),
                retry=retry_if_exception_type((_Retryable, httpx.TimeoutException, httpx.TransportError)),
                reraise=True,
            ):
                with attempt:
                    self.requests += 1
                    resp = await self._http.request(method, url, **kwargs)
                    if resp.status_code >= 500:
                        raise _Retryable(f"{resp.status_code} from {url}")
                    return resp
        except (_Retryable, httpx.TimeoutException, httpx.TransportError) as exc:
            raise CFUnavailable(f"Cloud Foundry unavailable after {self._attempts} attempts: {exc!r}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _json(resp: httpx.Response) -> Json:
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise CFBadResponse(f"malformed JSON from {resp.request.url.path}") from None
        if not isinstance(body, dict):
            raise CFBadResponse(f"unexpected JSON from {resp.request.url.path}")
        return body

    async def get(self, url: str, at: datetime | None = None) -> Json:
        """GET one page; a 401 gets one fresh token and one more try."""
        for fresh in (False, True):
            headers = {"Authorization": await self._authorization()}
            if at is not None:
                headers["X-Sim-Time"] = as_utc(at).strftime("%Y-%m-%dT%H:%M:%SZ")
            resp = await self._send("GET", url, headers=headers)
            if resp.status_code == 401 and not fresh:
                self._token = None  # expired or revoked early: fetch a new one and retry once
                continue
            if resp.status_code == 401:
                raise CFAuthError("Cloud Foundry refused a fresh token")
            if resp.status_code >= 400:
                raise CFError(f"{resp.status_code} from {resp.request.url.path}: {resp.text[:200]}")
            return self._json(resp)
        raise AssertionError("unreachable")

    async def pages(
        self, path: str, params: dict[str, str] | None = None, at: datetime | None = None
    ) -> AsyncIterator[tuple[list[Json], dict[str, list[Json]]]]:
        """Each page of a v3 list endpoint as (resources, included), following ``pagination.next.href``.
        Callers reduce a page to what they need before asking for the next, so memory stays flat."""
        query = {"per_page": str(self.per_page), **(params or {})}
        first = str(httpx.URL(f"{self._api}{path}", params=query))
        body = await self.get(first, at)
        pagination = body.get("pagination") or {}
        total_pages, nxt = pagination.get("total_pages"), pagination.get("next")
        page = self._page(path, body, 1)
        del body
        yield page
        if isinstance(total_pages, int) and 1 < total_pages <= 100_000 and isinstance(nxt, dict):
            # The page count is known: ask for the next few pages at once (CF answers them in parallel),
            # and hand them over in order.
            urls = [str(httpx.URL(first).copy_merge_params({"page": str(n)})) for n in range(2, total_pages + 1)]
            window = 3
            pending = collections.deque(asyncio.ensure_future(self.get(u, at)) for u in urls[:window])
            try:
                for n in range(len(urls)):
                    body = await pending.popleft()  # a page is dropped once handed over: memory stays flat
                    if n + window < len(urls):
                        pending.append(asyncio.ensure_future(self.get(urls[n + window], at)))
                    page = self._page(path, body, n + 2)
                    del body
                    yield page
            finally:
                for f in pending:
                    f.cancel()
            return
        url = nxt.get("href") if isinstance(nxt, dict) else None
        pages = 1
        while url:
            body = await self.get(url, at)
            pages += 1
            yield self._page(path, body, pages)
            nxt = (body.get("pagination") or {}).get("next")
            url = nxt.get("href") if isinstance(nxt, dict) else None
            if pages > 100_000:
                raise CFBadResponse(f"{path}: pagination does not end")

    @staticmethod
    def _page(path: str, body: Json, number: int) -> tuple[list[Json], dict[str, list[Json]]]:
        page = body.get("resources")
        if not isinstance(page, list):
            raise CFBadResponse(f"{path}: page {number} has no resources list")
        included = {
            k: [i for i in v if isinstance(i, dict)]
            for k, v in (body.get("included") or {}).items()
            if isinstance(v, list)
        }
        return [r for r in page if isinstance(r, dict)], included

    async def list_all(
        self, path: str, params: dict[str, str] | None = None, at: datetime | None = None
    ) -> tuple[list[Json], dict[str, list[Json]]]:
        """Every resource of a v3 list endpoint, with the ``included`` resources of every page merged."""
        resources: list[Json] = []
        included: dict[str, list[Json]] = {}
        async for page, inc in self.pages(path, params, at):
            resources.extend(page)
            for key, items in inc.items():
                included.setdefault(key, []).extend(items)
        return resources, included
