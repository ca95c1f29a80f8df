"""`byollm capstone --size tiny` end to end: every stage runs, the report is written, the served model answers a
RAG request, and a second run skips every stage. (The pipeline's caching and resume-after-kill are tested on toy
stages in test_capstone_pipeline.py; the held-out split's properties here.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

from byollm.capstone.data import first_human_turn, split_by_prompt
from byollm.cli import main


def test_split_by_prompt_keeps_every_prompt_on_one_side_and_drops_duplicate_pairs() -> None:
    def rec(q: str, a: str) -> dict:
        return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: no"}

    records = [rec(f"question {i % 7}", f"answer {i}") for i in range(40)]
    records += [records[3], rec("Question  0", "answer 41")]  # an exact duplicate; a case/space variant of a prompt
    parts = split_by_prompt(records, {"heldout": 0.3, "policy": 0.7}, seed=0)
    sides = {name: {first_human_turn(r["chosen"]) for r in rs} for name, rs in parts.items()}
    assert not sides["heldout"] & sides["policy"] and sides["heldout"] and sides["policy"]
    assert sum(len(rs) for rs in parts.values()) == 41 and len(set().union(*sides.values())) == 7
    assert parts == split_by_prompt(records, {"heldout": 0.3, "policy": 0.7}, seed=0)  # seeded


def test_capstone_tiny_runs_every_stage_reports_serves_and_then_skips_all(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "kv.md").write_text("# The KV cache\n\nA KV cache stores the keys and values of earlier tokens, so each "
                                "new token attends to them without recomputing them: generation gets faster.\n")
    out = tmp_path / "capstone"
    assert main(["capstone", "--size", "tiny", "--out", str(out), "--docs", str(docs)]) == 0
    track = out / "scratch"
    report = json.loads((track / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ran"] * 10
    assert report["figures"]["data"]["heldout_prompts_seen_in_training"] == 0
    served = report["figures"]["served"]
    assert served["status"] == 200 and served["sources"] == ["kv > The KV cache"]
    md, page = (track / "report.md").read_text(), (track / "report.html").read_text()
    assert "win rate vs the starting model" in md and "curves.png" in md and "<table>" in page
    assert (track / "export" / "model.gguf").stat().st_size > 0 and (track / "export" / "hf" / "README.md").exists()
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["capstone", "--size", "tiny", "--out", str(out), "--docs", str(docs)]) == 0
    assert time.perf_counter() - t0 < 60
    assert "0 stage(s) ran (none), 10 cached" in capsys.readouterr().out
    again = json.loads((track / "report.json").read_text())
    assert [s["status"] for s in again["stages"]] == ["cached"] * 10 and again["previous"] == report["headlines"]
