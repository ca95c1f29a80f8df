"""Counterfactual fairness probes: the same prompt with only the demographic term swapped (guide section 7).

For each template of `fairness_templates` and each attribute (gender, ethnicity, religion, age, nationality),
every term of the attribute fills the template's slot, and two things are compared across the terms:

1. **Log-likelihood gaps.** For each fixed continuation c (" a nurse", " violent", ...), log p(c | prompt with
   term t) is the sum of the log-softmax of c's tokens after the prompt. The gap is max_t - min_t, in nats: a
   gap of 1.0 means the model finds c e^1 = 2.7 times likelier after one group than after another.
   Deterministic, cheap and needs no scorer. A rare term lowers every continuation's likelihood alike, so the
   probe also reports the in-set gap: c's log-probability among the template's continuations only,
   log p(c | t) - log sum_c' p(c' | t), which cancels that shift.
2. **Generation gaps.** k continuations are sampled (seeded) from each filled prompt as plain text; each is
   scored for toxicity (a `byollm.safety.toxicity` scorer) and for sentiment (VADER's compound score in [-1, 1],
   a lexicon and rules tuned on social-media text). The gap is the difference between the highest and lowest
   per-term mean.

The largest gaps are reported with the template, attribute and the two terms. What this cannot say: a gap on a
handful of templates is evidence of an association, not a measure of harm; a small gap means only these probes
found none. Sampled gaps carry sampling noise (k continuations per term): compare them with the gap between
repeated seeds before reading much into them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from byollm.errors import ByollmError, require
from byollm.safety.bias import continuation_logprobs
from byollm.safety.fairness_templates import ATTRIBUTES, TEMPLATES, Template

DEFAULT_K = 4
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass
class Gap:
    """The spread of one measured quantity across an attribute's terms for one template."""

    template: str
    attribute: str
    metric: str  # "loglik" or "loglik_in_set" (with `continuation`), "toxicity" or "sentiment"
    gap: float  # value(high) - value(low) >= 0
    high: str  # the term with the largest value
    low: str  # the term with the smallest value
    values: dict[str, float]  # per term
    continuation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"template": self.template, "attribute": self.attribute, "metric": self.metric, "gap": self.gap,
               "high": self.high, "low": self.low, "values": self.values}
        if self.continuation is not None:
            out["continuation"] = self.continuation
        return out


def spread(template: str, attribute: str, metric: str, values: Mapping[str, float],
           continuation: str | None = None) -> Gap:
    """The Gap of `values` (term -> value): its max minus its min, and which terms they are."""
    high = max(values, key=values.__getitem__)
    low = min(values, key=values.__getitem__)
    return Gap(template, attribute, metric, values[high] - values[low], high, low, dict(values), continuation)


@dataclass
class FairnessResult:
    loglik: list[Gap]
    generation: list[Gap]
    settings: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)  # filled prompt -> its sampled continuations

    def largest(self, metric: str, n: int = 5) -> list[Gap]:
        pool = [g for g in [*self.loglik, *self.generation] if g.metric == metric]
        return sorted(pool, key=lambda g: g.gap, reverse=True)[:n]

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(g.metric for g in [*self.loglik, *self.generation]))

    def per_attribute(self) -> dict[str, dict[str, float]]:
        """The largest gap of each metric, per attribute."""
        out: dict[str, dict[str, float]] = {}
        for g in [*self.loglik, *self.generation]:
            row = out.setdefault(g.attribute, {})
            row[g.metric] = max(row.get(g.metric, 0.0), g.gap)
        return out

    def to_dict(self, n: int = 5) -> dict[str, Any]:
        return {"settings": self.settings, "per_attribute": self.per_attribute(),
                "largest": {m: [g.to_dict() for g in self.largest(m, n)] for m in self.metrics()}}


# --------------------------------------------------------------------------------------------------
# Log-likelihood of continuations
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_loglikelihoods(model: torch.nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]], *,
                                batch_size: int = 32) -> list[float]:
    """log p(continuation | context) for each (context, continuation): the sum of the log-softmax of the
    continuation's tokens, the context and the continuation each encoded on their own, in fp32. No bos token is
    added (as lm-eval's HF model does for a non-empty context): SmolLM2's bos is <|im_start|>, which would turn
    the plain sentence into a chat turn. Right-padded batches: a causal model never looks at the padding to its
    right."""
    encoded = [(tokenizer.encode(c), tokenizer.encode(x)) for c, x in requests]
    for context, continuation in encoded:
        if not context or not continuation:
            raise ByollmError("a fairness probe needs a non-empty context and continuation")
    return continuation_logprobs(model, encoded, batch_size=batch_size)


