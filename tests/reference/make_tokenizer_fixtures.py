#!/usr/bin/env python3
"""Makes the tokenizer fixtures under tests/fixtures/tokenizers/ with Hugging Face `tokenizers`.

For every tokenizer (four trained on a small corpus, two converted from Mixtral's own
SentencePiece model that ships inside PyPI's `mistral-common`) it records, for every corpus
entry, the ids and decoded text that `tokenizers` produces, so the C++ tests can run without
Python. Pinned versions: tests/reference/requirements-tokenizer.txt.

    pip install -r tests/reference/requirements-tokenizer.txt
    python3 tests/reference/make_tokenizer_fixtures.py

Outputs (all small):
  tests/fixtures/tokenizers/corpus.json            the test corpus
  tests/fixtures/tokenizers/<name>/tokenizer.json  trained tokenizers (+ tokenizer_config.json)
  tests/fixtures/tokenizers/mixtral.tar.gz         mixtral_legacy/ and mixtral_metaspace/
  tests/fixtures/tokenizers/expected/<name>.json   expected ids and text per corpus entry
"""

import glob
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile

import tokenizers
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors, trainers)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers")

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    ("english", "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, don't "
                "worry! She said: \"I've got it\" and they'd left."),
    ("english_caps", "I'M SURE HE'LL SAY IT'S FINE, YOU'VE SEEN IT'D WORK. 'S 'T 'Re 'LL"),
    ("german", "Größenwahn und Übermut: Die Straße führt über Äcker. Fußgänger müssen "
               "„Vorsicht“ walten lassen. ẞ"),
    ("french_nfd", "Cafe\u0301 de\u0301ja\u0300 vu, nai\u0308ve fac\u0327ade, déjà vu"),
    ("chinese", "我们正在测试分词器。这是一个中文句子，包含标点符号！机器学习很有趣。"),
    ("japanese", "日本語のテキスト、カタカナとひらがなを含む。東京タワーは３３３メートルです。"),
    ("korean", "안녕하세요, 세계! 한국어 문장입니다. 한글 자모: ᄀ ᅡ ᆨ"),
    ("cyrillic", "Съешь же ещё этих мягких французских булок, да выпей чаю. ЁЖИК в тумане."),
    ("arabic", "مرحبا بالعالم! هذه جملة عربية للاختبار ١٢٣ مع أرقام."),
    ("hindi", "नमस्ते दुनिया। यह एक परीक्षण वाक्य है। क्षत्रिय ज्ञान ०१२"),
    ("thai", "สวัสดีครับ ภาษาไทยไม่มีช่องว่างระหว่างคำ"),
    ("emoji", "Hello 👋🏽 family: 👨‍👩‍👧‍👦 flags 🇩🇪🇯🇵 and ❤️‍🔥 🧑🏿‍💻 "
              "👍🏻👍🏼👍🏽👍🏾👍🏿 🏳️‍🌈"),
    ("code", "def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n\n\n"
             "int main() {\n    printf(\"%d\\n\", 42);  // comment\n    return 0;\n}\n"
             "x = [i**2 for i in range(10) if i % 3 == 0]\n"),
    ("whitespace", "a  b   c    d\t\t\te\n\n\n   \n\t \r\n   end     "),
    ("long_whitespace", " " * 40 + "x" + "\t" * 12 + "y" + "\n" * 9 + " " * 17),
    ("digits", "3.14159265358979 1234567890 0.001 1e-9 -42 ٣٤٥ ①②③ ¹²³ 2024-01-31"),
    ("urls", "https://example.com/path/to/page?query=value&x=1#frag http://127.0.0.1:8080/ "
             "user@example.org www.test-site.co.uk/~user"),
    ("special_strings", "<s>Hello</s> <|endoftext|> <|im_start|>user\nhi<|im_end|> <unk> "
                        "<mask> and  <mask>x [WORD] a[WORD]b rstripme   y <|begin_of_text|>"),
    ("special_adjacent", "a<|endoftext|>b<s><s></s>c<|im_start|><|im_end|>"),
    ("empty", ""),
    ("single_space", " "),
    ("single_newline", "\n"),
    ("compat_chars", "ﬁ ﬂ Ⅻ ㎏ ™ ½ ſ K Ω ｆｕｌｌｗｉｄｔｈ"),
    ("zero_width", "zero\u200bwidth\u200djoin\ufeffbom\u2060word"),
    ("rare_chars", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 ꙮ 𝄞 \U0010FFFD \uE000"),
    ("control_chars", "tab\tx\x01\x7f bell\x07 esc\x1b[0m nul-free"),
    ("unicode_spaces", "a\u00a0b\u2003c\u3000d\u2028e\u0085f\u202fg"),
    ("leading_trailing", "   leading and trailing   "),
    ("metaspace_char", "already▁has▁metaspace ▁ ▁▁x"),
    ("repeats", "a" * 45 + "!" * 20 + "..." + "=" * 30 + "ab" * 20),
    ("punctuation", "well-known, state-of-the-art; co-op: yes!!! why??? no... (x) [y] {z}"),
    ("mixed_scripts", "Hello世界Привет123مرحبا😀done"),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis" * 4 +
                  "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(60))),
]

