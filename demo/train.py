#!/usr/bin/env python3
"""
Trains the demo model that `make run` uses: a small Mixtral (8 experts, top-2,
grouped-query attention, untied lm_head, the Mistral v1 tokenizer) on the King
James Bible, which is in the public domain (Debian: bible-kjv-text, read with
the `bible` program from bible-kjv).

    /usr/bin/python3 demo/train.py [--minutes 25] [--out demo/model]

Needs Debian's python3-torch, python3-numpy, python3-sentencepiece, bible-kjv
and libopenblas0-pthread (without it torch falls back to the reference BLAS,
about 30 times slower).

The corpus uses 7389 of the tokenizer's 32000 pieces, and the output layer is
most of the cost of a step, so training scores only those 7389. The shipped
lm_head still has all 32000 rows, and unused pieces must never come out. A
logit has no bias term, so the model keeps one: residual dimension 0 is a
constant channel (its embedding column is fixed at CONST, and the rows of
o_proj and of every expert's w2 that would write into it stay zero, as does
nothing else), so every final hidden state has h[0] = CONST / rms(x) > 0 (the
final norm's weight 0 is fixed at 1). Used pieces may learn to use it as a
bias; each unused piece's row is -M * e_0, with M putting its logit at least
40 below the best piece at every position of a held-out sample. The log
reports the probability mass left on unused pieces. Writes a Hugging Face folder (config.json, bf16 safetensors shards
with their index, tokenizer.model), demo/train_log.txt, and demo/reference.*:
this script's own forward pass on a fixed prompt, with the bf16 weights as
shipped, for tests/run_tests.py to hold mixtral.c against.

The model below is written from the same math as mixtral.c (and Hugging
Face's modeling_mixtral.py), not imported from anywhere.
"""
import argparse
import json
import math
import os
import random
import shutil
import struct
import subprocess
import time

import numpy as np
import sentencepiece
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER = os.path.join(ROOT, "tokenizers", "mistral-v1.model")

CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
              vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
              max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
SEQ = 128
CONST = 1.0  # the constant channel's value in the residual stream
REFERENCE_PROMPT = "And God said unto Moses,"


# ----------------------------------------------------------------------------
# the corpus

def kjv_verses():
    """Every verse of the KJV as plain text, in order."""
    out = subprocess.run(["bible", "-l10000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = []
    for line in out.splitlines():
        line = line.strip()
        if not line or not line[0].isdigit():
            continue  # blank lines and "Genesis 1" headings
        num, _, text = line.partition(" ")
        if num.isdigit() and text:
            verses.append(text)
    return verses


def encode_corpus(sp, verses):
    """BOS, then verses, each followed by a newline, as one stream of ids."""
    ids = [CONFIG["bos_token_id"]]
    for v in verses:
        ids += sp.encode(v + "\n")
    return np.array(ids, dtype=np.int64)


# ----------------------------------------------------------------------------
# the model

class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x, pos, theta):
    """x (B, heads, T, hd); dimension j turns with j + hd/2 (Hugging Face layout)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + rot * sin


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c["hidden_size"], c["head_dim"]
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.E, self.K, self.theta = c["num_local_experts"], c["num_experts_per_tok"], c["rope_theta"]
        L = torch.nn.Linear
        self.input_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.q_proj, self.k_proj = L(d, self.nh * hd, bias=False), L(d, self.nkv * hd, bias=False)
        self.v_proj, self.o_proj = L(d, self.nkv * hd, bias=False), L(self.nh * hd, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.gate = L(d, self.E, bias=False)
        h = c["intermediate_size"]
        self.w1 = torch.nn.ModuleList([L(d, h, bias=False) for _ in range(self.E)])
        self.w2 = torch.nn.ModuleList([L(h, d, bias=False) for _ in range(self.E)])
        self.w3 = torch.nn.ModuleList([L(d, h, bias=False) for _ in range(self.E)])

    def forward(self, x):
        B, T, D = x.shape
        pos = torch.arange(T)
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        k = k.repeat_interleave(self.nh // self.nkv, dim=1)
        v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        x = x + self.o_proj(o)

        # mixture of experts: softmax over all experts, top-k, renormalise, weighted sum
        h = self.post_attention_layernorm(x).reshape(B * T, D)
        probs = self.gate(h).float().softmax(-1)
        top_w, top_e = probs.topk(self.K, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(self.E):
            rows, slot = (top_e == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            he = h[rows]
            y = self.w2[e](F.silu(self.w1[e](he)) * self.w3[e](he))
            out.index_add_(0, rows, y * top_w[rows, slot, None])
        # load balancing (Switch Transformer): fraction routed x mean probability, per expert
        frac = torch.zeros(self.E).index_add_(0, top_e.reshape(-1), torch.ones(top_e.numel())) / top_e.numel()
        self.aux = self.E * (frac * probs.mean(0)).sum()
        return x + out.view(B, T, D)


class Mixtral(torch.nn.Module):
    def __init__(self, c, n_out=None):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = torch.nn.ModuleList([Block(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = torch.nn.Linear(c["hidden_size"], n_out or c["vocab_size"], bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)

    def hidden(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))

    def hf_state(self):
        """The weights under their Hugging Face names."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight,
               "lm_head.weight": self.lm_head.weight}
        for l, b in enumerate(self.layers):
            p = f"model.layers.{l}."
            out[p + "input_layernorm.weight"] = b.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = b.post_attention_layernorm.weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(b, n).weight
            out[p + "block_sparse_moe.gate.weight"] = b.gate.weight
            for e in range(b.E):
                for n in ("w1", "w2", "w3"):
                    out[p + f"block_sparse_moe.experts.{e}.{n}.weight"] = getattr(b, n)[e].weight
        return out


