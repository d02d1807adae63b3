# FROZEN COPY of esnb/generation.py at commit b69e441 (before the leaner decode step), kept only so
# that benchmarks/decode_step.py can time the old decoder beside the new one in one run. Not used by esnb.
"""Batched greedy generation and task evaluation.

ES evaluates every population member by generating completions, so this loop is the hot path
of the whole course. It is a plain greedy decoder over the model's KV cache: left padding,
one forward per new token, stop tokens checked as tensors (a stop string that is one token,
like the tiny model's ``</answer>``, costs nothing), and the loop ends as soon as every
sequence is done. No sampling anywhere: ES in the paper uses greedy decoding.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Sequence

import torch

__all__ = ["generate", "evaluate", "cpu_threads"]

SMALL_MODEL = 20_000_000  # parameters; below this, generation runs on one CPU thread


def _machine_busy() -> bool:
    """True when the 1-minute load average already fills every core."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (AttributeError, OSError):  # not available on every platform
        return False


def _auto_threads(model: Any, threads: int | None) -> int | None:
    """One CPU thread for small models, and for any model on a busy machine: PyTorch's threads
    spin-wait on each other, and when another process holds a core, a decoding step that
    needs all of them stalls (measured on 2 shared cores: SmolLM2-135M generation 10-20x slower
    with 2 threads than with 1). ``None``: leave PyTorch's setting alone."""
    if threads:
        return int(threads)
    if next(model.parameters()).device.type != "cpu":
        return None
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL or _machine_busy():
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


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
    return ids


def _split_stops(tokenizer: Any, stop_strings: Sequence[str]) -> tuple[set[int], list[str]]:
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


# ----------------------------------------------------------------------------------------
# A lean decoder for small Llama models. Hugging Face's forward costs a few milliseconds of
# Python per call whatever the model size; for the tiny model that overhead *is* the cost of
# generation. This path reads the same weights (so in-place ES perturbations are seen), keeps a
# preallocated KV cache, and does the same math as LlamaForCausalLM (checked in
# tests/test_generation.py against the Hugging Face path).
# ----------------------------------------------------------------------------------------

def _fast_llama_ok(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    return (rope_type == "default" and getattr(cfg, "hidden_act", "silu") == "silu"
            and not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "pretraining_tp", 1) == 1)


