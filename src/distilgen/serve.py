"""`distilgen serve`: any model distilgen loads, behind an OpenAI-compatible HTTP API.

    distilgen serve runs/study/seed0/seq_kd/distill/model port=8000
    curl localhost:8000/v1/completions -d '{"model": "seq_kd", "prompt": "...", "max_tokens": 32}'

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the tokenizer's chat template where it has
one; otherwise the messages' contents, system first, joined by blank lines, read as a source), `GET /health`.
Requests take `n`, `temperature` (0: greedy), `top_p`, `max_tokens`, `stop`, `seed` (sample i of a prompt is
drawn from (seed, prompt, i), whatever else shares its batch), `logprobs` / `top_logprobs` (up to 20, token
strings with their bytes) and `stream`. A completion prompt is read as a source of a model with no prompt config
(a distilgen decoder-only model without a chat template appends its separator token). Every answer carries its
token usage. Concurrent requests are decoded together (`max_batch_size`, `max_wait_ms`) by the generation seam
(`distilgen.generation`), one batch at a time. Bad requests get a 4xx in OpenAI's error shape; the server
carries on. A stream sends the finished completion's tokens as chunks (the first arrives when decoding ends).
An export (`distilgen export`) is served by its runtime: no logprobs, and samples seeded per batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import torch

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # an optional extra: `pip install distilgen[serve]`
    raise ImportError("distilgen serve needs FastAPI and uvicorn: pip install 'distilgen[serve]'") from err

from distilgen.config import GenerationSettings, ModelConfig, ServeConfig
from distilgen.data import Example
from distilgen.evaluate import model_label
from distilgen.generation import Generated
from distilgen.generation.hf import forced_logprobs
from distilgen.models import TextModel, load_model
from distilgen.token_alignment import vocabulary_bytes

log = logging.getLogger(__name__)

SYSTEM_ROLES = ("system", "developer")

MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI's limit)."""


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(self.status)
        kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Job:
    """One prompt of one request: what the batcher decodes."""

    source: str
    settings: GenerationSettings
    stop: tuple[str, ...]
    top_logprobs: int | None
    future: asyncio.Future


@dataclasses.dataclass
class Choice:
    text: str
    tokens: list[int]
    finish_reason: str
    new_tokens: int
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None


