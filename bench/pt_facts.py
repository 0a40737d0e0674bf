"""How often a PT store's pseudo-targets get the built-in task's facts right, per split.

    python bench/pt_facts.py runs/bench/pts configs/study/match_reports.yaml

A PT teaches the student whatever it says, errors included. For every (teacher, spec) in the store and every
split of the config's `match_reports` data, the share of PTs that:

- clubs: name both clubs of the match;
- score: give the match's score (counted from the report's goals, so unlabeled inputs are judged too;
  "goalless" is 0-0);

and, of the player names the PTs write, the share that stand in the report. The gold targets of the labeled
split come first, for scale.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from summary_errors import clubs_and_names, score

from distilgen.config import DataConfig, from_dict, read_yaml
from distilgen.data import load_splits
from distilgen.pseudo_targets import PTStore, input_key
from distilgen.tasks import parse_match_report


def facts_right(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Shares over (source, summary) pairs: both clubs named, the right score, written names from the report."""
    n = clubs = right_score = written = copied = 0
    for source, text in pairs:
        facts = parse_match_report(source)
        both_clubs, names, in_report = clubs_and_names(facts, source, text)
        said = score(text) or (["0", "0"] if "goalless" in text else None)
        n += 1
        clubs += both_clubs
        right_score += said == sorted(str(facts["goals"][club]) for club in (facts["home"], facts["away"]))
        written += len(names)
        copied += in_report
    return {"clubs": clubs / max(n, 1), "score": right_score / max(n, 1), "names copied": copied / max(written, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a PT store directory")
    parser.add_argument("config", help="a config whose `data` names the match_reports task (distill, study, ...)")
    args = parser.parse_args()
    data = from_dict(DataConfig, read_yaml(args.config)["data"])
    splits = load_splits(data, ("train", "unlabeled"))
    store = PTStore(args.store, readonly=True)
    print("| targets | split | inputs | targets | clubs | score | names copied |")
    print("|---|---|---:|---:|---:|---:|---:|")

    def row(what: str, split: str, inputs: int, pairs: list[tuple[str, str]]) -> None:
        shares = facts_right(pairs)
        cells = [what, split, str(inputs), str(len(pairs)), *(f"{share:.0%}" for share in shares.values())]
        print("| " + " | ".join(cells) + " |")

    row("gold", "train", len(splits["train"]), [(e.source, e.target) for e in splits["train"]])
    for stats in store.stats():
        for name, examples in splits.items():
            pts = store.get(stats.teacher_fp, stats.spec_fp, [e.source for e in examples], every_index=True)
            pairs = [(e.source, r.text) for e in examples for r in pts.get(input_key(e.source), [])]
            row(f"{stats.spec_name} ({stats.teacher_fp[:8]})", name, len(examples), pairs)


if __name__ == "__main__":
    main()
