"""The named datasets byollm knows: where each comes from, its file name on disk and its checksum.

A dataset is found, in this order: an explicit path you give, the local mirror directory
($BYOLLM_DATA_MIRROR), the cache (~/.cache/byollm/data), and only then the network (see sources.py).
Each entry pins the sha256 of its file where the source publishes a fixed file. A *streaming* entry
(FineWeb-Edu) is read document by document while training instead (streaming.py); a local copy in the
mirror still wins.

A *subset* is a named part of a dataset cut from its real source by a rule anyone can rerun (`Cut`: the
first N records, or a seeded sample of N), with the sha256 of the file that rule writes. Where an entry has
a `default_subset`, its plain name means that subset: the guide's numbers were made with it, so
`alpaca` is the first 4,500 records of its source file wherever it comes from (the mirror, the cache, or
a download cut to the same records); `alpaca-full` is the whole release.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

from byollm.errors import DataError

# How a dataset's file is read (readers.py):
#   text        one UTF-8 text file
#   text_splits a directory with train.txt, validation.txt and test.txt (official splits)
#   json        a JSON list of records            jsonl  one JSON record a line
#   csv         a CSV file with a header row       squad  the official SQuAD JSON (articles > paragraphs > qas)
# and, for a directory given by path: text_dir (its text files, concatenated) or records_dir (its JSON/JSONL files).
Format = Literal["text", "text_splits", "json", "jsonl", "csv", "squad", "text_dir", "records_dir"]


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face Hub dataset, read with `datasets.load_dataset(path, config, data_dir=..., split=...)`."""

    path: str
    config: str | None = None
    data_dir: str | None = None
    splits: tuple[str, ...] = ("train",)
    columns: tuple[str, ...] = ()  # the columns to keep, in order (records); empty: the "text" column


@dataclass(frozen=True)
class Cut:
    """How a subset is cut from its source file's records (articles, for SQuAD), so anyone can remake it.

    first: records [0, n). sample: the records at sorted(random.Random(seed).sample(range(total), n)), kept in
    the source's order. `source` is the URL of the file it is cut from when that is not the dataset's own.
    """

    kind: Literal["first", "sample"]
    n: int
    seed: int | None = None
    source: str | None = None

    def describe(self, of: str) -> str:
        if self.kind == "first":
            return f"the first {self.n:,} {of}"
        return f"a sample of {self.n:,} {of}: random.Random({self.seed}).sample(range(total), {self.n}), in file order"


@dataclass(frozen=True)
class Subset:
    """A named part of a dataset with its own file name and checksum; `cut` says how to make it from the source."""

    filename: str
    sha256: str
    n_records: int  # records (or articles, see DatasetSpec.unit) in the subset
    description: str
    name: str = ""  # e.g. "alpaca-4500": a dataset name of its own
    cut: Cut | None = None  # None: a local file only (it cannot be remade from the source)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    format: Format
    filename: str  # the file (or directory, for text_splits) in the mirror and in the cache
    sha256: str | None  # of the full file; None where the source publishes no fixed file
    urls: tuple[str, ...] = ()  # direct downloads, tried in order (".gz" is decompressed)
    hf: HFSource | None = None  # tried after the urls, needs the optional `datasets` package
    fields: tuple[str, ...] = ()  # fields every record must have (string values)
    n_records: int | None = None  # size of the full dataset, for the subset notice
    unit: str = "records"
    subsets: tuple[Subset, ...] = ()
    license: str = ""
    homepage: str = ""
    aliases: tuple[str, ...] = field(default=())
    # Too big to download and prepare: pretraining streams it (byollm.data.streaming), from a local file in
    # the mirror or cache when there is one (`filename`, or NAME.parquet / NAME.txt / a folder NAME/), else
    # from the Hugging Face dataset `hf`. `fields[0]` is the documents' text field.
    streaming: bool = False
    # The subset (by name) that the dataset's plain name means; None: the plain name means the full dataset.
    default_subset: str | None = None

    @property
    def is_text(self) -> bool:
        return self.format in ("text", "text_splits", "text_dir")

    def where(self) -> str:
        """The download sources in words, for error messages."""
        places = list(self.urls)
        if self.hf is not None:
            cfg = f", config {self.hf.config}" if self.hf.config else ""
            sub = f", data_dir {self.hf.data_dir}" if self.hf.data_dir else ""
            places.append(f"Hugging Face dataset {self.hf.path}{cfg}{sub}")
        return " or ".join(places) if places else "(no download source)"


_SHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_ALPACA = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
_HH = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/harmless-base/{split}.jsonl.gz"
_CROWS = "https://raw.githubusercontent.com/nyu-mll/crows-pairs/master/data/crows_pairs_anonymized.csv"
_SQUAD = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"
# The guide's 4,500 Alpaca records are the first 4,500 of a 5,000-record file, data/alpaca_5000.json, as the data
# mirror's README names its source. They are NOT the first 4,500 of the published release alpaca_data.json (its
# first record is "Give three tips for staying healthy.", the subset's is "Are the two sentences below
# grammatically correct? ..."), so the subset is cut from that file, never from the release; this URL follows the
# README's path and was not reachable where the registry was written (no network): see docs/LOG.md.
_ALPACA_5000 = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/data/alpaca_5000.json"
_HH_FIELDS = ("chosen", "rejected")

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="tinyshakespeare",
            description="Tiny Shakespeare: 1,115,394 characters of Shakespeare's plays (char-rnn, nanoGPT)",
            format="text",
            filename="tinyshakespeare.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            urls=(_SHAKESPEARE,),
            license="public domain",
            homepage="https://github.com/karpathy/char-rnn",
            aliases=("shakespeare", "tiny-shakespeare", "shakespeare-char"),
        ),
        DatasetSpec(
            name="wikitext-2",
            description="WikiText-2 (raw): 2M words of Wikipedia Good/Featured articles, official train/valid/test",
            format="text_splits",
            filename="wikitext-2-raw-v1",
            sha256=None,
            hf=HFSource("Salesforce/wikitext", "wikitext-2-raw-v1", splits=("train", "validation", "test")),
            license="CC BY-SA 3.0",
            homepage="https://huggingface.co/datasets/Salesforce/wikitext",
            aliases=("wikitext2",),
        ),
        DatasetSpec(
            name="wikitext-103",
            description="WikiText-103 (raw): 103M words of Wikipedia, official train/valid/test",
            format="text_splits",
            filename="wikitext-103-raw-v1",
            sha256=None,
            hf=HFSource("Salesforce/wikitext", "wikitext-103-raw-v1", splits=("train", "validation", "test")),
            license="CC BY-SA 3.0",
            homepage="https://huggingface.co/datasets/Salesforce/wikitext",
            aliases=("wikitext103",),
        ),
        DatasetSpec(
            name="alpaca",
            description="Stanford Alpaca: 52,002 instruction-following records (instruction, input, output)",
            format="json",
            filename="alpaca_data.json",
            sha256=None,  # the repository's file has no published checksum: the first download's is kept
            urls=(_ALPACA,),
            hf=HFSource("tatsu-lab/alpaca", columns=("instruction", "input", "output")),
            fields=("instruction", "input", "output"),
            n_records=52_002,
            subsets=(
                Subset(
                    "alpaca_4500.json",
                    "e5f1a6cd206ff1915da189ad643418df324d026e9e6e37d2ade78dd39a137213",
                    4_500,
                    "the first 4,500 records of data/alpaca_5000.json (not of the 52,002-record release)",
                    name="alpaca-4500",
                    cut=Cut("first", 4_500, source=_ALPACA_5000),
                ),
            ),
            default_subset="alpaca-4500",
            license="CC BY-NC 4.0",
            homepage="https://github.com/tatsu-lab/stanford_alpaca",
        ),
        DatasetSpec(
            name="hh-rlhf",
            description="Anthropic HH-RLHF, harmless-base test split: 2,312 preference pairs (chosen, rejected)",
            format="jsonl",
            filename="hh_rlhf_harmless_base_test.jsonl",
            sha256=None,
            urls=(_HH.format(split="test"),),
            hf=HFSource("Anthropic/hh-rlhf", data_dir="harmless-base", splits=("test",), columns=_HH_FIELDS),
            fields=_HH_FIELDS,
            n_records=2_312,
            subsets=(
                Subset(
                    "hh_rlhf_harmless_2000.jsonl",
                    "cbf0fb8f65b9f41cac849556331e3783eb24bb93c0590bf89ef31f0415c71730",
                    2_000,
                    "the first 2,000 of the 2,312 pairs of harmless-base/test.jsonl.gz",
                    name="hh-rlhf-2000",
                    cut=Cut("first", 2_000),
                ),
            ),
            default_subset="hh-rlhf-2000",
            license="MIT",
            homepage="https://github.com/anthropics/hh-rlhf",
            aliases=("hh", "anthropic-hh"),
        ),
        DatasetSpec(
            name="hh-rlhf-train",
            description="Anthropic HH-RLHF, harmless-base train split: 42,537 preference pairs (chosen, rejected)",
            format="jsonl",
            filename="hh_rlhf_harmless_base_train.jsonl",
            sha256=None,
            urls=(_HH.format(split="train"),),
            hf=HFSource("Anthropic/hh-rlhf", data_dir="harmless-base", splits=("train",), columns=_HH_FIELDS),
            fields=_HH_FIELDS,
            n_records=42_537,
            license="MIT",
            homepage="https://github.com/anthropics/hh-rlhf",
        ),
        DatasetSpec(
            name="crows-pairs",
            description="CrowS-Pairs: 1,508 sentence pairs measuring social bias in masked/causal LMs",
            format="csv",
            filename="crows_pairs_anonymized.csv",
            sha256=None,
            urls=(_CROWS,),
            fields=("sent_more", "sent_less", "stereo_antistereo", "bias_type"),
            n_records=1_508,
            subsets=(
                Subset(
                    "crows_pairs_sample_200.csv",
                    "58328bd1ff70693cff984fe9ae09a1865517bb07f0571b415d195172c3268597",
                    200,
                    "200 of the 1,508 pairs: random.Random(0).sample(range(1508), 200), in file order",
                    name="crows-pairs-200",
                    cut=Cut("sample", 200, seed=0),
                ),
            ),
            default_subset="crows-pairs-200",
            license="CC BY-SA 4.0",
            homepage="https://github.com/nyu-mll/crows-pairs",
            aliases=("crows", "crowspairs"),
        ),
        DatasetSpec(
            name="squad",
            description="SQuAD v1.1 dev set: 48 Wikipedia articles, 10,570 questions with answer spans",
            format="squad",
            filename="dev-v1.1.json",
            sha256=None,
            urls=(_SQUAD,),
            n_records=48,
            unit="articles",
            subsets=(
                Subset(
                    "squad_v1.1_dev_super_bowl_50.json",
                    "eae461fb0c355ee27fe79fb0d9c178bef644fa6c109b512642190994cc1b99c6",
                    1,
                    "the first article of dev-v1.1.json, 'Super_Bowl_50' (54 paragraphs, 810 questions)",
                    name="squad-super-bowl-50",
                    cut=Cut("first", 1),
                ),
            ),
            default_subset="squad-super-bowl-50",
            license="CC BY-SA 4.0",
            homepage="https://rajpurkar.github.io/SQuAD-explorer/",
            aliases=("squad-v1.1", "squad-dev"),
        ),
        DatasetSpec(
            name="fineweb-edu",
            description="FineWeb-Edu sample-10BT: ~9.7M educational web pages, ~10B GPT-2 tokens (streamed)",
            format="jsonl",
            filename="fineweb-edu.jsonl",
            sha256=None,  # streamed, never downloaded whole; a local copy is used as it is
            hf=HFSource("HuggingFaceFW/fineweb-edu", "sample-10BT", columns=("text",)),
            fields=("text",),
            license="ODC-By 1.0",
            homepage="https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu",
            aliases=("fineweb-edu-10b", "fineweb-edu-10bt", "fineweb-edu-sample-10bt", "fineweb"),
            streaming=True,
        ),
    ]
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def list_datasets() -> list[str]:
    return sorted(REGISTRY)


