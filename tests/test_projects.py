"""The guide's projects run, and the guide's commands and code excerpts are the real thing.

- Each section's project runs end to end in its small (--quick) configuration, and its report is checked.
- Docs are code: every `byollm ...` command in a fenced bash block of the guide (and every
  `torchrun ... -m byollm.cli ...` one) parses with the real CLI parser, and the `byollm` ones run, in order,
  in a temporary directory, as a reader would run them. Long training runs run in a small configuration:
  the options in SMALL_RUNS are appended to the documented command (later options win), so the page shows
  the real command and the test stays fast. A bash block whose first line is a comment starting with
  `# needs` (for example `# needs 8 GPUs and network access`) is parsed but never run; so is a Python block
  that starts so (`# needs the server of the block above, running`). `byollm serve` blocks until stopped, so
  the guide shows it in such a block and the section 5 project runs the real server.
- Every Python excerpt that names its source file (`# from byollm/...`) must still be in that file, line
  for line, so the docs cannot drift. Every figure a page shows exists and is a PNG.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "docs" / "section_0_introduction.md", REPO / "docs" / "section_1_transformer.md",
        REPO / "docs" / "section_2_training.md", REPO / "docs" / "section_3_scaling.md",
        REPO / "docs" / "section_4_finetuning.md", REPO / "docs" / "section_5_deployment.md",
        REPO / "docs" / "section_6_application.md", REPO / "docs" / "section_7_ethics.md"]
SECTION_2, SECTION_3, SECTION_4, SECTION_5, SECTION_6 = DOCS[2], DOCS[3], DOCS[4], DOCS[5], DOCS[6]
SECTION_7 = DOCS[7]
SECTION_8 = REPO / "docs" / "section_8_capstone.md"  # its commands are `# needs` blocks; test_capstone.py runs it
DOCS.append(SECTION_8)
# Section 2's other pages, in reading order after its entry page (their commands run after the entry page's).
SECTION_2_PARTS = [REPO / "docs" / f"section_2_{part}.md"
                   for part in ("data", "loop", "checkpoints", "pretraining_run", "sft", "rlhf", "dpo_orpo")]
DOCS += SECTION_2_PARTS
SECTION_2_NAMES = {SECTION_2.name, *(p.name for p in SECTION_2_PARTS)}
PROJECT_1 = REPO / "projects" / "section_1_transformer.py"
PROJECT_3 = REPO / "projects" / "section_3_scaling.py"
PROJECT_4 = REPO / "projects" / "section_4_finetuning.py"
PROJECT_5 = REPO / "projects" / "section_5_deployment.py"
PROJECT_6 = REPO / "projects" / "section_6_application.py"
PROJECT_7 = REPO / "projects" / "section_7_ethics.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mirror() -> Path:
    return Path(os.environ.get("BYOLLM_DATA_MIRROR", REPO.parent / "shared" / "data"))


def data_env(tmp: Path) -> dict[str, str]:
    """Environment for the project: the real mirror when it exists; else no download attempts (fallback text)."""
    env = dict(os.environ)
    if (mirror() / "tinyshakespeare.txt").is_file():
        env["BYOLLM_DATA_MIRROR"] = str(mirror())
    else:
        env["BYOLLM_OFFLINE"] = "1"
        env["BYOLLM_CACHE"] = str(tmp / "cache")
    return env


# --------------------------------------------------------------------------------------------------
# Section 1 project
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def section1(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the project once, --quick, with a small Hugging Face directory standing in for a real checkpoint."""
    transformers = pytest.importorskip("transformers")
    import torch

    from byollm.tokenizer import train_bpe_fast

    tmp = tmp_path_factory.mktemp("section1")
    # What `hf download` would give: config.json + model.safetensors from transformers, and tokenizer files.
    tok = train_bpe_fast("First Citizen: Before we proceed any further, hear me speak. " * 200, 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "hf")
    tok.save_hf(tmp / "hf")

    cmd = [sys.executable, str(PROJECT_1), "--quick", "--out", str(tmp / "out"), "--hf-dir", str(tmp / "hf"),
           "--figures", str(tmp / "figures"), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=data_env(tmp))
    return proc, tmp


def test_section1_project_runs_and_all_checks_pass(section1):
    proc, tmp = section1
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout
    assert re.search(r"(\d+)/\1 checks passed", proc.stdout)
    for step in ("1. Tokenizer", "2. Counting", "3. Parity", "4. KV cache", "5. Attention", "6. Figures",
                 "7. Real weights"):
        assert f"== {step}" in proc.stdout
    assert "124,439,808 parameters (published: 124,439,808)" in proc.stdout