class Engine:
    """The model, its two ways of reading a prompt, and the batcher that feeds them."""

    def __init__(self, tm: TextModel, cfg: ServeConfig):
        self.cfg = cfg
        raw = dataclasses.replace(tm, prompt=None)  # a completion prompt and a rendered chat are read as they are
        self.tm = raw
        # distilgen's own loop (seeded samples; a model's extra rules are not applied), or an export's runtime
        self.generator = raw.generator(cfg.max_prompt_tokens, cfg.max_batch_size, own_rules=False)
        self.batches = self.decoded = 0
        self.has_chat_template = bool(getattr(tm.tokenizer, "chat_template", None)) and not tm.is_encoder_decoder
        self.pieces = vocabulary_bytes(tm.tokenizer)
        self.queue: asyncio.Queue[Job] | None = None
        config = tm.model.config
        self.positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def prompt_limit(self, max_tokens: int) -> int:
        """The longest prompt a request may send: the config's limit, within the model's positions (a decoder-only
        model's output takes positions after its prompt)."""
        if self.positions is None:
            return self.cfg.max_prompt_tokens
        room = self.positions - (0 if self.tm.is_encoder_decoder else max_tokens)
        return max(min(self.cfg.max_prompt_tokens, room), 0)

    def chat_source(self, messages: list[dict[str, Any]]) -> str:
        if self.has_chat_template:
            try:
                return self.tm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # the template refuses the conversation (a role it does not take...)
                raise RequestError(400, f"the model's chat template refused the messages: {err}", "messages",
                                   "invalid_value") from None  # fmt: skip
        return "\n\n".join(m["content"] for m in sorted(messages, key=lambda m: m["role"] not in SYSTEM_ROLES))

    def source_ids(self, source: str) -> list[int]:
        """The prompt's tokens as the model reads them (never cut: a prompt over the limit is refused)."""
        encoded, _ = self.tm.encode([Example("", source, None, ())], 1 << 30, targets=False)
        return encoded[0].source

    def prompt_tokens(self, source: str) -> int:
        return len(self.source_ids(source))

    async def submit(self, job: Job) -> list[Choice]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._loop())  # kept: a task only weakly held dies
        await self.queue.put(job)
        return await job.future

    async def _loop(self) -> None:
        """Take the first waiting job, gather others for `max_wait_ms` up to `max_batch_size` outputs, decode each
        group of equal settings in one call (in a worker thread: the event loop keeps answering)."""
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while sum(j.settings.num_return for j in jobs) < self.cfg.max_batch_size:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except TimeoutError:
                    break
            groups: dict[Any, list[Job]] = {}
            for job in jobs:
                groups.setdefault((job.settings, job.top_logprobs is not None), []).append(job)
            for group in groups.values():
                self.batches += 1
                self.decoded += len(group)
                try:
                    results = await asyncio.to_thread(self._decode, group)
                except Exception:  # a failure answers its requests with a 500; the server carries on
                    log.exception("decoding failed")
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(RequestError(500, "decoding failed", code="server_error"))
                    continue
                for job, choices in zip(group, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(choices)

    def _decode(self, jobs: Sequence[Job]) -> list[list[Choice]]:
        """One group's outputs as choices; where logprobs are asked, from one teacher-forced pass over them all."""
        settings = jobs[0].settings
        outputs = self.generator.generate([j.source for j in jobs], settings)
        results = [[_choice(self.tm, job, g) for g in written] for job, written in zip(jobs, outputs, strict=True)]
        scored = [
            (job, c)
            for job, choices in zip(jobs, results, strict=True)
            if job.top_logprobs is not None
            for c in choices
            if c.tokens
        ]
        if not scored:
            return results
        sources = [self.source_ids(job.source) for job, _ in scored]
        targets = [self.tm.target_ids(c.tokens) for _, c in scored]
        k = max(max(job.top_logprobs for job, _ in scored), 1)
        chosen, ids, values = forced_logprobs(self.tm, sources, targets, k)
        at = len(self.tm.output_prefix([]))  # the target's own leading special tokens (a decoder start)
        for (job, choice), row_chosen, row_ids, row_values in zip(scored, chosen, ids, values, strict=True):
            end = at + len(choice.tokens)
            choice.logprobs = row_chosen[at:end]
            pairs = zip(row_ids[at:end], row_values[at:end], strict=True)
            choice.top = [list(zip(i, v, strict=True))[: job.top_logprobs] for i, v in pairs]
        return results

    def token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.pieces.get(token, b"")
        return raw.decode("utf-8", errors="replace"), list(raw)


def _choice(tm: TextModel, job: Job, g: Generated) -> Choice:
    """A generated output as the request asked for it: cut at its stop strings, with its finish reason (logprobs
    empty until `Engine._decode` fills them, when asked)."""
    text, tokens, stopped = _cut_at_stop(tm, list(g.tokens), job.stop)
    ended = g.new_tokens > len(g.tokens)  # it wrote EOS (counted in new_tokens, not a text token)
    finish = "stop" if stopped or ended or g.new_tokens < job.settings.max_new_tokens else "length"
    choice = Choice(text, tokens, finish, len(tokens) if stopped else g.new_tokens)
    if job.top_logprobs is not None:
        choice.logprobs, choice.top = [], []
    return choice


def _cut_at_stop(tm: TextModel, tokens: list[int], stop: Sequence[str]) -> tuple[str, list[int], bool]:
    """The output's text (unstripped: a client appends it to its prompt) up to the first stop string, not included;
    the tokens that write it (the longest run that reads no further than the cut); whether a stop string hit."""
    text = tm.tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s and s in text]
    if not cuts:
        return text, tokens, False
    text = text[: min(cuts)]
    kept = 0
    while kept < len(tokens) and text.startswith(tm.tokenizer.decode(tokens[: kept + 1], skip_special_tokens=True)):
        kept += 1
    return text, tokens[:kept], True


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def _number(body: dict, key: str, default: float | None, low: float, high: float, integer: bool = False) -> Any:
    """`body[key]` (the default when absent or null), a `RequestError` unless a number (an integer) in [low, high]."""
    value = body.get(key, default)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {what} in [{low}, {high}], got {value!r}", key, "invalid_value")
    return value


def _integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    return _number(body, key, default, low, high, integer=True)


