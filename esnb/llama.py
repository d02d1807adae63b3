"""One Llama-family forward for greedy decoding (Llama 1-3, SmolLM2, Qwen2/2.5), fed by a weight provider.

Hugging Face's forward costs a few milliseconds of Python per call whatever the model size; for the
tiny model that overhead *is* the cost of generation. :class:`LlamaDecoder` does the same math as
the Hugging Face forward (token for token, tests/test_generation.py, tests/test_population.py and
tests/test_lowrank.py, on the tiny model and on small random Qwen2 and Llama-3 configs): embedding,
RMSNorm, rotary attention (grouped-query, q/k/v biases) over a preallocated KV cache, SwiGLU MLP,
logits; one prefill of the prompts, then one step per new token; finished rows may leave between
steps (:meth:`LlamaDecoder.select`).

Where the weights come from is a *provider*:

* :class:`SharedWeights`: the model's own parameters (so in-place ES perturbations are seen), for
  :func:`esnb.generation.generate`;
* :class:`esnb.population.StackedWeights`: M members' perturbed copies, stacked into ``(M, ...)``
  tensors, every product a batched one;
* :class:`esnb.lowrank.LowRankWeights`: the model's weights plus each member's low-rank factors.

A provider with M members (``weights.members``) decodes M copies of the prompts, member-major (row
``m * B + b``). Providers subclass :class:`SharedWeights` and override the pieces that differ.

Speed, for decoding on a CPU: a step works on 2-D (rows, features) tensors (a linear on a 3-D
(rows, 1, features) input costs about twice as much at these sizes), small models get fused
q|k|v and gate|up matrices, rotary tables are built once per batch, the padding mask is an
additive bias built once, and the logits go into one reused buffer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["LlamaDecoder", "SharedWeights", "supported", "rope_type", "rms_normalize", "linear_t"]

LLAMA_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# rope types whose inverse frequencies are fixed (read from the model's rotary module); "dynamic"
# and friends change them with the sequence length and stay on the Hugging Face path
STATIC_ROPE = ("default", "linear", "llama3")

Linear = Any  # a provider's handle on one linear (or several side by side); only the provider reads it


def rope_type(cfg: Any) -> str:
    """The rope type a model config names (``"default"`` when it names none)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return "default"
    return str(rope.get("rope_type", rope.get("type", "default")))


def supported(model: Any) -> bool:
    """True when :class:`LlamaDecoder` covers ``model``: a Llama or Qwen2 causal LM with SiLU MLPs,
    full attention in every layer and a static rope (default, linear, llama3); biases allowed."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ not in LLAMA_MODELS or cfg is None:
        return False
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if getattr(rot, "inv_freq", None) is None:
        return False
    layer_types = getattr(cfg, "layer_types", None) or ()
    return (rope_type(cfg) in STATIC_ROPE and getattr(cfg, "hidden_act", "silu") == "silu"
            and getattr(cfg, "pretraining_tp", 1) == 1 and all(t == "full_attention" for t in layer_types))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` over its root mean square, computed in float32 and rounded back to ``x``'s dtype
    before any weight multiplies (as the Hugging Face norm does)."""
    dt = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dt)


