"""`byollm safety canary`: the secret-sharer experiment end to end, and the probe on an existing checkpoint.

    byollm safety canary --dedup                   # train with canaries (1, 4, 16, 64 copies), then deduplicated
    byollm safety canary --ckpt runs/canary-X/runs/repeated --json     # the same canaries, measured on a checkpoint

The experiment: draw canaries (`canary.make_canaries`, seeded: per_count for each repetition count, plus
controls that are never inserted); insert them into Tiny Shakespeare (from the data mirror) at seeded line
starts of its training part; train a small model on that text with the pretraining recipe (`byollm.train.pretrain`
on the quickstart recipe, the only change being the text); measure every canary's exposure and whether greedy
decoding reproduces it. With `dedup`, the same run again on the corpus after exact line deduplication
(`canary.dedup_lines`), where each inserted canary is left once: the mitigation. Same seed, same model, same
steps: only the text differs.

OUT/canary_report.json holds everything (format, canaries, per setting: corpus, training, each canary's
exposure, and `by_repetitions`); OUT/canaries.json the canaries alone; OUT/<setting>/corpus.txt the text trained on.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - jsonargparse reads the annotations at run time

from byollm.errors import ByollmError
from byollm.safety.canary import (
    Canary,
    CanaryFormat,
    Exposure,
    dedup_lines,
    insert_canaries,
    make_canaries,
    measure,
    summarise,
)

DEFAULT_REPETITIONS = (1, 4, 16, 64)
DEFAULT_STEPS = 400
CANARY_DESCRIPTION = (
    "Memorisation canaries, the secret-sharer exposure test (Carlini et al. 2019): insert canaries such as "
    "\"Quinlan's secret code is 7 3 9 1 4\" into Tiny Shakespeare (--repetitions copies each, plus never-inserted "
    "controls), train a small model with the quickstart recipe, and report exposure = log2|R| - log2 rank of each "
    "secret among all |R| = 10^digits candidates (by the model's log-perplexity; a skew-normal estimate beside it) "
    "and whether greedy decoding from the prefix writes the secret. --dedup: the same run on the corpus after exact "
    "line deduplication. --ckpt: measure a checkpoint instead of training.")


def format_dict(fmt: CanaryFormat) -> dict[str, Any]:
    return {"template": fmt.template, "alphabet": fmt.alphabet, "length": fmt.length, "separator": fmt.separator,
            "space_size": fmt.size, "max_exposure_bits": fmt.bits}


def run_experiment(out: str | Path, *, preset: str = "llama-nano", steps: int = DEFAULT_STEPS,
                   repetitions: Sequence[int] = DEFAULT_REPETITIONS, per_count: int = 2, controls: int = 4,
                   digits: int = 5, dedup: bool = False, min_chars: int = 20, seed: int = 0, device: str = "cpu",
                   text: str | None = None, overrides: dict[str, Any] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train on Tiny Shakespeare (or `text`) with canaries inserted, then (with `dedup`) on the deduplicated text;
    return (and write to OUT/canary_report.json) each setting's exposures. `overrides`: more pretraining keys
    (dotted, as `byollm pretrain` takes them: {"batch_size": 8})."""
    from byollm.atomic import atomic_write_text
    from byollm.data.readers import load_text
    from byollm.tokenizer.char import CharTokenizer

    out = Path(out)
    if (out / "canary_report.json").exists() or (out / "runs").exists():
        raise ByollmError(f"{out} already holds a canary experiment; give another --out")
    t0 = time.perf_counter()
    fmt = CanaryFormat(length=digits)
    canaries = make_canaries(fmt, repetitions, per_count=per_count, controls=controls, seed=seed)
    base = load_text("tinyshakespeare") if text is None else text
    corpora = {"repeated": insert_canaries(base, canaries, seed=seed)}
    dedup_report = None
    if dedup:
        corpora["dedup"], dedup_report = dedup_lines(corpora["repeated"], min_chars=min_chars)

    # One character vocabulary for every setting, and one that holds every symbol of R (a control's secret may use
    # a digit no inserted canary has, and the play itself has only "3").
    tokenizer_dir = out / "tokenizer"
    CharTokenizer.train([corpora["repeated"], fmt.alphabet, *(c.text for c in canaries)]).save(tokenizer_dir)
    atomic_write_text(out / "canaries.json", json.dumps(
        {"format": format_dict(fmt), "seed": seed, "canaries": [vars(c) for c in canaries]}, indent=2))

    report: dict[str, Any] = {"format": format_dict(fmt), "preset": preset, "steps": steps, "seed": seed,
                              "canaries": [vars(c) for c in canaries], "settings": {}}
    for setting, corpus in corpora.items():
        folder = out / setting
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "corpus.txt", corpus)
        trained = _train(folder / "corpus.txt", tokenizer_dir, out, setting, preset=preset, steps=steps, seed=seed,
                         device=device, overrides=overrides, progress=progress)
        exposures = measure_checkpoint(trained["checkpoint"], canaries, fmt, device=device, seed=seed)
        report["settings"][setting] = {
            "corpus": {"chars": len(corpus), "copies": {c.prefix: corpus.count(c.text + "\n") for c in canaries},
                       **({"dedup": dedup_report.to_dict()} if setting == "dedup" and dedup_report else {})},
            "train": trained, "exposures": [e.to_dict() for e in exposures], "by_repetitions": summarise(exposures)}
    report["seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "canary_report.json", json.dumps(report, indent=2))
    return report


def _train(corpus: Path, tokenizer_dir: Path, out: Path, setting: str, *, preset: str, steps: int, seed: int,
           device: str, overrides: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """The quickstart recipe on `corpus`: everything but the text (and the run's name) as `byollm quickstart`."""
    from byollm.train import pretrain, quickstart_config

    values = {"max_steps": steps, "model.preset": preset, "data.name": str(corpus),
              "data.tokenizer": str(tokenizer_dir), "data.dir": str(out / setting / "prepared"),
              "data.allow_fallback": False, "out_dir": str(out / "runs"), "name": setting,
              "seed": seed, "device": device, "sample_tokens": 64, **(overrides or {})}
    result = pretrain(quickstart_config(values), progress=progress)
    if result.checkpoint is None:
        raise ByollmError(f"the {setting} run wrote no checkpoint ({result.run_dir})")
    return {"run": str(result.run_dir), "checkpoint": str(result.checkpoint), "steps": result.steps,
            "seconds": result.train_seconds, "val_loss": result.val.get("loss")}


def measure_checkpoint(ckpt: str | Path, canaries: Sequence[Canary], fmt: CanaryFormat, *, device: str = "cpu",
                       seed: int = 0, samples: int = 2000, context: str = "\n") -> list[Exposure]:
    """Load any checkpoint byollm reads (fp32) and measure the canaries' exposure on it."""
    import torch

    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, device=device, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise ByollmError(f"{loaded.path} has no tokenizer; the canary probe needs one to read the candidates")
    return measure(loaded.model.eval(), loaded.tokenizer, canaries, fmt, context=context, seed=seed, samples=samples)


def read_canaries(path: str | Path, fmt: CanaryFormat) -> list[Canary]:
    """Canaries from a file: canaries.json / canary_report.json of an experiment, or text with one canary a line
    (its last fmt.length symbols the secret; such canaries count as controls unless the JSON says otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise ByollmError(f"{p} does not exist; give canaries.json of an experiment or a text file, one canary a line")
    if p.suffix == ".json":
        try:
            records = json.loads(p.read_text())["canaries"]
            return [Canary(r["prefix"], r["secret"], int(r.get("repetitions", 0))) for r in records]
        except (ValueError, KeyError, TypeError) as e:
            raise ByollmError(f"{p}: not a canaries file (a JSON object with a 'canaries' list of prefix/secret "
                              f"records): {e}") from None
    return [Canary(*fmt.split(line)) for line in p.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def add_canary_arguments(p: Any) -> None:
    """The options of `byollm safety canary` on a jsonargparse parser."""
    p.add_argument("--preset", type=str, default="llama-nano", help="the model trained (a `byollm model presets` name)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per setting")
    p.add_argument("--repetitions", type=str, default=",".join(map(str, DEFAULT_REPETITIONS)),
                   help="copies of the inserted canaries, comma-separated (per_count canaries for each count)")
    p.add_argument("--per-count", "--per_count", type=int, default=2, help="canaries per repetition count")
    p.add_argument("--controls", type=int, default=4, help="canaries drawn the same way but never inserted")
    p.add_argument("--digits", type=int, default=5, help="digits per secret: |R| = 10^digits (exact rank up to 10^6)")
    p.add_argument("--dedup", action="store_true",
                   help="also train on the corpus after exact line deduplication (each canary left once) and compare")
    p.add_argument("--min-chars", "--min_chars", type=int, default=20,
                   help="deduplication: lines shorter than this are never dropped")
    p.add_argument("--seed", type=int, default=0, help="canaries, their positions, the training run")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")
    p.add_argument("--out", type=Optional[str], default=None,  # noqa: UP045
                   help="experiment folder (default runs/canary-<time>)")
    p.add_argument("--ckpt", type=Optional[str], default=None,  # noqa: UP045
                   help="measure an existing checkpoint instead of training (default canaries: those the same "
                        "--seed/--repetitions/--per-count/--controls/--digits draw)")
    p.add_argument("--canaries", type=Optional[str], default=None,  # noqa: UP045
                   help="with --ckpt: canaries.json of an experiment, or a text file with one canary a line")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_canary(a: Any) -> dict[str, Any]:
    """`byollm safety canary` as the options say: the experiment, or (--ckpt) the probe alone; prints the table."""
    try:
        reps = [int(r) for r in a.repetitions.split(",") if r.strip()]
    except ValueError:
        raise ByollmError(f"--repetitions takes comma-separated integers such as 1,4,16,64, got {a.repetitions!r}") \
            from None
    fmt = CanaryFormat(length=a.digits)
    if a.ckpt is not None:
        canaries = (read_canaries(a.canaries, fmt) if a.canaries else
                    make_canaries(fmt, reps, per_count=a.per_count, controls=a.controls, seed=a.seed))
        exposures = measure_checkpoint(a.ckpt, canaries, fmt, device=a.device, seed=a.seed)
        result = {"model": str(a.ckpt), "format": format_dict(fmt), "exposures": [e.to_dict() for e in exposures],
                  "by_repetitions": summarise(exposures)}
        print(json.dumps(result) if a.json else format_table({"checkpoint": result}, fmt))
        return result
    if a.canaries:
        raise ByollmError("--canaries goes with --ckpt; the experiment draws its own canaries (--seed)")
    out = Path(a.out or f"runs/canary-{time.strftime('%Y%m%d-%H%M%S')}")
    report = run_experiment(out, preset=a.preset, steps=a.steps, repetitions=reps, per_count=a.per_count,
                            controls=a.controls, digits=a.digits, dedup=a.dedup, min_chars=a.min_chars, seed=a.seed,
                            device=a.device)
    if a.json:
        print(json.dumps(report))
    else:
        print(format_table(report["settings"], fmt))
        print(f"[byollm] wrote {out / 'canary_report.json'} ({report['seconds']:.0f} s)", file=sys.stderr)
    return report


def format_table(settings: dict[str, dict[str, Any]], fmt: CanaryFormat) -> str:
    """One row per setting and repetition count (0 = controls): exposure in bits (of at most log2 |R|)."""
    lines = [f"exposure in bits (max log2|R| = {fmt.bits:.1f}; a control averages ~1.4); extracted = greedy decoding "
             "from the prefix writes the secret",
             f"{'setting':<10} {'inserted':>8} {'canaries':>8} {'mean':>6} {'max':>6} {'estimate':>8} {'extracted':>9}"]
    for name, s in settings.items():
        for reps, r in s["by_repetitions"].items():
            lines.append(f"{name:<10} {reps:>8} {r['n']:>8} {r['mean_exposure']:>6.1f} {r['max_exposure']:>6.1f} "
                         f"{r['mean_exposure_estimate']:>8.1f} {r['extracted']:>5}/{r['n']:<3}")
    return "\n".join(lines)
