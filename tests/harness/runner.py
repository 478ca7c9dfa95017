"""One prompt runner for the tests, the demo and the benchmarks.

Both ways execute API-format prompt graphs with ComfyUI's own execution code:

* :class:`InProcessRunner` drives ``execution.PromptExecutor`` in this process
  and returns each node's real output objects (tensors included);
* :class:`ServerRunner` starts ``main.py --cpu`` on 127.0.0.1 with the pack on
  its custom-node path, posts the graph to ``/prompt`` and follows the
  websocket; it returns each node's UI outputs from ``/history``.

Both return per-node wall time, measured between the host's ``executing``
messages, and every message the host sent.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import host


@dataclass
class RunResult:
    """Outcome of one prompt: outputs per node id, seconds per node id, messages."""

    prompt_id: str
    outputs: dict
    ui: dict
    node_seconds: dict[str, float]
    messages: list[tuple[str, dict]] = field(default_factory=list)
    error: dict | None = None

    def output(self, node_id: str, index: int = 0):
        """Output ``index`` of node ``node_id`` (in-process runs only)."""
        return self.outputs[str(node_id)][index]

    def progress_texts(self, node_id: str | None = None) -> list[str]:
        return [d["text"] for e, d in self.messages if e == "progress_text" and (node_id is None or d["node_id"] == str(node_id))]


class PromptFailed(RuntimeError):
    """The host reported ``execution_error``; ``.error`` holds its message dict."""

    def __init__(self, error: dict) -> None:
        super().__init__(f"{error.get('node_type')} (node {error.get('node_id')}): {error.get('exception_type')}: {error.get('exception_message')}")
        self.error = error


class _NodeClock:
    """Turns the host's ``executing`` messages into seconds per node."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def on_executing(self, node_id: str | None) -> None:
        now = time.perf_counter()
        if self._current is not None:
            nid, start = self._current
            self.seconds[nid] = self.seconds.get(nid, 0.0) + now - start
        self._current = (str(node_id), now) if node_id is not None else None


class RecordingServer:
    """The message sink ``PromptExecutor`` talks to when no web server runs.

    It stands in the place of ``server.PromptServer`` for in-process runs and
    keeps every message, so tests can read progress text and node timings.
    """

    def __init__(self, wrapped=None) -> None:
        self.wrapped = wrapped  # the host's real PromptServer (routes, managers); everything else is ours
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []
        self.clock = _NodeClock()

    def send_sync(self, event, data, sid=None) -> None:
        if event == "executing" and isinstance(data, dict):
            self.clock.on_executing(data.get("node"))
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.messages.append(("progress_text", {"text": text, "node_id": str(node_id)}))

    def queue_updated(self) -> None:
        pass

    def __getattr__(self, name):
        wrapped = self.__dict__.get("wrapped")
        if wrapped is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(wrapped, name)


# No output cache across runs, and no RAM-pressure headroom: every key a host's PromptExecutor reads
# (newer hosts also read "ram_inactive"; the others ignore keys they do not know).
CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


