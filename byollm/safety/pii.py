"""PII and secret detection and redaction, written by hand (guide section 7).

Each detector is a regular expression for candidates plus a validator that removes the look-alikes: a card
number must pass the Luhn check, an IBAN the ISO 13616 mod-97 check, an IPv4 address octets <= 255, an IPv6
address Python's `ipaddress` parser. `detect(text)` returns non-overlapping `Span`s; `redact(text)` replaces
them with typed placeholders (`[EMAIL]`, `[CREDIT_CARD]`, ...). `scrub_file` applies it to a text or JSONL
file and reports what was removed (kinds and positions, never the values). Person names and addresses need
a named-entity model: `presidio_spans` uses Presidio when it is installed and finds nothing otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byollm.atomic import atomic_write_text
from byollm.errors import ByollmError

KINDS = ("SECRET", "EMAIL", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "PHONE")
"""Every kind, highest priority first: an overlap keeps the span whose kind comes first here."""


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int
    text: str


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------

def luhn_valid(digits: str) -> bool:
    """The Luhn check: double every second digit from the right, sum the digits, the total ends in 0."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


IBAN_LENGTHS = {"AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18, "FR": 27,
                "GB": 22, "GR": 27, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
                "SE": 24, "SK": 24}
"""The lengths of common countries' IBANs; others need only 15..34 characters."""


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    iban = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", iban):
        return False
    if IBAN_LENGTHS.get(iban[:2], len(iban)) != len(iban):
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


# --------------------------------------------------------------------------------------------------
# Detectors: each yields (start, end) of the matches it accepts
# --------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])")
# Not the digits of a decimal fraction ("50.26548245743669 cm" passes Luhn by chance): no digit + point before,
# no point + digit after.
_CARD = re.compile(r"(?<![\w-])(?<!\d[.,])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_PHONE = [
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,5}){2,6}(?![\w-]|\.\d)"),  # +CC ...
    re.compile(r"(?<![\w(-])(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-]|\.\d)"),  # North America
    re.compile(r"(?<![\w+.-])0\d{1,4}(?:[ .-]\d{2,8}){1,4}(?![\w-]|[.-]\d)"),  # national, leading 0
]
_SECRETS = [
    re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----(?:[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----)?"),
    re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"),  # AWS access key id
    re.compile(r"(?<!\w)gh[pousr]_[A-Za-z0-9]{36}(?!\w)"),  # GitHub classic tokens
    re.compile(r"(?<!\w)github_pat_[A-Za-z0-9_]{22,}(?!\w)"),  # GitHub fine-grained tokens
    re.compile(r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}(?![\w-])"),  # OpenAI-style keys
    re.compile(r"(?<![\w-])xox[bapsr]-[A-Za-z0-9-]{10,}(?![\w-])"),  # Slack tokens
]
_ASSIGNMENT = re.compile(r"(?i)(?<![\w-])(?:[a-z0-9]+[_-])*(?:(?:api|access|secret|private)[_-]?key|secret|token"
                         r"|password|passwd|pwd|credentials?)[\"']?\s*[:=]\s*([\"']?)([^\s\"',;]{6,})\1")
_PLACEHOLDER = re.compile(r"(?i)[<${\[*%].*|x+|.*(?:example|changeme|redacted|your[_-]|none|null|true|false).*")


def _emails(text: str) -> Iterable[tuple[int, int]]:
    return (m.span() for m in _EMAIL.finditer(text))


_CARD_GROUPS = {(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 4, 1), (4, 4, 4, 2), (4, 4, 4, 3)}
"""How printed card numbers are grouped (16/19 digits in fours, American Express 4-6-5, Diners 4-6-4)."""


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for m in _CARD.finditer(text):
        cand = m.group()
        digits = re.sub(r"\D", "", cand)
        groups = tuple(len(g) for g in re.split(r"[ -]", cand))
        if len(groups) > 1 and (groups not in _CARD_GROUPS or (" " in cand and "-" in cand)):
            continue  # digits grouped in some other way: an account, order or phone number
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits):
            yield m.span()


def _ibans(text: str) -> Iterable[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        cand = m.group()
        while cand:  # a greedy match may have swallowed a following word ("... 32 EUR"): drop groups from the end
            if iban_valid(cand):
                yield m.start(), m.start() + len(cand)
                break
            cand = cand.rsplit(" ", 1)[0] if " " in cand else ""


_VERSION_BEFORE = re.compile(r"(?i)(?:version|ver\.?|release|v)\s*$")


def _ipv4(text: str) -> Iterable[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text[max(0, m.start() - 10):m.start()]):
            continue  # "version 1.2.3.4"
        octets = m.group().split(".")
        if all(int(o) <= 255 and (o == "0" or not o.startswith("0")) for o in octets):
            yield m.span()


def _ipv6(text: str) -> Iterable[tuple[int, int]]:
    for m in _IPV6.finditer(text):
        cand = m.group()
        if not any(c in "0123456789abcdefABCDEF" for c in cand):
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        yield m.span()


def _phones(text: str) -> Iterable[tuple[int, int]]:
    for i, pattern in enumerate(_PHONE):
        for m in pattern.finditer(text):
            n = sum(c.isdigit() for c in m.group())
            if (8 <= n <= 15) if i == 0 else (n == 10) if i == 1 else (10 <= n <= 11):
                yield m.span()


def _secrets(text: str) -> Iterable[tuple[int, int]]:
    for pattern in _SECRETS:
        yield from (m.span() for m in pattern.finditer(text))
    for m in _ASSIGNMENT.finditer(text):  # only the value is secret; the name stays readable
        value = m.group(2)
        if not _PLACEHOLDER.fullmatch(value) and not value.isdigit() and len(set(value)) > 2:
            yield m.span(2)


DETECTORS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    "SECRET": _secrets, "EMAIL": _emails, "CREDIT_CARD": _cards, "IBAN": _ibans,
    "IP_ADDRESS": lambda t: [*_ipv4(t), *_ipv6(t)], "PHONE": _phones,
}


