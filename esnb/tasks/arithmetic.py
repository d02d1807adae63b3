"""Small-number arithmetic with ``<answer>`` tags: a task where a small instruct model has signal.

Why it exists: SmolLM2-135M-Instruct writes 0 of 64 well-formed answers on the paper's full
Countdown prompts, so ES has no reward differences to work with there on a CPU. On "What is
7 + 5?" with the same answer-tag convention as Countdown it is right about two times in three,
and wrong or badly formatted otherwise: room to improve, and cheap to generate (a few tokens).

The prompt ends with the opening ``<answer>`` tag (pre-filled, as Countdown's prompt ends with
``<think>``), so the model has to write the number and close the tag. Reward, in the spirit of
Countdown's: ``0.1 * format + answer`` where format = 1 when ``<answer>`` + completion holds an
``<answer>...</answer>`` block, answer = 1 when the last number in the last block is the right
integer (SmolLM2 likes to write ``2 + 3 = 5</answer>``: the working is allowed, the number decides). ``correct`` = answer reward > 0. Scoring never evaluates model text.
"""
from __future__ import annotations

import random
from typing import Any

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SYSTEM_PROMPT = "You answer arithmetic questions."
PREFIX = "<answer>"  # the assistant's turn is pre-filled with the opening tag


def question(item: dict) -> str:
    return f"What is {item['a']} {item['op']} {item['b']}? Give only the number, inside <answer> </answer> tags."


def make_items(ops: str = "+", digits: int = 1, seed: int = 0) -> list[dict]:
    """Every question with operands of ``digits`` digits (0-9 for one digit) and an operation from
    ``ops``, shuffled with ``seed``. Subtraction keeps a >= b (no negative answers)."""
    hi = 10 ** digits - 1
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    items = []
    for op in ops:
        for a in range(lo, hi + 1):
            for b in range(lo, hi + 1):
                if op == "-" and a < b:
                    continue
                items.append({"a": a, "b": b, "op": op, "answer": OPS[op](a, b)})
    random.Random(seed).shuffle(items)
    for k, it in enumerate(items):
        it["id"] = f"arith-{k:04d}"
    return items


def twin_key(item: dict) -> tuple:
    """What a question and its commuted twin share: ``7 + 5`` and ``5 + 7`` (and ``*``) have one key;
    subtraction is not commutative, so every ``a - b`` is its own."""
    a, b, op = item["a"], item["b"], item["op"]
    return (op, min(a, b), max(a, b)) if op in "+*" else (op, a, b)


def split_items(items: list[dict], n_test: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` with no test question whose commuted twin is in the training set.

    Walks the (shuffled) items' twin groups in order of first appearance and puts a whole group
    into the test set while it fits in ``n_test``; everything else trains. (Splitting the items
    one by one left 22 of 50 held-out one-digit sums with their twin among the training sums, so
    "held out" partly measured recall of a trained question.)"""
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        groups.setdefault(twin_key(it), []).append(it)
    train, test = [], []
    for group in groups.values():
        (test if len(test) + len(group) <= n_test else train).extend(group)
    return train, test


def _last_answer(text: str) -> str | None:
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    return None if start < 0 else text[start + len("<answer>"):end]


MAX_CONTENT = 64  # "2 + 3 = 5" is fine; a page of text in the answer block is not an answer


def _last_integer(text: str) -> int | None:
    """The last run of ASCII digits in ``text`` (with a directly preceding minus sign), or None."""
    end = len(text)
    while end > 0 and not ("0" <= text[end - 1] <= "9"):
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and "0" <= text[start - 1] <= "9":
        start -= 1
    if end - start > 6:
        return None
    value = int(text[start:end])
    return -value if start > 0 and text[start - 1] == "-" and (start == 1 or text[start - 2] in " =") else value


def reward(completion: Any, answer: int) -> dict:
    """``{"reward", "format_reward", "answer_reward"}``; never raises on ``completion``."""
    if not isinstance(completion, str):
        return {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}
    content = _last_answer(completion)
    fmt = 0.0 if content is None else 1.0
    ans = 0.0
    if content is not None and len(content) <= MAX_CONTENT:
        number = _last_integer(content)
        if number is not None and number == answer:
            ans = 1.0
    return {"reward": 0.1 * fmt + ans, "format_reward": fmt, "answer_reward": ans}


class ArithmeticTask:
    """Arithmetic as a ``Task``. ``ops``: which of ``+-*`` to ask; ``digits``: operand size;
    ``n_test``: how many of the shuffled questions are held out (the rest is the training set);
    ``chat``: wrap the question in the tokenizer's chat template (default: when it has one)."""

    name = "arithmetic"

    def __init__(self, ops: str = "+", digits: int = 1, n_test: int = 50, chat: bool | None = None,
                 max_new_tokens: int = 16, seed: int = 0):
        if not isinstance(ops, str) or not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops: expected a string of distinct characters from '+-*', got {ops!r}")
        if isinstance(digits, bool) or digits not in (1, 2):
            raise ValueError(f"digits: expected 1 or 2, got {digits!r}")
        for arg, value in (("max_new_tokens", max_new_tokens), ("n_test", n_test), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg}: expected an integer, got {value!r}")
        if max_new_tokens <= 0:
            raise ValueError("max_new_tokens: must be positive")
        self.ops, self.digits, self.chat, self.seed = ops, int(digits), chat, int(seed)
        self.max_new_tokens = int(max_new_tokens)
        self.stop_strings: tuple[str, ...] = ("</answer>",)
        self._items = make_items(ops, digits, seed)
        if not 0 < n_test < len(self._items):
            raise ValueError(f"n_test: expected 1..{len(self._items) - 1}, got {n_test!r}")
        self.n_test = int(n_test)
        self._train, self._test = split_items(self._items, self.n_test)
        if not self._train:
            raise ValueError(f"n_test: {n_test} leaves no training question once commuted twins stay together")

    @property
    def test_items(self) -> list[dict]:
        """Held-out questions (``n_test`` of them, or one fewer when only a twin pair was left to
        fill the last place); none has its commuted twin among :attr:`train_items`."""
        return [dict(x) for x in self._test]

    @property
    def train_items(self) -> list[dict]:
        return [dict(x) for x in self._train]

    def prompt(self, item: dict, tokenizer: Any = None) -> str:
        has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        use_chat = has_template if self.chat is None else self.chat
        if not use_chat:
            return f"Question: {question(item)}\nAnswer: {PREFIX}"
        if not has_template:
            raise ValueError("tokenizer: chat=True needs a tokenizer with a chat template")
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question(item)},
                    {"role": "assistant", "content": PREFIX}]
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)

    def score(self, completion: str, item: dict) -> dict:
        # the prompt ends with the opening tag (as Countdown's ends with <think>), so the reward
        # reads it back in front of the completion
        out = reward(PREFIX + completion if isinstance(completion, str) else completion, int(item["answer"]))
        out["correct"] = out["answer_reward"] > 0
        return out

    def __repr__(self) -> str:
        return (f"ArithmeticTask(ops={self.ops!r}, digits={self.digits}, n_test={self.n_test}, "
                f"max_new_tokens={self.max_new_tokens})")
