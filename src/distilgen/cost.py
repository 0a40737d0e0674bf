"""What a model costs to store and to run: parameters, size on disk, latency, throughput, peak memory.

The measuring functions take a closure that does the work (e.g. `lambda: model.generate(**one_input)`), so
they stay independent of how a model generates; evaluation builds the closures and reports the figures
beside the task metrics, teacher and student side by side.
"""

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from distilgen.generation.ct2 import RUNTIME_DIR

T = TypeVar("T")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by part, each shared tensor counted once.

    `embedding` holds the token embeddings and every other `nn.Embedding` (position, token type, relative
    position bias), with an LM head tied to them counted here only. `encoder` is the rest of an
    encoder-decoder model's encoder (0 for a decoder-only model), and `decoder` everything else, an untied
    LM head included: the parts that run once per generated token. embedding + encoder + decoder == total.
    """
    params = {id(p): p.numel() for p in model.parameters()}  # keyed by tensor identity: tied weights once
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embedding_ids.update(id(p) for p in module.parameters())
    encoder_ids: set[int] = set()
    if getattr(model.config, "is_encoder_decoder", False):
        encoder_ids = {id(p) for p in model.get_encoder().parameters()} - embedding_ids
    total = sum(params.values())
    embedding = sum(params[i] for i in embedding_ids)
    encoder = sum(params[i] for i in encoder_ids)
    return {"total": total, "embedding": embedding, "encoder": encoder, "decoder": total - embedding - encoder}


def size_on_disk(path: str | Path) -> dict[str, int]:
    """Bytes of a saved model directory: its weight files (`weights`) and all its top-level files (`total`).

    Weights are the `*.safetensors` files, or the `*.bin` files when there are none: hub repositories
    often ship both, and transformers loads only the safetensors. An export's are its runtime's (`ctranslate2/`).
    """
    runtime = Path(path) / RUNTIME_DIR
    files = [f for f in Path(path).iterdir() if f.is_file()]
    files += [f for f in runtime.iterdir() if f.is_file()] if runtime.is_dir() else []
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    weights = safetensors or [f for f in files if f.suffix == ".bin"]
    return {"weights": sum(f.stat().st_size for f in weights), "total": sum(f.stat().st_size for f in files)}


def _synchronize() -> None:
    """Wait for queued GPU work, so a timer stops when the work is done, not when it was launched."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and the seconds it took, the device's queued work included."""
    _synchronize()
    start = time.perf_counter()
    result = fn()
    _synchronize()
    return result, time.perf_counter() - start


def _p90(seconds: list[float]) -> float:
    """Linear interpolation between order statistics, as numpy.percentile; one value is its own p90."""
    return statistics.quantiles(seconds, n=10, method="inclusive")[-1] if len(seconds) > 1 else seconds[0]


