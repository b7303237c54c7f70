"""CF v3 JSON presenters: turn foundation records into the Cloud Controller's resource shapes.

Shapes follow the CF v3 API docs (cloud_controller_ng ``docs/v3``). Notably a process has no app
guid field: its app is only reachable through ``links.app.href`` (``<base>/v3/apps/<app guid>``),
and ``relationships`` holds only ``revision``.
"""

from __future__ import annotations

from typing import Any

from simulator.clock import format_time
from simulator.foundation import (
    STACK,
    AppState,
    Org,
    ProcessState,
    ServiceInstanceState,
    ServiceOffering,
    ServicePlan,
    Space,
)

__all__ = [
    "present_app",
    "present_org",
    "present_process",
    "present_service_instance",
    "present_service_offering",
    "present_service_plan",
    "present_space",
]

Json = dict[str, Any]


def _link(href: str) -> Json:
    return {"href": href}


def _post(href: str) -> Json:
    return {"href": href, "method": "POST"}


def _to_one(guid: str | None) -> Json:
    return {"data": {"guid": guid} if guid is not None else None}


def _metadata() -> Json:
    return {"labels": {}, "annotations": {}}


def present_org(base: str, org: Org) -> Json:
    ts = format_time(org.created_at)
    self_href = f"{base}/v3/organizations/{org.guid}"
    return {
        "guid": org.guid,
        "created_at": ts,
        "updated_at": ts,
        "name": org.name,
        "suspended": False,
        "relationships": {"quota": _to_one(None)},
        "metadata": _metadata(),
        "links": {
            "self": _link(self_href),
            "domains": _link(f"{self_href}/domains"),
            "default_domain": _link(f"{self_href}/domains/default"),
        },
    }


def present_space(base: str, space: Space) -> Json:
    ts = format_time(space.created_at)
    self_href = f"{base}/v3/spaces/{space.guid}"
    return {
        "guid": space.guid,
        "created_at": ts,
        "updated_at": ts,
        "name": space.name,
        "relationships": {"organization": _to_one(space.org_guid), "quota": _to_one(None)},
        "metadata": _metadata(),
        "links": {
            "self": _link(self_href),
            "features": _link(f"{self_href}/features"),
            "organization": _link(f"{base}/v3/organizations/{space.org_guid}"),
            "apply_manifest": _post(f"{self_href}/actions/apply_manifest"),
        },
    }


def present_app(base: str, app: AppState) -> Json:
    self_href = f"{base}/v3/apps/{app.guid}"
    return {
        "guid": app.guid,
        "name": app.name,
        "state": app.state,
        "created_at": format_time(app.created_at),
        "updated_at": format_time(app.updated_at),
        "lifecycle": {"type": "buildpack", "data": {"buildpacks": [app.buildpack], "stack": STACK}},
        "relationships": {"space": _to_one(app.space_guid)},
        "metadata": _metadata(),
        "links": {
            "self": _link(self_href),
            "space": _link(f"{base}/v3/spaces/{app.space_guid}"),
            "processes": _link(f"{self_href}/processes"),
            "packages": _link(f"{self_href}/packages"),
            "environment_variables": _link(f"{self_href}/environment_variables"),
            "current_droplet": _link(f"{self_href}/droplets/current"),
            "droplets": _link(f"{self_href}/droplets"),
            "tasks": _link(f"{self_href}/tasks"),
            "start": _post(f"{self_href}/actions/start"),
            "stop": _post(f"{self_href}/actions/stop"),
            "revisions": _link(f"{self_href}/revisions"),
            "deployed_revisions": _link(f"{self_href}/revisions/deployed"),
            "features": _link(f"{self_href}/features"),
        },
    }


def present_process(base: str, proc: ProcessState) -> Json:
    self_href = f"{base}/v3/processes/{proc.guid}"
    health = "port" if proc.type == "web" else "process"
    return {
        "guid": proc.guid,
        "type": proc.type,
        "command": "[PRIVATE DATA HIDDEN IN LISTS]",
        "instances": proc.instances,
        "memory_in_mb": proc.memory_in_mb,
        "disk_in_mb": proc.disk_in_mb,
        "log_rate_limit_in_bytes_per_second": -1,
        "health_check": {"type": health, "data": {"timeout": None, "invocation_timeout": None}},
        "readiness_health_check": {"type": "process", "data": {"invocation_timeout": None, "interval": None}},
        "relationships": {"revision": _to_one(proc.revision_guid)},
        "metadata": _metadata(),
        "created_at": format_time(proc.created_at),
        "updated_at": format_time(proc.updated_at),
        "links": {
            "self": _link(self_href),
            "scale": _post(f"{self_href}/actions/scale"),
            "app": _link(f"{base}/v3/apps/{proc.app_guid}"),
            "space": _link(f"{base}/v3/spaces/{proc.space_guid}"),
            "stats": _link(f"{self_href}/stats"),
        },
    }


