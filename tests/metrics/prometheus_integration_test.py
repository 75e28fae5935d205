#!/usr/bin/env python3
"""A real Prometheus scrapes a real moe-serve under load; every PromQL expression of the
Grafana dashboard and of the alert rules is then evaluated through Prometheus' HTTP API.

Checks: the live /metrics passes `promtool check metrics`; Prometheus' target is up; every
dashboard query returns data (the per-expert heatmap too: the server runs with
--expert_metrics=full); every alert rule evaluates without error; the request counter equals
the requests sent. Loopback only, bounded in time.

usage: prometheus_integration_test.py BUILD_DIR SOURCE_DIR   (exit 77 = skipped)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

SKIP = 77
REQUESTS = 24
CONCURRENCY = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"FAIL: timed out waiting for {what}")


def query(prom: str, expr: str) -> list:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(http_get(url))
    if body.get("status") != "success":
        raise SystemExit(f"FAIL: query error for {expr!r}: {body}")
    return body["data"]["result"]


def dashboard_and_alert_exprs(source: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    sys.path.insert(0, str(source / "deploy" / "tools"))
    from deploy_check import alert_exprs, dashboard_exprs  # noqa: E402  (needs PyYAML)

    dashboard = json.loads((source / "deploy" / "grafana" / "moe-serve.json").read_text())
    return dashboard_exprs(dashboard), alert_exprs()


def to_promql(expr: str) -> str:
    """Grafana variables: every namespace/model/pod/layer; rate windows of 30 s."""
    for builtin in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(builtin, "30s")
    for name in ("namespace", "model", "pod", "layer"):
        expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    return expr


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    build, source = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus or not promtool:
        print("SKIP: Debian's prometheus package is not installed")
        return SKIP
    try:
        dashboard, alerts = dashboard_and_alert_exprs(source)
    except ImportError as error:
        print(f"SKIP: {error} (PyYAML is in tests/requirements.txt)")
        return SKIP

    work = Path(tempfile.mkdtemp(prefix="moe_prom_it_"))
    processes: list[subprocess.Popen] = []
    try:
        model = work / "model"
        subprocess.run([build / "tools" / "moe-make-model", "--preset=demo", "--layers=2",
                        f"--out={model}",
                        f"--tokenizer={source}/tests/fixtures/tokenizers/qwen2_split/tokenizer.json"],
                       check=True, stdout=subprocess.DEVNULL)
        grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()
        server_log = open(work / "server.log", "w")
        processes.append(subprocess.Popen(
            [build / "server" / "moe-serve", f"--model={model}", "--host=127.0.0.1",
             f"--port={grpc_port}", f"--metrics_port={metrics_port}", "--num_threads=1",
             "--expert_metrics=full", "--expert_stats_window=50", "--log_requests=false"],
            stdout=server_log, stderr=subprocess.STDOUT))
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: "moeserve_model_info" in http_get(metrics_url), 60, "moe-serve /metrics")
        client = [str(build / "client" / "moe-client"), f"--target=127.0.0.1:{grpc_port}"]
        wait_for(lambda: subprocess.run(client + ["health"], capture_output=True).returncode == 0,
                 60, "moe-serve health SERVING")

        config = work / "prometheus.yml"
        config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {source}/deploy/prometheus/moe-serve-alerts.yaml
scrape_configs:
  - job_name: moe-serve
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
        labels: {{namespace: "it", pod: "moe-serve-0"}}
""")
        prom_log = open(work / "prometheus.log", "w")
        processes.append(subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=prom_log, stderr=subprocess.STDOUT))
        prom = f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: query(prom, 'up{job="moe-serve"} == 1'), 60, "Prometheus scraping moe-serve")

        # Load: REQUESTS streaming generations, CONCURRENCY at a time, over several scrapes.
        failures: list[str] = []
        lock = threading.Lock()
        counter = iter(range(REQUESTS))

        def worker():
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                prompt = f"request {index}: the quick brown fox jumps over the lazy dog " * (1 + index % 3)
                done = subprocess.run(client + ["generate", f"--max_tokens={8 + index % 8}",
                                                "--ignore_eos", prompt],
                                      capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    with lock:
                        failures.append(done.stderr)

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SystemExit(f"FAIL: {len(failures)} generate calls failed: {failures[0]}")
        time.sleep(3)  # a few more scrapes after the load

        scrape = http_get(metrics_url)
        # The live exposition is the list of exported names that scripts/check_deploy.sh checks
        # the dashboard and alerts against (MOE_EXPORTED_METRICS).
        (build / "metrics_scrape.txt").write_text(scrape)
        lint = subprocess.run([promtool, "check", "metrics"], input=scrape,
                              capture_output=True, text=True)
        if lint.returncode != 0 or lint.stdout.strip() or lint.stderr.strip():
            raise SystemExit(f"FAIL: promtool check metrics: {lint.stdout}{lint.stderr}")

        finished = query(prom, 'sum(moeserve_requests_total{code="OK"})')
        if not finished or float(finished[0]["value"][1]) != REQUESTS:
            raise SystemExit(f"FAIL: moeserve_requests_total{{code=OK}} = {finished}, "
                             f"expected {REQUESTS}")

        empty = []
        for where, expr in dashboard:
            if not query(prom, to_promql(expr)):
                empty.append(f"{where}: {expr}")
        if empty:
            raise SystemExit("FAIL: dashboard queries without data:\n  " + "\n  ".join(empty))
        for where, expr in alerts:
            query(prom, expr)  # raises on an evaluation error
        rules = json.loads(http_get(f"{prom}/api/v1/rules"))["data"]["groups"]
        unhealthy = [r["name"] for g in rules for r in g["rules"] if r.get("health") != "ok"]
        if unhealthy:
            raise SystemExit(f"FAIL: alert rules not evaluating cleanly: {unhealthy}")
        print(f"prometheus integration: {REQUESTS} requests, {len(dashboard)} dashboard queries "
              f"with data, {len(alerts)} alert rules healthy")
        print("1 passed, 0 failed")
        return 0
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if os.environ.get("MOE_KEEP_TEST_DIR"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
