"""Answering a question from an index: retrieve, build the prompt, generate, check the citations.

    index = RagIndex.open("guide-index")
    generator = load_generator("models/smollm2-135m-instruct")          # our engine, or:
    generator = OpenAIGenerator("http://127.0.0.1:8000/v1", "smollm2")   # any OpenAI-compatible endpoint
    answer = ask(index, "How does the server compare API keys?", generator=generator, groups={"staff"})
    print(answer.text, [c.source for c in answer.citations])

Steps (`prepare` does 1-4, the generator 5, `finish` 6; the server runs the same `prepare` and `finish` around
its own engine):
1. **retrieve** `k` hits as the caller may see them (`groups`: the caller's access groups, None for an
   unrestricted caller; the index filters inside its search, and every hit is checked again here, so a chunk of
   another group never reaches a prompt, a citation or a score);
2. **threshold**: hits whose relevance is below `min_score` are left out (`relevant`; the defaults, calibrated,
   are DEFAULT_MIN_SCORE's); when none is left the answer is "not found"
   (`NOT_FOUND`) and the model is not asked, rather than left to guess from unrelated text;
3. **scan** each passage for instruction-like text (`byollm.rag.safety`); flagged passages stay in the prompt,
   marked, unless `drop_flagged`;
4. **prompt**: numbered, delimited sources and the question (`byollm.rag.prompt`), dropping the lowest-ranked
   sources while it does not fit the generator's context;
5. **generate**, streaming or not;
6. **cite**: the `[n]` markers of the answer are mapped to the chunks they name; citations of sources that
   were not given are dropped from the text and reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from byollm.errors import ByollmError, require
from byollm.rag.prompt import Source, may_see, number_sources, rag_messages
from byollm.rag.safety import Flag, clean_citations, parse_citations

NOT_FOUND = "I could not find the answer in the indexed documents."
RETRIEVERS = ("bm25", "dense", "hybrid")
# "Nothing relevant": a hit whose relevance (`relevance`) is below the threshold is left out, and with none left
# the answer is NOT_FOUND. Calibrated on the SQuAD sample (benchmarks/bench_rag_thresholds.py, docs/benchmarks.md:
# its 810 answerable questions against 330 off-topic ones, Shakespeare, cooking, Alpaca's questions):
# - dense: the cosine of normalised all-MiniLM-L6-v2 embeddings (another model has another scale). Best-hit
#   cosines separate well (ROC AUC 0.999: answerable p1 0.26 / median 0.62, off-topic median 0.10 / p99 0.28);
#   0.25 keeps 99.1% of the answerable questions and refuses 95.8% of the off-topic ones (0.30: 98.0 / 99.1).
# - bm25: scores grow with the query's length and the corpus' IDF, so no threshold transfers well, and they
#   separate worse (AUC 0.943: off-topic questions share words such as "first" or "team"). 1.0 never refused an
#   answerable question and refuses 18% of the off-topic ones; 2.0 would refuse 71% but lose 5% of the answerable.
#   (A query with no word in the index retrieves nothing with BM25 at all.)
# - hybrid: fused (RRF) scores only order the hits (the top one is ~1/61 for any query), so a fused hit is
#   judged by its dense cosine (the threshold, as for dense) or, failing that, by a BM25 score of at least
#   HYBRID_BM25_MIN (an exact rare word: a name, a code, an error message the embedding blurs). 0.25 / 6 keeps
#   99.1% of the answerable questions and refuses 96.7% of the off-topic ones (BM25 never reached 6 there).
DEFAULT_MIN_SCORE: dict[str, float | None] = {"dense": 0.25, "bm25": 1.0, "hybrid": 0.25}
HYBRID_BM25_MIN = 6.0


def relevance(hit: Any, retriever: str) -> float:
    """The score a hit's threshold is compared with: the retriever's own (BM25, cosine), for hybrid the dense
    cosine of the fused hit (the RRF score when the hit carries no dense score)."""
    if retriever == "hybrid":
        return float((getattr(hit, "scores", None) or {}).get("dense", hit.score))
    return float(hit.score)


def relevant(hit: Any, retriever: str, min_score: float | None) -> bool:
    """Whether `hit` passes the threshold `min_score` (None: every hit does); see DEFAULT_MIN_SCORE."""
    if min_score is None or relevance(hit, retriever) >= min_score:
        return True
    return retriever == "hybrid" and (getattr(hit, "scores", None) or {}).get("bm25", 0.0) >= HYBRID_BM25_MIN


class SearchIndex(Protocol):
    """What `ask` needs of an index (byollm.rag.index.RagIndex)."""

    def search(self, query: str, k: int = 5, retriever: str = "hybrid", groups: set[str] | None = None,
               filters: dict[str, Any] | None = None) -> list[Any]: ...


class Generator(Protocol):
    """A chat model: messages in, the reply's text out in pieces."""

    specials: tuple[str, ...]  # the model's special token strings (disarmed inside passages)

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """Prompt tokens of `messages` in the model's template (None: unknown, e.g. a remote endpoint)."""

    @property
    def context(self) -> int | None:
        """Prompt + reply tokens the model takes (None: unknown)."""

    def stream(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
               seed: int | None) -> Iterator[str]: ...


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Citation:
    """A source the answer cites, as [n]."""

    n: int
    chunk_id: str
    source: str
    title: str

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "chunk_id": self.chunk_id, "source": self.source, "title": self.title}


