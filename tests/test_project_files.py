"""The open-source project files: present, and valid against the schemas GitHub and CFF publish.

check-jsonschema ships those schemas (SchemaStore's GitHub workflow and issue-form schemas, the Citation File
Format schema), so these checks run offline. A deliberately broken workflow must fail, or the check proves
nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")

pytestmark = pytest.mark.skipif(CHECK is None, reason="check-jsonschema is in the dev extra")


def validate(schema: str, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHECK, "--builtin-schema", schema, *map(str, paths)], capture_output=True, text=True)


def test_the_files_a_contributor_looks_for_exist() -> None:
    for name in ("LICENSE", "CONTRIBUTING.md", "CHANGELOG.md", "CITATION.cff", "CODE_OF_CONDUCT.md",
                 ".pre-commit-config.yaml", ".github/PULL_REQUEST_TEMPLATE.md"):
        assert (ROOT / name).is_file(), name
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_pyproject_licence_is_an_spdx_string_matching_the_licence_file() -> None:
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    assert 'license = "MIT"' in lines  # a TOML table here makes setuptools print a deprecation warning
    assert 'license-files = ["LICENSE"]' in lines


def test_workflow_issue_forms_and_citation_match_their_schemas() -> None:
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    for schema, paths in (("vendor.github-workflows", workflows),
                          ("vendor.github-issue-forms", [p for p in (ROOT / ".github" / "ISSUE_TEMPLATE").glob("*.yml")
                                                          if p.name != "config.yml"]),
                          ("vendor.github-issue-config", [ROOT / ".github" / "ISSUE_TEMPLATE" / "config.yml"]),
                          ("vendor.citation-file-format", [ROOT / "CITATION.cff"])):
        result = validate(schema, *paths)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_workflow_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("name: CI\non: push\njobs:\n  test:\n    steps:\n      - run: make test\n")  # no runs-on
    assert validate("vendor.github-workflows", broken).returncode != 0


def test_the_workflow_runs_the_readme_test_command() -> None:
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "make" in text and " test" in text and "python -m build" in text


def test_requirements_txt_is_generated_from_pyproject() -> None:
    """requirements.txt is written by scripts/sync_requirements.py; a dependency added to pyproject.toml only
    fails here until the file is regenerated."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_requirements.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    for needed in ("peft>=0.13", "trl>=1.16,<2", "fastapi>=0.110", "llama-cpp-python>=0.3", "lm-eval>=0.4.8"):
        assert needed in lines
    assert not any(line.startswith(("pytest", "ruff")) for line in lines)  # test tools are the dev extra's


def test_constraints_pin_every_dependency_and_the_makefile_uses_them() -> None:
    """constraints.txt (written by `make constraints`) pins each pyproject dependency to a version its range
    accepts; every install in the Makefile passes it; torch's pin is the Makefile's TORCH, the same in the workflow."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_constraints.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", line) for line in lines)
    assert not any(line.lower().startswith("torch==") for line in lines)
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "$(TORCH)" not in line
                and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    torch = re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M).group(1)
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert f'TORCH="torch=={torch} ' in workflow and f'--torch "torch=={torch} ' in workflow
