"""Byte-level BPE (byte pair encoding), the GPT-2 tokenizer, written from scratch.

The idea in four steps:
1. Split text into "words" with GPT-2's regex (so merges never cross a word boundary such as " the" | ",").
2. Write each word as UTF-8 bytes: 256 base symbols, so *any* text can be encoded, no unknown tokens.
3. Training: repeatedly find the most frequent adjacent pair of symbols and make it a new symbol (a merge).
4. Encoding: apply the learned merges to each word, earliest-learned first.

Bytes are written as printable characters (GPT-2's bytes_to_unicode, a space is "Ġ"), so vocab.json and
merges.txt are readable text files. The trainer follows the conventions of the Hugging Face `tokenizers`
BpeTrainer exactly (id order, tie-breaking, min_frequency), so it learns the same merges and ids as the fast
Rust trainer in fast.py; the comments marked "as tokenizers does" point out where that matters.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import regex
from tqdm.auto import tqdm

from byollm.errors import TokenizerError
from byollm.tokenizer.base import (
    META_FILE,
    Tokenizer,
    check_new_special_tokens,
    read_json,
    split_on_special,
    write_json,
)
from byollm.tokenizer.hf_files import add_special_tokens_to_hf, write_hf_files

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

# GPT-2's pre-tokenizer: English contractions, letters with an optional leading space, numbers, other
# symbols, and whitespace (a run of spaces keeps its last space for the next word: "  x" -> " ", " x").
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_WORD_RE = regex.compile(GPT2_SPLIT_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to 256 printable characters.

    Printable Latin-1 bytes stand for themselves ("a" is "a"); the others (control bytes, space, ...) are
    shifted to code points 256 and up, in order: byte 0 -> "Ā", space (32) -> "Ġ", newline (10) -> "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (chr(256 + n) for n in itertools.count())
    for b in range(256):
        if b not in mapping:
            mapping[b] = next(shifted)
    return mapping


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
# As tokenizers does: the 256 base symbols get their ids sorted by the code point of their printable
# character, not by byte value. So "!" (byte 33) is the first and "Ġ" (space, U+0120) comes after "ÿ".
BYTE_ALPHABET = sorted(BYTE_TO_UNICODE.values())


def to_byte_level(b: bytes) -> str:
    """b"hi there" -> "hiĠthere": raw bytes written in the printable alphabet."""
    return "".join(BYTE_TO_UNICODE[x] for x in b)


def from_byte_level(s: str) -> bytes | None:
    """The inverse of to_byte_level, or None if `s` has a character outside the 256-character alphabet."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in s)
    except KeyError:
        return None


def check_bpe_vocab_size(vocab_size: int, special_tokens: Iterable[str]) -> list[str]:
    """Check `special_tokens` (check_new_special_tokens) and that `vocab_size` has room for them plus the 256
    byte tokens every byte-level BPE vocabulary starts with; return the checked special tokens."""
    special_tokens = check_new_special_tokens(special_tokens)
    if vocab_size < 256 + len(special_tokens):
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for byte-level BPE: it needs the 256 byte tokens plus "
            f"{len(special_tokens)} special token(s); use at least {256 + len(special_tokens)}"
        )
    return special_tokens


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text contains {text[e.start : e.end]!r}, a lone UTF-16 surrogate that is not a character and has no "
            "UTF-8 form; fix how the text was read (e.g. open the file with encoding='utf-8')"
        ) from e


def count_words(texts: Iterable[str], special_tokens: Sequence[str] = (), show_progress: bool = False) -> Counter:
    """Count the byte-level words of `texts`; special tokens are cut out first and not learned from."""
    counts: Counter[str] = Counter()
    for text in tqdm(texts, desc="count words", unit=" texts", delay=1.0, disable=not show_progress):
        for piece, is_special in split_on_special(text, special_tokens):
            if not is_special:
                counts.update(_WORD_RE.findall(piece))
    return Counter({to_byte_level(_utf8(word)): n for word, n in counts.items()})


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[tuple[tuple[int, int], int]]:
    """Replace each (a, b) in `word` by `new`, left to right; return how neighbouring pair counts change.

    E.g. merging (l, l) in h e l l o removes the pairs (e, l) and (l, o) and creates (e, ll) and (ll, o).
    As in tokenizers, the merged pair (a, b) itself is not in the list: the trainer is done with it.
    """
    changes = []
    i = 0
    while i < len(word) - 1:
        if word[i] == a and word[i + 1] == b:
            if i > 0:
                changes += [((word[i - 1], a), -1), ((word[i - 1], new), 1)]
            word[i : i + 2] = [new]
            if i < len(word) - 1:
                changes += [((b, word[i + 1]), -1), ((new, word[i + 1]), 1)]
        i += 1
    return changes


