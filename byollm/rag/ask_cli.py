"""`byollm rag ask --index DIR "question"`: its options and what it prints (the parser itself is byollm.cli's).

    byollm rag ask --index guide-index "How does the server compare API keys?"
    byollm rag ask --index guide-index --openai-base-url http://127.0.0.1:8000/v1 --model smollm2 "..."

The answer streams to stdout, then the numbered sources (cited ones marked, flagged ones with what was found);
notes go to stderr. `--json` prints one JSON object instead (RagAnswer.to_dict). The model is our engine on
`--ckpt` (default: the packaged SmolLM2-135M-Instruct, offline) or, with `--openai-base-url`, any
OpenAI-compatible endpoint; its key comes from $OPENAI_API_KEY, never the command line.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal, Optional  # noqa: UP035 - jsonargparse reads the annotations at run time

from byollm.rag.answer import RETRIEVERS, RagAnswer, ask, ask_stream, load_generator, open_index


def add_ask_arguments(p: Any) -> None:
    """The options of `byollm rag ask` on a jsonargparse parser."""
    p.add_argument("question", type=str, help="the question to answer from the index")
    p.add_argument("--index", type=str, required=True, help="the index directory (byollm rag index)")
    p.add_argument("--k", type=int, default=5, help="passages to retrieve")
    p.add_argument("--retriever", type=Literal[RETRIEVERS], default="hybrid", help="bm25, dense or hybrid (RRF)")
    p.add_argument("--min-score", "--min_score", type=Optional[float], default=None,  # noqa: UP045
                   help="leave out passages scoring below this, and answer 'not found' when none is left (default: "
                        "calibrated per retriever: dense and hybrid 0.25 cosine, bm25 1.0)")
    p.add_argument("--groups", type=Optional[str], default=None,  # noqa: UP045
                   help="answer as a caller in these access groups, comma-separated ('': public chunks only; "
                        "default: unrestricted, the index's owner)")
    p.add_argument("--drop-flagged", "--drop_flagged", action="store_true",
                   help="leave passages flagged as instruction-like out of the prompt")
    p.add_argument("--ckpt", type=Optional[str], default=None,  # noqa: UP045
                   help="the model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--openai-base-url", "--openai_base_url", type=Optional[str], default=None,  # noqa: UP045
                   help="generate with this OpenAI-compatible endpoint instead (key: $OPENAI_API_KEY)")
    p.add_argument("--model", type=Optional[str], default=None,  # noqa: UP045
                   help="the model id the endpoint serves (with --openai-base-url)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=Optional[int], default=None, help="seed of the sampling")  # noqa: UP045
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")
    p.add_argument("--json", action="store_true", help="print the answer, citations and sources as one JSON object")


def run_ask(a: Any) -> RagAnswer:
    """Answer `a.question` as the options say, printing as the module docstring says."""
    index = open_index(a.index)
    generator = load_generator(a.ckpt, openai_base_url=a.openai_base_url, model=a.model, device=a.device)
    options = {"generator": generator, "k": a.k, "retriever": a.retriever, "min_score": a.min_score,
               "groups": groups_option(a.groups), "drop_flagged": a.drop_flagged,
               "max_tokens": a.max_new_tokens, "temperature": a.temperature, "seed": a.seed}
    if a.json:
        answer = ask(index, a.question, **options)
        print(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
        return answer
    answer = None
    for piece in ask_stream(index, a.question, **options):
        if isinstance(piece, RagAnswer):
            answer = piece
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    assert answer is not None
    print()
    print_sources(answer)
    return answer


def groups_option(value: str | None) -> set[str] | None:
    """--groups "hr,staff" -> {"hr", "staff"}; "" -> set() (a caller in no group); None -> None (unrestricted)."""
    return None if value is None else {g.strip() for g in value.split(",") if g.strip()}


def print_sources(answer: RagAnswer) -> None:
    cited = {c.n for c in answer.citations}
    if answer.sources:
        print("\nSources:")
    for s in answer.sources:
        mark = ", cited" if s.n in cited else ""
        print(f"  [{s.n}] {s.title} \u2014 {s.source} (score {s.score:.4f}{mark})")
        if s.flags:
            print(f"      flagged: {'; '.join(f.describe() for f in s.flags)}")
    for s in answer.dropped:
        print(f"  (left out, flagged) {s.title} \u2014 {s.source}: {'; '.join(f.describe() for f in s.flags)}")
    if answer.invalid_citations:
        print(f"[byollm] removed citations of sources that were not given: {answer.invalid_citations}",
              file=sys.stderr)
    if answer.not_found:
        why = ("nothing the caller may see was retrieved" if answer.best_score is None else
               f"the best passage scored {answer.best_score:.4f} (hybrid: its cosine), below the threshold "
               "(--min-score)")
        print(f"[byollm] not found: {why}", file=sys.stderr)


__all__ = ["add_ask_arguments", "groups_option", "print_sources", "run_ask"]
