"""Countdown: the safe reward, the generator, the shipped split and the loader."""
import json
import random
import time
from fractions import Fraction

import pytest

from esnb.tasks import Task, get_task
from esnb.tasks import countdown as cd

NUMS, TARGET = [44, 19, 35], "98"   # 44 + 19 + 35 = 98
GOOD = "44+19=63,63+35=98</think>\n<answer>(44 + 19) + 35</answer>"


def ans(expr: str) -> str:
    return f"x</think>\n<answer>{expr}</answer>"


def test_perfect_completion_scores_1_1():
    r = cd.reward(GOOD, NUMS, TARGET)
    assert r == {"reward": pytest.approx(1.1), "format_reward": 1.0, "answer_reward": 1.0}


@pytest.mark.parametrize("completion, fmt", [
    ("x</think>\n<answer>1</answer>", 1.0),
    ("x</think>\n<answer>1</answer>\n", 1.0),        # the paper's `$` allows one final newline
    ("x</think><answer>1</answer>", 0.6),            # no newline between the blocks
    ("x</think>\n<answer>1</answer> trailing", 0.6),
    ("x</think>\n<answer>1", 0.1),
    ("x</think>", 0.1),
    ("<answer>1</answer>", 0.5),                      # the prompt's <think> is never closed
    ("", 0.0),
    ("just text", 0.0),
])
def test_format_reward(completion, fmt):
    assert cd.format_reward(completion) == pytest.approx(fmt)


def test_reward_is_point_one_format_plus_answer():
    r = cd.reward("no think<answer>44+19+35</answer>", NUMS, TARGET)
    assert r["format_reward"] == 0.5 and r["answer_reward"] == 1.0
    assert r["reward"] == pytest.approx(0.05 + 1.0)


@pytest.mark.parametrize("expr, ok", [
    ("44+19+35", True),
    (" ( 44 + 19 ) + 35 ", True),
    ("35+19+44", True),
    ("44+19+35\n", True),            # one trailing newline passes the paper's check
    ("44+19", False),                # a number unused
    ("44+19+35+35", False),          # a number twice
    ("44+19+36", False),             # a number not given
    ("44+19+35-0", False),           # an extra number
    ("98", False),
    ("44+19+35=98", False),          # '=' is not allowed
    ("44 + 19 + 35.0", False),
    ("44**1+19+35", False),
    ("44//1+19+35", False),
    ("044+19+35", False),            # Python rejects leading zeros, so does the paper's eval
    ("(44+19+35", False),
    ("44+19+35)", False),
    ("44 19 35", False),
    ("", False),
    ("   ", False),
    ("\n44+19+35", False),
])
def test_answer_reward(expr, ok):
    assert cd.answer_reward(ans(expr), NUMS, TARGET) == (1.0 if ok else 0.0)


def test_unary_minus_follows_python_semantics():
    # the paper's checker is Python's eval, which accepts unary signs; so do we
    assert cd.answer_reward(ans("-(19-44)+35+0*1"), NUMS, "60") == 0.0  # extra numbers
    assert cd.answer_reward(ans("-(19-44)-35"), [44, 19, 35], "-10") == 1.0
    assert cd.answer_reward(ans("--44+19+35"), NUMS, TARGET) == 1.0
    assert cd.evaluate_expression("-" * 1000 + "1") is None     # too deep, not an error


def test_fractions_and_tolerance():
    assert cd.answer_reward(ans("(1+2)/4"), [1, 2, 4], "0.75") == 1.0
    assert cd.answer_reward(ans("10/3"), [10, 3], "3.333333") == 1.0   # within 1e-5
    assert cd.answer_reward(ans("10/3"), [10, 3], "3.3333") == 0.0
    assert cd.answer_reward(ans("3-10"), [3, 10], "-7") == 1.0          # negative target
    assert cd.evaluate_expression("1/3*3") == Fraction(1)                # exact


def test_last_answer_counts():
    first_right = "x</think>\n<answer>44+19+35</answer><answer>44+19-35</answer>"
    last_right = "x</think>\n<answer>44+19-35</answer><answer>44+19+35</answer>"
    assert cd.answer_reward(first_right, NUMS, TARGET) == 0.0
    assert cd.answer_reward(last_right, NUMS, TARGET) == 1.0


