#!/usr/bin/env python3
"""Encode throughput: moe::Tokenizer (C++) vs Hugging Face `tokenizers`, same text, one run.

    cmake --build build --target tokenizer_bench
    python3 bench/tokenizer/bench_tokenizer.py --bench build/bench/tokenizer/tokenizer_bench

Both run single-threaded (RAYON_NUM_THREADS=1 for `tokenizers`; one encode call of the whole
text, special tokens not added). Texts: the 1 MiB mixed corpus text of the tests, and the
English licence texts of /usr/share/common-licenses (less repetitive). "cold" is the first
encode of a freshly loaded tokenizer (empty pre-token cache), "warm" the best of the repeats.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
TOKENIZERS = ["gpt2_bytelevel", "qwen2_split", "llama3_split", "mixtral_legacy",
              "mixtral_metaspace"]


def mixed_text():
    with open(os.path.join(FIXTURES, "corpus.json"), encoding="utf-8") as f:
        corpus = [e["text"] for e in json.load(f)]
    parts, total, k = [], 0, 0
    while total < (1 << 20):
        piece = "%d: %s\n" % (k, corpus[k % len(corpus)])
        parts.append(piece)
        total += len(piece.encode("utf-8"))
        k += 1
    return "".join(parts)


def licence_text():
    texts = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="ignore") as f:
                texts.append(f.read())
    return "\n".join(texts)


def model_dir(name, extracted):
    if name.startswith("mixtral"):
        return os.path.join(extracted, name)
    return os.path.join(FIXTURES, name)


def bench_hf(path, text, repeats):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.encode_special_tokens = True
    start = time.perf_counter()
    ids = tok.encode(text, add_special_tokens=False).ids
    cold = time.perf_counter() - start
    warm = min(timed(lambda: tok.encode(text, add_special_tokens=False)) for _ in range(repeats))
    decode = min(timed(lambda: tok.decode(ids, skip_special_tokens=False))
                 for _ in range(repeats))
    mb = len(text.encode("utf-8")) / 1e6
    return {"tokens": len(ids), "encode_cold_mb_s": mb / cold, "encode_warm_mb_s": mb / warm,
            "decode_mb_s": mb / decode}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True, help="path to the tokenizer_bench binary")
    parser.add_argument("--extracted", default=None,
                        help="folder with mixtral_legacy/ and mixtral_metaspace/ (default: "
                             "next to the bench binary's build tree)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import tokenizers
    extracted = args.extracted or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(args.bench)))),
        "tests", "tokenizer", "fixtures")
    texts = {"mixed_1mib": mixed_text(), "licences": licence_text()}
    print("tokenizers %s, single thread; MB/s (1 MB = 1e6 bytes)" % tokenizers.__version__)
    print("%-18s %-10s %8s | %9s %9s %9s | %9s %9s %9s" % (
        "tokenizer", "text", "tokens", "ours cold", "ours warm", "ours dec",
        "HF cold", "HF warm", "HF dec"))
    with tempfile.TemporaryDirectory() as tmp:
        for text_name, text in texts.items():
            text_path = os.path.join(tmp, text_name + ".txt")
            with open(text_path, "w", encoding="utf-8") as f:
                f.write(text)
            for name in TOKENIZERS:
                path = model_dir(name, extracted)
                out = subprocess.run([args.bench, path, text_path, str(args.repeats)],
                                     capture_output=True, text=True, check=True)
                ours = json.loads(out.stdout)
                hf = bench_hf(path, text, args.repeats)
                if hf["tokens"] != ours["tokens"]:
                    print("token count differs for %s/%s: ours %d, HF %d" % (
                        name, text_name, ours["tokens"], hf["tokens"]), file=sys.stderr)
                print("%-18s %-10s %8d | %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f" % (
                    name, text_name, ours["tokens"], ours["encode_cold_mb_s"],
                    ours["encode_warm_mb_s"], ours["decode_mb_s"], hf["encode_cold_mb_s"],
                    hf["encode_warm_mb_s"], hf["decode_mb_s"]))


if __name__ == "__main__":
    main()
