"""Model cards: the README.md a Hugging Face model repository opens with, written from what the runs recorded.

A card (Mitchell et al., "Model Cards for Model Reporting", 2019) says what a model is, what it was made from, how
well it does and what it must not be used for. On the Hub it is Markdown after a YAML header that the Hub indexes
(`license`, `language`, `datasets`, `base_model`, `pipeline_tag`, `library_name`, `tags`, and `model-index` with the
evaluation results); `huggingface_hub`'s `ModelCardData` renders that header and `ModelCard` parses it back.

    byollm card runs/dpo                        # -> runs/dpo/checkpoints/step-N/README.md
    byollm card CKPT --eval out/safety_report.json --out card.md

Everything in the card comes from files: the checkpoint's `config.json` (architecture), its `meta.json` and its
run's (`provenance`, recorded by `byollm.train.run` while training: the datasets with their registry licences and
the provenance of the model training started from; steps, tokens, hardware, git commit, versions), the run's
`metrics.jsonl` (training time) and `held_out.json`, and `safety_report.json` from `byollm safety eval` (bias,
toxicity, fairness, red team, canaries; each section optional). What is not recorded is said to be not recorded.

The licence comes from `byollm.interop.licenses` (the rule, walked along the model's lineage).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byollm.errors import ByollmError, require
from byollm.interop.licenses import LicenseDecision, lineage_license, model_label

README = "README.md"
SAFETY_REPORT = "safety_report.json"
# Citations for what the registry and the packaged models hold, by name.
CITATIONS = {
    "alpaca": "Taori et al., 2023. Stanford Alpaca: An Instruction-following LLaMA model. "
              "https://github.com/tatsu-lab/stanford_alpaca",
    "hh-rlhf": "Bai et al., 2022. Training a Helpful and Harmless Assistant with Reinforcement Learning from Human "
               "Feedback. arXiv:2204.05862",
    "crows-pairs": "Nangia et al., 2020. CrowS-Pairs: A Challenge Dataset for Measuring Social Biases in Masked "
                   "Language Models. EMNLP 2020",
    "tinyshakespeare": "Karpathy, 2015. char-rnn (Tiny Shakespeare). https://github.com/karpathy/char-rnn",
    "smollm2-135m-instruct": "Allal et al., 2025. SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small "
                             "Language Model. arXiv:2502.02737",
}
CITATIONS["hh-rlhf-train"] = CITATIONS["hh-rlhf"]


def lineage(prov: dict[str, Any]) -> list[dict[str, Any]]:
    """The models of a lineage, oldest first: each model after its base (and, for a merge, after the fine-tune run
    whose adapter it folded in), every model once."""
    from byollm.interop.pretrained import PACKAGED_MODELS

    chain: list[dict[str, Any]] = []

    def visit(node: Any) -> None:
        if not isinstance(node, dict):
            return
        visit(node.get("base"))
        visit(node.get("adapter"))
        packaged = PACKAGED_MODELS.get(str(node.get("packaged_model")))
        if packaged is not None and not node.get("hf_repo"):  # converted before conversions recorded these
            node.update(hf_repo=packaged.hf_repo, language=list(packaged.language))
        if not any(n is node or (node.get("path") and n.get("path") == node.get("path")) for n in chain):
            chain.append(node)

    visit(prov)
    return chain


# --------------------------------------------------------------------------------------------------
# What the files say
# --------------------------------------------------------------------------------------------------


@dataclass
class Records:
    """Everything the card is written from, read once."""

    ckpt: Path
    kind: str  # "checkpoint", "run", "hf"
    config: Any  # ModelConfig
    num_params: int
    meta: dict[str, Any]  # the checkpoint's meta.json
    run_meta: dict[str, Any]  # its run's meta.json ({} when not inside a run)
    run_dir: Path | None
    provenance: dict[str, Any]
    held_out: dict[str, Any] | None
    train_event: dict[str, Any] | None  # the last "train" event up to the checkpoint's step
    run_config: dict[str, Any]
    chat: str | None  # the chat format's name ("byollm", "jinja") or None
    safety: dict[str, Any] | None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ByollmError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else {}


def read_records(ckpt_path: str | Path, eval_path: str | Path | None = None) -> Records:
    """The checkpoint's config, meta, run records and safety report (from `eval_path`, else a safety_report.json
    beside the checkpoint or in the path given)."""
    import torch
    import yaml

    from byollm.checkpoint import CONFIG, META, TOKENIZER_DIR, resolve_checkpoint
    from byollm.model import GPT, ModelConfig
    from byollm.train.run import checkpoint_provenance

    kind, ckpt = resolve_checkpoint(ckpt_path)
    if kind == "hf":
        from byollm.interop.hf import config_from_hf

        config = config_from_hf(_json(ckpt / CONFIG))
    else:
        config = ModelConfig.load(ckpt / CONFIG)
    meta = _json(ckpt / META)
    in_run = ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / META).is_file()
    run_dir = ckpt.parent.parent if in_run else None
    run_meta = _json(run_dir / META) if run_dir else {}
    num_params = meta.get("num_params") or run_meta.get("num_params")
    if not num_params:
        with torch.device("meta"):  # the shapes only: no memory, no weights read
            num_params = GPT(config).num_params()
    train_event, run_config, held_out = None, {}, None
    if run_dir is not None:
        step = meta.get("step")
        metrics = run_dir / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            event = json.loads(line) if line.strip() else {}
            if event.get("event") == "train" and (step is None or event.get("step", 0) <= step):
                train_event = event
        if (run_dir / "config.yaml").is_file():
            run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        held_out = _json(run_dir / "held_out.json") or None
        if held_out and step is not None and held_out.get("steps") not in (None, step):
            held_out = None  # measured on the run's last model, not this earlier checkpoint
    chat = None
    if (ckpt / TOKENIZER_DIR).is_dir() or kind == "hf":
        from byollm.errors import TokenizerError
        from byollm.tokenizer import load_tokenizer
        from byollm.tokenizer.chat_format import chat_format

        try:
            chat = chat_format(load_tokenizer(ckpt / TOKENIZER_DIR if kind != "hf" else ckpt)).name
        except (TokenizerError, ByollmError):
            chat = None
    if eval_path is not None:
        if not Path(eval_path).is_file():
            raise ByollmError(f"--eval {eval_path}: no such file; write one with `byollm safety eval CKPT --out DIR`")
        safety = _json(Path(eval_path))
    else:
        found = [p / SAFETY_REPORT for p in (Path(ckpt_path), ckpt) if (p / SAFETY_REPORT).is_file()]
        safety = _json(found[0]) if found else None
    return Records(ckpt, kind, config, int(num_params), meta, run_meta, run_dir, checkpoint_provenance(ckpt),
                   held_out, train_event, run_config, chat, safety)


# --------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------


TRAINING_STEPS = ("pretrain", "sft", "reward", "dpo", "orpo", "ppo", "finetune", "byollm merge")  # tags on the Hub


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "not recorded"


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _dataset_id(d: dict[str, Any]) -> str:
    return str(d.get("hf") or d.get("name"))


def eval_results(rec: Records, model_name: str) -> list[Any]:
    """The card's figures as huggingface_hub EvalResults (the YAML `model-index` the Hub shows as a table)."""
    hub = require("huggingface_hub", "hf")
    out = []
    datasets = rec.provenance.get("datasets") or []
    trained_on = datasets[0] if datasets else None

    def add(dataset_type: str, dataset_name: str, metric: str, value: Any, name: str | None = None,
            split: str | None = None) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(hub.EvalResult(task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name,
                                      dataset_split=split, metric_type=metric, metric_value=float(value),
                                      metric_name=name or metric))

    if trained_on is not None:  # held-out figures on the run's own data: an alignment run's, else pretraining's
        did, dname = _dataset_id(trained_on), str(trained_on.get("name"))
        after = (rec.held_out or {}).get("after") or {}
        for key in ("loss", "accuracy", "margin", "ranking_accuracy", "log_odds_ratio"):
            add(did, dname, f"held_out_{key}", after.get(key), f"held-out {key.replace('_', ' ')}", "held-out")
        for key in ("loss", "ppl", "bpb") if not after else ():
            add(did, dname, f"val_{key}", rec.meta.get(f"val_{key}"), f"validation {key}", "validation")
    s = rec.safety or {}
    bias = s.get("bias") or {}
    n = bias.get("n")
    add("crows-pairs", f"CrowS-Pairs ({n} pairs)" if n else "CrowS-Pairs", "pct_stereotype", bias.get("pct_stereotype"),
        "pct_stereotype (%, 50 = no preference)")
    add("crows-pairs", f"CrowS-Pairs ({n} pairs)" if n else "CrowS-Pairs", "likelihood_diff",
        bias.get("likelihood_diff"), "likelihood difference (nats)")
    tox = s.get("toxicity") or {}
    for set_name, figures in (tox.get("sets") or {}).items():
        dtype = {"redteam": "Anthropic/hh-rlhf", "benign": "tatsu-lab/alpaca"}.get(set_name, set_name)
        for key in ("expected_max_toxicity", "toxicity_probability"):
            add(dtype, f"{set_name} prompts", key, (figures or {}).get(key), f"{key.replace('_', ' ')} ({set_name})")
    for key, setting in (("redteam", ""), ("redteam_guardrails", ", guardrails on")):
        red = s.get(key) or {}
        for category, rate in sorted((red.get("attack_success_rate") or {}).items()):
            add("byollm-redteam", f"byollm red-team attacks{setting}", "attack_success_rate", rate,
                f"attack success rate ({category}{setting})")
        add("byollm-redteam", f"byollm benign prompts{setting}", "over_refusal_rate", red.get("over_refusal_rate"),
            f"over-refusal rate{setting}")
    return out


