"""Task metrics of generated text, registered by name, and the study's headline figures.

Every text metric scores a corpus: `fn(predictions, references) -> {name: value, ...sub-scores}`, with one
list of references per prediction (their number may vary between examples) and values on sacreBLEU's 0-100
scale. An empty prediction is scored as empty, never dropped, so a student that stops early pays for it.

    scores = compute_metrics(["bleu", "rouge"], ["the cat sat"], [["the cat sat", "a cat sat"]])

Perplexity is not a text metric: it needs the model's NLL of the gold targets, which evaluation computes;
`MODEL_METRICS` names it so that configs can ask for it beside the text metrics.
"""

import math
from collections.abc import Callable

import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from distilgen.registry import lookup, registrar

Metric = Callable[[list[str], list[list[str]]], dict[str, float]]

METRICS: dict[str, Metric] = {}
"""Text metrics by name, filled by `@register_metric`."""

MODEL_METRICS = ("perplexity",)
"""Metrics computed from the model's likelihood of the gold targets (by evaluation), not from generated text."""


register_metric = registrar(METRICS, "metric")
"""`@register_metric(name)` adds a text metric to `METRICS`, so configs can select it."""

REPORTED_PARTS: dict[str, tuple[str, ...]] = {"rouge": ("rouge1", "rouge2", "rougeL")}
"""Sub-scores that reports show beside their metric (scores in their own right, unlike BLEU's n-gram precisions)."""


def reported_scores(metrics: list[str]) -> list[str]:
    """The scores a report shows for `metrics`, in the order asked: each metric, then its `REPORTED_PARTS`."""
    return [key for name in metrics for key in (name, *REPORTED_PARTS.get(name, ()))]


def get_metric(name: str) -> Metric:
    """The text metric registered as `name`; a ValueError listing the valid names otherwise."""
    if name in MODEL_METRICS:
        raise ValueError(f"'{name}' is computed from the model by evaluation, not from generated text")
    return lookup(METRICS, name, "metric")


def compute_metrics(names: list[str], predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Score `predictions` with each named text metric and merge the results into one dict."""
    metrics = [get_metric(name) for name in names]  # fail on a bad name before scoring anything
    scores: dict[str, float] = {}
    for metric in metrics:
        scores.update(metric(predictions, references))
    return scores


def _check_corpus(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"example {i} has no reference")


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-example references into sacreBLEU's reference streams.

    sacreBLEU wants one stream per reference position, each as long as the corpus. Examples with fewer
    references are padded with None, which sacreBLEU skips; an empty string would count as a real, empty
    reference, the closest in length to a short output, and so hide BLEU's brevity penalty.
    """
    num_streams = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(num_streams)]


@register_metric("bleu")
def bleu(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """sacreBLEU corpus BLEU (13a tokenisation, case-sensitive); sub-scores are the 1-4-gram precisions
    (0-100) and the brevity penalty (a 0-1 factor, as sacreBLEU reports it: short outputs show up here)."""
    _check_corpus(predictions, references)
    score = sacrebleu.BLEU().corpus_score(predictions, _reference_streams(references))
    precisions = {f"bleu_precision_{n}": p for n, p in enumerate(score.precisions, start=1)}
    return {"bleu": score.score, **precisions, "bleu_brevity_penalty": score.bp}


@register_metric("chrf")
def chrf(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """sacreBLEU corpus chrF (character 6-grams, beta 2)."""
    _check_corpus(predictions, references)
    return {"chrf": sacrebleu.CHRF().corpus_score(predictions, _reference_streams(references)).score}


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@register_metric("rouge")
def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F1 with stemming, best reference per example, averaged over examples; `rouge` is the
    mean of the three (the study's "ROUGE mean"). rouge-score's tokeniser lowercases and keeps only ASCII
    letters and digits, so punctuation and non-Latin scripts are ignored."""
    _check_corpus(predictions, references)
    scorer = RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        best = scorer.score_multi(refs, prediction)
        for rouge_type in _ROUGE_TYPES:
            totals[rouge_type] += best[rouge_type].fmeasure
    scores = {rouge_type: 100 * total / len(predictions) for rouge_type, total in totals.items()}
    return {"rouge": sum(scores.values()) / len(scores), **scores}


def _normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


@register_metric("exact_match")
def exact_match(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Percentage of predictions equal to some reference, up to surrounding and repeated whitespace
    (case and punctuation count: for short, closed-form targets)."""
    _check_corpus(predictions, references)
    hits = sum(
        _normalize_whitespace(prediction) in {_normalize_whitespace(ref) for ref in refs}
        for prediction, refs in zip(predictions, references, strict=True)
    )
    return {"exact_match": 100 * hits / len(predictions)}


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp of the mean per-token NLL (in nats) of the gold targets, summed over the whole split by the caller
    so that every token weighs the same, whatever the batch it fell in."""
    if num_tokens < 1:
        raise ValueError(f"perplexity needs at least one target token, got {num_tokens}")
    return math.exp(nll_sum / num_tokens)


def gap_closed(kd: float, student: float, teacher: float, higher_is_better: bool = True) -> float | None:
    """Fraction of the student-teacher gap that distillation closed, (KD - S) / (T - S): the study's headline.

    1.0 means the distilled student matches the teacher, 0.0 that KD did no better than fine-tuning the
    student; it exceeds 1 or goes negative when KD beats the teacher or hurts. None when there is no gap to
    close: the teacher is no better than the fine-tuned student (a report says so rather than divide by zero or
    give a ratio whose sign means the opposite; JSON has no NaN).
    """
    gap = teacher - student
    if gap == 0 or (gap < 0) == higher_is_better:
        return None
    return (kd - student) / gap
