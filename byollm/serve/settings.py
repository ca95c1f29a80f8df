"""What `byollm serve` can be told: one dataclass, filled from the command line or a YAML `--config`.

It imports nothing heavy, so the CLI can build its parser without FastAPI installed. API keys are never
an option here: they come from a file (`api_keys_file`, one key a line, `#` comments) or an environment
variable (`api_keys_env`), so they do not show up in shell history, `ps` or logs.

A line of the key file may give the key's access groups, which decide what `POST /v1/rag/chat` may retrieve
for it (chunks of other groups are never retrieved for it, cited or scored):

    sk-...                        public chunks only (as keys from the environment variable)
    sk-... groups=staff,hr        public chunks and those of the groups staff and hr
    sk-... groups=*               every chunk (an unrestricted caller)

Without any key configured, callers are anonymous and see public chunks only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from byollm.errors import ByollmError


@dataclass
class ServeConfig:
    """Settings of the OpenAI-compatible server (byollm.serve.server). API keys come from a file or an
    environment variable, never the command line (see the module docstring)."""

    model_name: str | None = None
    """the id clients send as `model` (default: the checkpoint folder's name)"""
    host: str = "127.0.0.1"
    """address to listen on; the default is reachable from this machine only"""
    port: int = 8000
    """port to listen on"""
    api_keys_file: str | None = None
    """a file with one API key a line; with keys configured every /v1 endpoint needs `Authorization: Bearer KEY`"""
    api_keys_env: str = "BYOLLM_API_KEYS"
    """an environment variable with comma-separated API keys"""
    requests_per_minute: int | None = None
    """per-key request rate limit (token bucket; default: no limit)"""
    tokens_per_minute: int | None = None
    """per-key token rate limit: prompt tokens + max_tokens on arrival, unused tokens given back (default: none)"""
    max_body_bytes: int = 1_000_000
    """larger request bodies are refused with 413"""
    default_max_tokens: int = 256
    """max_tokens of a request that gives none (capped by what is left of the context)"""
    max_stop_sequences: int = 4
    """how many `stop` strings a request may give (OpenAI allows 4)"""
    max_n: int = 8
    """how many choices (`n`) a request may ask for; each is one more sequence in the running batch"""
    max_batch_size: int = 8
    """requests the engine decodes together (its running batch)"""
    max_waiting: int = 64
    """requests that may wait for a slot; beyond them: 503"""
    max_connections: int = 512
    """open connections uvicorn accepts before answering 503"""
    int8: bool = False
    """weight-only int8 quantisation of the linear layers for inference"""
    transpose_weights: bool = True
    """on a CPU, keep linear weights transposed for faster one-row decode products (ignored elsewhere)"""
    fast_decode: bool = True
    """decode with fused weights and fewer small ops (byollm.serve.fast_decode; same greedy tokens); Llama-style
    float models only, others use the model's own forward"""
    prefix_caching: bool = True
    """reuse the KV cache of a prompt's longest cached prefix (a shared system prompt) instead of recomputing it"""
    prefill_chunk_tokens: int | None = 256
    """prefill at most this many prompt tokens per engine step, so long prompts do not stall running streams
    (null: whole prompts at once)"""
    chat_page: bool = True
    """serve the browser chat page at / (static files in the package; it calls the API like any client)"""
    cors_origins: list[str] = field(default_factory=list)
    """origins allowed by CORS (empty: CORS off, the default; ["*"]: any)"""
    log_prompts: bool = False
    """log prompts and replies (off by default: they may hold private data)"""
    shutdown_timeout: float = 10.0
    """on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are cancelled"""
    device: str = "cpu"
    """where the model runs: cpu, cuda, cuda:1, mps"""
    dtype: str = "auto"
    """precision of the weights: float32, bfloat16, float16 or auto (as saved)"""
    rag_index: str | None = None
    """a RAG index directory (`byollm rag index`): also serve POST /v1/rag/chat, answers from it with citations"""
    guardrails: Literal["off", "on", "log"] = "off"
    """input/output content policies (byollm.safety.guardrails): off, on, or log (log what they would do, change
    nothing)"""
    guardrails_config: str | None = None
    """a YAML file of guardrail policies: which run on input/output, thresholds, blocked topics (default: all;
    read when the server starts)"""
    # Keys given directly (tests, embedding in Python), as lines of the key file ("KEY groups=a,b").
    # Not a command-line option: see the module docstring.
    api_keys: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_batch_size", "max_waiting", "max_connections",
                     "max_n"):
            if getattr(self, name) < 1:
                raise ByollmError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ByollmError(f"serve: {name} must be >= 1 or unset (no limit), got {value}")
        if self.guardrails not in ("off", "on", "log"):
            raise ByollmError(f"serve: guardrails must be off, on or log, got {self.guardrails!r}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ByollmError(f"serve: prefill_chunk_tokens must be >= 1 or unset (whole prompts), got "
                              f"{self.prefill_chunk_tokens}")
        if self.max_stop_sequences < 0:
            raise ByollmError(f"serve: max_stop_sequences must be >= 0, got {self.max_stop_sequences}")

    def load_api_keys(self) -> frozenset[str]:
        """The configured keys: `api_keys`, the file and the environment variable together (may be empty)."""
        return frozenset(self.load_key_groups())

    def load_key_groups(self) -> dict[str, frozenset[str] | None]:
        """Each configured key's access groups (module docstring): None for `groups=*`, else a set (empty: public
        chunks only)."""
        keys: dict[str, frozenset[str] | None] = {}

        def add(line: str, where: str) -> None:
            key, groups = parse_key_line(line, where)
            keys[key] = groups if key not in keys else _wider(keys[key], groups)

        for i, line in enumerate(self.api_keys or ()):
            add(line, f"api_keys[{i}]")
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ByollmError(f"serve: api_keys_file {path} does not exist; write one key a line into it")
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    add(line, f"{path} line {n}")
            if not keys:
                raise ByollmError(f"serve: api_keys_file {path} holds no key; write one key a line into it")
        if self.api_keys_env and os.environ.get(self.api_keys_env):
            for k in os.environ[self.api_keys_env].split(","):
                if k.strip():
                    keys.setdefault(k.strip(), frozenset())
        if short := [k for k in keys if len(k) < 8]:
            raise ByollmError(f"serve: an API key of {len(short[0])} characters is too easy to guess; use at least 8 "
                              "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return keys


def parse_key_line(line: str, where: str) -> tuple[str, frozenset[str] | None]:
    """(key, groups) of one key-file line: `KEY`, `KEY groups=a,b` or `KEY groups=*` (the error never shows the
    key)."""
    key, *rest = line.split()
    if not rest:
        return key, frozenset()
    if len(rest) > 1 or not rest[0].startswith("groups="):
        raise ByollmError(f"serve: {where}: after the key, expected nothing or groups=NAME,NAME (or groups=*)")
    names = [g.strip() for g in rest[0].removeprefix("groups=").split(",") if g.strip()]
    if "*" in names:
        return key, None
    return key, frozenset(names)


def _wider(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    return None if a is None or b is None else a | b
