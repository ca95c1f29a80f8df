"""byollm.data: finding datasets (path > mirror > cache > download), checksums, readers, shards, samplers.

No test touches the network: `sources.fetch` is replaced by a fake that records its calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_mirror

from byollm.data import (
    REGISTRY,
    DatasetSpec,
    DataUnavailable,
    HFSource,
    RandomWindowSampler,
    SequentialSampler,
    Subset,
    bits_per_byte,
    eval_batches,
    fallback_corpus,
    get_spec,
    load_prepared,
    load_records,
    load_split,
    load_text,
    prepare,
    read_meta,
    resolve,
    sources,
    split_records,
    text_chunks,
    token_dtype,
)
from byollm.data.samplers import windows
from byollm.errors import ByollmError, DataError
from byollm.tokenizer import CharTokenizer, load_tokenizer, train_bpe_fast

SHAKESPEARE_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
REAL_FETCH = sources.fetch
TOY = b"To be, or not to be: that is the question.\n" * 20
TOY_SHA = hashlib.sha256(TOY).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeFetch:
    """Stands in for the network: records calls, writes `content` (or raises when it is None)."""

    def __init__(self, content: bytes | None = None):
        self.content = content
        self.calls: list[str] = []

    def __call__(self, spec: DatasetSpec, dest: Path) -> None:
        self.calls.append(spec.name)
        if self.content is None:
            raise OSError("<urlopen error [Errno -2] Name or service not known>")
        dest.write_bytes(self.content)


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty mirror and cache in tmp, no network (fetch fails unless a test gives it content)."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    monkeypatch.setenv(sources.MIRROR_ENV, str(mirror))
    monkeypatch.setenv(sources.CACHE_ENV, str(cache))
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    fake = FakeFetch()
    monkeypatch.setattr(sources, "fetch", fake)
    toy = DatasetSpec(
        name="toy",
        description="a toy text dataset",
        format="text",
        filename="toy.txt",
        sha256=TOY_SHA,
        urls=("https://example.invalid/toy.txt",),
    )
    monkeypatch.setitem(REGISTRY, "toy", toy)
    return {"mirror": mirror, "cache": cache / "data", "fetch": fake, "tmp": tmp_path}


# --------------------------------------------------------------------------------------------------
# Registry and resolution
# --------------------------------------------------------------------------------------------------


def test_unknown_name_suggests_and_lists():
    with pytest.raises(DataError) as e:
        get_spec("tinyshakespear")
    msg = str(e.value)
    assert "did you mean 'tinyshakespeare'" in msg
    for name in ("alpaca", "hh-rlhf", "wikitext-2", "wikitext-103", "crows-pairs", "squad"):
        assert name in msg
    assert isinstance(e.value, ByollmError)
    assert get_spec("Tiny_Shakespeare").name == "tinyshakespeare"  # case, '_' and aliases
    with pytest.raises(DataError, match="does not exist"):
        resolve("no/such/file.txt")


def test_resolution_order(places):
    mirror, cache, fake = places["mirror"], places["cache"], places["fetch"]
    fake.content = TOY

    # nothing local: download into the cache, verified
    src = resolve("toy")
    assert (src.kind, src.path, fake.calls) == ("download", cache / "toy.txt", ["toy"])
    assert src.path.read_bytes() == TOY and src.sha256 == TOY_SHA

    # now the cache has it: no second download
    assert resolve("toy").kind == "cache" and fake.calls == ["toy"]

    # the mirror beats the cache, found by its registry file name or by the dataset's name
    (mirror / "toy").write_bytes(TOY)
    src = resolve("toy")
    assert (src.kind, src.path) == ("mirror", mirror / "toy")
    assert "using local mirror copy" in src.notice
    (mirror / "toy").rename(mirror / "toy.txt")
    assert resolve("toy").path == mirror / "toy.txt"

    # an explicit path beats everything (and is used as given, without a registry checksum)
    own = places["tmp"] / "my_copy.txt"
    own.write_text("my own text\n")
    src = resolve("toy", path=own)
    assert (src.kind, src.path) == ("path", own)
    assert load_text("toy", path=own) == "my own text\n"
    assert fake.calls == ["toy"]  # the mirror and cache hits never called the downloader


def test_mirror_hit_never_downloads(places):
    (places["mirror"] / "toy.txt").write_bytes(TOY)
    assert load_text("toy") == TOY.decode()
    assert places["fetch"].calls == []


def test_checksum_mismatch_is_an_error(places):
    bad = places["mirror"] / "toy.txt"
    bad.write_bytes(TOY[:-5])  # truncated
    with pytest.raises(DataError) as e:
        resolve("toy")
    msg = str(e.value)
    assert str(bad) in msg and TOY_SHA in msg and sha(TOY[:-5]) in msg and "not used" in msg
    assert places["fetch"].calls == []

    # a corrupt download is discarded, never left in the cache
    bad.unlink()
    places["fetch"].content = b"an HTML error page"
    with pytest.raises(DataError, match="checksum mismatch for the download"):
        resolve("toy")
    assert not places["cache"].joinpath("toy.txt").exists()


def test_offline_with_nothing_local_says_where_to_put_it(places, monkeypatch):
    with pytest.raises(DataUnavailable) as e:
        load_text("toy")
    msg = str(e.value)
    assert "BYOLLM_DATA_MIRROR" in msg and str(places["mirror"]) in msg
    assert str(places["cache"] / "toy.txt") in msg
    assert "https://example.invalid/toy.txt" in msg and "Name or service not known" in msg
    assert places["fetch"].calls == ["toy"]
    assert "\n" not in msg

    monkeypatch.setenv(sources.OFFLINE_ENV, "1")  # no download attempt at all
    with pytest.raises(DataUnavailable, match="BYOLLM_OFFLINE is set"):
        load_text("toy")
    assert places["fetch"].calls == ["toy"]


def test_fallback_corpus_with_notice(places, caplog):
    with pytest.raises(DataUnavailable):
        load_text("tinyshakespeare")
    with caplog.at_level(logging.WARNING, logger="byollm.data"):
        text = load_text("tinyshakespeare", allow_fallback=True)
    from pydoc_data.topics import topics

    assert text == "\n".join(topics[k] for k in sorted(topics)) == fallback_corpus()
    assert len(text) > 100_000
    notice = caplog.text
    assert "FALLBACK CORPUS" in notice and "pydoc_data.topics" in notice and "tinyshakespeare" in notice
    out = prepare("tinyshakespeare", "char", places["tmp"] / "fb", allow_fallback=True)  # the offline quickstart
    meta = read_meta(out)
    assert meta["source"]["kind"] == "fallback" and meta["dataset"] == "pydoc-topics"
    assert meta["splits"]["val"]["chars"] == len(text) - int(0.9 * len(text))
    # record datasets have no fallback
    with pytest.raises(DataUnavailable):
        sources.resolve("alpaca", allow_fallback=True)


def test_subset_files_are_accepted_with_a_notice(places, monkeypatch, caplog):
    sub = b'[{"instruction": "a", "input": "", "output": "b"}]'
    spec = DatasetSpec(
        name="toyrec",
        description="toy records",
        format="json",
        filename="toyrec_full.json",
        sha256=None,
        fields=("instruction", "input", "output"),
        n_records=10,
        subsets=(Subset("toyrec_1.json", sha(sub), 1, "a one-record subset"),),
    )
    monkeypatch.setitem(REGISTRY, "toyrec", spec)
    (places["mirror"] / "toyrec_1.json").write_bytes(sub)
    with caplog.at_level(logging.WARNING, logger="byollm.data"):
        assert load_records("toyrec") == [{"instruction": "a", "input": "", "output": "b"}]
    assert "LOCAL SUBSET of toyrec (1 of 10 records)" in caplog.text
    (places["mirror"] / "toyrec_1.json").write_bytes(sub + b" ")  # a subset file must match its checksum
    with pytest.raises(DataError, match="checksum mismatch"):
        load_records("toyrec")


def test_real_download_code_with_file_urls(places, monkeypatch):
    """The real fetch (urllib, gzip, then Hugging Face) on file:// URLs: no network, same code path."""
    import gzip
    import sys

    monkeypatch.setattr(sources, "fetch", REAL_FETCH)
    gz = places["tmp"] / "toy.txt.gz"
    gz.write_bytes(gzip.compress(TOY))
    missing = (places["tmp"] / "missing.txt").as_uri()
    spec = DatasetSpec("toy3", "gzipped", "text", "toy3.txt", TOY_SHA, urls=(missing, gz.as_uri()))
    monkeypatch.setitem(REGISTRY, "toy3", spec)
    src = resolve("toy3")  # the first URL fails, the second is downloaded and decompressed
    assert src.kind == "download" and src.path.read_bytes() == TOY

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    spec = DatasetSpec("toy4", "hf", "jsonl", "toy4.jsonl", None, urls=(missing,), hf=HFSource("x/y"))
    monkeypatch.setitem(REGISTRY, "toy4", spec)
    with pytest.raises(DataUnavailable) as e:
        resolve("toy4")
    assert "missing.txt" in str(e.value) and "pip install datasets" in str(e.value)