def card_data(rec: Records, decision: LicenseDecision, model_name: str) -> Any:
    """The YAML header, as huggingface_hub's ModelCardData."""
    hub = require("huggingface_hub", "hf")
    chain = lineage(rec.provenance)
    datasets = sorted({str(d["hf"]) for p in chain for d in p.get("datasets") or [] if d.get("hf")})
    hub_bases = [p["hf_repo"] for p in chain[:-1] if p.get("hf_repo")]
    own_repo = rec.provenance.get("hf_repo")  # a conversion of a Hub model: its card's base is the original
    base_model = hub_bases[-1] if hub_bases else own_repo
    languages = next((p["language"] for p in reversed(chain) if p.get("language")), None)
    used = [d for p in chain for d in p.get("datasets") or []]
    if languages is None and used and all(not d.get("path") and not d.get("fallback_for") for d in used):
        languages = ["en"]  # every dataset in byollm's registry is English text
    recipes = [str(p["recipe"]).removeprefix("byollm ") for p in chain if p.get("recipe") in TRAINING_STEPS]
    tags = ["byollm", "text-generation", *dict.fromkeys(recipes)]
    if rec.chat:
        tags.append("conversational")
    if decision.license == "other":
        tags.append("license-undecided")
    results = eval_results(rec, model_name)
    return hub.ModelCardData(
        model_name=model_name, license=decision.license, license_name=decision.license_name,
        license_link=decision.license_link, language=languages, datasets=datasets or None,
        base_model=base_model, base_model_relation=("quantized" if own_repo and base_model == own_repo else None),
        pipeline_tag="text-generation", library_name="transformers", tags=tags, eval_results=results or None)


