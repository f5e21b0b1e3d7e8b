#!/usr/bin/env python3
"""Rollout: admissions lost when `serve` gets a SIGTERM under load, measured as the API server would see them.

Four clients that behave as Go's http.Transport does (client-go's webhook client: persistent HTTPS keep-alive
connections, no reuse after `Connection: close`, a non-blocking peek before reusing an idle connection, and no
retry of a POST once its bytes are written) post example/reviews/pod.json as fast as they can to a live
`serve` on 127.0.0.1, its artifact answered from a local file (--artifact, no registry). About a second in,
`serve` gets a SIGTERM; each round is one SIGTERM of a fresh `serve`. Per SIGTERM it counts:

  sent        requests whose bytes were written;
  answered    of those, the ones that got a whole HTTP response;
  lost        written and never answered (by exception: RemoteDisconnected, ConnectionResetError, timeout...):
              each is a "failed calling webhook" in the API server, and with failurePolicy Fail a refused pod;
  refused     dials that failed (connection refused once `serve` stopped listening): not a loss, the request
              was never written and the API server would call another endpoint. A client stops at its first.

and checks the issue-22 drain: every request started within the first (drain delay - 0.5 s) after the SIGTERM
succeeds, those on new connections included (client 0 closes its idle connections every few requests, so it
dials fresh ones throughout); how long the process takes to exit; how soon /readyz answers 503 (a kubelet-like
probe on a new connection every 50 ms). `--drain-delay` is passed to the versions whose `serve --help` has it.

    cd bench && python rollout.py [--baseline REV] [--rounds 10] [--drain-delay 3]

--baseline REV (default HEAD; "" for none) also measures `git show REV:ocifit.py`, its rounds alternated with
the working tree's, and prints both side by side (--ocifit PATH measures another file than the working tree's
ocifit.py). Loopback only; about 1.5 minutes for 10 rounds of each on 2 cores. Needs openssl (certificates).
The exit status is the working tree's (or --ocifit's): 0 when it lost nothing and every request in the window
succeeded.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _support import EXAMPLE, free_port, pki, serve_command, serve_flags, stop, versions, wait_ready, workdir

LOCAL_REF = "ghcr.io/compspec/ocifit-k8s-compatibility:kind-example"  # served from --artifact, never fetched
API_SERVER_TIMEOUT = 10.0  # the webhook's timeoutSeconds in deploy.yaml: the client's whole-request timeout
CLIENTS = 4
CHURN_EVERY = 3  # client 0 closes its idle connections after every this many requests: fresh dials all along
PROBE_EVERY = 0.05
MAX_HEADER_LINE = 65536


# ---- a client as Go's net/http Transport behaves -----------------------------------------------------

class DialFailed(Exception):
    """The connection (TCP or TLS) could not be set up: nothing of the request was written."""


class Lost(Exception):
    """The request's bytes were written and no whole response came back; `cause` says what happened instead."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


@dataclass
class Reply:
    status: int
    headers: Dict[str, str]
    body: bytes
    fresh: bool  # sent on a connection dialled for it (not a reused idle one)


