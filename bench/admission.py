#!/usr/bin/env python3
"""Admission throughput and latency of a live HTTPS `serve`, against the floor of the same stack.

Keep-alive HTTPS clients (wrk) post a realistic pod review for N seconds to, in turn:
  (a) ocifit's full mutate path, artifact cache warm;
  (b) a no-op admit handler on the same server stack (TLS, HTTP, JSON in and out): the floor;
  (c) upstream's strategy: fetch the artifact from the registry on every admission (same local registry).
It prints req/s, p50, p99 and the server's CPU time per request for each, and the ratios the targets are set on:
  (a)/(b) >= 0.8 in throughput and <= 1.25 in p50;  (a) >= 20x (c) in throughput.

    python3 bench/admission.py [--seconds 5] [--rounds 3] [--connections 1,4,16] [--baseline REV]

--baseline REV also serves (a0), ocifit.py as of git revision REV, and alternates it with (a) and (b), so a
change's effect is measured in one run: (a)/(a0) is the ratio to watch.

Needs wrk, openssl, docker-registry and the test needs (`make test` installs them in .venv).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from _support import (EXAMPLE, ROOT, free_port, ocifit, pki, post, python, registry_with_flavor, stop, t, wait_ready,
                      workdir)


class FloorWebhook(ocifit.Webhook):
    """The least any admission webhook does: parse the review, answer allowed with its uid."""

    def handle(self, body: bytes) -> "tuple[int, bytes]":
        review = json.loads(body)
        return 200, json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                "response": {"uid": review["request"]["uid"], "allowed": True}}).encode()


class FetchEveryTime:
    """Upstream's strategy: the artifact fetched and parsed on every admission, no cache."""

    def __init__(self, settings: ocifit.Settings):
        self.client = ocifit.RegistryClient(settings)

    def get(self, ref: str, deadline: float, requests: Any = None) -> ocifit.Artifact:
        pulled = self.client.pull(ocifit.parse_reference(ref), deadline)
        return ocifit.Artifact(ref, ocifit.parse_spec(pulled.spec_bytes), pulled.digest, "registry")

    def attached(self, ref: str, deadline: float, requests: Any = None) -> ocifit.AttachedSpec:
        raise ocifit.ArtifactError("upstream has no candidate images")


def serve(mode: str, port: int, cert: str, key: str, registry: str, log_level: str = "info") -> None:
    """The server side, run in its own process: one of the three handlers on the real server stack."""
    settings = ocifit.Settings(port=port, bind="127.0.0.1", cert=cert, key=key,
                               nodes=str(EXAMPLE / "nodes-homogeneous.json"), insecure_registry=(registry,))
    ocifit.setup_logging(log_level)  # info, as in production: one line per admission, to a file (see main)
    nodes = ocifit.StaticNodes(settings.nodes)
    if mode == "floor":
        webhook: ocifit.Webhook = FloorWebhook(settings, nodes, ocifit.LocalArtifacts({}))
    else:
        artifacts = ocifit.build_artifacts(settings) if mode == "ocifit" else FetchEveryTime(settings)
        webhook = ocifit.Webhook(settings, nodes, artifacts)
    ocifit.build_server(settings, webhook).serve_forever()


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, body_file: Path, seconds: int, connections: int) -> Dict[str, float]:
    script = body_file.with_suffix(".lua")
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    done = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
                           "-s", str(script),
                           f"https://127.0.0.1:{port}/mutate"], capture_output=True, text=True, check=True)
    out = done.stdout

    def latency(q: str) -> float:
        value, unit = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency("50"),
            "p99": latency("99"), "errors": float(errors.group(1)) if errors else 0.0}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: subprocess.Popen, port: int, body: Path, seconds: int, level: int,
            registry: "t.DockerRegistry") -> Dict[str, float]:
    """One wrk run against one server, with the server's CPU per request and the registry GETs it caused."""
    before_gets, before_cpu = len(registry.requests("/v2/flavor/")), cpu_seconds(server.pid)
    result = wrk(port, body, seconds, level)
    result["cpu_us"] = (cpu_seconds(server.pid) - before_cpu) / max(1.0, result["rps"] * seconds) * 1e6
    result["registry"] = len(registry.requests("/v2/flavor/")) - before_gets
    return result


