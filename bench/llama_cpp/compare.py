#!/usr/bin/env python3
"""moe-serve vs llama.cpp on the same synthetic Mixtral weights, side by side in one run.

Builds (once; cached under BUILD/bench_models/) the bench-mixtral checkpoint as safetensors
(moe-make-model) and as GGUF (make_gguf.py, PyPI `gguf`), then runs, alternating engines,
  moe-serve:  BUILD/bench/moe-bench-decode (exact fp32 path, and --bf16_activations)
  llama.cpp:  llama_bench.py through PyPI `llama-cpp-python` (built from source)
with the same thread count, and prints a Markdown table: decode tokens/s at 1, 4 and 16
sequences and prefill tokens/s for a 512-token prompt, each engine's fraction of the decode
roofline (bytes read per step over the highest read bandwidth that the moe-bench-decode
runs of this comparison measured) and the ratio moe-serve / llama.cpp. Each figure is the best of --repeats runs.

  python3 bench/llama_cpp/compare.py [--build=build] [--threads=2] [--extra]

--extra adds llama.cpp rows for f32 and Q8_0 GGUF files of the same weights.
Setup: see bench/llama_cpp/README.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run(cmd, **kwargs):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, text=True, capture_output=True, cwd=ROOT, **kwargs)
    if result.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def ensure_models(build, extra):
    models = os.path.join(build, "bench_models")
    safetensors_dir = os.path.join(models, "bench-mixtral")
    if not os.path.exists(os.path.join(safetensors_dir, "model.safetensors")):
        run([os.path.join(build, "tools", "moe-make-model"), "--preset=bench-mixtral",
             f"--out={safetensors_dir}"])
    types = ["bf16"] + (["f32", "q8_0"] if extra else [])
    ggufs = {}
    for t in types:
        path = os.path.join(models, "gguf", f"bench-mixtral-{t}.gguf")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            run([sys.executable, os.path.join(HERE, "make_gguf.py"), safetensors_dir,
                 path + ".tmp", f"--type={t}"])
            os.replace(path + ".tmp", path)
        ggufs[t] = path
    return safetensors_dir, ggufs


ROW = re.compile(r"^\| (decode, (\d+) sequence\(s\)|prefill, (\d+)-token prompt) \| ([\d.]+) \|"
                 r"(?: ([\d.]+) MB \| ([\d.]+) \|)?")


def moe_bench(build, model_dir, args, bf16):
    cmd = [os.path.join(build, "bench", "moe-bench-decode"), f"--model={model_dir}",
           f"--threads={args.threads}", f"--steps={args.steps}",
           f"--sequences={args.sequences}", f"--prefill_tokens={args.prefill}"]
    if bf16:
        cmd.append("--bf16_activations")
    out = run(cmd).stdout
    result = {"decode": {}, "bytes": {}, "roofline": {}, "prefill": None, "bandwidth": None}
    for line in out.splitlines():
        m = re.search(r"memory read bandwidth .*: ([\d.]+) GB/s", line)
        if m:
            result["bandwidth"] = float(m.group(1))
        m = ROW.match(line)
        if not m:
            continue
        if m.group(2):
            n = m.group(2)
            result["decode"][n] = float(m.group(4))
            result["bytes"][n] = float(m.group(5))
            result["roofline"][n] = float(m.group(6))
        else:
            result["prefill"] = float(m.group(4))
    return result


def llama_bench(gguf_path, args):
    out = run([sys.executable, os.path.join(HERE, "llama_bench.py"), gguf_path,
               f"--threads={args.threads}", f"--steps={args.steps}",
               f"--sequences={args.sequences}", f"--prefill={args.prefill}"]).stdout
    return json.loads(out.strip().splitlines()[-1])


def best(results):
    merged = dict(results[0])
    merged["decode"] = {n: max(r["decode"][n] for r in results) for n in results[0]["decode"]}
    merged["prefill"] = max(r["prefill"] for r in results)
    if results[0].get("bandwidth") is not None:
        merged["bandwidths"] = [r["bandwidth"] for r in results]
        # Each run against the roofline at the bandwidth that same invocation measured.
        merged["own_fraction"] = {n: max(r["decode"][n] / r["roofline"][n] for r in results)
                                  for n in results[0]["decode"]}
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build", help="moe-serve build directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--sequences", default="1,4,16")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--extra", action="store_true", help="f32 and Q8_0 rows")
    args = parser.parse_args()
    build = os.path.join(ROOT, args.build) if not os.path.isabs(args.build) else args.build

    safetensors_dir, ggufs = ensure_models(build, args.extra)
    load_before = os.getloadavg()
    engines = {  # name -> callable
        "moe-serve bf16 weights, exact fp32": lambda: moe_bench(build, safetensors_dir, args,
                                                                False),
        "moe-serve bf16 weights, bf16 activations": lambda: moe_bench(build, safetensors_dir,
                                                                      args, True),
        "llama.cpp bf16": lambda: llama_bench(ggufs["bf16"], args),
    }
    if args.extra:
        engines["llama.cpp f32"] = lambda: llama_bench(ggufs["f32"], args)
        engines["llama.cpp Q8_0"] = lambda: llama_bench(ggufs["q8_0"], args)
    runs = {name: [] for name in engines}
    for _ in range(args.repeats):  # alternate engines so load changes hit both
        for name, fn in engines.items():
            runs[name].append(fn())
    results = {name: best(r) for name, r in runs.items()}
    load_after = os.getloadavg()

    exact = results["moe-serve bf16 weights, exact fp32"]
    reference = results["llama.cpp bf16"]
    # The read bandwidth of a shared VM moves with its neighbours' load: the roofline uses the
    # highest bandwidth any moe-bench-decode run of this comparison measured (conservative).
    bandwidths = [b for name, r in results.items() for b in r.get("bandwidths", [])]
    bandwidth = max(bandwidths)
    sequences = [n for n in args.sequences.split(",") if n]
    for n in sequences:
        exact["roofline"][n] = bandwidth * 1e3 / exact["bytes"][n] * int(n)
    print(f"memory read bandwidth ({args.threads} threads, moe-bench-decode runs): "
          + ", ".join(f"{b:.1f}" for b in bandwidths) + f" GB/s (roofline uses {bandwidth:.1f});"
          f" load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"llama.cpp: {reference.get('system_info', '').strip()}")
    print()
    header = "| engine | " + " | ".join(f"decode {n} seq tok/s (roofline, vs llama.cpp bf16)"
                                         for n in sequences)
    header += f" | prefill {args.prefill} tok/s (vs llama.cpp bf16) |"
    print(header)
    print("|---" * (len(sequences) + 2) + "|")
    for name, r in results.items():
        cells = []
        for n in sequences:
            # Roofline: bytes the bf16 model reads per step (from moe-serve's routing record);
            # f32 weights read twice the weight bytes, Q8_0 ~1.06x.
            scale = {"f32": 2.0, "Q8_0": 34 / 32 / 2}.get(name.split()[-1], 1.0)
            roofline = exact["roofline"][n] / scale
            cells.append(f"{r['decode'][n]:.1f} ({r['decode'][n] / roofline:.2f}, "
                         f"{r['decode'][n] / reference['decode'][n]:.2f}x)")
        cells.append(f"{r['prefill']:.1f} ({r['prefill'] / reference['prefill']:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("moe-serve decode against the roofline at the bandwidth its own invocation measured "
          "(best run; the VM's bandwidth moves between invocations):")
    for name, r in results.items():
        if "own_fraction" in r:
            print(f"- {name}: " + ", ".join(f"{n} seq {r['own_fraction'][n]:.2f}"
                                             for n in sequences))
    print("roofline tokens/s (bf16 weights): " + ", ".join(
        f"{n} seq {exact['roofline'][n]:.1f} ({exact['bytes'][n]:.0f} MB/step)" for n in sequences))
    print(json.dumps({"results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
