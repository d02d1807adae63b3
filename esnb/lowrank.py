"""Low-rank ES noise (EGGROLL, Sarkar et al. 2025, arXiv 2511.16652): a population in one forward.

With full-rank noise every member has its own weights, so N members cost N separate forward
passes. EGGROLL perturbs every weight matrix ``W`` (out x in) of member n by a rank-r product

    eps_n(W) = A_n B_n^T / sqrt(r),     A_n: out x r,  B_n: in x r,  Gaussian from the member's seed

(each entry still has variance one). Then ``(W + sigma eps_n) x = W x + (sigma/sqrt r) A_n (B_n^T x)``:
the expensive product ``W x`` is shared by all members (one large matrix multiply over the rows of
the whole population) and each member adds a cheap rank-r correction. Vectors (norm weights,
biases) keep full-rank noise; they are tiny. The update is still ``theta += alpha mean_n z_n eps_n``,
which for a matrix is ``(A diag(alpha z / (N sqrt r))) B^T`` over all members: one matrix product
of rank at most N r, assembled from regenerated factors (so a run is still a seed log).

This module holds

* :class:`LowRankES` -- the ask/tell optimizer of :class:`esnb.es.ES` with low-rank noise
  (``perturbed(member)`` materializes ``W + sigma eps`` in place, so any code can evaluate a
  member the ordinary way; ``tell`` applies the low-rank update);
* :func:`generate_population` -- greedy generation for many members in one batched forward
  (plain Llama models, e.g. the tiny LM and SmolLM2);
* :func:`score_population` -- mean reward and accuracy per member, the drop-in for
  :func:`esnb.finetune.score_members`.

What is left out: the vectorized path handles ``LlamaForCausalLM`` with default RoPE and no
biases (others fall back to one member at a time), stop strings longer than one token are only
applied after generation (the batch runs to the token cap), and there is no distributed variant
(``esnb.distributed`` works with full-rank noise).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .es import ES, Adam, ESConfig, Member
from .generation import (encode_prompts, eos_ids, GreedyState, _plain_llama_ok, split_stops, cpu_threads,
                         generate)
from .noise import _generator, noise_like, stream_seed

__all__ = ["LowRankES", "lowrank_factors", "lowrank_noise", "generate_population", "score_population", "replay"]


def lowrank_factors(shape: Sequence[int], seed: int, index: int, rank: int, device: Any = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a matrix of ``shape = (out, in)``, a pure function of (seed, tensor index, rank):
    A is out x r, B is in x r, both standard Gaussian."""
    out_f, in_f = int(shape[0]), int(shape[1])
    gen = _generator(torch.device(device))
    gen.manual_seed(stream_seed(seed, index) ^ 0x10_4A_4E)  # apart from the full-rank stream
    a = torch.randn(out_f, rank, generator=gen, device=device, dtype=dtype)
    b = torch.randn(in_f, rank, generator=gen, device=device, dtype=dtype)
    return a, b


def lowrank_noise(tensor: torch.Tensor, seed: int, index: int, rank: int) -> torch.Tensor:
    """The noise of one tensor under low-rank ES: ``A B^T / sqrt(r)`` for a matrix, full-rank
    Gaussian (as :func:`esnb.noise.noise_like`) for anything else. Float32 (float64 stays)."""
    if tensor.dim() != 2:
        return noise_like(tensor, seed, index)
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    a, b = lowrank_factors(tensor.shape, seed, index, rank, tensor.device, dtype)
    return (a @ b.T).div_(math.sqrt(rank))


