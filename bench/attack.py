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

    python3 bench/attack.py [--baseline REV] [--only a,b,c] [--connections 1100] [--attack-seconds 20]

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
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

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

    def __init__(self, env: Env, version: Version, name: str):
        self.env, self.version = env, version
        self.port = free_port()
        self.log = env.work / f"{re.sub(r'[^A-Za-z0-9]+', '-', version.label)}-{name}.log"
        flags = [("--bind", "127.0.0.1"), ("--port", str(self.port)), ("--cert", str(env.certs["crt"])),
                 ("--key", str(env.certs["key"])), ("--nodes", str(EXAMPLE / "nodes-homogeneous.json")),
                 ("--artifact", f"{LOCAL_REF}={EXAMPLE / 'compatibility-test.json'}"),
                 ("--insecure-registry", env.stub.host), ("--allowed-registries", env.stub.host),
                 ("--fetch-budget", f"{env.args.fetch_budget:g}"), ("--log-level", "warning")]
        missing = [f for f in self.REQUIRED if f not in version.flags]
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
        self._ready(60.0)

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
    parser.add_argument("--only", default="a,b,c", help="scenarios to run, comma-separated: a, b, c")
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
    from _support import EXAMPLE, ROOT, free_port, pki, proc_status, python, raise_fd_limit, reset_peak, stop, \
        workdir
    sys.exit(main())
