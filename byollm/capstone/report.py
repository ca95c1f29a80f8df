"""The capstone's run report: report.md, report.html and report.json, in the spirit of nanochat's report card.

One page per run: every stage's status and time, the headline figures (losses, held-out preference accuracy on
unseen prompts, win rate, bias, toxicity, red team), plots (training curves, DPO's implicit rewards, bias per
category), the environment (versions, hardware, git commit), the comparison with the previous run in the same
folder and with the other track's latest report beside it. Regenerated from the stages' stage.json files on
every run (it is not a stage: it costs a fraction of a second and always says what the folder holds now).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from byollm.atomic import atomic_write_text
from byollm.capstone.pipeline import StageResult

# (label, path into the figures of a stage, how to show it, higher is better?)
HEADLINES: list[tuple[str, tuple[str, ...], str, bool | None]] = [
    ("pretraining val loss", ("pretrain", "val_loss"), "{:.3f}", False),
    ("pretraining tokens/s", ("pretrain", "tokens_per_s"), "{:,.0f}", True),
    ("SFT held-out loss, base", ("sft", "before", "loss"), "{:.3f}", False),
    ("SFT held-out loss, after SFT", ("sft", "after", "loss"), "{:.3f}", False),
    ("DPO implicit-reward accuracy, recipe's own split", ("dpo", "after", "accuracy"), "{:.1%}", True),
    ("DPO implicit-reward accuracy, unseen prompts", ("evaluate", "preference", "implicit_reward_accuracy"),
     "{:.1%}", True),
    ("ranking accuracy, unseen prompts, tuned", ("evaluate", "preference", "ranking_accuracy"), "{:.1%}", True),
    ("ranking accuracy, unseen prompts, start", ("evaluate", "preference", "ranking_accuracy_reference"), "{:.1%}",
     True),
    ("held-out pairs", ("evaluate", "preference", "pairs"), "{:,}", None),
    ("judge's held-out accuracy", ("evaluate", "judge_held_out_accuracy"), "{:.1%}", True),
    ("win rate vs the starting model", ("evaluate", "win_rate", "win_rate"), "{:.1%}", True),
    ("grounded questions on unseen paragraphs: cites a source, start", ("evaluate", "grounded", "start",
                                                                         "cites_a_source"), "{:.1%}", True),
    ("grounded: cites a source, tuned", ("evaluate", "grounded", "tuned", "cites_a_source"), "{:.1%}", True),
    ("grounded: cites the right source, tuned", ("evaluate", "grounded", "tuned", "cites_the_right_source"),
     "{:.1%}", True),
    ("grounded: answer in the reply, tuned", ("evaluate", "grounded", "tuned", "answer_in_reply"), "{:.1%}", True),
    ("grounded: says it does not know when the sources do not say, tuned",
     ("evaluate", "grounded", "tuned", "abstains_when_unanswerable"), "{:.1%}", True),
    ("grounded: says it does not know when they do, tuned",
     ("evaluate", "grounded", "tuned", "abstains_when_answerable"), "{:.1%}", False),
    ("CrowS-Pairs % stereotype (50 = no preference)", ("safety", "bias", "pct_stereotype"), "{:.1f}", None),
    ("red team: harmful-request success", ("safety", "redteam", "attack_success_rate", "harmful"), "{:.1%}", False),
    ("red team: over-refusal", ("safety", "redteam", "over_refusal_rate"), "{:.1%}", False),
    ("GGUF size (bytes)", ("export", "gguf_bytes"), "{:,}", None),
]


def _get(figures: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _read_events(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def plot_curves(track_dir: Path) -> Path | None:
    """Training loss of pretraining, SFT and DPO, and DPO's implicit rewards, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def events(stage: str) -> list[dict[str, Any]]:  # a stage's training run: run/ (full) or train/lora/ (LoRA)
        found = sorted((track_dir / stage).glob("**/metrics.jsonl")) if (track_dir / stage).is_dir() else []
        return _read_events(found[0]) if found else []

    runs = {name: events(name) for name in ("pretrain", "sft", "dpo")}
    if not any(runs.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, events in runs.items():
        train = [e for e in events if e.get("event") == "train" and "loss" in e]
        if train:
            axes[0].plot([e["step"] for e in train], [e["loss"] for e in train], label=name)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[0].legend()
    dpo = [e for e in runs["dpo"] if e.get("event") == "train" and "rewards/chosen" in e]
    if dpo:
        steps = [e["step"] for e in dpo]
        axes[1].plot(steps, [e["rewards/chosen"] for e in dpo], label="chosen")
        axes[1].plot(steps, [e["rewards/rejected"] for e in dpo], label="rejected")
        axes[1].plot(steps, [e["margin"] for e in dpo], label="margin", linestyle="--")
        axes[1].legend()
    axes[1].set(title="DPO implicit rewards (beta x log-ratio to the start)", xlabel="step")
    fig.tight_layout()
    path = track_dir / "curves.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def build_report(results: list[StageResult], track_dir: Path, *, track: str, size: str,
                 environment: dict[str, Any]) -> dict[str, Any]:
    """The report as a dict (what report.json holds), with the previous run's headline figures when there was one."""
    figures = {r.name: r.figures for r in results}
    previous = None
    old = track_dir / "report.json"
    if old.exists():
        try:
            previous = json.loads(old.read_text())
        except ValueError:
            previous = None
    others = {}
    for sibling in sorted(track_dir.parent.glob("*/report.json")):
        if sibling.parent != track_dir:
            try:
                others[sibling.parent.name] = json.loads(sibling.read_text())["headlines"]
            except (ValueError, KeyError):
                pass
    headlines = {label: _get(figures, path) for label, path, _, _ in HEADLINES}
    return {"track": track, "size": size, "stages": [
        {"name": r.name, "status": r.status, "seconds": round(r.seconds, 1), "key": r.key} for r in results],
        "total_seconds_when_run": round(sum(r.seconds for r in results), 1),
        "headlines": headlines, "figures": figures, "environment": environment,
        "previous": previous.get("headlines") if previous else None,
        "previous_environment": previous.get("environment", {}).get("git") if previous else None,
        "other_tracks": others}


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["figure", "this run"]
    if report["previous"]:
        header.append("previous run")
    others = report["other_tracks"]
    header += [f"track {name}" for name in others]
    rows = []
    for label, _, spec, _ in HEADLINES:
        row = [label, _fmt(report["headlines"].get(label), spec)]
        if report["previous"]:
            row.append(_fmt(report["previous"].get(label), spec))
        row += [_fmt(h.get(label), spec) for h in others.values()]
        rows.append(row)
    return header, rows


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows], ""]

    env = report["environment"]
    lines = [f"# byollm capstone report: track {report['track']}, size {report['size']}", "",
             f"Commit {(env.get('git') or {}).get('commit', 'unknown')}, {env.get('created', '')}, "
             f"{(env.get('hardware') or {}).get('cpu', '')}. Stages ran for "
             f"{report['total_seconds_when_run']:.0f} s in all (when each last ran).", "", "## Stages", ""]
    lines += table(["stage", "this run", "seconds (when it ran)"],
                   [[s["name"], s["status"], f"{s['seconds']:.1f}"] for s in report["stages"]])
    lines += ["## Headline figures", ""]
    lines += table(*_rows(report))
    for title, intro, items in answers(report):
        lines += [f"## {title}", "", f"{intro}", "", *[f"- {label}: {text!r}" for label, text in items], ""]
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], "", "## Environment", "", "```json",
              json.dumps(env, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def answers(report: dict[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The report's example answers: (title, what was asked, [(whose answer, text)])."""
    figures, out = report["figures"], []
    ex = _get(figures, ("evaluate", "win_rate", "example"))
    if ex:
        out.append(("An answer, before and after preference tuning", f"Prompt: {ex['prompt']!r}",
                    [("starting model", ex["start"]), ("tuned model", ex["tuned"])]))
    ex = _get(figures, ("evaluate", "grounded", "tuned", "example"))
    if ex:
        out.append(("A grounded question on an unseen paragraph", f"Question: {ex['question']!r}",
                    [("expected", ex["expected"]), ("tuned model", ex["reply"])]))
    served = figures.get("served")
    if served:
        out.append(("The served model, with RAG over the guide", f"Question: {served['question']!r}",
                    [("answer", served["answer"]), ("citations", ", ".join(f"[{n}]" for n in served["citations"])
                                                    or "none"),
                     ("sources", "; ".join(str(x) for x in served["sources"]) or "none")]))
    return out


def to_html(report: dict[str, Any], plots: list[str]) -> str:
    e = html.escape

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    env = report["environment"]
    stages = table(["stage", "this run", "seconds (when it ran)"],
                   [[s["name"], s["status"], f"{s['seconds']:.1f}"] for s in report["stages"]])
    images = "".join(f'<figure><img src="{e(p)}" alt="{e(p)}"></figure>' for p in plots)
    examples = "".join(f"<h2>{e(title)}</h2><p>{e(intro)}</p><ul>"
                       + "".join(f"<li>{e(label)}: <code>{e(text)}</code></li>" for label, text in items) + "</ul>"
                       for title, intro, items in answers(report))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>byollm capstone report: {e(report['track'])}</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:auto;padding:1rem}}
table{{border-collapse:collapse;margin:0.5rem 0 1.5rem}}td,th{{border:1px solid #ccc;padding:0.25rem 0.6rem;
text-align:left}}img{{max-width:100%}}pre{{background:#f4f4f4;padding:0.6rem;overflow:auto}}</style></head><body>
<h1>byollm capstone report: track {e(report['track'])}, size {e(report['size'])}</h1>
<p>Commit {e(str((env.get('git') or {}).get('commit', 'unknown')))}, {e(str(env.get('created', '')))}.</p>
<h2>Stages</h2>{stages}<h2>Headline figures</h2>{table(*_rows(report))}
{examples}<h2>Plots</h2>{images}<h2>Environment</h2><pre>{e(json.dumps(env, indent=2, default=str))}</pre>
</body></html>
"""


def write_report(results: list[StageResult], track_dir: Path, *, track: str, size: str,
                 environment: dict[str, Any]) -> Path:
    """report.{json,md,html} and the plots in `track_dir`; returns report.md's path."""
    report = build_report(results, track_dir, track=track, size=size, environment=environment)
    plots = []
    curves = plot_curves(track_dir)
    if curves:
        plots.append(curves.name)
    for name in ("bias.png", "toxicity.png"):  # the safety suite's own figures
        src = track_dir / "safety" / name
        if src.exists():
            shutil.copyfile(src, track_dir / name)
            plots.append(name)
    atomic_write_text(track_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(track_dir / "report.md", markdown(report, plots))
    atomic_write_text(track_dir / "report.html", to_html(report, plots))
    return track_dir / "report.md"
