"""Run `dialogen serve` in a child process on a free loopback port (for tests and benchmarks)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request


class ServerProcess:
    """`with ServerProcess(["--model", path]) as srv: srv.url ...`; the port is picked by the OS."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180.0):
        self.args, self.timeout = list(args), timeout
        if "--shutdown-grace" not in self.args:  # `stop()` waits 15 s before SIGKILL: replies get 3 of them
            self.args += ["--shutdown-grace", "3"]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.output: list[str] = []

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "dialogen", "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                     text=True, bufsize=1)
        self._address = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        # the server prints its address once the model is loaded, or an error and exits
        self._address.wait(self.timeout)
        if not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.output))
        self._wait_healthy(deadline)
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            m = re.search(r" on (http://[^/\s]+)/", line)
            if m and not self.url:
                self.url = m.group(1)
                self._address.set()
        self._address.set()  # the process ended

    def _wait_healthy(self, deadline: float):
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server never became healthy:\n" + "".join(self.output))

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def kill(self):
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc):
        self.stop()
