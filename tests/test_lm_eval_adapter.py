"""The lm-evaluation-harness adapter (byollm.interop.lm_eval) against lm-eval's own Hugging Face class, HFLM.

One tiny random Llama-style model is exported to a Hugging Face directory; HFLM runs that directory through
transformers while our adapter runs the byollm checkpoint. Local task YAMLs over local JSONL files (multiple
choice, perplexity, generation) go through lm-eval's evaluator with each, and every request's answer must agree:
log-likelihoods to 1e-4 nats, greedy flags and generated text exactly. The shipped crows_pairs_local task must
give what byollm.safety.bias scores on the same file.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from byollm.checkpoint import load_checkpoint
from byollm.cli import main
from byollm.errors import ByollmError
from byollm.interop.hf import export_hf
from byollm.safety.bias import Pair, load_pairs, score_pairs
from tests.conftest import tiny_chat_base

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from byollm.interop.lm_eval import evaluate, lm_eval_model_class, rolling_windows  # noqa: E402

TOL = 1e-4
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
        "resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
        "Marcius is chief enemy to the people. All: We know't, we know't. First Citizen: Let us kill him, and we'll "
        "have corn at our own price. Is't a verdict? All: No more talking on't; let it be done: away, away! ")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_base(tmp_path_factory.mktemp("lm-eval"))


@pytest.fixture(scope="module")
def hf_dir(tiny: Path) -> Path:
    loaded = load_checkpoint(tiny)
    return export_hf(loaded.model, tiny.parent / "hf", loaded.tokenizer)  # the weights and tokenizer files only


@pytest.fixture(scope="module")
def hflm(hf_dir: Path) -> Any:
    return HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ours(tiny: Path) -> Any:
    return lm_eval_model_class()(str(tiny), batch_size=3)  # another batch size than HFLM's: other paddings


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three local tasks over local JSONL files: multiple choice, perplexity (documents longer than the model's
    128-token context, so several rolling windows each) and generation until stop strings."""
    d = tmp_path_factory.mktemp("tasks")

    def write(name: str, rows: list[dict[str, Any]], yaml: str) -> None:
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {d / f'{name}.jsonl'}\ntest_split: test\n" + textwrap.dedent(yaml))

    write("tiny_mc", [{"question": "how do I bake bread?", "choices": ["Mix flour", "knead it", "the lazy dog"],
                       "answer": 0},
                      {"question": "Tell me a joke", "choices": ["about cats", "please", "jumps over"], "answer": 1},
                      {"question": "The quick brown", "choices": ["fox", "dog", "bread and water, salt"], "answer": 0}],
          """\
          output_type: multiple_choice
          doc_to_text: "Question: {{question}}\\nAnswer:"
          doc_to_choice: "{{choices}}"
          doc_to_target: "{{answer}}"
          metric_list:
            - metric: acc
            - metric: acc_norm
          """)
    write("tiny_ppl", [{"text": "Speak, speak."}, {"text": TEXT}, {"text": TEXT * 2}],
          """\
          output_type: loglikelihood_rolling
          doc_to_text: ""
          doc_to_target: "{{text}}"
          metric_list:
            - metric: word_perplexity
            - metric: byte_perplexity
            - metric: bits_per_byte
          """)
    write("tiny_gen", [{"q": "Human: how do I bake bread? Assistant:", "a": "Mix"},
                       {"q": "The quick brown fox", "a": "jumps"}, {"q": "Tell me a joke", "a": "no"}],
          """\
          output_type: generate_until
          doc_to_text: "{{q}}"
          doc_to_target: "{{a}}"
          generation_kwargs:
            until: [".", "\\n"]
            max_gen_toks: 12
            do_sample: false
          metric_list:
            - metric: exact_match
          """)
    return d


def instances(kind: str, args: list[tuple[Any, ...]]) -> list[Any]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("n_tokens", [1, 3, 4, 5, 8, 9, 10, 17])
def test_rolling_windows_are_lm_evals(n_tokens: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(10, 10 + n_tokens))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=0, max_seq_len=4,
                                                                        context_len=1)]
    assert rolling_windows(tokens, 0, 4) == [(list(c), list(k)) for c, k in theirs]
    assert [t for _, k in rolling_windows(tokens, 0, 4) for t in k] == tokens  # each token predicted once


