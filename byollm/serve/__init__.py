"""Serving: a continuous-batching inference engine (`engine`, its `slot_cache`), weight-only int8 (`int8`), the
CPU weight layout (`layout`), and the OpenAI-compatible HTTP server (`server`, with its request/response shapes
in `protocol` and keys, rate limits and metrics in `guards`; imported on their own: they need the `serve` extra)."""

from byollm.serve.engine import AsyncEngine, Engine, QueueFull, StepOutput

__all__ = ["AsyncEngine", "Engine", "QueueFull", "StepOutput"]
