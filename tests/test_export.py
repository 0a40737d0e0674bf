"""`distilgen export` to CTranslate2: the export writes what the PyTorch model writes (float32, every family it
covers), loads like any model in `evaluate` and `serve`, and refuses what it cannot do in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from distilgen.config import ConfigError, DecodingConfig, EvaluateConfig, ExportConfig, ModelConfig, from_dict
from distilgen.evaluate import evaluate, generate
from distilgen.models import load_model
from tests.conftest import Server, cli_env, tiny_model_config

pytest.importorskip("ctranslate2")

from distilgen.export import export  # noqa: E402 (needs ctranslate2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    """A tiny random model of each family CTranslate2 converts, saved as `distilgen finetune` leaves one."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for family in ("bart", "t5", "gpt2", "llama"):
        torch.manual_seed(0)
        load_model(tiny_model_config(family, tokenizer_dir)).save(root / family)
        paths[family] = root / family
    return paths


@pytest.mark.parametrize("family", ["bart", "t5", "gpt2", "llama"])
def test_a_float32_export_writes_the_pytorch_models_greedy_outputs(family, saved, splits, tmp_path):
    out = tmp_path / "export"
    summary = export(ExportConfig(model=str(saved[family]), output_dir=str(out), quantization="float32"))
    info = json.loads((out / "export.json").read_text())
    assert info == {k: summary[k] for k in info} and info["family"] == family and info["quantization"] == "float32"
    assert len(info["weights_sha256"]) == 64 and (out / "tokenizer.json").is_file()
    original, exported = load_model(ModelConfig(path=str(saved[family]))), _open(out)
    assert exported.runtime is not None and exported.model.device.type == "meta"
    decoding = DecodingConfig(max_new_tokens=16)
    assert generate(exported, splits["test"], decoding, 256) == generate(original, splits["test"], decoding, 256)


def test_outputs_that_end_early_end_where_the_pytorch_models_do(tokenizer_dir, splits, tmp_path):
    """EOS made likely: outputs of many lengths in one batch, the cases random tiny models rarely reach."""
    for family in ("bart", "gpt2"):
        torch.manual_seed(0)
        tm = load_model(tiny_model_config(family, tokenizer_dir))
        with torch.no_grad():
            head = tm.model.get_output_embeddings()
            head.weight[tm.tokenizer.eos_token_id] *= 0
            if getattr(head, "bias", None) is None:
                head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
            head.bias[tm.tokenizer.eos_token_id] = 2.5
        tm.save(tmp_path / family)
        export(ExportConfig(model=str(tmp_path / family), output_dir=str(tmp_path / f"{family}_ct2"),
                            quantization="float32"))  # fmt: skip
        original = load_model(ModelConfig(path=str(tmp_path / family)))
        decoding = DecodingConfig(max_new_tokens=16, batch_size=4)
        expected = generate(original, splits["test"], decoding, 256)
        assert len({len(t.split()) for t in expected}) > 1  # lengths differ: EOS at different steps
        assert generate(_open(tmp_path / f"{family}_ct2"), splits["test"], decoding, 256) == expected


def _open(path):
    return load_model(ModelConfig(path=str(path)), allow_export=True)


def test_an_int8_export_is_evaluated_and_served_beside_the_pytorch_model(saved, tiny_data, tmp_path):
    out = tmp_path / "int8"
    command = [sys.executable, "-m", "distilgen.cli", "export", str(saved["bart"]), f"output_dir={out}"]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout[result.stdout.index("{") :])["quantization"] == "int8"
    cfg = from_dict(EvaluateConfig, {
        "output_dir": str(tmp_path / "eval"), "data": {"task": {"train_size": 8, "unlabeled_size": 0, "dev_size": 0,
        "test_size": 8}}, "models": [str(saved["bart"]), str(out)], "metrics": ["bleu", "perplexity"],
        "decoding": {"max_new_tokens": 16}, "cost": {"latency_examples": 2, "latency_runs": 1,
        "throughput_examples": 4, "throughput_batch": 4},
    })  # fmt: skip
    pytorch, int8 = evaluate(cfg)["models"]
    assert "perplexity" in pytorch["scores"] and "perplexity" not in int8["scores"]  # an export gives text only
    assert (
        "bleu" in int8["scores"]
        and int8["cost"]["latency_s"] > 0
        and 0 < int8["cost"]["size_on_disk_mb"] < pytorch["cost"]["size_on_disk_mb"] / 2
    )
    served = Server(str(out), "name=int8", "max_tokens=16")
    try:
        prompt = "Report: Riverton beat Oakdale 3-1 at home on Sunday."
        answer = httpx.post(f"{served.url}/v1/completions", json={"model": "int8", "prompt": prompt, "max_tokens": 12,
                                                                  "temperature": 0}).json()  # fmt: skip
        tm = _open(out)
        from distilgen.data import Example

        expected = generate(tm, [Example("0", prompt, None, ())], DecodingConfig(max_new_tokens=12), 1000)[0]
        assert answer["choices"][0]["text"].strip() == expected
        refused = httpx.post(f"{served.url}/v1/completions", json={"model": "int8", "prompt": prompt, "logprobs": 2})
        assert refused.status_code == 400 and "no logprobs" in refused.json()["error"]["message"]
    finally:
        served.stop()


