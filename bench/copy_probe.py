"""Does a trained model copy? Teacher-forced loss of a model on the built-in task's dev split, by kind of token.

    python bench/copy_probe.py runs/bench/teacher/model runs/bench/student/model

Two measurements (nats per token, teacher-forced, so a model's own earlier mistakes do not count):

- gold summaries, split into the first piece of a name (which name to write), the rest of a name (copying it
  once begun: a model that copies puts this near 0), digits (the score) and the template's other words;
- two consecutive facts taken from the middle of the report as the target: a model that finds text by
  content pays for the first two tokens (which fact) and little for the rest; one that copies by position
  (target token i from source token i, the shortcut of plain denoising pre-training) pays for all of it.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict

import torch

from distilgen.config import BuiltinTaskConfig, ModelConfig
from distilgen.models import Encoded, TextModel, load_model
from distilgen.objectives import cross_entropy
from distilgen.tasks import CLUB_PREFIXES, CLUB_SUFFIXES, generate_split

NOT_NAMES = {"In", "It", "Neither", *CLUB_PREFIXES, *CLUB_SUFFIXES}
"""Capitalised words of the summaries that are not invented names."""


def token_kinds(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """name_start / name_rest / digit / other for each token of `text`, from its character offsets."""
    names = [m.span() for m in re.finditer(r"[A-Z][a-z]+", text) if m.group() not in NOT_NAMES]
    kinds = []
    for start, end in offsets:
        word = next(((a, b) for a, b in names if a <= start < b or a < end <= b), None)
        if word is not None:
            kinds.append("name_start" if start <= word[0] else "name_rest")
        else:
            kinds.append("digit" if re.search(r"\d", text[start:end]) else "other")
    return kinds


def per_token_nll(tm: TextModel, sources: list[str], targets: list[str], batch_size: int = 50) -> list[list[float]]:
    """Teacher-forced NLL of each content token of each target (special tokens left out)."""
    content = tm.tokenizer(targets, add_special_tokens=False)["input_ids"]
    skip = tm.target_ids([-1]).index(-1)  # target tokens before the content
    source_ids = tm.tokenizer(sources, add_special_tokens=False)["input_ids"]
    items = [
        Encoded(str(i), tm.source_ids(src), tm.target_ids(tgt))
        for i, (src, tgt) in enumerate(zip(source_ids, content, strict=True))
    ]
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(tm.device) for k, v in tm.collate(items[start : start + batch_size]).items()}
            nll = cross_entropy(tm.target_logits(batch), batch["target_ids"]).cpu()
            for row, ids in zip(nll, content[start : start + batch_size], strict=True):
                out.append(row[skip : skip + len(ids)].tolist())
    return out


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model directories")
    parser.add_argument("--examples", type=int, default=200, help="dev examples")
    args = parser.parse_args()

    dev = generate_split(BuiltinTaskConfig(dev_size=args.examples), "dev")
    rng = random.Random(0)
    facts = []  # two consecutive facts from the middle of each report
    for record in dev:
        sentences = re.split(r"(?<=\.) ", record["source"])
        k = rng.randrange(3, len(sentences) - 1)
        facts.append(" ".join(sentences[k : k + 2]))
    sources = [r["source"] for r in dev]
    golds = [r["targets"][0] for r in dev]
    print("| model | name start | name rest | digits | other words | mid-report facts: first 2 tokens | rest |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in args.models:
        tm = load_model(ModelConfig(path=path))
        tm.model.eval()
        by_kind = defaultdict(list)
        offsets = tm.tokenizer(golds, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for gold, spans, nll in zip(golds, offsets, per_token_nll(tm, sources, golds), strict=True):
            for kind, value in zip(token_kinds(gold, spans), nll, strict=True):
                by_kind[kind].append(value)
        probe = per_token_nll(tm, sources, facts)
        head, rest = [v for row in probe for v in row[:2]], [v for row in probe for v in row[2:]]
        cells = [mean(by_kind[k]) for k in ("name_start", "name_rest", "digit", "other")] + [mean(head), mean(rest)]
        print(f"| {path} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