def settings_of(body: dict, cfg: ServeConfig) -> tuple[GenerationSettings, tuple[str, ...]]:
    """The generation settings and stop strings a request asks for, checked (a `RequestError` naming the field)."""
    max_tokens = body.get("max_completion_tokens") if body.get("max_tokens") is None else body["max_tokens"]
    if max_tokens is not None and isinstance(max_tokens, int) and max_tokens > cfg.max_tokens:
        raise RequestError(
            400, f"max_tokens is {max_tokens}, over this server's limit of {cfg.max_tokens}", "max_tokens",
            "invalid_value",
        )  # fmt: skip
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 16, 1, cfg.max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-9, 1.0)
    n = _integer(body, "n", 1, 1, cfg.max_batch_size)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_value")
    if temperature == 0 and n > 1:
        raise RequestError(400, "n > 1 needs temperature > 0 (greedy decoding has one output)", "n", "invalid_value")
    greedy = temperature == 0
    settings = GenerationSettings(
        kind="greedy" if greedy else "sample",
        max_new_tokens=max_tokens,
        num_return=n,
        temperature=1.0 if greedy else temperature,
        top_p=top_p,
        seed=0 if greedy else (seed if seed is not None else random.randrange(2**62)) % 2**63,  # greedy ones batch
    )
    return settings, tuple(stop)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def build_app(engine: Engine, name: str):
    """The FastAPI application serving `engine` as model `name`."""
    cfg = engine.cfg
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    faults = random.Random(cfg.fault_seed)
    app = FastAPI(title="distilgen serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    received = {"posts": 0}

    def error(err: RequestError) -> JSONResponse:
        headers = {"Retry-After": "0"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            received["posts"] += request.method == "POST"
            if key is not None:
                scheme, _, given = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                    return error(RequestError(401, "invalid or missing API key", code="invalid_api_key"))
            if request.method == "POST" and cfg.fault_rate and faults.random() < cfg.fault_rate:
                status = faults.choice(cfg.fault_status)
                return error(RequestError(status, f"injected fault ({status})", code="injected_fault"))
        return await call_next(request)  # a route's RequestError reaches the handler below

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return error(err)

    @app.exception_handler(StarletteHTTPException)
    async def routing(request: Request, err: StarletteHTTPException):  # no such path, a wrong method
        return error(
            RequestError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)
        )

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        log.exception("request failed")
        return error(RequestError(500, "the server failed on this request", code="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "requests": received["posts"], "batches": engine.batches,
                "prompts_decoded": engine.decoded}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "distilgen"}],
        }

    async def read(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object", code="invalid_json")
        if "model" not in body:
            raise RequestError(400, "'model' is required", "model", "invalid_value")
        if body.get("model") != name:
            raise RequestError(404, f"model '{body.get('model')}' is not served here; it serves '{name}'", "model",
                               "model_not_found")  # fmt: skip
        return body

    async def complete(
        sources: list[str], settings: GenerationSettings, stop: tuple[str, ...], top: int | None, chat: bool
    ) -> tuple[list[list[Choice]], dict[str, int]]:
        """Decode every source (checked first: none empty, none too long); the choices and the request's usage."""
        lengths = await asyncio.to_thread(lambda: [engine.prompt_tokens(s) for s in sources])
        limit = engine.prompt_limit(settings.max_new_tokens)
        field = "messages" if chat else "prompt"
        for length in lengths:
            if length == 0:
                raise RequestError(400, "the prompt is empty (no tokens)", field, "invalid_value")
            if length > limit:
                message = f"the prompt is {length} tokens, over this model's limit of {limit} (with max_tokens "
                raise RequestError(400, message + f"{settings.max_new_tokens})", field, "context_length_exceeded")
        if top is not None and engine.tm.runtime is not None:
            raise RequestError(400, "this model is an export (CTranslate2): it gives no logprobs", "logprobs")
        loop = asyncio.get_running_loop()
        jobs = [Job(s, settings, stop, top, loop.create_future()) for s in sources]
        results = await asyncio.gather(*(engine.submit(job) for job in jobs))
        completion = sum(c.new_tokens for choices in results for c in choices)
        usage = {"prompt_tokens": sum(lengths), "completion_tokens": completion}
        return results, {**usage, "total_tokens": usage["prompt_tokens"] + completion}

    def legacy_logprobs(choice: Choice) -> dict | None:
        if choice.logprobs is None:
            return None
        texts = [engine.token_text(t)[0] for t in choice.tokens]
        offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        top = [{engine.token_text(i)[0]: v for i, v in alts} for alts in choice.top or []]
        return {"tokens": texts, "token_logprobs": choice.logprobs, "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs(choice: Choice) -> dict | None:
        if choice.logprobs is None:
            return None
        content = []
        for token, logprob, alts in zip(choice.tokens, choice.logprobs, choice.top or [], strict=True):
            text, raw = engine.token_text(token)
            options = [dict(zip(("token", "bytes"), engine.token_text(i), strict=True), logprob=v) for i, v in alts]
            content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": options})
        return {"content": content}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request)
        prompt = body.get("prompt")
        sources = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
            raise RequestError(400, "'prompt' must be a string or a list of strings", "prompt", "invalid_value")
        settings, stop = settings_of(body, cfg)
        top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        results, used = await complete(sources, settings, stop, top, chat=False)
        choices = [
            {"index": p * settings.num_return + i, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": legacy_logprobs(c)}
            for p, cs in enumerate(results) for i, c in enumerate(cs)
        ]  # fmt: skip
        answer = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": name, "choices": choices, "usage": used}  # fmt: skip
        return stream(answer, "text", _include_usage(body)) if body.get("stream") else answer

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects with text "
                               "content", "messages", "invalid_value")  # fmt: skip
        settings, stop = settings_of(body, cfg)
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if body.get("logprobs") else None
        source = engine.chat_source([{"role": m["role"], "content": _text(m["content"])} for m in messages])
        results, used = await complete([source], settings, stop, top, chat=True)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": chat_logprobs(c)}
            for i, c in enumerate(results[0])
        ]  # fmt: skip
        answer = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                  "model": name, "choices": choices, "usage": used}  # fmt: skip
        return stream(answer, "chat", _include_usage(body)) if body.get("stream") else answer

    def stream(answer: dict, kind: Literal["text", "chat"], with_usage: bool):
        """The finished answer as server-sent events: per choice its tokens' text (a chat's first delta with the
        role), then its finish reason; the usage last when `stream_options.include_usage` asks for it."""

        def events():
            base = {k: answer[k] for k in ("id", "created", "model")}
            base["object"] = "text_completion" if kind == "text" else "chat.completion.chunk"
            for choice in answer["choices"]:
                text = choice["text"] if kind == "text" else choice["message"]["content"]
                first = kind == "chat"
                for piece in _pieces(engine, text) or ([""] if first else []):
                    delta = {"content": piece, **({"role": "assistant"} if first else {})}
                    part = {"index": choice["index"], "finish_reason": None}
                    part |= {"text": piece, "logprobs": None} if kind == "text" else {"delta": delta, "logprobs": None}
                    first = False
                    yield f"data: {json.dumps({**base, 'choices': [part]})}\n\n"
                end = {"index": choice["index"], "finish_reason": choice["finish_reason"]}
                end |= {"text": ""} if kind == "text" else {"delta": {}}
                yield f"data: {json.dumps({**base, 'choices': [end]})}\n\n"
            if with_usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': answer['usage']})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _is_message(m: Any) -> bool:
    return (
        isinstance(m, dict)
        and m.get("role") in ("system", "developer", "user", "assistant")
        and isinstance(m.get("content"), str | list)
    )


