"""The one Llama-family forward (esnb.llama) with each of its weight providers -- the model's own
weights, stacked member weights, base weights plus low-rank factors -- against Hugging Face, token
for token: on the shipped tiny model and on small randomly initialised Qwen2 and Llama-3 models
(built locally)."""
import pytest
import torch

import esnb.generation as gen
from esnb.es import ES, ESConfig
from esnb.generation import GreedyState, decode_greedy, eos_ids, encode_prompts, generate
from esnb.llama import LlamaDecoder, SharedWeights, supported
from esnb.lowrank import LowRankES, generate_population, lowrank_covers, lowrank_decoder
from esnb.population import StackedWeights, keep_member_slots
from esnb.tasks import countdown as cd


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def prompts():
    _, test = cd.load_split()
    return [cd.compact_prompt(p["numbers"], p["target"]) for p in test[:12]]


def _random_model(kind: str, vocab: int):
    """A small randomly initialised model of the paper's families (no hub): Qwen2 (biases on
    q/k/v, grouped-query attention, tied embeddings) or Llama-3 (rope_type "llama3")."""
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
    assert supported(model)
    if kind == "llama3":  # the scaled rope really differs from the default one
        default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
        assert not torch.allclose(model.model.rotary_emb.inv_freq, default)
    if not fuse:  # the path of large models: live weights, one product per projection
        monkeypatch.setattr(gen, "SMALL_MODEL", 0)
    hf = generate(model, tok, prompts, max_new_tokens=24, fast=False, threads=1)
    lean = generate(model, tok, prompts, max_new_tokens=24, fast=True, threads=1)
    assert lean == hf
    assert len({len(x) for x in hf}) > 1  # rows end at different steps (EOS), so rows were dropped


# ---------------------------------------------------------------- every provider vs Hugging Face generate

MAX_NEW = 48  # the tiny model ends most completions (EOS) before this


@pytest.fixture(scope="module", params=["tiny", "qwen2", "llama3"])
def case(request, tiny, prompts):
    """(model, tokenizer, left-padded prompt ids, attention mask) of one model family."""
    model, tok = tiny
    if request.param != "tiny":
        model = _random_model(request.param, len(tok))
    ids, attn = encode_prompts(tok, prompts, "cpu")
    return model, tok, ids, attn


def _hf_tokens(model, tok, ids, attn) -> list[list[int]]:
    """Hugging Face ``generate`` (greedy), each row's new tokens up to its first EOS."""
    eos = eos_ids(model, tok)
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    rows = [r.tolist() for r in seq]
    return [r[:next((i for i, x in enumerate(r) if x in eos), len(r))] for r in rows]


def _our_tokens(dec, model, tok, ids, attn, rows, keep=gen.drop_finished) -> list[list[int]]:
    """``dec``'s greedy tokens of every row up to (without) its EOS."""
    state = GreedyState(tok, eos_ids(model, tok), set(), rows, MAX_NEW, ids.device)
    with torch.no_grad():
        decode_greedy(dec, state, ids, attn, MAX_NEW, keep=keep)
    return [row[k].tolist() for row, k in zip(state.out[:, :state.steps], state.keep[:, :state.steps])]


@pytest.mark.parametrize("fuse", [True, False])
def test_shared_weights_give_hugging_face_generate_tokens(case, fuse):
    model, tok, ids, attn = case
    ours = _our_tokens(LlamaDecoder(model, SharedWeights(model, fuse=fuse)), model, tok, ids, attn, ids.shape[0])
    hf = _hf_tokens(model, tok, ids, attn)
    assert ours == hf
    assert len({len(r) for r in hf}) > 1   # rows end at different steps, so rows were dropped


def test_stacked_weights_give_each_members_hugging_face_generate_tokens(case):
    model, tok, ids, attn = case
    es = ES(model, ESConfig(population_size=4, sigma=0.02, seed=3))
    members = es.ask()
    b = ids.shape[0]
    ours = _our_tokens(LlamaDecoder(model, StackedWeights(model, es, members)), model, tok, ids, attn,
                       len(members) * b, keep=keep_member_slots)
    for m, member in enumerate(members):
        with es.perturbed(member):
            assert ours[m * b:(m + 1) * b] == _hf_tokens(model, tok, ids, attn), m
    assert len({tuple(map(tuple, ours[m * b:(m + 1) * b])) for m in range(len(members))}) > 1  # members differ


def test_low_rank_weights_give_each_members_hugging_face_generate_tokens(case):
    model, tok, ids, attn = case
    es = LowRankES(model, ESConfig(population_size=4, sigma=0.05, seed=3), rank=2)
    members = es.ask()
    b = ids.shape[0]
    ours = _our_tokens(lowrank_decoder(model, es, members), model, tok, ids, attn, len(members) * b)
    for m, member in enumerate(members):
        with es.perturbed(member):
            assert ours[m * b:(m + 1) * b] == _hf_tokens(model, tok, ids, attn), m
    assert len({tuple(map(tuple, ours[m * b:(m + 1) * b])) for m in range(len(members))}) > 1  # members differ


def test_generate_population_decodes_qwen2_and_llama3_factored_on_request(tiny, prompts):
    _, tok = tiny
    for kind in ("qwen2", "llama3"):
        model = _random_model(kind, len(tok))
        es = LowRankES(model, ESConfig(population_size=3, sigma=0.05, seed=1), rank=1)
        members = es.ask()
        assert not lowrank_covers(model)  # by default one member at a time, as before
        factored = generate_population(es, members, model, tok, prompts[:6], 12, factored=True)
        assert factored == generate_population(es, members, model, tok, prompts[:6], 12)
