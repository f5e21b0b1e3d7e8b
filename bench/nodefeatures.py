#!/usr/bin/env python3
"""The node view at scale with NFD's NodeFeatures: nodes with realistic NodeFeature objects through list+watch.

For each cluster size it starts the Kubernetes API double (the test suite's, loopback HTTPS) with label-only
node objects (bench/nodes.py's) and one NodeFeature per node (about 60 KB of JSON each: kernel.config with
thousands of attributes, cpuid flags, loaded modules, PCI/USB/network/storage instances, a few per-node values
such as system.name nodename and the NICs' MAC addresses; 20 hardware kinds, nodes of a kind sharing all else),
plus, for one node in ten, a small second NodeFeature from another namespace that nfd-master would merge in.
It serves ocifit against it with a spec in NFD's dialect and prints, next to the issue's targets:

  ready          seconds from starting `ocifit serve` to GET /readyz 200 (both first lists in)
  RSS            the ocifit process's VmRSS after sync, and its peak (VmHWM) over the whole run
  decisions      decide() in-process on a node view listed and watched as the server's is (as bench/nodes.py):
                 cold (the first admission after a node or feature change, on a new snapshot) and warm, for a
                 pod pinned to one hardware kind by a nodeSelector (a deterministic answer) and for one that may
                 land on any worker (a disagreement denial: still a decision); and the same pods over HTTPS
                 (POST /mutate on a kept-alive connection: decision, JSON and TLS together)
  change         a NodeFeature modified (one node of the pinned kind loses its GPU) until an admission sees it
                 (the pinned pod's nodes then disagree), and back

and, measured in the same run at the same sizes, bench/nodes.py's label-only figures (--no-label-only skips them).

    python3 bench/nodefeatures.py [--sizes 500,5000] [--no-label-only] [--managed-fields]

--managed-fields gives each NodeFeature the managedFields an API server would list with it (every attribute
name again, under fieldsV1): about twice the bytes on the wire, which ocifit drops as it parses.
"""

from __future__ import annotations

import argparse
import copy
import functools
import http.client
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import nodes
from _support import (ROOT, free_port, ocifit, percentile, pki, proc_status, serve_command, stop, t, wait_ready,
                      workdir)

REF = "bench/nfd:v1"
NFD_NAMESPACE = "node-feature-discovery"
OTHER_NAMESPACE = "gpu-operator"  # a second NodeFeature for some nodes, merged after NFD's own
KIND_LABEL = "node.kubernetes.io/instance-type"
KINDS = 20
FAST_KIND, GENERIC_KIND = 3, 0  # a kind whose nodes all get fast:1, and one whose nodes all get generic:1

SPEC = """\
# ocifit's benchmark spec in NFD's dialect (image-compatibility v1alpha1)
version: v1alpha1
compatibilities:
  - tag: fast:1
    weight: 10
    description: AVX-512, an NVIDIA GPU and kernel 6.1 or later
    rules:
      - name: avx512-gpu-kernel
        matchFeatures:
          - feature: cpu.cpuid
            matchName: {op: InRegexp, value: ["^AVX512F$"]}
          - feature: kernel.version
            matchExpressions:
              full: {op: Ge, value: ["6.1"], type: version}
          - feature: pci.device
            matchExpressions:
              vendor: {op: In, value: ["10de"]}
  - tag: generic:1
    weight: 1
    description: any Linux node
    rules:
      - name: any-kernel
        matchFeatures:
          - feature: kernel.version
            matchExpressions:
              major: {op: Exists}
"""

# ---- hardware kinds -------------------------------------------------------------------------------------------
#
# Kind k (nodes i with i % 20 == k) is CPU family FAMILIES[k % 4] in size SIZES[k // 4], on system
# nodes.SYSTEMS[k // 4] (as bench/nodes.py's labels for node i already say): four kinds share each kernel, and so
# its kernel.config. Only the p4d family has NVIDIA GPUs; r6a has no AVX-512. So fast:1 is chosen on p4d kinds
# whose kernel is 6.1 or later (and whose kernel version parses as one), generic:1 on the others.

