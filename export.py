#!/usr/bin/env python3
"""
export.py: turn a Hugging Face Mixtral folder into one mixtral.c model file.

    python3 export.py MODEL_DIR OUT.bin [--type f32|bf16|q8|q4]

MODEL_DIR is an unmodified Hugging Face folder: config.json, model.safetensors
(or the shards listed in model.safetensors.index.json) and tokenizer.model.
Needs only Python's standard library and numpy (and not numpy for a bf16 or f32
export of a bf16 or f32 checkpoint, such as the demo model's). Tensors are streamed a slice
at a time, so peak memory stays near one slice whatever the model size.

File layout (version 4, all little-endian). mixtral.c mirrors this once, in
its "model file" section; change both together and bump VERSION.

    header      256 bytes: HEADER_FORMAT below, zero padded
    tokenizer   u32 n_pieces, u32 flags, i32 unk_id, u32 max_piece_bytes,
                then per piece: f32 score, u16 type, u16 n_bytes, bytes
    weights     starts at a 4096-byte boundary; every tensor starts at a
                64-byte boundary, in exactly the order of tensor_plan()

Weight types: f32 (0), bf16 (1), q8 (2), q4 (3), q6 (4). Norm weights and the
router (gate) are always f32. Each kind of matrix has its type in the header
(the same in every layer); --type picks them (see RECIPES): in a q4 file
the embedding is q6 and the lm_head q8, since the logits are sensitive to them
(a q4 embedding costs the demo model 6 times the KL of the rest).

Quantized matrices (rows, cols) keep one f16 scale per block of B = 32
consecutive weights of a row (block_size in the header), and their rows are
interleaved in groups of R = 16 (row_group in the header; the row count is
padded with zero rows to a multiple of 16), so that a kernel's one load of
64 bytes holds 4 consecutive weights of each of 16 rows. A group is
    scales   (cols/B, 16) f16: scale[block][row]
    weights  cols/B blocks of
             q8: 8 steps of 64 bytes; step s, bytes 4r..4r+3 hold row r's
                 weights 4s..4s+3 of the block, as u = q + 128 (q in -127..127)
             q4: 4 chunks of 64 bytes; chunk c, byte 4r+i holds row r's weight
                 8c+i in its low nibble and 8c+4+i in its high one, as
                 u = q + 8 (q in -8..7)
             q6: u = q + 32 (q in -32..31): its low 4 bits in 4 chunks as q4's,
                 then 2 chunks of 64 bytes; chunk h, byte 4r+i holds the top 2
                 bits of row r's weights 16h+4k+i (k = 0..3) at bits 2k, 2k+1
with w = q * scale: 17 bytes per 16 weights (q8), 13 (q6), 9 (q4); q8 and q4
are the sizes of llama.cpp's Q8_0 and Q4_0.
"""
import argparse
import json
import os
import re
import signal
import struct
import sys
import time

from array import array
import math

try:  # numpy: the quantizers, GGUF and conversions need it; a bf16 or f32 Hugging Face model does not
    import numpy as np
except ImportError:
    np = None

MAGIC = b"MIXTRALC"
VERSION = 4
HEADER_SIZE = 256
# magic, version, header_size, weight_type (what --type said), block_size,
# dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, n_experts, top_k,
# vocab_size, max_seq_len, sliding_window (0 = none), bos_id, eos_id, row_group,
# rope_theta, rms_norm_eps, tokenizer_offset, tokenizer_size, weights_offset, file_size,
# the type of each kind of matrix, in the order of MATRIX_KINDS
HEADER_FORMAT = "<8sIIII14iff4Q9B"
MATRIX_KINDS = ("embed", "wq", "wk", "wv", "wo", "w1", "w3", "w2", "lm_head")
WEIGHTS_ALIGN = 4096
TENSOR_ALIGN = 64
TYPE_NAMES = ("f32", "bf16", "q8", "q4", "q6", "q3", "q2")  # the weight types, by their number in the file
F32, BF16, Q8, Q4, Q6, Q3, Q2 = 0, 1, 2, 3, 4, 5, 6
QUANT = (Q8, Q6, Q4, Q3, Q2)  # the types in groups of 16 rows, with int8 activations
CODED = (Q3, Q2)  # codes into codebooks (kernels.h)
CHUNK_ELEMS = 1 << 24  # elements converted per slice: bounds peak memory
BLOCK = 32  # q8/q6/q4 weights per scale
ROWS = 16  # q8/q6/q4 rows interleaved in a group

# sentencepiece piece types (sentencepiece_model.proto)
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
TOK_ADD_DUMMY_PREFIX, TOK_BYTE_FALLBACK, TOK_REMOVE_EXTRA_WS = 1, 2, 4


class ExportError(Exception):
    pass


def reject(msg):
    """Refuses the input: raises ExportError, which main() reports as one line."""
    raise ExportError(msg)


