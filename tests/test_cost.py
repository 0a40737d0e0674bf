import time

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

from distilgen.cost import (
    count_parameters,
    measure_latency,
    measure_sample_latency,
    measure_throughput,
    peak_memory,
    size_on_disk,
)


@pytest.fixture
def tiny_bart():
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=100,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    return BartForConditionalGeneration(config)


def tiny_gpt2(tie_word_embeddings: bool = True):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=100,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
    )
    return GPT2LMHeadModel(config)


class FakeClock:
    """Stands in for time.perf_counter; the measured functions advance it by known durations."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bart_parameters_split_into_embedding_encoder_and_decoder(tiny_bart):
    # Shared token embedding 100 x 16 (tied to encoder, decoder and LM head) + 2 learned position tables of
    # (64 + 2 offset) x 16.
    embedding = 100 * 16 + 2 * 66 * 16
    attention = 4 * (16 * 16 + 16)
    ffn = (16 * 32 + 32) + (32 * 16 + 16)
    layer_norm = 2 * 16
    encoder = attention + ffn + 2 * layer_norm + layer_norm  # one layer + layernorm_embedding
    decoder = 2 * attention + ffn + 3 * layer_norm + layer_norm  # self + cross attention
    counts = count_parameters(tiny_bart)
    assert counts == {
        "total": embedding + encoder + decoder,
        "embedding": embedding,
        "encoder": encoder,
        "decoder": decoder,
    }
    assert counts["total"] == sum(p.numel() for p in tiny_bart.parameters())


def test_gpt2_parameters_count_the_tied_lm_head_once():
    embedding = 100 * 16 + 32 * 16  # token + position embeddings
    block = 2 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + 2 * 16 + (16 * 64 + 64) + (64 * 16 + 16)
    decoder = 2 * block + 2 * 16  # two blocks + final layer norm
    tied = tiny_gpt2()
    assert count_parameters(tied) == {
        "total": embedding + decoder,
        "embedding": embedding,
        "encoder": 0,
        "decoder": decoder,
    }
    assert count_parameters(tied)["total"] == sum(p.numel() for p in tied.parameters())


def test_an_untied_lm_head_counts_in_the_decoder():
    tied, untied = count_parameters(tiny_gpt2()), count_parameters(tiny_gpt2(tie_word_embeddings=False))
    assert untied["decoder"] - tied["decoder"] == 100 * 16
    assert untied["embedding"] == tied["embedding"]


def test_size_on_disk_counts_the_safetensors_weights_and_all_files(tiny_bart, tmp_path):
    tiny_bart.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 10)  # a legacy copy, not loaded beside safetensors
    sizes = size_on_disk(tmp_path)
    assert sizes["weights"] == (tmp_path / "model.safetensors").stat().st_size
    assert sizes["total"] == sum(f.stat().st_size for f in tmp_path.iterdir())


def test_latency_is_the_median_and_p90_of_the_timed_runs_after_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    durations = iter([5.0, 0.1, 0.3, 0.2, 0.5, 0.4])  # the first call is the warm-up: not timed

    def generate_one():
        clock.now += next(durations)

    latency = measure_latency(generate_one, runs=5, warmup=1)
    assert latency == {"latency_median_s": pytest.approx(0.3), "latency_p90_s": pytest.approx(0.46)}
    assert next(durations, None) is None  # every duration consumed: 1 warm-up + 5 runs


def test_sample_latency_is_the_mean_of_each_inputs_median_and_per_token(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    lengths = {"a": 2, "b": 10, "c": 6}
    jitter = iter([0.0] + [0.0, 0.5, 0.0] + [0.0] * 6)  # the warm-up, then one slow pass of "b": its median drops it

    def generate_one(item):
        clock.now += 0.01 * lengths[item] + next(jitter)
        return lengths[item]

    latency = measure_sample_latency(generate_one, ["a", "b", "c"], runs=3, warmup=1)
    assert latency["latency_s"] == pytest.approx(0.06) and latency["latency_per_token_ms"] == pytest.approx(10.0)
    assert latency["latency_examples"] == 3 and latency["output_tokens_mean"] == pytest.approx(6.0)
    assert latency["latency_p90_s"] == pytest.approx(0.092)


def test_models_of_one_architecture_get_one_latency_whatever_their_first_output():
    """The defect this protocol fixes: timed on one input, a model whose first output is long looked 5x slower
    than a model of the same architecture whose first output is short."""
    clock = FakeClock()

    def model(lengths: list[int]):
        def generate_one(i):
            clock.now += 0.002 + 0.01 * lengths[i]  # the same cost per token: one architecture
            return lengths[i]

        return generate_one

    long_first, short_first = [10, 2, 6, 6], [2, 9, 7, 6]  # other outputs, the same mean length
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "perf_counter", clock)
        a = measure_sample_latency(model(long_first), [0, 1, 2, 3], runs=2)
        b = measure_sample_latency(model(short_first), [0, 1, 2, 3], runs=2)
        first_a = measure_latency(lambda: model(long_first)(0), runs=2)["latency_median_s"]
        first_b = measure_latency(lambda: model(short_first)(0), runs=2)["latency_median_s"]
        longer = measure_sample_latency(model([12, 12, 12, 12]), [0, 1, 2, 3], runs=2)
    assert a["latency_s"] == pytest.approx(b["latency_s"])
    assert a["latency_per_token_ms"] == pytest.approx(b["latency_per_token_ms"])
    assert first_a / first_b > 4  # what one input said
    assert longer["latency_per_token_ms"] == pytest.approx(a["latency_per_token_ms"], rel=0.05)  # per token: alike


def test_latency_of_real_sleeps_is_close_to_the_sleep():
    latency = measure_latency(lambda: time.sleep(0.01), runs=3, warmup=0)
    assert 0.01 <= latency["latency_median_s"] < 0.5  # loose: the test machine may be busy


def test_throughput_divides_examples_and_tokens_by_the_elapsed_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    chunks = []

    def generate_batch(chunk):
        chunks.append(chunk)
        clock.now += 1.0
        return 3 * len(chunk)

    throughput = measure_throughput(generate_batch, list(range(10)), batch_size=4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert throughput == {"examples_per_s": pytest.approx(10 / 3), "tokens_per_s": pytest.approx(10), "seconds": 3.0}


def test_peak_memory_is_refused_on_a_cpu():
    with pytest.raises(ValueError, match="peak memory is measured on a CUDA device, not cpu"):
        peak_memory(lambda: None, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_memory_covers_a_temporary_tensor():
    size = 64 * 2**20
    _, peak = peak_memory(lambda: torch.empty(size, dtype=torch.uint8, device="cuda").sum(), device="cuda")
    assert peak >= size


def test_flops_per_token_count_weights_head_and_attention():
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    from distilgen.cost import flops_per_token

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64))
    body = sum(p.numel() for p in gpt2.transformer.h.parameters()) + sum(
        p.numel() for p in gpt2.transformer.ln_f.parameters()
    )
    flops = flops_per_token(gpt2, input_length=10, output_length=4)
    assert flops["per_generated_token"] == 2 * body + 2 * 100 * 16 + 4 * 2 * 16 * (10 + 2)
    assert flops["per_input_token"] == 2 * body + 4 * 2 * 16 * 5

    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=100,
            d_model=16,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
        )
    )
    enc = sum(p.numel() for n, p in bart.model.encoder.named_parameters() if not n.startswith("embed_"))
    flops = flops_per_token(bart, input_length=10, output_length=4)
    assert flops["per_input_token"] == 2 * enc + 4 * 2 * 16 * 10
    shallower = flops_per_token(
        BartForConditionalGeneration(BartConfig(**{**bart.config.to_dict(), "decoder_layers": 3})), 10, 4
    )
    assert shallower["per_generated_token"] > flops["per_generated_token"]  # decoder depth drives generation cost