def test_download_without_published_checksum_is_pinned_on_first_use(places, monkeypatch):
    spec = DatasetSpec("toy2", "no checksum", "text", "toy2.txt", None, urls=("https://example.invalid/2",))
    monkeypatch.setitem(REGISTRY, "toy2", spec)
    places["fetch"].content = b"hello\n"
    assert resolve("toy2").kind == "download"
    assert (places["cache"] / "toy2.txt.sha256").read_text().split()[0] == sha(b"hello\n")
    (places["cache"] / "toy2.txt").write_bytes(b"hellx\n")  # corrupted later
    with pytest.raises(DataError, match="checksum mismatch"):
        resolve("toy2")


def test_hf_rows_are_written_in_registry_format(places, monkeypatch):
    """The Hugging Face download path minus the network: rows -> wikitext's split files -> official split."""
    assert REGISTRY["wikitext-2"].format == "text_splits"
    rows = {
        "train": [{"text": " = A = \n"}, {"text": ""}, {"text": " Some training text .\n"}],
        "validation": [{"text": " Held out .\n"}],
        "test": [{"text": " Test .\n"}],
    }

    def fake_fetch(s, dest):
        sources.write_rows(s, rows, dest)

    monkeypatch.setattr(sources, "fetch", fake_fetch)
    src = resolve("wikitext-2")
    assert src.kind == "download" and (src.path / "validation.txt").read_text() == " Held out .\n"
    out = prepare("wikitext-2", "char", places["tmp"] / "wt2")
    meta = read_meta(out)
    assert meta["split"]["rule"] == "official"
    tok = load_tokenizer(out / "tokenizer")
    assert tok.decode(load_split(out, "val").tolist()) == " Held out .\n"
    assert tok.decode(load_split(out, "train").tolist()) == " = A = \n Some training text .\n"

    alpaca = REGISTRY["alpaca"]
    dest = places["tmp"] / "a.json"
    sources.write_rows(alpaca, {"train": [{"instruction": "i", "input": "", "output": "o", "text": "x"}]}, dest)
    assert json.loads(dest.read_text()) == [{"instruction": "i", "input": "", "output": "o"}]
    assert alpaca.hf == HFSource("tatsu-lab/alpaca", columns=("instruction", "input", "output"))