class BPETokenizer(Tokenizer):
    """Byte-level BPE: `vocab` maps each ordinary id to its bytes, `merges` lists id pairs by priority."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[int, int]],
        special_tokens: dict[str, int] | None = None,
        *,
        roles: dict[str, str | None] | None = None,
    ) -> None:
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens or {})
        self._bytes_to_id = {b: i for i, b in self.vocab.items()}
        missing = [x for x in range(256) if bytes([x]) not in self._bytes_to_id]
        if missing:
            raise TokenizerError(f"BPE vocabulary lacks the single bytes {missing[:8]}...; it cannot encode all text")
        self._byte_ids = [self._bytes_to_id[bytes([x])] for x in range(256)]
        all_ids = sorted([*self.vocab, *self.special_tokens.values()])
        if all_ids != list(range(len(all_ids))):
            raise TokenizerError("BPE token ids must be 0..N-1 with each id used once (vocab and special tokens)")
        # pair -> (rank, id of the merged token). Later duplicates win, as in tokenizers.
        self._merge_table: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            merged = self._bytes_to_id.get(self.vocab.get(a, b"") + self.vocab.get(b, b""))
            if a not in self.vocab or b not in self.vocab or merged is None:
                raise TokenizerError(f"merge #{rank} ({a}, {b}) does not combine two tokens into a vocabulary token")
            self._merge_table[(a, b)] = (rank, merged)
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        self._cache: dict[str, list[int]] = {}
        self._init_roles(roles)

    # --- training ---------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        min_frequency: int = 0,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Learn merges until the vocabulary (special tokens included) has `vocab_size` entries.

        A pair must occur at least `min_frequency` times to be merged (training stops earlier otherwise).
        """
        special_tokens = check_bpe_vocab_size(vocab_size, special_tokens)
        if single := [t for t in special_tokens if t in UNICODE_TO_BYTE]:
            raise TokenizerError(f"special tokens {single} are single base symbols; use longer names like '<|x|>'")
        texts = [texts] if isinstance(texts, str) else texts
        word_counts = count_words(texts, special_tokens, show_progress)

        # 1. Ids, as tokenizers does: special tokens first, then the 256 base symbols, then one per merge.
        id_to_token: list[str] = [*special_tokens, *BYTE_ALPHABET]
        token_to_id = {t: i for i, t in enumerate(id_to_token)}

        # 2. Every distinct word once, as a list of symbol ids, with how often it occurs.
        words = [[token_to_id[c] for c in w] for w in word_counts]
        counts = list(word_counts.values())

        # 3. Count adjacent pairs, remembering which words contain each pair.
        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (word, n) in enumerate(zip(words, counts, strict=True)):
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += n
                where[pair].add(w)

        # 4. A max-heap of candidate merges (count, pair, words that may contain it). heapq is a min-heap,
        # so we store -count; equal counts go to the pair with the smaller ids, as tokenizers does. Entries
        # go stale when a merge changes a pair's count: rather than searching the heap, we check the count
        # when an entry comes out and push it back if it changed. `seq` keeps heapq from comparing sets.
        seq = itertools.count()
        heap = [(-pair_counts[p], p, next(seq), pos) for p, pos in where.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        progress = tqdm(total=vocab_size - len(id_to_token), desc="BPE merges", delay=1.0, disable=not show_progress)
        while len(id_to_token) < vocab_size and heap:
            neg_count, pair, _, pos = heapq.heappop(heap)
            count = pair_counts[pair]
            if -neg_count != count:  # stale entry: requeue with the current count
                heapq.heappush(heap, (-count, pair, next(seq), pos))
                continue
            if count < 1 or count < min_frequency:
                break  # the best pair left is too rare, so every other one is too

            # The new token. Two different pairs can spell the same string ("Ġt"+"he", "Ġth"+"e"): then
            # the merge is recorded but the token keeps its id, as tokenizers does.
            a, b = pair
            token = id_to_token[a] + id_to_token[b]
            if token not in token_to_id:
                token_to_id[token] = len(id_to_token)
                id_to_token.append(token)
                progress.update()
            new_id = token_to_id[token]
            merges.append(pair)

            # Apply the merge only in the words that contain the pair, and update the counts incrementally.
            created: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
            for w in pos:
                for changed, delta in _merge_word(words[w], a, b, new_id):
                    pair_counts[changed] += delta * counts[w]
                    if delta > 0:
                        created[changed].add(w)
            for p, ws in created.items():
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p, next(seq), ws))
        progress.close()

        n_special = len(special_tokens)
        vocab = {i: from_byte_level(t) for i, t in enumerate(id_to_token) if i >= n_special}
        return cls(vocab, merges, {t: i for i, t in enumerate(special_tokens)})  # type: ignore[arg-type]

    # --- encoding and decoding --------------------------------------------------------------------------

    def _encode_word(self, word: str) -> list[int]:
        """One pre-tokenized word -> ids. Words repeat a lot in text, so results are cached."""
        if (ids := self._cache.get(word)) is not None:
            return ids
        ids = self._apply_merges([self._byte_ids[x] for x in _utf8(word)])
        if len(self._cache) > 100_000:  # keep memory bounded on huge or unusual inputs
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _apply_merges(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the adjacent pair learned earliest (lowest rank), the leftmost one on a tie.

        That rule is all there is (and exactly what tokenizers does). Rescanning the word after every merge
        would cost O(n^2), which hurts on long words like a run of 10,000 dashes; so we keep the candidate
        merges in a heap ordered by (rank, position) and the symbols in a doubly linked list.
        """
        n = len(ids)
        nxt = list(range(1, n + 1))  # nxt[i] == n: no symbol after i
        prv = list(range(-1, n - 1))  # prv[i] == -1: no symbol before i
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            if (m := self._merge_table.get((ids[i], ids[i + 1]))) is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, new_id = heapq.heappop(heap)
            j = nxt[i]
            # Skip entries that went stale: i was merged into its left neighbour, or its right one changed.
            if not alive[i] or j == n or self._merge_table.get((ids[i], ids[j])) != (rank, new_id):
                continue
            ids[i], alive[j] = new_id, False  # symbol i absorbs symbol j
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            # The merged symbol forms new pairs with its neighbours; queue those that are merges.
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b < n and (m := self._merge_table.get((ids[a], ids[b]))) is not None:
                    heapq.heappush(heap, (m[0], a, m[1]))
        return [t for t, keep in zip(ids, alive, strict=True) if keep]

    def encode(self, text: str, *, allowed_special: bool = True) -> list[int]:
        ids: list[int] = []
        for piece, is_special in split_on_special(text, self.special_tokens if allowed_special else ()):
            if is_special:
                ids.append(self.special_tokens[piece])
            else:
                for word in _WORD_RE.findall(piece):
                    ids.extend(self._encode_word(word))
        return ids

    @property
    def supports_bytes(self) -> bool:
        return True

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        self._check_ids(ids)
        parts = []
        for i in ids:
            if i in self._special_by_id:
                if not skip_special:
                    parts.append(self._special_by_id[i].encode("utf-8"))
            else:
                parts.append(self.vocab[i])
        return b"".join(parts)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    # --- vocabulary -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def id_to_token(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self._special_by_id.get(token_id) or to_byte_level(self.vocab[token_id])

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        b = from_byte_level(token)
        return None if b is None else self._bytes_to_id.get(b)

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        for t in (new := check_new_special_tokens(tokens)):
            if t not in self.special_tokens:
                if from_byte_level(t) in self._bytes_to_id:
                    raise TokenizerError(f"cannot add special token {t!r}: it is already an ordinary token")
                self.special_tokens[t] = self.vocab_size
                self._special_by_id[self.special_tokens[t]] = t
        return [self.special_tokens[t] for t in new]

    # --- files ------------------------------------------------------------------------------------------

    def to_hf(self) -> tokenizers.Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {self.id_to_token(i): i for i in range(self.vocab_size)}
        merges = [(self.id_to_token(a), self.id_to_token(b)) for a, b in self.merges]
        tok = HFTokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return add_special_tokens_to_hf(tok, self.special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write vocab.json + merges.txt (GPT-2's readable format), our meta file, and the HF files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "vocab.json", {self.id_to_token(i): i for i in range(self.vocab_size)})
        lines = [f"{self.id_to_token(a)} {self.id_to_token(b)}" for a, b in self.merges]
        (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(x + "\n" for x in lines), encoding="utf-8")
        self._write_meta(directory, "bpe")
        self.save_hf(directory)

    def save_hf(self, directory: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        write_hf_files(self, directory)

    @classmethod
    def load(cls, directory: str | Path, *, default_special_tokens: Sequence[str] = ("<|endoftext|>",)) -> BPETokenizer:
        """Load vocab.json + merges.txt, written by save() or in the original GPT-2 layout.

        Without our meta file, entries named in `default_special_tokens` are special tokens, as is any entry
        that is not byte-level text.
        """
        directory = Path(directory)
        meta = read_json(directory / META_FILE) if (directory / META_FILE).exists() else None
        token_ids: dict[str, int] = read_json(directory / "vocab.json")
        if meta is not None:
            special = dict(meta["special_tokens"])
        else:
            special = {t: i for t, i in token_ids.items() if t in default_special_tokens or from_byte_level(t) is None}
        vocab = {i: from_byte_level(t) for t, i in token_ids.items() if t not in special}
        if bad := [t for t, i in token_ids.items() if t not in special and vocab[i] is None]:
            raise TokenizerError(f"{directory / 'vocab.json'} has entries that are not byte-level tokens: {bad[:5]}")
        try:
            text = (directory / "merges.txt").read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise TokenizerError(f"{directory} has vocab.json but no merges.txt; both are needed for BPE") from e
        merges = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] not in token_ids or parts[1] not in token_ids:
                raise TokenizerError(f"{directory / 'merges.txt'} line {n} is not two vocab.json tokens: {line!r}")
            merges.append((token_ids[parts[0]], token_ids[parts[1]]))
        roles = None if meta is None else {r: meta.get(f"{r}_token") for r in ("bos", "eos", "pad")}
        return cls(vocab, merges, special, roles=roles)  # type: ignore[arg-type]