def _rms(x, w, eps):
    dt = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _LeanLlama:
    """Greedy decoding for ``LlamaForCausalLM`` with a preallocated cache."""

    def __init__(self, model):
        cfg = model.config
        self.m = model.model
        self.head = model.lm_head.weight
        self.eps = cfg.rms_norm_eps
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.scale = self.hd ** -0.5
        rope = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dev = self.head.device
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float, device=dev) / self.hd))

    def _cos_sin(self, pos, dtype):
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def _layers(self, h, cos, sin, kcache, vcache, start, mask):
        b, t, _ = h.shape
        rep = self.nh // self.nkv
        for i, layer in enumerate(self.m.layers):
            att = layer.self_attn
            x = _rms(h, layer.input_layernorm.weight, self.eps)
            q = torch.nn.functional.linear(x, att.q_proj.weight).view(b, t, self.nh, self.hd).transpose(1, 2)
            k = torch.nn.functional.linear(x, att.k_proj.weight).view(b, t, self.nkv, self.hd).transpose(1, 2)
            v = torch.nn.functional.linear(x, att.v_proj.weight).view(b, t, self.nkv, self.hd).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            kcache[i][:, :, start:start + t] = k
            vcache[i][:, :, start:start + t] = v
            kk, vv = kcache[i][:, :, :start + t], vcache[i][:, :, :start + t]
            if t == 1:  # one query: plain matmuls beat the fused CPU kernel at this size
                # grouped-query attention without copying the cache: the `rep` query heads that
                # share a key/value head become `rep` query rows of that head
                qg = q.reshape(b, self.nkv, rep, self.hd)
                w = torch.matmul(qg, kk.transpose(-1, -2)) * self.scale
                w = w.masked_fill(~mask, float("-inf")).softmax(dim=-1)
                o = torch.matmul(w, vv).reshape(b, self.nh, 1, self.hd)
            else:
                if rep > 1:
                    kk = kk.repeat_interleave(rep, dim=1)
                    vv = vv.repeat_interleave(rep, dim=1)
                o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            o = o.transpose(1, 2).reshape(b, t, self.nh * self.hd)
            h = h + torch.nn.functional.linear(o, att.o_proj.weight)
            x = _rms(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            g = torch.nn.functional.linear(x, mlp.gate_proj.weight)
            u = torch.nn.functional.linear(x, mlp.up_proj.weight)
            h = h + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, mlp.down_proj.weight)
        return h

    def _logits(self, h):
        return torch.nn.functional.linear(_rms(h, self.m.norm.weight, self.eps), self.head)

    def prefill(self, ids, attn, max_new):
        b, t = ids.shape
        dtype = self.head.dtype
        total = t + max_new
        self.k = [torch.empty(b, self.nkv, total, self.hd, dtype=dtype, device=ids.device)
                  for _ in self.m.layers]
        self.v = [torch.empty_like(x) for x in self.k]
        self.valid = torch.zeros(b, total, dtype=torch.bool, device=ids.device)
        self.valid[:, :t] = attn.bool()
        self.t = t
        self.pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self._cos_sin(self.pos, dtype)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        # padding rows attend to themselves only (their output is never used; this avoids NaN)
        mask = (causal[None] & self.valid[:, None, :t]) | torch.eye(t, dtype=torch.bool, device=ids.device)[None]
        h = self._layers(self.m.embed_tokens.weight[ids], cos, sin, self.k, self.v, 0, mask[:, None])
        self.pos = self.pos[:, -1:]
        return self._logits(h[:, -1])

    def select(self, rows):
        """Keep only the batch rows ``rows`` (finished sequences stop costing compute)."""
        self.k = [x[rows] for x in self.k]
        self.v = [x[rows] for x in self.v]
        self.valid, self.pos = self.valid[rows], self.pos[rows]

    def step(self, tok):
        self.pos = self.pos + 1
        cos, sin = self._cos_sin(self.pos, self.head.dtype)
        self.valid[:, self.t] = True
        mask = self.valid[:, None, None, :self.t + 1]
        h = self._layers(self.m.embed_tokens.weight[tok[:, None]], cos, sin, self.k, self.v, self.t, mask)
        self.t += 1
        return self._logits(h[:, -1])


def _truncate(text: str, stops: Sequence[str]) -> str:
    """Cut after the first stop string (the stop string itself is kept: ``</answer>`` is part of
    the format the reward checks)."""
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if 0 <= k and k + len(s) < cut:
            cut = k + len(s)
    return text[:cut]


