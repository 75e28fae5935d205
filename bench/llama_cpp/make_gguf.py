#!/usr/bin/env python3
"""Writes a moe-serve Mixtral checkpoint (config.json + model.safetensors, bf16 or f32) as GGUF.

The same weights, laid out the way llama.cpp's own converter (convert_hf_to_gguf.py) lays out
a Mixtral: architecture "llama", experts stacked per layer into ffn_{gate,up,down}_exps, q/k
rows permuted from Hugging Face's rotate-half RoPE to GGML's interleaved pairs, norms and the
router in f32. The synthetic model has no tokenizer, so a placeholder SentencePiece vocabulary
of vocab_size tokens is written (<unk>, <s>, </s>, then t3, t4, ...): the benchmark feeds
token ids, never text.

  make_gguf.py MODEL_DIR OUT.gguf --type=bf16|f32|q8_0
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover
    sys.exit("make_gguf.py needs PyPI's gguf package: pip install gguf")


def read_safetensors(path):
    """Returns {name: (dtype, shape, numpy view of the raw data)} of a safetensors file."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        dtype = info["dtype"]
        if dtype == "BF16":
            array = raw.view(np.uint16)
        elif dtype == "F32":
            array = raw.view(np.float32)
        else:
            sys.exit(f"{name}: unsupported dtype {dtype}")
        tensors[name] = (dtype, info["shape"], array.reshape(info["shape"]))
    return tensors


def to_f32(dtype, array):
    if dtype == "F32":
        return np.asarray(array, dtype=np.float32)
    return (np.asarray(array, dtype=np.uint32) << 16).view(np.float32)


def to_bf16_bits(dtype, array):
    if dtype == "BF16":
        return np.ascontiguousarray(array)
    # Round to nearest even (the checkpoint's f32 values are bf16-exact, so this is a copy).
    bits = np.asarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def permute_rope(weights, n_head):
    """HF rotate-half q/k rows -> GGML interleaved rows (as convert_hf_to_gguf.py does)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--type", choices=["bf16", "f32", "q8_0"], default="bf16")
    args = parser.parse_args()

    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "mixtral":
        sys.exit("make_gguf.py handles Mixtral checkpoints only")
    tensors = read_safetensors(os.path.join(args.model_dir, "model.safetensors"))

    hidden = config["hidden_size"]
    n_head = config["num_attention_heads"]
    n_head_kv = config["num_key_value_heads"]
    n_layer = config["num_hidden_layers"]
    n_expert = config["num_local_experts"]
    vocab = config["vocab_size"]

    file_type = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f32": gguf.LlamaFileType.ALL_F32,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[args.type]
    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name("moe-serve bench-mixtral")
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(hidden // n_head)
    writer.add_rope_freq_base(float(config.get("rope_theta", 1e6)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(vocab)
    writer.add_file_type(file_type)
    # Placeholder SentencePiece vocabulary.
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, vocab)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    token_types = [int(gguf.TokenType.NORMAL)] * vocab
    token_types[0] = int(gguf.TokenType.UNKNOWN)
    token_types[1] = token_types[2] = int(gguf.TokenType.CONTROL)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(config.get("bos_token_id", 1))
    writer.add_eos_token_id(config.get("eos_token_id", 2))
    writer.add_add_bos_token(False)

    def add_matrix(name, dtype, array):
        # array: numpy [.., rows, cols] in the checkpoint's dtype.
        if args.type == "bf16":
            bits = to_bf16_bits(dtype, array)
            writer.add_tensor(name, bits, raw_shape=bits.shape,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif args.type == "f32":
            writer.add_tensor(name, np.ascontiguousarray(to_f32(dtype, array)))
        else:
            values = np.ascontiguousarray(to_f32(dtype, array))
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def add_f32(name, dtype, array):
        writer.add_tensor(name, np.ascontiguousarray(to_f32(dtype, array)))

    def get(name):
        return tensors[name]

    add_matrix("token_embd.weight", *get("model.embed_tokens.weight")[::2])
    for layer in range(n_layer):
        prefix = f"model.layers.{layer}."
        add_f32(f"blk.{layer}.attn_norm.weight", *get(prefix + "input_layernorm.weight")[::2])
        dtype, _, q = get(prefix + "self_attn.q_proj.weight")
        add_matrix(f"blk.{layer}.attn_q.weight", dtype, permute_rope(np.asarray(q), n_head))
        dtype, _, k = get(prefix + "self_attn.k_proj.weight")
        add_matrix(f"blk.{layer}.attn_k.weight", dtype, permute_rope(np.asarray(k), n_head_kv))
        add_matrix(f"blk.{layer}.attn_v.weight", *get(prefix + "self_attn.v_proj.weight")[::2])
        add_matrix(f"blk.{layer}.attn_output.weight",
                   *get(prefix + "self_attn.o_proj.weight")[::2])
        add_f32(f"blk.{layer}.ffn_norm.weight",
                *get(prefix + "post_attention_layernorm.weight")[::2])
        add_f32(f"blk.{layer}.ffn_gate_inp.weight",
                *get(prefix + "block_sparse_moe.gate.weight")[::2])
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            parts = [get(prefix + f"block_sparse_moe.experts.{e}.{ours}.weight")
                     for e in range(n_expert)]
            stacked = np.stack([np.asarray(p[2]) for p in parts])  # [experts, rows, cols]
            add_matrix(f"blk.{layer}.ffn_{theirs}_exps.weight", parts[0][0], stacked)
    add_f32("output_norm.weight", *get("model.norm.weight")[::2])
    add_matrix("output.weight", *get("lm_head.weight")[::2])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