def linear_t(mods: Sequence[Any], copy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W^T, bias)`` of one linear, or of several applied to the same input side by side.
    ``copy``: W^T as a contiguous (in, out) copy (a matrix product reads it about 10% faster at
    decoding sizes); otherwise a transposed view of the live weight (no memory)."""
    if len(mods) == 1 and not copy:
        return mods[0].weight.t(), mods[0].bias
    wt = torch.cat([m.weight for m in mods]).t().contiguous()
    if all(m.bias is None for m in mods):
        return wt, None
    return wt, torch.cat([m.bias if m.bias is not None else wt.new_zeros(m.weight.shape[0]) for m in mods])


class SharedWeights:
    """The model's own parameters as a :class:`LlamaDecoder` provider; linears are ``(W^T, bias)``.

    ``fuse``: concatenate the q/k/v and gate/up weights into one matrix each (one matrix product
    instead of three and two) and keep every matrix transposed and contiguous. That is a copy of
    the weights made per batch, worth it only for small models, where the per-product overhead
    dominates and the copy costs nothing (:func:`esnb.generation.generate` decides). Without it
    the decoder reads the live weights.

    Subclasses (the population providers) override :meth:`param` and :meth:`linear` (how weights
    are held) and the arithmetic that reads them (:meth:`lin`, :meth:`lin_add`, :meth:`norm`,
    :meth:`embed`, :meth:`logits`), plus :meth:`start` / :meth:`select` for row bookkeeping.
    """

    members = 1

    def __init__(self, model: Any, fuse: bool = False):
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.fuse = bool(fuse)
        rot = model.model.rotary_emb
        self.inv_freq = rot.inv_freq.float()
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
        embed = model.model.embed_tokens.weight
        self.dtype, self.device = embed.dtype, embed.device
        self.head = self.linear([model.lm_head])
        self.layers = [self.layer(layer) for layer in model.model.layers]
        self.table = self.param(embed)
        self.final_norm = self.param(model.model.norm.weight)
        # F.rms_norm is one kernel and equals the Hugging Face norm in float32; narrower dtypes
        # keep the explicit formula (it rounds the normalised value before the weight multiply)
        self.fused_norm = self.dtype == torch.float32 and hasattr(F, "rms_norm")

    def layer(self, layer: Any) -> dict:
        """One decoder layer's weights: norms ``ln1``/``ln2``, linears ``o``/``down`` and the
        lists ``qkv``/``gu`` (one fused linear, or one per projection)."""
        att, mlp = layer.self_attn, layer.mlp
        groups = ([att.q_proj, att.k_proj, att.v_proj], [mlp.gate_proj, mlp.up_proj])
        qkv, gu = ([self.linear(g)] if self.fuse else [self.linear([m]) for m in g] for g in groups)
        return {"ln1": self.param(layer.input_layernorm.weight),
                "ln2": self.param(layer.post_attention_layernorm.weight),
                "o": self.linear([att.o_proj]), "down": self.linear([mlp.down_proj]), "qkv": qkv, "gu": gu}

    def param(self, p: torch.Tensor) -> Any:
        """A parameter that is not a linear (embedding table, norm weight), as :meth:`embed` and
        :meth:`norm` read it."""
        return p

    def linear(self, mods: Sequence[Any]) -> Linear:
        """The linears ``mods`` side by side, as :meth:`lin` reads them."""
        return linear_t(mods, self.fuse)

    def start(self, batch: int) -> None:
        """A new decode of ``batch`` prompts (per member) begins."""
        self._buf = torch.empty(self.members * batch, self.head[0].shape[-1], dtype=self.dtype, device=self.device)

    def select(self, keep: torch.Tensor) -> None:
        """Only the rows at positions ``keep`` go on (see :meth:`LlamaDecoder.select`)."""

    def lin(self, x: torch.Tensor, wb: Linear) -> torch.Tensor:
        """``x W^T + b`` for 2-D ``x``."""
        if wb[1] is None:
            return torch.mm(x, wb[0])
        return torch.addmm(wb[1], x, wb[0])

    def lin_add(self, h: torch.Tensor, x: torch.Tensor, wb: Linear) -> torch.Tensor:
        """``h + lin(x)``, in one matrix product where it can (the residual rides in as the addend)."""
        if wb[1] is not None:
            return h + self.lin(x, wb)
        return torch.addmm(h, x, wb[0])

    def norm(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        """RMSNorm of the rows of ``x`` with the norm weight ``w`` (as :meth:`param` holds it)."""
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * rms_normalize(x, self.eps)

    def embed(self, tok: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids ``tok`` (rows, or rows x positions), shaped ``(*tok.shape, hidden)``."""
        return self.table[tok]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final-normed rows ``x``, in a buffer reused from step to step."""
        out = self._buf[:x.shape[0]]
        if self.head[1] is None:
            return torch.mm(x, self.head[0], out=out)
        return torch.addmm(self.head[1], x, self.head[0], out=out)


class LlamaDecoder:
    """Greedy decoding of a Llama-family model (see :func:`supported`) from ``weights`` (a
    provider; default: the model's own, unfused) with a preallocated KV cache.

    :meth:`prefill` the prompts, then :meth:`step` one token per row at a time. Rows may be dropped
    between steps (:meth:`select`); ``rows`` then says which of the prefilled rows each remaining
    position holds (``None``: all, in order).
    """

    def __init__(self, model: Any, weights: SharedWeights | None = None):
        cfg = model.config
        self.w = weights if weights is not None else SharedWeights(model)
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.rep = self.nh // self.nkv
        self.scale = self.hd ** -0.5
        self.nq, self.nk = self.nh * self.hd, self.nkv * self.hd
        self.inter = cfg.intermediate_size
        self.rows: torch.Tensor | None = None

    def _proj(self, x, pieces, sizes):
        """Outputs of a fused (or unfused) group of linears, split into ``sizes``."""
        if len(pieces) == 1:
            return self.w.lin(x, pieces[0]).split(sizes, dim=-1)
        return [self.w.lin(x, wb) for wb in pieces]

    def _rope(self, x, cos, sin):
        # x * cos + rotate_half(x) * sin, with rotate_half's sign folded into the sin table
        # (bit-identical: negation is exact)
        return x * cos + x.roll(self.hd // 2, dims=-1) * sin

    def _mlp_act(self, x, w):
        g, u = self._proj(x, w["gu"], [self.inter, self.inter])
        return F.silu(g) * u

    def _tables(self, total):
        """cos and sign-folded sin tables for positions 0..total-1 (as the model's rotary module)."""
        pos = torch.arange(total, device=self.w.device).float()
        freqs = pos[:, None] * self.w.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.w.rope_scale).to(self.w.dtype)
        sin = (emb.sin() * self.w.rope_scale).to(self.w.dtype)
        half = self.hd // 2
        self.cos_tab, self.sin_tab = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def _logits(self, h):
        return self.w.logits(self.w.norm(h, self.w.final_norm))

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor, max_new: int) -> torch.Tensor:
        """Left-padded prompts ``(B, t)`` and their attention mask, the same for every member ->
        logits of their last position, ``(members * B, vocab)``, member-major."""
        if self.w.members > 1:
            ids, attn = ids.repeat(self.w.members, 1), attn.repeat(self.w.members, 1)
        self.w.start(ids.shape[0] // self.w.members)
        b, t = ids.shape
        total = t + max_new
        dev = ids.device
        self._tables(total)
        self.k = [torch.empty(b, self.nkv, total, self.hd, dtype=self.w.dtype, device=dev) for _ in self.w.layers]
        self.v = [torch.empty_like(x) for x in self.k]
        # additive attention bias: -inf on left padding, 0 on real tokens and everything generated
        self.bias = torch.zeros(b, total, dtype=self.w.dtype, device=dev)
        self.bias[:, :t].masked_fill_(~attn.bool(), float("-inf"))
        self.t = t
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.cos_tab[pos][:, :, None], self.sin_tab[pos][:, :, None]   # (b, t, 1, hd)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        # padding rows attend to themselves only (their output is never used; this avoids NaN)
        mask = ((causal[None] & attn.bool()[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)[None])[:, None]
        h = self.w.embed(ids).reshape(b * t, -1)
        for i, w in enumerate(self.w.layers):
            q, k, v = self._proj(self.w.norm(h, w["ln1"]), w["qkv"], [self.nq, self.nk, self.nk])
            q = self._rope(q.reshape(b, t, self.nh, self.hd), cos, sin).transpose(1, 2)
            k = self._rope(k.reshape(b, t, self.nkv, self.hd), cos, sin).transpose(1, 2)
            v = v.reshape(b, t, self.nkv, self.hd).transpose(1, 2)
            self.k[i][:, :, :t] = k
            self.v[i][:, :, :t] = v
            if self.rep > 1:
                k, v = k.repeat_interleave(self.rep, dim=1), v.repeat_interleave(self.rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + self.w.lin(o.transpose(1, 2).reshape(b * t, self.nq), w["o"])
            h = h + self.w.lin(self._mlp_act(self.w.norm(h, w["ln2"]), w), w["down"])
        self.pos = pos[:, -1].clone()
        self.rows = None
        return self._logits(h.view(b, t, -1)[:, -1])

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the current positions ``keep`` (finished rows stop costing compute)."""
        self.k = [x[keep] for x in self.k]
        self.v = [x[keep] for x in self.v]
        self.bias, self.pos = self.bias[keep], self.pos[keep]
        self.rows = keep if self.rows is None else self.rows[keep]
        self.w.select(keep)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """The next tokens (one per current position) -> logits ``(positions, vocab)``."""
        self.pos += 1
        b, t = tok.shape[0], self.t
        cos, sin = self.cos_tab[self.pos][:, None], self.sin_tab[self.pos][:, None]   # (b, 1, hd)
        bias = self.bias[:, None, None, :t + 1]
        h = self.w.embed(tok).reshape(b, -1)
        for i, w in enumerate(self.w.layers):
            x = self.w.norm(h, w["ln1"])
            if len(w["qkv"]) == 1:  # fused: rotate q and k in one go (they sit side by side)
                qkv = self.w.lin(x, w["qkv"][0])
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
            h = self.w.lin_add(h, o, w["o"])
            h = self.w.lin_add(h, self._mlp_act(self.w.norm(h, w["ln2"]), w), w["down"])
        self.t = t + 1
        return self._logits(h)
