"""The chat page at / of `byollm serve`, driven in a real Chromium (Debian's, through Playwright) against a real server
on 127.0.0.1 serving the real SmolLM2-135M-Instruct with a real RAG index: a streamed answer, stopping a generation
(the server stops too), a cited source with RAG on, the refusal for a wrong API key, model and document text shown
as text (a `<script>` in a reply does not run), and a phone-sized screen.

Skipped where no Chromium is installed, unless BYOLLM_REQUIRE_BROWSER=1 (CI sets it: `.ci/run` installs Debian's
chromium), where a missing browser fails. BYOLLM_SCREENSHOT=PATH saves a screenshot of the page after a RAG answer
(how docs/figures/chat_page.png was made)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import Server  # noqa: E402

from byollm.cli import main  # noqa: E402

KEY = "sk-browser-0123456789"
EVIL_TITLE = "<img src=x> Evil page"


def chromium_path() -> str | None:
    return os.environ.get("BYOLLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    required = bool(os.environ.get("BYOLLM_REQUIRE_BROWSER"))
    if required:
        import playwright.sync_api as sync_api  # CI: a missing package is a failure, not a skip
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    if path is None:
        if required:
            pytest.fail("BYOLLM_REQUIRE_BROWSER=1 but no chromium: apt-get install -y chromium "
                        "(or set BYOLLM_CHROMIUM)")
        pytest.skip("no chromium here: apt-get install -y chromium to run the browser test")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(smollm2_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from byollm.checkpoint import load_checkpoint
    from byollm.serve.server import create_app
    from byollm.serve.settings import ServeConfig

    root = tmp_path_factory.mktemp("chat-page")
    (root / "docs").mkdir()
    (root / "docs" / "france.md").write_text("# France\n\nParis is the capital of France and its largest city.\n")
    (root / "docs" / "evil.md").write_text(f"# {EVIL_TITLE}\n\n<script>window.pwned=1</script> Lyon is a city.\n")
    assert main(["rag", "index", str(root / "docs"), "--index", str(root / "ix")]) == 0
    smol = load_checkpoint(smollm2_ckpt)
    settings = ServeConfig(model_name="smollm2", api_keys=[KEY])
    s = Server(create_app(smol.model, smol.tokenizer, settings, rag_index=str(root / "ix")))
    yield s
    s.stop()


@pytest.fixture
def page(browser, server: Server):  # noqa: ANN001, ANN201
    # bypass_csp: the page's Content-Security-Policy forbids eval, which Playwright's wait_for_function needs; the
    # checks below then show that the page renders replies as text even without that second line of defence
    context = browser.new_context(viewport={"width": 1000, "height": 900}, bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_function("document.getElementById('model-name').textContent === 'smollm2'")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def ask(page, text: str, *, key: str = KEY, max_tokens: int = 48, temperature: float = 0) -> None:  # noqa: ANN001
    page.fill("#api-key", key)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))  # a range input: fill sets it and fires its input event
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")  # the keyboard path: Enter sends


def last_answer(page) -> str:  # noqa: ANN001
    return page.eval_on_selector(".message.assistant:last-of-type .body", "(e) => e.textContent")


def wait_done(page, timeout: float = 90_000) -> None:  # noqa: ANN001
    page.wait_for_function("!document.getElementById('send').disabled", timeout=timeout)


def test_a_streamed_answer_from_the_real_model(page) -> None:  # noqa: ANN001
    # record every text the answer shows, to see it grow piece by piece rather than arrive at once
    page.evaluate("""() => { window.seen = new Set(); new MutationObserver(() => {
        const b = document.querySelector('.message.assistant:last-of-type .body');
        if (b) window.seen.add(b.textContent);
    }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true}); }""")
    ask(page, "What is the capital of France?")
    page.wait_for_selector(".message.user")
    wait_done(page)
    assert "Paris" in last_answer(page)
    assert page.evaluate("window.seen.size") >= 3  # streamed: at least 3 successive texts before the last
    assert page.is_hidden("#error")
    # the conversation goes on with its history: a second question gets a second answer
    ask(page, "And of Italy?")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2")
    wait_done(page)
    assert last_answer(page).strip()


def test_stop_ends_the_generation_in_the_page_and_on_the_server(page, server: Server) -> None:  # noqa: ANN001
    ask(page, "Write a very long story about a dragon who learns to cook.", max_tokens=600, temperature=0.8)
    page.wait_for_function("(document.querySelector('.message.assistant .body') || {}).textContent?.length > 5")
    page.click("#stop")
    page.wait_for_selector(".message.assistant .note:text('(stopped)')")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    shown = len(last_answer(page))
    deadline = time.monotonic() + 10  # the server cancels the request when the page drops the stream
    while httpx.get(server.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    assert len(last_answer(page)) == shown and 5 < shown < 2000


def test_rag_answer_shows_its_cited_source(page) -> None:  # noqa: ANN001
    page.check("#use-rag")
    ask(page, "Which is the largest city of France?", max_tokens=40)
    page.wait_for_selector(".sources li")
    wait_done(page)
    sources = page.eval_on_selector_all(".sources li", "(items) => items.map((i) => i.textContent)")
    assert any("France" in s for s in sources), sources
    cited = page.eval_on_selector_all(".sources li.cited", "(items) => items.map((i) => i.textContent)")
    assert any("France" in s and "cited" in s for s in cited), (sources, last_answer(page))
    # a document's title holding HTML is shown as text, and nothing in it ran
    assert any(EVIL_TITLE in s for s in sources), sources
    assert page.evaluate("window.pwned") is None
    if os.environ.get("BYOLLM_SCREENSHOT"):
        page.screenshot(path=os.environ["BYOLLM_SCREENSHOT"], full_page=True)


def test_a_wrong_key_gets_a_clear_message(page) -> None:  # noqa: ANN001
    ask(page, "Hello?", key="sk-wrong-key")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.text_content("#error") and "401" in page.text_content("#error")
    assert page.locator(".message.assistant").count() == 0


def test_html_in_a_reply_is_shown_as_text(page) -> None:  # noqa: ANN001
    # greedy SmolLM2 answers this with a code block that opens with a <script ...> tag
    ask(page, "Write the HTML tag that starts a JavaScript block in a web page, like <script>.", max_tokens=24)
    wait_done(page)
    assert "<script" in last_answer(page)
    assert page.evaluate("document.querySelectorAll('#conversation script, #conversation img').length") == 0
    assert page.evaluate("window.pwned") is None


def test_usable_on_a_phone_sized_screen(browser, server: Server) -> None:  # noqa: ANN001
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    pg = context.new_page()
    response = pg.goto(server.url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]  # no inline or foreign script
    assert pg.evaluate("document.scrollingElement.scrollWidth") <= 360  # no sideways scrolling
    for selector in ("#prompt", "#send", "#api-key"):
        box = pg.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    context.close()
