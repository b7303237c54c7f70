"""No answer of the api names the request's Host: the dashboard's redirects are relative paths, and no route
is redirected to its path with or without a trailing slash (the router's redirect would be absolute)."""

from __future__ import annotations

import httpx
import pytest

from services.api.app import create_app
from services.api.settings import ApiSettings


@pytest.mark.parametrize(
    ("path", "status", "location"),
    [
        ("/dashboard", 303, "/dashboard/customers"),
        ("/dashboard/", 303, "/dashboard/customers"),
        ("/dashboard/customers/", 404, None),
        ("/v1/customers/", 404, None),
        ("/healthz/", 404, None),
    ],
)
async def test_redirects_never_name_the_requests_host(path: str, status: int, location: str | None) -> None:
    app = create_app(ApiSettings(port=0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://evil.example") as client:
        r = await client.get(path, headers={"host": "evil.example"})
    assert r.status_code == status
    assert r.headers.get("location") == location
    assert "evil.example" not in r.text