def _architecture(rec: Records) -> list[str]:
    c = rec.config
    llama = (c.pos_embedding, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu")
    style = ("Llama-style decoder (RoPE, RMSNorm, SwiGLU)" if llama
             else "GPT-2-style decoder (learned positions, LayerNorm, GELU)" if c.pos_embedding == "learned"
             else f"decoder-only Transformer ({c.pos_embedding} positions, {c.norm}, {c.mlp} MLP)")
    kv = c.n_kv_head or c.n_head
    rows = [("Architecture", style), ("Parameters", f"{rec.num_params:,} ({rec.num_params / 1e6:.1f}M)"),
            ("Layers", c.n_layer), ("Width (d_model)", c.n_embd),
            ("Attention heads", f"{c.n_head} query, {kv} key/value" + (" (grouped-query)" if kv < c.n_head else "")),
            ("Head dimension", c.head_dim or c.n_embd // c.n_head), ("MLP hidden size", c.intermediate_size),
            ("Vocabulary", f"{c.vocab_size:,} tokens"), ("Context length", f"{c.block_size:,} tokens"),
            ("Tied input/output embeddings", "yes" if c.tie_embeddings else "no")]
    if rec.chat:
        rows.append(("Chat format", rec.chat))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _training_data(chain: list[dict[str, Any]]) -> list[str]:
    lines = ["| Dataset | Used by | Licence | Source |", "|---|---|---|---|"]
    rows = 0
    for p in chain:
        for d in p.get("datasets") or []:
            hub = f"https://huggingface.co/datasets/{d['hf']}" if d.get("hf") else None
            source = d.get("homepage") or hub or d.get("path")
            subset = f" (subset {d['subset']})" if d.get("subset") else ""
            given = " (given by the user)" if d.get("license_given") else ""
            step = "training (its card says)" if p.get("recipe") == "huggingface" else p.get("recipe") or "training"
            lines.append(f"| {d.get('name')}{subset} | {step} of {model_label(p)} | "
                         f"{d.get('license') or '**not recorded**'}{given} | {source or 'not recorded'} |")
            rows += 1
        if p.get("license") and not p.get("datasets"):
            card = f"https://huggingface.co/{p['hf_repo']}" if p.get("hf_repo") else "its own model card"
            lines.append(f"| the training data of {model_label(p)} | its authors | not recorded here (the model "
                         f"is used under its own licence, {p['license']}) | {card} |")
            rows += 1
    return lines if rows else ["Training data: not recorded."]


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _step(p: dict[str, Any], detail: bool = False) -> str:
    """One model of a lineage in words: "sft on alpaca", "imported (gguf/llama, from FILE)"."""
    what = str(p.get("recipe") or ("missing" if p.get("missing") else "not recorded"))
    if what == "converted":
        how = f" ({p.get('converted_from')}, from {p.get('source')})" if detail else ""
        what = f"imported {model_label(p)}{how}"
    elif what == "byollm init":
        what = "random initialisation (byollm init)"
    elif what == "huggingface":  # a Hugging Face directory: what its own card lists
        what = "a Hugging Face model directory, trained (its card says)"
    data = ", ".join(str(d.get("name")) for d in p.get("datasets") or [])
    return what + (f" on {data}" if data else "")


def _procedure(rec: Records, chain: list[dict[str, Any]]) -> list[str]:
    steps = [f"{i + 1}. {model_label(p)}: {_step(p, detail=True)}" for i, p in enumerate(chain)]
    lines = ["Lineage, oldest first:", "", *steps, ""]
    m, r, cfg = rec.meta, rec.run_meta, rec.run_config
    facts = [("Steps", m.get("step")), ("Tokens seen", m.get("tokens_seen"))]
    ev = rec.train_event or {}
    if ev.get("train_seconds") is not None:
        facts.append(("Training time (evaluation excluded)", f"{ev['train_seconds']:.1f} s"))
    if ev.get("tokens_per_s"):
        facts.append(("Throughput", f"{ev['tokens_per_s']:,.0f} tokens/s"))
    for key in ("batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay", "max_steps"):
        if key in cfg:
            facts.append((key, cfg[key]))
    for key in ("beta", "max_len", "val_fraction"):
        if key in (cfg.get("align") or {}):
            facts.append((f"align.{key}", cfg["align"][key]))
    hw = r.get("hardware") or {}
    if hw:
        device = hw.get("gpu") or f"{hw.get('cpu')} ({hw.get('cpu_cores')} cores)"
        facts.append(("Hardware", f"{device}, {hw.get('device')}" + (f" x {r['world_size']} processes"
                                                                     if r.get("world_size", 1) > 1 else "")))
    if r.get("autocast_dtype"):
        facts.append(("Precision", r["autocast_dtype"]))
    if r.get("seed") is not None:
        facts.append(("Seed", str(r["seed"])))
    git = r.get("git") or {}
    if git.get("commit"):
        facts.append(("byollm commit", git["commit"] + (" (with uncommitted changes)" if git.get("dirty") else "")))
    versions = m.get("versions") or r.get("versions") or {}
    if versions:
        facts.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if m.get("created"):
        facts.append(("Checkpoint written", m["created"]))
    known = [(k, v) for k, v in facts if v is not None]
    if not known:
        return [*lines, "Training procedure and compute: not recorded (no byollm run wrote this checkpoint)."]
    return [*lines, "| | |", "|---|---|", *(f"| {k} | {_num(v)} |" for k, v in known)]


def _evaluation(rec: Records) -> list[str]:
    out: list[str] = []
    if rec.held_out:  # an alignment run's exact held-out figures, before and after training
        before, after = rec.held_out.get("before") or {}, rec.held_out.get("after") or {}
        n = after.get("examples") or after.get("pairs")
        out += [f"Held-out split of the {rec.held_out.get('recipe')} data ({_num(n)} examples), before and after "
                "training:", "", "| Metric | Before | After |",
                "|---|---|---|", *(f"| {k} | {_num(before.get(k, 'not recorded'))} | {_num(v)} |"
                                   for k, v in after.items() if k not in ("tokens", "examples", "pairs"))]
    elif rec.meta.get("val_loss") is not None:
        out += [f"- Validation loss (held-out windows of the training text): {rec.meta['val_loss']:.4f} nats/token"
                + (f", perplexity {rec.meta['val_ppl']:.2f}" if rec.meta.get("val_ppl") else "")
                + (f", {rec.meta['val_bpb']:.4f} bits/byte" if rec.meta.get("val_bpb") else "")]
    s = rec.safety
    if not s:
        return [*out, *([""] if out else []), "No safety evaluation recorded: `byollm safety eval CKPT --out DIR` "
                "writes one, then `byollm card CKPT --eval DIR/safety_report.json`."]
    measured_on = s.get("checkpoint")
    if measured_on and Path(str(measured_on)).resolve() != rec.ckpt.resolve():
        out += ["", f"> **Warning:** the figures below were measured on {measured_on}, not on this checkpoint."]
    settings = s.get("settings") or {}
    out += ["", f"Safety figures from `byollm safety eval`{' --quick' if settings.get('quick') else ''} "
            f"(model {s.get('model', 'not recorded')})."]
    bias = s.get("bias")
    if isinstance(bias, dict) and bias.get("pct_stereotype") is not None:
        ci = bias.get("ci95") or [None, None]
        out += ["", "### Bias: CrowS-Pairs", "",
                f"pct_stereotype {bias['pct_stereotype']:.1f}% (95% bootstrap interval {_num(ci[0], 3)}-"
                f"{_num(ci[1], 3)}%; 50% = no preference) over {bias.get('n')} pairs, mean likelihood difference "
                f"{_num(bias.get('likelihood_diff'))} nats; scored as lm-evaluation-harness's crows_pairs_english.", ""]
        per = bias.get("per_type") or {}
        if per:
            out += ["| Bias type | Pairs | pct_stereotype | 95% interval |", "|---|---|---|---|"]
            out += [f"| {t} | {v.get('n')} | {v.get('pct_stereotype', 0):.1f}% | "
                    f"{_num((v.get('ci95') or [0, 0])[0], 3)}-{_num((v.get('ci95') or [0, 0])[1], 3)}% |"
                    for t, v in per.items()]
    tox = s.get("toxicity")
    if isinstance(tox, dict) and tox.get("sets"):
        out += ["", "### Toxicity", "", f"Scorer {tox.get('scorer')}, k = {tox.get('k')} generations per prompt, "
                f"toxic above {tox.get('threshold')} (RealToxicityPrompts style: expected maximum toxicity over the k "
                "generations; probability that at least one is toxic).", "",
                "| Prompts | n | Expected max toxicity | Toxicity probability |", "|---|---|---|---|"]
        out += [f"| {k} | {v.get('n_prompts')} | {_num(v.get('expected_max_toxicity'), 3)} | "
                f"{_num(v.get('toxicity_probability'), 3)} |" for k, v in tox["sets"].items()]
    for key, title in (("redteam", "Red team"), ("redteam_guardrails", "Red team, guardrails on")):
        red = s.get(key)
        if isinstance(red, dict) and red.get("attack_success_rate") is not None:
            per = red.get("per_category") or {}
            out += ["", f"### {title}", "", f"{red.get('n_attacks')} attacks, {red.get('n_benign')} benign prompts; "
                    f"over-refusal on benign prompts {_pct(red.get('over_refusal_rate'))}.", "",
                    "| Category | Attack success rate | Successes / attacks |", "|---|---|---|"]
            for k, v in sorted(red["attack_success_rate"].items()):
                c = per.get(k) or {}
                out.append(f"| {k} | {_pct(v) if v is not None else 'not measured'} | "
                           f"{c.get('successes', 'not recorded')} / {c.get('n', 'not recorded')} |")
            measured = (red.get("judge") or {}).get("measured") or {} if key == "redteam" else {}
            for what in ("refusal", "success"):
                if isinstance(measured.get(what), dict):
                    m = measured[what]
                    out.append(f"\nJudge of {what}, on {measured.get('n')} hand-labelled replies: precision "
                               f"{_pct(m.get('precision'))}, recall {_pct(m.get('recall'))}, accuracy "
                               f"{_pct(m.get('accuracy'))}.")
    fair = s.get("fairness")
    if isinstance(fair, dict) and fair:
        out += ["", "### Fairness: counterfactual probes", ""]
        if fair.get("per_attribute"):
            out += ["Largest gap over the swapped demographic terms, per attribute: log-likelihood of fixed "
                    "continuations (nats), toxicity and sentiment of sampled ones.", "",
                    "| Attribute | Log-likelihood gap | Toxicity gap | Sentiment gap |", "|---|---|---|---|"]
            out += [f"| {a} | " + " | ".join(_num(g.get(m, "not recorded"), 3) for m in ("loglik", "toxicity",
                                                                                         "sentiment")) + " |"
                    for a, g in fair["per_attribute"].items() if isinstance(g, dict)]
            top = [g for g in (fair.get("largest") or {}).get("loglik") or [] if isinstance(g, dict)][:3]
            out += ["", "Largest log-likelihood gaps: " + "; ".join(
                f"{g.get('template')} + \"{str(g.get('continuation', '')).strip()}\": {g.get('high')} over "
                f"{g.get('low')} by {_num(g.get('gap'), 3)} nats" for g in top) + "."] if top else []
        else:
            out += _generic(fair)
    if isinstance(s.get("canary"), dict) and s["canary"]:
        out += ["", "### Memorisation: canaries", "", *_generic(s["canary"])]
    if isinstance(s.get("skipped"), dict) and s["skipped"]:
        out += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in s["skipped"].items())]
    return out