FAMILIES = [  # family, vendor_id, cpu family, model id, AVX-512, NVIDIA GPUs
    ("m6i", "Intel", "6", "106", True, 0), ("c7a", "AMD", "25", "17", True, 0),
    ("r6a", "AMD", "25", "1", False, 0), ("p4d", "Intel", "6", "85", True, 8)]
SIZES = ["xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge"]

CPUID = ("ADX AESNI AVX AVX2 BMI1 BMI2 CETIBT CETSS CLFLUSHOPT CLWB CMOV CMPXCHG8 CX16 ERMS F16C FLUSH_L1D FMA3 "
         "FSRM FXSR FXSROPT GFNI HYPERVISOR IBPB IBRSPB LAHF LZCNT MD_CLEAR MMX MOVBE NX OSXSAVE PCLMULQDQ POPCNT "
         "PREFETCHW RDRAND RDSEED RDTSCP SHA SPEC_CTRL_SSBD SSE SSE2 SSE3 SSE4 SSE42 SSSE3 STIBP SYSCALL SYSEE VAES "
         "VPCLMULQDQ WBNOINVD X87 XGETBV1 XSAVE XSAVEC XSAVEOPT XSAVES").split()
CPUID_AVX512 = ("AVX512BF16 AVX512BITALG AVX512BW AVX512CD AVX512DQ AVX512F AVX512IFMA AVX512VBMI AVX512VBMI2 "
                "AVX512VL AVX512VNNI AVX512VPOPCNTDQ").split()
CPUID_VENDOR = {"Intel": "HLE MPX RTM TSXLDTRK SERIALIZE WAITPKG VMX AVXVNNI".split(),
                "AMD": "CLZERO IBS MMXEXT RDPRU SSE4A SUCCOR XOP LBRVIRT SVM TOPOEXT".split()}
MODULES = ("ip_tables x_tables nf_conntrack nf_defrag_ipv4 nf_defrag_ipv6 nf_nat nf_tables nfnetlink overlay "
           "br_netfilter bridge stp llc veth vxlan ip6_udp_tunnel udp_tunnel xt_conntrack xt_MASQUERADE "
           "xt_addrtype xt_mark xt_comment xt_multiport ipt_REJECT nf_reject_ipv4 ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh "
           "ena nvme nvme_core crc32_pclmul crc32c_intel ghash_clmulni_intel aesni_intel crypto_simd cryptd "
           "sch_fq_codel tls xfs ext4 mbcache jbd2 dm_mod dm_crypt autofs4 binfmt_misc nls_utf8 isofs "
           "configfs efivarfs ip6_tables ip6table_filter iptable_filter iptable_nat iptable_mangle iptable_raw "
           "ebtables ebtable_filter cls_bpf sch_ingress act_bpf tcp_bbr rpcsec_gss_krb5 nfsv4 nfs lockd grace "
           "sunrpc fscache netfs intel_rapl_msr intel_rapl_common rapl kvm kvm_intel kvm_amd irqbypass "
           "vfio vfio_pci vfio_pci_core vfio_iommu_type1 iommufd mousedev evdev psmouse serio_raw i2c_piix4 "
           "button ac loop drm drm_kms_helper fb_sys_fops syscopyarea sysfillrect sysimgblt").split()
