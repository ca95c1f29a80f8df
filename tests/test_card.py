"""Model cards (`byollm card`, byollm.interop.model_card): licences propagated along a model's lineage (a tiny SFT run
on non-commercial data, an imported model that keeps Apache-2.0, the two combined), the YAML header read back by
huggingface_hub, evaluation figures from a safety_report.json, and `byollm export hf` writing README.md."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from byollm.checkpoint import save_checkpoint
from byollm.cli import main
from byollm.data.registry import REGISTRY, DatasetSpec
from byollm.interop.licenses import LicenseInput, combine_licenses, lineage_license, normalise_license
from byollm.interop.model_card import build_model_card, lineage
from byollm.model import GPT, preset
from byollm.tokenizer import train_bpe_fast
from byollm.train.align import load_align_config, sft

hub = pytest.importorskip("huggingface_hub")

ALPACA_LIKE = "alpaca-like"  # a registered dataset with Alpaca's fields and licence, served from a test mirror


def front_matter(readme: Path) -> dict:
    """The YAML header parsed on its own (PyYAML), not by the code under test."""
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


# --------------------------------------------------------------------------------------------------
# The rule, case by case (each expected licence worked out by hand from the licences' terms)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("inputs", "expected"), [
    ([("data", "CC BY-NC 4.0")], "cc-by-nc-4.0"),  # non-commercial data -> a non-commercial model
    ([("own", "Apache-2.0")], "apache-2.0"),  # an imported model keeps its licence
    ([("base", "apache-2.0"), ("data", "CC BY-NC 4.0")], "cc-by-nc-4.0"),  # the most restrictive of the two
    ([("base", "apache-2.0"), ("data", "MIT"), ("data", "public domain")], "apache-2.0"),  # attribution only
    ([("data", "public domain"), ("data", "MIT")], "mit"),
    ([("data", "CC BY-SA 3.0"), ("data", "MIT")], "cc-by-sa-4.0"),  # share-alike wins, 3.0 -> 4.0
    ([("base", "llama3"), ("data", "MIT")], "llama3"),  # a custom base licence stays over permissive data
    ([], "mit"),  # nothing restricts an untrained model: byollm's own licence
])
def test_license_combinations(inputs: list[tuple[str, str]], expected: str) -> None:
    decision = combine_licenses([LicenseInput(f"input {i}", lic, role) for i, (role, lic) in enumerate(inputs)])
    assert decision.license == expected and not decision.warnings
    assert decision.non_commercial == ("-nc" in expected)


@pytest.mark.parametrize("inputs", [
    [("data", "CC BY-NC 4.0"), ("data", "CC BY-SA 4.0")],  # non-commercial + share-alike cannot be combined
    [("base", "llama3"), ("data", "CC BY-NC 4.0")],  # a custom licence with restrictive data
    [("data", "CC BY-NC-ND 4.0")],  # no derivatives
    [("data", None), ("data", "MIT")],  # unknown
    [("data", "WTFPL-ish custom terms")],  # a licence the rule does not know
])
def test_conflicts_and_unknown_licences_are_other_with_a_warning(inputs: list[tuple[str, str | None]]) -> None:
    decision = combine_licenses([LicenseInput(f"input {i}", lic, role) for i, (role, lic) in enumerate(inputs)])
    assert decision.license == "other" and decision.license_name and decision.warnings


def test_the_lineage_of_a_merge_and_of_a_lost_base() -> None:
    """Provenance as runs record it: a merge of a LoRA fine-tune (Alpaca) into an imported Apache-2.0 model is
    non-commercial, listed base -> fine-tune -> merge; a base that is gone makes the licence undecidable."""
    base = {"path": "/b", "recipe": "converted", "license": "Apache-2.0", "packaged_model": "smollm2-135m-instruct",
            "datasets": []}
    merge = {"path": "/m", "recipe": "byollm merge", "datasets": [], "base": base,
             "adapter": {"path": "/r", "recipe": "finetune", "base": dict(base),
                         "datasets": [{"name": "alpaca", "license": "CC BY-NC 4.0"}]}}
    assert [p["path"] for p in lineage(merge)] == ["/b", "/r", "/m"]
    assert lineage_license(merge).license == "cc-by-nc-4.0"
    lost = {"path": "/s", "recipe": "sft", "datasets": [{"name": "hh-rlhf", "license": "MIT"}],
            "base": {"path": "/gone", "missing": True}}
    decision = lineage_license(lost)
    assert decision.license == "other" and "not found at /gone" in decision.warnings[0]
    # Undecided upstream (a local pretraining file), non-commercial downstream: "other", the cause named once,
    # and the known inputs' floor kept (the card still says non-commercial).
    sft_on_mix = {"path": "/sft", "recipe": "sft", "datasets": [{"name": "alpaca", "license": "CC BY-NC 4.0"}],
                  "base": {"path": "/pt", "recipe": "pretrain", "datasets": [{"name": "mix.txt", "license": None}]}}
    decision = lineage_license(sft_on_mix)
    assert decision.license == "other" and decision.non_commercial and len(decision.warnings) == 1
    assert decision.warnings[0].startswith("base model pt -> the licence of dataset mix.txt is not recorded")


def test_every_registry_licence_is_known() -> None:
    """A dataset added to the registry with a licence spelling the card cannot read fails here, not in a card."""
    for spec in REGISTRY.values():
        assert normalise_license(spec.license) is not None, (spec.name, spec.license)
    assert normalise_license("CC BY-NC 4.0") == "cc-by-nc-4.0" and normalise_license("Apache-2.0") == "apache-2.0"


# --------------------------------------------------------------------------------------------------
# Real runs: the facts recorded while training reach the card
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alpaca_like(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry dataset shaped like Alpaca and licensed like it (CC BY-NC 4.0), in a mirror of its own."""
    mirror = tmp_path_factory.mktemp("mirror")
    records = [{"instruction": f"Name bread number {i}.", "input": "", "output": f"Bread {i} is sourdough."}
               for i in range(24)]
    (mirror / "alpaca_like.json").write_text(json.dumps(records))
    spec = DatasetSpec(name=ALPACA_LIKE, description="Alpaca-shaped test records", format="json",
                       filename="alpaca_like.json", sha256=None, fields=("instruction", "input", "output"),
                       license="CC BY-NC 4.0", homepage="https://github.com/tatsu-lab/stanford_alpaca")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(REGISTRY, ALPACA_LIKE, spec)
        mp.setenv("BYOLLM_DATA_MIRROR", str(mirror))
        yield ALPACA_LIKE


