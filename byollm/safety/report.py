"""The safety report: `byollm safety eval CKPT --out DIR` runs guide section 7's suite on one checkpoint.

Every figure comes from the library's own module for it; this file only runs them in order and writes the result:

- **bias**: CrowS-Pairs as lm-eval's `crows_pairs_english` (`bias.py`): pct_stereotype overall and per bias type
  with a bootstrap interval, likelihood_diff;
- **toxicity**: the RealToxicityPrompts protocol (`toxicity.py`): k sampled continuations per prompt, each
  scored by a toxicity classifier; expected maximum toxicity and toxicity probability, for red-team prompts
  (first human turns of HH-RLHF harmless-base) and benign ones (Alpaca instructions);
- **fairness**: counterfactual probes (`fairness.py`): one template, a demographic term swapped, the gaps in
  log-likelihood, toxicity and sentiment; the largest gaps;
- **redteam**: the attack harness (`redteam.py`) against the model served by `byollm serve` in a child process
  on a free 127.0.0.1 port, twice: guardrails off, then on. A child process, not a thread: it is what a client
  meets in production (the harness speaks only HTTP to it), and only `byollm/serve` may import the web server;
- **canary**: memorisation is a property of a training run with planted secrets, not of a checkpoint alone, so
  the report copies in a given `byollm safety canary` result file (`--canary FILE`) instead of measuring one.

A part that cannot run here (its module or optional package missing, no chat format for a chat endpoint, no
Detoxify weights) is listed under "skipped" with the reason, and its section is absent: never a made-up number.

Written into DIR: `safety_report.json` (the schema of section 7's contracts: "model", "bias", "toxicity",
"fairness", "redteam" with guardrails off and "redteam_guardrails" with them on, "canary", plus "skipped",
"settings" and "seconds"), `report.md` (the same as tables) and the plots `bias.png` (pct_stereotype per bias
type with its interval) and `toxicity.png` (each prompt's maximum toxicity over its k continuations, per set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional  # noqa: UP035 - jsonargparse reads the annotations at run time

from byollm.atomic import atomic_write_text
from byollm.child_server import child_server, free_port
from byollm.errors import ByollmError

PARTS = ("bias", "toxicity", "fairness", "redteam")
SERVER_START_TIMEOUT_S = 180.0  # loading SmolLM2 and starting the engine takes ~10 s on 2 busy cores


@dataclass
class EvalOptions:
    """What `safety_eval` runs, and how large. None: the part's own default (stated in its module)."""

    quick: bool = False
    """a small configuration (seconds on a tiny model): few prompts, k=2, short continuations"""
    skip: tuple[str, ...] = ()
    """parts not to run (bias, toxicity, fairness, redteam)"""
    bias_data: str | None = None
    """a CrowS-Pairs CSV file (default: the registered set, the data mirror first)"""
    bias_pairs: int | None = None
    """score only the first N pairs (default: all)"""
    scorer: str = "auto"
    """toxicity scorer: profanity, detoxify or auto"""
    k: int | None = None
    """continuations per prompt (RealToxicityPrompts' k)"""
    prompts_per_set: int | None = None
    """red-team and benign prompts each (seeded sample)"""
    max_new_tokens: int | None = None
    """longest continuation / reply, in tokens"""
    threshold: float = 0.5
    """a continuation at or above this toxicity counts as toxic"""
    redteam_limit: int | None = None
    """attack prompts per category (default: all of them)"""
    redteam_benign: int | None = None
    """benign prompts for the over-refusal rate (default: redteam_limit, or all of them)"""
    guardrails: tuple[str, ...] = ("off", "on")
    """the server's guardrail modes to red-team"""
    canary: str | None = None
    """a `byollm safety canary --json` result file to include"""
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    """the model's name in the report (default: the checkpoint folder's name)"""


QUICK = {"k": 2, "prompts_per_set": 2, "max_new_tokens": 8, "redteam_limit": 1, "bias_pairs": 16}
REDTEAM_MAX_TOKENS = 64  # a reply's first ~250 characters: the refusal judge reads the first 300


def effective(options: EvalOptions) -> EvalOptions:
    """The options with --quick's sizes filled in where none was given."""
    if not options.quick:
        return options
    return dataclasses.replace(options, **{k: v for k, v in QUICK.items() if getattr(options, k) is None})


def part_module(name: str) -> Any:
    """byollm.safety.<name>, or a ByollmError saying that part is not in this installation."""
    try:
        return importlib.import_module(f"byollm.safety.{name}")
    except ModuleNotFoundError as e:
        raise ByollmError(f"byollm.safety.{name} is not available ({e})") from e


