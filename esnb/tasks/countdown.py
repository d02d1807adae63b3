"""Countdown: combine the given numbers with + - * / to hit a target.

What lives here:

* a puzzle generator (solvable by construction, one known solution, deterministic for a seed)
  and the fixed train/test split shipped in ``data/`` (``python -m esnb.tasks.countdown
  --regenerate`` rewrites it);
* ``load_puzzles(path)`` for the paper's schema ``{"id", "context", "numbers", "target",
  "solution"}`` as a JSON list or JSONL;
* prompt builders: the paper's plain prompt (ends with ``<think>``), a chat-template variant,
  and a compact prompt for the tiny character-level model;
* ``reward(completion, numbers, target)`` with the paper's semantics, computed by a small
  safe parser. The paper evaluates answers with Python's ``eval``; we never do: model output
  is untrusted and ``44**19**35`` or ten thousand nested parentheses would hang or crash it;
* ``paper_script_reward(prompt, completion, numbers, target)``: the reward the paper's released
  script really computes, on the decoded prompt + completion (a 0.06 floor from the paper
  prompt's own tags); ``CountdownTask(reward="paper-script")``, the default in paper mode.
"""
from __future__ import annotations

import json
import math
import random
import re
import stat
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

# ----------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in the mind "
    "and then provide the user with the answer."
)


