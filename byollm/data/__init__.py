"""Datasets: find them (mirror, cache, download), read them, tokenise them into shards, and batch them.

>>> from byollm.data import prepare, load_split, RandomWindowSampler
>>> out = prepare("tinyshakespeare", "char", "data/shakespeare_char")   # train.bin, val.bin, meta.json
>>> sampler = RandomWindowSampler(load_split(out, "train"), batch_size=12, block_size=64, seed=1337)
>>> x, y = sampler.next_batch()

Where files come from: an explicit path, then $BYOLLM_DATA_MIRROR, then the cache ($BYOLLM_CACHE/data,
default ~/.cache/byollm/data), then a verified download (sources.py). Datasets too big to prepare
(FineWeb-Edu) are streamed instead: streaming.py tokenises documents on the fly into training batches.
`byollm.data` uses `tokenizer` and `errors` only.
"""

from byollm.data.instruct import (
    Conversation,
    DataReport,
    PreferencePair,
    load_conversations,
    load_pairs,
    preference_examples,
    sft_examples,
)
from byollm.data.prepare import (
    Prepared,
    bits_per_byte,
    load_prepared,
    load_split,
    prepare,
    read_meta,
    text_chunks,
    token_dtype,
)
from byollm.data.readers import load_records, load_text, record_to_text, split_records, validate_records
from byollm.data.registry import REGISTRY, DatasetSpec, HFSource, Subset, get_spec, list_datasets
from byollm.data.sources import (
    CACHE_ENV,
    MIRROR_ENV,
    OFFLINE_ENV,
    DataUnavailable,
    Source,
    cache_dir,
    download,
    fallback_corpus,
    mirror_dir,
    resolve,
    sha256_path,
)


def __getattr__(name: str):
    # The samplers need torch; load them only when asked for, so `byollm data download` starts quickly.
    if name in ("RandomWindowSampler", "SequentialSampler", "eval_batches"):
        from byollm.data import samplers

        return getattr(samplers, name)
    if name in ("DocStream", "StreamingTokenSource", "held_out", "open_stream", "stream_tokenizer"):
        from byollm.data import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Conversation",
    "DataReport",
    "PreferencePair",
    "load_conversations",
    "load_pairs",
    "preference_examples",
    "sft_examples",
    "CACHE_ENV",
    "MIRROR_ENV",
    "OFFLINE_ENV",
    "REGISTRY",
    "DataUnavailable",
    "DatasetSpec",
    "DocStream",
    "HFSource",
    "Prepared",
    "RandomWindowSampler",
    "SequentialSampler",
    "Source",
    "StreamingTokenSource",
    "Subset",
    "bits_per_byte",
    "cache_dir",
    "download",
    "eval_batches",
    "fallback_corpus",
    "get_spec",
    "held_out",
    "list_datasets",
    "load_prepared",
    "load_records",
    "load_split",
    "load_text",
    "mirror_dir",
    "open_stream",
    "prepare",
    "read_meta",
    "record_to_text",
    "resolve",
    "sha256_path",
    "split_records",
    "stream_tokenizer",
    "text_chunks",
    "token_dtype",
    "validate_records",
]
