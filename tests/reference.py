"""An independent reference for the cache engine: a plain-torch Llama forward written from the math.

Full compute of every position at every layer, except that after each layer computes its keys/values the rows
listed as reused at that layer are overwritten with the previous step's keys/values. It shares no code with
the engine or with transformers' modeling code, only the weights.
"""

from __future__ import annotations

import torch


def _rms(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _theta(config):
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = config.rope_parameters["rope_theta"]
    return theta


def _rope(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _attend(q, k, v, q_pos, k_pos, causal, record=None, excluded=None):
    scores = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    if excluded is not None:  # [B, n_keys]: keys no query may attend to (dropped tokens)
        scores = scores.masked_fill(excluded[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    if record is not None:
        record.append(probs)
    return (probs @ v.float()).to(q.dtype)


def reference_forward(lm, embeds, positions, **options):
    """Run the causal LM `lm` (LlamaForCausalLM weights) on `embeds` [B, n, D] at `positions` [n] through every
    layer (`reference_layers`, its options), the final norm and the head. Returns logits [B, n, V], per-layer
    (k, v), hidden."""
    x, kvs = reference_layers(lm, embeds, positions, **options)
    x = _rms(x, lm.model.norm.weight, lm.config.rms_norm_eps)
    return x @ lm.lm_head.weight.T, kvs, x


def reference_layers(lm, embeds, positions, layers=None, past=None, reused=None, previous_kv=None, causal=True,
                     attentions=None, dropped=None):
    """Run decoder layers `layers` (indices, ascending; default all) of `lm` on `embeds` [B, n, D] at `positions` [n].

    past: per-layer (k, v) of earlier positions to attend to (decode). reused: per-layer LongTensor [B, m]
    positions whose k/v are overwritten by previous_kv[l]. attentions: a list that receives each layer's
    attention probabilities [B, H, n, n_keys]. dropped: per layer None or a bool [B, P] of the first P key
    positions no query may attend to at that layer (tokens dropped from the sequence). Returns the hidden states
    after the last of `layers` (before the final norm) and the run layers' (k, v).
    """
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    theta = _theta(cfg)
    x = embeds
    batch, n, _ = x.shape
    kvs = []
    for index in layers if layers is not None else range(len(lm.model.layers)):
        layer = lm.model.layers[index]
        attn = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = (h @ attn.q_proj.weight.T).view(batch, n, heads, d).transpose(1, 2)
        k = (h @ attn.k_proj.weight.T).view(batch, n, kv_heads, d).transpose(1, 2)
        v = (h @ attn.v_proj.weight.T).view(batch, n, kv_heads, d).transpose(1, 2)
        q, k = _rope(q, positions, theta), _rope(k, positions, theta)
        if reused is not None and reused[index].shape[1]:
            k, v = k.clone(), v.clone()
            pk, pv = previous_kv[index]
            for b in range(batch):
                rows = reused[index][b]
                k[b, :, rows] = pk[b, :, rows]
                v[b, :, rows] = pv[b, :, rows]
        if past is not None:
            k = torch.cat([past[index][0], k], 2)
            v = torch.cat([past[index][1], v], 2)
        kvs.append((k, v))
        rep = heads // kv_heads
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        k_pos = torch.arange(k.shape[2])
        excluded = None
        if dropped is not None and dropped[index] is not None:
            excluded = torch.zeros(batch, k.shape[2], dtype=torch.bool)
            excluded[:, : dropped[index].shape[1]] = dropped[index]
        out = _attend(q, kk, vv, positions, k_pos, causal, attentions, excluded).transpose(1, 2).reshape(batch, n, heads * d)
        x = x + out @ attn.o_proj.weight.T
        h = _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        x = x + (torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return x, kvs


def fastv_dropped(attention, visual, length):
    """FastV's choice, from one layer's attention probabilities [B, H, n, n_keys] of this forward: the half of
    the `visual` positions [V] the last position attends to least (mean over heads), as a bool [B, length]."""
    received = attention[:, :, -1].mean(1)[:, visual]
    lowest = received.topk(len(visual) // 2, dim=1, largest=False).indices
    return torch.zeros(attention.shape[0], length, dtype=torch.bool).scatter_(1, visual[lowest], True)
