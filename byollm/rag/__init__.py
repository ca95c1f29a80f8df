"""Section 6: retrieval-augmented generation.

Retrieval: `chunk` (chunks and the token-aware chunker), `ingest` (files -> documents -> chunks), `dense`
(sentence-transformers + FAISS), `lexical` (BM25), `hybrid` (reciprocal rank fusion, filters, access groups),
`index` (the on-disk index and its search API, `RagIndex`), `evaluate` (`byollm rag eval`).
Nothing here is imported by the rest of byollm at import time; the heavy libraries load lazily.
"""