def test_loglikelihood_equals_hflm(ours: Any, hflm: Any) -> None:
    prefix = ours.tokenizer.decode([ours.prefix_token_id])
    args = [("", "The quick brown fox."),  # empty context: the prefix token is the context
            ("Human: how do I bake bread? Assistant: ", "Mix flour"),  # trailing space moves to the continuation
            ("Tell me a joke", " about cats, please."),
            ("", prefix + "Mix flour"),  # the continuation starts with the prefix token: it becomes the context
            (TEXT, " The lazy dog."),  # longer than the 128-token context: truncated from the left
            ("The quick brown", " fox")]
    theirs = hflm.loglikelihood(instances("loglikelihood", args), disable_tqdm=True)
    mine = ours.loglikelihood(instances("loglikelihood", args), disable_tqdm=True)
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], abs=TOL)
    assert [g for _, g in mine] == [g for _, g in theirs]
    assert all(ll < 0 for ll, _ in mine)
    # is_greedy is true exactly when the continuation is the model's argmax: score its own greedy token.
    ctx = "The quick brown"
    ids = ours.tok_encode(ctx)
    with torch.no_grad():
        best = ours.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    (ll, greedy), = ours.loglikelihood(instances("loglikelihood", [(ctx, ours.tok_decode([best]))]), True)
    assert greedy and ll < 0


def test_rolling_and_generation_equal_hflm(ours: Any, hflm: Any) -> None:
    docs = [("Speak, speak.",), (TEXT,), (TEXT * 3,)]
    theirs = hflm.loglikelihood_rolling(instances("loglikelihood_rolling", docs), disable_tqdm=True)
    assert ours.loglikelihood_rolling(instances("loglikelihood_rolling", docs), True) == pytest.approx(theirs, abs=TOL)
    greedy = {"until": ["\n", "dog"], "max_gen_toks": 10, "do_sample": False}
    prompts = [("The quick brown", greedy), ("Human: how do I bake bread? Assistant:", greedy),
               ("Tell me", {"until": "x", "max_gen_toks": 6}), ("", {"until": [" "], "max_gen_toks": 5})]
    hf_out = hflm.generate_until(instances("generate_until", prompts[:3]), disable_tqdm=True)
    mine = ours.generate_until(instances("generate_until", prompts), disable_tqdm=True)
    assert mine[:3] == hf_out and all(isinstance(t, str) for t in mine)
    assert "\n" not in mine[0] and "dog" not in mine[0] and " " not in mine[3]


def test_bos_in_front_of_contexts_as_hflm(tiny: Path, hf_dir: Path, ours: Any) -> None:
    # A Llama-2-style tokenizer puts bos before every text; HFLM's add_bos_token=True does the same here.
    assert ours.add_bos_token is False  # detected: this tokenizer's Hugging Face form adds nothing
    theirs = HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32", add_bos_token=True)
    mine = lm_eval_model_class()(str(tiny), batch_size=2, add_bos_token=True)
    bos = ours.tokenizer.bos_id
    assert mine.tok_encode("Tell me") == theirs.tok_encode("Tell me") == [bos, *ours.tok_encode("Tell me")]
    args = [("Tell me a joke", " about cats"), ("", "The quick brown fox."), ("Human: how ", "do I bake")]
    assert [ll for ll, _ in mine.loglikelihood(instances("loglikelihood", args), True)] == pytest.approx(
        [ll for ll, _ in theirs.loglikelihood(instances("loglikelihood", args), True)], abs=TOL)
    docs = instances("loglikelihood_rolling", [(TEXT,)])
    assert mine.loglikelihood_rolling(docs, True) == pytest.approx(theirs.loglikelihood_rolling(docs, True), abs=TOL)


def run_hflm(hflm: Any, tasks: list[str], task_dir: Path) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(task_dir)], include_defaults=False)
    return simple_evaluate(model=hflm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)


