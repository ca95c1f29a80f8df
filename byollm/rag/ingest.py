"""Files -> documents: plain text, Markdown (one document per section, heading path kept), HTML (selectolax),
PDF (pypdf, one document per page), SQuAD JSON v1.1 / v2.0 (one document per paragraph) and JSONL records.

A `Document` is the unit the chunker cuts; its chunks' offsets are into `Document.text` plus `offset` (a
Markdown section's place in its file), so for text and Markdown they point into the file itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byollm.errors import DataError, require

SUFFIXES = {".txt": "text", ".text": "text", ".rst": "text", ".md": "markdown", ".markdown": "markdown",
            ".html": "html", ".htm": "html", ".pdf": "pdf", ".json": "json", ".jsonl": "jsonl"}
TEXT_FIELDS = ("text", "content", "body", "context", "passage", "output")


@dataclass
class Document:
    text: str
    source: str
    title: str = ""
    headings: tuple[str, ...] = ()
    offset: int = 0  # where `text` starts in the source's text
    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SquadQuestion:
    id: str
    question: str
    answers: list[str]
    answer_starts: list[int]
    is_impossible: bool = False


@dataclass
class SquadParagraph:
    title: str
    context: str
    questions: list[SquadQuestion]


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The files to read: each path itself, or every supported file under a folder (sorted, hidden skipped)."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and f.suffix.lower() in SUFFIXES and not any(x.startswith(".") for x in rel):
                    yield f
        elif p.is_file():
            yield p
        else:
            raise DataError(f"{p} does not exist: give files or folders to index")


def read_documents(path: str | Path, *, source: str | None = None, tags: Iterable[str] = (),
                   groups: Iterable[str] = (), text_field: str | None = None) -> list[Document]:
    """The documents in one file, by its suffix (a .json file must be SQuAD or a list of records)."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower(), "text")
    source = source or str(path)
    if kind == "pdf":
        docs = read_pdf(path, source)
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}); convert it or leave it out") from e
        if kind == "markdown":
            docs = markdown_documents(raw, source, title=path.stem)
        elif kind == "html":
            docs = html_documents(raw, source, title=path.stem)
        elif kind == "json":
            docs = json_documents(raw, source, path, text_field)
        elif kind == "jsonl":
            docs = record_documents(_jsonl(raw, path), source, path, text_field)
        else:
            docs = [Document(raw, source, title=path.stem)] if raw.strip() else []
    for d in docs:
        d.tags = tuple(dict.fromkeys((*d.tags, *tags)))
        d.groups = tuple(dict.fromkeys((*d.groups, *groups)))
    return docs


# --- Markdown ----------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_documents(text: str, source: str, title: str = "") -> list[Document]:
    """One document per section: a heading (ATX `#`...`######`, not inside code fences) up to the next one.

    Each keeps its heading path (the enclosing headings, outermost first) and its offset in the file.
    """
    starts: list[tuple[int, int, str]] = []  # (offset, level, heading)
    in_fence, pos = False, 0
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _HEADING.match(line.rstrip("\r\n"))):
            starts.append((pos, len(m.group(1)), m.group(2).strip()))
        pos += len(line)
    if not starts or starts[0][0] > 0:
        starts.insert(0, (0, 0, ""))
    docs, path = [], []  # path: (level, heading) of the enclosing sections
    carried: int | None = None  # a heading with no text of its own joins the next section (no heading-only chunks)
    ends = [*starts[1:], (len(text), 0, "")]
    for i, ((a, level, heading), nxt) in enumerate(zip(starts, ends, strict=False)):
        if level:
            path = [(lv, h) for lv, h in path if lv < level] + [(level, heading)]
        start = a if carried is None else carried
        body = text[a:nxt[0]].partition("\n")[2] if level else text[a:nxt[0]]
        if level and not body.strip() and i + 1 < len(starts):
            carried = start
            continue
        carried = None
        section = text[start:nxt[0]]
        if section.strip():
            docs.append(Document(section, source, title=title, headings=tuple(h for _, h in path), offset=start))
    return docs


# --- HTML and PDF ------------------------------------------------------------------------------------------


