#!/usr/bin/env python3
"""
Writes a Hugging Face Mixtral folder (from hf_checkpoint.py) as a GGUF file the
way llama.cpp's converter lays one out: llama architecture keys, the
sentencepiece vocabulary from tokenizer.model, tensors named token_embd,
blk.N.attn_q, ..., the experts stacked (ffn_gate_exps, ffn_up_exps,
ffn_down_exps) or one by one (ffn_gate.E, ...), dimensions listed innermost
first, and the rows of attn_q and attn_k permuted within each head for
interleaved RoPE. Types: F32, F16, BF16, or Q8_0 for the matrices (blocks of
32: an f16 scale d = max|x| / 127 and round(x / d), as llama.cpp's
quantize_row_q8_0 computes them).

Written from the GGUF specification for the tests; not llama.cpp's code.
"""
import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402

TYPES = {"F32": 0, "F16": 1, "Q8_0": 8, "BF16": 30}


def gguf_string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_pair(key, value):
    out = gguf_string(key)
    if isinstance(value, str):
        return out + struct.pack("<I", 8) + gguf_string(value)
    if isinstance(value, float):
        return out + struct.pack("<If", 6, value)
    if isinstance(value, bool):
        return out + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return out + struct.pack("<II", 4, value)
    kind, items = value  # ("str" | "f32" | "i32", list)
    if kind == "str":
        return out + struct.pack("<IIQ", 9, 8, len(items)) + b"".join(gguf_string(x) for x in items)
    fmt, t = {"f32": ("f", 6), "i32": ("i", 5)}[kind]
    return out + struct.pack("<IIQ", 9, t, len(items)) + struct.pack(f"<{len(items)}{fmt}", *items)


def permute(w, n_head):
    """llama.cpp's row order for q/k: within each head, rows j and j + head_dim/2 side by side."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_0(x):
    """x (..., K) -> bytes of Q8_0 blocks: f16 d, then 32 int8."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(-1) / 127.0
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.trunc(b * inv[:, None] + np.copysign(0.5, b)), -127, 127).astype(np.int8)  # roundf
    out = np.zeros((b.shape[0], 34), np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def encode(x, gtype):
    if gtype == "F32":
        return x.astype("<f4").tobytes()
    if gtype == "F16":
        return x.astype("<f2").tobytes()
    if gtype == "BF16":
        u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    return q8_0(x)


def write_gguf(hf_dir, out, matrix_type="F32", stacked=True):
    import sentencepiece
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    W = reference.load_safetensors(hf_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(hf_dir, "tokenizer.model"))
    n = sp.get_piece_size()
    types = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else
             5 if sp.is_unused(i) else 1 for i in range(n)]
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv = [("general.architecture", "llama"), ("general.alignment", 32),
          ("llama.block_count", c["num_hidden_layers"]), ("llama.context_length", c["max_position_embeddings"]),
          ("llama.embedding_length", c["hidden_size"]), ("llama.feed_forward_length", c["intermediate_size"]),
          ("llama.attention.head_count", c["num_attention_heads"]),
          ("llama.attention.head_count_kv", c["num_key_value_heads"]), ("llama.attention.key_length", hd),
          ("llama.rope.freq_base", float(c["rope_theta"])),
          ("llama.attention.layer_norm_rms_epsilon", float(c["rms_norm_eps"])),
          ("llama.expert_count", c["num_local_experts"]), ("llama.expert_used_count", c["num_experts_per_tok"]),
          ("tokenizer.ggml.model", "llama"),
          ("tokenizer.ggml.tokens", ("str", [sp.id_to_piece(i).encode() for i in range(n)])),
          ("tokenizer.ggml.scores", ("f32", [sp.get_score(i) for i in range(n)])),
          ("tokenizer.ggml.token_type", ("i32", types)),
          ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2)]
    tensors = [("token_embd.weight", W["model.embed_tokens.weight"], matrix_type)]
    E = c["num_local_experts"]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        tensors += [(f"blk.{l}.attn_norm.weight", W[p + "input_layernorm.weight"], "F32"),
                    (f"blk.{l}.attn_q.weight", permute(W[p + "self_attn.q_proj.weight"], c["num_attention_heads"]),
                     matrix_type),
                    (f"blk.{l}.attn_k.weight", permute(W[p + "self_attn.k_proj.weight"], c["num_key_value_heads"]),
                     matrix_type),
                    (f"blk.{l}.attn_v.weight", W[p + "self_attn.v_proj.weight"], matrix_type),
                    (f"blk.{l}.attn_output.weight", W[p + "self_attn.o_proj.weight"], matrix_type),
                    (f"blk.{l}.ffn_norm.weight", W[p + "post_attention_layernorm.weight"], "F32"),
                    (f"blk.{l}.ffn_gate_inp.weight", W[p + "block_sparse_moe.gate.weight"], "F32")]
        for gname, hname in (("ffn_gate", "w1"), ("ffn_up", "w3"), ("ffn_down", "w2")):
            mats = [W[p + f"block_sparse_moe.experts.{e}.{hname}.weight"] for e in range(E)]
            if stacked:
                tensors.append((f"blk.{l}.{gname}_exps.weight", np.stack(mats), matrix_type))
            else:
                tensors += [(f"blk.{l}.{gname}.{e}.weight", m, matrix_type) for e, m in enumerate(mats)]
    tensors.append(("output_norm.weight", W["model.norm.weight"], "F32"))
    if not c.get("tie_word_embeddings"):
        tensors.append(("output.weight", W["lm_head.weight"], matrix_type))
    blobs, infos, off = [], [], 0
    for name, x, gtype in tensors:
        data = encode(np.asarray(x, np.float32), gtype)
        infos.append(gguf_string(name) + struct.pack("<I", x.ndim) + struct.pack(f"<{x.ndim}Q", *x.shape[::-1])
                     + struct.pack("<IQ", TYPES[gtype], off))
        blobs.append(data + b"\0" * (-len(data) % 32))
        off += len(blobs[-1])
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv_pair(k, v) for k, v in kv) \
        + b"".join(infos)
    with open(out, "wb") as f:
        f.write(head + b"\0" * (-len(head) % 32))
        for b in blobs:
            f.write(b)
    return out
