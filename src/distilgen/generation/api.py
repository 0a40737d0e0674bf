"""The backend for an LLM behind an OpenAI-compatible API: one request per input (its samples as `n`), sent
concurrently, retried where a retry can help, counted in tokens and money.

    generator = open_generator("api", ApiConfig(base_url="http://127.0.0.1:8000/v1", model="m"), prompt=prompt)
    outputs = generator.generate(sources, get_spec("sample").settings(), topk=5)   # Generated with token_bytes

An output carries the endpoint's tokens as bytes (`Generated.token_bytes`) and, when asked, the top-k candidates of
each (`topk_bytes`, `topk_logprobs`): there is no vocabulary here, so each student maps them onto its own
(`token_alignment`). Sample i of an input is in the request asking samples i..j with seed
`sample_seed(seed, input, i)`: where the endpoint honours `seed`, a rerun gets the same text.

The first request of a generator goes alone: a 400, 401, 403, 404 or 422 stops the run with one line (a wrong key
or model costs one request). 429, 5xx, timeouts and lost connections are retried with exponential backoff and
jitter, or after the server's Retry-After. `ApiConfig.budget` is never passed: a request is sent only if the cost
spent plus the most that every request in flight can cost stays within it (a prompt is at most one token per byte,
an answer at most max_tokens per sample).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distilgen.config import ApiConfig, ConfigError, GenerationSettings
from distilgen.generation import Generated, input_key, sample_seed

log = logging.getLogger(__name__)

MAX_TOPK = 20
"""The most alternatives per token the OpenAI API returns."""

_FATAL = (401, 403, 404)
"""Statuses that no retry or other input can fix: the run stops at once."""

MAX_REFUSED_IN_A_ROW = 3
"""400/422 answers with no success between them after which the endpoint is taken to refuse every request."""


class EndpointError(RuntimeError):
    """The endpoint kept failing after every retry (or answered what cannot be read): one line, exit code 1."""


@dataclass
class Usage:
    """What a generator's requests cost so far."""

    requests: int = 0
    """Requests answered."""
    refused: int = 0
    """Inputs the endpoint refused (a 400 or 422 for that request alone: too long, filtered): left missing."""
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    """In the currency of `ApiConfig.price_*`."""
    reserved: float = 0.0
    """The most the requests in flight can still cost."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, usage: Any, cfg: ApiConfig, reserve: float = 0.0) -> None:
        """Add one answered request with its `usage` (a response's, or its JSON); one that reports none costs its
        `reserve` (the most it could cost), so that a budget still holds."""
        prompt, completion = _get(usage, "prompt_tokens") or 0, _get(usage, "completion_tokens") or 0
        with self.lock:
            self.requests += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            priced = (prompt * cfg.price_input + completion * cfg.price_output) / 1e6
            self.cost += priced if usage is not None else reserve

    def charge(self, amount: float) -> None:
        """Count a cost with no answer (a timed-out request the endpoint may still bill)."""
        with self.lock:
            self.cost += amount

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "refused": self.refused,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": round(self.cost, 6),
        }

    def postfix(self) -> dict[str, str]:
        """Progress-bar fields."""
        return {"req": str(self.requests), "tok": str(self.prompt_tokens + self.completion_tokens),
                "cost": f"{self.cost:.4f}"}  # fmt: skip


@dataclass(frozen=True)
class ApiPrompt:
    """What the endpoint reads for a source: chat messages (system, demonstrations as turns, the source) or, for
    plain completions, the demonstrations and the source as text; and what is kept of its answer."""

    chat: bool
    system: str | None
    demonstrations: tuple[tuple[str, str], ...]
    """shots + 1 candidates (`prompts.choose_demonstrations`): the first `shots`, or the spare in place of the input."""
    shots: int
    finish: Callable[[str], str]

    def demos(self, source: str) -> list[tuple[str, str]]:
        return [d for d in self.demonstrations if d[0] != source][: self.shots]

    def request(self, source: str) -> dict[str, Any]:
        """The request's `messages` (chat) or `prompt` (completions)."""
        if not self.chat:
            return {"prompt": "".join(f"{s} {t}\n\n" for s, t in self.demos(source)) + source}
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for demo_source, demo_target in self.demos(source):
            messages += [{"role": "user", "content": demo_source}, {"role": "assistant", "content": demo_target}]
        return {"messages": [*messages, {"role": "user", "content": source}]}


@dataclass(frozen=True)
class _Request:
    at: int
    """The source's position in the call."""
    source: str
    indices: tuple[int, ...]


class ApiGenerator:
    """A `generation.Generator` over an OpenAI-compatible endpoint."""

    def __init__(self, cfg: ApiConfig, prompt: ApiPrompt, client: Any = None):
        self.cfg = cfg
        self.prompt = prompt
        self.usage = Usage()
        self.budget = cfg.budget
        """This process's share of `cfg.budget` (`share_budget`)."""
        self._probed = False
        self._stop = threading.Event()
        self._over_budget = False
        self._refused_in_a_row = 0
        if client is None:
            try:
                import openai
            except ImportError:
                raise ConfigError("teacher.kind", "an api teacher needs the openai client: pip install "
                                  "'distilgen[api]'") from None  # fmt: skip

            key = os.environ.get(cfg.api_key_env) or "none"  # a local server takes any key
            client = openai.OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout_s)
        self.client = client

    def share_budget(self, processes: int) -> None:
        """Under `accelerate launch`, each of `processes` writers may spend its share of the budget."""
        self.budget = None if self.cfg.budget is None else self.cfg.budget / processes

    # Requests -------------------------------------------------------------------------------------

    def body(self, source: str, settings: GenerationSettings, indices: Sequence[int], topk: int) -> dict[str, Any]:
        """The JSON body of the request for samples `indices` of `source` (also a Batch API line's body)."""
        check_settings(settings, topk)
        body: dict[str, Any] = {"model": self.cfg.model, **self.prompt.request(source)}
        body["max_tokens"] = settings.max_new_tokens
        if len(indices) > 1:
            body["n"] = len(indices)
        if settings.kind == "sample":
            body.update(temperature=settings.temperature, top_p=settings.top_p)
            body["seed"] = sample_seed(settings.seed, input_key(source), indices[0]) % 2**31
        else:
            body["temperature"] = 0.0
        if topk:
            if self.prompt.chat:
                body.update(logprobs=True, top_logprobs=topk)
            else:
                body["logprobs"] = topk
        return body

    def _reserve(self, body: dict[str, Any]) -> float:
        """The most a request can cost: a token per byte of prompt, max_tokens per sample."""
        prompt = json.dumps(body.get("messages") or body.get("prompt"), ensure_ascii=False).encode()
        answers = body["max_tokens"] * body.get("n", 1)
        return (len(prompt) * self.cfg.price_input + answers * self.cfg.price_output) / 1e6

    def _send(self, body: dict[str, Any], reserve: float) -> Any:
        """One request, retried on what a retry can fix; its usage counted (the reserve where it reports none, or
        where it timed out: it may still be billed)."""
        import openai

        create = self.client.chat.completions.create if self.prompt.chat else self.client.completions.create
        for attempt in range(self.cfg.max_retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            try:
                response = create(**body)
                break
            except openai.APIStatusError as err:
                if err.status_code in _FATAL:
                    raise _fatal(self.cfg, err) from None
                if 400 <= err.status_code < 500 and err.status_code not in (408, 429):
                    raise _Refused(err) from None
                wait, what = _retry_after(err.response), f"answered {err.status_code}"
            except openai.APIConnectionError as err:  # timeouts included
                if isinstance(err, openai.APITimeoutError):
                    self.usage.charge(reserve)
                wait, what = None, f"unreachable ({type(err).__name__})"
            if attempt == self.cfg.max_retries:
                raise EndpointError(f"{self.cfg.base_url} {what} after {attempt} retries (teacher.api.max_retries)")
            with self.usage.lock:
                self.usage.retries += 1
            cap = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt)
            self._stop.wait(min(wait, self.cfg.max_backoff_s) if wait is not None else cap * random.uniform(0.5, 1))
        self.usage.count(_get(response, "usage"), self.cfg, reserve)
        return response

    def _answer(self, request: _Request, settings: GenerationSettings, topk: int) -> list[Generated]:
        body = self.body(request.source, settings, request.indices, topk)
        reserve = self._reserve(body)
        with self.usage.lock:
            if self._stop.is_set():
                raise _Stopped()
            if self.budget is not None and self.usage.cost + self.usage.reserved + reserve > self.budget:
                self._over_budget = True
                self._stop.set()
                raise _Stopped()
            self.usage.reserved += reserve
        try:
            response = self._send(body, reserve)
        finally:
            with self.usage.lock:
                self.usage.reserved -= reserve
        try:
            return self.outputs(response, input_key(request.source), settings, request.indices, topk)
        except (TypeError, ValueError, KeyError) as err:
            what = f"{type(err).__name__}: {err}"
            raise EndpointError(f"{self.cfg.base_url} answered what cannot be read ({what})") from None

    def outputs(
        self, response: Any, key: str, settings: GenerationSettings, indices: Sequence[int], topk: int
    ) -> list[Generated]:
        """The samples `indices` of the input with key `key` in an answer (an `openai` response object, or a Batch
        API output's body)."""
        choices = sorted(_get(response, "choices") or [], key=lambda c: _get(c, "index") or 0)
        if len(choices) < len(indices):
            raise EndpointError(
                f"{self.cfg.base_url} returned {len(choices)} answers where {len(indices)} were asked (`n`): "
                "set teacher.api.max_n=1 for an endpoint that ignores n"
            )
        sampled = settings.kind == "sample"
        return [
            self._generated(choice, topk, sample_seed(settings.seed, key, i) if sampled else None)
            for choice, i in zip(choices, indices, strict=False)
        ]

    # Batch API files ---------------------------------------------------------------------------------

    def batch_lines(
        self, sources: Sequence[str], settings: GenerationSettings, indices: Sequence[Sequence[int]], topk: int
    ) -> list[dict[str, Any]]:
        """The OpenAI Batch API input lines asking samples `indices[i]` of each source (`max_n` per line); a line's
        `custom_id` is the input's key and its sample indices."""
        url = "/v1/chat/completions" if self.prompt.chat else "/v1/completions"
        return [
            {
                "custom_id": f"{input_key(source)}/{'.'.join(map(str, chunk))}",
                "method": "POST",
                "url": url,
                "body": self.body(source, settings, chunk, topk),
            }  # fmt: skip
            for source, wanted in zip(sources, indices, strict=True)
            for chunk in _chunks(list(wanted), self.cfg.max_n)
        ]

    def batch_answer(
        self, line: dict[str, Any], settings: GenerationSettings, topk: int
    ) -> tuple[str, list[int], list[Generated] | None]:
        """A Batch API output line as (input key, sample indices, outputs); outputs None for a failed request."""
        key, _, numbers = str(line.get("custom_id", "")).partition("/")
        if not numbers or not all(n.isdigit() for n in numbers.split(".")):
            raise ValueError(f"custom_id {line.get('custom_id')!r} is not one distilgen wrote (KEY/0.1.2)")
        indices = [int(n) for n in numbers.split(".")]
        response = line.get("response") or {}
        if line.get("error") or response.get("status_code") != 200:
            return key, indices, None
        body = response.get("body") or {}
        self.usage.count(body.get("usage"), self.cfg)
        return key, indices, self.outputs(body, key, settings, indices, topk)

    def _generated(self, choice: Any, topk: int, seed: int | None) -> Generated:
        message = _get(choice, "message")
        raw = (_get(message, "content") if message is not None else _get(choice, "text")) or ""
        text = self.prompt.finish(raw)
        tokens, candidates = _token_logprobs(_get(choice, "logprobs"), self.prompt.chat) if topk else ([], [])
        if topk and not tokens and raw:
            raise EndpointError(f"{self.cfg.base_url} returned no logprobs: this endpoint cannot give top-k (topk: 0)")
        kept = _prefix_reading(tokens, text)
        out = Generated(text, [], [], new_tokens=len(tokens), seed=seed)
        if topk:
            out.token_bytes = [t for t, _ in tokens[:kept]]
            out.topk_bytes = [[c for c, _ in alts[:topk]] for alts in candidates[:kept]]
            out.topk_logprobs = [[p for _, p in alts[:topk]] for alts in candidates[:kept]]
        return out

    # The Generator interface ------------------------------------------------------------------------

    def generate(
        self,
        sources: Sequence[str],
        settings: GenerationSettings,
        *,
        indices: Sequence[Sequence[int]] | None = None,
        topk: int = 0,
        prefixes: Sequence[Sequence[int]] | None = None,
        desc: str | None = None,
        on_done: Callable[[int, list[Generated]], None] | None = None,
    ) -> list[list[Generated]]:
        """See `generation.Generator.generate`; `on_done` is called in this thread as each source's answers arrive.

        Raises:
            ConfigError: the endpoint refused a request (a wrong key or model, a bad field), or the budget would be
                passed; the answers that arrived before were given to `on_done`.
            EndpointError: a request still failed after `max_retries` retries.
        """
        if prefixes is not None:
            raise ValueError("an endpoint cannot continue given tokens (prefixes)")
        check_settings(settings, topk)
        wanted = indices if indices is not None else [range(settings.num_return)] * len(sources)
        requests = [
            _Request(at, source, tuple(chunk))
            for at, (source, w) in enumerate(zip(sources, wanted, strict=True))
            for chunk in _chunks(list(w), self.cfg.max_n)
        ]
        out: list[list[Generated]] = [[] for _ in sources]
        left = [0] * len(sources)
        for r in requests:
            left[r.at] += 1

        def deliver(request: _Request, generated: list[Generated]) -> None:
            out[request.at] += generated
            left[request.at] -= 1
            if not left[request.at] and on_done is not None:
                on_done(request.at, out[request.at])

        self._stop.clear()
        self._over_budget = False
        self._refused_in_a_row = 0
        error: BaseException | None = None
        while requests and not self._probed and error is None and not self._stop.is_set():  # alone until answered
            request, requests, before = requests[0], requests[1:], self.usage.requests
            error = self._run(lambda r=request: deliver(r, self._answer(r, settings, topk)))
            self._probed = self.usage.requests > before
        pool = concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency)
        futures = {pool.submit(self._answer, r, settings, topk): r for r in requests} if error is None else {}
        handled: set[concurrent.futures.Future] = set()
        try:
            for future in concurrent.futures.as_completed(futures):
                handled.add(future)
                failed = self._run(lambda f=future: deliver(futures[f], f.result()))
                if failed is not None:  # stop sending; keep what is in flight, since it is paid for
                    self._stop.set()
                    error = error or failed
        except BaseException:  # an interrupt: send nothing more, keep what is answered, then stop
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for future, request in futures.items():
                if future not in handled and future.done() and not future.cancelled() and future.exception() is None:
                    with contextlib.suppress(Exception):
                        deliver(request, future.result())
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error
        if self._over_budget:
            raise ConfigError(
                "teacher.api.budget",
                f"{self.cfg.budget} would be passed by the next request (spent {self.usage.cost:.4f}); everything "
                "answered is stored: raise the budget and run again to continue",
            )
        return out

    def _run(self, work: Callable[[], None]) -> BaseException | None:
        """Do `work` (ask and deliver `request`); the error that must stop the run, if any. A request the endpoint
        refuses for itself alone (400, 422) leaves its input missing; `MAX_REFUSED_IN_A_ROW` refusals with no
        answer between them mean it refuses every request (a field it does not take): that stops the run."""
        try:
            work()
        except _Stopped:
            return None
        except _Refused as refused:
            with self.usage.lock:
                self.usage.refused += 1
                self._refused_in_a_row += 1
                systematic = self._refused_in_a_row >= MAX_REFUSED_IN_A_ROW
            log.warning("%s refused an input (%s): it is left missing", self.cfg.base_url, _error_message(refused.err))
            return _fatal(self.cfg, refused.err) if systematic else None
        except Exception as err:  # (an interrupt goes on up: `generate` stops sending and keeps what arrived)
            return err
        with self.usage.lock:
            self._refused_in_a_row = 0
        return None


