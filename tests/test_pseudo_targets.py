"""Pseudo-targets: decoding specs, the crash-safe PT store, per-sample seeds, the epoch schedule, diversity."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import multiprocessing

import pytest

from distilgen.config import ConfigError
from distilgen.data import Example
from distilgen.pseudo_targets import (
    DecodingSpec,
    MissingPT,
    PTRecord,
    PTStore,
    PTStoreError,
    distinct_n,
    get_spec,
    input_key,
    pt_diversity,
    pt_schedule,
    sample_seed,
    self_bleu,
)

TEACHER = "teacher-fp"
SAMPLE2 = DecodingSpec("sample2", "sample", num_samples=2)


def fake_pts(missing, topk: bool = False) -> list[PTRecord]:
    """A PT for each missing (key, index): text and tokens derived from both, top-k of size 2 when asked."""
    records = []
    for key, index, source in missing:
        tokens = [len(source), index, 7]
        records.append(
            PTRecord(
                key,
                index,
                f"{source} #{index}",
                tokens,
                seed=sample_seed(0, key, index),
                topk_ids=[[t, t + 1] for t in tokens] if topk else None,
                topk_logprobs=[[-0.25, -1.5]] * len(tokens) if topk else None,  # exact in float32
            )
        )
    return records


def fill(store: PTStore, sources: list[str], spec: DecodingSpec = SAMPLE2, topk: bool = False) -> None:
    store.add(TEACHER, spec, fake_pts(store.missing(TEACHER, spec, sources), topk))


# ---------------------------------------------------------------------------------------------
# Decoding specs
# ---------------------------------------------------------------------------------------------


def test_greedy_fingerprint_is_the_same_in_every_process():
    assert get_spec("greedy").fingerprint() == "f346b228c20ccaf409479cc5022cf18a4a0fe6f0152cc2204b3a493254e9fc0b"


def test_every_output_changing_field_changes_the_fingerprint():
    greedy, beam, sample = DecodingSpec("g"), DecodingSpec("b", "beam", num_beams=4), DecodingSpec("s", "sample")
    variants = [
        greedy,
        beam,
        sample,
        dataclasses.replace(greedy, max_new_tokens=32),
        dataclasses.replace(greedy, no_repeat_ngram_size=3),
        dataclasses.replace(beam, num_beams=5),
        dataclasses.replace(beam, length_penalty=2.0),
        dataclasses.replace(sample, temperature=1.5),
        dataclasses.replace(sample, top_p=0.9),
        dataclasses.replace(sample, top_k=50),
        dataclasses.replace(sample, seed=1),
    ]
    assert len({spec.fingerprint() for spec in variants}) == len(variants)


def test_name_and_counts_do_not_change_the_fingerprint():
    assert DecodingSpec("a", "sample", num_samples=2).fingerprint() == DecodingSpec("b", "sample").fingerprint()
    assert DecodingSpec("a", "beam", num_beams=4, num_return=4).fingerprint() == get_spec("beam4").fingerprint()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "nucleus"}, "kind"),
        ({"kind": "sample", "temperature": 0.0}, "temperature"),
        ({"kind": "sample", "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"kind": "beam", "num_beams": 1}, "num_beams"),
        ({"kind": "beam", "num_beams": 4, "num_return": 5}, "num_return"),
        ({"kind": "greedy", "temperature": 1.5}, "temperature"),
        ({"kind": "beam", "num_beams": 2, "num_samples": 3}, "num_samples"),
    ],
)
def test_a_bad_spec_value_is_a_config_error_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        DecodingSpec("bad", **kwargs)
    assert err.value.key == key


def test_an_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="beam4, greedy, sample, sample_t07, sample_t15"):
        get_spec("nucleus")


def test_presets_give_their_number_of_pts_and_generate_kwargs():
    assert [get_spec(name).num_per_input for name in ("greedy", "beam4", "sample")] == [1, 1, 4]
    assert get_spec("beam4").settings().generate_kwargs()["num_return_sequences"] == 1
    assert get_spec("sample").settings().generate_kwargs()["num_return_sequences"] == 4
    assert get_spec("sample_t15").settings().generate_kwargs()["temperature"] == 1.5


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> PTStore:
    return PTStore(tmp_path / "pts")


def test_added_pts_come_back_with_text_tokens_and_topk(store):
    records = fake_pts(store.missing(TEACHER, SAMPLE2, ["x y z"]), topk=True)
    store.add(TEACHER, SAMPLE2, records)
    assert store.get(TEACHER, SAMPLE2, ["x y z"]) == {input_key("x y z"): records}


def test_missing_shrinks_to_nothing_after_add(store):
    assert len(store.missing(TEACHER, SAMPLE2, ["a", "b"])) == 4
    store.add(TEACHER, SAMPLE2, fake_pts(store.missing(TEACHER, SAMPLE2, ["a"])))
    assert [(m.source, m.sample_index) for m in store.missing(TEACHER, SAMPLE2, ["a", "b"])] == [("b", 0), ("b", 1)]
    fill(store, ["a", "b"])
    assert store.missing(TEACHER, SAMPLE2, ["a", "b"]) == []


def test_asking_for_more_samples_returns_only_the_extra_indices(store):
    fill(store, ["a"])
    more = dataclasses.replace(SAMPLE2, num_samples=4)
    assert [m.sample_index for m in store.missing(TEACHER, more, ["a"])] == [2, 3]
    assert [r.sample_index for r in store.get(TEACHER, more, ["a"])[input_key("a")]] == [0, 1]


def test_a_source_in_two_places_is_generated_once(store):
    assert len(store.missing(TEACHER, SAMPLE2, ["a", "b", "a"])) == 4
    records = fake_pts(store.missing(TEACHER, SAMPLE2, ["a"]))
    store.add(TEACHER, SAMPLE2, records + records)  # also repeated within one add
    assert store.stats()[0].pts == 2
    assert store.add(TEACHER, SAMPLE2, records) is None  # nothing new: no shard
    assert len(list((store.root / "shards").iterdir())) == 1


def test_another_teacher_or_spec_has_its_own_pts(store):
    fill(store, ["a"])
    assert len(store.missing("other-teacher", SAMPLE2, ["a"])) == 2
    assert len(store.missing(TEACHER, get_spec("greedy"), ["a"])) == 1


def test_a_reopened_store_sees_the_same_pts(store):
    fill(store, ["a", "b"], topk=True)
    before = store.get(TEACHER, SAMPLE2, ["a", "b"])
    assert PTStore(store.root).get(TEACHER, SAMPLE2, ["a", "b"]) == before


def _tree(root) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what a read-only command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_complete_shard_missing_from_the_manifest_is_adopted_not_deleted(store, caplog):
    fill(store, ["a"])
    fill(store, ["b"])
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["shards"].pop()  # as if the writer of "b" was killed before its commit
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        reopened = PTStore(store.root)
    assert "not in the manifest" in caplog.text
    assert reopened.missing(TEACHER, SAMPLE2, ["a", "b"]) == []
    assert len(json.loads((store.root / "manifest.json").read_text())["shards"]) == 2


def test_a_lost_manifest_is_rebuilt_from_the_shards_with_their_specs(store):
    fill(store, ["a", "b"], topk=True)
    fill(store, ["c"], spec=get_spec("greedy"))
    before = {s.spec_fp: s for s in store.stats()}
    (store.root / "manifest.json").unlink()
    rebuilt = PTStore(store.root)
    assert {s.spec_fp: s for s in rebuilt.stats()} == before  # names, counts, tokens, bytes and top-k
    assert rebuilt.get(TEACHER, SAMPLE2, ["a", "b"]) == store.get(TEACHER, SAMPLE2, ["a", "b"])
    assert rebuilt.spec(SAMPLE2.fingerprint()) == SAMPLE2
    assert (store.root / "manifest.json").exists()


def test_shards_written_before_the_byte_columns_are_read_and_adopted(store):
    """Stores from before an endpoint's token bytes were kept: listed or not, their PTs read as they were."""
    import pyarrow.parquet as pq

    fill(store, ["a"], topk=True)
    expected = store.get(TEACHER, SAMPLE2, ["a"])
    (shard,) = (store.root / "shards").glob("*.parquet")
    old = pq.read_table(shard).drop_columns(["token_bytes", "topk_bytes"])
    pq.write_table(old.replace_schema_metadata(pq.read_schema(shard).metadata), shard)
    (store.root / "manifest.json").unlink()  # unlisted: adopted from the shard itself
    reopened = PTStore(store.root)
    assert reopened.get(TEACHER, SAMPLE2, ["a"]) == expected and not (store.root / "quarantine").exists()


