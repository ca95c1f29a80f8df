"""Instruction and preference data: records -> conversations (messages) -> tokenised training examples.

Three steps, each small:

1. **Records -> messages** (converters). A conversation is a list of {"role", "content"} messages with roles
   system / user / assistant (byollm.tokenizer.chat_template):
   - Alpaca {instruction, input, output}: user = instruction, plus "\\n\\n" + input when input is not empty;
     assistant = output.
   - HH-RLHF transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...": Human -> user, Assistant -> assistant, each
     message's text stripped of surrounding whitespace. A {chosen, rejected} pair of transcripts becomes a
     `PreferencePair`: the prompt is the messages before the last assistant reply (they must be the same in
     both transcripts), chosen/rejected are the two last replies.
   - Generic JSON/JSONL: {"messages": [...]} for SFT; {"prompt" | "messages", "chosen", "rejected"} for
     preferences, where the prompt is a string (one user message) or a list of messages, and chosen/rejected
     are strings or TRL's conversational form ([{"role": "assistant", "content": ...}]).
2. **Held-out split** (`load_conversations`, `load_pairs`): records are split *before* conversion, by
   `byollm.data.split_records(n, val_fraction, seed)`: val = the first round(n * val_fraction) entries of
   numpy.random.default_rng(seed).permutation(n). Defaults: val_fraction=0.1, seed=0 (VAL_FRACTION, SPLIT_SEED);
   so alpaca_4500.json holds out 450 records and hh_rlhf_harmless_2000.jsonl 200 pairs, whatever the tokenizer.
3. **Messages -> ids** (`sft_examples`, `preference_examples`), the format the objectives consume, in the
   tokenizer's chat format (`byollm.tokenizer.chat_format`: byollm's template once `add_chat_tokens` ran, or an
   imported model's own Jinja template such as ChatML, whose tokens are then used and none of ours added):
   - SFT: {"input_ids": list[int], "labels": list[int]}, same length, labels -100 except on assistant
     replies and their end-of-turn token (<|end|>, <|im_end|>, ...; ChatFormat.encode_chat; not shifted).
   - Preference: {"prompt_ids", "chosen_ids", "rejected_ids"}: prompt_ids ends with the assistant header,
     chosen/rejected are the reply tokens including the closing end-of-turn token.

Bad data is never dropped silently. A record of the wrong *shape* (not an object, a missing or non-string
field, an unknown role, a transcript without Human/Assistant turns) raises `DataError` naming the record.
A record that is well formed but unusable is skipped and *counted* in a `DataReport`, which is logged and
returned: an empty reply, chosen identical to rejected, HH transcripts whose prompts differ, a control token
inside the text, or a sample longer than max_len tokens. Truncation policy: an SFT conversation longer than
max_len is skipped (cutting it would cut the reply or its <|end|>); a preference pair keeps both whole
replies and cuts the prompt from the left (counted as truncated) as long as at least `min_prompt_len` prompt
tokens remain, else it is skipped. strict=True turns every skip into a DataError instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byollm.data.readers import load_records, split_records
from byollm.errors import DataError, TokenizerError
from byollm.tokenizer.base import Tokenizer
from byollm.tokenizer.chat_format import chat_format
from byollm.tokenizer.chat_template import ROLES, Message, check_messages

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.1
SPLIT_SEED = 0

# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """One SFT conversation; `index` is its record's position in the source file (for reports and errors)."""

    messages: list[dict[str, str]]
    index: int | None = None