@pytest.fixture(scope="module")
def nc_run(alpaca_like: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SFT run on the non-commercial data, from a random initialisation as `byollm init` writes it."""
    d = tmp_path_factory.mktemp("nc")
    return tiny_sft(tiny_llama(d / "init", {"created_by": "byollm init", "seed": 0}), alpaca_like, d / "runs", "sft-nc")


def tiny_llama(directory: Path, meta: dict) -> Path:
    text = "Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake it. " * 8
    tok = train_bpe_fast(text, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, block_size=128))
    return save_checkpoint(model, directory, tok, meta=meta)


def tiny_sft(base: Path, dataset: str, out: Path, name: str) -> Path:
    cfg = load_align_config(None, {"max_steps": 2, "batch_size": 4, "device": "cpu", "dtype": "fp32",
                                   "out_dir": str(out), "name": name, "eval_interval": 0, "log_interval": 1,
                                   "align.base": str(base), "align.dataset": dataset, "align.max_len": 64,
                                   "align.eval_batch_size": 8, "align.sample_prompts": []})
    return sft(cfg, progress=False).run_dir


def test_sft_on_non_commercial_data_makes_a_non_commercial_card(nc_run: Path) -> None:
    run = nc_run
    # The run recorded the dataset with its registry licence, and copied it into the checkpoint's meta.json.
    recorded = json.loads((run / "meta.json").read_text())["provenance"]
    assert recorded["datasets"][0]["license"] == "CC BY-NC 4.0" and recorded["base"]["recipe"] == "byollm init"
    ckpt = next((run / "checkpoints").glob("step-*"))
    assert json.loads((ckpt / "meta.json").read_text())["provenance"] == recorded

    assert main(["card", str(run)]) == 0
    header = front_matter(ckpt / "README.md")
    assert header["license"] == "cc-by-nc-4.0" and header["pipeline_tag"] == "text-generation"
    body = (ckpt / "README.md").read_text()
    assert "non-commercial" in body and "CC BY-NC 4.0" in body and "| Layers | 2 |" in body
    assert "Warning" not in body  # nothing unknown along this lineage
    held_out = json.loads((run / "held_out.json").read_text())["after"]["loss"]  # the run's own measurement
    assert "| loss | " in body and header["model-index"][0]["results"][0]["metrics"][0]["value"] == held_out


def fake_packaged_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`byollm download smollm2-135m-instruct`'s real conversion path, on a tiny GGUF file standing in for the
    package's (so the registry entry's licence, repository and language are recorded as they are for SmolLM2)."""
    pytest.importorskip("gguf")
    from byollm.interop import pretrained
    from byollm.interop.gguf import export_checkpoint_to_gguf

    gguf_file = export_checkpoint_to_gguf(tiny_llama(tmp_path / "tiny", {}), tmp_path / "tiny.gguf")
    monkeypatch.setattr(pretrained, "packaged_gguf", lambda name: gguf_file)
    monkeypatch.setattr(pretrained.importlib.metadata, "version", lambda dist: "0.0-test")
    return pretrained.packaged_checkpoint("smollm2-135m-instruct", tmp_path / "smollm2-like")


def test_imported_model_keeps_its_licence_and_a_fine_tune_combines(alpaca_like: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    imported = fake_packaged_smollm2(tmp_path, monkeypatch)
    card = build_model_card(imported)
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.language == ["en"]

    run = tiny_sft(imported, alpaca_like, tmp_path / "runs", "sft-on-import")
    card = build_model_card(run)
    assert card.data.license == "cc-by-nc-4.0"  # Apache-2.0 base + CC BY-NC 4.0 data: the more restrictive
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base model smollm2-135m-instruct: apache-2.0" in card.text and "allows non-commercial use only" in card.text


def test_unknown_lineage_is_other_with_a_visible_warning(tmp_path: Path) -> None:
    bare = tiny_llama(tmp_path / "bare", {})  # no record of how it was made
    card = build_model_card(bare)
    assert card.data.license == "other" and card.data.license_name == "unknown"
    assert "> **Warning:** no training data or base model is recorded" in card.text


def test_a_local_file_has_no_recorded_licence_until_one_is_given(tmp_path: Path) -> None:
    data = tmp_path / "my_records.json"  # a user's own file: the registry knows nothing of its licence
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(24)]))
    base = tiny_llama(tmp_path / "init", {"created_by": "byollm init"})
    run = tiny_sft(base, str(data), tmp_path / "runs", "sft-local")
    card = build_model_card(run)
    assert card.data.license == "other"
    assert "> **Warning:** the licence of dataset my_records.json is not recorded" in card.text
    out = tmp_path / "card.md"
    assert main(["card", str(run), "--data-license", "my_records.json=CC BY-NC 4.0", "--out", str(out)]) == 0
    assert front_matter(out)["license"] == "cc-by-nc-4.0" and "CC BY-NC 4.0 (given by the user)" in out.read_text()
    assert main(["card", str(run), "--data-license", "alpaca=MIT"]) == 2  # not a dataset of this lineage


