"""Shared pieces of the benchmarks: the repo on sys.path, certificates, a registry, a served ocifit."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

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
