#!/usr/bin/env python3
"""
An independent Mixtral forward pass in numpy (float64), written from the math
of Hugging Face's modeling_mixtral.py, reading the Hugging Face folder directly
(its own safetensors reader, not export.py's). It processes the whole sequence
at once with an explicit attention mask: no KV cache, no ring buffer, so it
checks the engine's cache logic rather than repeating it.

    python3 tests/reference.py MODEL_DIR --ids 1,415,2936 --out logits.f32
"""
import argparse
import json
import os
import struct

import numpy as np


def load_safetensors(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for fname in files:
        with open(os.path.join(model_dir, fname), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        for name, t in header.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            raw = data[a:b]
            if t["dtype"] == "F32":
                x = np.frombuffer(raw, "<f4")
            elif t["dtype"] == "F16":
                x = np.frombuffer(raw, "<f2")
            elif t["dtype"] == "BF16":
                x = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise ValueError(f"dtype {t['dtype']}")
            out[name] = x.astype(np.float64).reshape(t["shape"])
    return out


def round_bf16(x):
    """What export.py --type bf16 does to an f32/f16 source: round to nearest even."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, pos, theta):
    """x (T, heads, hd); Hugging Face layout: j pairs with j + hd/2 (rotate_half)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(pos, inv_freq)                  # (T, hd/2)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + rot * sin


def forward(W, c, ids, bf16=False, inputs=None, bf16_activations=False):
    """Returns logits (T, vocab) and the chosen experts (T, layers, top_k), sorted per token.
    inputs: a dict that gets, for every matrix, [sum over the tokens it multiplies of each input
    column's square, how many tokens] added (the importance matrix's numbers).
    bf16_activations: every input of a weight matrix (not the router's) rounded to bf16 first,
    as mixtral --bf16-activations does (in float32, then to the nearest bf16)."""
    g = (lambda n: round_bf16(W[n])) if bf16 else (lambda n: W[n])
    a16 = (lambda h: round_bf16(h)) if bf16_activations else (lambda h: h)

    def seen(name, h):
        if inputs is not None:
            h = np.atleast_2d(h)
            acc = inputs.setdefault(name, [np.zeros(h.shape[1]), 0])
            acc[0] += (h.astype(np.float64) ** 2).sum(0)
            acc[1] += h.shape[0]
    T = len(ids)
    d, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // nh
    E, K, eps = c["num_local_experts"], c["num_experts_per_tok"], c["rms_norm_eps"]
    theta, window = c.get("rope_theta", 1e6), c.get("sliding_window")
    pos = np.arange(T)
    # mask[p, t]: may query p see key t? causal, and within the window if any
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    x = g("model.embed_tokens.weight")[ids]
    chosen = np.zeros((T, c["num_hidden_layers"], K), dtype=np.int64)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        for m in ("q_proj", "k_proj", "v_proj"):
            seen(p + f"self_attn.{m}.weight", h)
        q = (a16(h) @ g(p + "self_attn.q_proj.weight").T).reshape(T, nh, hd)
        k = (a16(h) @ g(p + "self_attn.k_proj.weight").T).reshape(T, nkv, hd)
        v = (a16(h) @ g(p + "self_attn.v_proj.weight").T).reshape(T, nkv, hd)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        k = np.repeat(k, nh // nkv, axis=1)        # repeat_kv
        v = np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("phd,thd->hpt", q, k) / np.sqrt(hd)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hpt,thd->phd", s, v).reshape(T, nh * hd)
        seen(p + "self_attn.o_proj.weight", o)
        x = x + a16(o) @ g(p + "self_attn.o_proj.weight").T

        h = rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        logits = h @ W[p + "block_sparse_moe.gate.weight"].T   # router stays full precision
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(T):
            top = np.argsort(-probs[t], kind="stable")[:K]       # ties: lower index first
            wts = probs[t, top] / probs[t, top].sum()
            chosen[t, l] = np.sort(top)
            for e, wgt in zip(top, wts):
                pe = p + f"block_sparse_moe.experts.{e}."
                a = a16(h[t]) @ g(pe + "w1.weight").T
                b = a16(h[t]) @ g(pe + "w3.weight").T
                seen(pe + "w1.weight", h[t])
                seen(pe + "w3.weight", h[t])
                seen(pe + "w2.weight", a / (1 + np.exp(-a)) * b)
                out[t] += wgt * (a16(a / (1 + np.exp(-a)) * b) @ g(pe + "w2.weight").T)
        x = x + out
    x = rmsnorm(x, W["model.norm.weight"], eps)
    seen("lm_head.weight", x)
    head = "model.embed_tokens.weight" if c.get("tie_word_embeddings") else "lm_head.weight"
    return a16(x) @ g(head).T, chosen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true", help="round matrices to bf16 as export.py --type bf16 does")
    a = ap.parse_args()
    c = json.load(open(os.path.join(a.model_dir, "config.json")))
    logits, _ = forward(load_safetensors(a.model_dir), c, [int(i) for i in a.ids.split(",")], a.bf16)
    logits.astype("<f4").tofile(a.out)


if __name__ == "__main__":
    main()
