"""Retrieved text is data: flag passages that try to act as instructions, and keep citations honest.

OWASP LLM01 (indirect prompt injection): a document in the index can carry text written for the model rather
than the reader ("ignore all previous instructions...", a forged `System:` header, text hidden in zero-width
or Unicode tag characters, a markdown image whose URL would carry the conversation to someone else's server).
Nothing here can make a model immune to such text; what this module does:

- `scan(text)` names the instruction-like patterns a passage contains (`Flag`s). The answer path shows them
  with the source (and `drop_flagged` leaves such passages out of the prompt); the passage itself stays
  inside its delimited data block either way (`byollm.rag.prompt`).
- `strip_hidden(text)` removes characters a reader cannot see (zero-width, bidirectional controls, Unicode
  tags: "ASCII smuggling"), so the model reads what a person reviewing the source would read.
- `parse_citations(answer, n_sources)` finds the `[n]` markers of an answer, keeps those that name a source
  the model was given and reports the others, which `clean_citations` removes from the text.

The patterns are heuristics, tuned to flag what the published attacks write (Greshake et al. 2023, "Not what
you've signed up for"; OWASP's examples) and to stay quiet on ordinary prose: a flag is a signal for a person
or a stricter policy, not a verdict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One instruction-like pattern found in a passage: its kind and the text that matched (shortened)."""

    kind: str  # override | role_header | system_prompt | hidden_text | tool_call | exfiltration
    match: str

    def describe(self) -> str:
        return f"{self.kind}: {self.match!r}"


_I = re.IGNORECASE | re.MULTILINE
_OVERRIDE_OBJECT = r"(?:instructions?|prompts?|rules|directions|guidelines|context|messages?|text|orders)"
PATTERNS: dict[str, list[re.Pattern[str]]] = {
    # "ignore all previous instructions", "disregard the above", "forget your rules", "new instructions:"
    "override": [
        re.compile(r"\b(?:ignore|disregard|forget|override|bypass|skip)\b[^.\n]{0,40}?\b(?:previous|prior|above|"
                   r"earlier|preceding|all|any|your|the system)\b[^.\n]{0,30}?\b" + _OVERRIDE_OBJECT + r"\b", _I),
        re.compile(r"\b(?:new|updated|real|actual|important)\s+instructions?\s*:", _I),
        re.compile(r"\b(?:you are now|from now on,? you|act as (?:an?|the) |pretend (?:to be|you are))", _I),
        re.compile(r"\bdo not (?:tell|inform|mention (?:this )?to) the user\b", _I),
    ],
    # A line that starts like a chat turn: "System:", "### Assistant:", "[INST]", "<|im_start|>", "<<SYS>>"
    "role_header": [
        re.compile(r"^\s*(?:#{1,6}\s*|\*\*|\[|<)?\s*(?:system|assistant|developer|user)\s*(?:\*\*|\]|>)?\s*:", _I),
        re.compile(r"<\|(?:im_start|im_end|system|user|assistant|end|start_header_id|eot_id)\|>|\[/?INST\]|"
                   r"<<\s*/?SYS\s*>>|<start_of_turn>|<end_of_turn>", re.IGNORECASE),
        re.compile(r"</?(?:system|instructions?|assistant)>", re.IGNORECASE),
    ],
    # Asking for the system prompt, or pretending to be one
    "system_prompt": [
        re.compile(r"\b(?:reveal|print|show|repeat|output|display|leak|tell me|give me)\b[^.\n]{0,30}?"
                   r"\b(?:system prompt|initial prompt|hidden prompt|your (?:instructions|prompt|rules))", _I),
        re.compile(r"\b(?:the|your) system prompt (?:is|says|reads)\b", _I),
    ],
    # Tool-call bait: text shaped like a function call the application might execute
    "tool_call": [
        re.compile(r"<\s*/?\s*(?:tool_call|function_call|tool_use|function)\b[^>]*>", re.IGNORECASE),
        re.compile(r"[\"'](?:tool_calls|function_call|arguments)[\"']\s*:", re.IGNORECASE),
        re.compile(r"\b(?:call|invoke|run|execute)\s+(?:the\s+)?(?:tool|function|command|shell|code)\b", _I),
    ],
    # Exfiltration: a URL the model is asked to visit, fetch or render, or one with a slot for the chat's data
    "exfiltration": [
        re.compile(r"!\[[^\]]*\]\(\s*https?://", re.IGNORECASE),  # a markdown image: rendered = fetched
        re.compile(r"\b(?:send|post|upload|forward|submit|visit|fetch|open|load|append|include)\b[^.\n]{0,60}?"
                   r"https?://", _I),
        re.compile(r"https?://\S*(?:\{[^}\s]*\}|\$\w+|<[a-z_]+>|\[[A-Z_]+\])", re.IGNORECASE),
    ],
}

