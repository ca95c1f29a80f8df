"""The guide's data subsets are defined from their real sources, so a download gives the mirror's very bytes.

Each test builds a stand-in for the full source file around the mirror's own records (no network) and checks
that the registry's rule cuts out exactly the mirror file; the references are the mirror files and their
sha256 in the mirror's README, and, for CrowS-Pairs, the source's own row numbers in the sample's first column.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import data_mirror

from byollm.data import REGISTRY, DataUnavailable, load_records, resolve, sources
from byollm.data.registry import find_dataset, get_dataset
from byollm.data.subsets import cut_subset
from byollm.errors import DataError

MIRROR = data_mirror()
# sha256 of each file, from the data mirror's README
README_SHA = {
    "alpaca_4500.json": "e5f1a6cd206ff1915da189ad643418df324d026e9e6e37d2ade78dd39a137213",
    "hh_rlhf_harmless_2000.jsonl": "cbf0fb8f65b9f41cac849556331e3783eb24bb93c0590bf89ef31f0415c71730",
    "crows_pairs_sample_200.csv": "58328bd1ff70693cff984fe9ae09a1865517bb07f0571b415d195172c3268597",
    "squad_v1.1_dev_super_bowl_50.json": "eae461fb0c355ee27fe79fb0d9c178bef644fa6c109b512642190994cc1b99c6",
}


def needs(filename: str):
    return pytest.mark.skipif(not (MIRROR / filename).is_file(), reason=f"{filename} not in the data mirror")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty mirror and cache; the network raises like a machine without one."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    monkeypatch.setenv(sources.MIRROR_ENV, str(mirror))
    monkeypatch.setenv(sources.CACHE_ENV, str(cache))
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setitem(sys.modules, "datasets", None)  # no Hugging Face download either
    return {"mirror": mirror, "cache": cache / "data", "tmp": tmp_path}


def test_names_and_registry_sha_match_the_mirror_readme():
    for filename, expected in README_SHA.items():
        spec = next(s for s in REGISTRY.values() for sub in s.subsets if sub.filename == filename)
        sub = next(sub for sub in spec.subsets if sub.filename == filename)
        assert sub.sha256 == expected and sub.cut is not None
        assert find_dataset(spec.name) == (spec, sub) == get_dataset(sub.name)  # the plain name is the subset
        assert find_dataset(spec.name + "-full") == (spec, None)
        if (MIRROR / filename).is_file():
            assert sha(MIRROR / filename) == expected


def _cut(name: str, full: Path, tmp: Path) -> Path:
    spec, sub = get_dataset(name)
    out = tmp / "cut"
    cut_subset(spec, sub, full, out)
    return out


@needs("hh_rlhf_harmless_2000.jsonl")
def test_hh_rlhf_is_the_first_2000_lines(tmp_path):
    text = (MIRROR / "hh_rlhf_harmless_2000.jsonl").read_text("utf-8")
    mine = [json.loads(line) for line in text.split("\n") if line]
    extra = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": "\n\nHuman: q"} for i in range(312)]
    full = tmp_path / "test.jsonl"  # ASCII-escaped JSON, as another writer might have it: same records, same cut
    full.write_text("".join(json.dumps(r) + "\n" for r in mine + extra), encoding="utf-8")
    assert sha(_cut("hh-rlhf", full, tmp_path)) == README_SHA["hh_rlhf_harmless_2000.jsonl"]


@needs("alpaca_4500.json")
def test_alpaca_is_the_first_4500_of_its_5000(tmp_path):
    mine = json.loads((MIRROR / "alpaca_4500.json").read_text("utf-8"))
    extra = [{"instruction": f"i{i}", "input": "", "output": "o"} for i in range(500)]
    full = tmp_path / "alpaca_5000.json"
    full.write_text(json.dumps(mine + extra, indent=4), encoding="utf-8")
    assert sha(_cut("alpaca-4500", full, tmp_path)) == README_SHA["alpaca_4500.json"]
    assert mine[0]["instruction"] != "Give three tips for staying healthy."  # not the release's first record


@needs("crows_pairs_sample_200.csv")
def test_crows_pairs_sample_is_seeded(tmp_path):
    """The sample's first column is the row number in crows_pairs_anonymized.csv: put each row back there."""
    rows = list(csv.reader(io.StringIO((MIRROR / "crows_pairs_sample_200.csv").read_text("utf-8"), newline="")))
    header, sample = rows[0], rows[1:]
    full_rows = [[str(i), f"more {i}", f"less {i}", "stereo", "gender", "[]", "a1", "[]"] for i in range(1508)]
    for row in sample:
        full_rows[int(row[0])] = row
    full = tmp_path / "crows_pairs_anonymized.csv"
    with open(full, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *full_rows])  # "\n" line ends, as pandas writes
    assert sha(_cut("crows-pairs", full, tmp_path)) == README_SHA["crows_pairs_sample_200.csv"]


