"""Built-in tasks: data generated from a seed, so the quickstart and the tests need no download.

A task turns a seeded `random.Random` into one (source, references) pair. Example i of a split
depends only on (seed, split, i): splits are disjoint by construction and growing a split keeps
its first examples.

    records = generate_split(BuiltinTaskConfig(train_size=100), "train")
    records[0]  # {"id": "match_reports-train-000000", "source": "...", "targets": ["...", ...]}
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from distilgen.registry import registrar


class TaskConfig(Protocol):
    """What `generate_split` reads of a `config.BuiltinTaskConfig` (plus its `<split>_size`); not imported, as the
    config validates task names against `TASKS`, and a config must import nothing that imports it."""

    name: str
    seed: int


Task = Callable[[random.Random], tuple[str, list[str]]]
"""rng -> (source, references); the first reference is the training target."""

TASKS: dict[str, Task] = {}
SPLITS = ("train", "unlabeled", "dev", "test")


register_task = registrar(TASKS, "task")
"""`@register_task(name)` registers a task under `name`, the value users give as `data.task.name`."""


def generate_split(cfg: TaskConfig, split: str) -> list[dict]:
    """The `split` of task `cfg.name`: records {"id", "source", "targets"} (every valid reference)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; expected one of {SPLITS}")
    task = TASKS[cfg.name]
    records = []
    for i in range(getattr(cfg, f"{split}_size")):
        source, targets = task(random.Random(f"{cfg.seed}-{split}-{i}"))
        records.append({"id": f"{cfg.name}-{split}-{i:06d}", "source": source, "targets": targets})
    return records


# ---------------------------------------------------------------------------------------------
# match_reports
# ---------------------------------------------------------------------------------------------

# Difficulty knobs. What makes size matter: counting goals per team across shuffled facts, telling
# goals from look-alike facts (missed penalties, a half-time score, cards for scorers), knowing
# which team is at home, spotting players who scored twice, and copying names drawn anew for every match.
GOAL_WEIGHTS = (8, 17, 22, 22, 17, 14)  # relative frequency of 0, 1, ..., 5 goals in a match
DISTRACTORS = (3, 5)  # fewest and most cards, substitutions and missed penalties in a match
REPEAT_SCORER = 0.35  # chance a goal goes to a player who already scored for that team (braces)
PENALTY = 0.15  # chance a goal is a penalty: the same fact, worded differently
HALF_TIME = 0.5  # chance the report gives the half-time score, which the summary must not copy
KNOWN_PLAYER = 0.3  # chance a card or missed penalty names a player who also scored
SHUFFLE_FACTS = True  # False lists the facts in a fixed order (easier)
RANDOM_GOLD_WORDING = True  # the training target's template is drawn at random, as in human-written data;
# False always trains on the first template (one wording, easier to fit)

# Names are invented from syllables, once, into fixed inventories (as real first names, surnames and towns
# are a finite stock): a model copies them from the report, one word each, since every match draws new ones.
ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "au", "ei")
CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "k", "sh", "nd", "rt")
CLUB_SUFFIXES = ("United", "Rovers", "City", "Athletic", "Town", "Wanderers", "Albion", "Rangers", "County", "Harriers")
CLUB_PREFIXES = ("Real", "Sporting", "FC", "Inter", "Dynamo")
DAYS = ("Friday", "Saturday", "Sunday", "Tuesday", "Wednesday")
VENUE_FACTS = ("{home} hosted {away} on {day}.", "{away} visited {home} on {day}.", "{home} welcomed {away} on {day}.")
TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}