@dataclass
class RagPrompt:
    """Steps 1-4: what the model is asked, and from what."""

    question: str
    messages: list[dict[str, str]]
    sources: list[Source]  # numbered as in the prompt
    hits: list[Any]  # what retrieval returned that the caller may see and that passed the threshold
    not_found: bool
    best_score: float | None
    dropped: list[Source] = field(default_factory=list)  # flagged sources left out (drop_flagged)
    cut: int = 0  # sources left out to fit the context


@dataclass
class RagAnswer:
    """An answer and where it comes from."""

    question: str
    text: str  # the answer, citations of sources not given removed; NOT_FOUND when nothing relevant was found
    raw_text: str  # what the model wrote
    citations: list[Citation]
    sources: list[Source]
    hits: list[Any]
    not_found: bool
    invalid_citations: list[int] = field(default_factory=list)
    dropped: list[Source] = field(default_factory=list)
    finish_reason: str | None = None
    best_score: float | None = None  # best relevance() of what the caller may see that was retrieved (kept or not)

    @property
    def flags(self) -> dict[str, list[Flag]]:
        """The flags of every flagged passage retrieved (in the prompt or dropped from it), by chunk id."""
        return {s.chunk_id: s.flags for s in [*self.sources, *self.dropped] if s.flags}

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "not_found": self.not_found,
                "citations": [c.to_dict() for c in self.citations], "invalid_citations": self.invalid_citations,
                "sources": [s.to_dict() for s in self.sources], "dropped_sources": [s.to_dict() for s in self.dropped],
                "finish_reason": self.finish_reason,
                "best_score": None if self.best_score is None else round(self.best_score, 6)}


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------


def retrieve(index: SearchIndex, question: str, *, k: int = 5, retriever: str = "hybrid",
             groups: set[str] | frozenset[str] | None = None, filters: dict[str, Any] | None = None,
             min_score: float | None = None) -> list[Any]:
    """Hits the caller (`groups`) may see, scoring at least `min_score`, best first."""
    if retriever not in RETRIEVERS:
        raise ByollmError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")
    if k < 1:
        raise ByollmError(f"k must be >= 1, got {k}")
    groups = None if groups is None else set(groups)
    hits = index.search(question, k=k, retriever=retriever, groups=groups, filters=filters)
    hits = [h for h in hits if may_see(h.chunk, groups)]  # again: a chunk of another group never gets further
    return [h for h in hits if relevant(h, retriever, min_score)]


