"""The image installs the runtime lock and nothing else, and runs as a numeric non-root user; the runtime
lock is exactly the tree the services need and the dev lock holds the rest. (No Docker engine runs here:
the Dockerfile is read, not built.)"""

from __future__ import annotations

import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned"
            out[canonicalize_name(name)] = version
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_installs_only_the_runtime_lock_and_the_project_without_dependencies():
    steps = instructions()
    copied = " ".join(args for word, args in steps if word == "COPY")
    assert "requirements-dev.lock" not in copied
    installs = [
        cmd
        for word, args in steps
        if word == "RUN"
        for cmd in re.split(r"&&|\|\||;", args)
        if re.search(r"\bpip install\b", cmd)
    ]
    assert installs, "the Dockerfile installs nothing"
    for cmd in installs:
        argv = shlex.split(cmd)
        assert "--no-deps" in argv, cmd  # the lock is the whole tree: nothing may come from outside it
        targets = [a for i, a in enumerate(argv) if i > 0 and argv[i - 1] == "-r"]
        rest = [a for a in argv[argv.index("install") + 1 :] if not a.startswith("-") and a not in targets]
        assert targets in (["requirements.lock"], []), cmd
        assert rest in ([], ["."]), cmd  # no extras ([test], [bench]) and no loose packages
    assert any("-r requirements.lock" in cmd for cmd in installs)


def test_the_image_is_multi_stage_and_runs_as_a_numeric_non_root_user():
    steps = instructions()
    stages = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(stages) >= 2
    final = steps[stages[-1] :]
    assert any(word == "COPY" and args.startswith("--from=") for word, args in final)
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # The final stage installs nothing itself: what runs is what the build stage made from the lock.
    assert not any(word == "RUN" and "pip install" in args for word, args in final)


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements need (installed metadata, markers and extras evaluated)."""
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for sub in metadata.requires(req.name) or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None:
                todo.append((sub_req, ""))
            else:
                todo.extend((sub_req, e) for e in extras | {""})
    return {k.split("[")[0] for k in seen}


def test_the_runtime_lock_is_exactly_the_tree_of_the_runtime_dependencies():
    runtime = pins(ROOT / "requirements.lock")
    needed = _closure(project()["dependencies"])
    assert needed - set(runtime) == set(), "runtime packages missing from requirements.lock"
    assert set(runtime) - needed == set(), "requirements.lock holds packages the runtime does not need"
    for dep in map(Requirement, project()["dependencies"]):
        assert f"=={runtime[canonicalize_name(dep.name)]}" == str(dep.specifier), dep


def test_the_dev_lock_holds_the_test_and_benchmark_tree_and_nothing_of_the_runtime():
    runtime, dev = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-dev.lock")
    assert set(runtime) & set(dev) == set()
    extras = [r for group in project()["optional-dependencies"].values() for r in group]
    needed = _closure(extras) - set(runtime)
    assert needed - set(dev) == set(), "test or benchmark packages missing from requirements-dev.lock"
    for dep in map(Requirement, extras):
        name = canonicalize_name(dep.name)
        assert f"=={runtime.get(name) or dev[name]}" == str(dep.specifier), dep
    for heavy in ("pytest", "playwright", "matplotlib", "schemathesis", "hypothesis", "testcontainers"):
        assert heavy in dev and heavy not in runtime
