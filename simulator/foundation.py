"""Deterministic, seeded model of a Cloud Foundry foundation that changes over simulated hours.

No I/O here. The same constructor arguments always give the same world, and the state at any
hour is computed directly from (seed, resource, hour) in O(resources), without replaying history:

* every resource's static attributes come from a blake2b digest of (seed, kind, index);
* lifetimes are either "long-lived" (created some hours before ``EPOCH``, never deleted) or
  "churning": the resource exists during the first ``length`` hours of every ``period`` hours
  (shifted by a phase); each period is a new incarnation with a new guid (delete + re-push);
* an app's STARTED/STOPPED state and its processes' instance counts are derived per 6-hour
  block from a 64-bit mix of (resource key, block).

Hour ``h`` (an int) counts hours since ``EPOCH``. A resource created "at hour h" has a
``created_at`` inside the hour before h, so a reading taken at hour h sees it; a resource deleted
"at hour d" is last seen at hour d-1.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import NamedTuple

from simulator.gcpause import gc_paused

__all__ = [
    "BLOCK_HOURS",
    "EPOCH",
    "AppState",
    "ExpectedMeasurement",
    "Foundation",
    "Org",
    "ProcessState",
    "ServiceInstanceState",
    "ServiceOffering",
    "ServicePlan",
    "Snapshot",
    "Space",
    "hour_index",
    "to_hour",
]

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
"""Hour 0 of the simulated world (absolute, independent of the simulator's start time)."""
BLOCK_HOURS = 6
"""App state and instance counts are constant within blocks of this many hours."""

MEMORY_CHOICES_MB: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
_MEMORY_WEIGHTS: tuple[int, ...] = (5, 15, 30, 25, 18, 7)  # percent
DISK_CHOICES_MB: tuple[int, ...] = (256, 512, 1024, 2048)
PROCESS_TYPES: tuple[str, ...] = ("web", "worker", "scheduler")
BUILDPACKS: tuple[str, ...] = (
    "python_buildpack",
    "nodejs_buildpack",
    "java_buildpack",
    "go_buildpack",
    "staticfile_buildpack",
    "ruby_buildpack",
)
STACK = "cflinuxfs4"

# (offering name, description, plan names in order of use)
_CATALOG: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "aws-rds",
        "Relational databases on AWS RDS",
        ("micro-psql", "medium-psql", "small-mysql", "large-psql", "medium-mysql", "large-mysql"),
    ),
    ("redis", "Redis in-memory data store", ("redis-dev", "redis-3node", "redis-5node", "redis-large")),
    ("s3", "Object storage on AWS S3", ("basic", "basic-public", "basic-sandbox", "deletable")),
)

_M64 = (1 << 64) - 1
_APP_CHURN_PCT = 25
_APP_PERM_STOPPED_PCT = 5
_APP_STOPPED_PER_BLOCK = 0.12
_APP_SCALE_PER_BLOCK = 0.25
_SI_CHURN_PCT = 30
_SI_USER_PROVIDED_PCT = 10
_SNAPSHOT_CACHE = 3

_KIND_CODES: dict[str, int] = {
    "org": 1,
    "space": 2,
    "app": 3,
    "app-attr": 4,
    "si": 6,
    "si-attr": 7,
    "plan": 8,
    "offering": 9,
    "broker": 10,
        "org-attr": 12,
    "space-attr": 13,
}
_STRUCTS: dict[int, struct.Struct] = {n: struct.Struct("<qB" + "q" * n) for n in range(1, 5)}
_UUID4_CLEAR = 0xFFFFFFFFFFFF0FFF3FFFFFFFFFFFFFFF
_UUID4_SET = 0x00000000000040008000000000000000


def _digest(seed: int, kind: str, *ints: int, size: int = 32) -> bytes:
    payload = _STRUCTS[len(ints)].pack(seed, _KIND_CODES[kind], *ints)
    return hashlib.blake2b(payload, digest_size=size).digest()