class _Conn:
    """One TLS connection with its own read buffer (so the idle check can see bytes the server sent)."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.buffer = bytearray()
        self.deadline = float("inf")  # the whole request's, as the API server's timeout is (set per request)

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(min(left, API_SERVER_TIMEOUT))
        data = self.sock.recv(65536)
        if not data:
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        self.buffer += data

    def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            self._fill()
        line = bytes(self.buffer[:end + 1])
        del self.buffer[:end + 1]
        return line

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            try:
                self._fill()
            except http.client.RemoteDisconnected:
                raise http.client.IncompleteRead(bytes(self.buffer), size - len(self.buffer)) from None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def server_closed(self) -> bool:
        """The non-blocking check Go makes before reusing an idle connection: anything readable on it (EOF, a
        reset, a TLS close_notify or stray bytes) means the server is done with it."""
        if self.buffer or self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)  # the underlying socket's descriptor
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class GoTransport:
    """An HTTPS client that behaves as Go's http.Transport (client-go's webhook client) does.

    - Persistent keep-alive connections, at most `max_idle` kept idle (a small pool; this client sends one
      request at a time, so it reuses one).
    - A connection is never reused after a response with `Connection: close`, nor after any error.
    - Before an idle connection is reused, a non-blocking check (select with zero timeout on the underlying
      socket, plus the TLS layer's pending bytes) finds whether the server has closed it; if so it is dropped
      and a new one dialled. That is not a retry: nothing had been written.
    - A POST whose bytes were written is never retried: any failure after that raises Lost. The one retry Go
      makes for a POST, when a reused connection fails before a byte is written, is made here too.
    - A failed dial raises DialFailed (not a loss: nothing was written)."""

    def __init__(self, port: int, context: ssl.SSLContext, server_name: str = "localhost", max_idle: int = 2,
                 timeout: float = API_SERVER_TIMEOUT):
        self.port, self.context, self.server_name = port, context, server_name
        self.max_idle, self.timeout = max_idle, timeout
        self.idle: List[_Conn] = []
        self.stale_found = 0  # idle connections the check found closed by the server

    def _dial(self) -> _Conn:
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        except OSError as exc:
            raise DialFailed(f"{type(exc).__name__}: {exc}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Go's default
            return _Conn(self.context.wrap_socket(raw, server_hostname=self.server_name))
        except (OSError, ValueError) as exc:
            raw.close()
            raise DialFailed(f"TLS {type(exc).__name__}: {exc}") from exc

    def _get(self) -> Tuple[_Conn, bool]:
        """An idle connection the server has not closed (most recently used first), else a new one."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.server_closed():
                return conn, False
            self.stale_found += 1
            conn.close()
        return self._dial(), True

    def _put(self, conn: _Conn) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def close_idle(self) -> None:
        """Go's CloseIdleConnections."""
        while self.idle:
            self.idle.pop().close()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Reply:
        """POST body; a Reply, or DialFailed (nothing written), or Lost (written, never answered)."""
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.server_name}:{self.port}\r\nUser-Agent: rollout-bench\r\n"
                   f"Content-Type: {content_type}\r\nAccept: application/json, */*\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        for attempt in range(2):
            conn, fresh = self._get()
            conn.deadline = time.monotonic() + self.timeout
            written = 0
            try:
                while written < len(request):
                    written += conn.sock.send(request[written:])
                reply = self._response(conn, fresh)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                if written == 0 and not fresh and attempt == 0:
                    continue  # Go's nothingWrittenError on a reused connection: the only retry it makes
                raise (DialFailed(f"write {type(exc).__name__}: {exc}") if written == 0 else Lost(exc)) from exc
            if reply.headers.get("connection", "").lower() == "close":
                conn.close()
            else:
                self._put(conn)
            return reply
        raise AssertionError("unreachable")

    @staticmethod
    def _response(conn: _Conn, fresh: bool) -> Reply:
        version, _, rest = conn.readline().decode("latin-1").partition(" ")
        if not version.startswith("HTTP/1."):
            raise http.client.BadStatusLine(version)
        status = int(rest.split(" ", 1)[0])
        headers: Dict[str, str] = {}
        while (line := conn.readline()) not in (b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        body = conn.read(int(headers.get("content-length", "0")))
        return Reply(status, headers, body, fresh)


# ---- one round: a fresh serve, four clients, one SIGTERM ---------------------------------------------

@dataclass
class Attempt:
    start: float  # seconds from the SIGTERM (negative: before it)
    outcome: str  # ok, bad (answered, but not a mutated admission), lost, refused
    fresh: bool = False
    error: str = ""


@dataclass
class RoundResult:
    attempts: List[Attempt] = field(default_factory=list)
    exit_s: Optional[float] = None  # SIGTERM to process exit; None: killed after the bound
    ready_503_s: Optional[float] = None  # SIGTERM to the first 503 from /readyz; None: never seen
    readyz_note: str = ""
    stale_found: int = 0
    returncode: Optional[int] = None
    bad_samples: List[str] = field(default_factory=list)  # the first answer that was not a mutated admission

    def count(self, *outcomes: str) -> int:
        return sum(1 for a in self.attempts if a.outcome in outcomes)


@dataclass
class Env:
    work: Path
    certs: Dict[str, Path]
    context: ssl.SSLContext
    args: argparse.Namespace
    body: str  # the review, with @UID@ where each request's uid goes


def review_template() -> str:
    """example/reviews/pod.json (opted in, image-ref served from --artifact) with a placeholder uid."""
    doc = json.loads((EXAMPLE / "reviews" / "pod.json").read_text())
    doc["request"]["uid"] = "@UID@"
    assert doc["request"]["object"]["metadata"]["annotations"]["oci.image.compatibilities.selection/image-ref"] \
        == LOCAL_REF
    return json.dumps(doc, separators=(",", ":"))


def mutated(reply: Reply, uid: str) -> bool:
    """A 200 AdmissionReview for this uid that allows the pod with a patch."""
    if reply.status != 200:
        return False
    try:
        response = json.loads(reply.body)["response"]
    except (ValueError, KeyError, TypeError):
        return False
    return response.get("uid") == uid and response.get("allowed") is True and bool(response.get("patch"))


def start_serve(env: Env, script: Path, label: str, number: int) -> Tuple[subprocess.Popen, int, Path]:
    """A fresh `serve` of one ocifit.py, ready; (process, port, log file)."""
    port = free_port()
    flags = [("--bind", "127.0.0.1"), ("--port", str(port)), ("--cert", str(env.certs["crt"])),
             ("--key", str(env.certs["key"])), ("--nodes", str(EXAMPLE / "nodes-homogeneous.json")),
             ("--artifact", f"{LOCAL_REF}={EXAMPLE / 'compatibility-test.json'}"), ("--log-level", "info"),
             ("--drain-delay", f"{env.args.drain_delay:g}")]
    command = serve_command(script, flags, required=("--bind", "--port", "--cert", "--key", "--nodes", "--artifact"))
    log = env.work / f"{''.join(c if c.isalnum() else '-' for c in label)}-{number}.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_ready(port, env.certs["ca"], seconds=60)
    except SystemExit:
        stop(process)
        raise SystemExit(f"{label} serve not ready: {log.read_text(errors='replace')[-800:]}") from None
    return process, port, log


def client(transport: GoTransport, env: Env, name: str, churn: int, halt: threading.Event, until: float,
           out: List[Attempt], samples: List[str]) -> None:
    """Post reviews back to back until halted, the time bound, or the first failed dial; the first answer that
    is not a mutated admission goes to samples."""
    for n in range(1, 1_000_000):
        if halt.is_set() or time.monotonic() > until:
            return
        uid = f"rollout-{name}-{n}"
        body = env.body.replace("@UID@", uid).encode()
        started = time.monotonic()
        try:
            reply = transport.post("/mutate", body)
            good = mutated(reply, uid)
            attempt = Attempt(started, "ok" if good else "bad", reply.fresh, "" if good else f"HTTP {reply.status}")
            if not good and not samples:
                samples.append(f"HTTP {reply.status} {reply.body[:300].decode(errors='replace')}")
        except DialFailed as exc:
            attempt = Attempt(started, "refused", True, str(exc).split(":")[0])
        except Lost as exc:
            attempt = Attempt(started, "lost", False, type(exc.cause).__name__)
        out.append(attempt)
        if attempt.outcome == "refused":
            return  # Go fails the dial; the API server's next call goes to another endpoint
        if churn and n % churn == 0:
            transport.close_idle()


def probe_readyz(port: int, context: ssl.SSLContext, since: float, until: float, result: RoundResult) -> None:
    """GET /readyz on a new connection every PROBE_EVERY s (as a kubelet does) until the first 503."""
    while time.monotonic() < until:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=1.0)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 503:
                result.ready_503_s = time.monotonic() - since
                return
        except (OSError, http.client.HTTPException) as exc:
            result.readyz_note = f"no 503 before {type(exc).__name__}"
            return
        finally:
            conn.close()
        time.sleep(PROBE_EVERY)
    result.readyz_note = "no 503 in time"


