"""What a model gets wrong in its match_reports summaries, by kind of fact, from `distilgen evaluate` generations.

    python bench/summary_errors.py runs/bench/report/generations/*.jsonl

Per generations file (one model), the share of summaries that:

- clubs: name both clubs of the match;
- score: give the right score (the two numbers, in either order; none for a goalless match);
- scorers: name exactly the players the references name (the scorers of braces, or of the only goal);

and, of the player names the model writes, the share that stand in the report (a model that copies writes
names from the report; one that does not writes names from its training summaries or blends of them).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from distilgen.tasks import parse_match_report

NAMED = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+) scor")
"""A player named in a summary: "X Y scoring twice", "X Y scored the only goal"."""


def score(text: str) -> list[str] | None:
    numbers = re.search(r"(\d)-(\d)", text)
    return sorted(numbers.groups()) if numbers else None


def clubs_and_names(facts: dict, source: str, text: str) -> tuple[bool, set[str], int]:
    """Of a summary `text` of the report `source` (with `facts` parsed from it): whether it names both clubs,
    the player names it writes, and how many of those stand in the report."""
    names = set(NAMED.findall(text))
    return facts["home"] in text and facts["away"] in text, names, sum(name in source for name in names)


def errors(rows: list[dict]) -> dict[str, float]:
    counts = dict.fromkeys(("clubs", "score", "scorers"), 0)
    written = copied = 0
    for row in rows:
        facts, prediction, reference = parse_match_report(row["source"]), row["prediction"], row["references"][0]
        both_clubs, names, in_report = clubs_and_names(facts, row["source"], prediction)
        counts["clubs"] += both_clubs
        counts["score"] += score(prediction) == score(reference)
        counts["scorers"] += names == set(NAMED.findall(reference))
        written += len(names)
        copied += in_report
    return {**{k: v / len(rows) for k, v in counts.items()}, "names copied": copied / max(written, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generations", nargs="+", type=Path, help="generations/*.jsonl of `distilgen evaluate`")
    args = parser.parse_args()
    print("| model | clubs | score | scorers | names copied |")
    print("|---|---:|---:|---:|---:|")
    for path in args.generations:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        shares = errors(rows)
        print(f"| {path.stem} | " + " | ".join(f"{share:.0%}" for share in shares.values()) + " |")


if __name__ == "__main__":
    main()
