"""Paper mode against transcriptions of what the paper's released script really computes
(VsonicV/es-fine-tuning-paper: ``countdown/es_fine-tuning_countdown.py`` and
``countdown/countdown_task.py``): its reward of the decoded prompt + completion, its seed
schedule, and, on the tiny model, two whole iterations of its loop.

The transcriptions below are written from the script, line for line where it matters, and share
no code with esnb. One substitution: the script checks an answer with ``eval``; here
``_script_eval`` walks Python's own syntax tree of the (digits, ``+ - * / ( )`` and spaces only)
answer with Python's operators, which is what ``eval`` computes on such a string, without
running anything, and refuses huge powers (which would hang ``eval``).
"""
from __future__ import annotations

import ast
import json
import operator
import re

import numpy as np
import pytest
import torch

from esnb.es import ESConfig, PaperSeedsES, paper_iteration_seeds
from esnb.finetune import FinetuneConfig
from esnb.tasks import get_task
from esnb.tasks import countdown as cd

# ---------------------------------------------------------------- transcription: countdown_task.py


def _script_format(response, end_token=None):
    if end_token and response.endswith(end_token):
        response = response[: -len(end_token)]
    think_match = re.search(r"<think>.*?<\/think>", response, re.DOTALL)
    answer_match = re.search(r"<answer>.*?<\/answer>", response, re.DOTALL)
    full_format_match = re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", response, re.DOTALL)
    if full_format_match:
        return 1.0
    reward = 0.0
    if think_match:
        reward += 0.1
    if answer_match:
        reward += 0.5
    return reward


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _script_eval(text):
    """``eval(text, {"__builtins__": None}, {})`` for text of digits, + - * / ( ) and spaces."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise OverflowError("a power eval would take too long over")
            return _OPS[type(node.op)](a, b)
        raise SyntaxError("not arithmetic")
    return walk(ast.parse(text.lstrip(" \t"), mode="eval"))  # eval() of a string skips leading blanks


def _script_answer(response, numbers=None, target=None):
    all_matches = re.findall(r"<answer>(.*?)<\/answer>", response, re.DOTALL)
    if not all_matches:
        return 0.0
    answer_content = all_matches[-1]
    if not answer_content:
        return 0.0
    if not re.match(r"^[0-9+\-*/() ]+$", answer_content):
        return 0.0
    used_numbers = [int(n) for n in re.findall(r"\d+", answer_content)]
    if sorted(used_numbers) != sorted(numbers):
        return 0.0
    try:
        result = _script_eval(answer_content)
        if abs(float(result) - float(target)) < 1e-5:
            return 1.0
    except Exception:  # the script's bare except
        return 0.0
    return 0.0


def _script_reward_function(response, numbers=None, target=None):
    format_reward = _script_format("<think>" + response)
    answer_reward = _script_answer(response, numbers, target)
    return {"reward": format_reward * 0.1 + answer_reward,
            "reward_info": {"format_reward": format_reward, "answer_reward": answer_reward}}


# ---------------------------------------------------------------- transcription: evaluate_model's scoring


def _script_numbers(inp_text):
    numbers = None
    if "[" in inp_text and "]" in inp_text:
        start_idx, end_idx = inp_text.find("["), inp_text.find("]")
        if start_idx != -1 and end_idx != -1:
            numbers = [int(n) for n in inp_text[start_idx + 1:end_idx].split() if n.isdigit()]
    return numbers


def _script_score(gen_text, inp_text, tgt_text, numbers=None):
    """One prompt's reward in the script: ``gen_text`` is the decoded prompt + completion.
    ``numbers``: given for prompts the script could not parse them from (no ``[...]``)."""
    numbers = _script_numbers(inp_text) if numbers is None else numbers
    target = int(tgt_text) if tgt_text.isdigit() else None
    model_response = gen_text
    if "assistant:" in gen_text:
        model_response = gen_text.split("assistant:")[-1].strip()
    return _script_reward_function(model_response, numbers, target)


# ---------------------------------------------------------------- the reward

PUZZLES = [
    {"numbers": [44, 19, 35], "target": "98"},
    {"numbers": [1, 2, 3], "target": "1"},      # the prompt's own example answer, (1 + 2) / 3, solves it
    {"numbers": [2, 5, 3], "target": "35"},
    {"numbers": [7, 2, 3], "target": "6"},
    {"numbers": [8, 3, 4], "target": "-7"},     # the script: never solvable
    {"numbers": [10, 4, 5], "target": "12.5"},  # the script: never solvable
    {"numbers": [83, 78, 1, 39], "target": "85"},
]

COMPLETIONS = [
    "", "\n", "</think>", "<answer>", "</answer>", "no tags at all " * 40,
    " 44+19=63, 63+35=98 </think>\n<answer>44 + 19 + 35</answer>",
    " 44+19=63, 63+35=98 </think>\n<answer>44 + 19 + 35</answer>\n",
    " 44+19=63, 63+35=98 </think>\n<answer>44 + 19 + 35</answer>\n\n",
    " x </think><answer>44 + 19 + 35</answer>",
    " x </think>\n<answer>44 + 19 + 36</answer>",
    " x </think>\n<answer>44 + 19 + 35</answer> trailing words",
    "<answer>wrong</answer> then <answer>44+19+35</answer>",
    "<answer>44+19+35</answer> then <answer>wrong</answer>",
    " </think>\n<answer>44 + 19 + 35\n</answer>",
    " </think>\n<answer>(1 + 2) / 3</answer>", " </think>\n<answer>1 - 2 + 3 - 1</answer>",
    " </think>\n<answer>8 - 3 - 4 * 2 - 2</answer>", " </think>\n<answer>4 - 8 - 3</answer>",
    " </think>\n<answer>10 / 4 * 5</answer>", " </think>\n<answer>(83 - 78) * 1 + 39 + 41</answer>",
    " </think>\n<answer>83 + 78 / 39 - 1</answer>", " </think>\n<answer>83 - 78 + 1 * 39</answer>",
    " </think>\n<answer>١ + ٢</answer>", " </think>\n<answer>05 + 2 + 3</answer>", " </think>\n<answer></answer>",
    "assistant: </think>\n<answer>44 + 19 + 35</answer>",
    "thinking assistant:<think> a </think>\n<answer>(1 + 2) / 3</answer>  ",
    "assistant: nothing", "a assistant: b assistant:  </think>\n<answer>7 - 2 + 3 - 2</answer>\n",
    "Assistant: <answer>44 + 19 + 35</answer>",
    " </think>\n<answer>" + "(" * 40 + "44 + 19 + 35" + ")" * 40 + "</answer>",
    "<think>" * 30 + "</think>\n<answer>",
]


@pytest.mark.parametrize("style", ["paper", "plain", "compact"])
def test_task_scores_as_the_script_does(style):
    task = get_task("countdown", prompt_style=style, reward="paper-script")
    assert task.targets == "paper"  # the script's target rule comes with its reward
    checked = 0
    for puzzle in PUZZLES:
        prompt = task.prompt(puzzle)
        for completion in COMPLETIONS:
            got = task.score(completion, puzzle)
            # the script parses the numbers from the paper prompt's [...]; other prompts get the puzzle's
            numbers = None if style == "paper" else puzzle["numbers"]
            want = _script_score(prompt + completion, prompt, puzzle["target"], numbers)
            assert (got["reward"], got["format_reward"], got["answer_reward"]) == (
                want["reward"], want["reward_info"]["format_reward"], want["reward_info"]["answer_reward"]), \
                (style, puzzle, completion)
            assert got["correct"] == (want["reward_info"]["answer_reward"] > 0)
            checked += 1
    assert checked == len(PUZZLES) * len(COMPLETIONS)


def test_the_script_reads_the_puzzles_numbers_from_the_paper_prompt():
    for puzzle in PUZZLES + [{"numbers": [5, 55, 99, 1], "target": "7"}]:
        assert _script_numbers(cd.paper_prompt(puzzle["numbers"], puzzle["target"])) == puzzle["numbers"]


def test_the_paper_prompt_gives_every_response_a_floor_of_0_06():
    task = get_task("countdown", **cd.paper_options())
    esnb = get_task("countdown", prompt_style="paper", targets="paper")
    item = PUZZLES[0]
    for completion in ("", "\n", "garbage", "</think>", "<answer>", " x </think>", "<answer>9</answer>"):
        assert task.score(completion, item)["reward"] >= cd.PAPER_SCRIPT_FLOOR
        assert esnb.score(completion, item)["reward"] < 0.06  # 0, 0.01 or 0.05 of the completion alone
    assert task.score("", item) == {"reward": 0.06, "format_reward": 0.6, "answer_reward": 0.0, "correct": False}
    # "assistant:" anywhere cuts the prompt away, and with it the floor
    assert task.score("assistant: nothing", item)["reward"] == 0.0
    # the prompt's example answer (1 + 2) / 3 is the last answer block when the completion has none
    assert task.score("", PUZZLES[1])["reward"] == pytest.approx(1.06)
    assert task.score("", PUZZLES[1])["correct"]


def test_the_safe_evaluator_is_kept_on_purpose():
    """``2**5 + 3``, ``7//2 + 3`` and an 80-deep answer score 1.1 with the script's eval, 0.1 with
    esnb's evaluator."""
    task = get_task("countdown", **cd.paper_options())
    deep = "(" * 80 + "44 + 19 + 35" + ")" * 80  # deeper than the evaluator's MAX_DEPTH
    for puzzle, answer in ((PUZZLES[2], "2**5 + 3"), (PUZZLES[3], "7//2 + 3"), (PUZZLES[0], deep)):
        prompt = task.prompt(puzzle)
        completion = f" </think>\n<answer>{answer}</answer>"
        assert _script_score(prompt + completion, prompt, puzzle["target"])["reward"] == pytest.approx(1.1)
        assert task.score(completion, puzzle)["reward"] == pytest.approx(0.1)