def presidio_spans(text: str, entities: tuple[str, ...] = ("PERSON", "LOCATION")) -> list[Span]:
    """Person names and places from Presidio's analyzer when it (and its spaCy model) is installed, else []."""
    try:
        from presidio_analyzer import AnalyzerEngine  # optional: not a dependency of byollm
    except ImportError:
        return []
    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = AnalyzerEngine()
    results = _ANALYZER.analyze(text=text, entities=list(entities), language="en")
    return [Span(r.entity_type, r.start, r.end, text[r.start:r.end]) for r in results]


_ANALYZER: Any = None


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """Keep a non-overlapping subset, deterministically: higher-priority kind first (`KINDS` order, unknown
    kinds last), then the longer span, then the earlier one. Returned in text order."""
    rank = {k: i for i, k in enumerate(KINDS)}
    kept: list[Span] = []
    for s in sorted(set(spans), key=lambda s: (rank.get(s.kind, len(KINDS)), -(s.end - s.start), s.start, s.kind)):
        if all(s.end <= k.start or s.start >= k.end for k in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


def detect(text: str, kinds: Iterable[str] | None = None, ner: bool = False) -> list[Span]:
    """Every PII/secret span of `text` of the given kinds (default all), overlaps resolved."""
    kinds = list(KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in DETECTORS and not ner]
    if unknown:
        raise ByollmError(f"unknown PII kind(s) {unknown}: choose from {', '.join(KINDS)}")
    spans = [Span(k, a, b, text[a:b]) for k in kinds if k in DETECTORS for a, b in DETECTORS[k](text)]
    if ner:
        spans += presidio_spans(text)
    return resolve_overlaps(spans)


def redact(text: str, kinds: Iterable[str] | None = None, ner: bool = False) -> tuple[str, list[Span]]:
    """(`text` with every finding replaced by `[KIND]`, the findings with positions in the original text)."""
    findings = detect(text, kinds, ner)
    out, pos = [], 0
    for s in findings:
        out += [text[pos:s.start], f"[{s.kind}]"]
        pos = s.end
    return "".join(out) + text[pos:], findings


# --------------------------------------------------------------------------------------------------
# Evaluation on a labelled set
# --------------------------------------------------------------------------------------------------

def precision_recall(cases: Iterable[tuple[str, list[tuple[str, str]]]]) -> dict[str, dict[str, float]]:
    """Per kind: true/false positives, false negatives, precision and recall of `detect` on labelled cases,
    each `(text, [(kind, exact substring), ...])`. A finding counts only with the right kind and exact span."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for text, gold in cases:
        want = set()
        for kind, value in gold:
            start = text.index(value)
            want.add((kind, start, start + len(value)))
        got = {(s.kind, s.start, s.end) for s in detect(text)}
        for kind, *_ in got & want:
            tp[kind] += 1
        for kind, *_ in got - want:
            fp[kind] += 1
        for kind, *_ in want - got:
            fn[kind] += 1
    table = {}
    for k in sorted(set(tp) | set(fp) | set(fn), key=KINDS.index):
        table[k] = {"tp": tp[k], "fp": fp[k], "fn": fn[k],
                    "precision": tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else 1.0,
                    "recall": tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else 1.0}
    return table


# --------------------------------------------------------------------------------------------------
# Files: byollm data scrub
# --------------------------------------------------------------------------------------------------

def _scrub_value(value: Any, where: str, field: str | None, kinds: list[str] | None,
                 found: list[dict[str, Any]], line: int) -> Any:
    if isinstance(value, str) and field is None:
        red, spans = redact(value, kinds)
        found += [{"line": line, "field": where, "kind": s.kind, "start": s.start, "end": s.end} for s in spans]
        return red
    if isinstance(value, dict):
        return {k: (_scrub_value(v, f"{where}.{k}" if where else k, None, kinds, found, line)
                    if field is None or k == field else v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, f"{where}[{i}]", field, kinds, found, line) for i, v in enumerate(value)]
    return value


def scrub_file(src: str | Path, dst: str | Path, report: str | Path | None = None,
               kinds: list[str] | None = None, field: str | None = None) -> dict[str, Any]:
    """Redact a text file (each line) or a JSONL file (the string `field` of each record, default every string
    field, nested too) into `dst`, written atomically; return (and write to `report`, as JSON) the counts per
    kind and each finding's line, field and character span. The report never holds the removed values."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ByollmError(f"{src}: no such file; give a text or .jsonl file to scrub")
    if kinds is not None:
        detect("", kinds)  # validates the names
    jsonl = src.suffix in (".jsonl", ".ndjson")
    found: list[dict[str, Any]] = []
    out_lines = []
    for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(keepends=True), start=1):
        body, nl = (line[:-1], "\n") if line.endswith("\n") else (line, "")
        if jsonl and body.strip():
            try:
                record = json.loads(body)
            except json.JSONDecodeError as e:
                raise ByollmError(f"{src}:{i}: not valid JSON ({e.msg}); fix the line or scrub it as text") from e
            body = json.dumps(_scrub_value(record, "", field, kinds, found, i), ensure_ascii=False)
        elif not jsonl:
            body = _scrub_value(body, "", None, kinds, found, i)
        out_lines.append(body + nl)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, "".join(out_lines))
    result = {"input": str(src), "output": str(dst), "lines": len(out_lines),
              "counts": dict(sorted(Counter(f["kind"] for f in found).items())), "findings": found}
    if report is not None:
        atomic_write_text(report, json.dumps(result, indent=2) + "\n")
    return result