def one_round(env: Env, script: Path, label: str, number: int, warmup: float) -> RoundResult:
    """One fresh serve under four clients, SIGTERMed `warmup` seconds into the load."""
    args = env.args
    process, port, _ = start_serve(env, script, label, number)
    result = RoundResult()
    halt = threading.Event()
    until = time.monotonic() + warmup + args.drain_delay + 40  # no loop outlives this
    outs: List[List[Attempt]] = [[] for _ in range(CLIENTS)]
    transports = [GoTransport(port, env.context) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=client, args=(transports[i], env, f"{number}-{i}", CHURN_EVERY if i == 0 else 0,
                                                     halt, until, outs[i], result.bad_samples), daemon=True)
               for i in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(warmup)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        prober = threading.Thread(target=probe_readyz, args=(port, env.context, sigterm_at, until, result),
                                  daemon=True)
        prober.start()
        try:
            process.wait(timeout=max(1.0, until - time.monotonic() - API_SERVER_TIMEOUT - 5))
            result.exit_s = time.monotonic() - sigterm_at
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        result.returncode = process.returncode
        time.sleep(0.3)  # the clients meet the closed port
        halt.set()
        for thread in threads:
            thread.join(timeout=API_SERVER_TIMEOUT + 2)
        prober.join(timeout=2)
    finally:
        halt.set()
        if process.poll() is None:
            stop(process)
        for transport in transports:
            transport.close_idle()
    for out in outs:
        result.attempts += [Attempt(a.start - sigterm_at, a.outcome, a.fresh, a.error) for a in list(out)]
    result.stale_found = sum(t.stale_found for t in transports)
    return result


