"""Build a real-text summarisation task from the man pages installed on this machine.

    python bench/manpages.py --out data/manpages [--man-root /usr/share/man] [--max-source-words 300] [--seed 0]

The built-in task is synthetic; man pages give real, technical English with a ready-made reference: the one-line
summary in each page's NAME section (`ls \\- list directory contents`). The source is the page's DESCRIPTION,
prefixed with the names it documents so the model knows what is described:

    {"id": "man1/ls.1", "source": "NAME: ls\\n\\nList information about the FILEs ...",
     "target": "list directory contents"}

Only the English pages (man1 ... man8 directly under --man-root) are read, parsed from groff with regexes.
Redirects (`.so` pages, symlinks to another page), BSD mdoc pages, pages missing NAME or DESCRIPTION, overlong or
empty summaries, short descriptions and duplicates are skipped and counted. The split is a seeded hash of the id,
so it is stable as pages come and go: test 500, dev 200, train 2000 (one page per command: release channels of
one command, such as gcloud's alpha and beta copies, stay together), the rest unlabeled, written as
`test.jsonl`, `dev.jsonl`, `train.jsonl` and `unlabeled.jsonl`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

SPLIT_SIZES = {"test": 500, "dev": 200, "train": 2000}
UNLABELED_FACTOR = 4
MAX_TARGET_WORDS = 20
MIN_DESCRIPTION_WORDS = 15

Page = tuple[str, str, str]  # (names, summary, description), all cleaned plain text

# Special characters, as `\(xx`, `\[xx]` or `\*(xx` strings; any other one is dropped.
_SPECIAL_CHARS = {
    "rs": "\\",
    "mi": "-",
    "hy": "-",
    "en": "-",
    "em": "-",
    "--": "-",
    "aq": "'",
    "oq": "'",
    "cq": "'",
    "fm": "'",
    "lq": '"',
    "rq": '"',
    "dq": '"',
    'L"': '"',
    'R"': '"',
    "bu": "*",
    "ga": "`",
    "ti": "~",
    "ha": "^",
    "sl": "/",
    "pl": "+",
    "eq": "=",
    "mu": "x",
    "<=": "<=",
    ">=": ">=",
    "->": "->",
    "<-": "<-",
    "Aq": "'",
    "co": "(c)",
    "rg": "(R)",
    "tm": "(TM)",
}
# One-character escapes: `\-` is a minus, `\e` a backslash, `\ ` an unbreakable space; the rest print nothing.
_SIMPLE_ESCAPES = {"\\": "\\", "e": "\\", "E": "\\", "-": "-", "'": "'", "`": "`", ".": ".", " ": " ", "~": " "}
_SIMPLE_ESCAPES |= {"0": " ", "t": " ", "c": "\x00"}  # `\c` joins the next line without a space
_SILENT_ESCAPES = set("&%|^,/):!{}pruda")

_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<paren>..)
      | \[(?P<bracket>[^\]]*)\]
      | \*(?:\((?P<str2>..)|\[(?P<strb>[^\]]*)\]|(?P<str1>.))
      | [fFgkmMnVY$][-+]?(?:\(..|\[[^\]]*\]|.)
      | s[-+]?(?:\(\d\d|\[[^\]]*\]|'[^']*'|\d)
      | [hvwlLNXbDoxRSZAB]'[^']*'
      | (?P<char>.)
    )""",
    re.VERBOSE,
)
_COMMENT = re.compile(r"""^((?:[^\\]|\\[^"#])*)\\["#].*$""")
_CONTROL = re.compile(r"^[.']\s*(?P<name>[^\s\\]*)\s*(?P<args>.*)$")
_ARG = re.compile(r'"((?:[^"]|"")*)(?:"|$)|((?:\\.|[^\s\\])+)')

_TEXT_MACROS = {"B", "I", "SM", "SB"}  # arguments joined with spaces
_ALTERNATING_MACROS = {"BR", "IR", "BI", "RB", "IB", "RI"}  # arguments joined without spaces
_BLOCKS = {"TS": "TE", "EQ": "EN", "PS": "PE", "de": ".", "de1": ".", "am": ".", "ig": "."}

# NAME separators, tried in order: the first kind that occurs splits names from the summary.
_NAME_SEPARATORS = [
    re.compile(r"\s+\\\\?-\s+"),
    re.compile(r"\s*\\(?:\(em|\[em\])\s*"),
    re.compile(r"\s+-\s+"),
    re.compile(r"\s+\\\\?-|\\\\?-\s+"),
]