def short(v, n=80):
    """A value for an error message: repr, cut to n characters."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# What mixtral.c's loader accepts (config_validate in mixtral.c); export.py
# refuses anything else, so that every file it writes loads.
LIMITS = dict(dim=1 << 20, hidden_dim=1 << 22, n_layers=1 << 12, n_heads=1 << 12, n_kv_heads=1 << 12,
              head_dim=1 << 14, n_experts=1 << 12, top_k=1 << 12, vocab_size=1 << 24,
              rope_theta=(1.0, 1e12), rms_norm_eps=(1e-12, 1e-1))


# ----------------------------------------------------------------------------
# config.json

def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        reject(f"{path}: missing (a Hugging Face model folder has config.json)")
    try:
        with open(path, "rb") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        reject(f"{path}: not valid JSON: {e}")
    if not isinstance(cfg, dict):
        reject(f"{path}: expected a JSON object")
    if cfg.get("model_type") != "mixtral":
        reject(f"{path}: model_type is {short(cfg.get('model_type'))}; only 'mixtral' is supported")

    def geti(key, default=None, minimum=1, maximum=2**31 - 1):
        v = cfg.get(key, default)
        if v is None or isinstance(v, bool) or not isinstance(v, int) or v < minimum or v > maximum:
            reject(f"{path}: field {key} must be an integer in {minimum}..{maximum}, got {short(v)}")
        return v

    def getf(key, default, lo, hi):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
            reject(f"{path}: field {key} must be a number in {lo:g}..{hi:g}, got {short(v)}")
        return float(v)

    c = {}
    # the bounds mixtral.c's loader enforces (config_validate), so that what is written loads
    c["dim"] = geti("hidden_size", maximum=LIMITS["dim"])
    c["hidden_dim"] = geti("intermediate_size", maximum=LIMITS["hidden_dim"])
    c["n_layers"] = geti("num_hidden_layers", maximum=LIMITS["n_layers"])
    c["n_heads"] = geti("num_attention_heads", maximum=LIMITS["n_heads"])
    c["n_kv_heads"] = geti("num_key_value_heads", c["n_heads"], maximum=LIMITS["n_kv_heads"])
    if c["n_heads"] % c["n_kv_heads"]:
        reject(f"{path}: num_attention_heads {c['n_heads']} is not a multiple of num_key_value_heads {c['n_kv_heads']}")
    if cfg.get("head_dim") is None:
        if c["dim"] % c["n_heads"]:
            reject(f"{path}: hidden_size {c['dim']} is not divisible by num_attention_heads {c['n_heads']}")
        c["head_dim"] = c["dim"] // c["n_heads"]
    else:
        c["head_dim"] = geti("head_dim", maximum=LIMITS["head_dim"])
    if c["head_dim"] > LIMITS["head_dim"]:
        reject(f"{path}: head_dim {c['head_dim']} is more than mixtral.c's {LIMITS['head_dim']}")
    if c["head_dim"] % 2:
        reject(f"{path}: head_dim {c['head_dim']} must be even for rotary embeddings")
    c["n_experts"] = geti("num_local_experts", maximum=LIMITS["n_experts"])
    c["top_k"] = geti("num_experts_per_tok", maximum=LIMITS["top_k"])
    if c["top_k"] > c["n_experts"]:
        reject(f"{path}: num_experts_per_tok {c['top_k']} > num_local_experts {c['n_experts']}")
    c["vocab_size"] = geti("vocab_size", maximum=LIMITS["vocab_size"])
    c["max_seq_len"] = geti("max_position_embeddings", 32768)
    sw = cfg.get("sliding_window")
    c["sliding_window"] = 0 if sw is None else geti("sliding_window")
    c["bos_id"] = geti("bos_token_id", 1, minimum=0)
    c["eos_id"] = geti("eos_token_id", 2, minimum=0)
    for key in ("bos_id", "eos_id"):
        if c[key] >= c["vocab_size"]:
            reject(f"{path}: {key} {c[key]} is outside the vocabulary of {c['vocab_size']}")
    c["rope_theta"] = getf("rope_theta", 1e6, *LIMITS["rope_theta"])
    c["rms_norm_eps"] = getf("rms_norm_eps", 1e-5, *LIMITS["rms_norm_eps"])
    c["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    if cfg.get("rope_scaling") not in (None, {}):
        reject(f"{path}: rope_scaling {short(cfg['rope_scaling'])} is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        reject(f"{path}: hidden_act {short(act)} is not supported (Mixtral uses silu)")
    return c


# ----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, raw data

ST_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


def read_at(f, path, offset, n):
    """n bytes (fewer at the end of the file) at offset of an open file; a failed read is one line
    naming the file and the offset."""
    try:
        f.seek(offset)
        return f.read(n)
    except OSError as e:
        reject(f"cannot read {path} at offset {offset}: {e.strerror or e}")


class SafetensorsTensor:
    """One tensor of a shard. Every tensor class of a source reads the same way: rows_f32 (rows
    as float32), bf16_bits (its rows as stored bf16 bits, when it holds bf16: copied, not converted),
    q8_rows (Q8_0 blocks as stored, when it holds them) and lossy_to (whether a weight type rounds it)."""

    def __init__(self, name, path, dtype, shape, offset, nbytes):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, shape
        self.offset, self.nbytes = offset, nbytes

    def _raw(self, f, r0, nr):
        cols = self.shape[-1] if len(self.shape) == 2 else max(1, math.prod(self.shape))
        esize = ST_DTYPES[self.dtype]
        raw = read_at(f, self.path, self.offset + r0 * cols * esize, nr * cols * esize)
        if len(raw) != nr * cols * esize:
            reject(f"{self.path}: truncated safetensors while reading {self.name}")
        return raw

    def rows_f32(self, f, r0, nr):
        return decode_f32(self._raw(f, r0, nr), self.dtype)

    def bf16_bits(self, f, r0, nr):
        return self._raw(f, r0, nr) if self.dtype == "BF16" else None

    def q8_rows(self, f, r0, nr):
        return None

    def lossy_to(self, wtype):
        return False  # (rounding f32 or f16 to bf16 is what --type bf16 asks; not warned)


def read_safetensors_header(path):
    """Returns {name: Tensor} for one shard, validating every offset."""
    if not os.path.isfile(path):
        reject(f"{path}: missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = read_at(f, path, 0, 8)
        if len(raw) < 8:
            reject(f"{path}: truncated safetensors (no header length)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8 or hlen > 100 << 20:
            reject(f"{path}: truncated or malformed safetensors (header length {hlen}, file size {size})")
        try:
            header = json.loads(read_at(f, path, 8, hlen))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            reject(f"{path}: malformed safetensors header: {e}")
    if not isinstance(header, dict):
        reject(f"{path}: malformed safetensors header: expected a JSON object")
    data_start = 8 + hlen
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not all(k in info for k in ("dtype", "shape", "data_offsets")):
            reject(f"{path}: tensor {short(name)}: malformed entry {short(info)}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            reject(f"{path}: tensor {short(name)}: unsupported dtype {short(dtype)} (supported: BF16, F16, F32)")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offs) or offs[0] > offs[1]
                or len(shape) > 8 or any(d > 1 << 40 for d in shape)):
            reject(f"{path}: tensor {short(name)}: malformed shape {short(shape)} or data_offsets {short(offs)}")
        nbytes = ST_DTYPES[dtype]
        for d in shape:  # in Python integers: no overflow
            nbytes *= d
        if offs[1] - offs[0] != nbytes:
            reject(f"{path}: tensor {name}: data_offsets span {offs[1] - offs[0]} bytes, shape {shape} {dtype} needs {nbytes}")
        if data_start + offs[1] > size:
            reject(f"{path}: truncated safetensors: tensor {name} ends at byte {data_start + offs[1]}, file has {size}")
        tensors[name] = SafetensorsTensor(name, path, dtype, shape, data_start + offs[0], nbytes)
    return tensors


def read_checkpoint_index(model_dir):
    """All tensors of the checkpoint by name, from one file or an index of shards."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, "rb") as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError, RecursionError) as e:
            reject(f"{index}: malformed index (need a JSON object with a weight_map): {e!r}")
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        weight_map, shards = None, ["model.safetensors"]
    else:
        reject(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            reject(f"{index}: bad shard name {shard!r}")
        for name, t in read_safetensors_header(os.path.join(model_dir, shard)).items():
            if name in tensors:
                reject(f"{t.path}: tensor {name} also appears in {tensors[name].path}")
            if weight_map is not None and weight_map.get(name) != shard:
                reject(f"{t.path}: tensor {name} is not listed for this shard in model.safetensors.index.json")
            tensors[name] = t
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                reject(f"{os.path.join(model_dir, shard)}: tensor {name} listed in the index is missing")
    return tensors


def decode_f32(raw, dtype):
    """Raw little-endian F32, F16 or BF16 values as float32."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4")
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------
# GGUF (llama.cpp's format): a Mixtral as llama.cpp's converter writes it
#
#   "GGUF", u32 version (2, 3), u64 n_tensors, u64 n_kv, the key-value pairs
#   (config and tokenizer), the tensor infos (name, dims, type, offset), then
#   the data from an aligned offset. Dimensions are listed innermost first.
# Tensors: token_embd, output_norm, output; per block blk.N.: attn_norm,
# attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate_inp (the router) and
# the experts, either stacked (ffn_gate_exps, ffn_up_exps, ffn_down_exps:
# w1, w3, w2) or one by one (ffn_gate.E, ffn_up.E, ffn_down.E). The converter
# permutes the rows of attn_q and attn_k within each head so that rotary pairs
# are neighbours (interleaved RoPE); they are put back in Hugging Face order.

GGML_F32, GGML_F16, GGML_Q8_0, GGML_BF16 = 0, 1, 8, 30
GGML_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q8_0: "Q8_0", GGML_BF16: "BF16"}
WARNED = set()  # (source type, target type) pairs already warned about


class GgufTensor:
    """One matrix (or vector) of a GGUF file in Hugging Face's orientation, (rows, cols): for a
    stacked expert tensor one expert's slice; unpermute: the head size of q/k rows to restore."""

    def __init__(self, name, path, gtype, shape, offset, expert=None, unpermute=None):
        self.name, self.path, self.gtype, self.offset = name, path, gtype, offset
        self.shape = shape[1:] if expert is not None else shape
        self.expert, self.unpermute = expert, unpermute
        self.dtype = GGML_NAMES[gtype]

    def row_bytes(self):
        cols = self.shape[-1]
        return cols // 32 * 34 if self.gtype == GGML_Q8_0 else cols * (4 if self.gtype == GGML_F32 else 2)

    def _raw(self, f, r0, nr):
        rows = self.shape[0] if len(self.shape) == 2 else 1
        base = self.offset + (self.expert or 0) * rows * self.row_bytes()
        raw = read_at(f, self.path, base + r0 * self.row_bytes(), nr * self.row_bytes())
        if len(raw) != nr * self.row_bytes():
            reject(f"{self.path}: truncated GGUF while reading {self.name}")
        return raw

    def _row_index(self, r0, nr):
        """The GGUF rows that hold rows r0..r0+nr-1, and where each one is among them."""
        if not self.unpermute:
            return r0, nr, None
        hd = self.unpermute
        h0, h1 = r0 // hd, (r0 + nr + hd - 1) // hd
        r = np.arange(r0, r0 + nr)
        h, rem = r // hd, r % hd
        g = h * hd + 2 * (rem % (hd // 2)) + rem // (hd // 2)  # (head, pair, half) -> the converter's row
        return h0 * hd, (h1 - h0) * hd, g - h0 * hd

    def q8_rows(self, f, r0, nr):
        """Q8_0 rows as they are stored: q (nr, cols) int8 and scales (nr, cols/32) f16; None if not Q8_0."""
        if self.gtype != GGML_Q8_0:
            return None
        start, n, pick = self._row_index(r0, nr)
        b = np.frombuffer(self._raw(f, start, n), np.uint8).reshape(n, -1, 34)
        if pick is not None:
            b = b[pick]
        return b[..., 2:].view(np.int8).reshape(nr, -1), b[..., :2].copy().view("<f2").reshape(nr, -1)

    def bf16_bits(self, f, r0, nr):
        return None  # (a BF16 tensor goes through rows_f32, which is exact for it)

    def lossy_to(self, wtype):
        """Whether writing it as wtype rounds: Q8_0 to q6/q4, anything but BF16 to bf16."""
        return (wtype in (Q6, Q4) and self.gtype == GGML_Q8_0) or (wtype == BF16 and self.gtype != GGML_BF16)

    def rows_f32(self, f, r0, nr):
        if self.gtype == GGML_Q8_0:
            q, h = self.q8_rows(f, r0, nr)
            return (q.reshape(nr, -1, 32).astype(np.float32) * h.astype(np.float32)[..., None]).reshape(nr, -1)
        start, n, pick = self._row_index(r0, nr)
        x = decode_f32(self._raw(f, start, n), self.dtype).reshape(n, -1)
        return x[pick] if pick is not None else x


def read_gguf(path):
    """(config, tokenizer pieces, flags, unk_id, {Hugging Face name: GgufTensor})."""
    require_numpy("reading a GGUF")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(min(size, 64 << 20))  # the header: key-values (the vocabulary) and tensor infos
    pos = 0

    def take(n):
        nonlocal pos
        if n < 0 or pos + n > len(data):
            reject(f"{path}: truncated or malformed GGUF header")
        pos += n
        return data[pos - n:pos]

    def u(fmt):
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def string():
        n = u("Q")
        if n > 1 << 20:
            reject(f"{path}: malformed GGUF: a string of {n} bytes")
        return take(n)

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return u(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = u("I"), u("Q")
            if n > 1 << 24 or et == 9:
                reject(f"{path}: malformed GGUF array ({n} items of type {et})")
            if et in scalar and et != 7:
                fmt = scalar[et]
                return list(struct.unpack(f"<{n}{fmt}", take(n * struct.calcsize(fmt))))
            return [value(et) for _ in range(n)]
        reject(f"{path}: malformed GGUF: unknown value type {t}")

    if take(4) != b"GGUF":
        reject(f"{path}: not a GGUF file")
    version = u("I")
    if version not in (2, 3):
        reject(f"{path}: GGUF version {version} (this reads 2 and 3)")
    n_tensors, n_kv = u("Q"), u("Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 16:
        reject(f"{path}: malformed GGUF header ({n_tensors} tensors, {n_kv} keys)")
    kv = {}
    for _ in range(n_kv):
        key = string().decode("utf-8", "replace")
        kv[key] = value(u("I"))
    infos = []
    for _ in range(n_tensors):
        name = string().decode("utf-8", "replace")
        nd = u("I")
        if nd > 4:
            reject(f"{path}: tensor {name} has {nd} dimensions")
        dims = [u("Q") for _ in range(nd)]
        infos.append((name, dims[::-1], u("I"), u("Q")))
    align_to = kv.get("general.alignment", 32)
    data_start = (pos + align_to - 1) // align_to * align_to

    arch = kv.get("general.architecture", b"").decode("utf-8", "replace")
    if arch != "llama" or not kv.get("llama.expert_count"):
        reject(f"{path}: architecture {arch!r} with {kv.get('llama.expert_count', 0)} experts; "
            "only Mixtral (llama with experts) is supported")

    def geti(key, default=None):
        v = kv.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > 2**31 - 1:
            reject(f"{path}: GGUF key {key} must be a positive integer, got {v!r}")
        return v

    def getf(key, default):
        v = kv.get(key, default)
        if not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            reject(f"{path}: GGUF key {key} must be a positive number, got {v!r}")
        return float(v)

    tokens, scores, types = (kv.get("tokenizer.ggml." + k) for k in ("tokens", "scores", "token_type"))
    if kv.get("tokenizer.ggml.model") != b"llama" or not tokens or len(tokens) != len(scores or []) \
            or len(tokens) != len(types or []):
        reject(f"{path}: no sentencepiece (llama) vocabulary with scores and types")
    c = {"dim": geti("llama.embedding_length"), "hidden_dim": geti("llama.feed_forward_length"),
         "n_layers": geti("llama.block_count"), "n_heads": geti("llama.attention.head_count")}
    c["n_kv_heads"] = geti("llama.attention.head_count_kv", c["n_heads"])
    if c["dim"] % c["n_heads"] or c["n_heads"] % c["n_kv_heads"]:
        reject(f"{path}: {c['n_heads']} heads, {c['n_kv_heads']} kv heads for embedding length {c['dim']}")
    c["head_dim"] = geti("llama.attention.key_length", c["dim"] // c["n_heads"])
    c["n_experts"], c["top_k"] = geti("llama.expert_count"), geti("llama.expert_used_count")
    c["vocab_size"] = len(tokens)
    c["max_seq_len"] = geti("llama.context_length", 32768)
    c["sliding_window"] = 0
    c["bos_id"] = kv.get("tokenizer.ggml.bos_token_id", 1)
    c["eos_id"] = kv.get("tokenizer.ggml.eos_token_id", 2)
    c["rope_theta"] = getf("llama.rope.freq_base", 10000.0)
    c["rms_norm_eps"] = getf("llama.attention.layer_norm_rms_epsilon", 1e-5)
    if c["head_dim"] % 2 or c["top_k"] > c["n_experts"] or not all(0 <= c[k] < len(tokens) for k in ("bos_id", "eos_id")):
        reject(f"{path}: inconsistent config (head_dim {c['head_dim']}, top_k {c['top_k']} of {c['n_experts']}, "
            f"bos/eos {c['bos_id']}/{c['eos_id']})")
    pieces = [(t if isinstance(t, bytes) else b"", float(sc), int(ty)) for t, sc, ty in zip(tokens, scores, types)]
    for p, _, t in pieces:
        if len(p) > 65535 or t not in (1, 2, 3, 4, 5, 6):
            reject(f"{path}: malformed vocabulary piece {p[:40]!r} (type {t})")
    flags = TOK_ADD_DUMMY_PREFIX * bool(kv.get("tokenizer.ggml.add_space_prefix", True)) \
        | TOK_BYTE_FALLBACK * any(t == PIECE_BYTE for _, _, t in pieces)
    unk_id = kv.get("tokenizer.ggml.unknown_token_id", 0)

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_block = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "block_sparse_moe.gate"}
    experts = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
    tensors = {}
    for name, shape, gtype, off in infos:
        if gtype not in GGML_NAMES:
            reject(f"{path}: tensor {name} has ggml type {gtype}; this reads F32, F16, BF16 and Q8_0 "
                "(re-make the GGUF with llama.cpp's converter or llama-quantize in one of those)")
        if gtype == GGML_Q8_0 and shape[-1] % 32:
            reject(f"{path}: Q8_0 tensor {name} with rows of {shape[-1]}")
        t = GgufTensor(name, path, gtype, shape, data_start + off)
        end = t.offset + int(np.prod(shape[:-1], dtype=np.int64)) * t.row_bytes() if len(shape) > 1 else \
            t.offset + t.row_bytes()
        if end > size:
            reject(f"{path}: truncated GGUF: tensor {name} ends at byte {end}, the file has {size}")
        parts = name.split(".")
        if name in names:
            tensors[names[name]] = t
            continue
        if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
            reject(f"{path}: unexpected tensor {name} (not part of a Mixtral)")
        pre, kind = f"model.layers.{parts[1]}.", parts[2]
        if kind in per_block and len(parts) == 4:
            hd = c["head_dim"] if kind in ("attn_q", "attn_k") else None
            tensors[pre + per_block[kind] + ".weight"] = GgufTensor(name, path, gtype, shape, t.offset, unpermute=hd)
        elif kind.endswith("_exps") and kind[:-5] in experts and len(shape) == 3:
            for e in range(shape[0]):
                tensors[pre + f"block_sparse_moe.experts.{e}.{experts[kind[:-5]]}.weight"] = \
                    GgufTensor(name, path, gtype, shape, t.offset, expert=e)
        elif kind in experts and len(parts) == 5 and parts[3].isdigit():
            tensors[pre + f"block_sparse_moe.experts.{parts[3]}.{experts[kind]}.weight"] = t
        else:
            reject(f"{path}: unexpected tensor {name} (not part of a Mixtral)")
    c["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return c, pieces, flags, unk_id, tensors



def f32_to_bf16(x):
    """Round to nearest even, as torch does; NaN stays NaN."""
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = 0x7FC0
    return r


# ----------------------------------------------------------------------------
# tokenizer.model: a sentencepiece ModelProto, parsed by hand

def pb_fields(buf, where):
    """Yields (field_number, wire_type, value) of one protobuf message."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                reject(f"{where}: malformed protobuf")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            if i + 8 > n:
                reject(f"{where}: malformed protobuf")
            yield field, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            ln = varint()
            if i + ln > n:
                reject(f"{where}: malformed protobuf")
            yield field, wire, buf[i:i + ln]
            i += ln
        elif wire == 5:
            if i + 4 > n:
                reject(f"{where}: malformed protobuf")
            yield field, wire, buf[i:i + 4]
            i += 4
        else:
            reject(f"{where}: malformed protobuf (wire type {wire})")


def read_tokenizer(model_dir):
    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(path):
        reject(f"{path}: missing (mixtral.c needs the sentencepiece tokenizer.model)")
    with open(path, "rb") as f:
        buf = f.read()
    pieces = []
    model_type, byte_fallback, unk_id = 1, False, 0
    add_dummy_prefix, remove_extra_ws, normalizer = True, True, "nmt_nfkc"
    for field, wire, val in pb_fields(buf, path):
        if field == 1 and wire == 2:  # SentencePiece
            piece, score, ptype = b"", 0.0, PIECE_NORMAL
            for f2, w2, v2 in pb_fields(val, path):
                if f2 == 1 and w2 == 2:
                    piece = bytes(v2)
                elif f2 == 2 and w2 == 5:
                    (score,) = struct.unpack("<f", v2)
                elif f2 == 3 and w2 == 0:
                    ptype = v2
            pieces.append((piece, score, ptype))
        elif field == 2 and wire == 2:  # TrainerSpec
            for f2, w2, v2 in pb_fields(val, path):
                if f2 == 3 and w2 == 0:
                    model_type = v2
                elif f2 == 35 and w2 == 0:
                    byte_fallback = bool(v2)
                elif f2 == 40 and w2 == 0:
                    unk_id = v2
        elif field == 3 and wire == 2:  # NormalizerSpec
            for f2, w2, v2 in pb_fields(val, path):
                if f2 == 1 and w2 == 2:
                    normalizer = bytes(v2).decode("utf-8", "replace")
                elif f2 == 3 and w2 == 0:
                    add_dummy_prefix = bool(v2)
                elif f2 == 4 and w2 == 0:
                    remove_extra_ws = bool(v2)
    if not pieces:
        reject(f"{path}: no pieces (not a sentencepiece model?)")
    if model_type != 2:
        reject(f"{path}: sentencepiece model_type {model_type} is not BPE (2)")
    if normalizer != "identity" or remove_extra_ws:
        print(f"export.py: warning: {path} asks for normalizer {normalizer!r} "
              f"(remove_extra_whitespaces={remove_extra_ws}); mixtral.c applies none", file=sys.stderr)
    for p, _, t in pieces:
        if len(p) > 65535 or t not in (1, 2, 3, 4, 5, 6):
            reject(f"{path}: malformed piece {p[:40]!r} (type {t})")
    flags = (TOK_ADD_DUMMY_PREFIX * add_dummy_prefix | TOK_BYTE_FALLBACK * byte_fallback
             | TOK_REMOVE_EXTRA_WS * remove_extra_ws)
    return pieces, flags, unk_id


def tokenizer_blob(pieces, flags, unk_id, vocab_size, path):
    if len(pieces) > vocab_size:
        reject(f"{path}: {len(pieces)} pieces but config.json vocab_size is {vocab_size}")
    if not -2**31 <= unk_id < 2**31:
        reject(f"{path}: unk_id {unk_id} is out of range")
    for i, (p, _, ptype) in enumerate(pieces):  # what mixtral.c's tokenizer_init checks
        if ptype == PIECE_BYTE and not re.fullmatch(rb"<0x[0-9A-F]{2}>", p):
            reject(f"{path}: piece {i} is a byte piece but reads {short(p)}, not <0xXX>")
    # A config may pad the vocabulary past the tokenizer: those ids decode to nothing.
    pieces = pieces + [(b"", 0.0, PIECE_UNUSED)] * (vocab_size - len(pieces))
    out = [struct.pack("<IIiI", len(pieces), flags, unk_id, max(len(p) for p, _, _ in pieces))]
    for p, score, ptype in pieces:
        out.append(struct.pack("<fHH", score, ptype, len(p)) + p)
    return b"".join(out)


# ----------------------------------------------------------------------------
# The tensor order: written once here, mirrored once in mixtral.c

def tensor_plan(c):
    """(checkpoint name, shape, kind) in file order; kind is one of MATRIX_KINDS,
    or None for the vectors and the router, which are always f32."""
    d, h, kv = c["dim"], c["hidden_dim"], c["n_kv_heads"] * c["head_dim"]
    q = c["n_heads"] * c["head_dim"]
    plan = [("model.embed_tokens.weight", (c["vocab_size"], d), "embed")]
    for l in range(c["n_layers"]):
        p = f"model.layers.{l}."
        plan += [
            (p + "input_layernorm.weight", (d,), None),
            (p + "self_attn.q_proj.weight", (q, d), "wq"),
            (p + "self_attn.k_proj.weight", (kv, d), "wk"),
            (p + "self_attn.v_proj.weight", (kv, d), "wv"),
            (p + "self_attn.o_proj.weight", (d, q), "wo"),
            (p + "post_attention_layernorm.weight", (d,), None),
            (p + "block_sparse_moe.gate.weight", (c["n_experts"], d), None),
        ]
        for e in range(c["n_experts"]):
            pe = p + f"block_sparse_moe.experts.{e}."
            # an expert's three matrices sit together: w1 and w3 read the same input
            plan += [(pe + "w1.weight", (h, d), "w1"), (pe + "w3.weight", (h, d), "w3"),
                     (pe + "w2.weight", (d, h), "w2")]
    plan += [("model.norm.weight", (d,), None)]
    lm = "model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"
    plan += [(lm, (c["vocab_size"], d), "lm_head")]
    return plan


# What each --type means: the weight type of each kind of matrix, the per-tensor choice in one place.
RECIPES = {
    "f32": {k: F32 for k in MATRIX_KINDS},
    "bf16": {k: BF16 for k in MATRIX_KINDS},
    "q8": {k: Q8 for k in MATRIX_KINDS},
    "q4": dict({k: Q4 for k in MATRIX_KINDS}, embed=Q6, lm_head=Q8),
    # the experts in 3 or 2 bits; attention, which every token reads, in q4
    "q3": dict({k: Q3 for k in MATRIX_KINDS}, wq=Q4, wk=Q4, wv=Q4, wo=Q4, embed=Q6, lm_head=Q8),
    "q2": dict({k: Q2 for k in MATRIX_KINDS}, wq=Q4, wk=Q4, wv=Q4, wo=Q4, embed=Q4, lm_head=Q4),
}


def tensor_bytes(shape, wtype):
    if len(shape) == 1:
        return 4 * shape[0]
    rows, cols = shape
    if wtype == F32:
        return 4 * rows * cols
    if wtype == BF16:
        return 2 * rows * cols
    groups = (rows + ROWS - 1) // ROWS
    if wtype in CODED:
        return groups * (32 + cols // BLOCK * CODED_BLOCK_BYTES[wtype])
    return groups * {Q8: 17, Q6: 13, Q4: 9}[wtype] * cols


def align(x, a):
    return (x + a - 1) // a * a


def check_limits(c, where):
    """The loader's bounds (LIMITS), for a config from config.json or from a GGUF."""
    for key, limit in LIMITS.items():
        v = c[key]
        lo, hi = limit if isinstance(limit, tuple) else (1, limit)
        if not lo <= v <= hi:
            reject(f"{where}: {key} = {short(v)} is outside what mixtral.c reads ({lo:g}..{hi:g})")
    if c["max_seq_len"] > 2**31 - 1 or c["sliding_window"] > 2**31 - 1:
        reject(f"{where}: max_seq_len {c['max_seq_len']} or sliding_window {c['sliding_window']} is too large")


def check_counts(c, tensors):
    """Before any work whose size the config sets: the checkpoint has the layers, experts and
    embedding that config.json describes (a config that claims a million layers stops here)."""
    names = [n for n in tensors if not n.endswith("rotary_emb.inv_freq")]
    want = 2 + (not c["tie_word_embeddings"]) + c["n_layers"] * (7 + 3 * c["n_experts"])
    if want > 2 * len(names) + 64:  # near the count, check_tensors names what is missing
        reject(f"checkpoint: {len(names)} tensors, but a Mixtral with the config's {c['n_layers']} layers and "
            f"{c['n_experts']} experts has {want}")
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None or tuple(emb.shape) != (c["vocab_size"], c["dim"]):
        reject(f"checkpoint: model.embed_tokens.weight has shape {short(None if emb is None else list(emb.shape))}, "
            f"the config implies {[c['vocab_size'], c['dim']]}")


def check_tensors(c, tensors):
    plan = tensor_plan(c)
    wanted = {name for name, _, _ in plan}
    for name, shape, _ in plan:
        t = tensors.get(name)
        if t is None:
            reject(f"checkpoint: missing tensor {name}")
        if tuple(t.shape) != shape:
            reject(f"{t.path}: tensor {name} has shape {list(t.shape)}, config.json implies {list(shape)}")
    for name, t in tensors.items():
        # old checkpoints carry the rotary tables as buffers: they are recomputed, not read
        if name not in wanted and not name.endswith("rotary_emb.inv_freq"):
            reject(f"{t.path}: unexpected tensor {name} (not part of a Mixtral model with this config.json)")
    return plan


# ----------------------------------------------------------------------------
# The quantizers: q8, q6, q4 rows and their packing into groups (the layout above)

def to_f16(x):
    """float64 -> the nearest f16 and its value as float64; scales too large for f16 are an error."""
    h = x.astype(np.float16)
    if not np.isfinite(h).all():
        reject("a quantization scale exceeds the f16 range (weights above 8e6 in magnitude)")
    return h, h.astype(np.float64)


def quantize_rows(x, wtype):
    """x (rows, cols) f32 -> (q (rows, cols) int, scales (rows, cols/B) f16): w ~ q * scale.
    q8: scale = max|x| / 127, rounded to f16, q = round(x / scale), as llama.cpp's Q8_0.
    q4: q in -8..7; of several scales (the block's value of largest magnitude mapping to -8,
    -7.75, ..., -6.5) and each one's least-squares refit, the one with the least squared error.
    q6: q in -32..31, the same search (-32, -31.5, ..., -29)."""
    rows, cols = x.shape
    g = x.reshape(rows, cols // BLOCK, BLOCK).astype(np.float64)
    if wtype == Q8:
        h, d = to_f16(np.abs(g).max(-1) / 127.0)
        q = np.clip(np.rint(g / np.where(d == 0, 1, d)[..., None]), -127, 127)
        return q.reshape(rows, cols), h
    g = g.astype(np.float32)
    big = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    best_err = np.full(big.shape, np.inf, np.float32)
    best_q = np.zeros(g.shape, np.float32)
    best_h = np.zeros(big.shape, np.float16)
    lo = -8 if wtype == Q4 else -32
    for div in (1.0, 0.96875, 0.9375, 0.90625, 0.875, 0.8125):
        h, d = to_f16(big / np.float32(lo * div))
        d = d.astype(np.float32)
        q = np.clip(np.rint(g / np.where(d == 0, 1, d)[..., None]), lo, -lo - 1)
        qq = np.einsum("...i,...i->...", q, q)
        refit = np.where(qq > 0, np.einsum("...i,...i->...", g, q) / np.where(qq > 0, qq, 1), 0)
        for h2, d2 in ((h, d), to_f16(refit)):
            d2 = d2.astype(np.float32)
            r = g - d2[..., None] * q
            err = np.einsum("...i,...i->...", r, r)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_q[better] = q[better]
            best_h = np.where(better, h2, best_h)
    return best_q.reshape(rows, cols), best_h


def nibble_chunks(u):
    """u (G, 16, nb, 32) values 0..15 -> q4's 4 chunks a block: (G, nb, chunk, row, 4) bytes."""
    G, _, nb, _ = u.shape
    u = u.reshape(G, ROWS, nb, 4, 2, 4)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).transpose(0, 2, 3, 1, 4)


def pack_groups(q, h, wtype):
    """q (16G, cols), scales (16G, cols/B) -> the G groups' bytes, in the layout above."""
    rows, cols = q.shape
    G, nb = rows // ROWS, cols // BLOCK
    scales = h.astype("<f2").reshape(G, ROWS, nb).transpose(0, 2, 1).reshape(G, -1).view(np.uint8)
    if wtype == Q8:
        u = (q + 128).astype(np.uint8).reshape(G, ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4)
    elif wtype == Q6:  # the low nibbles as q4's, then the top 2 bits of 16 weights a byte
        u = (q + 32).astype(np.uint8).reshape(G, ROWS, nb, 32)
        hi = (u >> 4).reshape(G, ROWS, nb, 2, 4, 4)  # (.., h, k, i): weight 16h + 4k + i
        hi = (hi[..., 0, :] | hi[..., 1, :] << 2 | hi[..., 2, :] << 4 | hi[..., 3, :] << 6).transpose(0, 2, 3, 1, 4)
        u = np.concatenate([nibble_chunks(u & 15).reshape(G, nb, -1), hi.reshape(G, nb, -1)], axis=2)
    else:
        u = nibble_chunks((q + 8).astype(np.uint8).reshape(G, ROWS, nb, 32))
    return np.concatenate([scales, u.reshape(G, -1)], axis=1).tobytes()


# q3 and q2 (kernels.h): a code per weight into a codebook of int8 levels, one
# of 16 per row and sub-block (the Lloyd-Max levels of a normal distribution at
# 16 scales, each 0.9 times the next), and an f16 scale per row. The same
# tables as kernels.c's q3_levels and q2_levels.
Q2_LEVELS = ([[-26, -8, 8, 26], [-29, -9, 9, 29], [-32, -10, 10, 32], [-36, -11, 11, 36],
                      [-40, -12, 12, 40], [-44, -13, 13, 44], [-49, -15, 15, 49], [-55, -16, 16, 55],
                      [-61, -18, 18, 61], [-67, -20, 20, 67], [-75, -22, 22, 75], [-83, -25, 25, 83],
                      [-93, -28, 28, 93], [-103, -31, 31, 103], [-114, -34, 34, 114], [-127, -38, 38, 127]])
Q3_LEVELS = ([[-26, -16, -9, -3, 3, 9, 16, 26], [-29, -18, -10, -3, 3, 10, 18, 29],
                      [-32, -20, -11, -4, 4, 11, 20, 32], [-36, -22, -13, -4, 4, 13, 22, 36],
                      [-40, -25, -14, -5, 5, 14, 25, 40], [-44, -28, -16, -5, 5, 16, 28, 44],
                      [-49, -31, -17, -6, 6, 17, 31, 49], [-55, -34, -19, -6, 6, 19, 34, 55],
                      [-61, -38, -21, -7, 7, 21, 38, 61], [-67, -42, -24, -8, 8, 24, 42, 67],
                      [-75, -47, -26, -9, 9, 26, 47, 75], [-83, -52, -29, -9, 9, 29, 52, 83],
                      [-93, -58, -33, -11, 11, 33, 58, 93], [-103, -64, -36, -12, 12, 36, 64, 103],
                      [-114, -71, -40, -13, 13, 40, 71, 114], [-127, -79, -45, -14, 14, 45, 79, 127]])
CODED_LEVELS = {Q3: Q3_LEVELS, Q2: Q2_LEVELS}
CODED_SUB = {Q3: 32, Q2: 16}  # weights that share a codebook
CODED_BLOCK_BYTES = {Q3: 200, Q2: 144}  # books and codes of one block of 32 weights of 16 rows
BOOK_STEP = 0.9  # each book's scale over the next one's


def nearest_level(g, lev):
    """g (..., n) values, lev (..., L) sorted levels -> (the index of the nearest level of each value,
    the level), a comparison with each midpoint at a time."""
    code = np.zeros(g.shape, np.int8)
    value = np.broadcast_to(lev[..., :1], g.shape).astype(np.float32)
    for k in range(lev.shape[-1] - 1):
        above = g > ((lev[..., k] + lev[..., k + 1]) * 0.5)[..., None]
        code += above
        value = value + above * (lev[..., k + 1] - lev[..., k])[..., None]
    return code, value


def quantize_coded(x, wtype, imp=None):
    """x (rows, cols) f32 -> (d (rows,) f16, books (rows, cols/sub) ints, codes (rows, cols) ints):
    w ~ d[row] * levels[book][code]. The error is weighted by imp (cols,), the importance of each
    input column (the mean squared activation it sees, --imatrix), or equal. Each sub-block's best
    scale for the top book's levels (weighted least squares, from the scale that maps its largest
    weight to the top level); the row's scale makes the largest of them the top book; then of the
    books nearest each sub-block's scale, the one with the least weighted error."""
    levels = np.array(CODED_LEVELS[wtype], np.float32)
    sub = CODED_SUB[wtype]
    rows, cols = x.shape
    g = x.reshape(rows, cols // sub, sub).astype(np.float32)
    w = np.ones((1, 1, sub), np.float32) if imp is None else imp.reshape(1, cols // sub, sub).astype(np.float32)
    top = levels[15]
    s = np.abs(g).max(-1) / top[-1]
    for _ in range(2):  # assign to the nearest level, refit the scale
        _, q = nearest_level(g / np.where(s > 0, s, 1)[..., None], top)
        num, den = (w * g * q).sum(-1), (w * q * q).sum(-1)
        s = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1), s)
    h, d = to_f16(s.max(1))
    d = d.astype(np.float32)
    dsafe = np.where(d > 0, d, 1)[:, None]
    ratio = np.maximum(s / dsafe, 1e-6)
    c0 = np.clip(np.rint(15 - np.log(ratio) / np.log(BOOK_STEP)), 0, 15).astype(np.int64)
    best_err = np.full(s.shape, np.inf, np.float32)
    books = np.zeros(s.shape, np.int64)
    codes = np.zeros(g.shape, np.int64)
    for delta in (-1, 0, 1):
        c = np.clip(c0 + delta, 0, 15)
        lev = levels[c] * d[:, None, None]
        code, value = nearest_level(g, lev)
        r = g - value
        err = (w * r * r).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        books = np.where(better, c, books)
        codes = np.where(better[..., None], code, codes)
    return h, books, codes.reshape(rows, cols)


def pack_coded(h, books, codes, wtype):
    """Row scales (16G,) f16, books (16G, cols/sub), codes (16G, cols) -> the G groups' bytes."""
    rows, cols = codes.shape
    G, nb = rows // ROWS, cols // BLOCK
    scales = h.astype("<f2").reshape(G, ROWS).view(np.uint8)
    lo = (codes & 3).astype(np.uint8).reshape(G, ROWS, nb, 2, 4, 4)  # (g, l, b, chunk, j, i)
    lo = (lo[..., 0, :] | lo[..., 1, :] << 2 | lo[..., 2, :] << 4 | lo[..., 3, :] << 6)  # (g, l, b, chunk, i)
    lo = lo.transpose(0, 2, 3, 1, 4).reshape(G, nb, 128)
    if wtype == Q2:
        bk = books.astype(np.uint8).reshape(G, ROWS, nb, 2)
        bk = (bk[..., 0] | bk[..., 1] << 4).transpose(0, 2, 1)  # (g, b, l)
        blocks = np.concatenate([bk, lo], axis=2)
    else:
        bk = books.astype(np.uint8).reshape(G, ROWS // 2, 2, nb)
        bk = (bk[:, :, 0] | bk[:, :, 1] << 4).transpose(0, 2, 1)  # (g, b, l/2)
        top = (codes >> 2 & 1).astype(np.uint8).reshape(G, ROWS, nb, 8, 4)  # (g, l, b, s, i)
        top = sum(top[..., k, :] << k for k in range(8)).astype(np.uint8)  # (g, l, b, i)
        top = top.transpose(0, 2, 1, 3).reshape(G, nb, 64)
        blocks = np.concatenate([bk, lo, top], axis=2)
    return np.concatenate([scales, blocks.reshape(G, -1)], axis=1).tobytes()


def require_numpy(what):
    if np is None:
        reject(f"{what} needs numpy, which this Python lacks (Debian: apt-get install python3-numpy; or run export.py "
               f"with a Python that has it)")


def write_without_numpy(out, f, t, rows, cols, step, wtype):
    """A bf16 or f32 tensor of a safetensors checkpoint written as bf16 (bits copied) or f32, with
    the standard library alone: what the demo model's bf16 export needs."""
    if wtype not in (F32, BF16) or t.dtype not in ("BF16", "F32") or (wtype == BF16 and t.dtype != "BF16") \
            or sys.byteorder != "little":
        require_numpy(f"--type {TYPE_NAMES[wtype]} of {t.dtype} tensors")
    for r0 in range(0, rows, step):
        nr = min(step, rows - r0)
        raw = t._raw(f, r0, nr)
        if t.dtype == "BF16":
            bits = array("H", raw)
            if any(b & 0x7F80 == 0x7F80 for b in bits):  # exponent all ones: NaN or infinity
                reject(f"{t.path}: tensor {t.name} holds NaN or infinite values")
            out.write(raw if wtype == BF16 else array("I", (b << 16 for b in bits)).tobytes())
        else:
            if any(b & 0x7F800000 == 0x7F800000 for b in array("I", raw)):
                reject(f"{t.path}: tensor {t.name} holds NaN or infinite values")
            out.write(raw)


def write_tensor(out, files, t, shape, wtype, imp=None):
    """Streams one tensor of any source into `out` as wtype, converting a slice of rows at a time;
    imp: the importance of each input column for q3/q2's rounding (--imatrix), or None."""
    f = files.get(t.path)
    if f is None:
        f = files[t.path] = open(t.path, "rb")
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    step = max(1, CHUNK_ELEMS // cols)
    if t.lossy_to(wtype) and (t.dtype, wtype) not in WARNED:
        WARNED.add((t.dtype, wtype))
        print(f"export.py: warning: {t.dtype} tensors of the GGUF (the first: {t.name}) are converted to "
              f"{TYPE_NAMES[wtype]} with rounding; the others carry over exactly",
              file=sys.stderr)

    if np is None:
        return write_without_numpy(out, f, t, rows, cols, step, wtype)

    def finite_rows(r0, nr):
        x = t.rows_f32(f, r0, nr).reshape(nr, cols)
        if not np.isfinite(x).all():
            reject(f"{t.path}: tensor {t.name} holds NaN or infinite values")
        return x

    if wtype in QUANT:
        step = max(ROWS, step // {Q8: 1, Q6: 4, Q4: 4}.get(wtype, 8) // ROWS * ROWS)  # the searches: smaller slices
        for r0 in range(0, rows, step):
            nr = min(step, rows - r0)
            pad = -nr % ROWS  # the last group: zero rows
            stored = t.q8_rows(f, r0, nr) if wtype == Q8 else None
            if stored is not None:  # Q8_0 to q8 carries over exactly: the same blocks
                q, h = stored
                if not np.isfinite(h).all():
                    reject(f"{t.path}: tensor {t.name} holds NaN or infinite scales")
                q, h = np.vstack([q, np.zeros((pad, cols), np.int8)]), np.vstack([h, np.zeros((pad, cols // BLOCK), "<f2")])
                out.write(pack_groups(q.astype(np.int32), h, wtype))
                continue
            x = finite_rows(r0, nr)
            if pad:
                x = np.vstack([x, np.zeros((pad, cols), np.float32)])
            if wtype in CODED:
                out.write(pack_coded(*quantize_coded(x, wtype, imp), wtype))
                continue
            q, h = quantize_rows(x, wtype)
            out.write(pack_groups(q, h, wtype))
        return
    for r0 in range(0, rows, step):
        nr = min(step, rows - r0)
        raw = t.bf16_bits(f, r0, nr) if wtype == BF16 else None
        if raw is not None:  # bf16 to bf16: copy the bits
            if ((np.frombuffer(raw, "<u2") & 0x7F80) == 0x7F80).any():  # exponent all ones: NaN or infinity
                reject(f"{t.path}: tensor {t.name} holds NaN or infinite values")
            out.write(raw)
            continue
        x = finite_rows(r0, nr).ravel()
        out.write(f32_to_bf16(x).tobytes() if wtype == BF16 else x.astype("<f4").tobytes())


# ----------------------------------------------------------------------------
# The importance matrix (mixtral --perplexity TEXT --imatrix FILE): for every matrix
# the products read, the mean squared activation of each input column over a text.
#   "MXIMATRX", u32 version 1, u32 n, u64 tokens of text,
#   n times: u16 name bytes, the Hugging Face name, u32 cols, u64 tokens, f32 (cols,)

IMATRIX_MAGIC = b"MXIMATRX"


def read_imatrix(path, plan):
    require_numpy("--imatrix")
    return _read_imatrix(path, plan)


def _read_imatrix(path, plan):
    """{(checkpoint name, kind): importance (cols,) float32, or None where no token reached it} for the
    matrices of the plan that are multiplied (all but the embedding), in the plan's order; a file
    for another model is refused naming the first tensor that does not match."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        reject(f"cannot read the importance matrix {path}: {e.strerror or e}")
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(data):
            reject(f"{path}: truncated or malformed importance matrix (byte {pos})")
        pos += n
        return data[pos - n:pos]

    if take(8) != IMATRIX_MAGIC:
        reject(f"{path} is not an importance matrix of mixtral.c (make one with: mixtral MODEL.bin --perplexity "
               f"TEXT --imatrix {path})")
    version, n, _ = struct.unpack("<IIQ", take(16))
    if version != 1:
        reject(f"{path}: importance matrix version {version}, this export.py reads version 1")
    wanted = [("lm_head.weight" if kind == "lm_head" else name, (name, kind), shape) for name, shape, kind in plan
              if kind is not None and kind != "embed"]
    out = {}
    for i in range(max(n, len(wanted))):
        if i >= n or i >= len(wanted):
            which = wanted[i][0] if i < len(wanted) else "(an extra entry)"
            reject(f"{path} was made for another model: it has {n} matrices where this one has {len(wanted)} "
                   f"(first without a match: {which})")
        (length,) = struct.unpack("<H", take(2))
        name = take(length).decode("utf-8", "replace")
        cols, tokens = struct.unpack("<IQ", take(12))
        values = np.frombuffer(take(4 * cols), "<f4")
        key, plan_key, shape = wanted[i]
        if name != key or cols != shape[1]:
            reject(f"{path} was made for another model: {key} ({shape[1]} input columns) does not match its "
                   f"entry {short(name)} ({cols} columns)")
        if not np.isfinite(values).all() or (values < 0).any():
            reject(f"{path}: {name} holds negative, NaN or infinite values")
        out[plan_key] = values.astype(np.float32) + 1e-6 * float(values.mean()) if tokens and values.any() else None
    if pos != len(data):
        reject(f"{path}: {len(data) - pos} bytes after the last matrix")
    return out


# ----------------------------------------------------------------------------
# --fit SIZE: the type of each kind of matrix for the least loss in SIZE bytes
#
# The loss of a choice is estimated as the sum over kinds of SENSITIVITY[kind]
# times the number of such matrices on a token's path (one a layer, the
# embedding and lm_head once) times the relative error of the kind's type,
# sum(imp (w - w_q)^2) / sum(imp w^2), measured by quantizing a sample of the
# kind's first matrix (imp: the importance matrix, or equal weights). From the
# cheapest choice, the step that buys the most loss a byte is taken, as long as
# the file fits.

FIT_CHOICES = {kind: (Q2, Q3, Q4, Q8, BF16) for kind in MATRIX_KINDS}
FIT_CHOICES["embed"] = (Q2, Q3, Q4, Q6, Q8, BF16)
# How much a relative error of each kind moves the output: KL per unit of
# relative error, each kind alone in q2 and the rest in bf16, on the demo model
# (README, "2 and 3 bits"), relative to w1's and rounded: the logits take
# lm_head's error straight, the embedding's reaches every layer, and a key's
# error every attention score of its head.
SENSITIVITY = dict(embed=25.0, wq=3.0, wk=10.0, wv=1.5, wo=1.0, w1=1.0, w3=1.0, w2=1.0, lm_head=500.0)
FIT_SAMPLE_ROWS = 64


def parse_size(text):
    """"14G", "800M", "4096K" or a number of bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)\s*", text or "")
    if not m:
        reject(f"--fit: expected a size such as 14G, 800M or a number of bytes, got {short(text, 40)}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def relative_error(x, wtype, imp):
    """The importance-weighted relative squared error of rows x (a multiple of 16) stored as wtype."""
    if wtype in (F32, BF16):
        y = (f32_to_bf16(x.ravel()).astype(np.uint32) << 16).view(np.float32).reshape(x.shape) if wtype == BF16 else x
    elif wtype in CODED:
        h, books, codes = quantize_coded(x, wtype, imp)
        lev = np.array(CODED_LEVELS[wtype], np.float32)
        sub = CODED_SUB[wtype]
        b = np.repeat(books, sub, axis=1)
        y = lev[b, codes] * h.astype(np.float32)[:, None]
    else:
        q, h = quantize_rows(x, wtype)
        y = q * np.repeat(h.astype(np.float32), BLOCK, axis=1)
    w = np.ones(x.shape[1], np.float32) if imp is None else imp
    return float((w * (x - y) ** 2).sum() / max((w * x * x).sum(), 1e-30))


def fit_types(plan, tensors, importance, size, start, c):
    """{kind: type} of the least estimated loss whose file fits in size bytes; prints the choice."""
    require_numpy("--fit")
    per_path = {kind: (1 if kind in ("embed", "lm_head") else c["n_layers"]) for kind in MATRIX_KINDS}
    err, files = {}, {}
    try:
        for kind in MATRIX_KINDS:
            name, shape, _ = next(p for p in plan if p[2] == kind)
            t = tensors[name]
            f = files.get(t.path) or files.setdefault(t.path, open(t.path, "rb"))
            rows = min(FIT_SAMPLE_ROWS, shape[0]) // ROWS * ROWS or shape[0]
            x = t.rows_f32(f, 0, rows).reshape(rows, shape[1]).astype(np.float32)
            if rows % ROWS:
                x = np.vstack([x, np.zeros((-rows % ROWS, shape[1]), np.float32)])
            imp = importance.get((name, kind)) if kind != "embed" else None
            err[kind] = {ty: relative_error(x, ty, imp) for ty in FIT_CHOICES[kind]}
    finally:
        for f in files.values():
            f.close()

    def file_size(kinds):
        at = start
        for _, shape, kind in plan:
            at = align(at, TENSOR_ALIGN) + tensor_bytes(shape, F32 if kind is None else kinds[kind])
        return at

    def loss(kind, ty):
        return SENSITIVITY[kind] * per_path[kind] * err[kind][ty]

    kinds = {kind: FIT_CHOICES[kind][0] for kind in MATRIX_KINDS}
    if file_size(kinds) > size:
        reject(f"--fit: {size} bytes is less than the smallest file of this model, {file_size(kinds)} bytes "
               f"(everything {TYPE_NAMES[Q2]})")
    while True:
        now, best = file_size(kinds), None
        for kind in MATRIX_KINDS:
            for ty in FIT_CHOICES[kind][FIT_CHOICES[kind].index(kinds[kind]) + 1:]:
                grown = file_size(dict(kinds, **{kind: ty}))
                gain = loss(kind, kinds[kind]) - loss(kind, ty)
                if grown <= size and gain > 0:
                    value = gain / max(grown - now, 1)
                    if best is None or value > best[0]:
                        best = (value, kind, ty)
        if best is None:
            break
        kinds[best[1]] = best[2]
    total = file_size(kinds)
    print(f"export.py --fit {size}: " + " ".join(f"{k} {TYPE_NAMES[kinds[k]]}" for k in MATRIX_KINDS) +
          f"; {total} bytes ({total / 1024 ** 3:.3f} GiB); estimated loss " +
          f"{sum(loss(k, kinds[k]) for k in MATRIX_KINDS):.4g}", file=sys.stderr)
    return kinds


# ----------------------------------------------------------------------------
# Sources: a Hugging Face folder or a GGUF, read through the same three methods:
# config() (the dictionary read_config returns), tokenizer() ((pieces, flags,
# unk_id), as read_tokenizer returns them) and tensors() ({Hugging Face name:
# tensor}, each tensor with the methods of SafetensorsTensor).

class HfFolder:
    def __init__(self, path):
        self.path = path
        self.tokenizer_path = os.path.join(path, "tokenizer.model")

    def config(self):
        return read_config(self.path)

    def tensors(self):
        return read_checkpoint_index(self.path)

    def tokenizer(self):
        return read_tokenizer(self.path)


class GgufFile:
    def __init__(self, path):
        self.path = self.tokenizer_path = path
        self._config, pieces, flags, unk_id, self._tensors = read_gguf(path)
        self._tokenizer = (pieces, flags, unk_id)

    def config(self):
        return self._config

    def tensors(self):
        return self._tensors

    def tokenizer(self):
        return self._tokenizer


def open_source(path):
    return GgufFile(path) if os.path.isfile(path) else HfFolder(path)


# ----------------------------------------------------------------------------
# The writer

def parse_matrix_types(spec):
    """--matrix-types "w1=q2,lm_head=q8" -> {kind: type}."""
    out = {}
    for item in spec.split(","):
        kind, _, name = item.strip().partition("=")
        if kind not in MATRIX_KINDS or name not in TYPE_NAMES:
            reject(f"--matrix-types: {short(item, 40)} is not KIND=TYPE with KIND one of {', '.join(MATRIX_KINDS)} and "
                   f"TYPE one of {', '.join(TYPE_NAMES)}")
        if TYPE_NAMES.index(name) == Q6 and kind != "embed":
            reject(f"--matrix-types: q6 is for the embedding, which is looked up, not multiplied ({kind}=q6)")
        out[kind] = TYPE_NAMES.index(name)
    return out


def export(model_dir, out_path, type_name, imatrix_path=None, matrix_types=None, fit=None):
    wtype = TYPE_NAMES.index(type_name)
    kinds = dict(RECIPES[type_name], **(matrix_types or {}))
    source = open_source(model_dir)
    c = source.config()
    check_limits(c, model_dir)
    quantized = any(ty in QUANT for ty in kinds.values()) or fit is not None
    block = BLOCK if quantized else 0
    if block:
        for key, v in (("hidden_size", c["dim"]), ("intermediate_size", c["hidden_dim"]),
                       ("num_attention_heads * head_dim", c["n_heads"] * c["head_dim"])):
            if v % block:
                reject(f"config.json: {key} = {v} is not a multiple of {block}, which --type {type_name} needs; "
                       f"use --type bf16")
    tensors = source.tensors()
    check_counts(c, tensors)
    pieces, flags, unk_id = source.tokenizer()
    tok = tokenizer_blob(pieces, flags, unk_id, c["vocab_size"], source.tokenizer_path)
    plan = check_tensors(c, tensors)
    importance = read_imatrix(imatrix_path, plan) if imatrix_path else {}
    if fit is not None:
        kinds = fit_types(plan, tensors, importance, fit, align(HEADER_SIZE + len(tok), WEIGHTS_ALIGN), c)
        wtype = kinds["w1"]  # the file's name: its experts' type
        quantized = any(ty in QUANT for ty in kinds.values())
        block = BLOCK if quantized else 0
    tok_off = HEADER_SIZE
    w_off = align(tok_off + len(tok), WEIGHTS_ALIGN)
    size = w_off
    types = [F32 if kind is None else kinds[kind] for _, _, kind in plan]
    for (_, shape, _), ty in zip(plan, types):
        size = align(size, TENSOR_ALIGN) + tensor_bytes(shape, ty)
    header = struct.pack(HEADER_FORMAT, MAGIC, VERSION, HEADER_SIZE, wtype, block,
                         c["dim"], c["hidden_dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"],
                         c["head_dim"], c["n_experts"], c["top_k"], c["vocab_size"], c["max_seq_len"],
                         c["sliding_window"], c["bos_id"], c["eos_id"], ROWS if quantized else 0,
                         c["rope_theta"], c["rms_norm_eps"], tok_off, len(tok), w_off, size,
                         *(kinds[k] for k in MATRIX_KINDS))
    header += b"\0" * (HEADER_SIZE - len(header))

    tmp = out_path + ".partial"
    files = {}
    t0, done = time.time(), 0
    last = t0  # progress every 0.2 s on a terminal, every 10 s otherwise
    tty = sys.stderr.isatty()
    try:
        with open(tmp, "wb") as out:
            out.write(header)
            out.write(tok)
            out.write(b"\0" * (w_off - out.tell()))
            for i, ((name, shape, kind), ty) in enumerate(zip(plan, types)):
                out.write(b"\0" * (align(out.tell(), TENSOR_ALIGN) - out.tell()))
                write_tensor(out, files, tensors[name], shape, ty, importance.get((name, kind)))
                done = out.tell()
                now = time.time()
                if now - last > (0.2 if tty else 10) or i == len(plan) - 1:
                    last = now
                    msg = (f"[{i + 1}/{len(plan)}] {done / 1e9:.2f}/{size / 1e9:.2f} GB "
                           f"{done / 1e6 / max(now - t0, 1e-9):.0f} MB/s  {name}")
                    print(("\r" + msg + "\033[K") if tty else msg, end="" if tty else "\n",
                          file=sys.stderr, flush=True)
            if out.tell() != size:
                reject(f"internal error: wrote {out.tell()} bytes, header says {size}")
        if tty:
            print(file=sys.stderr)
        verify_header(tmp, header, size)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        for f in files.values():
            f.close()
    print(f"wrote {out_path}: {size / 1e9:.3f} GB, {TYPE_NAMES[wtype]}, {len(plan)} tensors, "
          f"{time.time() - t0:.1f} s", file=sys.stderr)


def verify_header(path, header, size):
    """Reads back what was written: the header, and the file size it implies."""
    with open(path, "rb") as f:
        back = f.read(HEADER_SIZE)
    fields = struct.unpack_from(HEADER_FORMAT, back)
    if back != header or fields[0] != MAGIC or fields[1] != VERSION or os.path.getsize(path) != size:
        reject(f"{path}: read-back check failed (disk full?)")


def main():
    ap = argparse.ArgumentParser(description="Export a Hugging Face Mixtral folder to one mixtral.c model file.")
    ap.add_argument("model_dir", help="Hugging Face folder: config.json, *.safetensors, tokenizer.model")
    ap.add_argument("out", help="output file, e.g. model.bin")
    ap.add_argument("--type", default="bf16", choices=sorted(RECIPES),
                    help="weight type for the matrices (default bf16)")
    ap.add_argument("--matrix-types", metavar="KIND=TYPE,...",
                    help="the type of some kinds of matrix, over --type's choice (kinds: " + " ".join(MATRIX_KINDS) + ")")
    ap.add_argument("--fit", metavar="SIZE", help="choose each kind of matrix's type for the least loss in a file of "
                    "at most SIZE bytes (K, M, G: powers of 1024), and say which")
    ap.add_argument("--imatrix", metavar="FILE", help="importance matrix (mixtral MODEL.bin --perplexity TEXT "
                    "--imatrix FILE): q3 and q2 round where it matters least")
    args = ap.parse_args()
    # SIGTERM as SIGINT: either ends the export with the partial output removed (export() cleans up)
    signal.signal(signal.SIGTERM, on_terminate)
    try:
        export(args.model_dir, args.out, args.type, args.imatrix,
               parse_matrix_types(args.matrix_types) if args.matrix_types else None,
               parse_size(args.fit) if args.fit else None)
    except KeyboardInterrupt:
        exit_with_error("interrupted; nothing was written", 130)
    except (ExportError, OSError) as e:
        exit_with_error(str(e))
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError, KeyError, IndexError,
            struct.error, UnicodeError) as e:  # malformed input none of the checks above foresaw
        exit_with_error(f"malformed input ({type(e).__name__}: {e})")


def on_terminate(sig, frame):
    raise KeyboardInterrupt


def exit_with_error(msg, status=1):
    """One bounded line on stderr, whatever the message held, then exit."""
    msg = " ".join(msg.split())
    if len(msg) > 400:
        msg = msg[:400] + "..."
    print(f"export.py: error: {msg}", file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
