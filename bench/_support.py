"""Shared pieces of the benchmarks: the repo on sys.path, certificates, a registry, a served ocifit."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ocifit  # noqa: E402,F401  (re-exported for the benchmarks)
import test_ocifit as t  # noqa: E402  (the test suite's real-peer helpers: registry, API double, pods)

EXAMPLE = ROOT / "example"


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ocifit-bench-"))


def pki(directory: Path) -> Dict[str, Path]:
    ca_key, ca = t.openssl_cert(directory, "ca")
    key, crt = t.openssl_cert(directory, "server", ca=ca)
    return {"ca": ca, "key": key, "crt": crt}


def free_port() -> int:
    return t._free_port()


def registry_with_flavor(directory: Path, repo_tag: str = "flavor:v1") -> "t.DockerRegistry":
    registry = t.DockerRegistry(directory / "registry")
    spec = directory / "compatibility-test.json"
    shutil.copy(EXAMPLE / "compatibility-test.json", spec)
    registry.push(repo_tag, spec)
    return registry


def wait_ready(port: int, ca: Path, seconds: float = 120.0) -> float:
    """Seconds until GET /readyz answers 200."""
    started = time.monotonic()
    context = ssl.create_default_context(cafile=str(ca))
    while True:
        try:
            import http.client
            conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                conn.close()
                return time.monotonic() - started
            conn.close()
        except OSError:
            pass
        if time.monotonic() - started > seconds:
            raise SystemExit(f"server on port {port} not ready after {seconds}s")
        time.sleep(0.05)


def post(port: int, ca: Path, review: Dict[str, Any]) -> Dict[str, Any]:
    import http.client
    conn = http.client.HTTPSConnection("localhost", port, context=ssl.create_default_context(cafile=str(ca)),
                                       timeout=30)
    conn.request("POST", "/mutate", body=json.dumps(review), headers={"Content-Type": "application/json"})
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def proc_status(pid: int) -> Dict[str, int]:
    """Threads, VmRSS and VmHWM (peak; KiB) of a live process, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Threads", "VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> bool:
    """Set a process's VmHWM back to its current RSS (Linux clear_refs 5); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def raise_fd_limit() -> int:
    """Raise this process's open-file limit (inherited by its children) to the hard limit; the new soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def python() -> str:
    return os.environ.get("BENCH_PYTHON", sys.executable)


# ---- the ocifit versions a benchmark compares (--baseline REV) ---------------------------------------

def versions(baseline: Optional[str], work: Path) -> Dict[str, Path]:
    """The ocifit.py files to measure, by label: the working tree's and, with a baseline, `git show REV:ocifit.py`
    written to work/baseline/ocifit.py."""
    scripts = {"working tree": ROOT / "ocifit.py"}
    if baseline:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{baseline}:ocifit.py"], capture_output=True,
                               timeout=60)
        if shown.returncode != 0:
            raise SystemExit(f"git show {baseline}:ocifit.py: {shown.stderr.decode().strip()}")
        old = work / "baseline" / "ocifit.py"
        old.parent.mkdir(exist_ok=True)
        old.write_bytes(shown.stdout)
        scripts[baseline] = old
    return scripts


@functools.lru_cache(maxsize=None)
def serve_flags(script: Path) -> FrozenSet[str]:
    """The `serve` flags this ocifit.py accepts, read from its `serve --help`."""
    done = subprocess.run([python(), str(script), "serve", "--help"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"{script} serve --help failed: {done.stderr.strip()[-500:]}")
    return frozenset(re.findall(r"--[a-z][a-z0-9-]+", done.stdout))


def serve_command(script: Path, flags: Sequence[Tuple[str, str]], required: Sequence[str] = ()) -> List[str]:
    """`python3 SCRIPT serve` with those of flags this version knows; a flag in required that it does not know
    is an error (the measurement would mean something else), any other unknown one is left out."""
    known = serve_flags(script)
    missing = [flag for flag in required if flag not in known]
    if missing:
        raise SystemExit(f"{script} serve takes none of {', '.join(missing)}")
    argv = [python(), str(script), "serve"]
    for flag, value in flags:
        if flag in known:
            argv += [flag, value]
    return argv


def load_module(script: Path, name: str) -> ModuleType:
    """An ocifit.py imported from its file under another module name, beside the working tree's `ocifit`."""
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their class's module up there while it is being made
    spec.loader.exec_module(module)
    return module


def ratio(new: float, old: float) -> str:
    """new/old as text, 1.00 meaning no change; "-" where old is 0."""
    return f"{new / old:.2f}" if old else "-"
