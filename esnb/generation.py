"""Batched greedy generation and task evaluation.

ES evaluates every population member by generating completions, so this loop is the hot path
of the whole course. It is a plain greedy decoder over the model's KV cache: left padding,
one forward per new token, stop tokens checked as tensors (a stop string that is one token,
like the tiny model's ``</answer>``, costs nothing), and the loop ends as soon as every
sequence is done. No sampling anywhere: ES in the paper uses greedy decoding.
"""
from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from . import _cpu
from .llama import LlamaDecoder, SharedWeights, supported

__all__ = ["generate", "evaluate", "cpu_threads", "decoder", "DECODERS"]

# Which greedy decoder :func:`generate` uses (``FinetuneConfig.decoder``):
# * "esnb": this module's loop (the lean decoder for Llama/Qwen2, else the Hugging Face forward),
#   stopping at the task's stop strings; prompts sorted by length into batches;
# * "generate": Hugging Face ``model.generate(do_sample=False)`` with the checkpoint's generation
#   config (its ``repetition_penalty`` included), prompts in their order, as the paper's script
#   calls it; stop strings then cut the text afterwards. Slower; bf16 tokens equal to the script's.
DECODERS = ("esnb", "generate")
_DECODER: contextvars.ContextVar[str] = contextvars.ContextVar("esnb_decoder", default="esnb")


@contextmanager
def decoder(name: str) -> Iterator[None]:
    """Within the block, :func:`generate` (and what calls it: evaluation, ES scoring) decodes with
    ``name`` (:data:`DECODERS`). :func:`esnb.finetune.finetune` runs under its config's decoder."""
    if name not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {name!r}")
    token = _DECODER.set(name)
    try:
        yield
    finally:
        _DECODER.reset(token)


def current_decoder() -> str:
    """The decoder :func:`generate` uses here (see :func:`decoder`)."""
    return _DECODER.get()


@torch.no_grad()
def _hf_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, stop_strings: Sequence[str],
                 batch_size: int) -> list[str]:
    """Hugging Face ``generate``, greedy, as the paper's script calls it: left padding, prompts in
    their order, the model's own generation config (repetition penalty and all)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ids, attn = encode_prompts(tokenizer, prompts[s:s + batch_size], device)
        seq = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        texts = tokenizer.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)
        out.extend(truncate_at_stops(t, stop_strings) if stop_strings else t for t in texts)
    return out


SMALL_MODEL = 20_000_000  # parameters; below this, generation runs on one CPU thread


def machine_busy() -> bool:
    """True when other processes hold at least one of the cores (:func:`esnb._cpu.free_cores`)."""
    from ._cpu import free_cores

    return free_cores() < (os.cpu_count() or 1)


def _auto_threads(model: Any, threads: int | None) -> int | None:
    """One CPU thread for small models, and for any model on a busy machine: PyTorch's threads
    spin-wait on each other, and when another process holds a core, a decoding step that
    needs all of them stalls (measured on 2 shared cores: SmolLM2-135M generation 10-20x slower
    with 2 threads than with 1). ``None``: leave PyTorch's setting alone."""
    if threads:
        return int(threads)
    if next(model.parameters()).device.type != "cpu":
        return None
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL or machine_busy():
        return 1
    return None


@contextmanager
def cpu_threads(model: Any, threads: int | None = None):
    """Run a block with ``generate``'s thread choice for ``model`` (one thread for small CPU
    models), restoring the previous setting afterwards."""
    old = torch.get_num_threads()
    n = _auto_threads(model, threads)
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
    return ids


def split_stops(tokenizer: Any, stop_strings: Sequence[str]) -> tuple[set[int], list[str]]:
    """Stop strings that are exactly one token become token ids; the rest are matched on text."""
    token_stops: set[int] = set()
    text_stops: list[str] = []
    for s in stop_strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids) == s:
            token_stops.add(int(ids[0]))
        else:
            text_stops.append(s)
    return token_stops, text_stops


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """Cut after the first stop string (the stop string itself is kept: ``</answer>`` is part of
    the format the reward checks)."""
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if 0 <= k and k + len(s) < cut:
            cut = k + len(s)
    return text[:cut]


