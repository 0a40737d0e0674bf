"""The fact checks of bench/pt_facts.py, which BENCHMARKS.md uses to judge teacher PTs."""

import re
import sys
from pathlib import Path

from distilgen.config import BuiltinTaskConfig
from distilgen.tasks import generate_split, parse_match_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pt_facts import facts_right  # noqa: E402


def test_the_generators_references_get_every_fact_right():
    records = generate_split(BuiltinTaskConfig(seed=3, train_size=300), "train")
    pairs = [(r["source"], target) for r in records for target in r["targets"]]
    assert facts_right(pairs) == {"clubs": 1.0, "score": 1.0, "names copied": 1.0}


def test_a_wrong_score_a_missing_club_and_an_invented_name_count_as_wrong():
    records = generate_split(BuiltinTaskConfig(seed=3, train_size=300), "train")
    source, target = next(
        (r["source"], r["targets"][0]) for r in records if re.search(r"\d-\d .*scoring", r["targets"][0])
    )
    wrong_score = re.sub(r"(\d)-(\d)", lambda m: f"{int(m[1]) + 1}-{m[2]}", target, count=1)
    invented = re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+(?= scor)", "Zzyx Qwop", target)
    no_club = target.replace(parse_match_report(source)["home"], "Somewhere")
    shares = facts_right([(source, wrong_score), (source, invented), (source, no_club)])
    assert shares["score"] == 2 / 3 and shares["clubs"] == 2 / 3
    assert shares["names copied"] == 2 / 3  # one of three written names is not in the report