def test_esnb_reward_stays_the_default_and_options_are_checked():
    default = get_task("countdown")
    assert (default.reward, default.targets, repr(default)) == ("esnb", "esnb", "CountdownTask(prompt_style='plain', max_new_tokens=1024)")
    for completion in COMPLETIONS:
        for puzzle in PUZZLES:
            got = default.score(completion, puzzle)
            assert got.pop("correct") == (got["answer_reward"] > 0)
            assert got == cd.reward(completion, puzzle["numbers"], puzzle["target"])
    assert repr(get_task("countdown", **cd.paper_options())) == (
        "CountdownTask(prompt_style='paper', max_new_tokens=1024, targets='paper', reward='paper-script')")
    assert cd.paper_options(prompt_style="compact")["prompt_style"] == "compact"  # explicit options win
    # explicit targets win too: the script's reward with esnb's exact targets reaches -7
    mixed = get_task("countdown", prompt_style="paper", reward="paper-script", targets="esnb")
    assert mixed.score(" </think>\n<answer>4 - 8 - 3</answer>", PUZZLES[4])["answer_reward"] == 1.0
    assert get_task("countdown", **cd.paper_options()).score(" </think>\n<answer>4 - 8 - 3</answer>", PUZZLES[4])["reward"] == 0.1
    with pytest.raises(ValueError, match="reward"):
        get_task("countdown", reward="script")
    with pytest.raises(ValueError, match="reward"):
        get_task("countdown", prompt_style="chat", reward="paper-script")
    assert cd.paper_script_reward("p", None, [1], "1")["reward"] == 0.0  # never raises on model output


