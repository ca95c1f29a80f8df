"""A continuous-batching inference engine: many requests share one model, joining and leaving between steps.

`byollm.generate` runs one batch from start to end: a request that arrives while it runs must wait for the
whole batch, and a short answer keeps its row busy until the longest one is done. Here every request is
on its own schedule:

    add_request()  puts a request in the waiting queue (bounded: QueueFull when it is full)
    step()         1. admits waiting requests into free KV-cache slots and *prefills* them, each from its longest
                      cached prefix, at most `prefill_chunk_tokens` a step (serve.scheduler) -> first tokens;
                   2. runs one batched *decode* forward for the requests that were already running -> one
                      more token each;
                   3. finished requests (stop token, stop string, max_new_tokens, cancel) leave at once and
                      their slot is free for the next step.
    cancel()       frees the request's slot immediately (a client went away).

So each running request gets exactly one token per step, whatever else is in the batch.

Why this shape
- Prefill and decode are separate forward passes. Prefill processes T prompt tokens per weight read: it is
  compute-bound, so putting several prompts in one batch (padded to the longest) gains little and wastes
  work on padding. Decode processes one token per sequence per weight read: it is memory-bound (every step
  reads all the weights), so a batch of B sequences costs about as much as one - that is where batching pays.
  Each newly admitted request is therefore prefilled alone (batch 1, straight into its slot), and all running
  requests decode together.
- The KV cache is slot-based: `SlotKVCache` (byollm.serve.slot_cache) holds max_batch_size rows of max_seq_len
  positions per layer, and each row has its own length. A request owns one row from admission to finish.
  Running requests are kept in rows 0..n-1 (when one leaves, the last row moves into its place: one row copy),
  so the decode batch is a plain slice of the cache - no gather of scattered rows each step. The step attends
  over the first S positions only, S = the longest running sequence, and a (B, 1, 1, S) mask hides each row's
  unused tail. The price of slots is memory: every slot reserves max_seq_len positions, used or not
  (`Engine.kv_cache_bytes`). Paged attention (vLLM, Kwon et al. 2023) instead hands out the cache in small
  fixed-size blocks as a sequence grows, through a per-sequence block table, like virtual memory pages:
  no memory is reserved for tokens that never come, so many more sequences fit, at the cost of an attention
  kernel that reads keys through the block table. For a CPU engine with a handful of slots, slots are simpler.
- Sampling is per request: each has its own SamplingParams, stop conditions and torch.Generator (seeded when
  `seed` is set), so a request's tokens do not depend on who else is in the batch. Greedy decoding gives the
  same tokens as `byollm.generate.generate` on the request alone (tested).

Speed. A batch-1 decode step reads every weight once, so fp32 on a CPU is bound by memory bandwidth: for
smollm2-135m (540 MB of fp32 weights) about 70% of a step is matrix products, the rest per-op overhead of the
~60 small ops per layer. torch.compile of the decode step (static shapes) was measured at +13% for a 70 s
compile (405 s on the 2-core CI machine), so it is not used. Fewer bytes is what helps: `int8="fbgemm"`.

Threads. `add_request`, `cancel` and the counters may be called from any thread while one thread runs
`step()`. `AsyncEngine` is that thread for asyncio code (the HTTP server): torch work stays off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ByollmError
from byollm.generate import inference_mode
from byollm.sampling import GenerationError, SamplingParams, StopChecker, is_int, sample_next, seeded_generator
from byollm.serve.scheduler import PrefillScheduler, PrefillStats
from byollm.serve.slot_cache import SlotKVCache
from byollm.tokenizer.base import Tokenizer

# What ends a request in the engine: generation's own reasons, or a cancel (a client went away, shutdown).
StepFinishReason = Literal["stop", "length", "cancelled"]


class QueueFull(ByollmError):
    """The waiting queue is full (or the engine is shutting down): try again later (HTTP 503)."""


@dataclass
class StepOutput:
    """One event of one request, as `Engine.step` returns them.

    token_id: the new token; -1 for a "cancelled" event, which carries no token.
    text: the text this token completes that is safe to show ('' while a UTF-8 character is unfinished or the
        text might become a stop string; '' without a tokenizer). A request's pieces join to its final text.
    finish_reason: None while the request goes on; "stop" (stop token or string), "length" (max_new_tokens)
        or "cancelled" on its last event.
    prompt_tokens, completion_tokens: counts so far (completion_tokens includes this token).
    logprob: log-probability of the token under the model (when SamplingParams.logprobs), else None.
    top_logprobs: with SamplingParams.top_logprobs = k, the k most likely (token id, logprob) at this position.
    """

    request_id: str
    token_id: int
    text: str
    finish_reason: StepFinishReason | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _EngineRequest:
    """One request inside the engine, from add_request until it finishes or is cancelled."""

    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stops: StopChecker  # its stop conditions, its text so far, and how many tokens it has generated
    history: list[int] = field(default_factory=list)  # prompt + generated: what the repetition penalty sees
    slot: int = -1
    last_token: int = -1  # sampled but not yet fed to the model
    constraint: Any = None  # its sampling.TokenConstraint (from params.constraint), made at its first token


class Engine:
    """Continuous batching over one model. See the module docstring for the design.

    model: a byollm GPT (put it on its device and dtype first; it is switched to eval mode).
    tokenizer: decodes text for StepOutput.text and stop strings; its eos is the default stop token.
    max_batch_size: KV-cache slots = requests decoded together. max_waiting: queue bound (QueueFull beyond).
    max_seq_len: positions per slot, prompt + generated (default: the model's block_size, at most 2048).
    int8: quantise the model's linear layers to int8 first, in place: True = weight-only "dequant", or a backend
        name of `byollm.serve.int8` ("dequant", "int8pack", "fbgemm": the fast one on CPU, see there).
    transpose_weights: store the (remaining fp) linear weights transposed, in place, for faster one-row
        products on a CPU (`byollm.serve.layout`: ~1.4x decode at batch 1 here); the model is then for inference only.
    prefix_caching, prefill_chunk_tokens: reuse cached prompt prefixes (`byollm.serve.prefix_cache`); prefill at most
        this many prompt tokens a step, None: whole prompts (`byollm.serve.scheduler`). Same tokens either way.
    fast_decode: decode with `byollm.serve.fast_decode` (fused weights, few small ops; same greedy tokens; Llama-style
        float models only); the model's linear layers are re-pointed at the fused weights (inference only).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, *, max_batch_size: int = 8,
                 max_seq_len: int | None = None, max_waiting: int = 64, int8: bool | str = False,
                 transpose_weights: bool = False, prefix_caching: bool = True,
                 prefill_chunk_tokens: int | None = 256, fast_decode: bool = False) -> None:
        config = model.config
        if max_batch_size < 1 or max_waiting < 1:
            raise GenerationError(f"max_batch_size and max_waiting must be >= 1, got {max_batch_size} "
                                  f"and {max_waiting}")
        max_seq_len = max_seq_len or min(config.block_size, 2048)
        if config.pos_embedding == "learned" and max_seq_len > config.block_size:
            raise GenerationError(f"max_seq_len {max_seq_len} exceeds this model's block_size "
                                  f"({config.block_size}, learned positions); use at most {config.block_size}")
        if int8:
            from byollm.serve.int8 import quantize_int8

            quantize_int8(model, "dequant" if int8 is True else int8)
        if transpose_weights:
            from byollm.serve.layout import transpose_linears

            transpose_linears(model)
        self._fast = None  # the decode step written for decoding (byollm.serve.fast_decode), when asked for
        if fast_decode:
            from byollm.serve.fast_decode import fast_decoder

            self._fast = fast_decoder(model)
        from byollm.serve.fast_decode import decode_weight_bytes

        self._weight_bytes = self._fast.weight_bytes if self._fast is not None else decode_weight_bytes(model)
        self._decode_steps, self._decode_seconds = 0, 0.0
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_seq_len, self.max_waiting = max_batch_size, max_seq_len, max_waiting
        # A vocabulary padded past the tokenizer's (50257 -> 50304) has ids that mean nothing: never sample them.
        self.n_ids = min(config.vocab_size, getattr(tokenizer, "vocab_size", None) or config.vocab_size)
        p = next(model.parameters())
        self.device = p.device
        cache_dtype = p.dtype if p.is_floating_point() else torch.float32
        self.cache = SlotKVCache(config.n_layer, max_batch_size, max_seq_len, config.n_kv_head, config.head_dim,
                                 device=self.device, dtype=cache_dtype)
        self._prefiller = PrefillScheduler(self.model, self.cache, chunk_tokens=prefill_chunk_tokens,
                                           prefix_caching=prefix_caching)

        self._waiting: deque[_EngineRequest] = deque()
        self._prefilling: list[_EngineRequest] = []  # admitted, prompt not all in the cache yet (oldest first)
        self._running: list[_EngineRequest] = []  # decoding; invariant: self._running[i].slot == i
        self._ids: set[str] = set()  # ids of waiting and running requests
        self._cancelled: set[str] = set()  # running requests cancelled while a step was in progress
        self._events: list[StepOutput] = []  # "cancelled" events, handed out by the next step()
        self._counter = itertools.count()
        self._lock = threading.Lock()  # guards the queues above; held only briefly
        self._step_lock = threading.Lock()  # held for a whole step: the cache and the running list change

    # ---- public state ----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        with self._lock:
            return len(self._running) + len(self._prefilling) - len(self._cancelled)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def kv_cache_bytes(self) -> int:
        """Memory reserved by the KV cache: 2 x layers x max_batch_size x kv heads x max_seq_len x head dim x bytes."""
        return self.cache.nbytes

    @property
    def decode_steps(self) -> int:
        """Batched decode forward passes run since the start."""
        return self._decode_steps

    @property
    def decode_seconds(self) -> float:
        """Wall-clock seconds spent in those decode passes."""
        return self._decode_seconds

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (every product's weights, norms, one embedding row): times
        decode_steps / decode_seconds, the achieved weight bandwidth."""
        return self._weight_bytes

    @property
    def prefill_stats(self) -> PrefillStats:
        """Prompt tokens computed, prefix-cache hits and the prompt tokens they saved, since the start."""
        return dataclasses.replace(self._prefiller.stats)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._running or self._prefilling or self._waiting or self._events)

    # ---- requests --------------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise GenerationError if this request cannot be served (what the server validates up front)."""
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if not isinstance(prompt_ids, (list, tuple)) or not all(is_int(t) for t in prompt_ids):
            raise GenerationError("prompt_ids must be a list of token ids (ints)")
        if not prompt_ids:
            raise GenerationError("the prompt is empty: generation needs at least one token to start from")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise GenerationError(f"prompt has token id {bad}, outside the model's vocabulary 0..{vocab - 1}")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_seq_len:
            raise GenerationError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"the engine's max_seq_len ({self.max_seq_len}); shorten the prompt or lower max_new_tokens")
        if params.stop_strings and self.tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer to decode the text; pass one to the Engine")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; return its id. GenerationError if it is invalid, QueueFull if the queue is full."""
        self.check_request(prompt_ids, params)
        params = dataclasses.replace(params)  # our own copy: the caller may change or reuse theirs
        generator = seeded_generator(params, self.device)
        stops = StopChecker(params, self.tokenizer)  # as in generate: the same stop token default, text and cuts
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            request_id = request_id if request_id is not None else f"req-{next(self._counter)}"
            if request_id in self._ids:
                raise GenerationError(f"request id {request_id!r} is already in use")
            self._ids.add(request_id)
            self._waiting.append(_EngineRequest(request_id, list(prompt_ids), params, generator, stops,
                                                history=list(prompt_ids)))
        return request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request and free its slot. Unknown or finished ids are ignored. The next step() returns a
        "cancelled" event for it. If a step is running in another thread, the slot is freed when it ends."""
        with self._lock:
            if request_id not in self._ids or request_id in self._cancelled:
                return
            waiting = next((r for r in self._waiting if r.id == request_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                self._finish_cancelled(waiting)
                return
            self._cancelled.add(request_id)
        if self._step_lock.acquire(blocking=False):  # no step in progress: free the slot now
            try:
                with self._lock:
                    self._apply_cancellations()
            finally:
                self._step_lock.release()

    def cancel_all(self) -> None:
        """Cancel every waiting and running request."""
        with self._lock:
            ids = [r.id for r in self._waiting] + [r.id for r in self._prefilling + self._running]
        for request_id in ids:
            self.cancel(request_id)

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit waiting requests, prefill (a chunk of) prompts, then decode one token for each decoding request."""
        with self._step_lock:
            with self._lock:
                self._apply_cancellations()
                outputs, self._events = self._events, []
                decoding = list(self._running)  # decoding before this step: they decode together
                while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch_size:
                    self._prefilling.append(self._waiting.popleft())  # admitted: it has a slot from now on
                prefilling = list(self._prefilling)

            tokens: list[tuple[_EngineRequest, torch.Tensor]] = []  # (request, its logits row)
            with inference_mode(self.model):
                # The prompts that are now all in the cache, moved into rows len(decoding), len(decoding) + 1, ...
                prefilled = self._prefiller.run(prefilling, decoding)
                tokens += prefilled
                if decoding:
                    logits = self._decode(decoding)
                    tokens += [(request, logits[i]) for i, request in enumerate(decoding)]
                outputs += self._sample(tokens)

            with self._lock:
                for request, _ in prefilled:  # they decode from the next step on
                    self._prefilling.remove(request)
                    self._running.append(request)
                for out in outputs:
                    if out.finish_reason in ("stop", "length"):
                        self._release(self._find_running(out.request_id))
                # Cancelled while we computed: they get a "cancelled" event instead of this step's token.
                cancelled = self._cancelled
                outputs = [o for o in outputs if o.request_id not in cancelled or o.finish_reason is not None]
                self._apply_cancellations()
                outputs += self._events
                self._events = []
            return outputs

    def _decode(self, batch: list[_EngineRequest]) -> torch.Tensor:
        """Feed each running request its last token (rows 0..n-1 of the cache); return (n, V) logits."""
        start = time.perf_counter()
        n = len(batch)
        ids = torch.tensor([[r.last_token] for r in batch], device=self.device)
        lengths = self.cache.lengths[:n]
        position_ids = torch.tensor(lengths, device=self.device)[:, None]  # the new token's position in its row
        self.cache.bind(0, n, 1)
        mask = None
        if min(lengths) != max(lengths):
            # Row i has lengths[i] cached keys; the new one goes at lengths[i]. Keys after that are another
            # (shorter) row's unused tail: hide them. (B, 1, 1, S): True = may attend.
            keys = torch.arange(max(lengths) + 1, device=self.device)
            mask = (keys[None, :] <= position_ids)[:, None, None, :]
        if self._fast is not None:
            logits = self._fast(ids[:, 0], position_ids[:, 0], self.cache, mask)
        else:
            logits = self.model(ids, attention_mask=mask, position_ids=position_ids, kv_cache=self.cache,
                                logits_to_keep=1).logits[:, -1]
        self._decode_steps += 1
        self._decode_seconds += time.perf_counter() - start
        return logits

    def _sample(self, rows: list[tuple[_EngineRequest, torch.Tensor]]) -> list[StepOutput]:
        """Pick each request's next token with its own parameters and decide whether it is finished."""
        if not rows:
            return []
        logits = torch.stack([row for _, row in rows])[:, :self.n_ids].float()  # (n, V)
        # Greedy requests without a penalty or constraint only need the argmax: one call for all of them.
        argmax = logits.argmax(dim=-1).tolist()
        outputs = []
        for i, (request, _) in enumerate(rows):
            params = request.params
            row = logits[i:i + 1]
            if params.constraint is not None:  # constrained decoding: disallowed tokens get -inf before sampling
                if request.constraint is None:
                    request.constraint = params.constraint()
                row = request.constraint.mask(row)
            if params.greedy and params.repetition_penalty == 1.0:
                token = argmax[i] if params.constraint is None else int(row.argmax())
            else:
                history = torch.tensor([request.history], device=self.device) \
                    if params.repetition_penalty != 1.0 else None
                token = int(sample_next(row, params, request.generator, token_ids=history)[0])
            logprob, top = None, None
            if params.logprobs:  # under the model's own distribution: the raw logits, not the masked ones
                logprobs = F.log_softmax(logits[i], dim=-1)
                logprob = float(logprobs[token])
                if params.top_logprobs:
                    values, ids = logprobs.topk(min(params.top_logprobs, logprobs.numel()))
                    top = list(zip(ids.tolist(), values.tolist(), strict=True))
            outputs.append(self._advance(request, token, logprob, top))
        return outputs

    def _advance(self, request: _EngineRequest, token: int, logprob: float | None,
                 top_logprobs: list[tuple[int, float]] | None = None) -> StepOutput:
        """Record the request's new token: its text piece and whether it finishes it (as in generate, or because
        its constraint is complete)."""
        request.history.append(token)
        request.last_token = token
        text, reason = request.stops.add(token)
        if request.constraint is not None:
            request.constraint.accept(token)
            if reason is None and request.constraint.done:
                reason = "stop"
                text += request.stops.text.finish() if request.stops.text is not None else ""
        return StepOutput(request.id, token, text, reason, len(request.prompt), request.stops.generated, logprob,
                          top_logprobs)

    # ---- bookkeeping (called with self._lock held) -----------------------------------------------
    def _find_running(self, request_id: str) -> _EngineRequest:
        return next(r for r in self._running if r.id == request_id)

    def _release(self, request: _EngineRequest) -> None:
        """Free the request's slot: the last decoding row and this one swap, so decoding rows stay 0..n-1 and
        the freed row keeps this request's keys for prefix reuse. Only called while holding the step lock."""
        last = self._running.pop()
        if last is not request:
            self.cache.swap(last.slot, request.slot)
            last.slot, request.slot = request.slot, last.slot
            self._running[last.slot] = last
        self.cache.free(request.slot, request.history[:self.cache.lengths[request.slot]])
        self._ids.discard(request.id)

    def _apply_cancellations(self) -> None:
        for request in [r for r in self._running if r.id in self._cancelled]:
            self._release(request)
            self._finish_cancelled(request)
        for request in [r for r in self._prefilling if r.id in self._cancelled]:
            self._prefilling.remove(request)
            self._prefiller.drop(request)
            self._finish_cancelled(request)
        self._cancelled.clear()

    def _finish_cancelled(self, request: _EngineRequest) -> None:
        self._ids.discard(request.id)
        self._events.append(StepOutput(request.id, -1, "", "cancelled", len(request.prompt),
                                       request.stops.generated))

    # ---- offline use -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run every prompt to the end (submitting as the queue allows); return the generated ids per prompt."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        if len(all_params) != len(prompts):
            raise GenerationError(f"got {len(prompts)} prompts but {len(all_params)} SamplingParams")
        for prompt, p in zip(prompts, all_params, strict=True):
            self.check_request(prompt, p)
        results: dict[str, list[int]] = {}
        order: list[str] = []
        pending = deque(zip(prompts, all_params, strict=True))
        while pending or self.has_work():
            while pending and self.num_waiting < self.max_waiting:
                request_id = self.add_request(*pending.popleft())
                order.append(request_id)
                results[request_id] = []
            for out in self.step():
                if out.request_id in results and out.token_id >= 0:
                    results[out.request_id].append(out.token_id)
        return [results[request_id] for request_id in order]


