#!/usr/bin/env python3
"""
Writes a Hugging Face-layout Mixtral folder with random weights: config.json,
model.safetensors (or shards plus model.safetensors.index.json) and
tokenizer.model. Weights are fan-in scaled so logits are of order 1 and the
router's choice changes from token to token.

    python3 tests/hf_checkpoint.py OUT_DIR --dim 64 --hidden-dim 96 --layers 2 ...

Large checkpoints (Mixtral-8x7B layer shapes) are written a tensor at a time,
so memory stays near one tensor.
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = os.path.join(HERE, "..", "tokenizers")
ST_DTYPE = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def to_dtype_bytes(x, dtype):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "f32":
        return x.astype("<f4").tobytes()
    if dtype == "f16":
        return x.astype("<f2").tobytes()
    u = x.view(np.uint32).astype(np.uint64)  # bf16, round to nearest even
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def tensor_specs(c):
    """(name, shape, kind) for every tensor of the model, kind picks the init."""
    d, h, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (c["vocab_size"], d), "embed")]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        specs += [(p + "input_layernorm.weight", (d,), "norm"),
                  (p + "post_attention_layernorm.weight", (d,), "norm"),
                  (p + "self_attn.q_proj.weight", (q, d), "linear"),
                  (p + "self_attn.k_proj.weight", (kv, d), "linear"),
                  (p + "self_attn.v_proj.weight", (kv, d), "linear"),
                  (p + "self_attn.o_proj.weight", (d, q), "linear"),
                  (p + "block_sparse_moe.gate.weight", (c["num_local_experts"], d), "router")]
        for e in range(c["num_local_experts"]):
            pe = p + f"block_sparse_moe.experts.{e}."
            specs += [(pe + "w1.weight", (h, d), "linear"), (pe + "w2.weight", (d, h), "linear"),
                      (pe + "w3.weight", (h, d), "linear")]
    specs += [("model.norm.weight", (d,), "norm")]
    if not c.get("tie_word_embeddings"):
        specs += [("lm_head.weight", (c["vocab_size"], d), "linear")]
    return specs


def make_tensor(rng, shape, kind):
    if kind == "embed":
        return rng.standard_normal(shape, dtype=np.float32)
    if kind == "norm":
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    # linear and router: fan-in scaled, so each output is of order 1 for inputs of order 1;
    # the router gets a larger spread so that its choice is clear-cut and varies.
    scale = (3.0 if kind == "router" else 1.0) / np.sqrt(shape[1])
    out = np.empty(shape, dtype=np.float32)
    step = max(1, (1 << 22) // shape[1])
    for r in range(0, shape[0], step):
        out[r:r + step] = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32) * scale
    return out


def write_checkpoint(out_dir, config, dtype="bf16", shards=1, seed=0, tokenizer="mistral-v1.model",
                     dtypes=None):
    """dtypes: optional {name: dtype} overrides (mixed-dtype checkpoints)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = tensor_specs(config)
    # Shards get tensors in a shuffled order, as real shards are not in layer order.
    order = rng.permutation(len(specs))
    assignment = [[] for _ in range(shards)]
    for i, idx in enumerate(order):
        assignment[i * shards // len(specs)].append(specs[idx])
    weight_map = {}
    for s, part in enumerate(assignment):
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape, _ in part:
            dt = (dtypes or {}).get(name, dtype)
            nbytes = int(np.prod(shape)) * (4 if dt == "f32" else 2)
            header[name] = {"dtype": ST_DTYPE[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        hbytes = json.dumps(header).encode()
        hbytes += b" " * (-len(hbytes) % 8)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)) + hbytes)
            for name, shape, kind in part:
                f.write(to_dtype_bytes(make_tensor(rng, shape, kind), (dtypes or {}).get(name, dtype)))
    if shards > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copy(os.path.join(TOKENIZERS, tokenizer), os.path.join(out_dir, "tokenizer.model"))


def make_config(dim=64, hidden_dim=96, layers=2, heads=4, kv_heads=2, head_dim=None, experts=4, top_k=2,
                vocab=32000, window=None, theta=1e6, eps=1e-5, max_pos=4096, tie=False):
    c = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": dim,
         "intermediate_size": hidden_dim, "num_hidden_layers": layers, "num_attention_heads": heads,
         "num_key_value_heads": kv_heads, "num_local_experts": experts, "num_experts_per_tok": top_k,
         "vocab_size": vocab, "rope_theta": theta, "rms_norm_eps": eps, "sliding_window": window,
         "max_position_embeddings": max_pos, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
         "tie_word_embeddings": tie, "torch_dtype": "bfloat16"}
    c["head_dim"] = head_dim if head_dim is not None else dim // heads
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden-dim", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--dtype", default="bf16", choices=sorted(ST_DTYPE))
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="mistral-v1.model")
    a = ap.parse_args()
    cfg = make_config(a.dim, a.hidden_dim, a.layers, a.heads, a.kv_heads, a.head_dim, a.experts, a.top_k,
                      a.vocab, a.window)
    write_checkpoint(a.out_dir, cfg, a.dtype, a.shards, a.seed, a.tokenizer)


if __name__ == "__main__":
    main()
