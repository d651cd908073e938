"""Emu's Causal Transformer (`cformer`), written from Emu1/models/causal_former.py and the
T5 decoder it wraps (Emu1/models/modeling_t5.py), with the original state-dict key names.

    CausalFormer: 32 learned `causal_tokens` [1, 32, 768] -> T5 decoder stack (12 blocks) with
    causal self-attention (relative position bias in block 0, shared by all blocks) and
    cross-attention to the ViT tokens [B, 257, 1408] -> final RMSNorm -> `projection`
    Linear(768 -> 5120, bias) = the 32 rows the LLM reads.

Facts that decide agreement with the original (t5-base's config):
  - no 1/sqrt(d) scaling of the attention scores (Mesh-TensorFlow init folds it into q);
  - T5LayerNorm is an RMSNorm without bias, eps 1e-6, variance in fp32;
  - the bias buckets are unidirectional (decoder): 32 buckets, 16 exact, the rest log-spaced
    up to max_distance 128; the causal mask is added to the bias (HF extended mask);
  - cross-attention K/V read the 1408-wide ViT tokens (`config.encoder_width`), no bias;
  - the FFN is DenseReluDense (wi -> ReLU -> wo, no bias); dropout is off at inference.
Keys: cformer.block.N.layer.0.SelfAttention.{q,k,v,o}, .layer.0.layer_norm,
cformer.block.0.layer.0.SelfAttention.relative_attention_bias, .layer.1.EncDecAttention.{q,k,v,o},
.layer.1.layer_norm, .layer.2.DenseReluDense.{wi,wo}, .layer.2.layer_norm, cformer.final_layer_norm,
cformer.embed_tokens (unused: the queries are not token ids), causal_tokens, projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CFormerConfig:
    d_model: int = 768              # t5-base
    d_kv: int = 64
    num_heads: int = 12
    d_ff: int = 3072
    num_layers: int = 12
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    encoder_width: int = 1408       # EVA-CLIP-g
    n_causal: int = 32
    output_dim: int = 5120          # LLaMA-13B
    vocab_size: int = 32128         # t5-base's (only the unused embed_tokens has it)

    @classmethod
    def from_state(cls, sd: dict, prefix: str = "cformer.") -> "CFormerConfig":
        """Every size from the tensors' shapes (heads from the relative-bias table)."""
        p = prefix + "cformer."
        buckets, heads = sd[p + "block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        inner, d_model = sd[p + "block.0.layer.0.SelfAttention.q.weight"].shape
        layers = 1 + max(int(k[len(p + "block."):].split(".")[0]) for k in sd if k.startswith(p + "block."))
        out_dim = sd[prefix + "projection.weight"].shape[0]
        emb = sd.get(p + "embed_tokens.weight")
        return cls(d_model=d_model, d_kv=inner // heads, num_heads=heads,
                   d_ff=sd[p + "block.0.layer.2.DenseReluDense.wi.weight"].shape[0], num_layers=layers,
                   num_buckets=buckets, encoder_width=sd[p + "block.0.layer.1.EncDecAttention.k.weight"].shape[1],
                   n_causal=sd[prefix + "causal_tokens"].shape[1], output_dim=out_dim,
                   vocab_size=emb.shape[0] if emb is not None else cls.vocab_size)


class T5LayerNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight; no mean subtraction, no bias."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def relative_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Unidirectional T5 buckets of (key - query): future positions fold into bucket 0, the
    first num_buckets/2 distances are exact, the rest log-spaced up to max_distance."""
    distance = -torch.clamp(relative, max=0)                                   # >= 0: how far back
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(distance.float().clamp(min=1) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: CFormerConfig, kv_width: int, relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(kv_width, inner, bias=False)
        self.v = nn.Linear(kv_width, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def compute_bias(self, n_q: int, n_k: int) -> torch.Tensor:
        """[1, H, n_q, n_k] bias from the bucket of (key position - query position)."""
        relative = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None]     # [n_q, n_k]
        buckets = relative_bucket(relative, self.cfg.num_buckets, self.cfg.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, kv, bias):
        b, n_q, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.d_kv
        q = self.q(x).view(b, n_q, h, d).transpose(1, 2)                       # [B, Q, H*d] -> [B, H, Q, d]
        k = self.k(kv).view(b, kv.shape[1], h, d).transpose(1, 2)              # [B, K, H*d] -> [B, H, K, d]
        v = self.v(kv).view(b, kv.shape[1], h, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(3, 2)) + bias                      # no 1/sqrt(d): T5
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, n_q, h * d)  # [B, H, Q, d] -> [B, Q, H*d]
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: CFormerConfig, relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, cfg.d_model, relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x, bias):
        y = self.layer_norm(x)
        return x + self.SelfAttention(y, y, bias)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: CFormerConfig):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, cfg.encoder_width, relative_bias=False)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x, encoder_states):
        return x + self.EncDecAttention(self.layer_norm(x), encoder_states, 0.0)


class T5DenseReluDense(nn.Module):
    def __init__(self, cfg: CFormerConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: CFormerConfig):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: CFormerConfig, relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, relative_bias), T5LayerCrossAttention(cfg),
                                    T5LayerFF(cfg)])

    def forward(self, x, bias, encoder_states):
        x = self.layer[0](x, bias)
        x = self.layer[1](x, encoder_states)
        return self.layer[2](x)


class T5Decoder(nn.Module):
    """The decoder stack: the bias of block 0 (plus the causal mask) is used by every block."""

    def __init__(self, cfg: CFormerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)      # in the checkpoint, never used
        self.block = nn.ModuleList([T5Block(cfg, relative_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, queries, encoder_states):
        n = queries.shape[1]
        attention = self.block[0].layer[0].SelfAttention
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        # HF's extended mask: (1 - mask) * finfo.min added to the bias
        mask = (~causal).to(queries.dtype) * torch.finfo(queries.dtype).min
        bias = attention.compute_bias(n, n) + mask                              # [1, H, n, n]
        x = queries
        for block in self.block:
            x = block(x, bias, encoder_states)
        return self.final_layer_norm(x)


class CausalFormer(nn.Module):
    """ln_visual output [B, 257, 1408] -> [B, 32, 768] (`projection` is the bundle's projector)."""

    def __init__(self, cfg: CFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.cformer = T5Decoder(cfg)
        self.causal_tokens = nn.Parameter(torch.zeros(1, cfg.n_causal, cfg.d_model))
        self.projection = nn.Linear(cfg.d_model, cfg.output_dim)

    def forward(self, image_embeds):
        queries = self.causal_tokens.expand(image_embeds.shape[0], -1, -1)    # [1, 32, D] -> [B, 32, D]
        return self.cformer(queries, image_embeds)

    def project(self, image_embeds):
        return self.projection(self.forward(image_embeds))                     # [B, 32, D] -> [B, 32, n_embd]
