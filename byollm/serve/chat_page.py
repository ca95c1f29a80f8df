"""The browser chat page at `/` of `byollm serve`: static HTML, CSS and JavaScript shipped in the package.

The page is a client of the same OpenAI-compatible API as any other (`POST /v1/chat/completions`, streamed; with a
RAG index `POST /v1/rag/chat/completions`), so it has no powers of its own: the API key it sends is the reader's,
typed into the page and kept only in the tab's session storage, and every guard (auth, rate limits, guardrails)
applies to it as to a script.

Security of the page itself:
- Everything that comes from the model or from documents is put in the page with `textContent`, never as HTML.
- The Content-Security-Policy allows scripts, styles and connections from this server only and no inline script,
  so even a mistake that put a reply into HTML could not run it; no CDN, nothing fetched from elsewhere.
- `/ui/config.json` tells the page what the server offers (model name, whether a RAG index is mounted, whether
  API keys are required); it reveals nothing a caller of `/v1/models` and `/health` could not learn.
"""

from __future__ import annotations

from pathlib import Path

from byollm.errors import require

require("fastapi", "serve")

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402

UI_DIR = Path(__file__).with_name("chat_ui")
_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_chat_page(app: FastAPI, *, model_name: str, rag: bool, auth: bool) -> None:
    """Serve the chat page at `/` (and its two assets under `/ui/`) on `app`."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=_HEADERS)

    @app.get("/ui/config.json", include_in_schema=False)
    async def config() -> Response:
        return JSONResponse({"model": model_name, "rag": rag, "auth": auth}, headers=_HEADERS)

    for name, media_type in _FILES.items():
        app.add_api_route(f"/ui/{name}", _asset(UI_DIR / name, media_type), methods=["GET"], include_in_schema=False)


def _asset(path: Path, media_type: str):  # noqa: ANN202 - a route handler
    """A handler for one fixed file (no parameters: nothing a request sends can pick another file)."""

    async def handler() -> Response:
        return FileResponse(path, media_type=media_type, headers=_HEADERS)

    return handler