class LowRankES(ES):
    """:class:`esnb.es.ES` with rank-``rank`` noise on every matrix (EGGROLL).

    Same config, same seeds (:meth:`ask`), same fitness shaping and seed log; only the noise of a
    member differs. ``rank=None`` would be full rank: use :class:`esnb.es.ES` for that.
    """

    def __init__(self, params: nn.Module | torch.Tensor | Iterable[torch.Tensor], config: ESConfig | None = None,
                 rank: int = 1, master_device: str | torch.device | None = None):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        super().__init__(params, config, master_device=master_device)
        if self.config.noise != "independent" or self.config.precision != "master":
            raise ValueError("noise/precision: LowRankES draws its own low-rank noise from per-tensor streams "
                             "with a float32 master; only noise='independent', precision='master' are supported")
        self.rank = rank

    def factors(self, member: Member, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of parameter ``index`` for ``member`` (master precision, master device)."""
        m = self.params.master[index]
        return lowrank_factors(m.shape, member.seed, index, self.rank, m.device, m.dtype)

    def noise(self, member: Member) -> torch.Tensor:
        return torch.cat([member.sign * lowrank_noise(m, member.seed, i, self.rank).reshape(-1)
                          for i, m in enumerate(self.params.master)])

    @contextmanager
    def perturbed(self, member: Member) -> Iterator[None]:
        """Working weights := master + sigma * sign * eps (low rank) inside the block; exact restore after."""
        ps = self.params
        if ps.perturbed_by is not None:
            raise RuntimeError("parameters are already perturbed; restore() first")
        sigma = member.sign * self.config.sigma
        ps.perturbed_by = (member.seed, sigma)
        try:
            with torch.no_grad():
                for i, (p, m) in enumerate(zip(ps.params, ps.master)):
                    eps = lowrank_noise(m, member.seed, i, self.rank)
                    p.copy_(eps.mul_(sigma).add_(m))
                    del eps
            yield
        finally:
            ps.restore()

    @torch.no_grad()
    def apply_update(self, seeds: Sequence[int], signs: Sequence[int], weights: Sequence[float]) -> float:
        """theta += step(mean_n w_n sign_n eps_n); for a matrix the sum is one product
        ``A_all diag(c) B_all^T`` of the stacked factors."""
        n = len(seeds)
        coef: dict[int, float] = {}
        for s, sg, w in zip(seeds, signs, weights):
            coef[s] = coef.get(s, 0.0) + sg * w
        coef = {s: c for s, c in coef.items() if c != 0.0}
        if isinstance(self.optimizer, Adam):
            self.optimizer.begin()
        sq = 0.0
        for i, master in enumerate(self.params.master):
            if master.dim() == 2 and coef:
                fa, fb = zip(*(lowrank_factors(master.shape, s, i, self.rank, master.device, master.dtype)
                               for s in coef))
                scale = torch.tensor([c / (n * math.sqrt(self.rank)) for c in coef.values()],
                                     dtype=master.dtype, device=master.device).repeat_interleave(self.rank)
                grad = (torch.cat(fa, dim=1) * scale) @ torch.cat(fb, dim=1).T
            else:
                grad = torch.zeros_like(master)
                for s, c in coef.items():
                    grad.add_(noise_like(master, s, i), alpha=c / n)
            step = self.optimizer.step(i, grad)
            if self.config.weight_decay:
                step = step - self.config.alpha * self.config.weight_decay * master
            master.add_(step)
            sq += float(step.double().pow(2).sum())
        self.params.sync()
        return math.sqrt(sq)


def replay(run: tuple[dict, list[dict]], params: nn.Module | torch.Tensor | Iterable[torch.Tensor] | None = None,
           rank: int = 1, until: int | None = None, master_device: str | torch.device | None = None) -> LowRankES:
    """:func:`esnb.runlog.replay` for a :class:`LowRankES` run: rebuild its weights from the seed log
    without evaluating anything (the same ``apply_update`` calls as the live run, so bit-identical).

    ``run`` is ``(initial_state, entries)``: ``LowRankES(model, config, rank).state_dict()`` of the
    starting model (or a saved one) and the logged ``es.history`` entries. ``rank`` must be the
    run's rank (the log does not hold it). ``params``, ``until`` and ``master_device`` as in
    :func:`esnb.runlog.replay`. Returns the optimizer, ready to continue the run.
    """
    initial, entries = run
    config = ESConfig(**{**initial["config"], "adam_betas": tuple(initial["config"]["adam_betas"])})
    if params is None:
        params = [m.detach().clone() for m in initial["master"]]
    es = LowRankES(params, config, rank=rank, master_device=master_device)
    es.load_state_dict(initial)
    for e in entries:
        if e["iteration"] < es.iteration:
            continue
        if until is not None and e["iteration"] >= until:
            break
        if e["iteration"] != es.iteration:
            raise ValueError(f"log jumps from iteration {es.iteration} to {e['iteration']}")
        es.apply_update(e["seeds"], e["signs"], e["weights"])
        es.iteration += 1
        es.history.append(e)
    return es


# ---------------------------------------------------------------- population-batched decoding


class _PopLlama:
    """Greedy decoding of M low-rank members of a ``LlamaForCausalLM`` at once.

    Rows are (member, prompt) pairs, member-major (row = m * B + b); finished rows leave the batch.
    Matrices: ``x W^T`` over all active rows (one shared product), plus
    ``(sigma/sqrt r) (x B_m) A_m^T`` per member (batched over members, with finished rows as
    zeros: it is cheap); vectors: ``w + sigma eps_m`` per row's member.
    """

    def __init__(self, model, es: LowRankES, members: Sequence[Member]):
        cfg = model.config
        self.model = model
        self.eps = cfg.rms_norm_eps
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        rope = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        p0 = next(model.parameters())
        self.dtype, dev = p0.dtype, p0.device
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float, device=dev) / self.hd))
        self.M = len(members)
        r = es.rank
        index = {id(p): i for i, p in enumerate(es.params.params)}
        sig = torch.tensor([m.sign * es.config.sigma for m in members], dtype=torch.float32, device=dev)
        self.lr: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(weight) -> (A^T*s (M,r,out), B (M,in,r))
        self.vec: dict[int, torch.Tensor] = {}                       # id(weight) -> (M, n) perturbed vectors
        for p in model.parameters():
            i = index[id(p)]
            master = es.params.master[i]
            if p.dim() == 2:
                fa, fb = zip(*(lowrank_factors(p.shape, m.seed, i, r, dev, torch.float32) for m in members))
                a = torch.stack(fa) * (sig / math.sqrt(r))[:, None, None]       # (M, out, r)
                self.lr[id(p)] = (a.transpose(1, 2).to(self.dtype).contiguous(), torch.stack(fb).to(self.dtype))
            else:
                eps = torch.stack([noise_like(master, m.seed, i) for m in members])
                self.vec[id(p)] = (master.to(dev)[None] + sig.view(-1, *[1] * master.dim()) * eps).to(self.dtype)
        self.embed = model.model.embed_tokens.weight
        self.head = model.lm_head.weight

    def _full(self, x):
        """Active rows (R, ...) -> all M*B rows, zeros for finished ones."""
        if x.shape[0] == self.M * self.B:
            return x
        full = x.new_zeros((self.M * self.B, *x.shape[1:]))
        full[self.rows] = x
        return full

    def _active(self, x):
        return x if x.shape[0] == self.rows.numel() else x[self.rows]

    def lin(self, x, w):
        """x: (R, T, in) -> (R, T, out), row with member m computing with W + sigma eps_m."""
        T = x.shape[1]
        y = torch.nn.functional.linear(x, w)
        at, b = self.lr[id(w)]
        full = self._full(x).reshape(self.M, self.B * T, -1)
        low = torch.bmm(torch.bmm(full, b), at).view(self.M * self.B, T, -1)
        return y + self._active(low)

    def norm(self, x, w):
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.vec[id(w)][self.mid][:, None, :] * xf.to(dt)

    def embed_tokens(self, tok):
        """tok: (R, T) token ids of the active rows -> (R, T, H)."""
        at, b = self.lr[id(self.embed)]            # at: (M, r, vocab), b: (M, H, r)
        T = tok.shape[1]
        rows_a = at[self.mid[:, None], :, tok]     # (R, T, r): row tok of A_m (scaled)
        full = self._full(rows_a).reshape(self.M, self.B * T, -1)
        low = torch.bmm(full, b.transpose(1, 2)).view(self.M * self.B, T, -1)
        return self.embed[tok] + self._active(low)

    def logits(self, h):
        return self.lin(self.norm(h, self.model.model.norm.weight), self.head)

    def _cos_sin(self, pos):
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    def layers(self, h, cos, sin, start, mask):
        from .generation import _rotate

        R, T, _ = h.shape
        rep = self.nh // self.nkv
        for i, layer in enumerate(self.model.model.layers):
            att = layer.self_attn
            x = self.norm(h, layer.input_layernorm.weight)
            q = self.lin(x, att.q_proj.weight).view(R, T, self.nh, self.hd).transpose(1, 2)
            k = self.lin(x, att.k_proj.weight).view(R, T, self.nkv, self.hd).transpose(1, 2)
            v = self.lin(x, att.v_proj.weight).view(R, T, self.nkv, self.hd).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.k[i][:, :, start:start + T] = k
            self.v[i][:, :, start:start + T] = v
            kk, vv = self.k[i][:, :, :start + T], self.v[i][:, :, :start + T]
            if T == 1:  # one query: plain matmuls beat the fused CPU kernel (as esnb.generation)
                w = torch.matmul(q.reshape(R, self.nkv, rep, self.hd), kk.transpose(-1, -2)) * self.hd ** -0.5
                w = w.masked_fill(~mask, float("-inf")).softmax(dim=-1)
                o = torch.matmul(w, vv).reshape(R, self.nh, 1, self.hd)
            else:
                if rep > 1:
                    kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
                o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            o = o.transpose(1, 2).reshape(R, T, self.nh * self.hd)
            h = h + self.lin(o, att.o_proj.weight)
            x = self.norm(h, layer.post_attention_layernorm.weight)
            g = self.lin(x, layer.mlp.gate_proj.weight)
            u = self.lin(x, layer.mlp.up_proj.weight)
            h = h + self.lin(torch.nn.functional.silu(g) * u, layer.mlp.down_proj.weight)
        return h

    def prefill(self, ids, attn, max_new):
        """ids, attn: (B, T) prompts shared by all members -> logits (M*B, vocab)."""
        B, T = ids.shape
        M, dev = self.M, ids.device
        self.B = B
        self.rows = torch.arange(M * B, device=dev)
        self.mid = self.rows // B
        total = T + max_new
        self.k = [torch.empty(M * B, self.nkv, total, self.hd, dtype=self.dtype, device=dev)
                  for _ in self.model.model.layers]
        self.v = [torch.empty_like(x) for x in self.k]
        self.valid = torch.zeros(M * B, total, dtype=torch.bool, device=dev)
        self.valid[:, :T] = attn.bool().repeat(M, 1)
        self.t = T
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0).repeat(M, 1)
        cos, sin = self._cos_sin(pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & self.valid[:, None, :T]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
        h = self.layers(self.embed_tokens(ids.repeat(M, 1)), cos, sin, 0, mask[:, None])
        self.pos = pos[:, -1:]
        return self.logits(h[:, -1:])[:, 0]

    def select(self, keep):
        """Keep the active rows at positions ``keep`` (finished rows stop costing compute)."""
        self.rows, self.mid = self.rows[keep], self.mid[keep]
        self.k = [x[keep] for x in self.k]
        self.v = [x[keep] for x in self.v]
        self.valid, self.pos = self.valid[keep], self.pos[keep]

    def step(self, tok):
        """tok: (R,) next tokens of the active rows -> logits (R, vocab)."""
        self.pos = self.pos + 1
        cos, sin = self._cos_sin(self.pos)
        self.valid[:, self.t] = True
        mask = self.valid[:, None, None, :self.t + 1]
        h = self.layers(self.embed_tokens(tok[:, None]), cos, sin, self.t, mask)
        self.t += 1
        return self.logits(h)[:, 0]


@torch.inference_mode()
def generate_population(es: LowRankES, members: Sequence[Member], model: Any, tokenizer: Any,
                        prompts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
                        threads: int | None = None) -> list[list[str]]:
    """Greedy completions of ``prompts`` for each member (a list per member), all members in one
    batched forward per token. Falls back to one member at a time for models the vectorized path
    does not cover. The model's weights must be the unperturbed ones (``es``'s master)."""
    prompts = list(prompts)
    if not members or not prompts:
        return [[] for _ in members]
    if not _plain_llama_ok(model):
        out = []
        for m in members:
            with es.perturbed(m):
                out.append(generate(model, tokenizer, prompts, max_new_tokens, stop_strings,
                                    batch_size=len(prompts), threads=threads))
        return out
    with cpu_threads(model, threads):
        device = next(model.parameters()).device
        eos = eos_ids(model, tokenizer)
        token_stops, text_stops = split_stops(tokenizer, stop_strings)
        ids, attn = encode_prompts(tokenizer, prompts, device)
        M, B = len(members), ids.shape[0]
        rows = M * B
        state = GreedyState(tokenizer, eos, token_stops, rows, max_new_tokens, device)
        dec = _PopLlama(model, es, members)
        logits = dec.prefill(ids, attn, max_new_tokens)
        for t in range(max_new_tokens):
            nxt = state.push(t, logits)
            if bool(state.done.all()) or t == max_new_tokens - 1:
                break
            alive = (~state.done).nonzero().flatten()
            if alive.numel() <= 0.75 * dec.rows.numel():  # drop finished rows
                dec.select(torch.searchsorted(dec.rows, alive))
            logits = torch.zeros((rows, logits.shape[-1]), dtype=logits.dtype, device=device)
            logits[dec.rows] = dec.step(nxt[dec.rows])
        texts = state.texts(tokenizer, text_stops)
    return [texts[m * B:(m + 1) * B] for m in range(M)]


def score_population(es: LowRankES, members: Sequence[Member], model: Any, tokenizer: Any, task: Any,
                     prompts: Sequence[str], items: Sequence[Any], max_new_tokens: int,
                     batch_size: int | None = None) -> tuple[list[float], list[float]]:
    """Mean reward and accuracy of each member over ``prompts`` (as :func:`esnb.finetune.score_members`),
    with ``batch_size`` members per batched forward (``None``: all at once)."""
    members = list(members)
    step = batch_size or len(members)
    rewards, accs = [], []
    for s in range(0, len(members), step):
        chunk = members[s:s + step]
        for texts in generate_population(es, chunk, model, tokenizer, prompts, max_new_tokens, task.stop_strings):
            scores = [task.score(c, it) for c, it in zip(texts, items)]
            rewards.append(float(np.mean([float(x["reward"]) for x in scores])))
            accs.append(float(np.mean([bool(x["correct"]) for x in scores])))
    return rewards, accs