GPU_MODULES = "nvidia nvidia_uvm nvidia_drm nvidia_modeset nvidia_peermem ib_core ib_uverbs efa".split()
KCONFIG_WORDS = ("NET IPV6 NF CONNTRACK USB SERIAL HID SND DRM NVME BLK DEV SCSI ATA EXT4 XFS BTRFS FS CRYPTO AES "
                 "SHA256 VIRTIO PCI MSI KVM X86 CPU FREQ SCHED CGROUP BPF JIT MODULE SIG SECURITY APPARMOR SELINUX "
                 "AUDIT DEBUG INFO TRACE FTRACE KPROBES PERF EVENTS HZ NO IDLE PREEMPT NUMA MEMCG SWAP ZSWAP "
                 "HUGETLB TRANSPARENT HUGEPAGE IRQ TIME ACCOUNTING VLAN BRIDGE BONDING MACVLAN VXLAN GENEVE TUN "
                 "IP VS NETFILTER XT MATCH TARGET MLX5 CORE EN ENA ETHERNET IXGBE I40E ICE SRIOV IOMMU INTEL AMD "
                 "VFIO MDEV INFINIBAND RDMA USER ACCESS WATCHDOG THERMAL ACPI EFI RTC I2C SPI GPIO REGULATOR "
                 "POWER SUPPLY HWMON LEDS INPUT KEYBOARD MOUSE TOUCHSCREEN MEDIA VIDEO FB CONSOLE VT TTY PTY "
                 "PRINTK LOG BUF SHIFT NAMESPACES UTS PID IPC SYSVIPC POSIX MQUEUE TASKSTATS XACCT DELAY "
                 "KEYS TRUSTED ENCRYPTED INTEGRITY IMA EVM LOCKDOWN LSM YAMA LANDLOCK SECCOMP FILTER").split()
PCI_COMMON = [("8086", "1237", "0600"), ("8086", "7000", "0601"), ("8086", "7111", "0101"), ("8086", "7113", "0680"),
              ("1d0f", "1111", "0300"), ("1d0f", "8061", "0108"), ("1d0f", "ec20", "0200"), ("1d0f", "0200", "0c03")]
PCI_VENDORS = ["8086", "1022", "1d0f", "15b3", "14e4", "1af4", "1b36"]
PCI_CLASSES = ["0600", "0604", "0880", "0c05", "0108", "0200", "0b40", "1180", "0c03"]


def kernel_config(kernel: str) -> Dict[str, str]:
    """kernel.config attributes (CONFIG_ names without the prefix, as NFD publishes them) of one kernel: about
    2,500 entries, most of them alike across kernels."""
    base = random.Random("kconfig")
    names: Dict[str, str] = {}
    while len(names) < 2600:
        name = "_".join(base.sample(KCONFIG_WORDS, base.randint(2, 4)))
        roll = base.random()
        names[name] = "y" if roll < 0.7 else "m" if roll < 0.92 else str(base.choice([0, 1, 4, 8, 32, 64, 250, 1000,
                                                                                          4096, 65536]))
    own = random.Random(kernel)
    config = {}
    for name, value in names.items():
        roll = own.random()
        if roll < 0.04:
            continue  # not set in this kernel
        config[name] = ("m" if value == "y" else "y") if roll < 0.10 else value
    config.update({"LOCALVERSION": f'"-{kernel.split("-", 1)[-1]}"', "NR_CPUS": "8192", "HZ": "250",
                   "NO_HZ": "y", "NO_HZ_IDLE": "y", "PREEMPT_VOLUNTARY": "y", "BPF_JIT": "y"})
    return config