def _guid_from(b: bytes) -> str:
    """Format 16 bytes as an RFC 4122 version-4-shaped UUID string."""
    h = f"{(int.from_bytes(b, 'big') & _UUID4_CLEAR) | _UUID4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _guid(seed: int, kind: str, *ints: int) -> str:
    """A deterministic UUID string for (seed, kind, ints)."""
    return _guid_from(_digest(seed, kind, *ints, size=16))


def _guids(seed: int, kind: str, count: int, *ints: int) -> list[str]:
    """``count`` deterministic UUID strings, four per digest of (seed, kind, ints, chunk)."""
    out: list[str] = []
    chunk = 0
    while len(out) < count:
        d = _digest(seed, kind, *ints, chunk, size=64)
        out.extend(_guid_from(d[n : n + 16]) for n in range(0, min(64, 16 * (count - len(out))), 16))
        chunk += 1
    return out


def _mix64(z: int) -> int:
    """splitmix64 finaliser: a cheap, well-mixed, platform-independent 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class _Bits:
    """Draws bounded integers from a digest (uniform enough for simulation purposes)."""

    __slots__ = ("_v",)

    def __init__(self, digest: bytes) -> None:
        self._v = int.from_bytes(digest, "little")

    def take(self, n: int) -> int:
        v = self._v % n
        self._v //= n
        return v

    def weighted(self, weights: tuple[int, ...]) -> int:
        r = self.take(sum(weights))
        for i, w in enumerate(weights):
            if r < w:
                return i
            r -= w
        return len(weights) - 1


def to_hour(t: datetime) -> datetime:
    """Truncate an aware datetime to the hour, in UTC. Naive datetimes are rejected."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"timezone-aware datetime required, got {t!r}")
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_index(t: datetime) -> int:
    """Hours since ``EPOCH`` (negative before it) of the hour containing ``t``."""
    return int((to_hour(t) - EPOCH).total_seconds()) // 3600


def _at(hour: int, seconds: int = 0) -> datetime:
    return EPOCH + timedelta(seconds=hour * 3600 + seconds)


# ----------------------------------------------------------------------------- public records


@dataclass(frozen=True, slots=True)
class Org:
    guid: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Space:
    guid: str
    name: str
    org_guid: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ServiceOffering:
    guid: str
    name: str
    description: str
    broker_guid: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ServicePlan:
    guid: str
    name: str
    offering_guid: str
    free: bool
    created_at: datetime


class AppState(NamedTuple):
    guid: str
    name: str
    state: str  # "STARTED" | "STOPPED"
    space_guid: str
    org_guid: str
    buildpack: str
    created_at: datetime
    updated_at: datetime


class ProcessState(NamedTuple):
    guid: str
    type: str
    app_guid: str
    space_guid: str
    org_guid: str
    instances: int
    memory_in_mb: int
    disk_in_mb: int
    revision_guid: str
    created_at: datetime
    updated_at: datetime


class ServiceInstanceState(NamedTuple):
    guid: str
    name: str
    type: str  # "managed" | "user-provided"
    space_guid: str
    org_guid: str
    plan_guid: str | None  # None for user-provided instances
    created_at: datetime
    updated_at: datetime


class Snapshot(NamedTuple):
    """Everything that exists at one hour, each list ordered by (created_at, guid)."""

    hour: datetime
    apps: list[AppState]
    processes: list[ProcessState]
    service_instances: list[ServiceInstanceState]


@dataclass(frozen=True, slots=True)
class ExpectedMeasurement:
    meter: str
    resource_guid: str
    resource_kind: str
    org_guid: str
    space_guid: str
    value: int


# ----------------------------------------------------------------------------- the model


