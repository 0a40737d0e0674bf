"""A teacher's top-k log-probs, given per token as text (an API teacher's `top_logprobs`), carried onto a student's
tokens: the student's ids where both tokenizers are one, an alignment of the two tokenisations where they differ.

    vocab = vocabulary_bytes(student_tokenizer)
    ids, logprobs = carry_topk(teacher_tokens, teacher_topk, student_ids, vocab)

Pieces are bytes, a leading run of whitespace read as one space: byte-level BPE's "Ġthe", SentencePiece's
"▁the" and a teacher's " the" are one piece. Needleman-Wunsch aligns the two piece sequences on their text
without leading whitespace (equal pieces match, pieces of which one starts the other match less well), so a
tokenizer that adds a space before the first word, or merges or splits runs of spaces, still lines up. At a
student token aligned to a teacher token, each teacher candidate (in the student token's whitespace convention,
where the two differ) becomes the student token that would start writing it (the longest vocabulary piece that
begins it); their probabilities are summed per student id and renormalised. A student token with no teacher
counterpart gets a one-hot distribution on itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

_WHITESPACE = b" \t\n\r\x0b\x0c"
_MATCH, _PREFIX, _MISMATCH, _GAP = 2, 1, -2, -1
"""Needleman-Wunsch scores: equal pieces, pieces of which one starts the other, other pieces, a skipped piece."""


def piece_key(piece: bytes) -> bytes:
    """A piece as alignment compares it: a leading run of whitespace becomes one space."""
    body = piece.lstrip(_WHITESPACE)
    return b" " + body if len(body) < len(piece) else piece


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins ("Ġ" for a space) back to the bytes they stand for (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def token_bytes(token: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry writes: byte-level BPE through its byte table; otherwise UTF-8 with
    SentencePiece's "▁" as a space, "<0xNN>" byte-fallback tokens as their byte, WordPiece's "##" dropped."""
    if byte_level:
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    if token.startswith("##"):
        return token[2:].encode()
    return token.replace("▁", " ").encode()


def vocabulary_bytes(tokenizer) -> dict[int, bytes]:
    """Every id of a `transformers` fast tokenizer with the bytes it writes (special tokens write nothing)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in repr(backend.pre_tokenizer)
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    return {i: b"" if i in special else token_bytes(t, byte_level) for t, i in vocab.items()}


def align(teacher: Sequence[bytes], student: Sequence[bytes]) -> list[int | None]:
    """For each student piece, the teacher piece Needleman-Wunsch pairs it with, when the two are equal or one
    starts the other (same text from the same place); None where the student piece has no such counterpart."""
    t = [p.lstrip(_WHITESPACE) for p in teacher]
    s = [p.lstrip(_WHITESPACE) for p in student]
    n, m = len(t), len(s)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * _GAP
    for j in range(1, m + 1):
        score[0][j] = j * _GAP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            score[i][j] = max(
                score[i - 1][j - 1] + _pair(t[i - 1], s[j - 1]), score[i - 1][j] + _GAP, score[i][j - 1] + _GAP
            )
    pairs: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 and j > 0:
        here = _pair(t[i - 1], s[j - 1])
        if score[i][j] == score[i - 1][j - 1] + here:
            if here > _MISMATCH:
                pairs[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] + _GAP:
            i -= 1
        else:
            j -= 1
    return pairs


def _pair(a: bytes, b: bytes) -> int:
    if a == b:
        return _MATCH
    if a and b and (a.startswith(b) or b.startswith(a)):
        return _PREFIX
    return _MISMATCH


class _StartingPiece:
    """The student token that would start writing a text: the longest vocabulary piece that begins it."""

    def __init__(self, vocab: dict[int, bytes]):
        self.by_key: dict[bytes, int] = {}
        for i, piece in sorted(vocab.items()):
            if piece:
                self.by_key.setdefault(piece_key(piece), i)
        self.longest = max(map(len, self.by_key), default=0)

    def __call__(self, text: bytes) -> int | None:
        key = piece_key(text)
        for n in range(min(len(key), self.longest), 0, -1):
            if key[:n] in self.by_key:
                return self.by_key[key[:n]]
        return None


class _Convention:
    """Teacher candidates in the student's whitespace convention where the two aligned tokens differ on it (one
    tokenizer puts a space before the first word, or the space of a merged run, the other does not)."""

    def __init__(self, teacher_piece: bytes, student_piece: bytes):
        self.add = _spaced(student_piece) and not _spaced(teacher_piece)
        self.drop = _spaced(teacher_piece) and not _spaced(student_piece)

    def __call__(self, candidate: bytes) -> bytes:
        if self.add and not _spaced(candidate):
            return b" " + candidate
        if self.drop and _spaced(candidate):
            return candidate.lstrip(_WHITESPACE)
        return candidate


def _spaced(piece: bytes) -> bool:
    return bool(piece) and piece[0] in _WHITESPACE


class Vocabulary:
    """A student vocabulary's bytes and the lookups `carry_topk` needs, built once (a pass over the vocabulary)."""

    def __init__(self, vocab: dict[int, bytes]):
        self.pieces = vocab
        self.starting = _StartingPiece(vocab)
        self.by_bytes = {piece: i for i, piece in sorted(vocab.items(), reverse=True) if piece}
        """bytes -> the lowest id that writes them."""


