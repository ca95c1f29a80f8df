"""MkDocs hook (mkdocs.yml `hooks:`): links from a guide page to a file outside docs/, on the site.

In the repository a page links to the code it explains with a relative path (`[`loop.py`](../byollm/train/loop.py)`),
which works wherever the Markdown is read next to the code. The site holds only docs/, so MkDocs cannot resolve
such a link (and `--strict` fails on it). This hook rewrites each one before MkDocs reads the page: to a link
into the repository when mkdocs.yml sets `repo_url`, else to the file's repository path as inline code, so the
reader still sees which file is meant. Links inside fenced code blocks are left alone.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def outside_docs(page_path: str, target: str) -> str | None:
    """The repository path of `target` when the link from docs/`page_path` leaves docs/, else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("/"):
        return None  # a URL (https:, mailto:) or an absolute path: not ours to rewrite
    path = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_path), target))
    if path == "docs" or path.startswith("docs/"):
        return None
    return path + ("/" if target.endswith("/") else "")


def rewrite(markdown: str, page_path: str, repo_url: str | None = None, branch: str = "main") -> str:
    """The page's Markdown with its links to files outside docs/ made into code text (or repository links)."""

    def replace(m: re.Match) -> str:
        path = outside_docs(page_path, m.group("target"))
        if path is None:
            return m.group(0)
        text = m.group("text")
        if repo_url:
            kind = "tree" if path.endswith("/") or "." not in posixpath.basename(path.rstrip("/")) else "blob"
            return f"[{text}]({repo_url.rstrip('/')}/{kind}/{branch}/{path.rstrip('/')}{m.group('anchor') or ''})"
        shown = text.strip("`")
        if text.startswith("`") and text.endswith("`") and path.rstrip("/").endswith(shown.rstrip("/")):
            return f"`{path}`"  # [`loop.py`](../byollm/train/loop.py) -> `byollm/train/loop.py`
        return f"{text} (`{path}`)"

    out, in_fence = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            in_fence = not in_fence
        out.append(line if in_fence else LINK.sub(replace, line))
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return rewrite(markdown, page.file.src_uri, config.get("repo_url"))
