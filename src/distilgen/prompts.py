"""Prompts: how a model reads a source. An instruct LLM reads it through its chat template, with k labeled
demonstrations before it; the scaffolding around the source is fixed, so truncation cuts the source, never the
template.

    prompt = build_prompt(data_cfg.prompt, tokenizer, train_examples, is_encoder_decoder=False)
    before, after = prompt.affixes(source)        # token ids around the source's own tokens
    prompt.finish(" Paris.\\nThe capital...")      # "Paris." with first_line

`models.TextModel.encode` wraps every source in its model's prompt; `generation.hf` applies `finish` to what the
model writes; the teacher's fingerprint includes `Prompt.fingerprint()`, so PTs of another prompt are not mixed
with these.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from distilgen.config import ConfigError, DataConfig, PromptConfig
from distilgen.data import Example, load_splits

_SLOT = "\u0000SOURCE\u0000"
"""Stands for the source while a chat template is rendered; the text before and after it is the scaffolding."""


@dataclass(frozen=True, eq=False)
class Prompt:
    """One model's prompt (compared and hashed by identity: it holds the model's tokenizer)."""

    tokenizer: PreTrainedTokenizerBase
    chat: bool
    system: str | None
    candidates: tuple[tuple[str, str], ...]
    """shots + 1 (source, target) demonstrations: the first `shots`, or another in place of the input itself."""
    shots: int
    first_line: bool

    def demonstrations(self, source: str) -> tuple[tuple[str, str], ...]:
        """The demonstrations before `source`: never `source` itself."""
        return tuple(demo for demo in self.candidates if demo[0] != source)[: self.shots]

    def scaffolding_lengths(self) -> list[int]:
        """Tokens around the source for every set of demonstrations an input can get: the first `shots`, or (for an
        input that is one of them) the others with the spare one."""
        inputs = ["", *(source for source, _ in self.candidates[: self.shots])]
        return [sum(map(len, self.affixes(source))) for source in inputs]

    def affixes(self, source: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the source's own tokens."""
        return self._affixes(self.demonstrations(source))

    @functools.cache  # noqa: B019 (a handful of demonstration sets per prompt, which lives as long as its model)
    def _affixes(self, demos: tuple[tuple[str, str], ...]) -> tuple[list[int], list[int]]:
        before, after = self.render(_SLOT, demos).split(_SLOT)
        encode = functools.partial(self.tokenizer, add_special_tokens=False)
        return encode(before)["input_ids"] if before else [], encode(after)["input_ids"] if after else []

    def render(self, source: str, demos: Sequence[tuple[str, str]] | None = None) -> str:
        """The whole prompt as text (what the model reads, before tokenization)."""
        demos = self.demonstrations(source) if demos is None else demos
        if not self.chat:
            return "".join(f"{demo_source} {demo_target}\n\n" for demo_source, demo_target in demos) + source
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for demo_source, demo_target in demos:
            messages += [{"role": "user", "content": demo_source}, {"role": "assistant", "content": demo_target}]
        messages.append({"role": "user", "content": source})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @functools.cache  # noqa: B019 (once per prompt: a pass over the vocabulary)
    def line_breaks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Ids of the tokens that hold a line break, and of those that write only whitespace: with `first_line` an
        output ends at the first line break after some text, instead of running on to `max_new_tokens` for text
        that is cut anyway."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        breaks = tuple(i for i, text in enumerate(texts) if "\n" in text)
        return breaks, tuple(i for i, text in enumerate(texts) if not text.strip())

    def finish(self, text: str) -> str:
        """An output as the task wants it (`finish_output`)."""
        return finish_output(text, self.first_line)

    def describe(self) -> dict:
        """The prompt as JSON: its settings, demonstrations and fingerprint (saved beside a model)."""
        return {
            "fingerprint": self.fingerprint(),
            "chat": self.chat,
            "system": self.system,
            "demonstrations": [list(demo) for demo in self.candidates[: self.shots]],
            "spare_demonstration": list(self.candidates[self.shots]) if len(self.candidates) > self.shots else None,
            "first_line": self.first_line,
        }

    def fingerprint(self) -> str:
        """sha256 of everything that changes what the model reads or what is kept of its output."""
        fields = {
            "chat": self.chat,
            "system": self.system,
            "demonstrations": self.candidates,
            "shots": self.shots,
            "first_line": self.first_line,
            "template": self.tokenizer.chat_template if self.chat else None,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def build_prompt(
    cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase, train: Sequence[Example], is_encoder_decoder: bool
) -> Prompt | None:
    """The prompt `cfg` describes for a model with `tokenizer`; None where the model reads the plain source."""
    has_chat = bool(getattr(tokenizer, "chat_template", None)) and not is_encoder_decoder
    if cfg.chat == "on" and not has_chat:
        raise ConfigError(
            "data.prompt.chat", "on, but this model has no chat template (or is encoder-decoder): use auto or off"
        )
    chat = cfg.chat == "on" or (cfg.chat == "auto" and has_chat)
    candidates = choose_demonstrations(cfg, train)
    if not chat and not candidates and not cfg.first_line:
        return None
    return Prompt(tokenizer, chat, cfg.system if chat else None, candidates, cfg.shots, cfg.first_line)


def choose_demonstrations(cfg: PromptConfig, train: Sequence[Example]) -> tuple[tuple[str, str], ...]:
    """`cfg.shots` + 1 labeled (source, target) pairs of the training split, the same for every run: the first
    `shots` go before every input, the spare in place of an input that is itself one of them."""
    if not cfg.shots:
        return ()
    labeled = [e for e in train if e.target is not None]
    if len(labeled) < cfg.shots:
        raise ConfigError(
            "data.prompt.shots", f"{cfg.shots} demonstrations, but the training split has {len(labeled)} labeled"
        )
    chosen = random.Random(cfg.shots_seed).sample(range(len(labeled)), min(cfg.shots + 1, len(labeled)))
    return tuple((labeled[i].source, labeled[i].target) for i in chosen)


def finish_output(text: str, first_line: bool) -> str:
    """An output as the task wants it: stripped, and cut at its first line break with `first_line`."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if first_line else text


def prompt_for(data: DataConfig, tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool) -> Prompt | None:
    """`data.prompt` for a model with `tokenizer`, its demonstrations drawn from `data`'s training split; refused
    when the scaffolding alone leaves no room for a source within `data.max_source_length`."""
    train = load_splits(data, ("train",)).get("train", []) if data.prompt.shots else []
    prompt = build_prompt(data.prompt, tokenizer, train, is_encoder_decoder)
    if prompt is not None:
        longest = max(prompt.scaffolding_lengths())
        if longest >= data.max_source_length:
            raise ConfigError(
                "data.max_source_length",
                f"{data.max_source_length}, but the prompt alone takes {longest} tokens "
                "(chat template, system message, demonstrations): raise it or use fewer shots",
            )
    return prompt
