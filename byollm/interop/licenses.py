"""Licences along a model's lineage: what a model trained from datasets and base models may be licensed as.

The licence rule (`combine_licenses`): a model's licence must allow what every input's licence requires, so it is
the most restrictive combination of its inputs, walked along the lineage (base model -> fine-tune -> ...):
- an imported model (a packaged GGUF, `convert from-hf`/`from-gguf` with a licence) keeps its own licence: its
  authors already settled what their training data allowed;
- public-domain data adds nothing; permissive licences (MIT, Apache-2.0, CC BY, ODC-By) ask for attribution, which
  the card's data table gives; with a base model the base's licence stays, without one the most demanding
  permissive licence is used;
- share-alike data (CC BY-SA) makes the model CC BY-SA 4.0 (3.0 material may be adapted under 4.0);
- non-commercial data (Alpaca: CC BY-NC 4.0) makes the model non-commercial, `cc-by-nc-4.0` (Apache-2.0 and MIT
  bases allow a derivative under more restrictive terms, their notices kept);
- what cannot be combined (non-commercial with share-alike, a no-derivatives input, a custom base licence with
  restrictive data) and anything unknown gives `license: other` and a warning at the top of the card.
Whether a licence on training data binds the weights is unsettled law; the rule takes the cautious reading and says
why, line by line, so a person can decide. It is not legal advice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_LICENSE = "mit"  # byollm's own licence: for weights whose inputs restrict nothing (a random initialisation)

# Licence spellings (the registry's, packages', GGUF files') -> (the Hub's identifier, category). Categories, least
# to most restrictive: public < permissive < sharealike < noncommercial; "nc-sa" is both, "nd" forbids adaptation,
# "custom" is a model licence of its own (kept for the model, combinable with nothing restrictive).
LICENSES: dict[str, tuple[str, str]] = {
    "public-domain": ("cc0-1.0", "public"), "cc0-1.0": ("cc0-1.0", "public"), "unlicense": ("unlicense", "public"),
    "apache-2.0": ("apache-2.0", "permissive"), "mit": ("mit", "permissive"), "cc-by-4.0": ("cc-by-4.0", "permissive"),
    "cc-by-3.0": ("cc-by-3.0", "permissive"), "odc-by": ("odc-by", "permissive"),
    "odc-by-1.0": ("odc-by", "permissive"),
    "bsd-3-clause": ("bsd-3-clause", "permissive"), "bsd-2-clause": ("bsd-2-clause", "permissive"),
    "psf-2.0": ("psf-2.0", "permissive"),
    "cc-by-sa-3.0": ("cc-by-sa-3.0", "sharealike"), "cc-by-sa-4.0": ("cc-by-sa-4.0", "sharealike"),
    "cc-by-nc-4.0": ("cc-by-nc-4.0", "noncommercial"), "cc-by-nc-3.0": ("cc-by-nc-3.0", "noncommercial"),
    "cc-by-nc-sa-4.0": ("cc-by-nc-sa-4.0", "nc-sa"), "cc-by-nc-nd-4.0": ("cc-by-nc-nd-4.0", "nd"),
    "cc-by-nd-4.0": ("cc-by-nd-4.0", "nd"),
    "llama2": ("llama2", "custom"), "llama3": ("llama3", "custom"), "llama3.1": ("llama3.1", "custom"),
    "llama3.2": ("llama3.2", "custom"), "gemma": ("gemma", "custom"), "openrail": ("openrail", "custom"),
}
# Without a base model, several permissive licences resolve to the most demanding (patent and change notices first).
PERMISSIVE_ORDER = ("apache-2.0", "cc-by-4.0", "odc-by", "cc-by-3.0", "psf-2.0", "mit", "bsd-3-clause", "bsd-2-clause")
NOT_ON_THE_HUB = {"psf-2.0": "https://docs.python.org/3/license.html"}  # (the fallback corpus: Python's docs)
LICENSE_LINKS = {"cc-by-nc-4.0": "https://creativecommons.org/licenses/by-nc/4.0/",
                 "cc-by-nc-sa-4.0": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
                 "cc-by-sa-4.0": "https://creativecommons.org/licenses/by-sa/4.0/"}

def normalise_license(text: str | None) -> str | None:
    """The Hub's identifier of a licence name ("CC BY-NC 4.0" -> "cc-by-nc-4.0"), or None when unknown."""
    if not text:
        return None
    key = str(text).strip().lower().replace(" ", "-").replace("_", "-")
    return LICENSES[key][0] if key in LICENSES else None


