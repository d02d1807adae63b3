"""Greedy generation and evaluation on the shipped tiny model (the lean decoder on Qwen2 and
Llama-3 models: tests/test_llama.py)."""
import pytest
import torch

import esnb.generation as gen
from esnb.generation import evaluate, generate
from esnb.models import load_model
from esnb.tasks import get_task
from esnb.tasks import countdown as cd


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


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
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert generate(model, tok, many, max_new_tokens=24, batch_size=64) == serial        # 2 batches, 2 threads
        assert generate(model, tok, many, max_new_tokens=24, batch_size=256) == serial       # 1 batch, split
        assert generate(model, tok, many[:8], max_new_tokens=24, batch_size=256) == serial[:8]  # too few: one thread
        assert seen == [(2, 2), (2, 2)]
        monkeypatch.setattr(cpu, "free_cores", lambda: 1)  # another process holds a core: one thread
        assert generate(model, tok, many, max_new_tokens=24, batch_size=64) == serial and len(seen) == 2
        monkeypatch.setattr(cpu, "free_cores", lambda: 2)
        torch.set_num_threads(1)   # the caller asked for one core: the same batches, decoded on one thread
        assert generate(model, tok, many, max_new_tokens=24, batch_size=256) == serial and len(seen) == 2
    finally:
        torch.set_num_threads(before)


def test_a_busy_machine_gets_the_same_bf16_texts(monkeypatch):
    """How many cores are free decides how many threads decode, never how the prompts are batched:
    in bf16 a batch's padding can change a completion (one of these 48 changed when a batch was
    split only on an idle machine)."""
    import esnb._cpu as cpu

    model, tok = load_model("tiny-base", device="cpu", dtype="bf16")
    _, test = cd.load_split()
    prompts = [cd.compact_prompt(p["numbers"], p["target"]) for p in test[:48]]
    texts, batches = {}, {}
    real = gen._generate_batch

    def spy(*args, **kwargs):
        batches[free].append(len(kwargs["encoded"][0]) if kwargs.get("encoded") else len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "_generate_batch", spy)
    for free in (1, 2, 4):
        monkeypatch.setattr(cpu, "free_cores", lambda free=free: free)
        batches[free] = []
        texts[free] = generate(model, tok, prompts, max_new_tokens=64, stop_strings=["</answer>"], batch_size=64)
    assert texts[1] == texts[2] == texts[4]
    assert sorted(batches[1]) == sorted(batches[2]) == sorted(batches[4]) == [24, 24]
