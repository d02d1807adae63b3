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
from typing import Any, Iterator, Sequence

import torch

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


def _machine_busy() -> bool:
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


# ----------------------------------------------------------------------------------------
# A lean decoder for Llama-family models (Llama 1-3, SmolLM2, Qwen2/2.5). Hugging Face's forward
# costs a few milliseconds of Python per call whatever the model size; for the tiny model that
# overhead *is* the cost of generation. This path reads the same weights (so in-place ES
# perturbations are seen), keeps a preallocated KV cache, and does the same math as the Hugging
# Face forward (checked in tests/test_generation.py on the tiny model and on small random Qwen2
# and Llama-3 configs). A decode step works on 2-D (rows, features) tensors (a linear on a
# 3-D (rows, 1, features) input costs about twice as much on a CPU at these sizes), small models
# get fused q|k|v and gate|up matrices, rotary tables are built once per batch, the padding mask
# is an additive bias built once, and the logits go into one reused buffer.
# ----------------------------------------------------------------------------------------

_LEAN_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# rope types whose inverse frequencies are fixed (read from the model's rotary module); "dynamic"
# and friends change them with the sequence length and stay on the Hugging Face path
_LEAN_ROPE = ("default", "linear", "llama3")


def _rope_type(cfg: Any) -> str:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return "default"
    return str(rope.get("rope_type", rope.get("type", "default")))


def _fast_llama_ok(model: Any) -> bool:
    """True when :class:`_LeanLlama` covers ``model``: a Llama or Qwen2 causal LM with SiLU MLPs,
    full attention in every layer and a static rope (default, linear, llama3); biases allowed."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ not in _LEAN_MODELS or cfg is None:
        return False
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if getattr(rot, "inv_freq", None) is None:
        return False
    layer_types = getattr(cfg, "layer_types", None) or ()
    return (_rope_type(cfg) in _LEAN_ROPE and getattr(cfg, "hidden_act", "silu") == "silu"
            and getattr(cfg, "pretraining_tp", 1) == 1 and all(t == "full_attention" for t in layer_types))


def _plain_llama_ok(model: Any) -> bool:
    """The narrower case of the low-rank population decoder: plain Llama, default rope, no biases."""
    cfg = getattr(model, "config", None)
    return (type(model).__name__ == "LlamaForCausalLM" and _fast_llama_ok(model)
            and _rope_type(cfg) == "default" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False))


def _rms(x, w, eps):
    dt = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _linear_t(mods: Sequence[Any], copy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W^T, bias)`` of one linear, or of several applied to the same input side by side.
    ``copy``: W^T as a contiguous (in, out) copy (a matrix product reads it about 10% faster at
    decoding sizes); otherwise a transposed view of the live weight (no memory)."""
    if len(mods) == 1 and not copy:
        return mods[0].weight.t(), mods[0].bias
    wt = torch.cat([m.weight for m in mods]).t().contiguous()
    if all(m.bias is None for m in mods):
        return wt, None
    return wt, torch.cat([m.bias if m.bias is not None else wt.new_zeros(m.weight.shape[0]) for m in mods])


