#!/usr/bin/env python3
"""The node view at scale: realistic NFD-labelled nodes (about 20 shapes) through list+watch.

For each cluster size it starts the Kubernetes API double (the test suite's, loopback HTTPS), lists the
nodes into a live `ocifit serve` and prints: time to ready, the ocifit process's RSS (target <= 80 MB at
5,000 nodes), how long a relabel takes to reach admissions, and decision time per admission (target <= 1 ms),
cold (first pod after a node change) and warm.

    python3 bench/nodes.py [--sizes 500,5000] [--baseline REV]

--baseline REV also measures ocifit.py as of git revision REV (`git show REV:ocifit.py`): its `serve` for the
server-side figures and, for the decision times, that file imported in-process under another module name. At
each size the two versions are measured one after the other (alternated over the sizes), and each size gets a
ratio row, working tree / baseline; the growth and targets lines are given for each version.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List

from _support import (EXAMPLE, free_port, load_module, ocifit, percentile, pki, post, proc_status, ratio,
                      serve_command, stop, t, versions, wait_ready, workdir)

CPU_FLAGS = ("ADX AESNI AVX AVX2 AVX512BW AVX512CD AVX512DQ AVX512F AVX512VL AVX512VNNI BMI1 BMI2 CETIBT CETSS "
             "CLFLUSHOPT CLWB CMPXCHG8 FLUSH_L1D FMA3 FSRM FXSR FXSROPT GFNI HYPERVISOR IBPB IBRSPB LAHF MD_CLEAR "
             "MOVBE MPX OSXSAVE RDPRU RDRAND RDSEED RDTSCP SHA SPEC_CTRL_SSBD SSE3 SSE4 SSE42 SSSE3 STIBP SYSCALL "
             "SYSEE VAES VMX VPCLMULQDQ WAITPKG WBNOINVD X87 XGETBV1 XSAVE XSAVEC XSAVEOPT XSAVES").split()
INSTANCES = [("m5.large", "Intel", 40), ("c6i.xlarge", "Intel", 55), ("r6a.2xlarge", "AMD", 48),
             ("g5.xlarge", "AMD", 44)]
SYSTEMS = [("ubuntu", "22.04", "6.5.0-1022-aws"), ("ubuntu", "24.04", "6.8.0-1018-aws"),
           ("amzn", "2023", "6.1.109-118.189.amzn2023.x86_64"), ("debian", "12", "6.1.0-27-cloud-amd64"),
           ("rocky", "9.4", "5.14.0-427.13.1.el9_4.x86_64")]


def nfd_node(i: int, rng: random.Random) -> Dict[str, Any]:
    """A node as the API server would list it: ~90 labels (NFD and well-known), status, managed fields."""
    instance, vendor, flags = INSTANCES[i % len(INSTANCES)]
    os_id, version, kernel = SYSTEMS[(i // len(INSTANCES)) % len(SYSTEMS)]
    major, minor = kernel.split(".")[:2]
    name = f"ip-10-{i // 250}-{i % 250}-{rng.randrange(1, 250)}.ec2.internal"
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
              "node.kubernetes.io/instance-type": instance, "beta.kubernetes.io/instance-type": instance,
              "topology.kubernetes.io/region": "us-east-1", "topology.kubernetes.io/zone": f"us-east-1{'abc'[i % 3]}",
              "eks.amazonaws.com/nodegroup": f"{instance.split('.')[0]}-{os_id}",
              "feature.node.kubernetes.io/cpu-model.vendor_id": vendor,
              "feature.node.kubernetes.io/cpu-model.family": "6", "feature.node.kubernetes.io/cpu-model.id": "106",
              "feature.node.kubernetes.io/cpu-hardware_multithreading": "true",
              "feature.node.kubernetes.io/kernel-version.full": kernel,
              "feature.node.kubernetes.io/kernel-version.major": major,
              "feature.node.kubernetes.io/kernel-version.minor": minor,
              "feature.node.kubernetes.io/kernel-version.revision": kernel.split(".")[2].split("-")[0],
              "feature.node.kubernetes.io/system-os_release.ID": os_id,
              "feature.node.kubernetes.io/system-os_release.VERSION_ID": version,
              "feature.node.kubernetes.io/system-os_release.VERSION_ID.major": version.split(".")[0],
              "feature.node.kubernetes.io/memory-numa": "false",
              "feature.node.kubernetes.io/storage-nonrotationaldisk": "true",
              "feature.node.kubernetes.io/pci-1d0f.present": "true",
              "feature.node.kubernetes.io/kernel-config.NO_HZ": "true",
              "feature.node.kubernetes.io/kernel-config.NO_HZ_IDLE": "true"}
    labels.update({f"feature.node.kubernetes.io/cpu-cpuid.{flag}": "true" for flag in CPU_FLAGS[:flags]})
    images = [{"names": [f"registry.example/team{j}/app@sha256:{rng.getrandbits(256):064x}",
                         f"registry.example/team{j}/app:v{j}"], "sizeBytes": rng.randrange(10 ** 7, 10 ** 9)}
              for j in range(30)]
    return {"metadata": {"name": name, "uid": f"{rng.getrandbits(128):032x}", "labels": labels,
                         "creationTimestamp": "2026-11-20T09:00:00Z",
                         "annotations": {"nfd.node.kubernetes.io/feature-labels": ",".join(sorted(labels)),
                                         "node.alpha.kubernetes.io/ttl": "0"},
                         "managedFields": [{"manager": "nfd-master", "operation": "Update", "apiVersion": "v1",
                                            "fieldsType": "FieldsV1",
                                            "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in labels}}}}]},
            "spec": {"providerID": f"aws:///us-east-1a/i-{rng.getrandbits(64):016x}"},
            "status": {"capacity": {"cpu": "8", "memory": "32386524Ki", "pods": "58"},
                       "allocatable": {"cpu": "7910m", "memory": "31369692Ki", "pods": "58"},
                       "conditions": [{"type": c, "status": "False" if c != "Ready" else "True",
                                       "lastHeartbeatTime": "2026-11-25T05:00:00Z", "reason": f"Kubelet{c}",
                                       "message": f"kubelet reports {c}"}
                                      for c in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")],
                       "addresses": [{"type": "InternalIP", "address": f"10.0.{i // 250}.{i % 250}"},
                                     {"type": "Hostname", "address": name}],
                       "nodeInfo": {"kernelVersion": kernel, "osImage": f"{os_id} {version}",
                                    "kubeletVersion": "v1.32.2", "containerRuntimeVersion": "containerd://1.7.22"},
                       "images": images}}


def load_cluster(api: "t.FakeKubeAPI", count: int) -> None:
    rng = random.Random(count)
    with api.cond:
        for i in range(count):
            node = nfd_node(i, rng)
            api.rv += 1
            node["metadata"]["resourceVersion"] = str(api.rv)
            api.nodes[node["metadata"]["name"]] = node


def ebpf_pod(i: int) -> Dict[str, Any]:
    os_id, version, _ = SYSTEMS[(0, 2)[i % 2]]  # the two systems the eBPF spec has images for
    return t.pod_obj(name=f"p{i}", ref="bench/ebpf:v1", spec={"nodeSelector": {
        "feature.node.kubernetes.io/system-os_release.ID": os_id,
        "feature.node.kubernetes.io/system-os_release.VERSION_ID": version}})


# Adapters for what differs between ocifit versions in the in-process API this benchmark uses; each is chosen by
# what the module has, not by revision, so any baseline works that has one or the other:
#   NodeSnapshot.with_node(name, node) was called NodeSnapshot.changed(name, node) before 7d0cc3c;
#   Decision.allowed was a field before 9477b91 and is a property since; both read alike, so that needs none.

def snapshot_with_node(snapshot: Any, name: str, node: Any) -> Any:
    """A new snapshot with one node replaced, as after a watch event, in either version's spelling."""
    if hasattr(snapshot, "with_node"):
        return snapshot.with_node(name, node)
    return snapshot.changed(name, node)  # the old name