class _Stopped(Exception):
    """A request not sent: the run is stopping (a refused request, the budget)."""


class _Refused(Exception):
    """The endpoint refused this request alone (400, 422): an input too long, a content filter."""

    def __init__(self, err: Any):
        super().__init__(str(err))
        self.err = err


def check_settings(settings: GenerationSettings, topk: int) -> None:
    """A `ConfigError` for what an endpoint cannot do: beams, sampling top-k, n-gram blocking, top-k over 20."""
    check = [
        (settings.kind != "beam", "kind", "beam search: an endpoint decodes greedy or sampled"),
        (settings.top_k == 0, "top_k", "sampling top-k: an endpoint samples with temperature and top_p"),
        (settings.no_repeat_ngram_size == 0, "no_repeat_ngram_size", "n-gram blocking"),
        (topk <= MAX_TOPK, "topk", f"{topk} alternatives per token: the OpenAI API returns at most {MAX_TOPK}"),
    ]
    for ok, key, what in check:
        if not ok:
            raise ConfigError(f"spec.{key}", f"an api teacher cannot give {what}")


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _get(obj: Any, name: str) -> Any:
    """A field of a response object or of its JSON (a Batch API output)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _piece(entry: Any) -> bytes:
    raw = _get(entry, "bytes")
    return bytes(raw) if raw is not None else (_get(entry, "token") or "").encode()


def _token_logprobs(logprobs: Any, chat: bool) -> tuple[list[tuple[bytes, float]], list[list[tuple[bytes, float]]]]:
    """Per written token its (bytes, log-prob), and its alternatives best first, the written token among them."""
    if logprobs is None:
        return [], []
    if chat:
        entries = _get(logprobs, "content") or []
        tokens = [(_piece(e), float(_get(e, "logprob"))) for e in entries]
        alternatives = [[(_piece(a), float(_get(a, "logprob"))) for a in _get(e, "top_logprobs") or []]
                        for e in entries]  # fmt: skip
    else:  # legacy completions: parallel lists, alternatives as {token: logprob}
        texts, values = _get(logprobs, "tokens") or [], _get(logprobs, "token_logprobs") or []
        tokens = [(t.encode(), float(v if v is not None else 0.0)) for t, v in zip(texts, values, strict=False)]
        given = _get(logprobs, "top_logprobs") or []
        alternatives = [[(t.encode(), float(v)) for t, v in (a or {}).items()] for a in given]
        alternatives += [[] for _ in range(len(tokens) - len(alternatives))]
    for token, alts in zip(tokens, alternatives, strict=True):
        if all(candidate != token[0] for candidate, _ in alts):
            alts.append(token)
        alts.sort(key=lambda a: -a[1])
    return tokens, alternatives


def _prefix_reading(tokens: Sequence[tuple[bytes, float]], text: str) -> int:
    """How many of the written tokens read `text` (the answer as kept: stripped, maybe cut at a line): the shortest
    prefix that does, else all."""
    written = b""
    for n, (piece, _) in enumerate(tokens):
        if written.decode(errors="ignore").strip() == text and (n or not text):
            return n
        written += piece
    return len(tokens)


def _retry_after(response: Any) -> float | None:
    """The server's Retry-After (seconds, or an HTTP date), if it gave one."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None  # unreadable: the backoff decides


def _fatal(cfg: ApiConfig, err: Any) -> ConfigError:
    """A refused request as one line naming the key most likely at fault."""
    key = {401: "api_key_env", 403: "api_key_env", 404: "model"}.get(err.status_code, "base_url")
    message = _error_message(err)
    hint = f" (the key is read from ${cfg.api_key_env})" if key == "api_key_env" else ""
    return ConfigError(f"teacher.api.{key}", f"{cfg.base_url} answered {err.status_code}: {message}{hint}")


def _error_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", err))


def open(cfg: ApiConfig, **options: Any) -> ApiGenerator:  # noqa: A001 (the backend entry point, `generation.BACKENDS`)
    return ApiGenerator(cfg, **options)
