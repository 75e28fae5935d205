"""Shared by the out-of-process tests (tests/server, tests/soak, tests/security): the demo
checkpoint, moe-serve as a child process on a free port, and message classes from a
reflection-built descriptor pool."""

import os
import re
import subprocess
import threading

from google.protobuf import message_factory


def make_demo_model(build_dir, source_dir, out_dir):
    """The demo checkpoint (moe-make-model --preset=demo) with the GPT-2 byte-level tokenizer
    and Qwen2-MoE's ChatML chat template."""
    subprocess.run(
        [os.path.join(build_dir, "tools", "moe-make-model"), "--preset=demo", f"--out={out_dir}",
         f"--tokenizer={source_dir}/tests/fixtures/tokenizers/gpt2_bytelevel/tokenizer.json",
         f"--chat_template={source_dir}/tests/fixtures/chat_templates/qwen2_moe_chatml.jinja"],
        check=True, stdout=subprocess.DEVNULL)


def message_class(pool, name):
    descriptor = pool.FindMessageTypeByName(name)
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


class ServerProcess:
    """moe-serve (CPU, one thread) on 127.0.0.1 and a free port, read from its startup log
    like the metrics port; every stderr line is kept in log_lines. With wait_serving, the
    constructor also waits for the "SERVING on" line."""

    def __init__(self, build_dir, model_dir, flags=(), env=None, timeout=60, wait_serving=False):
        self.log_lines = []
        self.proc = subprocess.Popen(
            [os.path.join(build_dir, "server", "moe-serve"), f"--model={model_dir}",
             "--host=127.0.0.1", "--port=0", "--num_threads=1", "--backend=cpu", *flags],
            stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})
        self.port = self.metrics_port = None
        self.serving = threading.Event()
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.log_lines.append(line)
                if m := re.search(r"metrics on http://[0-9.]+:(\d+)/metrics", line):
                    self.metrics_port = int(m.group(1))
                if m := re.search(r"listening on [0-9.]+:(\d+)", line):
                    self.port = int(m.group(1))
                    ready.set()
                if "SERVING on" in line:
                    self.serving.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if self.port is None or (wait_serving and not self.serving.wait(timeout)):
            raise RuntimeError("moe-serve did not start:\n" + "".join(self.log_lines))
        self.target = f"127.0.0.1:{self.port}"

    def stop(self, timeout=60):
        self.proc.terminate()
        self.proc.wait(timeout)

    def kill(self):
        """Kills it if it still runs (test clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
