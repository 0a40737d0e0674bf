import codecs
import csv
import hashlib
import json

import pytest

from distilgen.config import BuiltinTaskConfig, ConfigError, DataConfig, SplitLimits
from distilgen.data import DataError, Example, load_split, load_splits, split_stats, write_jsonl

RECORDS = [
    {"id": 7, "source": "the cat sat", "target": "a cat"},
    {"id": 8, "source": 'quotes " and, commas', "target": ["first reference", "second reference"]},
]


def load(path, labeled: bool = True, **fields) -> list[Example]:
    return load_split(str(path), DataConfig(train=str(path), **fields), labeled)


def write_lines(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_jsonl_loads_sources_targets_and_list_references(tmp_path):
    examples = load(write_lines(tmp_path / "d.jsonl", *map(json.dumps, RECORDS)), id_field="id")
    assert examples[0] == Example("7", "the cat sat", "a cat", ("a cat",))
    assert examples[1].target == "first reference"
    assert examples[1].references == ("first reference", "second reference")


def test_json_accepts_a_list_or_a_data_wrapper(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": RECORDS}))
    assert load(tmp_path / "list.json") == load(tmp_path / "wrapped.json")
    assert len(load(tmp_path / "list.json")) == 2


def test_csv_with_a_header_row_loads_quoted_text(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["source", "target"])
        writer.writeheader()
        writer.writerow({"source": 'quotes " and, commas', "target": "a summary"})
    [example] = load(path)
    assert (example.source, example.target, example.references) == ('quotes " and, commas', "a summary", ("a summary",))


def test_parquet_list_column_becomes_references(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "summaries": [["a", "b"], ["c"]]}), path)
    examples = load(path, source_field="text", target_field="summaries")
    assert [e.references for e in examples] == [("a", "b"), ("c",)]
    assert [e.target for e in examples] == ["a", "c"]


def test_dataset_dict_saved_to_disk_is_read_by_split(tmp_path):
    import datasets

    splits = {name: datasets.Dataset.from_list(RECORDS[:1]) for name in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "ds")
    spec = f"{tmp_path / 'ds'}@validation"
    examples = load_split(spec, DataConfig(test=spec), labeled=True)
    assert [e.source for e in examples] == ["the cat sat"]
    with pytest.raises(DataError, match="train, validation"):
        load(tmp_path / "ds")


@pytest.mark.parametrize("spec", ["x.jsonl", "x.jsonl/", "plain", "plain@train"])
def test_directory_that_is_not_a_saved_dataset_is_a_data_error(tmp_path, spec):
    (tmp_path / "x.jsonl").mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "train.jsonl").write_text('{"source": "x", "target": "y"}\n')
    with pytest.raises(
        DataError, match="a directory, but not a dataset saved with `datasets.save_to_disk`; use .jsonl"
    ):
        load(f"{tmp_path}/{spec}")


def test_single_dataset_saved_to_disk_loads_without_a_split(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"source": "x", "target": "y"}]).save_to_disk(tmp_path / "ds")
    assert load(tmp_path / "ds")[0].references == ("y",)


def test_hub_spec_names_dataset_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"document": "text", "summary": "short"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = "hub:owner/news@validation"
    cfg = DataConfig(test=spec, hub_config="v2", source_field="document", target_field="summary")
    assert load_split(spec, cfg, labeled=True)[0].target == "short"
    assert calls == [("owner/news", "v2", "validation")]
    with pytest.raises(DataError, match="hub:owner/name@train"):
        load_split("hub:owner/news", cfg, labeled=True)


def test_hub_dataset_that_cannot_be_loaded_offline_is_one_line_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory owner/absent shadows the hub name
    spec = "hub:owner/absent@train"
    with pytest.raises(DataError) as err:
        load_split(spec, DataConfig(train=spec), labeled=True)
    assert str(err.value).startswith(f"{spec}: the dataset could not be loaded (Couldn't reach 'owner/absent'")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv"])
def test_text_files_may_start_with_a_utf8_byte_order_mark(tmp_path, name):
    content = {
        "train.jsonl": '{"source": "x", "target": "y"}\n',
        "train.json": '[{"source": "x", "target": "y"}]',
        "train.csv": "source,target\nx,y\n",
    }[name]
    (tmp_path / name).write_text(content, encoding="utf-8-sig")
    assert load(tmp_path / name) == load(write_lines(tmp_path / "plain.jsonl", '{"source": "x", "target": "y"}'))


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_csv_lines_may_end_in_any_newline_and_quoted_cells_may_span_lines(tmp_path, end):
    (tmp_path / "train.csv").write_bytes(f'source,target{end}"two{end}lines",y{end}x,'.encode())
    with pytest.raises(DataError, match="train.csv line 4: empty target"):
        load(tmp_path / "train.csv")
    (tmp_path / "train.csv").write_bytes(f'source,target{end}"two{end}lines",y{end}'.encode())
    assert load(tmp_path / "train.csv")[0].source == f"two{end}lines"