# ---------------------------------------------------------------- the seed schedule


def _script_seeds(iterations, population_size, initial_seed=33):
    """The script's seeds: ``np.random.seed(initial_seed)`` once, then one draw per iteration
    (on numpy's global state, saved and put back here)."""
    saved = np.random.get_state()
    try:
        np.random.seed(initial_seed)
        return [np.random.randint(0, 2**30, size=population_size, dtype=np.int64).tolist()
                for _ in range(iterations)]
    finally:
        np.random.set_state(saved)


def test_paper_seed_schedule_matches_the_script():
    want = _script_seeds(6, 30)
    assert [paper_iteration_seeds(33, it, 30) for it in range(6)] == want
    state = np.random.get_state()[1].copy()
    es = PaperSeedsES(torch.zeros(3), ESConfig(population_size=30, seed=33))
    for it in range(6):
        assert [m.seed for m in es.ask()] == want[it]
        es.tell(np.arange(30.0))
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global state is left alone
    # a restored state (a resume) draws the same seeds as the uninterrupted run
    again = PaperSeedsES(torch.zeros(3), ESConfig(population_size=30, seed=33))
    again.load_state_dict({**es.state_dict(), "iteration": 4})
    assert [m.seed for m in again.ask()] == want[4]
    with pytest.raises(ValueError, match="iteration"):
        paper_iteration_seeds(33, -1, 30)


