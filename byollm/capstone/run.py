"""`byollm capstone`: one command from data to a served, evaluated, safety-checked chat assistant.

    byollm capstone                          # the from-scratch track at the CPU size (see docs/section_8_capstone.md)
    byollm capstone --size tiny              # the same stages in seconds (tests)
    byollm capstone --from dpo               # rerun DPO and everything after it
    byollm capstone --serve                  # then serve the result (chat page at http://127.0.0.1:8000/)

Stages are cached (byollm.capstone.pipeline): a second run skips every finished stage whose config, code and
inputs did not change, and an interrupted run resumes. The report is rewritten at the end of every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from byollm.capstone.pipeline import Stage, StageContext, StageResult, run_pipeline
from byollm.capstone.report import write_report
from byollm.errors import ByollmError

TRACKS = ("scratch", "smollm2")
QUESTION = "What does a KV cache store, and why does it make generation faster?"


def stage_served(ctx: StageContext) -> dict[str, Any]:
    """The exported model behind `byollm serve` with the guide's RAG index: one question, answered with sources."""
    import urllib.error
    import urllib.request

    from byollm.safety.report import served

    ckpt, index = ctx.inputs["dpo"] / "run", ctx.inputs["rag"] / "index"
    request = {"model": "model", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
               "max_tokens": ctx.config["max_tokens"], "k": ctx.config["k"], "min_score": -1}
    with served(ckpt, ctx.dir / "server.log", guardrails="on", extra_args=["--rag_index", str(index)]) as url:
        post = urllib.request.Request(f"{url}/rag/chat", data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(post, timeout=300) as r:
                status, body = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ByollmError(f"capstone: the served model refused the check question ({e.code}): "
                              f"{e.read().decode(errors='replace')}") from None
    (ctx.dir / "answer.json").write_text(json.dumps(body, indent=2))
    rag = body["rag"]
    return {"question": QUESTION, "answer": body["choices"][0]["message"]["content"],
            "sources": [s.get("title") or s.get("source") for s in rag["sources"]],
            "citations": [c["n"] for c in rag["citations"]], "status": status}


def track_stages(track: str, size: str, docs: Path) -> list[Stage]:
    if track not in TRACKS:
        raise ByollmError(f"capstone: unknown track {track!r}; the tracks are {', '.join(TRACKS)}")
    if track == "scratch":
        from byollm.capstone.scratch import SIZES
        from byollm.capstone.scratch import scratch_stages as stages_of
    else:
        from byollm.capstone.smollm2 import SIZES
        from byollm.capstone.smollm2 import smollm2_stages as stages_of
    if size not in SIZES:
        raise ByollmError(f"capstone: unknown size {size!r}; the sizes are {', '.join(SIZES)}")
    if not docs.is_dir():
        raise ByollmError(f"capstone: the documents to index, {docs}, are not a folder; pass --docs DIR")
    if SIZES[size].device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ByollmError(f"capstone --size {size} needs a CUDA GPU; use --size cpu on this machine")
    stages = stages_of(size, docs)
    check = {"question": QUESTION, "k": SIZES[size].check_k, "max_tokens": SIZES[size].check_tokens}
    return [*stages, Stage("served", stage_served, reads=["dpo", "rag"], config=check,
                           describe="byollm serve + RAG: one question answered with sources")]


def capstone(track: str = "scratch", size: str = "cpu", out: str | Path = "runs/capstone", docs: str | Path = "docs",
             from_stage: str | None = None, until: str | None = None) -> tuple[list[StageResult], Path]:
    """Run (or resume) the track's stages under out/TRACK and write the report; returns (results, report.md)."""
    from byollm.train.run import run_meta

    track_dir = Path(out) / track
    stages = track_stages(track, size, Path(docs))
    results = run_pipeline(stages, track_dir, from_stage=from_stage, until=until,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    import torch

    environment = run_meta(0, torch.device("cpu"), {"track": track, "size": size})
    report = write_report(results, track_dir, track=track, size=size, environment=environment)
    return results, report