@functools.lru_cache(maxsize=None)
def hardware_kinds() -> List[Dict[str, Any]]:
    """The 20 kinds: for each, its instance type and the parts of its NodeFeature that every node of it shares."""
    configs: Dict[str, Dict[str, str]] = {}
    kinds = []
    for k in range(KINDS):
        family, vendor, cpu_family, model, avx512, gpus = FAMILIES[k % len(FAMILIES)]
        os_id, version, kernel = nodes.SYSTEMS[k // len(FAMILIES)]
        rng = random.Random(f"kind-{k}")
        numbers = kernel.split("-")[0].split(".")
        flags = CPUID + CPUID_VENDOR[vendor] + (CPUID_AVX512 if avx512 else [])
        modules = MODULES + (GPU_MODULES if gpus else []) + [f"mod_{rng.getrandbits(24):06x}" for _ in range(20)]
        pci = [{"attributes": {"vendor": v, "device": d, "class": c, "subsystem_vendor": v,
                               "subsystem_device": d}} for v, d, c in PCI_COMMON]
        for _ in range(rng.randint(14, 30)):
            vendor_id = rng.choice(PCI_VENDORS)
            pci.append({"attributes": {"vendor": vendor_id, "device": f"{rng.getrandbits(16):04x}",
                                       "class": rng.choice(PCI_CLASSES), "subsystem_vendor": vendor_id,
                                       "subsystem_device": f"{rng.getrandbits(16):04x}"}})
        pci += [{"attributes": {"vendor": "10de", "device": "20b0", "class": "0302", "subsystem_vendor": "10de",
                                "subsystem_device": "134f", "iommu_group/type": "DMA"}} for _ in range(gpus)]
        usb = [{"attributes": {"vendor": "1d6b", "device": f"000{j + 1}", "class": "09", "speed": "480"}}
               for j in range(rng.randint(1, 4))]
        storage = [{"attributes": {"name": f"nvme{j}n1", "dax": "false", "rotational": "0", "nr_zones": "0",
                                   "zoned": "none"}} for j in range(rng.randint(2, 9))]
        if kernel not in configs:
            configs[kernel] = kernel_config(kernel)
        flags_sets: Dict[str, Any] = {"cpu.cpuid": {"elements": {f: {} for f in flags}},
                      "kernel.loadedmodule": {"elements": {m: {} for m in modules}},
                      "kernel.enabledmodule": {"elements": {m: {} for m in modules[:60]}}}
        attribute_sets = {
            "cpu.model": {"elements": {"vendor_id": vendor, "family": cpu_family, "id": model}},
            "cpu.topology": {"elements": {"hardware_multithreading": "true", "socket_count": "1" if k % 5 else "2"}},
            "cpu.cstate": {"elements": {"enabled": "false"}},
            "cpu.pstate": {"elements": {"status": "active", "turbo": "true", "scaling_governor": "powersave"}},
            "cpu.security": {"elements": {"sgx.enabled": "false", "tdx.enabled": "false", "sev.enabled": "false"}},
            "kernel.config": {"elements": configs[kernel]},
            "kernel.version": {"elements": {"full": kernel, "major": numbers[0], "minor": numbers[1],
                                            "revision": numbers[2]}},
            "kernel.selinux": {"elements": {"enabled": "true" if os_id == "rocky" else "false"}},
            "system.osrelease": {"elements": {"ID": os_id, "VERSION_ID": version,
                                              "VERSION_ID.major": version.split(".")[0],
                                              "VERSION_ID.minor": (version.split(".") + ["0"])[1]}},
            "memory.numa": {"elements": {"is_numa": "true" if gpus else "false", "node_count": "2" if gpus else "1"}},
            "memory.swap": {"elements": {"enabled": "false"}},
            "storage.nonrotationaldisk": {"elements": {"present": "true"}}}
        instance_sets = {"pci.device": {"elements": pci}, "usb.device": {"elements": usb},
                         "storage.block": {"elements": storage},
                         "memory.nv": {"elements": []}}
        kinds.append({"type": f"{family}.{SIZES[k // len(FAMILIES)]}", "vendor": vendor, "flags": flags_sets,
                      "attributes": attribute_sets, "instances": instance_sets, "nics": 2 + k % 3 + 2 * (gpus > 0)})
    return kinds


def node_feature(kind: Dict[str, Any], node: str, rng: random.Random) -> Dict[str, Any]:
    """NFD's NodeFeature for one node: its kind's shared feature sets, and its own name and NIC MAC addresses."""
    nics = [{"attributes": {"name": f"ens{5 + j}", "operstate": "up", "speed": "25000" if j else "10000",
                            "mtu": "9001", "sriov_numvfs": "0", "sriov_totalvfs": "0" if j else "4",
                            "address": ":".join(f"{b:02x}" for b in [0x0a] + [rng.getrandbits(8) for _ in range(5)])}}
            for j in range(kind["nics"])]
    obj = t.node_feature(node, {"flags": kind["flags"],
                                "attributes": dict(kind["attributes"], **{"system.name": {"elements": {
                                    "nodename": node}}}),
                                "instances": dict(kind["instances"], **{"network.device": {"elements": nics}})},
                         namespace=NFD_NAMESPACE)
    meta = obj["metadata"]
    meta.update({"uid": f"{rng.getrandbits(128):032x}", "generation": 1, "creationTimestamp": "2026-11-20T09:00:00Z",
                 "annotations": {"nfd.node.kubernetes.io/worker.version": "v0.17.2"},
                 "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "uid": f"{rng.getrandbits(128):032x}",
                                      "name": f"nfd-worker-{rng.getrandbits(20):05x}"}]})
    meta["labels"]["nfd.node.kubernetes.io/node-name"] = node
    return obj