def _escape(match: re.Match[str]) -> str:
    name = match["paren"] or match["bracket"] or match["str2"] or match["strb"] or match["str1"]
    if name is not None:
        if match["bracket"] and re.fullmatch(r"u[0-9A-Fa-f]{4,5}", name):
            return chr(int(name[1:], 16))
        return _SPECIAL_CHARS.get(name, "")
    char = match["char"]
    if char is None or char in _SILENT_ESCAPES:
        return ""
    return _SIMPLE_ESCAPES.get(char, char)


def clean_escapes(text: str) -> str:
    """Turn groff escapes into plain characters and collapse all whitespace to single spaces."""
    text = _ESCAPE.sub(_escape, text)
    text = re.sub(r"\x00\s*", "", text)
    return " ".join(text.split())


def macro_args(args: str) -> list[str]:
    """Split a macro's argument string the way groff does: on spaces, with double-quoted arguments."""
    return [plain if plain else quoted.replace('""', '"') for quoted, plain in _ARG.findall(args)]


def join_continuations(lines: list[str]) -> list[str]:
    """Join lines ending in an unescaped backslash with the next one and strip `\\"` comments."""
    joined: list[str] = []
    pending = ""
    for line in lines:
        line = pending + line
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            pending = line[:-1]
            continue
        pending = ""
        comment = _COMMENT.match(line)
        joined.append(comment[1] if comment else line)
    if pending:
        joined.append(pending)
    return joined


def groff_text(lines: list[str]) -> str:
    """Text lines and the text of font macros, newline-joined with escapes left in; other requests dropped."""
    out: list[str] = []
    block_end: str | None = None
    in_brace = False
    for line in lines:
        control = _CONTROL.match(line)
        if block_end is not None:
            if control and control["name"] == block_end:
                block_end = None
            continue
        if in_brace:
            in_brace = "\\}" not in line
            continue
        if not control:
            out.append(line)
            continue
        name, args = control["name"], control["args"]
        if name in _BLOCKS:
            block_end = _BLOCKS[name]
        elif name in {"if", "ie", "el"}:
            in_brace = "\\{" in args and "\\}" not in args
        elif name in _TEXT_MACROS:
            out.append(" ".join(macro_args(args)))
        elif name in _ALTERNATING_MACROS:
            out.append("".join(macro_args(args)))
    return "\n".join(out)


def clean_groff(lines: list[str]) -> str:
    """Plain text of a run of groff lines (one man section's body), whitespace collapsed to single spaces."""
    return clean_escapes(groff_text(lines))


def split_sections(lines: list[str]) -> dict[str, list[str]]:
    """Body lines of each `.SH` section by upper-cased heading; the first section of a heading wins."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    index = 0
    while index < len(lines):
        control = _CONTROL.match(lines[index])
        if control and control["name"] == "SH":
            heading = control["args"]
            if not heading.strip() and index + 1 < len(lines):
                index += 1
                heading = lines[index]
            key = clean_escapes(" ".join(macro_args(heading))).upper()
            current = [] if key in sections else sections.setdefault(key, [])  # a repeated heading is ignored
        elif current is not None:
            current.append(lines[index])
        index += 1
    return sections


def name_lines(lines: list[str]) -> list[str]:
    """The NAME line(s): the section body up to the first request after some text (`.sp`, `.SS`, a synopsis...)."""
    seen_text = False
    for index, line in enumerate(lines):
        control = _CONTROL.match(line)
        if control is None or control["name"] in _TEXT_MACROS | _ALTERNATING_MACROS:
            seen_text = seen_text or bool(line.strip())
        elif control["name"] and seen_text:
            return lines[:index]
    return lines


def split_name(raw: str) -> tuple[str, str] | None:
    """Split the raw NAME text into (names, summary), both cleaned; None if there is no separator."""
    for separator in _NAME_SEPARATORS:
        parts = separator.split(raw, maxsplit=1)
        if len(parts) == 2:
            return clean_escapes(parts[0]), re.sub(r"^-+\s+", "", clean_escapes(parts[1]))
    return None


def is_redirect(lines: list[str]) -> bool:
    """Whether the page (comments stripped) holds nothing but `.so` requests."""
    controls = [_CONTROL.match(line) for line in lines if line.strip()]
    requests = [control["name"] for control in controls if control is not None and control["name"]]
    return None not in controls and bool(requests) and all(name == "so" for name in requests)


def parse_page_or_reason(text: str) -> Page | str:
    """(names, summary, description) of a man page, or why the page has none."""
    lines = join_continuations(text.splitlines())
    if is_redirect(lines):
        return ".so redirect"
    sections = split_sections(lines)
    if not sections:
        return "mdoc format" if any(line.startswith(".Sh") for line in lines) else "no sections"
    if "NAME" not in sections:
        return "no NAME"
    if "DESCRIPTION" not in sections:
        return "no DESCRIPTION"
    name = split_name(groff_text(name_lines(sections["NAME"])).replace("\n", " "))
    if name is None or not name[1]:
        return "empty summary"
    names, summary = name
    if len(summary.split()) > MAX_TARGET_WORDS:
        return "summary too long"
    description = clean_groff(sections["DESCRIPTION"])
    if len(description.split()) < MIN_DESCRIPTION_WORDS:
        return "description too short"
    return names, summary, description


def parse_page(text: str) -> Page | None:
    """(names, summary, description) of a man page's groff source, or None if it is not usable."""
    result = parse_page_or_reason(text)
    return result if isinstance(result, tuple) else None