def present_service_instance(base: str, si: ServiceInstanceState) -> Json:
    self_href = f"{base}/v3/service_instances/{si.guid}"
    created, updated = format_time(si.created_at), format_time(si.updated_at)
    bindings = {
        "service_credential_bindings": _link(f"{base}/v3/service_credential_bindings?service_instance_guids={si.guid}"),
        "service_route_bindings": _link(f"{base}/v3/service_route_bindings?service_instance_guids={si.guid}"),
    }
    if si.type == "user-provided":
        return {
            "guid": si.guid,
            "created_at": created,
            "updated_at": updated,
            "name": si.name,
            "tags": [],
            "type": "user-provided",
            "syslog_drain_url": None,
            "route_service_url": None,
            "last_operation": _last_operation(created, updated),
            "relationships": {"space": _to_one(si.space_guid)},
            "metadata": _metadata(),
            "links": {
                "self": _link(self_href),
                "space": _link(f"{base}/v3/spaces/{si.space_guid}"),
                "credentials": _link(f"{self_href}/credentials"),
                **bindings,
            },
        }
    return {
        "guid": si.guid,
        "created_at": created,
        "updated_at": updated,
        "name": si.name,
        "tags": [],
        "type": "managed",
        "maintenance_info": {"version": "1.0.0"},
        "upgrade_available": False,
        "dashboard_url": None,
        "last_operation": _last_operation(created, updated),
        "relationships": {"service_plan": _to_one(si.plan_guid), "space": _to_one(si.space_guid)},
        "metadata": _metadata(),
        "links": {
            "self": _link(self_href),
            "service_plan": _link(f"{base}/v3/service_plans/{si.plan_guid}"),
            "space": _link(f"{base}/v3/spaces/{si.space_guid}"),
            "parameters": _link(f"{self_href}/parameters"),
            "shared_spaces": _link(f"{self_href}/relationships/shared_spaces"),
            **bindings,
        },
    }


def _last_operation(created: str, updated: str) -> Json:
    return {
        "type": "create",
        "state": "succeeded",
        "description": "Operation succeeded",
        "created_at": created,
        "updated_at": updated,
    }


def present_service_plan(base: str, plan: ServicePlan) -> Json:
    ts = format_time(plan.created_at)
    self_href = f"{base}/v3/service_plans/{plan.guid}"
    return {
        "guid": plan.guid,
        "name": plan.name,
        "description": f"The {plan.name} plan",
        "visibility_type": "public",
        "available": True,
        "free": plan.free,
        "costs": [],
        "created_at": ts,
        "updated_at": ts,
        "maintenance_info": {"version": "1.0.0", "description": ""},
        "broker_catalog": {
            "id": f"catalog-{plan.guid}",
            "metadata": {},
            "maximum_polling_duration": None,
            "features": {"plan_updateable": True, "bindable": True},
        },
        "schemas": {
            "service_instance": {"create": {"parameters": {}}, "update": {"parameters": {}}},
            "service_binding": {"create": {"parameters": {}}},
        },
        "relationships": {"service_offering": _to_one(plan.offering_guid)},
        "metadata": _metadata(),
        "links": {
            "self": _link(self_href),
            "service_offering": _link(f"{base}/v3/service_offerings/{plan.offering_guid}"),
            "visibility": _link(f"{self_href}/visibility"),
        },
    }


def present_service_offering(base: str, offering: ServiceOffering) -> Json:
    ts = format_time(offering.created_at)
    self_href = f"{base}/v3/service_offerings/{offering.guid}"
    return {
        "guid": offering.guid,
        "name": offering.name,
        "description": offering.description,
        "available": True,
        "tags": [],
        "requires": [],
        "created_at": ts,
        "updated_at": ts,
        "shareable": True,
        "documentation_url": None,
        "broker_catalog": {
            "id": f"catalog-{offering.guid}",
            "metadata": {},
            "features": {
                "plan_updateable": True,
                "bindable": True,
                "instances_retrievable": False,
                "bindings_retrievable": False,
                "allow_context_updates": False,
            },
        },
        "relationships": {"service_broker": _to_one(offering.broker_guid)},
        "metadata": _metadata(),
        "links": {
            "self": _link(self_href),
            "service_plans": _link(f"{base}/v3/service_plans?service_offering_guids={offering.guid}"),
            "service_broker": _link(f"{base}/v3/service_brokers/{offering.broker_guid}"),
        },
    }