SPECIALS_MAIN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def fnv1a64(data: bytes) -> str:
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def ids_bytes(ids) -> bytes:
    out = bytearray()
    for i in ids:
        out += int(i).to_bytes(4, "little", signed=True)
    return bytes(out)


def mixed_text() -> str:
    """About 1 MiB of mixed text; tests/tokenizer/ builds the same bytes (MixedText())."""
    parts, total, k = [], 0, 0
    while total < (1 << 20):
        piece = "%d: %s\n" % (k, CORPUS[k % len(CORPUS)][1])
        parts.append(piece)
        total += len(piece.encode("utf-8"))
        k += 1
    return "".join(parts)


def training_texts():
    texts = [t for _, t in CORPUS] * 3
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="ignore") as f:
                texts.extend(f.read().split("\n\n"))
    return texts


def train(tok, vocab_size, special_tokens, **trainer_args):
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  show_progress=False, **trainer_args)
    tok.train_from_iterator(training_texts(), trainer)
    return tok


def make_gpt2():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, 2500, ["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True),
                            AddedToken("<|im_start|>", special=True, normalized=False),
                            AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("[WORD]", single_word=True, normalized=False),
                    AddedToken("rstripme", rstrip=True, normalized=True),
                    AddedToken("Hello", normalized=True)])
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}
    return tok.to_str(), config


def make_gpt2_prefix(gpt2_json):
    j = json.loads(gpt2_json)
    j["pre_tokenizer"]["add_prefix_space"] = True
    return json.dumps(j, ensure_ascii=False), {"bos_token": None, "eos_token": "<|endoftext|>"}


def make_qwen2():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, 2500, SPECIALS_MAIN, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False,
              "added_tokens_decoder": {}}
    return tok.to_str(), config


def make_llama3():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    train(tok, 2000, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    j = json.loads(tok.to_str())
    j["model"]["ignore_merges"] = True
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return json.dumps(j, ensure_ascii=False), config


def make_kitchen_sink():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(left=True, right=True), normalizers.Replace("``", "\"")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("-", behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex("[,;:]"), behavior="removed"),
        pre_tokenizers.Split(Regex("!+"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"\?"), behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[^/]+"), behavior="removed", invert=True),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("##", ""),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="always"),
                                     decoders.Strip(content="▁", left=1, right=0)])
    train(tok, 1500, ["<unk>", "<s>", "</s>"], continuing_subword_prefix="##",
          limit_alphabet=150)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    tok.add_tokens([AddedToken("state-of-the-art", normalized=True),
                    AddedToken("ＦＵＬＬ", normalized=True)])
    config = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
              "unk_token": "<unk>"}
    return tok.to_str(), config


