"""Reach (or start) a real A1111 webui for the opt-in integration tests.

Configured by environment variables, nothing else:

* ``PIVOTAL_WEBUI_URL``: a webui already running with this checkout linked into its
  ``extensions/`` and ``--api`` on (e.g. ``http://127.0.0.1:7861``); or
* ``PIVOTAL_WEBUI_DIR`` + ``PIVOTAL_WEBUI_PYTHON``: a webui checkout and the python of its
  environment; the tests start ``launch.py`` with ``PIVOTAL_WEBUI_ARGS`` (the flags that make it run
  here: CPU, checkpoint, ``--api``...) plus ``--port PIVOTAL_WEBUI_PORT`` (default 7871), and stop it
  afterwards. The checkout must already have this extension in ``extensions/``.

Fault injection (:mod:`pivotal.training.faults`): a webui the tests start gets ``PIVOTAL_FAULT_FILE`` (a
temp path, or ``PIVOTAL_WEBUI_FAULT_FILE`` when set) in its environment, and ``Webui.fault_file``
names it; for a webui reached at a URL, ``PIVOTAL_WEBUI_FAULT_FILE`` must name the file that webui
was started with, or the fault tests skip.

Only loopback addresses are used. No webui code or setup lives in this repository.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

STARTUP_MARK = "Startup time:"
#: loopback only: never through a proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
STARTUP_TIMEOUT_S = 180.0


def configuration_problem() -> Optional[str]:
    """Why the integration tests cannot run here (None when they can)."""
    if os.environ.get("PIVOTAL_WEBUI_URL"):
        return None
    missing = [v for v in ("PIVOTAL_WEBUI_DIR", "PIVOTAL_WEBUI_PYTHON") if not os.environ.get(v)]
    if missing:
        return ("no real webui configured: set PIVOTAL_WEBUI_URL (a running A1111 with this extension and --api), "
                "or PIVOTAL_WEBUI_DIR + PIVOTAL_WEBUI_PYTHON (+ PIVOTAL_WEBUI_ARGS) to start one")
    for v in ("PIVOTAL_WEBUI_DIR", "PIVOTAL_WEBUI_PYTHON"):
        if not os.path.exists(os.environ[v]):
            return f"{v}={os.environ[v]} does not exist"
    return None


@dataclass
class Webui:
    """A webui reachable over HTTP; ``process`` is set when the tests started it."""

    url: str
    process: Optional[subprocess.Popen] = None
    log: list[str] = field(default_factory=list)
    fault_file: str = ""  # the webui's PIVOTAL_FAULT_FILE; "" when unknown

    # -- HTTP --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 600.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with _OPENER.open(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def status_of(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(HTTP status, decoded body) without raising on 4xx/5xx."""
        try:
            return 200, self.request(method, path, body)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def txt2img(self, prompt: str, seed: int = 1, steps: int = 4, size: int = 64,
                cfg_scale: float = 7.0) -> tuple[bytes, str]:
        """(PNG bytes, infotext) of one image (Euler)."""
        d = self.request("POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": steps, "width": size,
                                                      "height": size, "seed": seed, "sampler_name": "Euler",
                                                      "cfg_scale": cfg_scale})
        return base64.b64decode(d["images"][0]), json.loads(d["info"])["infotexts"][0]

    def wait_run(self, timeout: float = 900.0, poll: float = 1.0) -> dict[str, Any]:
        """Poll /pivotal/v1/status until the run is no longer running; return the last snapshot."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snap = self.request("GET", "/pivotal/v1/status")
            if snap["state"] != "running":
                return snap
            time.sleep(poll)
        raise TimeoutError(f"the run did not end within {timeout:.0f}s")

    def wait_step(self, step: int, timeout: float = 600.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snap = self.request("GET", "/pivotal/v1/status")
            if snap["step"] >= step or snap["state"] != "running":
                return snap
            time.sleep(0.3)
        raise TimeoutError(f"step {step} not reached within {timeout:.0f}s")

    # -- lifetime ----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_or_reach() -> Webui:
    """The configured webui: reached at PIVOTAL_WEBUI_URL, or started (see the module docstring)."""
    if os.environ.get("PIVOTAL_WEBUI_URL"):
        return Webui(os.environ["PIVOTAL_WEBUI_URL"].rstrip("/"),
                     fault_file=os.environ.get("PIVOTAL_WEBUI_FAULT_FILE", ""))
    return start_webui(int(os.environ.get("PIVOTAL_WEBUI_PORT", "7871")))


def start_webui(port: int, extra_args: tuple[str, ...] = (), *, prefix: str = "PIVOTAL_WEBUI",
                startup_timeout: float = STARTUP_TIMEOUT_S) -> Webui:
    """Start the webui of {prefix}_DIR with {prefix}_PYTHON on ``port`` with {prefix}_ARGS +
    ``extra_args`` (prefix PIVOTAL_WEBUI: A1111; PIVOTAL_FORGE / PIVOTAL_REFORGE: those webuis);
    returns once it printed "Startup time:". The caller stops it (:meth:`Webui.stop`)."""
    args = os.environ.get(f"{prefix}_ARGS", "").split() + list(extra_args) + ["--port", str(port)]
    fault_file = os.environ.get("PIVOTAL_WEBUI_FAULT_FILE") or os.path.join(
        tempfile.gettempdir(), f"pivotal-webui-fault-{port}-{os.getpid()}.json")
    if os.path.exists(fault_file):
        os.unlink(fault_file)  # armed by nobody: a stale file would fail the first run
    proc = subprocess.Popen([os.environ[f"{prefix}_PYTHON"], "launch.py", *args],
                            cwd=os.environ[f"{prefix}_DIR"],
                            env={**os.environ, "PIVOTAL_FAULT_FILE": fault_file},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    webui = Webui(f"http://127.0.0.1:{port}", process=proc, fault_file=fault_file)
    started = threading.Event()

    def pump() -> None:  # keep reading, or the webui blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            webui.log.append(line.rstrip())
            if STARTUP_MARK in line:
                started.set()

    threading.Thread(target=pump, daemon=True).start()
    # No request before "Startup time:": an early request can kill a starting webui.
    end = time.monotonic() + startup_timeout
    while not started.wait(0.5):
        if proc.poll() is not None or time.monotonic() > end:
            webui.stop()
            tail = "\n".join(webui.log[-40:])
            raise RuntimeError(f"the webui did not start (exit {proc.poll()}):\n{tail}")
    return webui


def untrained_parts(bundle_path: str, unused: tuple[str, ...] = ()) -> list[str]:
    """What in a bundle shows no sign of a gradient: LoRA up weights start at zero, and embedding
    rows initialised from a one-token init text start identical, so either staying so after a run
    means no gradient reached it (the SDXL pitfalls: no_grad conditioner, sgm checkpointing).
    ``unused``: key prefixes of modules the model's forward never reaches (exempt)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(bundle_path)
    ups = {k: v for k, v in tensors.items() if k.endswith(".lora_up.weight") and not k.startswith(unused or ("\0",))}
    problems = [] if ups else ["the bundle has no LoRA modules"]
    zero = sorted(k for k, v in ups.items() if not bool(v.float().abs().sum() > 0))
    if zero:
        problems.append(f"{len(zero)} of {len(ups)} LoRA modules got no gradient, e.g. {zero[:3]}")
    for key, value in tensors.items():
        if key.startswith("bundle_emb.") and value.shape[0] > 1 and torch.equal(value[0], value[1]):
            problems.append(f"{key}: its vectors are still identical (no gradient)")
    return problems