def loglik_gaps(model: torch.nn.Module, tokenizer: Any, templates: Sequence[Template] = TEMPLATES,
                attributes: Mapping[str, Sequence[str]] = ATTRIBUTES, *, batch_size: int = 32) -> list[Gap]:
    """Two Gaps per (template, attribute, continuation) across the terms: "loglik", log p(c | template filled with
    the term), and "loglik_in_set", log p(c | term) - log sum_c' p(c' | term) over the template's continuations.

    The second is the share of c among the template's options: a rare term ("a non-binary person") lowers the
    likelihood of every continuation alike, which moves the raw gap but not the in-set one; what is left is
    the model preferring c for one group over another."""
    keys = [(t, a, term, c) for t in templates for a, terms in attributes.items() for term in terms
            for c in t.continuations]
    lls = continuation_loglikelihoods(model, tokenizer, [(t.fill(term), c) for t, _, term, c in keys],
                                      batch_size=batch_size)
    table: dict[tuple[str, str, str], dict[str, float]] = {}
    totals: dict[tuple[str, str, str], list[float]] = {}  # (template, attribute, term) -> every continuation's ll
    for (t, a, term, c), ll in zip(keys, lls, strict=True):
        table.setdefault((t.id, a, c), {})[term] = ll
        totals.setdefault((t.id, a, term), []).append(ll)
    norm = {key: torch.tensor(v, dtype=torch.float64).logsumexp(0).item() for key, v in totals.items()}
    return [*(spread(t, a, "loglik", v, c) for (t, a, c), v in table.items()),
            *(spread(t, a, "loglik_in_set", {term: ll - norm[(t, a, term)] for term, ll in v.items()}, c)
              for (t, a, c), v in table.items())]


# --------------------------------------------------------------------------------------------------
# Toxicity and sentiment of generated continuations
# --------------------------------------------------------------------------------------------------


def vader_sentiment(texts: Sequence[str]) -> list[float]:
    """VADER's compound sentiment of each text, in [-1, 1] (negative below 0)."""
    vader = require("vaderSentiment.vaderSentiment", "safety")
    analyzer = vader.SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def generation_gaps(samples: Mapping[tuple[str, str, str], Sequence[str]], scorer: Any | None = None) -> list[Gap]:
    """Gaps of the per-term mean sentiment (and toxicity, with a scorer) of generated texts.

    samples: (template id, attribute, term) -> that filled prompt's continuations."""
    keys = list(samples)
    flat = [s for k in keys for s in samples[k]]
    metrics = {"sentiment": vader_sentiment(flat)}
    if scorer is not None:
        metrics["toxicity"] = scorer.score(flat)
    gaps = []
    for metric, scores in metrics.items():
        table: dict[tuple[str, str], dict[str, float]] = {}
        at = 0
        for t, a, term in keys:
            n = len(samples[(t, a, term)])
            if n == 0:
                raise ByollmError(f"no continuations for template {t!r} with {term!r}")
            table.setdefault((t, a), {})[term] = sum(scores[at:at + n]) / n
            at += n
        gaps += [spread(t, a, metric, v) for (t, a), v in table.items()]
    return gaps


def sample_probes(model: torch.nn.Module, tokenizer: Any, templates: Sequence[Template] = TEMPLATES,
                  attributes: Mapping[str, Sequence[str]] = ATTRIBUTES, *, k: int = DEFAULT_K,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0,
                  batch_size: int = 48) -> dict[tuple[str, str, str], list[str]]:
    """k sampled plain-text continuations (temperature 1, top-p 0.9, seeded) of every filled template (no bos
    token, as for the log-likelihoods)."""
    from byollm.safety.toxicity import sample_continuations

    keys = [(t, a, term) for t in templates for a, terms in attributes.items() for term in terms]
    texts = sample_continuations(model, tokenizer, [t.fill(term) for t, _, term in keys], k=k,
                                 max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, chat=False,
                                 bos=False)
    return {(t.id, a, term): cs for (t, a, term), cs in zip(keys, texts, strict=True)}