def test_paper_mode_defaults_to_the_papers_seeds_and_old_logs_keep_esnbs():
    paper, default = FinetuneConfig(fidelity="paper"), FinetuneConfig()
    assert (paper.seeds, paper.es.seed) == ("paper", 33)
    assert (default.seeds, default.es.seed) == ("esnb", 0)
    assert FinetuneConfig.of(fidelity="paper", seeds="esnb", seed=5).seeds == "esnb"
    assert FinetuneConfig.from_dict(paper.to_dict()) == paper
    legacy = {k: v for k, v in paper.to_dict().items() if k != "seeds"}  # a config.json from before the field
    assert FinetuneConfig.from_dict(legacy).seeds == "esnb"
    flat = {k: v for k, v in paper.flat().items() if k != "seeds"}  # and from before the nested ES settings
    assert FinetuneConfig.from_dict(flat) == FinetuneConfig.from_dict(legacy)
    with pytest.raises(ValueError, match="seeds"):
        FinetuneConfig.of(seeds="numpy")
    from esnb.finetune import build_parser, config_from_settings

    args = build_parser().parse_args(["--model", "tiny", "--task", "countdown", "--paper-faithful", "--output", "x"])
    assert config_from_settings(vars(args)) == paper
    args = build_parser().parse_args(["--model", "tiny", "--task", "countdown", "--seeds", "paper", "--output", "x"])
    assert config_from_settings(vars(args)).seeds == "paper"


# ---------------------------------------------------------------- two iterations of the script's loop


def _script_noise(param, seed):
    gen = torch.Generator(device=param.device)
    gen.manual_seed(int(seed))
    return torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype)


