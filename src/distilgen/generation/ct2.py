"""The backend for a model exported to CTranslate2 (`distilgen export`): the same sources in, the same outputs out
as `hf.py` gives for the PyTorch model, decoded by CTranslate2's own kernels (int8 on a CPU).

    tm = load_model(ModelConfig(path="runs/deploy/student"))   # an export: tm.runtime is the CTranslate2 model
    outputs = open_generator("ct2", tm).generate(sources, DecodingConfig().settings())

Tokenizing, the prompt and what is kept of an output are the `TextModel`'s (its torch model is an empty shell on
the meta device, for its config). Greedy outputs are the PyTorch model's; sampling is seeded once per call
(CTranslate2 has no per-sample seed), so a sample depends on the batch it is drawn in. Beam search and n-gram
blocking are refused (CTranslate2's rank and block otherwise). Under `prompt.first_line` a single output per input
ends at its first line break after some text, as in the PyTorch loop.
It gives text only: no top-k, no prefixes (PTs and student PTs are the PyTorch model's work).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distilgen.config import ConfigError, GenerationSettings
from distilgen.data import Example
from distilgen.generation import Generated

MANIFEST = "export.json"
"""The file that marks a directory as a distilgen export."""
RUNTIME_DIR = "ctranslate2"
"""Where the CTranslate2 model lives inside an export."""


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


PARALLEL_PARAMETERS = 16_000_000
"""Below this many parameters an export decodes on one CPU thread. CTranslate2 splits every matrix product of a step
across its threads, and for a small model the threads' meeting costs more than the product: on a 2-core CPU a
1.3M-parameter Llama decoded 16x faster on one thread than on two, a 42.5M one 1.25x slower (BENCHMARKS.md,
"Deployed students")."""


def runtime_threads(parameters: int, available: int) -> int:
    """CTranslate2's threads for a model of `parameters` on a CPU where torch uses `available`."""
    return available if parameters >= PARALLEL_PARAMETERS else 1


def open_runtime(path: str | Path, is_encoder_decoder: bool, parameters: int) -> Any:
    """The CTranslate2 model of the export at `path`: a Translator (encoder-decoder) or a Generator, on the GPU when
    there is one, else with as many CPU threads as torch uses for a large model and one for a small one."""
    import ctranslate2
    import torch

    kind = ctranslate2.Translator if is_encoder_decoder else ctranslate2.Generator
    device = "cuda" if torch.cuda.is_available() and ctranslate2.get_cuda_device_count() else "cpu"
    torch_threads = torch.get_num_threads()
    runtime = kind(
        str(Path(path) / RUNTIME_DIR), device=device, intra_threads=runtime_threads(parameters, torch_threads)
    )
    # CTranslate2 sets the OpenMP thread count of the process, which torch shares: put torch's back, or every
    # PyTorch model after a small export (evaluated side by side, in one process) would run on one thread
    torch.set_num_threads(torch_threads)
    return runtime


def manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