def encode_prompts(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` on ``device``."""
    bos = getattr(tokenizer, "bos_token", None)
    # chat-templated prompts already carry their special tokens
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=add_special)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


class GreedyState:
    """The bookkeeping of a batched greedy decode, shared by :func:`generate` and the population
    decoders: the chosen tokens, which of them are text, which rows are finished."""

    def __init__(self, tokenizer, eos: set, token_stops: set, rows: int, max_new_tokens: int, device):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
        self.finish = torch.tensor(sorted(eos | token_stops), device=device, dtype=torch.long)
        self.stops = torch.tensor(sorted(token_stops), device=device, dtype=torch.long)
        self.out = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        self.keep = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.steps = 0

    def push(self, t: int, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pick step ``t``'s tokens from ``logits`` (finished rows get padding) and return them.

        ``rows``: which batch row each line of ``logits`` belongs to (``None``: all rows, in
        order). A row may appear more than once if every copy but one is finished (a population
        decoder pads members to equal widths with finished rows)."""
        nxt = logits.argmax(dim=-1)
        done = self.done if rows is None else self.done[rows]
        nxt = nxt.masked_fill(done, self.pad_id)
        fin = torch.isin(nxt, self.finish)
        # keep stop tokens (they are text the reward reads), drop EOS and padding
        keep = ~done & (~fin | torch.isin(nxt, self.stops))
        if rows is None:
            self.out[:, t] = nxt
            self.keep[:, t] = keep
            self.done |= fin
        else:
            self.out[rows, t] = nxt
            self.keep[rows, t] = keep
            self.done[rows] = done | fin
        self.steps = t + 1
        return nxt

    def check_text_stops(self, tokenizer, t: int, text_stops: Sequence[str], max_stop: int) -> None:
        """Mark rows done whose last tokens spell one of ``text_stops`` (multi-token stop strings)."""
        for b in (~self.done).nonzero().flatten().tolist():
            tail = tokenizer.decode(self.out[b, max(0, t - max_stop):t + 1], skip_special_tokens=True)
            if any(s in tail for s in text_stops):
                self.done[b] = True

    def texts(self, tokenizer, text_stops: Sequence[str]) -> list[str]:
        """The kept tokens of each row as text, cut after the first text stop string."""
        out, keep = self.out[:, :self.steps].cpu(), self.keep[:, :self.steps].cpu()
        texts = [tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(out, keep)]
        return [truncate_at_stops(x, text_stops) if text_stops else x for x in texts]


# drop finished rows from the batch once a quarter of it is done: a batch otherwise runs at full
# width until its longest completion ends
DROP_AT = 0.75


def drop_finished(dec: Any, state: GreedyState) -> torch.Tensor | None:
    """The decoder positions to keep for the next step (its unfinished rows) once no more than
    :data:`DROP_AT` of its current rows are unfinished; ``None``: keep them all."""
    done = state.done if dec.rows is None else state.done[dec.rows]
    if int((~done).sum()) > DROP_AT * done.numel():
        return None
    return (~done).nonzero().flatten()


def decode_greedy(dec: Any, state: GreedyState, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int,
                  tokenizer: Any = None, text_stops: Sequence[str] = (),
                  keep: Callable[[Any, GreedyState], torch.Tensor | None] = drop_finished) -> None:
    """Greedy-decode the prompts ``ids`` with ``dec`` (a :class:`esnb.llama.LlamaDecoder`, or anything
    with its ``prefill``, ``step``, ``select`` and ``rows``) into ``state``, until every row is done
    or ``max_new_tokens`` are chosen.

    ``text_stops``: multi-token stop strings, checked on the text after every token (a row ends
    there). ``keep``: which decoder positions go on to the next step (``None``: all)."""
    max_stop = max((len(s) for s in text_stops), default=0)
    logits = dec.prefill(ids, attn, max_new_tokens)
    for t in range(max_new_tokens):
        nxt = state.push(t, logits, dec.rows)
        if text_stops:
            state.check_text_stops(tokenizer, t, text_stops, max_stop)
        if t == max_new_tokens - 1 or bool(state.done.all()):
            break
        rows = keep(dec, state)
        if rows is not None:
            dec.select(rows)
            nxt = nxt[rows]
        logits = dec.step(nxt)


def lean_decoder(model: Any) -> LlamaDecoder:
    """The decoder :func:`generate` runs for a model :func:`esnb.llama.supported` covers: the
    model's own weights, with fused copies for small models (under :data:`SMALL_MODEL` parameters)."""
    return LlamaDecoder(model, SharedWeights(model, fuse=sum(p.numel() for p in model.parameters()) < SMALL_MODEL))


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts, max_new_tokens, token_stops, text_stops, eos,
                    fast=False, encoded=None):
    device = next(model.parameters()).device
    ids, mask = encoded if encoded is not None else encode_prompts(tokenizer, prompts, device)
    state = GreedyState(tokenizer, eos, token_stops, ids.shape[0], max_new_tokens, device)
    dec = lean_decoder(model) if fast else _HFStepper(model)
    decode_greedy(dec, state, ids, mask, max_new_tokens, tokenizer, text_stops)
    return state.texts(tokenizer, text_stops)


class _HFStepper:
    """The Hugging Face forward with a KV cache, one token per step, in :class:`esnb.llama.LlamaDecoder`'s
    interface (``prefill``, ``rows``, ``select``, ``step``): the path for every model the lean
    decoder does not cover. Finished rows leave the batch (and the cache) as they do on the lean path."""

    def __init__(self, model):
        self.model = model
        self.rows: torch.Tensor | None = None

    def prefill(self, ids, mask, max_new):
        self.mask = mask
        # positions count real tokens only, so left padding does not shift the prompt
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.past, self.pos = res.past_key_values, pos[:, -1:]
        return res.logits[:, -1, :]

    def select(self, keep: torch.Tensor) -> None:
        self.past.batch_select_indices(keep)
        self.mask, self.pos = self.mask[keep], self.pos[keep]
        self.rows = keep if self.rows is None else self.rows[keep]

    def step(self, tok):
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.pos = self.pos + 1
        res = self.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.past, use_cache=True)
        self.past = res.past_key_values
        return res.logits[:, -1, :]


PARALLEL_BATCH_MIN = 32  # prompts; below this a second thread does not pay for itself


def _parallel_batches(model: Any, threads: int | None, n_prompts: int) -> bool:
    """True when whole batches may be decoded side by side on worker threads: a small CPU model,
    which decodes on one torch thread (its matrices are too small to split), enough prompts, and
    no thread count asked for."""
    if threads or n_prompts < PARALLEL_BATCH_MIN or next(model.parameters()).device.type != "cpu":
        return False
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL


def _generate_batches_threaded(model, tokenizer, prompts, batches, results, workers, max_new_tokens, token_stops,
                               text_stops, eos, use_fast) -> None:
    """Each batch decoded as :func:`_generate_batch` does, on its own thread with one torch thread
    (a batch's texts are the same whichever thread decodes it); the prompts are encoded here first,
    because a tokenizer's padding settings are shared state."""
    from concurrent.futures import ThreadPoolExecutor

    device = next(model.parameters()).device
    encoded = [encode_prompts(tokenizer, [prompts[i] for i in idx], device) for idx in batches]

    def run(k: int) -> list[str]:
        torch.set_num_threads(1)
        return _generate_batch(model, tokenizer, None, max_new_tokens, token_stops, text_stops, eos, use_fast,
                               encoded=encoded[k])

    with ThreadPoolExecutor(workers, thread_name_prefix="esnb-decode") as pool:
        for idx, texts in zip(batches, pool.map(run, range(len(batches)))):
            for i, text in zip(idx, texts):
                results[i] = text


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
             stop_strings: Sequence[str] = (), batch_size: int = 64,
             progress: bool = False, fast: bool | None = None,
             threads: int | None = None) -> list[str]:
    """Greedy completions (text after the prompt) for ``prompts``, in order.

    Each completion ends at EOS (dropped), right after the first of ``stop_strings`` (kept), or
    after ``max_new_tokens`` tokens. Prompts are sorted by length into batches of
    ``batch_size`` (less padding), then put back in order.

    ``fast``: use the lean decoder (same math as the Hugging Face forward, several times faster
    for small models on CPU). ``None`` (default) picks it for the models it covers (Llama 1-3
    incl. SmolLM2, Qwen2/2.5: see :func:`esnb.llama.supported`); ``False`` forces the Hugging Face forward.
    Both paths drop finished rows from the batch as they go.

    ``threads``: CPU threads for the duration of the call. ``None`` (default) uses one thread
    for small models on CPU (under 20M parameters: their matrices are too small to split) and
    for any model when other processes hold a core (extra threads then stall each other);
    otherwise PyTorch's setting is left alone. A small model's batches (one batch that fits is
    split in two) are then decoded side by side on as many cores as are free, at most PyTorch's
    thread setting: after ``torch.set_num_threads(1)`` one core does all the work.

    Inside ``with decoder("generate"):`` the completions come from Hugging Face ``generate``
    instead (see :data:`DECODERS`; ``fast`` is then ignored).
    """
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens: must be positive")
    if batch_size <= 0:
        raise ValueError("batch_size: must be positive")
    prompts = list(prompts)
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    old_threads = torch.get_num_threads()
    asked_threads = threads
    threads = _auto_threads(model, threads)
    if threads:
        torch.set_num_threads(threads)
    try:
        if _DECODER.get() == "generate":
            return _hf_generate(model, tokenizer, prompts, max_new_tokens, tuple(stop_strings), batch_size)
        eos = eos_ids(model, tokenizer)
        token_stops, text_stops = split_stops(tokenizer, stop_strings)
        use_fast = supported(model) if fast is None else bool(fast and supported(model))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[str] = [""] * len(prompts)
        parallel = _parallel_batches(model, asked_threads, len(prompts))
        if parallel and len(prompts) <= batch_size:
            # one batch is always split in two, however many cores are free: a batch's padding can
            # change a bf16 completion, so the batches must not depend on the machine's load
            batch_size = -(-len(prompts) // 2)
        batches = [order[s:s + batch_size] for s in range(0, len(prompts), batch_size)]
        # the caller's thread setting caps the cores too: torch.set_num_threads(1) means one core
        workers = min(_cpu.free_cores(), old_threads, len(batches)) if parallel else 1
        if workers > 1:
            _generate_batches_threaded(model, tokenizer, prompts, batches, results, workers, max_new_tokens,
                                       token_stops, text_stops, eos, use_fast)
            return results
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="generate", unit="batch")
        for idx in batches:
            texts = _generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens,
                                    token_stops, text_stops, eos, use_fast)
            for i, text in zip(idx, texts):
                results[i] = text
    finally:
        model.train(was_training)
        if threads:
            torch.set_num_threads(old_threads)
    return results


def evaluate(model: Any, tokenizer: Any, task: Any, items: Sequence[Any], batch_size: int = 64,
             max_new_tokens: int | None = None, progress: bool = True,
             fast: bool | None = None, threads: int | None = None) -> dict:
    """Greedy-generate on ``items`` and score with ``task``.

    Returns ``{"accuracy", "mean_reward", "samples"}``; ``samples`` is a pandas DataFrame with
    one row per item: prompt, completion, reward, correct and the task's other score fields.
    """
    import pandas as pd

    items = list(items)
    prompts = [task.prompt(it, tokenizer) for it in items]
    completions = generate(model, tokenizer, prompts,
                           max_new_tokens=max_new_tokens or task.max_new_tokens,
                           stop_strings=task.stop_strings, batch_size=batch_size,
                           progress=progress, fast=fast, threads=threads)
    rows = []
    for prompt, completion, item in zip(prompts, completions, items):
        score = task.score(completion, item)
        rows.append({"prompt": prompt, "completion": completion, **score})
    samples = pd.DataFrame(rows)
    n = max(len(rows), 1)
    return {
        "accuracy": float(sum(bool(r["correct"]) for r in rows) / n),
        "mean_reward": float(sum(float(r["reward"]) for r in rows) / n),
        "samples": samples,
    }
