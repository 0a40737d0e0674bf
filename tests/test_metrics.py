import math

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from distilgen.metrics import METRICS, MODEL_METRICS, compute_metrics, gap_closed, get_metric, perplexity

PREDICTIONS = ["the cat sat on the mat today", "a dog barked at the mailman", "it rains in the north of spain"]
SINGLE_REFS = [["the cat sat on a mat today"], ["the dog barked at a mailman"], ["the rain falls mainly in spain"]]
# A variable number of references per example: 2, 1 and 3.
MULTI_REFS = [
    ["the cat sat on a mat today", "a cat was sitting on the mat"],
    ["the dog barked at a mailman"],
    ["the rain falls mainly in spain", "it rains in the north", "in spain it rains"],
]
# The same references as sacreBLEU streams, written out by hand: missing references are None.
MULTI_STREAMS = [
    ["the cat sat on a mat today", "the dog barked at a mailman", "the rain falls mainly in spain"],
    ["a cat was sitting on the mat", None, "it rains in the north"],
    [None, None, "in spain it rains"],
]


def rouge_by_hand(predictions, references):
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(refs, pred) for pred, refs in zip(predictions, references, strict=True)]
    return {t: 100 * sum(s[t].fmeasure for s in scores) / len(scores) for t in ("rouge1", "rouge2", "rougeL")}


def test_bleu_with_one_reference_equals_sacrebleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [[refs[0] for refs in SINGLE_REFS]])
    scores = METRICS["bleu"](PREDICTIONS, SINGLE_REFS)
    assert scores["bleu"] == pytest.approx(expected.score)
    assert scores["bleu_brevity_penalty"] == pytest.approx(expected.bp)
    assert [scores[f"bleu_precision_{n}"] for n in range(1, 5)] == pytest.approx(expected.precisions)


def test_bleu_with_a_variable_number_of_references_equals_sacrebleu_on_none_padded_streams():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, MULTI_STREAMS).score
    assert METRICS["bleu"](PREDICTIONS, MULTI_REFS)["bleu"] == pytest.approx(expected)


def test_bleu_does_not_let_a_short_output_match_a_missing_reference():
    predictions = [PREDICTIONS[0], "a dog", PREDICTIONS[2]]
    scores = METRICS["bleu"](predictions, MULTI_REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, MULTI_STREAMS).score)
    assert scores["bleu_brevity_penalty"] < 1
    # Padding with empty strings would make "" the closest reference length and hide the brevity penalty.
    empty_padded = [[ref or "" for ref in stream] for stream in MULTI_STREAMS]
    assert sacrebleu.corpus_bleu(predictions, empty_padded).bp == 1


def test_chrf_equals_sacrebleu_with_one_and_several_references():
    single = sacrebleu.corpus_chrf(PREDICTIONS, [[refs[0] for refs in SINGLE_REFS]]).score
    multi = sacrebleu.corpus_chrf(PREDICTIONS, MULTI_STREAMS).score
    assert METRICS["chrf"](PREDICTIONS, SINGLE_REFS) == {"chrf": pytest.approx(single)}
    assert METRICS["chrf"](PREDICTIONS, MULTI_REFS) == {"chrf": pytest.approx(multi)}


@pytest.mark.parametrize("references", [SINGLE_REFS, MULTI_REFS], ids=["single", "multi"])
def test_rouge_is_the_mean_over_examples_of_the_best_reference_f1(references):
    expected = rouge_by_hand(PREDICTIONS, references)
    scores = METRICS["rouge"](PREDICTIONS, references)
    assert {t: scores[t] for t in expected} == pytest.approx(expected)
    assert scores["rouge"] == pytest.approx(sum(expected.values()) / 3)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_predictions_identical_to_a_reference_score_100(name):
    predictions = [refs[-1] for refs in MULTI_REFS]
    assert METRICS[name](predictions, MULTI_REFS)[name] == pytest.approx(100)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_an_empty_prediction_is_scored_not_dropped(name):
    predictions = [refs[0] for refs in SINGLE_REFS]
    predictions[1] = ""
    assert METRICS[name](predictions, SINGLE_REFS)[name] < 100


def test_an_empty_prediction_counts_as_a_zero_in_the_average():
    predictions = ["", SINGLE_REFS[1][0]]
    assert METRICS["rouge"](predictions, SINGLE_REFS[:2])["rouge"] == pytest.approx(50)
    assert METRICS["exact_match"](predictions, SINGLE_REFS[:2])["exact_match"] == pytest.approx(50)


def test_exact_match_ignores_extra_whitespace_but_not_case():
    predictions = ["  Paris\n", "new  york", "Rome", "Lyon"]
    references = [["Paris"], ["New York"], ["Milan", "Rome"], ["Marseille"]]
    # Hits: Paris (whitespace only), Rome (second reference); misses: new york (case), Lyon.
    assert METRICS["exact_match"](predictions, references) == {"exact_match": 50.0}


def test_compute_metrics_merges_the_named_metrics():
    scores = compute_metrics(["bleu", "exact_match"], PREDICTIONS, MULTI_REFS)
    assert scores == {**METRICS["bleu"](PREDICTIONS, MULTI_REFS), "exact_match": 0.0}


def test_an_unknown_metric_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown metric 'blue'; choose one of: bleu, chrf, exact_match, rouge"):
        get_metric("blue")


def test_perplexity_is_a_model_metric_not_a_text_metric():
    assert "perplexity" in MODEL_METRICS and "perplexity" not in METRICS
    with pytest.raises(ValueError, match="computed from the model"):
        compute_metrics(["bleu", "perplexity"], PREDICTIONS, MULTI_REFS)


def test_mismatched_predictions_and_references_are_an_error():
    with pytest.raises(ValueError, match="3 predictions but 2 reference lists"):
        METRICS["bleu"](PREDICTIONS, MULTI_REFS[:2])
    with pytest.raises(ValueError, match="example 1 has no reference"):
        METRICS["rouge"](PREDICTIONS, [["a"], [], ["b"]])


def test_perplexity_is_exp_of_the_mean_token_nll():
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4)
    assert perplexity(0.0, 3) == 1.0


@pytest.mark.parametrize(
    ("kd", "student", "teacher", "expected"),
    [(30, 20, 40, 0.5), (40, 20, 40, 1.0), (20, 20, 40, 0.0), (45, 20, 40, 1.25), (15, 20, 40, -0.25)],
)
def test_gap_closed_by_hand(kd, student, teacher, expected):
    assert gap_closed(kd, student, teacher) == pytest.approx(expected)


def test_gap_closed_is_none_without_a_gap_to_close():
    assert gap_closed(30, 25, 25) is None
    assert gap_closed(0.2, 2.5, 2.1) is None  # the teacher scores below the fine-tuned student: nothing to close
    assert gap_closed(8.0, 10.0, 6.0, higher_is_better=False) == pytest.approx(0.5)  # perplexity: lower is better
    assert gap_closed(8.0, 6.0, 10.0, higher_is_better=False) is None
