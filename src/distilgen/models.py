"""Models: load or build a `transformers` model, and one adapter over encoder-decoder and decoder-only.

The rest of distilgen sees a model only through `TextModel`, whose batches always hold the
target tokens in a fixed (B, T) layout and whose `target_logits` returns the (B, T, V) logits that
predict them, whatever the architecture. Decoder-only batches put the prompt left-padded and the
target right-padded (`[pad pad prompt | target pad]`), so target position t sits in the same column
for every row and teacher/student logits line up for word-level KD.

    tm = load_model(ModelConfig(arch="bart", hidden_size=64), texts=lambda: corpus)
    logits = tm.target_logits(tm.collate(tm.encode(examples)))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from distilgen.checkpoints import model_dir
from distilgen.config import DECODER_ONLY_FAMILIES, TASK_TOKENIZER, ConfigError, DataConfig, ModelConfig
from distilgen.generation.ct2 import is_export, manifest, open_runtime
from distilgen.generation.decode import (
    DecoderOnlySteps,
    EncoderDecoderSteps,
    cache_argument,
    decoder_config,
    forward_parameters,
)
from distilgen.objectives import cross_entropy, masked_sum
from distilgen.prompts import Prompt, prompt_for
from distilgen.students import shrink_layers

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, SEP = "<pad>", "<s>", "</s>", "<unk>", "<sep>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on task text, so runs need no download.

    Digits are split one by one, so numbers are copied digit by digit rather than memorised.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK, SEP], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, sep_token=SEP
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A randomly initialised model of family `cfg.arch`, sized by `cfg`, for offline work and tests.

    [init scale note] BART and GPT-2 default to weights of std 0.02, tuned for widths near 1024; at
    the small widths of students built from scratch that scale is far too small (a 128-wide BART took
    thousands of steps to learn to copy two words). Weights get std 1/sqrt(width) instead, as in
    fan-in initialisation; T5 already scales its initialisation by the width.
    """
    init_std = cfg.hidden_size**-0.5
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if cfg.arch == "bart":
        config = BartConfig(
            d_model=cfg.hidden_size,
            encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.decoder_layers,
            encoder_attention_heads=cfg.num_heads,
            decoder_attention_heads=cfg.num_heads,
            encoder_ffn_dim=cfg.ffn_size,
            decoder_ffn_dim=cfg.ffn_size,
            max_position_embeddings=cfg.max_positions,
            dropout=cfg.dropout,
            decoder_start_token_id=tokenizer.bos_token_id,
            forced_eos_token_id=None,
            init_std=init_std,
            **ids,
        )
        return BartForConditionalGeneration(config)
    if cfg.arch == "t5":
        if cfg.encoder_layers < 1:
            raise ConfigError("model.encoder_layers", "t5 needs at least one encoder layer")
        config = T5Config(
            d_model=cfg.hidden_size,
            d_kv=cfg.hidden_size // cfg.num_heads,
            d_ff=cfg.ffn_size,
            num_layers=cfg.encoder_layers,
            num_decoder_layers=cfg.decoder_layers,
            num_heads=cfg.num_heads,
            dropout_rate=cfg.dropout,
            decoder_start_token_id=tokenizer.pad_token_id,
            **ids,
        )
        return T5ForConditionalGeneration(config)
    if cfg.arch in DECODER_ONLY_FAMILIES:
        return AutoModelForCausalLM.from_config(_family_config(cfg, init_std, ids))
    config = GPT2Config(
        n_embd=cfg.hidden_size,
        n_layer=cfg.decoder_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.ffn_size,
        n_positions=cfg.max_positions,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        initializer_range=init_std,
        **ids,
    )
    return GPT2LMHeadModel(config)


FAMILY_MODEL_TYPES = {"gemma3": "gemma3_text"}
"""`arch` -> `transformers` model_type where they differ (Gemma 3's text-only model)."""


