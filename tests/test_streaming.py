"""byollm.data.streaming: documents streamed with Hugging Face `datasets`, tokenised on the fly, packed into
batches, shared out between ranks, resumed exactly; and the pretraining recipe on a streamed dataset.

Everything reads a small JSONL made here through $BYOLLM_DATA_MIRROR, the code path the GPU recipe takes
for FineWeb-Edu from the Hub (`datasets.load_dataset(..., streaming=True)`); nothing touches the network.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from byollm.cli import main  # noqa: E402
from byollm.data import DataUnavailable, sources  # noqa: E402
from byollm.data.streaming import StreamingTokenSource, held_out, open_stream, stream_tokenizer  # noqa: E402
from byollm.errors import DataError  # noqa: E402
from byollm.tokenizer import CharTokenizer  # noqa: E402
from byollm.train import load_config, pretrain  # noqa: E402

EOT = "<|endoftext|>"
N_DOCS, VAL = 50, 5
WORDS = "the of and to in is was for on that with as by at from his an were are which this be".split()


def make_docs() -> list[str]:
    """50 short documents of different lengths, each starting with its number (so it can be recognised)."""
    return [f"doc {i}:\n" + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9)) + "."
            for i in range(N_DOCS)]


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """fineweb-edu.jsonl (50 docs) in a mirror directory, a char tokenizer with <|endoftext|> saved beside it."""
    docs = make_docs()
    m = tmp_path / "mirror"
    m.mkdir()
    (m / "fineweb-edu.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    monkeypatch.setenv(sources.MIRROR_ENV, str(m))
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")  # never the Hub
    tok = CharTokenizer.train(docs, special_tokens=(EOT,))
    tok.save(tmp_path / "tok")
    return {"docs": docs, "tok": tok, "tok_dir": tmp_path / "tok", "dir": m, "tmp": tmp_path}


def source(tok, rank=0, world_size=1, batch_size=2, block_size=16, **kw) -> StreamingTokenSource:
    return StreamingTokenSource(open_stream("fineweb-edu"), tok, batch_size, block_size, skip_docs=VAL, rank=rank,
                                world_size=world_size, read_docs=4, **kw)


def take(src: StreamingTokenSource, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [src.next_batch() for _ in range(n)]


def stream_of(batches) -> tuple[list[int], list[int]]:
    """The token streams the batches' x and y rows hold, rows and batches in order."""
    return [t for x, _ in batches for t in x.flatten().tolist()], [t for _, y in batches for t in y.flatten().tolist()]


def expected_stream(tok, docs: list[str]) -> list[int]:
    return [t for d in docs for t in (*tok.encode(d, allowed_special=False), tok.eos_id)]


def test_batches_are_the_token_stream_with_eos_between_documents(mirror) -> None:
    tok, docs = mirror["tok"], mirror["docs"]
    batches = take(source(tok), 40)  # 40 x 32 tokens: more than the 45 training documents, so a second epoch
    xs, ys = stream_of(batches)
    want = expected_stream(tok, docs[VAL:]) * 3
    assert xs == want[: len(xs)]  # contiguous: every batch continues where the last stopped
    assert ys == want[1 : len(ys) + 1]  # targets are the inputs shifted by one
    assert all(x.shape == (2, 16) and x.dtype == torch.int64 for x, _ in batches)
    text = tok.decode(xs)
    assert text.startswith(docs[VAL] + EOT + docs[VAL + 1] + EOT)
    assert not any(d + EOT in text for d in docs[:VAL])  # the validation documents are never trained on

    val = held_out(open_stream("fineweb-edu"), tok, VAL)
    assert val.tokens.tolist() == expected_stream(tok, docs[:VAL])
    assert val.meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in docs[:VAL])


def documents_seen(tok, batches) -> list[str]:
    text = tok.decode(stream_of(batches)[0])
    return [d for d in text.split(EOT)[:-1]]  # the last piece may be cut short