class _LeanLlama:
    """Greedy decoding for Llama-family models with a preallocated cache.

    ``fuse``: concatenate the q/k/v and gate/up weights into one matrix each (one matrix product
    instead of three and two) and keep every matrix transposed and contiguous. That is a copy of
    the weights made per batch, so it is on by default only for small models (under
    ``SMALL_MODEL`` parameters), where the per-product overhead dominates and the copy costs
    nothing. Weights are stored as ``(W^T, bias)``.

    Rows may be dropped between steps (:meth:`select`); ``rows`` then says which of the batch's
    rows each remaining position holds (``None``: all, in order).
    """

    def __init__(self, model, fuse: bool | None = None):
        cfg = model.config
        self.m = model.model
        self.eps = cfg.rms_norm_eps
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.rep = self.nh // self.nkv
        self.scale = self.hd ** -0.5
        self.nq, self.nk = self.nh * self.hd, self.nkv * self.hd
        rot = self.m.rotary_emb
        self.inv_freq = rot.inv_freq.float()
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
        self.embed = self.m.embed_tokens.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        if fuse is None:
            fuse = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
        self.fuse = bool(fuse)
        self.head_t, self.head_b = self._lt([model.lm_head])
        # F.rms_norm is one kernel and equals the Hugging Face norm in float32; narrower dtypes
        # keep the explicit formula (it rounds the normalised value before the weight multiply)
        self.fused_norm = self.dtype == torch.float32 and hasattr(torch.nn.functional, "rms_norm")
        self.layers = [self._layer(layer) for layer in self.m.layers]
        self.final_norm = self.m.norm.weight
        self.rows: torch.Tensor | None = None

    def _layer(self, layer) -> dict:
        att, mlp = layer.self_attn, layer.mlp
        w = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
             "o": self._lt([att.o_proj]), "down": self._lt([mlp.down_proj])}
        if self.fuse:
            w["qkv"] = [self._lt([att.q_proj, att.k_proj, att.v_proj])]
            w["gu"] = [self._lt([mlp.gate_proj, mlp.up_proj])]
        else:
            w["qkv"] = [self._lt([m]) for m in (att.q_proj, att.k_proj, att.v_proj)]
            w["gu"] = [self._lt([m]) for m in (mlp.gate_proj, mlp.up_proj)]
        return w

    def _lt(self, mods):
        """``(W^T, bias)`` of the linears ``mods`` side by side (see :func:`_linear_t`)."""
        return _linear_t(mods, self.fuse)

    # -- the pieces a population decoder overrides (x: 2-D, rows x features)
    def lin(self, x, wb):
        """``x W^T + b`` for 2-D ``x``; ``wb = (W^T, b)``."""
        if wb[1] is None:
            return torch.mm(x, wb[0])
        return torch.addmm(wb[1], x, wb[0])

    def lin_add(self, h, x, wb):
        """``h + linear(x)`` in one matrix product (the residual rides in as the addend)."""
        if wb[1] is not None:
            return h + self.lin(x, wb)
        return torch.addmm(h, x, wb[0])

    def norm(self, x, w):
        if self.fused_norm:
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, self.eps)
        return _rms(x, w, self.eps)

    def embed_tokens(self, tok):
        return self.embed[tok]

    def logits(self, h):
        """Logits of the rows of ``h`` (rows x hidden), in a buffer reused from step to step."""
        x = self.norm(h, self.final_norm)
        out = self._logits_buf[:x.shape[0]]
        if self.head_b is None:
            return torch.mm(x, self.head_t, out=out)
        return torch.addmm(self.head_b, x, self.head_t, out=out)

    # -- shared math
    def _proj(self, x, pieces, sizes):
        """Outputs of a fused (or unfused) group of linears, split into ``sizes``."""
        if len(pieces) == 1:
            return self.lin(x, pieces[0]).split(sizes, dim=-1)
        return [self.lin(x, wb) for wb in pieces]

    def _rope(self, x, cos, sin):
        # x * cos + rotate_half(x) * sin, with rotate_half's sign folded into the sin table
        # (bit-identical: negation is exact)
        return x * cos + x.roll(self.hd // 2, dims=-1) * sin

    def _mlp_act(self, x, w):
        inter = w["down"][0].shape[-2]
        g, u = self._proj(x, w["gu"], [inter, inter])
        return torch.nn.functional.silu(g) * u

    def _mlp(self, x, w):
        return self.lin(self._mlp_act(x, w), w["down"])

    def _tables(self, total):
        """cos and sign-folded sin tables for positions 0..total-1 (as the model's rotary module)."""
        pos = torch.arange(total, device=self.device).float()
        freqs = pos[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        half = self.hd // 2
        self.cos_tab, self.sin_tab = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def prefill(self, ids, attn, max_new):
        """Prompts (b, t) -> logits of their last position (b, vocab)."""
        b, t = ids.shape
        total = t + max_new
        dev = ids.device
        self._tables(total)
        self.k = [torch.empty(b, self.nkv, total, self.hd, dtype=self.dtype, device=dev) for _ in self.layers]
        self.v = [torch.empty_like(x) for x in self.k]
        # additive attention bias: -inf on left padding, 0 on real tokens and everything generated
        self.bias = torch.zeros(b, total, dtype=self.dtype, device=dev)
        self.bias[:, :t].masked_fill_(~attn.bool(), float("-inf"))
        self.t = t
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.cos_tab[pos][:, :, None], self.sin_tab[pos][:, :, None]   # (b, t, 1, hd)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        # padding rows attend to themselves only (their output is never used; this avoids NaN)
        mask = ((causal[None] & attn.bool()[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)[None])[:, None]
        h = self.embed_tokens(ids).reshape(b * t, -1)
        for i, w in enumerate(self.layers):
            x = self.norm(h, w["ln1"])
            q, k, v = self._proj(x, w["qkv"], [self.nq, self.nk, self.nk])
            q = self._rope(q.reshape(b, t, self.nh, self.hd), cos, sin).transpose(1, 2)
            k = self._rope(k.reshape(b, t, self.nkv, self.hd), cos, sin).transpose(1, 2)
            v = v.reshape(b, t, self.nkv, self.hd).transpose(1, 2)
            self.k[i][:, :, :t] = k
            self.v[i][:, :, :t] = v
            if self.rep > 1:
                k, v = k.repeat_interleave(self.rep, dim=1), v.repeat_interleave(self.rep, dim=1)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + self.lin(o.transpose(1, 2).reshape(b * t, self.nq), w["o"])
            h = h + self._mlp(self.norm(h, w["ln2"]), w)
        self.pos = pos[:, -1].clone()
        self.rows = None
        self._logits_buf = torch.empty(b, self.head_t.shape[-1], dtype=self.dtype, device=dev)
        return self.logits(h.view(b, t, -1)[:, -1])

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the current positions ``keep`` (finished sequences stop costing compute)."""
        self.k = [x[keep] for x in self.k]
        self.v = [x[keep] for x in self.v]
        self.bias, self.pos = self.bias[keep], self.pos[keep]
        self.rows = keep if self.rows is None else self.rows[keep]

    def step(self, tok):
        """The next tokens (one per current position) -> logits (positions, vocab)."""
        self.pos += 1
        b, t = tok.shape[0], self.t
        cos, sin = self.cos_tab[self.pos][:, None], self.sin_tab[self.pos][:, None]   # (b, 1, hd)
        bias = self.bias[:, None, None, :t + 1]
        h = self.embed_tokens(tok)
        for i, w in enumerate(self.layers):
            x = self.norm(h, w["ln1"])
            if len(w["qkv"]) == 1:  # fused: rotate q and k in one go (they sit side by side)
                qkv = self.lin(x, w["qkv"][0])
                qk = self._rope(qkv[:, :self.nq + self.nk].reshape(b, self.nh + self.nkv, self.hd), cos, sin)
                q = qk[:, :self.nh]
                self.k[i][:, :, t] = qk[:, self.nh:]
                self.v[i][:, :, t] = qkv[:, self.nq + self.nk:].reshape(b, self.nkv, self.hd)
            else:
                q, k, v = self._proj(x, w["qkv"], [self.nq, self.nk, self.nk])
                q = self._rope(q.reshape(b, self.nh, self.hd), cos, sin)
                self.k[i][:, :, t] = self._rope(k.reshape(b, self.nkv, self.hd), cos, sin)
                self.v[i][:, :, t] = v.reshape(b, self.nkv, self.hd)
            kk, vv = self.k[i][:, :, :t + 1], self.v[i][:, :, :t + 1]
            # one query: plain matmuls beat the fused CPU kernel at this size; grouped-query
            # attention without copying the cache: the `rep` query heads that share a key/value
            # head become `rep` query rows of that head
            a = torch.matmul(q.reshape(b, self.nkv, self.rep, self.hd), kk.transpose(-1, -2))
            a = a.mul_(self.scale).add_(bias).softmax(dim=-1)
            o = torch.matmul(a, vv).view(b, self.nq)
            h = self.lin_add(h, o, w["o"])
            h = self.lin_add(h, self._mlp_act(self.norm(h, w["ln2"]), w), w["down"])
        self.t = t + 1
        return self.logits(h)


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
_DROP_AT = 0.75


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts, max_new_tokens, token_stops, text_stops, eos,
                    fast=False, encoded=None):
    device = next(model.parameters()).device
    ids, mask = encoded if encoded is not None else encode_prompts(tokenizer, prompts, device)
    batch = ids.shape[0]
    state = GreedyState(tokenizer, eos, token_stops, batch, max_new_tokens, device)
    max_stop = max((len(s) for s in text_stops), default=0)

    if fast:
        dec = _LeanLlama(model)
        logits = dec.prefill(ids, mask, max_new_tokens)
    else:
        dec = _HFStepper(model, ids, mask)
        logits = dec.logits
    width = batch  # rows in the decoder's batch
    for t in range(max_new_tokens):
        nxt = state.push(t, logits, dec.rows)
        if text_stops:
            state.check_text_stops(tokenizer, t, text_stops, max_stop)
        n_alive = batch - int(state.done.sum())
        if n_alive == 0 or t == max_new_tokens - 1:
            break
        if n_alive <= _DROP_AT * width:
            alive = ~(state.done if dec.rows is None else state.done[dec.rows])
            keep = alive.nonzero().flatten()
            dec.select(keep)
            nxt, width = nxt[keep], n_alive
        logits = dec.step(nxt)
    return state.texts(tokenizer, text_stops)


class _HFStepper:
    """The Hugging Face forward with a KV cache, one token per step, in :class:`_LeanLlama`'s
    interface (``rows``, ``select``, ``step``): the path for every model the lean decoder does
    not cover. Finished rows leave the batch (and the cache) as they do on the lean path."""

    def __init__(self, model, ids, mask):
        self.model = model
        self.mask = mask
        # positions count real tokens only, so left padding does not shift the prompt
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.past, self.logits = res.past_key_values, res.logits[:, -1, :]
        self.pos = pos[:, -1:]
        self.rows: torch.Tensor | None = None

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


def _batch_workers(model: Any, threads: int | None, n_prompts: int, batch_size: int) -> int:
    """Threads that decode whole batches side by side: for a small CPU model, which decodes on one
    torch thread (its matrices are too small to split), the cores other processes leave free;
    1 when threads were given, on other devices, or for few prompts."""
    if threads or n_prompts < PARALLEL_BATCH_MIN or next(model.parameters()).device.type != "cpu":
        return 1
    if sum(p.numel() for p in model.parameters()) >= SMALL_MODEL:
        return 1
    from ._cpu import free_cores

    n_batches = -(-n_prompts // batch_size)
    return max(1, min(free_cores(), n_batches if n_batches > 1 else 2))  # one batch is split in two


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
    incl. SmolLM2, Qwen2/2.5: see ``_fast_llama_ok``); ``False`` forces the Hugging Face forward.
    Both paths drop finished rows from the batch as they go.

    ``threads``: CPU threads for the duration of the call. ``None`` (default) uses one thread
    for small models on CPU (under 20M parameters: their matrices are too small to split) and
    for any model when other processes hold a core (extra threads then stall each other);
    otherwise PyTorch's setting is left alone.

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
        use_fast = _fast_llama_ok(model) if fast is None else bool(fast and _fast_llama_ok(model))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[str] = [""] * len(prompts)
        workers = _batch_workers(model, asked_threads, len(prompts), batch_size)
        if workers > 1 and len(prompts) <= batch_size:
            batch_size = -(-len(prompts) // workers)  # one batch per worker (the texts do not depend on it)
        batches = [order[s:s + batch_size] for s in range(0, len(prompts), batch_size)]
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
