#!/usr/bin/env python3
"""Independent re-implementation of the 4 MoE architectures (no transformers modeling code).

Reads only config.json + *.safetensors (single file or sharded index) of each fixture and
recomputes the golden outputs in reference.safetensors, following tests/reference/SEMANTICS.md.
It is an executable check that SEMANTICS.md is complete and exact; the C++ engine should
behave like this file.

    python3 tests/reference/reimpl_check.py [--dir tests/fixtures/models]

Needs torch + safetensors only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "models"
SUPPORTED = {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"}


def load_weights(d: Path) -> dict[str, torch.Tensor]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        sd = {}
        for shard in sorted(set(wm.values())):
            part = load_file(str(d / shard))
            for k, v in part.items():
                assert wm[k] == shard, k
            sd.update(part)
        assert set(sd) == set(wm)
    else:
        sd = load_file(str(d / "model.safetensors"))
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16, (k, v.dtype)
    return {k: v.float() for k, v in sd.items()}  # bf16 -> fp32 upcast (exact)


def check_config(c: dict) -> None:
    arch = c["architectures"][0]
    assert arch in SUPPORTED, arch
    assert c.get("hidden_act", "silu") == "silu"
    assert c.get("rope_scaling") is None
    assert c.get("partial_rotary_factor", 1.0) == 1.0
    if arch == "MixtralForCausalLM":
        assert c.get("sliding_window") is None
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert not c.get("use_sliding_window", False)
    if arch == "OlmoeForCausalLM":
        assert c.get("clip_qkv") is None  # would be: clamp q,k,v to [-clip, clip] after q/k norm


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 activations: x * rsqrt(mean(x^2) + eps) * w
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_cos_sin(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(n, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [n, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [n, head_dim]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, n, head_dim]; rotate_half pairs dim i with dim i + head_dim/2
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def swiglu(x, gate_w, up_w, down_w):
    return (torch.nn.functional.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def forward(c: dict, W: dict[str, torch.Tensor], ids: list[int]) -> tuple[torch.Tensor, dict]:
    arch = c["architectures"][0]
    H = c["hidden_size"]
    nh, nkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or H // nh
    if arch in ("Qwen2MoeForCausalLM", "OlmoeForCausalLM"):
        assert hd * nh == H
    eps = c["rms_norm_eps"]
    n = len(ids)
    cos, sin = rope_cos_sin(n, hd, float(c["rope_theta"]))
    mask = torch.full((n, n), float("-inf")).triu(1)
    routing = {}

    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}."
        # ---- attention ----
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)

        def proj(name):
            y = h @ W[p + f"self_attn.{name}.weight"].T
            b = W.get(p + f"self_attn.{name}.bias")
            return y + b if b is not None else y

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        if arch == "OlmoeForCausalLM":  # norm over the whole projection, before head split
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
        q = q.view(n, nh, hd).transpose(0, 1)
        k = k.view(n, nkv, hd).transpose(0, 1)
        v = v.view(n, nkv, hd).transpose(0, 1)
        if arch == "Qwen3MoeForCausalLM":  # per-head norm over head_dim, after head split
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = nh // nkv  # query head j uses kv head j // rep
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = (q @ k.transpose(1, 2)) * hd ** -0.5 + mask
        a = torch.softmax(s, dim=-1) @ v  # [nh, n, hd]
        a = a.transpose(0, 1).reshape(n, nh * hd)
        o = a @ W[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in W:
            o = o + W[p + "self_attn.o_proj.bias"]
        x = x + o
        # ---- MLP / MoE ----
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        mp = p + ("block_sparse_moe." if arch == "MixtralForCausalLM" else "mlp.")
        if arch == "MixtralForCausalLM":
            is_moe, E = True, c["num_local_experts"]
        elif arch == "OlmoeForCausalLM":
            is_moe, E = True, c["num_experts"]
        else:
            E = c["num_experts"]
            is_moe = L not in (c.get("mlp_only_layers") or []) and E > 0 and (L + 1) % c["decoder_sparse_step"] == 0
        assert is_moe == (mp + "gate.weight" in W), (L, is_moe)
        if not is_moe:
            y = swiglu(h, W[mp + "gate_proj.weight"], W[mp + "up_proj.weight"], W[mp + "down_proj.weight"])
        else:
            K = c["num_experts_per_tok"]
            logits = h @ W[mp + "gate.weight"].T  # [n, E]
            probs = torch.softmax(logits, dim=-1)
            wts, sel = torch.topk(probs, K, dim=-1)
            renorm = True if arch == "MixtralForCausalLM" else bool(c.get("norm_topk_prob", False))
            if renorm:
                wts = wts / wts.sum(-1, keepdim=True)
            routing[L] = sel
            y = torch.zeros_like(h)
            for t in range(n):
                for j in range(K):
                    e = int(sel[t, j])
                    if arch == "MixtralForCausalLM":
                        ew = (W[mp + f"experts.{e}.w1.weight"], W[mp + f"experts.{e}.w3.weight"],
                              W[mp + f"experts.{e}.w2.weight"])
                    else:
                        ew = (W[mp + f"experts.{e}.gate_proj.weight"], W[mp + f"experts.{e}.up_proj.weight"],
                              W[mp + f"experts.{e}.down_proj.weight"])
                    y[t] += wts[t, j] * swiglu(h[t], *ew)
            if arch == "Qwen2MoeForCausalLM":
                sh = swiglu(h, W[mp + "shared_expert.gate_proj.weight"], W[mp + "shared_expert.up_proj.weight"],
                            W[mp + "shared_expert.down_proj.weight"])
                y = y + torch.sigmoid(h @ W[mp + "shared_expert_gate.weight"].T) * sh
        x = x + y
    x = rms_norm(x, W["model.norm.weight"], eps)
    lm = W.get("lm_head.weight")
    if lm is None:
        assert c["tie_word_embeddings"]
        lm = W["model.embed_tokens.weight"]
    return x @ lm.T, routing


def check_model(d: Path) -> bool:
    c = json.loads((d / "config.json").read_text())
    check_config(c)
    W = load_weights(d)
    ref = load_file(str(d / "reference.safetensors"))
    ok = True
    worst = 0.0
    i = 0
    while f"prompt.{i}" in ref:
        prompt = ref[f"prompt.{i}"].tolist()
        with torch.no_grad():
            logits, routing = forward(c, W, prompt)
        err = (logits - ref[f"logits.{i}"]).abs().max().item()
        worst = max(worst, err)
        for L, sel in routing.items():
            if not torch.equal(sel.int(), ref[f"routing.{i}.layer{L}"]):
                print(f"  {d.name} prompt {i} layer {L}: routing differs")
                ok = False
        seq, toks = list(prompt), []
        for s in range(len(ref[f"greedy.{i}"])):
            with torch.no_grad():
                last = forward(c, W, seq)[0][-1]
            worst = max(worst, (last - ref[f"greedy_logits.{i}"][s]).abs().max().item())
            toks.append(int(last.argmax()))
            seq.append(toks[-1])
        if toks != ref[f"greedy.{i}"].tolist():
            print(f"  {d.name} prompt {i}: greedy differs {toks} vs {ref[f'greedy.{i}'].tolist()}")
            ok = False
        i += 1
    ok = ok and worst < 1e-4
    print(f"{d.name}: {'OK' if ok else 'FAIL'} (max |logit diff| {worst:.2e} over {i} prompts + greedy)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = sorted(p for p in args.dir.iterdir() if (p / "config.json").exists())
    assert models, f"no fixtures under {args.dir}"
    results = [check_model(m) for m in models]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