def test_ranks_read_disjoint_documents_that_together_are_one_ranks(mirror) -> None:
    tok, docs = mirror["tok"], mirror["docs"]
    one = documents_seen(tok, take(source(tok), 12))
    r0 = documents_seen(tok, take(source(tok, 0, 2), 6))
    r1 = documents_seen(tok, take(source(tok, 1, 2), 6))
    assert r0 == docs[VAL::2][: len(r0)] and r1 == docs[VAL + 1 :: 2][: len(r1)]  # round-robin by document
    assert not set(r0) & set(r1)
    n = min(len(r0), len(r1))
    assert sorted(r0[:n] + r1[:n]) == sorted(one[: 2 * n])  # together: what one process reads


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_continues_with_the_same_batches(mirror, prefetch: int) -> None:
    tok = mirror["tok"]
    a = source(tok, prefetch=prefetch)
    take(a, 7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint does, read back as the trainer does (weights_only)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    rest = take(a, 40)  # across the end of the stream, into the next epoch
    a.close()

    b = source(tok, prefetch=prefetch)
    b.load_state_dict(state)
    again = take(b, 40)
    b.close()
    for (x1, y1), (x2, y2) in zip(rest, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)

    state["ranks"][0]["hf"] = None  # without datasets' stream position: read and skip up to the document
    c = source(tok)
    c.load_state_dict(state)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(rest, take(c, 40), strict=True))


def test_pretrain_on_a_stream_end_to_end_and_resume(mirror) -> None:
    base = {"model.preset": "llama-tiny", "data.name": "fineweb-edu", "data.tokenizer": str(mirror["tok_dir"]),
            "data.val_docs": VAL, "data.prefetch": 2, "batch_size": 4, "block_size": 16, "max_steps": 6,
            "lr_decay_steps": 6, "warmup_steps": 1, "lr": 3e-3, "min_lr": 3e-4, "log_interval": 1,
            "eval_interval": 0, "eval_batches": 2, "sample_tokens": 4, "checkpoint_interval": 3, "device": "cpu",
            "dtype": "fp32", "out_dir": str(mirror["tmp"] / "runs")}
    full = pretrain(load_config(None, {**base, "name": "full"}), progress=False)
    assert full.steps == 6 and full.val["loss"] > 0 and full.val["bpb"] > 0
    meta = json.loads((full.run_dir / "meta.json").read_text())
    assert meta["data"]["dataset"] == "fineweb-edu" and meta["data"]["source"]["kind"] == "mirror"
    assert meta["data"]["split"]["val_docs"] == VAL

    pretrain(load_config(None, {**base, "name": "cut", "max_steps": 3}), progress=False)
    pretrain(load_config(None, {**base, "name": "cut", "resume": True}), progress=False)

    def losses(run: Path) -> list[float]:
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in events if e["event"] == "train"]

    assert losses(mirror["tmp"] / "runs" / "cut") == pytest.approx(losses(full.run_dir), rel=1e-6)


def test_offline_with_nothing_local_is_one_clear_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(DataUnavailable) as e:
        open_stream("fineweb-edu-10B")
    msg = str(e.value)
    assert "\n" not in msg and "BYOLLM_OFFLINE is set" in msg
    assert "fineweb-edu.jsonl" in msg and str(tmp_path / "empty") in msg and "HuggingFaceFW/fineweb-edu" in msg
    assert main(["pretrain", "--data.name", "fineweb-edu", "--data.tokenizer", "gpt2", "--max_steps", "1",
                 "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fineweb-edu.jsonl" in err

    # Online but the Hub cannot be reached: the same one line, with the reason.
    monkeypatch.delenv(sources.OFFLINE_ENV)
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(DataUnavailable, match="Couldn't reach") as e:
        open_stream("fineweb-edu").load()
    assert "\n" not in str(e.value) and "fineweb-edu.jsonl" in str(e.value)


def test_tokenizer_specs_for_streams(tmp_path, monkeypatch) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    def offline_hub(repo: str):
        raise OSError(f"cannot reach the Hub for {repo}\n(offline)")

    monkeypatch.setattr(HFTokenizer, "from_pretrained", staticmethod(offline_hub))
    with pytest.raises(DataError, match="openai-community/gpt2") as e:
        stream_tokenizer("gpt2")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="cannot be used with a streamed dataset"):
        stream_tokenizer("char")
    with pytest.raises(DataError, match="does not exist"):
        open_stream(tmp_path / "missing.jsonl")
