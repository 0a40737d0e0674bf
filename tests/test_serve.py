"""`distilgen serve`: the real server process on 127.0.0.1, talked to by the official `openai` client and by plain
HTTP (httpx); tiny models built from configs. Every request loop is bounded."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import httpx
import pytest
import torch

from distilgen.config import DecodingConfig, ModelConfig
from distilgen.data import Example
from distilgen.evaluate import generate
from distilgen.models import load_model
from tests.conftest import Server, cli_env, tiny_model_config

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
PROMPT = "Report: Riverton beat Oakdale 3-1 at home on Sunday."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer_dir):
    """A tiny Llama with a chat template (an instruct model's shape)."""
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("llama", tokenizer_dir, num_kv_heads=1))
    tm.tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("chat") / "model"
    tm.save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(teacher_dir):
    running = Server(
        str(teacher_dir), "name=tiny", "max_tokens=32", "max_prompt_tokens=200", "max_batch_size=8", "max_wait_ms=200"
    )
    yield running
    running.stop()


def test_completions_are_the_models_own_greedy_outputs_with_logprobs_and_usage(server, teacher_dir):
    tm = load_model(ModelConfig(path=str(teacher_dir)))
    expected = generate(tm, [Example("0", PROMPT, None, ())], DecodingConfig(max_new_tokens=12), 200)[0]
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice = answer.choices[0]
    assert choice.text.strip() == expected  # unstripped: a client appends it to its prompt
    prompt_tokens = len(tm.encode([Example("0", PROMPT, None, ())], 1000, targets=False)[0][0].source)
    assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens >= len(choice.logprobs.tokens)
    assert "".join(choice.logprobs.tokens).strip() == expected and choice.finish_reason in ("stop", "length")
    for token, logprob, top in zip(
        choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True
    ):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy: the top-1 is the token written there
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)
        assert all(v <= 0 for v in top.values())


def test_sampling_is_seeded_and_chat_streams_the_same_text(server):
    client = server.client()
    messages = [{"role": "system", "content": "Summarize."}, {"role": "user", "content": PROMPT}]

    def sample(seed):
        answer = client.chat.completions.create(model="tiny", messages=messages, n=3, temperature=1.0, seed=seed,
                                                max_tokens=10)  # fmt: skip
        return [c.message.content for c in answer.choices]

    first = sample(7)
    assert sample(7) == first and len(first) == 3 and sample(8) != first
    answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10,
                                                 stream=True))  # fmt: skip
    assert all(c.choices for c in chunks)  # no usage chunk unless asked (clients read choices[0])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == answer.choices[0].message.content and chunks[0].choices[0].delta.role == "assistant"
    asked = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10,
                                                stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert asked[-1].choices == [] and asked[-1].usage.total_tokens == answer.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason


def test_stop_strings_cut_the_text_and_concurrent_requests_get_their_own_answers(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    word = full.split()[1] if len(full.split()) > 1 else full[-1]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[word], logprobs=1)
    assert cut.choices[0].text == full[: full.find(word)] and cut.choices[0].finish_reason == "stop"
    kept = "".join(cut.choices[0].logprobs.tokens)
    assert word not in kept and kept.strip() == cut.choices[0].text.strip()  # the tokens stop where the text does
    assert cut.usage.completion_tokens == len(cut.choices[0].logprobs.tokens)
    prompts = [f"{PROMPT} Minute {i}." for i in range(6)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]  # fmt: skip
    before = httpx.get(f"{server.url}/health").json()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: client.completions.create(
            model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text, prompts))  # fmt: skip
    after = httpx.get(f"{server.url}/health").json()
    assert together == alone
    assert after["prompts_decoded"] - before["prompts_decoded"] == 6 and after["batches"] - before["batches"] < 6


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{not json", 400, "invalid_json"),
        (json.dumps({"model": "other", "prompt": "x"}), 404, "model_not_found"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 33}), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "prompt": "x " * 400}), 400, "context_length_exceeded"),
        (json.dumps({"model": "tiny", "prompt": "x", "n": 2, "temperature": 0}), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "prompt": 3}), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "prompt": ""}), 400, "invalid_value"),
        (json.dumps({"prompt": "x"}), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}), 400, "invalid_value"),
    ],
)
def test_a_bad_request_is_a_4xx_in_openais_shape_and_the_server_carries_on(server, body, status, code):
    answer = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def test_a_wrong_path_or_method_is_an_error_in_openais_shape(server):
    assert httpx.get(f"{server.url}/v1/completions").json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/nothing", json={}).status_code == 404
    assert httpx.get(f"{server.url}/openapi.json").status_code == 404


def test_bad_chat_messages_are_refused(server):
    for messages in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": [{"type": "image"}]}]):
        answer = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"


def test_a_chat_template_renders_the_messages_and_a_key_is_required_when_set(chat_model):
    from transformers import AutoTokenizer

    running = Server(chat_model, "name=chat", "api_key_env=SERVE_TEST_KEY", env={"SERVE_TEST_KEY": "s3cret"})
    try:
        assert httpx.post(f"{running.url}/v1/completions", json={"model": "chat", "prompt": "x"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        client = running.client("s3cret")
        messages = [{"role": "user", "content": PROMPT}]
        chat = client.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=8)
        rendered = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        plain = client.completions.create(model="chat", prompt=rendered, temperature=0, max_tokens=8)
        assert chat.choices[0].message.content == plain.choices[0].text  # the chat is the template's text
        assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
        # the config allows 1024 prompt tokens, the model's 320 positions hold a prompt and its 8 new tokens
        long = client.with_options(max_retries=0).completions
        with pytest.raises(openai.BadRequestError) as err:
            long.create(model="chat", prompt="x " * 400, max_tokens=8)
        assert err.value.body["code"] == "context_length_exceeded" and "limit of 312" in err.value.body["message"]
    finally:
        running.stop()


def test_injected_faults_answer_a_share_of_requests_with_429_and_500(teacher_dir):
    running = Server(str(teacher_dir), "name=tiny", "fault_rate=0.5", "fault_seed=1")
    try:
        statuses = []
        for _ in range(24):
            answer = httpx.post(f"{running.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                                                       "max_tokens": 2})  # fmt: skip
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.headers["retry-after"] == "0" and answer.json()["error"]["type"] == "rate_limit_error"
        assert {200, 429, 500} <= set(statuses) and 4 <= statuses.count(200) <= 20, statuses
        assert httpx.get(f"{running.url}/health").status_code == 200  # never injected
    finally:
        running.stop()


def test_serve_without_its_extra_says_what_to_install(monkeypatch, capsys, teacher_dir):
    from distilgen.cli import main

    monkeypatch.delitem(sys.modules, "distilgen.serve", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if `pip install -e .` without [serve]
    assert main(["serve", str(teacher_dir)]) == 2
    assert "pip install 'distilgen[serve]'" in capsys.readouterr().err


def test_a_bad_serve_config_is_one_line():
    result = subprocess.run([sys.executable, "-m", "distilgen.cli", "serve", "x", "fault_rate=2"], env=cli_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "fault_rate: must be in [0, 1], got 2" in result.stderr