# --------------------------------------------------------------------------------------------------
# The real mirror
# --------------------------------------------------------------------------------------------------

needs_mirror = pytest.mark.skipif(
    not (data_mirror() / "tinyshakespeare.txt").is_file(), reason="data mirror with tinyshakespeare.txt absent"
)


@needs_mirror
def test_real_mirror_file_verifies(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.MIRROR_ENV, str(data_mirror()))
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(sources, "fetch", FakeFetch())
    src = resolve("tinyshakespeare")
    assert src.kind == "mirror" and src.sha256 == SHAKESPEARE_SHA == REGISTRY["tinyshakespeare"].sha256
    if (data_mirror() / "alpaca_4500.json").is_file():
        src = resolve("alpaca")
        assert src.subset is not None and "(4,500 of 52,002 records)" in src.notice
        recs = load_records("alpaca")
        assert len(recs) == 4500 and set(recs[0]) == {"instruction", "input", "output"}
    if (data_mirror() / "hh_rlhf_harmless_2000.jsonl").is_file():
        recs = load_records("hh-rlhf")
        assert len(recs) == 2000 and recs[0]["chosen"].startswith("\n\nHuman:")


# --------------------------------------------------------------------------------------------------
# Readers: corrupt files
# --------------------------------------------------------------------------------------------------


