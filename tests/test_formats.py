"""
The weight formats: how much q8/q6/q4 lose, their layout decoded independently, GGUF
import, and the perplexity and KL-divergence tools that measure them.
"""
from harness import *  # noqa: F401,F403


@test
def quantized_quality(tmp):
    """q8 and q4 logits against f32 over 256 positions: errors and top-1 agreement."""
    d, cfg, ids, shape = random_model(tmp, 21, 256, 4, dim=256, hidden_dim=512, layers=2, heads=8, kv_heads=2, experts=8, top_k=2)
    base, base_e = engine_logits(export(d, os.path.join(tmp, "f32.bin"), "f32"), ids, **shape)
    spread = float(base.std())
    notes = []
    for wtype, (max_rms, min_top1, max_err_same) in QUANT_BOUNDS.items():
        got, got_e = engine_logits(export(d, os.path.join(tmp, f"{wtype}.bin"), wtype), ids, **shape)
        err = np.abs(got - base)
        rms = float(np.sqrt(np.mean(err ** 2))) / spread
        top1 = float(np.mean(got.argmax(-1) == base.argmax(-1)))
        same = (got_e == base_e).all(axis=(1, 2))
        err_same = float(err[same].max()) if same.any() else 0.0
        notes.append(f"{wtype}: max err {err.max():.3f} ({err_same:.3f} where routing agrees, {100 * same.mean():.0f}% "
                     f"of positions), rms {rms:.3f} of std, top-1 {100 * top1:.1f}%")
        check(rms <= max_rms and top1 >= min_top1 and err_same <= max_err_same,
              f"{wtype} out of bounds (rms/std <= {max_rms}, top-1 >= {min_top1}, max err where routing agrees "
              f"<= {max_err_same}): {notes[-1]}")
    return f"256 positions, logit std {spread:.2f}; " + "; ".join(notes)