ADVERSARIAL = [
    "44**19**35",
    "9**9**9**9",
    "(" * 10_000 + "44+19+35" + ")" * 10_000,
    "(" * 100 + "44+19+35" + ")" * 100,
    "1" * 1_000_000,
    "44+19+35" + " " * 1_000_000,
    "44/0+19+35",
    "44/(19-19)+35",
    "٣+4",                              # Arabic-Indic digit three
    "４４+19+35",                        # full-width digits
    "44+19+35\u00a0",                   # non-breaking space
    "__import__('os').system('echo hi')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 0",
    "44 if 1 else 19",
    "[44,19,35]",
    "44+19+35;import os",
    "1e308*1e308",
    "0x2C+19+35",
    "44+19+35j",
    "\x00",
    "+" * 100_000,
    "-(" * 5_000 + "1" + ")" * 5_000,
    "99" * 200,
    "",
]


@pytest.mark.parametrize("expr", ADVERSARIAL, ids=lambda s: repr(s[:24]))
def test_adversarial_answers_are_zero_and_fast(expr):
    start = time.perf_counter()
    r = cd.reward(ans(expr), NUMS, TARGET)
    assert time.perf_counter() - start < 0.5
    assert r["answer_reward"] == 0.0


@pytest.mark.parametrize("completion", [
    "<answer>" * 200_000,                          # quadratic for a naive lazy regex
    "<answer>44+19+35</answer>" * 50_000,          # a megabyte of answers: the last one counts
    "</think>\n" * 100_000,
    "x" * 2_000_000,
    "\ud800 broken surrogate <answer>1</answer>",
])
def test_huge_or_odd_completions_are_fast(completion):
    start = time.perf_counter()
    r = cd.reward(completion, NUMS, TARGET)
    assert time.perf_counter() - start < 0.5
    assert set(r) == {"reward", "format_reward", "answer_reward"}


def test_non_string_completion_scores_zero():
    for bad in (None, 42, b"<answer>44+19+35</answer>", ["x"]):
        assert cd.reward(bad, NUMS, TARGET)["reward"] == 0.0


def test_random_garbage_never_raises():
    rng = random.Random(0)
    alphabet = "0123456789+-*/() <>answerthink/\n٣.e"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        r = cd.reward(s, NUMS, TARGET)
        assert 0.0 <= r["reward"] <= 1.1


def test_bad_target_is_the_callers_error():
    with pytest.raises(ValueError, match="target"):
        cd.reward(GOOD, NUMS, "ninety-eight")


# --------------------------------------------------------------------------- generator, split

def test_generator_is_deterministic_and_solutions_check():
    a = cd.generate_puzzles(200, seed=7)
    b = cd.generate_puzzles(200, seed=7)
    assert a == b and a != cd.generate_puzzles(200, seed=8)
    for p in a:
        assert len(p["numbers"]) in (3, 4) and all(1 <= x <= 99 for x in p["numbers"])
        assert cd.evaluate_expression(p["solution"]) == Fraction(p["target"])
        assert cd.reward(cd.solution_trace(p), p["numbers"], p["target"])["reward"] == pytest.approx(1.1)
    assert len({cd.puzzle_key(p) for p in a}) == len(a)


def test_shipped_split_matches_generator_and_has_no_overlap():
    train, test = cd.load_split()
    assert (len(train), len(test)) == (cd.N_TRAIN, cd.N_TEST)
    assert not {cd.puzzle_key(p) for p in train} & {cd.puzzle_key(p) for p in test}
    fresh_train, fresh_test = cd.make_split()
    assert [p["id"] for p in train] == [p["id"] for p in fresh_train]
    assert train[:5] == fresh_train[:5] and test[-5:] == fresh_test[-5:]
    for p in train + test:
        assert set(p) >= {"id", "context", "numbers", "target", "solution"}
        assert isinstance(p["target"], str) and p["context"].endswith("<think>")
        assert cd.reward(cd.solution_trace(p), p["numbers"], p["target"])["answer_reward"] == 1.0


# --------------------------------------------------------------------------- loader

PAPER_ITEMS = [
    {"id": 0, "context": "ctx", "numbers": [10, 20, 30], "target": "60", "solution": "10+20+30"},
    {"id": 1, "context": "ctx", "numbers": [3, 4], "target": "-1", "solution": "3-4"},
    {"id": 2, "context": "ctx", "numbers": [3, 4], "target": "0.75", "solution": "3/4"},
]


def test_load_paper_schema_json_list_and_jsonl(tmp_path):
    js = tmp_path / "countdown.json"
    js.write_text(json.dumps(PAPER_ITEMS, indent=2))
    jl = tmp_path / "countdown.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in PAPER_ITEMS) + "\n\n")
    for path in (js, jl):
        items = cd.load_puzzles(path)
        assert [x["target"] for x in items] == ["60", "-1", "0.75"]
        assert items[0]["context"] == "ctx" and items[2]["numbers"] == [3, 4]
        task = get_task("countdown")
        assert task.prompt(items[0]) == "ctx"      # the paper's own prompt text wins
        assert task.score("x</think>\n<answer>3/4</answer>", items[2])["correct"]