def test_corrupt_files_give_clear_errors(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c\n')  # line 3 cut off
    with pytest.raises(DataError, match=r"d\.jsonl line 3 is not valid JSON"):
        load_records(jsonl)

    js = tmp_path / "d.json"
    js.write_text('[{"instruction": "a", "input": "", "output": "b"},\n {"instr')
    with pytest.raises(DataError, match=r"not valid JSON at line 2"):
        load_records(js)

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 0xe9 at offset 3"):
        load_text(latin)

    js.write_text('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]')
    with pytest.raises(DataError, match="record 1 has no field 'output'"):
        load_records("alpaca", path=js)
    js.write_text('[{"instruction": "a", "input": 3, "output": "b"}]')
    with pytest.raises(DataError, match="field 'input' of record 0 is a int"):
        load_records("alpaca", path=js)


def test_local_directory_of_text_files(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first\n")
    assert load_text(d) == "first\nsecond\n"


# --------------------------------------------------------------------------------------------------
# prepare: shards, split, meta
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_file(tmp_path_factory, shakespeare_text) -> Path:
    mirror_file = data_mirror() / "tinyshakespeare.txt"
    if mirror_file.is_file():
        return mirror_file
    path = tmp_path_factory.mktemp("text") / "tinyshakespeare.txt"  # the pydoc fallback text
    path.write_text(shakespeare_text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def char_prepared(tmp_path_factory, shakespeare_file) -> Path:
    return prepare("tinyshakespeare", "char", tmp_path_factory.mktemp("prep") / "shakespeare_char",
                   path=shakespeare_file)


def test_prepare_char_split_matches_nanogpt(char_prepared, shakespeare_file):
    text = shakespeare_file.read_text(encoding="utf-8")
    meta = read_meta(char_prepared)
    tok = load_tokenizer(char_prepared / "tokenizer")
    cut = int(0.9 * len(text))
    train, val = load_split(char_prepared, "train"), load_split(char_prepared, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert len(train) == cut and len(val) == len(text) - cut  # one token per character
    assert tok.decode(val.tolist()) == text[cut:]
    assert tok.decode(train.tolist()) == text[:cut]
    assert meta["split"]["cut_char"] == cut and meta["tokenizer"]["type"] == "char"
    assert meta["splits"]["val"]["bytes"] == len(text[cut:].encode("utf-8"))
    assert meta["source"]["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size == len(set(text))
    if meta["source"]["sha256"] == SHAKESPEARE_SHA:
        # nanoGPT's 65 characters, whether the vocabulary comes from the whole text or the train split only
        assert tok.vocab_size == 65 == CharTokenizer.train(text[:cut]).vocab_size
        assert meta["splits"]["train"]["tokens"] == 1_003_854 and meta["splits"]["val"]["tokens"] == 111_540
    # a uniform model over V tokens costs log2(V) bits per character; ASCII: one byte per character
    if meta["splits"]["val"]["bytes"] == meta["splits"]["val"]["tokens"]:
        assert bits_per_byte(math.log(tok.vocab_size), meta) == pytest.approx(math.log2(tok.vocab_size))
    loaded = load_prepared(char_prepared)
    assert loaded.tokenizer.vocab_size == tok.vocab_size and len(loaded.val) == len(val)


def test_prepare_bpe_and_chunked_encoding(tmp_path, shakespeare_file):
    text = shakespeare_file.read_text(encoding="utf-8")[:60_000]
    small = tmp_path / "small.txt"
    small.write_text(text, encoding="utf-8")
    out = prepare(small, "bpe:300", tmp_path / "bpe", chunk_chars=5_000)
    meta = read_meta(out)
    tok = load_tokenizer(out / "tokenizer")
    assert meta["tokenizer"]["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["trained_on"] == "train split"
    cut = int(len(text) * 0.9)
    train, val = load_split(out, "train"), load_split(out, "val")
    assert tok.decode(train.tolist()) == text[:cut] and tok.decode(val.tolist()) == text[cut:]
    assert train.tolist() == tok.encode(text[:cut])  # chunking changes nothing
    assert meta["splits"]["val"]["bytes_per_token"] == pytest.approx(len(text[cut:].encode()) / len(val))
    # a tokenizer directory works as the spec too
    out2 = prepare(small, out / "tokenizer", tmp_path / "bpe2")
    assert load_split(out2, "val").tolist() == val.tolist()
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_text_chunks_cut_only_where_bpe_splits(shakespeare_file):
    text = shakespeare_file.read_text(encoding="utf-8")[:30_000] + "\n\n  indented \n end"
    tok = train_bpe_fast(text, 320)
    for size in (100, 1_000, 7_777):
        chunks = list(text_chunks(text, size))
        assert "".join(chunks) == text and all(c for c in chunks)
        assert [i for c in chunks for i in tok.encode(c)] == tok.encode(text)


def test_prepare_records_split_and_separator(tmp_path):
    records = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "x", "output": f"{i}"} for i in range(40)]
    path = tmp_path / "recs.json"
    path.write_text(json.dumps(records))
    out = prepare(path, "char", tmp_path / "recs", seed=3)
    meta = read_meta(out)
    assert meta["kind"] == "records" and meta["split"]["seed"] == 3
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (36, 4)
    tok = load_tokenizer(out / "tokenizer")
    assert tok.eos_id is not None and meta["document_separator"] == [tok.eos_id]
    val = load_split(out, "val").tolist()
    assert val.count(tok.eos_id) == 4 and val[-1] == tok.eos_id
    _, val_idx = split_records(40, 0.1, 3)
    first = tok.decode(val[: val.index(tok.eos_id)])
    assert first.endswith(f"### Response:\n{val_idx[0]}")


def test_split_records_is_deterministic():
    a_train, a_val = split_records(1000, 0.1, seed=7)
    b_train, b_val = split_records(1000, 0.1, seed=7)
    assert np.array_equal(a_val, b_val) and len(a_val) == 100
    assert sorted(np.concatenate([a_train, a_val]).tolist()) == list(range(1000))
    assert not np.array_equal(split_records(1000, 0.1, seed=8)[1], a_val)


def test_truncated_shard_is_an_error(char_prepared, tmp_path):
    copy = shutil.copytree(char_prepared, tmp_path / "copy")
    data = (copy / "val.bin").read_bytes()
    (copy / "val.bin").write_bytes(data[:-1])
    with pytest.raises(DataError, match=r"val\.bin has .* bytes but meta\.json says .* truncated"):
        load_split(copy, "val")
    with pytest.raises(DataError, match="no meta.json"):
        load_split(tmp_path, "val")
    with pytest.raises(DataError, match="no split 'test'"):
        load_split(copy, "test")


def test_prepare_never_clobbers_other_directories(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 10)
    with pytest.raises(DataError, match="not a prepared dataset directory"):
        prepare(text, "char", keep)
    assert (keep / "notes.txt").read_text() == "precious"
    with pytest.raises(DataError, match="unknown tokenizer 'bpe-9'"):
        prepare(text, "bpe-9", tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def test_windows_targets_are_inputs_shifted_by_one():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], dtype=np.uint16)
    x, y = windows(tokens, np.array([0, 5]), 3)
    assert x.tolist() == [[10, 11, 12], [15, 16, 17]] and y.tolist() == [[11, 12, 13], [16, 17, 18]]
    assert x.dtype == y.dtype == torch.int64

    s = RandomWindowSampler(np.arange(1000, dtype=np.uint16), batch_size=5, block_size=8, seed=0)
    for _ in range(10):
        x, y = s.next_batch()
        assert x.shape == y.shape == (5, 8)
        assert torch.equal(y, x + 1)  # on arange, "shifted by one" is "plus one"
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)
        assert int(y.max()) <= 999

    exact = RandomWindowSampler(np.arange(9, dtype=np.uint16), batch_size=3, block_size=8, seed=1)
    x, y = exact.next_batch()  # block_size + 1 tokens: the only window is the whole array
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
    with pytest.raises(DataError, match="fewer than block_size"):
        RandomWindowSampler(np.arange(8, dtype=np.uint16), batch_size=1, block_size=8, seed=0)


def test_random_sampler_determinism_and_resume():
    tokens = np.random.default_rng(0).integers(0, 65, size=5000).astype(np.uint16)

    def batches(sampler, n):
        return [sampler.next_batch() for _ in range(n)]

    a = batches(RandomWindowSampler(tokens, 4, 16, seed=42), 6)
    b = batches(RandomWindowSampler(tokens, 4, 16, seed=42), 6)
    c = batches(RandomWindowSampler(tokens, 4, 16, seed=43), 6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))

    first = RandomWindowSampler(tokens, 4, 16, seed=42)
    batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint meta)
    resumed = RandomWindowSampler(tokens, 4, 16, seed=42)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(a[3:], batches(resumed, 3), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_split_the_global_batch():
    tokens = np.random.default_rng(1).integers(0, 1000, size=3000).astype(np.uint16)
    one = RandomWindowSampler(tokens, batch_size=8, block_size=12, seed=5)
    two = [RandomWindowSampler(tokens, 4, 12, seed=5, rank=r, world_size=2) for r in range(2)]
    four = [RandomWindowSampler(tokens, 2, 12, seed=5, rank=r, world_size=4) for r in range(4)]
    for _ in range(5):
        x, y = one.next_batch()
        for group in (two, four):
            parts = [s.next_batch() for s in group]
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(DataError, match="rank"):
        RandomWindowSampler(tokens, 4, 12, seed=5, rank=2, world_size=2)


def test_eval_batches_are_fixed():
    tokens = np.arange(2000, dtype=np.uint32)
    a = list(eval_batches(tokens, 4, 10, max_batches=5, seed=0))
    b = list(eval_batches(tokens, 4, 10, max_batches=5, seed=0))
    assert len(a) == 5 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    shards = [list(eval_batches(tokens, 4, 10, 5, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 2]
    assert torch.equal(shards[1][0][0], a[1][0]) and torch.equal(shards[0][2][0], a[4][0])


def test_sequential_sampler_covers_every_target_once():
    tokens = np.arange(103, dtype=np.uint16)  # 102 targets = 12 windows of 8 + a tail of 6
    s = SequentialSampler(tokens, batch_size=5, block_size=8)
    got = list(s)
    assert [tuple(x.shape) for x, _ in got] == [(5, 8), (5, 8), (2, 8), (1, 6)] and len(s) == 4
    xs = torch.cat([x.flatten() for x, _ in got])
    ys = torch.cat([y.flatten() for _, y in got])
    assert xs.tolist() == list(range(102)) and ys.tolist() == list(range(1, 103))
    assert s.num_targets == 102
    ranks = [list(SequentialSampler(tokens, 5, 8, rank=r, world_size=3)) for r in range(3)]
    assert sum(y.numel() for r in ranks for _, y in r) == 102
    assert torch.equal(ranks[1][0][1], got[1][1])
