#!/usr/bin/env python3
"""llama.cpp decode / prefill throughput through llama-cpp-python's low-level API.

Mirrors moe-bench-decode: for each batch size n, n sequences each get a 32-token prompt
(one llama_decode), then `steps` decode steps of one llama_batch with n tokens (one per
sequence, seq_id s, greedy next token, logits for every token); only llama_decode is timed.
Prefill: one prompt of `prefill` tokens in one llama_decode (n_batch = n_ubatch = prompt),
logits for the last token, best of 3. Prints one JSON object.

  llama_bench.py MODEL.gguf --threads=2 --steps=32 --sequences=1,4,16 --prefill=512
"""

import argparse
import json
import sys
import time

import numpy as np

import llama_cpp as L


def make_batch(capacity):
    return L.llama_batch_init(capacity, 0, 1)


def fill(batch, tokens, positions, seq_ids, want_logits):
    batch.n_tokens = len(tokens)
    for i, (token, pos, seq, logits) in enumerate(zip(tokens, positions, seq_ids, want_logits)):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--sequences", default="1,4,16")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args()

    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.model.encode(), model_params)
    if not model:
        sys.exit(f"llama.cpp could not load {args.model}")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    sequence_counts = [int(s) for s in args.sequences.split(",") if s]
    max_seqs = max(sequence_counts)
    ctx_params = L.llama_context_default_params()
    ctx_params.n_ctx = max(args.prefill, max_seqs * (args.prompt + args.steps + 8)) + 64
    ctx_params.n_batch = max(args.prefill, max_seqs * args.prompt)
    ctx_params.n_ubatch = ctx_params.n_batch
    ctx_params.n_seq_max = max_seqs
    ctx_params.n_threads = args.threads
    ctx_params.n_threads_batch = args.threads
    ctx_params.no_perf = True
    # One KV buffer shared by all sequences, so that the prefill prompt may use all of it.
    ctx_params.kv_unified = True
    ctx = L.llama_init_from_model(model, ctx_params)
    if not ctx:
        sys.exit("llama.cpp could not create a context")
    memory = L.llama_get_memory(ctx)
    batch = make_batch(ctx_params.n_batch)
    result = {"system_info": L.llama_print_system_info().decode(), "decode": {}, "prefill": None}

    def decode_timed():
        start = time.perf_counter()
        rc = L.llama_decode(ctx, batch)
        L.llama_synchronize(ctx)
        elapsed = time.perf_counter() - start
        if rc != 0:
            sys.exit(f"llama_decode returned {rc}")
        return elapsed

    def argmax(i):
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,))
        return int(np.argmax(logits))

    for n in sequence_counts:
        L.llama_memory_clear(memory, True)
        tokens, positions, seqs, wants = [], [], [], []
        for s in range(n):
            for i in range(args.prompt):
                tokens.append((s * 7919 + i * 104729) % vocab)
                positions.append(i)
                seqs.append(s)
                wants.append(i == args.prompt - 1)
        fill(batch, tokens, positions, seqs, wants)
        decode_timed()
        nxt = [argmax(s * args.prompt + args.prompt - 1) for s in range(n)]
        pos = args.prompt
        total = 0.0
        for step in range(-2, args.steps):  # 2 warm-up steps
            fill(batch, nxt, [pos] * n, list(range(n)), [True] * n)
            elapsed = decode_timed()
            nxt = [argmax(s) for s in range(n)]
            pos += 1
            if step >= 0:
                total += elapsed
        result["decode"][str(n)] = n * args.steps / total

    best = 0.0
    for _ in range(3):
        L.llama_memory_clear(memory, True)
        tokens = [(i * 104729) % vocab for i in range(args.prefill)]
        fill(batch, tokens, list(range(args.prefill)), [0] * args.prefill,
             [i == args.prefill - 1 for i in range(args.prefill)])
        best = max(best, args.prefill / decode_timed())
    result["prefill"] = best

    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