def _encode_prompts(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` on ``device``."""
    bos = getattr(tokenizer, "bos_token", None)
    # chat-templated prompts already carry their special tokens
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=add_special)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


class _GreedyState:
    """The bookkeeping of a batched greedy decode, shared by :func:`generate` and the low-rank
    population decoder: the chosen tokens, which of them are text, which rows are finished."""

    def __init__(self, tokenizer, eos: set, token_stops: set, rows: int, max_new_tokens: int, device):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
        self.finish = torch.tensor(sorted(eos | token_stops), device=device, dtype=torch.long)
        self.stops = torch.tensor(sorted(token_stops), device=device, dtype=torch.long)
        self.out = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        self.keep = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.steps = 0

    def push(self, t: int, logits: torch.Tensor) -> torch.Tensor:
        """Pick step ``t``'s tokens from ``logits`` (finished rows get padding) and return them."""
        nxt = logits.argmax(dim=-1)
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad_id), nxt)
        self.out[:, t] = nxt
        # keep stop tokens (they are text the reward reads), drop EOS and padding
        self.keep[:, t] = ~self.done & (~torch.isin(nxt, self.finish) | torch.isin(nxt, self.stops))
        self.done = self.done | torch.isin(nxt, self.finish)
        self.steps = t + 1
        return nxt

    def texts(self, tokenizer, text_stops: Sequence[str]) -> list[str]:
        """The kept tokens of each row as text, cut after the first text stop string."""
        out, keep = self.out[:, :self.steps].cpu(), self.keep[:, :self.steps].cpu()
        texts = [tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(out, keep)]
        return [_truncate(x, text_stops) if text_stops else x for x in texts]


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts, max_new_tokens, token_stops, text_stops, eos,
                    fast=False):
    device = next(model.parameters()).device
    ids, mask = _encode_prompts(tokenizer, prompts, device)
    batch = ids.shape[0]
    state = _GreedyState(tokenizer, eos, token_stops, batch, max_new_tokens, device)
    # positions count real tokens only, so left padding does not shift the prompt
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    max_stop = max((len(s) for s in text_stops), default=0)

    lean = _LeanLlama(model) if fast else None
    if lean is not None:
        logits = lean.prefill(ids, mask, max_new_tokens)
        active = torch.arange(batch, device=device)  # the rows still in the lean decoder's batch
    else:
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1)
        past, logits = res.past_key_values, res.logits[:, -1, :]
    pos = pos[:, -1:]
    for t in range(max_new_tokens):
        nxt = state.push(t, logits)
        if text_stops:
            for b in (~state.done).nonzero().flatten().tolist():
                tail = tokenizer.decode(state.out[b, max(0, t - max_stop):t + 1], skip_special_tokens=True)
                if any(s in tail for s in text_stops):
                    state.done[b] = True
        if bool(state.done.all()) or t == max_new_tokens - 1:
            break
        if lean is not None:
            # drop finished rows from the batch once a quarter of it is done: a batch otherwise
            # runs at full width until its longest completion ends
            alive = (~state.done).nonzero().flatten()
            if alive.numel() <= 0.75 * active.numel():
                lean.select(torch.searchsorted(active, alive))
                active = alive
            logits = torch.zeros((batch, logits.shape[-1]), dtype=logits.dtype, device=device)
            logits[active] = lean.step(nxt[active])
            continue
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=past, use_cache=True)
        past, logits = res.past_key_values, res.logits[:, -1, :]

    return state.texts(tokenizer, text_stops)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
             stop_strings: Sequence[str] = (), batch_size: int = 64,
             progress: bool = False, fast: bool | None = None,
             threads: int | None = None) -> list[str]:
    """Greedy completions (text after the prompt) for ``prompts``, in order.

    Each completion ends at EOS (dropped), right after the first of ``stop_strings`` (kept), or
    after ``max_new_tokens`` tokens. Prompts are sorted by length into batches of
    ``batch_size`` (less padding), then put back in order.

    ``fast``: use the lean Llama decoder (same math as the Hugging Face forward, several times
    faster for small models on CPU). ``None`` (default) picks it for plain Llama models;
    ``False`` forces the Hugging Face forward.

    ``threads``: CPU threads for the duration of the call. ``None`` (default) uses one thread
    for small models on CPU (under 20M parameters: their matrices are too small to split) and
    for any model when the machine's load already fills its cores (extra threads then stall
    each other); otherwise PyTorch's setting is left alone.
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
    threads = _auto_threads(model, threads)
    if threads:
        torch.set_num_threads(threads)
    eos = _eos_ids(model, tokenizer)
    token_stops, text_stops = _split_stops(tokenizer, stop_strings)
    use_fast = _fast_llama_ok(model) if fast is None else bool(fast and _fast_llama_ok(model))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    try:
        for s in starts:
            idx = order[s:s + batch_size]
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