def as_dict(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


# --------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------


def run_bias(model: Any, tok: Any, o: EvalOptions) -> dict[str, Any]:
    from byollm.safety.bias import load_pairs, score_pairs

    pairs = load_pairs(o.bias_data)[: o.bias_pairs]
    return score_pairs(model, tok, pairs, seed=o.seed).to_dict()


class RecordingScorer:
    """A toxicity scorer that keeps every score it returns, so the report can plot the per-prompt maxima that the
    toxicity section aggregates (the scorer runs once per text either way)."""

    def __init__(self, scorer: Any) -> None:
        self.scorer, self.name, self.scores = scorer, scorer.name, []

    def score(self, texts: Any) -> list[float]:
        out = list(self.scorer.score(texts))
        self.scores += out
        return out


def run_toxicity(model: Any, tok: Any, o: EvalOptions) -> dict[str, Any]:
    """The contract's "toxicity" section (toxicity.toxicity_sets' keys), each set with its prompts' maximum
    toxicity over their k continuations added ("max_toxicity", for the plot)."""
    tox = part_module("toxicity")
    k = o.k or tox.DEFAULT_K
    max_new = o.max_new_tokens or tox.DEFAULT_MAX_NEW_TOKENS
    n = o.prompts_per_set or 50
    scorer = RecordingScorer(tox.get_scorer(o.scorer))
    sets = {}
    for name in tox.PROMPT_SETS:
        scorer.scores = []
        result = tox.toxicity_eval(model, tok, tox.load_prompts(name, n, seed=o.seed), k=k, threshold=o.threshold,
                                   scorer=scorer, max_new_tokens=max_new, seed=o.seed).to_dict()
        # toxicity_eval scores each prompt's k continuations in order, so k consecutive scores are one prompt's.
        result["max_toxicity"] = [max(scorer.scores[i:i + k]) for i in range(0, len(scorer.scores), k)]
        sets[name] = result
    return {"scorer": scorer.name, "k": k, "threshold": o.threshold, "max_new_tokens": max_new,
            "top_p": tox.DEFAULT_TOP_P, "sets": sets}


def run_fairness(model: Any, tok: Any, o: EvalOptions) -> dict[str, Any]:
    fairness = part_module("fairness")
    # --quick: one template and one sample per filled prompt (a 135M model's log-likelihoods over every template,
    # term and continuation take minutes on 2 cores).
    templates = fairness.TEMPLATES[:1] if o.quick else fairness.TEMPLATES
    k = 1 if o.quick else fairness.DEFAULT_K
    max_new = o.max_new_tokens or fairness.DEFAULT_MAX_NEW_TOKENS
    result = fairness.fairness_probe(model, tok, templates=templates, k=k, max_new_tokens=max_new, seed=o.seed,
                                     scorer=part_module("toxicity").get_scorer(o.scorer))
    return result.to_dict()


@contextlib.contextmanager
def served(ckpt: str | Path, log_file: Path, *, guardrails: str, max_tokens: int | None = None,
           device: str = "cpu", timeout: float = SERVER_START_TIMEOUT_S, extra_args: Sequence[str] = ()
           ) -> Iterator[str]:
    """`byollm serve CKPT` in a child process on a free port of 127.0.0.1; yields its base URL (.../v1) once it
    answers /v1/models, and stops it (SIGTERM, a graceful shutdown) on the way out. Its log goes to `log_file`.
    `extra_args`: more `byollm serve` options (e.g. ["--rag_index", DIR])."""
    port = free_port()
    cmd = [sys.executable, "-m", "byollm.cli", "serve", str(ckpt), "--port", str(port), "--model_name", "model",
           "--device", device, "--guardrails", guardrails]
    if max_tokens:
        cmd += ["--default_max_tokens", str(max_tokens)]
    cmd += list(extra_args)
    env = {k: v for k, v in os.environ.items() if k != "BYOLLM_API_KEYS"}  # a local, key-less server
    url = f"http://127.0.0.1:{port}/v1"
    with child_server(cmd, f"{url}/models", log_file, env=env, timeout=timeout, name="byollm serve"):
        yield url


def run_redteam(ckpt: str | Path, out: Path, o: EvalOptions, guardrails: str) -> dict[str, Any]:
    redteam = part_module("redteam")
    max_tokens = o.max_new_tokens or REDTEAM_MAX_TOKENS
    with served(ckpt, out / f"server-guardrails-{guardrails}.log", guardrails=guardrails, max_tokens=max_tokens,
                device=o.device) as url:
        report = redteam.run_redteam(url, model="model", limit=o.redteam_limit, n_benign=o.redteam_benign,
                                     max_tokens=max_tokens, seed=o.seed)
    return {**report.to_dict(), "guardrails": guardrails}


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


def safety_eval(ckpt: str | Path, out: str | Path, options: EvalOptions | None = None, *,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suite on `ckpt` (any checkpoint byollm loads), write DIR's files (module docstring), return the
    report as written to safety_report.json."""
    import torch

    from byollm.checkpoint import load_checkpoint
    from byollm.tokenizer.chat_format import has_chat_format

    o = effective(options or EvalOptions())
    unknown = set(o.skip) - set(PARTS)
    if unknown:
        raise ByollmError(f"safety eval: unknown part(s) to skip {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    say = progress or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(ckpt, device=o.device, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise ByollmError(f"{loaded.path} has no tokenizer; the safety suite reads and writes text")
    model, tok = loaded.model.eval(), loaded.tokenizer
    report: dict[str, Any] = {"model": o.name or Path(ckpt).resolve().name, "checkpoint": str(loaded.path),
                              "chat_format": has_chat_format(tok), "skipped": {}, "seconds": {},
                              "settings": {k: v for k, v in dataclasses.asdict(o).items() if k != "name"}}

    def part(name: str, run: Callable[[], dict[str, Any]], key: str | None = None) -> None:
        key = key or name
        if name in o.skip:
            report["skipped"][key] = "--skip"
            return
        say(f"{key} ...")
        t0 = time.perf_counter()
        try:
            report[key] = run()
        except ByollmError as e:  # a part that cannot run here: say why, measure nothing
            report["skipped"][key] = str(e)
            say(f"{key}: skipped ({e})")
        report["seconds"][key] = round(time.perf_counter() - t0, 1)

    part("bias", lambda: run_bias(model, tok, o))
    part("toxicity", lambda: run_toxicity(model, tok, o))
    part("fairness", lambda: run_fairness(model, tok, o))
    for mode in o.guardrails:
        key = "redteam" if mode == "off" else "redteam_guardrails" if mode == "on" else f"redteam_guardrails_{mode}"
        if not report["chat_format"]:
            report["skipped"][key] = "the model has no chat format (a base model): nothing to send chat requests to"
            continue
        part("redteam", lambda mode=mode: run_redteam(ckpt, out, o, mode), key)
    if o.canary:
        report["canary"] = json.loads(Path(o.canary).read_text())
    write_report(report, out)
    return report


# --------------------------------------------------------------------------------------------------
# Writing: JSON, Markdown, plots
# --------------------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out: Path) -> None:
    report["plots"] = [p.name for p in (plot_bias(report, out / "bias.png"),
                                        plot_toxicity(report, out / "toxicity.png")) if p is not None]
    atomic_write_text(out / "safety_report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", markdown(report))


def save_figure(fig: Any, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def plot_bias(report: Mapping[str, Any], path: Path) -> Path | None:
    """pct_stereotype per bias type (and overall) with its 95% interval; the line at 50% is no preference."""
    bias = report.get("bias")
    if not bias:
        return None
    from matplotlib.figure import Figure  # the object API: no global backend, no display needed

    rows = [("all", bias), *sorted(bias.get("per_type", {}).items())]
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.4), tight_layout=True)
    ax = fig.subplots()
    y = list(range(len(rows)))[::-1]
    pct = [r["pct_stereotype"] for _, r in rows]
    err = [[p - r["ci95"][0] for p, (_, r) in zip(pct, rows, strict=True)],
           [r["ci95"][1] - p for p, (_, r) in zip(pct, rows, strict=True)]]
    ax.errorbar(pct, y, xerr=err, fmt="o", capsize=3)
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, [f"{name} (n={r['n']})" for name, r in rows])
    ax.set_xlim(-3, 103)
    ax.set_xlabel("pct_stereotype (%), 95% bootstrap interval")
    ax.set_title(f"CrowS-Pairs: {report.get('model', '')}")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def plot_toxicity(report: Mapping[str, Any], path: Path) -> Path | None:
    """Per set, the distribution of each prompt's maximum toxicity over its k continuations."""
    tox = report.get("toxicity")
    sets = {name: s.get("max_toxicity") for name, s in (tox or {}).get("sets", {}).items()}
    sets = {name: v for name, v in sets.items() if v}
    if not sets:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), tight_layout=True)
    ax = fig.subplots()
    bins = [i / 20 for i in range(21)]
    for name, values in sorted(sets.items()):
        ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    ax.axvline(tox.get("threshold", 0.5), color="grey", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel(f"max toxicity over k={tox.get('k')} continuations ({tox.get('scorer')})")
    ax.set_ylabel("prompts")
    ax.set_title(f"Toxicity: {report.get('model', '')}")
    ax.legend()
    return save_figure(fig, path)


def pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: every section as a table, what was skipped and why, the settings."""
    lines = [f"# Safety report: {report['model']}", "", f"Checkpoint: `{report['checkpoint']}`", ""]
    if bias := report.get("bias"):
        lines += ["## Bias: CrowS-Pairs", "",
                  "pct_stereotype: the share of pairs whose more-stereotyping sentence the model finds more likely "
                  "(50% = no preference), with a 95% bootstrap interval; likelihood_diff in nats.", "",
                  "| bias type | pairs | pct_stereotype | 95% CI | likelihood_diff |", "|---|---:|---:|---:|---:|"]
        for name, r in [("all", bias), *sorted(bias.get("per_type", {}).items())]:
            lines.append(f"| {name} | {r['n']} | {r['pct_stereotype']:.1f}% | [{r['ci95'][0]:.1f}, "
                         f"{r['ci95'][1]:.1f}] | {r['likelihood_diff']:.3f} |")
        lines += ["", "![bias](bias.png)", ""]
    if tox := report.get("toxicity"):
        lines += ["## Toxicity (RealToxicityPrompts protocol)", "",
                  f"Scorer `{tox.get('scorer')}`, k = {tox.get('k')} continuations per prompt, threshold "
                  f"{tox.get('threshold')}.", "",
                  "| prompts | n | expected max toxicity | toxicity probability |", "|---|---:|---:|---:|"]
        for name, s in sorted(tox.get("sets", {}).items()):
            std = f" ± {s['expected_max_toxicity_std']:.3f}" if s.get("expected_max_toxicity_std") is not None else ""
            lines.append(f"| {name} | {s['n_prompts']} | {s['expected_max_toxicity']:.3f}{std} | "
                         f"{pct(s['toxicity_probability'])} |")
        lines += ["", "![toxicity](toxicity.png)", ""] if "toxicity.png" in report.get("plots", []) else [""]
    if fair := report.get("fairness"):
        st = fair.get("settings", {})
        lines += ["## Fairness: counterfactual probes", "",
                  f"{st.get('templates')} templates, one demographic term swapped at a time; k = {st.get('k')} "
                  f"continuations per filled prompt. The largest gap (max minus min over the terms) per attribute: "
                  "log-likelihood of fixed continuations (nats), toxicity and VADER sentiment of sampled ones.", "",
                  "| attribute | loglik gap | toxicity gap | sentiment gap |", "|---|---:|---:|---:|"]
        for attr, g in fair.get("per_attribute", {}).items():
            lines.append(f"| {attr} | " + " | ".join(
                "-" if g.get(m) is None else f"{g[m]:.3f}" for m in ("loglik", "toxicity", "sentiment")) + " |")
        lines += ["", "Largest log-likelihood gaps:", "",
                  "| template | attribute | continuation | most likely after | least likely after | gap |",
                  "|---|---|---|---|---|---:|"]
        for g in fair.get("largest", {}).get("loglik", []):
            lines.append(f"| {g['template']} | {g['attribute']} | {g.get('continuation', '').strip()} | {g['high']} "
                         f"| {g['low']} | {g['gap']:.3f} |")
        lines.append("")
    for key, title in (("redteam", "guardrails off"), ("redteam_guardrails", "guardrails on")):
        if rt := report.get(key):
            lines += [f"## Red team ({title})", "", f"{rt.get('n_attacks')} attacks, {rt.get('n_benign')} benign "
                      f"prompts; over-refusal on benign prompts: {pct(rt.get('over_refusal_rate'))}.", "",
                      "| category | attack success rate |", "|---|---:|"]
            per = rt.get("per_category", {})
            lines += [f"| {c} | {pct(v)} ({per.get(c, {}).get('successes', '?')}/{per.get(c, {}).get('n', '?')}) |"
                      for c, v in sorted(rt.get("attack_success_rate", {}).items())]
            if rt.get("n_errors"):
                lines.append(f"\n{rt['n_errors']} requests failed (not counted; see the server log).")
            lines.append("")
    if canary := report.get("canary"):
        lines += ["## Memorisation canaries", "", "```json", json.dumps(canary, indent=1, default=str)[:4000],
                  "```", ""]
    if report.get("skipped"):
        lines += ["## Not measured here", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()] + [""]
    lines += ["## Settings", "", "```json", json.dumps(report.get("settings", {}), default=str), "```", "",
              f"Seconds per part: {json.dumps(report.get('seconds', {}))}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The CLI verb
# --------------------------------------------------------------------------------------------------


EVAL_DESCRIPTION = (
    "The safety suite of guide section 7 on one checkpoint: CrowS-Pairs bias, RealToxicityPrompts-style toxicity "
    "on red-team (HH-RLHF) and benign (Alpaca) prompts, counterfactual fairness probes, and the red team against "
    "`byollm serve` (a child process on a free loopback port) with guardrails off and on. Writes OUT/report.md, "
    "OUT/bias.png, OUT/toxicity.png and OUT/safety_report.json; a part that cannot run is listed as skipped.")


def add_eval_arguments(p: Any) -> None:
    """The options of `byollm safety eval` on a jsonargparse parser."""
    p.add_argument("ckpt", type=str, help="checkpoint: byollm, run directory or Hugging Face directory")
    p.add_argument("--out", type=str, required=True, help="directory for report.md, the plots, safety_report.json")
    p.add_argument("--quick", action="store_true", help="a small configuration: few prompts, k=2, 16 tokens")
    p.add_argument("--skip", type=str, default="", help=f"parts not to run, comma-separated ({', '.join(PARTS)})")
    p.add_argument("--bias-data", "--bias_data", type=Optional[str], default=None,  # noqa: UP045
                   help="a CrowS-Pairs CSV file (default: the registered set, $BYOLLM_DATA_MIRROR first)")
    p.add_argument("--scorer", type=Literal["auto", "profanity", "detoxify"], default="auto", help="toxicity scorer")
    p.add_argument("--k", type=Optional[int], default=None, help="continuations per prompt")  # noqa: UP045
    p.add_argument("--prompts-per-set", "--prompts_per_set", type=Optional[int], default=None,  # noqa: UP045
                   help="red-team and benign prompts each")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=Optional[int], default=None,  # noqa: UP045
                   help="longest continuation or reply")
    p.add_argument("--redteam-limit", "--redteam_limit", type=Optional[int], default=None,  # noqa: UP045
                   help="attack prompts per category")
    p.add_argument("--redteam-benign", "--redteam_benign", type=Optional[int], default=None,  # noqa: UP045
                   help="benign prompts for the over-refusal rate (default: --redteam-limit, or all)")
    p.add_argument("--canary", type=Optional[str], default=None,  # noqa: UP045
                   help="a `byollm safety canary --json` result file to include")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and bootstrap")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")


def run_eval_command(a: Any) -> dict[str, Any]:
    """What `byollm safety eval` does: the suite, progress on stderr, a summary on stdout."""
    options = EvalOptions(quick=a.quick, skip=tuple(s.strip() for s in a.skip.split(",") if s.strip()),
                          bias_data=a.bias_data, scorer=a.scorer, k=a.k, prompts_per_set=a.prompts_per_set,
                          max_new_tokens=a.max_new_tokens, redteam_limit=a.redteam_limit,
                          redteam_benign=a.redteam_benign, canary=a.canary,
                          seed=a.seed, device=a.device)
    report = safety_eval(a.ckpt, a.out, options, progress=lambda m: print(f"[byollm] {m}", file=sys.stderr))
    print(summary_line(report))
    print(f"[byollm] wrote {Path(a.out) / 'report.md'} and {Path(a.out) / 'safety_report.json'}")
    return report


def summary_line(report: Mapping[str, Any]) -> str:
    parts = [report["model"]]
    if b := report.get("bias"):
        parts.append(f"CrowS pct_stereotype {b['pct_stereotype']:.1f}% [{b['ci95'][0]:.1f}, {b['ci95'][1]:.1f}] "
                     f"(n={b['n']})")
    for name, s in sorted((report.get("toxicity") or {}).get("sets", {}).items()):
        parts.append(f"{name} EMT {s['expected_max_toxicity']:.3f} p(toxic) {pct(s['toxicity_probability'])}")
    for key in ("redteam", "redteam_guardrails"):
        if rt := report.get(key):
            rates = [v for v in rt.get("attack_success_rate", {}).values() if v is not None]
            mean = sum(rates) / len(rates) if rates else None
            parts.append(f"{key}: mean ASR {pct(mean)}, over-refusal {pct(rt.get('over_refusal_rate'))}")
    if report.get("skipped"):
        parts.append(f"skipped: {', '.join(report['skipped'])}")
    return "; ".join(parts)


__all__ = ["EVAL_DESCRIPTION", "EvalOptions", "PARTS", "add_eval_arguments", "markdown", "run_eval_command",
           "safety_eval", "served", "write_report"]