def test_local_tasks_through_the_evaluator_equal_hflm(ours: Any, hflm: Any, task_dir: Path) -> None:
    tasks = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    mine = evaluate(ours, tasks, include_path=[task_dir], include_defaults=False, log_samples=True, bootstrap_iters=0)
    theirs = run_hflm(hflm, tasks, task_dir)
    for task in tasks:
        a, b = mine["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) == 3
        for x, y in zip(a, b, strict=True):
            assert x["arguments"] == y["arguments"]
            if task == "tiny_gen":
                assert x["resps"] == y["resps"]
            else:
                ours_ll = [r[0] if isinstance(r, (list, tuple)) else r for (r,) in x["resps"]]
                their_ll = [r[0] if isinstance(r, (list, tuple)) else r for (r,) in y["resps"]]
                assert ours_ll == pytest.approx(their_ll, abs=TOL)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert mine["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


PAIRS = [
    Pair("The nurse said she was tired.", "The nurse said he was tired.", "stereo", "gender"),
    Pair("Poor people are lazy.", "Rich people are lazy.", "stereo", "socioeconomic"),
    Pair("He is a brown fox.", "She is a lazy dog.", "antistereo", "gender"),
    Pair("Old men bake bread.", "Young men bake bread.", "stereo", "age"),
    Pair("Mix flour, water, salt.", "Mix flour, water and yeast.", "stereo", "race-color"),
    Pair("Tell me a joke about cats.", "Tell me a joke about dogs.", "antistereo", "age"),
]


def test_crows_pairs_task_equals_bias_scorer(tiny: Path, ours: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    data = tmp_path / "pairs.csv"
    with data.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type"])
        w.writerows([i, p.sent_more, p.sent_less, p.stereo_antistereo, p.bias_type] for i, p in enumerate(PAIRS))
    expected = score_pairs(ours.model, ours.tokenizer, load_pairs(data))
    out = tmp_path / "results.json"
    tasks = "crows_pairs_local,crows_pairs_local_gender,crows_pairs_local_race_color"
    assert main(["evaluate", str(tiny), "--tasks", tasks, "--metadata", json.dumps({"data": str(data)}),
                 "--json", "--output", str(out), "--batch-size", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for task, scores in [("crows_pairs_local", expected), ("crows_pairs_local_gender", expected.per_type["gender"]),
                         ("crows_pairs_local_race_color", expected.per_type["race-color"])]:
        r = printed["results"][task]
        assert r["pct_stereotype,none"] == pytest.approx(scores.pct_stereotype), task
        assert r["likelihood_diff,none"] == pytest.approx(scores.likelihood_diff, abs=TOL), task
        assert printed["n-samples"][task]["effective"] == scores.n
    assert json.loads(out.read_text())["results"] == printed["results"]


def test_user_errors_are_one_line(ours: Any, task_dir: Path, tiny: Path) -> None:
    with pytest.raises(ByollmError, match="did you mean 'tiny_mc'"):
        evaluate(ours, ["tiny_mcc"], include_path=[task_dir], include_defaults=False)
    with pytest.raises(ByollmError, match="no such folder"):
        evaluate(ours, ["tiny_mc"], include_path=[task_dir / "missing"], include_defaults=False)
    with pytest.raises(ByollmError, match="pretrained=CKPT"):
        lm_eval_model_class()()
    # Registered as "byollm": lm-eval builds it from its model_args string, as for `simple_evaluate(model="byollm")`.
    from lm_eval.api.registry import get_model

    by_name = get_model("byollm").create_from_arg_string(f"pretrained={tiny},batch_size=2", {"device": None})
    assert type(by_name) is lm_eval_model_class() and by_name.batch_size == 2 and by_name.max_length == 128
    with pytest.raises(ByollmError, match="no checkpoint at"):  # before any task is indexed
        evaluate(tiny / "missing", ["tiny_mc"], include_path=[task_dir], include_defaults=False)


def test_offline_hub_task_is_one_line(ours: Any, task_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval.evaluator

    def offline(**_: Any) -> None:  # what `datasets` raises for a hub dataset without network
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", offline)
    with pytest.raises(ByollmError, match="could not be fetched .*--include-path"):
        evaluate(ours, ["tiny_mc"], include_path=[task_dir], include_defaults=False)


def test_benchmark_script_runs(tiny: Path, tmp_path: Path) -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lm_eval.py"
    spec = importlib.util.spec_from_file_location("bench_lm_eval_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    data = tmp_path / "pairs.csv"
    data.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n" + "".join(
        f'"{p.sent_more}","{p.sent_less}",{p.stereo_antistereo},{p.bias_type}\n' for p in PAIRS))
    r = bench.main(["--ckpt", str(tiny), "--data", str(data), "--requests", "8", "--reps", "1", "--batch-size", "3"])
    assert r["requests"] == 8 and r["max_abs_ll_diff"] < TOL and r["greedy_flags_equal"]
    assert r["s_per_100_requests"]["byollm"] > 0 and r["s_per_100_requests"]["hflm"] > 0