class InProcessRunner:
    """Runs prompts through ``execution.PromptExecutor`` in this process."""

    def __init__(self, booted: host.BootedHost, cache_type=None) -> None:
        import execution  # the host's execution module (host is on sys.path after boot)
        import server as comfy_server

        self._execution = execution
        # Nodes reach the UI through ``PromptServer.instance``; in-process that is us, in front of the
        # real server boot() created (the newest runner receives the messages).
        current = getattr(comfy_server.PromptServer, "instance", None)
        self.server = RecordingServer(current.wrapped if isinstance(current, RecordingServer) else current)
        comfy_server.PromptServer.instance = self.server
        self.executor = execution.PromptExecutor(self.server, cache_type=cache_type or execution.CacheType.CLASSIC,
                                                 cache_args=dict(CACHE_ARGS))

    def run(self, prompt: dict, *, raise_on_error: bool = True) -> RunResult:
        """Validate and execute ``prompt``; return outputs and timings.

        A graph without an output node (a test that only wants a LATENT) runs
        its sink nodes, each validated with the host's ``validate_inputs``.
        """
        execution = self._execution
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0] and isinstance(valid[1], dict) and valid[1].get("type") == "prompt_no_outputs":
            consumed = {str(v[0]) for n in prompt.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2}
            sinks = [k for k in prompt if k not in consumed]

            async def validate_sinks():
                validated: dict = {}
                return [await execution.validate_inputs(prompt_id, prompt, k, validated) for k in sinks]

            checks = asyncio.run(validate_sinks())
            bad = [c for c in checks if not c[0]]
            valid = (not bad, {"type": "invalid_inputs", "details": [c[1] for c in bad]} if bad else None, sinks, {})
        if not valid[0]:
            raise PromptFailed({"node_type": "validation", "exception_type": "invalid prompt", "exception_message": json.dumps(valid[1:], default=str)[:4000]})
        self.server.messages = []
        self.server.clock = _NodeClock()
        # Fresh output cache per run, so every node really executes.
        self.executor.reset()
        self.executor.execute(prompt, prompt_id, {"client_id": "harness"}, valid[2])
        self.server.clock.on_executing(None)
        error = next((d for e, d in self.executor.status_messages if e == "execution_error"), None)
        interrupted = next((d for e, d in self.executor.status_messages if e == "execution_interrupted"), None)
        outputs = {}
        for node_id in prompt:
            cached = self.executor.caches.outputs.get(node_id)
            if inspect.isawaitable(cached):  # newer hosts' caches are async
                cached = asyncio.run(cached)
            if cached is not None:
                outputs[node_id] = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in cached.outputs] if hasattr(cached, "outputs") else cached
        result = RunResult(prompt_id, outputs, self.executor.history_result.get("outputs", {}), self.server.clock.seconds, list(self.server.messages), error or interrupted)
        if raise_on_error and result.error is not None:
            raise PromptFailed(result.error)
        return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerRunner:
    """Starts ``main.py --cpu`` on 127.0.0.1 and runs prompts over HTTP and websocket."""

    def __init__(self, models_dir: Path, workdir: Path, port: int | None = None, include_test_pack: bool = True) -> None:
        self.models_dir = models_dir
        self.workdir = workdir
        self.port = port or _free_port()
        self.include_test_pack = include_test_pack
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ServerRunner":
        for sub in ("", "output", "input", "user"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        yaml_path = self.workdir / "extra_model_paths.yaml"
        subdirs = ("diffusion_models", "vae", "checkpoints", "loras", "clip_vision", "text_encoders")
        lines = ["lightcache_tests:", f"  base_path: {self.models_dir}", "  is_default: true"]
        lines += [f"  {s}: {s}" for s in subdirs]
        lines.append(f"  custom_nodes: {host.custom_nodes_dir(self.include_test_pack)}")
        yaml_path.write_text("\n".join(lines) + "\n")
        path = host.comfyui_path()
        cmd = [sys.executable, str(path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(yaml_path), "--output-directory", str(self.workdir / "output"),
               "--input-directory", str(self.workdir / "input"), "--user-directory", str(self.workdir / "user"),
               "--disable-auto-launch", "--disable-metadata"]
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=str(self.workdir), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited early; log:\n{self.log_path.read_text()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI server did not listen within {timeout}s; log:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> "ServerRunner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def run(self, prompt: dict, *, timeout: float = 600.0, raise_on_error: bool = True) -> RunResult:
        return asyncio.run(self._run(prompt, timeout, raise_on_error))

    async def _run(self, prompt: dict, timeout: float, raise_on_error: bool) -> RunResult:
        import aiohttp

        client_id = str(uuid.uuid4())
        clock = _NodeClock()
        messages: list[tuple[str, dict]] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise PromptFailed({"node_type": "validation", "exception_type": f"HTTP {resp.status}", "exception_message": json.dumps(body)[:4000]})
                prompt_id = body["prompt_id"]
                error = None
                deadline = time.time() + timeout
                while time.time() < deadline:
                    msg = await ws.receive(timeout=deadline - time.time())
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        data = msg.data
                        event_type = int.from_bytes(data[:4], "big")
                        if event_type == 3:  # TEXT: node-id length, node id, utf-8 text
                            n = int.from_bytes(data[4:8], "big")
                            messages.append(("progress_text", {"node_id": data[8:8 + n].decode(), "text": data[8 + n:].decode()}))
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    payload = json.loads(msg.data)
                    event, data = payload.get("type"), payload.get("data", {})
                    messages.append((event, data))
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if event == "executing":
                        clock.on_executing(data.get("node"))
                        if data.get("node") is None:
                            break
                    elif event in ("execution_error", "execution_interrupted"):
                        error = data
                        clock.on_executing(None)
                        break
                    elif event == "execution_success":
                        clock.on_executing(None)
                        break
            # The server sends "execution_success" from inside the executor and files the history entry only
            # after it returns, so poll until the entry is there.
            history: dict = {}
            history_deadline = time.time() + 60
            while True:
                async with session.get(f"{self.url}/history/{prompt_id}") as resp:
                    history = (await resp.json()).get(prompt_id, {})
                if history or time.time() > history_deadline:
                    break
                await asyncio.sleep(0.1)
        result = RunResult(prompt_id, {}, history.get("outputs", {}), clock.seconds, messages, error)
        if raise_on_error and error is not None:
            raise PromptFailed(error)
        return result
