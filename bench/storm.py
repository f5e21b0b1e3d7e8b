#!/usr/bin/env python3
"""A pod storm: 500 concurrent admissions of pods that share one image-ref nobody has fetched yet.

Against the real local registry (docker-registry), through a live HTTPS `serve`. Prints how many requests
the registry got for that artifact (target <= 3: ocifit makes one fetch for everyone), how many pods got
the right image, and the total time.

    python3 bench/storm.py [--pods 500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time

from _support import EXAMPLE, free_port, pki, python, registry_with_flavor, stop, t, wait_ready, workdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=500)
    args = parser.parse_args()
    work = workdir()
    certs = pki(work)
    tag = f"storm-{int(time.time())}"
    registry = registry_with_flavor(work, f"storm:{tag}")
    ref = f"{registry.host}/storm:{tag}"
    port = free_port()
    log_file = open(work / "serve.log", "w")
    server = subprocess.Popen([python(), str(t.HERE / "ocifit.py"), "serve", "--port", str(port), "--bind", "127.0.0.1",
                               "--cert", str(certs["crt"]), "--key", str(certs["key"]), "--nodes",
                               str(EXAMPLE / "nodes-homogeneous.json"), "--insecure-registry", registry.host],
                              stderr=log_file)
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    images: list = []
    errors: list = []
    try:
        wait_ready(port, certs["ca"])
        connections = []
        for _ in range(args.pods):  # connected and TLS-ready first, so the storm itself is only admissions
            conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=60)
            conn.connect()
            connections.append(conn)
        before = len(registry.requests("/v2/storm/"))
        gate = threading.Barrier(args.pods + 1)

        def admit(i: int, conn: http.client.HTTPSConnection) -> None:
            review = t.review_of(t.pod_obj(name=f"storm-{i}", ref=ref), uid=f"storm-{i}")
            body = json.dumps(review)
            gate.wait()
            try:
                conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
                answer = json.loads(conn.getresponse().read())["response"]
                images.append(t.patch_of(answer)[0]["value"] if answer["allowed"] else answer["status"]["message"])
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=admit, args=(i, c)) for i, c in enumerate(connections)]
        for thread in threads:
            thread.start()
        gate.wait()
        started = time.monotonic()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        registry_requests = registry.requests("/v2/storm/")[before:]
        for conn in connections:
            conn.close()
    finally:
        stop(server)
        log_file.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    right = images.count("debian:11")
    print(f"pod storm: {args.pods} concurrent admissions of one new image-ref, CPython {sys.version.split()[0]}")
    print(f"  pods given debian:11        {right} of {args.pods}" + (f"  ({len(errors)} errors: {errors[:2]})"
                                                                    if errors else ""))
    print(f"  registry requests           {len(registry_requests)}   target <= 3   "
          f"{'met' if len(registry_requests) <= 3 else 'MISSED'}   "
          f"({', '.join(sorted({u.rsplit('/', 2)[1] for u in registry_requests}))})")
    print(f"  total time                  {elapsed:.2f} s  ({args.pods / elapsed:.0f} admissions/s)")
    return 0 if right == args.pods and len(registry_requests) <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