def _text(content: str | list) -> str:
    """A message's text: the string, or its text parts joined (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise RequestError(400, "only text content parts are supported", "messages", "invalid_value")
    return "".join(p["text"] for p in content)


def _pieces(engine: Engine, text: str) -> list[str]:
    """The text as the model's tokens write it, one string per token (for streaming)."""
    ids = engine.tm.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, written = [], ""
    for n in range(1, len(ids) + 1):
        now = engine.tm.tokenizer.decode(ids[:n], skip_special_tokens=True)
        if now.startswith(written) and not now.endswith("\ufffd"):
            pieces.append(now[len(written) :])
            written = now
    if not text.startswith(written):  # the tokens do not spell it back: one piece
        return [text]
    pieces.append(text[len(written) :])
    return [p for p in pieces if p]


def serve(cfg: ServeConfig) -> None:
    """Load the model and answer requests until interrupted."""
    import uvicorn

    tm = load_model(ModelConfig(path=cfg.model), key="", allow_export=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tm.to(device)
    if tm.runtime is None and (
        cfg.precision == "bf16"
        or (cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    ):
        tm.model.to(torch.bfloat16)
    tm.model.eval()
    name = cfg.name or model_label(cfg.model)
    app = build_app(Engine(tm, cfg), name)
    print(f"serving {cfg.model} as '{name}' on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