def measure_latency(generate_one: Callable[[], Any], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median and 90th percentile seconds of `runs` calls of `generate_one`, after `warmup` untimed calls
    (the first calls pay for lazy initialisation, kernel selection and caches)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        generate_one()
    seconds = [_timed(generate_one)[1] for _ in range(runs)]
    return {"latency_median_s": statistics.median(seconds), "latency_p90_s": _p90(seconds)}


def measure_sample_latency(
    generate_one: Callable[[T], int], items: list[T], runs: int, warmup: int = 1
) -> dict[str, float]:
    """Latency of a model on its task: each of `items` generated alone, `runs` timed passes over all of them.

    `generate_one(item)` returns the tokens it generated. Each item's time is its median over the passes, so an
    item's own output length counts, but no one item decides the figure: `latency_s` is the mean over items (the
    expected cost of a request), `latency_p90_s` their 90th percentile, `latency_per_token_ms` the total time over
    the total tokens (comparable between models of one architecture whatever lengths they write; a request's fixed
    cost weighs more on short outputs). The first `warmup`
    items are generated once, untimed, first.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not items:
        raise ValueError("no items to time")
    for item in items[:warmup]:
        generate_one(item)
    seconds: list[list[float]] = [[] for _ in items]
    tokens = [0] * len(items)
    for _ in range(runs):
        for i, item in enumerate(items):
            tokens[i], took = _timed(lambda item=item: generate_one(item))
            seconds[i].append(took)
    medians = [statistics.median(s) for s in seconds]
    return {
        "latency_s": statistics.fmean(medians),
        "latency_p90_s": _p90(medians),
        "latency_per_token_ms": 1e3 * sum(medians) / max(sum(tokens), 1),
        "latency_examples": len(items),
        "output_tokens_mean": statistics.fmean(tokens),
    }


def measure_throughput(generate_batch: Callable[[list], int], items: list, batch_size: int) -> dict[str, float]:
    """Examples and generated tokens per second over `items`, generated in chunks of `batch_size`.

    `generate_batch(chunk)` returns the number of tokens it generated. Nothing is warmed up here: measure
    latency first, or call `generate_batch` once before, when the first call is slow.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        raise ValueError("no items to generate")
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    tokens, seconds = _timed(lambda: sum(generate_batch(chunk) for chunk in chunks))
    return {"examples_per_s": len(items) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def peak_memory(fn: Callable[[], T], device: torch.device | str) -> tuple[T, int]:
    """Run `fn` and return its result with the peak of allocated tensor memory, in bytes, it reached on the CUDA
    device `device`, weights included (what must fit on the GPU). There is no CPU counterpart: the process's
    resident set only grows, so it would say nothing about one model measured after another."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"peak memory is measured on a CUDA device, not {device}")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device)


def flops_per_token(model: torch.nn.Module, input_length: int, output_length: int) -> dict[str, float]:
    """Analytic forward FLOPs per input (source) token and per generated token.

    Each weight matrix costs 2 FLOPs per parameter per token; attention adds 2 * 2 * d per attended
    position (scores and weighted sum) per layer, counted at the average context length; the LM head
    (2 * V * d) is paid once per generated token. Decoder-only models read the input as a prompt.
    """
    config = model.config
    d = config.hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]
    counts = count_parameters(model)
    head = model.get_output_embeddings().weight
    untied_head = 0 if head is model.get_input_embeddings().weight else head.numel()
    decoder_body = counts["decoder"] - untied_head
    s, t = input_length, output_length
    if getattr(config, "is_encoder_decoder", False):
        enc_layers, dec_layers = config.num_hidden_layers, _decoder_layers(config)
        per_input = 2 * counts["encoder"] + 4 * enc_layers * d * s
        per_generated = 2 * decoder_body + 2 * vocab * d + 4 * dec_layers * d * (t / 2 + s)  # self + cross attention
    else:
        layers = config.num_hidden_layers
        per_input = 2 * decoder_body + 4 * layers * d * s / 2
        per_generated = 2 * decoder_body + 2 * vocab * d + 4 * layers * d * (s + t / 2)
    return {"per_input_token": float(per_input), "per_generated_token": float(per_generated)}


def _decoder_layers(config: Any) -> int:
    for key in ("decoder_layers", "num_decoder_layers"):
        if getattr(config, key, None):
            return getattr(config, key)
    return config.num_hidden_layers


def cost_report(
    model: torch.nn.Module, input_length: int, output_length: int, batch_size: int, latency_runs: int, seed: int = 0
) -> dict[str, Any]:
    """Parameters, analytic FLOPs, and measured latency (batch 1) and throughput (batch N) of `model`.

    Inputs are random token ids of `input_length`; every generation makes exactly `output_length`
    tokens (EOS ignored), so models are timed on the same work whatever they output.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs = torch.randint(10, vocab, (batch_size, input_length), generator=gen).to(device)
    fixed = {"min_new_tokens": output_length, "max_new_tokens": output_length, "do_sample": False, "num_beams": 1}
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def run(rows: list[int]) -> int:
        ids = inputs[rows]
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **fixed)
        return len(rows) * output_length

    report: dict[str, Any] = {
        "model_type": model.config.model_type,
        "parameters": count_parameters(model),
        "flops": flops_per_token(model, input_length, output_length),
        "input_length": input_length,
        "output_length": output_length,
    }
    report.update(measure_latency(lambda: run([0]), latency_runs))
    report["throughput"] = measure_throughput(run, list(range(batch_size)), batch_size)
    report["batch_size"] = batch_size
    model.train(was_training)
    return report