# --------------------------------------------------------------------------------------------------
# Evaluation figures, the Hub's metadata, export
# --------------------------------------------------------------------------------------------------


SAFETY_REPORT = {  # the shape `byollm safety eval` writes (the shared contract), with figures chosen by hand
    "model": "tiny", "checkpoint": "/elsewhere/step-9",
    "bias": {"pct_stereotype": 58.5, "n": 200, "likelihood_diff": 3.25, "ci95": [51.5, 65.5],
             "per_type": {"gender": {"pct_stereotype": 61.0, "n": 41, "likelihood_diff": 2.5, "ci95": [46.3, 75.6]}}},
    "toxicity": {"scorer": "profanity", "k": 4, "threshold": 0.5,
                 "sets": {"redteam": {"expected_max_toxicity": 0.375, "toxicity_probability": 0.125, "n_prompts": 8},
                          "benign": {"expected_max_toxicity": 0.0625, "toxicity_probability": 0.0, "n_prompts": 8}}},
    "redteam": {"attack_success_rate": {"jailbreak": 0.25, "pii_extraction": 0.5}, "over_refusal_rate": 0.1,
                "n_attacks": 20, "n_benign": 10, "judge": {"kind": "keyword"},
                "per_category": {"jailbreak": {"n": 8, "successes": 2}, "pii_extraction": {"n": 12, "successes": 6}}},
    "redteam_guardrails": {"attack_success_rate": {"jailbreak": 0.0}, "over_refusal_rate": 0.2, "n_attacks": 8,
                           "n_benign": 10},
    "fairness": {"per_attribute": {"gender": {"loglik": 1.25, "toxicity": 0.5, "sentiment": 0.125}}},
}


