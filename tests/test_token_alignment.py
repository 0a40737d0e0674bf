"""Carrying an API teacher's top-k (token strings) onto a student's tokens: hand-made alignments, then two real
tokenizers of different kinds on text with multi-byte characters and runs of spaces."""

import math

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distilgen.models import train_tokenizer
from distilgen.token_alignment import align, carry_topk, piece_key, token_bytes, vocabulary_bytes


def test_whitespace_conventions_are_one_piece():
    assert token_bytes("Ġthe", byte_level=True) == b" the" and token_bytes("▁the", byte_level=False) == b" the"
    assert token_bytes("Ã©", byte_level=True) == "é".encode() and token_bytes("<0xE2>", byte_level=False) == b"\xe2"
    assert token_bytes("##ing", byte_level=False) == b"ing"
    assert piece_key(b"   the") == piece_key(b"\tthe") == b" the" and piece_key(b"the") == b"the"


def test_alignment_pairs_equal_and_prefix_sharing_pieces_and_leaves_the_rest():
    assert align([b"The", b" cat", b" sat"], [b"The", b"\xe2\x96\x81cat".replace(b"\xe2\x96\x81", b" "), b" sat"]) == [
        0, 1, 2
    ]  # fmt: skip
    # the teacher splits " their" in two, the student does not: its piece pairs with the piece that starts it
    assert align([b" the", b"ir", b" car"], [b" their", b" car"]) == [0, 2]
    # the student splits what the teacher wrote as one token: the piece after the first has no counterpart
    assert align([b" their", b" car"], [b" the", b"ir", b" car"]) == [0, None, 1]
    # a multi-byte character: the teacher writes its two bytes as two tokens, the student as one
    assert align([b"caf", b"\xc3", b"\xa9"], [b"caf", "é".encode()]) == [0, 1]
    # a tokenizer that merges a run of spaces: the student's "  b" is the teacher's " b", not its lone " "
    assert align([b"a", b" ", b" b"], [b"a", b"  b"]) == [0, 2]
    assert align([b"x"], [b"y"]) == [None]
    # one tokenizer puts a space before the first word, the other does not
    assert align([b"the", b" cat"], [b" the", b" cat"]) == [0, 1]


def _vocab(pieces: dict[str, int]) -> dict[int, bytes]:
    return {i: p.encode() for p, i in pieces.items()}


def test_topk_is_carried_onto_student_ids_renormalised_and_one_hot_without_a_counterpart():
    vocab = _vocab({" the": 0, "ir": 1, " car": 2, " a": 3, " cat": 4, "<eos>": 5})
    vocab[5] = b""
    teacher = [b" their", b" car"]
    topk = [
        [(b" their", math.log(0.5)), (b" a", math.log(0.3)), (b"??", math.log(0.1))],  # "??": nothing starts it
        [(b" car", math.log(0.6)), (b" cat", math.log(0.2)), (b" cart", math.log(0.1))],
    ]
    ids, logprobs = carry_topk(teacher, topk, [0, 1, 2], vocab)
    assert ids[0] == [0, 3] and [math.exp(x) for x in logprobs[0]] == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    assert ids[1] == [1] and logprobs[1] == [0.0]  # "ir": no teacher distribution at that place
    # " car" and " cart" both start with the student's " car": their mass adds up
    assert ids[2] == [2, 4] and [math.exp(x) for x in logprobs[2]] == pytest.approx([0.7 / 0.9, 0.2 / 0.9])
    # the teacher wrote "the" with no space, the student " the": candidates take the student's space
    spaced = carry_topk([b"the"], [[(b"the", math.log(0.7)), (b"a", math.log(0.3))]], [0], vocab)
    assert spaced[0] == [[0, 3]]
    with pytest.raises(ValueError, match="2 teacher tokens but 1 top-k lists"):
        carry_topk(teacher, topk[:1], [0], vocab)


def _byte_level_tokenizer(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_two_real_tokenizers_line_up_on_accents_symbols_and_space_runs():
    texts = ["the café is open", "a  cat sat on the mat", "tick ✓ done", "naïve résumé"] * 20
    teacher_tok = _byte_level_tokenizer(texts)  # GPT-2 style: "Ġ", bytes of partial characters
    student_tok = train_tokenizer(texts, vocab_size=120)  # distilgen's: "▁", NFKC, split punctuation
    text = "the café  sat ✓ naïve"
    teacher_ids = teacher_tok(text)["input_ids"]
    teacher_vocab = vocabulary_bytes(teacher_tok)
    teacher_tokens = [teacher_vocab[i] for i in teacher_ids]
    assert b"".join(teacher_tokens) == text.encode()  # the teacher's pieces spell the text, byte for byte
    # the teacher is sure of what it wrote, with a little mass on a rival
    topk = [[(t, math.log(0.9)), (b" zz", math.log(0.1))] for t in teacher_tokens]
    student_ids = student_tok(text, add_special_tokens=False)["input_ids"]
    vocab = vocabulary_bytes(student_tok)
    ids, logprobs = carry_topk(teacher_tokens, topk, student_ids, vocab)
    assert len(ids) == len(student_ids)
    for row_ids, row_logprobs in zip(ids, logprobs, strict=True):
        assert sum(math.exp(x) for x in row_logprobs) == pytest.approx(1.0)
        assert len(set(row_ids)) == len(row_ids)
    # every student piece has its teacher counterpart (the student's space before the first word, the teacher's
    # lone space before "naïve" notwithstanding), and the teacher's top-1 is the student's own token
    assert None not in align(teacher_tokens, [vocab[i] for i in student_ids])
    assert [row[0] for row in ids] == student_ids
    assert all(math.exp(row[0]) >= 0.9 - 1e-9 for row in logprobs)