def prepare(index: SearchIndex, question: str, *, k: int = 5, retriever: str = "hybrid",
            groups: set[str] | frozenset[str] | None = None, filters: dict[str, Any] | None = None,
            min_score: float | None = None, use_default_threshold: bool = True, drop_flagged: bool = False,
            specials: Sequence[str] = (), history: Sequence[dict[str, str]] = (),
            fits: Callable[[list[dict[str, str]]], bool] | None = None) -> RagPrompt:
    """Steps 1-4 (module docstring). `min_score` None: DEFAULT_MIN_SCORE of the retriever (unless
    `use_default_threshold` is False); `fits(messages)`: whether a prompt fits the model (None: always)."""
    if not question.strip():
        raise ByollmError("the question is empty")
    if min_score is None and use_default_threshold:
        min_score = DEFAULT_MIN_SCORE.get(retriever)
    everything = retrieve(index, question, k=k, retriever=retriever, groups=groups, filters=filters)
    hits = [h for h in everything if relevant(h, retriever, min_score)]
    best = max((relevance(h, retriever) for h in everything), default=None)
    scanned = number_sources(hits)
    dropped = [s for s in scanned if drop_flagged and s.flags]
    kept = [s for s in scanned if not (drop_flagged and s.flags)]
    sources = [Source(n, s.hit, s.flags) for n, s in enumerate(kept, start=1)]  # renumbered: 1..len
    messages = rag_messages(question, sources, specials=specials, history=history)
    cut = 0
    while fits is not None and sources and not fits(messages):
        sources, cut = sources[:-1], cut + 1
        messages = rag_messages(question, sources, specials=specials, history=history)
    if fits is not None and not fits(messages):
        raise ByollmError("the question alone does not fit the model's context; shorten it or lower max_tokens")
    return RagPrompt(question, messages, sources, hits, not_found=not sources, best_score=best, dropped=dropped,
                     cut=cut)


def finish(prompt: RagPrompt, raw_text: str, finish_reason: str | None = None) -> RagAnswer:
    """Step 6: the answer with its citations mapped to chunks (NOT_FOUND when nothing relevant was retrieved)."""
    if prompt.not_found:
        return RagAnswer(prompt.question, NOT_FOUND, "", [], [], prompt.hits, True, dropped=prompt.dropped,
                         finish_reason="not_found", best_score=prompt.best_score)
    n = len(prompt.sources)
    check = parse_citations(raw_text, n)
    by_n = {s.n: s for s in prompt.sources}
    citations = [Citation(i, by_n[i].chunk_id, by_n[i].source, by_n[i].title) for i in check.cited]
    return RagAnswer(prompt.question, clean_citations(raw_text, n).strip(), raw_text, citations, prompt.sources,
                     prompt.hits, False, check.invalid, prompt.dropped, finish_reason, prompt.best_score)


def _prompt_for(index: SearchIndex, question: str, generator: Generator, max_tokens: int,
                options: dict[str, Any]) -> RagPrompt:
    context = generator.context

    def fits(messages: list[dict[str, str]]) -> bool:
        n = generator.count_tokens(messages)
        return n is None or context is None or n + max_tokens <= context

    return prepare(index, question, specials=generator.specials, fits=fits, **options)


def ask(index: SearchIndex, question: str, *, generator: Generator, k: int = 5, retriever: str = "hybrid",
        groups: set[str] | frozenset[str] | None = None, filters: dict[str, Any] | None = None,
        min_score: float | None = None, drop_flagged: bool = False, max_tokens: int = 256,
        temperature: float = 0.0, seed: int | None = None) -> RagAnswer:
    """Answer `question` from `index` with `generator` (module docstring)."""
    answer: RagAnswer | None = None
    for piece in ask_stream(index, question, generator=generator, k=k, retriever=retriever, groups=groups,
                            filters=filters, min_score=min_score, drop_flagged=drop_flagged, max_tokens=max_tokens,
                            temperature=temperature, seed=seed):
        if isinstance(piece, RagAnswer):
            answer = piece
    assert answer is not None
    return answer


def ask_stream(index: SearchIndex, question: str, *, generator: Generator, k: int = 5, retriever: str = "hybrid",
               groups: set[str] | frozenset[str] | None = None, filters: dict[str, Any] | None = None,
               min_score: float | None = None, drop_flagged: bool = False, max_tokens: int = 256,
               temperature: float = 0.0, seed: int | None = None) -> Iterator[str | RagAnswer]:
    """`ask`, streaming: the answer's text in pieces as the model writes them, then the RagAnswer. (A citation
    of a source that was not given is already printed by then; the RagAnswer's text has it removed.)"""
    options = {"k": k, "retriever": retriever, "groups": groups, "filters": filters, "min_score": min_score,
               "drop_flagged": drop_flagged}
    prompt = _prompt_for(index, question, generator, max_tokens, options)
    if prompt.not_found:
        yield NOT_FOUND
        yield finish(prompt, "")
        return
    pieces: list[str] = []
    for piece in generator.stream(prompt.messages, max_tokens=max_tokens, temperature=temperature, seed=seed):
        pieces.append(piece)
        yield piece
    yield finish(prompt, "".join(pieces), getattr(generator, "last_finish_reason", None))