def test_a_live_writers_journal_is_left_alone_and_a_dead_ones_is_added(store):
    records = fake_pts(store.missing(TEACHER, SAMPLE2, ["a", "b"]))
    store.journal(TEACHER, SAMPLE2, records[:2])  # answers of "a", not yet in a shard
    other = PTStore(store.root)  # another process opening the store while the writer lives
    assert len(other.missing(TEACHER, SAMPLE2, ["a"])) == 2 and len(list((store.root / "journal").iterdir())) == 1
    (store.root / "journal" / "notes.jsonl").write_text("not json\n")  # a stray file: skipped, not an error
    store._journal.close()  # the writer dies (the system drops its lock)
    recovered = PTStore(store.root)
    assert {m.input_key for m in recovered.missing(TEACHER, SAMPLE2, ["a", "b"])} == {input_key("b")}
    assert recovered.get(TEACHER, SAMPLE2, ["a"])[input_key("a")] == records[:2]
    assert not list((store.root / "journal").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_a_corrupted_shard_is_set_aside_and_its_pts_are_missing_again(store, caplog, damage):
    fill(store, ["a"])
    fill(store, ["b"])
    manifest = json.loads((store.root / "manifest.json").read_text())
    shard = store.root / manifest["shards"][1]["file"]  # the one holding "b"
    data = shard.read_bytes()
    shard.write_bytes(
        data[: len(data) // 2] if damage == "truncate" else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    )
    damaged = shard.read_bytes()
    with caplog.at_level(logging.WARNING):
        missing = PTStore(store.root).missing(TEACHER, SAMPLE2, ["a", "b"])
    assert "unreadable PT shard" in caplog.text
    assert [(m.source, m.sample_index) for m in missing] == [("b", 0), ("b", 1)]
    assert len(json.loads((store.root / "manifest.json").read_text())["shards"]) == 1
    assert not shard.exists() and (store.root / "quarantine" / shard.name).read_bytes() == damaged  # kept


def test_a_shard_that_cannot_be_read_for_now_is_an_error_not_set_aside(store, monkeypatch):
    fill(store, ["a"])
    (shard,) = (store.root / "shards").iterdir()
    real = type(shard).read_bytes

    def forbidden(path):
        if path.name == shard.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(type(shard), "read_bytes", forbidden)
    with pytest.raises(PermissionError):
        PTStore(store.root).missing(TEACHER, SAMPLE2, ["a"])
    monkeypatch.undo()
    assert shard.exists() and PTStore(store.root).missing(TEACHER, SAMPLE2, ["a"]) == []


def test_an_incomplete_shard_write_is_set_aside(store):
    fill(store, ["a"])
    partial = store.root / "shards" / "0123.parquet.tmp"
    partial.write_bytes(b"PAR1 half a shard")
    reopened = PTStore(store.root)
    assert reopened.stats()[0].pts == 2
    assert not partial.exists() and (store.root / "quarantine" / partial.name).exists()


@pytest.mark.parametrize(
    "content",
    [b"[]", b"{}", b"", b'{"format": 1, "specs": {}, "sha', b"\xff\xfe not utf-8", b'{"format": 1, "specs": {}}'],
    ids=["list", "empty_object", "empty_file", "truncated", "not_utf8", "no_shards"],
)
@pytest.mark.parametrize("readonly", [False, True])
def test_an_unreadable_manifest_is_one_error_naming_it_and_nothing_is_touched(store, content, readonly):
    fill(store, ["a"])
    (store.root / "manifest.json").write_bytes(content)
    before = _tree(store.root)
    with pytest.raises(PTStoreError, match=r"manifest\.json: .*manifest.*move it aside") as error:
        PTStore(store.root, readonly=readonly)
    assert "\n" not in str(error.value)
    assert _tree(store.root) == before


def test_a_readonly_store_recovers_in_memory_and_writes_nothing(store):
    fill(store, ["a"])
    fill(store, ["b"])
    manifest = json.loads((store.root / "manifest.json").read_text())
    bad = store.root / manifest["shards"][0]["file"]
    bad.write_bytes(bad.read_bytes()[:50])  # "a" unreadable
    (store.root / "manifest.json").unlink()  # and the manifest lost
    (store.root / "shards" / "x.parquet.tmp").write_bytes(b"partial")
    before = _tree(store.root)
    readonly = PTStore(store.root, readonly=True)
    assert [(s.spec_name, s.pts) for s in readonly.stats()] == [("sample2", 2)]
    assert list(readonly.get(TEACHER, SAMPLE2, ["a", "b"])) == [input_key("b")]
    assert _tree(store.root) == before
    with pytest.raises(RuntimeError, match="read-only"):
        readonly.add(TEACHER, SAMPLE2, fake_pts(readonly.missing(TEACHER, SAMPLE2, ["a"])))


def test_a_store_path_that_is_a_file_is_a_store_error(tmp_path):
    (tmp_path / "pts").write_text("not a directory")
    with pytest.raises(PTStoreError, match="must be a directory"):
        PTStore(tmp_path / "pts")


def test_a_full_disk_leaves_no_partial_shard_and_names_the_path(store, monkeypatch):
    fill(store, ["a"])
    before = _tree(store.root)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError, match="No space left on device") as error:
        fill(store, ["b"])
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and error.value.filename.startswith(str(store.root / "shards"))
    assert _tree(store.root) == before


def test_a_crash_between_shard_and_manifest_loses_no_pts(store, monkeypatch):
    fill(store, ["a"])

    def killed(self, manifest):
        raise RuntimeError("killed before the manifest was written")

    monkeypatch.setattr(PTStore, "_write_manifest", killed)
    with pytest.raises(RuntimeError, match="killed"):
        fill(store, ["b"])
    assert len(json.loads((store.root / "manifest.json").read_text())["shards"]) == 1  # the commit never happened
    monkeypatch.undo()
    reopened = PTStore(store.root)
    assert reopened.missing(TEACHER, SAMPLE2, ["a", "b"]) == []  # the complete shard of "b" is adopted
    expected = fake_pts([MissingPT(input_key("b"), i, "b") for i in range(2)])
    assert reopened.get(TEACHER, SAMPLE2, ["b"]) == {input_key("b"): expected}


def test_a_claim_keeps_inputs_from_other_writers_until_released_or_its_process_is_gone(store):
    other = PTStore(store.root)
    assert store.claim(TEACHER, "spec", ["a", "b"]) == {"a", "b"}
    assert other.claim(TEACHER, "spec", ["b", "c"]) == {"c"}
    assert other.claim(TEACHER, "another-spec", ["b"]) == {"b"}  # claims are per (teacher, spec)
    store.release()
    assert other.claim(TEACHER, "spec", ["a", "b"]) == {"a", "b"}
    other.release()
    assert not list((store.root / "claims").iterdir())

    store.claim(TEACHER, "spec", ["a"])
    (path,) = (store.root / "claims").iterdir()
    gone = multiprocessing.get_context("fork").Process(target=lambda: None)
    gone.start()
    gone.join()
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": gone.pid}))  # its writer has exited
    assert other.claim(TEACHER, "spec", ["a"]) == {"a"}
    assert not path.exists()  # the stale claim is gone
    other.release()
    store.claim(TEACHER, "spec", ["a"])
    path.write_text(json.dumps({**json.loads(path.read_text()), "time": 0}))  # alive, but not renewed for ages
    assert other.claim(TEACHER, "spec", ["a"]) == {"a"}


def _add_in_turns(root: str, prefix: str) -> None:
    store = PTStore(root)
    for i in range(6):
        fill(store, [f"{prefix}{i}"])


def test_two_processes_adding_at_once_keep_every_pt(store):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_in_turns, args=(str(store.root), p)) for p in ("x", "y")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    sources = [f"{p}{i}" for p in ("x", "y") for i in range(6)]
    assert store.missing(TEACHER, SAMPLE2, sources) == []
    assert store.stats()[0].pts == 24


def test_stats_count_inputs_pts_tokens_and_bytes(store):
    fill(store, ["a", "b"], topk=True)
    (stats,) = store.stats()
    assert (stats.spec_name, stats.inputs, stats.pts, stats.tokens, stats.topk) == ("sample2", 2, 4, 12, 2)
    assert stats.bytes == sum(p.stat().st_size for p in (store.root / "shards").iterdir())
    assert stats.bytes_per_million_tokens == stats.bytes / 12 * 1e6


def test_top_k_for_the_wrong_number_of_tokens_is_refused(store):
    (key, index, _), *_ = store.missing(TEACHER, SAMPLE2, ["a"])
    with pytest.raises(ValueError, match="2 tokens"):
        store.add(TEACHER, SAMPLE2, [PTRecord(key, index, "a", [1, 2], topk_ids=[[1]], topk_logprobs=[[-1.0]])])


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def test_sample_seed_depends_only_on_its_arguments():
    key = input_key("a")
    assert sample_seed(0, key, 1) == sample_seed(0, key, 1) == 8303435397196380605
    others = {sample_seed(1, key, 1), sample_seed(0, input_key("b"), 1), sample_seed(0, key, 2)}
    assert sample_seed(0, key, 1) not in others and len(others) == 3


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def schedule_data(store):
    examples = [Example("lab", "labeled input", "gold", ("gold",)), Example("unl", "unlabeled input", None, ())]
    spec = dataclasses.replace(SAMPLE2, num_samples=3)
    fill(store, [e.source for e in examples], spec)
    return examples, store.get(TEACHER, spec, [e.source for e in examples])


def test_three_pts_cycle_over_three_epochs_then_repeat(schedule_data):
    examples, pts = schedule_data
    seen = [[item.pt.sample_index for item in pt_schedule(examples, pts, 3, epoch) if item.pt] for epoch in range(4)]
    assert seen == [[0, 0], [1, 1], [2, 2], [0, 0]]
    assert pt_schedule(examples, pts, 3, 1)[1].text == "labeled input #1"


def test_labeled_examples_also_get_their_gold_target_every_epoch(schedule_data):
    examples, pts = schedule_data
    for epoch in range(3):
        items = [(item.example_id, item.kind) for item in pt_schedule(examples, pts, 3, epoch)]
        assert items == [("lab", "gold"), ("lab", "teacher_pt"), ("unl", "teacher_pt")]


def test_without_gold_every_example_gets_only_its_pt(schedule_data):
    examples, pts = schedule_data
    items = pt_schedule(examples, pts, 3, 0, include_gold=False)
    assert [(item.example_id, item.kind) for item in items] == [("lab", "teacher_pt"), ("unl", "teacher_pt")]


def test_an_example_without_enough_pts_is_a_clear_error(schedule_data):
    examples, pts = schedule_data
    with pytest.raises(ValueError, match="example lab: needs PTs 0..3"):
        pt_schedule(examples, pts, 4, 3)


# ---------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------


def test_identical_pts_have_self_bleu_100():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    assert self_bleu(["the cat sat on the mat", "a dog ran in a park"]) < 10


def test_distinct_n_counts_unique_ngrams_over_all_ngrams():
    assert distinct_n(["a b a", "b c"], 1) == 3 / 5
    assert distinct_n(["a b a", "b c"], 2) == 3 / 3
    assert distinct_n(["a"], 2) == 0.0


def test_pt_diversity_reports_lengths_and_self_bleu_of_inputs_with_several_pts():
    records = {"k1": [PTRecord("k1", 0, "a b", [1, 2]), PTRecord("k1", 1, "a b", [1, 2])]}
    records["k2"] = [PTRecord("k2", 0, "c d e f", [3, 4, 5])]
    stats = pt_diversity(records)
    assert (stats["inputs"], stats["pts"], stats["words_max"], stats["tokens_mean"]) == (2, 3, 4, 7 / 3)
    assert stats["self_bleu"] == pytest.approx(100.0)


def test_pts_are_scored_against_the_gold_references_of_labeled_inputs():
    from distilgen.pseudo_targets import gold_agreement

    split = [
        Example("a", "a source", "the home side won", ("the home side won", "home won")),
        Example("b", "b", None, ()),
    ]
    exact = {input_key("a source"): [PTRecord(input_key("a source"), 0, "the home side won", [1])]}
    assert gold_agreement(split, exact) == "; against gold: BLEU 100.0, chrF 100.0"
    wrong = {input_key("a source"): [PTRecord(input_key("a source"), 0, "xyz qqq", [1])]}
    assert gold_agreement(split, wrong).startswith("; against gold: BLEU 0.0, chrF ")
    assert gold_agreement(split[1:], {input_key("b"): [PTRecord(input_key("b"), 0, "x", [1])]}) == ""  # unlabeled
