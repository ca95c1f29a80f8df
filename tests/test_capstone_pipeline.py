"""The capstone's stage pipeline: cached by a key of config, code and inputs; --from; resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from byollm.capstone.pipeline import Stage, StageContext, run_pipeline
from byollm.errors import ByollmError

calls: list[str] = []


def make(ctx: StageContext) -> dict:
    calls.append(ctx.name)
    (ctx.dir / "out.txt").write_text(f"{ctx.name}:{ctx.config.get('n', 0)}")
    return {"n": ctx.config.get("n", 0)}


def double(ctx: StageContext) -> dict:
    calls.append(ctx.name)
    upstream = (ctx.inputs["make"] / "out.txt").read_text()
    (ctx.dir / "out.txt").write_text(upstream * 2)
    return {"n2": ctx.results["make"]["n"] * 2}


def stages(n: int = 1, data: Path | None = None) -> list[Stage]:
    return [Stage("make", make, config={"n": n}, files=[data] if data else []),
            Stage("double", double, reads=["make"])]


def test_a_second_run_skips_every_stage_and_a_change_reruns_only_what_depends_on_it(tmp_path: Path) -> None:
    calls.clear()
    data = tmp_path / "data.txt"
    data.write_text("v1")
    first = run_pipeline(stages(1, data), tmp_path / "run", log=lambda _: None)
    assert [r.status for r in first] == ["ran", "ran"] and calls == ["make", "double"]
    assert first[1].figures == {"n2": 2}
    again = run_pipeline(stages(1, data), tmp_path / "run", log=lambda _: None)
    assert [r.status for r in again] == ["cached", "cached"] and calls == ["make", "double"]
    assert again[1].figures == {"n2": 2} and [r.key for r in again] == [r.key for r in first]
    # the config of the first stage: both rerun (the second reads the first)
    changed = run_pipeline(stages(2, data), tmp_path / "run", log=lambda _: None)
    assert [r.status for r in changed] == ["ran", "ran"] and changed[1].figures == {"n2": 4}
    assert (tmp_path / "run" / "double" / "out.txt").read_text() == "make:2make:2"
    # an input file's content
    data.write_text("v2")
    assert [r.status for r in run_pipeline(stages(2, data), tmp_path / "run", log=lambda _: None)] == ["ran", "ran"]
    # the earlier results were moved aside, not deleted
    assert (tmp_path / "run" / "make.stale-1" / "stage.json").exists()


def test_from_reruns_that_stage_and_the_later_ones(tmp_path: Path) -> None:
    run_pipeline(stages(), tmp_path, log=lambda _: None)
    calls.clear()
    assert [r.status for r in run_pipeline(stages(), tmp_path, from_stage="double", log=lambda _: None)] == [
        "cached", "ran"]
    assert calls == ["double"]
    with pytest.raises(ByollmError, match="no such stage; the stages are make, double"):
        run_pipeline(stages(), tmp_path, from_stage="dpo")


def test_the_code_of_a_stage_is_part_of_its_key(tmp_path: Path) -> None:
    run_pipeline(stages(), tmp_path, log=lambda _: None)

    def make(ctx: StageContext) -> dict:  # the same name, another body: a new code version
        (ctx.dir / "out.txt").write_text("new")
        return {"n": 7}

    out = run_pipeline([Stage("make", make, config={"n": 1}), Stage("double", double, reads=["make"])], tmp_path,
                       log=lambda _: None)
    assert [r.status for r in out] == ["ran", "ran"] and out[1].figures == {"n2": 14}


def test_a_stage_must_read_an_earlier_stage() -> None:
    with pytest.raises(ByollmError, match="reads make, which is not an earlier stage"):
        run_pipeline([Stage("double", double, reads=["make"]), Stage("make", make)], "unused")


SCRIPT = """
import json, sys, time
from pathlib import Path
from byollm.capstone.pipeline import Stage, run_pipeline

def first(ctx):
    (ctx.dir / "a.txt").write_text("a")
    return {}

def slow(ctx):  # a "training" stage: one step a tick, a checkpoint after each, resumes from the last
    ckpt = ctx.dir / "step.txt"
    start = int(ckpt.read_text()) if ckpt.exists() else 0
    for step in range(start, 20):
        time.sleep(0.05)
        (ctx.dir / "step.tmp").write_text(str(step + 1))
        (ctx.dir / "step.tmp").replace(ckpt)  # atomic, as a checkpoint is
    return {"resumed_from": start}

run_pipeline([Stage("first", first), Stage("slow", slow, reads=["first"])], sys.argv[1])
"""


def test_a_killed_run_resumes_the_interrupted_stage_where_it_stopped(tmp_path: Path) -> None:
    script = tmp_path / "pipe.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.DEVNULL)
    step = out / "slow" / "step.txt"
    deadline = time.monotonic() + 60
    while not (step.exists() and int(step.read_text()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "the stage never got going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-stage: no chance to clean up
    proc.wait()
    killed_at = int(step.read_text())
    assert 3 <= killed_at < 20 and not (out / "slow" / "stage.json").exists()
    done = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "first: cached" in done.stdout and "slow: resuming" in done.stdout
    record = json.loads((out / "slow" / "stage.json").read_text())
    assert record["figures"]["resumed_from"] == killed_at and step.read_text() == "20"


def test_a_size_field_changes_only_the_keys_of_the_stages_that_read_it_and_those_after_them(tmp_path: Path) -> None:
    import dataclasses

    from byollm.capstone import scratch
    from byollm.capstone.pipeline import stage_key

    def keys(sizes: scratch.Sizes) -> dict[str, str]:
        saved = scratch.SIZES["cpu"]
        scratch.SIZES["cpu"] = sizes
        try:
            out: dict[str, str] = {}
            for stage in scratch.scratch_stages("cpu", docs=tmp_path):
                out[stage.name] = stage_key(stage, out)
            return out
        finally:
            scratch.SIZES["cpu"] = saved

    base = keys(scratch.Sizes())
    more_sft = keys(dataclasses.replace(scratch.Sizes(), sft_steps=301))
    changed = {name for name in base if base[name] != more_sft[name]}
    # sft reruns, and what reads it directly or through dpo; data, pretrain, safety's config and the index do not
    assert changed == {"sft", "dpo", "judge", "evaluate", "safety", "export"}
    quick_safety = keys(dataclasses.replace(scratch.Sizes(), safety_quick=True))
    assert {name for name in base if base[name] != quick_safety[name]} == {"safety", "export"}