@dataclass(frozen=True)
class LicenseInput:
    what: str  # "dataset alpaca", "base model smollm2-135m-instruct"
    license: str | None  # as recorded (None: unknown)
    role: str = "data"  # "data", "base" (the licence a base model's card decided) or "own" (an imported model's)


@dataclass
class LicenseDecision:
    license: str  # the Hub's identifier, or "other"
    reasons: list[str] = field(default_factory=list)  # why, one line per input or rule
    warnings: list[str] = field(default_factory=list)  # shown at the top of the card
    license_name: str | None = None  # with "other": a short slug (the Hub asks for one)
    license_link: str | None = None

    @property
    def non_commercial(self) -> bool:
        return "-nc" in self.license or any("non-commercial" in r for r in self.reasons)


def combine_licenses(inputs: Sequence[LicenseInput]) -> LicenseDecision:
    """The licence of a model made from `inputs` (see the module docstring for the rule), with its reasons."""
    reasons, warnings = [], []
    known: list[tuple[LicenseInput, str, str]] = []
    for i in inputs:
        hf = normalise_license(i.license)
        if hf is None:
            hint = " (give it with `byollm card --data-license NAME=LICENSE`)" if i.role == "data" else ""
            warnings.append(f"the licence of {i.what} is {'not recorded' if not i.license else repr(i.license)}: "
                            f"unknown, so the model's licence cannot be decided{hint}")
            continue
        category = next(c for k, (h, c) in LICENSES.items() if h == hf)
        known.append((i, hf, category))
        reasons.append(f"{i.what}: {i.license} ({category})")
    if warnings:
        return LicenseDecision("other", reasons, warnings, license_name="unknown")
    if not known:
        return LicenseDecision(DEFAULT_LICENSE, [f"no training data and no base model (an untrained model): byollm's "
                                                 f"own licence, {DEFAULT_LICENSE.upper()}"])
    cats = {c for _, _, c in known}
    own = [(i, hf) for i, hf, _ in known if i.role in ("own", "base")]
    if "nd" in cats:
        nd = ", ".join(i.what for i, _, c in known if c == "nd")
        return LicenseDecision("other", reasons, [f"{nd} forbids derivatives (ND): a model made from it may not be "
                                                  "distributed; check that licence"], license_name="conflict")
    only_own = [i for i, _, _ in known if i.role == "own"]
    if only_own and len(known) == 1:  # an imported model keeps its licence
        i, hf, _ = known[0]
        reasons.append(f"an imported model keeps its own licence: {hf}")
        return LicenseDecision(hf, reasons, license_link=None)
    nc = {"noncommercial", "nc-sa"} & cats
    sa = "sharealike" in cats
    custom = [(i, hf) for i, hf, c in known if c == "custom"]
    if custom:
        if cats <= {"custom", "public", "permissive"}:
            i, hf = custom[0]
            reasons.append(f"{i.what} has a licence of its own ({hf}); the other inputs only ask for attribution, "
                           "so it stays")
            return LicenseDecision(hf, reasons)
        return LicenseDecision("other", reasons, [f"{custom[0][0].what} has its own licence ({custom[0][1]}), which "
                                                  "cannot be combined with share-alike or non-commercial data: check "
                                                  "both licences"], license_name="conflict")
    if nc and sa:
        return LicenseDecision("other", reasons, ["non-commercial data and share-alike (CC BY-SA) data: share-alike "
                                                  "requires the same licence, non-commercial adds a restriction it "
                                                  "does not allow; the two cannot be combined"],
                               license_name="conflict")
    if nc:
        lic = "cc-by-nc-sa-4.0" if "nc-sa" in cats else "cc-by-nc-4.0"
        what = ", ".join(i.what for i, _, c in known if c in nc)
        reasons.append(f"{what} allows non-commercial use only, so the model is marked non-commercial ({lic}); a "
                       "permissive base licence (Apache-2.0, MIT) allows a derivative under more restrictive terms, "
                       "with its notices kept")
        return LicenseDecision(lic, reasons, license_link=LICENSE_LINKS[lic])
    if sa:
        reasons.append("share-alike data: the model is shared alike, CC BY-SA 4.0 (CC BY-SA 3.0 material may be "
                       "adapted under 4.0)")
        return LicenseDecision("cc-by-sa-4.0", reasons, license_link=LICENSE_LINKS["cc-by-sa-4.0"])
    if own:
        i, hf = own[0]
        reasons.append(f"the data only asks for attribution (given below), so the base model's licence stays: {hf}")
        return LicenseDecision(hf, reasons)
    permissive = [hf for _, hf, c in known if c == "permissive"]
    if not permissive:
        reasons.append(f"public-domain data restricts nothing: byollm's own licence, {DEFAULT_LICENSE.upper()}")
        return LicenseDecision(DEFAULT_LICENSE, reasons)
    lic = min(permissive, key=lambda h: PERMISSIVE_ORDER.index(h) if h in PERMISSIVE_ORDER else len(PERMISSIVE_ORDER))
    reasons.append(f"permissive data only: the most demanding of its licences, {lic}, with attribution given below")
    if lic in NOT_ON_THE_HUB:  # a licence the Hub has no identifier for: "other", named
        return LicenseDecision("other", reasons, license_name=lic, license_link=NOT_ON_THE_HUB[lic])
    return LicenseDecision(lic, reasons)


