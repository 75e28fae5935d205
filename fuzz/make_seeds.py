#!/usr/bin/env python3
"""Writes the small seed corpora under fuzz/corpus/<target>/ (committed; rerun to refresh).

Usage: fuzz/make_seeds.py   (from the repository root; needs protoc for generate_request)
"""
import json
import os
import struct
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data)


def safetensors(tensors, meta=None):
    """tensors: {name: (dtype, shape, bytes)} -> file bytes."""
    header, blobs, offset = {}, b"", 0
    if meta:
        header["__metadata__"] = meta
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs += blob
        offset += len(blob)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blobs


def byte_level_tokenizer():
    # GPT-2's byte <-> unicode map, a handful of merges.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["l", "l"], ["e", "r"]]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>",
                          "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def sentencepiece_tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "▁abc", "é"]:
        vocab.setdefault(piece, len(vocab))
    merges = ["▁ a", "a b", "▁ ab", "▁ab c"]
    special = lambda i, c: {"id": i, "content": c, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                                      "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def main():
    # config.json: the fixture configs of every architecture.
    for arch in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        with open(os.path.join(ROOT, "tests/fixtures/models", arch, "config.json"), "rb") as f:
            put("model_config", arch + ".json", f.read())

    # safetensors: single file (byte 0 even) and index + shards (byte 0 odd).
    f32 = struct.pack("<4f", 1, 2, 3, 4)
    bf16 = b"\x80\x3f" * 6
    one = safetensors({"a.weight": ("F32", [2, 2], f32), "b.bias": ("BF16", [2, 3], bf16)},
                      {"format": "pt"})
    put("safetensors", "single", b"\x00" + one)
    put("safetensors", "f16_scalar", b"\x02" + safetensors({"s": ("F16", [], b"\x00\x3c"),
                                                             "e": ("F32", [0, 3], b"")}))
    shard1 = safetensors({"a.weight": ("F32", [2, 2], f32)})
    shard2 = safetensors({"b.bias": ("BF16", [2, 3], bf16)})
    index = json.dumps({"metadata": {"total_size": len(f32) + len(bf16)},
                        "weight_map": {"a.weight": "model-00001-of-00003.safetensors",
                                       "b.bias": "model-00002-of-00003.safetensors"}})
    put("safetensors", "sharded", b"\x01" + index.encode() + b"#SHARD#" + shard1 + b"#SHARD#"
        + shard2 + b"#SHARD#")

    # tokenizer.json (+ #CONFIG# tokenizer_config.json when byte 0 is odd).
    put("tokenizer_json", "byte_level", b"\x00" + json.dumps(byte_level_tokenizer()).encode())
    config = json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    put("tokenizer_json", "sentencepiece",
        b"\x01" + json.dumps(sentencepiece_tokenizer(), ensure_ascii=False).encode()
        + b"#CONFIG#" + config.encode())
    with open(os.path.join(ROOT, "tests/fixtures/tokenizers/kitchen_sink/tokenizer.json"),
              "rb") as f:
        put("tokenizer_json", "kitchen_sink", b"\x00" + f.read())

    # tokenizer (encode/decode): selector byte, then text or little-endian ids.
    put("tokenizer", "ascii", b"\x00Hello, world! The theater.")
    put("tokenizer", "utf8", "\x02caf\u00e9 \u4f60\u597d \U0001F600  \t\n end".encode())
    put("tokenizer", "special", b"\x08<|endoftext|>hi<s></s>")
    put("tokenizer", "ids", b"\x05" + struct.pack("<6i", 1, 2, 3, 300, -1, 70000))

    # generate_request: serialized GenerateRequest messages (last byte even: with tokenizer,
    # which has the Qwen3 chat template).
    proto_dir = os.path.join(ROOT, "proto")
    texts = {
        "token_ids": 'token_ids { ids: [1, 2, 3] } sampling { temperature: 0 } '
                     'stop { max_tokens: 8 ignore_eos: true } prompt_logprobs: true',
        "text_stop": 'text: "Hello world" request_id: "r-1" stop { max_tokens: 16 '
                     'stop_strings: ["\\n", "world"] stop_token_ids: [0] } logprobs: 5',
        "sampling": 'token_ids { ids: [5, 6, 7, 8] } sampling { temperature: 0.7 top_k: 40 '
                    'top_p: 0.9 min_p: 0.05 repetition_penalty: 1.1 presence_penalty: 0.5 '
                    'frequency_penalty: -0.5 seed: 42 logit_bias { key: 7 value: -100 } '
                    'logit_bias { key: 9 value: 2.5 } } return_routing: true '
                    'return_prompt_routing: true priority: -3 n: 3',
        "special": 'text: "<|endoftext|> caf\\303\\251" add_special_tokens: false '
                   'stop { min_tokens: 2 max_tokens: 4 }',
        "chat": 'chat { messages { role: "system" content: "Be brief." } '
                'messages { role: "user" content: "Hi <|im_end|>" } '
                'messages { role: "assistant" content: "<think>\\nhm\\n</think>\\n\\nHello" } '
                'messages { role: "user" content: "Why?" } add_generation_prompt: true '
                'template_variables { key: "enable_thinking" value: "false" } '
                'template_variables { key: "tools" value: "[{\\"name\\": \\"f\\"}]" } '
                'template_variables { key: "date_string" value: "\\"26 Nov 2026\\"" } } '
                'stop { max_tokens: 4 }',
    }
    for name, text in texts.items():
        data = subprocess.run(
            ["protoc", f"-I{proto_dir}", "--encode=moe.serving.v1.GenerateRequest",
             "moe/serving/v1/inference.proto"], input=text.encode(), check=True,
            capture_output=True).stdout
        put("generate_request", name, data)
    put("generate_request", "bad_utf8", b"\x0a\x03a\xffb")  # text = "a\xffb"


if __name__ == "__main__":
    main()
