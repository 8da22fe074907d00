"""scripts/audit_deps.py: pip-audit's report of deploy/requirements.lock
fails the run on a known vulnerability that a release fixes, and only on those."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
AUDIT = ROOT / "scripts" / "audit_deps.py"


def _audit(tmp_path: Path, dependencies: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """The script on a saved pip-audit JSON report (the form `pip-audit --format json` writes)
    of a lock holding the same pins."""
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a lock\n" + "".join(f"{d['name']}=={d['version']}\n" for d in dependencies))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"dependencies": dependencies, "fixes": []}))
    return subprocess.run(
        [sys.executable, str(AUDIT), str(lock), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _vuln(vuln_id: str, *fixes: str) -> dict[str, Any]:
    return {"id": vuln_id, "fix_versions": list(fixes), "aliases": [], "description": "..."}


def test_a_vulnerability_with_a_fix_fails_and_names_the_fix(tmp_path: Path) -> None:
    result = _audit(
        tmp_path,
        [
            {"name": "celery", "version": "5.7.0", "vulns": []},
            {
                "name": "jinja2",
                "version": "3.1.2",
                "vulns": [_vuln("GHSA-h5c8-rqwp-cp95", "3.1.3")],
            },
        ],
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "jinja2 3.1.2: GHSA-h5c8-rqwp-cp95, fixed in 3.1.3" in result.stderr
    assert "celery" not in result.stderr
    assert "2 of 2 pinned packages audited, 1 known vulnerabilities with a fix" in result.stdout


def test_a_vulnerability_without_a_fix_warns_but_passes(tmp_path: Path) -> None:
    result = _audit(
        tmp_path,
        [
            {"name": "celery", "version": "5.7.0", "vulns": []},
            {"name": "ecdsa", "version": "0.19.1", "vulns": [_vuln("GHSA-wj6h-64fc-37mp")]},
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: ecdsa 0.19.1: GHSA-wj6h-64fc-37mp has no fix yet" in result.stderr
    assert "0 known vulnerabilities with a fix, 1 without" in result.stdout


def test_a_clean_report_passes(tmp_path: Path) -> None:
    result = _audit(tmp_path, [{"name": "celery", "version": "5.7.0", "vulns": []}])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 1 pinned packages audited, 0 known vulnerabilities with a fix" in result.stdout


def test_the_audit_runs_before_the_tests_in_the_one_command() -> None:
    """scripts/test (what .ci/run execs) installs pip-audit with the test extra and runs the
    audit on the image's lock before pytest."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    test_extra = pyproject.split("test = [", 1)[1].split("]", 1)[0]
    assert '"pip-audit' in test_extra
    steps = [ln.strip() for ln in (ROOT / "scripts" / "test").read_text().splitlines()]
    audit = steps.index(".venv/bin/python scripts/audit_deps.py deploy/requirements.lock")
    install = next(i for i, s in enumerate(steps) if "-e '.[test]'" in s)
    pytest_step = next(i for i, s in enumerate(steps) if s.startswith("exec .venv/bin/pytest"))
    assert install < audit < pytest_step
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec bash scripts/test")
