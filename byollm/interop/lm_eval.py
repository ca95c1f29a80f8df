"""Any byollm model inside EleutherAI's lm-evaluation-harness, and `byollm evaluate`.

lm-eval (the harness behind the Open LLM Leaderboard) turns each task, from HellaSwag to CrowS-Pairs, into
requests of three kinds, and a model only has to answer those:

    loglikelihood(context, continuation) -> (log p(continuation | context), is_greedy)
        multiple choice: one request per choice; the task picks the most likely one. `is_greedy` says whether
        greedy decoding would have produced exactly the continuation.
    loglikelihood_rolling(text) -> log p(text)
        perplexity: the whole text, scored in windows of the model's context length.
    generate_until(context, {until, max_gen_toks, do_sample, temperature, ...}) -> generated text
        free generation, cut before the first stop string.

`LMAdapter` answers them with our model and tokenizer, exactly as lm-eval's own Hugging Face class (HFLM) does
on the exported model (tests/test_lm_eval_adapter.py checks that to 1e-4 nats):

- Tokens. An empty context becomes the *prefix token* (bos, else eos): the first word needs something to be
  predicted from. When the continuation already starts with that token, its first token is the context
  instead. Trailing spaces of a context move to the continuation ("Answer: " + "Paris" -> "Answer:" + " Paris"),
  since BPE tokenizers attach a space to the word after it. The continuation's tokens are those of
  tok(context + continuation) after the context's own tokens, so a word split differently inside the whole
  string is still scored as the model sees it.
- Scoring. Requests are sorted longest first (a batch's first row sets its width; a too-large batch fails at
  once, not at the end), right-padded (a causal model never looks right, so the padding changes nothing),
  and truncated from the left to max_length + 1 tokens. Row [c0 c1 c2 | k0 k1] runs as input [c0 c1 c2 k0]:
  the logits at c2, k0 predict k0, k1, and their log_softmax (fp32) at those ids sum to the log-likelihood.
- Rolling windows (max_length L = the model's block size): every token is predicted once, the first from the
  prefix token, and every window after the first gets as much context as fits:

        tokens 0..9, L = 4    input  [P 0 1 2] [3 4 5 6] [5 6 7 8]
                              scores  0 1 2 3   4 5 6 7       8 9

- Generation goes through `byollm.generate` (left-padded batches, KV cache): greedy unless the task samples,
  `until` as stop strings (the eos token stops it too), at most max_gen_toks new tokens; contexts are cut from
  the left to L - max_gen_toks tokens.

lm-eval is imported only when an adapter is built (`lm_eval_model_class`, or the name `ByollmLM`), so the
CLI starts without it. From Python:

    from byollm.interop.lm_eval import evaluate
    results = evaluate("runs/sft", ["crows_pairs_local"])           # the task shipped in byollm/safety/tasks
    results["results"]["crows_pairs_local"]["pct_stereotype,none"]

and on the command line `byollm evaluate CKPT --tasks hellaswag,arc_easy` (hub tasks, with network) or
`--tasks my_task --include-path DIR` (task YAMLs over local files). The adapter is registered with lm-eval as
"byollm" when it is built, so lm-eval's own Python API takes it by name too:
`simple_evaluate(model="byollm", model_args="pretrained=CKPT,batch_size=8", tasks=[...])`.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - jsonargparse reads the annotations at run time

import torch
import torch.nn.functional as F

from byollm.errors import ByollmError, require

log = logging.getLogger(__name__)

# The task YAMLs shipped with byollm (crows_pairs_local): always on the include path of `evaluate`.
TASKS_DIR = Path(__file__).resolve().parents[1] / "safety" / "tasks"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's priority

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


# --------------------------------------------------------------------------------------------------
# The three computations, on token ids (no lm-eval needed)
# --------------------------------------------------------------------------------------------------


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Request]:
    """Disjoint (context, continuation) windows that predict each token of `tokens` exactly once (lm-eval's
    get_rolling_token_windows with context_len=1, then make_disjoint_window): the first window predicts up to
    max_length tokens from the prefix token; each later one predicts the next up to max_length tokens, with the
    tokens before them as context, so that every window's input is max_length tokens long."""
    if max_length < 1:
        raise ByollmError(f"max_length must be at least 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    windows = [([prefix_token], tokens[:max_length])]
    done = len(windows[0][1])
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        windows.append((tokens[max(0, end - max_length - 1):done], tokens[done:end]))
        done = end
    return windows


@torch.no_grad()
def score_requests(model: torch.nn.Module, requests: Sequence[Request], *, max_length: int,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens), whether each is the argmax) for each (context, continuation) pair, in
    the order given. Batched as HFLM batches: longest first, right-padded, left-truncated to max_length + 1."""
    device = next(model.parameters()).device
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ByollmError(f"request {i} has an empty context or continuation (context {len(context)} tokens, "
                              f"continuation {len(continuation)}); an empty context must be the prefix token")
        if len(continuation) > max_length:
            raise ByollmError(f"request {i}: a continuation of {len(continuation)} tokens does not fit the model's "
                              f"context of {max_length} tokens")
    # Longest first; equal lengths in token order, as HFLM's Collator sorts (so batches hold the same rows).
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]),
                                                         tuple(requests[i][0] + requests[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        # The last token is never an input: nothing after it is scored.
        inputs = [(requests[i][0] + requests[i][1])[-(max_length + 1):][:-1] for i in rows]
        ids = torch.zeros(len(rows), max(len(x) for x in inputs), dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, :len(x)] = torch.tensor(x)
        logits = model(ids.to(device)).logits
        for r, i in enumerate(rows):
            continuation = torch.tensor(requests[i][1], device=device)
            n = len(inputs[r])
            # Positions n - len(continuation) .. n - 1 predict the continuation's tokens.
            logprobs = F.log_softmax(logits[r, n - len(continuation):n].float(), dim=-1)
            ll = logprobs.gather(-1, continuation[:, None]).sum().item()
            results[i] = (ll, bool((logprobs.argmax(dim=-1) == continuation).all()))
        if progress is not None:
            progress(len(rows))
    return results


def sampling_params(gen_kwargs: dict[str, Any], *, default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                    eos_text: str | None = None) -> tuple[Any, list[str]]:
    """lm-eval's generation kwargs -> (our SamplingParams, the stop strings to cut at): greedy unless do_sample
    (or, without do_sample, a temperature above 0); the max_gen_toks aliases in lm-eval's order of priority."""
    from byollm.sampling import SamplingParams

    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if eos_text and eos_text not in until:
        until.append(eos_text)  # as lm-eval's handle_stop_sequences does
    max_new = next((kwargs.pop(k) for k in MAX_TOKEN_KEYS if kwargs.get(k) is not None), default_max_gen_toks)
    for k in MAX_TOKEN_KEYS:
        kwargs.pop(k, None)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = kwargs.pop("do_sample", None)
    if do_sample is None:
        do_sample = temperature > 0
    if do_sample and temperature == 0:
        temperature = 1.0  # transformers' default temperature when sampling without one
    top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
    repetition_penalty = float(kwargs.pop("repetition_penalty", 1.0))
    if kwargs:
        log.warning("byollm's lm-eval adapter ignores the generation options %s", sorted(kwargs))
    params = SamplingParams(max_new_tokens=int(max_new), temperature=temperature if do_sample else 0.0,
                            top_k=top_k if do_sample else None, top_p=top_p if do_sample else None,
                            repetition_penalty=repetition_penalty, stop_strings=tuple(s for s in until if s))
    return params, until


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------


