#!/usr/bin/env python3
"""
export.py: turn a Hugging Face Mixtral folder into one mixtral.c model file.

    python3 export.py MODEL_DIR OUT.bin [--type f32|bf16|q8|q4]

MODEL_DIR is an unmodified Hugging Face folder: config.json, model.safetensors
(or the shards listed in model.safetensors.index.json) and tokenizer.model.
Needs only Python's standard library and numpy. Tensors are streamed a slice
at a time, so peak memory stays near one slice whatever the model size.

File layout (version 3, all little-endian). mixtral.c mirrors this once, in
its "model file" section; change both together and bump VERSION.

    header      256 bytes: HEADER_FORMAT below, zero padded
    tokenizer   u32 n_pieces, u32 flags, i32 unk_id, u32 max_piece_bytes,
                then per piece: f32 score, u16 type, u16 n_bytes, bytes
    weights     starts at a 4096-byte boundary; every tensor starts at a
                64-byte boundary, in exactly the order of tensor_plan()

Weight types of the matrices: f32 (0), bf16 (1), q8 (2), q4 (3). Norm weights
and the router (gate) are always f32. In a q4 file the embedding and lm_head
are q8: they are a small share of the bytes read per token, and the logits are
sensitive to them.

Quantized matrices (rows, cols) keep one f32 scale per block of B = 64
consecutive weights of a row (block_size in the header). Each row is its
quantized weights followed by its cols/B scales, so a row, and a run of rows,
is read as one sequential stream.
    q8: int8 q in -127..127, w = q * scale; cols bytes per row
    q4: w = (u - 8) * scale with u in 0..15; each 64 weights of a row are 32
        bytes, byte i holding weight i in its low nibble and weight i+32 in its
        high nibble; cols/2 bytes per row
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

MAGIC = b"MIXTRALC"
VERSION = 3
HEADER_SIZE = 256
# magic, version, header_size, weight_type, block_size,
# dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, n_experts, top_k,
# vocab_size, max_seq_len, sliding_window (0 = none), bos_id, eos_id, reserved,
# rope_theta, rms_norm_eps, tokenizer_offset, tokenizer_size, weights_offset, file_size
HEADER_FORMAT = "<8sIIII14iff4Q"
WEIGHTS_ALIGN = 4096
TENSOR_ALIGN = 64
WEIGHT_TYPES = {"f32": 0, "bf16": 1, "q8": 2, "q4": 3}
F32, BF16, Q8, Q4 = 0, 1, 2, 3
CHUNK_ELEMS = 1 << 24
BLOCK = 64  # q8/q4 weights per scale  # elements converted per slice: bounds peak memory

# sentencepiece piece types (sentencepiece_model.proto)
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
TOK_ADD_DUMMY_PREFIX, TOK_BYTE_FALLBACK, TOK_REMOVE_EXTRA_WS = 1, 2, 4


class ExportError(Exception):
    pass


def die(msg):
    raise ExportError(msg)


# ----------------------------------------------------------------------------
# config.json

def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        die(f"{path}: missing (a Hugging Face model folder has config.json)")
    try:
        with open(path, "rb") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        die(f"{path}: not valid JSON: {e}")
    if not isinstance(cfg, dict):
        die(f"{path}: expected a JSON object")
    if cfg.get("model_type") != "mixtral":
        die(f"{path}: model_type is {cfg.get('model_type')!r}; only 'mixtral' is supported")

    def geti(key, default=None, minimum=1):
        v = cfg.get(key, default)
        if v is None or isinstance(v, bool) or not isinstance(v, int) or v < minimum or v > 2**31 - 1:
            die(f"{path}: field {key} must be an integer >= {minimum}, got {v!r}")
        return v

    def getf(key, default):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or v == float("inf"):
            die(f"{path}: field {key} must be a positive number, got {v!r}")
        return float(v)

    c = {}
    c["dim"] = geti("hidden_size")
    c["hidden_dim"] = geti("intermediate_size")
    c["n_layers"] = geti("num_hidden_layers")
    c["n_heads"] = geti("num_attention_heads")
    c["n_kv_heads"] = geti("num_key_value_heads", c["n_heads"])
    if c["n_heads"] % c["n_kv_heads"]:
        die(f"{path}: num_attention_heads {c['n_heads']} is not a multiple of num_key_value_heads {c['n_kv_heads']}")
    if cfg.get("head_dim") is None:
        if c["dim"] % c["n_heads"]:
            die(f"{path}: hidden_size {c['dim']} is not divisible by num_attention_heads {c['n_heads']}")
        c["head_dim"] = c["dim"] // c["n_heads"]
    else:
        c["head_dim"] = geti("head_dim")
    if c["head_dim"] % 2:
        die(f"{path}: head_dim {c['head_dim']} must be even for rotary embeddings")
    c["n_experts"] = geti("num_local_experts")
    c["top_k"] = geti("num_experts_per_tok")
    if c["top_k"] > c["n_experts"]:
        die(f"{path}: num_experts_per_tok {c['top_k']} > num_local_experts {c['n_experts']}")
    c["vocab_size"] = geti("vocab_size")
    c["max_seq_len"] = geti("max_position_embeddings", 32768)
    sw = cfg.get("sliding_window")
    c["sliding_window"] = 0 if sw is None else geti("sliding_window")
    c["bos_id"] = geti("bos_token_id", 1, minimum=0)
    c["eos_id"] = geti("eos_token_id", 2, minimum=0)
    for key in ("bos_id", "eos_id"):
        if c[key] >= c["vocab_size"]:
            die(f"{path}: {key} {c[key]} is outside the vocabulary of {c['vocab_size']}")
    c["rope_theta"] = getf("rope_theta", 1e6)
    c["rms_norm_eps"] = getf("rms_norm_eps", 1e-5)
    c["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    if cfg.get("rope_scaling") not in (None, {}):
        die(f"{path}: rope_scaling {cfg['rope_scaling']!r} is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        die(f"{path}: hidden_act {act!r} is not supported (Mixtral uses silu)")
    return c


# ----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, raw data

ST_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


class Tensor:
    def __init__(self, name, path, dtype, shape, offset, nbytes):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, shape
        self.offset, self.nbytes = offset, nbytes


def read_safetensors_header(path):
    """Returns {name: Tensor} for one shard, validating every offset."""
    if not os.path.isfile(path):
        die(f"{path}: missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            die(f"{path}: truncated safetensors (no header length)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8 or hlen > 100 << 20:
            die(f"{path}: truncated or malformed safetensors (header length {hlen}, file size {size})")
        try:
            header = json.loads(f.read(hlen))
        except (ValueError, UnicodeDecodeError) as e:
            die(f"{path}: malformed safetensors header: {e}")
    if not isinstance(header, dict):
        die(f"{path}: malformed safetensors header: expected a JSON object")
    data_start = 8 + hlen
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not all(k in info for k in ("dtype", "shape", "data_offsets")):
            die(f"{path}: tensor {name}: malformed entry {info!r}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            die(f"{path}: tensor {name}: unsupported dtype {dtype} (supported: BF16, F16, F32)")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offs) or offs[0] > offs[1]):
            die(f"{path}: tensor {name}: malformed shape {shape!r} or data_offsets {offs!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dtype]
        if offs[1] - offs[0] != nbytes:
            die(f"{path}: tensor {name}: data_offsets span {offs[1] - offs[0]} bytes, shape {shape} {dtype} needs {nbytes}")
        if data_start + offs[1] > size:
            die(f"{path}: truncated safetensors: tensor {name} ends at byte {data_start + offs[1]}, file has {size}")
        tensors[name] = Tensor(name, path, dtype, shape, data_start + offs[0], nbytes)
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
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
            die(f"{index}: malformed index (need a JSON object with a weight_map): {e!r}")
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        weight_map, shards = None, ["model.safetensors"]
    else:
        die(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            die(f"{index}: bad shard name {shard!r}")
        for name, t in read_safetensors_header(os.path.join(model_dir, shard)).items():
            if name in tensors:
                die(f"{t.path}: tensor {name} also appears in {tensors[name].path}")
            if weight_map is not None and weight_map.get(name) != shard:
                die(f"{t.path}: tensor {name} is not listed for this shard in model.safetensors.index.json")
            tensors[name] = t
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                die(f"{os.path.join(model_dir, shard)}: tensor {name} listed in the index is missing")
    return tensors


def read_rows_f32(f, t, row0, nrows, ncols):
    """Rows [row0, row0+nrows) of a 2-D (or 1-D, ncols = size) tensor as float32."""
    esize = ST_DTYPES[t.dtype]
    f.seek(t.offset + row0 * ncols * esize)
    raw = f.read(nrows * ncols * esize)
    if len(raw) != nrows * ncols * esize:
        die(f"{t.path}: truncated safetensors while reading {t.name}")
    if t.dtype == "F32":
        return np.frombuffer(raw, dtype="<f4")
    if t.dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


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
                die(f"{where}: malformed protobuf")
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
                die(f"{where}: malformed protobuf")
            yield field, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            ln = varint()
            if i + ln > n:
                die(f"{where}: malformed protobuf")
            yield field, wire, buf[i:i + ln]
            i += ln
        elif wire == 5:
            if i + 4 > n:
                die(f"{where}: malformed protobuf")
            yield field, wire, buf[i:i + 4]
            i += 4
        else:
            die(f"{where}: malformed protobuf (wire type {wire})")


def read_tokenizer(model_dir):
    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(path):
        die(f"{path}: missing (mixtral.c needs the sentencepiece tokenizer.model)")
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
        die(f"{path}: no pieces (not a sentencepiece model?)")
    if model_type != 2:
        die(f"{path}: sentencepiece model_type {model_type} is not BPE (2)")
    if normalizer != "identity" or remove_extra_ws:
        print(f"export.py: warning: {path} asks for normalizer {normalizer!r} "
              f"(remove_extra_whitespaces={remove_extra_ws}); mixtral.c applies none", file=sys.stderr)
    for p, _, t in pieces:
        if len(p) > 65535 or t not in (1, 2, 3, 4, 5, 6):
            die(f"{path}: malformed piece {p[:40]!r} (type {t})")
    flags = (TOK_ADD_DUMMY_PREFIX * add_dummy_prefix | TOK_BYTE_FALLBACK * byte_fallback
             | TOK_REMOVE_EXTRA_WS * remove_extra_ws)
    return pieces, flags, unk_id


def tokenizer_blob(pieces, flags, unk_id, vocab_size, path):
    if len(pieces) > vocab_size:
        die(f"{path}: {len(pieces)} pieces but config.json vocab_size is {vocab_size}")
    # A config may pad the vocabulary past the tokenizer: those ids decode to nothing.
    pieces = pieces + [(b"", 0.0, PIECE_UNUSED)] * (vocab_size - len(pieces))
    out = [struct.pack("<IIiI", len(pieces), flags, unk_id, max(len(p) for p, _, _ in pieces))]
    for p, score, ptype in pieces:
        out.append(struct.pack("<fHH", score, ptype, len(p)) + p)
    return b"".join(out)


# ----------------------------------------------------------------------------
# The tensor order: written once here, mirrored once in mixtral.c

def tensor_plan(c):
    """(checkpoint name, shape, always_f32) in file order. Every matrix not marked
    always_f32 gets the file's weight type, except the embedding and lm_head of a
    q4 file, which are q8 (see matrix_type)."""
    d, h, kv = c["dim"], c["hidden_dim"], c["n_kv_heads"] * c["head_dim"]
    q = c["n_heads"] * c["head_dim"]
    plan = [("model.embed_tokens.weight", (c["vocab_size"], d), False)]
    for l in range(c["n_layers"]):
        p = f"model.layers.{l}."
        plan += [
            (p + "input_layernorm.weight", (d,), True),
            (p + "self_attn.q_proj.weight", (q, d), False),
            (p + "self_attn.k_proj.weight", (kv, d), False),
            (p + "self_attn.v_proj.weight", (kv, d), False),
            (p + "self_attn.o_proj.weight", (d, q), False),
            (p + "post_attention_layernorm.weight", (d,), True),
            (p + "block_sparse_moe.gate.weight", (c["n_experts"], d), True),
        ]
        for e in range(c["n_experts"]):
            pe = p + f"block_sparse_moe.experts.{e}."
            # an expert's three matrices sit together: w1 and w3 read the same input
            plan += [(pe + "w1.weight", (h, d), False), (pe + "w3.weight", (h, d), False),
                     (pe + "w2.weight", (d, h), False)]
    plan += [("model.norm.weight", (d,), True)]
    lm = "model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"
    plan += [(lm, (c["vocab_size"], d), False)]
    return plan


def matrix_type(name, wtype):
    edge = name in ("model.embed_tokens.weight", "lm_head.weight")
    return Q8 if wtype == Q4 and edge else wtype


def tensor_bytes(shape, wtype, block):
    n = int(np.prod(shape, dtype=np.int64))
    if wtype == F32:
        return 4 * n
    if wtype == BF16:
        return 2 * n
    scales = 4 * (n // block)
    return (n if wtype == Q8 else n // 2) + scales


def align(x, a):
    return (x + a - 1) // a * a


def check_tensors(c, tensors):
    plan = tensor_plan(c)
    wanted = {name for name, _, _ in plan}
    for name, shape, _ in plan:
        t = tensors.get(name)
        if t is None:
            die(f"checkpoint: missing tensor {name}")
        if tuple(t.shape) != shape:
            die(f"{t.path}: tensor {name} has shape {list(t.shape)}, config.json implies {list(shape)}")
    for name, t in tensors.items():
        # old checkpoints carry the rotary tables as buffers: they are recomputed, not read
        if name not in wanted and not name.endswith("rotary_emb.inv_freq"):
            die(f"{t.path}: unexpected tensor {name} (not part of a Mixtral model with this config.json)")
    return plan


# ----------------------------------------------------------------------------

def quantize(x, wtype, block):
    """x (rows, cols) f32 -> (quantized rows (rows, bytes) uint8, scales (rows, cols/block) f32)."""
    rows, cols = x.shape
    g = x.reshape(rows, cols // block, block).astype(np.float64)
    if wtype == Q8:
        scale = np.abs(g).max(-1) / 127.0
        q = np.rint(g / np.where(scale == 0, 1, scale)[..., None])
        return np.clip(q, -127, 127).astype(np.int8).view(np.uint8).reshape(rows, cols), scale.astype("<f4")
    # q4: the value of largest magnitude maps to -8, so the whole range -8..7 is used
    big = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    scale = big / -8.0
    q = np.rint(g / np.where(scale == 0, 1, scale)[..., None])
    u = (np.clip(q, -8, 7) + 8).astype(np.uint8).reshape(rows, cols // 64, 2, 32)
    packed = u[:, :, 0, :] | (u[:, :, 1, :] << 4)  # byte i: weight i low, weight i+32 high
    return packed.reshape(rows, cols // 2), scale.astype("<f4")


def write_tensor(out, files, t, shape, wtype, block):
    """Streams one tensor into `out`, converting a slice of rows at a time."""
    f = files.get(t.path)
    if f is None:
        f = files[t.path] = open(t.path, "rb")
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    step = max(1, CHUNK_ELEMS // cols)
    if wtype in (Q8, Q4):
        for r0 in range(0, rows, step):
            nr = min(step, rows - r0)
            q, sc = quantize(read_rows_f32(f, t, r0, nr, cols).reshape(nr, cols), wtype, block)
            # each row: its quantized weights, then its scales
            out.write(np.hstack([q, sc.view(np.uint8).reshape(nr, -1)]).tobytes())
        return
    for r0 in range(0, rows, step):
        nr = min(step, rows - r0)
        if wtype == BF16 and t.dtype == "BF16":  # bf16 to bf16: copy the bits
            f.seek(t.offset + r0 * cols * 2)
            raw = f.read(nr * cols * 2)
            if len(raw) != nr * cols * 2:
                die(f"{t.path}: truncated safetensors while reading {t.name}")
            out.write(raw)
            continue
        x = read_rows_f32(f, t, r0, nr, cols)
        out.write(f32_to_bf16(x).tobytes() if wtype == BF16 else x.astype("<f4").tobytes())


def export(model_dir, out_path, type_name):
    wtype = WEIGHT_TYPES[type_name]
    c = read_config(model_dir)
    block = BLOCK if wtype in (Q8, Q4) else 0
    if block:
        for key, v in (("hidden_size", c["dim"]), ("intermediate_size", c["hidden_dim"]),
                       ("num_attention_heads * head_dim", c["n_heads"] * c["head_dim"])):
            if v % block:
                die(f"config.json: {key} = {v} is not a multiple of {block}, which --type {type_name} needs; "
                    f"use --type bf16")
    pieces, flags, unk_id = read_tokenizer(model_dir)
    tok = tokenizer_blob(pieces, flags, unk_id, c["vocab_size"], os.path.join(model_dir, "tokenizer.model"))
    tensors = read_checkpoint_index(model_dir)
    plan = check_tensors(c, tensors)

    tok_off = HEADER_SIZE
    w_off = align(tok_off + len(tok), WEIGHTS_ALIGN)
    size = w_off
    types = [F32 if f32 else matrix_type(name, wtype) for name, _, f32 in plan]
    for (_, shape, _), ty in zip(plan, types):
        size = align(size, TENSOR_ALIGN) + tensor_bytes(shape, ty, block)
    header = struct.pack(HEADER_FORMAT, MAGIC, VERSION, HEADER_SIZE, wtype, block,
                         c["dim"], c["hidden_dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"],
                         c["head_dim"], c["n_experts"], c["top_k"], c["vocab_size"], c["max_seq_len"],
                         c["sliding_window"], c["bos_id"], c["eos_id"], 0,
                         c["rope_theta"], c["rms_norm_eps"], tok_off, len(tok), w_off, size)
    header += b"\0" * (HEADER_SIZE - len(header))

    tmp = out_path + ".partial"
    files = {}
    t0, done, last = time.time(), 0, 0.0
    tty = sys.stderr.isatty()
    try:
        with open(tmp, "wb") as out:
            out.write(header)
            out.write(tok)
            out.write(b"\0" * (w_off - out.tell()))
            for i, ((name, shape, _), ty) in enumerate(zip(plan, types)):
                out.write(b"\0" * (align(out.tell(), TENSOR_ALIGN) - out.tell()))
                write_tensor(out, files, tensors[name], shape, ty, block)
                done = out.tell()
                now = time.time()
                if now - last > (0.2 if tty else 10) or i == len(plan) - 1:
                    last = now
                    msg = (f"[{i + 1}/{len(plan)}] {done / 1e9:.2f}/{size / 1e9:.2f} GB "
                           f"{done / 1e6 / max(now - t0, 1e-9):.0f} MB/s  {name}")
                    print(("\r" + msg + "\033[K") if tty else msg, end="" if tty else "\n",
                          file=sys.stderr, flush=True)
            if out.tell() != size:
                die(f"internal error: wrote {out.tell()} bytes, header says {size}")
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
    print(f"wrote {out_path}: {size / 1e9:.3f} GB, {type_name}, {len(plan)} tensors, "
          f"{time.time() - t0:.1f} s", file=sys.stderr)


def verify_header(path, header, size):
    """Reads back what was written: the header, and the file size it implies."""
    with open(path, "rb") as f:
        back = f.read(HEADER_SIZE)
    fields = struct.unpack_from(HEADER_FORMAT, back)
    if back != header or fields[0] != MAGIC or fields[1] != VERSION or os.path.getsize(path) != size:
        die(f"{path}: read-back check failed (disk full?)")


def main():
    ap = argparse.ArgumentParser(description="Export a Hugging Face Mixtral folder to one mixtral.c model file.")
    ap.add_argument("model_dir", help="Hugging Face folder: config.json, *.safetensors, tokenizer.model")
    ap.add_argument("out", help="output file, e.g. model.bin")
    ap.add_argument("--type", default="bf16", choices=sorted(WEIGHT_TYPES),
                    help="weight type for the matrices (default bf16)")
    args = ap.parse_args()
    try:
        export(args.model_dir, args.out, args.type)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
