"""Prompts: chat templates, demonstrations, truncation that keeps the scaffolding, the output's first line, and the
prompt in the teacher's fingerprint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distilgen.config import ConfigError, DataConfig, GenerationSettings, ModelConfig, PromptConfig, from_dict
from distilgen.data import Example
from distilgen.generation.hf import HFGenerator
from distilgen.models import load_model
from distilgen.prompts import build_prompt
from distilgen.teachers.hf import teacher_fingerprint
from tests.conftest import tiny_model_config

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A small chat template in the usual shape: role markers around each message, then the assistant's turn."""

TRAIN = [Example(str(i), f"report number {i}", f"summary {i}", (f"summary {i}",)) for i in range(6)]


@pytest.fixture
def chat_model(tokenizer_dir):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("llama", tokenizer_dir))
    tm.tokenizer.chat_template = CHAT
    return tm


def test_a_chat_prompt_wraps_the_source_in_the_template_with_demonstrations_that_are_never_the_input(chat_model):
    tok = chat_model.tokenizer
    prompt = build_prompt(PromptConfig(shots=2, system="Be brief."), tok, TRAIN, is_encoder_decoder=False)
    demos = prompt.demonstrations("a new report")
    assert len(demos) == 2 and demos == build_prompt(PromptConfig(shots=2), tok, TRAIN, False).demonstrations("x")
    assert prompt.render("a new report") == tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            *[m for s, t in demos for m in ({"role": "user", "content": s}, {"role": "assistant", "content": t})],
            {"role": "user", "content": "a new report"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert demos[0][0] not in [s for s, _ in prompt.demonstrations(demos[0][0])]  # the input is not its own example
    assert len(prompt.demonstrations(demos[0][0])) == 2
    other = build_prompt(PromptConfig(shots=2, shots_seed=1), tok, TRAIN, False)
    assert other.demonstrations("x") != demos and other.fingerprint() != prompt.fingerprint()


def test_truncation_cuts_the_source_and_keeps_the_scaffolding(chat_model):
    tm = dataclasses.replace(chat_model, prompt=build_prompt(PromptConfig(), chat_model.tokenizer, [], False))
    long = Example("x", " ".join(["goal"] * 200), None, ())
    (short,), stats = tm.encode([long], max_source_length=40, targets=False)
    before, after = tm.prompt.affixes(long.source)
    assert len(short.source) == 40 and stats.sources_truncated == 1
    assert short.source[: len(before)] == before and short.source[-len(after) :] == after  # the assistant turn stays
    goal = tm.tokenizer(" goal", add_special_tokens=False)["input_ids"]
    assert short.source[len(before) : -len(after)] == goal * (40 - len(before) - len(after))


def test_chat_is_used_where_the_model_has_a_template_and_refused_where_asked_of_one_without(tokenizer_dir, chat_model):
    plain = load_model(tiny_model_config("gpt2", tokenizer_dir))
    assert build_prompt(PromptConfig(), plain.tokenizer, [], False) is None  # auto, no template: plain source
    assert build_prompt(PromptConfig(), chat_model.tokenizer, [], is_encoder_decoder=True) is None
    with pytest.raises(ConfigError, match="^data.prompt.chat: on, but this model has no chat template"):
        build_prompt(PromptConfig(chat="on"), plain.tokenizer, [], False)
    few = build_prompt(PromptConfig(shots=1), plain.tokenizer, TRAIN, False)  # plain text demonstrations
    ((source, target),) = few.demonstrations("new")
    assert few.render("new") == f"{source} {target}\n\nnew"
    with pytest.raises(ConfigError, match="^data.prompt.shots: 9 demonstrations, but the training split has 6"):
        build_prompt(PromptConfig(shots=9), plain.tokenizer, TRAIN, False)


def test_a_prompt_longer_than_max_source_length_is_refused_with_its_size(tokenizer_dir, tmp_path):
    model_dir = tmp_path / "m"
    tm = load_model(tiny_model_config("llama", tokenizer_dir))
    tm.tokenizer.chat_template = CHAT
    tm.save(model_dir)
    data = DataConfig(task={"train_size": 8, "dev_size": 0, "test_size": 0, "unlabeled_size": 0}, max_source_length=8)
    data = dataclasses.replace(data, prompt=PromptConfig(system="You summarise football match reports in a line."))
    with pytest.raises(ConfigError, match=r"^data.max_source_length: 8, but the prompt alone takes \d+ tokens"):
        load_model(ModelConfig(path=str(model_dir)), data=data)


def test_first_line_keeps_an_outputs_first_line_in_text_and_tokens():
    texts = ["a report\nwith two lines", "a\nb"] * 20  # a vocabulary with a line break
    tm = load_model(ModelConfig(arch="llama", hidden_size=32, num_heads=2, vocab_size=100), texts=lambda: iter(texts))
    newline = tm.tokenizer("\na\nb", add_special_tokens=False)["input_ids"]  # a blank first line, then "a", "\nb"
    # Make the model write "\na\nb..." whatever it reads: a bias on the LM head's output at each step.
    script = iter(newline * 20)

    def hook(module, args, logits):
        biased = logits.clone()
        biased[..., next(script)] += 1e4
        return biased

    handle = tm.model.get_output_embeddings().register_forward_hook(hook)
    tm = dataclasses.replace(tm, prompt=build_prompt(PromptConfig(first_line=True), tm.tokenizer, [], False))
    ((written,),) = HFGenerator(tm).generate(["a report"], GenerationSettings("greedy", max_new_tokens=12))
    handle.remove()
    assert written.text == "a" and tm.tokenizer.decode(written.tokens).strip() == "a"
    assert written.token_ids == tm.target_ids(written.tokens)
    assert written.new_tokens == len(newline)  # ended at the line break after "a", not at 12 tokens


def test_the_prompt_is_part_of_the_teacher_fingerprint_and_plain_sources_keep_theirs(chat_model):
    plain = dataclasses.replace(chat_model, prompt=None)
    chat = dataclasses.replace(chat_model, prompt=build_prompt(PromptConfig(), chat_model.tokenizer, [], False))
    shots = dataclasses.replace(chat, prompt=build_prompt(PromptConfig(shots=1), chat_model.tokenizer, TRAIN, False))
    fingerprints = {teacher_fingerprint(tm, 64) for tm in (plain, chat, shots)}
    assert len(fingerprints) == 3
    assert teacher_fingerprint(plain, 64) == teacher_fingerprint(dataclasses.replace(chat_model, prompt=None), 64)


def test_dev_evaluation_during_training_reads_sources_through_the_same_prompt(chat_model, tmp_path, monkeypatch):
    import distilgen.train as train_module
    from distilgen.config import FinetuneConfig

    chat_model.save(tmp_path / "chat")
    seen = []
    real = train_module.dev_score
    monkeypatch.setattr(train_module, "dev_score", lambda tm, *a: seen.append(tm.prompt) or real(tm, *a))
    from distilgen.train import finetune

    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "chat")},
        "data": {
            "task": {"train_size": 8, "unlabeled_size": 0, "dev_size": 4, "test_size": 0},
            "max_source_length": 128,
            "prompt": {"system": "Be brief."},
        },
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "metric": "bleu", "dev_limit": 4},
        "decoding": {"max_new_tokens": 4},
    }
    finetune(from_dict(FinetuneConfig, cfg))
    assert len(seen) == 2 and all(p is not None and p.chat and p.system == "Be brief." for p in seen)