def extra_feature(node: str, i: int) -> Dict[str, Any]:
    """A second, small NodeFeature (another namespace, another writer) for the same node: a local label and a
    NIC, merged after NFD's own (attributes overwrite, instances append)."""
    return t.node_feature(node, {"attributes": {"local.label": {"elements": {"rack": f"r{i % 8}", "team": "ml"}}},
                                 "instances": {"pci.device": {"elements": [{"attributes": {
                                     "vendor": "15b3", "device": "101d", "class": "0207"}}]}}},
                          name=f"{node}-gpu-operator", namespace=OTHER_NAMESPACE)


def fields_of(value: Any) -> Any:
    """managedFields' fieldsV1 for an object written whole by one manager: each map key as f:KEY (lists atomic)."""
    if isinstance(value, dict):
        return {f"f:{k}": fields_of(v) for k, v in value.items()}
    return {}


def load_cluster(api: "t.FakeKubeAPI", count: int, managed_fields: bool) -> Tuple[List[str], float]:
    """count nodes (bench/nodes.py's, labelled with their kind's instance type) and their NodeFeatures into the
    API double; the node names and the average NodeFeature size in bytes of JSON (as listed)."""
    kinds = hardware_kinds()
    rng, extra = random.Random(count), random.Random(f"extra-{count}")
    names, sizes = [], []
    with api.cond:
        for i in range(count):
            kind = kinds[i % KINDS]
            node = nodes.nfd_node(i, rng)
            name = node["metadata"]["name"]
            labels = node["metadata"]["labels"]
            labels[KIND_LABEL] = labels["beta.kubernetes.io/instance-type"] = kind["type"]
            labels["feature.node.kubernetes.io/cpu-model.vendor_id"] = kind["vendor"]
            api.rv += 1
            node["metadata"]["resourceVersion"] = str(api.rv)
            api.nodes[name] = node
            features = [node_feature(kind, name, rng)] + ([extra_feature(name, i)] if extra.random() < 0.1 else [])
            for obj in features:
                if managed_fields:
                    obj["metadata"]["managedFields"] = [{
                        "manager": "nfd-worker", "operation": "Update", "apiVersion": "nfd.k8s-sigs.io/v1alpha1",
                        "time": "2026-11-20T09:00:00Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:metadata": {"f:labels": fields_of(obj["metadata"]["labels"])},
                                     "f:spec": fields_of(obj["spec"])}}]
                api.rv += 1
                obj["metadata"]["resourceVersion"] = str(api.rv)
                api.features[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
            if i % 7 == 0 or i < KINDS:  # every kind among them; the average over a seventh of the nodes
                sizes.append(len(json.dumps(features[0])))
            names.append(name)
    return names, sum(sizes) / len(sizes)


# ---- pods, reviews, a kept-alive HTTPS client -----------------------------------------------------------------

def pods(kinds: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The pods measured: pinned to the fast kind, to the generic kind, and free to land on any worker."""
    return {"kind": t.pod_obj(name="pinned", ref=REF, spec={"nodeSelector": {KIND_LABEL: kinds[FAST_KIND]["type"]}}),
            "generic": t.pod_obj(name="generic", ref=REF,
                                 spec={"nodeSelector": {KIND_LABEL: kinds[GENERIC_KIND]["type"]}}),
            "any": t.pod_obj(name="anywhere", ref=REF)}


def answer(response: Dict[str, Any]) -> str:
    """An AdmissionResponse as one word: the image it selects, or "denied:" and why."""
    if response.get("allowed"):
        return str(t.patch_of(response)[0]["value"]) if response.get("patch") else "allowed"
    message = str((response.get("status") or {}).get("message") or "")
    return "denied:disagreement" if "disagree" in message else "denied:" + message[:200]


class Client:
    """POST /mutate over one kept-alive HTTPS connection (reconnecting if the server closed it); the handshake is
    not part of any timing."""

    def __init__(self, port: int, ca: Path):
        self.port, self.context = port, ssl.create_default_context(cafile=str(ca))
        self.conn: Optional[http.client.HTTPSConnection] = None

    def post(self, review: Dict[str, Any]) -> Tuple[Dict[str, Any], float]:
        """The response, and the seconds from sending the request to its last byte."""
        body = json.dumps(review).encode()
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=30)
                self.conn.connect()
            try:
                started = time.perf_counter()
                self.conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
                data = self.conn.getresponse().read()
                elapsed = time.perf_counter() - started
                return json.loads(data)["response"], elapsed
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a live process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- one size -------------------------------------------------------------------------------------------------

def in_process(api: "t.FakeKubeAPI", token: Path, certs: Dict[str, Path], spec_path: Path,
               reviews: Dict[str, Dict[str, Any]], expected: Dict[str, str]) -> Dict[str, float]:
    """decide() on a node view of this process's own, listed and watched from the API double as the server's:
    cold (on a new snapshot, as after a watch event) and warm, per pod, in microseconds."""
    source = ocifit.KubeNodes(ocifit.KubeClient(api.url, str(token), str(certs["ca"])), ocifit.Settings()).start()
    try:
        if not source.wait_synced(300):
            raise SystemExit(f"the in-process node view did not sync in 300 s: {source.health()}")
        artifacts = ocifit.LocalArtifacts({REF: str(spec_path)})
        get = lambda ref: artifacts.get(ref, time.monotonic() + 5)  # noqa: E731
        requests = {key: review["request"] for key, review in reviews.items()}
        some = next(iter(source.snapshot().nodes.values()))
        figures: Dict[str, float] = {}
        for key, request in requests.items():
            cold = []
            for _ in range(20):
                snapshot = source.snapshot().with_node(some.name, some)  # a new snapshot: no partitions, no memo
                started = time.perf_counter()
                decision = ocifit.decide(request, snapshot, get)
                cold.append(time.perf_counter() - started)
                seen = decision.image if decision.allowed else f"denied:{decision.reason}"
                if seen != expected[key]:
                    raise SystemExit(f"in-process {key} pod: {seen} ({decision.message}), expected {expected[key]}")
            snapshot = source.snapshot()
            warm = []
            for _ in range(2000):
                started = time.perf_counter()
                ocifit.decide(request, snapshot, get)
                warm.append(time.perf_counter() - started)
            figures.update({f"cold_{key}": percentile(cold, 0.5) * 1e6, f"warm_p50_{key}": percentile(warm, 0.5) * 1e6,
                            f"warm_p99_{key}": percentile(warm, 0.99) * 1e6})
        return figures
    finally:
        source.stop()


def feature_changes(api: "t.FakeKubeAPI", client: Client, review: Dict[str, Any], node: str, cycles: int
                    ) -> Dict[str, float]:
    """One node of the pinned kind loses its GPU (its NodeFeature MODIFIED), then gets it back, `cycles` times:
    seconds from each change until an admission of the pinned pod sees it, and the round trip of that first
    admission on the new node view (a cold decision over HTTPS)."""
    key = (NFD_NAMESPACE, node)
    original = api.features[key]
    without_gpu = copy.deepcopy(original)
    pci = without_gpu["spec"]["features"]["instances"]["pci.device"]["elements"]
    without_gpu["spec"]["features"]["instances"]["pci.device"]["elements"] = [
        d for d in pci if d["attributes"]["vendor"] != "10de"]
    seen, first = [], []
    for _ in range(cycles):
        for obj, want in ((without_gpu, "denied:disagreement"), (original, "fast:1")):
            api.add_features(obj)  # MODIFIED: same namespace and name
            changed = time.monotonic()
            deadline = changed + 120
            while True:
                response, elapsed = client.post(review)
                if answer(response) == want:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"a NodeFeature change did not reach admissions in 120 s ({answer(response)})")
            seen.append(time.monotonic() - changed)
            first.append(elapsed)
    return {"change": percentile(seen, 0.5), "change_max": max(seen), "http_cold": percentile(first, 0.5) * 1e3}


def measure(count: int, certs: Dict[str, Path], work: Path, managed_fields: bool) -> Dict[str, float]:
    """Every NFD figure at one cluster size."""
    api = t.FakeKubeAPI(certs)
    started = time.monotonic()
    names, size = load_cluster(api, count, managed_fields)
    generated = time.monotonic() - started
    kinds = hardware_kinds()
    token = work / "token"
    token.write_text(api.token)
    spec_path = work / "nfd-spec.yaml"
    spec_path.write_text(SPEC)
    reviews = {key: t.review_of(pod) for key, pod in pods(kinds).items()}
    expected = {"kind": "fast:1", "generic": "generic:1", "any": "denied:disagreement"}
    port = free_port()
    log_path = work / f"serve-nfd-{count}.log"
    log_file = open(log_path, "w")
    server = subprocess.Popen(serve_command(ROOT / "ocifit.py", [
        ("--port", str(port)), ("--bind", "127.0.0.1"), ("--cert", str(certs["crt"])), ("--key", str(certs["key"])),
        ("--kube-api", api.url), ("--kube-token-file", str(token)), ("--kube-ca", str(certs["ca"])),
        ("--artifact", f"{REF}={spec_path}")]), stderr=log_file)
    started = time.monotonic()
    client = Client(port, certs["ca"])
    try:
        try:
            wait_ready(port, certs["ca"], seconds=600)
        except SystemExit:
            log_file.flush()
            sys.stderr.write(log_path.read_text()[-3000:])
            raise
        ready = time.monotonic() - started
        ready_cpu = cpu_seconds(server.pid)
        for key, review in reviews.items():
            got = answer(client.post(review)[0])
            if got != expected[key]:
                raise SystemExit(f"{count} nodes, {key} pod: {got}, expected {expected[key]}")
        rss = proc_status(server.pid)
        http: Dict[str, float] = {}
        for key in ("kind", "any"):
            times = [client.post(reviews[key])[1] for _ in range(500)]
            http[f"http_p50_{key}"], http[f"http_p99_{key}"] = (percentile(times, 0.5) * 1e3,
                                                                percentile(times, 0.99) * 1e3)
        changes = feature_changes(api, client, reviews["kind"], names[FAST_KIND + KINDS * (count // KINDS // 2)], 3)
        decisions = in_process(api, token, certs, spec_path, reviews, expected)
        peak = proc_status(server.pid)
    finally:
        client.close()
        stop(server)
        log_file.close()
        api.stop()
    return dict(decisions, **http, **changes, ready=ready, ready_cpu=ready_cpu, rss=rss["VmRSS"] / 1024,
                peak=peak["VmHWM"] / 1024, rss_end=peak["VmRSS"] / 1024, size=size / 1024, generated=generated,
                objects=len(api.features))


# ---- the report -----------------------------------------------------------------------------------------------

ROWS = [  # key, what, target (<=), format
    ("ready", "ready (s)", 30.0, ".2f"),
    ("ready_cpu", "server CPU until ready (s)", None, ".2f"),
    ("rss", "RSS after sync (MB)", 150.0, ".1f"),
    ("peak", "peak RSS, whole run (MB)", 250.0, ".1f"),
    ("rss_end", "RSS at the end (MB)", None, ".1f"),
    ("warm_p50_kind", "warm decide p50, pinned pod (us)", None, ".1f"),
    ("warm_p99_kind", "warm decide p99, pinned pod (us)", 1000.0, ".1f"),
    ("warm_p50_any", "warm decide p50, any worker (us)", None, ".1f"),
    ("warm_p99_any", "warm decide p99, any worker (us)", 1000.0, ".1f"),
    ("cold_kind", "cold decide p50, pinned pod (us)", None, ".0f"),
    ("cold_generic", "cold decide p50, generic kind (us)", None, ".0f"),
    ("cold_any", "cold decide p50, any worker (us)", None, ".0f"),
    ("http_p50_kind", "HTTPS round trip p50, pinned (ms)", None, ".2f"),
    ("http_p99_kind", "HTTPS round trip p99, pinned (ms)", None, ".2f"),
    ("http_p50_any", "HTTPS round trip p50, any (ms)", None, ".2f"),
    ("http_p99_any", "HTTPS round trip p99, any (ms)", None, ".2f"),
    ("http_cold", "HTTPS first after a change (ms)", None, ".2f"),
    ("change", "feature change -> admission p50 (s)", None, ".3f"),
    ("change_max", "feature change -> admission max (s)", None, ".3f"),
]

LABEL_ROWS = [("ready", "ready (s)", None, ".2f"), ("rss", "RSS after sync (MB)", 80.0, ".1f"),
              ("peak", "peak RSS (MB)", 80.0, ".1f"), ("relabel", "relabel -> admission (s)", None, ".2f"),
              ("cold_p50", "cold decide p50 (us)", 1000.0, ".0f"), ("warm_p50", "warm decide p50 (us)", None, ".1f"),
              ("warm_p99", "warm decide p99 (us)", 1000.0, ".1f")]


def table(title: str, rows: List[Tuple[str, str, Optional[float], str]], results: Dict[int, Dict[str, float]],
          sizes: List[int]) -> List[str]:
    width = max(len(what) for _, what, _, _ in rows)
    lines = [title, f"  {'':{width}} {'target':>9}" + "".join(f" {f'{n} nodes':>16}" for n in sizes)]
    for key, what, target, fmt in rows:
        cells = []
        for n in sizes:
            value = results[n][key]
            verdict = "" if target is None else (" PASS" if value <= target else " MISS")
            cells.append(f" {format(value, fmt) + verdict:>16}")
        lines.append(f"  {what:{width}} {'<= ' + format(target, 'g') if target is not None else '':>9}"
                     + "".join(cells))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,5000")
    parser.add_argument("--no-label-only", action="store_true", help="skip bench/nodes.py's label-only figures")
    parser.add_argument("--managed-fields", action="store_true",
                        help="NodeFeatures listed with managedFields, as an API server lists them")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = workdir()
    nfd: Dict[int, Dict[str, float]] = {}
    label_only: Dict[int, Dict[str, float]] = {}
    try:
        certs = pki(work)
        for n in sizes:
            if not args.no_label_only:
                label_only[n] = nodes.measure(n, certs, work, ROOT / "ocifit.py", ocifit, "label-only")
            nfd[n] = measure(n, certs, work, args.managed_fields)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = nfd[sizes[0]]
    print(f"node view with NFD NodeFeatures by list+watch, CPython {sys.version.split()[0]}, {os.cpu_count()} cores: "
          f"{KINDS} hardware kinds, one NodeFeature per node (avg {first['size']:.1f} KB of JSON"
          f"{', with managedFields' if args.managed_fields else ''}) and a second one for 1 node in 10 "
          f"(another namespace); spec in NFD's dialect ({REF}: fast:1 or generic:1); 'pinned' pods select one kind "
          f"({FAST_KIND}: fast:1), 'any worker' pods get a disagreement denial")
    print("\n".join(table("NFD NodeFeatures (targets from the issue, at 5,000 nodes)", ROWS, nfd, sizes)))
    for n in sizes:
        r = nfd[n]
        print(f"  {n} nodes: {int(r['objects'])} NodeFeature objects, {r['size'] * r['objects'] / 1024:.0f} MB "
              f"listed (about), generated in {r['generated']:.1f} s")
    if label_only:
        print("\n".join(table("label-only nodes (bench/nodes.py's measure(), same run)", LABEL_ROWS, label_only,
                              sizes)))
    else:
        print("label-only figures skipped (--no-label-only): run bench/nodes.py for them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
