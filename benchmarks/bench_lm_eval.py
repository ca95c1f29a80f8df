"""Speed of byollm's lm-eval adapter against lm-eval's own HFLM, same weights, same requests, same run.

    python benchmarks/bench_lm_eval.py                              # SmolLM2-135M-Instruct (packaged), 100 requests
    python benchmarks/bench_lm_eval.py --ckpt runs/sft --requests 200 --batch-size 8 --reps 5 --json out.json

The requests are lm-eval `loglikelihood` requests as crows_pairs_local sends them: each CrowS-Pairs sentence with
an empty context (the sentences of the first requests/2 pairs of the registered file, $BYOLLM_DATA_MIRROR first).
Contenders, timed interleaved (common.interleaved), each a whole `loglikelihood(requests)` call, tokenisation
included:

  byollm   byollm.interop.lm_eval's adapter on the checkpoint (fp32)
  hflm     lm_eval.models.huggingface.HFLM on its Hugging Face export (byollm.interop.hf.export_hf), fp32

It prints seconds per 100 requests, the ratio hflm / byollm (above 1: ours is faster), and the largest
difference between the two sides' log-likelihoods (they must agree: tests/test_lm_eval_adapter.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_info, median, table, warn_if_busy, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="a CrowS-Pairs CSV file (default: the registered crows-pairs)")
    ap.add_argument("--requests", type=int, default=100, help="loglikelihood requests per call")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per contender (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_busy(torch.get_num_threads())

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from byollm.checkpoint import load_checkpoint
    from byollm.interop.hf import export_hf
    from byollm.interop.lm_eval import lm_eval_model_class
    from byollm.interop.pretrained import packaged_checkpoint
    from byollm.safety.bias import load_pairs

    ckpt = args.ckpt or packaged_checkpoint("smollm2-135m-instruct")
    sentences = [s for p in load_pairs(args.data) for s in (p.sent_more, p.sent_less)][:args.requests]
    requests = [Instance("loglikelihood", {}, ("", s), i) for i, s in enumerate(sentences)]
    ours = lm_eval_model_class()(str(ckpt), batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_checkpoint(ckpt)
        hf_dir = export_hf(loaded.model, Path(tmp) / "hf", loaded.tokenizer)
        del loaded
        hflm = HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", dtype="float32")
        answers: dict[str, list[tuple[float, bool]]] = {}

        def run(name: str, lm: Any) -> None:
            answers[name] = lm.loglikelihood(requests, disable_tqdm=True)

        times = interleaved({"byollm": lambda: run("byollm", ours), "hflm": lambda: run("hflm", hflm)},
                            reps=args.reps)
    per_100 = {k: median(v) * 100 / len(requests) for k, v in times.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(answers["byollm"], answers["hflm"], strict=True))
    greedy_same = all(a[1] == b[1] for a, b in zip(answers["byollm"], answers["hflm"], strict=True))
    results = {"machine": machine_info(), "ckpt": str(ckpt), "requests": len(requests),
               "batch_size": args.batch_size, "reps": args.reps, "seconds": times,
               "s_per_100_requests": per_100, "ratio_hflm_over_byollm": per_100["hflm"] / per_100["byollm"],
               "max_abs_ll_diff": diff, "greedy_flags_equal": greedy_same}
    print(table([{"contender": k, "s / 100 requests": v, "calls": len(times[k])} for k, v in per_100.items()]))
    print(json.dumps({k: results[k] for k in ("s_per_100_requests", "ratio_hflm_over_byollm", "max_abs_ll_diff",
                                              "greedy_flags_equal")}))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