# ---- figures ---------------------------------------------------------------------------------------

def window_figures(rounds: List[RoundResult], window: float) -> Tuple[int, int, int, int, collections.Counter]:
    """Over the requests started within `window` s after each SIGTERM: (started, failed, started on new
    connections, failed on new connections, failures by kind)."""
    inside = [a for r in rounds for a in r.attempts if 0 <= a.start < window]
    failed = [a for a in inside if a.outcome != "ok"]
    kinds = collections.Counter(a.outcome if a.outcome == "refused" else f"{a.outcome} {a.error}" for a in failed)
    return (len(inside), len(failed), sum(a.fresh for a in inside), sum(a.fresh for a in failed), kinds)


def spread(values: List[Optional[float]], scale: float = 1.0, unit: str = "s") -> str:
    """median and max of the values seen, and how many were not."""
    seen = sorted(v * scale for v in values if v is not None)
    if not seen:
        return "never"
    digits = 0 if unit == "ms" else 2
    text = f"{seen[len(seen) // 2]:.{digits}f} / {seen[-1]:.{digits}f} {unit}"
    return text + (f" ({len(values) - len(seen)} never)" if len(seen) < len(values) else "")


def causes(counter: collections.Counter) -> str:
    return ", ".join(f"{name} {n}" for name, n in counter.most_common()) or "-"


def report(labels: List[str], results: Dict[str, List[RoundResult]], args: argparse.Namespace,
           drains: Dict[str, bool]) -> Dict[str, bool]:
    """Print the side-by-side table; whether each version met the targets."""
    window = max(0.0, args.drain_delay - 0.5)
    width, column = 39, 40
    print(f"\n  {'':{width}}" + "".join(f" {label[:column]:{column}}" for label in labels))

    def row(name: str, cells: List[str]) -> None:
        print((f"  {name:{width}}" + "".join(f" {cell:{column}}" for cell in cells)).rstrip())
    met: Dict[str, bool] = {}
    figures = {label: window_figures(results[label], window) for label in labels}
    for label in labels:
        rounds = results[label]
        met[label] = sum(r.count("lost") for r in rounds) == 0 and figures[label][1] == 0
    row("--drain-delay passed", ["yes" if drains[label] else "no (not in serve --help)" for label in labels])
    row("per SIGTERM: sent/answered/lost/refused", [""] * len(labels))
    for number in range(max(len(results[label]) for label in labels)):
        row(f"  SIGTERM {number + 1}",
            [tally(results[label][number]) if number < len(results[label]) else "-" for label in labels])
    row("lost per SIGTERM", [" ".join(str(r.count("lost")) for r in results[label]) for label in labels])
    row("lost in all (target 0)", [f"{sum(r.count('lost') for r in results[label])} "
                                   f"{'met' if sum(r.count('lost') for r in results[label]) == 0 else 'MISSED'}"
                                   for label in labels])
    row("  by cause", [causes(collections.Counter(a.error for r in results[label] for a in r.attempts
                                                 if a.outcome == "lost")) for label in labels])
    row("  started, s after SIGTERM", [lost_times(results[label]) for label in labels])
    row("sent / answered in all", [f"{sum(r.count('ok', 'bad', 'lost') for r in results[label])} / "
                                   f"{sum(r.count('ok', 'bad') for r in results[label])}"
                                   f" ({sum(r.count('bad') for r in results[label])} not mutated)" for label in labels])
    row(f"first {window:g} s after SIGTERM: started", [f"{f[0]} ({f[2]} on new conns)" for f in figures.values()])
    row("  failed (target 0)", [f"{f[1]} ({f[3]} on new conns) {'met' if f[1] == 0 and f[2] else 'MISSED'}"
                                for f in figures.values()])
    row("  failures by kind", [causes(f[4])[:column] for f in figures.values()])
    row("exit after SIGTERM, median / max", [spread([r.exit_s for r in results[label]]) for label in labels])
    row("/readyz 503 after SIGTERM", [spread([r.ready_503_s for r in results[label]], 1000, "ms")
                                      + notes(results[label]) for label in labels])
    row("idle conns found closed by peek", [str(sum(r.stale_found for r in results[label])) for label in labels])
    row("exit codes", [" ".join(sorted({str(r.returncode) for r in results[label]})) for label in labels])
    for label in labels:
        for number, sample in ((n, r.bad_samples[0]) for n, r in enumerate(results[label]) if r.bad_samples):
            print(f"  {label}, SIGTERM {number + 1}: not a mutated admission: {sample[:200]}")
            break
    return met


