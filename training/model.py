"""A small XLM-R-style encoder trained with masked language modelling.

Layout follows XLM-R (RoBERTa): token + learned position embeddings, LayerNorm,
N post-LN transformer layers (attention -> add -> LayerNorm, GELU MLP -> add ->
LayerNorm), and an MLM head (dense, GELU, LayerNorm) whose output projection is
tied to the token embeddings. Token type embeddings are left out: every input is
a single sentence.

Attention runs through xformers' memory-efficient kernel when xformers and a CUDA
device are present (as in the paper), otherwise through torch's
scaled_dot_product_attention. `reference_attention` is the plain softmax(QK^T)V
both are checked against.

Structured cross-lingual attention (Foroutan et al. 2023, "Breaking the Language
Barrier", arXiv 2310.15258) is an option, off by default (`CrossLingualAttentionConfig`):
given per-token language ids, a second query projection Q_cross scores the
cross-language pairs, and structured attention dropout removes cross-language pairs
from Q's attention while training. It runs as `structured_attention`, plain torch ops:
the sum of two masked exponentials is not a fused kernel's attention. With the
options off, or without language ids, the encoder runs exactly the code above.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.config import CrossLingualAttentionConfig, TrainingConfig

ATTENTION_BACKENDS = ("xformers", "sdpa", "reference")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def default_attention_backend() -> str:
    return "xformers" if xformers_available() else "sdpa"


def reference_attention(q, k, v, key_padding_mask, dropout_p=0.0):
    """q, k, v: [batch, heads, time, head_dim]; key_padding_mask: [batch, time], True = real token."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return weights @ v


def sdpa_attention(q, k, v, key_padding_mask, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :], dropout_p=dropout_p)


def xformers_attention(q, k, v, key_padding_mask, dropout_p=0.0):
    import xformers.ops as xops

    batch, heads, time, _ = q.shape
    # xformers wants [batch, time, heads, head_dim] and an additive bias for padding.
    bias = torch.zeros(batch, heads, time, time, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
    )
    return out.transpose(1, 2)


_ATTENTION = {"xformers": xformers_attention, "sdpa": sdpa_attention, "reference": reference_attention}


