"""Serving: a continuous-batching inference engine (`engine`), weight-only int8 (`int8`) and the
OpenAI-compatible HTTP server (`server`, imported on its own: it needs the `serve` extra)."""

from byollm.serve.engine import AsyncEngine, Engine, QueueFull, StepOutput

__all__ = ["AsyncEngine", "Engine", "QueueFull", "StepOutput"]
