"""``--stats-corpus`` / ``--ppl-corpus hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` through ``datasets`` (harness/data/hub.py):
folders saved with ``save_to_disk`` and local data folders load without a data dir; a malformed spec, and a hub
dataset that is neither reachable nor cached (offline), fail at start-up in one line naming the fix. Nothing here
touches the network: every test that could runs offline with sockets refused."""
from __future__ import annotations

import socket

import pytest
import torch

from harness.data import DataError, load_texts
from harness.data.hub import check_hf_corpus, hf_spec, parse_hf_spec
from harness.provenance import corpus_provenance
from harness.stats import LayerStats

datasets = pytest.importorskip("datasets")

pytest_plugins = ["pytester"]

ROWS = ["The river rises in the northern hills and flows south to the sea.", "", "   ",
        "A second text, about the city council and its new budget.", "Third: a short line of general prose."]
NOT_CACHED = "hf:harness-test-no-such-owner/no-such-corpus"
OFFLINE_FIX = ("dataset not available offline (HF_HUB_OFFLINE=1 and not in the datasets cache); run once online, "
               "or pass a local folder saved with datasets.save_to_disk (hf:/path/to/dir), or --data-dir DIR for ")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as tox sets it (in the environment and in the libraries, which read it at import), an empty
    datasets cache, and every socket connection or name lookup refused and recorded."""
    from huggingface_hub import constants

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == [], f"the network was reached for: {attempts}"


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "corpus"
    datasets.Dataset.from_dict({"text": ROWS, "id": list(range(len(ROWS)))}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("spec,parsed", [
    ("hf:wikitext", ("wikitext", None, "train")),
    ("hf:wikitext:wikitext-103-raw-v1", ("wikitext", "wikitext-103-raw-v1", "train")),
    ("hf:owner/name:cfg:test", ("owner/name", "cfg", "test")),
    ("hf:/data/saved::validation", ("/data/saved", None, "validation")),
])
def test_parse_hf_spec(spec, parsed):
    assert parse_hf_spec(spec) == parsed


def test_column_is_the_optional_fourth_field():
    assert hf_spec("hf:owner/name::test:body") == ("owner/name", None, "test", "body")


@pytest.mark.parametrize("spec,match", [
    ("hf:", r"^hf:: no dataset NAME: expected hf:NAME\[:CONFIG\[:SPLIT\[:COLUMN\]\]\]"),
    ("hf::cfg", "no dataset NAME"),
    ("hf:a:b:c:d:e", r"4 fields after NAME, at most 3"),
    ("hf:a b", "white space"),
])
def test_malformed_spec(spec, match):
    with pytest.raises(DataError, match=match):
        parse_hf_spec(spec)
    with pytest.raises(DataError, match=match):
        load_texts(spec)


def test_saved_dataset_loads_without_a_data_dir(offline, saved):
    texts = load_texts(f"hf:{saved}")
    assert texts == [r for r in ROWS if r.strip()]                      # empty rows dropped, order kept
    assert load_texts(f"hf:{saved}", limit=2) == texts[:2]
    assert load_texts(f"hf:{saved}", max_chars=len(texts[0]) + 1) == texts[:2]   # read until the budget is met
    check_hf_corpus(f"hf:{saved}")                                      # the start-up check passes


def test_dataset_dict_split(offline, tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train row one"]}),
                          "test": datasets.Dataset.from_dict({"text": ["test row one", "test row two"]})}
                         ).save_to_disk(str(path))
    assert load_texts(f"hf:{path}") == ["train row one"]
    assert load_texts(f"hf:{path}::test") == ["test row one", "test row two"]
    with pytest.raises(DataError) as e:
        load_texts(f"hf:{path}::dev")
    assert str(e.value) == (f"hf:{path}::dev: no split 'dev' in {path} (splits: train, test); choose one: "
                            f"hf:{path}::SPLIT")


def test_text_column(offline, tmp_path):
    two = tmp_path / "two"
    datasets.Dataset.from_dict({"title": ["T"], "body": ["the body"], "n": [1]}).save_to_disk(str(two))
    with pytest.raises(DataError) as e:
        load_texts(f"hf:{two}")
    assert str(e.value) == (f"hf:{two}: no 'text' column and 2 string columns (columns: title, body, n); name the "
                            f"text column as a 4th field: hf:{two}::train:COLUMN")
    assert load_texts(f"hf:{two}::train:body") == ["the body"]
    with pytest.raises(DataError, match=r"no column 'nope' \(columns: title, body, n\)"):
        load_texts(f"hf:{two}:::nope")
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"article": ["only string column"], "n": [1]}).save_to_disk(str(one))
    assert load_texts(f"hf:{one}") == ["only string column"]


def test_local_data_folder_through_load_dataset(offline, tmp_path):
    """A folder of data files (no save_to_disk metadata) goes through datasets.load_dataset, offline."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "first line"}\n{"text": ""}\n{"text": "second line"}\n')
    assert load_texts(f"hf:{folder}") == ["first line", "second line"]
    check_hf_corpus(f"hf:{folder}")


def test_missing_local_folder(offline, tmp_path):
    with pytest.raises(DataError, match=r"is not a folder: pass a folder saved with datasets.save_to_disk"):
        load_texts(f"hf:{tmp_path}/absent")


