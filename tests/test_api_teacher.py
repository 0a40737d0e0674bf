"""The `api` teacher against the real `distilgen serve` process on 127.0.0.1: its PTs equal the served model's own
outputs, faults are retried, a refused key or model costs one request, the budget is never passed, a killed run
loses only what was in flight, and Batch API files round-trip into the store."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from distilgen.config import ApiConfig, ConfigError, DecodingConfig, GenerateConfig, ModelConfig, from_dict
from distilgen.data import Example, load_splits
from distilgen.evaluate import generate
from distilgen.generation import input_key
from distilgen.generation.api import ApiGenerator, ApiPrompt, EndpointError
from distilgen.models import load_model
from distilgen.pseudo_targets import PTStore, get_spec
from distilgen.pt_generation import generate as generate_command
from distilgen.teachers import load_teacher
from tests.conftest import Server, cli_env, kill_when

pytest.importorskip("openai")

DATA = {"task": {"train_size": 0, "unlabeled_size": 12, "dev_size": 0, "test_size": 0}}


@pytest.fixture(scope="module")
def server(teacher_dir):
    running = Server(str(teacher_dir), "name=tiny", "max_tokens=64", "max_batch_size=8", "max_wait_ms=50")
    yield running
    running.stop()


def _decoded(server: Server) -> int:
    return httpx.get(f"{server.url}/health").json()["prompts_decoded"]


def _api(server: Server, **fields) -> dict:
    return {"base_url": f"{server.url}/v1", "model": "tiny", "backoff_s": 0.01, **fields}


def _generate_cfg(server: Server, store, **fields) -> GenerateConfig:
    cfg = {"store": str(store), "data": DATA, "splits": ["unlabeled"], "spec": "sample", "topk": 3,
           "teacher": {"kind": "api", "api": _api(server, **fields.pop("api", {}))}, **fields}  # fmt: skip
    return from_dict(GenerateConfig, cfg)


def test_greedy_pts_are_the_served_models_outputs_with_its_tokens_and_top_k(server, teacher_dir):
    tm = load_model(ModelConfig(path=str(teacher_dir)))
    sources = [e.source for e in load_splits(from_dict(GenerateConfig, {"store": "x", "data": DATA, "teacher": {
        "path": str(teacher_dir)}}).data)["unlabeled"][:4]]  # fmt: skip
    expected = generate(tm, [Example(str(i), s, None, ()) for i, s in enumerate(sources)],
                        DecodingConfig(max_new_tokens=16), 256)  # fmt: skip
    plain = ApiPrompt(False, None, (), 0, str.strip)
    generator = ApiGenerator(ApiConfig(**_api(server), endpoint="completions"), plain)
    arrived = []
    outputs = generator.generate(sources, DecodingConfig(max_new_tokens=16).settings(), topk=3,
                                 on_done=lambda at, g: arrived.append(at))  # fmt: skip
    assert [o[0].text for o in outputs] == expected and sorted(arrived) == [0, 1, 2, 3]
    for (g,) in outputs:
        assert b"".join(g.token_bytes).decode().strip() == g.text and g.token_ids == []
        for token, candidates, logprobs in zip(g.token_bytes, g.topk_bytes, g.topk_logprobs, strict=True):
            assert candidates[0] == token and logprobs == sorted(logprobs, reverse=True) and len(candidates) == 3
    assert generator.usage.requests == 4 and generator.usage.completion_tokens >= sum(
        len(g.token_bytes) for (g,) in outputs
    )


def test_sampled_pts_under_injected_faults_are_all_stored_once_and_no_answer_is_asked_twice(teacher_dir, tmp_path):
    faulty = Server(str(teacher_dir), "name=tiny", "max_tokens=64", "fault_rate=0.4", "fault_seed=3")
    try:
        cfg = _generate_cfg(faulty, tmp_path / "pts", api={"concurrency": 4, "max_retries": 20})
        summary = generate_command(cfg)
        assert summary["stored_pts"] == 12 * get_spec("sample").num_samples and summary["generated_here"] > 0
        usage = summary["teacher_api"]
        assert usage["requests"] == 12 == _decoded(faulty)  # one request per input, each decoded once
        assert usage["retries"] > 0 and usage["completion_tokens"] > 0
        store = PTStore(tmp_path / "pts")
        teacher = load_teacher(cfg.teacher, "fp32", torch.device("cpu"), cfg.data)
        fp = teacher.fingerprint(cfg.data.max_source_length, cfg.data.template)
        sources = [e.source for e in load_splits(cfg.data)["unlabeled"]]
        pts = store.get(fp, get_spec("sample"), sources)
        assert len(pts) == 12 and all([r.sample_index for r in v] == [0, 1, 2, 3] for v in pts.values())
        record = pts[input_key(sources[0])][0]
        assert record.token_bytes and len(record.topk_bytes) == len(record.token_bytes) == len(record.topk_logprobs)
        assert record.seed is not None and record.token_ids == []
        again = generate_command(cfg)  # everything stored: no request at all
        assert again["teacher_api"]["requests"] == 0 and _decoded(faulty) == 12
    finally:
        faulty.stop()


def test_a_killed_run_loses_only_what_was_in_flight_and_its_rerun_asks_only_the_rest(server, tmp_path):
    store_dir = tmp_path / "pts"
    cfg = {"store": str(store_dir), "data": DATA, "splits": ["unlabeled"], "spec": "sample", "topk": 2,
           "batch_size": 64, "teacher": {"kind": "api", "api": _api(server, concurrency=1)}}  # fmt: skip
    (tmp_path / "gen.json").write_text(json.dumps(cfg))
    before = _decoded(server)
    journal = store_dir / "journal"

    def answered_three() -> bool:
        files = list(journal.glob("*.jsonl")) if journal.is_dir() else []
        return sum(f.read_text().count("\n") for f in files) >= 3 * 4  # 3 inputs x 4 samples journaled

    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distilgen.cli", "generate", str(tmp_path / "gen.json")],
                                env=cli_env(), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        kill_when(proc, answered_three, log=log)
    first_run = _decoded(server) - before
    assert not list((store_dir / "shards").glob("*.parquet"))  # nothing reached a shard: all is in the journal
    summary = generate_command(from_dict(GenerateConfig, cfg))  # opening the store adopts the journal
    stored_before = summary["already_stored"] // 4
    assert stored_before >= 3 and first_run <= stored_before + 1  # at most the one request in flight was lost
    assert summary["teacher_api"]["requests"] == 12 - stored_before and summary["stored_pts"] == 48
    assert not list(journal.glob("*.jsonl"))


def test_a_wrong_model_or_key_stops_the_run_after_one_request_with_one_line(teacher_dir, tmp_path):
    keyed = Server(str(teacher_dir), "name=tiny", "api_key_env=TEST_SERVE_KEY", env={"TEST_SERVE_KEY": "sesame"})
    try:
        for fields, env, key in (
            ({"model": "nope"}, {"TEST_SERVE_KEY": "sesame"}, "teacher.api.model"),
            ({}, {"TEST_SERVE_KEY": "wrong"}, "teacher.api.api_key_env"),
        ):
            cfg = {"store": str(tmp_path / "pts"), "data": DATA, "splits": ["unlabeled"], "spec": "greedy",
                   "teacher": {"kind": "api", "api": _api(keyed, api_key_env="TEST_SERVE_KEY", **fields)}}  # fmt: skip
            (tmp_path / "gen.json").write_text(json.dumps(cfg))
            result = subprocess.run([sys.executable, "-m", "distilgen.cli", "generate", str(tmp_path / "gen.json")],
                                    env={**cli_env(), **env}, capture_output=True, text=True, timeout=120)  # fmt: skip
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert lines[-1].startswith(f"distilgen generate: error: {key}: ")
        assert _decoded(keyed) == 0  # both refused before decoding anything
    finally:
        keyed.stop()


def test_the_budget_is_never_passed_and_what_was_answered_is_kept(server, tmp_path):
    # Prices that make a request cost about 0.01: the budget allows a few requests, not 12.
    cfg = _generate_cfg(server, tmp_path / "pts", api={"concurrency": 2, "price_input": 20.0, "price_output": 20.0,
                                                       "budget": 0.05})  # fmt: skip
    with pytest.raises(ConfigError, match="teacher.api.budget: 0.05 would be passed by the next request"):
        generate_command(cfg)
    stats = PTStore(tmp_path / "pts").stats()
    assert len(stats) == 1 and 0 < stats[0].pts < 48


def test_an_endpoint_that_keeps_failing_stops_after_its_retries(teacher_dir):
    broken = Server(str(teacher_dir), "name=tiny", "fault_rate=1.0", "fault_status=[500]")
    try:
        generator = ApiGenerator(ApiConfig(**_api(broken), max_retries=2), ApiPrompt(True, None, (), 0, str.strip))
        with pytest.raises(EndpointError, match="answered 500 after 2 retries"):
            generator.generate(["a source"], DecodingConfig(max_new_tokens=4).settings())
        assert generator.usage.retries == 2 and generator.usage.requests == 0
    finally:
        broken.stop()
