#!/usr/bin/env python3
"""Security of the real moe-serve binary: TLS, mutual TLS and bearer-token authentication on the
gRPC port, with certificates made at test time by the openssl CLI, called with Python grpcio
(reflection only, no generated code) and with moe-client and moe-bench.

- TLS (--tls_cert/--tls_key): TLS clients trusting the CA are served; plaintext clients and
  clients trusting another CA are not.
- Mutual TLS (--tls_client_ca): clients without a certificate, or with one from another CA,
  fail the handshake; a client certificate from the CA is served.
- Tokens (MOE_AUTH_TOKENS / --auth_tokens_file, set through MOE_* environment variables here):
  every Inference method is UNAUTHENTICATED without a valid `authorization: Bearer` token;
  grpc.health.v1 and reflection answer without one.
- moe-bench takes moe-client's TLS, mutual TLS and token flags: it runs against a mutual-TLS
  server with tokens, and fails without its token.
- The metrics port binds to its own address (--metrics_host).
- No request message carries a path, file, directory or model name: the model comes only from
  the server's configuration.

Usage: tls_auth_test.py BUILD_DIR SOURCE_DIR   (77 = skipped: grpcio or openssl missing)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.request

try:
    import grpc
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as error:  # pragma: no cover
    print(f"skipped: {error}")
    sys.exit(77)
if shutil.which("openssl") is None:
    print("skipped: no openssl CLI")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testing"))
from serve_process import ServerProcess, make_demo_model, message_class  # noqa: E402

BUILD_DIR = SOURCE_DIR = None
SERVICE = "moe.serving.v1.Inference"
TOKEN = "tok-9f8e7d6c5b4a"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", cwd=d)


def make_cert(d, name, ca, san=None):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext, cwd=d)


def read(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


def start_server(model_dir, flags=(), env=None):
    """moe-serve on the demo model, no metrics port unless `flags` give one; waits for SERVING."""
    return ServerProcess(BUILD_DIR, model_dir, ["--metrics_port=-1", "--kv_cache_mib=8", *flags],
                         env=env, wait_serving=True)


class SecurityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="moe_security_")
        d = cls.dir = cls.tmp.name
        cls.model = os.path.join(d, "demo")
        make_demo_model(BUILD_DIR, SOURCE_DIR, cls.model)
        make_ca(d, "ca")
        make_ca(d, "other_ca")
        make_cert(d, "server", "ca", san="DNS:localhost,IP:127.0.0.1")
        make_cert(d, "client", "ca")
        make_cert(d, "intruder", "other_ca")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def credentials(self, ca="ca", client=None):
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.dir, f"{ca}.pem"),
            private_key=read(self.dir, f"{client}.key") if client else None,
            certificate_chain=read(self.dir, f"{client}.pem") if client else None)

    def generate(self, channel, metadata=None, timeout=30):
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        request_class = message_class(pool, "moe.serving.v1.GenerateRequest")
        response_class = message_class(pool, "moe.serving.v1.GenerateResponse")
        call = channel.unary_stream(f"/{SERVICE}/Generate",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=response_class.FromString)
        request = request_class(token_ids={"ids": [5, 6, 7]}, sampling={"temperature": 0.0},
                                stop={"max_tokens": 6, "ignore_eos": True})
        return [t for r in call(request, timeout=timeout, metadata=metadata)
                for t in r.token_ids]

    def health(self, channel, timeout=10):
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout).status

    def assert_no_connection(self, channel):
        with self.assertRaises(grpc.RpcError) as error:
            self.health(channel, timeout=5)
        self.assertEqual(error.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def client(self, target, *args, env=None, program="moe-client"):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
        full_env.update(env or {})
        return subprocess.run([os.path.join(BUILD_DIR, "client", program),
                               f"--target={target}", *args],
                              capture_output=True, text=True, env=full_env, timeout=60)

    def test_tls(self):
        server = start_server(self.model, [f"--tls_cert={self.path('server.pem')}",
                                     f"--tls_key={self.path('server.key')}"])
        try:
            with grpc.secure_channel(server.target, self.credentials()) as channel:
                self.assertEqual(self.health(channel), health_pb2.HealthCheckResponse.SERVING)
                self.assertEqual(len(self.generate(channel)), 6)
            with grpc.insecure_channel(server.target) as channel:
                self.assert_no_connection(channel)
            with grpc.secure_channel(server.target, self.credentials(ca="other_ca")) as channel:
                self.assert_no_connection(channel)
            out = self.client(server.target, f"--tls_ca={self.path('ca.pem')}", "health")
            self.assertEqual(out.stdout.strip(), "SERVING", out.stderr)
            out = self.client(server.target, "generate", "--json", "--max_tokens=6",
                              "--ignore_eos", "--token_ids=5,6,7",
                              env={"MOE_TLS_CA": self.path("ca.pem")})
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(sum(len(json.loads(l)["token_ids"]) for l in out.stdout.splitlines()),
                             6)
            self.assertNotEqual(self.client(server.target, "health").returncode, 0)  # plaintext
        finally:
            server.stop()

    def test_mutual_tls(self):
        server = start_server(self.model, [f"--tls_cert={self.path('server.pem')}",
                                     f"--tls_key={self.path('server.key')}",
                                     f"--tls_client_ca={self.path('ca.pem')}"])
        try:
            with grpc.secure_channel(server.target, self.credentials(client="client")) as channel:
                self.assertEqual(self.health(channel), health_pb2.HealthCheckResponse.SERVING)
                self.assertEqual(len(self.generate(channel)), 6)
            with grpc.secure_channel(server.target, self.credentials()) as channel:
                self.assert_no_connection(channel)  # no client certificate
            with grpc.secure_channel(server.target,
                                     self.credentials(client="intruder")) as channel:
                self.assert_no_connection(channel)  # certificate from another CA
            tls = [f"--tls_ca={self.path('ca.pem')}"]
            mtls = tls + [f"--tls_cert={self.path('client.pem')}",
                          f"--tls_key={self.path('client.key')}"]
            out = self.client(server.target, *mtls, "health")
            self.assertEqual(out.stdout.strip(), "SERVING", out.stderr)
            self.assertNotEqual(self.client(server.target, *tls, "health").returncode, 0)
        finally:
            server.stop()

    def check_tokens(self, server):
        with grpc.secure_channel(server.target, self.credentials()) as channel:
            # Probes and reflection need no token.
            self.assertEqual(self.health(channel), health_pb2.HealthCheckResponse.SERVING)
            expected = self.generate(channel, metadata=(("authorization", f"Bearer {TOKEN}"),))
            self.assertEqual(len(expected), 6)
            for metadata in (None, (("authorization", "Bearer wrong"),),
                             (("authorization", TOKEN),),
                             (("authorization", f"Bearer {TOKEN}x"),)):
                with self.assertRaises(grpc.RpcError) as error:
                    self.generate(channel, metadata=metadata)
                self.assertEqual(error.exception.code(), grpc.StatusCode.UNAUTHENTICATED,
                                 metadata)
            info = channel.unary_unary(f"/{SERVICE}/GetModelInfo",
                                       request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            with self.assertRaises(grpc.RpcError) as error:
                info(b"", timeout=10)
            self.assertEqual(error.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            self.assertGreater(len(info(b"", timeout=10,
                                        metadata=(("authorization", f"Bearer {TOKEN}"),))), 0)
        ca = {"MOE_TLS_CA": self.path("ca.pem")}
        out = self.client(server.target, "info", "--json", env=ca)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("(code 16)", out.stderr)  # UNAUTHENTICATED
        out = self.client(server.target, "info", "--json", env={**ca, "MOE_AUTH_TOKEN": TOKEN})
        self.assertEqual(out.returncode, 0, out.stderr)
        out = self.client(server.target, "info", "--json", f"--auth_token={TOKEN}", env=ca)
        self.assertEqual(out.returncode, 0, out.stderr)

    def test_tokens_from_environment(self):
        # Everything through MOE_* environment variables, as in deploy/.
        server = start_server(self.model, env={"MOE_TLS_CERT": self.path("server.pem"),
                                         "MOE_TLS_KEY": self.path("server.key"),
                                         "MOE_AUTH_TOKENS": f"first-token,{TOKEN}"})
        try:
            self.assertIn("authentication on (2 tokens)", "".join(server.log_lines))
            self.check_tokens(server)
        finally:
            server.stop()

    def test_tokens_from_file(self):
        path = self.path("tokens.txt")
        with open(path, "w") as f:
            f.write(f"# moe-serve clients\n{TOKEN}\n")
        server = start_server(self.model, [f"--tls_cert={self.path('server.pem')}",
                                     f"--tls_key={self.path('server.key')}",
                                     f"--auth_tokens_file={path}"])
        try:
            self.check_tokens(server)
        finally:
            server.stop()

    def test_bench_mutual_tls_and_token(self):
        server = start_server(self.model, [f"--tls_cert={self.path('server.pem')}",
                                     f"--tls_key={self.path('server.key')}",
                                     f"--tls_client_ca={self.path('ca.pem')}"],
                        env={"MOE_AUTH_TOKENS": TOKEN})
        try:
            mtls = [f"--tls_ca={self.path('ca.pem')}", f"--tls_cert={self.path('client.pem')}",
                    f"--tls_key={self.path('client.key')}", "--num_requests=4", "--warmup=1",
                    "--concurrency=2", "--prompt_tokens=4", "--output_tokens=4", "--json"]
            out = self.client(server.target, *mtls, f"--auth_token={TOKEN}", program="moe-bench")
            self.assertEqual(out.returncode, 0, out.stderr)
            report = json.loads(out.stdout)
            self.assertEqual((report["requests"], report["succeeded"], report["errors_by_code"]),
                             (4, 4, {}), out.stdout)
            out = self.client(server.target, *mtls, program="moe-bench")  # no token
            self.assertNotEqual(out.returncode, 0)
            self.assertIn("authorization", out.stderr)  # UNAUTHENTICATED: missing metadata
        finally:
            server.stop()

    def test_metrics_on_a_separate_address(self):
        server = start_server(self.model, ["--metrics_port=0", "--metrics_host=127.0.0.2"])
        try:
            log = "".join(server.log_lines)
            m = re.search(r"metrics on http://127\.0\.0\.2:(\d+)/metrics", log)
            self.assertIsNotNone(m, log)
            port = int(m.group(1))
            body = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read()
            self.assertIn(b"moeserve_", body)
            with self.assertRaises(OSError):  # not on the gRPC address
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
        finally:
            server.stop()

    def test_requests_carry_no_paths(self):
        server = start_server(self.model)
        try:
            with grpc.insecure_channel(server.target) as channel:
                pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
                service = pool.FindServiceByName(SERVICE)
                seen, stack = set(), [m.input_type for m in service.methods]
                while stack:
                    message = stack.pop()
                    if message.full_name in seen:
                        continue
                    seen.add(message.full_name)
                    for field in message.fields:
                        self.assertNotRegex(field.name, r"path|file|dir|model|url",
                                            f"{message.full_name}.{field.name}")
                        if field.message_type is not None:
                            stack.append(field.message_type)
                self.assertIn("moe.serving.v1.GenerateRequest", seen)
        finally:
            server.stop()


if __name__ == "__main__":
    BUILD_DIR, SOURCE_DIR = sys.argv[1], sys.argv[2]
    unittest.main(argv=[sys.argv[0], "-v"])