# --------------------------------------------------------------------------------------------------
# asyncio front end
# --------------------------------------------------------------------------------------------------


class AsyncEngine:
    """Runs `engine.step()` in one background thread and streams each request's StepOutputs to asyncio code.

        engine = AsyncEngine(Engine(model, tokenizer))
        await engine.start()
        async for out in engine.generate(prompt_ids, SamplingParams(max_new_tokens=32)):
            print(out.text, end="")
        await engine.shutdown()

    `generate` checks the request at once (GenerationError); QueueFull is raised by the first iteration
    (the request is queued then). Leaving the loop early, `aclose()`, or cancelling the task that iterates
    (a client disconnect) cancels the request and frees its slot.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set when work arrives, so an idle loop thread does not spin
        self._stop = threading.Event()
        self._accepting = True
        self._ids = itertools.count()

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    async def start(self) -> None:
        """Start the stepping thread (generate() also starts it when needed)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="byollm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting new requests, let running and queued ones finish for up to `timeout` seconds, then
        cancel the rest (their streams end with finish_reason "cancelled") and stop the thread."""
        self._accepting = False
        if self._thread is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.engine.has_work() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.engine.cancel_all()
        self._wake.set()
        for _ in range(100):  # the thread hands the "cancelled" events out in its next step
            if not self.engine.has_work():
                break
            await asyncio.sleep(0.01)
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)  # deliver events the thread scheduled last
        self._thread = None

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream the StepOutputs of one request; the last one has a finish_reason."""
        self.engine.check_request(prompt_ids, params)
        return self._stream(list(prompt_ids), params, request_id or f"areq-{next(self._ids)}")

    async def _stream(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str) -> AsyncIterator[StepOutput]:
        if not self._accepting:
            raise QueueFull("the engine is shutting down; retry on another server")
        await self.start()
        queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise GenerationError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = queue  # before add_request: the thread may answer at once
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except BaseException:
            del self._queues[request_id]
            raise
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            # Runs on normal end, early exit (aclose/GeneratorExit) and task cancellation alike.
            del self._queues[request_id]
            if not finished:
                self.engine.cancel(request_id)
                self._wake.set()

    # ---- the stepping thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.1)
                continue
            try:
                outputs: list[StepOutput] | BaseException = self.engine.step()
            except Exception as e:  # a failed step fails its requests rather than hanging them
                outputs = e
                self.engine.cancel_all()
            self._post(outputs)

    def _post(self, outputs: list[StepOutput] | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, outputs)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _deliver(self, outputs: list[StepOutput] | BaseException) -> None:
        """On the event loop: route each output to its request's stream (gone streams are skipped)."""
        if isinstance(outputs, BaseException):
            for queue in self._queues.values():
                queue.put_nowait(outputs)
            return
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)


__all__ = ["AsyncEngine", "Engine", "QueueFull", "StepFinishReason", "StepOutput"]