@needs("squad_v1.1_dev_super_bowl_50.json")
def test_squad_is_the_first_article(tmp_path):
    mine = json.loads((MIRROR / "squad_v1.1_dev_super_bowl_50.json").read_text("utf-8"))
    other = {"title": "Warsaw", "paragraphs": [{"context": "Warsaw.", "qas": []}]}
    full = tmp_path / "dev-v1.1.json"
    full.write_text(json.dumps({"data": [*mine["data"], other], "version": "1.1"}), encoding="utf-8")
    assert sha(_cut("squad", full, tmp_path)) == README_SHA["squad_v1.1_dev_super_bowl_50.json"]


@needs("hh_rlhf_harmless_2000.jsonl")
def test_download_is_cut_to_the_subset_and_says_so(tmp_path, monkeypatch, caplog):
    """The real download code (a file:// URL, gunzipped) on a stand-in source: the cache gets the mirror's bytes."""
    lines = (MIRROR / "hh_rlhf_harmless_2000.jsonl").read_bytes()
    gz = tmp_path / "test.jsonl.gz"
    gz.write_bytes(gzip.compress(lines + b'{"chosen": "x", "rejected": "y"}\n' * 312))
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path / "no-mirror"))
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    monkeypatch.setitem(REGISTRY, "hh-rlhf", dataclasses.replace(REGISTRY["hh-rlhf"], urls=(gz.as_uri(),)))
    with caplog.at_level(logging.WARNING, logger="byollm.data"):
        src = resolve("hh-rlhf")
    assert src.kind == "download" and src.subset is not None and src.subset.name == "hh-rlhf-2000"
    assert src.path == tmp_path / "cache" / "data" / "hh_rlhf_harmless_2000.jsonl"
    assert src.sha256 == README_SHA[src.path.name]
    (line,) = [r.getMessage() for r in caplog.records]  # one line: the subset and where it came from
    assert "hh-rlhf: subset hh-rlhf-2000 (2,000 of 2,312 records)" in line and "cut from the download of" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="byollm.data"):
        assert len(load_records("hh-rlhf")) == 2000  # now from the cache, no download
    assert "using cached copy" in caplog.text and "subset hh-rlhf-2000" in caplog.text


def test_offline_without_mirror_says_what_to_download_from_where(places, monkeypatch):
    with pytest.raises(DataUnavailable) as e:
        resolve("crows-pairs")
    msg = str(e.value)
    assert msg.startswith("crows-pairs (subset crows-pairs-200: ") and "is not available offline" in msg
    assert "download it from https://raw.githubusercontent.com/nyu-mll/crows-pairs/" in msg
    assert "or set BYOLLM_DATA_MIRROR to a folder holding crows_pairs_sample_200.csv" in msg and "\n" not in msg
    with pytest.raises(DataUnavailable, match="alpaca_5000.json .or set BYOLLM_DATA_MIRROR to a folder holding "
                                              "alpaca_4500.json"):
        resolve("alpaca")
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(DataUnavailable, match="^tinyshakespeare is not available offline .BYOLLM_OFFLINE is set."):
        resolve("tinyshakespeare")


def test_a_changed_source_is_refused(places):
    """A full copy in the mirror whose records differ: the cut's checksum is not the registry's, nothing is kept."""
    (places["mirror"] / "dev-v1.1.json").write_text(json.dumps({"data": [{"title": "x", "paragraphs": []}]}))
    with pytest.raises(DataError, match="not the release the subset was defined on"):
        resolve("squad")
    assert not (places["cache"] / "squad_v1.1_dev_super_bowl_50.json").exists()