@dataclass
class PreferencePair:
    """A prompt (messages before the reply) with a preferred and a dispreferred assistant reply."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    index: int | None = None


@dataclass
class DataReport:
    """What happened to each record: how many were used, which were skipped and why, which were truncated.

    str(report) is one line, e.g.
    "skipped 12 of 2000 pairs: 7 over-long (> 512 tokens), 5 identical chosen/rejected (records 3, 17, ...)".
    """

    what: str = "records"  # "pairs" or "conversations"
    total: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> record indices
    truncated: list[int] = field(default_factory=list)  # records whose prompt was cut from the left
    source: str = ""
    strict: bool = False

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def kept(self) -> int:
        return self.total - self.n_skipped

    def skip(self, index: int, reason: str) -> None:
        """Count record `index` as skipped for `reason` (strict: raise DataError instead)."""
        if self.strict:
            where = f"{self.source}: " if self.source else ""
            raise DataError(f"{where}record {index}: {reason} (strict=True; fix or remove the record)")
        self.skipped.setdefault(reason, []).append(index)

    def __str__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        if not self.n_skipped:
            text = f"kept all {self.total} {self.what}{where}"
        else:
            parts = []
            for reason, idx in sorted(self.skipped.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(map(str, idx[:3])) + (", ..." if len(idx) > 3 else "")
                parts.append(f"{len(idx)} {reason} [record{'s' if len(idx) > 1 else ''} {shown}]")
            text = f"skipped {self.n_skipped} of {self.total} {self.what}{where}: " + ", ".join(parts)
        if self.truncated:
            text += f"; {len(self.truncated)} prompts cut from the left to fit"
        return text

    def log(self) -> None:
        (logger.warning if self.n_skipped else logger.info)(str(self))


# --------------------------------------------------------------------------------------------------
# Records -> messages
# --------------------------------------------------------------------------------------------------


def _field(record: Any, name: str, index: int, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}record {index} is a {type(record).__name__}, expected a JSON object")
    if name not in record:
        raise DataError(f"{where}record {index} has no field {name!r} (it has {sorted(record)})")
    if not isinstance(record[name], kinds):
        names = " or ".join({list: "list", str: "string"}.get(k, "object") for k in kinds)
        raise DataError(f"{where}record {index}: field {name!r} is a {type(record[name]).__name__}, expected a {names}")
    return record[name]


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def alpaca_to_messages(record: Mapping[str, Any], index: int = 0, source: str = "") -> list[dict[str, str]]:
    """Alpaca {instruction, input, output} -> [user, assistant]; the input follows the instruction after a
    blank line when it is not empty (input may be absent)."""
    w = _where(source)
    instruction = _field(record, "instruction", index, w)
    output = _field(record, "output", index, w)
    extra = _field(record, "input", index, w) if "input" in record else ""
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_to_messages(transcript: str, index: int = 0, source: str = "") -> list[dict[str, str]]:
    """An HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." -> [user, assistant, ...] (texts stripped)."""
    parts = _HH_TURN.split(transcript)
    # re.split with one group: [before, speaker, text, speaker, text, ...]
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{_where(source)}record {index} is not an HH-RLHF transcript: expected it to start with "
                        f"'\\n\\nHuman:' and to hold Human/Assistant turns, got {transcript[:60]!r}")
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[s], "content": t.strip()} for s, t in zip(parts[1::2], parts[2::2], strict=True)]


def _is_hh(text: Any) -> bool:
    return isinstance(text, str) and text.lstrip(" ").startswith("\n\nHuman:")


def _messages(value: Any, index: int, where: str, name: str) -> list[dict[str, str]]:
    try:
        return [dict(m) for m in check_messages(value)]
    except TokenizerError as e:
        if "control token" in str(e):
            raise
        raise DataError(f"{where}record {index}: field {name!r}: {e}") from None


