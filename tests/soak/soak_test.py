#!/usr/bin/env python3
"""Soak under faults: the real moe-serve binary on loopback, many concurrent Generate streams
for a bounded time with random client cancellations, short deadlines, slow readers, overload
bursts and malformed requests mixed in. Prompts are token ids and, for two of them,
conversations rendered by the demo model's chat template.

Checks at the end:
- every request the server accepted either completed (OK) with exactly its offline greedy
  tokens (the reference: each prompt run alone, sequentially, temperature 0, before the soak),
  or ended with the status its fault calls for (CANCELLED, DEADLINE_EXCEEDED,
  RESOURCE_EXHAUSTED for bursts, INVALID_ARGUMENT for malformed requests), and whatever it
  streamed before that is a prefix of its reference;
- the engine is idle with every KV block free: /metrics moeserve_num_requests_running == 0,
  moeserve_num_requests_waiting == 0 and moeserve_kv_cache_usage_ratio == 0;
- resident memory (VmRSS) is back within max(24 MiB, 15%) of its value after a warm-up phase
  with the same mix;
- health is still SERVING, and SIGTERM still drains and exits 0.
Prints request counts by outcome.

Usage: soak_test.py BUILD_DIR SOURCE_DIR   (exit 77 = skipped: grpcio missing)
Environment: MOE_SOAK_SECONDS (default 30), MOE_SOAK_CONCURRENCY (default 16), MOE_SOAK_SEED.
"""
import collections
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request

try:
    import grpc
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as error:  # pragma: no cover
    print(f"skipped: {error} (pip install grpcio grpcio-health-checking grpcio-reflection)")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testing"))
from serve_process import ServerProcess, make_demo_model, message_class  # noqa: E402

SERVICE = "moe.serving.v1.Inference"
SECONDS = float(os.environ.get("MOE_SOAK_SECONDS", "30"))
CONCURRENCY = int(os.environ.get("MOE_SOAK_CONCURRENCY", "16"))
SEED = int(os.environ.get("MOE_SOAK_SEED", str(int(time.time()))))
WARMUP_SECONDS = min(8.0, max(3.0, SECONDS / 5))
RSS_BOUND_MIB = 24
RSS_BOUND_FRACTION = 0.15
MAX_QUEUED = 24  # small enough that bursts overflow the queue


class Server(ServerProcess):
    def __init__(self, build_dir, model_dir):
        super().__init__(build_dir, model_dir,
                         ["--metrics_port=0", "--kv_cache_mib=4", "--max_num_seqs=16",
                          f"--max_queued_requests={MAX_QUEUED}", "--log_requests=false",
                          "--drain_timeout=30s"], timeout=120)
        if self.metrics_port is None:
            raise RuntimeError("moe-serve logged no metrics port:\n" + "".join(self.log_lines))

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def metrics(self):
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"(moeserve_[a-z_]+)(\{[^}]*\})?\s+(\S+)", line)
            if m:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
        return values


