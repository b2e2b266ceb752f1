"""Generation: greedy equals transformers' generate, the KV cache equals recomputing
everything, compiled decode equals eager, sampling filters, stop tokens, prompts,
streaming, loading (run dirs, adapter-only checkpoints) and `fastune generate`."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from tiny_hf import build_hf_model, save_hf_model
from train_helpers import DEMO_TOKENIZER, hf_llama, recompute_greedy, save_base, single_thread  # noqa: F401 (autouse fixture)

import fastune
from fastune.cli import main
from fastune.data import load_tokenizer
from fastune.generation import (
    Generator, SamplingError, SamplingParams, TextStream, cache_mask, clear_kv_caches, generate,
    load_for_inference, prompt_ids, sample, setup_kv_caches,
)

# The module, not the function of the same name that fastune.generation exports.
generate_module = importlib.import_module("fastune.generation.generate")
PROMPTS = [[5, 17, 33, 2, 61, 9, 40], [71, 3], [12, 88, 45, 6]]  # lengths 7, 2, 4: two rows padded


@pytest.fixture(scope="module")
def hf_and_fastune(tmp_path_factory):
    """(HF model, the same weights in fastune) for a GQA model with llama3 RoPE scaling."""
    hf = build_hf_model("llama_gqa_llama3", seed=3)
    path = save_hf_model(hf, tmp_path_factory.mktemp("gqa"))
    return hf, fastune.from_pretrained(path).eval().requires_grad_(False)  # as load_for_inference gives it


@pytest.fixture
def record_logits(monkeypatch):
    """The logits the generator samples from, step by step ([B, V] each)."""
    seen = []

    def recording_sample(logits, params, generator=None):
        seen.append(logits.clone())
        return sample(logits, params, generator)

    monkeypatch.setattr(generate_module, "sample", recording_sample)
    return seen


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2_bias"])
def test_greedy_equals_transformers_generate(variant, tmp_path):
    hf = build_hf_model(variant, seed=3)
    model = fastune.from_pretrained(save_hf_model(hf, tmp_path)).eval()
    ours = generate(model, PROMPTS, max_new_tokens=12).tokens  # one left-padded batch
    for prompt, tokens in zip(PROMPTS, ours):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert tokens == theirs[0, len(prompt):].tolist()
    assert len({tuple(t) for t in ours}) == len(ours) and all(len(set(t)) > 2 for t in ours), \
        "degenerate outputs would make the comparison weak"


def test_kv_cache_decoding_equals_recomputing_everything(hf_and_fastune, record_logits):
    _, model = hf_and_fastune
    out = generate(model, PROMPTS, max_new_tokens=10)
    assert out.tokens == recompute_greedy(model, PROMPTS, 10, stop_ids=[])  # no cache, whole batch re-run
    # Logits: step t of a row equals the full-sequence forward of prompt + t generated tokens.
    for row, (prompt, tokens) in enumerate(zip(PROMPTS, out.tokens)):
        full = torch.tensor([prompt + tokens])
        with torch.no_grad():
            reference = model(full)[0, len(prompt) - 1:-1]
        cached = torch.stack([step[row] for step in record_logits])
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)


def test_cache_mask_keeps_padding_and_future_out():
    valid = torch.tensor([[False, False, True, True, True, True]])  # 2 padding, prompt of 2, 2 to come
    mask = cache_mask(valid, torch.arange(4))[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # padding sees padding (an empty row would give NaN)
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],  # real tokens see real tokens, causally
        [0, 0, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_caches_are_set_up_and_removed(hf_and_fastune):
    _, model = hf_and_fastune
    setup_kv_caches(model, batch_size=2, max_seq_len=16)
    cache = model.layers[0].self_attn.kv_cache
    assert cache.k.shape == (2, model.config.num_key_value_heads, 16, model.config.head_dim)
    clear_kv_caches(model)
    assert all(layer.self_attn.kv_cache is None for layer in model.layers)
    generate(model, PROMPTS[:1], max_new_tokens=3)
    assert model.layers[0].self_attn.kv_cache is None  # generate leaves the model as it found it


@pytest.mark.slow
def test_compiled_decode_equals_eager(hf_and_fastune, record_logits):
    _, model = hf_and_fastune
    eager = generate(model, PROMPTS, max_new_tokens=8)
    eager_logits = list(record_logits)
    record_logits.clear()
    compiled = Generator(model, compile=True).generate(PROMPTS, max_new_tokens=8)
    assert compiled.tokens == eager.tokens
    for a, b in zip(record_logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stop_ids_end_each_row(hf_and_fastune):
    _, model = hf_and_fastune
    free = generate(model, PROMPTS, max_new_tokens=10).tokens
    stop = free[0][4]
    cut = free[0].index(stop)
    out = generate(model, PROMPTS, max_new_tokens=10, stop_ids=[stop]).tokens
    assert out[0] == free[0][:cut]
    for mine, unstopped in zip(out[1:], free[1:]):
        assert mine == (unstopped[:unstopped.index(stop)] if stop in unstopped else unstopped)


def test_stop_fn_ends_a_row_early(hf_and_fastune):
    _, model = hf_and_fastune
    out = generate(model, PROMPTS, max_new_tokens=10, stop_fn=lambda row, ids: len(ids) >= 3)
    assert [len(t) for t in out.tokens] == [3, 3, 3]


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_and_fastune):
    _, model = hf_and_fastune
    greedy = generate(model, PROMPTS, max_new_tokens=6).tokens
    assert generate(model, PROMPTS, max_new_tokens=6, sampling=SamplingParams(1.0, top_k=1), seed=0).tokens == greedy
    hot = SamplingParams(temperature=2.0, top_p=0.95)
    first = generate(model, PROMPTS, max_new_tokens=6, sampling=hot, seed=1).tokens
    assert generate(model, PROMPTS, max_new_tokens=6, sampling=hot, seed=1).tokens == first
    assert first != greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)
    draws = lambda params: {int(sample(logits, params, generator)) for _ in range(200)}  # noqa: E731
    assert draws(SamplingParams(1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert draws(SamplingParams(1.0, top_p=0.5)) == {0}  # the first token alone reaches 0.5
    assert draws(SamplingParams(1.0, top_k=3)) == {0, 1, 2}


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(20000, 3), SamplingParams(temperature=2.0), generator)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_one_line_errors(bad):
    with pytest.raises(SamplingError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_prompt_in_chat_format_or_plain():
    tok = load_tokenizer(DEMO_TOKENIZER)
    chat = prompt_ids(tok, "Write the word backwards.", system="Be brief.")
    expected, _ = tok.tokenize_messages([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Write the word backwards."}],
                                        add_generation_prompt=True)
    assert chat == expected
    assert tok.decode(chat, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt_ids(tok, "abc", chat=False) == tok.encode("abc", add_bos=True)


def test_text_stream_shows_whole_characters_and_no_stop_token():
    tok = load_tokenizer(DEMO_TOKENIZER)
    ids = tok.encode("Write é backwards", add_bos=False)  # é is two byte-level tokens here
    pieces = []
    stream = TextStream(tok, pieces.append, stop_ids=[tok.eos_id])
    for token in [*ids, tok.eos_id, ids[0]]:
        stream([token])
    assert "".join(pieces) == "Write é backwards"
    assert all("\ufffd" not in p for p in pieces)


def test_load_follows_a_run_dir_to_its_latest_checkpoint(tmp_path):
    base = save_base(hf_llama(seed=1), tmp_path / "base")
    for name, step in [("step_2", 2), ("epoch_0", 4)]:  # epoch_0 is the later one
        shutil.copytree(base, tmp_path / "run" / name)
        (tmp_path / "run" / name / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    _, _, ckpt = load_for_inference(tmp_path / "run", dtype="fp32")
    assert ckpt == tmp_path / "run" / "epoch_0"


@pytest.mark.parametrize("named_base", ["path", "repo"])
def test_load_merges_an_adapter_only_checkpoint(tmp_path, named_base):
    """What `save_adapter_weights_only` leaves: config.json, tokenizer, adapter/. The
    adapter names its base by path, or by Hub repo (then the run's config.yaml has the path)."""
    from fastune.checkpoint.peft import save_peft_adapter
    from fastune.modules.peft import apply_lora

    base = save_base(hf_llama(seed=1), tmp_path / "base")
    model = fastune.from_pretrained(base)
    apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the adapter change something
    ckpt = tmp_path / "run" / "epoch_0"
    save_peft_adapter(model, ckpt / "adapter", base_model_name_or_path=str(base) if named_base == "path" else "org/m")
    (tmp_path / "run" / "config.yaml").write_text(f"model:\n  checkpoint_dir: {base}\n")
    shutil.copy2(base / "config.json", ckpt / "config.json")
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy2(f, ckpt / f.name)
    merged, _, _ = load_for_inference(ckpt, dtype="fp32")
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), model.eval()(tokens), rtol=1e-5, atol=1e-5)


