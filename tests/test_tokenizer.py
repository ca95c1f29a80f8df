"""Tests for byollm.tokenizer.

References are independent of our code: the Hugging Face `tokenizers` library (Rust), `transformers`,
hand-computed values and properties such as lossless round trips.
"""

from __future__ import annotations

import json
import string

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from byollm.errors import ByollmError, TokenizerError
from byollm.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    FastTokenizer,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
    split_on_special,
    stream_decode,
    train_bpe_fast,
    train_tokenizer,
)
from byollm.tokenizer.bpe import BYTE_TO_UNICODE

EOT = "<|endoftext|>"
VOCAB = 1000
# Text that exercises the pre-tokenizer: contractions, digits, punctuation runs, whitespace runs, accents,
# combining marks, CJK, emoji (4 UTF-8 bytes, a ZWJ sequence), a special token, and a tab/CRLF.
TRICKY = (
    "Hello there, ROMEO! I'll say: it's 2024-05-01, 3.14159 & 100%...\n\n   indented\ttab\r\n"
    "naïve café, e\u0301 (combining), 日本語のテキスト, emoji 😀👍🏽 👨‍👩‍👧 <|endoftext|>The end.  "
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Arbitrary Unicode text; hypothesis' default alphabet already leaves out lone surrogates (not valid text).
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
# For comparisons with tokenizers, only characters assigned in Python's Unicode database: for code points
# that a newer Unicode version assigns, the `regex` module and tokenizers' Oniguruma can disagree on \p{L}.
assigned_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cn", "Cs"]), max_size=60)


def reference_trainer(texts: list[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 0):
    """Byte-level BPE trained by tokenizers alone, configured the way GPT-2-style tokenizers are."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def model_json(tok: tokenizers.Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges in rank order) from the tokenizer.json that tokenizers writes."""
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def our_model(tok: BPETokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    return (
        {tok.id_to_token(i): i for i in range(tok.vocab_size)},
        [(tok.id_to_token(a), tok.id_to_token(b)) for a, b in tok.merges],
    )


@pytest.fixture(scope="module")
def scratch(shakespeare_text: str) -> BPETokenizer:
    return BPETokenizer.train(shakespeare_text, VOCAB, special_tokens=[EOT])


@pytest.fixture(scope="module")
def fast(shakespeare_text: str) -> FastTokenizer:
    return train_bpe_fast(shakespeare_text, VOCAB, special_tokens=[EOT])


# --- the from-scratch trainer learns exactly what tokenizers learns --------------------------------------


def test_scratch_and_fast_trainers_learn_identical_merges_and_ids(scratch, fast, shakespeare_text):
    ref = reference_trainer([shakespeare_text], VOCAB, [EOT])
    ref_vocab, ref_merges = model_json(ref)
    vocab, merges = our_model(scratch)
    assert len(merges) == VOCAB - 257 and len(ref_merges) == VOCAB - 257
    assert merges == ref_merges  # same merges in the same order
    assert vocab == ref_vocab  # same id for every token
    assert model_json(fast.hf) == (ref_vocab, ref_merges)  # and train_bpe_fast is that reference
    # Conventions we copy from tokenizers: special tokens first, then the 256 bytes by code point.
    assert vocab[EOT] == 0 and vocab["!"] == 1 and vocab["Ġ"] == 1 + sorted(BYTE_TO_UNICODE.values()).index("Ġ")
    piece = shakespeare_text[:200_000] + TRICKY
    ids = scratch.encode(piece)
    assert ids == ref.encode(piece).ids == fast.encode(piece)
    assert scratch.decode(ids) == ref.decode(ids, skip_special_tokens=False) == piece


def test_second_corpus_min_frequency_and_several_special_tokens():
    # Digits, punctuation and non-Latin scripts, special tokens inside the text, and min_frequency=3 stopping
    # training before vocab_size is reached.
    texts = [TRICKY * 3, "Zahlen 12345 67890 ½ ² Ⅻ; ¿Qué? ¡Sí! Ελληνικά русский " * 4, "<|pad|>a<|endoftext|>b" * 5]
    specials = [EOT, "<|pad|>", "<|user|>"]
    ours = BPETokenizer.train(texts, 2000, special_tokens=specials, min_frequency=3)
    ref = train_bpe_fast(texts, 2000, special_tokens=specials, min_frequency=3)
    assert our_model(ours) == model_json(ref.hf)
    assert 259 < ours.vocab_size < 2000  # stopped by min_frequency
    assert ours.special_tokens == {EOT: 0, "<|pad|>": 1, "<|user|>": 2}
    # Special token strings are cut out of the training text, so no merge learns "<|" from them.
    assert not any("<|" in a + b for a, b in our_model(ours)[1])
    for text in texts:
        assert ours.encode(text) == ref.encode(text)


def test_wikipedia_example_hand_computed():
    # "aaabdaaabac" is one word. Ids: <|endoftext|>=0, then bytes by code point: a=65, b=66, c=67, d=68.
    # 1. (a,a) occurs 4 times -> "aa"=257.   2. (aa,a) and (a,b) both occur twice: the tie goes to the
    # smaller ids, (65,66) < (257,65) -> "ab"=258.   3. (aa,ab) twice -> "aaab"=259.   4. all pairs once:
    # (a,c)=(65,67) is the smallest -> "ac".   5. then (d,aaab)=(68,259) -> "daaab".
    tok = BPETokenizer.train("aaabdaaabac", 262)
    assert our_model(tok)[1] == [("a", "a"), ("a", "b"), ("aa", "ab"), ("a", "c"), ("d", "aaab")]
    assert tok.token_to_id("a") == 65 and tok.token_to_id("aaab") == 259
    assert [tok.id_to_token(i) for i in tok.encode("aaabdaaabac")] == ["aaab", "daaab", "ac"]
    # min_frequency=3: only (a,a), seen 4 times, is frequent enough.
    assert our_model(BPETokenizer.train("aaabdaaabac", 262, min_frequency=3))[1] == [("a", "a")]


@SETTINGS
@given(
    texts=st.lists(st.text(alphabet="ab c\né'1", min_size=1, max_size=40), min_size=1, max_size=4),
    extra=st.integers(0, 40),
    min_frequency=st.sampled_from([0, 2, 3]),
)
def test_trainers_agree_on_random_small_corpora(texts, extra, min_frequency):
    # Small alphabets make many equal counts, which is where tie-breaking shows.
    ours = BPETokenizer.train(texts, 257 + extra, min_frequency=min_frequency)
    ref = reference_trainer(texts, 257 + extra, [EOT], min_frequency)
    assert our_model(ours) == model_json(ref)


def test_bytes_to_unicode_matches_gpt2():
    reference = pytest.importorskip("transformers.convert_slow_tokenizer").bytes_to_unicode
    assert BYTE_TO_UNICODE == reference()
    assert (BYTE_TO_UNICODE[ord(" ")], BYTE_TO_UNICODE[ord("\n")], BYTE_TO_UNICODE[0]) == ("Ġ", "Ċ", "Ā")


@SETTINGS
@given(text=assigned_text)
def test_pre_tokenizer_matches_tokenizers(text):
    from byollm.tokenizer.bpe import _WORD_RE, to_byte_level

    ref = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    assert [to_byte_level(w.encode()) for w in _WORD_RE.findall(text)] == [w for w, _ in ref]


# --- encoding and decoding -----------------------------------------------------------------------------


@SETTINGS
@given(text=any_text | st.sampled_from([TRICKY, "", " ", "\n\n\n", "😀" * 5, "e\u0301\u0301", "<|endoftext|>"]))
def test_bpe_round_trip_is_lossless(scratch, text):
    assert scratch.decode(scratch.encode(text)) == text


@SETTINGS
@given(text=assigned_text)
def test_bpe_ids_match_reference(scratch, fast, text):
    assert scratch.encode(text) == fast.encode(text)


@SETTINGS
@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=30))
def test_decode_of_any_ids_matches_reference(scratch, fast, ids):
    # Random ids often cut UTF-8 characters in half; both sides then write U+FFFD the same way.
    assert scratch.decode(ids) == fast.decode(ids) == fast.hf.decode(ids, skip_special_tokens=False)
    assert scratch.decode(ids, skip_special=True) == fast.hf.decode(ids, skip_special_tokens=True)


def test_long_words_match_reference(scratch, fast):
    # One pre-tokenized word of thousands of bytes: merging stays fast and still matches tokenizers.
    for text in ("-" * 5000, "e" * 5000, "the" * 2000, "1" * 5000, "😀" * 1000):
        assert scratch.encode(text) == fast.encode(text)


def test_special_tokens_allowed_or_plain(scratch, fast):
    text = f"a{EOT}b"
    assert scratch.encode(text) == fast.encode(text)
    assert scratch.encode(text)[1] == 0
    plain = scratch.encode(text, allowed_special=False)
    assert 0 not in plain and scratch.decode(plain) == text
    assert plain == fast.encode(text, allowed_special=False)
    assert fast.encode(text) == scratch.encode(text)  # the flag is reset afterwards
    assert scratch.decode(scratch.encode(text), skip_special=True) == "ab"
    assert scratch.encode_batch([text, "x"]) == fast.encode_batch([text, "x"]) == [scratch.encode(text), [88]]


def test_roles_default_to_endoftext(scratch, fast):
    for tok in (scratch, fast):
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, None)
        assert tok.vocab_size == VOCAB
        assert tok.id_to_token(0) == EOT and tok.token_to_id(EOT) == 0
        assert tok.id_to_token(tok.token_to_id("Ġthe")) == "Ġthe"