def _reply(value: Any, index: int, where: str, name: str) -> str:
    """chosen/rejected as a string, or TRL's [{"role": "assistant", "content": ...}] (or one such message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    msgs = _messages(value, index, where, name) if isinstance(value, list) else None
    if not msgs or len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}record {index}: field {name!r} must be a string or one assistant message, "
                        f"got {value!r:.80}")
    return msgs[0]["content"]


def record_to_conversation(record: Any, index: int = 0, source: str = "") -> list[dict[str, str]]:
    """Any supported SFT record -> messages: {"messages": [...]}, Alpaca, or an HH {"chosen"} transcript."""
    w = _where(source)
    if isinstance(record, Mapping) and "messages" in record:
        return _messages(_field(record, "messages", index, w, (list,)), index, w, "messages")
    if isinstance(record, Mapping) and "instruction" in record:
        return alpaca_to_messages(record, index, source)
    if isinstance(record, Mapping) and _is_hh(record.get("chosen")):
        return hh_to_messages(record["chosen"], index, source)
    shown = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise DataError(f"{w}record {index} ({shown}) is not an SFT record: expected 'messages' (a list of "
                    "{role, content}), Alpaca's instruction/input/output, or an HH-RLHF 'chosen' transcript")


def record_to_pair(record: Any, index: int = 0, source: str = "") -> PreferencePair | str:
    """Any supported preference record -> a PreferencePair, or a reason string when it is well formed but
    unusable (HH transcripts whose turns before the last reply differ, or that do not end in a reply)."""
    w = _where(source)
    chosen = _field(record, "chosen", index, w, (str, list, Mapping))
    rejected = _field(record, "rejected", index, w, (str, list, Mapping))
    if "prompt" in record or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt = _field(record, key, index, w, (str, list))
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, index, w, key)
        if not msgs:
            raise DataError(f"{w}record {index}: field {key!r} is empty; a preference pair needs a prompt")
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{w}record {index}: the prompt ends with an assistant message; it should end with "
                            "the user's turn that chosen/rejected answer")
        return PreferencePair(msgs, _reply(chosen, index, w, "chosen"), _reply(rejected, index, w, "rejected"), index)
    if _is_hh(chosen) and _is_hh(rejected):
        c, r = hh_to_messages(chosen, index, source), hh_to_messages(rejected, index, source)
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return "whose transcript does not end with an assistant reply"
        if c[:-1] != r[:-1]:
            return "whose chosen/rejected differ before the last reply"
        if not c[:-1]:
            return "no prompt before the reply"
        return PreferencePair(c[:-1], c[-1]["content"], r[-1]["content"], index)
    raise DataError(f"{w}record {index} is not a preference record: expected 'prompt' (or 'messages') with "
                    "'chosen'/'rejected' replies, or HH-RLHF 'chosen'/'rejected' transcripts ('\\n\\nHuman: ...')")


def to_conversations(records: Sequence[Any], *, indices: Iterable[int] | None = None, source: str = "",
                     strict: bool = False) -> tuple[list[Conversation], DataReport]:
    """Convert SFT records (all, or those at `indices`) into Conversations, with a DataReport."""
    idx = list(range(len(records))) if indices is None else [int(i) for i in indices]
    report = DataReport("conversations", len(idx), source=source, strict=strict)
    out = []
    for i in idx:
        try:
            out.append(Conversation(record_to_conversation(records[i], i, source), i))
        except TokenizerError as e:  # a control token inside the text
            report.skip(i, _control_reason(e))
    return out, report


def to_pairs(records: Sequence[Any], *, indices: Iterable[int] | None = None, source: str = "",
             strict: bool = False) -> tuple[list[PreferencePair], DataReport]:
    """Convert preference records (all, or those at `indices`) into PreferencePairs, with a DataReport."""
    idx = list(range(len(records))) if indices is None else [int(i) for i in indices]
    report = DataReport("pairs", len(idx), source=source, strict=strict)
    out = []
    for i in idx:
        try:
            pair = record_to_pair(records[i], i, source)
        except TokenizerError as e:
            report.skip(i, _control_reason(e))
            continue
        if isinstance(pair, str):
            report.skip(i, pair)
        else:
            out.append(pair)
    return out, report


def _control_reason(e: Exception) -> str:
    return "with a chat control token in the text" if "control token" in str(e) else str(e)


# --------------------------------------------------------------------------------------------------
# Loading with the held-out split
# --------------------------------------------------------------------------------------------------


def _split_indices(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    if split == "all":
        return list(range(n))
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train', 'val' or 'all', got {split!r}")
    train, val = split_records(n, val_fraction, seed)
    return (train if split == "train" else val).tolist()


def load_conversations(name_or_path: str | Path, *, split: str = "train", val_fraction: float = VAL_FRACTION,
                       seed: int = SPLIT_SEED, path: str | Path | None = None, allow_download: bool = True,
                       strict: bool = False) -> tuple[list[Conversation], DataReport]:
    """SFT conversations from a registry dataset (e.g. "alpaca", through the mirror/cache/download) or a
    JSON/JSONL file; split "train", "val" (held out, see the module docstring) or "all"."""
    records = load_records(name_or_path, path=path, allow_download=allow_download)
    idx = _split_indices(len(records), split, val_fraction, seed)
    return to_conversations(records, indices=idx, source=f"{Path(str(name_or_path)).name} ({split})", strict=strict)


def load_pairs(name_or_path: str | Path, *, split: str = "train", val_fraction: float = VAL_FRACTION,
               seed: int = SPLIT_SEED, path: str | Path | None = None, allow_download: bool = True,
               strict: bool = False) -> tuple[list[PreferencePair], DataReport]:
    """Preference pairs from a registry dataset (e.g. "hh-rlhf") or a JSON/JSONL file; split as above."""
    records = load_records(name_or_path, path=path, allow_download=allow_download)
    idx = _split_indices(len(records), split, val_fraction, seed)
    return to_pairs(records, indices=idx, source=f"{Path(str(name_or_path)).name} ({split})", strict=strict)


# --------------------------------------------------------------------------------------------------
# Messages -> token ids
# --------------------------------------------------------------------------------------------------


def _new_report(what: str, n: int, report: DataReport | None, strict: bool) -> DataReport:
    if report is None:
        return DataReport(what, n, strict=strict)
    report.strict = report.strict or strict
    return report


def sft_examples(tok: Tokenizer, conversations: Iterable[Conversation | Sequence[Message]], max_len: int, *,
                 report: DataReport | None = None, strict: bool = False) -> tuple[list[dict[str, list[int]]],
                                                                                 DataReport]:
    """Tokenise conversations into {"input_ids", "labels"} (the tokenizer's ChatFormat.encode_chat), at most
    max_len tokens each.

    Skipped and counted: no assistant reply, an empty assistant reply, more than max_len tokens.
    report: continue the DataReport of load_conversations (its total and indices refer to the file's records).
    """
    fmt = chat_format(tok)
    conversations = list(conversations)
    report = _new_report("conversations", len(conversations), report, strict)
    out = []
    for pos, conv in enumerate(conversations):
        msgs, i = (conv.messages, conv.index) if isinstance(conv, Conversation) else (conv, None)
        i = pos if i is None else i
        try:
            msgs = fmt.check_messages(msgs)
        except TokenizerError as e:
            if "control token" not in str(e):
                raise DataError(f"conversation {i}: {e}") from None
            report.skip(i, _control_reason(e))
            continue
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not replies:
            report.skip(i, "with no assistant reply")
            continue
        if any(not r.strip() for r in replies):
            report.skip(i, "with an empty assistant reply")
            continue
        ids, labels = fmt.encode_chat(msgs)
        if len(ids) > max_len:
            report.skip(i, f"over-long (> {max_len} tokens)")
            continue
        out.append({"input_ids": ids, "labels": labels})
    report.log()
    return out, report


def preference_examples(tok: Tokenizer, pairs: Iterable[PreferencePair], max_len: int, *,
                        min_prompt_len: int | None = None, report: DataReport | None = None,
                        strict: bool = False) -> tuple[list[dict[str, list[int]]], DataReport]:
    """Tokenise pairs into {"prompt_ids", "chosen_ids", "rejected_ids"}; prompt + longer reply <= max_len.

    Both replies are kept whole (with their end-of-turn token). A prompt that does not fit is cut from the left (its
    newest tokens and the assistant header kept; counted in report.truncated) if at least min_prompt_len
    (default max_len // 4) of its tokens remain; otherwise the pair is skipped as over-long.
    Skipped and counted as well: an empty chosen or rejected reply, chosen identical to rejected.
    """
    fmt = chat_format(tok)
    pairs = list(pairs)
    report = _new_report("pairs", len(pairs), report, strict)
    keep_prompt = max(1, max_len // 4 if min_prompt_len is None else min_prompt_len)
    out = []
    for pos, pair in enumerate(pairs):
        i = pos if pair.index is None else pair.index
        if not isinstance(pair.chosen, str) or not isinstance(pair.rejected, str):
            raise DataError(f"pair {i}: chosen and rejected must be strings")
        if not pair.chosen.strip() or not pair.rejected.strip():
            report.skip(i, "with an empty chosen/rejected reply")
            continue
        if pair.chosen.strip() == pair.rejected.strip():
            report.skip(i, "with identical chosen/rejected")
            continue
        last = pair.prompt[-1] if pair.prompt else None
        if last is None or (isinstance(last, Mapping) and last.get("role") == "assistant"):
            raise DataError(f"pair {i}: the prompt must be messages ending with a user (or system) turn")
        try:
            prompt = fmt.encode_prompt(pair.prompt)
            chosen = fmt.encode_response(pair.prompt, pair.chosen)
            rejected = fmt.encode_response(pair.prompt, pair.rejected)
        except TokenizerError as e:
            if "control token" not in str(e):
                raise DataError(f"pair {i}: {e}") from None
            report.skip(i, _control_reason(e))
            continue
        room = max_len - max(len(chosen), len(rejected))
        if len(prompt) > room:
            if room < min(keep_prompt, len(prompt)):
                report.skip(i, f"over-long (> {max_len} tokens)")
                continue
            prompt = prompt[-room:]
            report.truncated.append(i)
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    report.log()
    return out, report


__all__ = [
    "ROLES", "SPLIT_SEED", "VAL_FRACTION", "Conversation", "DataReport", "PreferencePair", "alpaca_to_messages",
    "hh_to_messages", "load_conversations", "load_pairs", "preference_examples", "record_to_conversation",
    "record_to_pair", "sft_examples", "to_conversations", "to_pairs",
]