def test_cli_generate_streams_the_greedy_answer(tmp_path):
    base = save_base(hf_llama(seed=1), tmp_path / "base")
    model, tok, _ = load_for_inference(base, dtype="fp32")
    expected = tok.decode(generate(model, [prompt_ids(tok, "Sort the letters.")], 8,
                                   stop_ids=tok.stop_ids).tokens[0])
    result = CliRunner().invoke(main, ["generate", str(base), "Sort the letters.", "--max-new-tokens", "8",
                                       "--dtype", "fp32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "prompt" in result.stderr


def test_cli_generate_on_a_missing_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "hi"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such directory"


def tiny_model():
    from fastune.models import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()


def test_the_generator_keeps_one_kv_cache_across_calls():
    """Item 8 of the GPU-path review: the cache memory is allocated once per generator,
    so a CUDA-graphed decode step replays on the same addresses call after call."""
    model = tiny_model()
    generator = Generator(model)
    seen = []

    def record(_tokens):
        cache = model.layers[0].self_attn.kv_cache
        # The tensors themselves are held, so that a fresh allocation cannot reuse the address.
        seen.append((cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape, cache.k, cache.v))

    for prompts in ([list(range(1, 40))], PROMPTS, PROMPTS[1:]):  # the largest cache first
        generator.generate(prompts, max_new_tokens=3, on_token=record)
    assert len({ptrs[:2] for ptrs in seen}) == 1
    assert {ptrs[2][:1] + ptrs[2][2:3] for ptrs in seen} == {(3, 10), (2, 7), (1, 42)}
    assert model.layers[0].self_attn.kv_cache is None  # the model is left as it was found


def test_one_host_sync_per_generated_token():
    """One read of the device per step (the new tokens), streaming and stop_fn included."""
    from fastune.bench.counting import HostSyncs

    model = tiny_model()
    with HostSyncs() as syncs:
        out = Generator(model).generate(PROMPTS, max_new_tokens=6, on_token=lambda t: None,
                                        stop_fn=lambda row, ids: False)
    steps = 1 + len(out.step_seconds)  # prefill's token, then one per decode step
    print(f"\nhost syncs: {len(syncs.calls)} for {steps} tokens per row ({syncs.calls})")
    assert steps == 6 and len(syncs.calls) == steps


def test_compiled_decode_compiles_once_per_power_of_two_cache_length(monkeypatch):
    """Prompts over 10 multiples of 128 (the old buckets: 10 compiles, and past Dynamo's
    limit of 8 the step ran eager) take 5 cache lengths: 128 to 2048."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": counting_backend}))
    model = tiny_model()
    model.requires_grad_(True)  # the plain compile (no inductor freezing options)
    generator = Generator(model, compile=True)
    lengths = [128 * k - 10 for k in range(1, 11)]
    for length in lengths:
        generator.generate([[1 + i % 60 for i in range(length)]], max_new_tokens=2)
    assert sorted({generate_module.cache_length(n + 2) for n in lengths}) == [128, 256, 512, 1024, 2048]
    print(f"\ndecode graphs for prompts of {lengths[0]} to {lengths[-1]} tokens: {len(graphs)}")
    assert len(graphs) == 5