def _family_config(cfg: ModelConfig, init_std: float, ids: dict[str, int | None]):
    """The config of a small modern decoder-only model (rotary positions, RMSNorm, gated MLP, grouped-query
    attention), with the same keys for every family; the head size is hidden_size / num_heads."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        FAMILY_MODEL_TYPES.get(cfg.arch, cfg.arch),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.decoder_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        attention_dropout=cfg.dropout,
        initializer_range=init_std,
        tie_word_embeddings=True,
        **ids,
    )


# ---------------------------------------------------------------------------------------------
# Layouts: where the target tokens are and how to generate
# ---------------------------------------------------------------------------------------------


class Batch(TypedDict, total=False):
    """A collated batch (`TextModel.collate`): what a model reads, and what losses add beside it."""

    source_ids: torch.Tensor
    """(B, S) source tokens (decoder-only: the prompt, left-padded)."""
    source_mask: torch.Tensor
    """(B, S) 1 at real source tokens."""
    target_ids: torch.Tensor
    """(B, T) target tokens, right-padded (training and scoring only)."""
    target_mask: torch.Tensor
    """(B, T) 1 at real target tokens."""
    topk_ids: torch.Tensor
    """(B, T, k) a teacher's stored top-k token ids at each target position (PTs that carry them)."""
    topk_logprobs: torch.Tensor
    """(B, T, k) their log-probabilities."""
    topk_rows: torch.Tensor
    """(B,) 1 for the rows that have stored top-k."""
    row_weight: torch.Tensor
    """(B,) the weight of each row's loss (Joint-Teaching's within-batch mixing)."""


MODEL_INPUTS = ("source_ids", "source_mask", "target_ids", "target_mask")


