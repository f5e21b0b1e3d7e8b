#!/usr/bin/env python3
"""Hostile clients against a live HTTPS `serve`: connection exhaustion, memory, failed fetches.

Each scenario starts its own `python3 ocifit.py serve` on 127.0.0.1 (stderr to a file, whose lines are the log
volume) and reads the server's threads, VmRSS and VmHWM (peak) from /proc/PID/status. Figures are printed next
to their targets with PASS or MISS; the script exits 0 whatever they are (it is a benchmark, not a test), and 1
only when a run could not be made (a server that does not start, an attacker that gives no figures).

  (a) connection exhaustion, three attacks of 1,100 connections from 127.0.0.1 held for ~20 s: slowloris (TLS,
      then the headers a byte every 2 s), no-hello (TCP, never a TLS ClientHello) and idle-tls (handshake, then
      nothing); a closed connection is opened again. Meanwhile a well-behaved client bound to 127.0.0.2 (the API
      server) posts example/reviews/pod.json every 0.2 s, each on a new TLS connection, with the API server's 10 s
      timeout. Targets: >= 99% answered; RSS < 200 MB; threads and RSS back down after; refusals logged at most
      once every few seconds (here: <= 1 line per 2 s) and counted in a metric.
  (b) memory, on one server: 12 sequential reviews of ~3 MB (68,000 placeholder containers, a different count
      each, so no two share a memo entry), a review whose nodeSelector has 110,000 keys, then 48 clients posting
      ~3 MB reviews at once, twice: pods not labelled for ocifit (bodies in flight), then pods it mutates.
      Targets: peak RSS < 200 MB (the peak of each step, VmHWM reset before it), RSS within 40 MB of its
      baseline afterwards. The nodeSelector denial (reply and log) is held to <= 64 kB, a target inferred from
      "echoed a 3.3 MB denial".
  (c) failed fetches, from a loopback stub registry: 60 refs whose manifest streams forever (chunked, as fast as
      it can; target as in (b)), and 50 refs whose response headers drip a byte a second (target: the server's
      thread count back to idle, and no connection to the stub left, at --fetch-budget + 1 s and 20 s later).

  (d)-(k), issue 18's cost model, each against its own server (hostile specs from a loopback OCI registry stub on
      127.0.0.x, so a refused spec is a denial; a server frozen past 15 s is killed and reported so):
      (d) InRegexp patterns that backtrack (`.?`x40+Z, `.{0,9}` chains, `(a|a)?` chains, nested counted repeats)
          on label values of 13-1024 chars, /healthz polled every 50 ms (<= 100 ms), the admission <= 1 s CPU;
      (e) a ~850 KiB spec of 10,000 matchName terms on realistic NodeFeatures (bench/nodefeatures.py's, 40 nodes):
          one, then 8 in flight with good admissions (p99 <= 250 ms) and /healthz (<= 500 ms); pin mode, 2,000
          nodes x 20,000 matchFields, 3 times: <= 1 s CPU each (/proc/PID/stat);
      (f) 22 distinct ~1 MiB specs, (g) 200 MODIFIED of a 534 KB NodeFeature then DELETED (the API double),
      (h) 80 admissions x 16 referrer pages of ~4 MiB: RSS peak <= 200 MB, back within 40 MB;
      (i) registry requests per admission <= 128 (503 Retry-After: 0; 16 registries of endless pages);
      (j) a stale spec still served after another namespace's 1,120 junk candidates;
      (k) a tenant-a NodeFeature must not change w2's image (--node-feature-namespaces), and a log line names w2.

    python3 bench/attack.py [--baseline REV] [--only a,...,k] [--connections 1100] [--attack-seconds 20]

--baseline REV also runs every scenario against `git show REV:ocifit.py`, in the same run, one after the other,
and prints both side by side (--ocifit PATH measures another file than the working tree's ocifit.py). Flags a
given ocifit.py does not know (per its `serve --help`) are not passed.
All traffic stays on loopback. Needs openssl; about 3-4 minutes per ocifit version on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import re
import select
import shutil
import ssl
import socket
import subprocess
import sys
import threading
import time
import queue
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

MB = 1e6
MiB = 1024 * 1024
LOCAL_REF = "ghcr.io/compspec/ocifit-k8s-compatibility:kind-example"  # served from --artifact, never fetched
ENABLED_LABEL = "oci.image.compatibilities.selection/enabled"
IMAGE_REF_ANNOTATION = "oci.image.compatibilities.selection/image-ref"
GOOD_SOURCE = "127.0.0.2"  # the well-behaved client (the API server); the attacker is 127.0.0.1
API_SERVER_TIMEOUT = 10.0  # the webhook's timeoutSeconds in deploy.yaml
RSS_CEILING_MB = 200.0
RSS_RETURN_MB = 40.0


# ---- the attacker: its own process, one asyncio loop holding every connection -------------------

SLOW_HEAD = (b"POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             + b"".join(b"X-Slow-%d: %d\r\n" % (i, i) for i in range(90)))


async def _attack(mode: str, port: int, count: int, max_seconds: float) -> Dict[str, Any]:
    """Hold `count` connections to 127.0.0.1:port until stdin closes (or max_seconds), reopening closed ones."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # refused handshakes are the point, not news
    started = loop.time()
    end = started + max_seconds
    stop = asyncio.Event()

    def watch_stdin() -> None:
        try:
            sys.stdin.buffer.read()
        finally:
            loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=watch_stdin, daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    context = None
    if mode != "no-hello":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    state = {"held": 0, "max_held": 0, "first_done": 0}
    stats: "collections.Counter[str]" = collections.Counter()
    gate = asyncio.Semaphore(64)  # connects in flight at once

    async def hold() -> None:
        first = True
        while not stop.is_set() and loop.time() < end:
            writer = None
            held = False
            try:
                async with gate:
                    stats["connects"] += 1
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port, ssl=context), 10)
                held = True
                state["held"] += 1
                state["max_held"] = max(state["max_held"], state["held"])
                stats["established"] += 1
                if first:
                    first = False
                    state["first_done"] += 1
                sent = 0
                reading = asyncio.ensure_future(reader.read(65536))
                try:
                    while not stop.is_set() and loop.time() < end:
                        wait = end - loop.time()
                        if mode == "slowloris":
                            writer.write(SLOW_HEAD[sent % len(SLOW_HEAD):][:1])
                            sent += 1
                            await asyncio.wait_for(writer.drain(), 10)
                            wait = min(wait, 2.0)
                        done, _ = await asyncio.wait({reading, stopped}, timeout=max(0.0, wait),
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if reading in done:
                            if not reading.result():
                                stats["closed by server"] += 1
                                break
                            stats["bytes from server"] += len(reading.result())
                            reading = asyncio.ensure_future(reader.read(65536))
                finally:
                    reading.cancel()
            except Exception as exc:  # noqa: BLE001 - every failure is a figure
                stats["failed: " + type(exc).__name__] += 1
            finally:
                if held:
                    state["held"] -= 1
                if writer is not None:
                    writer.transport.abort()
                if first:
                    first = False
                    state["first_done"] += 1
            if not stop.is_set():
                await asyncio.wait({stopped}, timeout=0.05)  # then open it again

    tasks = [asyncio.ensure_future(hold()) for _ in range(count)]
    ramp_end = loop.time() + 15
    while state["first_done"] < count and loop.time() < ramp_end and not stop.is_set():
        await asyncio.sleep(0.05)
    print(f"ramped {state['held']} {loop.time() - started:.2f}", flush=True)
    samples = []
    while not stop.is_set() and loop.time() < end:
        await asyncio.wait({stopped}, timeout=0.5)
        samples.append(state["held"])
    stop.set()
    await asyncio.wait(tasks, timeout=2)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=5)
    samples.sort()
    return {"stats": dict(stats), "max_held": state["max_held"],
            "held_median": samples[len(samples) // 2] if samples else 0, "held_min": samples[0] if samples else 0,
            "seconds": loop.time() - started}


def pass_gate(gate: threading.Barrier) -> None:
    """Wait at the starting gate; a gate broken by a timeout lets everyone through."""
    try:
        gate.wait()
    except threading.BrokenBarrierError:
        pass


def start_together(threads: List[threading.Thread], gate: threading.Barrier) -> None:
    """Start the threads and release them together through the gate."""
    for thread in threads:
        thread.start()
    pass_gate(gate)


def attacker_main(argv: List[str]) -> int:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, port, count, max_seconds = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    print(json.dumps(asyncio.run(_attack(mode, port, count, max_seconds))), flush=True)
    return 0


class Attacker:
    """The attacker process, driven from here: started, waited on until ramped up, stopped by closing its stdin."""

    def __init__(self, mode: str, port: int, count: int, max_seconds: float, log: Path):
        with open(log, "a") as err:
            self.process = subprocess.Popen([python(), __file__, "--attacker", mode, str(port), str(count),
                                             str(max_seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("")

    def wait_ramped(self, timeout: float) -> Tuple[int, float]:
        line = self.lines.get(timeout=timeout)
        if not line.startswith("ramped "):
            raise RuntimeError(f"attacker did not ramp up: {line!r}")
        _, held, seconds = line.split()
        return int(held), float(seconds)

    def stop(self) -> Dict[str, Any]:
        self.process.stdin.close()
        try:
            line = self.lines.get(timeout=20)
            return json.loads(line)
        except (queue.Empty, ValueError) as exc:
            raise RuntimeError(f"attacker gave no figures: {exc!r}") from None
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ---- a loopback registry that misbehaves -----------------------------------------------------------

class StubRegistry:
    """/v2/endless*/manifests/* streams a chunked manifest that never ends (as fast as it can, up to a bound);
    /v2/drip*/manifests/* sends its status line, then a header a byte a second (up to a bound); else 404."""

    def __init__(self, endless_seconds: float = 20.0, endless_cap: int = 512 * MiB, drip_seconds: float = 45.0):
        self.endless_seconds, self.endless_cap, self.drip_seconds = endless_seconds, endless_cap, drip_seconds
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.sock.settimeout(0.2)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.open: "collections.Counter[Tuple[str, str]]" = collections.Counter()  # (kind, tag) -> connections
        self.served: "collections.Counter[str]" = collections.Counter()
        self.sent = 0
        self.workers: List[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, name="stub-accept", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.workers = [w for w in self.workers if w.is_alive()]
            if len(self.workers) >= 1000:
                conn.close()
                continue
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.workers.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        kind, counted, tag = "other", False, ""
        try:
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else ""
            if "/manifests/" in path and path.startswith("/v2/endless"):
                kind = "endless"
            elif "/manifests/" in path and path.startswith("/v2/drip"):
                kind = "drip"
            tag = path.rsplit("/", 1)[-1]  # /v2/<repo>/manifests/<tag>
            with self.lock:
                self.open[kind, tag] += 1
                self.served[kind] += 1
                counted = True
            if kind == "endless":
                self._endless(conn)
            elif kind == "drip":
                self._drip(conn)
            else:
                body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repository"}]}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            if counted:
                with self.lock:
                    self.open[kind, tag] -= 1
            conn.close()

    def _endless(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        data = b'{"schemaVersion":2,"annotations":{"x":"' + b"x" * (64 * 1024 - 40)
        chunk = b"%x\r\n%s\r\n" % (len(data), data)
        filler = b"x" * 65536
        chunk_more = b"%x\r\n%s\r\n" % (len(filler), filler)
        until, sent = time.monotonic() + self.endless_seconds, 0
        conn.sendall(chunk)
        while not self.stopping.is_set() and time.monotonic() < until and sent < self.endless_cap:
            conn.sendall(chunk_more)
            sent += len(filler)
            with self.lock:
                self.sent += len(filler)

    def _drip(self, conn: socket.socket) -> None:
        """A byte a second; the peer's close is seen when it happens (poll), not at the second send after it."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        poller = select.poll()
        poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR)
        until = time.monotonic() + self.drip_seconds
        next_byte = time.monotonic() + 1.0
        while not self.stopping.is_set() and time.monotonic() < until:
            if poller.poll(max(0.0, min(0.1, next_byte - time.monotonic())) * 1000):
                try:
                    if not conn.recv(4096, socket.MSG_DONTWAIT):
                        return  # the peer closed
                except BlockingIOError:
                    pass
                except OSError:
                    return
            if time.monotonic() >= next_byte:
                conn.sendall(b"a")
                next_byte += 1.0

    def still_open(self, kind: str, tag: str) -> int:
        """Connections open now for refs of this kind with this tag."""
        with self.lock:
            return self.open[kind, tag]

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.thread.join(timeout=5)
        for worker in list(self.workers):
            worker.join(timeout=max(0.1, 3.0 / max(1, len(self.workers))))


# ---- the server under test -------------------------------------------------------------------------

class Version(NamedTuple):
    label: str
    script: Path
    flags: frozenset  # the `serve` flags this ocifit.py accepts


def version_of(label: str, script: Path) -> Version:
    done = subprocess.run([python(), str(script), "serve", "--help"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"{script} serve --help failed: {done.stderr.strip()[-500:]}")
    return Version(label, script, frozenset(re.findall(r"--[a-z][a-z0-9-]+", done.stdout)))


class Env(NamedTuple):
    work: Path
    certs: Dict[str, Path]
    context: ssl.SSLContext
    stub: StubRegistry
    args: argparse.Namespace


class Served:
    """One `ocifit.py serve` of one version, up and ready, on its own port and log file."""

    REQUIRED = ("--bind", "--port", "--cert", "--key", "--nodes", "--artifact")

    def __init__(self, env: Env, version: Version, name: str, replace: Optional[Dict[str, Optional[str]]] = None,
                 add: Sequence[Tuple[str, str]] = (), ready_seconds: float = 60.0):
        """replace: flags whose default value is replaced (None: not passed at all, e.g. --nodes with --kube-api);
        add: flags passed as well (repeatable ones such as --artifact may be given again)."""
        self.env, self.version = env, version
        self.port = free_port()
        self.log = env.work / f"{re.sub(r'[^A-Za-z0-9]+', '-', version.label)}-{name}.log"
        flags = [("--bind", "127.0.0.1"), ("--port", str(self.port)), ("--cert", str(env.certs["crt"])),
                 ("--key", str(env.certs["key"])), ("--nodes", str(EXAMPLE / "nodes-homogeneous.json")),
                 ("--artifact", f"{LOCAL_REF}={EXAMPLE / 'compatibility-test.json'}"),
                 ("--insecure-registry", env.stub.host), ("--allowed-registries", env.stub.host),
                 ("--fetch-budget", f"{env.args.fetch_budget:g}"), ("--log-level", "warning")]
        replace = replace or {}
        chosen = [(f, replace[f]) if f in replace else (f, v) for f, v in flags]
        flags = [(f, v) for f, v in chosen if v is not None] + list(add)
        missing = [f for f in self.REQUIRED if f not in version.flags and (f not in replace or replace[f] is not None)]
        if missing:
            raise RuntimeError(f"{version.script} serve takes none of {', '.join(missing)}")
        argv = [python(), str(version.script), "serve"]
        for flag, value in flags:
            if flag in version.flags:
                argv += [flag, value]
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                            cwd=env.work)
        self.pid = self.process.pid
        self._ready(ready_seconds)

    def _ready(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.version.label} serve exited with {self.process.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-800:]}")
            try:
                status, _, _, _ = request(self.port, self.env.context, "GET", "/readyz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.version.label} serve not ready after {seconds:g}s")

    def status(self) -> Dict[str, int]:
        return proc_status(self.pid)

    def log_size(self) -> Tuple[int, int]:
        """(lines, bytes) the server has written to stderr so far."""
        data = self.log.read_bytes()
        return data.count(b"\n"), len(data)

    def stop(self) -> None:
        stop(self.process)

    def kill(self) -> None:
        """SIGKILL: a server stuck in C code (a regular expression holding the GIL) never sees SIGTERM."""
        self.process.kill()
        self.process.wait(timeout=30)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


def request(port: int, context: ssl.SSLContext, method: str, path: str, body: Optional[bytes] = None,
            timeout: float = API_SERVER_TIMEOUT, source: str = GOOD_SOURCE,
            conn: Optional[http.client.HTTPSConnection] = None) -> Tuple[Optional[int], bytes, float, str]:
    """(status or None, reply body, seconds, error class) of one request, on a new connection from `source`."""
    started = time.monotonic()
    conn = conn or http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout,
                                               source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        data = response.read()
        return response.status, data, time.monotonic() - started, ""
    except (OSError, http.client.HTTPException) as exc:
        return None, b"", time.monotonic() - started, type(exc).__name__
    finally:
        conn.close()


def answered(status: Optional[int], data: bytes, uid: str) -> Optional[Dict[str, Any]]:
    """The AdmissionReview response when the reply is one for this uid, else None."""
    if status != 200:
        return None
    try:
        response = json.loads(data)["response"]
    except (ValueError, KeyError, TypeError):
        return None
    return response if isinstance(response, dict) and response.get("uid") == uid else None


# ---- reviews ---------------------------------------------------------------------------------------

POD_REVIEW = json.loads((Path(__file__).resolve().parent.parent / "example" / "reviews" / "pod.json").read_text())


def review(name: str, ref: str = LOCAL_REF, containers: Optional[str] = None,
           node_selector: Optional[str] = None, enabled: bool = True) -> Tuple[bytes, str]:
    """(body, uid) of pod.json's review renamed, naming `ref`; containers / node_selector: raw JSON to splice in;
    enabled=False drops the label that asks for ocifit (the pod is admitted as it is)."""
    doc = json.loads(json.dumps(POD_REVIEW))
    uid = f"attack-{name}"
    doc["request"]["uid"] = uid
    doc["request"]["name"] = name
    pod = doc["request"]["object"]
    pod["metadata"]["name"] = name
    pod["metadata"]["labels"][ENABLED_LABEL] = "true"
    if not enabled:
        del pod["metadata"]["labels"][ENABLED_LABEL]
    pod["metadata"]["annotations"][IMAGE_REF_ANNOTATION] = ref
    if containers is not None:
        pod["spec"]["containers"] = "@CONTAINERS@"
    if node_selector is not None:
        pod["spec"]["nodeSelector"] = "@SELECTOR@"
    text = json.dumps(doc, separators=(",", ":"))
    if containers is not None:
        text = text.replace('"@CONTAINERS@"', containers)
    if node_selector is not None:
        text = text.replace('"@SELECTOR@"', node_selector)
    return text.encode(), uid


def base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


class BigPods:
    """Reviews of ~3 MB: up to 68,000 placeholder containers; pod k has k fewer, so no two share a memo entry."""

    def __init__(self, containers: int = 68000, limit: int = 3 * MiB):
        self.entries = [f'{{"name":"c{base36(i)}","image":"placeholder:latest"}}' for i in range(containers)]
        self.limit = limit

    def body(self, k: int, enabled: bool = True) -> Tuple[bytes, str, int]:
        n = len(self.entries) - k
        while n > 0:
            body, uid = review(f"big-{k}", containers="[" + ",".join(self.entries[:n]) + "]", enabled=enabled)
            if len(body) <= self.limit:
                return body, uid, n
            n -= 1000 + k  # stays distinct per k
        raise ValueError(f"no review of {len(self.entries)} containers fits in {self.limit} bytes")


# ---- measuring -------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """The server's threads and RSS every 0.2 s while it runs (bounded by max_seconds)."""

    def __init__(self, pid: int, max_seconds: float = 300.0):
        super().__init__(daemon=True)
        self.pid, self.max_seconds = pid, max_seconds
        self.halt = threading.Event()
        self.max_threads = 0
        self.max_rss = 0

    def run(self) -> None:
        until = time.monotonic() + self.max_seconds
        while time.monotonic() < until:
            try:
                status = proc_status(self.pid)
            except OSError:
                return
            self.max_threads = max(self.max_threads, status["Threads"])
            self.max_rss = max(self.max_rss, status["VmRSS"])
            if self.halt.wait(0.2):
                return

    def finish(self) -> "Sampler":
        self.halt.set()
        self.join(timeout=5)
        return self


def mb(kib: int) -> float:
    return kib * 1024 / MB


def size(n: float) -> str:
    return f"{n / MB:.1f} MB" if n >= 100_000 else f"{n / 1000:.1f} kB" if n >= 1000 else f"{n:.0f} B"


def reasons(errors: List[str]) -> str:
    counted = collections.Counter(e for e in errors if e)
    return ", ".join(f"{name} x{n}" for name, n in counted.most_common(2)) + (", ..." if len(counted) > 2 else "") \
        or "-"


def refusal_metric(port: int, context: ssl.SSLContext) -> Tuple[str, Optional[bool]]:
    """Metrics whose name speaks of connections or requests turned away (refused, evicted, shed), summed by name;
    met when one of them counted something."""
    status, data, _, error = request(port, context, "GET", "/metrics")
    if status != 200:
        return f"/metrics: {status or error}", False
    totals: Dict[str, float] = collections.defaultdict(float)
    for line in data.decode("utf-8", "replace").splitlines():
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if match and re.search(r"refus|reject|evict|shed|overload", match.group(1)):
            try:
                totals[match.group(1)] += float(match.group(3))
            except ValueError:
                pass
    if not totals:
        return "no such metric", False
    short = {name: re.sub(r"_total$", "", name).rsplit("_", 1)[-1] for name in totals}
    counted = [f"{short[name]} {value:g}" for name, value in totals.items() if value > 0]
    return ", ".join(counted) or f"all 0 ({', '.join(short.values())})", bool(counted)


Row = Tuple[str, str, str, Optional[bool]]  # label, target, figure, verdict (None: for information)


def memory_rows(label: str, baseline_kib: int, peak_kib: int, after_kib: int, settle: float) -> List[Row]:
    return [(f"{label}RSS peak", f"< {RSS_CEILING_MB:.0f} MB", f"{mb(peak_kib):.0f} MB",
             mb(peak_kib) < RSS_CEILING_MB),
            (f"{label}RSS after {settle:g}s vs baseline", f"<= +{RSS_RETURN_MB:.0f} MB",
             f"{mb(after_kib):.0f} MB ({mb(after_kib) - mb(baseline_kib):+.0f})",
             mb(after_kib) - mb(baseline_kib) <= RSS_RETURN_MB)]


# ---- (a) connection exhaustion -----------------------------------------------------------------------

def good_client(env: Env, port: int, posts: int, interval: float) -> List[Tuple[bool, float, str]]:
    """`posts` admissions, one every `interval` s, each on a new TLS connection from 127.0.0.2."""
    results: List[Tuple[bool, float, str]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body, uid = review(f"good-{i}")
        status, data, seconds, error = request(port, env.context, "POST", "/mutate", body)
        ok = answered(status, data, uid) is not None and seconds <= API_SERVER_TIMEOUT
        with lock:
            results.append((ok, seconds, error or ("" if ok else f"HTTP {status}" if status else "late")))
    threads = []
    started = time.monotonic()
    for i in range(posts):
        time.sleep(max(0.0, started + i * interval - time.monotonic()))
        thread = threading.Thread(target=one, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
    until = time.monotonic() + 3 * API_SERVER_TIMEOUT  # http.client's timeout is per operation
    for thread in threads:
        thread.join(timeout=max(0.1, until - time.monotonic()))
    with lock:
        done = list(results)
    return done + [(False, 3 * API_SERVER_TIMEOUT, "hung")] * (posts - len(done))


def warm_up(env: Env, server: "Served") -> None:
    """One admission from the good client's address, which must be answered before any figure counts."""
    body, uid = review("warm-up")
    status, data, _, error = request(server.port, env.context, "POST", "/mutate", body)
    if answered(status, data, uid) is None:
        raise RuntimeError(f"warm-up admission from {GOOD_SOURCE} not answered: {status or error} {data[:200]!r}")


def exhaustion(env: Env, version: Version, mode: str) -> List[Row]:
    args = env.args
    server = Served(env, version, f"a-{mode}")
    attacker = None
    try:
        warm_up(env, server)
        time.sleep(0.5)
        idle = server.status()
        lines_before, _ = server.log_size()
        sampler = Sampler(server.pid)
        sampler.start()
        exact_peak = reset_peak(server.pid)  # then VmHWM is the attack's peak, not only what the samples saw
        attack_started = time.monotonic()
        max_seconds = args.attack_seconds + 3 * API_SERVER_TIMEOUT + 30
        attacker = Attacker(mode, server.port, args.connections, max_seconds, env.work / f"attacker-{mode}.log")
        held_at_ramp, ramp_seconds = attacker.wait_ramped(30)
        posts = max(1, round(args.attack_seconds / args.interval))
        results = good_client(env, server.port, posts, args.interval)
        figures = attacker.stop()
        attacker = None
        attack_seconds = time.monotonic() - attack_started
        lines_after, _ = server.log_size()
        during = sampler.finish()
        peak_rss = max(during.max_rss, server.status()["VmHWM"] if exact_peak else 0)
        time.sleep(args.settle)
        after = server.status()
        metric, metric_ok = refusal_metric(server.port, env.context)
    finally:
        if attacker is not None:
            try:
                attacker.stop()
            except Exception:  # noqa: BLE001 - already failing; the attacker is gone either way
                pass
        server.stop()
    ok = sum(1 for r in results if r[0])
    latencies = sorted(r[1] for r in results if r[0])
    stats = figures["stats"]
    lines = lines_after - lines_before
    closed = stats.get("closed by server", 0) + sum(v for k, v in stats.items() if k.startswith("failed"))
    return [
        (f"answered ({GOOD_SOURCE}, new conn/{args.interval:g}s)", ">= 99%",
         f"{ok}/{len(results)} ({100.0 * ok / len(results):.0f}%)", ok >= 0.99 * len(results)),
        ("  answered p50 / max latency", "", f"{latencies[len(latencies) // 2]:.2f} / {latencies[-1]:.2f} s"
         if latencies else "-", None),
        ("  failures", "", reasons([r[2] for r in results]), None),
        ("attacker conns held: ramp / median", f"{args.connections} tried",
         f"{held_at_ramp} ({ramp_seconds:.1f}s) / {figures['held_median']}", None),
        ("attacker connects / closed or failed", "", f"{stats.get('connects', 0)} / {closed}", None),
        ("server threads idle / max / after", "after <= idle+2",
         f"{idle['Threads']} / {during.max_threads} / {after['Threads']}", after["Threads"] <= idle["Threads"] + 2),
        ("server RSS peak during attack", f"< {RSS_CEILING_MB:.0f} MB", f"{mb(peak_rss):.0f} MB",
         mb(peak_rss) < RSS_CEILING_MB),
        (f"server RSS idle / after {args.settle:g}s", f"<= idle+{RSS_RETURN_MB:.0f} MB",
         f"{mb(idle['VmRSS']):.0f} / {mb(after['VmRSS']):.0f} MB",
         mb(after["VmRSS"]) - mb(idle["VmRSS"]) <= RSS_RETURN_MB),
        (f"log lines during attack ({attack_seconds:.0f}s)", f"<= {attack_seconds / 2:.0f} (1 per 2s)",
         f"{lines} ({lines / attack_seconds * 60:,.0f}/min)", lines <= attack_seconds / 2),
        ("turned-away metric (refused/evicted/shed)", "counted", metric, metric_ok),
    ]


# ---- (b) memory ----------------------------------------------------------------------------------------

def burst(env: Env, port: int, bodies: List[Tuple[bytes, str, int]]) -> Tuple[int, List[Tuple[bool, float, str]]]:
    """Every body posted at once, each on its own connection from 127.0.0.2, TLS done before the gate opens."""
    gate = threading.Barrier(len(bodies) + 1, timeout=60)
    results: List[Tuple[bool, float, str]] = []
    lock = threading.Lock()

    def post_big(i: int) -> None:
        body, uid, _ = bodies[i]
        conn: Optional[http.client.HTTPSConnection] = http.client.HTTPSConnection(
            "127.0.0.1", port, context=env.context, timeout=120, source_address=(GOOD_SOURCE, 0))
        error = ""
        try:
            conn.connect()
        except OSError as exc:
            conn, error = None, type(exc).__name__
        pass_gate(gate)
        if conn is None:
            outcome = (False, 0.0, error)
        else:
            status, data, took, error = request(port, env.context, "POST", "/mutate", body, conn=conn)
            outcome = (answered(status, data, uid) is not None, took, error or f"HTTP {status}")
        with lock:
            results.append(outcome)
    threads = [threading.Thread(target=post_big, args=(i,), daemon=True) for i in range(len(bodies))]
    start_together(threads, gate)
    until = time.monotonic() + 240
    for thread in threads:
        thread.join(timeout=max(0.1, until - time.monotonic()))
    with lock:
        done = list(results)
    return sum(1 for r in done if r[0]), done


def memory(env: Env, version: Version) -> List[Row]:
    args = env.args
    pods = BIG_PODS
    assert pods is not None
    server = Served(env, version, "b-memory")
    rows: List[Row] = []
    try:
        warm_up(env, server)
        time.sleep(1.0)
        baseline = server.status()["VmRSS"]
        peaks = []
        can_reset = reset_peak(server.pid)
        rows.append(("RSS baseline (idle, one admission)", "", f"{mb(baseline):.0f} MB", None))

        def peak() -> int:
            value = server.status()["VmHWM"]
            peaks.append(value)
            return value

        # 12 reviews of ~3 MB, one after the other
        sizes, replies, ok, seconds, count = [], [], 0, [], 0
        for k in range(12):
            body, uid, count = pods.body(k)
            status, data, took, _ = request(server.port, env.context, "POST", "/mutate", body, timeout=120)
            ok += answered(status, data, uid) is not None
            sizes.append(len(body))
            replies.append(len(data))
            seconds.append(took)
        rows.append((f"12 x {size(max(sizes))} reviews (~{round(count, -3):,} ctrs)", "",
                     f"{ok}/12 answered in {sum(seconds):.1f}s", None))
        rows.append(("  reply size", "", size(max(replies)), None))
        rows.append(("  RSS peak / now", f"peak < {RSS_CEILING_MB:.0f} MB",
                     f"{mb(peak()):.0f} / {mb(server.status()['VmRSS']):.0f} MB", mb(peaks[-1]) < RSS_CEILING_MB))
        reset_peak(server.pid)

        # one nodeSelector of 110,000 keys
        selector = "{" + ",".join(f'"example.com/key{i:06d}":"v"' for i in range(110_000)) + "}"
        body, uid = review("selector", node_selector=selector)
        _, log_bytes_before = server.log_size()
        status, data, took, error = request(server.port, env.context, "POST", "/mutate", body, timeout=120)
        time.sleep(0.5)  # the log line, if any, is written by now
        _, log_bytes_after = server.log_size()
        response = answered(status, data, uid)
        verdict = "allowed" if response and response.get("allowed") else "denied" if response else (status or error)
        rows.append((f"110,000-key nodeSelector ({size(len(body))})", "", f"{verdict}, {took:.1f}s", None))
        log_bytes = log_bytes_after - log_bytes_before
        rows.append(("  reply / log bytes", "<= 64 kB (inferred)", f"{size(len(data))} / {size(log_bytes)}",
                     len(data) <= 64 * 1024 and log_bytes <= 64 * 1024))
        rows.append(("  RSS peak / now", f"peak < {RSS_CEILING_MB:.0f} MB",
                     f"{mb(peak()):.0f} / {mb(server.status()['VmRSS']):.0f} MB", mb(peaks[-1]) < RSS_CEILING_MB))
        del selector, body, data
        reset_peak(server.pid)

        # 48 clients posting ~3 MiB at once: first pods not labelled for ocifit (read and parsed, nothing to
        # mutate: the bodies in flight), then pods that are (each mutated, each a memo entry of its own)
        for enabled, what in ((False, "not enabled"), (True, "mutated")):
            bodies = [pods.body(12 + i + (0 if enabled else 100), enabled=enabled) for i in range(48)]
            done, results = burst(env, server.port, bodies)
            rows.append((f"48 x {size(len(bodies[0][0]))} at once, {what}", "",
                         f"{done}/48 answered, max {max((r[1] for r in results), default=0):.1f}s", None))
            rows.append(("  not answered", "", reasons([r[2] for r in results if not r[0]]), None))
            rows.append(("  RSS peak / now", f"peak < {RSS_CEILING_MB:.0f} MB",
                         f"{mb(peak()):.0f} / {mb(server.status()['VmRSS']):.0f} MB", mb(peaks[-1]) < RSS_CEILING_MB))
            del bodies
            reset_peak(server.pid)
        time.sleep(args.settle)
        after = server.status()["VmRSS"]
        rows.append(("all of (b): RSS peak" + ("" if can_reset else " (since start)"), f"< {RSS_CEILING_MB:.0f} MB",
                     f"{mb(max(peaks)):.0f} MB", mb(max(peaks)) < RSS_CEILING_MB))
        rows.append((f"all of (b): RSS after {args.settle:g}s vs baseline", f"<= +{RSS_RETURN_MB:.0f} MB",
                     f"{mb(after):.0f} MB ({mb(after) - mb(baseline):+.0f})",
                     mb(after) - mb(baseline) <= RSS_RETURN_MB))
    finally:
        server.stop()
    return rows


# ---- (c) failed fetches ----------------------------------------------------------------------------------

def endless(env: Env, version: Version) -> List[Row]:
    args = env.args
    server = Served(env, version, "c-endless")
    try:
        warm_up(env, server)
        time.sleep(1.0)
        baseline = server.status()["VmRSS"]
        reset_peak(server.pid)
        sent_before = env.stub.sent
        tag = f"t{time.monotonic_ns()}"  # fresh refs: nothing cached from another version's run
        results: List[Tuple[str, float]] = []
        lock = threading.Lock()
        refs = [f"{env.stub.host}/endless{i}:{tag}" for i in range(60)]
        pending = collections.deque(enumerate(refs))

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    i, ref = pending.popleft()
                body, uid = review(f"endless-{i}", ref=ref)
                status, data, took, error = request(server.port, env.context, "POST", "/mutate", body, timeout=30)
                response = answered(status, data, uid)
                outcome = ("allowed" if response.get("allowed") else "denied") if response else (error or "no reply")
                with lock:
                    results.append((outcome, took))
        started = time.monotonic()
        workers = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(timeout=180)
        took = time.monotonic() - started
        peak = server.status()["VmHWM"]
        time.sleep(args.settle)
        after = server.status()["VmRSS"]
        outcomes = collections.Counter(r[0] for r in results)
    finally:
        server.stop()
    return [("60 refs, endless manifest", "",
             ", ".join(f"{n} {o}" for o, n in outcomes.most_common()) + f" in {took:.1f}s", None),
            ("  registry bytes sent", "", size(env.stub.sent - sent_before), None),
            ("  RSS baseline", "", f"{mb(baseline):.0f} MB", None)] + memory_rows("  ", baseline, peak, after,
                                                                                    args.settle)


def drip(env: Env, version: Version) -> List[Row]:
    args = env.args
    budget = args.fetch_budget if "--fetch-budget" in version.flags else 8.0
    server = Served(env, version, "c-drip")
    try:
        warm_up(env, server)
        time.sleep(1.0)
        idle = server.status()["Threads"]
        tag = f"t{time.monotonic_ns()}"
        refs = [f"{env.stub.host}/drip{i}:{tag}" for i in range(50)]
        gate = threading.Barrier(len(refs) + 1, timeout=60)
        results: List[Tuple[str, float]] = []
        lock = threading.Lock()

        def post_drip(i: int) -> None:
            body, uid = review(f"drip-{i}", ref=refs[i])
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=env.context, timeout=40,
                                               source_address=(GOOD_SOURCE, 0))
            try:
                conn.connect()
            except OSError:
                pass
            pass_gate(gate)
            status, data, took, error = request(server.port, env.context, "POST", "/mutate", body, conn=conn)
            response = answered(status, data, uid)
            outcome = ("allowed" if response.get("allowed") else "denied") if response else (error or "no reply")
            with lock:
                results.append((outcome, took))
        threads = [threading.Thread(target=post_drip, args=(i,), daemon=True) for i in range(len(refs))]
        start_together(threads, gate)
        sent = time.monotonic()
        time.sleep(max(0.0, sent + budget + 1 - time.monotonic()))
        at_budget = server.status()["Threads"]
        open_at_budget = env.stub.still_open("drip", tag)
        for thread in threads:
            thread.join(timeout=max(0.1, sent + 40 - time.monotonic()))
        time.sleep(max(0.0, sent + budget + 21 - time.monotonic()))
        later = server.status()["Threads"]
        open_later = env.stub.still_open("drip", tag)
    finally:
        server.stop()
    outcomes = collections.Counter(r[0] for r in results)
    return [("50 refs, headers dripped 1 B/s: replies", "",
             ", ".join(f"{n} {o}" for o, n in outcomes.most_common())
             + f", max {max((r[1] for r in results), default=0):.1f}s", None),
            ("server threads idle", "", f"{idle}", None),
            (f"threads at budget+1s ({budget + 1:g}s)", f"<= {idle} (idle)", f"{at_budget}", at_budget <= idle),
            (f"threads 20s later ({budget + 21:g}s)", f"<= {idle} (idle)", f"{later}", later <= idle),
            ("stub conns open at budget+1s / 20s later", "0 / 0", f"{open_at_budget} / {open_later}",
             open_at_budget == 0 and open_later == 0)]


# ---- shared by (d)-(k): CPU, pollers, an OCI registry stub, pods naming candidates -------------------------

SCENARIO_CAP = 15.0  # seconds any one hostile request is given; old code that freezes is killed after it
HEALTHZ_TARGET = 0.1  # (d): /healthz while a hostile pattern is evaluated
CPU_TARGET = 1.0  # CPU seconds one admission may cost
NFD_ARTIFACT_TYPE = "application/vnd.nfd.image-compatibility.v1alpha1"
NFD_SPEC_MEDIA_TYPE = "application/vnd.nfd.image-compatibility.spec.v1alpha1+yaml"
COMPAT_MEDIA_TYPE = "application/vnd.oci.image.compatibilities.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CANDIDATES_ANNOTATION = "oci.image.compatibilities.selection/candidates"


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a live process has used, from /proc/PID/stat (as bench/nodefeatures.py)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def outcome_of(status: Optional[int], data: bytes, uid: str, error: str, took: float, cap: float) -> str:
    """An admission's reply in a few words: allowed (image), denied: why, or no answer."""
    response = answered(status, data, uid)
    if response is None:
        return f"no answer in {cap:g} s" if took >= cap - 0.5 or error == "TimeoutError" else \
            f"no answer ({error or status})"
    if response.get("allowed"):
        return "allowed"
    message = str((response.get("status") or {}).get("message") or "")
    return "denied: " + re.sub(r"^(?:artifact|candidate image) \S+?:? ", "", message)[:80]


class Poller(threading.Thread):
    """One request every `interval` s, one at a time (a frozen server shows as one long request), each on a new
    connection from 127.0.0.2: GET /healthz, or POST a good admission (uid checked). Latencies, failures."""

    def __init__(self, env: Env, port: int, interval: float, admission: bool = False, cap: float = SCENARIO_CAP):
        super().__init__(daemon=True)
        self.env, self.port, self.interval, self.admission, self.cap = env, port, interval, admission, cap
        self.halt = threading.Event()
        self.latencies: List[float] = []
        self.failures = 0

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            started = time.monotonic()
            if self.admission:
                body, uid = review(f"good-{i}")
                status, data, took, _ = request(self.port, self.env.context, "POST", "/mutate", body, timeout=self.cap)
                ok = answered(status, data, uid) is not None
            else:
                status, _, took, _ = request(self.port, self.env.context, "GET", "/healthz", timeout=self.cap)
                ok = status == 200
            self.latencies.append(took)
            self.failures += not ok
            i += 1
            self.halt.wait(max(0.0, started + self.interval - time.monotonic()))

    def finish(self) -> "Poller":
        self.halt.set()
        self.join(timeout=self.cap + 5)
        return self

    def figures(self) -> str:
        if not self.latencies:
            return "-"
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return (f"n {len(ordered)}, p99 {p99 * 1e3:,.0f} / max {ordered[-1] * 1e3:,.0f} ms"
                + (f", {self.failures} failed" if self.failures else ""))

    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def watched(env: Env, server: "Served", good_interval: float = 0.2, healthz_interval: float = 0.05
            ) -> Tuple[Poller, Poller]:
    """A /healthz poller and a good-admission poller, started."""
    health, good = Poller(env, server.port, healthz_interval), Poller(env, server.port, good_interval, True)
    health.start()
    good.start()
    return health, good


def post_timed(env: Env, server: "Served", body: bytes, uid: str, cap: float = SCENARIO_CAP
               ) -> Tuple[str, float, float]:
    """(outcome, seconds, server CPU seconds meanwhile) of one admission given at most `cap` s."""
    cpu = server.cpu()
    status, data, took, error = request(server.port, env.context, "POST", "/mutate", body, timeout=cap)
    return outcome_of(status, data, uid, error, took, cap), took, server.cpu() - cpu


def wait_idle(pid: int, seconds: float = 60.0, quiet: float = 0.05) -> float:
    """Wait until the process uses less than `quiet` CPU s over 0.5 s (its work done); seconds waited."""
    started = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - started < seconds:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - last < quiet:
            break
        last = now
    return time.monotonic() - started


def pod_review(name: str, annotations: Dict[str, str], namespace: str = "default",
               ref: Optional[str] = LOCAL_REF, spec: Optional[Dict[str, Any]] = None) -> Tuple[bytes, str]:
    """(body, uid) of pod.json's review renamed, in `namespace`, with these annotations (ref None: no image-ref)
    and these pod spec fields."""
    doc = json.loads(review(name, ref=ref or LOCAL_REF)[0])
    pod = doc["request"]["object"]
    doc["request"]["namespace"] = pod["metadata"]["namespace"] = namespace
    if ref is None:
        del pod["metadata"]["annotations"][IMAGE_REF_ANNOTATION]
    pod["metadata"]["annotations"].update(annotations)
    pod["spec"].update(spec or {})
    return json.dumps(doc, separators=(",", ":")).encode(), doc["request"]["uid"]


def sha256(data: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OciStub:
    """A loopback OCI registry on `address` (127.0.0.x: a host name of its own), counting every request.

    Any /v2/REPO/manifests/TAG is an image (a small manifest of its own). Modes:
      ok        images in `specs` (repo -> spec bytes) have that spec attached (referrers API, one page) or, for
                repos in `pulled`, are a compatibility artifact themselves; other images have `default_spec`
                attached, or nothing
      503       every request: 503 with Retry-After: 0
      endless   referrers pages without end, one entry each (the attached spec again), Link to the next
      big       16 referrer pages of `page_bytes` each (one entry of another artifact type, padded), then none
    stop() closes the socket: connection refused from then on."""

    def __init__(self, address: str = "127.0.0.1", mode: str = "ok", page_bytes: int = 4 * MiB):
        import http.server
        stub = self
        self.mode, self.page_bytes = mode, page_bytes
        self.specs: Dict[str, bytes] = {}
        self.default_spec: Optional[bytes] = None  # attached to every image not in specs
        self.pulled: set = set()
        self.requests = 0
        self.lock = threading.Lock()
        self.objects: Dict[str, Tuple[str, bytes]] = {}  # digest -> (media type, bytes)
        self._pages: Dict[int, bytes] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                with stub.lock:
                    stub.requests += 1
                try:
                    status, headers, body = stub.route(self.path)
                except Exception as exc:  # noqa: BLE001 - a stub bug is a 500, visible in the figures
                    status, headers, body = 500, {}, repr(exc).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        self.wfile.write(body)
                    except OSError:
                        pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.host = f"{address}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _put(self, media_type: str, data: bytes) -> Dict[str, Any]:
        digest = sha256(data)
        self.objects[digest] = (media_type, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, repo: str, tag: str) -> Tuple[str, bytes]:
        """The manifest of REPO:TAG (made on first use)."""
        if repo in self.pulled:
            config = self._put("application/vnd.oci.empty.v1+json", b"{}")
            layer = self._put(COMPAT_MEDIA_TYPE, self.specs[repo])
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": COMPAT_MEDIA_TYPE,
                        "config": config, "layers": [layer]}
        else:
            config = self._put("application/vnd.oci.image.config.v1+json",
                               json.dumps({"architecture": "amd64", "os": "linux", "repo": repo}).encode())
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
        data = json.dumps(manifest).encode()
        return OCI_MANIFEST, data

    def referrers(self, repo: str, subject: str, page: int, query: str) -> Tuple[Dict[str, str], bytes]:
        entries: List[Dict[str, Any]] = []
        headers = {"Content-Type": OCI_INDEX}
        base = f"/v2/{repo}/referrers/{subject}?artifactType={NFD_ARTIFACT_TYPE.replace('/', '%2F')}"
        spec = self.specs.get(repo, self.default_spec)
        if self.mode == "endless":  # the same attached spec listed on every page
            entries = [self.attached(repo, subject, spec)] if spec is not None else [
                {"mediaType": OCI_MANIFEST, "artifactType": NFD_ARTIFACT_TYPE, "size": 300,
                 "digest": sha256(f"{repo}{subject}{page}".encode())}]
            headers["Link"] = f'<{base}&page={page + 1}>; rel="next"'
        elif self.mode == "big":
            if page < 16:
                if page not in self._pages:
                    pad = "x" * max(0, self.page_bytes - 400)
                    self._pages[page] = json.dumps([{
                        "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
                        "size": 300, "digest": sha256(b"%d" % page), "annotations": {"pad": pad}}]).encode()
                body = (b'{"schemaVersion":2,"mediaType":"%s","manifests":' % OCI_INDEX.encode()
                        + self._pages[page] + b"}")
                if page < 15:
                    headers["Link"] = f'<{base}&page={page + 1}>; rel="next"'
                return headers, body
        elif spec is not None and repo not in self.pulled:
            entries = [self.attached(repo, subject, spec)]
        return headers, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()

    def attached(self, repo: str, subject: str, spec: bytes) -> Dict[str, Any]:
        """The descriptor of an artifact attaching `spec` to the image `subject` (stored, so it can be fetched)."""
        layer = self._put(NFD_SPEC_MEDIA_TYPE, spec)
        config = self._put("application/vnd.oci.empty.v1+json", b"{}")
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": NFD_ARTIFACT_TYPE,
                               "config": config, "layers": [layer],
                               "subject": {"mediaType": OCI_MANIFEST, "digest": subject,
                                           "size": len(self.image(repo, "")[1])}}).encode()
        return dict(self._put(OCI_MANIFEST, manifest), artifactType=NFD_ARTIFACT_TYPE)

    def route(self, path: str) -> Tuple[int, Dict[str, str], bytes]:
        if self.mode == "503":
            return 503, {"Retry-After": "0", "Content-Type": "application/json"}, \
                b'{"errors":[{"code":"UNAVAILABLE","message":"try again"}]}'
        path, _, query = path.partition("?")
        if path == "/v2/" or path == "/v2":
            return 200, {"Content-Type": "application/json"}, b"{}"
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs|referrers)/([^/]+)", path)
        if not match:
            return 404, {}, b'{"errors":[{"code":"NOT_FOUND"}]}'
        repo, kind, ref = match.groups()
        if kind == "referrers":
            number = re.search(r"(?:^|&)page=(\d+)", query)
            page = int(number[1]) if number else 0
            headers, body = self.referrers(repo, ref, page, query)
            return 200, headers, body
        if ref.startswith("sha256:"):
            found = self.objects.get(ref)
            if found is None:
                return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
            return 200, {"Content-Type": found[0], "Docker-Content-Digest": ref}, found[1]
        media_type, data = self.image(repo, ref)
        self._put(media_type, data)
        return 200, {"Content-Type": media_type, "Docker-Content-Digest": sha256(data)}, data

    def count(self) -> int:
        with self.lock:
            return self.requests

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


MISFIT_SPEC = json.dumps({"version": "v1alpha1", "compatibilities": [{"tag": "never:1", "rules": [{"matchFeatures": [
    {"matchExpressions": [{"op": "In", "key": "feature.node.ocifit-k8s.flavor", "value": ["never"]}]}]}]}]}).encode()
# attached to a candidate, it fits no node: the next candidate is tried


def registry_flags(stubs: Sequence[OciStub]) -> List[Tuple[str, str]]:
    """--insecure-registry and --allowed-registries for each stub (the flags repeat; the defaults stay)."""
    return [(flag, s.host) for s in stubs for flag in ("--insecure-registry", "--allowed-registries")]


# ---- (d) regular expressions that freeze a backtracking engine ---------------------------------------------

REGEX_VARIANTS = [  # label, pattern, the node label it is tested against
    ("`.?`x40 + Z", ".?" * 40 + "Z", "kubernetes.io/hostname"),
    ("`.{0,9}`x20 + Z", ".{0,9}" * 20 + "Z", "example.com/pad"),
    ("`(a|a)?`x30 + Z", "(a|a)?" * 30 + "Z", "example.com/pad"),
    ("`(a?){30}a{30}Z` nested", "(a?){30}a{30}Z", "example.com/pad"),
    ("`(a|a)*Z` (a heuristic's)", "(a|a)*Z", "example.com/pad"),
]
PAD_LENGTHS = (13, 256, 1024)  # example.com/pad on the three workers: "a" repeated


def regex_freeze(env: Env, version: Version) -> List[Row]:
    doc = json.loads((EXAMPLE / "nodes-homogeneous.json").read_text())
    workers = [n for n in doc["items"] if not (n.get("spec") or {}).get("taints")]
    for node, length in zip(workers, PAD_LENGTHS):
        node["metadata"]["labels"]["example.com/pad"] = "a" * length
    nodes_path = env.work / "d-nodes.json"
    nodes_path.write_text(json.dumps(doc))
    rows: List[Row] = []
    stub = OciStub("127.0.0.45")  # the specs come from a registry: a spec refused is a denial, not a failed start
    for i, (_, pattern, key) in enumerate(REGEX_VARIANTS):
        stub.specs[f"regex{i}"] = json.dumps({"version": "v1alpha1", "compatibilities": [{
            "tag": "hostile:1", "rules": [{"matchFeatures": [{"matchExpressions": [
                {"op": "InRegexp", "key": key, "value": [pattern]}]}]}]}]}).encode()
        stub.pulled.add(f"regex{i}")
    for i, (label, _, _) in enumerate(REGEX_VARIANTS):
        ref = f"{stub.host}/regex{i}:v1"
        server = Served(env, version, f"d-regex-{i}", replace={"--nodes": str(nodes_path)},
                        add=registry_flags([stub]))
        try:
            warm_up(env, server)
            health, good = watched(env, server)
            time.sleep(0.5)
            body, uid = review(f"regex-{i}", ref=ref)
            outcome, took, cpu = post_timed(env, server, body, uid)
            hung = outcome.startswith("no answer")
            if hung:
                server.kill()  # frozen in C: the pollers' requests fail from here on
            else:
                time.sleep(0.5)
            health.finish()
            good.finish()
        finally:
            server.stop()
        values = "hostnames" if key == "kubernetes.io/hostname" else "a*13..1024"
        rows += [(f"{label} vs {values}", f"answered, <= {CPU_TARGET:g}s CPU",
                  f"{outcome[:40]}, {cpu:.2f}s CPU" + (" (killed)" if hung else ""),
                  not hung and cpu <= CPU_TARGET),
                 ("  /healthz every 50 ms", f"max <= {HEALTHZ_TARGET * 1e3:.0f} ms", health.figures(),
                  health.worst() <= HEALTHZ_TARGET and not health.failures),
                 ("  good admissions every 0.2 s", "", good.figures(), None)]
    stub.stop()
    return rows


# ---- (e) CPU per admission: a spec of 10,000 matchName terms, and pin mode ---------------------------------

def heavy_spec(kinds: List[Dict[str, Any]], terms: int = 10000) -> bytes:
    """NFD's dialect (as JSON: YAML this size passes a YAML parser's node limit): one rule of `terms` matchName
    InRegexp terms on kernel.config, each matching only the element name that sorts last in every kind (so every
    term holds, and each scans every name): exactly the 10,000 expressions ab5b346 allows."""
    common = set.intersection(*(set(k["attributes"]["kernel.config"]["elements"]) for k in kinds))
    last = max(common)
    terms_ = [{"feature": "kernel.config", "matchName": {"op": "InRegexp", "value": [f"^{last}$|^q{i:05d}"]}}
              for i in range(terms)]
    return json.dumps({"version": "v1alpha1", "compatibilities": [
        {"tag": "heavy:1", "rules": [{"name": "heavy", "matchFeatures": terms_}]}]}, separators=(",", ":")).encode()


def kube_flags(api: Any, env: Env, token: Path) -> List[Tuple[str, str]]:
    return [("--kube-api", api.url), ("--kube-token-file", str(token)), ("--kube-ca", str(env.certs["ca"]))]


def cpu_per_admission(env: Env, version: Version) -> List[Row]:
    import nodefeatures as nf
    kinds = nf.hardware_kinds()
    stub = OciStub("127.0.0.46")
    stub.specs["heavy"] = heavy_spec(kinds)
    stub.pulled.add("heavy")
    spec_size = len(stub.specs["heavy"])
    api = t.FakeKubeAPI(env.certs)
    nf.load_cluster(api, 40, False)  # 2 nodes of each of the 20 kinds
    token = env.work / "e-token"
    token.write_text(api.token)
    ref = f"{stub.host}/heavy:v1"
    replace: Dict[str, Optional[str]] = {"--nodes": None}
    add = kube_flags(api, env, token) + registry_flags([stub])
    rows: List[Row] = []

    def pinned(i: int) -> Tuple[bytes, str]:
        return pod_review(f"heavy-{i}", {IMAGE_REF_ANNOTATION: ref},
                          spec={"nodeSelector": {nf.KIND_LABEL: kinds[i % nf.KINDS]["type"]}})
    try:
        server = Served(env, version, "e-one", replace=replace, add=add)
        try:
            warm_up(env, server)
            body, uid = pinned(0)
            outcome, took, cpu = post_timed(env, server, body, uid)
            hung = outcome.startswith("no answer")
            if hung:
                server.kill()
        finally:
            server.stop()
        rows.append((f"{spec_size / 1024:,.0f} KiB spec, 10,000 matchName terms", f"<= {CPU_TARGET:g}s CPU",
                     f"{outcome[:36]}, {cpu:.1f}s CPU" + (" (killed)" if hung else ""), cpu <= CPU_TARGET))
        rows.append(("  (one node kind, 40 nodes with NFD features)", "", f"{took:.1f}s", None))

        server = Served(env, version, "e-eight", replace=replace, add=add)
        try:
            warm_up(env, server)
            health, good = watched(env, server, healthz_interval=0.1)
            time.sleep(0.5)
            results: List[Tuple[str, float]] = []
            cpu = server.cpu()

            def hostile(i: int) -> None:
                body, uid = pinned(i)
                status, data, took, error = request(server.port, env.context, "POST", "/mutate", body,
                                                    timeout=SCENARIO_CAP)
                results.append((outcome_of(status, data, uid, error, took, SCENARIO_CAP), took))
            threads = [threading.Thread(target=hostile, args=(i,), daemon=True) for i in range(1, 9)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=SCENARIO_CAP + 5)
            used = server.cpu() - cpu
            health.finish()
            good.finish()
            hung = any(r[0].startswith("no answer") for r in results) or len(results) < 8
            if hung:
                server.kill()
        finally:
            server.stop()
        outcomes = collections.Counter(r[0].split(":")[0] for r in results)
        rows += [("8 in flight (8 kinds): replies", "",
                  ", ".join(f"{n} {o}" for o, n in outcomes.most_common()) or "-", None),
                 ("  server CPU while they ran / 8", f"<= {CPU_TARGET:g}s each", f"{used / 8:.1f}s"
                  + (f" (capped at {SCENARIO_CAP:g}s, killed)" if hung else ""), used / 8 <= CPU_TARGET and not hung),
                 ("  good admissions every 0.2 s", "p99 <= 250 ms", good.figures(),
                  good.p99() <= 0.25 and not good.failures),
                 ("  /healthz every 0.1 s", "max <= 500 ms", health.figures(),
                  health.worst() <= 0.5 and not health.failures)]
    finally:
        api.stop()
        stub.stop()

    # pin mode: 2,000 label-only nodes of three flavors (they disagree), a pod with 20,000 matchFields
    doc = json.loads((EXAMPLE / "nodes-homogeneous.json").read_text())
    template = next(n for n in doc["items"] if not (n.get("spec") or {}).get("taints"))
    items = []
    for i in range(2000):
        node = json.loads(json.dumps(template))
        name = f"pin-{i:04d}"
        node["metadata"]["name"] = node["metadata"]["labels"]["kubernetes.io/hostname"] = name
        node["metadata"]["labels"]["feature.node.ocifit-k8s.flavor"] = ("vanilla", "chocolate", "strawberry")[i % 3]
        items.append(node)
    nodes_path = env.work / "e-pin-nodes.json"
    nodes_path.write_text(json.dumps(dict(doc, items=items)))
    requirements = [{"key": "metadata.name", "operator": "NotIn", "values": [f"absent-{i:05d}"]} for i in range(20000)]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": requirements}]}}}
    server = Served(env, version, "e-pin", replace={"--nodes": str(nodes_path)},
                    add=[("--on-disagreement", "pin")])
    try:
        warm_up(env, server)
        figures, hung = [], False
        for attempt in range(3):
            body, uid = pod_review(f"pin-{attempt}", {"oci.image.compatibilities.selection/on-disagreement": "pin"},
                                   spec={"affinity": affinity})
            outcome, took, cpu = post_timed(env, server, body, uid)
            figures.append((outcome, cpu))
            if outcome.startswith("no answer"):
                hung = True
                server.kill()
                break
    finally:
        server.stop()
    rows.append(("pin: 2,000 nodes x 20,000 matchFields", f"<= {CPU_TARGET:g}s CPU each",
                 " / ".join(f"{cpu:.1f}" for _, cpu in figures) + "s CPU" + (" (killed)" if hung else ""),
                 all(cpu <= CPU_TARGET for _, cpu in figures) and not hung))
    rows.append((f"  review {size(len(body))}: replies", "", figures[0][0][:33] if figures else "-", None))
    return rows


# ---- (f) memory of specs: 22 distinct ~1 MiB specs ---------------------------------------------------------

def many_pattern_spec(i: int, limit: int = 1024 * 1024 - 64) -> bytes:
    """ocifit's dialect: 73 InRegexp expressions of 1,000 short patterns each (73,000), distinct per i, <= limit."""
    expressions = [{"op": "InRegexp", "key": f"example.com/k{j}",
                    "value": [f"^{i}_{j}_{v}$" for v in range(1000)]} for j in range(73)]
    data = json.dumps({"version": "v1alpha1", "compatibilities": [{"tag": f"spec{i}:1", "rules": [
        {"matchFeatures": [{"matchExpressions": expressions}]}]}]}, separators=(",", ":")).encode()
    assert len(data) <= limit, len(data)
    return data


def spec_memory(env: Env, version: Version) -> List[Row]:
    stub = OciStub("127.0.0.40")
    for i in range(22):
        stub.specs[f"spec{i}"] = many_pattern_spec(i)
        stub.pulled.add(f"spec{i}")
    try:
        server = Served(env, version, "f-specs", add=registry_flags([stub]))
        try:
            warm_up(env, server)
            time.sleep(1.0)
            baseline = server.status()["VmRSS"]
            reset_peak(server.pid)
            outcomes: "collections.Counter[str]" = collections.Counter()
            started = time.monotonic()
            for i in range(22):
                body, uid = review(f"spec-{i}", ref=f"{stub.host}/spec{i}:v1")
                outcome, _, _ = post_timed(env, server, body, uid, cap=30)
                outcomes[re.sub(r"127\.0\.0\.\d+:\d+/spec\d+:v1", "REF", outcome)[:60]] += 1
            took = time.monotonic() - started
            peak = server.status()["VmHWM"]
            time.sleep(env.args.settle)
            after = server.status()["VmRSS"]
        finally:
            server.stop()
    finally:
        stub.stop()
    size_each = len(stub.specs["spec0"])
    return [(f"22 x {size(size_each)} specs (73,000 patterns)", "", f"{sum(outcomes.values())} posted in {took:.1f}s",
             None),
            ("  replies", "", "; ".join(f"{n} x {o}" for o, n in outcomes.most_common(2))[:60], None),
            ("  RSS baseline", "", f"{mb(baseline):.0f} MB", None)] + memory_rows("  ", baseline, peak, after,
                                                                                    env.args.settle)


# ---- (g) NodeFeature churn -------------------------------------------------------------------------------

def churn_feature(node: str, round_: int) -> Dict[str, Any]:
    """One NodeFeature of 5,000 attributes (~534 KB of JSON), every value new in each round."""
    elements = {f"attr.{j:04d}.{'x' * 56}": f"{round_:04d}-{j:04d}-" + os.urandom(12).hex() for j in range(5000)}
    return t.node_feature(node, {"attributes": {"bench.churn": {"elements": elements}}})


def small_cluster(api: Any, names: Sequence[str], features: Dict[str, Dict[str, Any]],
                  extra: Sequence[Dict[str, Any]] = ()) -> None:
    """Label-only nodes and their NodeFeatures, put in the API double before anyone lists them."""
    with api.cond:
        for name in names:
            api.rv += 1
            api.nodes[name] = {"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": name, "resourceVersion": str(api.rv), "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
                "spec": {}}
        for obj in [t.node_feature(name, features[name]) for name in names if name in features] + list(extra):
            api.rv += 1
            obj["metadata"]["resourceVersion"] = str(api.rv)
            api.features[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj


def node_feature_churn(env: Env, version: Version) -> List[Row]:
    api = t.FakeKubeAPI(env.certs)
    small = {"attributes": {"kernel.version": {"elements": {"major": "6", "full": "6.8.0"}}}}
    small_cluster(api, ["churn-0", "churn-1", "churn-2"], dict.fromkeys(["churn-1", "churn-2"], small))
    token = env.work / "g-token"
    token.write_text(api.token)
    try:
        server = Served(env, version, "g-churn", replace={"--nodes": None}, add=kube_flags(api, env, token))
        try:
            warm_up(env, server)
            time.sleep(1.0)
            baseline = server.status()["VmRSS"]
            reset_peak(server.pid)
            started = time.monotonic()
            first = churn_feature("churn-0", 0)
            api.add_features(first)
            for k in range(1, 201):
                api.add_features(churn_feature("churn-0", k))
            api.delete_features("node-feature-discovery", "churn-0")
            wait_idle(server.pid, 120)
            took = time.monotonic() - started
            peak = server.status()["VmHWM"]
            time.sleep(env.args.settle)
            after = server.status()["VmRSS"]
            warm_up(env, server)  # still answering
        finally:
            server.stop()
    finally:
        api.stop()
    return [(f"{size(len(json.dumps(first)))} NodeFeature, 200 MODIFIED + DELETE", "",
             f"absorbed in {took:.1f}s", None),
            ("  RSS baseline", "", f"{mb(baseline):.0f} MB", None)] + memory_rows("  ", baseline, peak, after,
                                                                                    env.args.settle)


# ---- (h) concurrent referrer pages -----------------------------------------------------------------------

def referrer_pages(env: Env, version: Version) -> List[Row]:
    stub = OciStub("127.0.0.41", mode="big", page_bytes=4 * MiB - 4096)
    try:
        server = Served(env, version, "h-pages", add=registry_flags([stub]))
        try:
            warm_up(env, server)
            time.sleep(1.0)
            baseline = server.status()["VmRSS"]
            reset_peak(server.pid)
            bodies = []
            for i in range(80):
                body, uid = pod_review(f"pages-{i}", {CANDIDATES_ANNOTATION: f"{stub.host}/img{i}:v1"}, ref=None)
                bodies.append((body, uid, 0))
            before = stub.count()
            started = time.monotonic()
            done, results = burst(env, server.port, bodies)
            took = time.monotonic() - started
            peak = server.status()["VmHWM"]
            time.sleep(env.args.settle)
            after = server.status()["VmRSS"]
        finally:
            server.stop()
    finally:
        stub.stop()
    return [("80 admissions x 16 pages of ~4 MiB", "", f"{done}/80 answered in {took:.1f}s, "
             f"{stub.count() - before} reqs", None),
            ("  RSS baseline", "", f"{mb(baseline):.0f} MB", None)] + memory_rows("  ", baseline, peak, after,
                                                                                    env.args.settle)


# ---- (i) registry requests per admission -----------------------------------------------------------------

def registry_requests(env: Env, version: Version) -> List[Row]:
    rows: List[Row] = []
    stub = OciStub("127.0.0.42", mode="503")
    try:
        server = Served(env, version, "i-503", add=registry_flags([stub]))
        try:
            warm_up(env, server)
            body, uid = review("busy", ref=f"{stub.host}/app:v1")
            outcome, took, cpu = post_timed(env, server, body, uid)
            time.sleep(0.5)
            count = stub.count()
        finally:
            server.stop()
    finally:
        stub.stop()
    rows += [("503 Retry-After: 0, one admission", "<= 128 requests", f"{count:,} requests", count <= 128),
             ("  reply / time / server CPU", "", f"{outcome[:14]}, {took:.1f}s, {cpu:.2f}s CPU", None)]
    stubs = [OciStub(f"127.0.0.{50 + i}", mode="endless") for i in range(16)]
    for stub in stubs:
        stub.default_spec = MISFIT_SPEC
    try:
        server = Served(env, version, "i-endless", add=registry_flags(stubs))
        try:
            warm_up(env, server)
            images = ",".join(f"{s.host}/app{i}:v1" for i, s in enumerate(stubs))
            body, uid = pod_review("endless-pages", {CANDIDATES_ANNOTATION: images}, ref=None)
            outcome, took, cpu = post_timed(env, server, body, uid)
            time.sleep(0.5)
            count = sum(s.count() for s in stubs)
        finally:
            server.stop()
    finally:
        for stub in stubs:
            stub.stop()
    rows += [("16 candidates on 16 hosts, endless pages", "<= 128 requests", f"{count:,} requests", count <= 128),
             ("  reply / time / server CPU", "", f"{outcome[:14]}, {took:.1f}s, {cpu:.2f}s CPU", None)]
    return rows


# ---- (j) stale-if-error under a tenant's junk --------------------------------------------------------------

def stale_under_junk(env: Env, version: Version) -> List[Row]:
    good = OciStub("127.0.0.43")
    good.specs["b"] = (EXAMPLE / "compatibility-test.json").read_bytes()
    junk = OciStub("127.0.0.44")
    junk.default_spec = MISFIT_SPEC  # so each of a pod's 16 junk candidates is looked up
    image_b = f"{good.host}/b:v1"
    try:
        server = Served(env, version, "j-stale", add=registry_flags([good, junk]) + [("--tag-ttl", "1")])
        try:
            warm_up(env, server)
            steps = []

            def pod_b(step: str) -> str:
                body, uid = pod_review(f"b-{step}", {CANDIDATES_ANNOTATION: image_b}, ref=None)
                outcome, _, _ = post_timed(env, server, body, uid)
                steps.append(outcome)
                return outcome
            first = pod_b("cached")
            good.stop()
            time.sleep(1.5)  # past --tag-ttl: the tag must be asked again, and the registry is gone
            stale = pod_b("stale")
            pending = collections.deque(range(70))
            lock = threading.Lock()
            junk_outcomes: "collections.Counter[str]" = collections.Counter()

            def tenant() -> None:
                while True:
                    with lock:
                        if not pending:
                            return
                        p = pending.popleft()
                    images = ",".join(f"{junk.host}/junk{p}-{c}:v1" for c in range(16))
                    body, uid = pod_review(f"junk-{p}", {CANDIDATES_ANNOTATION: images}, namespace="tenant-junk",
                                           ref=None)
                    outcome, _, _ = post_timed(env, server, body, uid, cap=30)
                    with lock:
                        junk_outcomes[outcome.split(":")[0]] += 1
            started = time.monotonic()
            workers = [threading.Thread(target=tenant, daemon=True) for _ in range(4)]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join(timeout=120)
            took = time.monotonic() - started
            time.sleep(1.5)
            last = pod_b("after")
        finally:
            server.stop()
    finally:
        junk.stop()
    return [("B cached, then B's registry down: B's pod", "allowed (stale)", f"{first[:9]}, then {stale[:20]}",
             stale == "allowed"),
            ("70 tenant pods, 1,120 junk candidates", "",
             ", ".join(f"{n} {o}" for o, n in junk_outcomes.most_common()) + f" in {took:.0f}s", None),
            ("B's next pod", "allowed (stale)", last[:33], last == "allowed")]


# ---- (k) NodeFeatures from other namespaces ----------------------------------------------------------------

K_SPEC = """\
version: v1alpha1
compatibilities:
  - tag: app:avx2
    weight: 10
    rules:
      - name: avx2
        matchFeatures:
          - feature: cpu.cpuid
            matchExpressions:
              AVX2: {op: Exists}
  - tag: app:generic
    weight: 1
    rules:
      - name: any
        matchFeatures:
          - feature: kernel.version
            matchExpressions:
              major: {op: Exists}
"""


def foreign_node_features(env: Env, version: Version) -> List[Row]:
    api = t.FakeKubeAPI(env.certs)
    kernel = {"kernel.version": {"elements": {"major": "6", "full": "6.8.0"}}}
    features = {"w1": {"flags": {"cpu.cpuid": {"elements": {"AVX": {}, "AVX2": {}}}}, "attributes": kernel},
                "w2": {"flags": {"cpu.cpuid": {"elements": {"AVX": {}}}}, "attributes": kernel}}
    tenant = t.node_feature("w2", {"flags": {"cpu.cpuid": {"elements": {"AVX2": {}}}}}, name="w2-boost",
                            namespace="tenant-a")
    small_cluster(api, ["w1", "w2"], features, [tenant])
    token = env.work / "k-token"
    token.write_text(api.token)
    spec_path = env.work / "k-spec.yaml"
    spec_path.write_text(K_SPEC)
    ref = "example.com/k/app:1"
    known = "--node-feature-namespaces" in version.flags
    try:
        server = Served(env, version, "k-namespaces", replace={"--nodes": None, "--log-level": "info"},
                        add=kube_flags(api, env, token) + [("--artifact", f"{ref}={spec_path}"),
                                                           ("--node-feature-namespaces", "node-feature-discovery")])
        try:
            def image_on(node: str) -> str:
                body, uid = pod_review(f"on-{node}", {IMAGE_REF_ANNOTATION: ref},
                                       spec={"nodeSelector": {"kubernetes.io/hostname": node}})
                status, data, took, error = request(server.port, env.context, "POST", "/mutate", body)
                response = answered(status, data, uid)
                if response and response.get("allowed") and response.get("patch"):
                    return str(t.patch_of(response)[0]["value"])
                return outcome_of(status, data, uid, error, took, API_SERVER_TIMEOUT)
            on_w1, on_w2 = image_on("w1"), image_on("w2")
            time.sleep(0.5)
            _, offset = server.log_size()
            changed = copy_feature(api.features[("node-feature-discovery", "w2")])
            changed["spec"]["features"]["flags"]["cpu.cpuid"]["elements"]["SSE4"] = {}
            api.add_features(changed)
            time.sleep(2.0)
            lines = [line for line in server.log.read_bytes()[offset:].decode("utf-8", "replace").splitlines()
                     if re.search(r"\bw2\b", line)]
        finally:
            server.stop()
    finally:
        api.stop()
    return [("w2's image (tenant-a object adds AVX2)", "app:generic", f"{on_w2[:33]}", on_w2 == "app:generic"),
            ("  w1's image (AVX2 its own) / ns flag", "", f"{on_w1[:20]} / " + ("passed" if known else "unknown"),
             None),
            ("w2's features change: log naming w2", ">= 1 line", f"{len(lines)} line(s)", bool(lines)),
            ("  the line", "", (lines[0].strip() if lines else "-")[:33], None)]


def copy_feature(obj: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(obj))


# ---- running and printing ---------------------------------------------------------------------------

SCENARIOS: List[Tuple[str, str, Callable[[Env, Version], List[Row]]]] = [
    ("a", "(a1) connection exhaustion: slowloris, {n:,} conns from 127.0.0.1, headers a byte every 2 s",
     lambda env, v: exhaustion(env, v, "slowloris")),
    ("a", "(a2) connection exhaustion: no-hello, {n:,} TCP conns from 127.0.0.1, never a ClientHello",
     lambda env, v: exhaustion(env, v, "no-hello")),
    ("a", "(a3) connection exhaustion: idle-tls, {n:,} conns from 127.0.0.1, TLS done then nothing",
     lambda env, v: exhaustion(env, v, "idle-tls")),
    ("b", "(b) memory: 12 x 3 MB reviews, a 110,000-key nodeSelector, 48 x 3 MB at once (twice)", memory),
    ("c", "(c1) failed fetches: a registry streaming an endless manifest", endless),
    ("c", "(c2) failed fetches: a registry dripping its response headers a byte a second", drip),
    ("d", "(d) regex freeze: one InRegexp pattern that backtracks, /healthz and good admissions meanwhile",
     regex_freeze),
    ("e", "(e) CPU per admission: 10,000 matchName terms (one, then 8 in flight); pin mode x 20,000 matchFields",
     cpu_per_admission),
    ("f", "(f) memory of specs: 22 distinct ~1 MiB specs, one pod each", spec_memory),
    ("g", "(g) NodeFeature churn: 200 x MODIFIED of one 534 KB NodeFeature, then DELETED", node_feature_churn),
    ("h", "(h) concurrent referrer pages: 80 admissions, 16 pages of ~4 MiB each", referrer_pages),
    ("i", "(i) registry requests per admission: 503 Retry-After 0; 16 registries of endless pages",
     registry_requests),
    ("j", "(j) stale-if-error under a tenant's junk: B's registry down, 1,120 junk candidates", stale_under_junk),
    ("k", "(k) NodeFeatures from other namespaces: tenant-a's object for w2", foreign_node_features),
]


def print_table(title: str, versions: List[Version], rows: Dict[str, List[Row]]) -> None:
    width, column = 41, 33
    print(f"\n{title}")
    print((f"  {'':{width}} {'target':20}" + "".join(f" {v.label[:column]:{column}}" for v in versions)).rstrip())
    first = next(iter(rows.values()))
    for i, (label, target, _, _) in enumerate(first):
        cells = []
        for version in versions:
            got = rows.get(version.label) or []
            if i < len(got):
                _, _, figure, ok = got[i]
                mark = "  PASS" if ok is True else "  MISS" if ok is False else ""
                cells.append(f" {(figure + mark):{column}}")
            else:
                cells.append(f" {'(failed)':{column}}")
        print(f"  {label:{width}} {target:20}" + "".join(cells).rstrip())
    sys.stdout.flush()


def check_source_binding() -> None:
    """The good client's 127.0.0.2 must reach a 127.0.0.1 listener and be seen as 127.0.0.2."""
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as client:
        client.bind((GOOD_SOURCE, 0))
        client.connect(listener.getsockname())
        peer, _ = listener.accept()
        with peer:
            seen = peer.getpeername()[0]
    if seen != GOOD_SOURCE:
        raise SystemExit(f"a socket bound to {GOOD_SOURCE} reached 127.0.0.1 as {seen}; the scenario needs two "
                         "client addresses")


def main() -> int:
    global BIG_PODS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", help="also run git show REV:ocifit.py (e.g. HEAD), side by side")
    parser.add_argument("--ocifit", type=Path, help="the ocifit.py to measure (default: the working tree's)")
    parser.add_argument("--only", default="a,b,c,d,e,f,g,h,i,j,k",
                        help="scenarios to run, comma-separated: a to k")
    parser.add_argument("--connections", type=int, default=1100, help="attacker connections in (a)")
    parser.add_argument("--attack-seconds", type=float, default=20.0, help="seconds the good client posts in (a)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between the good client's posts")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after an attack before the after figures")
    parser.add_argument("--fetch-budget", type=float, default=8.0, help="--fetch-budget passed to serve")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    fd_limit = raise_fd_limit()
    if fd_limit < args.connections + 200:
        raise SystemExit(f"open-file limit {fd_limit} is too low for {args.connections} connections")
    check_source_binding()
    work = workdir()
    versions: List[Version] = []
    stub = None
    failures: List[str] = []
    tallies: Dict[str, collections.Counter] = {}
    misses: Dict[str, List[str]] = collections.defaultdict(list)
    try:
        if args.baseline:
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:ocifit.py"], capture_output=True,
                                   timeout=60)
            if shown.returncode != 0:
                raise SystemExit(f"git show {args.baseline}:ocifit.py: {shown.stderr.decode().strip()}")
            old = work / "baseline" / "ocifit.py"
            old.parent.mkdir()
            old.write_bytes(shown.stdout)
            versions.append(version_of(f"{args.baseline} (baseline)", old))
        if args.ocifit:
            versions.append(version_of(args.ocifit.name, args.ocifit.resolve()))
        else:
            versions.append(version_of("working tree", ROOT / "ocifit.py"))
        certs = pki(work)
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        stub = StubRegistry()
        env = Env(work, certs, context, stub, args)
        print(f"attack benchmark: CPython {sys.version.split()[0]}, {os.cpu_count()} cores, "
              f"open-file limit {fd_limit}, good client from {GOOD_SOURCE} (verified), attacker from 127.0.0.1, "
              f"stub registry {stub.host}, --fetch-budget {args.fetch_budget:g}")
        for version in versions:
            unknown = [f for f in ("--insecure-registry", "--allowed-registries", "--fetch-budget")
                       if f not in version.flags]
            print(f"  {version.label}: {version.script}" + (f" (takes no {', '.join(unknown)})" if unknown else ""))
        sys.stdout.flush()
        for key, title, run in SCENARIOS:
            if key not in only:
                continue
            if key == "b" and BIG_PODS is None:
                BIG_PODS = BigPods()
            rows: Dict[str, List[Row]] = {}
            for version in versions:
                print(f"... {title.format(n=args.connections).split(':')[0]} against {version.label}",
                      file=sys.stderr, flush=True)
                try:
                    rows[version.label] = run(env, version)
                except Exception as exc:  # noqa: BLE001 - report, go on with the rest
                    failures.append(f"{title.split(' ')[0]} {version.label}: {type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300])
                    traceback.print_exc()
                    rows[version.label] = []
            if not any(rows.values()):
                print(f"\n{title.format(n=args.connections)}\n  (run failed)")
                continue
            print_table(title.format(n=args.connections), versions, rows)
            for version in versions:
                tally = tallies.setdefault(version.label, collections.Counter())
                parent = ""
                for label, _, _, ok in rows.get(version.label, []):
                    if not label.startswith(" "):
                        parent = label
                    if ok is not None:
                        tally["PASS" if ok else "MISS"] += 1
                        if not ok:
                            name = label.strip() if label is parent else f"{parent}: {label.strip()}"
                            misses[version.label].append(f"{title.split(' ')[0]} {name}")
    finally:
        if stub is not None:
            stub.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\nsummary")
    for version in versions:
        tally = tallies.get(version.label, collections.Counter())
        print(f"  {version.label}: {tally['PASS']} PASS, {tally['MISS']} MISS")
        for miss in misses[version.label]:
            print(f"    MISS {miss}")
    for failure in failures:
        print(f"  RUN FAILED {failure} (traceback on stderr)")
    return 1 if failures else 0


BIG_PODS: Optional[BigPods] = None

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--attacker":  # the attacker process: stdlib only, no test imports
        sys.exit(attacker_main(sys.argv[2:]))
    # The benchmark proper; _support also puts the repository on sys.path (and imports the test helpers).
    from _support import EXAMPLE, ROOT, free_port, pki, proc_status, python, raise_fd_limit, reset_peak, stop, t, \
        workdir
    sys.exit(main())