def test_offline_hub_id_not_cached_is_one_line(offline):
    with pytest.raises(DataError) as e:
        load_texts(NOT_CACHED)
    assert str(e.value) == f"{NOT_CACHED}: {OFFLINE_FIX}WikiText-2 or ME-PPL"
    with pytest.raises(DataError) as e:
        check_hf_corpus(NOT_CACHED, label=f"--stats-corpus {NOT_CACHED}", hint="--data-dir DIR for WikiText-2")
    assert str(e.value) == f"--stats-corpus {NOT_CACHED}: {OFFLINE_FIX}WikiText-2"


def test_offline_from_the_environment_alone(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set after ``datasets`` was imported is still honoured (no request is made)."""
    from huggingface_hub import constants
    attempts: list = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(socket.socket, "connect", lambda *a: attempts.append(a) or (_ for _ in ()).throw(OSError()))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or (_ for _ in ()).throw(OSError()))
    with pytest.raises(DataError, match="dataset not available offline"):
        load_texts(NOT_CACHED)
    assert attempts == [] and datasets.config.HF_HUB_OFFLINE is False      # restored after the call


# --- start-up (the plugin) ---------------------------------------------------------------------------------
@pytest.fixture
def suite_dir(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    return pytester


def _one_usage_error(result, line):
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {line}"])
    assert len([x for x in result.stderr.lines if x.strip()]) == 1, result.stderr.lines
    result.stdout.no_fnmatch_line("*test_x*")                           # nothing ran


def test_offline_hub_corpus_fails_at_start_up(offline, suite_dir):
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--stats-corpus", "hf:nonexistent/thing")
    _one_usage_error(result, f"--stats-corpus hf:nonexistent/thing: {OFFLINE_FIX}WikiText-2")
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--ppl-corpus", "hf:nonexistent/thing:cfg:test")
    _one_usage_error(result, f"--ppl-corpus hf:nonexistent/thing:cfg:test: {OFFLINE_FIX}ME-PPL")


@pytest.mark.parametrize("args,line", [
    (["--stats-corpus", "hf:"], "--stats-corpus hf:: no dataset NAME: expected hf:NAME*"),
    (["--ppl-corpus", "hf:a:b:c:d:e"], "--ppl-corpus hf:a:b:c:d:e: 4 fields after NAME, at most 3*"),
])
def test_malformed_spec_fails_at_start_up(offline, suite_dir, args, line):
    _one_usage_error(suite_dir.runpytest("-p", "no:cacheprovider", *args), line)


def test_saved_corpus_passes_start_up(offline, suite_dir, saved):
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--stats-corpus", f"hf:{saved}",
                                 "--ppl-corpus", f"hf:{saved}")
    assert result.ret == pytest.ExitCode.OK
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--stats-corpus", f"hf:{saved}::train:nope")
    _one_usage_error(result, f"--stats-corpus hf:{saved}::train:nope: no column 'nope' (columns: text, id)")


# --- provenance and the key statistics ---------------------------------------------------------------------
def test_provenance_tells_two_saved_datasets_apart(tmp_path):
    path = tmp_path / "c"
    datasets.Dataset.from_dict({"text": ["one version"]}).save_to_disk(str(path))
    first = corpus_provenance(f"hf:{path}::train", None, tokens=10)
    assert first["hf"] == {"name": str(path), "config": None, "split": "train", "column": None}
    assert first["kind"] == "local" and first["tokens"] == 10 and len(first["sha256"]) == 64
    datasets.Dataset.from_dict({"text": ["another version"]}).save_to_disk(str(tmp_path / "d"))
    second = corpus_provenance(f"hf:{tmp_path / 'd'}::train", None)
    assert second["sha256"] != first["sha256"]
    hub = corpus_provenance("hf:wikitext:wikitext-103-raw-v1", None)
    assert hub["kind"] == "hub" and hub["hf"]["config"] == "wikitext-103-raw-v1" and hub["sha256"] is None


def test_key_statistics_from_a_saved_dataset(offline, tiny_llama, tmp_path):
    """The second moment from an hf: folder equals the one from the same texts read from the built-in corpus."""
    path = tmp_path / "passages"
    datasets.Dataset.from_dict({"text": load_texts("builtin")}).save_to_disk(str(path))
    spec = f"hf:{path}"
    stats = LayerStats(tiny_llama, texts=lambda: load_texts(spec), corpus_name=spec, n_tokens=600,
                       cache_dir=tmp_path / "cache", progress=False)
    reference = LayerStats(tiny_llama, texts=lambda: load_texts("builtin"), corpus_name="builtin", n_tokens=600,
                           cache_dir=None, progress=False)
    C = stats.second_moment(1)
    assert stats.provenance["tokens_used"] == 600 and torch.isfinite(C).all()
    torch.testing.assert_close(C, reference.second_moment(1))


def test_without_datasets_the_error_names_the_install(monkeypatch, saved):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)                  # import datasets -> ImportError
    with pytest.raises(DataError) as e:
        load_texts(f"hf:{saved}")
    assert str(e.value) == (f"hf:{saved}: needs the 'datasets' package: pip install datasets (or the downstream "
                            "extra: pip install 'knowedit-harness[downstream]')")
