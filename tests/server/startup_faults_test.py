#!/usr/bin/env python3
"""Startup faults of the real moe-serve binary: each must end with a clear message on stderr and
a non-zero exit status - never a signal (crash, abort), a sanitizer report or a hang.

Cases: missing model directory; unreadable config.json / weights / tokenizer.json; corrupt
weights (truncated file, garbage header); gRPC port in use; metrics port in use; KV budget that
holds no block; out of memory for the KV budget (address space limited with RLIMIT_AS); bad
flag values; missing or non-PEM TLS files; an empty token file.

Usage: startup_faults_test.py BUILD_DIR SOURCE_DIR
"""
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testing"))
from serve_process import make_demo_model  # noqa: E402

BUILD_DIR = SOURCE_DIR = None
CRASH_MARKS = ("Segmentation fault", "terminate called", "AddressSanitizer", "runtime error:",
               "Aborted", "core dumped", "Check failed", "ThreadSanitizer")


class StartupFaultsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="moe_startup_")
        cls.model = os.path.join(cls.tmp.name, "demo")
        make_demo_model(BUILD_DIR, SOURCE_DIR, cls.model)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def copy_model(self, name):
        path = os.path.join(self.tmp.name, name)
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(self.model, path)
        return path

    def make_unreadable(self, path):
        """chmod 000; as root (which reads anything) a directory takes the file's place."""
        if os.geteuid() != 0:
            os.chmod(path, 0)
        else:
            os.remove(path)
            os.mkdir(path)

    def serve(self, *flags, model=None, preexec_fn=None, env=None):
        args = [os.path.join(BUILD_DIR, "server", "moe-serve"),
                f"--model={model or self.model}", "--host=127.0.0.1", "--port=0",
                "--metrics_port=-1", "--backend=cpu", "--num_threads=1", "--kv_cache_mib=8",
                *flags]
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                              preexec_fn=preexec_fn, env=full_env)
        return proc

    def assert_clean_failure(self, proc, *message_parts):
        log = proc.stderr
        self.assertGreater(proc.returncode, 0,
                           f"exit status {proc.returncode} (negative = killed by a signal):\n{log}")
        for mark in CRASH_MARKS:
            self.assertNotIn(mark, log)
        for part in message_parts:
            self.assertIn(part, log)
        print(f"  exit {proc.returncode}: {log.strip().splitlines()[-1]}")

    def test_missing_model_directory(self):
        proc = self.serve(model=os.path.join(self.tmp.name, "no_such_model"))
        self.assert_clean_failure(proc, "no model at", "no_such_model", "config.json")

    def test_unreadable_config(self):
        model = self.copy_model("unreadable_config")
        self.make_unreadable(os.path.join(model, "config.json"))
        self.assert_clean_failure(self.serve(model=model), "config.json")

    def test_unreadable_weights(self):
        model = self.copy_model("unreadable_weights")
        self.make_unreadable(os.path.join(model, "model.safetensors"))
        self.assert_clean_failure(self.serve(model=model), "model.safetensors")

    def test_unreadable_tokenizer(self):
        model = self.copy_model("unreadable_tokenizer")
        self.make_unreadable(os.path.join(model, "tokenizer.json"))
        self.assert_clean_failure(self.serve(model=model), "tokenizer")

    def test_truncated_weights(self):
        model = self.copy_model("truncated")
        path = os.path.join(model, "model.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        self.assert_clean_failure(self.serve(model=model), "model.safetensors")

    def test_garbage_weights_header(self):
        model = self.copy_model("garbage")
        path = os.path.join(model, "model.safetensors")
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\x00{not json" * 8)
        self.assert_clean_failure(self.serve(model=model), "model.safetensors")

    def test_corrupt_config(self):
        model = self.copy_model("bad_config")
        with open(os.path.join(model, "config.json"), "w") as f:
            f.write('{"model_type": "mixtral", "num_hidden_layers": -3')
        self.assert_clean_failure(self.serve(model=model), "config.json")

    def test_grpc_port_in_use(self):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            proc = self.serve(f"--port={port}")
        self.assert_clean_failure(proc, "could not listen on 127.0.0.1:%d" % port, "in use")

    def test_two_servers_cannot_share_a_port(self):
        # gRPC's default SO_REUSEPORT would let a second moe-serve bind the same port.
        first = subprocess.Popen(
            [os.path.join(BUILD_DIR, "server", "moe-serve"), f"--model={self.model}",
             "--host=127.0.0.1", "--port=0", "--metrics_port=-1", "--backend=cpu",
             "--num_threads=1", "--kv_cache_mib=8"], stderr=subprocess.PIPE, text=True)
        try:
            port = None
            for line in first.stderr:
                if "listening on" in line:
                    port = int(line.rsplit(":", 1)[1].split()[0])
                    break
            self.assertIsNotNone(port)
            self.assert_clean_failure(self.serve(f"--port={port}"), "could not listen")
        finally:
            first.kill()
            first.wait()

    def test_metrics_port_in_use(self):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            proc = self.serve(f"--metrics_port={port}")
        self.assert_clean_failure(proc, str(port))

    def test_kv_budget_holds_no_block(self):
        proc = self.serve("--kv_cache_mib=1", "--kv_block_size=1024")
        self.assert_clean_failure(proc, "KV cache budget", "holds no block")

    @unittest.skipIf(os.environ.get("MOE_SANITIZER"),
                     "sanitizers reserve terabytes of shadow address space: RLIMIT_AS cannot apply")
    def test_kv_budget_out_of_memory(self):
        # 3 GiB of address space; the KV pool alone asks for 8 GiB.
        limit = 3 << 30

        def limit_memory():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        proc = self.serve("--kv_cache_mib=8192", preexec_fn=limit_memory)
        self.assert_clean_failure(proc, "cannot allocate")

    def test_bad_flag_values(self):
        self.assert_clean_failure(self.serve("--kv_cache_mib=0"), "--kv_cache_mib=0")
        self.assert_clean_failure(self.serve("--kv_cache_mib=9223372036854775807"),
                                  "--kv_cache_mib")
        self.assert_clean_failure(self.serve("--max_message_mib=0"), "--max_message_mib")
        self.assert_clean_failure(self.serve("--kv_cache_dtype=fp8"), "--kv_cache_dtype",
                                  "'fp8' is not supported; supported: f32, bf16")
        self.assert_clean_failure(self.serve(env={"MOE_PORT": "not-a-number"}), "MOE_PORT")

    def test_tls_files(self):
        missing = os.path.join(self.tmp.name, "missing.pem")
        self.assert_clean_failure(self.serve(f"--tls_cert={missing}", f"--tls_key={missing}"),
                                  "--tls_cert=", "no such file")
        not_pem = os.path.join(self.tmp.name, "not.pem")
        with open(not_pem, "w") as f:
            f.write("hello\n")
        self.assert_clean_failure(self.serve(f"--tls_cert={not_pem}", f"--tls_key={not_pem}"),
                                  "not a PEM file")
        self.assert_clean_failure(self.serve(f"--tls_cert={not_pem}"), "--tls_key")
        # PEM files that are not a certificate and its key: gRPC refuses them at start.
        for name in ("a", "b"):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                            os.path.join(self.tmp.name, f"{name}.key"), "-out",
                            os.path.join(self.tmp.name, f"{name}.pem"), "-days", "1", "-subj",
                            f"/CN={name}"], check=True, capture_output=True)
        self.assert_clean_failure(
            self.serve(f"--tls_cert={os.path.join(self.tmp.name, 'a.pem')}",
                       f"--tls_key={os.path.join(self.tmp.name, 'b.key')}"),
            "--tls_cert/--tls_key not a valid, matching certificate and key")
        self.assert_clean_failure(self.serve(f"--tls_client_ca={not_pem}"), "--tls_client_ca")

    def test_auth_token_sources(self):
        empty = os.path.join(self.tmp.name, "empty_tokens")
        with open(empty, "w") as f:
            f.write("# no tokens\n")
        self.assert_clean_failure(self.serve(f"--auth_tokens_file={empty}"), "holds no token")
        self.assert_clean_failure(
            self.serve(f"--auth_tokens_file={os.path.join(self.tmp.name, 'nope')}"),
            "cannot be opened")
        self.assert_clean_failure(self.serve(env={"MOE_AUTH_TOKENS": " , "}), "MOE_AUTH_TOKENS")


if __name__ == "__main__":
    BUILD_DIR, SOURCE_DIR = sys.argv[1], sys.argv[2]
    unittest.main(argv=[sys.argv[0], "-v"])