def carry_topk(
    teacher_tokens: Sequence[bytes],
    teacher_topk: Sequence[Sequence[tuple[bytes, float]]],
    student_ids: Sequence[int],
    vocab: dict[int, bytes] | Vocabulary,
    exact: bool = False,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per student token, student ids and log-probs from the teacher's top-k.

    Args:
        teacher_tokens: the bytes of each token the teacher wrote (the text the student tokens spell).
        teacher_topk: per teacher token, its (candidate bytes, log-prob) alternatives, the chosen one included.
        student_ids: the student's tokenisation of the same text.
        vocab: `vocabulary_bytes(student_tokenizer)`, or a `Vocabulary` of it (built once for many PTs).
        exact: the student has the teacher's vocabulary: where the two tokens are one, each candidate is the id that
            writes its bytes and keeps its log-prob (the mass outside the top-k stays the teacher's tail); elsewhere
            (and where two candidates write the same bytes), and without `exact`, candidates map to starting pieces
            and are renormalised to sum to 1.
    """
    if len(teacher_topk) != len(teacher_tokens):
        raise ValueError(f"{len(teacher_tokens)} teacher tokens but {len(teacher_topk)} top-k lists")
    vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(vocab)
    starting, by_bytes = vocab.starting, vocab.by_bytes
    pieces = [vocab.pieces.get(i, b"") for i in student_ids]
    pairs = align(teacher_tokens, pieces)
    ids_out, logprobs_out = [], []
    for j, student_id in enumerate(student_ids):
        mass: dict[int, float] = {}
        at = pairs[j]
        same = at is not None and exact and teacher_tokens[at] == pieces[j]
        candidates = [candidate for candidate, _ in teacher_topk[at]] if same else []
        if same and all(c in by_bytes for c in candidates) and len(set(candidates)) == len(candidates):
            ranked = sorted(teacher_topk[at], key=lambda c: -c[1])
            ids_out.append([by_bytes[candidate] for candidate, _ in ranked])
            logprobs_out.append([logprob for _, logprob in ranked])
            continue
        if at is not None:
            convention = _Convention(teacher_tokens[at], pieces[j])
            for candidate, logprob in teacher_topk[at]:
                target = starting(convention(candidate))
                if target is not None:
                    mass[target] = mass.get(target, 0.0) + math.exp(logprob)
        total = sum(mass.values())
        if total <= 0:
            ids_out.append([student_id])
            logprobs_out.append([0.0])
            continue
        ranked = sorted(mass.items(), key=lambda kv: -kv[1])
        ids_out.append([i for i, _ in ranked])
        logprobs_out.append([math.log(p / total) for _, p in ranked])
    return ids_out, logprobs_out