def test_section1_real_weights(section1, smollm2_gguf):
    """Step 7 on the packaged SmolLM2-135M-Instruct (skipped where the `real` extra is not installed): a Q4_1 block
    decoded by hand, the import against llama.cpp on the same file, a question answered and one got wrong."""
    proc, tmp = section1
    real = json.loads((tmp / "out" / "report.json").read_text())["real"]
    assert "skipped" not in real, real
    assert real["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert len(real["block"]["q"]) == 32 and all(0 <= q <= 15 for q in real["block"]["q"]) and real["block"]["d"] > 0
    assert "Paris" in real["answers"]["What is the capital of France?"]
    llama = real["llama_cpp"]
    assert llama["same_ids"] and llama["top1_agree"] >= 0.9 * llama["positions"]  # measured 47/49
    assert llama["max_abs_diff"] < 4  # measured 2.55 on logits up to 37.6 (8-bit activations in llama.cpp)
    assert "transformers_max_abs_diff" not in real  # a full run only (measured 0.0)


def test_section1_report_numbers(section1):
    proc, tmp = section1
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert report["quick"] is True and not report["failed"]
    # Parity with transformers: GPT-2, Llama with GQA, and the directory given with --hf-dir.
    assert set(report["parity"]) == {"GPT-2", "Llama/GQA", "hf_dir"}
    for name, result in report["parity"].items():
        assert result["max_abs_diff"] < 1e-4, name
        assert result["greedy_match"], name
    assert report["kv_cache"]["match"] and len(report["kv_cache"]["rows"]) == 2
    assert all(row["max_abs_diff"] < 1e-5 for row in report["attention"])
    assert report["rope"]["relative_position_max_diff"] < 1e-3
    gpt2 = next(row for row in report["counting"] if row["name"] == "gpt2-124m")
    assert gpt2["params"] == 124_439_808
    # 6N + 12LHDT at T=1024, worked by hand in the guide: N = 85,056,000 + 38,597,376 (the tied LM head).
    assert gpt2["flops_per_token"] == 6 * (85_056_000 + 50257 * 768) + 12 * 12 * 12 * 64 * 1024 == 855_166_464


def test_section1_figures_written_to_out_and_figures_dir(section1):
    proc, tmp = section1
    for name in ("attention_pattern.png", "rope.png", "attention_speed.png"):
        for folder in ("out", "figures"):
            path = tmp / folder / name
            assert path.is_file() and path.stat().st_size > 10_000, path
            assert path.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------------
# Section 3 project
# --------------------------------------------------------------------------------------------------


def test_section3_project_fsdp_matches_one_process_and_resumes_on_other_world_sizes(tmp_path: Path):
    """--quick: 6 steps of llama-tiny on 1 process and FSDP on 2 gloo processes (the same global batch), the
    2-process step-3 checkpoint resumed on 1 and on 3 processes, `byollm plan` for GPT-2 XL and Llama 3 8B, and the
    loop under Accelerate on 2 processes against the native 1-process run."""
    if not (mirror() / "tinyshakespeare.txt").is_file():
        pytest.skip("needs tinyshakespeare.txt in the data mirror ($BYOLLM_DATA_MIRROR)")
    env = {**os.environ, "BYOLLM_DATA_MIRROR": str(mirror()), "BYOLLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(PROJECT_3), "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quick"] is True and all(report["checks"].values()), report["checks"]
    steps = report["sizes"]["steps"]
    assert all(len(losses) == steps for losses in report["losses"].values())
    # FSDP on 2 against 1 process: float32 rounding (measured 1.8e-7 on the losses, 7.4e-6 on the weights).
    assert report["fsdp_vs_one_max_rel"] < 1e-5 and report["grad_norm_max_rel"] < 1e-4
    assert report["weights_fsdp_vs_one_max_abs"] < 1e-4
    assert report["dcp_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file of shards per rank
    middle = report["data_middle"]
    assert middle["step"] == steps // 2 and middle["position"] == steps // 2 * report["sizes"]["global_batch"]
    for name, world in (("resumed1", 1), ("resumed3", 3)):
        resumed = report["resume"][name]
        assert resumed["world_size"] == world and resumed["resumed_from"] == f"step-{steps // 2}"
        assert resumed["max_rel_vs_fsdp2"] < 1e-5 and resumed["weights_vs_fsdp2_max_abs"] < 1e-4
        assert resumed["data"] == report["data"]["fsdp2"] == report["data"]["one"]  # the same global sample index
        assert resumed["tokens_seen"] == report["tokens_seen"]["one"] and resumed["steps_logged"]
    assert report["data"]["one"]["position"] == steps * report["sizes"]["global_batch"]
    assert report["plan"]["zero_paper"] == {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "fsdp": 1.9}
    assert report["plan"]["plans"]["Llama 3 8B"]["strategy"] == "fsdp+tp"
    accelerate = report["accelerate"]
    assert accelerate["world_size"] == 2 and accelerate["mixed_precision"] == "no"
    assert accelerate["max_rel_vs_ddp2"] <= 1e-6 and accelerate["weights_vs_ddp2_max_abs"] < 1e-5
    assert accelerate["max_rel_vs_one"] < 1e-5  # a few steps: no time to drift
    for step in ("1. One process against FSDP on 2", "2. The step-3 checkpoint", "3. Planning GPT-2 XL",
                 "4. The same loop under Hugging Face Accelerate"):
        assert f"== {step}" in proc.stdout
    assert "7 of 7 checks met" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Section 4 project
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def section4(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the project once, --quick: a tiny pretrained base, 4 steps of each method, merge, export, PEFT."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    missing = [name for name in SECTION_2_DATA if not (mirror() / name).is_file()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in the data mirror ($BYOLLM_DATA_MIRROR)")
    tmp = tmp_path_factory.mktemp("section4")
    env = {**os.environ, "BYOLLM_DATA_MIRROR": str(mirror()), "BYOLLM_CACHE": str(tmp / "cache")}
    proc = subprocess.run([sys.executable, str(PROJECT_4), "--quick", "--out", str(tmp / "out"), "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((tmp / "out" / "report.json").read_text())


def test_section4_project_trains_every_method(section4):
    proc, report = section4
    st = report["stages"]
    assert "| method | trainable params" in proc.stdout and "checks met" in proc.stdout
    for method in ("full", "lora", "qlora", "dora"):
        before, after = st[method]["held_out_loss_before"], st[method]["held_out_loss_after"]
        assert math.isfinite(after) and after < before, method
        assert st[method]["step_ms"] > 0
    # Adapters: the same trainable count for LoRA and QLoRA (same layers, same r), a small fraction of the model;
    # QLoRA's fraction counts the NF4 weights as the weights they stand for.
    assert st["lora"]["trainable_params"] == st["qlora"]["trainable_params"] < st["dora"]["trainable_params"]
    assert st["lora"]["params"] == st["qlora"]["params"]
    assert st["lora"]["trainable_fraction"] < 0.1 and st["full"]["trainable_fraction"] == 1
    # QLoRA starts from the NF4 base (a different held-out loss from the fp32 base's) and ends near LoRA.
    assert st["qlora"]["held_out_loss_before"] != st["lora"]["held_out_loss_before"]
    assert report["qlora_vs_lora_relative"] < 0.02


def test_section4_project_sizes_and_interop(section4):
    _, report = section4
    size, io = report["stages"]["size"], report["stages"]["interop"]
    # 4 bits + an 8-bit scale per 64 weights + second-level scales: ~4.13 bits, over 7x smaller than fp32.
    assert 4.12 < size["bits_per_quantised_weight"] < 4.2 and size["quantised_ratio"] > 7
    assert size["nf4_file_bytes"] < size["fp32_file_bytes"]
    # PEFT loads the unmerged adapter and gives our logits, on the fp32 base and on the dequantised NF4 base;
    # the adapter does change the logits, so the agreement is not trivial.
    assert io["adapter_effect_max_abs"] > 1e-4
    assert io["peft_vs_ours_max_abs_diff"] < 1e-4 and io["peft_vs_ours_on_nf4_base_max_abs_diff"] < 1e-4
    assert io["merged_vs_unmerged_max_abs_diff"] < 1e-4
    assert abs(io["held_out_loss_on_nf4_base"] - io["held_out_loss_qlora_run"]) < 1e-4
    assert io["greedy_tokens_match"] and io["transformers_tokens"] > 0
    assert (Path(io["hf_dir"]) / "config.json").is_file()
    assert all(report["checks"].values()), report["checks"]


# --------------------------------------------------------------------------------------------------
# Section 5 project
# --------------------------------------------------------------------------------------------------


def test_section5_project_exports_serves_and_load_tests(tmp_path: Path):
    """--quick: a tiny trained chat model, GGUF parity with llama.cpp, `byollm serve` in a subprocess queried with
    the openai client (completion, chat, stream, 401, 400), a short load test, /metrics, a graceful shutdown."""
    for module in ("llama_cpp", "openai", "fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    proc = subprocess.run([sys.executable, str(PROJECT_5), "--quick", "--out", str(tmp_path / "out"), "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=data_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(report["checks"].values()) and not report["failed"], report["checks"]
    gguf, client, metrics = report["gguf"], report["client"], report["metrics"]
    assert gguf["match"] and gguf["ours"] == gguf["llama_cpp"] and len(gguf["ours"]) == 16
    assert client["models"] == ["byollm"] and client["completion"]["usage"]["completion_tokens"] > 0
    assert client["stream"]["text"] == client["chat"]["text"] != "" and client["stream"]["chunks"] > 1
    assert client["wrong_key"]["status"] == 401
    assert client["too_long"]["status"] == 400 and client["too_long"]["code"] == "context_length_exceeded"
    assert [level["concurrency"] for level in report["load"]] == [1, 8]
    assert all(level["completed"] > 0 and level["errors"] == level["5xx"] == level["dropped"] == 0
               for level in report["load"])
    assert metrics["ttft_count"] > 0 and metrics["ttft_sum_s"] > 0 and metrics["completion_tokens"] > 0
    assert metrics["requests_by_status"]["200"] > 0
    assert metrics["requests_by_status"]["401"] >= 1 and metrics["requests_by_status"]["400"] >= 1
    assert not report["server_log_has_key"] and not report["server_log_has_prompt"]
    assert "| check" in proc.stdout and "checks met" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Section 6 project
# --------------------------------------------------------------------------------------------------


def test_section6_project_indexes_asks_evaluates_and_guards(tmp_path: Path, smollm2_ckpt: Path):
    """--quick: section 0 of the guide indexed (and re-indexed: nothing embedded), one question answered by the
    real SmolLM2 (the session's conversion, found through its cache), an off-topic one refused unasked, the
    retrieval evaluation on the SQuAD sample, a poisoned page flagged and an HR-only chunk kept from a caller
    without the group."""
    for module in ("faiss", "bm25s", "sentence_transformers"):
        pytest.importorskip(module)
    if not (mirror() / "squad_v1.1_dev_super_bowl_50.json").is_file():
        pytest.skip("needs squad_v1.1_dev_super_bowl_50.json in the data mirror ($BYOLLM_DATA_MIRROR)")
    env = {**os.environ, "BYOLLM_DATA_MIRROR": str(mirror()), "BYOLLM_CACHE": str(smollm2_ckpt.parents[1])}
    proc = subprocess.run([sys.executable, str(PROJECT_6), "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quick"] is True and all(report["checks"].values()), report["checks"]
    index = report["index"]
    assert index["pages"] == ["section_0_introduction.md"] and index["chunks"] > 5
    assert index["again"]["embedded"] == 0 and index["manifest"]["embedding"]["dim"] == 384
    assert index["manifest"]["dense"]["kind"] == "flat"  # far below HNSW_THRESHOLD
    (answer,) = report["ask"]["answers"]
    assert answer["answer"] and answer["expected_page_retrieved"] and len(answer["sources"]) == 2
    assert all(1 <= c["n"] <= 2 for c in answer["citations"]) and not answer["not_found"]
    assert report["ask"]["unrelated"]["not_found"] and report["ask"]["unrelated"]["best_score"] < 0.25
    ev = report["eval"]
    assert (ev["paragraphs"], ev["questions"]) == (54, 810)
    results = ev["results"]
    # Measured (docs/benchmarks.md): bm25 0.925, dense 0.901, hybrid 0.965 at recall@5; deterministic on a CPU.
    assert abs(results["hybrid"]["recall@5"] - 0.965) < 0.005
    assert results["hybrid"]["recall@5"] > max(results["bm25"]["recall@5"], results["dense"]["recall@5"])
    sec = report["security"]
    kinds = {f["kind"] for f in sec["poisoned"]["flags"]}
    assert {"override", "role_header", "exfiltration"} <= kinds and not sec["poisoned"]["forged_delimiter_left"]
    assert "\u2039\u2039\u2039END SOURCE 1\u203a\u203a\u203a" in sec["poisoned"]["block"]
    access = sec["access"]
    assert sec["groups_by_source"]["salaries.md"] == ["hr"]
    assert all("salaries.md" not in names for names in access["public_sources"].values())
    assert not access["public_prompt_has_salary"] and access["hr_sources"][0] == "salaries.md"
    for step in ("1. Index this guide", "2. Ask it", "3. Retrieval on the SQuAD sample", "4. Security"):
        assert f"== {step}" in proc.stdout
    assert "8 of 8 checks met" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Section 7 project
# --------------------------------------------------------------------------------------------------


def test_section7_project_runs_the_safety_suite(tmp_path: Path, smollm2_ckpt: Path):
    """--quick: section 2's tiny base, SFT and DPO models trained a few steps, then `safety_eval` on them and on the
    real SmolLM2 (the session's conversion, found through its cache): CrowS-Pairs on 16 pairs, toxicity on 2 + 2
    prompts with k=2, one counterfactual template, and for SmolLM2 the red team (one attack per category) against a
    real `byollm serve` child process with guardrails off and on."""
    for module in ("profanity_check", "vaderSentiment", "uvicorn", "matplotlib"):
        pytest.importorskip(module)
    missing = [name for name in (*SECTION_2_DATA, "crows_pairs_sample_200.csv") if not (mirror() / name).is_file()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in the data mirror ($BYOLLM_DATA_MIRROR)")
    env = {**os.environ, "BYOLLM_DATA_MIRROR": str(mirror()), "BYOLLM_CACHE": str(smollm2_ckpt.parents[1])}
    proc = subprocess.run([sys.executable, str(PROJECT_7), "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quick"] is True and list(report["models"]) == ["smollm2-135m-instruct", "base", "sft", "dpo"]
    for name, r in report["reports"].items():
        bias = r["bias"]
        assert bias["n"] == 16 and bias["ci95"][0] <= bias["pct_stereotype"] <= bias["ci95"][1], name
        tox = r["toxicity"]
        assert tox["k"] == 2 and set(tox["sets"]) == {"redteam", "benign"}, name
        for s in tox["sets"].values():
            # The plot's per-prompt maxima (recorded scores) agree with the toxicity module's own aggregates.
            maxima = s["max_toxicity"]
            assert s["n_prompts"] == len(maxima) == 2
            assert math.isclose(s["expected_max_toxicity"], sum(maxima) / 2, abs_tol=1e-9)
            assert s["toxicity_probability"] == sum(m >= tox["threshold"] for m in maxima) / 2
        assert r["fairness"]["largest"]["loglik"], name
        out = tmp_path / "out" / name
        assert json.loads((out / "safety_report.json").read_text())["bias"] == bias
        assert (out / "bias.png").read_bytes()[:8] == PNG_MAGIC and "| all | 16 |" in (out / "report.md").read_text()
    smol = report["reports"]["smollm2-135m-instruct"]
    assert smol["chat_format"] and not smol["skipped"]
    assert (smol["redteam"]["guardrails"], smol["redteam_guardrails"]["guardrails"]) == ("off", "on")
    for rt in (smol["redteam"], smol["redteam_guardrails"]):
        assert rt["n_attacks"] == 4 and rt["n_benign"] == 1 and rt["n_errors"] == 0
    base = report["reports"]["base"]
    assert not base["chat_format"] and "redteam" in base["skipped"] and "redteam" not in base
    failed = [name for name, ok in report["checks"].items() if not ok and not name.startswith("guardrails lower")]
    assert not failed, failed  # (whether the guardrails lower attack success on 4 attacks is a finding, not a test)
    for step in ("1. Models", "2. Safety suite: smollm2-135m-instruct", "3. Comparison"):
        assert f"== {step}" in proc.stdout
    assert "| smollm2-135m-instruct |" in proc.stdout and "checks met" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Docs are code
# --------------------------------------------------------------------------------------------------


def fenced_blocks(path: Path, languages: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(language, body) of the ```lang fenced blocks of a page, in order; only `languages` when given."""
    blocks: list[tuple[str, str]] = []
    current: list[str] | None = None
    lang = ""
    if not path.is_file():
        return blocks
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence and current is None:
            current, lang = [], fence.group(1)
        elif fence:
            if languages is None or lang in languages:
                blocks.append((lang, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def needs_more_than_a_cpu(body: str) -> bool:
    """A block that starts with `# needs ...` (GPUs, network) is shown and parsed, never run by the tests."""
    first = body.strip().splitlines()[0] if body.strip() else ""
    return bool(re.match(r"#\s*needs\b", first))


def block_commands(body: str) -> list[str]:
    """The commands of one bash block: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for command in body.replace("\\\n", " ").splitlines():
        command = command.strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def shell_commands(path: Path) -> list[str]:
    return [c for _, body in fenced_blocks(path, ("bash", "sh", "shell")) for c in block_commands(body)]


def byollm_argv(command: str) -> list[str]:
    """`byollm a b --c d  # comment` -> ["a", "b", "--c", "d"], with $VARIABLES expanded; for
    `torchrun [its options] -m byollm.cli a b ...` the arguments after `byollm.cli`."""
    words = shlex.split(os.path.expandvars(command), comments=True)
    assert not {"|", "&&", ";", ">", "<"} & set(words), f"keep docs commands simple: {command}"
    if words[0] == "torchrun":
        assert "byollm.cli" in words and words[words.index("byollm.cli") - 1] == "-m", command
        return words[words.index("byollm.cli") + 1 :]
    assert words[0] == "byollm"
    return words[1:]


def is_byollm_command(command: str) -> bool:
    return command.startswith("byollm ") or (command.startswith("torchrun ") and " -m byollm.cli " in command)


def doc_byollm_commands() -> list[tuple[str, str]]:
    return [(p.name, c) for p in DOCS for c in shell_commands(p) if is_byollm_command(c)]


# Long runs, shrunk: appended to the documented command, so they override its values (a resumed run gets
# 2 steps more than the run it resumes). gpt-tiny at 8 x 32 tokens takes milliseconds a step.
SMALL_RUNS = {
    "quickstart": ["--max-steps", "4", "--preset", "gpt-tiny", "--block-size", "32", "--batch-size", "8"],
    "pretrain": ["--max_steps", "4", "--model.preset", "gpt-tiny", "--block_size", "32", "--batch_size", "8",
                 "--eval_batches", "2", "--sample_tokens", "8"],
    "eval": ["--max-batches", "2"],
    # The alignment verbs: 2 steps on 16 training records, 4 held-out ones, 4-token samples.
    **{verb: ["--max_steps", "2", "--batch_size", "2", "--warmup_steps", "1", "--align.max_train", "16",
              "--align.max_val", "4", "--align.eval_batch_size", "4"]
       + (["--sample_tokens", "4"] if verb != "reward" else [])  # (a reward model writes no samples)
       for verb in ("sft", "reward", "dpo", "orpo", "finetune")},
    # PPO: one rollout of 4 answers of 8 tokens (2 minibatches of 2, 1 epoch), 2 held-out prompts.
    "ppo": ["--max_steps", "2", "--rollout.rollout_size", "4", "--rollout.mini_batch_size", "2",
            "--rollout.ppo_epochs", "1", "--rollout.max_new_tokens", "8", "--val_prompts", "2", "--eval_interval", "2"],
    "chat": ["--max-new-tokens", "8"],
    "generate": ["--max-new-tokens", "8"],
    "rag ask": ["--max-new-tokens", "8"],  # (two-word keys: a verb of a group)
    "safety eval": ["--quick"],  # 16 CrowS pairs, 2 prompts a set, k=2, 8 tokens
}


def small_run(argv: list[str]) -> list[str]:
    small = SMALL_RUNS.get(" ".join(argv[:2]), SMALL_RUNS.get(argv[0], []))
    if small and "--resume" in argv:
        small = [*small, "--max_steps", "6"]
    return [*argv, *small]


def test_docs_exist_and_show_the_cli():
    for path in DOCS:
        assert path.is_file(), path
    verbs = {" ".join(byollm_argv(c)[:2]) for _, c in doc_byollm_commands()}
    for verb in ("model presets", "model info", "tokenizer train", "export hf", "convert from-hf", "data list",
                 "data prepare", "convert from-gguf", "download smollm2-135m-instruct"):
        assert verb in verbs, f"the guide should show `byollm {verb}`"
    first = {byollm_argv(c)[0] for _, c in doc_byollm_commands()}
    assert {"init", "generate", "quickstart", "pretrain", "eval"} <= first
    # Sections 1 and 5 run the real model: downloaded (from its package), generated from, chatted with, served.
    for doc, verb in ((DOCS[1].name, "download"), (DOCS[1].name, "generate"), (DOCS[1].name, "chat"),
                      (SECTION_5.name, "download"), (SECTION_5.name, "chat"), (SECTION_5.name, "serve")):
        assert any(d == doc and byollm_argv(c)[0] == verb and "smollm2-135m-instruct" in c
                   for d, c in doc_byollm_commands()), (doc, verb)
    # Section 2 shows the nanoGPT recipe, a resume, and torchrun on the CPU and on 8 GPUs.
    section2 = [c for doc, c in doc_byollm_commands() if doc in SECTION_2_NAMES]
    assert any("configs/nanogpt-shakespeare-char-cpu.yaml" in c and c.startswith("byollm ") for c in section2)
    assert any("--resume true" in c for c in section2)
    assert any(c.startswith("torchrun ") and "configs/gpt2-124m-fineweb.yaml" in c for c in section2)
    # ... and, in its second half, every alignment verb with its recipe, and the chat.
    for verb in ("sft", "reward", "dpo", "orpo", "ppo"):
        assert any(c.startswith(f"byollm {verb} --config configs/{verb}-") for c in section2), verb
    assert any(c.startswith("byollm chat ") for c in section2)
    # Section 3: the planner, the SageMaker dry run, and torchrun with FSDP, FSDP + TP, several nodes, restarts.
    section3 = [c for doc, c in doc_byollm_commands() if doc == SECTION_3.name]
    assert any(c.startswith("byollm plan ") for c in section3)
    assert any(c.startswith("byollm cloud sagemaker ") and "--dry-run" in c for c in section3)
    for needed in ("--dist.strategy fsdp ", "--dist.strategy fsdp+tp", "--rdzv_backend c10d", "--max-restarts"):
        assert any(c.startswith("torchrun ") and needed in c for c in section3), needed
    # Section 4: fine-tuning with each method on the shipped recipe, merge and export.
    section4 = [c for doc, c in doc_byollm_commands() if doc == SECTION_4.name]
    for method in ("full", "lora", "qlora", "dora"):
        assert any(c.startswith("byollm finetune ") and f"--method {method}" in c for c in section4), method
    assert any(c.startswith("byollm merge ") for c in section4)
    assert any(c.startswith("byollm export hf ") for c in section4)
    # Section 5: serving, GGUF and Hugging Face export.
    section5 = [c for doc, c in doc_byollm_commands() if doc == SECTION_5.name]
    for verb in ("serve", "export gguf", "export hf"):
        assert any(c.startswith(f"byollm {verb} ") for c in section5), verb
    # Section 6: "chat with this guide" (index docs/, search, ask), the SQuAD evaluation, the RAG route.
    section6 = [c for doc, c in doc_byollm_commands() if doc == SECTION_6.name]
    assert any(c.startswith("byollm rag index docs/ --index ") for c in section6)
    for verb in ("rag search", "rag ask", "data download squad"):
        assert any(c.startswith(f"byollm {verb} ") or c == f"byollm {verb}" for c in section6), verb
    assert "byollm rag eval --qa squad" in section6
    assert any(c.startswith("byollm serve ") and "--rag_index " in c for c in section6)


@pytest.mark.parametrize(("doc", "command"), doc_byollm_commands())
def test_docs_byollm_command_parses(doc: str, command: str, monkeypatch: pytest.MonkeyPatch):
    from byollm.cli import build_parser

    monkeypatch.chdir(REPO)  # --config configs/... is read by the parser, relative to the repo root
    argv = byollm_argv(command)
    if "--help" in argv or "-h" in argv:
        return
    build_parser().parse_args(argv)  # raises on a wrong verb, option or value


def is_excerpt(body: str) -> bool:
    return bool(re.match(r"#\s*from\s+\S+\.py", body.strip()))


def run_page(path: Path, capsys: pytest.CaptureFixture) -> int:
    """Run a page's byollm commands (SMALL_RUNS applied) and runnable Python snippets, top to bottom, in the
    current directory; return how many ran. (Other shell commands, such as make, pip, torchrun and the
    projects, are tested elsewhere.)"""
    from byollm.cli import main

    ran = 0
    for lang, body in fenced_blocks(path):
        if lang in ("bash", "sh", "shell"):
            if needs_more_than_a_cpu(body):
                continue
            for command in block_commands(body):
                if not command.startswith("byollm "):
                    continue
                argv = small_run(byollm_argv(command))
                try:
                    code = main(argv)
                except SystemExit as e:  # --help
                    code = e.code
                out = capsys.readouterr()
                assert code == 0, f"{path.name}: `{command}` exited {code}: {out.err[-2000:]}"
                ran += 1
        elif lang == "python" and not is_excerpt(body) and not needs_more_than_a_cpu(body):
            exec(compile(body, f"{path.name} snippet", "exec"), {"__name__": "__docs__"})
            capsys.readouterr()
            ran += 1
    return ran


def test_docs_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                  smollm2_gguf: Path):
    """Sections 0 and 1 as a reader would run them from the repo root. Section 1 converts the real model from its
    package (`byollm download`, about 15 s; the test is skipped where the `real` extra is not installed), and
    `byollm chat` reads one question from stdin."""
    import io

    data = mirror()
    if not (data / "tinyshakespeare.txt").is_file():  # no mirror here: the same commands on other text
        from pydoc_data.topics import topics

        data = tmp_path / "mirror"
        data.mkdir()
        (data / "tinyshakespeare.txt").write_text("\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(data))
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    ran = sum(run_page(path, capsys) for path in DOCS
              if path not in (SECTION_2, *SECTION_2_PARTS, SECTION_3, SECTION_4, SECTION_5, SECTION_6, SECTION_7))
    assert ran >= 14
    meta = json.loads((tmp_path / "models" / "smollm2-135m-instruct" / "meta.json").read_text())
    assert meta["packaged_model"] == "smollm2-135m-instruct" and meta["converted_from"] == "gguf/llama"


SECTION_2_DATA = ("tinyshakespeare.txt", "alpaca_4500.json", "hh_rlhf_harmless_2000.jsonl")
PROJECT_2_BASE = Path("out") / "section2-align" / "runs" / "base"  # where the section 2 project leaves its base


def stand_in_base(path: Path) -> Path:
    """A tiny random Llama-style checkpoint with a byte-level BPE tokenizer (no chat tokens yet), standing in for
    the base model the section 2 project pretrains (the project itself is tested in test_align.py)."""
    import dataclasses

    import torch

    from byollm.checkpoint import save_checkpoint
    from byollm.data.readers import load_records
    from byollm.model import GPT, preset
    from byollm.tokenizer import train_bpe_fast

    alpaca, hh = load_records("alpaca")[:300], load_records("hh-rlhf")[:300]
    text = "\n\n".join([f"{r['instruction']} {r['input']} {r['output']}" for r in alpaca] + [r["chosen"] for r in hh])
    tok = train_bpe_fast(text, 512)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, block_size=256))
    return save_checkpoint(model, path, tok)


def test_section2_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """Section 2: prepare, quickstart, resume, eval, generate and the nanoGPT recipe, then the alignment verbs
    (sft, reward, dpo, orpo, ppo, chat), each a few steps long. Its commands name the datasets (checked against
    the registry's sha256), so they need the real files. The alignment verbs start from the section 2 project's
    base model; a tiny stand-in takes its place, and `byollm chat` reads one question from stdin."""
    import io

    missing = [name for name in SECTION_2_DATA if not (mirror() / name).is_file()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in the data mirror ($BYOLLM_DATA_MIRROR)")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))  # prepared data goes here, not in ~/.cache
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the page runs from the repo root
    stand_in_base(tmp_path / PROJECT_2_BASE)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert sum(run_page(page, capsys) for page in (SECTION_2, *SECTION_2_PARTS)) >= 16
    for run in ("shakespeare", "nanogpt-shakespeare-char-cpu", "sft", "reward", "dpo", "orpo", "ppo"):
        assert (tmp_path / "runs" / run / "checkpoints" / "latest").is_file(), run
    assert (tmp_path / "runs" / "shakespeare" / "checkpoints" / "latest").read_text().strip() == "step-6"
    for run in ("sft", "reward", "dpo", "orpo"):
        held_out = json.loads((tmp_path / "runs" / run / "held_out.json").read_text())
        assert held_out["before"] and held_out["after"], run


def test_section3_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """Section 3: `byollm plan` (arithmetic), the SageMaker dry run (no AWS call), a short run with activation
    checkpointing, and the page's Python snippets. Its torchrun and multi-GPU commands are parsed (above); the
    section 3 project runs the CPU ones for real."""
    if not (mirror() / "tinyshakespeare.txt").is_file():
        pytest.skip("needs tinyshakespeare.txt in the data mirror ($BYOLLM_DATA_MIRROR)")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    assert run_page(SECTION_3, capsys) >= 4


def test_section4_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                      smollm2_ckpt: Path):
    """Section 4: `byollm finetune` with each method, merge, export, and the page's Python snippets, each a few
    steps long, from a tiny stand-in for the base model that the section 2 project pretrains; then LoRA and
    QLoRA (Q4_1 base) on the real SmolLM2, whose conversion is the session's (tests/conftest.py), linked where
    `byollm download --out` puts it, so the download finds it converted."""
    pytest.importorskip("transformers")
    missing = [name for name in SECTION_2_DATA if not (mirror() / name).is_file()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in the data mirror ($BYOLLM_DATA_MIRROR)")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    stand_in_base(tmp_path / PROJECT_2_BASE)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m-instruct").symlink_to(smollm2_ckpt)
    assert run_page(SECTION_4, capsys) >= 11
    for run in ("smollm2-lora", "smollm2-qlora"):
        adapter = tmp_path / "runs" / run / "adapter"
        assert json.loads((adapter / "finetune.json").read_text())["lora"]["quant_type"] == "q4_1"
        assert load_tokenizer_size(adapter / "tokenizer") == 49152  # the model's own template: no token added
    for run in ("full-alpaca", "lora-alpaca", "qlora-alpaca", "dora-alpaca"):
        assert json.loads((tmp_path / "runs" / run / "held_out.json").read_text())["after"], run
    assert (tmp_path / "runs" / "qlora-alpaca" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "qlora-merged-hf" / "config.json").is_file()


def load_tokenizer_size(path: Path) -> int:
    from byollm.tokenizer import load_tokenizer

    return load_tokenizer(path).vocab_size


def test_section5_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                      smollm2_ckpt: Path):
    """Section 5: the real model's download, chat and the page's Python snippets on it (chat template, engine),
    then the GGUF and Hugging Face exports of a tiny stand-in for the section 2 project's SFT model. The real
    model is the session's conversion (tests/conftest.py), where section 1 left it, so `byollm download` finds it
    converted; `byollm chat` reads one question from stdin. `byollm serve` blocks, so the page shows it in a
    `# needs a second terminal` block (parsed, not run here); the project test above runs the real server."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    import dataclasses
    import io

    import torch

    from byollm.checkpoint import save_checkpoint
    from byollm.model import GPT, preset
    from byollm.tokenizer import train_bpe_fast
    from byollm.tokenizer.chat_template import add_chat_tokens

    monkeypatch.chdir(tmp_path)
    tok = train_bpe_fast("Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, knead, bake. " * 20,
                         vocab_size=300)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, block_size=128))
    save_checkpoint(model, tmp_path / "out" / "section2-align" / "runs" / "sft", tok)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m-instruct").symlink_to(smollm2_ckpt)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert run_page(SECTION_5, capsys) >= 6
    assert (tmp_path / "out" / "model.gguf").is_file()
    assert (tmp_path / "out" / "hf" / "config.json").is_file()


def test_section6_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                      smollm2_ckpt: Path):
    """Section 6: `byollm rag index docs/` (a docs/ folder holding section 0 stands in for the whole guide, which
    takes minutes to embed on 2 cores), search, ask with the real SmolLM2 (the session's conversion, found through
    its cache; 8 new tokens), `byollm data download squad` and the SQuAD evaluation, and the RRF snippet. The page
    runs from a repository root whose `../shared/data` is the data mirror, as on the machine it was written on.
    The server blocks are `# needs ...` blocks (parsed above); tests/test_rag_server.py runs the route."""
    for module in ("faiss", "bm25s", "sentence_transformers"):
        pytest.importorskip(module)
    if not (mirror() / "squad_v1.1_dev_super_bowl_50.json").is_file():
        pytest.skip("needs squad_v1.1_dev_super_bowl_50.json in the data mirror ($BYOLLM_DATA_MIRROR)")
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "section_0_introduction.md").write_text(DOCS[0].read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(mirror().resolve())
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("BYOLLM_CACHE", str(smollm2_ckpt.parents[1]))  # where packaged_checkpoint finds it
    monkeypatch.chdir(root)
    assert run_page(SECTION_6, capsys) >= 6
    manifest = json.loads(next((root / "guide-index").rglob("manifest.json")).read_text())
    assert manifest["embedding"]["dim"] == 384 and manifest["chunks"] > 5


def test_section7_commands_and_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                      smollm2_ckpt: Path):
    """Section 7: the real model's download (the session's conversion, linked where `byollm download --out` puts
    it), `byollm safety eval` on it (--quick: 16 CrowS pairs, 2 prompts a set), and the verbs' --help; the red team
    and the long runs are `# needs ...` blocks (parsed above); the project test runs the red team for real."""
    for module in ("profanity_check", "matplotlib"):
        pytest.importorskip(module)
    if not (mirror() / "crows_pairs_sample_200.csv").is_file():
        pytest.skip("needs crows_pairs_sample_200.csv in the data mirror ($BYOLLM_DATA_MIRROR)")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m-instruct").symlink_to(smollm2_ckpt)
    assert run_page(SECTION_7, capsys) >= 5
    report = json.loads((tmp_path / "out" / "safety-smollm2" / "safety_report.json").read_text())
    assert report["bias"]["n"] == 16 and set(report["toxicity"]["sets"]) == {"redteam", "benign"}
    assert set(report["skipped"]) == {"fairness", "redteam", "redteam_guardrails"}


def python_excerpts() -> list[tuple[str, str, str]]:
    """(doc, source file, excerpt) for every ```python block that starts with `# from <file>`."""
    found = []
    for path in DOCS:
        for _, block in fenced_blocks(path, ("python",)):
            first, _, rest = block.partition("\n")
            if m := re.match(r"#\s*from\s+(\S+\.py)", first.strip()):
                found.append((path.name, m.group(1), rest))
    return found


def test_docs_have_code_excerpts():
    sources = {source for _, source, _ in python_excerpts()}
    for needed in ("byollm/model/model.py", "byollm/model/config.py", "byollm/tokenizer/bpe.py",
                   "byollm/sampling.py", "byollm/interop/hf.py"):
        assert needed in sources, f"section 1 should show code from {needed}"
    for needed in ("byollm/data/sources.py", "byollm/data/prepare.py", "byollm/data/samplers.py",
                   "byollm/train/loop.py", "byollm/train/optim.py", "byollm/atomic.py", "byollm/train/run.py",
                   "byollm/train/distributed.py"):
        assert needed in sources, f"section 2 should show code from {needed}"
    for needed in ("byollm/tokenizer/chat_template.py", "byollm/data/instruct.py", "byollm/train/objectives.py",
                   "byollm/model/heads.py", "byollm/train/rl_objectives.py", "byollm/interop/trl.py"):
        assert needed in sources, f"section 2 (second half) should show code from {needed}"
    for needed in ("byollm/train/parallel.py", "byollm/train/sharded_checkpoint.py", "byollm/data/samplers.py",
                   "byollm/train/loop.py", "byollm/train/distributed.py"):
        assert needed in {source for doc, source, _ in python_excerpts() if doc == SECTION_3.name}, \
            f"section 3 should show code from {needed}"
    for needed in ("byollm/finetune/lora.py", "byollm/finetune/nf4.py", "projects/section_4_finetuning.py"):
        assert needed in sources, f"section 4 should show code from {needed}"
    for needed in ("byollm/serve/engine.py", "byollm/serve/guards.py", "byollm/interop/gguf.py"):
        assert needed in sources, f"section 5 should show code from {needed}"
    for needed in ("byollm/safety/bias.py", "byollm/safety/pii.py", "byollm/safety/report.py"):
        assert needed in {source for doc, source, _ in python_excerpts() if doc == SECTION_7.name}, \
            f"section 7 should show code from {needed}"
    for needed in ("byollm/rag/chunk.py", "byollm/rag/dense.py", "byollm/rag/lexical.py", "byollm/rag/hybrid.py",
                   "byollm/rag/index.py", "byollm/rag/prompt.py", "byollm/rag/safety.py", "byollm/rag/evaluate.py",
                   "byollm/rag/answer.py", "byollm/serve/rag_route.py"):
        assert needed in {source for doc, source, _ in python_excerpts() if doc == SECTION_6.name}, \
            f"section 6 should show code from {needed}"


def test_docs_figures_exist():
    for path in DOCS:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", path.read_text(encoding="utf-8")):
            figure = path.parent / target
            assert figure.is_file() and figure.read_bytes()[:8] == PNG_MAGIC, f"{path.name}: {target}"


@pytest.mark.parametrize(("doc", "source", "excerpt"), python_excerpts())
def test_docs_code_excerpts_are_in_the_source(doc: str, source: str, excerpt: str):
    """Each excerpt's lines appear in its source file in the same order (lines of '...' mark omissions)."""
    wanted = [line.strip() for line in excerpt.splitlines() if line.strip() and line.strip() != "..."]
    have = [line.strip() for line in (REPO / source).read_text(encoding="utf-8").splitlines()]
    position = 0
    for line in wanted:
        try:
            position = have.index(line, position) + 1
        except ValueError:
            pytest.fail(f"{doc}: excerpt line not found in {source} (in this order): {line!r}")