def truncate_words(text: str, max_words: int) -> str:
    """The first `max_words` words, cut back to a sentence end if one falls in the second half of the limit."""
    words = text.split(" ")
    if len(words) <= max_words:
        return text
    head = words[:max_words]
    for end in range(max_words - 1, max_words // 2 - 1, -1):
        if head[end].endswith("."):
            return " ".join(head[: end + 1])
    return " ".join(head)


def read_page(path: Path) -> str | None:
    """The groff source of a gzipped page (UTF-8, else Latin-1), or None if it cannot be read."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def collect_rows(man_root: Path, max_source_words: int) -> tuple[list[dict[str, str]], Counter[str]]:
    """Usable pages under man_root/man[1-8], in sorted path order, and skip counts by reason."""
    rows: list[dict[str, str]] = []
    skipped: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    paths = sorted(man_root.glob("man[1-8]/*.gz"))
    real_pages = {path.resolve() for path in paths if not path.is_symlink()}
    for path in paths:
        if path.is_symlink() and path.resolve() in real_pages:
            skipped["symlink to another page"] += 1  # the page is kept under its real name
            continue
        text = read_page(path)
        result = "unreadable" if text is None else parse_page_or_reason(text)
        if isinstance(result, str):
            skipped[result] += 1
            continue
        names, summary, description = result
        if (summary, description) in seen:
            skipped["duplicate"] += 1
            continue
        seen.add((summary, description))
        page_id = str(path.relative_to(man_root)).removesuffix(".gz")
        source = f"NAME: {names}\n\n{truncate_words(description, max_source_words)}"
        rows.append({"id": page_id, "source": source, "target": summary, "group": command_group(names)})
    return rows, skipped


def command_group(names: str) -> str:
    """Pages of one command in several release channels (`gcloud alpha kms keys list`, `gcloud beta ...`, `gcloud
    ...`: near-copies) share a group, which the split keeps together."""
    return re.sub(r"^(\S+) (?:alpha|beta|preview) ", r"\1 ", names)


def split_rows(rows: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Fill test, dev and train with one page per command group, in seeded-hash order of the groups; the rest is
    unlabeled. The other channels' copies of a train or unlabeled command join the unlabeled pool (in-domain
    inputs), those of a test or dev command are dropped, so no evaluation input has a near-copy elsewhere."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row.pop("group"), []).append(row)
    order = sorted(groups, key=lambda group: hashlib.sha256(f"{seed}:{group}".encode()).hexdigest())
    splits: dict[str, list[dict[str, str]]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = [
            min(groups[g], key=lambda row: len(row["source"].split("\n")[0])) for g in order[start : start + size]
        ]
        start += size
    kept = {row["id"] for name in SPLIT_SIZES for row in splits[name]}
    labeled_groups = set(order[: start - SPLIT_SIZES["train"]])  # test and dev
    splits["unlabeled"] = [
        row for group in order if group not in labeled_groups for row in groups[group] if row["id"] not in kept
    ]
    return splits


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--man-root", type=Path, default=Path("/usr/share/man"))
    parser.add_argument("--max-source-words", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows, skipped = collect_rows(args.man_root, args.max_source_words)
    splits = split_rows(rows, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        write_jsonl(args.out / f"{name}.jsonl", split)

    counts = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.most_common())
    print(f"{len(rows)} pages kept ({counts}); {sum(skipped.values())} skipped ({reasons or 'none'})")
    if len(splits["unlabeled"]) < UNLABELED_FACTOR * SPLIT_SIZES["train"]:
        print(f"warning: unlabeled pool ({len(splits['unlabeled'])}) is smaller than {UNLABELED_FACTOR}x train")


if __name__ == "__main__":
    main()