class _Lifetimes:
    """Compact per-resource lifetime parameters (churning or long-lived)."""

    __slots__ = ("length", "period", "phase", "secs")

    def __init__(self) -> None:
        self.period = array("i")  # 0 for long-lived resources
        self.length = array("i")
        self.phase = array("i")  # churning: phase; long-lived: created hour (negative)
        self.secs = array("i")  # seconds into the creation hour

    def add(self, bits: _Bits, churn_pct: int, min_period: int, max_period: int, min_pct: int) -> None:
        if bits.take(100) < churn_pct:
            period = min_period + bits.take(max_period - min_period + 1)
            self.period.append(period)
            self.length.append(max(1, period * (min_pct + bits.take(81 - min_pct)) // 100))
            self.phase.append(bits.take(period))
        else:
            self.period.append(0)
            self.length.append(0)
            self.phase.append(-(24 + bits.take(2 * 8760)))
        self.secs.append(bits.take(3600))

    def incarnation(self, i: int, h: int) -> tuple[int, int] | None:
        """(incarnation number, created hour) if resource i exists at hour h, else None."""
        period = self.period[i]
        if period == 0:
            created = self.phase[i]
            return (0, created) if h >= created else None
        x = h + self.phase[i]
        k = x // period
        if x - k * period >= self.length[i]:
            return None
        return k, k * period - self.phase[i]


class Foundation:
    """A seeded, deterministic CF foundation. See the module docstring for the rules."""

    def __init__(
        self,
        seed: int,
        orgs: int,
        spaces_per_org: int,
        apps: int,
        services: int,
        plans: int = 6,
    ) -> None:
        if orgs < 1 or spaces_per_org < 1:
            raise ValueError("at least one org and one space per org are required")
        if apps < 0 or services < 0:
            raise ValueError("apps and services must be >= 0")
        if plans < 1:
            raise ValueError("at least one service plan is required")
        self.seed = seed
        self.n_orgs = orgs
        self.n_spaces_per_org = spaces_per_org
        self.n_apps = apps
        self.n_services = services
        self.n_plans = plans
        self._cache: OrderedDict[int, Snapshot] = OrderedDict()
        self._build_orgs_spaces()
        self._build_catalog()
        self._build_apps()
        self._build_service_instances()

    # --------------------------------------------------------------- static parts

    def _build_orgs_spaces(self) -> None:
        seed = self.seed
        ow = max(2, len(str(self.n_orgs - 1)))
        self._orgs: list[Org] = []
        self._spaces: list[Space] = []
        for o in range(self.n_orgs):
            bits = _Bits(_digest(seed, "org-attr", o))
            org_created = _at(-(3 * 8760 + bits.take(8760)), bits.take(3600))
            org = Org(_guid(seed, "org", o), f"org-{o:0{ow}d}", org_created)
            self._orgs.append(org)
            for s in range(self.n_spaces_per_org):
                sbits = _Bits(_digest(seed, "space-attr", o, s))
                created = org_created + timedelta(hours=1 + sbits.take(2000), seconds=sbits.take(3600))
                self._spaces.append(Space(_guid(seed, "space", o, s), f"space-{o:0{ow}d}-{s}", org.guid, created))
        self._space_guids = [sp.guid for sp in self._spaces]
        self._space_org_guids = [sp.org_guid for sp in self._spaces]

    def _build_catalog(self) -> None:
        seed = self.seed
        n_off = min(len(_CATALOG), self.n_plans)
        created = _at(-4 * 8760)
        self._offerings = [
            ServiceOffering(
                _guid(seed, "offering", k), _CATALOG[k][0], _CATALOG[k][1], _guid(seed, "broker", k), created
            )
            for k in range(n_off)
        ]
        self._plans: list[ServicePlan] = []
        for p in range(self.n_plans):
            k, slot = p % n_off, p // n_off
            names = _CATALOG[k][2]
            name = names[slot] if slot < len(names) else f"{_CATALOG[k][0]}-plan-{slot}"
            free = _CATALOG[k][0] == "s3" and slot == 2
            self._plans.append(
                ServicePlan(_guid(seed, "plan", p), name, self._offerings[k].guid, free, created + timedelta(hours=p))
            )

    def _build_apps(self) -> None:
        seed, n_spaces = self.seed, len(self._spaces)
        self._app_life = _Lifetimes()
        self._app_space = array("i")
        self._app_key = array("Q")
        self._app_flags = array("B")  # bit0: permanently stopped
        self._app_buildpack = array("B")
        self._app_proc_start = array("i")
        self._app_nproc = array("B")
        self._proc_mem = array("H")
        self._proc_disk = array("H")
        self._proc_inst = array("B")
        # identities (guid, created_at, revision guid, process guids) of long-lived apps, filled lazily
        self._app_ident: list[tuple[str, datetime, str, tuple[str, ...]] | None] = [None] * self.n_apps
        for i in range(self.n_apps):
            d = _digest(seed, "app-attr", i, size=48)
            bits = _Bits(d[8:])
            self._app_key.append(int.from_bytes(d[:8], "little"))
            self._app_space.append(bits.take(n_spaces))
            self._app_life.add(bits, _APP_CHURN_PCT, 72, 1440, 20)
            self._app_flags.append(1 if bits.take(100) < _APP_PERM_STOPPED_PCT else 0)
            self._app_buildpack.append(bits.take(len(BUILDPACKS)))
            r = bits.take(10)
            nproc = 1 if r < 6 else (2 if r < 9 else 3)
            self._app_proc_start.append(len(self._proc_mem))
            self._app_nproc.append(nproc)
            for _ in range(nproc):
                self._proc_mem.append(MEMORY_CHOICES_MB[bits.weighted(_MEMORY_WEIGHTS)])
                self._proc_disk.append(DISK_CHOICES_MB[bits.take(len(DISK_CHOICES_MB))])
                self._proc_inst.append(1 + bits.take(4))
        self._app_width = max(4, len(str(self.n_apps - 1)))

    def _build_service_instances(self) -> None:
        seed, n_spaces = self.seed, len(self._spaces)
        self._si_life = _Lifetimes()
        self._si_space = array("i")
        self._si_plan = array("i")  # -1 for user-provided
        self._si_ident: list[tuple[str, datetime] | None] = [None] * self.n_services
        for j in range(self.n_services):
            bits = _Bits(_digest(seed, "si-attr", j))
            self._si_space.append(bits.take(n_spaces))
            user_provided = bits.take(100) < _SI_USER_PROVIDED_PCT
            plan = bits.take(self.n_plans)
            self._si_plan.append(-1 if user_provided else plan)
            self._si_life.add(bits, _SI_CHURN_PCT, 48, 1440, 20)
        self._si_width = max(4, len(str(self.n_services - 1)))

    # --------------------------------------------------------------- catalog accessors

    def orgs(self) -> list[Org]:
        return list(self._orgs)

    def spaces(self) -> list[Space]:
        return list(self._spaces)

    def offerings(self) -> list[ServiceOffering]:
        return list(self._offerings)

    def plans(self) -> list[ServicePlan]:
        return list(self._plans)

    # --------------------------------------------------------------- per-hour state

    def snapshot(self, hour: datetime) -> Snapshot:
        """The whole world at ``hour`` (cached for the last few hours asked)."""
        h = hour_index(hour)
        snap = self._cache.get(h)
        if snap is not None:
            self._cache.move_to_end(h)
            return snap
        with gc_paused():
            snap = self._compute(h)
        self._cache[h] = snap
        while len(self._cache) > _SNAPSHOT_CACHE:
            self._cache.popitem(last=False)
        return snap

    def apps_at(self, hour: datetime) -> list[AppState]:
        return self.snapshot(hour).apps

    def processes_at(self, hour: datetime) -> list[ProcessState]:
        return self.snapshot(hour).processes

    def service_instances_at(self, hour: datetime) -> list[ServiceInstanceState]:
        return self.snapshot(hour).service_instances

    def expected_usage(self, hour: datetime) -> list[ExpectedMeasurement]:
        """The oracle: what a correct collector must measure at ``hour``.

        * ``cfapps``: one per STARTED app, value = sum of instances x memory_in_mb over its
          processes, resource_kind "".
        * ``cfservices``: one per managed service instance, value 1, resource_kind = plan guid.
        """
        snap = self.snapshot(hour)
        with gc_paused():
            return self._expected(snap)

    @staticmethod
    def _expected(snap: Snapshot) -> list[ExpectedMeasurement]:
        mem_by_app: dict[str, int] = {}
        for p in snap.processes:
            mem_by_app[p.app_guid] = mem_by_app.get(p.app_guid, 0) + p.instances * p.memory_in_mb
        out = [
            ExpectedMeasurement("cfapps", a.guid, "", a.org_guid, a.space_guid, mem_by_app.get(a.guid, 0))
            for a in snap.apps
            if a.state == "STARTED"
        ]
        out.extend(
            ExpectedMeasurement("cfservices", s.guid, s.plan_guid, s.org_guid, s.space_guid, 1)
            for s in snap.service_instances
            if s.type == "managed" and s.plan_guid is not None
        )
        return out

    def _app_identity(self, i: int, inc: tuple[int, int]) -> tuple[str, datetime, str, tuple[str, ...]]:
        ident = self._app_ident[i]
        if ident is not None:
            return ident
        k, created_hour = inc
        # one digest gives the app guid, its revision guid and up to three process guids
        g = _guids(self.seed, "app", 2 + self._app_nproc[i], i, k)
        ident = (g[0], _at(created_hour - 1, self._app_life.secs[i]), g[1], tuple(g[2:]))
        if self._app_life.period[i] == 0:  # long-lived: one incarnation forever, cache it
            self._app_ident[i] = ident
        return ident

    def _si_identity(self, j: int, inc: tuple[int, int]) -> tuple[str, datetime]:
        ident = self._si_ident[j]
        if ident is not None:
            return ident
        k, created_hour = inc
        ident = (_guid(self.seed, "si", j, k), _at(created_hour - 1, self._si_life.secs[j]))
        if self._si_life.period[j] == 0:
            self._si_ident[j] = ident
        return ident

    def _compute(self, h: int) -> Snapshot:
        block = h // BLOCK_HOURS
        block_start = _at(block * BLOCK_HOURS)
        block_salt = (block * 0xD1B54A32D192ED03) & _M64
        stop_threshold = int(_APP_STOPPED_PER_BLOCK * 0x10000)
        scale_threshold = int(_APP_SCALE_PER_BLOCK * 0x100)
        life = self._app_life
        spaces, space_orgs = self._space_guids, self._space_org_guids
        apps: list[AppState] = []
        procs: list[ProcessState] = []
        aw = self._app_width
        for i in range(self.n_apps):
            inc = life.incarnation(i, h)
            if inc is None:
                continue
            guid, created, revision, proc_guids = self._app_identity(i, inc)
            updated = created if created > block_start else block_start
            z = _mix64(self._app_key[i] ^ block_salt)
            stopped = (self._app_flags[i] & 1) or (z & 0xFFFF) < stop_threshold
            sidx = self._app_space[i]
            space_guid, org_guid = spaces[sidx], space_orgs[sidx]
            apps.append(
                AppState(
                    guid,
                    f"app-{i:0{aw}d}",
                    "STOPPED" if stopped else "STARTED",
                    space_guid,
                    org_guid,
                    BUILDPACKS[self._app_buildpack[i]],
                    created,
                    updated,
                )
            )
            start = self._app_proc_start[i]
            for p, pguid in enumerate(proc_guids):
                q = start + p
                inst = self._proc_inst[q]
                v = (z >> (16 + 8 * p)) & 0xFF
                if v < scale_threshold:
                    inst = max(1, inst + (v % 5) - 1)
                procs.append(
                    ProcessState(
                        pguid,
                        PROCESS_TYPES[p],
                        guid,
                        space_guid,
                        org_guid,
                        inst,
                        self._proc_mem[q],
                        self._proc_disk[q],
                        revision,
                        created,
                        updated,
                    )
                )
        sis: list[ServiceInstanceState] = []
        slife = self._si_life
        sw = self._si_width
        plans = self._plans
        for j in range(self.n_services):
            inc = slife.incarnation(j, h)
            if inc is None:
                continue
            guid, created = self._si_identity(j, inc)
            sidx = self._si_space[j]
            plan = self._si_plan[j]
            sis.append(
                ServiceInstanceState(
                    guid,
                    f"si-{j:0{sw}d}",
                    "managed" if plan >= 0 else "user-provided",
                    spaces[sidx],
                    space_orgs[sidx],
                    plans[plan].guid if plan >= 0 else None,
                    created,
                    created,
                )
            )
        by_creation = attrgetter("created_at", "guid")
        apps.sort(key=by_creation)
        procs.sort(key=by_creation)
        sis.sort(key=by_creation)
        return Snapshot(_at(h), apps, procs, sis)
