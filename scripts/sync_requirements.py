"""Write requirements.txt from pyproject.toml, so the two never disagree (tests/test_project_files.py checks it).

requirements.txt is for readers who prefer `pip install -r`: the core dependencies plus every extra the guide
uses (`READER_EXTRAS`), with `byollm[...]` self-references expanded and duplicates dropped, in pyproject's
order. Test and lint tools stay in the `dev` extra only. torch is listed, but must be installed first for the
right hardware (the header says how).

    python scripts/sync_requirements.py          # rewrite requirements.txt
    python scripts/sync_requirements.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
READER_EXTRAS = ("hf", "data", "finetune", "align", "serve", "rag", "gguf", "llamacpp", "real", "safety", "cloud")
HEADER = """\
# Generated from pyproject.toml by `python scripts/sync_requirements.py`; do not edit by hand.
# For readers who prefer requirements files. Install torch FIRST, for your hardware:
#   pip install torch==2.13.0            # CPU build (or the CUDA build from download.pytorch.org)
#   pip install -r requirements.txt && pip install -e . --no-deps
# Core dependencies and the extras the guide uses: {extras}.
"""
SELF = re.compile(r"^byollm\[([^\]]+)\]$")


def expand(extras: dict[str, list[str]], names: tuple[str, ...] | list[str], seen: set[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if name not in extras:
            raise SystemExit(f"pyproject.toml has no extra {name!r}")
        for req in extras[name]:
            m = SELF.match(req.replace(" ", ""))
            out += expand(extras, m.group(1).split(","), seen) if m else [req]
    return out


def render(pyproject: Path = ROOT / "pyproject.toml") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"]) + expand(project["optional-dependencies"], READER_EXTRAS, set())
    unique = list(dict.fromkeys(reqs))
    return HEADER.format(extras=", ".join(READER_EXTRAS)) + "\n".join(unique) + "\n"


def main(argv: list[str]) -> int:
    target = ROOT / "requirements.txt"
    text = render()
    if "--check" in argv:
        if target.read_text() != text:
            print("requirements.txt is out of date: run `python scripts/sync_requirements.py`", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