def decision_times(module: ModuleType, source: Any, artifacts: Any, pods: List[Dict[str, Any]]) -> Dict[str, float]:
    """Per-admission decide() time of one ocifit module: cold (first after a node change) and warm, in
    microseconds."""
    requests = [t.review_of(p)["request"] for p in pods]
    get = lambda ref: artifacts.get(ref, time.monotonic() + 5)  # noqa: E731
    cold = []
    some_node = next(iter(source.snapshot().nodes.values()))
    for request in requests[:20]:
        snapshot = snapshot_with_node(source.snapshot(), some_node.name, some_node)  # as after a watch event
        started = time.perf_counter()
        decision = module.decide(request, snapshot, get)
        cold.append(time.perf_counter() - started)
        assert decision.allowed, decision.message
    snapshot = source.snapshot()
    warm = []
    for request in requests:
        started = time.perf_counter()
        module.decide(request, snapshot, get)
        warm.append(time.perf_counter() - started)
    return {"cold_p50": percentile(cold, 0.5) * 1e6, "warm_p50": percentile(warm, 0.5) * 1e6,
            "warm_p99": percentile(warm, 0.99) * 1e6}


def measure(count: int, certs: Dict[str, Any], work: Path, script: Path, module: ModuleType,
            label: str) -> Dict[str, float]:
    """All figures at one cluster size for one ocifit version: script is served, module decides in-process."""
    api = t.FakeKubeAPI(certs)
    load_cluster(api, count)
    token = work / "token"
    token.write_text(api.token)
    spec_ref = {"bench/ebpf:v1": str(EXAMPLE / "ebpf-compatibility-spec.json")}
    port = free_port()
    log_file = open(work / f"serve-{count}-{label.replace(' ', '-')}.log", "w")
    started = time.monotonic()
    required = ("--port", "--bind", "--cert", "--key", "--kube-api", "--kube-token-file", "--kube-ca", "--artifact")
    server = subprocess.Popen(serve_command(script, [
        ("--port", str(port)), ("--bind", "127.0.0.1"), ("--cert", str(certs["crt"])), ("--key", str(certs["key"])),
        ("--kube-api", api.url), ("--kube-token-file", str(token)), ("--kube-ca", str(certs["ca"])),
        ("--artifact", f"bench/ebpf:v1={spec_ref['bench/ebpf:v1']}")], required=required), stderr=log_file)
    try:
        wait_ready(port, certs["ca"])
        ready = time.monotonic() - started
        pod = ebpf_pod(0)
        assert t.patch_of(post(port, certs["ca"], t.review_of(pod))["response"])[0]["value"].endswith("ubuntu2204")
        rss = proc_status(server.pid)
        source = module.KubeNodes(module.KubeClient(api.url, str(token), str(certs["ca"])), module.Settings()).start()
        try:
            if not source.wait_synced(120):
                raise SystemExit(f"{label}: the in-process node watch did not sync in 120 s")
            times = decision_times(module, source, module.LocalArtifacts(spec_ref),
                                   [ebpf_pod(i) for i in range(2000)])
        finally:
            source.stop()
        # a relabel: every ubuntu 22.04 node's kernel minor drops below 1; the next pod must be denied
        relabelled = time.monotonic()
        for name, node in list(api.nodes.items()):
            if node["metadata"]["labels"]["feature.node.kubernetes.io/system-os_release.VERSION_ID"] == "22.04":
                api.modify(name, labels={"feature.node.kubernetes.io/kernel-version.major": "5"})
        changes = time.monotonic() - relabelled
        deadline = relabelled + 120
        while post(port, certs["ca"], t.review_of(pod))["response"]["allowed"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: the relabel did not reach admissions in 120 s")
            time.sleep(0.01)
        seen = time.monotonic() - relabelled
    finally:
        stop(server)
        log_file.close()
        api.stop()
    return dict(times, ready=ready, rss=rss["VmRSS"] / 1024, peak=rss["VmHWM"] / 1024, relabel=seen,
                relabel_events=changes, label_sets=len({json.dumps(n["metadata"]["labels"], sort_keys=True)
                                                        for n in api.nodes.values()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,5000")
    parser.add_argument("--baseline", metavar="REV", help="also measure ocifit.py as of this git revision")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = workdir()
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    try:
        scripts = versions(args.baseline, work)
        # the working tree's module is _support's `ocifit`; a baseline's is its file imported as ocifit_baseline
        modules = {label: ocifit if index == 0 else load_module(script, "ocifit_baseline")
                   for index, (label, script) in enumerate(scripts.items())}
        certs = pki(work)
        for index, n in enumerate(sizes):
            order = list(scripts) if index % 2 == 0 else list(reversed(scripts))  # alternated: neither always first
            for label in order:
                results.setdefault(label, {})[n] = measure(n, certs, work, scripts[label], modules[label], label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    labels = list(scripts)
    columns = [("ready", "ready s", 8, ".2f"), ("rss", "RSS MB", 7, ".1f"), ("peak", "peak MB", 8, ".1f"),
               ("relabel", "relabel→admission s", 20, ".2f"), ("cold_p50", "decide cold us", 15, ".0f"),
               ("warm_p50", "warm p50 us", 12, ".1f"), ("warm_p99", "warm p99 us", 12, ".1f")]
    width = max(len(label) for label in labels + ["ratio"]) if args.baseline else 0
    print(f"node view: NFD-labelled nodes (~90 labels, 20 shapes, full status) by list+watch, "
          f"CPython {sys.version.split()[0]}, {os.cpu_count()} cores"
          + (f"; {args.baseline} is ocifit.py at that revision, ratio is working tree / baseline" if args.baseline
             else ""))
    print(f"  {'nodes':>6}" + (f" {'':{width}}" if width else "")
          + "".join(f" {head:>{w}}" for _, head, w, _ in columns))
    for n in sizes:
        for label in labels:
            r = results[label][n]
            print(f"  {n:>6}" + (f" {label:{width}}" if width else "")
                  + "".join(f" {r[key]:{w}{fmt}}" for key, _, w, fmt in columns))
        if args.baseline:
            new, old = results[labels[0]][n], results[labels[-1]][n]
            print(f"  {n:>6} {'ratio':{width}}" + "".join(f" {ratio(new[key], old[key]):>{w}}"
                                                          for key, _, w, _ in columns))
    for label in labels:
        big, small = results[label][max(sizes)], results[label][min(sizes)]
        who = f"{label}: " if args.baseline else ""
        if len(sizes) > 1:
            print(f"  {who}growth {min(sizes)} -> {max(sizes)} nodes: ready x{big['ready'] / small['ready']:.1f}, "
                  f"RSS x{big['rss'] / small['rss']:.1f}, cold decision x{big['cold_p50'] / small['cold_p50']:.1f}, "
                  f"warm decision x{big['warm_p50'] / small['warm_p50']:.1f}")
        print(f"  {who}targets at {max(sizes)} nodes: RSS <= 80 MB {'met' if big['peak'] <= 80 else 'MISSED'} "
              f"(peak {big['peak']:.0f} MB); decision <= 1 ms "
              f"{'met' if max(big['cold_p50'], big['warm_p99']) <= 1000 else 'MISSED'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