def test_numeric_targets_are_accepted_as_strings(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"numbers": [1, 2], "target": 3}) + "\n")
    items = cd.load_puzzles(p)
    assert items[0]["target"] == "3" and items[0]["id"] == "n-00000"


@pytest.mark.parametrize("content, where", [
    ('{"numbers": [1, 2], "target": "3"}\n{"numbers": [1, 2], "target": \n', "line 2"),
    ('{"numbers": [1, 2], "target": "3"}\n{"target": "3"}\n', "line 2"),
    ('{"numbers": [1, 2], "target": "3"}\n\n{"numbers": "12", "target": "3"}\n', "line 3"),
    ('{"numbers": [1, 2.5], "target": "3"}\n', "line 1"),
    ('{"numbers": [1, 2], "target": "three"}\n', "line 1"),
    ('[1, 2]\n', "item 0"),
    ('[{"numbers": [1, 2], "target": "3"}, {"numbers": [1]}]', "item 1"),
    ('[{"numbers": [1, 2], "target": "3"},', "line 1"),
    ('', "no puzzles"),
])
def test_malformed_files_name_file_and_place(tmp_path, content, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        cd.load_puzzles(path)
    assert "bad.jsonl" in str(e.value) and where in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl"):
        cd.load_puzzles(tmp_path / "nope.jsonl")


def test_a_device_a_folder_or_a_huge_file_is_refused_before_reading(tmp_path, monkeypatch):
    # --data /dev/zero used to be read until memory ran out
    for path in ("/dev/zero", tmp_path):
        with pytest.raises(ValueError, match="not a regular file"):
            cd.load_puzzles(path)
    big = tmp_path / "big.json"
    big.write_text("[]")
    monkeypatch.setattr(cd, "MAX_PUZZLE_FILE_BYTES", 1)
    with pytest.raises(ValueError, match="bytes, more than"):
        cd.load_puzzles(big)


# --------------------------------------------------------------------------- task and prompts

def test_task_protocol_and_prompt_styles():
    p = {"numbers": [44, 19, 35], "target": "98"}
    for style in ("plain", "chat", "compact"):
        assert isinstance(get_task("countdown", prompt_style=style), Task)
    plain = get_task("countdown").prompt(p)
    assert plain.endswith("<think>") and "[44, 19, 35]" in plain and "98" in plain
    assert get_task("countdown", prompt_style="compact").prompt(p) == "44 19 35>98<think>"
    s = get_task("countdown").score(GOOD, p)
    assert s["correct"] is True and s["reward"] == pytest.approx(1.1)
    assert get_task("countdown").score("x</think>\n<answer>1</answer>", p)["correct"] is False
    with pytest.raises(ValueError, match="prompt_style"):
        get_task("countdown", prompt_style="fancy")
    with pytest.raises(ValueError, match="name"):
        get_task("chess")


def test_chat_prompt_uses_the_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, continue_final_message):
            assert not tokenize and continue_final_message
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    text = get_task("countdown", prompt_style="chat").prompt({"numbers": [1, 2], "target": "3"}, Tok())
    assert text.startswith("system:") and text.endswith("<think>") and "[1, 2]" in text
    with pytest.raises(ValueError, match="tokenizer"):
        get_task("countdown", prompt_style="chat").prompt({"numbers": [1, 2], "target": "3"}, None)


def test_regenerate_command_reproduces_the_shipped_files(tmp_path, capsys):
    from esnb._env import DATA_DIR

    cd.main(["--regenerate", "--out", str(tmp_path)])
    for name in (cd.TRAIN_FILE, cd.TEST_FILE):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes()
    assert "wrote 256 train and 512 test puzzles" in capsys.readouterr().out


def test_answer_ignoring_format_counts_untagged_answers_only_as_a_diagnostic():
    nums, target = [44, 19, 35], 98
    untagged = "44+19=63,63+35=98</think>\nAnswer: (44+19)+35"
    assert cd.reward(untagged, nums, target)["answer_reward"] == 0.0   # the reward does not
    assert cd.answer_ignoring_format(untagged, nums, target) == 1.0
    assert cd.answer_ignoring_format("</think>\n<answer>(44+19)+35</answer>", nums, target) == 1.0
    assert cd.answer_ignoring_format("</think>\nAnswer: 44*19", nums, target) == 0.0
    assert cd.answer_ignoring_format("Answer: " + "(" * 100_000, nums, target) == 0.0
    assert cd.answer_ignoring_format(None, nums, target) == 0.0


