"""The capstone's data stage: the pretraining mix and HH-RLHF pairs split so that held-out prompts are unseen.

Section 2 splits HH-RLHF by record, so the same first human turn (many HH dialogues start with the same question)
can sit on both sides: a model that memorised an answer to a training prompt then looks good on "held-out" pairs.
Here the split is by **prompt**: pairs are grouped by their first human turn (whitespace and case folded), exact
duplicate pairs are dropped, and whole groups go to one of three parts:

    policy   the pairs preference tuning (DPO) trains on
    judge    the pairs the judge (a reward model) trains on: it never saw the policy's pairs
    heldout  the pairs both are measured on: their prompts occur in neither training part

Group order is a seeded permutation, so the split is the same on every machine. The stage also writes the SFT
data: Alpaca and grounded RAG examples (byollm.capstone.grounded), split from their held-out part by paragraph.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from byollm.data import resolve
from byollm.data.instruct import SPLIT_SEED, VAL_FRACTION
from byollm.data.readers import load_records, record_to_text, source_text, split_records

_FIRST_HUMAN = re.compile(r"^\s*Human:\s*(.*?)\s*(?:\n\nAssistant:|$)", re.S)


def first_human_turn(transcript: str) -> str:
    """The first human turn of an HH dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ..."), case and spacing folded."""
    m = _FIRST_HUMAN.match(transcript)
    text = m.group(1) if m else transcript
    return " ".join(text.split()).lower()


def split_by_prompt(records: list[dict[str, Any]], fractions: dict[str, float], seed: int = SPLIT_SEED
                    ) -> dict[str, list[dict[str, Any]]]:
    """Deduplicated records grouped by first human turn, the groups dealt to the parts of `fractions` (shares of
    the groups, the last part takes the rest) in a seeded random order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    for r in records:
        pair = (r["chosen"], r["rejected"])
        if pair in seen:
            continue
        seen.add(pair)
        groups.setdefault(first_human_turn(r["chosen"]), []).append(r)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    names = list(fractions)
    parts: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    start = 0
    for i, name in enumerate(names):
        stop = len(keys) if i == len(names) - 1 else start + round(fractions[name] * len(keys))
        for j in order[start:stop]:
            parts[name].extend(groups[keys[j]])
        start = stop
    return parts


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def prepare_data(out: Path, *, shakespeare_chars: int | None, alpaca_limit: int | None, hh_limit: int | None,
                 judge_fraction: float, heldout_fraction: float, grounded_k: int, chunk_tokens: int | None,
                 seed: int = SPLIT_SEED) -> dict[str, Any]:
    """Write out/mix.txt (pretraining text), out/hh_{policy,judge,heldout}.jsonl, out/sft.jsonl (Alpaca and the
    grounded examples of byollm.capstone.grounded), out/dpo.jsonl (the policy pairs and grounded pairs) and
    out/grounded_heldout.jsonl; return the counts."""
    from byollm.capstone.grounded import build_grounded, grounded_pairs

    hh = load_records("hh-rlhf")[:hh_limit]
    parts = split_by_prompt(hh, {"heldout": heldout_fraction, "judge": judge_fraction,
                                 "policy": 1 - heldout_fraction - judge_fraction}, seed)
    for name, records in parts.items():
        write_jsonl(out / f"hh_{name}.jsonl", records)
    prompts = {name: {first_human_turn(r["chosen"]) for r in records} for name, records in parts.items()}
    overlap = len(prompts["heldout"] & (prompts["policy"] | prompts["judge"]))
    # SFT data: Alpaca, then the grounded examples of the SQuAD paragraphs not held out (their held-out
    # paragraphs go to grounded_heldout.jsonl, for the evaluate stage only).
    alpaca = load_records("alpaca")
    grounded, grounded_heldout = build_grounded(resolve("squad").path, k=grounded_k, chunk_tokens=chunk_tokens,
                                                heldout_fraction=0.2, seed=seed)
    sft = [*alpaca, *grounded]
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "grounded_heldout.jsonl", grounded_heldout)
    # DPO data (scratch track): the policy pairs and grounded pairs that keep the citing through DPO
    dpo_grounded = grounded_pairs(grounded, seed)
    write_jsonl(out / "dpo.jsonl", parts["policy"] + dpo_grounded)
    # Pretraining text: Tiny Shakespeare, the Alpaca records of the SFT recipe's training split (the split it
    # makes of sft.jsonl, so its held-out loss is honest) and the chosen dialogues of the policy and judge pairs
    # (never a held-out prompt).
    train_idx, _ = split_records(len(sft), VAL_FRACTION, SPLIT_SEED)
    alpaca_train = [i for i in train_idx.tolist() if i < len(alpaca)]
    texts = {
        "tinyshakespeare": source_text(resolve("tinyshakespeare"))[:shakespeare_chars],
        "alpaca": "\n\n".join(record_to_text(alpaca[i]) for i in alpaca_train[:alpaca_limit]),
        "hh-rlhf": "\n\n".join(r["chosen"].strip() for r in parts["policy"] + parts["judge"]),
    }
    (out / "mix.txt").write_text("\n\n".join(texts.values()) + "\n", encoding="utf-8")
    return {"pairs": {name: len(records) for name, records in parts.items()},
            "prompts": {name: len(p) for name, p in prompts.items()},
            "duplicates_dropped": len(hh) - sum(len(r) for r in parts.values()),
            "heldout_prompts_seen_in_training": overlap, "mix_chars": {k: len(v) for k, v in texts.items()},
            "sft_records": {"alpaca": len(alpaca), "grounded": len(grounded)},
            "dpo_pairs": {"hh_policy": len(parts["policy"]), "grounded": len(dpo_grounded)},
            "grounded_heldout": len(grounded_heldout)}