# Summaries, one tuple per outcome, one entry per reference: (wording without scorers, with scorers).
# {S_ing} / {S_ed} name the players who scored more than once (or the only goal), in report order.
WIN_TEMPLATES = (
    ("{W} beat {L} {w}-{l}.", "{W} beat {L} {w}-{l}, with {S_ing}."),
    ("{W} won {w}-{l} {venue} {L}.", "{W} won {w}-{l} {venue} {L}, with {S_ing}."),
    ("{L} went down {l}-{w} to {W}.", "{L} went down {l}-{w} to {W}, with {S_ing}."),
    ("{W} earned a {w}-{l} win over {L}.", "In a {w}-{l} win for {W} over {L}, {S_ed}."),
)
DRAW_TEMPLATES = (
    ("{H} and {A} drew {n}-{n}.", "{H} and {A} drew {n}-{n}, with {S_ing}."),
    ("{H} drew {n}-{n} at home against {A}.", "{H} drew {n}-{n} at home against {A}, with {S_ing}."),
    ("{A} drew {n}-{n} away at {H}.", "{A} drew {n}-{n} away at {H}, with {S_ing}."),
    ("It finished {n}-{n} between {H} and {A}.", "In a {n}-{n} draw between {H} and {A}, {S_ed}."),
)
GOALLESS_TEMPLATES = (
    "{H} and {A} played out a 0-0 draw.",
    "{H} were held to a goalless draw at home by {A}.",
    "{A} held {H} to a 0-0 draw away from home.",
    "Neither {H} nor {A} scored in a 0-0 draw.",
)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).title()