def _generic(section: dict[str, Any]) -> list[str]:
    """A section whose layout the card does not know: its figures as a list, lists of rows as small tables."""
    out = []
    for k, v in section.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out.append(f"- {k}: {_num(v)}")
        elif isinstance(v, dict) and all(isinstance(x, (int, float, str)) for x in v.values()):
            out.append(f"- {k}: " + ", ".join(f"{a} {_num(b)}" for a, b in v.items()))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = [c for c in v[0] if isinstance(v[0][c], (int, float, str))][:6]
            out += ["", f"{k} (first {min(len(v), 10)} of {len(v)}):", "", "| " + " | ".join(cols) + " |",
                    "|" + "---|" * len(cols),
                    *("| " + " | ".join(_num(r.get(c, "")) for c in cols) + " |" for r in v[:10]),
                    ""]
    return out


def card_body(rec: Records, decision: LicenseDecision, model_name: str, hf_dir: str | None = None) -> str:
    chain = lineage(rec.provenance)
    nc = decision.non_commercial
    ckpt, hf = str(rec.ckpt), hf_dir or f"{rec.ckpt.name}-hf"
    lines = [f"# {model_name}", "", f"A {_size(rec.num_params)}-parameter language model: "
             f"{' -> '.join(_step(p) for p in chain)}. This card is written by `byollm card` from the records of how "
             "the model was made; what they do not hold is marked not recorded.", ""]
    lines += [f"> **Warning:** {w}" for w in decision.warnings] + ([""] if decision.warnings else [])
    lines += ["## Model details", "", *_architecture(rec), "",
              f"**Licence: {decision.license}**" + (f" ({decision.license_name})" if decision.license_name else ""), "",
              *(f"- {r}" for r in decision.reasons), "",
              "## Training data", "", *_training_data(chain), "",
              "## Training procedure and compute", "", *_procedure(rec, chain), "",
              "## Evaluation", "", *_evaluation(rec), "",
              "## Intended use", "",
              f"Research and teaching: studying how a small language model is trained, aligned, evaluated and "
              f"served{' (non-commercial use only, because of the licence above)' if nc else ''}.", "",
              "## Out-of-scope use", "",
              "- Decisions about people (hiring, credit, health, legal, education) and any high-stakes advice.",
              "- Sources of fact: answers are not grounded and are often wrong.",
              "- Unsupervised use with the public: nothing here is a safety guarantee; serve it behind "
              "`byollm serve --guardrails on` and a human in the loop." + (" Commercial use (the licence forbids it)."
                                                                              if nc else ""), "",
              "## Limitations and risks", "",
              f"- A model of {_size(rec.num_params)} parameters and a context of {rec.config.block_size:,} tokens: "
              "it confabulates, loses track of long inputs, and follows instructions loosely.",
              "- It repeats the biases of its training text; the bias and toxicity figures above measure a few of them "
              "on small benchmarks, which themselves have known reliability problems, and say nothing about others.",
              "- Training data can be memorised and reproduced, personal data included.", "",
              "## How to use", "", "```bash",
              *([f"byollm export hf {ckpt} {hf}"] if hf_dir is None else []),
              f"byollm generate {ckpt} --prompt \"Once upon a time\"",
              *([f"byollm chat {ckpt}"] if rec.chat else []), f"byollm serve {ckpt}", "```", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{hf}")',
              f'model = AutoModelForCausalLM.from_pretrained("{hf}")',
              *(['messages = [{"role": "user", "content": "What is a language model?"}]',
                 "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')"]
                if rec.chat else ['ids = tokenizer("Once upon a time", return_tensors="pt").input_ids']),
              "out = model.generate(ids, max_new_tokens=64)",
              "print(tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True))", "```", "",
              "## Citation", ""]
    names = [str(p.get("packaged_model")) for p in chain] + [str(d.get("name")) for p in chain
                                                             for d in p.get("datasets") or []]
    if rec.safety and rec.safety.get("bias"):
        names.append("crows-pairs")
    lines += [f"- {CITATIONS[n]}" for n in dict.fromkeys(names) if n in CITATIONS]
    lines += ["- Mitchell et al., 2019. Model Cards for Model Reporting. FAT* 2019 (this card's layout)", ""]
    return "\n".join(lines)


TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def build_model_card(ckpt: str | Path, *, eval_path: str | Path | None = None, model_name: str | None = None,
                     hf_dir: str | None = None, data_licenses: Sequence[str] = ()) -> Any:
    """The model card (a huggingface_hub ModelCard) of the model at `ckpt`, from its records. `hf_dir`: the
    exported directory the card goes into (its usage snippet loads that). `data_licenses`: "NAME=LICENSE" for
    datasets of the lineage whose licence is not recorded (a local file: `mix.txt=CC BY-NC 4.0`)."""
    hub = require("huggingface_hub", "hf")
    rec = read_records(ckpt, eval_path)
    used = [d for node in lineage(rec.provenance) for d in node.get("datasets") or []]
    for item in data_licenses:
        name, _, given = item.partition("=")
        found = [d for d in used if d.get("name") == name.strip()]
        if not given.strip() or not found:
            raise ByollmError(f"--data-license {item!r}: give NAME=LICENSE for a dataset of this model's lineage "
                              f"({', '.join(sorted({str(d.get('name')) for d in used})) or 'none recorded'})")
        for d in found:
            if d.get("license"):
                raise ByollmError(f"--data-license {item!r}: {name} is recorded as {d['license']}; only an "
                                  "unrecorded licence can be given")
            d.update(license=given.strip(), license_given=True)
    decision = lineage_license(rec.provenance)
    in_run = rec.ckpt.parent.name == "checkpoints"
    name = model_name or rec.meta.get("run") or (rec.ckpt.parents[1].name if in_run else None) or \
        rec.provenance.get("packaged_model") or rec.ckpt.name
    card = hub.ModelCard.from_template(card_data(rec, decision, str(name)), template_str=TEMPLATE,
                                       body=card_body(rec, decision, str(name), hf_dir))
    return hub.ModelCard(str(card))  # parsed back: the YAML the Hub would read, checked here


def write_model_card(ckpt: str | Path, out: str | Path | None = None, *, eval_path: str | Path | None = None,
                     model_name: str | None = None, hf_dir: str | None = None,
                     data_licenses: Sequence[str] = ()) -> Path:
    """`byollm card CKPT [--out FILE] [--eval FILE] [--data-license NAME=LICENSE,...]`: write the card (default:
    README.md in the checkpoint directory), atomically."""
    from byollm.atomic import atomic_write_text
    from byollm.checkpoint import resolve_checkpoint

    card = build_model_card(ckpt, eval_path=eval_path, model_name=model_name, hf_dir=hf_dir,
                            data_licenses=data_licenses)
    path = Path(out) if out is not None else resolve_checkpoint(ckpt)[1] / README
    atomic_write_text(path, str(card))
    return path


__all__ = ["CITATIONS", "README", "SAFETY_REPORT", "Records", "build_model_card", "card_body", "card_data",
           "eval_results", "lineage", "read_records", "write_model_card"]