@test
def q6_embedding_layout(tmp):
    """A q4 file's embedding is q6: decoded here from the layout kernels.h documents (written
    anew, not export.py's code), every weight is within half a step of the checkpoint's and the
    steps are those of a 6-bit grid; then the engine's logits equal, to the q8 lm_head's rounding,
    those computed from the decoded rows (a misplaced bit moves a weight by 16 steps or more)."""
    d, cfg, ids, shape = random_model(tmp, 21, 6, 5, dim=64, hidden_dim=64, heads=4, kv_heads=2, experts=4, top_k=2,
                                      layers=1)
    model = export(d, os.path.join(tmp, "q4.bin"), "q4")
    emb = reference.load_safetensors(d)["model.embed_tokens.weight"].astype(np.float64)
    V, D = emb.shape
    G, nb = (V + 15) // 16, D // 32
    raw = np.fromfile(model, np.uint8, offset=tensor_offset(model, "model.embed_tokens.weight"), count=G * 13 * D)
    got = np.zeros((G * 16, D))
    for g in range(G):
        grp = raw[g * 13 * D:(g + 1) * 13 * D]
        scale = grp[:32 * nb].view("<f2").astype(np.float64).reshape(nb, 16)
        for b in range(nb):
            blk = grp[32 * nb + 384 * b: 32 * nb + 384 * (b + 1)]
            for l in range(16):
                for j in range(32):
                    lo = blk[j // 8 * 64 + l * 4 + j % 4]
                    lo = lo & 15 if j % 8 < 4 else lo >> 4
                    hi = blk[256 + j // 16 * 64 + l * 4 + j % 4] >> (2 * (j % 16 // 4)) & 3
                    got[g * 16 + l, 32 * b + j] = (int(lo | hi << 4) - 32) * scale[b, l]
    # each block's weights within one step of the checkpoint's (the rounding, and the clipping of
    # the end opposite the largest one), on a grid of about a 32nd of the block's largest
    scales = np.zeros((G * 16, nb))
    for g in range(G):
        scales[g * 16:(g + 1) * 16] = raw[g * 13 * D:g * 13 * D + 32 * nb].view("<f2").astype(np.float64).reshape(nb, 16).T
    step = np.abs(scales[:V])
    big = np.abs(emb).reshape(V, nb, 32).max(-1)
    err = np.abs(got[:V] - emb).reshape(V, nb, 32).max(-1)
    check((err <= 1.001 * step + 1e-12).all(), f"q6 embedding: a weight off by {float((err / step).max()):.2f} steps")
    check((step <= big / 24).all() and (step >= big / 33).all(), "q6 embedding: steps not on a 6-bit grid: "
          f"{float((big / step).min()):.1f} to {float((big / step).max()):.1f} steps to the largest weight")
    check(not got[V:].any(), "q6 embedding: the padding rows are not zero")
    logits, _ = engine_logits(model, ids[:1], **shape)
    # the embedding row alone (the layer's output added to it is the same in both): the engine run
    # on a copy whose embedding is f32 must agree to the q8/q4 rounding of the rest
    ref, _ = engine_logits(export(d, os.path.join(tmp, "q8.bin"), "q8"), ids[:1], **shape)
    rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
    check(rel < 0.2, f"q6 embedding: logits differ from the q8 file's by {rel:.2f} of their range")
    return f"{V}x{D} embedding: max error {float((err / step).max()):.3f} steps; logits within {rel:.3f} of q8's"


@test
def gguf_import(tmp):
    """export.py reads a llama.cpp GGUF of a Mixtral (tests/gguf_writer.py lays one out as llama.cpp's
    converter does: permuted q/k rows, stacked or per-expert tensors, dimensions innermost first):
    F32 and BF16 GGUFs export to files whose logits equal the Hugging Face folder's exports bit for bit,
    and a Q8_0 GGUF exports to q8 with its blocks unchanged: byte for byte the weights that a folder
    holding the Q8_0 values dequantized exports to."""
    import gguf_writer
    d, cfg, ids, shape = random_model(tmp, 17, 12, 3, dim=64, hidden_dim=128, heads=4, kv_heads=2, experts=4, top_k=2)
    notes = []
    for gtype, stacked, wtype in (("F32", True, "f32"), ("BF16", False, "bf16")):
        g = gguf_writer.write_gguf(d, os.path.join(tmp, f"m-{gtype}.gguf"), gtype, stacked)
        a, ea = engine_logits(export(d, os.path.join(tmp, f"hf-{wtype}.bin"), wtype), ids, **shape)
        b, eb = engine_logits(export(g, os.path.join(tmp, f"gg-{wtype}.bin"), wtype), ids, **shape)
        compare_experts(eb, ea, f"GGUF {gtype}")
        check(np.array_equal(a, b), f"GGUF {gtype} -> {wtype}: logits differ from the folder's by up to "
                                    f"{float(np.abs(a - b).max()):.3g}")
        notes.append(f"{gtype} ({'stacked' if stacked else 'per-expert'}) -> {wtype} identical")
    # Q8_0: the folder that holds exactly the dequantized Q8_0 values
    g = gguf_writer.write_gguf(d, os.path.join(tmp, "m-Q8_0.gguf"), "Q8_0")
    W = reference.load_safetensors(d)
    deq = {}
    for name, x in W.items():
        x = np.asarray(x, np.float32)
        if x.ndim == 2 and "gate.weight" not in name:
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            perm = "q_proj" in name or "k_proj" in name
            y = gguf_writer.permute(x, heads) if perm else x
            blocks = np.frombuffer(gguf_writer.q8_0(y), np.uint8).reshape(-1, 34)
            dq = (blocks[:, 2:].view(np.int8).astype(np.float32) * blocks[:, :2].copy().view("<f2").astype(np.float32))
            y = dq.reshape(x.shape)
            if perm:  # back to Hugging Face order
                hd = x.shape[0] // heads
                y = y.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(x.shape)
            x = y
        deq[name] = ("F32", list(x.shape), x.astype("<f4").tobytes())
    d2 = os.path.join(tmp, "deq")
    os.makedirs(d2)
    write_safetensors(os.path.join(d2, "model.safetensors"), deq)
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(d, f), d2)
    a = open(export(d2, os.path.join(tmp, "deq-q8.bin"), "q8"), "rb").read()
    b = open(export(g, os.path.join(tmp, "gg-q8.bin"), "q8"), "rb").read()
    wa, wb = struct.unpack_from("<Q", a, 104)[0], struct.unpack_from("<Q", b, 104)[0]  # weights_offset
    if a[wa:] != b[wb:]:
        diff = next(i for i in range(min(len(a) - wa, len(b) - wb)) if a[wa + i] != b[wb + i])
        raise Failure(f"Q8_0 GGUF -> q8: weights differ from the dequantized folder's, first at weight byte {diff}")
    notes.append("Q8_0 -> q8 weights byte-identical")
    return "; ".join(notes)


@test
def perplexity_and_kl(tmp):
    """--perplexity against the numpy reference: the same windows (the first token BOS, the second halves
    scored), exp(mean NLL) within 1e-3 relative; --kl-divergence of a file against its own --kl-base is
    0 with top-1 agreement 1; a q8 file's KL and top-1 equal those computed from the reference's and the
    engine's logits."""
    import sentencepiece
    d, cfg, _, shape = random_model(tmp, 21, 1, 0, dim=64, hidden_dim=128, heads=4, kv_heads=2, experts=4, top_k=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    text = os.path.join(tmp, "text.txt")
    open(text, "w").write(open(os.path.join(ROOT, "demo", "heldout.txt")).read()[:1500])
    W = 32
    ids = [1] + sp.encode(open(text).read())
    windows = len(ids) // W
    W_ = reference.load_safetensors(d)
    ref_lp, nll = [], []
    for w in range(windows):
        win = ids[w * W:(w + 1) * W]
        win[0] = 1
        logits, _ = reference.forward(W_, cfg, win)
        for j in range(W // 2, W - 1):
            z = logits[j] - logits[j].max()
            lp = z - np.log(np.exp(z).sum())
            ref_lp.append(lp)
            nll.append(-lp[ids[w * W + j + 1]])
    want = float(np.exp(np.mean(nll)))
    f32 = export(d, os.path.join(tmp, "f32.bin"), "f32")
    base = os.path.join(tmp, "base.kl")
    r = run([ENGINE, f32, "--perplexity", text, "-c", str(W), "--kl-base", base, "--kv", "f32"])
    check(r.returncode == 0, r.stderr)
    got = float(r.stdout.split()[1])
    check(abs(got - want) <= 1e-3 * want, f"perplexity {got}, reference {want}")
    r = run([ENGINE, f32, "--perplexity", text, "-c", str(W), "--kl-divergence", base, "--kv", "f32"])
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    check(res["kl_mean"] < 1e-9 and res["top1"] == 1.0, f"a file against its own base: {res}")
    q8 = export(d, os.path.join(tmp, "q8.bin"), "q8")
    r = run([ENGINE, q8, "--perplexity", text, "-c", str(W), "--kl-divergence", base, "--kv", "f32"])
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    q_lp = []
    for w in range(windows):
        win = ids[w * W:(w + 1) * W]
        win[0] = 1
        logits, _ = engine_logits(q8, win, **shape)
        for j in range(W // 2, W - 1):
            z = logits[j].astype(np.float64) - logits[j].max()
            q_lp.append(z - np.log(np.exp(z).sum()))
    ref_lp, q_lp = np.array(ref_lp), np.array(q_lp)
    kl = (np.exp(ref_lp) * (ref_lp - q_lp)).sum(-1).mean()
    top = (ref_lp.argmax(-1) == q_lp.argmax(-1)).mean()
    check(abs(res["kl_mean"] - kl) <= 1e-6 + 1e-3 * kl and abs(res["top1"] - top) < 1e-5,
          f"q8: engine KL {res['kl_mean']}, top-1 {res['top1']}; from the logits {kl}, {top}")
    return f"perplexity {got:.2f} (reference {want:.2f}); q8 KL {kl:.2g}, top-1 {top:.3f}, {len(nll)} positions"


def decode_coded(raw, wtype, rows, cols):
    """A q3 or q2 matrix (rows, cols) decoded from the layout kernels.h documents, written anew here:
    the codebooks from their definition (the normal distribution's Lloyd-Max levels at 16 scales,
    each 0.9 times the next, the largest level 127), not copied from export.py or kernels.c."""
    base = {"q2": [-1.5104, -0.4528, 0.4528, 1.5104],
            "q3": [-2.1520, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1520]}[wtype]
    books = [np.rint(np.array(base) * 127 / base[-1] * 0.9 ** (15 - c)) for c in range(16)]
    nb, bb = cols // 32, 144 if wtype == "q2" else 200
    G = (rows + 15) // 16
    out = np.zeros((G * 16, cols))
    for g in range(G):
        grp = raw[g * (32 + nb * bb):(g + 1) * (32 + nb * bb)]
        d = grp[:32].view("<f2").astype(np.float64)
        for b in range(nb):
            blk = grp[32 + b * bb:32 + (b + 1) * bb].astype(np.int64)
            codes_at = 16 if wtype == "q2" else 8
            for l in range(16):
                for j in range(32):
                    code = blk[codes_at + j // 16 * 64 + l * 4 + j % 4] >> (2 * (j % 16 // 4)) & 3
                    if wtype == "q2":
                        book = blk[l] >> (4 * (j // 16)) & 15
                    else:
                        book = blk[l // 2] >> (4 * (l % 2)) & 15
                        code |= (blk[8 + 128 + l * 4 + j % 4] >> (j // 4) & 1) << 2
                    out[g * 16 + l, 32 * b + j] = d[l] * books[book][code]
    return out[:rows]


def coded_matrices(model, names, wtype, W):
    """The matrices `names` of a q3 or q2 file decoded (decode_coded), and their relative RMS errors."""
    out, errs = {}, []
    for name in names:
        want = W[name].astype(np.float64)
        rows, cols = want.shape
        nbytes = (rows + 15) // 16 * (32 + cols // 32 * (144 if wtype == "q2" else 200))
        got = decode_coded(np.fromfile(model, np.uint8, offset=tensor_offset(model, name), count=nbytes), wtype, rows, cols)
        out[name] = got
        errs.append(float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean())))
    return out, errs


@test
def coded_layouts(tmp):
    """q3 and q2 experts (the rest f32, --matrix-types): every expert matrix decoded here from
    kernels.h's layout (decode_coded) lies near the checkpoint's (relative RMS error within what 3 and
    2 bits of a normal distribution allow: 0.19 and 0.34 at best), and the engine's logits equal, to
    the rounding of its int8 activations, those of the numpy reference run on the decoded weights (a
    misplaced bit or a wrong book moves a weight by a level or more, and the logits with it)."""
    d, cfg, ids, shape = random_model(tmp, 23, 8, 5, dim=64, hidden_dim=96, heads=4, kv_heads=2, experts=4, top_k=2,
                                      layers=1)
    W = reference.load_safetensors(d)
    names = [f"model.layers.0.block_sparse_moe.experts.{e}.{k}.weight" for e in range(4) for k in ("w1", "w3", "w2")]
    f32ref, _ = reference.forward(W, cfg, ids)
    spread = float(f32ref.std())
    worst = {}
    for wtype, bound in (("q3", 0.24), ("q2", 0.40)):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), "f32", ("--matrix-types", f"w1={wtype},w3={wtype},w2={wtype}"))
        decoded, errs = coded_matrices(model, names, wtype, W)
        check(max(errs) <= bound, f"{wtype}: relative RMS error of the experts up to {max(errs):.3f} (bound {bound})")
        ref_logits, ref_experts = reference.forward(dict(W, **decoded), cfg, ids)
        got, got_experts = engine_logits(model, ids, **shape)
        agree = (got_experts == ref_experts).all(-1).all(-1)
        near = float(np.sqrt(((got - ref_logits)[agree] ** 2).mean()) / spread)
        far = float(np.sqrt(((got - f32ref) ** 2).mean()) / spread)
        # int8 activations alone: a few percent of the logits' spread (q8's whole error is 3%)
        check(agree.mean() >= 0.5 and near <= 0.05, f"{wtype}: the engine is {near:.3f} of the logits' spread from "
              f"the reference on the decoded weights (routing agrees at {agree.mean():.0%} of the positions)")
        worst[wtype] = (max(errs), near, far)
    return "; ".join(f"{k}: experts' relative RMS error {v[0]:.3f}; logits {v[1]:.4f} of their spread from the "
                     f"decoded reference ({v[2]:.3f} from the original)" for k, v in worst.items())


def read_imatrix_file(path):
    """An --imatrix file, read from the format eval.c documents: (tokens, [(name, tokens, means)])."""
    raw = open(path, "rb").read()
    check(raw[:8] == b"MXIMATRX", f"{path}: no magic")
    version, n, tokens = struct.unpack_from("<IIQ", raw, 8)
    check(version == 1, f"{path}: version {version}")
    at, entries = 24, []
    for _ in range(n):
        (length,) = struct.unpack_from("<H", raw, at)
        name = raw[at + 2:at + 2 + length].decode()
        cols, count = struct.unpack_from("<IQ", raw, at + 2 + length)
        at += 2 + length + 12
        entries.append((name, count, np.frombuffer(raw, "<f4", cols, at)))
        at += 4 * cols
    check(at == len(raw), f"{path}: {len(raw) - at} bytes after the last entry")
    return tokens, entries


@test
def importance_matrix(tmp):
    """--perplexity TEXT --imatrix OUT: every multiplied matrix, every expert on its own, in file order,
    holds the mean over the tokens it multiplied of each input column's square, equal (to f32 rounding)
    to the numpy reference's on the same windows; an expert's tokens add up to the text's times top_k.
    export.py --imatrix: q2's importance-weighted error is lower with it than without; a file made
    for another model is refused naming the first tensor that does not match."""
    import sentencepiece
    d, cfg, _, shape = random_model(tmp, 29, 1, 0, dim=64, hidden_dim=96, heads=4, kv_heads=2, experts=4, top_k=2,
                                    layers=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    text = os.path.join(tmp, "calib.txt")
    open(text, "w").write(open(os.path.join(ROOT, "demo", "heldout.txt")).read()[:700])
    Wn = 16
    ids = [1] + sp.encode(open(text).read())
    W = reference.load_safetensors(d)
    acc = {}
    for w in range(len(ids) // Wn):
        win = ids[w * Wn:(w + 1) * Wn]
        win[0] = 1
        reference.forward(W, cfg, win[:Wn - 1], inputs=acc)
    model = export(d, os.path.join(tmp, "f32.bin"), "f32")
    im = os.path.join(tmp, "m.imatrix")
    r = run([ENGINE, model, "--perplexity", text, "-c", str(Wn), "--imatrix", im, "--kv", "f32"])
    check(r.returncode == 0, r.stderr[-500:])
    tokens, entries = read_imatrix_file(im)
    T = len(ids) // Wn * (Wn - 1)
    check(tokens == T, f"the file says {tokens} tokens of text, the windows hold {T}")
    want_names = []
    for l in range(2):
        want_names += [f"model.layers.{l}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        want_names += [f"model.layers.{l}.block_sparse_moe.experts.{e}.{k}.weight" for e in range(4) for k in ("w1", "w3", "w2")]
    want_names.append("lm_head.weight")
    check([e[0] for e in entries] == want_names, f"matrices {[e[0] for e in entries][:5]}... in another order or set")
    worst = 0.0
    for name, count, mean in entries:
        s, n = acc.get(name, [None, 0])
        check(count == n, f"{name}: {count} tokens, the reference {n}")
        if n:
            rel = float(np.abs(mean - s / n).max() / max(float(np.abs(s / n).max()), 1e-30))
            worst = max(worst, rel)
            check(rel < 1e-3, f"{name}: mean squares differ from the reference's by {rel:.2g} of the largest")
    for l in range(2):
        n = sum(c for name, c, _ in entries if name.startswith(f"model.layers.{l}.") and name.endswith("w1.weight"))
        check(n == T * 2, f"layer {l}: the experts' tokens add up to {n}, not {T} x top_k 2")
    # export.py with it: a lower importance-weighted error for q2, the file of another model refused
    names = [f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    plain = export(d, os.path.join(tmp, "q2.bin"), "f32", ("--matrix-types", "w2=q2"))
    weighted = export(d, os.path.join(tmp, "q2i.bin"), "f32", ("--matrix-types", "w2=q2", "--imatrix", im))
    imp = {name: mean for name, _, mean in entries}
    gain = []
    for name in names:
        a, _ = coded_matrices(plain, [name], "q2", W)
        b, _ = coded_matrices(weighted, [name], "q2", W)
        want = W[name].astype(np.float64)
        ea = float((imp[name] * (a[name] - want) ** 2).sum())
        eb = float((imp[name] * (b[name] - want) ** 2).sum())
        gain.append(eb / ea)
    check(max(gain) < 1.0, f"q2 with the importance matrix: weighted error {max(gain):.3f} of without, not lower")
    d2, _, _, _ = random_model(tmp, 31, 1, 0, name="other", dim=64, hidden_dim=128, heads=4, kv_heads=2, experts=4,
                               top_k=2, layers=2)
    r = run([PYTHON, os.path.join(ROOT, "export.py"), d2, os.path.join(tmp, "x.bin"), "--type", "q2", "--imatrix", im])
    check(r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "experts.0.w2.weight" in r.stderr
          and "another model" in r.stderr, f"another model's importance matrix: exit {r.returncode}\n{r.stderr[-500:]}")
    return (f"{len(entries)} matrices over {T} tokens within {worst:.1g} of the reference; q2's weighted error "
            f"{max(gain):.2f}x of without it; another model's file refused")


@test
def fit_to_size(tmp):
    """export.py --fit SIZE: the file is at most SIZE bytes and its header holds the choice printed;
    a larger SIZE never gives a smaller file; a SIZE below the smallest file, or not a size, is one line."""
    d, cfg, _, _ = random_model(tmp, 33, 1, 0, dim=64, hidden_dim=128, heads=4, kv_heads=2, experts=4, top_k=2, layers=2)
    smallest = os.path.getsize(export(d, os.path.join(tmp, "q2.bin"), "f32", ("--matrix-types", ",".join(
        f"{k}=q2" for k in ("embed", "wq", "wk", "wv", "wo", "w1", "w3", "w2", "lm_head")))))
    largest = os.path.getsize(export(d, os.path.join(tmp, "bf16.bin"), "bf16"))
    sizes, last = [], 0
    for frac in (0.0, 0.1, 0.3, 0.6, 1.0):
        size = int(smallest + frac * (largest - smallest))
        out = os.path.join(tmp, f"fit{frac}.bin")
        r = run([PYTHON, os.path.join(ROOT, "export.py"), d, out, "--fit", str(size)])
        check(r.returncode == 0, f"--fit {size}: {r.stderr[-500:]}")
        got = os.path.getsize(out)
        check(got <= size and got >= last, f"--fit {size}: {got} bytes (the previous size gave {last})")
        chosen = re.search(r"--fit \d+: (.*?);", r.stderr).group(1)
        info = run([ENGINE, out, "--info"]).stdout
        check("matrix types: " + chosen in info, f"--fit {size} printed '{chosen}', the header says:\n{info}")
        sizes.append(got)
        last = got
    check(sizes[-1] > sizes[0], "every size gave the same file")
    for bad, needle in ((str(smallest - 4096), "less than the smallest"), ("12Q", "expected a size")):
        r = run([PYTHON, os.path.join(ROOT, "export.py"), d, os.path.join(tmp, "x.bin"), "--fit", bad])
        check(r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1,
              f"--fit {bad}: exit {r.returncode}\n{r.stderr[-300:]}")
    return f"{len(sizes)} sizes from {smallest} to {largest} bytes: files of {sizes[0]} to {sizes[-1]} bytes, each within"