# Characters a reader cannot see: zero-width spaces and joiners, bidirectional controls, word joiner and invisible
# operators, the byte-order mark inside text, and the Unicode tag block (U+E0000-E007F, "ASCII smuggling").
HIDDEN = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f]")
# Hidden markup: HTML comments and text styled not to be seen
HIDDEN_MARKUP = re.compile(r"<!--.*?-->|display\s*:\s*none|font-size\s*:\s*0|visibility\s*:\s*hidden",
                           re.IGNORECASE | re.DOTALL)


def scan(text: str) -> list[Flag]:
    """The instruction-like patterns in `text`, one Flag per (kind, match), in the order of PATTERNS."""
    flags: list[Flag] = []
    seen: set[tuple[str, str]] = set()

    def add(kind: str, match: str) -> None:
        match = " ".join(match.split())[:80]
        if (kind, match) not in seen:
            seen.add((kind, match))
            flags.append(Flag(kind, match))

    for kind, patterns in PATTERNS.items():
        for pattern in patterns:
            for m in pattern.finditer(text):
                add(kind, m.group())
    hidden = HIDDEN.findall(text)
    if hidden:
        add("hidden_text", f"{len(hidden)} invisible character(s), e.g. U+{ord(hidden[0]):04X}")
    for m in HIDDEN_MARKUP.finditer(text):
        add("hidden_text", m.group())
    return flags


def strip_hidden(text: str) -> str:
    """`text` without the characters a reader cannot see (HIDDEN)."""
    return HIDDEN.sub("", text)


# --------------------------------------------------------------------------------------------------
# Citations
# --------------------------------------------------------------------------------------------------

# [1], [2, 3], [1][2], [ 4 ]; not [a], not [1.5], not a markdown link's [text](url)
CITATION = re.compile(r"\[\s*(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\s*\](?!\()")


@dataclass(frozen=True)
class CitationCheck:
    """The [n] markers of an answer: `cited` in order of first appearance (each once), `invalid` those naming no
    source that was given (each once)."""

    cited: list[int]
    invalid: list[int]


def parse_citations(answer: str, n_sources: int) -> CitationCheck:
    """The citations in `answer`, given that sources 1..n_sources were in the prompt."""
    cited: list[int] = []
    invalid: list[int] = []
    for m in CITATION.finditer(answer):
        for part in re.split(r"[,;]", m.group(1)):
            n = int(part)
            bucket = cited if 1 <= n <= n_sources else invalid
            if n not in bucket:
                bucket.append(n)
    return CitationCheck(cited, invalid)


def clean_citations(answer: str, n_sources: int) -> str:
    """`answer` with citations of sources that were not given removed ([2, 9] -> [2]; " [9]" -> nothing)."""

    def keep(m: re.Match[str]) -> str:
        valid = [p.strip() for p in re.split(r"[,;]", m.group(2)) if 1 <= int(p) <= n_sources]
        return f"{m.group(1)}[{', '.join(valid)}]" if valid else ""

    return re.sub(r"([ \t]*)" + CITATION.pattern, keep, answer)


def flag_kinds(flags: Iterable[Flag]) -> list[str]:
    """The distinct kinds among `flags`, in order."""
    return list(dict.fromkeys(f.kind for f in flags))


__all__ = ["CITATION", "HIDDEN", "PATTERNS", "CitationCheck", "Flag", "clean_citations", "flag_kinds",
           "parse_citations", "scan", "strip_hidden"]
