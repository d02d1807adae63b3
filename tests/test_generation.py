"""Greedy generation and evaluation on the shipped tiny model, and the lean decoder against the
Hugging Face forward on small randomly initialised Qwen2 and Llama-3 models (built locally)."""
import pytest
import torch

import esnb.generation as gen
from esnb.generation import evaluate, generate
from esnb.models import load_model
from esnb.tasks import get_task
from esnb.tasks import countdown as cd


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def prompts():
    _, test = cd.load_split()
    return [cd.compact_prompt(p["numbers"], p["target"]) for p in test[:24]]


def test_completions_stop_after_answer(tiny, prompts):
    model, tok = tiny
    out = generate(model, tok, prompts, max_new_tokens=64, stop_strings=["</answer>"])
    assert len(out) == len(prompts)
    assert sum(o.endswith("</answer>") for o in out) >= len(out) * 0.9
    assert all(o.count("</answer>") <= 1 for o in out)


def test_eos_ends_a_completion_and_is_dropped(tiny, prompts):
    model, tok = tiny
    out = generate(model, tok, prompts[:8], max_new_tokens=80)  # no stop strings: EOS only
    assert all("<eos>" not in o for o in out)
    assert sum(o.endswith("</answer>") for o in out) >= 6   # the model emits EOS after the answer


def test_multi_token_stop_string_is_matched_on_text(tiny, prompts):
    model, tok = tiny
    out = generate(model, tok, prompts[:8], max_new_tokens=64, stop_strings=["</think>\n"])
    assert all(o.endswith("</think>\n") and "<answer>" not in o for o in out if "</think>" in o)


def test_max_new_tokens_caps_length(tiny, prompts):
    model, tok = tiny
    out = generate(model, tok, prompts, max_new_tokens=5)
    assert all(len(tok.encode(o, add_special_tokens=False)) <= 5 for o in out)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, prompts, max_new_tokens=0)


def test_batching_and_padding_do_not_change_greedy_output(tiny, prompts):
    model, tok = tiny
    full = generate(model, tok, prompts, batch_size=64)
    assert generate(model, tok, prompts, batch_size=5) == full
    assert generate(model, tok, prompts[::-1], batch_size=7) == full[::-1]   # order kept
    assert generate(model, tok, [prompts[3]], batch_size=1) == [full[3]]


def test_lean_decoder_matches_hugging_face_forward(tiny, prompts):
    model, tok = tiny
    lean = generate(model, tok, prompts, max_new_tokens=48, stop_strings=["</answer>"], fast=True)
    hf = generate(model, tok, prompts, max_new_tokens=48, stop_strings=["</answer>"], fast=False)
    assert lean == hf


def test_generation_sees_in_place_weight_changes(tiny, prompts):
    import torch

    model, tok = tiny
    before = generate(model, tok, prompts[:8], max_new_tokens=20)
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(0.5 * torch.randn_like(w))
    try:
        after = generate(model, tok, prompts[:8], max_new_tokens=20)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert after != before
    assert generate(model, tok, prompts[:8], max_new_tokens=20) == before


def test_evaluate_on_countdown(tiny):
    model, tok = tiny
    _, test = cd.load_split()
    res = evaluate(model, tok, get_task("countdown", prompt_style="compact"), test[:128],
                   progress=False)
    assert set(res) >= {"accuracy", "mean_reward", "samples"}
    df = res["samples"]
    assert len(df) == 128 and {"prompt", "completion", "reward", "correct"} <= set(df.columns)
    assert res["accuracy"] == pytest.approx(df["correct"].mean())
    # the shipped model is weak but not hopeless, and has learned the format
    assert 0.05 <= res["accuracy"] <= 0.5
    assert (df["format_reward"] == 1.0).mean() > 0.8


# ---------------------------------------------------------------- the paper's model families


def _random_model(kind: str, vocab: int):
    """A small randomly initialised model of the paper's families (no hub): Qwen2 (biases on
    q/k/v, grouped-query attention) or Llama-3 (rope_type "llama3")."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed({"qwen2": 0, "llama3": 1, "llama-bias": 2, "llama-linear": 3}[kind])
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(rope_scaling=rope, **common))
    elif kind == "llama-linear":
        model = LlamaForCausalLM(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 4.0}, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, mlp_bias=True, **common))
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "llama-bias", "llama-linear"])
@pytest.mark.parametrize("fuse", [True, False])
def test_lean_decoder_covers_qwen2_and_llama3_with_hugging_face_tokens(tiny, prompts, kind, fuse, monkeypatch):
    _, tok = tiny
    model = _random_model(kind, len(tok))
    assert gen._fast_llama_ok(model)
    if kind == "llama3":  # the scaled rope really differs from the default one
        default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
        assert not torch.allclose(model.model.rotary_emb.inv_freq, default)
    if not fuse:  # the path of large models: live weights, one product per projection
        monkeypatch.setattr(gen, "SMALL_MODEL", 0)
    hf = generate(model, tok, prompts[:12], max_new_tokens=24, fast=False, threads=1)
    lean = generate(model, tok, prompts[:12], max_new_tokens=24, fast=True, threads=1)
    assert lean == hf
    assert len({len(x) for x in hf}) > 1  # rows end at different steps (EOS), so rows were dropped


def test_hugging_face_fallback_drops_finished_rows(tiny, prompts):
    model, tok = tiny
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        hf = generate(model, tok, prompts[:16], max_new_tokens=64, stop_strings=["</answer>"], fast=False)
    finally:
        hook.remove()
    assert widths[0] == 16 and min(widths) < 16   # finished rows left the batch
    assert hf == generate(model, tok, prompts[:16], max_new_tokens=64, stop_strings=["</answer>"], fast=True)


def test_small_models_decode_batches_on_free_cores_with_the_same_texts(tiny, monkeypatch):
    """A small model decodes on one torch thread; with two free cores its batches go to two threads
    (one batch is split in two), and every text is the one-thread decoder's."""
    import esnb._cpu as cpu

    model, tok = tiny
    _, test = cd.load_split()
    many = [cd.compact_prompt(p["numbers"], p["target"]) for p in test[:80]]
    serial = generate(model, tok, many, max_new_tokens=24, batch_size=64, threads=1)
    seen = []
    real = gen._generate_batches_threaded

    def spy(*args, **kwargs):
        seen.append((len(args[3]), args[5]))  # (batches, workers)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "_generate_batches_threaded", spy)
    monkeypatch.setattr(cpu, "free_cores", lambda: 2)
    assert generate(model, tok, many, max_new_tokens=24, batch_size=64) == serial        # 2 batches, 2 threads
    assert generate(model, tok, many, max_new_tokens=24, batch_size=256) == serial       # 1 batch, split
    assert generate(model, tok, many[:8], max_new_tokens=24, batch_size=256) == serial[:8]  # too few: one thread
    assert seen == [(2, 2), (2, 2)]
    monkeypatch.setattr(cpu, "free_cores", lambda: 1)  # another process holds a core: one thread
    assert generate(model, tok, many, max_new_tokens=24, batch_size=64) == serial and len(seen) == 2
