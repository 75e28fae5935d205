#!/usr/bin/env python3
"""Chat-template render time: moe::ChatTemplate (C++) vs transformers' jinja2 environment, the
same templates and conversations, one run.

    cmake --build build --target chat_template_bench
    python3 bench/tokenizer/bench_chat_template.py --bench build/bench/tokenizer/chat_template_bench

Templates: the published ones of tests/fixtures/chat_templates/. Conversations of 2, 32 and 256
messages (user/assistant turns of ~300 bytes; Qwen3's assistant turns carry <think> blocks).
Both sides render a parsed template (transformers caches its compiled template too), single
threaded; the figure is the median of the repeats. The rendered sizes must agree (the texts
themselves are checked for equality by tests/tokenizer/chat_template_test.cc).
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from transformers.utils.chat_template_utils import _compile_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATES = os.path.join(ROOT, "tests", "fixtures", "chat_templates")
SENTENCE = ("Mixture-of-Experts layers route each token to a few experts, so the active "
            "parameters per token are a fraction of the total. ")


def conversation(template, n):
    messages = []
    for i in range(n):
        if i % 2 == 0:
            messages.append({"role": "user", "content": f"Question {i}: " + SENTENCE * 2})
        else:
            content = SENTENCE * 2
            if template.startswith("qwen3"):
                content = "<think>\nLet me think.\n</think>\n\n" + content
            messages.append({"role": "assistant", "content": content})
    return {"messages": messages, "tools": None, "documents": None,
            "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"}


def python_median_us(compiled, context, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        text = compiled.render(**context)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, len(text.encode("utf-8"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True, help="path of the chat_template_bench binary")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print("| template | messages | moe-serve us | transformers (jinja2) us | ratio |")
    print("|---|---|---|---|---|")
    for template in ["mixtral_8x7b_instruct.jinja", "qwen2_moe_chatml.jinja", "qwen3_moe.jinja"]:
        path = os.path.join(TEMPLATES, template)
        with open(path, encoding="utf-8") as f:
            compiled = _compile_jinja_template(f.read())
        for n in (2, 32, 256):
            context = conversation(template, n)
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(context, f)
                context_path = f.name
            try:
                out = json.loads(subprocess.run(
                    [args.bench, path, context_path, str(args.repeats)], check=True,
                    capture_output=True, text=True).stdout)
            finally:
                os.unlink(context_path)
            py_us, py_bytes = python_median_us(compiled, context, args.repeats)
            if py_bytes != out["rendered_bytes"]:
                raise SystemExit(f"{template} x{n}: rendered {out['rendered_bytes']} bytes, "
                                 f"transformers {py_bytes}")
            cpp_us = out["render_median_us"]
            print(f"| {template} | {n} | {cpp_us:.1f} | {py_us:.1f} | {py_us / cpp_us:.1f}x |")


if __name__ == "__main__":
    main()