class CT2Generator:
    """A `generation.Generator` over an exported model."""

    def __init__(self, tm: Any, max_source_length: int = 512, batch_size: int = 32, **_: Any):
        self.tm, self.max_source_length, self.batch_size = tm, max_source_length, batch_size

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
        """See `generation.Generator.generate`."""
        import ctranslate2

        from distilgen.generation.hf import finished_outputs

        if topk or prefixes is not None:
            raise ValueError("a CTranslate2 export writes text only: no top-k, no prefixes")
        if settings.kind == "beam" or settings.no_repeat_ngram_size:  # CTranslate2 ranks and blocks otherwise
            raise ConfigError("decoding", "an export decodes greedy or sampled, without n-gram blocking: its beam "
                              "search and blocking give other outputs than the PyTorch model's")  # fmt: skip
        tm = self.tm
        examples = [Example(str(i), s, None, ()) for i, s in enumerate(sources)]
        encoded = tm.encode(examples, self.max_source_length, targets=False)[0]
        tokens = [tm.tokenizer.convert_ids_to_tokens(e.source) for e in encoded]
        common: dict[str, Any] = {"beam_size": 1, "num_hypotheses": settings.num_return, "return_end_token": True}
        line_stop = tm.prompt is not None and tm.prompt.first_line and settings.num_return == 1
        if settings.kind == "sample":
            ctranslate2.set_random_seed(settings.seed)
            common.update(sampling_topk=settings.top_k, sampling_topp=settings.top_p,
                          sampling_temperature=settings.temperature)  # fmt: skip
        if tm.is_encoder_decoder:
            if line_stop:
                common["callback"] = _line_stop(*tm.prompt.line_breaks())
            results = tm.runtime.translate_batch(
                tokens, max_decoding_length=settings.max_new_tokens, min_decoding_length=0, max_input_length=0,
                max_batch_size=self.batch_size, **common,
            )  # fmt: skip
            rows = [[tm.tokenizer.convert_tokens_to_ids(h) for h in r.hypotheses] for r in results]
        else:
            rows = [[] for _ in tokens]
            per_batch = max(1, self.batch_size // settings.num_return)  # batch_size counts output rows, as in hf.py
            for group in prompt_groups([len(t) for t in tokens], per_batch, PROMPT_SPREAD):
                if line_stop:
                    common["callback"] = _line_stop(*tm.prompt.line_breaks())  # a group's rows count from 0
                results = tm.runtime.generate_batch(
                    [tokens[i] for i in group], max_length=settings.max_new_tokens, min_length=0,
                    include_prompt_in_result=False, max_batch_size=len(group), **common,
                )  # fmt: skip
                for i, result in zip(group, results, strict=True):
                    rows[i] = list(result.sequences_ids)
        wanted = indices if indices is not None else [range(settings.num_return)] * len(sources)
        out: list[list[Generated]] = []
        for at, (hypotheses, chosen) in enumerate(zip(rows, wanted, strict=True)):
            picked = [hypotheses[i] for i in chosen]
            texts, contents = finished_outputs(tm, tm.output_tokens(picked))
            written = [
                Generated(text, content, tm.target_ids(content), new_tokens=len(ids))
                for text, content, ids in zip(texts, contents, picked, strict=True)
            ]
            out.append(written)
            if on_done is not None:
                on_done(at, written)
        return out


PROMPT_SPREAD = 16
"""The most a decoder-only batch's prompts differ in length (tokens). CTranslate2 reads the prompts at once only up
to the shortest one's length; the rest of each longer prompt goes through the decoding loop a token per step, for
the whole batch (`bench/export_speed.py`: a batch of 32 man pages of 100 to 256 tokens ran slower than PyTorch)."""


def prompt_groups(lengths: Sequence[int], batch_size: int, spread: int) -> list[list[int]]:
    """Indices of prompts in batches of at most `batch_size` whose lengths differ by at most `spread`, shortest
    first: fewer prompt tokens in CTranslate2's decoding loop, at the price of more, smaller batches."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        last = groups[-1] if groups else None
        if last is None or len(last) == batch_size or lengths[i] - lengths[last[0]] > spread:
            groups.append([])
        groups[-1].append(i)
    return groups


def _line_stop(breaks: Sequence[int], blanks: Sequence[int]) -> Callable[[Any], bool]:
    """CTranslate2's per-step callback that ends a row at a line break once it has written text, as the PyTorch
    loop does under `prompt.first_line` (`decode`'s `stops`): the text kept is the same, and so is the work."""
    breaks, blanks, written = set(breaks), set(blanks), set()

    def step(result: Any) -> bool:
        if result.token_id in breaks and result.batch_id in written:
            return True
        if result.token_id not in blanks:
            written.add(result.batch_id)
        return False

    return step


def open(tm: Any, **options: Any) -> CT2Generator:  # noqa: A001 (the backend entry point, `generation.BACKENDS`)
    return CT2Generator(tm, **options)