def test_the_prompt_check_covers_the_spare_demonstration_an_input_may_get(chat_model):
    from distilgen.prompts import Prompt

    spare = ("a much longer report " * 30, "a summary")
    prompt = Prompt(chat_model.tokenizer, False, None, (("short", "s"), spare), shots=1, first_line=False)
    default, for_the_demo_itself = prompt.scaffolding_lengths()
    assert for_the_demo_itself > 10 * default  # "short" as an input gets the spare, long demonstration
    assert for_the_demo_itself == sum(map(len, prompt.affixes("short")))


def test_a_saved_model_keeps_its_prompt_and_a_run_with_another_is_warned(chat_model, tmp_path, caplog):
    task = {"train_size": 8, "dev_size": 0, "test_size": 0, "unlabeled_size": 0}
    data = from_dict(DataConfig, {"task": task, "max_source_length": 512})
    chat_data = dataclasses.replace(data, prompt=PromptConfig(system="Be brief.", shots=1))
    chat_model.save(tmp_path / "plain")
    tm = load_model(ModelConfig(path=str(tmp_path / "plain")), data=chat_data)
    tm.save(tmp_path / "tuned")
    saved = json.loads((tmp_path / "tuned" / "prompt.json").read_text())
    assert saved["fingerprint"] == tm.prompt.fingerprint() and saved["system"] == "Be brief."
    assert len(saved["demonstrations"]) == 1 and saved["spare_demonstration"] is not None
    with caplog.at_level("WARNING", logger="distilgen.models"):
        load_model(ModelConfig(path=str(tmp_path / "tuned")), data=chat_data)
        assert not caplog.records  # the same prompt: nothing to say
        load_model(
            ModelConfig(path=str(tmp_path / "tuned")), data=dataclasses.replace(chat_data, prompt=PromptConfig())
        )
    (record,) = caplog.records
    assert (
        "was trained to read sources through the prompt in" in record.getMessage()
        and "another one" in record.getMessage()
    )


def test_a_row_ended_at_a_line_break_costs_the_tokens_before_its_padding():
    from distilgen.generation.hf import _generated_length

    eos, pad = 2, 0
    assert _generated_length([7, 8, eos, pad], eos, pad) == 3  # up to and with EOS
    assert _generated_length([7, 5, pad, pad], eos, pad) == 2  # stopped at the line break (5), then padding
    assert _generated_length([7, 8, 9], eos, pad) == 3  # ran to the limit