def _question(numbers: Sequence[int], target: str, numbers_text: str | None = None) -> str:
    return (
        f"Using the numbers {numbers_text or list(numbers)}, create an equation that equals {target}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used "
        "once. Show your work in <think> </think> tags. And return the final answer in "
        "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )


ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"


def plain_prompt(numbers: Sequence[int], target: str | int) -> str:
    """The paper's prompt: a User/Assistant transcript that ends with ``<think>``."""
    return (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer.\n"
        f"User: {_question(numbers, str(target))}\n"
        f"Assistant: {ASSISTANT_PREFIX}"
    )


def chat_prompt(numbers: Sequence[int], target: str | int, tokenizer: Any) -> str:
    """The same question through the tokenizer's chat template; the assistant turn is opened
    and pre-filled up to ``<think>`` so that the reward is judged the same way."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer: the chat prompt needs a tokenizer with a chat template")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _question(numbers, str(target))},
        {"role": "assistant", "content": ASSISTANT_PREFIX},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


PAPER_SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer."
)


def numpy_list(numbers: Sequence[int]) -> str:
    """``str(numpy.array(numbers))`` for a short 1-D integer list, without numpy's global print
    options: entries right-aligned to the widest, one space apart (``[ 2 54 17]``, ``[83 78  1 39]``)."""
    texts = [str(int(n)) for n in numbers]
    width = max((len(t) for t in texts), default=0)
    return "[" + " ".join(t.rjust(width) for t in texts) + "]"


def paper_prompt(numbers: Sequence[int], target: str | int) -> str:
    """The paper's prompt, byte for byte the ``context`` field of its released ``countdown.json``
    (checked against items of that file): system sentence, question and assistant prefix joined
    with no separator (so no space after "answer." and "</answer>."), the numbers printed as a
    numpy array (``[44 19 35]``), no chat template, ending with ``<think>``::

        You are a helpful assistant. You first think about the reasoning process in your mind and
        then provide the user with the answer.Using the numbers [44 19 35], create an equation that
        equals 98. You can use basic arithmetic operations (+, -, *, /) and each number can only be
        used once. Show your work in <think> </think> tags. And return the final answer in <answer>
        </answer> tags, for example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.
        <think>

    (the line breaks above are for reading; the only newline is the one before ``<think>``).
    """
    return PAPER_SYSTEM_PROMPT + _question(numbers, str(target), numpy_list(numbers)) + ASSISTANT_PREFIX


def compact_prompt(numbers: Sequence[int], target: str | int) -> str:
    """The tiny model's prompt: ``"44 19 35>98<think>"`` (numbers, then the target)."""
    return " ".join(str(n) for n in numbers) + f">{target}<think>"


# ----------------------------------------------------------------------------------------
# The safe checker
# ----------------------------------------------------------------------------------------

MAX_ANSWER_CHARS = 512     # a real answer is a few dozen characters
MAX_DEPTH = 64             # nesting of parentheses and unary signs
MAX_NUMBER_DIGITS = 6      # puzzle numbers are 1..99
_ALLOWED = frozenset("0123456789+-*/() ")   # ASCII only: '٣' is a digit to Python, not to us
_TOL = Fraction(1, 100_000)


class _Reject(Exception):
    """Internal: the answer is not a valid expression (never escapes this module)."""


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == " ":
            i += 1
        elif c.isdigit():  # only ASCII digits reach here (checked by the caller)
            j = i
            while j < n and text[j] in "0123456789":
                j += 1
            lit = text[i:j]
            if len(lit) > MAX_NUMBER_DIGITS or (len(lit) > 1 and lit[0] == "0"):
                raise _Reject  # Python rejects '05' too
            out.append(lit)
            i = j
        else:
            out.append(c)
            i += 1
    return out


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := ('+'|'-') factor | '(' expr ')' | NUMBER.

    Python's grammar restricted to the four operations: '**' and '//' are two operators in a
    row and fail to parse; unary signs are accepted as Python (and the paper's eval) would.
    """

    def __init__(self, toks: list[str]):
        self.toks, self.i, self.depth = toks, 0, 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise _Reject
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise _Reject
                value = value / rhs
        return value

    def factor(self) -> Fraction:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject
        tok = self.take()
        if tok in ("+", "-"):
            value = self.factor()
            value = -value if tok == "-" else value
        elif tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise _Reject
        elif tok[0].isdigit():
            value = Fraction(int(tok))
        else:
            raise _Reject
        self.depth -= 1
        return value


def evaluate_expression(text: str) -> Fraction | None:
    """Value of an arithmetic expression over + - * / ( ), or ``None`` for anything else.

    Exact (Fractions); bounded in length, nesting and number size, so every input returns
    quickly. Never raises, never evaluates code.
    """
    try:
        if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS or not text.strip():
            return None
        if any(c not in _ALLOWED for c in text):
            return None
        parser = _Parser(_tokens(text))
        value = parser.expr()
        if parser.peek() is not None:
            return None
        return value
    except (_Reject, RecursionError, ValueError, ZeroDivisionError, OverflowError):
        return None


# Targets are bounded before any big number is built: a target like "1e999999999" would make
# Fraction() build a billion-digit integer (minutes), and every reward call parses the target.
MAX_TARGET = 10**12        # Countdown targets are small integers; anything beyond is a data error
MAX_TARGET_CHARS = 40
_TARGET_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d{1,4}))?|[+-]?\d+/\d+")


def _parse_target(target: Any) -> Fraction:
    """The target as a Fraction, accepted or refused in microseconds: a finite number (or numeric
    string) of magnitude at most ``MAX_TARGET``; anything else raises ``ValueError``."""
    bad = f"target: expected a finite number or numeric string of magnitude <= {MAX_TARGET:.0e}, got "
    if isinstance(target, bool):
        raise ValueError(bad + repr(target))
    if isinstance(target, int):
        if abs(target) > MAX_TARGET:  # a comparison, never a huge repr
            raise ValueError(bad + f"an integer of {target.bit_length()} bits")
        return Fraction(target)
    if isinstance(target, Fraction):
        value = target
    elif isinstance(target, float):
        if not math.isfinite(target) or abs(target) > MAX_TARGET:
            raise ValueError(bad + repr(target))
        value = Fraction(target).limit_denominator(10**9)
    elif isinstance(target, str):
        text = target.strip()
        match = _TARGET_TEXT.fullmatch(text) if len(text) <= MAX_TARGET_CHARS else None
        # the exponent is at most 4 digits, so Fraction builds at most a ~10,000-digit number
        if match is None or (match.group(1) is not None and abs(int(match.group(1))) > 30):
            raise ValueError(bad + (repr(target) if len(target) <= 60 else repr(target[:60]) + "..."))
        try:
            value = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(bad + repr(target)) from None
    else:
        raise ValueError(bad + repr(target)[:80])
    if abs(value) > MAX_TARGET:
        raise ValueError(bad + (repr(target) if len(repr(target)) <= 60 else "a larger number"))
    return value


def _answers(text: str) -> list[str]:
    """Contents of the ``<answer>...</answer>`` blocks, left to right, non-overlapping (what
    ``re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)`` gives) in linear time."""
    found, pos = [], 0
    while True:
        start = text.find("<answer>", pos)
        if start < 0:
            return found
        end = text.find("</answer>", start + 8)
        if end < 0:
            return found
        found.append(text[start + 8:end])
        pos = end + 9


def format_reward(completion: str) -> float:
    """The paper's format score of ``"<think>" + completion`` (the prompt ends with <think>).

    1.0 when the text is exactly ``<think>...</think>\\n<answer>...</answer>`` (as the paper's
    regex ``^<think>.*?</think>\\n<answer>.*?</answer>$``, which also tolerates one final
    newline); otherwise 0.1 for a think block plus 0.5 for an answer block.
    """
    text = "<think>" + completion
    body = text[:-1] if text.endswith("\n") else text
    if body.endswith("</answer>"):
        mid = body.find("</think>\n<answer>", 7)
        if 0 <= mid and mid + len("</think>\n<answer>") <= len(body) - len("</answer>"):
            return 1.0
    score = 0.0
    if text.find("</think>", 7) >= 0:  # text starts with <think>, so a closing tag suffices
        score += 0.1
    if _answers(text):
        score += 0.5
    return score


def answer_reward(completion: str, numbers: Sequence[int], target: Any) -> float:
    """1.0 when the LAST ``<answer>`` block uses each number exactly once with only digits,
    + - * / ( ) and spaces, and equals the target within 1e-5; else 0.0."""
    goal = _parse_target(target)
    answers = _answers(completion)
    if not answers:
        return 0.0
    content = answers[-1]
    if content.endswith("\n"):  # the paper's regex check lets one trailing newline through
        content = content[:-1]
    if not content or len(content) > MAX_ANSWER_CHARS or any(c not in _ALLOWED for c in content):
        return 0.0
    used, run = [], ""
    for c in content + " ":
        if c in "0123456789":
            run += c
            if len(run) > MAX_NUMBER_DIGITS:
                return 0.0
        elif run:
            used.append(int(run))
            run = ""
    if sorted(used) != sorted(int(n) for n in numbers):
        return 0.0
    value = evaluate_expression(content)
    if value is None:
        return 0.0
    return 1.0 if abs(value - goal) < _TOL else 0.0


def answer_ignoring_format(completion: str, numbers: Sequence[int], target: Any) -> float:
    """A diagnostic, not a reward: :func:`answer_reward` where an answer written on a line
    after ``Answer:`` (no tags) also counts. It separates "learned the format" from "learned the
    arithmetic" when a model sometimes answers without tags (notebook 05)."""
    if not isinstance(completion, str):
        return 0.0
    at = completion.rfind("Answer:")
    if at >= 0 and "<answer>" not in completion[at:]:
        line = completion[at + len("Answer:"):].split("\n", 1)[0].strip()
        completion = completion[:at] + f"<answer>{line}</answer>"
    return answer_reward(completion, numbers, target)


def format_outcomes(completions: Sequence[Any], items: Sequence[dict]) -> dict[str, list[bool]]:
    """Per puzzle, in order: ``{"accuracy", "answers in tags", "accuracy ignoring format"}``, each
    a list of bools (right in tags; any answer in tags; right if an untagged ``Answer: ...`` line
    counted too, :func:`answer_ignoring_format`). Non-strings count as empty answers."""
    completions, items = list(completions), list(items)
    if len(completions) != len(items) or not items:
        raise ValueError(f"format_outcomes: need as many completions as puzzles (at least one), "
                         f"got {len(completions)} and {len(items)}")
    texts = [c if isinstance(c, str) else "" for c in completions]
    return {
        "accuracy": [answer_reward(c, x["numbers"], x["target"]) > 0 for c, x in zip(texts, items)],
        "answers in tags": [bool(_answers(c)) for c in texts],
        "accuracy ignoring format": [answer_ignoring_format(c, x["numbers"], x["target"]) > 0
                                     for c, x in zip(texts, items)],
    }


def format_breakdown(completions: Sequence[Any], items: Sequence[dict]) -> dict:
    """Why answers score zero, over completions paired with their puzzles: the shares in [0, 1] of
    :func:`format_outcomes`. Separates a format gain from an arithmetic gain."""
    return {k: sum(v) / len(v) for k, v in format_outcomes(completions, items).items()}


def reward(completion: str, numbers: Sequence[int], target: Any) -> dict:
    """``{"reward", "format_reward", "answer_reward"}``; reward = 0.1 * format + answer.

    Never raises on ``completion`` (non-strings score zero); a malformed ``target`` is the
    caller's error and raises ``ValueError``.
    """
    goal = _parse_target(target)
    if not isinstance(completion, str):
        return {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}
    fmt = format_reward(completion)
    ans = answer_reward(completion, numbers, goal)
    return {"reward": 0.1 * fmt + ans, "format_reward": fmt, "answer_reward": ans}


PAPER_SCRIPT_FLOOR = 0.06  # 0.1 * (0.1 + 0.5): the paper prompt's own <think> </think> and <answer> </answer>


def script_response(prompt: str, completion: str) -> str:
    """The text the paper's training script scores: the decoded prompt + completion, cut to what
    follows the last ``assistant:`` (case-sensitive) and then stripped, when that string occurs
    (``gen_text.split("assistant:")[-1].strip()``; without it the text is kept as is, unstripped).

    The script decodes ``generate``'s whole output (prompt tokens included) with
    ``skip_special_tokens=True``; for the paper's tokenizers that is the prompt text followed by
    the completion text, which is what is joined here."""
    text = (prompt if isinstance(prompt, str) else "") + (completion if isinstance(completion, str) else "")
    if "assistant:" in text:
        text = text.split("assistant:")[-1].strip()
    return text


def paper_script_reward(prompt: str, completion: str, numbers: Sequence[int], target: Any,
                        targets: str = "paper") -> dict:
    """The Countdown reward as the paper's released training script really computes it
    (``countdown/es_fine-tuning_countdown.py`` with ``countdown_task.reward_function``), where the
    paper's text describes :func:`reward` of the completion alone:

    * it scores :func:`script_response` (prompt + completion, the ``assistant:`` split), so the
      paper's prompt, which names ``<think> </think>`` and ``<answer> </answer>`` tags, gives
      every response a format score of at least 0.6: a floor of ``PAPER_SCRIPT_FLOOR`` = 0.06
      where the completion alone scores 0, 0.01 or 0.05; the full format score (1.0) needs
      ``</think>\\n<answer>`` in the completion and the text to end with ``</answer>``;
    * the answer is the LAST ``<answer>`` block of that text: with no closed block in the
      completion it is the prompt's example ``(1 + 2) / 3``, so a puzzle with numbers {1, 2, 3}
      and target 1 scores 1.06 without answering;
    * ``targets="paper"`` (the script's rule, ``int(t) if t.isdigit() else None``): negative and
      non-integer targets are never reached (:func:`paper_solvable`); ``"esnb"``: any numeric target.

    The numbers are the puzzle's own; the script parses them from the prompt's first ``[...]``,
    which for the paper's prompt (:func:`paper_prompt`, its data's ``context``) gives the same list.

    Deliberate difference: answers are checked by esnb's safe evaluator, never ``eval``, so
    expressions outside ``+ - * / ( )`` arithmetic as :class:`_Parser` reads it (``2**5+3``,
    ``7//2+3``, answers longer than ``MAX_ANSWER_CHARS`` or nested deeper than ``MAX_DEPTH``)
    score answer 0 here (reward 0.1 for a well-formed response) where the script's ``eval``
    may give 1 (reward 1.1). Never raises on ``completion``; a malformed ``target`` raises
    ``ValueError`` as in :func:`reward`.
    """
    if targets not in CountdownTask.TARGETS:
        raise ValueError(f"targets: expected one of {CountdownTask.TARGETS}, got {targets!r}")
    goal = _parse_target(target)
    text = script_response(prompt, completion)
    fmt = format_reward(text)  # the script's format_reward_function("<think>" + response)
    solvable = targets != "paper" or paper_solvable(target)
    ans = answer_reward(text, numbers, goal) if solvable else 0.0
    return {"reward": 0.1 * fmt + ans, "format_reward": fmt, "answer_reward": ans}


# ----------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------

_OPS = ("+", "-", "*", "/")


def _apply(a: int, op: str, b: int) -> int | None:
    """Classic Countdown steps: every intermediate result a positive integer."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if b > 1 and a % b == 0 else None


def _combine(rng: random.Random, a: tuple, b: tuple) -> tuple | None:
    """Combine two (value, expression, steps) nodes with a random valid operation."""
    for op in rng.sample(_OPS, len(_OPS)):
        value = _apply(a[0], op, b[0])
        if value is not None:
            ea = a[1] if a[2] == [] else f"({a[1]})"
            eb = b[1] if b[2] == [] else f"({b[1]})"
            step = f"{a[0]}{op}{b[0]}={value}"
            return value, f"{ea}{op}{eb}", a[2] + b[2] + [step]
    return None


def make_puzzle(rng: random.Random, n_numbers: int | None = None,
                target_range: tuple[int, int] = (10, 100)) -> dict:
    """One solvable puzzle: numbers, an integer target, one solution and its steps.

    Draws numbers in 1..99 and a random expression tree over them (positive integer steps),
    retrying until the value lands in ``target_range``.
    """
    while True:
        n = n_numbers or rng.choice((3, 4))
        numbers = [rng.randint(1, 99) for _ in range(n)]
        nodes = [(x, str(x), []) for x in numbers]
        rng.shuffle(nodes)
        ok = True
        while len(nodes) > 1:
            i, j = sorted(rng.sample(range(len(nodes)), 2))
            b, a = nodes.pop(j), nodes.pop(i)
            if rng.random() < 0.5:
                a, b = b, a
            node = _combine(rng, a, b)
            if node is None:
                ok = False
                break
            nodes.append(node)
        if not ok:
            continue
        value, expr, steps = nodes[0]
        if target_range[0] <= value <= target_range[1]:
            return {"numbers": numbers, "target": str(value), "solution": expr, "steps": steps}


def puzzle_key(p: dict) -> tuple:
    """What makes two puzzles the same: the multiset of numbers and the target."""
    return tuple(sorted(int(x) for x in p["numbers"])), str(p["target"])


def generate_puzzles(n: int, seed: int = 0, exclude: Iterable[tuple] = (),
                     prefix: str = "cd", with_context: bool = True) -> list[dict]:
    """``n`` distinct puzzles in the paper's schema (plus ``steps``), deterministic for ``seed``.

    Puzzles whose key (numbers multiset, target) is in ``exclude`` are skipped, which is how a
    split stays disjoint from another.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict] = []
    while len(out) < n:
        p = make_puzzle(rng)
        key = puzzle_key(p)
        if key in seen:
            continue
        seen.add(key)
        item = {"id": f"{prefix}-{len(out):05d}"}
        if with_context:
            item["context"] = plain_prompt(p["numbers"], p["target"])
        item.update(p)
        out.append(item)
    return out


