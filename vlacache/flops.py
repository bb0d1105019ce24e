"""Analytic FLOPs of the decoder (2 FLOPs per multiply-accumulate), by kept tokens and attended keys."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    """The sizes FLOPs depend on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    mlp_matrices: int = 3

    @classmethod
    def from_config(cls, config) -> "DecoderDims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
        )


def layer_flops(dims: DecoderDims, queries: int, keys: int) -> float:
    """One decoder layer: projections and MLP for `queries` rows, attention as queries x keys."""
    d, hd = dims.hidden, dims.head_dim
    projections = 2 * queries * d * (2 * dims.heads * hd + 2 * dims.kv_heads * hd)
    attention = 2 * 2 * queries * keys * dims.heads * hd
    mlp = 2 * queries * d * dims.intermediate * dims.mlp_matrices
    return float(projections + attention + mlp)


def prefill_flops(dims: DecoderDims, tokens_per_layer: list[int], length: int, logit_rows: int = 1) -> float:
    """A prefill where layer l computes tokens_per_layer[l] query rows against all `length` keys."""
    body = sum(layer_flops(dims, n, length) for n in tokens_per_layer)
    return body + 2.0 * logit_rows * dims.hidden * dims.vocab


def decode_flops(dims: DecoderDims, passes: int, prompt_length: int) -> float:
    """`passes` single-token decoder passes after a prompt of `prompt_length` tokens."""
    total = 0.0
    for i in range(passes):
        total += dims.layers * layer_flops(dims, 1, prompt_length + i + 1) + 2.0 * dims.hidden * dims.vocab
    return total


def linear_flops(module, rows: int) -> float:
    """2 x MACs of every nn.Linear inside `module`, each applied to `rows` rows."""
    from torch import nn

    return float(sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def attention_flops(queries: int, keys: int, width: int) -> float:
    """QK^T and AV of one attention layer of total width `width`."""
    return 4.0 * queries * keys * width