def model_inputs(batch: Batch) -> Batch:
    """What a model reads of `batch` (`TextModel.target_logits`), without what losses add (stored top-k, row
    weights): a teacher run live on it, or rows stacked from batches that differ in those."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def round_up(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (padding widths: fewer distinct shapes)."""
    return -(-width // multiple) * multiple


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (len(rows), width): token rows padded to the longest, rounded up to `multiple`."""
    width = round_up(max(len(r) for r in rows), multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _pad_topk(items: Sequence[Encoded], width: int) -> Batch:
    """`topk_ids`/`topk_logprobs` (B, T, k) and `topk_rows` (B,), 1 for the items that have top-k; an item with fewer
    than k candidates fills the rest with its first id at log-prob -inf (an empty slot for `sparse_logits_kd`)."""
    k = max(it.topk_ids.shape[1] for it in items if it.topk_ids is not None)
    ids = torch.zeros((len(items), width, k), dtype=torch.long)
    logprobs = torch.zeros((len(items), width, k), dtype=torch.float32)
    rows = torch.zeros(len(items), dtype=torch.long)
    for i, it in enumerate(items):
        if it.topk_ids is not None:
            n, have = min(it.topk_ids.shape[0], width), it.topk_ids.shape[1]
            ids[i, :n, :have] = it.topk_ids[:n]
            ids[i, :n, have:] = it.topk_ids[:n, :1]
            logprobs[i, :n, :have] = it.topk_logprobs[:n]
            logprobs[i, :n, have:] = -math.inf
            rows[i] = 1
    return {"topk_ids": ids, "topk_logprobs": logprobs, "topk_rows": rows}


def inner_model(model: torch.nn.Module) -> PreTrainedModel:
    """The `transformers` model inside the wrapper training may put around it (DDP under `accelerate launch`),
    which holds its config and submodules; calls still go through the wrapper, which syncs gradients. On every
    training step: an unwrapped model is returned as is (accelerate's unwrapping walks every submodule, about
    0.25 ms)."""
    from accelerate.utils import extract_model_from_parallel

    return model if isinstance(model, PreTrainedModel) else extract_model_from_parallel(model)


class Layout(Protocol):
    """How one model family lays out a batch; `target_logits` returns (B, T, V) aligned with target_ids."""

    pad_source_left: bool
    steps: type[EncoderDecoderSteps | DecoderOnlySteps]
    """How `generation.decode.decode` runs this family's decoder one step at a time."""

    def target_logits(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor: ...

    def generate(
        self, model: PreTrainedModel, batch: Batch, prefix: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The new token ids, after the target tokens `prefix` (B, P) when given (the output continues them)."""
        ...


class EncoderDecoderLayout:
    pad_source_left = False
    steps = EncoderDecoderSteps

    def target_logits(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        target = batch["target_ids"]  # (B, T), padded with pad_token_id
        start = torch.full_like(target[:, :1], inner_model(model).config.decoder_start_token_id)
        decoder_input = torch.cat([start, target[:, :-1]], dim=1)
        out = model(input_ids=batch["source_ids"], attention_mask=batch["source_mask"], decoder_input_ids=decoder_input)
        return out.logits  # (B, T, V)

    def generate(
        self, model: PreTrainedModel, batch: Batch, prefix: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        if prefix is not None:
            start = torch.full((prefix.shape[0], 1), model.config.decoder_start_token_id, device=prefix.device)
            kwargs["decoder_input_ids"] = torch.cat([start, prefix], dim=1)
        config = decoder_config(model)
        deeper = config.num_hidden_layers != model.config.get_text_config(decoder=True).num_hidden_layers
        if deeper and "cache_implementation" not in kwargs:
            from transformers import DynamicCache, EncoderDecoderCache  # T5 with a deeper decoder (`decoder_config`)

            cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
            kwargs[cache_argument(model)] = cache
        out = model.generate(input_ids=batch["source_ids"], attention_mask=batch["source_mask"], **kwargs)
        return out[:, 1 + (0 if prefix is None else prefix.shape[1]) :]  # drop the decoder start and the prefix


class DecoderOnlyLayout:
    pad_source_left = True
    steps = DecoderOnlySteps

    def target_logits(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        source_len = batch["source_ids"].shape[1]
        ids = torch.cat([batch["source_ids"], batch["target_ids"]], dim=1)[:, :-1]  # (B, S + T - 1)
        mask = torch.cat([batch["source_mask"], batch["target_mask"]], dim=1)[:, :-1]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        width = batch["target_ids"].shape[1]
        if "logits_to_keep" in forward_parameters(type(inner_model(model))):
            # The LM head runs at the T target positions only, not over the prompt: with a 50k-150k vocabulary
            # the (B, S + T, V) logits would dominate a step's memory and time (`bench/target_logits.py`).
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width).logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return logits[:, source_len - 1 :]  # (B, T, V): position S-1+t predicts target token t

    def generate(
        self, model: PreTrainedModel, batch: Batch, prefix: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        ids, mask = batch["source_ids"], batch["source_mask"]
        if prefix is not None:
            ids, mask = torch.cat([ids, prefix], dim=1), torch.cat([mask, torch.ones_like(prefix)], dim=1)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out[:, ids.shape[1] :]  # drop the prompt (and the prefix)


# ---------------------------------------------------------------------------------------------
# TextModel: a model, its tokenizer and its layout
# ---------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of one example (target empty for unlabeled inputs)."""

    id: str
    source: list[int]
    target: list[int]
    topk_ids: torch.Tensor | None = None
    """(T, k) a teacher's top-k token ids at each target position (a stored PT's), for sparse Logits KD."""
    topk_logprobs: torch.Tensor | None = None
    """(T, k) their log-probabilities."""


@dataclass
class TruncationStats:
    sources: int = 0
    sources_truncated: int = 0
    targets: int = 0
    targets_truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class TextModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    layout: Layout
    prompt: Prompt | None = None
    """How it reads a source (chat template, demonstrations) and what is kept of an output; None: plain text."""
    runtime: Any = None
    """An exported model that generates in its place (`distilgen export`: CTranslate2); `model` is then an empty
    shell on the meta device that holds its config. None: the torch model generates."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.runtime is not None else next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TextModel:
        """Move the torch model to `device` (an export runs where it was opened)."""
        if self.runtime is None:
            self.model.to(device)
        return self

    def generator(self, max_source_length: int = 512, batch_size: int = 32, **options: Any):
        """The `generation.Generator` that writes for this model: the torch model's, or its export's."""
        from distilgen.generation import open_generator

        backend = "ct2" if self.runtime is not None else "hf"
        return open_generator(backend, self, max_source_length=max_source_length, batch_size=batch_size, **options)

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.layout, EncoderDecoderLayout)

    @functools.cached_property
    def _affixes(self) -> tuple[list[int], list[int]]:
        """The special tokens this tokenizer puts around a text (BART: <s> ... </s>, T5: ... </s>); found once
        (two tokenizer calls), not per PT."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x")["input_ids"]
        at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
        return full[:at], full[at + len(plain) :]

    def _source_affixes(self) -> tuple[list[int], list[int]]:
        """Encoder-decoder: the tokenizer's own special tokens; decoder-only: prompt + SEP when there is one (not
        under a chat template, whose assistant turn ends the prompt)."""
        if self.is_encoder_decoder:
            return self._affixes
        if self.prompt is not None and self.prompt.chat:
            return [], []
        return [], [self.tokenizer.sep_token_id] if self.tokenizer.sep_token_id is not None else []

    def _target_affixes(self) -> tuple[list[int], list[int]]:
        """The tokens around a target's text; it always ends in EOS."""
        eos = [self.tokenizer.eos_token_id]
        if not self.is_encoder_decoder:
            return [], eos
        prefix, suffix = self._affixes
        return prefix, suffix if suffix[-1:] == eos else suffix + eos

    def source_ids(self, content: Sequence[int]) -> list[int]:
        """The model input of the text tokens `content` (as `encode` lays it out, without truncation)."""
        prefix, suffix = self._source_affixes()
        return [*prefix, *content, *suffix]

    def target_ids(self, content: Sequence[int]) -> list[int]:
        """The training target of the text tokens `content` (as `encode` lays it out, without truncation)."""
        prefix, suffix = self._target_affixes()
        return [*prefix, *content, *suffix]

    def output_prefix(self, content: Sequence[int]) -> list[int]:
        """The target tokens up to and with the text tokens `content`: what an output continuing them starts with."""
        return [*self._target_affixes()[0], *content]

    def output_tokens(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
        """The text tokens of each generated row: up to the first EOS, special tokens removed."""
        eos, special = self.tokenizer.eos_token_id, set(self.tokenizer.all_special_ids)
        rows = []
        for row in ids.tolist() if isinstance(ids, torch.Tensor) else map(list, ids):
            if eos in row:
                row = row[: row.index(eos)]
            rows.append([t for t in row if t not in special])
        return rows

    def encode(
        self, examples: Iterable[Any], max_source_length: int = 512, max_target_length: int = 128, targets: bool = True
    ) -> tuple[list[Encoded], TruncationStats]:
        """Tokenize examples (anything with `id`, `source`, `target`), truncating and counting truncations.

        With `targets=False` only sources are encoded (for generation).

        Encoder-decoder: source and target carry the tokenizer's own special tokens (target ends in EOS).
        Decoder-only: prompt = source [+ SEP when the tokenizer has one]; target ends in EOS.
        """
        examples = list(examples)
        if not examples:
            return [], TruncationStats()
        special_pre, special_post = self._source_affixes()
        tgt_pre, tgt_post = self._target_affixes()
        stats = TruncationStats()
        sources = self.tokenizer([e.source for e in examples], add_special_tokens=False)["input_ids"]
        labeled = [targets and e.target is not None for e in examples]
        target_texts = [e.target if has else "" for e, has in zip(examples, labeled, strict=True)]
        target_ids_all = self.tokenizer(target_texts, add_special_tokens=False)["input_ids"]
        out = []
        for example, src, tgt, has_target in zip(examples, sources, target_ids_all, labeled, strict=True):
            src_pre, src_post = special_pre, special_post
            if self.prompt is not None:  # the scaffolding is kept whole; only the source's own tokens are cut
                before, after = self.prompt.affixes(example.source)
                src_pre, src_post = [*special_pre, *before], [*after, *special_post]
            keep = max(1, max_source_length - len(src_pre) - len(src_post))
            stats.sources += 1
            stats.sources_truncated += len(src) > keep
            target_ids: list[int] = []
            if has_target:
                keep_t = max_target_length - len(tgt_pre) - len(tgt_post)
                stats.targets += 1
                stats.targets_truncated += len(tgt) > keep_t
                target_ids = tgt_pre + tgt[:keep_t] + tgt_post
            out.append(Encoded(example.id, src_pre + src[:keep] + src_post, target_ids))
        return out, stats

    def collate(self, items: Sequence[Encoded], source_multiple: int = 1) -> Batch:
        """Padded tensors; the source width is rounded up to a multiple of `source_multiple` (fewer distinct
        shapes, for compiled decoding)."""
        pad = self.tokenizer.pad_token_id
        source_ids, source_mask = pad_rows(
            [it.source for it in items], pad, left=self.layout.pad_source_left, multiple=source_multiple
        )
        batch = {"source_ids": source_ids, "source_mask": source_mask}
        if all(it.target for it in items):
            batch["target_ids"], batch["target_mask"] = pad_rows([it.target for it in items], pad, left=False)
        if any(it.topk_ids is not None for it in items):
            batch.update(_pad_topk(items, batch["target_ids"].shape[1]))
        return batch

    def target_logits(self, batch: Batch) -> torch.Tensor:
        """(B, T, V) logits predicting `batch["target_ids"]`."""
        return self.layout.target_logits(self.model, batch)

    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the model and tokenizer so plain `transformers` loads them (`Auto*.from_pretrained`), and the prompt
        it reads sources through (`prompt.json`: what a user must send it, and what a later run checks).

        Args:
            state_dict: the weights to write instead of the model's own (a sharded model's, gathered whole).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        if self.prompt is not None:
            (path / PROMPT_FILE).write_text(json.dumps(self.prompt.describe(), indent=2))


def _layout_for(config: Any) -> Layout:
    return EncoderDecoderLayout() if getattr(config, "is_encoder_decoder", False) else DecoderOnlyLayout()


def avoid_cudnn_attention() -> None:
    """Keep PyTorch's attention off its cuDNN kernel (process-wide; flash and memory-efficient kernels remain).

    cuDNN attention builds a plan for every new input shape, about 0.25 s each on an H100, and length-sorted
    batches bring a new shape nearly every batch: it made sorted generation slower than an unsorted loop.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def load_model(
    cfg: ModelConfig,
    texts: Callable[[], Iterable[str]] | None = None,
    key: str = "model",
    data: DataConfig | None = None,
    allow_export: bool = False,
) -> TextModel:
    """Load `cfg.path` (hub id, directory, GGUF file) or build `cfg.arch` at random.

    A model built from scratch gets `cfg.tokenizer` if set, else a tokenizer trained on `texts()`. `key` is where
    `cfg` sits in the command's config (model, student, teacher; "" at the top), for errors naming its keys. With
    `data`, the model reads sources through `data.prompt` (`prompts.prompt_for`). An export (`distilgen export`)
    loads only where text is all that is asked (`allow_export`: evaluation, serving); elsewhere it is refused.
    """
    runtime = None
    if cfg.path is not None:
        try:
            path = model_dir(cfg)
            config = AutoConfig.from_pretrained(path)
        except ConfigError as err:
            raise err.under(key) from None
        except (OSError, ValueError) as err:  # not a model directory, an unknown hub id, no network, a bad GGUF
            reason = str(err).strip().splitlines()[0]
            raise ConfigError("path", f"cannot load a model from {cfg.path}: {reason}").under(key) from None
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        if is_export(path):  # `distilgen export`: CTranslate2 generates; the torch model only holds the config
            source = manifest(path).get("source")
            if not allow_export:
                message = f"{cfg.path} is an export (CTranslate2), which writes text only: use its source, {source}"
                raise ConfigError("path", message).under(key)
            if cfg.shrink is not None:
                raise ConfigError("shrink", "an export cannot be shrunk: shrink the model, then export it").under(key)
            with torch.device("meta"):
                model = auto.from_config(config)
            runtime = open_runtime(path, config.is_encoder_decoder, sum(p.numel() for p in model.parameters()))
        else:
            model = auto.from_pretrained(path)
        if cfg.shrink is not None:
            try:
                model = shrink_layers(model, cfg.shrink)
            except ConfigError as err:
                raise err.under(key) from None
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or path)
    else:
        if cfg.tokenizer not in (None, TASK_TOKENIZER):
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        elif texts is not None:
            tokenizer = train_tokenizer(texts(), cfg.vocab_size)
        else:
            raise ConfigError("tokenizer", "a model built from `arch` needs a tokenizer path or task text").under(key)
        model = build_model(cfg, tokenizer)
    if tokenizer.pad_token_id is None:  # GPT-2 style tokenizers have none
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompt = prompt_for(data, tokenizer, model.config.is_encoder_decoder) if data is not None else None
    if data is not None and cfg.path is not None:
        _check_saved_prompt(Path(path), prompt, key)
    return TextModel(model, tokenizer, _layout_for(model.config), prompt, runtime)


PROMPT_FILE = "prompt.json"
"""Beside a saved model: the prompt it was trained to read (`Prompt.describe()`)."""


def _check_saved_prompt(directory: Path, prompt: Prompt | None, key: str) -> None:
    """Warn when a model saved with one prompt is about to read sources through another (or none): its scores would
    measure the mismatch, not the model."""
    saved = directory / PROMPT_FILE
    if not saved.is_file():
        return
    trained = json.loads(saved.read_text())
    now = prompt.describe() if prompt is not None else None
    if now is None or now["fingerprint"] != trained.get("fingerprint"):
        log.warning(
            "%s: %s was trained to read sources through the prompt in %s, but this run's data.prompt gives %s: "
            "set data.prompt (and data.template, data.train for demonstrations) as in its training run",
            key or "model", directory, saved, "none" if now is None else "another one",
        )  # fmt: skip


def target_nll(tm: TextModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the target tokens and their count (dev loss and perplexity)."""
    per_token = cross_entropy(tm.target_logits(batch), batch["target_ids"])  # (B, T)
    return masked_sum(per_token, batch["target_mask"]), batch["target_mask"].sum()
