"""Population-batched full-rank decoding (esnb.population) against the per-member path."""
import pytest
import torch

from esnb.es import ES, ESConfig
from esnb.finetune import FinetuneConfig, score_members
from esnb.generation import generate
from esnb.lowrank import LowRankES
from esnb.population import generate_members, use_population
from esnb.tasks import countdown as cd
from esnb.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def items():
    train, _ = cd.load_split()
    return train[:10]


def per_member(es, members, model, tok, prompts, max_new, stops=("</answer>",), batch_size=256):
    out = []
    for m in members:
        with es.perturbed(m):
            out.append(generate(model, tok, prompts, max_new, list(stops), batch_size=batch_size))
    return out


@pytest.mark.parametrize("antithetic,batch_size,per_pass", [(False, 256, None), (True, 4, 3)])
def test_population_completions_equal_the_per_member_ones(tiny, items, antithetic, batch_size, per_pass):
    model, tok = tiny
    prompts = [cd.compact_prompt(p["numbers"], p["target"]) for p in items]
    es = ES(model, ESConfig(population_size=6, sigma=0.02, seed=3, antithetic=antithetic))
    members = es.ask()
    before = [p.detach().clone() for p in model.parameters()]
    batched = generate_members(es, members, model, tok, prompts, 48, ["</answer>"], batch_size=batch_size,
                               members_per_pass=per_pass)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is never touched
    assert batched == per_member(es, members, model, tok, prompts, 48, batch_size=batch_size)
    assert len({tuple(x) for x in batched}) > 1   # the members really differ


def test_population_covers_qwen2_with_biases(tiny, items):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    prompts = [cd.compact_prompt(p["numbers"], p["target"]) for p in items[:6]]
    es = ES(model, ESConfig(population_size=4, sigma=0.05, seed=1))
    members = es.ask()
    assert generate_members(es, members, model, tok, prompts, 16, []) == per_member(es, members, model, tok, prompts, 16, ())


def test_score_members_batched_and_per_member_agree(tiny, items):
    model, tok = tiny
    task = get_task("countdown", prompt_style="compact")
    prompts = [task.prompt(it, tok) for it in items]
    es = ES(model, ESConfig(population_size=6, sigma=0.02, seed=5))
    members = es.ask()
    batched = score_members(es, members, model, tok, task, prompts, items, 48, population_batch=True)
    single = score_members(es, members, model, tok, task, prompts, items, 48, population_batch=False)
    assert batched == single


def test_population_choice(tiny):
    model, _ = tiny
    es = ES(model, ESConfig(population_size=4))
    assert use_population("auto", model, es) and use_population(True, model, es)
    assert not use_population(False, model, es)
    low = LowRankES(model, ESConfig(population_size=4), rank=1)
    assert not use_population("auto", model, low)
    with pytest.raises(ValueError, match="population_batch"):
        use_population(True, model, low)
    with pytest.raises(ValueError, match="population_batch"):
        use_population("yes", model, es)
    with pytest.raises(ValueError, match="population_batch"):
        FinetuneConfig(population_batch="yes")
    assert FinetuneConfig(population_batch=False).population_batch is False