def dataset_names() -> list[str]:
    """Every name `resolve` accepts for a registry dataset, subsets and NAME-full included (no aliases)."""
    names = []
    for spec in REGISTRY.values():
        names.append(spec.name)
        names += [s.name for s in spec.subsets if s.name]
        if spec.default_subset:
            names.append(spec.name + FULL_SUFFIX)
    return sorted(names)


FULL_SUFFIX = "-full"


def find_dataset(name: str) -> tuple[DatasetSpec, Subset | None] | None:
    """(entry, subset) for a dataset name, or None: a plain name gives the entry's default subset (None: the full
    dataset), a subset's own name (e.g. "alpaca-4500") that subset, NAME-full the full dataset."""
    key = _normalise(name)
    for spec in REGISTRY.values():
        names = (spec.name, *spec.aliases)
        if key in names:
            return spec, subset_named(spec, spec.default_subset)
        if spec.default_subset and key.endswith(FULL_SUFFIX) and key[: -len(FULL_SUFFIX)] in names:
            return spec, None
        for sub in spec.subsets:
            if sub.name and key == sub.name:
                return spec, sub
    return None


def subset_named(spec: DatasetSpec, name: str | None) -> Subset | None:
    if name is None:
        return None
    for sub in spec.subsets:
        if sub.name == name:
            return sub
    raise DataError(f"dataset {spec.name!r} has no subset {name!r}; its subsets: {[s.name for s in spec.subsets]}")


def find_spec(name: str) -> DatasetSpec | None:
    """The registry entry called `name` (case, '_' vs '-', aliases, subset names and NAME-full ignored), or None."""
    found = find_dataset(name)
    return None if found is None else found[0]


def get_dataset(name: str) -> tuple[DatasetSpec, Subset | None]:
    """find_dataset, with get_spec's error for an unknown name."""
    found = find_dataset(name)
    if found is not None:
        return found
    get_spec(name)  # raises with 'did you mean'
    raise AssertionError("unreachable")


def get_spec(name: str) -> DatasetSpec:
    """The registry entry called `name`; a DataError with the closest names and the full list otherwise."""
    spec = find_spec(name)
    if spec is not None:
        return spec
    known = {n: s.name for s in REGISTRY.values() for n in (s.name, *s.aliases)}
    known |= {n: n for n in dataset_names()}
    close = difflib.get_close_matches(_normalise(name), list(known), n=3, cutoff=0.5)
    names = dict.fromkeys(known[c] for c in close)  # several aliases of one dataset: name it once
    hint = f"did you mean {' or '.join(repr(n) for n in names)}? " if names else ""
    raise DataError(
        f"unknown dataset {name!r}; {hint}known datasets: {', '.join(list_datasets())} "
        "(or give the path of a local text/JSON/JSONL/CSV file or directory)"
    )