def median_run(runs: List[Dict[str, float]]) -> Dict[str, float]:
    """The run with the median throughput, so one noisy run moves no figure."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def report(level: int, a: Dict[str, float], b: Dict[str, float], c: Dict[str, float],
           a0: Optional[Dict[str, float]] = None) -> None:
    print(f"\n{level} connection{'s' if level > 1 else ''}")
    print(f"  {'':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'non-2xx':>8} {'registry GETs':>14}")
    rows = [("(a) ocifit, warm cache", a), ("(b) no-op admit, same stack", b), ("(c) upstream: fetch per admission", c)]
    for label, r in rows + ([("(a0) ocifit at the baseline", a0)] if a0 else []):
        print(f"  {label:34} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['cpu_us']:11.0f} {r['errors']:8.0f} "
              f"{r['registry']:14.0f}")
    for name, value, sign, target in (("(a)/(b) throughput", a["rps"] / b["rps"], ">=", 0.8),
                                      ("(a)/(b) p50", a["p50"] / b["p50"], "<=", 1.25),
                                      ("(a)/(c) throughput", a["rps"] / c["rps"], ">=", 20.0)):
        ok = value >= target if sign == ">=" else value <= target
        print(f"  {name:34} {value:8.2f}   target {sign} {target:<5} {'met' if ok else 'MISSED'}")
    if a0:
        print(f"  {'(a)/(a0) throughput, p50, CPU':34} {a['rps'] / a0['rps']:8.2f} {a['p50'] / a0['p50']:8.2f} "
              f"{'':8} {a['cpu_us'] / a0['cpu_us']:11.2f}   (1.00: no change)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="load time per run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of (a) and (b) per concurrency level, alternated; the median is reported")
    parser.add_argument("--connections", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--log-level", default="info", help="the servers' log level (info: a line per admission)")
    parser.add_argument("--baseline", metavar="REV", help="also measure ocifit.py as of this git revision, as (a0)")
    parser.add_argument("--serve", nargs=5, metavar=("MODE", "PORT", "CERT", "KEY", "REGISTRY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, port, cert, key, registry = args.serve
        serve(mode, int(port), cert, key, registry, args.log_level)
        return 0
    if not shutil.which("wrk"):
        raise SystemExit("bench/admission.py needs wrk (apt-get install wrk)")
    levels = [int(c) for c in args.connections.split(",")]
    work = workdir()
    certs = pki(work)
    registry = registry_with_flavor(work)
    review = json.loads((EXAMPLE / "reviews" / "deployment-pod.json").read_text())
    review["request"]["object"]["metadata"]["annotations"][ocifit.IMAGE_REF_ANNOTATION] = f"{registry.host}/flavor:v1"
    body = work / "review.json"
    body.write_text(json.dumps(review))
    servers: Dict[str, Tuple[subprocess.Popen, int]] = {}
    results: Dict[int, Dict[str, List[Dict[str, float]]]] = {}
    scripts = {"ocifit": ROOT / "ocifit.py"}
    if args.baseline:
        scripts["baseline"] = work / "baseline" / "ocifit.py"
        scripts["baseline"].parent.mkdir()
        scripts["baseline"].write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:ocifit.py"],
                                                       capture_output=True, check=True).stdout)
    try:
        for mode in ("floor", *scripts, "upstream"):  # all up at once; an idle one costs the others nothing
            port = free_port()
            log_file = open(work / f"{mode}.log", "w")  # where a container runtime would put stderr
            if mode in scripts:  # ocifit's own command line, exactly as deployed
                command = [python(), str(scripts[mode]), "serve", "--port", str(port), "--bind", "127.0.0.1",
                           "--cert", str(certs["crt"]), "--key", str(certs["key"]), "--nodes",
                           str(EXAMPLE / "nodes-homogeneous.json"), "--insecure-registry", registry.host,
                           "--allowed-registries", registry.host, "--log-level", args.log_level]
            else:
                command = [python(), __file__, "--log-level", args.log_level, "--serve", mode, str(port),
                           str(certs["crt"]), str(certs["key"]), registry.host]
            servers[mode] = (subprocess.Popen(command, stderr=log_file), port)
            log_file.close()
            wait_ready(port, certs["ca"])
            answer = post(port, certs["ca"], review)["response"]  # also warms the artifact cache
            assert answer["allowed"], answer
            if mode != "floor":
                assert t.patch_of(answer)[0]["value"] == "debian:11", answer
        for level in levels:
            runs = results[level] = {mode: [] for mode in servers}
            # (b), (a) and (a0) alternated, so drift in the machine's speed falls on all alike
            for mode in ["floor", *scripts] * args.rounds + ["upstream"]:
                server, port = servers[mode]
                runs[mode].append(measure(server, port, body, args.seconds, level, registry))
    finally:
        for server, _ in servers.values():
            stop(server)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"admission benchmark: keep-alive HTTPS (wrk), {args.seconds}s a run, median of {args.rounds} alternated "
          f"runs of (a) and (b), server log level {args.log_level}, CPython {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores" + (f"; (a0) is ocifit.py at {args.baseline}" if args.baseline else ""))
    for level in levels:
        runs = results[level]
        report(level, median_run(runs["ocifit"]), median_run(runs["floor"]), median_run(runs["upstream"]),
               median_run(runs["baseline"]) if args.baseline else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