class Soak:
    def __init__(self, server, channel):
        self.server = server
        self.channel = channel
        self.health = health_pb2_grpc.HealthStub(channel)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.Request = message_class(pool, "moe.serving.v1.GenerateRequest")
        self.Response = message_class(pool, "moe.serving.v1.GenerateResponse")
        path = f"/{SERVICE}/Generate"
        self.generate = channel.unary_stream(
            path, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=self.Response.FromString)
        self.generate_raw = channel.unary_stream(
            path, request_serializer=lambda b: b,
            response_deserializer=self.Response.FromString)
        rng = random.Random(SEED)
        # Prompts share prefixes now and then, so the prefix cache is exercised too.
        base = [rng.randrange(3, 2000) for _ in range(24)]
        self.prompts = []
        for i in range(12):
            if i % 3 == 0:
                prompt = base[:rng.randrange(4, 24)] + [rng.randrange(3, 2000)]
            else:
                prompt = [rng.randrange(3, 2000) for _ in range(rng.randrange(2, 40))]
            self.prompts.append((prompt, rng.randrange(4, 28)))
        # Two conversations through the demo model's chat template (rendered per request).
        for i in range(2):
            chat = {"messages": [{"role": "system", "content": f"Soak {i}."},
                                 {"role": "user", "content": "Which experts? " * (i + 1)}]}
            self.prompts.append((chat, rng.randrange(4, 28)))
        self.reference = []
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.failures = []

    def request(self, index):
        prompt, max_tokens = self.prompts[index]
        kind = {"chat": prompt} if isinstance(prompt, dict) else {"token_ids": {"ids": prompt}}
        return self.Request(**kind, sampling={"temperature": 0.0},
                            stop={"max_tokens": max_tokens, "ignore_eos": True},
                            request_id=f"soak-{index}")

    def compute_reference(self):
        for i in range(len(self.prompts)):
            tokens = [t for r in self.generate(self.request(i), timeout=120) for t in r.token_ids]
            if len(tokens) != self.prompts[i][1]:
                raise RuntimeError(f"reference {i}: {len(tokens)} tokens")
            self.reference.append(tokens)

    def record(self, kind, outcome, detail=""):
        with self.lock:
            self.counts[(kind, outcome)] += 1
            if outcome == "UNEXPECTED" and len(self.failures) < 20:
                self.failures.append(f"{kind}: {detail}")

    # One request: `kind` says which fault; `allowed` the non-OK codes that fault may end with.
    def run_one(self, kind, rng, index, allowed, timeout=60.0, cancel_after=None,
                read_delay=0.0):
        call = self.generate(self.request(index), timeout=timeout)
        tokens = []
        try:
            for n, response in enumerate(call):
                tokens.extend(response.token_ids)
                if cancel_after is not None and n + 1 >= cancel_after:
                    call.cancel()
                if read_delay:
                    time.sleep(read_delay)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        ref = self.reference[index]
        if tokens != ref[:len(tokens)]:
            self.record(kind, "UNEXPECTED", f"prompt {index}: streamed {tokens} not a prefix "
                                            f"of {ref}")
        elif code == grpc.StatusCode.OK:
            if tokens == ref:
                self.record(kind, "OK")
            else:
                self.record(kind, "UNEXPECTED", f"prompt {index}: OK with {tokens} != {ref}")
        elif code in allowed:
            self.record(kind, code.name)
        else:
            self.record(kind, "UNEXPECTED", f"prompt {index}: {code}")

    def malformed(self, rng):
        choice = rng.randrange(8)
        if choice == 0:
            request = self.request(0)
            request.sampling.top_p = 1.5
        elif choice == 1:
            request = self.Request(token_ids={"ids": [1, -5]})
        elif choice == 2:
            request = self.Request()  # no prompt
        elif choice == 3:
            request = self.request(1)
            request.stop.max_tokens = 10 ** 6
        elif choice == 6:  # a conversation without messages
            request = self.Request(chat={"messages": []})
        elif choice == 7:  # a template variable that is not JSON
            request = self.Request(chat={"messages": [{"role": "user", "content": "x"}],
                                         "template_variables": {"enable_thinking": "nope"}})
        if choice <= 3 or choice >= 6:
            call = self.generate(request, timeout=30)
        elif choice == 4:  # bytes that are not a GenerateRequest
            call = self.generate_raw(bytes(rng.randrange(256) for _ in range(rng.randrange(
                1, 64))), timeout=30)
        else:  # invalid UTF-8 in the text field
            call = self.generate_raw(b"\x0a\x04ab\xc3\x28", timeout=30)
        try:
            for _ in call:
                pass
            # Random bytes can happen to be a valid request; those complete normally.
            self.record("malformed", "OK" if choice == 4 else "UNEXPECTED",
                        f"choice {choice} succeeded")
        except grpc.RpcError as error:
            self.record("malformed", error.code().name if error.code() in (
                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
                else "UNEXPECTED", f"choice {choice}: {error.code()} {error.details()}")

    def burst(self, rng):
        # Many streams at once, started before any is read: overflows the queue.
        n = rng.randrange(MAX_QUEUED + 8, 2 * MAX_QUEUED + 8)
        calls = []
        for _ in range(n):
            index = rng.randrange(len(self.prompts))
            calls.append((index, self.generate(self.request(index), timeout=120)))
        for index, call in calls:
            tokens = []
            try:
                for response in call:
                    tokens.extend(response.token_ids)
                if tokens == self.reference[index]:
                    self.record("burst", "OK")
                else:
                    self.record("burst", "UNEXPECTED", f"prompt {index}: {tokens}")
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not tokens:
                    self.record("burst", "RESOURCE_EXHAUSTED")
                else:
                    self.record("burst", "UNEXPECTED", f"{error.code()} after {len(tokens)}")

    def worker(self, seed, end):
        rng = random.Random(seed)
        while time.time() < end:
            index = rng.randrange(len(self.prompts))
            r = rng.random()
            busy = (grpc.StatusCode.RESOURCE_EXHAUSTED,)  # other workers' bursts fill the queue
            if r < 0.30:
                self.run_one("normal", rng, index, busy)
            elif r < 0.45:
                self.run_one("cancel", rng, index, busy + (grpc.StatusCode.CANCELLED,),
                             cancel_after=rng.randrange(1, 4))
            elif r < 0.60:
                self.run_one("deadline", rng, index,
                             busy + (grpc.StatusCode.DEADLINE_EXCEEDED,),
                             timeout=rng.uniform(0.005, 0.3))
            elif r < 0.72:
                self.run_one("slow_reader", rng, index, busy, read_delay=rng.uniform(0.02, 0.1))
            elif r < 0.97:
                self.malformed(rng)
            else:
                self.burst(rng)

    def run_phase(self, seconds, seed):
        end = time.time() + seconds
        threads = [threading.Thread(target=self.worker, args=(seed * 1000 + i, end))
                   for i in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 300)
            if t.is_alive():
                raise RuntimeError("a soak worker hung")

    def wait_idle(self):
        deadline = time.time() + 60
        while True:
            m = self.server.metrics()
            idle = (m.get("moeserve_num_requests_running") == 0 and
                    m.get("moeserve_num_requests_waiting") == 0 and
                    m.get("moeserve_kv_cache_usage_ratio") == 0)
            if idle or time.time() > deadline:
                return m, idle
            time.sleep(0.1)


def main(build_dir, source_dir):
    print(f"soak: {SECONDS:.0f} s, concurrency {CONCURRENCY}, seed {SEED}", flush=True)
    with tempfile.TemporaryDirectory(prefix="moe_soak_") as tmp:
        model_dir = os.path.join(tmp, "demo_model")
        make_demo_model(build_dir, source_dir, model_dir)
        server = Server(build_dir, model_dir)
        try:
            return soak(server)
        finally:
            server.kill()


def soak(server):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + 120
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        if time.time() > deadline:
            raise RuntimeError("never SERVING:\n" + "".join(server.log_lines))
        time.sleep(0.05)
    s = Soak(server, channel)
    t0 = time.time()
    s.compute_reference()
    print(f"soak: reference of {len(s.prompts)} prompts (alone, sequential, greedy) in "
          f"{time.time() - t0:.1f} s", flush=True)

    s.run_phase(WARMUP_SECONDS, SEED + 1)
    _, idle = s.wait_idle()
    rss_warm = server.rss_kib()
    print(f"soak: warm-up {WARMUP_SECONDS:.0f} s, {sum(s.counts.values())} requests; "
          f"VmRSS {rss_warm / 1024:.1f} MiB", flush=True)
    s.counts.clear()

    t0 = time.time()
    s.run_phase(SECONDS, SEED + 2)
    elapsed = time.time() - t0
    metrics, idle = s.wait_idle()
    rss_end = server.rss_kib()

    ok = True
    print(f"soak: {sum(s.counts.values())} requests in {elapsed:.1f} s; by fault and outcome:")
    for (kind, outcome), n in sorted(s.counts.items()):
        print(f"  {kind:12s} {outcome:20s} {n}")
    by_outcome = collections.Counter()
    for (kind, outcome), n in s.counts.items():
        by_outcome[outcome] += n
    print("soak: by outcome: " + ", ".join(f"{k}={v}" for k, v in sorted(by_outcome.items())))
    if s.failures:
        ok = False
        print("FAIL: unexpected outcomes:\n  " + "\n  ".join(s.failures))
    for kind in ("normal", "cancel", "deadline", "slow_reader", "malformed", "burst"):
        if not any(k == kind for k, _ in s.counts):
            ok = False
            print(f"FAIL: no '{kind}' request ran")
    if by_outcome["OK"] == 0 or by_outcome["INVALID_ARGUMENT"] == 0:
        ok = False
        print("FAIL: the mix produced no completions or no INVALID_ARGUMENT")
    print(f"soak: engine after the soak: running={metrics.get('moeserve_num_requests_running')} "
          f"waiting={metrics.get('moeserve_num_requests_waiting')} "
          f"kv_cache_usage_ratio={metrics.get('moeserve_kv_cache_usage_ratio')}")
    if not idle:
        ok = False
        print("FAIL: the engine is not idle with all KV blocks free 60 s after the soak")
    bound = max(RSS_BOUND_MIB * 1024, rss_warm * RSS_BOUND_FRACTION)
    print(f"soak: VmRSS after warm-up {rss_warm / 1024:.1f} MiB, after the soak "
          f"{rss_end / 1024:.1f} MiB (bound +{bound / 1024:.1f} MiB)")
    if os.environ.get("MOE_SANITIZER"):
        # ASan's quarantine and shadow memory make RSS meaningless; LeakSanitizer checks the
        # exit instead (a leak makes the SIGTERM exit status non-zero).
        print(f"soak: RSS bound not checked under {os.environ['MOE_SANITIZER']}")
    elif rss_end - rss_warm > bound:
        ok = False
        print("FAIL: resident memory grew beyond the bound")
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    if status != health_pb2.HealthCheckResponse.SERVING:
        ok = False
        print(f"FAIL: health is {status} after the soak")
    # One more request still gives the reference, then SIGTERM drains and exits 0.
    tokens = [t for r in s.generate(s.request(0), timeout=60) for t in r.token_ids]
    if tokens != s.reference[0]:
        ok = False
        print("FAIL: a request after the soak differs from its reference")
    channel.close()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    if code != 0:
        ok = False
        print(f"FAIL: moe-serve exited {code} on SIGTERM")
    if any("AddressSanitizer" in l or "runtime error" in l for l in server.log_lines):
        ok = False
        print("FAIL: sanitizer report in the server log")
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