def tally(result: RoundResult) -> str:
    return (f"{result.count('ok', 'bad', 'lost')}/{result.count('ok', 'bad')}/{result.count('lost')}/"
            f"{result.count('refused')}")


def lost_times(rounds: List[RoundResult]) -> str:
    starts = sorted(a.start for r in rounds for a in r.attempts if a.outcome == "lost")
    return f"{starts[0]:+.2f} .. {starts[-1]:+.2f}" if starts else "-"


def notes(rounds: List[RoundResult]) -> str:
    seen = collections.Counter(r.readyz_note for r in rounds if r.readyz_note)
    return "".join(f"; {note} x{n}" for note, n in seen.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", default="HEAD",
                        help="also measure ocifit.py as of this git revision (default HEAD; '' for none)")
    parser.add_argument("--ocifit", type=Path, help="the ocifit.py to measure (default: the working tree's)")
    parser.add_argument("--rounds", type=int, default=10, help="SIGTERMs per version (each a fresh serve)")
    parser.add_argument("--drain-delay", type=float, default=3.0,
                        help="--drain-delay passed to versions that take it; the window checked is this - 0.5 s")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each SIGTERM (+0-0.5 s)")
    parser.add_argument("--seed", type=int, default=22)
    args = parser.parse_args()
    args.rounds = max(1, min(args.rounds, 50))
    work = workdir()
    jitter = random.Random(args.seed)
    try:
        scripts = versions(args.baseline or None, work)
        if args.ocifit:
            del scripts["working tree"]
            scripts = {args.ocifit.name: args.ocifit.resolve(), **scripts}
        labels = list(scripts)[::-1]  # the baseline first, then the working tree
        names = {label: f"{label} (baseline)" if label == args.baseline else label for label in labels}
        certs = pki(work)
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        env = Env(work, certs, context, args, review_template())
        drains = {label: "--drain-delay" in serve_flags(script) for label, script in scripts.items()}
        results: Dict[str, List[RoundResult]] = {label: [] for label in labels}
        started = time.monotonic()
        for number in range(args.rounds):
            warmup = args.warmup + jitter.uniform(0, 0.5)  # the same SIGTERM moment for each version's round
            for label in labels:  # alternated, so drift in the machine falls on both alike
                result = one_round(env, scripts[label], label, number, warmup)
                results[label].append(result)
                print(f"... round {number + 1}/{args.rounds} {names[label]}: lost {result.count('lost')}, "
                      f"sent {result.count('ok', 'bad', 'lost')}, exit {spread([result.exit_s])}",
                      file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"rollout: {args.rounds} SIGTERMs per version, each of a fresh serve under {CLIENTS} Go-like keep-alive "
          f"HTTPS clients (client 0 redials every {CHURN_EVERY} requests), SIGTERM {args.warmup:g}-"
          f"{args.warmup + 0.5:g} s into the load, drain delay {args.drain_delay:g} s; CPython "
          f"{sys.version.split()[0]}, {os.cpu_count()} cores, {elapsed:.0f} s")
    met = report([names[label] for label in labels], {names[label]: results[label] for label in labels}, args,
                 {names[label]: drains[label] for label in labels})
    return 0 if met.get(names[labels[-1]]) else 1


if __name__ == "__main__":
    sys.exit(main())
