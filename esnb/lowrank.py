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
* :class:`LowRankWeights` -- the members as base weights plus factors, for the one Llama-family
  forward :class:`esnb.llama.LlamaDecoder`;
* :func:`generate_population` -- greedy generation for many members in one batched forward
  (plain Llama models, e.g. the tiny LM and SmolLM2; Qwen2 and rope scaling on request);
* :func:`score_population` -- mean reward and accuracy per member, the drop-in for
  :func:`esnb.finetune.score_members`.

What is left out: by default the vectorized path handles ``LlamaForCausalLM`` with default RoPE and
no biases (others go one member at a time unless ``factored=True``), stop strings longer than one token are only
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
from .generation import GreedyState, cpu_threads, decode_greedy, encode_prompts, eos_ids, generate, split_stops
from .llama import LlamaDecoder, SharedWeights, rms_normalize, rope_type, supported
from .noise import noise_like, stream_seed, thread_generator

__all__ = ["LowRankES", "LowRankWeights", "lowrank_factors", "lowrank_noise", "generate_population",
           "score_population", "replay"]


def lowrank_factors(shape: Sequence[int], seed: int, index: int, rank: int, device: Any = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a matrix of ``shape = (out, in)``, a pure function of (seed, tensor index, rank):
    A is out x r, B is in x r, both standard Gaussian."""
    out_f, in_f = int(shape[0]), int(shape[1])
    gen = thread_generator(torch.device(device))
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


class LowRankWeights(SharedWeights):
    """The model's weights shared by M low-rank members: a :class:`esnb.llama.LlamaDecoder` provider.

    Rows are member-major (row = m * B + b) and finished rows leave the batch. Matrices: ``x W^T``
    over all active rows (one shared product with the live weight), plus
    ``(sigma/sqrt r) (x B_m) A_m^T`` per member (batched over members, with finished rows as
    zeros: it is cheap); vectors (norm weights, biases): ``w + sigma eps_m`` per row's member.
    """

    def __init__(self, model: Any, es: LowRankES, members: Sequence[Member]):
        cfg = model.config
        self.members, self._rank = len(members), es.rank
        self._es, self._member_list = es, list(members)
        self._index = {id(p): i for i, p in enumerate(es.params.params)}
        dev = next(model.parameters()).device
        self._sig = torch.tensor([m.sign * es.config.sigma for m in members], dtype=torch.float32, device=dev)
        self._cache: dict[int, Any] = {}
        super().__init__(model, fuse=False)
        if rope_type(cfg) == "default":
            # float32 frequencies from rope_theta, as this decoder has always computed them: the same
            # as the rotary module's in float32; a bf16 model holds them rounded to bf16 (what
            # Hugging Face uses), and switching would change bf16 low-rank completions
            rope = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
            theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=dev) / hd))

    def param(self, p: torch.Tensor) -> Any:
        """A matrix: ``(p, A^T * sigma/sqrt r (M, r, out), B (M, in, r))``; a vector: the members'
        perturbed copies ``(M, n)``. Built once per parameter (tied weights share them)."""
        if id(p) in self._cache:
            return self._cache[id(p)]
        i, r, dev = self._index[id(p)], self._rank, self._sig.device
        master = self._es.params.master[i]
        if p.dim() == 2:
            fa, fb = zip(*(lowrank_factors(p.shape, m.seed, i, r, dev, torch.float32) for m in self._member_list))
            a = torch.stack(fa) * (self._sig / math.sqrt(r))[:, None, None]       # (M, out, r)
            out = (p, a.transpose(1, 2).to(self.dtype).contiguous(), torch.stack(fb).to(self.dtype))
        else:
            eps = torch.stack([noise_like(master, m.seed, i) for m in self._member_list])
            out = (master.to(dev)[None] + self._sig.view(-1, *[1] * master.dim()) * eps).to(self.dtype)
        self._cache[id(p)] = out
        return out

    def linear(self, mods: Sequence[Any]) -> tuple:
        """``(W^T, perturbed biases or None, A^T * sigma/sqrt r, B)`` of one linear."""
        (mod,) = mods
        _, at, b = self.param(mod.weight)
        return mod.weight.t(), None if mod.bias is None else self.param(mod.bias), at, b

    def start(self, batch: int) -> None:
        self.batch = batch
        self.rows = torch.arange(self.members * batch, device=self.device)  # positions among all M * B rows
        self.mid = self.rows // batch

    def select(self, keep: torch.Tensor) -> None:
        self.rows, self.mid = self.rows[keep], self.mid[keep]

    def _full(self, x):
        """Active rows (R, ...) -> all M*B rows, zeros for finished ones."""
        if x.shape[0] == self.members * self.batch:
            return x
        full = x.new_zeros((self.members * self.batch, *x.shape[1:]))
        full[self.rows] = x
        return full

    def _active(self, x):
        return x if x.shape[0] == self.rows.numel() else x[self.rows]

    def _low(self, x3, b, at):
        """``(x B_m) A_m^T`` of the active rows ``x3`` (R, T, in) -> (R, T, out)."""
        T = x3.shape[1]
        full = self._full(x3).reshape(self.members, self.batch * T, -1)
        return self._active(torch.bmm(torch.bmm(full, b), at).view(self.members * self.batch, T, -1))

    def lin(self, x, wb):
        wt, bias, at, b = wb
        x3 = x.reshape(self.rows.numel(), -1, x.shape[-1])   # (R, T, in): T positions per row
        y = torch.mm(x, wt).view(*x3.shape[:2], -1) + self._low(x3, b, at)
        if bias is not None:
            y = y + bias[self.mid][:, None]
        return y.view(x.shape[0], -1)

    def lin_add(self, h, x, wb):
        return h + self.lin(x, wb)

    def norm(self, x, w):
        xn = rms_normalize(x, self.eps).view(self.rows.numel(), -1, x.shape[-1])   # (R, T, hidden)
        return (w[self.mid][:, None, :] * xn).view(x.shape)

    def embed(self, tok):
        w, at, b = self.table                    # at: (M, r, vocab), b: (M, H, r)
        tok = tok.reshape(self.rows.numel(), -1)  # (R, T)
        T = tok.shape[1]
        rows_a = at[self.mid[:, None], :, tok]   # (R, T, r): row tok of A_m (scaled)
        full = self._full(rows_a).reshape(self.members, self.batch * T, -1)
        low = torch.bmm(full, b.transpose(1, 2)).view(self.members * self.batch, T, -1)
        return w[tok] + self._active(low)

    def logits(self, x):
        return self.lin(x, self.head)


def lowrank_covers(model: Any) -> bool:
    """True when :func:`generate_population` decodes ``model``'s members together by default:
    plain Llama (default rope, no biases), the models it has always served so; others go one
    member at a time unless ``factored=True``."""
    cfg = getattr(model, "config", None)
    return (type(model).__name__ == "LlamaForCausalLM" and supported(model)
            and rope_type(cfg) == "default" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False))


def lowrank_decoder(model: Any, es: LowRankES, members: Sequence[Member]) -> LlamaDecoder:
    """A :class:`esnb.llama.LlamaDecoder` of ``members``, each as base weights plus its low-rank factors."""
    return LlamaDecoder(model, LowRankWeights(model, es, members))


@torch.inference_mode()
def generate_population(es: LowRankES, members: Sequence[Member], model: Any, tokenizer: Any,
                        prompts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
                        threads: int | None = None, factored: bool | None = None) -> list[list[str]]:
    """Greedy completions of ``prompts`` for each member (a list per member), all members in one
    batched forward per token. The model's weights must be the unperturbed ones (``es``'s master).

    ``factored``: decode the members as base weights plus factors. ``None`` (default) does so for
    plain Llama models (:func:`lowrank_covers`) and decodes one member at a time (materialized
    weights, :func:`esnb.generation.generate`) otherwise; ``True`` for any model
    :func:`esnb.llama.supported` covers (Qwen2 and rope scaling included); ``False`` never."""
    prompts = list(prompts)
    if not members or not prompts:
        return [[] for _ in members]
    if not (lowrank_covers(model) if factored is None else factored and supported(model)):
        out = []
        for m in members:
            with es.perturbed(m):
                out.append(generate(model, tokenizer, prompts, max_new_tokens, stop_strings,
                                    batch_size=len(prompts), threads=threads))
        return out
    with cpu_threads(model, threads):
        device = next(model.parameters()).device
        token_stops, text_stops = split_stops(tokenizer, stop_strings)
        ids, attn = encode_prompts(tokenizer, prompts, device)
        M, B = len(members), ids.shape[0]
        state = GreedyState(tokenizer, eos_ids(model, tokenizer), token_stops, M * B, max_new_tokens, device)
        # multi-token stop strings cut the texts afterwards only: rows run on to EOS or the cap
        decode_greedy(lowrank_decoder(model, es, members), state, ids, attn, max_new_tokens)
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