def make_mixtral(legacy):
    import mistral_common
    from transformers import LlamaTokenizerFast
    model = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    fast = LlamaTokenizerFast(vocab_file=model, legacy=legacy, add_prefix_space=True,
                              from_slow=True)
    j = json.loads(fast.backend_tokenizer.to_str())
    if legacy:
        # The tokenizer.json on the Hub for Mixtral stores merges as "a b" strings.
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                                for m in j["model"]["merges"]]
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "legacy": legacy,
              "tokenizer_class": "LlamaTokenizer"}
    return json.dumps(j, ensure_ascii=False, separators=(",", ":")), config


def expected_for(name, tok_json):
    tok = Tokenizer.from_str(tok_json)
    cases = []
    for entry_name, text in CORPUS:
        tok.encode_special_tokens = True
        ids = tok.encode(text, add_special_tokens=False).ids
        tok.encode_special_tokens = False
        ids_special = tok.encode(text, add_special_tokens=True).ids
        cases.append({
            "name": entry_name,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "ids_with_special": ids_special,
            "decoded_with_special": tok.decode(ids_special, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids_special, skip_special_tokens=True),
        })
    # Decoding arbitrary id sequences: byte-fallback runs, partial UTF-8, special tokens.
    rng = random.Random(1234)
    size = tok.get_vocab_size(with_added_tokens=True)
    random_decode = []
    for n in range(40):
        length = rng.randint(1, 24)
        if n % 2 == 0:
            ids = [rng.randrange(0, min(size, 300)) for _ in range(length)]
        else:
            ids = [rng.randrange(0, size) for _ in range(length)]
        random_decode.append({"ids": ids,
                              "decoded": tok.decode(ids, skip_special_tokens=False),
                              "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    tok.encode_special_tokens = True
    text = mixed_text()
    ids = tok.encode(text, add_special_tokens=False).ids
    decoded = tok.decode(ids, skip_special_tokens=False)
    mixed = {"text_bytes": len(text.encode("utf-8")),
             "text_fnv1a64": fnv1a64(text.encode("utf-8")),
             "count": len(ids), "ids_fnv1a64": fnv1a64(ids_bytes(ids)),
             "first_ids": ids[:2000],
             "decoded_fnv1a64": fnv1a64(decoded.encode("utf-8"))}
    return {"tokenizer": name, "tokenizers_version": tokenizers.__version__,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "cases": cases, "random_decode": random_decode, "mixed_1mb": mixed}


def write_json(path, obj, compact=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    write_json(os.path.join(OUT, "corpus.json"),
               [{"name": n, "text": t} for n, t in CORPUS])
    made = {}
    gpt2_json, gpt2_config = make_gpt2()
    made["gpt2_bytelevel"] = (gpt2_json, gpt2_config)
    made["gpt2_prefix_space"] = make_gpt2_prefix(gpt2_json)
    made["qwen2_split"] = make_qwen2()
    made["llama3_split"] = make_llama3()
    made["kitchen_sink"] = make_kitchen_sink()
    for name, (tok_json, config) in made.items():
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(json.loads(tok_json), ensure_ascii=False,
                               separators=(",", ":")) + "\n")
        write_json(os.path.join(d, "tokenizer_config.json"), config)

    # The Mixtral files are ~1.3 MB each as JSON: commit them compressed; CMake extracts them.
    mixtral = {"mixtral_legacy": make_mixtral(True), "mixtral_metaspace": make_mixtral(False)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, (tok_json, config) in mixtral.items():
            for fname, data in (("tokenizer.json", tok_json + "\n"),
                                ("tokenizer_config.json", json.dumps(config, indent=1) + "\n")):
                raw = data.encode("utf-8")
                info = tarfile.TarInfo(name + "/" + fname)
                info.size, info.mtime, info.mode = len(raw), 0, 0o644
                tar.addfile(info, io.BytesIO(raw))
    with open(os.path.join(OUT, "mixtral.tar.gz"), "wb") as f:
        f.write(buf.getvalue())
    made.update(mixtral)

    for name, (tok_json, _) in made.items():
        write_json(os.path.join(OUT, "expected", name + ".json"), expected_for(name, tok_json),
                   compact=True)
        print("wrote", name)


if __name__ == "__main__":
    main()