@torch.no_grad()
def _script_loop(model, tokenizer, dataset, numbers, population_size, iterations, sigma, alpha, max_new_tokens):
    """The script's main loop on one process and one thread (``gpu_threads=1``): per iteration
    the seeds, every member perturbed in place, ``generate`` + ``decode`` of the whole output +
    the reward, restore by subtraction, the float32 z-score and the update in the model's dtype.
    Returns ``(seeds, member rewards, the same as the float32 values it z-scores)`` per iteration."""
    log = []
    seeds_per_iteration = _script_seeds(iterations, population_size)
    for iteration in range(iterations):
        seeds = seeds_per_iteration[iteration]
        all_rewards = torch.zeros(population_size)
        exact = []
        for seed_idx, seed in enumerate(seeds):
            for _, param in model.named_parameters():
                param.data.add_(sigma * _script_noise(param, seed))
            input_texts = [x for x, _ in dataset]
            tok = tokenizer(input_texts, return_tensors="pt", padding=True, padding_side="left")
            outputs = model.generate(tok["input_ids"], attention_mask=tok["attention_mask"],
                                     max_new_tokens=max_new_tokens, do_sample=False)
            rewards = []
            for i, (inp_text, tgt_text) in enumerate(dataset):
                gen_text = tokenizer.decode(outputs[i], skip_special_tokens=True)
                rewards.append(_script_score(gen_text, inp_text, tgt_text, numbers[i])["reward"])
            exact.append(sum(rewards) / len(dataset))
            all_rewards[seed_idx] = sum(rewards) / len(dataset)
            for _, param in model.named_parameters():
                param.data.add_(-sigma * _script_noise(param, seed))
        rewards = all_rewards.cpu().tolist()
        rewards_tensor = np.array(rewards, dtype=np.float32)
        rewards_normalized = (rewards_tensor - rewards_tensor.mean()) / (rewards_tensor.std() + 1e-8)
        for _, param in model.named_parameters():
            update = torch.zeros_like(param)
            for seed_idx in range(population_size):
                noise = _script_noise(param, seeds[seed_idx])
                noise.mul_(float(rewards_normalized[seed_idx]))
                update.add_(noise)
            update.div_(population_size)
            param.data.add_(alpha * update)
        log.append((seeds, exact, rewards))
    return log


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_paper_mode_run_on_the_tiny_model_is_the_scripts_loop(tmp_path, one_cpu_thread, dtype):
    """Two iterations, member by member: the same seeds, rewards and weights as the script's loop
    (the tiny model, in float32 and in bf16: paper mode decodes with ``generate`` as the script
    does; the compact prompt, on which it writes answers that score differently from member to member)."""
    from esnb.finetune import finetune
    from esnb.models import load_model
    from esnb.runlog import bit_equal, read_log

    population, iterations, sigma, alpha = 4, 2, 0.02, 0.01
    task = get_task("countdown", **cd.paper_options(prompt_style="compact"))
    train, test = cd.load_split()
    items = train[:4]
    live, tok = load_model("tiny", device="cpu", dtype=dtype)
    seen = []

    def spy(es, members, *args, **kwargs):  # esnb's own population scoring, its rewards kept
        from esnb.finetune import score_members

        rewards, accs = score_members(es, members, *args, **kwargs)
        seen.append(rewards)
        return rewards, accs

    cfg = FinetuneConfig.of(fidelity="paper", population_size=population, sigma=sigma, alpha=alpha,
                         iterations=iterations, train_size=len(items), test_size=1, eval_every=0,
                         checkpoint_every=0, save_final=False)
    finetune(live, tok, task, items, test, cfg, output_dir=tmp_path / "run", progress=False, population_evaluator=spy)
    log = read_log(tmp_path / "run" / "log.jsonl")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (meta["finetune"]["seeds"], meta["finetune"]["es"]["seed"]) == ("paper", 33)

    script_model, tok2 = load_model("tiny", device="cpu", dtype=dtype)
    dataset = [(task.prompt(x), x["target"]) for x in items]
    script = _script_loop(script_model, tok2, dataset, [x["numbers"] for x in items], population, iterations,
                          sigma, alpha, task.max_new_tokens)
    for it in range(iterations):
        assert log[it]["seeds"] == script[it][0]  # the paper's seeds
        assert seen[it] == script[it][1]           # the script's rewards, member by member
        assert [float(np.float32(r)) for r in seen[it]] == script[it][2]
    assert len(set(seen[0])) > 1                    # and they differ, so the update is not empty
    assert bit_equal(live, script_model)            # the same weights, perturb-and-subtract drift included


