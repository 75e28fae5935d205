#!/usr/bin/env python3
"""Out-of-process end-to-end test: the real moe-serve binary on the demo model, called with
Python grpcio through server reflection only (no generated code: message classes come from the
descriptors the server returns), with grpc.health.v1, and with the C++ moe-client and moe-bench
binaries.
Ends with SIGTERM: in-flight request completes, new ones are refused, the process exits 0.

Usage: grpc_python_test.py BUILD_DIR SOURCE_DIR   (exit 77 = skipped: grpcio missing)
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

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

BUILD_DIR = SOURCE_DIR = None
SERVICE = "moe.serving.v1.Inference"


class GrpcPythonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="moe_py_test_")
        cls.model_dir = os.path.join(cls.tmp.name, "demo_model")
        make_demo_model(BUILD_DIR, SOURCE_DIR, cls.model_dir)
        cls.server = ServerProcess(BUILD_DIR, cls.model_dir,
                                   ["--kv_cache_mib=16", "--drain_timeout=60s"])
        cls.channel = grpc.insecure_channel(cls.server.target)
        cls.health = health_pb2_grpc.HealthStub(cls.channel)
        deadline = time.time() + 60
        while True:
            try:
                status = cls.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.time() > deadline:
                raise RuntimeError("moe-serve never became SERVING")
            time.sleep(0.05)
        # Everything below is built from reflection alone.
        cls.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(cls.channel))
        service = cls.pool.FindServiceByName(SERVICE)
        cls.methods = {m.name: m for m in service.methods}
        cls.msg = {name: message_class(cls.pool, f"moe.serving.v1.{name}") for name in (
            "GenerateRequest", "GenerateResponse", "TokenizeRequest", "TokenizeResponse",
            "DetokenizeRequest", "DetokenizeResponse", "GetModelInfoRequest", "ModelInfo")}

    @classmethod
    def tearDownClass(cls):
        cls.server.kill()
        cls.tmp.cleanup()

    def call(self, method, request_name, response_name):
        path = f"/{SERVICE}/{method}"
        kind = self.channel.unary_stream if self.methods[method].server_streaming else \
            self.channel.unary_unary
        return kind(path, request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=self.msg[response_name].FromString)

    def generate(self, **fields):
        request = self.msg["GenerateRequest"](**fields)
        return list(self.call("Generate", "GenerateRequest", "GenerateResponse")(request,
                                                                                  timeout=120))

    def test_a_reflection_lists_the_api_and_health(self):
        self.assertEqual(set(self.methods), {"Generate", "Tokenize", "Detokenize",
                                             "GetModelInfo", "GetExpertStats"})
        self.assertTrue(self.methods["Generate"].server_streaming)
        status = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        self.assertEqual(status.status, health_pb2.HealthCheckResponse.SERVING)

    def test_b_generate_text_tokenize_detokenize(self):
        info = self.call("GetModelInfo", "GetModelInfoRequest", "ModelInfo")(
            self.msg["GetModelInfoRequest"](), timeout=10)
        self.assertEqual(info.architecture, "mixtral")
        self.assertGreater(info.parameters.total, info.parameters.active_per_token)
        tokens = self.call("Tokenize", "TokenizeRequest", "TokenizeResponse")(
            self.msg["TokenizeRequest"](text="Hello world"), timeout=10)
        self.assertGreater(len(tokens.token_ids), 0)
        sampling = {"temperature": 0.0}
        stop = {"max_tokens": 24, "ignore_eos": True}
        by_text = self.generate(text="Hello world", sampling=sampling, stop=stop)
        by_ids = self.generate(token_ids={"ids": list(tokens.token_ids)}, sampling=sampling,
                               stop=stop)
        ids = [t for r in by_text for t in r.token_ids]
        self.assertEqual(len(ids), 24)
        self.assertEqual(ids, [t for r in by_ids for t in r.token_ids])
        last = by_text[-1]
        self.assertEqual(last.usage.completion_tokens, 24)
        self.assertEqual(last.usage.prompt_tokens, len(tokens.token_ids))
        text = "".join(r.text for r in by_text)
        decoded = self.call("Detokenize", "DetokenizeRequest", "DetokenizeResponse")(
            self.msg["DetokenizeRequest"](token_ids=ids), timeout=10)
        self.assertEqual(text, decoded.text)

        # The C++ client on the same request prints the same tokens.
        out = subprocess.run(
            [os.path.join(BUILD_DIR, "client", "moe-client"), f"--target={self.server.target}",
             "generate", "--json", "--max_tokens=24", "--ignore_eos", "--temperature=0",
             f"--token_ids={','.join(map(str, tokens.token_ids))}"],
            check=True, capture_output=True, text=True).stdout
        cpp_ids = [t for line in out.splitlines() for t in json.loads(line)["token_ids"]]
        self.assertEqual(cpp_ids, ids)
        # Two greedy completions (--n=2): both the same tokens, told apart by "index"; the text
        # output prints each completion once it finishes, prefixed by its index.
        client = [os.path.join(BUILD_DIR, "client", "moe-client"), f"--target={self.server.target}",
                  "generate", "--max_tokens=24", "--ignore_eos", "--temperature=0", "--n=2",
                  f"--token_ids={','.join(map(str, tokens.token_ids))}"]
        out = subprocess.run(client + ["--json"], check=True, capture_output=True,
                             text=True).stdout
        by_index = {0: [], 1: []}
        for line in out.splitlines():
            response = json.loads(line)
            by_index[response["index"]] += response["token_ids"]
        self.assertEqual(by_index, {0: ids, 1: ids})
        out = subprocess.run(client, check=True, capture_output=True, text=True).stdout
        lines = ["[0] " + text + "\n", "[1] " + text + "\n"]  # in the order they finish
        self.assertIn(out, [lines[0] + lines[1], lines[1] + lines[0]])

    def test_b_chat(self):
        # A conversation through the model's chat template, from Python and from moe-client.
        chat = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"}]}
        tokens = self.call("Tokenize", "TokenizeRequest", "TokenizeResponse")(
            self.msg["TokenizeRequest"](chat=chat), timeout=10)
        self.assertEqual(tokens.chat_text, "<|im_start|>system\nBe brief.<|im_end|>\n"
                         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        sampling = {"temperature": 0.0}
        stop = {"max_tokens": 8, "ignore_eos": True}
        by_chat = self.generate(chat=chat, sampling=sampling, stop=stop)
        by_ids = self.generate(token_ids={"ids": list(tokens.token_ids)}, sampling=sampling,
                               stop=stop)
        ids = [t for r in by_chat for t in r.token_ids]
        self.assertEqual(ids, [t for r in by_ids for t in r.token_ids])
        self.assertEqual(by_chat[-1].usage.prompt_tokens, len(tokens.token_ids))
        client = [os.path.join(BUILD_DIR, "client", "moe-client"), f"--target={self.server.target}"]
        out = subprocess.run(client + ["tokenize", "--chat", "--system=Be brief.", "--json", "Hi"],
                             check=True, capture_output=True, text=True).stdout
        self.assertEqual(json.loads(out)["chat_text"], tokens.chat_text)
        out = subprocess.run(client + ["generate", "--chat", "--system=Be brief.", "--json",
                                       "--max_tokens=8", "--ignore_eos", "--temperature=0", "Hi"],
                             check=True, capture_output=True, text=True).stdout
        self.assertEqual([t for line in out.splitlines() for t in json.loads(line)["token_ids"]],
                         ids)
        info = json.loads(subprocess.run(client + ["info", "--json"], check=True,
                                         capture_output=True, text=True).stdout)
        self.assertTrue(info["hasChatTemplate"])
        # A conversation from a file, the model continuing the assistant's begun answer.
        messages = os.path.join(self.tmp.name, "messages.json")
        with open(messages, "w") as f:
            json.dump([{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello, I"}], f)
        out = subprocess.run(client + ["tokenize", f"--messages_file={messages}",
                                       "--continue_final_message", "--json"],
                             check=True, capture_output=True, text=True).stdout
        self.assertEqual(json.loads(out)["chat_text"],
                         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, I")
        bad = subprocess.run(client + ["generate", f"--messages_file={messages}",
                                       "--continue_final_message", "--template_vars={\"x\": tru}"],
                             capture_output=True, text=True)
        self.assertEqual(bad.returncode, 2)
        self.assertIn("--template_vars: not a JSON object", bad.stderr)
        with open(messages, "w") as f:
            json.dump([{"role": "user", "content": 7}], f)
        bad = subprocess.run(client + ["tokenize", f"--messages_file={messages}"],
                             capture_output=True, text=True)
        self.assertEqual(bad.returncode, 2)
        self.assertIn("each message needs string \"role\" and \"content\"", bad.stderr)

    def test_c_invalid_field(self):
        with self.assertRaises(grpc.RpcError) as error:
            self.generate(token_ids={"ids": [1, 2]}, sampling={"top_p": 1.5})
        self.assertEqual(error.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("sampling.top_p", error.exception.details())
        self.assertIn("(0, 1]", error.exception.details())

    def test_d_cli_tools(self):
        def run(binary, *args):
            return subprocess.run([os.path.join(BUILD_DIR, "client", binary),
                                   f"--target={self.server.target}", *args],
                                  check=True, capture_output=True, text=True).stdout

        self.assertEqual(run("moe-client", "health").strip(), "SERVING")
        info = json.loads(run("moe-client", "info", "--json"))
        self.assertEqual(info["numExperts"], 8)
        stats = json.loads(run("moe-client", "stats", "--json"))
        for layer in stats["sinceStart"]["layers"]:
            self.assertEqual(sum(int(c) for c in layer["expertCounts"]),
                             int(layer["tokens"]) * stats["topK"])
        self.assertIn("max/mean", run("moe-client", "stats"))
        bench = json.loads(run("moe-bench", "--concurrency=4", "--num_requests=8", "--warmup=1",
                               "--prompt_tokens=4:12", "--output_tokens=6", "--json"))
        self.assertEqual(bench["succeeded"], 8)
        self.assertEqual(bench["errors_by_code"], {})
        self.assertEqual(bench["itl_s"]["n"], 8 * 5)

    def test_z_sigterm_drains_and_exits_zero(self):
        request = self.msg["GenerateRequest"](token_ids={"ids": [5, 6, 7]},
                                              sampling={"temperature": 0.0},
                                              stop={"max_tokens": 1500, "ignore_eos": True})
        stream = self.call("Generate", "GenerateRequest", "GenerateResponse")(request,
                                                                              timeout=300)
        first = next(stream)
        self.server.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        while self.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            self.assertLess(time.time(), deadline, "health never went NOT_SERVING")
            time.sleep(0.01)
        with self.assertRaises(grpc.RpcError) as refused:
            self.generate(token_ids={"ids": [1, 2]})
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAVAILABLE)
        rest = list(stream)
        tokens = len(first.token_ids) + sum(len(r.token_ids) for r in rest)
        self.assertEqual(tokens, 1500)  # the in-flight request completed
        self.assertEqual(rest[-1].usage.completion_tokens, 1500)
        self.assertEqual(self.server.proc.wait(timeout=60), 0)
        log = "".join(self.server.log_lines)
        self.assertIn("SIGTERM: draining", log)
        self.assertRegex(log, r"request id=req-\d+ .*completion_tokens=1500 .*finish=length")


if __name__ == "__main__":
    BUILD_DIR, SOURCE_DIR = sys.argv[1], sys.argv[2]
    unittest.main(argv=[sys.argv[0], "-v"])