# --------------------------------------------------------------------------------------------------
# Generators: our engine, or an OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------------


class EngineGenerator:
    """A byollm model (a checkpoint: ours, or an imported one such as SmolLM2) in its own chat template, with
    the KV-cache generator (byollm.generate)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from byollm.tokenizer.chat_format import chat_format

        self.model, self.tokenizer = model, tokenizer
        self.format = chat_format(tokenizer)  # TokenizerError: no chat template
        self.specials = tuple(getattr(tokenizer, "special_tokens", None) or ())
        self.last_finish_reason: str | None = None

    @property
    def context(self) -> int | None:
        return int(self.model.config.block_size)

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return len(self.format.encode_prompt(messages))

    def stream(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
               seed: int | None) -> Iterator[str]:
        from byollm.generate import iter_generate
        from byollm.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                stop_token_ids=self.format.stop_ids)
        self.last_finish_reason = None
        for event in iter_generate(self.model, self.format.encode_prompt(messages), params, tokenizer=self.tokenizer):
            if event.finish_reason is not None:
                self.last_finish_reason = event.finish_reason
            if event.text:
                yield event.text


class OpenAIGenerator:
    """Any OpenAI-compatible chat endpoint (`byollm serve`, vLLM, llama.cpp's server, OpenAI) through the official
    `openai` client. The API key: `api_key`, else $OPENAI_API_KEY, else none."""

    specials: tuple[str, ...] = ()  # the endpoint applies its own template (and refuses control tokens itself)
    context = None

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        import os

        openai = require("openai", "rag")
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=1)
        self.model = model
        self.last_finish_reason: str | None = None

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return None

    def stream(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
               seed: int | None) -> Iterator[str]:
        openai = require("openai", "rag")
        self.last_finish_reason = None
        try:
            chunks = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                         temperature=temperature, seed=seed, stream=True)
            for chunk in chunks:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    self.last_finish_reason = choice.finish_reason
                if choice.delta and choice.delta.content:
                    yield choice.delta.content
        except openai.APIError as e:
            raise ByollmError(f"the endpoint {self.client.base_url} answered: {e}") from None


def open_index(path: str) -> SearchIndex:
    """The index directory at `path` (byollm.rag.index.RagIndex)."""
    from byollm.rag.index import RagIndex

    return RagIndex.open(path)


def load_generator(ckpt: str | None = None, *, openai_base_url: str | None = None, model: str | None = None,
                   api_key: str | None = None, device: str = "cpu") -> Generator:
    """Our engine on `ckpt` (default: the packaged SmolLM2-135M-Instruct, `byollm download`), or the endpoint at
    `openai_base_url` serving `model`."""
    if openai_base_url:
        if not model:
            raise ByollmError("--openai-base-url needs --model NAME: the model id the endpoint serves")
        return OpenAIGenerator(openai_base_url, model, api_key)
    from byollm.checkpoint import load_checkpoint

    if ckpt is None:
        from byollm.interop.pretrained import packaged_checkpoint

        ckpt = str(packaged_checkpoint("smollm2-135m-instruct"))
    loaded = load_checkpoint(ckpt, device=device)
    return EngineGenerator(loaded.model, loaded.tokenizer)


__all__ = ["DEFAULT_MIN_SCORE", "HYBRID_BM25_MIN", "NOT_FOUND", "RETRIEVERS", "Citation", "EngineGenerator",
           "Generator", "OpenAIGenerator", "RagAnswer", "RagPrompt", "SearchIndex", "ask", "ask_stream", "finish",
           "load_generator", "open_index", "prepare", "relevance", "relevant", "retrieve"]