def test_write_jsonl_round_trips_a_builtin_task(tmp_path):
    examples = load_splits(DataConfig(task=BuiltinTaskConfig(train_size=5, unlabeled_size=0, dev_size=0, test_size=0)))
    write_jsonl(examples["train"], tmp_path / "out" / "train.jsonl")
    assert load(tmp_path / "out" / "train.jsonl", id_field="id") == examples["train"]


def test_write_jsonl_writes_one_reference_as_a_string_and_none_for_unlabeled(tmp_path):
    write_jsonl([Example("a", "x", "y", ("y",)), Example("b", "z", None, ())], tmp_path / "d.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert lines == [{"id": "a", "source": "x", "target": "y"}, {"id": "b", "source": "z"}]


# ---------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file and the place
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"source": "x", "target": ', "malformed JSON"),
        ('["source", "target"]', "expected an object"),
        ('{"text": "x", "target": "y"}', "missing source field 'source'"),
        ('{"source": "x"}', "missing target field 'target'"),
        ('{"source": "   ", "target": "y"}', "empty source"),
        ('{"source": 3, "target": "y"}', "must be a string"),
        ('{"source": "x", "target": 3}', "must be a string or a list of strings"),
        ('{"source": "x", "target": " "}', "empty target"),
        ('{"source": "x", "target": []}', "empty target"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "train.jsonl", '{"source": "ok", "target": "ok"}', bad_line)
    with pytest.raises(DataError, match=message) as err:
        load(path)
    assert str(err.value).startswith(f"{path} line 2:")


@pytest.mark.parametrize("field", ["source", "target"])
def test_null_field_is_reported_as_null_not_missing(tmp_path, field):
    path = write_lines(tmp_path / "train.jsonl", json.dumps({"source": "x", "target": "y", field: None}))
    with pytest.raises(DataError, match=f"train.jsonl line 1: null {field} field '{field}'"):
        load(path)


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", "", '{"source": "ok", "target": "ok"}', "", "{")
    with pytest.raises(DataError, match=r"train.jsonl line 4: malformed JSON"):
        load(path)


def test_csv_without_the_target_column_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.csv", "source,summary", "x,y")
    with pytest.raises(DataError, match=r"train.csv line 2: missing target field 'target' \(fields: source, summary\)"):
        load(path)


@pytest.mark.parametrize(("row", "count"), [("x,y,z", 3), ("x", 1)])
def test_csv_row_with_a_field_count_unlike_the_header_names_the_line(tmp_path, row, count):
    path = write_lines(tmp_path / "train.csv", "source,target", "a,b", row)
    with pytest.raises(DataError, match=f"train.csv line 3: {count} fields while the header has 2"):
        load(path)


def test_csv_empty_source_cell_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.csv", "source,target", "x,y", ",y")
    with pytest.raises(DataError, match=r"train.csv line 3: empty source"):
        load(path)


def test_parquet_null_target_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"source": ["a", "b"], "target": ["x", None]}), path)
    with pytest.raises(DataError, match=r"train.parquet row 2: null target field"):
        load(path)


def test_rows_of_a_json_list_count_from_one(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"source": "x"}, {"source": "y", "target": "z"}]))
    with pytest.raises(DataError, match=r"train.json row 1: missing target field"):
        load(tmp_path / "train.json")


def test_malformed_json_file_names_file_and_line(tmp_path):
    (tmp_path / "train.json").write_text('[\n{"source": "x",\n}\n]')
    with pytest.raises(DataError, match=r"train.json line 3: malformed JSON"):
        load(tmp_path / "train.json")


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("header_only.csv", "source,target\n")])
def test_a_file_without_records_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name}: no records"):
        load(tmp_path / name)


def test_unknown_extension_lists_the_supported_formats(tmp_path):
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(DataError, match=r"train.txt: unsupported file type '.txt'; use .jsonl, .json, .csv"):
        load(tmp_path / "train.txt")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("train.jsonl", b'{"source": "a", "target": "b"}\n\n{"source": "\xff", "target": "y"}\n'),
        ("train.csv", b'source,target\n"a\n\xff",c\n'),  # the bad line, not the record's first
        ("train.json", codecs.BOM_UTF8 + b'[{"source": "a", "target": "b"},\n\n{"source": "\xff", "target": "y"}]'),
    ],
)
def test_bytes_that_are_not_utf8_are_reported_at_their_line(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"{name} line 3: not UTF-8 text .*; re-save the file as UTF-8"):
        load(tmp_path / name)


# ---------------------------------------------------------------------------------------------
# Normalisation: ids, templates, unlabeled data
# ---------------------------------------------------------------------------------------------


def test_unlabeled_data_ignores_missing_and_empty_targets(tmp_path):
    path = write_lines(tmp_path / "u.jsonl", '{"source": "a"}', '{"source": "b", "target": ""}', '{"source": "c"}')
    examples = load(path, labeled=False)
    assert [(e.source, e.target, e.references) for e in examples] == [("a", None, ()), ("b", None, ()), ("c", None, ())]


