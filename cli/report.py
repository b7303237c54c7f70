"""``billing report``: a customer's month of usage, org → space → resource with credits, as the public
API answers it (``GET /v1/customers/{id}/usage``, monthly, by resource, every page).

    billing report --customer ID --month YYYY-MM [--format table|json|csv] [--api-url URL] [--token T]

The token comes from ``--token`` or ``BILLING_TOKEN`` (scope usage.read for that customer, or usage.admin);
the API from ``--api-url`` or ``BILLING_API_URL`` (default http://127.0.0.1:8080). Totals are summed from
the exact amounts (``microcredits_exact``) and floored once, so they never drift from rounding per line.
Exit status: 0 done, 1 the API refused or could not be reached, 2 bad arguments.
"""

from __future__ import annotations

import csv
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, TYPE_CHECKING, Any

import httpx
import orjson

from shared.clock import month_bounds, parse_month
from shared.money import display_credits

if TYPE_CHECKING:
    import typer

__all__ = ["DEFAULT_API_URL", "ReportError", "register", "report"]

DEFAULT_API_URL = "http://127.0.0.1:8080"
FORMATS = ("table", "json", "csv")


class ReportError(Exception):
    """The API refused the request or could not be reached."""


@dataclass
class Node:
    id: str
    name: str
    exact: Fraction = Fraction(0)
    quantities: dict[str, int] = field(default_factory=dict)
    children: dict[str, Node] = field(default_factory=dict)
    attrs: dict[str, str] = field(default_factory=dict)

    def add(self, exact: Fraction, quantities: dict[str, int]) -> None:
        self.exact += exact
        for unit, value in quantities.items():
            self.quantities[unit] = self.quantities.get(unit, 0) + value


def _exact(item: dict[str, Any]) -> Fraction:
    """An item's exact money; 0 for usage priced on the month's total (a graduated or volume price: its
    money is the ledger's, per org and on the statement, not per resource)."""
    if item.get("microcredits_exact") is None:
        return Fraction(0)
    n, d = item["microcredits_exact"].split("/")
    return Fraction(int(n), int(d))


def _amounts(exact: Fraction) -> dict[str, Any]:
    return {
        "microcredits": exact.numerator // exact.denominator,
        "microcredits_exact": f"{exact.numerator}/{exact.denominator}",
        "credits": display_credits(exact),
    }


def fetch_usage(client: httpx.Client, customer: str, month: str) -> Iterator[dict[str, Any]]:
    """Every item of the customer's monthly usage by resource, following the cursors."""
    start, end = month_bounds(parse_month(month))
    params: dict[str, str] = {
        "from": start.isoformat().replace("+00:00", "Z"),
        "to": end.isoformat().replace("+00:00", "Z"),
        "granularity": "month",
        "group_by": "resource",
        "limit": "500",
    }
    while True:
        try:
            resp = client.get(f"/v1/customers/{customer}/usage", params=params)
        except httpx.HTTPError as exc:
            raise ReportError(f"cannot reach the API at {client.base_url}: {exc}") from None
        if resp.status_code != 200:
            raise ReportError(explain(resp, _HINTS))
        page = resp.json()
        yield from page["items"]
        if not page.get("next_cursor"):
            return
        params["cursor"] = page["next_cursor"]


def explain(resp: httpx.Response, hints: Mapping[int, str], text_limit: int = 200) -> str:
    """What the API's refusal says, for a command's user: the problem's detail (or title; the body's first
    ``text_limit`` characters when it is not JSON), and the hint for its status, if any."""
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("title") or ""
    except ValueError:
        detail = resp.text[:text_limit]
    return f"the API answered {resp.status_code}: {detail}{hints.get(resp.status_code, '')}"


ADMIN_HINTS = {401: " (check --token / BILLING_TOKEN)", 403: " (the token lacks usage.admin)"}
_HINTS = {
    401: " (check --token / BILLING_TOKEN)",
    403: " (the token lacks usage.read)",
    404: " (unknown customer, or not yours)",
}


def build_tree(items: list[dict[str, Any]]) -> Node:
    root = Node("", "total")
    for it in items:
        g = it["group"]
        exact, quantities = _exact(it), {q["unit"]: q["value"] for q in it["quantities"]}
        org = root.children.setdefault(g.get("org_id", ""), Node(g.get("org_id", ""), g.get("org_name", "")))
        space = org.children.setdefault(g.get("space_id", ""), Node(g.get("space_id", ""), g.get("space_name", "")))
        res = space.children.setdefault(
            g["resource_id"],
            Node(
                g["resource_id"],
                g.get("resource_name", ""),
                attrs={"meter": g.get("meter", ""), "resource_kind": g.get("resource_kind", "")},
            ),
        )
        if it.get("priced") == "monthly":
            res.attrs["priced"] = "monthly"
            root.attrs["priced"] = "monthly"
        for node in (root, org, space, res):
            node.add(exact, quantities)
    return root


def _sorted(nodes: dict[str, Node]) -> list[Node]:
    return sorted(nodes.values(), key=lambda n: (n.name or n.id).lower())


def _qty(q: dict[str, int]) -> str:
    return ", ".join(f"{v:,} {u}-h" for u, v in sorted(q.items()))


DEPTHS = ("org", "space", "resource")


