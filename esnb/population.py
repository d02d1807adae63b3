"""Population-batched full-rank decoding: every member's own weights, all members in one pass.

Full-rank ES gives each member its own weights, so a population is normally evaluated one member
after another: N decodes of the same prompts, each too small to keep a CPU busy (a decoding step
of the tiny model is a few hundred microseconds of arithmetic wrapped in a few milliseconds of
per-operation overhead). When N copies of the weights fit comfortably in memory, that overhead
can be paid once instead of N times: build each member's perturbed weights from its seed (the
very numbers :meth:`esnb.es.ES.perturbed` would write into the model), stack them into
``(N, out, in)`` tensors, and decode all N x prompts sequences together, every matrix product a
batched product over members (``torch.bmm``). The model itself is never perturbed.

It computes what the per-member path computes (same noise, same greedy decoding; completions
compared in tests/test_population.py), and it uses all the threads PyTorch is given: the batched
products are large enough to split.

Memory: the stacked weights (N x parameters in the model's dtype) plus a KV cache for
N x prompts rows. :func:`use_population` chooses it automatically for small models (under
``esnb.generation.SMALL_MODEL`` parameters) whose lean decoder exists, and members are decoded
in chunks that keep weights and cache under :data:`MEMORY_BUDGET` bytes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .generation import (DROP_AT, SMALL_MODEL, GreedyState, current_decoder, decode_greedy, encode_prompts, eos_ids,
                         machine_busy, split_stops)
from .llama import LlamaDecoder, SharedWeights, rms_normalize, supported

__all__ = ["use_population", "generate_members", "score_population", "StackedWeights", "MEMORY_BUDGET"]

MEMORY_BUDGET = 1 << 30  # bytes of stacked weights + KV cache per chunk of members


def use_population(choice: bool | str, model: Any, es: Any) -> bool:
    """Whether to decode the population batched. ``choice``: ``True``, ``False`` or ``"auto"``
    (batched when the model is small, covered by the lean decoder and ``es`` is plain full-rank
    ES). ``True`` on a model or optimizer it cannot serve raises ``ValueError``."""
    from .es import ES

    if choice not in (True, False, "auto"):
        raise ValueError(f"population_batch must be True, False or 'auto', got {choice!r}")
    if choice is False:
        return False
    # Paper precision perturbs and restores the model in place in its dtype, and the drift those
    # round trips leave is part of the paper's algorithm (and of the seed-log replay); a batched
    # population never touches the model, so it would silently run a different algorithm.
    # Hugging Face ``generate`` (decoder "generate") decodes one member at a time by definition.
    possible = (type(es) is ES and supported(model) and es.config.precision != "paper"
                and current_decoder() == "esnb")
    if choice is True:
        if not possible:
            raise ValueError("population_batch=True needs full-rank ES (esnb.es.ES) with precision='master', "
                             "esnb's decoder and a model the lean decoder covers (Llama, Qwen2); use 'auto' or False")
        return True
    return possible and sum(p.numel() for p in model.parameters()) < SMALL_MODEL


class StackedWeights(SharedWeights):
    """M members' full-rank weights as a :class:`esnb.llama.LlamaDecoder` provider: each weight
    stacked ``(M, ...)``, built from the members' seeds (the model is never perturbed).

    Rows are member-major with the same number of rows per member, so every linear is one batched
    product over members (``torch.bmm``); finished rows leave by shrinking every member to the same
    number of rows (:func:`keep_member_slots`).
    """

    def __init__(self, model: Any, es: Any, members: Sequence[Any]):
        self.members = len(members)
        self._index = {id(p): i for i, p in enumerate(es.params.params)}
        self._es, self._member_list = es, list(members)
        self._cache: dict[int, torch.Tensor] = {}
        super().__init__(model, fuse=True)
        self.fused_norm = False  # the norm's weight differs per member: normalise, then scale

    @torch.no_grad()
    def _fill(self, dest: torch.Tensor, p: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Write member m's perturbed copy of parameter ``p`` (transposed if asked) into
        ``dest[m]``: exactly the numbers ``es.perturbed(member)`` writes into ``p``."""
        ps, i = self._es.params, self._index[id(p)]
        sigma = self._es.config.sigma
        for m, member in enumerate(self._member_list):
            s = member.sign * sigma
            if ps.precision == "paper":   # perturbed in the model's dtype, as ParameterSet.perturb
                w = p.detach().clone().add_(ps.noise(member.seed, i).mul_(s))
            else:
                w = ps.noise(member.seed, i).mul_(s).add_(ps.master[i])
            dest[m].copy_(w.t() if transpose else w)
        return dest

    def param(self, p: torch.Tensor) -> torch.Tensor:
        """(M, *shape): every member's perturbed copy of parameter ``p`` (built once)."""
        key = id(p)
        if key not in self._cache:
            self._cache[key] = self._fill(torch.empty((self.members, *p.shape), dtype=p.dtype, device=p.device), p)
        return self._cache[key]

    def linear(self, mods: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked ``(W^T, bias)``: (M, in, out) and (M, out), the linears ``mods`` side by side,
        each member's weights written straight into place."""
        w0 = mods[0].weight
        sizes = [m.weight.shape[0] for m in mods]
        wt = torch.empty((self.members, w0.shape[1], sum(sizes)), dtype=w0.dtype, device=w0.device)
        for m, part in zip(mods, wt.split(sizes, dim=2)):
            self._fill(part, m.weight, transpose=True)
        if all(m.bias is None for m in mods):
            return wt, None
        return wt, torch.cat([self.param(m.bias) if m.bias is not None
                              else wt.new_zeros(self.members, m.weight.shape[0]) for m in mods], dim=1)

    def start(self, batch: int) -> None:
        super().start(batch)
        self.mid = torch.arange(self.members, device=self.device).repeat_interleave(batch)  # each row's member

    def select(self, keep: torch.Tensor) -> None:
        self.mid = self.mid[keep]

    # x: (M * rows per member, features), member-major
    def lin(self, x, wb):
        x3 = x.reshape(self.members, -1, x.shape[-1])
        if wb[1] is None:
            return torch.bmm(x3, wb[0]).view(x.shape[0], -1)
        return torch.baddbmm(wb[1][:, None], x3, wb[0]).view(x.shape[0], -1)

    def lin_add(self, h, x, wb):
        if wb[1] is not None:
            return h + self.lin(x, wb)
        return torch.baddbmm(h.reshape(self.members, -1, h.shape[-1]), x.reshape(self.members, -1, x.shape[-1]),
                             wb[0]).view(h.shape)

    def norm(self, x, w):
        return (w[:, None] * rms_normalize(x, self.eps).reshape(self.members, -1, x.shape[-1])).view(x.shape)

    def embed(self, tok):
        return self.table[self.mid if tok.dim() == 1 else self.mid[:, None], tok]

    def logits(self, x):
        out = self._buf[:x.shape[0]]
        wt, b = self.head
        x3 = x.reshape(self.members, -1, x.shape[-1])
        o3 = out.view(self.members, -1, out.shape[-1])
        if b is None:
            torch.bmm(x3, wt, out=o3)
        else:
            torch.baddbmm(b[:, None], x3, wt, out=o3)
        return out


def keep_member_slots(dec: LlamaDecoder, state: GreedyState) -> torch.Tensor | None:
    """:func:`esnb.generation.drop_finished` for member-major rows that must stay equal in number
    per member: once no member has more than :data:`esnb.generation.DROP_AT` of its rows
    unfinished, every member keeps as many rows as the busiest one needs, its unfinished rows
    first, then finished ones as fillers."""
    members = dec.w.members
    done = state.done if dec.rows is None else state.done[dec.rows]
    slots = done.numel() // members
    live = ~done.view(members, slots)
    need = int(live.sum(1).max())
    if need > DROP_AT * slots:
        return None
    order = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices[:, :need]
    return (order + torch.arange(members, device=order.device)[:, None] * slots).flatten()


@torch.no_grad()  # not inference_mode: the ES noise buffer made here is reused outside it
def _decode_chunk(model, es, members, tokenizer, ids, attn, max_new_tokens, eos, token_stops, text_stops):
    state = GreedyState(tokenizer, eos, token_stops, len(members) * ids.shape[0], max_new_tokens, ids.device)
    dec = LlamaDecoder(model, StackedWeights(model, es, members))
    decode_greedy(dec, state, ids, attn, max_new_tokens, tokenizer, text_stops, keep=keep_member_slots)
    return state.texts(tokenizer, text_stops)


def _chunk_size(model, n_members: int, rows_per_member: int, total_len: int) -> int:
    cfg = model.config
    p = next(model.parameters())
    weights = sum(x.numel() for x in model.parameters()) * p.element_size()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * total_len * p.element_size() * rows_per_member
    return max(1, min(n_members, MEMORY_BUDGET // max(1, weights + cache)))


def generate_members(es: Any, members: Sequence[Any], model: Any, tokenizer: Any, prompts: Sequence[str],
                     max_new_tokens: int, stop_strings: Sequence[str] = (), batch_size: int = 256,
                     threads: int | None = None, members_per_pass: int | None = None) -> list[list[str]]:
    """Greedy completions of ``prompts`` for each member (a list per member, in order), members
    decoded together with their own full-rank weights (see the module's docstring).

    Same arguments as :func:`esnb.generation.generate` (prompts are sorted by length into batches
    of ``batch_size``, as there, so padding and hence the numbers are the same). ``threads``: CPU
    threads for the call; ``None`` leaves PyTorch's setting (all cores by default), or uses one
    thread when the machine's load already fills its cores. The model must hold the unperturbed
    weights (``es``'s master); it is not modified.
    """
    members, prompts = list(members), list(prompts)
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens: must be positive")
    if not members or not prompts:
        return [[] for _ in members]
    if es.params.perturbed_by is not None:
        raise RuntimeError("the model is perturbed; generate_members needs the unperturbed weights")
    old = torch.get_num_threads()
    n = threads or (1 if machine_busy() else None)
    if n:
        torch.set_num_threads(int(n))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        eos = eos_ids(model, tokenizer)
        token_stops, text_stops = split_stops(tokenizer, stop_strings)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [[""] * len(prompts) for _ in members]
        for s in range(0, len(prompts), batch_size):
            idx = order[s:s + batch_size]
            ids, attn = encode_prompts(tokenizer, [prompts[i] for i in idx], device)
            step = members_per_pass or _chunk_size(model, len(members), len(idx), ids.shape[1] + max_new_tokens)
            for c in range(0, len(members), step):
                chunk = members[c:c + step]
                texts = _decode_chunk(model, es, chunk, tokenizer, ids, attn, max_new_tokens, eos, token_stops,
                                      text_stops)
                for m in range(len(chunk)):
                    for j, i in enumerate(idx):
                        out[c + m][i] = texts[m * len(idx) + j]
    finally:
        model.train(was_training)
        if n:
            torch.set_num_threads(old)
    return out


def score_population(es: Any, members: Sequence[Any], model: Any, tokenizer: Any, task: Any,
                     prompts: Sequence[str], items: Sequence[Any], max_new_tokens: int, batch_size: int = 256,
                     stop_strings: Sequence[str] | None = None, threads: int | None = None
                     ) -> tuple[list[float], list[float]]:
    """Mean reward and accuracy of each member over ``prompts``, as :func:`esnb.finetune.score_members`,
    with the population decoded batched (:func:`generate_members`). ``stop_strings``: ``None`` =
    the task's."""
    stops = task.stop_strings if stop_strings is None else stop_strings
    rewards, accs = [], []
    for texts in generate_members(es, members, model, tokenizer, prompts, max_new_tokens, stops, batch_size, threads):
        scores = [task.score(c, it) for c, it in zip(texts, items)]
        rewards.append(float(np.mean([float(x["reward"]) for x in scores])))
        accs.append(float(np.mean([bool(x["correct"]) for x in scores])))
    return rewards, accs