def test_duplicate_sources_get_distinct_stable_ids(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", *(json.dumps({"source": s, "target": "t"}) for s in "xyxx"))
    digest = hashlib.sha256(b"x").hexdigest()[:16]
    ids = [e.id for e in load(path)]
    assert ids[0::2] == [digest, f"{digest}-1"] and ids[3] == f"{digest}-2"
    assert len(set(ids)) == 4
    assert [e.id for e in load(path)] == ids


def test_id_field_is_used_and_must_be_unique(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"key": 1, "source": "x", "target": "t"}')
    assert load(path, id_field="key")[0].id == "1"
    duplicated = write_lines(tmp_path / "dup.jsonl", *['{"key": 1, "source": "x", "target": "t"}'] * 2)
    with pytest.raises(DataError, match=r"dup.jsonl line 2: duplicate id '1' \(first at .*dup.jsonl line 1\)"):
        load(duplicated, id_field="key")
    with pytest.raises(DataError, match=r"d.jsonl line 1: missing id field 'name'"):
        load(path, id_field="name")


def test_dedupe_keeps_the_first_record_of_each_id_or_source(tmp_path, caplog):
    rows = [("a", "x", "1"), ("b", "y", "2"), ("a", "z", "3"), ("c", "x", "4")]
    path = write_lines(tmp_path / "d.jsonl", *(json.dumps({"key": k, "source": s, "target": t}) for k, s, t in rows))
    by_id = load(path, id_field="key", dedupe="id")
    assert [(e.id, e.target) for e in by_id] == [("a", "1"), ("b", "2"), ("c", "4")]
    assert "dropped 1 repeated records, kept 3" in caplog.text
    by_source = load(path, dedupe="source")
    assert [e.target for e in by_source] == ["1", "2", "3"]  # the second "x" goes; ids stay the plain hashes
    assert [e.id for e in by_source] == [hashlib.sha256(s.encode()).hexdigest()[:16] for s in "xyz"]
    with pytest.raises(ConfigError, match="dedupe: id needs data.id_field"):
        DataConfig(train=str(path), dedupe="id")


def test_limits_take_the_first_examples_of_each_split(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", *(json.dumps({"source": f"s{i}", "target": "t"}) for i in range(5)))
    cfg = DataConfig(train=str(path), unlabeled=str(path), test=str(path), limits=SplitLimits(unlabeled=2, test=3))
    splits = load_splits(cfg)
    assert {name: [e.source for e in split] for name, split in splits.items()} == {
        "train": [f"s{i}" for i in range(5)], "unlabeled": ["s0", "s1"], "test": ["s0", "s1", "s2"]
    }  # fmt: skip
    task = DataConfig(task=BuiltinTaskConfig(train_size=6, unlabeled_size=0, dev_size=0, test_size=0))
    task.limits.train = 4
    assert [e.id for e in load_splits(task)["train"]] == [
        e.id for e in load_splits(DataConfig(task=task.task))["train"]
    ][:4]
    with pytest.raises(ConfigError, match="unlabeled: must be > 0"):
        SplitLimits(unlabeled=0)


def test_template_is_applied_and_braces_in_data_survive(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", json.dumps({"source": "  f(x) = {x}  ", "target": " {y} "}))
    example = load(path, template="summarize: {source}")[0]
    assert (example.source, example.target) == ("summarize: f(x) = {x}", "{y}")
    assert example.id == hashlib.sha256(b"f(x) = {x}").hexdigest()[:16]


def test_load_splits_takes_every_split_from_the_task_and_skips_empty_ones():
    task = BuiltinTaskConfig(train_size=3, unlabeled_size=2, dev_size=0, test_size=1)
    splits = load_splits(DataConfig(task=task, template="report: {source}"))
    assert {name: len(examples) for name, examples in splits.items()} == {"train": 3, "unlabeled": 2, "test": 1}
    assert splits["train"][0].id == "match_reports-train-000000"
    assert splits["train"][0].source.startswith("report: ")
    assert len(splits["train"][0].references) >= 3
    assert all(e.target is None and e.references == () for e in splits["unlabeled"])


def test_load_splits_reads_only_the_configured_files(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"source": "x", "target": "t"}')
    splits = load_splits(DataConfig(train=str(path), unlabeled=str(path)))
    assert list(splits) == ["train", "unlabeled"]
    assert splits["unlabeled"][0].target is None


def test_split_stats_counts_words_and_references():
    examples = [Example("a", "one two three", "x y", ("x y", "z")), Example("b", "one", None, ())]
    assert split_stats(examples) == {
        "examples": 2,
        "labeled": 1,
        "source_words_mean": 2.0,
        "source_words_max": 3,
        "target_words_mean": 2.0,
        "target_words_max": 2,
        "references_mean": 2.0,
    }
