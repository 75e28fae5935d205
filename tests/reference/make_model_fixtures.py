#!/usr/bin/env python3
"""Generate tiny random MoE reference checkpoints + golden outputs for moe-serve.

Usage (from the repository root):

    python3 -m pip install -r tests/reference/requirements.txt
    python3 tests/reference/make_model_fixtures.py            # writes tests/fixtures/models/
    python3 tests/reference/make_model_fixtures.py --check    # regenerate in a temp dir and
                                                              # compare against the committed files

For every model in MODELS this script
  1. builds the Hugging Face transformers model from a config (CPU, fp32),
  2. re-initialises every parameter from a private, seeded torch.Generator with a
     larger-than-default std (so logits / routing are decisive, not near-uniform),
  3. casts to bf16 and saves with save_pretrained(safe_serialization=True)
     (qwen3_moe is saved sharded -> model.safetensors.index.json + shards),
  4. reloads the saved bf16 checkpoint in fp32 with attn_implementation="eager",
     so the reference uses exactly the bf16 weights upcast to fp32,
  5. records prompts, full-sequence logits, a 16-token greedy continuation
     (manual loop, full forward without KV cache each step), the logits that chose each
     greedy token, per-layer router outputs and per-layer hidden states into
     reference.safetensors (F32 / I32 tensors only).

See tests/fixtures/models/README.md for the file format and tests/reference/SEMANTICS.md
for the forward-pass semantics the C++ engine must reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

EXPECTED_TORCH = "2.9.1"
EXPECTED_TRANSFORMERS = "4.57.1"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "models"

PROMPT_LENS = (5, 11, 17)
NUM_NEW_TOKENS = 16

# Init std per parameter kind (see init_weights).
STD_EMBED = 0.2
STD_LINEAR = 0.15
STD_ROUTER = 0.3
STD_BIAS = 0.1
STD_NORM = 0.1  # norm weights = 1 + N(0, STD_NORM)
STD_SHARED_GATE = 0.15

# Robustness thresholds for the golden data (prompts are re-drawn until they hold):
#   greedy: top1 - top2 logit gap at every greedy step >= MIN_GREEDY_MARGIN;
#   routing, at every position / MoE layer of every greedy-step forward (so every position
#   that influences a recorded token): router-logit gap between the k-th and (k+1)-th largest
#   logit >= MIN_ROUTE_MARGIN (expert set), and between consecutive logits inside the top-k
#   >= MIN_ROUTE_MARGIN / ORDER_VS_BOUNDARY (order of the stored ids).
# fp32 round-off in these tiny models is ~1e-6, so these are >= 1000x safety factors.
MIN_GREEDY_MARGIN = 0.02
MIN_ROUTE_MARGIN = 0.005
ORDER_VS_BOUNDARY = 5.0
MAX_PROMPT_ATTEMPTS = 200


def _common(**kw):
    """Token ids common to all configs: in-vocab, never reached on purpose (we never stop early)."""
    base = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    base.update(kw)
    return base


MODELS = {
    "mixtral": dict(
        seed=1001,
        config_cls=MixtralConfig,
        model_cls=MixtralForCausalLM,
        config=_common(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
        sharded=False,
    ),
    "qwen2_moe": dict(
        seed=1002,
        config_cls=Qwen2MoeConfig,
        model_cls=Qwen2MoeForCausalLM,
        config=_common(
            vocab_size=300,
            hidden_size=96,
            intermediate_size=128,  # dense MLP layers (0 and 2)
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=2,  # MoE iff (layer_idx + 1) % 2 == 0 -> layers 1, 3
            mlp_only_layers=[],
            qkv_bias=True,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            use_sliding_window=False,
            tie_word_embeddings=True,
        ),
        sharded=False,
    ),
    "qwen3_moe": dict(
        seed=1003,
        config_cls=Qwen3MoeConfig,
        model_cls=Qwen3MoeForCausalLM,
        config=_common(
            vocab_size=288,
            hidden_size=64,
            head_dim=32,  # != hidden_size / num_attention_heads (16)
            intermediate_size=112,  # dense MLP layer (1)
            moe_intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],  # layer 1 dense, layers 0 and 2 MoE
            attention_bias=False,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        sharded=True,
    ),
    "olmoe": dict(
        seed=1004,
        config_cls=OlmoeConfig,
        model_cls=OlmoeForCausalLM,
        config=_common(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            clip_qkv=None,
            attention_bias=False,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        sharded=False,
    ),
}


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------
def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic re-init of every parameter, independent of HF's own init order."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            leaf = name.split(".")[-2] if name.endswith(".weight") or name.endswith(".bias") else name
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                # input_layernorm, post_attention_layernorm, model.norm, q_norm, k_norm
                p.copy_(1.0 + STD_NORM * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(STD_BIAS * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(STD_EMBED * torch.randn(p.shape, generator=gen))
            elif name.endswith("shared_expert_gate.weight"):
                p.copy_(STD_SHARED_GATE * torch.randn(p.shape, generator=gen))
            elif leaf == "gate" and p.dim() == 2:
                # router (mlp.gate / block_sparse_moe.gate), [num_experts, hidden]
                p.copy_(STD_ROUTER * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(STD_LINEAR * torch.randn(p.shape, generator=gen))
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")


def build_and_save(name: str, spec: dict, out_dir: Path) -> None:
    cfg = spec["config_cls"](**spec["config"])
    torch.manual_seed(spec["seed"])  # HF's own init (overwritten below anyway)
    model = spec["model_cls"](cfg)
    init_weights(model, spec["seed"])
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(torch.bfloat16).eval()
    kwargs = dict(safe_serialization=True)
    if spec["sharded"]:
        kwargs["max_shard_size"] = "100KB"
    model.save_pretrained(out_dir, **kwargs)


# --------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------
def moe_layers(model) -> dict[int, torch.nn.Module]:
    """layer index -> sparse MoE block (only MoE layers)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        blk = getattr(layer, "block_sparse_moe", None) or getattr(layer, "mlp", None)
        if blk is not None and hasattr(blk, "experts"):
            out[i] = blk
    return out