def test_format_breakdown_separates_format_from_arithmetic():
    item = {"numbers": [44, 19, 35], "target": "98"}
    done = [
        "44+19=63,63+35=98</think>\n<answer>(44+19)+35</answer>",   # right, tagged
        "44+19=63,63+35=98</think>\nAnswer: (44+19)+35",            # right, untagged
        "44+19=63</think>\n<answer>44+19</answer>",                 # wrong, tagged
        None,                                                        # not even text
    ]
    got = cd.format_breakdown(done, [item] * 4)
    assert got == {"accuracy": 0.25, "answers in tags": 0.5, "accuracy ignoring format": 0.5}
    with pytest.raises(ValueError, match="as many"):
        cd.format_breakdown(done, [item])


# --------------------------------------------------------------------------- the paper's prompt, data and targets

def _paper_context(numbers_text: str, target: str) -> str:
    # the `context` field of the paper's released countdown.json, as stored there (items 0, 6, 10, 1999)
    return ("You are a helpful assistant. You first think about the reasoning process in your mind and then "
            f"provide the user with the answer.Using the numbers {numbers_text}, create an equation that equals "
            f"{target}. You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
            "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, "
            "for example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.\n<think>")


PAPER_CONTEXTS = [  # (numbers, target, context) of items of the paper's file
    ([44, 19, 35], "98", _paper_context("[44 19 35]", "98")),
    ([83, 78, 1, 39], "82", _paper_context("[83 78  1 39]", "82")),
    ([2, 54, 17], "35", _paper_context("[ 2 54 17]", "35")),
    ([6, 10, 54], "50", _paper_context("[ 6 10 54]", "50")),
]


@pytest.mark.parametrize("numbers, target, context", PAPER_CONTEXTS)
def test_paper_prompt_is_the_papers_context_byte_for_byte(numbers, target, context):
    assert cd.paper_prompt(numbers, target) == context
    task = get_task("countdown", prompt_style="paper")
    assert task.prompt({"numbers": numbers, "target": target}) == context                  # built, no context given
    assert task.prompt({"numbers": numbers, "target": target, "context": "other"}) == context  # built for ANY puzzle
    np = pytest.importorskip("numpy")
    assert cd.numpy_list(numbers) == str(np.array(numbers))


def test_paper_data_split_and_target_rule(tmp_path):
    # a small file in the paper's schema (the paper's own file is not ours to ship)
    items = [{"id": k, "context": cd.paper_prompt([k + 1, 2, 3], str(k + 6)), "numbers": [k + 1, 2, 3],
              "target": str(k + 6), "solution": None} for k in range(7)]
    items[5]["target"], items[6]["target"] = "-1", "2.5"
    path = tmp_path / "countdown.json"
    path.write_text(json.dumps(items, indent=2))
    train, test = cd.load_paper_data(path, n_train=2, n_test=3)
    assert [x["id"] for x in train] == [0, 1] and [x["id"] for x in test] == [4, 5, 6]  # first train, last test
    with pytest.raises(ValueError, match="countdown.json"):
        cd.load_paper_data(path, n_train=5, n_test=3)
    assert [cd.paper_solvable(t) for t in ("98", "-1", "2.5", " 7", "²")] == [True, False, False, False, False]
    # "-1" = 2 - 3 * 1 is solvable with esnb's targets and unsolvable with the paper's rule
    right = "x</think>\n<answer>2 - 3 * 1</answer>"
    esnb_task, paper_task = get_task("countdown"), get_task("countdown", targets="paper")
    assert esnb_task.score(right, {"numbers": [1, 2, 3], "target": "-1"})["correct"] is True
    s = paper_task.score(right, {"numbers": [1, 2, 3], "target": "-1"})
    assert s["correct"] is False and s["reward"] == pytest.approx(0.1) and s["format_reward"] == 1.0
    assert paper_task.score(GOOD, {"numbers": NUMS, "target": TARGET})["correct"] is True
    assert paper_task.score(None, {"numbers": NUMS, "target": "-1"})["reward"] == 0.0
    with pytest.raises(ValueError, match="targets"):
        get_task("countdown", targets="strict")


def test_last_answer_block_rule_and_what_early_stop_changes():
    # the paper generates on and rewards the LAST answer block; early stop ends after the first one
    full = "x</think>\n<answer>44 - 19 - 35</answer> no, wait: <answer>44 + 19 + 35</answer>"
    task = get_task("countdown")
    assert "</answer>" in task.stop_strings
    cut = full[:full.index("</answer>") + len("</answer>")]  # what generation keeps with early stop
    assert task.score(full, {"numbers": NUMS, "target": TARGET})["answer_reward"] == 1.0
    assert task.score(cut, {"numbers": NUMS, "target": TARGET})["answer_reward"] == 0.0