def fairness_probe(model: torch.nn.Module, tokenizer: Any, *, templates: Sequence[Template] = TEMPLATES,
                   attributes: Mapping[str, Sequence[str]] = ATTRIBUTES, k: int = DEFAULT_K,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, scorer: Any | str | None = "auto",
                   generate: bool = True, batch_size: int = 32) -> FairnessResult:
    """Both probes on every template x attribute; k=0 or generate=False runs only the log-likelihood gaps."""
    from byollm.safety.toxicity import get_scorer

    with torch.inference_mode():
        ll = loglik_gaps(model, tokenizer, templates, attributes, batch_size=batch_size)
    settings: dict[str, Any] = {"templates": len(templates), "attributes": {a: list(t) for a, t in attributes.items()},
                                "k": 0, "max_new_tokens": max_new_tokens, "seed": seed, "scorer": None}
    gen: list[Gap] = []
    samples: dict[str, list[str]] = {}
    if generate and k > 0:
        scorer = get_scorer(scorer) if isinstance(scorer, str) else scorer
        drawn = sample_probes(model, tokenizer, templates, attributes, k=k, max_new_tokens=max_new_tokens,
                              seed=seed)
        gen = generation_gaps(drawn, scorer)
        by_id = {t.id: t for t in templates}
        samples = {by_id[t].fill(term): cs for (t, _, term), cs in drawn.items()}
        settings.update(k=k, scorer=getattr(scorer, "name", None))
    return FairnessResult(ll, gen, settings, samples)


def format_fairness(result: FairnessResult, n: int = 5) -> str:
    """The largest gap per attribute and metric, then the n largest gaps of each metric."""
    per = result.per_attribute()
    metrics = result.metrics()
    lines = [f"{'attribute':<12}" + "".join(f"{m:>15}" for m in metrics)]
    for a, row in sorted(per.items()):
        lines.append(f"{a:<12}" + "".join(f"{row.get(m, float('nan')):>15.3f}" for m in metrics))
    for m in metrics:
        lines.append(f"largest {m} gaps" + (" (nats)" if m.startswith("loglik") else ""))
        for g in result.largest(m, n):
            what = f"{g.template}{g.continuation!r}" if g.continuation else g.template
            lines.append(f"  {g.gap:7.3f}  {g.attribute:<11} {what:<40} {g.high} > {g.low}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# `byollm safety fairness CKPT` (the parser is byollm.cli's; these are its options and what it prints)
# --------------------------------------------------------------------------------------------------


FAIRNESS_DESCRIPTION = (
    "Counterfactual fairness probes: templates written for byollm filled with each term of an attribute (gender, "
    "ethnicity, religion, age, nationality); the gap across terms of log p(continuation | prompt) for fixed "
    "continuations, and of the mean toxicity and VADER sentiment of k sampled continuations; the largest gaps listed.")


def add_fairness_arguments(p: Any) -> None:
    """The options of `byollm safety fairness` on a jsonargparse parser."""
    p.add_argument("ckpt", type=str, help="checkpoint: byollm, run directory or Hugging Face directory")
    p.add_argument("--k", type=int, default=DEFAULT_K,
                   help="sampled continuations per filled template (0: log-likelihood gaps only)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="tokens per continuation")
    p.add_argument("--scorer", type=str, default="auto", help="toxicity scorer: auto, profanity or detoxify")
    p.add_argument("--top", type=int, default=5, help="how many of the largest gaps to list per metric")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")
    p.add_argument("--json", action="store_true", help="print one JSON object (settings, per_attribute, largest)")


def run_fairness_cli(a: Any) -> FairnessResult:
    """Load the checkpoint (fp32), run both probes, print a table or one JSON object."""
    import json

    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(a.ckpt, device=a.device, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise ByollmError(f"{loaded.path} has no tokenizer; the fairness probes need one to read the templates")
    result = fairness_probe(loaded.model.eval(), loaded.tokenizer, k=a.k, max_new_tokens=a.max_new_tokens,
                            seed=a.seed, scorer=a.scorer)
    print(json.dumps(result.to_dict(a.top), ensure_ascii=False) if a.json else format_fairness(result, a.top))
    return result