def solution_trace(puzzle: dict) -> str:
    """The completion a perfect model writes after the prompt's ``<think>``:
    ``"44+19=63,63+35=98</think>\\n<answer>(44+19)+35</answer>"``."""
    steps = puzzle.get("steps") or []
    return ",".join(steps) + f"</think>\n<answer>{puzzle['solution']}</answer>"


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

def _repo_data() -> Path:
    from ..paths import DATA_DIR

    return DATA_DIR


TRAIN_FILE = "countdown_train.jsonl"
TEST_FILE = "countdown_test.jsonl"
SPLIT_SEED = 2509  # the paper's arXiv month, nothing deeper
N_TRAIN, N_TEST = 256, 512


def _check_item(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for field in ("numbers", "target"):
        if field not in item:
            raise ValueError(f"{where}: missing field {field!r}")
    nums = item["numbers"]
    if (not isinstance(nums, list) or not nums
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in nums)):
        raise ValueError(f"{where}: 'numbers' must be a non-empty list of integers, got {str(nums)[:80]}")
    if len(nums) > 64 or any(abs(x) >= 10**MAX_NUMBER_DIGITS for x in nums):
        raise ValueError(f"{where}: 'numbers' must hold at most 64 integers of at most "
                         f"{MAX_NUMBER_DIGITS} digits")
    try:
        _parse_target(item["target"])
    except ValueError as e:
        raise ValueError(f"{where}: 'target' must be {str(e).partition('expected ')[2]}") from None
    out = dict(item)
    out["target"] = str(item["target"])
    return out