def test_what_an_export_cannot_do_is_one_line(saved, tokenizer_dir, tmp_path):
    out = tmp_path / "export"
    export(ExportConfig(model=str(saved["gpt2"]), output_dir=str(out), quantization="int8_float32"))
    with pytest.raises(ConfigError, match="output_dir: .* exists: choose another directory, or set overwrite=true"):
        export(ExportConfig(model=str(saved["gpt2"]), output_dir=str(out)))
    export(ExportConfig(model=str(saved["gpt2"]), output_dir=str(out), overwrite=True))
    assert json.loads((out / "export.json").read_text())["quantization"] == "int8"
    with pytest.raises(ConfigError, match="output_dir: .* is not an export: overwrite replaces only an export"):
        export(ExportConfig(model=str(saved["gpt2"]), output_dir=str(saved["bart"]), overwrite=True))
    assert (saved["bart"] / "model.safetensors").is_file()  # untouched
    with pytest.raises(ConfigError, match=r"teacher.path: .* is an export \(CTranslate2\), which writes text only: "
                       r"use its source, .*gpt2"):  # fmt: skip
        load_model(ModelConfig(path=str(out)), key="teacher")
    with pytest.raises(ConfigError, match="shrink: an export cannot be shrunk"):
        load_model(ModelConfig(path=str(out), shrink="1"), allow_export=True)
    with pytest.raises(ConfigError, match="decoding: an export decodes greedy or sampled"):
        _open(out).generator().generate(["x"], DecodingConfig(num_beams=3).settings())
    for family in ("phi3", "gemma2"):
        torch.manual_seed(0)
        load_model(tiny_model_config(family, tokenizer_dir)).save(tmp_path / family)
        with pytest.raises(ConfigError, match=f"model: a {family} model: CTranslate2 export covers bart, t5, gpt2"):
            export(ExportConfig(model=str(tmp_path / family), output_dir=str(tmp_path / f"{family}_ct2")))
    with pytest.raises(ConfigError, match="quantization: must be one of"):
        ExportConfig(model=str(out), output_dir="x", quantization="int4")


def test_an_export_carries_the_prompt_its_model_was_trained_to_read(saved, tmp_path):
    (saved["llama"] / "prompt.json").write_text(json.dumps({"fingerprint": "abc", "chat": False}))
    try:
        export(ExportConfig(model=str(saved["llama"]), output_dir=str(tmp_path / "export")))
        assert json.loads((tmp_path / "export" / "prompt.json").read_text())["fingerprint"] == "abc"
    finally:
        (saved["llama"] / "prompt.json").unlink()


def test_under_first_line_a_row_ends_at_a_line_break_after_text_as_in_the_pytorch_loop():
    from types import SimpleNamespace

    from distilgen.generation.ct2 import _line_stop

    stop = _line_stop(breaks=[10, 11], blanks=[10, 20])  # 10: "\n" (blank), 11: ".\n", 20: " "
    steps = [(0, 10), (0, 20), (1, 5), (0, 7), (1, 11), (0, 10)]  # (row, token)
    ended = [stop(SimpleNamespace(batch_id=row, token_id=token)) for row, token in steps]
    assert ended == [False, False, False, False, True, True]  # a break before any text does not end a row


def test_decoder_only_prompts_are_batched_with_others_of_about_their_length():
    """CTranslate2 feeds the part of each prompt beyond the batch's shortest through its decoding loop: batches are
    cut so their prompts differ by at most `spread` tokens (the parity tests check the outputs come back in order)."""
    from distilgen.generation.ct2 import prompt_groups

    lengths = [30, 5, 12, 6, 29, 50, 7]
    assert prompt_groups(lengths, batch_size=2, spread=8) == [[1, 3], [6, 2], [4, 0], [5]]
    assert prompt_groups(lengths, batch_size=10, spread=8) == [[1, 3, 6, 2], [4, 0], [5]]
    assert prompt_groups(lengths, batch_size=10, spread=100) == [[1, 3, 6, 2, 4, 0, 5]]
    assert prompt_groups([], batch_size=4, spread=8) == []


def test_a_small_export_decodes_on_one_thread_and_a_large_one_on_torchs(saved, tmp_path, monkeypatch):
    """CTranslate2 splits each matrix product across its threads; for a small model their meeting costs more than the
    product (16x slower on two threads than on one for a 1.3M-parameter Llama), so small exports use one. Opening
    one leaves torch's thread count as it was (CTranslate2 sets the process's OpenMP threads, which torch shares)."""
    import ctranslate2

    from distilgen.generation import ct2

    assert ct2.runtime_threads(ct2.PARALLEL_PARAMETERS, 4) == 4 and ct2.runtime_threads(10**6, 4) == 1
    out = tmp_path / "export"
    export(ExportConfig(model=str(saved["gpt2"]), output_dir=str(out), quantization="float32"))
    opened = []
    real = ctranslate2.Generator

    def generator(path, **options):
        opened.append(options["intra_threads"])
        return real(path, **options)

    monkeypatch.setattr(ctranslate2, "Generator", generator)
    threads = torch.get_num_threads()
    _open(out)
    assert torch.get_num_threads() == threads  # CTranslate2 set the process's OpenMP threads; torch's are put back
    monkeypatch.setattr(ct2, "PARALLEL_PARAMETERS", 1000)  # the same model counted as large
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    try:
        _open(out)
    finally:
        torch.set_num_threads(threads)  # the 6 are pretend: later tests keep this machine's count
    assert opened == [1, 6]