def render_table(root: Node, customer: str, month: str, out: IO[str], depth: str = "resource") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Usage of customer {customer} in {month} (America/New_York)", show_lines=False)
    table.add_column("Org / Space / Resource")
    table.add_column("Meter")
    table.add_column("Kind")
    table.add_column("Quantity", justify="right")
    table.add_column("Credits", justify="right")
    for org in _sorted(root.children):
        table.add_row(
            f"[bold]{org.name or org.id or '(no org)'}[/bold]",
            "",
            "",
            _qty(org.quantities),
            f"[bold]{display_credits(org.exact)}[/bold]",
        )
        for space in _sorted(org.children) if depth != "org" else []:
            table.add_row(
                f"  {space.name or space.id or '(no space)'}",
                "",
                "",
                _qty(space.quantities),
                display_credits(space.exact),
            )
            for res in _sorted(space.children) if depth == "resource" else []:
                table.add_row(
                    f"    {res.name or res.id}",
                    res.attrs.get("meter", ""),
                    res.attrs.get("resource_kind", ""),
                    _qty(res.quantities),
                    "on the month" if res.attrs.get("priced") == "monthly" else display_credits(res.exact),
                )
    table.add_section()
    table.add_row("[bold]Total[/bold]", "", "", "", f"[bold]{display_credits(root.exact)}[/bold]")
    console = Console(file=out, width=max(100, Console(file=out).width))
    console.print(table)
    console.print("Credits are rounded to 6 decimals for display; totals are summed exactly.")
    if root.attrs.get("priced") == "monthly":
        console.print("Usage \"on the month\" is priced on the customer's month total (a rate card); its money is "
                      "on the statement and in the usage by org, not in these totals.")


def as_json(root: Node, customer: str, month: str) -> dict[str, Any]:
    start, end = month_bounds(parse_month(month))
    return {
        "customer_id": customer,
        "month": month,
        "from": start.isoformat().replace("+00:00", "Z"),
        "to": end.isoformat().replace("+00:00", "Z"),
        "time_zone": "America/New_York",
        "total": _amounts(root.exact),
        "orgs": [
            {
                "org_id": org.id,
                "org_name": org.name,
                **_amounts(org.exact),
                "spaces": [
                    {
                        "space_id": space.id,
                        "space_name": space.name,
                        **_amounts(space.exact),
                        "resources": [
                            {
                                "resource_id": res.id,
                                "resource_name": res.name,
                                **res.attrs,
                                "quantities": [{"unit": u, "value": v} for u, v in sorted(res.quantities.items())],
                                **_amounts(res.exact),
                            }
                            for res in _sorted(space.children)
                        ],
                    }
                    for space in _sorted(org.children)
                ],
            }
            for org in _sorted(root.children)
        ],
    }


CSV_COLUMNS = (
    "org_id",
    "org_name",
    "space_id",
    "space_name",
    "resource_id",
    "resource_name",
    "meter",
    "resource_kind",
    "units",
    "values",
    "microcredits",
    "microcredits_exact",
    "credits",
)


def write_csv(root: Node, out: IO[str]) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for org in _sorted(root.children):
        for space in _sorted(org.children):
            for res in _sorted(space.children):
                units = sorted(res.quantities)
                w.writerow(
                    [
                        org.id,
                        org.name,
                        space.id,
                        space.name,
                        res.id,
                        res.name,
                        res.attrs.get("meter", ""),
                        res.attrs.get("resource_kind", ""),
                        ";".join(units),
                        ";".join(str(res.quantities[u]) for u in units),
                        *_amounts(res.exact).values(),
                    ]
                )


def report(
    customer: str,
    month: str,
    fmt: str,
    api_url: str,
    token: str,
    *,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    transport: httpx.BaseTransport | None = None,
    depth: str = "resource",
) -> int:
    """Print the customer's month in ``fmt``; returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        uuid.UUID(customer)
        parse_month(month)
        if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
            raise ValueError(f"month must look like YYYY-MM, got {month!r}")
    except ValueError as exc:
        print(f"error: {exc if 'month' in str(exc) else 'customer must be a UUID'}", file=err)
        return 2
    if fmt not in FORMATS:
        print(f"error: --format must be one of {', '.join(FORMATS)}", file=err)
        return 2
    if depth not in DEPTHS:
        print(f"error: --depth must be one of {', '.join(DEPTHS)}", file=err)
        return 2
    if not token:
        print("error: a token is needed: --token or BILLING_TOKEN", file=err)
        return 2
    headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
    try:
        with httpx.Client(base_url=api_url, headers=headers, timeout=30, transport=transport) as client:
            items = list(fetch_usage(client, customer, month))
    except ReportError as exc:
        print(f"error: {exc}", file=err)
        return 1
    root = build_tree(items)
    if fmt == "json":
        out.write(orjson.dumps(as_json(root, customer, month), option=orjson.OPT_INDENT_2).decode() + "\n")
    elif fmt == "csv":
        write_csv(root, out)
    else:
        render_table(root, customer, month, out, depth)
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to a ``typer.Typer`` app."""
    import typer

    @app.command("report")
    def report_command(
        customer: str = typer.Option(..., "--customer", help="The customer's id (UUID)."),
        month: str = typer.Option(..., "--month", help="YYYY-MM, a month in America/New_York."),
        fmt: str = typer.Option("table", "--format", help="table, json or csv."),
        api_url: str = typer.Option(DEFAULT_API_URL, "--api-url", envvar="BILLING_API_URL", help="The billing API."),
        token: str = typer.Option("", "--token", envvar="BILLING_TOKEN", help="A bearer token (usage.read)."),
        depth: str = typer.Option("resource", "--depth", help="Table rows down to: org, space or resource."),
    ) -> None:
        """Print a customer's month of usage: org → space → resource, with credits."""
        raise typer.Exit(report(customer, month, fmt, api_url, token, depth=depth))