def test_errors_are_clear(scratch, fast):
    with pytest.raises(TokenizerError, match="out of range"):
        scratch.decode([VOCAB])
    with pytest.raises(TokenizerError, match="surrogate"):
        scratch.encode("bad \ud800 text")
    with pytest.raises(TokenizerError, match="surrogate"):
        fast.encode("bad \ud800 text")
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train("some text", 256)
    with pytest.raises(TokenizerError, match="not one of"):
        scratch.set_roles(pad="<pad>")
    assert (scratch.bos_token, scratch.eos_token, scratch.pad_token) == (EOT, EOT, None)  # unchanged
    assert issubclass(TokenizerError, ByollmError)


def test_split_on_special_prefers_longest():
    assert split_on_special("x<|a|>y<|a|>z", ["<|a|>", "<|a|>y"]) == [
        ("x", False),
        ("<|a|>y", True),
        ("<|a|>", True),
        ("z", False),
    ]
    assert split_on_special("", ["<|a|>"]) == []


# --- streaming -----------------------------------------------------------------------------------------


def _check_stream(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert "".join(stream_decode(tok, ids)) == text


def test_stream_decoder_never_splits_characters(scratch, fast, shakespeare_text):
    text = "emoji 😀👍🏽 café 日本語 " + EOT + shakespeare_text[:300]
    assert any("\ufffd" in scratch.decode([i]) for i in scratch.encode("😀"))  # the emoji is split
    for tok in (scratch, fast, CharTokenizer.train(text, special_tokens=[EOT])):
        assert tok.supports_bytes
        _check_stream(tok, text)
    # The text-window path, for tokenizers whose tokens are not fixed bytes (here a Fuse decoder).
    windowed = FastTokenizer(CharTokenizer.train(text).to_hf())
    assert not windowed.supports_bytes
    _check_stream(windowed, text.replace(EOT, ""))
    # A stream cut inside a character flushes U+FFFD, like bytes.decode(errors="replace").
    emoji = scratch.encode("😀")
    stream = StreamDecoder(scratch)
    assert len(emoji) > 1 and [stream.put(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert stream.flush() == "\ufffd"


# --- save / load / Hugging Face ------------------------------------------------------------------------


def _auto(directory):
    """transformers' own loader for a tokenizer directory (the [hf] extra; skip the test without it)."""
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(directory))


def test_bpe_save_load_and_readable_files(scratch, tmp_path, shakespeare_text):
    scratch.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[EOT] == 0 and "Ġthe" in vocab
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + len(scratch.merges)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is BPETokenizer and loaded.merges == scratch.merges and loaded.vocab == scratch.vocab
    assert loaded.encode(TRICKY) == scratch.encode(TRICKY) and loaded.eos_id == 0


def test_bpe_exports_to_transformers(scratch, tmp_path, shakespeare_text):
    scratch.save_hf(tmp_path)
    hf = _auto(tmp_path)
    text = shakespeare_text[:20_000] + TRICKY
    ids = scratch.encode(text)
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == scratch.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == scratch.decode(ids, skip_special=True)
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (0, 0, VOCAB)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_gpt2_layout_loads_like_transformers(scratch, tmp_path):
    # The original openai-community/gpt2 files: vocab.json + merges.txt, no tokenizer.json. GPT-2 numbers
    # the 256 bytes in bytes_to_unicode order and puts <|endoftext|> last, unlike our trainer.
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    merges = our_model(scratch)[1]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[EOT] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    ours = load_tokenizer(tmp_path)
    ref = pytest.importorskip("transformers").GPT2Tokenizer.from_pretrained(str(tmp_path))
    assert type(ours) is BPETokenizer and ours.eos_id == VOCAB - 1 == ref.eos_token_id
    ids = ours.encode(TRICKY)
    assert ids == ref(TRICKY)["input_ids"] and ours.decode(ids) == ref.decode(ids) == TRICKY
    assert [ours.id_to_token(i) for i in ids] == [scratch.id_to_token(i) for i in scratch.encode(TRICKY)]


def test_fast_tokenizer_loads_hf_directory_with_config_roles(tmp_path):
    # A Hugging Face model directory: tokenizer.json plus a config naming bos/eos, as dicts or strings.
    base = train_bpe_fast(TRICKY * 5, 300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    base.hf.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert type(tok) is FastTokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", None)
    assert (tok.bos_id, tok.eos_id) == (2, 3)
    assert tok.encode("<|im_start|>hi") == [2, *tok.encode("hi")]
    # Saving it again keeps the imported config's other entries, such as the chat template.
    tok.save(tmp_path / "again")
    hf = _auto(tmp_path / "again")
    assert hf.chat_template == config["chat_template"] and (hf.bos_token_id, hf.eos_token_id) == (2, 3)
    # Without a config, roles come from the conventional names.
    (tmp_path / "tokenizer_config.json").unlink()
    assert (load_tokenizer(tmp_path).bos_token, load_tokenizer(tmp_path).eos_token) == ("<s>", "</s>")


def test_fast_save_load_round_trip(fast, tmp_path):
    fast.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is FastTokenizer and loaded.encode(TRICKY) == fast.encode(TRICKY)
    assert _auto(tmp_path)(TRICKY)["input_ids"] == fast.encode(TRICKY)


def test_add_special_tokens_survives_save_load_and_export(shakespeare_text, tmp_path):
    chat = ["<|im_start|>", "<|im_end|>"]
    text = "<|im_start|>user\nHello there!<|im_end|>\n<|endoftext|>"
    for n, tok in enumerate(
        [
            BPETokenizer.train(shakespeare_text[:50_000], 300),
            train_bpe_fast(shakespeare_text[:50_000], 300),
            CharTokenizer.train(shakespeare_text[:50_000] + text, special_tokens=[EOT]),
        ]
    ):
        size = tok.vocab_size
        assert tok.add_special_tokens(chat) == [size, size + 1]
        assert tok.add_special_tokens(["<|im_end|>"]) == [size + 1]  # known: keeps its id
        tok.set_roles(bos="<|im_start|>", pad=EOT)
        tok.set_roles(eos="<|im_end|>")  # roles not named are kept
        ids = tok.encode(text)
        assert ids[0] == size and size + 1 in ids and tok.vocab_size == size + 2
        assert tok.decode(ids) == text
        out = tmp_path / str(n)
        tok.save(out)
        loaded = load_tokenizer(out)
        assert loaded.encode(text) == ids and loaded.special_tokens == tok.special_tokens
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (size, size + 1, tok.special_tokens[EOT])
        hf = _auto(out)
        assert hf(text)["input_ids"] == ids and hf.decode(ids) == text
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (size, size + 1, tok.special_tokens[EOT])


# --- character-level -----------------------------------------------------------------------------------


def test_char_tokenizer_matches_nanogpt_and_round_trips(shakespeare_text, tmp_path):
    tok = CharTokenizer.train(shakespeare_text)
    if len(shakespeare_text) == 1_115_394:  # the real Tiny Shakespeare: nanoGPT's 65 characters
        assert tok.vocab_size == 65 and tok.encode("\n !") == [0, 1, 2] and tok.encode("z") == [64]
    assert tok.decode(tok.encode(shakespeare_text[:5000])) == shakespeare_text[:5000]
    assert (tok.bos_id, tok.eos_id) == (None, None)
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(shakespeare_text[:5000]) == tok.encode(shakespeare_text[:5000])


def test_char_tokenizer_specials_unknowns_and_hf(tmp_path):
    tok = CharTokenizer.train(f"hello{EOT}world 😀\n", special_tokens=[EOT, "<pad>"])
    assert tok.chars == sorted(set("helloworld 😀\n"))  # special token strings are not characters
    assert tok.special_tokens == {EOT: len(tok.chars), "<pad>": len(tok.chars) + 1}
    assert (tok.eos_id, tok.pad_id) == (len(tok.chars), len(tok.chars) + 1)
    text = f"hello😀{EOT}world"
    ids = tok.encode(text)
    assert ids[6] == tok.eos_id and tok.decode(ids) == text and tok.decode(ids, skip_special=True) == "hello😀world"
    with pytest.raises(TokenizerError, match=r"'q' \(U\+0071\)"):
        tok.encode("quit")
    with pytest.raises(TokenizerError, match="'<'"):
        tok.encode(EOT, allowed_special=False)
    tok.save(tmp_path)
    hf = _auto(tmp_path)
    assert hf(text)["input_ids"] == ids and hf.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == "hello😀world"
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    with pytest.raises(Exception, match="UNK"):  # the HF version refuses unknown characters too
        tok.to_hf().encode("quit")


# --- the training entry point --------------------------------------------------------------------------


def test_train_tokenizer_entry_point(tmp_path, shakespeare_text):
    corpus = tmp_path / "a.txt"
    corpus.write_text(shakespeare_text[:100_000], encoding="utf-8")
    scratch = train_tokenizer([corpus], 400, kind="bpe", impl="scratch", out_dir=tmp_path / "s", show_progress=False)
    fast = train_tokenizer([corpus], 400, kind="bpe", impl="fast", out_dir=tmp_path / "f", show_progress=False)
    assert type(scratch) is BPETokenizer and type(fast) is FastTokenizer
    assert our_model(scratch) == model_json(fast.hf)
    assert load_tokenizer(tmp_path / "s").encode(TRICKY) == load_tokenizer(tmp_path / "f").encode(TRICKY)
    char = train_tokenizer([corpus], None, kind="char", special_tokens=[], out_dir=tmp_path / "c")
    assert set(char.chars) == set(shakespeare_text[:100_000])
    (tmp_path / "crlf.txt").write_bytes(b"line one\r\nline two\r\n")  # Windows line ends are kept as they are
    assert "\r" in train_tokenizer([tmp_path / "crlf.txt"], None, kind="char").chars


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: ([d / "missing.txt"], 400, {}), "does not exist"),
        (lambda d: ([d / "empty.txt"], 400, {}), "is empty"),
        (lambda d: ([d / "latin1.txt"], 400, {}), "not UTF-8"),
        (lambda d: ([d / "latin1.txt"], 400, {"impl": "fast"}), "not UTF-8"),
        (lambda d: ([d / "a.txt"], 257, {"special_tokens": [EOT, "<pad>"]}), "at least 258"),
        (lambda d: ([d / "a.txt"], 400, {"kind": "wordpiece"}), "unknown tokenizer kind"),
        (lambda d: ([d / "a.txt"], 400, {"impl": "rust"}), "unknown tokenizer implementation"),
        (lambda d: ([], 400, {}), "no training files"),
    ],
)
def test_train_tokenizer_errors(tmp_path, make, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a.txt").write_text("some text " * 10)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    files, vocab_size, kwargs = make(tmp_path)
    with pytest.raises(TokenizerError, match=message):
        train_tokenizer(files, vocab_size, show_progress=False, **kwargs)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(tmp_path)


def test_ascii_only_char_alphabet_is_sorted():
    tok = CharTokenizer.train(string.ascii_letters)
    assert tok.encode("Aa") == [0, 26]