class LMAdapter:
    """The answers to lm-eval's requests for one byollm model. Used through `lm_eval_model_class()`, which
    mixes it into `lm_eval.api.model.LM` (the class lm-eval's evaluator accepts):

        ByollmLM = lm_eval_model_class()
        lm = ByollmLM("runs/sft", batch_size=16, device="cpu")       # any checkpoint byollm loads, fp32
        lm = ByollmLM(model=model, tokenizer=tok)                     # or a model in memory

    Arguments as lm-eval passes model_args: pretrained (a checkpoint path), batch_size, device, dtype
    ("float32"; "auto": as saved), max_length (default: the model's block_size), max_gen_toks (256),
    add_bos_token (default: as the tokenizer's Hugging Face post-processor does), prefix_token_id (default: bos,
    else eos).
    """

    def __init__(self, pretrained: str | Path | None = None, *, model: torch.nn.Module | None = None,
                 tokenizer: Any = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 device: str | None = None, dtype: str = "float32", max_length: int | str | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | str | None = None,
                 prefix_token_id: int | str | None = None, **ignored: Any) -> None:
        super().__init__()  # lm_eval's LM.__init__ (rank 0 of 1, no cache hook) when mixed in
        ignored = {k: v for k, v in ignored.items() if v is not None}
        if ignored:
            log.warning("byollm's lm-eval adapter ignores the model arguments %s", sorted(ignored))
        if model is None:
            if pretrained is None:
                raise ByollmError("the byollm lm-eval model needs a checkpoint: model_args pretrained=CKPT")
            from byollm.checkpoint import load_checkpoint

            torch_dtype = None if dtype == "auto" else getattr(torch, str(dtype), None)
            if dtype != "auto" and not isinstance(torch_dtype, torch.dtype):
                raise ByollmError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
            loaded = load_checkpoint(pretrained, device=device or "cpu", dtype=torch_dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
            self.name = str(loaded.path)
        else:
            self.name = str(pretrained or type(model).__name__)
        if tokenizer is None:
            raise ByollmError(f"{self.name} has no tokenizer; lm-eval's tasks are text, so the model needs one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = self._batch_size(batch_size)
        self.max_length = int(max_length) if max_length is not None else int(model.config.block_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.tokenizer.eos_id is None and self.tokenizer.bos_id is None:
            raise ByollmError(f"{self.name}: the tokenizer has neither an eos nor a bos token; lm-eval needs one to "
                              "start empty contexts and end generations (tokenizer.set_roles(eos=...))")
        self.prefix_token_id = int(prefix_token_id) if prefix_token_id is not None else (
            self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id)
        self.add_bos_token = (_as_bool(add_bos_token) if add_bos_token is not None
                              else self._post_processor_adds_bos())

    @staticmethod
    def _batch_size(batch_size: int | str | None) -> int:
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            return DEFAULT_BATCH_SIZE  # no memory probing here: a fixed size, --batch-size to change it
        if int(batch_size) < 1:
            raise ByollmError(f"batch_size must be at least 1, got {batch_size}")
        return int(batch_size)

    def _post_processor_adds_bos(self) -> bool:
        """Whether the model's own Hugging Face tokenizer puts bos in front of a text (Llama 2 does, GPT-2 and
        SmolLM2 do not): HFLM encodes contexts that way, so we do too."""
        bos = self.tokenizer.bos_id
        if bos is None:
            return False
        try:
            hf = self.tokenizer.to_hf()
            with_special, plain = hf.encode("a").ids, hf.encode("a", add_special_tokens=False).ids
        except Exception:  # a tokenizer without a Hugging Face form: ours never add bos themselves
            return False
        return len(with_special) > len(plain) and with_special[0] == bos

    # --- what lm-eval reads -----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """End of text: eos (else bos); its text is always a stop string of generate_until."""
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        """Text -> ids; bos in front when asked, or (None) when the tokenizer's own form adds it and the text does
        not already start with it, as HFLM's tok_encode."""
        ids = self.tokenizer.encode(string)
        bos = self.tokenizer.bos_id
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add and bos is not None and not (ids[:1] == [bos]):
            ids = [bos, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> Request:
        """(context ids, continuation ids) of one loglikelihood request (see the module docstring)."""
        if context == "":
            ids = self.tok_encode(continuation, add_special_tokens=False)
            if not ids:
                raise ByollmError(f"the continuation {continuation!r} encodes to no tokens")
            return ([self.prefix_token_id], ids) if ids[0] != self.prefix_token_id else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self.tok_encode(context + continuation), self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # --- the three request types ------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        with _Progress(len(pairs), "loglikelihood", disable_tqdm) as bar:
            results = score_requests(self.model, pairs, max_length=self.max_length, batch_size=self.batch_size,
                                     progress=bar)
        for req, result in zip(requests, results, strict=True):
            self._cache("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[Request] = []
        counts = []
        for req in requests:
            w = rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length)
            windows += w
            counts.append(len(w))
        with _Progress(len(windows), "loglikelihood_rolling windows", disable_tqdm) as bar:
            scores = score_requests(self.model, windows, max_length=self.max_length, batch_size=self.batch_size,
                                    progress=bar)
        out, at = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(ll for ll, _ in scores[at:at + n])
            at += n
            out.append(total)
            self._cache("loglikelihood_rolling", req.args[:1], total)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        from byollm.generate import generate

        out: list[str] = [""] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        # Requests with the same options are generated together, longest context first (as HFLM does).
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        encoded = [self.tok_encode(req.args[0]) for req in requests]
        with _Progress(len(requests), "generate_until", disable_tqdm) as bar:
            for indices in groups.values():
                params, until = sampling_params(requests[indices[0]].args[1], eos_text=eos_text,
                                                default_max_gen_toks=self.max_gen_toks)
                room = self.max_length - params.max_new_tokens
                if room < 1:
                    raise ByollmError(f"max_gen_toks {params.max_new_tokens} leaves no room for a context in the "
                                      f"model's {self.max_length} tokens")
                indices = sorted(indices, key=lambda i: (-len(encoded[i]), requests[i].args[0]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    prompts = [encoded[i][-room:] or [self.prefix_token_id] for i in batch]
                    result = generate(self.model, prompts, params, tokenizer=self.tokenizer)
                    for i, completion in zip(batch, result, strict=True):
                        text = completion.text or ""
                        for stop in until:  # lm-eval's postprocess: cut at every stop string
                            if stop:
                                text = text.split(stop)[0]
                        out[i] = text
                        self._cache("generate_until", requests[i].args, text)
                    bar(len(batch))
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation in the model's own chat format (byollm's, or its tokenizer's Jinja template)."""
        from byollm.tokenizer.chat_format import chat_format

        return chat_format(self.tokenizer).render(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from byollm.tokenizer.chat_format import chat_template_source

        return (chat_template_source(self.tokenizer) or "byollm") if chat_template else None

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "model_name": self.name}

    def _cache(self, kind: str, args: Any, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)  # set by lm_eval's LM; lm-eval's --use_cache fills it
        if hook is not None:
            hook.add_partial(kind, args, result)


def _as_bool(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class _Progress:
    """A tqdm bar (or nothing) as a context manager whose value is a function advancing it by n."""

    def __init__(self, total: int, desc: str, disable: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=disable or total == 0)

    def __enter__(self) -> Callable[[int], None]:
        return self.bar.update

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


@functools.cache
def lm_eval_model_class() -> type:
    """`LMAdapter` as an `lm_eval.api.model.LM` subclass, registered with lm-eval as "byollm" (built once)."""
    lm_model = require("lm_eval.api.model", "safety")
    registry = require("lm_eval.api.registry", "safety")
    cls = type("ByollmLM", (LMAdapter, lm_model.LM), {"__doc__": LMAdapter.__doc__, "__module__": __name__})
    registry.register_model("byollm")(cls)
    return cls


def __getattr__(name: str) -> Any:
    """`from byollm.interop.lm_eval import ByollmLM` builds the class (and imports lm-eval) on first use."""
    if name == "ByollmLM":
        return lm_eval_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Running tasks: `byollm evaluate`
# --------------------------------------------------------------------------------------------------


def evaluate(ckpt: str | Path | Any, tasks: Sequence[str], *, include_path: Sequence[str | Path] = (),
             limit: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, num_fewshot: int | None = None,
             device: str = "cpu", dtype: str = "float32", metadata: dict[str, Any] | None = None,
             log_samples: bool = False, include_defaults: bool | None = None, bootstrap_iters: int = 100_000,
             apply_chat_template: bool = False, gen_kwargs: str | None = None, seed: int = 1234) -> dict[str, Any]:
    """Run lm-eval tasks on a checkpoint (or an adapter built already); lm-eval's results dictionary.

    include_path: folders of task YAMLs (byollm's own, with crows_pairs_local, is always searched);
    include_defaults: also lm-eval's own tasks (the hub ones); None: only when a task is not found locally;
    metadata: passed to the tasks (crows_pairs_local reads {"data": "FILE.csv"})."""
    require("lm_eval", "safety")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ByollmError("no task given: --tasks name1,name2 (e.g. crows_pairs_local)")
    # The model first: a wrong checkpoint path fails in a second, before lm-eval indexes any task.
    lm = ckpt if isinstance(ckpt, LMAdapter) else lm_eval_model_class()(ckpt, batch_size=batch_size, device=device,
                                                                        dtype=dtype)
    paths = [str(TASKS_DIR)]
    for p in include_path:
        if not Path(p).is_dir():
            raise ByollmError(f"--include-path {p}: no such folder (give the folder holding the task YAML files)")
        paths.append(str(Path(p).resolve()))
    # Indexing lm-eval's own ~15,000 task YAMLs takes a minute on 2 cores: look at the local folders first and
    # index the hub tasks only when a name is not among them (include_defaults=None).
    manager = TaskManager(include_path=paths, include_defaults=bool(include_defaults), metadata=metadata)
    known = set(manager.all_tasks)
    if include_defaults is None and any(not _found(n, known) for n in names):
        manager = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
        known = set(manager.all_tasks)
    missing = [n for n in names if not _found(n, known)]
    if missing:
        import difflib

        hints = [f"{n!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
            n, known, n=1)) else "") for n in missing]
        raise ByollmError(f"unknown lm-eval task {', '.join(hints)}; list them with `lm_eval ls tasks`, or give "
                          "--include-path DIR with the task's YAML")
    try:
        results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=log_samples, bootstrap_iters=bootstrap_iters, gen_kwargs=gen_kwargs,
                                  apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:  # `datasets` could not fetch a hub task's data
        raise ByollmError(f"{', '.join(names)}: a task's dataset is on the Hugging Face hub and could not be fetched "
                          f"({e}); run where there is network, or write a task YAML over a local copy of the data "
                          "and give --include-path DIR") from e
    if results is None:  # only rank 0 gets results; we run one process
        raise ByollmError("lm-eval returned no results")
    results["config"]["model"] = lm.name
    return results


EVALUATE_DESCRIPTION = (
    "Run lm-evaluation-harness tasks on a checkpoint through byollm's adapter (loglikelihood, rolling perplexity, "
    "generate_until; equal to lm-eval's HFLM on the exported model): hub tasks where there is network, task YAMLs "
    "over local files with --include-path, and crows_pairs_local (CrowS-Pairs over a local CSV, default: the "
    "crows-pairs dataset, $BYOLLM_DATA_MIRROR first). Prints lm-eval's table, or JSON. Needs the safety extra.")


def _found(name: str, known: set[str]) -> bool:
    """Whether lm-eval knows the task (or group, or tag); names may be shell patterns (mmlu_*), as in lm-eval."""
    import fnmatch

    if any(c in name for c in "*?["):
        return any(fnmatch.fnmatchcase(k, name) for k in known)
    return name in known


def add_evaluate_arguments(p: Any) -> None:
    """The options of `byollm evaluate` on a jsonargparse parser (the parser itself is byollm.cli's)."""
    p.add_argument("ckpt", type=str, help="checkpoint: byollm, run directory or Hugging Face directory")
    p.add_argument("--tasks", type=str, required=True,
                   help="lm-eval task names, comma-separated (hub tasks need network; crows_pairs_local ships here)")
    p.add_argument("--include-path", "--include_path", type=Optional[list[str]], default=None,  # noqa: UP045
                   help="folder(s) of task YAML files (local tasks over local files)")
    p.add_argument("--limit", type=Optional[float], default=None,  # noqa: UP045
                   help="at most this many documents per task (below 1: a fraction)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="requests per forward")
    p.add_argument("--num-fewshot", "--num_fewshot", type=Optional[int], default=None,  # noqa: UP045
                   help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--metadata", type=Optional[str], default=None,  # noqa: UP045
                   help='JSON for the tasks, e.g. \'{"data": "crows_pairs_anonymized.csv"}\' (crows_pairs_local)')
    p.add_argument("--gen-kwargs", "--gen_kwargs", type=Optional[str], default=None,  # noqa: UP045
                   help="generation options for generate_until tasks, e.g. temperature=0.7,do_sample=True")
    p.add_argument("--apply-chat-template", "--apply_chat_template", action="store_true",
                   help="wrap prompts in the model's chat format")
    p.add_argument("--log-samples", "--log_samples", action="store_true",
                   help="keep every document's requests and answers in --output")
    p.add_argument("--seed", type=int, default=1234, help="seed of lm-eval's sampling of documents and generation")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")
    p.add_argument("--dtype", type=str, default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of the table")
    p.add_argument("--output", type=Optional[str], default=None,  # noqa: UP045
                   help="also write the full results as JSON to this file")


def results_json(results: dict[str, Any]) -> str:
    """lm-eval's results as JSON (numpy numbers and other objects written as lm-eval writes them)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def run_evaluate(a: Any) -> dict[str, Any]:
    """`byollm evaluate`: run the tasks, print lm-eval's table (or JSON), write --output."""
    from byollm.atomic import atomic_write_text

    try:
        metadata = json.loads(a.metadata) if a.metadata else None
    except json.JSONDecodeError as e:
        raise ByollmError(f"--metadata is not JSON ({e}); e.g. '{{\"data\": \"pairs.csv\"}}'") from e
    start = time.perf_counter()
    results = evaluate(a.ckpt, a.tasks.split(","), include_path=a.include_path or (), limit=a.limit,
                       batch_size=a.batch_size, num_fewshot=a.num_fewshot, device=a.device, dtype=a.dtype,
                       metadata=metadata, log_samples=a.log_samples, apply_chat_template=a.apply_chat_template,
                       gen_kwargs=a.gen_kwargs, seed=a.seed)
    print(f"[byollm] evaluated {results['config']['model']} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.output, results_json(results) + "\n")
    summary = {k: v for k, v in results.items() if k != "samples"}
    if a.json:
        print(results_json(summary))
    else:
        from lm_eval.utils import make_table

        print(make_table(summary))
        if summary.get("groups"):
            print(make_table(summary, "groups"))
    return results