def model_label(prov: dict[str, Any]) -> str:
    """A short name for one model of a lineage."""
    name = prov.get("packaged_model") or prov.get("name") or prov.get("hf_repo")
    if name:
        return str(name)
    path = Path(str(prov.get("path") or "model"))
    return f"{path.parents[1].name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def lineage_license(prov: dict[str, Any]) -> LicenseDecision:
    """The licence decision for the model whose provenance is `prov`, walking back through its base models."""
    if prov.get("license") and prov.get("recipe") in ("converted", "huggingface", None):
        return combine_licenses([LicenseInput(f"imported model {model_label(prov)}", prov["license"], "own")])
    inputs = [LicenseInput(f"dataset {d.get('name')}", d.get("license")) for d in prov.get("datasets") or []]
    inherited: list[str] = []
    for key in ("base", "adapter"):
        parent = prov.get(key)
        if not isinstance(parent, dict):
            continue
        label = f"{'base model' if key == 'base' else 'fine-tune'} {model_label(parent)}"
        if parent.get("missing"):
            inputs.append(LicenseInput(f"{label} (not found at {parent.get('path')})", None, "base"))
            continue
        decision = lineage_license(parent)
        if decision.warnings:  # undecided upstream: the cause is named, not wrapped once per generation
            inherited += [f"{label} -> {w}" for w in decision.warnings]
        else:  # "other" without a warning is a licence the Hub has no identifier for (its name is kept)
            inputs.append(LicenseInput(label, decision.license_name or decision.license, "base"))
    if not inputs and not inherited and prov.get("recipe") not in ("byollm init",):
        return LicenseDecision("other", [], ["no training data or base model is recorded for this model, so its "
                                             "licence cannot be decided"], license_name="unknown")
    result = combine_licenses(inputs)
    if inherited:  # undecided; still, what is known along the lineage sets a floor (non-commercial stays so)
        known = [i for i in known_inputs(prov) if normalise_license(i.license)]
        floor = combine_licenses(known)
        reasons = [f"{i.what}: {i.license}" for i in known]
        if floor.license != "other" and known:
            reasons.append(f"whatever the missing licence is, the known inputs already require at least {floor.license}"
                           + (" (non-commercial)" if floor.non_commercial else ""))
        return LicenseDecision("other", reasons, inherited + result.warnings, license_name="unknown")
    return result


def known_inputs(prov: dict[str, Any]) -> list[LicenseInput]:
    """Every licence recorded along a lineage: its datasets' and its imported models' (recorded or not)."""
    if prov.get("license") and prov.get("recipe") in ("converted", "huggingface", None):
        return [LicenseInput(f"imported model {model_label(prov)}", prov["license"], "own")]
    out = [LicenseInput(f"dataset {d.get('name')}", d.get("license")) for d in prov.get("datasets") or []]
    for key in ("base", "adapter"):
        if isinstance(prov.get(key), dict):
            out += [i if i.role != "own" else LicenseInput(i.what, i.license, "base") for i in known_inputs(prov[key])]
    return out



__all__ = ["DEFAULT_LICENSE", "LICENSES", "LicenseDecision", "LicenseInput", "combine_licenses", "known_inputs",
           "lineage_license", "model_label", "normalise_license"]