def test_cli_paper_faithful_records_the_papers_seeds_and_reward(tmp_path, one_cpu_thread):
    from esnb.finetune import main
    from esnb.runlog import read_log

    out = tmp_path / "run"
    # the paper's prompt (419 tokens on the tiny model's character tokenizer) does not fit its 256-token
    # context and is refused; the compact prompt keeps the rest of paper mode
    args = ["--model", "tiny", "--task", "countdown", "--paper-faithful", "--output", str(out),
            "--iterations", "2", "--population", "2", "--train-size", "2", "--test-size", "1",
            "--eval-every", "0", "--max-new-tokens", "4", "--no-progress"]
    with pytest.raises(SystemExit):
        main(args)
    assert not (out / "log.jsonl").exists()
    assert main(args + ["--task-option", "prompt_style=compact", "--overwrite"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert "reward='paper-script'" in meta["task_repr"] and "prompt_style='compact'" in meta["task_repr"]
    assert (meta["finetune"]["seeds"], meta["finetune"]["es"]["seed"]) == ("paper", 33)
    log = read_log(out / "log.jsonl")
    assert [e["seeds"] for e in log] == _script_seeds(2, 2)
    # (the 0.06 floor comes from the paper prompt's own tags, which the compact prompt has not:
    # test_the_paper_prompt_gives_every_response_a_floor_of_0_06 checks it)
    assert all(0.0 <= e["reward_min"] <= e["reward_max"] <= 1.1 for e in log)


def test_a_run_logged_before_seed_schedules_resumes_with_esnbs_seeds_and_reward(tmp_path, one_cpu_thread):
    from esnb.es import iteration_seeds
    from esnb.finetune import finetune, main
    from esnb.models import load_model
    from esnb.runlog import read_log

    out = tmp_path / "old"
    args = ["--model", "tiny", "--task", "countdown", "--population", "2", "--train-size", "2", "--test-size", "1",
            "--eval-every", "0", "--max-new-tokens", "4", "--no-progress"]
    # (the compact prompt: the paper's does not fit the tiny model's 256-token context)
    assert main([*args, "--paper-faithful", "--seeds", "esnb", "--seed", "0", "--task-option", "reward=esnb",
                 "--task-option", "prompt_style=compact", "--iterations", "1", "--output", str(out)]) == 0
    # what such a run's config.json held before this change: no seeds, no seed and no reward given
    meta = json.loads((out / "config.json").read_text())
    meta["finetune"] = {**meta["finetune"].pop("es"), **meta["finetune"]}  # and its ES settings were flat
    del meta["finetune"]["seeds"], meta["cli"]["seeds"], meta["cli"]["seed"], meta["cli"]["task_options"]["reward"]
    (out / "config.json").write_text(json.dumps(meta))
    model, tok = load_model("tiny")
    with pytest.raises(ValueError, match="seeds"):  # paper mode's seeds now: the old run refuses them
        finetune(model, tok, get_task("countdown", **cd.paper_options(prompt_style="compact")), config=FinetuneConfig.of(
            fidelity="paper", seed=0, iterations=2, population_size=2, train_size=2, test_size=1, max_new_tokens=4),
            output_dir=out, resume=True, progress=False)
    assert main(["--resume", str(out), "--iterations", "2", "--no-progress"]) == 0
    log = read_log(out / "log.jsonl")
    assert [e["seeds"] for e in log] == [iteration_seeds(0, it, 2) for it in range(2)]
    assert log[1]["reward_max"] < cd.PAPER_SCRIPT_FLOOR  # still esnb's reward of the completion alone


def test_paper_mode_decodes_with_generate_and_the_checkpoints_repetition_penalty(one_cpu_thread):
    """All 200 training prompts of the paper's prompt on the tiny model in bf16, with a repetition
    penalty in its generation config (Qwen2.5-Instruct checkpoints ship 1.05): under the decoder
    paper mode uses, every completion is the script's (``generate``, left padding, one batch,
    the new tokens decoded), while esnb's own decoder, which applies no penalty, differs."""
    from esnb.generation import decoder, generate
    from esnb.models import load_model

    model, tok = load_model("tiny", device="cpu", dtype="bf16")
    model.generation_config.repetition_penalty = 1.3
    task = get_task("countdown", **cd.paper_options(prompt_style="compact"))
    prompts = [task.prompt(x) for x in cd.load_split()[0][:200]]
    assert FinetuneConfig.of(fidelity="paper").decoder == "generate" and FinetuneConfig().decoder == "esnb"
    with decoder("generate"):
        ours = generate(model, tok, prompts, max_new_tokens=24, batch_size=256)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=24,
                             do_sample=False)
    script = [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    assert ours == script
    plain = generate(model, tok, prompts, max_new_tokens=24, batch_size=256)
    assert sum(a != b for a, b in zip(plain, script)) > 0  # the penalty changes tokens: the switch matters
    assert FinetuneConfig.from_dict({"fidelity": "paper"}).decoder == "esnb"  # a run saved before the field
    with pytest.raises(ValueError, match="decoder"):
        FinetuneConfig.of(decoder="beam")
