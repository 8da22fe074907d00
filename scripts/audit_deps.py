"""Audit the pinned runtime dependencies: fail on a known vulnerability that has a fix.

    .venv/bin/python scripts/audit_deps.py [deploy/requirements.lock] [--report pip-audit.json]

Runs ``pip-audit`` on the lock (exact pins, so ``--no-deps``: nothing is resolved or installed)
and reads its JSON report, because pip-audit has no option to fail only on the vulnerabilities
that a newer release fixes. Exit 1 names each such package and the versions that fix it: bump it
in pyproject.toml if its range excludes the fix, then regenerate the lock with ``deploy/lock``.
A vulnerability with no fix yet is printed as a warning and does not fail the run.

pip-audit asks PyPI about each pinned version. When PyPI cannot say (pip-audit then skips the
package as "not found"), the project's own PyPI page is asked: it lists the advisories of its
newest release, so a pin on the newest release is still audited. A package audited neither way
is printed; a run that audited none fails (PyPI unreachable is not a clean audit).
``--report`` reads a saved pip-audit JSON report instead of running pip-audit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
PYPI_PROJECT = "https://pypi.org/pypi/{name}/json"


@dataclass(frozen=True)
class Vulnerability:
    package: str
    version: str
    id: str
    fix_versions: tuple[str, ...]


def read_lock(lock: Path) -> dict[str, str]:
    """The ``name==version`` pins of a requirements file, by canonical name."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def run_pip_audit(lock: Path) -> dict[str, Any]:
    pip_audit = Path(sys.executable).with_name("pip-audit")
    result = subprocess.run(
        [
            str(pip_audit),
            "--requirement",
            str(lock),
            "--no-deps",  # the lock pins the whole closure already
            "--disable-pip",
            "--format",
            "json",
            "--progress-spinner",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:  # exit 1 only says vulnerabilities were found: the report tells which
        report: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        raise SystemExit(
            f"audit: pip-audit failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        ) from None
    return report


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def newest_release_advisories(name: str, version: str) -> list[dict[str, Any]] | None:
    """PyPI's advisories for ``name==version`` when that is the project's newest release (its
    project page lists them for that release only); None when PyPI cannot tell."""
    try:
        with urllib.request.urlopen(PYPI_PROJECT.format(name=name), timeout=60) as response:
            doc = json.load(response)
    except (OSError, ValueError):
        return None
    if not _same_version(str(doc.get("info", {}).get("version", "")), version):
        return None
    return [
        {"id": v["id"], "fix_versions": list(v.get("fixed_in") or [])}
        for v in doc.get("vulnerabilities") or []
        if not v.get("withdrawn")
    ]


def audit(report: dict[str, Any], pins: dict[str, str]) -> tuple[list[Vulnerability], list[str]]:
    """Every vulnerability of the pinned versions, and the packages that could not be audited."""
    found: list[Vulnerability] = []
    unaudited: list[str] = []
    for dep in report.get("dependencies", []):
        name = canonicalize_name(dep["name"])
        version = str(dep.get("version") or pins.get(name, ""))
        vulns: list[dict[str, Any]] | None = dep.get("vulns")
        if "skip_reason" in dep:
            vulns = newest_release_advisories(name, version) if version else None
        if vulns is None:
            unaudited.append(f"{name} {version}".strip())
            continue
        found.extend(
            Vulnerability(name, version, str(v["id"]), tuple(v.get("fix_versions") or ()))
            for v in vulns
        )
    return found, unaudited


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/audit_deps.py", description=__doc__)
    parser.add_argument("lock", nargs="?", default=str(ROOT / "deploy" / "requirements.lock"))
    parser.add_argument("--report", help="a saved `pip-audit --format json` report to read")
    args = parser.parse_args(argv)
    lock = Path(args.lock)
    pins = read_lock(lock)
    report = json.loads(Path(args.report).read_text()) if args.report else run_pip_audit(lock)
    found, unaudited = audit(report, pins)

    fixable = [v for v in found if v.fix_versions]
    for v in found:
        if v.fix_versions:
            print(
                f"audit: {v.package} {v.version}: {v.id}, fixed in {', '.join(v.fix_versions)}"
                " (bump it, then run deploy/lock)",
                file=sys.stderr,
            )
        else:
            print(
                f"audit: warning: {v.package} {v.version}: {v.id} has no fix yet", file=sys.stderr
            )
    if unaudited:
        print(
            f"audit: warning: PyPI could not say about {len(unaudited)} pinned packages: "
            + ", ".join(unaudited),
            file=sys.stderr,
        )
    audited = len(report.get("dependencies", [])) - len(unaudited)
    print(
        f"audit: {lock.name}: {audited} of {len(pins)} pinned packages audited, "
        f"{len(fixable)} known vulnerabilities with a fix, {len(found) - len(fixable)} without"
    )
    if audited == 0 and pins:
        print("audit: nothing was audited (is PyPI reachable?)", file=sys.stderr)
        return 1
    return 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main())