# ----------------------------------------------------------------------------
# saving: bf16 safetensors shards, written by hand

def bf16_bits(t):
    u = t.detach().float().contiguous().numpy().view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def save_hf(model, out_dir, shards=2):
    os.makedirs(out_dir, exist_ok=True)
    state = model.hf_state()
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        header, off, blobs = {}, 0, []
        for n in part:
            raw = bf16_bits(state[n]).tobytes()
            header[n] = {"dtype": "BF16", "shape": list(state[n].shape), "data_offsets": [off, off + len(raw)]}
            off += len(raw)
            blobs.append(raw)
            weight_map[n] = fname
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    cfg = dict(CONFIG, architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
               tie_word_embeddings=False, torch_dtype="bfloat16")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copy(TOKENIZER, os.path.join(out_dir, "tokenizer.model"))


def hold_constant_channel(model):
    """Puts back what keeps residual dimension 0 constant (called after every step)."""
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = CONST
        model.norm.weight[0] = 1.0
        for layer in model.layers:
            layer.o_proj.weight[0, :] = 0.0
            for w2 in layer.w2:
                w2.weight[0, :] = 0.0


def complete_lm_head(model, used, val_batch):
    """Replaces the trained (used-pieces) lm_head with the full one described at the
    top; returns the largest held-out probability mass on unused pieces."""
    model.eval()
    V, D = CONFIG["vocab_size"], CONFIG["hidden_size"]
    with torch.no_grad():
        h = torch.cat([model.hidden(x).reshape(-1, D) for x, _ in (val_batch() for _ in range(32))])
        if h[:, 0].min() <= 0:
            raise SystemExit("the constant channel is not positive: a bug in hold_constant_channel")
        trained = model.lm_head.weight.detach().clone()
        slices = torch.split(h, 2048)  # (rows x vocab) at once would need gigabytes
        top = torch.cat([(hs @ trained.T).max(-1).values for hs in slices])
        big = ((top + 40.0) / h[:, 0]).max().item()
        full = torch.nn.Linear(D, V, bias=False)
        row = torch.zeros(D)
        row[0] = -big
        full.weight.copy_(row.expand(V, -1))
        full.weight[used] = trained
        model.lm_head = full
        for p in model.lm_head.parameters():
            p.copy_(torch.from_numpy((bf16_bits(p).astype(np.uint32) << 16).view(np.float32)).view(p.shape))
        unused = torch.ones(V, dtype=torch.bool)
        unused[used] = False
        leak = max(model.lm_head(hs).softmax(-1)[:, unused].sum(-1).max().item() for hs in slices)
    print(f"unused pieces: h[0] >= {h[:, 0].min().item():.3f}; their rows -{big:.0f} e_0; largest held-out "
          f"probability mass on them {leak:.2e}", flush=True)
    return leak


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--out", default=os.path.join(HERE, "model"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(os.cpu_count() or 1)

    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
    verses = kjv_verses()
    data = encode_corpus(sp, verses)
    split = int(len(data) * 0.98)  # the end of Revelation is held out
    train, val = torch.from_numpy(data[:split]), torch.from_numpy(data[split:])
    print(f"corpus: {len(verses)} verses, {len(data)} tokens ({split} train)", flush=True)

    used = torch.from_numpy(np.unique(data))           # the pieces the corpus uses
    compact = torch.full((CONFIG["vocab_size"],), -1, dtype=torch.int64)
    compact[used] = torch.arange(len(used))             # full id -> output row while training
    print(f"output layer trained on the {len(used)} pieces the corpus uses", flush=True)
    model = Mixtral(CONFIG, n_out=len(used))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))

    def batch(src):
        starts = torch.randint(0, len(src) - SEQ - 1, (a.batch,))
        chunk = torch.stack([src[s:s + SEQ + 1] for s in starts])
        return chunk[:, :-1], chunk[:, 1:]

    def evaluate(n=8):
        model.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(model(x).reshape(-1, len(used)), compact[y].reshape(-1)).item()
                      for x, y in (batch(val) for _ in range(n))]
        model.train()
        return sum(losses) / len(losses)

    budget = a.minutes * 60
    t0, step, tokens, log = time.time(), 0, 0, []
    hold_constant_channel(model)
    while True:
        elapsed = time.time() - t0
        if elapsed > budget:
            break
        frac = elapsed / budget  # warmup, then cosine decay to a tenth, on the time budget
        lr = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, len(used)), compact[y].reshape(-1))
        aux = sum(layer.aux for layer in model.layers) / len(model.layers)
        opt.zero_grad(set_to_none=True)
        (loss + 0.02 * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hold_constant_channel(model)
        step += 1
        tokens += x.numel()
        if step % 50 == 0:
            msg = f"step {step} {elapsed / 60:.1f} min: loss {loss.item():.3f} aux {aux.item():.3f} lr {lr:.2e}"
            if step % 250 == 0:
                msg += f" val {evaluate():.3f}"
            print(msg, flush=True)
            log.append(msg)
    minutes = (time.time() - t0) / 60

    # ship in bf16, and make the reference with exactly the weights shipped
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy((bf16_bits(p).astype(np.uint32) << 16).view(np.float32)).view(p.shape))
    val_loss = evaluate(32)
    leak = complete_lm_head(model, used, lambda: batch(val))
    save_hf(model, a.out)
    ids = [CONFIG["bos_token_id"]] + sp.encode(REFERENCE_PROMPT)
    model.eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().numpy()
    ref.astype("<f4").tofile(os.path.join(HERE, "reference_logits.f32"))
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump({"prompt": REFERENCE_PROMPT, "ids": ids, "vocab_size": CONFIG["vocab_size"]}, f)
    summary = (f"trained {minutes:.1f} min on {os.cpu_count()} cores, {step} steps, {tokens / 1e6:.1f}M tokens "
               f"({tokens / len(train):.1f} epochs); final train loss {loss.item():.3f}, held-out loss "
               f"{val_loss:.3f} (bf16 weights, over the {len(used)} used pieces); "
               f"probability mass on unused pieces at most {leak:.1e}")
    print(summary)
    with open(os.path.join(HERE, "train_log.txt"), "w") as f:
        f.write("\n".join(log + [summary]) + "\n")


if __name__ == "__main__":
    main()
