import re
from collections import Counter

import pytest

from distilgen.config import BuiltinTaskConfig, ConfigError
from distilgen.tasks import (
    CLUB_PREFIXES,
    FIRST_NAMES,
    SURNAMES,
    TASKS,
    TOWNS,
    generate_split,
    parse_match_report,
    register_task,
)


def split(size: int = 200, name: str = "train", seed: int = 0) -> list[dict]:
    return generate_split(BuiltinTaskConfig(seed=seed, **{f"{name}_size": size}), name)


def test_the_same_seed_gives_the_same_split():
    assert split(50) == split(50)


def test_the_generator_is_pinned_so_recorded_benchmarks_stay_reproducible():
    first = split(1)[0]
    assert first["source"].startswith("Danbul Town visited Real Zasuk on Tuesday. 73' Danbul Town substitution, ")
    assert first["targets"][0] == "Real Zasuk and Danbul Town drew 1-1."


def test_another_seed_gives_other_examples():
    assert {r["source"] for r in split(50, seed=0)}.isdisjoint(r["source"] for r in split(50, seed=1))


def test_growing_a_split_keeps_its_first_examples():
    assert split(100)[:40] == split(40)


def test_splits_are_disjoint_and_ids_name_task_split_and_index():
    sources = {name: {r["source"] for r in split(200, name)} for name in ("train", "unlabeled", "dev", "test")}
    assert sum(map(len, sources.values())) == len(set().union(*sources.values())) == 800
    assert split(3, "dev")[2]["id"] == "match_reports-dev-000002"


def test_references_agree_with_the_facts_in_the_report():
    for record in split(400):
        match = parse_match_report(record["source"])
        home, away, scorers = match["home"], match["away"], match["scorers"]
        score = {home: match["goals"][home], away: match["goals"][away]}
        if sum(score.values()) == 1:
            highlighted = set(scorers)  # the scorer of the only goal
        else:
            highlighted = {player for player, count in scorers.items() if count > 1}
        for reference in record["targets"]:
            assert home in reference and away in reference
            first, second = sorted((home, away), key=reference.find)
            if numbers := re.search(r"(\d)-(\d)", reference):
                assert (int(numbers[1]), int(numbers[2])) == (score[first], score[second])
            else:
                assert "goalless" in reference and score == {home: 0, away: 0}
            assert "at home" not in reference or first == home
            assert "away" not in reference or first == away
            named = {player for player in [*scorers, *match["others"]] if player in reference}
            assert named == highlighted
            assert all(f"{player} scor" in reference for player in highlighted)


def test_every_outcome_appears_with_its_own_wordings():
    outcomes = Counter()
    for record in split(400):
        reference = " ".join(record["targets"])
        if "0-0" in reference:
            outcomes["goalless"] += 1
        elif "drew" in reference:
            outcomes["draw"] += 1
        else:
            outcomes["twice" if "twice" in reference else "win"] += 1
    assert min(outcomes[key] for key in ("goalless", "draw", "win", "twice")) >= 20


def test_each_input_has_several_distinct_references():
    assert all(len(set(record["targets"])) >= 3 for record in split(200))


def test_names_are_single_words_from_fixed_stocks_drawn_anew_for_each_match():
    records = split(1000)
    scorers = [name for record in records for name in parse_match_report(record["source"])["scorers"]]
    clubs = [parse_match_report(record["source"])["home"] for record in records]
    assert {word for name in scorers for word in name.split()} <= {*FIRST_NAMES, *SURNAMES}
    assert {club.split()[1] if club.split()[0] in CLUB_PREFIXES else club.split()[0] for club in clubs} <= set(TOWNS)
    assert len(set(scorers)) >= 0.9 * len(scorers) and len(scorers) > 1000  # so a model must copy them
    assert len(set(clubs)) >= 0.75 * len(clubs)


def test_sources_and_targets_are_short_enough_for_tiny_models():
    records = split(1000)
    source_words = [len(r["source"].split()) for r in records]
    target_words = [len(t.split()) for r in records for t in r["targets"]]
    assert min(source_words) >= 25 and max(source_words) <= 100
    assert min(target_words) >= 6 and max(target_words) <= 25


def test_an_unknown_task_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="match_reports"):
        BuiltinTaskConfig(name="no_such_task")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_task("match_reports")(TASKS["match_reports"])


def test_every_task_describes_itself_in_one_line():
    assert all(task.__doc__ and "\n" not in task.__doc__.strip() for task in TASKS.values())