MAX_PUZZLE_FILE_BYTES = 256 * 2**20


def load_puzzles(path: str | Path) -> list[dict]:
    """Read puzzles from a JSON list or a JSONL file in the paper's schema.

    Required per item: ``numbers`` (list of int) and ``target`` (number or numeric string, kept
    as a string); ``id``, ``context`` and ``solution`` are kept when present (an ``id`` is made
    up from the position otherwise). A malformed file raises ``ValueError`` naming the file and
    the line (JSONL) or item (JSON list).
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # /dev/zero or a pipe would be read until memory runs out
            raise ValueError(f"{path}: not a regular file, so it cannot hold puzzles")
        if info.st_size > MAX_PUZZLE_FILE_BYTES:
            raise ValueError(f"{path}: {info.st_size:,} bytes, more than the {MAX_PUZZLE_FILE_BYTES:,} a puzzle "
                             f"file may have (the paper's countdown.json is about 1 MB)")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read puzzles ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    items: list[dict] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of puzzles")
        for k, item in enumerate(data):
            items.append(_check_item(item, f"{path}: item {k}"))
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({str(e)[:80]})") from None
            items.append(_check_item(item, f"{path}: line {lineno}"))
    if not items:
        raise ValueError(f"{path}: no puzzles found")
    for k, item in enumerate(items):
        item.setdefault("id", f"{path.stem}-{k:05d}")
    return items


def save_puzzles(puzzles: Sequence[dict], path: str | Path) -> None:
    """Write puzzles as JSONL (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in puzzles:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")


def make_split(seed: int = SPLIT_SEED, n_train: int = N_TRAIN, n_test: int = N_TEST):
    """The fixed split: test first, then train drawn with the test keys excluded."""
    test = generate_puzzles(n_test, seed=seed + 1, prefix="test")
    train = generate_puzzles(n_train, seed=seed, prefix="train",
                             exclude={puzzle_key(p) for p in test})
    return train, test


def load_split(data_dir: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """The shipped ``(train, test)`` puzzles from ``data/``."""
    d = Path(data_dir) if data_dir else _repo_data()
    return load_puzzles(d / TRAIN_FILE), load_puzzles(d / TEST_FILE)


# ----------------------------------------------------------------------------------------
# The Task
# ----------------------------------------------------------------------------------------

def paper_solvable(target: Any) -> bool:
    """The paper's scripts' target rule: ``int(t) if t.isdigit() else None``, so a negative or
    non-integer target ("-5", "12.5") can never be answered correctly there."""
    text = str(target)
    return text.isascii() and text.isdigit()


PAPER_N_TRAIN, PAPER_N_TEST = 200, 2000


def load_paper_data(path: str | Path, n_train: int = PAPER_N_TRAIN,
                    n_test: int = PAPER_N_TEST) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` from the paper's ``countdown.json`` (a JSON list of ``{id, context,
    numbers, target (string), solution}``; the user brings the file, it is not ours to ship), split
    as the paper's scripts do: the FIRST ``n_train`` items train, the LAST ``n_test`` test. A file
    too short for both without overlap raises ``ValueError`` naming it."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    items = load_puzzles(path)
    if len(items) < n_train + n_test:
        raise ValueError(f"{path}: {len(items)} puzzles, but the paper's split needs {n_train} + {n_test} "
                         f"(first {n_train} train, last {n_test} test)")
    return items[:n_train], items[len(items) - n_test:]


def paper_options(**options: Any) -> dict:
    """The task options of paper mode (``fidelity="paper"``, ``--paper-faithful``), explicit ones
    winning: the paper's prompt (``prompt_style="paper"``), its target rule (``targets="paper"``)
    and the reward its script computes (``reward="paper-script"``)::

        get_task("countdown", **paper_options())                         # the paper's task
        get_task("countdown", **paper_options(prompt_style="compact"))   # on the tiny model
    """
    return {"prompt_style": "paper", "targets": "paper", "reward": "paper-script", **options}


class CountdownTask:
    """Countdown as a ``Task``: prompt styles ``"plain"`` (a User/Assistant transcript, or the
    item's own ``context``), ``"paper"`` (the paper's ``context`` text, built from numbers and
    target for any puzzle: :func:`paper_prompt`), ``"chat"`` (tokenizer's chat template) and
    ``"compact"`` (the tiny model's). ``correct`` is answer_reward > 0, the paper's accuracy.

    ``targets``: ``"esnb"`` scores any numeric target exactly; ``"paper"`` scores negative and
    non-integer targets as unsolvable (answer reward 0, format reward as usual), as the paper's
    scripts do (:func:`paper_solvable`): 58 of the 2,000 test puzzles of the paper's file, which
    caps its accuracy at 97.1%.

    Generation stops at the first ``</answer>`` (``stop_strings``; the paper generates on to EOS
    or the token cap: ``FinetuneConfig(early_stop=False)`` or :class:`esnb.finetune.NoEarlyStop`).
    The reward reads the LAST answer block of whatever it is given, so early stopping changes what
    is rewarded: ``<answer>wrong</answer> ... <answer>right</answer>`` scores 1 in the paper, 0 with
    early stop (generation ended after the first block).

    ``reward``: ``"esnb"`` (default) scores the completion alone (:func:`reward`, what the paper's
    text describes); ``"paper-script"`` scores what the paper's training and evaluation scripts
    really score, the prompt + completion (:func:`paper_script_reward`: a 0.06 floor from the paper
    prompt's own tags, the ``assistant:`` split, the prompt's example answer). Its ``targets``
    default to ``"paper"``, the script's rule. It needs the prompt as text, so not ``"chat"``.
    Answers are checked by the safe evaluator either way (``2**5+3`` scores 0.1 here, 1.1 in the
    script). ``paper_options()`` gives all of the paper's task options at once.
    """

    name = "countdown"
    STYLES = ("plain", "paper", "chat", "compact")
    TARGETS = ("esnb", "paper")
    REWARDS = ("esnb", "paper-script")

    def __init__(self, prompt_style: str = "plain", max_new_tokens: int | None = None, targets: str | None = None,
                 reward: str = "esnb"):
        if prompt_style not in self.STYLES:
            raise ValueError(f"prompt_style: expected one of {self.STYLES}, got {prompt_style!r}")
        if reward not in self.REWARDS:
            raise ValueError(f"reward: expected one of {self.REWARDS}, got {reward!r}")
        if reward == "paper-script" and prompt_style == "chat":
            raise ValueError("reward: 'paper-script' scores the prompt text with the completion, and the chat "
                             "prompt needs a tokenizer to be written out; use prompt_style 'paper', 'plain' or 'compact'")
        if targets is None:  # the script's target rule goes with the script's reward
            targets = "paper" if reward == "paper-script" else "esnb"
        if targets not in self.TARGETS:
            raise ValueError(f"targets: expected one of {self.TARGETS}, got {targets!r}")
        self.prompt_style, self.targets, self.reward = prompt_style, targets, reward
        default = 64 if prompt_style == "compact" else 1024
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens <= 0):
            # refused, not coerced: 0 used to mean the default, True meant 1 and '64' meant 64
            raise ValueError(f"max_new_tokens: expected a positive integer or None, got {max_new_tokens!r}")
        self.max_new_tokens = int(max_new_tokens or default)
        # stopping at the first closed answer keeps generation short; the reward still reads
        # the last answer block of whatever it is given
        self.stop_strings: tuple[str, ...] = ("</answer>",)

    def prompt(self, item: dict, tokenizer: Any = None) -> str:
        if self.prompt_style == "compact":
            return compact_prompt(item["numbers"], item["target"])
        if self.prompt_style == "chat":
            return chat_prompt(item["numbers"], item["target"], tokenizer)
        if self.prompt_style == "paper":
            return paper_prompt(item["numbers"], item["target"])
        return item.get("context") or plain_prompt(item["numbers"], item["target"])

    def score(self, completion: str, item: dict) -> dict:
        if self.reward == "paper-script":
            out = paper_script_reward(self.prompt(item), completion, item["numbers"], item["target"], self.targets)
        elif self.targets == "paper" and not paper_solvable(item["target"]):
            fmt = format_reward(completion) if isinstance(completion, str) else 0.0
            out = {"reward": 0.1 * fmt, "format_reward": fmt, "answer_reward": 0.0}
        else:
            out = reward(completion, item["numbers"], item["target"])
        out["correct"] = out["answer_reward"] > 0
        return out

    def __repr__(self) -> str:
        extra = f", targets={self.targets!r}" if self.targets != "esnb" else ""
        extra += f", reward={self.reward!r}" if self.reward != "esnb" else ""
        return f"CountdownTask(prompt_style={self.prompt_style!r}, max_new_tokens={self.max_new_tokens}{extra})"


def main(argv: Sequence[str] | None = None) -> None:
    from .._env import OneLineParser

    ap = OneLineParser(prog="python -m esnb.tasks.countdown",
                       description="Countdown puzzles: regenerate the shipped split.")
    ap.add_argument("--regenerate", action="store_true",
                    help=f"rewrite data/{TRAIN_FILE} and data/{TEST_FILE} (seed {SPLIT_SEED})")
    ap.add_argument("--out", default=None, help="folder to write to (default: the repo's data/)")
    args = ap.parse_args(argv)
    if not args.regenerate:
        ap.print_help()
        return
    out = Path(args.out) if args.out else _repo_data()
    train, test = make_split()
    save_puzzles(train, out / TRAIN_FILE)
    save_puzzles(test, out / TEST_FILE)
    print(f"wrote {len(train)} train and {len(test)} test puzzles to {out}")


if __name__ == "__main__":
    main()