def _inventory(size: int, syllables: tuple[int, ...], seed: str, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`size` distinct invented words (none in `taken`), the same in every run; each word's syllable count is
    drawn from `syllables` (a draw even when there is one choice: it fixes the random stream, so the stocks)."""
    rng, words = random.Random(seed), {}
    while len(words) < size:
        if (word := _word(rng, rng.choice(syllables))) not in taken:
            words[word] = None
    return tuple(words)


FIRST_NAMES = _inventory(60, (1,), "first names")
SURNAMES = _inventory(400, (2,), "surnames", FIRST_NAMES)
TOWNS = _inventory(150, (2,), "towns", FIRST_NAMES + SURNAMES)


def _club(rng: random.Random) -> str:
    stem = rng.choice(TOWNS)
    return f"{rng.choice(CLUB_PREFIXES)} {stem}" if rng.random() < 0.25 else f"{stem} {rng.choice(CLUB_SUFFIXES)}"


@register_task("match_reports")
def match_reports(rng: random.Random) -> tuple[str, list[str]]:
    """Summarise a shuffled list of football match facts in one sentence: teams, final score, top scorers."""
    used: set[str] = set()

    def new_name(make: Callable[[], str]) -> str:
        name = make()
        while any(name in other or other in name for other in used):  # no name inside another
            name = make()
        used.add(name)
        return name

    def new_player() -> str:
        return new_name(lambda: f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}")

    clubs = (new_name(lambda: _club(rng)), new_name(lambda: _club(rng)))  # (home, away)
    num_goals = rng.choices(range(len(GOAL_WEIGHTS)), GOAL_WEIGHTS)[0]
    minutes = rng.sample(range(1, 91), num_goals + rng.randint(*DISTRACTORS))

    events: list[tuple[float, str, str | None, int | None]] = []  # (minute, text, scorer, scoring side)
    scorers: tuple[list[str], list[str]] = ([], [])
    half_time = [0, 0]
    for minute in minutes[:num_goals]:
        side = rng.randrange(2)
        repeat = scorers[side] and rng.random() < REPEAT_SCORER
        scorer = rng.choice(scorers[side]) if repeat else new_player()
        scorers[side].append(scorer)
        half_time[side] += minute <= 45
        penalty = ", penalty" if rng.random() < PENALTY else ""
        events.append((minute, f"{minute}' {clubs[side]} goal, {scorer}{penalty}.", scorer, side))
    for minute in minutes[num_goals:]:
        side = rng.randrange(2)
        kind = rng.choices(("yellow card", "red card", "substitution", "missed penalty"), (5, 1, 4, 1))[0]
        known = kind != "substitution" and scorers[side] and rng.random() < KNOWN_PLAYER
        player = rng.choice(scorers[side]) if known else new_player()
        if kind == "substitution":
            player = f"{new_player()} on for {player}"
        events.append((minute, f"{minute}' {clubs[side]} {kind}, {player}.", None, None))
    if rng.random() < HALF_TIME:
        events.append((45.5, f"Half-time {half_time[0]}-{half_time[1]}.", None, None))
    events.append((91, f"Attendance {rng.randint(800, 60000)}.", None, None))
    events.append((92, f"Referee {new_player()}.", None, None))
    if SHUFFLE_FACTS:
        rng.shuffle(events)
    else:
        events.sort()
    venue = rng.choice(VENUE_FACTS).format(home=clubs[0], away=clubs[1], day=rng.choice(DAYS))
    source = " ".join([venue, *(text for _, text, _, _ in events)])

    goals = [(scorer, side) for _, _, scorer, side in events if scorer is not None]  # in report order
    references = _summaries(clubs, goals)
    if RANDOM_GOLD_WORDING:
        references.insert(0, references.pop(rng.randrange(len(references))))
    return source, references


def _summaries(clubs: tuple[str, str], goals: list[tuple[str, int]]) -> list[str]:
    """Every valid one-sentence summary of a match, given its (home, away) clubs and goals in report order."""
    home, away = clubs
    score = [sum(side == 0 for _, side in goals), sum(side == 1 for _, side in goals)]
    if score == [0, 0]:
        return [template.format(H=home, A=away) for template in GOALLESS_TEMPLATES]

    per_player = Counter(scorer for scorer, _ in goals)  # Counter keeps report order for ties
    if len(goals) == 1:
        highlights = [(goals[0][0], "the only goal")]
    else:
        highlights = [(player, TIMES[count]) for player, count in per_player.items() if count > 1]
    s_ing = " and ".join(f"{player} scoring {times}" for player, times in highlights)
    s_ed = " and ".join(f"{player} scored {times}" for player, times in highlights)
    fields = {"H": home, "A": away, "n": score[0], "S_ing": s_ing, "S_ed": s_ed}
    templates = DRAW_TEMPLATES
    if score[0] != score[1]:
        winner = 0 if score[0] > score[1] else 1
        fields |= {"W": clubs[winner], "L": clubs[1 - winner], "w": score[winner], "l": score[1 - winner]}
        fields["venue"] = "at home against" if winner == 0 else "away at"
        templates = WIN_TEMPLATES
    return [pair[1 if highlights else 0].format(**fields) for pair in templates]


_VENUE = re.compile(r"^(?:(?P<h1>.+) (?:hosted|welcomed) (?P<a1>.+)|(?P<a2>.+) visited (?P<h2>.+)) on \w+\.$")
_GOAL = re.compile(r"^\d+' (?P<club>.+) goal, (?P<player>.+?)(?:, penalty)?\.$")
_NAMED = re.compile(r"^\d+' .+ (?:yellow card|red card|missed penalty|substitution), (?:.+ on for )?(?P<player>.+)\.$")


def parse_match_report(source: str) -> dict:
    """Read a match_reports source back into its facts: home, away, goals per club, goals per player, and the
    other players named; for checking the generator and for error analysis of summaries."""
    first, *facts = re.split(r"(?<=\.) (?=\S)", source)
    venue = _VENUE.match(first)
    home, away = venue["h1"] or venue["h2"], venue["a1"] or venue["a2"]
    goals, scorers, others = Counter(), Counter(), set()
    for fact in facts:
        if goal := _GOAL.match(fact):
            goals[goal["club"]] += 1
            scorers[goal["player"]] += 1
        elif named := _NAMED.match(fact):
            others.add(named["player"])
        elif fact.startswith("Referee "):
            others.add(fact.removeprefix("Referee ").rstrip("."))
    return {"home": home, "away": away, "goals": goals, "scorers": scorers, "others": others - set(scorers)}