def html_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML page: scripts, styles and navigation dropped, one line per block of text."""
    parser = require("selectolax.lexbor", "rag").LexborHTMLParser(html)
    title_node = parser.css_first("title")
    title = title_node.text(strip=True) if title_node else ""
    for node in parser.css("script, style, noscript, template, nav, header, footer, svg"):
        node.decompose()
    root = parser.body or parser.root
    raw = root.text(separator="\n") if root else ""
    lines = [" ".join(line.split()) for line in raw.splitlines()]
    return title, "\n".join(line for line in lines if line)


def html_documents(html: str, source: str, title: str = "") -> list[Document]:
    page_title, text = html_text(html)
    return [Document(text, source, title=page_title or title)] if text.strip() else []


def read_pdf(path: Path, source: str) -> list[Document]:
    """One document per page (meta "page", 1-based): citations can name the page."""
    pypdf = require("pypdf", "rag")
    try:
        reader = pypdf.PdfReader(str(path))
    except Exception as e:  # pypdf raises many kinds on a damaged file
        raise DataError(f"cannot read the PDF {path}: {e}") from e
    title = str((reader.metadata or {}).get("/Title") or path.stem)
    docs = []
    for n, page in enumerate(reader.pages, 1):
        text = page.extract_text() or ""
        if text.strip():
            docs.append(Document(text, source, title=title, meta={"page": n}))
    return docs


# --- SQuAD and records -------------------------------------------------------------------------------------


def is_squad(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("data"), list) and all(
        isinstance(a, dict) and "paragraphs" in a for a in obj["data"])


def squad_paragraphs(obj: dict[str, Any]) -> list[SquadParagraph]:
    """Every paragraph of a SQuAD v1.1 / v2.0 file with its questions (v2.0: `is_impossible` kept)."""
    out = []
    for article in obj["data"]:
        for p in article["paragraphs"]:
            qs = [SquadQuestion(str(q.get("id", "")), q["question"], [a["text"] for a in q.get("answers", [])],
                                [int(a.get("answer_start", -1)) for a in q.get("answers", [])],
                                bool(q.get("is_impossible", False))) for q in p.get("qas", [])]
            out.append(SquadParagraph(str(article.get("title", "")), p["context"], qs))
    return out


def read_squad(path: str | Path) -> list[SquadParagraph]:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read SQuAD file {path}: {e}") from e
    if not is_squad(obj):
        raise DataError(f"{path} is not a SQuAD file (v1.1/v2.0: {{'data': [{{'title', 'paragraphs'}}]}})")
    return squad_paragraphs(obj)


def squad_documents(obj: dict[str, Any], source: str) -> list[Document]:
    return [Document(p.context, source, title=p.title, meta={"paragraph": i, "questions": len(p.questions)})
            for i, p in enumerate(squad_paragraphs(obj))]


def json_documents(raw: str, source: str, path: Path, text_field: str | None) -> list[Document]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if is_squad(obj):
        return squad_documents(obj, source)
    if isinstance(obj, list):
        return record_documents(obj, source, path, text_field)
    raise DataError(f"{path}: a .json file to index must be SQuAD or a list of records with a text field")


def _jsonl(raw: str, path: Path) -> list[Any]:
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON: {e}") from e
    return records


def record_documents(records: list[Any], source: str, path: Path, text_field: str | None) -> list[Document]:
    """One document per record: its text field (`text_field`, else the first of TEXT_FIELDS present); `title`,
    `tags` and `groups` fields are used as such, other fields go to meta."""
    docs = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {n} is not an object")
        key = text_field or next((k for k in TEXT_FIELDS if isinstance(rec.get(k), str)), None)
        if key is None or not isinstance(rec.get(key), str):
            raise DataError(f"{path}: record {n} has no text field ({text_field or ', '.join(TEXT_FIELDS)}); "
                            "name it with --text-field")
        if not rec[key].strip():
            continue
        listed = {k: tuple(rec[k]) if isinstance(rec.get(k), list) else ((rec[k],) if rec.get(k) else ())
                  for k in ("tags", "groups")}
        meta = {k: v for k, v in rec.items() if k not in (key, "title", "tags", "groups")}
        docs.append(Document(rec[key], source, title=str(rec.get("title") or ""), tags=listed["tags"],
                             groups=listed["groups"], meta={"record": n, **meta}))
    return docs
