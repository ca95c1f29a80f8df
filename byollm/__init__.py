"""byollm: build your own LLM, from scratch to production."""

from byollm.errors import ByollmError

__version__ = "0.1.0"
__all__ = ["ByollmError", "__version__"]