def cross_lingual_masks(
    language_ids: torch.Tensor, settings: CrossLingualAttentionConfig, training: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M1, M2): the (query, key) pairs that Q and Q_cross attend, boolean [batch, query, key].

    As in the paper's code (its `get_mono_attention_mask` / `get_cross_lingual_attention_mask`
    and the sum of exponentials in its `SelfAttention`), with `p = cross_dropout` (its
    1 - mono_alpha) and `q = cross_query_overlap` (its cross_alpha):
    - M1 (Q) holds every pair, except that while training each cross-language pair leaves it
      with probability p: structured attention dropout. Pairs in the first token's row or
      column never leave (the first token is the bridge between the languages). In eval mode
      M1 holds every pair, as dropout is off (the paper evaluates with mono_alpha = 1).
    - M2 (Q_cross; None without `cross_query`) holds the cross-language pairs and, while
      training, each same-language pair of a code-switched sequence with probability q.
    With p = 1 and q = 0 the masks split the pairs while training: Q scores the same-language
    ones, Q_cross the cross-language ones. With p < 1 or q > 0 they overlap at random, the
    paper's interfering variant (its Figure 3, right), and a pair in both masks gets both
    scores' exponentials. Two departures from the paper's code: the first token's
    same-language pairs are not in M2, and a one-language sequence has an empty M2 (the
    paper switches Q_cross off for one-language batches), so Q_cross learns from
    cross-language pairs only when q = 0 and from code-switched sequences only otherwise.
    """
    time = language_ids.shape[1]
    cross = language_ids[:, :, None] != language_ids[:, None, :]
    m1 = torch.ones_like(cross)
    if training and settings.cross_dropout > 0:
        first = torch.zeros(time, time, dtype=torch.bool, device=language_ids.device)
        first[0, :] = first[:, 0] = True
        dropped = torch.rand(cross.shape, device=language_ids.device) < settings.cross_dropout
        m1 = ~(cross & ~first & dropped)
    if not settings.cross_query:
        return m1, None
    m2 = cross
    if training and settings.cross_query_overlap > 0:
        code_switched = cross.flatten(1).any(dim=1)[:, None, None]
        joined = torch.rand(cross.shape, device=language_ids.device) < settings.cross_query_overlap
        m2 = cross | (code_switched & joined)
    return m1, m2


def structured_attention(q, q_cross, k, v, key_padding_mask, m1, m2, dropout_p=0.0):
    """Attention weights proportional to M1 * exp(q.k / sqrt(d)) + M2 * exp(q_cross.k / sqrt(d)).

    q, q_cross, k, v: [batch, heads, time, head_dim]; m1, m2: [batch, time, time] boolean, shared
    by the heads; q_cross and m2 are None for one query restricted to M1.
    """
    keys = key_padding_mask[:, None, None, :]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~(m1[:, None] & keys), float("-inf"))
    if q_cross is None:
        weights = scores.softmax(dim=-1)
    else:
        cross_scores = q_cross @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        cross_scores = cross_scores.masked_fill(~(m2[:, None] & keys), float("-inf"))
        # One softmax over both score sets: each key's weight sums its exponentials in M1 and M2.
        both = torch.cat([scores, cross_scores], dim=-1).softmax(dim=-1)
        weights = both[..., : k.shape[2]] + both[..., k.shape[2] :]
    return F.dropout(weights, p=dropout_p) @ v


class SelfAttention(nn.Module):
    def __init__(self, config: TrainingConfig, backend: str, cross_lingual: CrossLingualAttentionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        if cross_lingual.cross_query:
            self.query_cross = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout
        self.attend = _ATTENTION[backend]

    def forward(self, x, key_padding_mask, masks=None):
        """`masks`: (M1, M2) from `cross_lingual_masks`, or None for plain attention."""
        batch, time, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.num_heads, hidden // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if masks is None:
            y = self.attend(q, k, v, key_padding_mask, dropout)
        else:
            m1, m2 = masks
            q_cross = None
            if m2 is not None:
                heads = (batch, time, self.num_heads, hidden // self.num_heads)
                q_cross = self.query_cross(x).view(heads).transpose(1, 2)
            y = structured_attention(q, q_cross, k, v, key_padding_mask, m1, m2, dropout)
        return self.out(y.transpose(1, 2).reshape(batch, time, hidden))


class EncoderLayer(nn.Module):
    def __init__(self, config: TrainingConfig, backend: str, cross_lingual: CrossLingualAttentionConfig):
        super().__init__()
        self.attention = SelfAttention(config, backend, cross_lingual)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_padding_mask, masks=None):
        # Post-LN, as in XLM-R: normalise after each residual addition.
        x = self.attention_norm(x + self.dropout(self.attention(x, key_padding_mask, masks)))
        return self.mlp_norm(x + self.dropout(self.fc_out(F.gelu(self.fc_in(x)))))


class MaskedLMEncoder(nn.Module):
    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int,
        pad_id: int,
        attention_backend: str | None = None,
        cross_lingual: CrossLingualAttentionConfig | None = None,
    ):
        super().__init__()
        backend = attention_backend or default_attention_backend()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
        self.attention_backend = backend
        self.pad_id = pad_id
        self.cross_lingual = cross_lingual or CrossLingualAttentionConfig()
        self.token_embedding = nn.Embedding(vocab_size, config.hidden_size, padding_idx=pad_id)
        self.position_embedding = nn.Embedding(config.max_length, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config, backend, self.cross_lingual) for _ in range(config.num_layers))
        self.head_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.head_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # BERT/XLM-R initialisation: N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def copy_query_to_cross_query(self) -> None:
        """Start every Q_cross as its layer's Q, e.g. after loading an encoder trained without one."""
        with torch.no_grad():
            for layer in self.layers:
                attention, hidden = layer.attention, layer.attention.out.in_features
                attention.query_cross.weight.copy_(attention.qkv.weight[:hidden])
                attention.query_cross.bias.copy_(attention.qkv.bias[:hidden])

    def encode(self, input_ids: torch.Tensor, language_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, time] token ids -> [batch, time, hidden] final hidden states.

        `language_ids` ([batch, time], any integer coding) matter only with the cross-lingual
        options on; without them every sequence is one language, where the options change nothing.
        """
        masks = None
        if language_ids is not None and self.cross_lingual.enabled:
            if language_ids.shape != input_ids.shape:
                raise ValueError(
                    f"language_ids {tuple(language_ids.shape)} must match input_ids {tuple(input_ids.shape)}"
                )
            masks = cross_lingual_masks(language_ids, self.cross_lingual, self.training)
        key_padding_mask = input_ids != self.pad_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        x = self.dropout(self.embedding_norm(x))
        for layer in self.layers:
            x = layer(x, key_padding_mask, masks)
        return x

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, language_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy over the positions whose label is not -100."""
        hidden = self.encode(input_ids, language_ids)
        # Project only the masked positions: the vocabulary projection dominates the cost.
        selected = labels != -100
        h = self.head_norm(F.gelu(self.head_dense(hidden[selected])))
        logits = h @ self.token_embedding.weight.T + self.head_bias
        return F.cross_entropy(logits, labels[selected], reduction="mean")

    def loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """(summed cross-entropy, number of predicted tokens): lets evaluation average over tokens."""
        count = int((labels != -100).sum())
        return float(self(input_ids, labels)) * count, count