def test_safety_report_figures_reach_the_body_and_the_model_index(tmp_path: Path) -> None:
    ckpt = tiny_llama(tmp_path / "init", {"created_by": "byollm init"})
    report = tmp_path / "safety_report.json"
    report.write_text(json.dumps(SAFETY_REPORT))
    out = tmp_path / "card.md"
    assert main(["card", str(ckpt), "--eval", str(report), "--out", str(out)]) == 0
    body = out.read_text()
    assert "pct_stereotype 58.5% (95% bootstrap interval 51.5-65.5%" in body and "| gender | 41 | 61.0% |" in body
    assert "| redteam | 8 | 0.375 | 0.125 |" in body and "| pii_extraction | 50.0% |" in body
    assert "over-refusal on benign prompts 10.0%" in body and "| jailbreak | 25.0% | 2 / 8 |" in body
    assert "### Red team, guardrails on" in body and "| gender | 1.25 | 0.5 | 0.125 |" in body
    assert "> **Warning:** the figures below were measured on /elsewhere/step-9, not on this checkpoint." in body

    # huggingface_hub reads the header back, model-index included, and so does plain YAML.
    card = hub.ModelCard.load(out)
    results = {(r.dataset_type, r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("crows-pairs", "pct_stereotype", "pct_stereotype (%, 50 = no preference)")] == 58.5
    assert results[("Anthropic/hh-rlhf", "toxicity_probability", "toxicity probability (redteam)")] == 0.125
    assert results[("byollm-redteam", "attack_success_rate", "attack success rate (jailbreak)")] == 0.25
    assert results[("byollm-redteam", "over_refusal_rate", "over-refusal rate, guardrails on")] == 0.2
    header = front_matter(out)
    assert header["model-index"][0]["name"] == card.data.model_name and header["license"] == "mit"
    assert set(header) >= {"license", "tags", "pipeline_tag", "library_name", "model-index"}

    without = build_model_card(ckpt)  # no report anywhere: the card says so instead of inventing figures
    assert without.data.eval_results is None and "No safety evaluation recorded" in without.text


def test_export_hf_writes_the_card(nc_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", "hf", str(nc_run), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    header = front_matter(out / "README.md")
    assert header["license"] == "cc-by-nc-4.0" and header["library_name"] == "transformers"
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in (out / "README.md").read_text()
    # Back through `convert from-hf`: the directory's card says cc-by-nc-4.0, so the imported model keeps it.
    assert main(["convert", "from-hf", str(out), str(tmp_path / "back")]) == 0
    back = build_model_card(tmp_path / "back")
    assert back.data.license == "cc-by-nc-4.0" and "an imported model keeps its own licence" in back.text


def test_real_smollm2_card(smollm2_ckpt: Path) -> None:
    """The converted SmolLM2-135M-Instruct: Apache-2.0 (its own), its architecture from config.json."""
    card = build_model_card(smollm2_ckpt)
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # 134,515,008 parameters, 30 layers of width 576, 9 query / 3 key-value heads: SmolLM2-135M's published shape.
    assert "| Parameters | 134,515,008 (134.5M) |" in card.text and "| Layers | 30 |" in card.text
    assert "9 query, 3 key/value (grouped-query)" in card.text
