"""The guide as a website: `mkdocs build --strict` passes, and the site's pages are exactly the pages of docs/.

--strict (with the `validation` settings of mkdocs.yml) fails on a broken relative link, a missing anchor or
figure, and a page left out of the navigation; this test adds the other direction (every nav entry is a file)
and checks the hook that turns links to files outside docs/ into their repository paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def nav_files(nav: list) -> list[str]:
    """The Markdown files named in a MkDocs nav (nested sections included), in order."""
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            found += nav_files(value)
        elif not str(value).startswith(("http://", "https://")):
            found.append(str(value))
    return found


@pytest.fixture(scope="module")
def config():
    pytest.importorskip("material", reason="mkdocs-material (the dev extra) builds the site")
    from mkdocs.config import load_config

    return load_config(str(REPO / "mkdocs.yml"))


def test_nav_lists_every_page_of_docs_once(config):
    listed = nav_files(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert len(listed) == len(set(listed)), "a page is in nav twice"
    assert sorted(set(pages) - set(listed)) == [], "pages missing from mkdocs.yml's nav (orphans)"
    assert sorted(set(listed) - set(pages)) == [], "nav entries without a file in docs/"


def test_every_section_page_runs_in_the_docs_tests():
    """A section page that tests/test_projects.py does not know would have its commands and excerpts unchecked."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_projects import DOCS as CHECKED
    finally:
        sys.path.remove(str(REPO / "tests"))
    assert sorted(DOCS.glob("section_*.md")) == sorted(CHECKED)


def test_mkdocs_build_strict(config, tmp_path: Path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in nav_files(config["nav"]):
        name = page.removesuffix(".md")
        html = site / ("index.html" if name == "index" else f"{name}/index.html")
        assert html.is_file(), page
    for figure in (DOCS / "figures").glob("*.png"):
        assert (site / "figures" / figure.name).is_file(), figure.name
    # The exercises' solutions are collapsed blocks, and code links became repository paths.
    section2 = (site / "section_2_training" / "index.html").read_text(encoding="utf-8")
    assert section2.count('<details class="note">') >= 5
    assert "<code>byollm/data/registry.py</code>" in (site / "section_2_data" / "index.html").read_text("utf-8")


def test_links_outside_docs_become_repository_paths():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from mkdocs_hooks import rewrite
    finally:
        sys.path.remove(str(REPO / "scripts"))
    page = ("See [`loop.py`](../byollm/train/loop.py), [the Trainer](../byollm/train/loop.py#L10) and "
            "[the configs](../configs).")
    assert rewrite(page, "section_2_loop.md") == (
        "See `byollm/train/loop.py`, the Trainer (`byollm/train/loop.py`) and the configs (`configs`).")
    assert rewrite(page, "section_2_loop.md", "https://example.org/byollm") == (
        "See [`loop.py`](https://example.org/byollm/blob/main/byollm/train/loop.py), "
        "[the Trainer](https://example.org/byollm/blob/main/byollm/train/loop.py#L10) and "
        "[the configs](https://example.org/byollm/tree/main/configs).")
    kept = "[LOG](LOG.md#top), [a figure](figures/rope.png), ![x](figures/rope.png), [web](https://a.b/c)"
    assert rewrite(kept, "section_2_loop.md") == kept  # inside docs/, images and URLs are MkDocs' business
    assert rewrite("[up](../README.md)", "sub/page.md") == "[up](../README.md)"  # docs/README.md: inside
    fenced = "```text\n[`x.py`](../x.py)\n```"
    assert rewrite(fenced, "a.md") == fenced