def routing_from_logits(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Exactly what the HF sparse MoE blocks do (fp32 softmax over all experts, topk, opt. renorm)."""
    probs = F.softmax(router_logits, dim=1, dtype=torch.float)
    w, ids = torch.topk(probs, top_k, dim=-1)  # sorted by weight, descending
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w, probs


@torch.no_grad()
def forward_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def make_reference(name: str, model_dir: Path, cfg_spec: dict) -> tuple[dict, dict]:
    model = cfg_spec["model_cls"].from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    vocab = cfg.vocab_size
    top_k = cfg.num_experts_per_tok
    norm_topk = getattr(cfg, "norm_topk_prob", None)
    if name == "mixtral":
        norm_topk = True  # Mixtral always renormalises the top-k weights

    # Sanity: the reloaded fp32 weights must equal the bf16 file contents exactly.
    files = sorted(model_dir.glob("*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    msd = model.state_dict()
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16, (k, v.dtype)
        assert torch.equal(msd[k], v.float()), f"{name}: reloaded weight {k} differs"
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in sd, "tied lm_head must not be saved"
        assert torch.equal(msd["lm_head.weight"], msd["model.embed_tokens.weight"])

    # Hooks: router logits (gate output) per MoE layer, decoder layer outputs.
    moes = moe_layers(model)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for li, blk in moes.items():
        def gate_hook(mod, inp, out, li=li):
            captured[f"router{li}"] = out.detach().float().clone()
        hooks.append(blk.gate.register_forward_hook(gate_hook))
    for li, layer in enumerate(model.model.layers):
        def layer_hook(mod, inp, out, li=li):
            t = out[0] if isinstance(out, tuple) else out
            captured[f"layer{li}"] = t.detach()[0].float().clone()
        hooks.append(layer.register_forward_hook(layer_hook))

    def embed_hook(mod, inp, out):
        captured["embed"] = out.detach()[0].float().clone()
    hooks.append(model.model.embed_tokens.register_forward_hook(embed_hook))

    def norm_hook(mod, inp, out):
        captured["final_norm"] = out.detach()[0].float().clone()
    hooks.append(model.model.norm.register_forward_hook(norm_hook))

    def route(li: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Routing of the last captured forward for MoE layer li, plus its robustness margin:
        the smallest router-logit gap between consecutive entries of the top-(k+1) sorted logits
        (boundary gap k/k+1 decides the expert set, the others decide the stored id order)."""
        rl = captured[f"router{li}"]
        assert rl.shape[1] == num_experts(cfg), rl.shape
        ids, w, _ = routing_from_logits(rl, top_k, norm_topk)
        sl = torch.sort(rl, dim=-1, descending=True).values[:, : top_k + 1]
        gaps = sl[:, :-1] - sl[:, 1:]
        margin = min(float(gaps[:, :top_k - 1].min()) / ORDER_VS_BOUNDARY if top_k > 1 else math.inf,
                     float(gaps[:, top_k - 1].min()) if sl.shape[1] > top_k else math.inf)
        return rl, ids, w, margin

    def run_prompt(prompt: list[int]) -> dict:
        """Forward + greedy for one prompt; returns tensors and robustness margins."""
        r: dict = {"tensors": {}}
        captured.clear()
        logits = forward_logits(model, prompt)
        assert logits.shape == (len(prompt), vocab)
        r["logits"] = logits
        r["routes"] = {li: route(li) for li in moes}
        r["hidden"] = {k: v for k, v in captured.items() if not k.startswith("router")}
        # Manual greedy loop: full forward (no KV cache) on prompt + generated prefix.
        seq = list(prompt)
        g_tokens, g_logits, g_margin = [], [], []
        route_margin = min([m for (_, _, _, m) in r["routes"].values()], default=math.inf)
        r["min_route_margin"] = route_margin
        r["min_greedy_margin"] = -1.0
        if route_margin < MIN_ROUTE_MARGIN:
            return r  # early reject
        for _ in range(NUM_NEW_TOKENS):
            captured.clear()
            last = forward_logits(model, seq)[-1]
            for li in moes:  # routing robustness over every position that influences a choice
                route_margin = min(route_margin, route(li)[3])
            top2 = torch.topk(last, 2)
            tok = int(top2.indices[0])
            g_tokens.append(tok)
            g_logits.append(last)
            g_margin.append(float(top2.values[0] - top2.values[1]))
            seq.append(tok)
            if g_margin[-1] < MIN_GREEDY_MARGIN or route_margin < MIN_ROUTE_MARGIN:
                r["min_route_margin"] = route_margin
                return r  # early reject
        r["greedy"] = g_tokens
        r["greedy_logits"] = torch.stack(g_logits)
        r["greedy_margin"] = torch.tensor(g_margin, dtype=torch.float32)
        r["min_greedy_margin"] = min(g_margin)
        r["min_route_margin"] = route_margin
        return r

    gen = torch.Generator(device="cpu").manual_seed(cfg_spec["seed"] + 7)
    tensors: dict[str, torch.Tensor] = {}
    stats = {"min_greedy_margin": math.inf, "min_route_margin": math.inf, "generate_matches": True,
             "prompt_attempts": []}
    for i, plen in enumerate(PROMPT_LENS):
        # Draw candidate prompts from the seeded generator until the reference is robust:
        # no near-tie in any greedy argmax or in any top-k expert selection.
        for attempt in range(1, MAX_PROMPT_ATTEMPTS + 1):
            prompt = torch.randint(0, vocab, (plen,), generator=gen).tolist()
            r = run_prompt(prompt)
            if r["min_greedy_margin"] >= MIN_GREEDY_MARGIN and r["min_route_margin"] >= MIN_ROUTE_MARGIN:
                break
        else:
            raise RuntimeError(f"{name}: no robust prompt of length {plen} in {MAX_PROMPT_ATTEMPTS} tries")
        stats["prompt_attempts"].append(attempt)
        stats["min_greedy_margin"] = min(stats["min_greedy_margin"], r["min_greedy_margin"])
        stats["min_route_margin"] = min(stats["min_route_margin"], r["min_route_margin"])

        tensors[f"prompt.{i}"] = torch.tensor(prompt, dtype=torch.int32)
        tensors[f"logits.{i}"] = r["logits"].contiguous()
        for li, (rl, ids, w, _) in r["routes"].items():
            tensors[f"routing.{i}.layer{li}"] = ids.to(torch.int32).contiguous()
            tensors[f"routing_weights.{i}.layer{li}"] = w.float().contiguous()
            tensors[f"router_logits.{i}.layer{li}"] = rl.contiguous()
        if i == 0:
            tensors["hidden.0.embed"] = r["hidden"]["embed"].contiguous()
            for li in range(cfg.num_hidden_layers):
                tensors[f"hidden.0.layer{li}"] = r["hidden"][f"layer{li}"].contiguous()
            tensors["hidden.0.final_norm"] = r["hidden"]["final_norm"].contiguous()
        tensors[f"greedy.{i}"] = torch.tensor(r["greedy"], dtype=torch.int32)
        tensors[f"greedy_logits.{i}"] = r["greedy_logits"].contiguous()
        tensors[f"greedy_margin.{i}"] = r["greedy_margin"]
        # Consistency: the first greedy logits must equal the last row of the prompt logits.
        assert torch.allclose(r["greedy_logits"][0], r["logits"][-1], atol=1e-5, rtol=0)

        # Cross-check with HF generate() (uses the KV cache): tokens must agree.
        out = model.generate(
            torch.tensor([prompt], dtype=torch.long),
            attention_mask=torch.ones(1, plen, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NUM_NEW_TOKENS,
            min_new_tokens=NUM_NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )
        gen_tokens = out[0, plen:].tolist()
        if gen_tokens != r["greedy"]:
            stats["generate_matches"] = False
            print(f"WARNING {name} prompt {i}: generate() {gen_tokens} != manual greedy {r['greedy']}",
                  file=sys.stderr)

    for h in hooks:
        h.remove()
    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int32), (k, v.dtype)
    stats["moe_layers"] = sorted(moes)
    return tensors, stats


def num_experts(cfg) -> int:
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


def generate_all(out_root: Path, only: list[str] | None = None) -> dict:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    summary = {}
    for name, spec in MODELS.items():
        if only and name not in only:
            continue
        d = out_root / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        build_and_save(name, spec, d)
        tensors, stats = make_reference(name, d, spec)
        # No safetensors metadata: its key order is not stable, and we want byte-identical
        # regeneration. Provenance goes to reference_info.json instead.
        save_file(tensors, str(d / "reference.safetensors"))
        info = {
            "generator": "tests/reference/make_model_fixtures.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "architecture": spec["model_cls"].__name__,
            "prompt_lens": list(PROMPT_LENS),
            "num_new_tokens": NUM_NEW_TOKENS,
            "greedy": "manual loop, full forward without KV cache per step (generate() agrees: %s)"
                      % stats["generate_matches"],
            "reference_precision": "bf16 checkpoint reloaded as fp32, attn_implementation=eager",
            "moe_layers": stats["moe_layers"],
            "dense_layers": [i for i in range(spec["config"]["num_hidden_layers"])
                             if i not in stats["moe_layers"]],
            "sharded": spec["sharded"],
            "min_greedy_logit_margin": round(stats["min_greedy_margin"], 6),
            "min_router_logit_margin": round(stats["min_route_margin"], 6),
        }
        (d / "reference_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        size = sum(f.stat().st_size for f in d.iterdir())
        summary[name] = dict(stats, bytes=size, files=sorted(f.name for f in d.iterdir()))
        print(f"{name}: {size/1024:.1f} KiB, moe layers {stats['moe_layers']}, "
              f"min greedy margin {stats['min_greedy_margin']:.4f}, "
              f"min routing logit margin {stats['min_route_margin']:.4f}, "
              f"generate()==manual: {stats['generate_matches']}, prompt attempts {stats['prompt_attempts']}")
    return summary


def compare_dirs(a: Path, b: Path) -> bool:
    ok = True
    for name in MODELS:
        fa = {f.name for f in (a / name).iterdir()}
        fb = {f.name for f in (b / name).iterdir()}
        if fa != fb:
            print(f"{name}: file sets differ: {sorted(fa ^ fb)}")
            ok = False
            continue
        for fn in sorted(fa):
            if fn.endswith(".safetensors"):
                ta, tb = load_file(str(a / name / fn)), load_file(str(b / name / fn))
                if ta.keys() != tb.keys():
                    print(f"{name}/{fn}: tensor names differ")
                    ok = False
                    continue
                for k in ta:
                    if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape:
                        print(f"{name}/{fn}:{k}: dtype/shape differ")
                        ok = False
                    elif ta[k].is_floating_point() and fn == "reference.safetensors":
                        err = (ta[k].float() - tb[k].float()).abs().max().item()
                        if err > 1e-4:
                            print(f"{name}/{fn}:{k}: max abs diff {err:g}")
                            ok = False
                    elif not torch.equal(ta[k], tb[k]):
                        print(f"{name}/{fn}:{k}: values differ")
                        ok = False
            elif fn.endswith(".json"):
                ja = json.loads((a / name / fn).read_text())
                jb = json.loads((b / name / fn).read_text())
                ja.pop("transformers_version", None)
                jb.pop("transformers_version", None)
                if ja != jb:
                    print(f"{name}/{fn}: json differs")
                    ok = False
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: %(default)s)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare with --out instead of overwriting")
    ap.add_argument("--allow-version-mismatch", action="store_true")
    args = ap.parse_args()

    tv, trv = torch.__version__.split("+")[0], transformers.__version__
    if (tv, trv) != (EXPECTED_TORCH, EXPECTED_TRANSFORMERS):
        msg = (f"expected torch {EXPECTED_TORCH} / transformers {EXPECTED_TRANSFORMERS}, "
               f"found {tv} / {trv}")
        if not args.allow_version_mismatch:
            print("ERROR: " + msg + " (pass --allow-version-mismatch to proceed)", file=sys.stderr)
            return 2
        print("WARNING: " + msg, file=sys.stderr)

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate_all(Path(tmp))
            ok = compare_dirs(args.out, Path(tmp))
        print("fixtures up to date" if ok else "fixtures DIFFER from a fresh regeneration")
        return 0 if ok else 1

    args.out.mkdir(parents=True, exist_ok=True)
    generate_all(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
