"""ocifit's behaviour, in the order of ocifit.py's sections: settings, spec, nodes, artifacts and registry,
admission, HTTP server, command line, shipping.

Real peers where they exist here: openssl for certificates, kubectl to apply every patch, Debian's
docker-registry with the oras client for artifacts. Set OCIFIT_REQUIRE_TOOLS=1 (CI does) to turn a
missing tool from a skip into a failure.
"""

from __future__ import annotations

import ast
import base64
import copy
import email.message
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings as hypothesis_settings, strategies as st

import ocifit

# CI runs the same examples every time, so a landing never hangs on a draw; local runs explore anew.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "example"
FLAVOR_REF = "ghcr.io/compspec/ocifit-k8s-compatibility:kind-example"
FLAVOR_KEY = "feature.node.ocifit-k8s.flavor"


# --------------------------------------------------------------------------------------------
# Helpers: tools, specs, nodes, pods, reviews
# --------------------------------------------------------------------------------------------

def need(tool: str) -> str:
    """The tool's path; skip (or, with OCIFIT_REQUIRE_TOOLS=1, fail) when it is not installed."""
    path = shutil.which(tool)
    if path:
        return path
    if os.environ.get("OCIFIT_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{tool} is required here (OCIFIT_REQUIRE_TOOLS=1) but not installed")
    pytest.skip(f"{tool} is not installed")


def expr(op: str, key: str = "f", value: Any = None) -> Dict[str, Any]:
    e: Dict[str, Any] = {"op": op, "key": key}
    if value is not None:
        e["value"] = value
    return e


def compat(tag: str, *expressions: Dict[str, Any], weight: Optional[int] = None) -> Dict[str, Any]:
    c: Dict[str, Any] = {"tag": tag, "description": f"use {tag}",
                         "rules": [{"matchFeatures": [{"matchExpressions": list(expressions)}]}]}
    if weight is not None:
        c["weight"] = weight
    return c


def spec_doc(*compatibilities: Dict[str, Any]) -> Dict[str, Any]:
    return {"version": "v1alpha1", "compatibilities": list(compatibilities)}


def flavor_spec() -> ocifit.Spec:
    return ocifit.parse_spec((EXAMPLE / "compatibility-test.json").read_bytes())


def node_obj(name: str, labels: Optional[Dict[str, str]] = None, unschedulable: bool = False,
             taints: Optional[List[Dict[str, str]]] = None, control_plane: bool = False) -> Dict[str, Any]:
    all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    all_labels.update(labels or {})
    spec: Dict[str, Any] = {}
    if control_plane:
        all_labels["node-role.kubernetes.io/control-plane"] = ""
        spec["taints"] = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    if taints:
        spec.setdefault("taints", []).extend(taints)
    if unschedulable:
        spec["unschedulable"] = True
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}, "spec": spec}


def snapshot_of(*nodes: Dict[str, Any]) -> ocifit.NodeSnapshot:
    return ocifit.NodeSnapshot(ocifit.node_from_object(n) for n in nodes)


def example_snapshot(name: str = "nodes-homogeneous.json") -> ocifit.NodeSnapshot:
    return ocifit.NodeSnapshot(ocifit.nodes_from_document(json.loads((EXAMPLE / name).read_text())))


def pod_obj(name: Optional[str] = "app", enabled: bool = True, ref: Optional[str] = FLAVOR_REF,
            image: str = "placeholder:latest", spec: Optional[Dict[str, Any]] = None,
            annotations: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    meta: Dict[str, Any] = {"namespace": "team-a", "labels": {"app": "demo"}, "annotations": {}}
    if name:
        meta["name"] = name
    else:
        meta["generateName"] = "demo-7d9c8b6f5-"
    if enabled:
        meta["labels"][ocifit.ENABLED_LABEL] = "true"
    if ref is not None:
        meta["annotations"][ocifit.IMAGE_REF_ANNOTATION] = ref
    meta["annotations"].update(annotations or {})
    pod_spec: Dict[str, Any] = {"containers": [{"name": "main", "image": image}]}
    pod_spec.update(spec or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def review_of(pod: Dict[str, Any], operation: str = "CREATE", kind: str = "Pod", uid: str = "uid-1",
              api_version: str = "admission.k8s.io/v1") -> Dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
                        "resource": {"group": "", "version": "v1", "resource": kind.lower() + "s"},
                        "namespace": pod["metadata"].get("namespace", ""), "name": pod["metadata"].get("name", ""),
                        "operation": operation, "object": pod, "userInfo": {"username": "tester"}}}


class FileArtifacts:
    """Artifacts by ref for decide(); raises like the real sources do."""

    def __init__(self, **by_ref: Any):
        self.by_ref = by_ref

    def __call__(self, ref: str) -> ocifit.Artifact:
        spec = self.by_ref.get(ref, flavor_spec() if ref == FLAVOR_REF else None)
        if spec is None:
            raise ocifit.ArtifactError(f"artifact {ref} is not configured")
        if isinstance(spec, dict):
            spec = ocifit.parse_spec(spec)
        return ocifit.Artifact(ref, spec, "sha256:" + "a" * 64, "file")


def decide(pod: Dict[str, Any], snapshot: Optional[ocifit.NodeSnapshot] = None, **review_kw: Any
           ) -> ocifit.Decision:
    return ocifit.decide(review_of(pod, **review_kw)["request"], snapshot or example_snapshot(), FileArtifacts())


def handled(webhook: ocifit.Webhook, body: bytes) -> "tuple[int, Dict[str, Any]]":
    """What the webhook answers a body, decoded as the API server (or the review subcommand) reads it."""
    status, reply = webhook.handle(body)
    return status, json.loads(reply)


def reply_to(review: Dict[str, Any], decision: ocifit.Decision) -> Dict[str, Any]:
    return json.loads(ocifit.encode_review_response(review, decision))


def patch_of(response: Dict[str, Any]) -> List[Dict[str, Any]]:
    return json.loads(base64.b64decode(response["patch"]))


def kubectl_patch(pod: Dict[str, Any], patch: List[Dict[str, Any]], tmp_path: Path) -> Dict[str, Any]:
    """The pod after `kubectl patch --local --type=json`: the patch as a real client applies it."""
    kubectl = need("kubectl")
    pod_file = tmp_path / "pod.json"
    pod_file.write_text(json.dumps(pod))
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "no-kubeconfig"))
    done = subprocess.run([kubectl, "patch", "--local", "-f", str(pod_file), "--type=json",
                           "-p", json.dumps(patch), "-o", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def run_cli(*args: str, stdin: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(HERE / "ocifit.py"), *args], capture_output=True, text=True, input=stdin,
                          cwd=HERE, env=dict(os.environ, **(env or {})), timeout=60)


def _loopback(host: str) -> bool:
    """Whether a host stays on this machine: loopback, or the unspecified address, in any numeric form
    (127.1 and 2130706433 included, as inet_aton reads them)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0].strip("[]"))
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            return host == "localhost"
    return ip.is_loopback or ip.is_unspecified


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test talks to this machine only: a name or address beyond loopback fails the test."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(str(address[0])):
            raise AssertionError(f"a test tried to connect to {address[0]}")
        return real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _loopback(host.decode() if isinstance(host, bytes) else str(host)):
            raise AssertionError(f"a test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

def test_ocifit_py_imports_only_the_standard_library() -> None:
    tree = ast.parse((HERE / "ocifit.py").read_text())
    modules: set = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    assert sorted(m for m in modules if m not in sys.stdlib_module_names and m != "__future__") == []


def test_every_flag_reads_its_environment_twin_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCIFIT_PORT", "9443")
    monkeypatch.setenv("TLS_CERT_PATH", "/certs/tls.crt")
    monkeypatch.setenv("OCIFIT_ALLOWED_REGISTRIES", "ghcr.io, registry.local:5000")
    monkeypatch.setenv("OCIFIT_PLAIN_HTTP", "true")
    args = ocifit.build_parser().parse_args(["serve"])
    settings = ocifit.Settings.from_namespace(args)
    assert (settings.port, settings.cert, settings.plain_http) == (9443, "/certs/tls.crt", True)
    assert settings.allowed_registries == ("ghcr.io", "registry.local:5000")
    flagged = ocifit.Settings.from_namespace(ocifit.build_parser().parse_args(["serve", "--port", "8000"]))
    assert flagged.port == 8000
    fields = {f.name for f in ocifit.dataclasses.fields(ocifit.Settings)}
    for options in ocifit.OPTION_GROUPS.values():
        for option in options:
            assert option.dest in fields and option.env and all(e.isupper() for e in option.env)


def test_a_bad_environment_value_is_named() -> None:
    done = run_cli("serve", "--help", env={"OCIFIT_PORT": "eighty"})
    assert done.returncode != 0 and "OCIFIT_PORT" in done.stderr


# --------------------------------------------------------------------------------------------
# Compatibility spec: operators, weights, explanations, malformed specs
# --------------------------------------------------------------------------------------------

OPERATOR_CASES = [
    ("In", ["a", "b"], {"f": "b"}, True), ("In", ["a", "b"], {"f": "c"}, False), ("In", ["a"], {}, False),
    ("In", "a", {"f": "a"}, True),  # a bare string is a one-item list
    ("NotIn", ["a"], {}, True), ("NotIn", ["a"], {"f": "c"}, True), ("NotIn", ["a"], {"f": "a"}, False),
    ("InRegexp", ["^6\\.", "rc"], {"f": "6.1"}, True),
    ("InRegexp", ["^6\\.", "rc"], {"f": "5.10-rc1"}, True),  # unanchored search, as Go's MatchString
    ("InRegexp", ["^6\\."], {"f": "5.10"}, False), ("InRegexp", ["."], {}, False),
    ("InRegexp", ["abc\\z"], {"f": "xabc"}, True), ("InRegexp", ["abc\\z"], {"f": "abcx"}, False),
    ("Exists", None, {"f": ""}, True), ("Exists", None, {}, False),
    ("DoesNotExist", None, {}, True), ("DoesNotExist", None, {"f": "x"}, False),
    ("Gt", ["5"], {"f": "6"}, True), ("Gt", ["5"], {"f": "5"}, False), ("Gt", ["-1"], {"f": "0"}, True),
    ("Gt", ["5"], {"f": "10"}, True),  # integers, not strings: "10" > "5"
    ("Gt", ["5"], {"f": "six"}, False), ("Gt", ["5"], {}, False),
    ("Lt", ["5"], {"f": "4"}, True), ("Lt", ["5"], {"f": "5"}, False),
    ("Gte", "1", {"f": "1"}, True), ("Gte", "1", {"f": "0"}, False),
    ("Lte", ["1"], {"f": "1"}, True), ("Lte", ["1"], {"f": "2"}, False),
    ("GtLt", ["1", "10"], {"f": "5"}, True), ("GtLt", ["1", "10"], {"f": "1"}, False),
    ("GtLt", ["1", "10"], {"f": "10"}, False),
    ("IsTrue", None, {"f": "true"}, True), ("IsTrue", None, {"f": "True"}, False), ("IsTrue", None, {}, False),
    ("IsFalse", None, {"f": "false"}, True), ("IsFalse", None, {"f": "true"}, False),
]


@pytest.mark.parametrize("op,value,labels,holds", OPERATOR_CASES)
def test_operator_on_node_labels(op: str, value: Any, labels: Dict[str, str], holds: bool) -> None:
    spec = ocifit.parse_spec(spec_doc(compat("img:1", expr(op, "f", value))))
    assert (spec.select(labels).chosen is not None) is holds


def test_every_expression_of_every_rule_must_hold() -> None:
    c = compat("img:1", expr("In", "a", ["1"]))
    c["rules"].append({"matchFeatures": [{"matchExpressions": [expr("In", "b", ["2"])]},
                                         {"matchExpressions": [expr("Exists", "c")]}]})
    spec = ocifit.parse_spec(spec_doc(c))
    assert spec.select({"a": "1", "b": "2", "c": ""}).chosen is not None
    assert spec.select({"a": "1", "b": "2"}).chosen is None
    assert spec.keys == frozenset({"a", "b", "c"})


def test_highest_weight_wins_and_the_first_listed_breaks_a_tie() -> None:
    spec = ocifit.parse_spec(spec_doc(compat("low:1", expr("Exists")), compat("high:1", expr("Exists"), weight=5),
                                      compat("also-high:1", expr("Exists"), weight=5)))
    assert spec.select({"f": "x"}).chosen.tag == "high:1"
    tie = ocifit.parse_spec(spec_doc(compat("first:1", expr("Exists")), compat("second:1", expr("Exists"), weight=0)))
    assert tie.select({"f": "x"}).chosen.tag == "first:1"
    negative = ocifit.parse_spec(spec_doc(compat("minus:1", expr("Exists"), weight=-1), compat("zero:1")))
    assert negative.select({"f": "x"}).chosen.tag == "zero:1"  # absent weight is 0


def test_explanation_names_the_first_failing_expression_and_why() -> None:
    spec = flavor_spec()
    selection = spec.select({FLAVOR_KEY: "vanilla"})
    text = selection.explain()
    assert "compatibilities[0] (debian:11): matched" in text
    assert ('compatibilities[1] (ubuntu:24.04): rules[0].matchFeatures[0].matchExpressions[0]: '
            'value "vanilla" of label "feature.node.ocifit-k8s.flavor" not in ["chocolate"]') in text
    assert text.endswith("chosen: compatibilities[0] (debian:11) weight 0")
    assert 'label "feature.node.ocifit-k8s.flavor" missing' in spec.select({}).why_none()


def test_the_upstream_ebpf_spec_selects_by_os_and_kernel() -> None:
    spec = ocifit.parse_spec((EXAMPLE / "ebpf-compatibility-spec.json").read_bytes())
    ubuntu = {"feature.node.kubernetes.io/system-os_release.ID": "ubuntu",
              "feature.node.kubernetes.io/system-os_release.VERSION_ID": "22.04",
              "feature.node.kubernetes.io/kernel-version.major": "6",
              "feature.node.kubernetes.io/kernel-version.minor": "12"}
    assert spec.select(ubuntu).chosen.tag.endswith(":ubuntu2204")
    old_kernel = dict(ubuntu, **{"feature.node.kubernetes.io/kernel-version.major": "5"})
    assert spec.select(old_kernel).chosen is None


def _malformed(mutate: Any) -> Dict[str, Any]:
    doc = spec_doc(compat("a:1", expr("In", "f", ["x"])), compat("b:1", expr("In", "f", ["y"])),
                   compat("c:1", expr("In", "f", ["z"])))
    mutate(doc)
    return doc


def _set_expr(index: int, **changes: Any) -> Any:
    def mutate(doc: Dict[str, Any]) -> None:
        e = doc["compatibilities"][index]["rules"][0]["matchFeatures"][0]["matchExpressions"][0]
        for k, v in changes.items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
    return mutate


MALFORMED = [
    (_set_expr(2, op="Equals"),
     'compatibilities[2].rules[0].matchFeatures[0].matchExpressions[0].op: unknown operator "Equals"'),
    (lambda d: d["compatibilities"][1].update(tag=None), "compatibilities[1].tag: expected the image to use"),
    (lambda d: d["compatibilities"][1].update(tag=""), 'compatibilities[1].tag: "" is not an image reference'),
    (lambda d: d["compatibilities"][0].update(tag="debian 11"), "compatibilities[0].tag"),
    (_set_expr(0, value=7), "matchExpressions[0].value: expected a list of strings or a string, got int"),
    (_set_expr(0, value=["ok", 3]), "matchExpressions[0].value[1]: expected a string, got int"),
    (_set_expr(0, key=None), "matchExpressions[0].key: expected a string, got null"),
    (_set_expr(0, op="InRegexp", value=["("]), "missing closing ): `(`"),
    (_set_expr(0, op="InRegexp", value=["a++"]), "invalid nested repetition operator"),
    (_set_expr(1, op="Gt", value=["five"]), 'compatibilities[1].rules[0].matchFeatures[0].matchExpressions[0]'
                                           '.value[0]: "five" is not an integer'),
    (_set_expr(0, op="Gt", value=["9" * 30]), "is not an integer"),
    (_set_expr(0, op="Gt", value=["1", "2"]), "needs exactly 1 integer value, got 2"),
    (_set_expr(0, op="GtLt", value=["10", "1"]), "lower bound first"),
    (_set_expr(0, op="In", value=[]), "needs at least one value"),
    (_set_expr(0, op="Exists", value=["x"]), "operator Exists takes no value"),
    (_set_expr(0, values=["x"]), 'unsupported key "values"'),
    (lambda d: d["compatibilities"][0].update(weight="high"), "compatibilities[0].weight: expected an integer"),
    (lambda d: d["compatibilities"][0].update(weight=True), "compatibilities[0].weight: expected an integer"),
    (lambda d: d["compatibilities"][0].pop("rules"), "compatibilities[0].rules: expected a list of rules"),
    (lambda d: d["compatibilities"][0]["rules"][0].update(matchAny=[]), "the spec mixes two dialects"),
    (lambda d: d.update(compatibilities=[]), "lists no compatibilities"),
    (lambda d: d.update(compatibilities={"tag": "x"}), "compatibilities: expected a list"),
]


@pytest.mark.parametrize("mutate,message", MALFORMED)
def test_a_malformed_spec_is_rejected_whole_naming_the_place(mutate: Any, message: str) -> None:
    with pytest.raises(ocifit.SpecError) as caught:
        ocifit.parse_spec(_malformed(mutate))
    assert message in str(caught.value)


@pytest.mark.parametrize("data,message", [
    (b"{not json", "spec is not valid JSON"), (b"[" * 60000, "spec is not valid JSON"),
    (b"[]", "spec: expected an object with compatibilities"),
])
def test_a_spec_that_is_not_a_json_object_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ocifit.SpecError, match=message):
        ocifit.parse_spec(data)


def test_a_json_spec_reads_as_nfds_decoder_reads_it_and_one_byte_order_mark_is_stripped() -> None:
    rules = [{"matchFeatures": [{"matchExpressions": [{"op": "Exists", "key": "k"}]}]}]
    text = json.dumps(spec_doc({"tag": "a:1", "weight": 5.0, "rules": rules},
                               {"tag": "b:1", "weight": 1, "rules": rules}))
    spec = ocifit.parse_spec(text.replace("5.0", "1e2").replace('"a:1"', "NaN").encode())
    assert [(c.tag, c.weight) for c in spec.compatibilities] == [("NaN", 100), ("b:1", 1)]  # NaN: a word in YAML 1.1
    with pytest.raises(ocifit.SpecError, match=r"\\ud83d is a UTF-16 surrogate escape"):
        ocifit.parse_spec(text.replace("a:1", "\\ud83d\\ude00").encode())
    with pytest.raises(ocifit.SpecError, match="byte order mark"):  # a second one is content, refused
        ocifit.load_document("\ufeff\ufeffa: 1".encode(), "spec")
    assert ocifit.load_document("\ufeffa: 1".encode(), "spec") == {"a": 1}


def test_a_spec_with_too_many_expressions_is_rejected() -> None:
    many = [expr("Exists", f"k{i}") for i in range(ocifit.MAX_EXPRESSIONS + 1)]
    with pytest.raises(ocifit.SpecError, match="more than 256 expressions"):
        ocifit.parse_spec(spec_doc(compat("a:1", *many)))


# Go's own verdicts (go1.27 regexp.Compile and MatchString, recorded from a Go program run on each pair):
# (pattern, text, Go's error or None, whether it matches)
GO_REGEX_VERDICTS = [
    ('(?U)a+', 'aaa', None, True),
    ('\\pL', '1é', None, True),
    ('(?<n>a)', 'a', None, True),
    ('[[:alpha:]]', '1', None, False),
    ('\\Z', 'a', 'error parsing regexp: invalid escape sequence: `\\Z`', False),
    ('a++', 'a', 'error parsing regexp: invalid nested repetition operator: `++`', False),
    ('a{1001}', 'a', 'error parsing regexp: invalid repeat count: `{1001}`', False),
    ('x*$', 'x\n', None, True),
    ('x$', 'x\n', None, False),
    ('(?m)^b', 'a\nb', None, True),
    ('(?i)K', 'K', None, True),
    ('(?i)ſ', 's', None, True),
    ('(?i)s', 'ſ', None, True),
    ('(?i)σ', 'ς', None, True),
    ('(?i)i', 'ı', None, False),
    ('(?i)ı', 'I', None, False),
    ('(?i)ß', 'ẞ', None, True),
    ('(?i)[k]', 'K', None, True),
    ('(?i)\\W', 'ſ', None, False),
    ('(?i)[^k]', 'K', None, False),
    ('(?i)\\pL', 'ͅ', None, True),
    ('(?i)\\p{Lu}', 'a', None, True),
    ('(?i)\\P{Lu}', 'a', None, False),
    ('(?i)[\\PL]', 'A', None, False),
    ('(?i)ΐ', 'ΐ', None, True),
    ('^5\\.1[0-5]', '5.12', None, True),
    ('^(0x)?8086$', '0x8086', None, True),
    ('^i[0-9]+$', 'i915', None, True),
    ('a{,5}', 'a{,5}', None, True),
    ('x{1001', 'x{1001', None, True),
    ('a{', 'a{', None, True),
    ('{', '{', None, True),
    ('a{1,2', 'a{1,2', None, True),
    ('\\b', '', None, False),
    ('\\B', '', None, True),
    ('^$', '', None, True),
    ('(?m)^$', 'a\n', None, True),
    ('(?m)$', '', None, True),
    ('(?s).', '\n', None, True),
    ('.', '\n', None, False),
    ('[^a]', '\n', None, True),
    ('\\Qa*\\E+', 'a*a*', None, True),
    ('\\Q', '', None, True),
    ('(|a)*', 'b', None, True),
    ('(a*)*', 'b', None, True),
    ('(a|)+b', 'b', None, True),
    ('()', '', None, True),
    ('(?i)(?-i:a)A', 'aA', None, True),
    ('a(?i)b', 'aB', None, True),
    ('a(?i)*', 'aaa', None, True),
    ('a*(?i)*', 'a', None, True),
    ('^*', 'a', None, True),
    ('\\b*', 'a', None, True),
    ('*', '', 'error parsing regexp: missing argument to repetition operator: `*`', False),
    ('(*)', '', 'error parsing regexp: missing argument to repetition operator: `*`', False),
    ('|*', '', 'error parsing regexp: missing argument to repetition operator: `*`', False),
    ('a|*', '', 'error parsing regexp: missing argument to repetition operator: `*`', False),
    ('(?i)', '', None, True),
    ('[]a]', ']', None, True),
    ('[^]a]', 'b', None, True),
    ('[a-]', '-', None, True),
    ('[a-b-c]', '-', None, True),
    ('[]', '', 'error parsing regexp: missing closing ]: `[]`', False),
    ('[^]', '', 'error parsing regexp: missing closing ]: `[^]`', False),
    ('[a', '', 'error parsing regexp: missing closing ]: `[a`', False),
    ('[[:alpha:]', '', 'error parsing regexp: missing closing ]: `[[:alpha:]`', False),
    ('[\\d-z]', '-', None, True),
    ('(?P<n>a)(?P<n>b)', 'ab', None, True),
    ('\\p{Greek}', 'α', None, True),
    ('\\pL{1000}', 'a', None, False),
    ('(?:(?:a){2}){500}', '', None, False),
    ('(?:(?:a){2}){501}', '', 'error parsing regexp: invalid repeat count: `{501}`', False),
    ('((a{10}){10}){10}', '', None, False),
    ('((a{10}){10}){11}', '', 'error parsing regexp: invalid repeat count: `{11}`', False),
    ('(a{2}){0}{1000}', '', 'error parsing regexp: invalid nested repetition operator: `{0}{1000}`', False),
    ('\\x{D7FF}', '\ud7ff', None, True),
    ('\\', '', 'error parsing regexp: trailing backslash at end of expression: ``', False),
    ('a\\', '', 'error parsing regexp: trailing backslash at end of expression: ``', False),
    ('[\\', '', 'error parsing regexp: trailing backslash at end of expression: ``', False),
    ('(?i)ǅ', 'Ǆ', None, True),
    ('[\\x{0}-\\x{10FFFF}]', '\U0010ffff', None, True),
    ('(?i)[\\x{100}-\\x{1E943}]', 'A', None, False),
    ('\\C', '', 'error parsing regexp: invalid escape sequence: `\\C`', False),
    ('(?P<n', '', 'error parsing regexp: invalid named capture: `(?P<n`', False),
    ('(?<n', '', 'error parsing regexp: invalid named capture: `(?<n`', False),
    ('(?P', '', 'error parsing regexp: invalid or unsupported Perl syntax: `(?P`', False),
    ('(?', '', 'error parsing regexp: invalid or unsupported Perl syntax: `(?`', False),
    ('(?i', '', 'error parsing regexp: invalid or unsupported Perl syntax: `(?i`', False),
    ('x(?i', '', 'error parsing regexp: invalid or unsupported Perl syntax: `(?i`', False),
    ('a.c', 'abc', None, True),
    ('a.c', 'a\nc', None, False),
    ('(?i)straße', 'STRASSE', None, False),
    ('[[:^alpha:]]', 'a1', None, True),
    ('\\p{^L}', '1', None, True),
    ('(?i)[^K]', 'k', None, False),
    ('\\bx\\b', 'a x', None, True),
    ('\\Bx', 'ax', None, True),
    ('(?m)a$', 'a\nb', None, True),
    ('a$', 'a\n', None, False),
    ('\\Aa', 'ba', None, False),
    ('a\\z', 'ab', None, False),
    ('[\\d-z]', '5', None, True),
    ('x{2}{3}', '', 'error parsing regexp: invalid nested repetition operator: `{2}{3}`', False),
    ('a**', '', 'error parsing regexp: invalid nested repetition operator: `**`', False),
    ('(?i)\\W', 'k', None, False),
    ('\\x{110000}', '', 'error parsing regexp: invalid escape sequence: `\\x{110000`', False),
    ('\\pZ', '\xa0', None, True),
    ('\\p{Nd}', '٣', None, True),
    ('\\pN', 'Ⅷ', None, True),
]


@pytest.mark.parametrize("pattern,text,error,match", GO_REGEX_VERDICTS)
def test_patterns_are_read_and_matched_as_go_reads_and_matches_them(pattern: str, text: str, error: Optional[str],
                                                                     match: bool) -> None:
    if pattern.startswith("\\p{Greek"):  # the deliberate difference: no script property in the standard library
        error = f"error parsing regexp: Unicode script classes are not supported by ocifit: `{pattern}`"
    if error is not None:
        with pytest.raises(ocifit.SpecError) as refused:
            ocifit.compile_pattern(pattern, "p")
        assert str(refused.value) == f"p: pattern {pattern!r} refused: {error}"
        return
    assert ocifit.compile_go(pattern, max_program=10 ** 7).search(text) is match
    try:
        assert ocifit.compile_pattern(pattern, "p").search(text) is match
    except ocifit.SpecError as exc:  # the other deliberate difference: a program too large to search in bounded time
        assert f"more than the limit of {ocifit.MAX_PROGRAM}" in str(exc)


@pytest.mark.parametrize("pattern", [".?" * 40 + "Z", ".{0,9}" * 20 + "Z", "(a|a)*" * 20 + "b", "((a{0,9}){0,9}){0,5}"])
def test_patterns_that_backtrack_elsewhere_are_evaluated_whole_or_refused_for_their_size(pattern: str) -> None:
    """Linear time by construction: the matcher never backtracks, and a program past MAX_PROGRAM instructions is
    refused naming the limit (bench/attack.py times the worst that fit)."""
    try:
        regex = ocifit.compile_pattern(pattern, "p")
    except ocifit.SpecError as exc:
        assert f"more than the limit of {ocifit.MAX_PROGRAM}" in str(exc)
        return
    assert regex.size <= ocifit.MAX_PROGRAM and regex.search("ocifit-worker" * 70) is False


def test_a_pod_whose_placement_costs_past_the_budget_is_denied_and_others_are_not_held_up() -> None:
    """2,000 nodes and a pod with 1,000 matchFields requirements: 2 million tests, over the evaluation budget."""
    snapshot = snapshot_of(*(node_obj(f"w{i}", {"feature.node.ocifit-k8s.flavor": "vanilla"}) for i in range(2000)))
    far = [{"key": "metadata.name", "operator": "NotIn", "values": [f"x{i}"]} for i in range(1000)]
    pod = pod_obj(spec={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": far}]}}}})
    decision = ocifit.decide(review_of(pod)["request"], snapshot, FileArtifacts())
    assert (decision.allowed, decision.reason, decision.code) == (False, "too-costly", 422)
    assert "more than the evaluation budget of 1,000,000 units" in decision.message
    assert ocifit.decide(review_of(pod_obj())["request"], snapshot, FileArtifacts()).image == "debian:11"


def test_a_spec_over_a_limit_is_refused_naming_it() -> None:
    big = spec_doc(compat("a:1", expr("In", "k", ["v" * 4000] * 20)))
    with pytest.raises(ocifit.SpecError, match="bytes, over the limit of 64 KiB"):
        ocifit.parse_spec(json.dumps(big).encode())
    four_rules = [{"matchFeatures": [{"matchExpressions": [expr("Exists", "k")]}]}] * 4
    with pytest.raises(ocifit.SpecError, match="80 rules in all, over the limit of 64"):
        ocifit.parse_spec(spec_doc(*(dict(compat(f"a:{i}"), rules=four_rules) for i in range(20))))
    with pytest.raises(ocifit.SpecError, match="more than 256 values"):
        ocifit.parse_spec(spec_doc(compat("a:1", expr("In", "k", [str(i) for i in range(257)]))))


# ---- NFD's dialect: its own test tables, its example, explanations ----

NFD_CASES = json.loads((HERE / "testdata" / "nfd-cases.json").read_text())


def match_nfd(tmp_path: Path, spec: Any, features: Any, *extra: str,
              capsys: Optional[pytest.CaptureFixture] = None) -> "tuple[int, str, str]":
    """`match --spec S --node-features F` run in this process (hundreds of cases), with (exit, stdout, stderr)."""
    spec_file, features_file = tmp_path / "spec.yaml", tmp_path / "features.json"
    spec_file.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    features_file.write_text(features if isinstance(features, str) else json.dumps(features))
    root = logging.getLogger()
    level = root.level
    try:
        code = ocifit.main(["match", "--spec", str(spec_file), "--node-features", str(features_file), "--log-level",
                            "error", *extra])
    finally:
        root.setLevel(level)  # main() set up logging for a process of its own
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def one_expression_spec(feature: str, element: str, case: Dict[str, Any]) -> Dict[str, Any]:
    expression: Dict[str, Any] = {"op": case["op"]}
    if case["value"]:
        expression["value"] = case["value"]
    if case.get("type"):
        expression["type"] = case["type"]
    return {"version": "v1alpha1", "compatibilities": [{"tag": "ok", "rules": [
        {"name": "r", "matchFeatures": [{"feature": feature, "matchExpressions": {element: expression}}]}]}]}


def expression_case_features(case: Dict[str, Any]) -> "tuple[str, Dict[str, Any]]":
    """(element, bare features) putting the case's input where NFD's test put it."""
    if case["level"] == "keys":
        return case["key"], {"flags": {"t.set": {"elements": {k: {} for k in case["input"] or []}}}}
    if case["level"] == "values":
        return case["key"], {"attributes": {"t.set": {"elements": dict(case["input"] or {})}}}
    if case["valid"] and case["input"] is None:  # present with no value: a flag
        return "e", {"flags": {"t.set": {"elements": {"e": {}}}}}
    elements = {"e": case["input"]} if case["valid"] else {}
    return "e", {"attributes": {"t.set": {"elements": elements}}}


def refused_up_front(case: Dict[str, Any]) -> bool:
    """Where ocifit is stricter than NFD, by design: a spec it refuses whole, where NFD's code only errs (or not)
    once an element is there to test: a value count or bound order that is wrong, a `type` on an operator that
    ignores it, a value that is no integer or version."""
    op, values, kind = case["op"], case["value"], case.get("type")
    counts = {"": 0, "Exists": 0, "DoesNotExist": 0, "IsTrue": 0, "IsFalse": 0, "Gt": 1, "Ge": 1, "Lt": 1, "Le": 1,
              "GtLt": 2, "GeLe": 2}
    if op not in counts and op not in ("In", "NotIn", "InRegexp"):
        return True
    if (op in counts and len(values) != counts[op]) or (op in ("In", "NotIn", "InRegexp") and not values):
        return True
    if kind and op not in ocifit.RANGE_OPERATORS:
        return True
    if op in ocifit.RANGE_OPERATORS:
        parse = ocifit.parse_version if kind == "version" else ocifit.parse_strict_integer
        bounds: List[Any] = [parse(v) for v in values]
        return None in bounds or (len(bounds) == 2 and not bounds[0] < bounds[1])
    if op == "InRegexp":
        try:
            [ocifit.compile_pattern(v, "v") for v in values]
        except ocifit.SpecError:
            return True
    return False


@pytest.mark.parametrize("case", NFD_CASES["expressions"], ids=[c["id"] for c in NFD_CASES["expressions"]])
def test_nfd_expression_table_through_match(case: Dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    element, features = expression_case_features(case)
    code, out, err = match_nfd(tmp_path, one_expression_spec("t.set", element, case), features, capsys=capsys)
    if refused_up_front(case):
        assert code == 2 and "invalid spec" in err, (code, err)
        return
    # NFD errs at run time on a node value that is no integer or version: ocifit calls that a non-match
    want = case["expect"] and not case["error"]
    assert (code, out) == ((0, "ok\n") if want else (1, "")), (case, err)


@pytest.mark.parametrize("case", NFD_CASES["rules"], ids=[c["id"] for c in NFD_CASES["rules"]])
def test_nfd_rule_table_through_match(case: Dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rule = {k: v for k, v in case["rule"].items() if k in ("name", "matchFeatures", "matchAny")}
    spec = {"version": "v1alpha1", "compatibilities": [{"tag": "ok", "rules": [rule]}]}
    code, out, err = match_nfd(tmp_path, spec, case["features"], capsys=capsys)
    if case["expect_error"]:
        assert code in (1, 2), (code, err)  # refused up front, or (a node value) a non-match
        return
    assert (code, out) == ((0, "ok\n") if case["expect_match"] else (1, "")), (case, err)


NFD_EXAMPLE = """\
# NFD's examples/image-compatibility.yaml
version: v1alpha1
compatibilities:
- description: "my image requirements"
  rules:
  - name: "kernel and cpu"
    matchFeatures:
    - feature: kernel.loadedmodule
      matchExpressions:
        vfio-pci: {op: Exists}
        ip_tables: {op: Exists}
    - feature: cpu.model
      matchExpressions:
        vendor_id: {op: In, value: ["Intel", "AMD"]}
    - feature: cpu.cpuid
      matchName: {op: InRegexp, value: ["^AVX"]}
  - name: "one of available nics"
    matchAny:
    - matchFeatures:
      - feature: pci.device
        matchExpressions:
          vendor: {op: In, value: ["0eee"]}
          class: {op: In, value: ["0200"]}
    - matchFeatures:
      - feature: pci.device
        matchExpressions:
          vendor: {op: In, value: ["0fff"]}
          class: {op: In, value: ["0200"]}
"""


def node_feature(node: str, features: Dict[str, Any], name: str = "", namespace: str = "node-feature-discovery"
                 ) -> Dict[str, Any]:
    """A NodeFeature object as nfd-worker writes it (api/nfd/v1alpha1)."""
    return {"apiVersion": "nfd.k8s-sigs.io/v1alpha1", "kind": "NodeFeature",
            "metadata": {"name": name or node, "namespace": namespace,
                         "labels": {"nfd.node.kubernetes.io/node-name": node}},
            "spec": {"features": features}}


def intel_node_features(nic_vendor: str = "0fff") -> Dict[str, Any]:
    return {"flags": {"kernel.loadedmodule": {"elements": {"vfio-pci": {}, "ip_tables": {}}},
                      "cpu.cpuid": {"elements": {"AVX": {}, "AVX2": {}, "SSE4": {}}}},
            "attributes": {"cpu.model": {"elements": {"vendor_id": "Intel", "family": "6"}},
                           "kernel.version": {"elements": {"full": "6.8.0-45-generic", "major": "6"}}},
            "instances": {"pci.device": {"elements": [{"attributes": {"vendor": "8086", "class": "0300"}},
                                                      {"attributes": {"vendor": nic_vendor, "class": "0200"}}]}}}


def test_shared_feature_sets_are_let_go_with_the_last_node_holding_them() -> None:
    """Churn: 50 versions of one node's 500 attributes, each shared while a node holds it, none kept after."""
    import gc
    gc.collect()
    before = len(ocifit.SHARED)
    def version(v: int) -> ocifit.NodeFeatures:
        return ocifit.features_from_object({"attributes": {"big": {"elements": {f"a{i}": f"{v}-{i}"
                                                                                for i in range(500)}}}})
    held = [version(v) for v in range(50)]
    again = version(49)
    assert again.attributes["big"] is held[-1].attributes["big"]  # nodes alike share one copy
    assert len(ocifit.SHARED) >= before + 50
    del held, again
    gc.collect()
    assert len(ocifit.SHARED) == before


def test_nfds_own_example_parses_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = ocifit.parse_spec(NFD_EXAMPLE.encode())
    assert spec.nfd and spec.features == {"kernel.loadedmodule", "cpu.model", "cpu.cpuid", "pci.device"}
    assert spec.compatibilities[0].tag == "" and len(spec.compatibilities[0].rules) == 2
    features = {"kind": "List", "items": [node_feature("fits", intel_node_features()),
                                          node_feature("other-nic", intel_node_features("1234"))]}
    code, out, err = match_nfd(tmp_path, NFD_EXAMPLE, features, "--explain", capsys=capsys)
    assert code == 1 and out == "" and "disagree" in err  # fits matches, other-nic matches nothing
    assert "1 wants compatibilities[0] (no tag) (fits), 1 matches no compatibility (other-nic)" in err
    # of a failing term on instances, the instance that came closest is shown
    assert "FAIL  pci.device.vendor {op: In, value: [\"0fff\"]}: \"1234\" not in [\"0fff\"] (instance 1)" in err
    assert 'OK    cpu.cpuid matchName {op: InRegexp, value: ["^AVX"]}: element "AVX" matches' in err
    code, out, _ = match_nfd(tmp_path, NFD_EXAMPLE, node_feature("fits", intel_node_features()), capsys=capsys)
    assert (code, out) == (0, "")  # the winning compatibility has no tag: nothing to print, exit 0


def test_nfd_explanations_as_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = NFD_EXAMPLE.replace('- description: "my image requirements"', '- tag: fast\n  description: "mine"')
    code, out, _ = match_nfd(tmp_path, spec, intel_node_features(), "--output", "json", capsys=capsys)
    answer = json.loads(out)
    assert code == 0 and answer["chosen"] == "fast"
    (group,) = answer["groups"]
    rules = group["compatibilities"][0]["rules"]
    assert [r["matched"] for r in rules] == [True, True] and group["nodes"] == ["node"]
    row = next(e for e in rules[0]["expressions"] if e["element"] == "vendor_id")
    assert row == {"path": "compatibilities[0].rules[0].matchFeatures[1].matchExpressions.vendor_id",
                   "feature": "cpu.model", "element": "vendor_id", "expression": '{op: In, value: ["Intel", "AMD"]}',
                   "holds": True, "why": '"Intel" is listed'}


@pytest.mark.parametrize("expression,value,holds,why", [
    ({"op": "Ge", "value": ["6.1"], "type": "version"}, "6.8.0-45-generic", True, '"6.8.0-45-generic" is >= 6.1'),
    ({"op": "Ge", "value": ["6.10"], "type": "version"}, "6.8.0", False, '"6.8.0" is not >= 6.10'),
    ({"op": "Ge", "value": ["5.14"], "type": "version"}, "5.14.0-427.13.1.el9_4.x86_64", True, "is >= 5.14"),
    ({"op": "GeLe", "value": ["v5.4", "6.1.0+build7"], "type": "version"}, "5.15", True, "is between (inclusive)"),
    ({"op": "Gt", "value": ["5"], "type": "version"}, "-11", False, '"-11" is not a version'),
    ({"op": "Gt", "value": ["5"]}, "6.0", False, '"6.0" is not an integer'),
    ({"op": "Gte", "value": ["5"]}, "5", True, '"5" is >= 5'),  # ocifit's name for Ge
    ({"op": "NotIn", "value": ["x"]}, None, False, "missing"),  # NFD: NotIn on a missing element is false
    ({}, None, True, "no operator: always holds"),
])
def test_nfd_operators_versions_and_missing_elements(expression: Dict[str, Any], value: Optional[str], holds: bool,
                                                    why: str) -> None:
    spec = ocifit.parse_spec({"compatibilities": [{"tag": "t", "rules": [{"matchFeatures": [
        {"feature": "Kernel.Version", "matchExpressions": {"full": expression}}]}]}]})
    elements = {} if value is None else {"full": value}
    features = ocifit.features_from_object({"attributes": {"kernel.version": {"elements": elements}}})
    (outcome,) = spec.compatibilities[0].rules[0].evaluate(features)[1]
    assert outcome.holds is holds and why in outcome.why, outcome


@pytest.mark.parametrize("spec,message", [
    ({"compatibilities": [{"rules": [{"matchFeatures": [{"feature": "a", "matchExpressions": {"e": {
        "op": "Gt", "value": ["1", "2"]}}}]}]}]}, "operator Gt takes exactly 1 value, got 2"),
    ({"compatibilities": [{"rules": [{"matchFeatures": [{"feature": "a", "matchExpressions": {"e": {
        "op": "GeLe", "value": ["6.1", "5"], "type": "version"}}}]}]}]}, "GeLe needs the lower bound first"),
    ({"compatibilities": [{"rules": [{"matchFeatures": [{"feature": "a", "matchExpressions": {"e": {
        "op": "In", "value": ["x"], "type": "version"}}}]}]}]}, "type version goes only with Gt"),
    ({"compatibilities": [{"rules": [{"matchFeatures": [{"feature": "a", "matchExpressions": {"e": {
        "op": "Lt", "value": ["1_0"]}}}]}]}]}, '"1_0" is not an integer'),
    ({"compatibilities": [{"rules": [{"matchFeatures": [{"feature": "a", "matchExpressions": {"e": {
        "op": "Lt", "value": ["six"], "type": "version"}}}]}]}]}, '"six" is not a version'),
    ({"compatibilities": [{"tag": "a", "rules": [{"matchFeatures": [{"feature": "a", "matchExpressions": {}}]}]},
                          {"tag": "b", "rules": [{"matchFeatures": [{"matchExpressions": [
                              {"op": "Exists", "key": "k"}]}]}]}]}, "the spec mixes two dialects"),
])
def test_a_malformed_nfd_spec_is_refused_whole_naming_the_place(spec: Dict[str, Any], message: str) -> None:
    with pytest.raises(ocifit.SpecError, match=re.escape(message)):
        ocifit.parse_spec(spec)


def test_review_chooses_by_node_features_from_files(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(NFD_SPEC)
    features = tmp_path / "features.json"
    features.write_text(json.dumps({"kind": "List", "items": [
        node_feature(name, cpu_features()) for name in ("ocifit-worker", "ocifit-worker2", "ocifit-worker3")]}))
    args = [str(EXAMPLE / "reviews" / "pod.json"), "--nodes", str(EXAMPLE / "nodes-heterogeneous.json"),
            "--artifact", f"{FLAVOR_REF}={spec}", "--patch"]
    done = run_cli("review", *args, "--node-features", str(features))
    assert done.returncode == 0 and json.loads(done.stdout)[0]["value"] == "fast:1", done.stderr
    denied = run_cli("review", *args)  # no features at all: denied, saying why
    assert denied.returncode == 1 and "is in NFD's dialect, which matches node features, but there are none: " \
        "ocifit reads nodes from a file, and no --node-features file was given" in denied.stderr
    spec.write_text(NFD_EXAMPLE)  # a winner without a tag names no image
    features.write_text(json.dumps({"kind": "List", "items": [
        node_feature(name, intel_node_features()) for name in ("ocifit-worker", "ocifit-worker2", "ocifit-worker3")]}))
    no_tag = run_cli("review", *args, "--node-features", str(features))
    assert no_tag.returncode == 1 and "names no image (no tag)" in no_tag.stderr


@pytest.mark.parametrize("data,message", [
    (b"version: v1\ncompatibilities: [\xff]\n", "is not UTF-8 text"),
    (b"compatibilities:\n- tag: a\n  weight: 1:" + b"0:" * 300 + b"0.5\n  rules: []\n", "a number out of range"),
    (b"compatibilities:\n- tag: a\n  weight: 0x" + b"f" * 4000 + b"\n  rules: []\n", "weight: out of range"),
])
def test_hostile_spec_bytes_are_a_clear_spec_error(data: bytes, message: str) -> None:
    with pytest.raises(ocifit.SpecError, match=re.escape(message)):
        ocifit.parse_spec(data)


def test_a_pattern_is_not_run_against_a_huge_value() -> None:
    spec = ocifit.parse_spec({"compatibilities": [{"tag": "t", "rules": [{"matchFeatures": [
        {"feature": "a", "matchExpressions": {"e": {"op": "InRegexp", "value": ["^a.*b$"]}}}]}]}]})
    features = ocifit.features_from_object({"attributes": {"a": {"elements": {"e": "a" * 100000}}}})
    (outcome,) = spec.compatibilities[0].rules[0].evaluate(features)[1]
    assert not outcome.holds and "longer than 1024 characters" in outcome.why


def test_the_readmes_nfd_example_runs_as_it_says() -> None:
    args = ["match", "--spec", str(EXAMPLE / "nfd" / "spec.yaml"), "--node-features",
            str(EXAMPLE / "nfd" / "nodefeatures.json"), "--nodes", str(EXAMPLE / "nodes-heterogeneous.json")]
    explained = run_cli(*args, "--explain")
    assert explained.returncode == 1 and "2 want fast (ocifit-worker, ocifit-worker2), 1 wants generic" in \
        explained.stderr
    assert '"5.15.0-119-generic" is not >= 6.1' in explained.stderr and "on-disagreement: pin" in explained.stderr
    pinned_down = run_cli(*args, "--node-selector", "kubernetes.io/hostname=ocifit-worker")
    assert (pinned_down.returncode, pinned_down.stdout) == (0, "fast\n")


def test_node_features_merge_as_nfd_master_does() -> None:
    worker = node_feature("n1", {"flags": {"cpu.cpuid": {"elements": {"AVX": {}}}},
                                 "attributes": {"kernel.version": {"elements": {"full": "6.1", "major": "6"}}},
                                 "instances": {"pci.device": {"elements": [{"attributes": {"vendor": "8086"}}]}}})
    extension = node_feature("n1", {"flags": {"cpu.cpuid": {"elements": {"AVX2": {}}}},
                                    "attributes": {"kernel.version": {"elements": {"full": "6.8"}}},
                                    "instances": {"pci.device": {"elements": [{"attributes": {"vendor": "10de"}}]}}},
                             name="a-vendor-extension", namespace="vendor")
    merged = ocifit.features_from_document({"items": [extension, worker]}, "node-feature-discovery")["n1"]
    assert merged.flags["cpu.cpuid"] == {"AVX", "AVX2"}  # united
    assert merged.attributes["kernel.version"] == {"full": "6.8", "major": "6"}  # NFD's own first, then overwritten
    assert [i["vendor"] for i in merged.instances["pci.device"]] == ["8086", "10de"]  # appended
    same = ocifit.features_from_document({"items": [worker]}, "node-feature-discovery")["n1"]
    again = ocifit.features_from_document({"items": [node_feature("n2", worker["spec"]["features"])]},
                                          "node-feature-discovery")["n2"]
    assert same.attributes["kernel.version"] is again.attributes["kernel.version"]  # one shared copy


# ---- the strict YAML subset specs may come in, differentially against PyYAML ----

_MISSING = object()


def same(a, b):
    """Strict equality: same types, dict key order, NaN == NaN, -0.0 != 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and all(
            same(x, y) for x, y in zip(a, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def pyyaml(text):
    """yaml.safe_load(text), or _MISSING if PyYAML rejects it (any exception)."""
    try:
        return yaml.safe_load(text)
    except Exception:  # PyYAML also raises ValueError etc. on odd input
        return _MISSING


def check_same(text):
    expected = yaml.safe_load(text)
    got = ocifit.load_yaml(text)
    assert same(got, expected), (text, got, expected)


def check_agree_or_refuse(text):
    """The safety property: load_yaml either raises ocifit.YAMLError or agrees with PyYAML."""
    try:
        got = ocifit.load_yaml(text)
    except ocifit.YAMLError as e:
        assert re.match(r"line \d+, column \d+: ", str(e)), str(e)
        return "refused (PyYAML %s)" % ("rejects" if pyyaml(text) is _MISSING else "accepts")
    expected = pyyaml(text)
    assert expected is not _MISSING, ("load_yaml accepted what PyYAML rejects", text, got)
    assert same(got, expected), (text, got, expected)
    return "accepted"



K8S_DEPLOYMENT = """\
# A Kubernetes manifest
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web, tier: "frontend"}
  annotations:
    example.com/compat: 'true'
    note: "a # not a comment"
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
        - name: nginx
          image: nginx:1.25.3@sha256:0123abcd
          args: ["--port", "8080", --verbose]
          ports:
            - containerPort: 80
              protocol: TCP
          env:
          - name: EMPTY
            value: ""
          - name: NUM
            value: "42"
          resources: {}
          command:
          - /bin/sh
          - -c
          - echo hi && sleep 1
      tolerations: []
      nodeSelector:
        kubernetes.io/os: linux
...
"""

VALID_DOCS = [
    NFD_EXAMPLE,
    K8S_DEPLOYMENT,
    "",
    "\n\n",
    "# only a comment\n",
    "---\n",
    "--- # comment\n",
    "---\n...\n",
    "a\n...\n",
    "a\n... # end\n# trailing comment\n",
    "--- a\n",
    "--- [a, b]\n",
    "--- {a: 1}  # c\n",
    "--- 'x'\n",
    "# c1\n\n# c2\n---\na: 1\n",
    "\ufeffa: 1\n",
    "a: 1\r\nb:\r\n- x\r\n",
    "a: 1\rb: 2\r",
    "plain scalar",
    "'single'",
    '"double"',
    "[a, 'b', \"c\"]",
    "{}",
    "[]",
    "[ ]",
    "{ }",
    "a:\n- b\n- c\nd: e\n",
    "a:\n  - b\n  - c\nd: e\n",
    "- a\n- b: c\n  d: e\n- - f\n  - g\n-\n- - - h\n",
    "-   a: 1\n    b: 2\n-   c\n",
    "- a:\n  - b\n  c: 1\n",
    "- a:\n- b\n",
    "-\n  a\n- # comment\n  b: 1\n",
    "key:\n  nested:\n    deeper: [1, 2, {x: y}]\n  sibling: ~\n",
    "a:\n  b\nc: 1\n",
    "a:\n\n  # comment\n\n  b: 1\n",
    "a:    # comment\n  - 1\n",
    "a: b # comment\nc: d#not-comment\n",
    "a: [b]#comment\nc: 'd'#comment\n",
    "a: 'b'  \n",
    "a : 1\n\"b\" : 2\n'c': 3\n",
    "a:\n",
    "a:\nb:\n",
    "a: \nb: ''\nc: \"\"\n",
    "- \n- ''\n",
    "  a: 1\n  b: 2\n",
    "    - a\n    - b\n",
    "x: -a\ny: ?b\nz: :c\nw: a:b\nv: a :b\n",
    "url: http://example.com:8080/path?q=1#frag\n",
    "a: b&c*d!e|f>g%h@i`j\n",
    "b: --\nc: ---x\nd: ...x\n",
    "a: [-]\nb: [-a, a-]\n",
    # scalars and type resolution
    "- ~\n- null\n- Null\n- NULL\n- nULL\n- none\n- ''\n- 'null'\n",
    "- yes\n- Yes\n- YES\n- yEs\n- no\n- No\n- NO\n- true\n- True\n- TRUE\n- tRUE\n"
    "- false\n- False\n- FALSE\n- on\n- On\n- ON\n- off\n- Off\n- OFF\n- y\n- n\n- Y\n- N\n",
    "- 0\n- -0\n- +0\n- 00\n- 012\n- 0o12\n- 09\n- 0x1F\n- 0X1F\n- -0x1f\n- 0b101\n"
    "- -0b11\n- 1_000\n- 0_\n- 1:20\n- -1:20:30\n- 190:20:30\n- 1__2\n- 0b\n- 0x\n",
    "- 1.0\n- -1.5\n- +1.\n- .5\n- -.5\n- 1e3\n- 1.0e3\n- 1.0e+3\n- 1.e-3\n- 1_0.5\n"
    "- .inf\n- -.Inf\n- +.INF\n- .nan\n- .NaN\n- .NAN\n- -.nan\n- 1:30.5\n- 1:2.5\n"
    "- 1_._e+1\n- 1.2.3\n- .\n- ._\n- 6.8523015e+5\n- 685.230_15e+03\n",
    "- 12345678901234567890123456789\n- 0x" + "f" * 100 + "\n",
    "1: a\n2.5: b\nfalse: c\n~: d\n'1': e\n",
    "{1: a, null: b, false: c}",
    "- 2001-12-14x\n- 2001-12-1\n- '2001-12-14'\n",
    # quoting
    "- 'it''s'\n- ''''\n- 'a\\b'\n- 'a\"b'\n- '#x'\n- ' lead'\n- 'trail '\n",
    '- "\\\\ \\" \\n \\t \\r \\0 \\/ \\a \\b \\e \\f \\v \\N \\_ \\L \\P \\ "\n',
    '- "\\x41\\u00e9\\U0001F600\\u263A\\t"\n- "tab\tinside"\n- "\\\ttab-escape"\n',
    "- 'tab\tinside'\n",
    '- "a\n  b"\n- "a\n\n  b"\n- "a  \n  b"\n- "a\\\n  b"\n- "a\\\n\n  b"\n',
    "- 'a\n  b'\n- 'a\n\n\n  b'\n- 'a \n   \n b'\n",
    'a: "x\ny"\nb: 1\n',
    '- "x\n- y"\n',
    "key: 'multi\n  line' # comment\n",
    '"quoted key": 1\n\'single key\': 2\n"": 3\n',
    "'a''b': \"c\\\"d\"\n",
    "- unicode: héllo wörld ✓ 日本語 😀\n",
    "- \"\\u00e9\": 1\n",
    # flow collections
    "{a: 1, b: [x, y], c: {d: e}}",
    "[a, [b, [c, [d]]], {e: [f]}]",
    "[a, b,]\n",
    "{a: 1,}\n",
    "{a: 1, b, c: }\n",
    "{a:1}\n",
    "{a:}\n",
    '{"a":1, \'b\':2}\n',
    "{a: , b: 1}\n",
    "[a :b]\n",
    "{a :b}\n",
    "[a, b\n  , c]\n",
    "a: [1,\n2,\n   3]\nb: 4\n",
    "a: {x: 1,  # comment\n    y: 2}\n",
    "[\n  a,\n  # comment\n  b\n]\n",
    "[a,#c\n b]\n",
    "{a: \n  1}\n",
    "[a b c, 'd e']\n",
    "[http://x/y, a:b, 'c: d']\n",
    "[\"a\n  b\", 'c\n\n  d']\n",
    "{a: [1, 2], b: {c: [3, {d: 4}]}}\n",
    "- [a, b]\n- {c: d}\n- []\n- {}\n",
    "a: []\nb: {}\n",
    # comments in odd places
    "# head\na: 1 # tail\n# between\nb: # after key\n  # inside\n  - 1 # item\n  # end\n",
    "- a # c\n# c\n- b\n",
    "#a: 1\n",
    "a: 1\n  # indented comment\nb: 2\n",
    # keys at the 1024 limit
    "k" * 1024 + ": v\n",
    "'" + "k" * 1022 + "': v\n",
    "{" + "k" * 1024 + ": v}\n",
]


@pytest.mark.parametrize("text", VALID_DOCS)
def test_valid_documents_match_pyyaml(text):
    check_same(text)


def test_nfd_example_value():
    got = ocifit.load_yaml(NFD_EXAMPLE)
    rule = got["compatibilities"][0]["rules"][0]
    assert rule["matchFeatures"][1]["matchExpressions"]["vendor_id"] == {
        "op": "In", "value": ["Intel", "AMD"]}
    assert got == yaml.safe_load(NFD_EXAMPLE)


# Documents PyYAML rejects: load_yaml must reject them too.
INVALID_DOCS = [
    "a: b: c\n",
    "a: 1\nb\n",
    "a: 1\n- b\n",
    "a:\n  - b\n - c\n",
    " a: 1\nb: 2\n",
    "- a: 1\n b: 2\n",
    "a:\tb\n",
    "a: b\tc\n",
    "[a,\tb]\n",
    "a: 1\n\t\nb: 2\n",
    "...\n",
    "# c\n...\n",
    "---\n---\n",
    "a\n...\nb\n",
    "a\n... b\n",
    "--- - a\n",
    "--- a: b\n",
    "[a, , b]\n",
    "[,]\n",
    "{a: 1: 2}\n",
    "{a\n: 1}\n",
    '{"a\nb": 1}\n',
    '"a\nb": 1\n',
    "a: [b]: c\n",
    '"a\n---\nb"\n',
    "[a,\n---\n]\n",
    "[a\n",
    "{a: 1\n",
    "'abc\n",
    '"abc\n',
    '"\\q"\n',
    '"\\x4"\n',
    '"\\U00110000"\n',
    "0b_\n",
    "0x_\n",
    "=\n",
    "a: <<\n",
    "*a\n",
    "[a]b\n",
    "a: 'b' c\n",
    "k" * 1025 + ": v\n",
    "{" + "k" * 1025 + ": v}\n",
    "a\x00b\n",
    "a: \x07\n",
    "- a\n  - b: c\n",
    "a: - b\n",
    "[- a]\n",
    "a: @x\n",
    "a: `x\n",
    "a: %x\n",
    "[a]]\n",
    "a: 1\n a2: 2\n",
]


@pytest.mark.parametrize("text", INVALID_DOCS)
def test_pyyaml_rejects_and_so_do_we(text):
    assert pyyaml(text) is _MISSING, "PyYAML accepts %r" % text
    with pytest.raises(ocifit.YAMLError):
        ocifit.load_yaml(text)


# Refusals: (text, construct named in the message, line, column).
REFUSALS = [
    ("a: &x 1\n", "anchors (&)", 1, 4),
    ("a: 1\nb: *x\n", "aliases (*)", 2, 4),
    ("a: !!str 1\n", "tags (!)", 1, 4),
    ("- !custom x\n", "tags (!)", 1, 3),
    ("---\na: 1\n---\nb: 2\n", "multiple documents", 3, 1),
    ("a: 1\n---\n", "multiple documents", 2, 1),
    ("a:\n\t- b\n", "tabs are not allowed for indentation", 2, 1),
    ("a:\n  \tb: 1\n", "tabs are not allowed for indentation", 2, 3),
    ("a: b\t# c\n", "tabs", 1, 5),
    ("%YAML 1.1\n---\na: 1\n", "directives (%)", 1, 1),
    ("%TAG ! tag:example.com,2000:\n---\na: 1\n", "directives (%)", 1, 1),
    ("a: |\n  text\n", "block scalars (| and >)", 1, 4),
    ("a: >-\n  text\n", "block scalars (| and >)", 1, 4),
    ("- |\n  text\n", "block scalars (| and >)", 1, 3),
    ("? a\n: b\n", "complex keys (?)", 1, 1),
    ("{? a: b}\n", "complex keys (?)", 1, 2),
    ("<<: {a: 1}\n", "merge keys (<<)", 1, 1),
    ("a: 1\nb: 2\na: 3\n", "duplicate mapping key 'a'", 3, 1),
    ("{a: 1, a: 2}\n", "duplicate mapping key 'a'", 1, 8),
    ("1: a\n1.0: b\n", "duplicate mapping key 1.0", 2, 1),
    ("- x: 1\n  y: 2\n  x: 3\n", "duplicate mapping key 'x'", 3, 3),
    ("a: b\n  c\n", "multi-line plain scalars", 2, 3),
    ("- a\n  - b\n", "multi-line plain scalars", 2, 3),
    ("[a\n b]\n", "multi-line plain scalars", 2, 2),
    ("plain\ncontinued\n", "multi-line plain scalars", 2, 1),
    ("a: 2001-12-14\n", "timestamps", 1, 4),
    ("a: 2001-12-14 21:59:43.10 -5\n", "timestamps", 1, 4),
    ("a: =\n", "'='", 1, 4),
    ("[a: b]\n", "mappings inside flow sequences", 1, 3),
    (": a\n", "empty keys", 1, 1),
    ("[a]: b\n", "collections cannot be mapping keys", 1, 1),
    ("{[a]: b}\n", "collections cannot be mapping keys", 1, 2),
    ('"a\nb": 1\n', "single line", 1, 1),
    ("k" * 1025 + ": v\n", "longer than 1024", 1, 1),
    ("a: x\u2028y\n", "line break U+2028", 1, 5),
    ("a: x\x85y\n", "line break U+0085", 1, 5),
    ("a: x\ufeffy\n", "byte order mark", 1, 5),
    ("a: \x01\n", "non-printable", 1, 4),
    ("a: 1\n...\nb: 2\n", "after the document end", 3, 1),
    ("a: [1, 2\n", "end of input inside a flow collection", 2, 1),
    ("a: 'abc\n", "unterminated quoted scalar", 1, 4),
    ('a: "\\q"\n', "unknown escape", 1, 6),
    ('a: "\\x4g"\n', "hex digits", 1, 7),
    ('a: "\\U00110000"\n', "out of range", 1, 5),
    ("a: 0b_\n", "invalid number", 1, 4),
    ("a: 1" + "0" * 4300 + "\n", "numbers longer than", 1, 4),
    ("a:\n  b: 1\n c: 2\n", "unexpected indentation", 3, 2),
    ("a:\n  - b\n  c\n", "unexpected indentation", 3, 3),
    ("- a: b\n  c\n", "expected ':'", 2, 4),
    ("a: b: c\n", "mapping values are not allowed", 1, 5),
    ("a: - b\n", "block sequence entries are not allowed", 1, 4),
]


@pytest.mark.parametrize("text,construct,line,column", REFUSALS)
def test_refusals_name_line_column_and_construct(text, construct, line, column):
    with pytest.raises(ocifit.YAMLError) as info:
        ocifit.load_yaml(text)
    err = info.value
    assert str(err).startswith("line %d, column %d: " % (line, column)), str(err)
    assert construct in str(err), str(err)
    assert (err.line, err.column) == (line, column)


def test_duplicate_keys_are_the_deliberate_difference():
    text = "a: 1\na: 2\n"
    assert yaml.safe_load(text) == {"a": 2}
    with pytest.raises(ocifit.YAMLError, match="duplicate"):
        ocifit.load_yaml(text)


def test_non_string_input():
    with pytest.raises(TypeError):
        ocifit.load_yaml(b"a: 1")  # type: ignore[arg-type]


# -- limits -------------------------------------------------------------------
def test_depth_limit_block():
    def nested(depth):
        return "".join("  " * i + "k:\n" for i in range(depth - 1)) + "  " * (depth - 1) + "k: v\n"
    check_same(nested(64))
    with pytest.raises(ocifit.YAMLError, match="nesting deeper than 64"):
        ocifit.load_yaml(nested(65))
    check_same("- " * 64 + "x\n")
    with pytest.raises(ocifit.YAMLError, match="nesting"):
        ocifit.load_yaml("- " * 65 + "x\n")


def test_depth_limit_flow():
    check_same("[" * 64 + "]" * 64)
    with pytest.raises(ocifit.YAMLError, match="nesting") as info:
        ocifit.load_yaml("[" * 65 + "]" * 65)
    assert str(info.value).startswith("line 1, column 65:")
    with pytest.raises(ocifit.YAMLError, match="nesting"):
        ocifit.load_yaml("{a: " * 100000 + "}" * 100000)


def test_node_limit():
    check_same("[" + ",".join(["1"] * 99999) + "]")
    with pytest.raises(ocifit.YAMLError, match="more than 100000 nodes"):
        ocifit.load_yaml("[" + ",".join(["1"] * 100000) + "]")
    with pytest.raises(ocifit.YAMLError, match="nodes"):
        ocifit.load_yaml("- a\n" * 200000)


def test_size_limit():
    ok = "a: " + "x" * (ocifit.YAML_MAX_BYTES - 4) + "\n"
    assert len(ok) == ocifit.YAML_MAX_BYTES
    assert ocifit.load_yaml(ok) == {"a": "x" * (ocifit.YAML_MAX_BYTES - 4)}
    with pytest.raises(ocifit.YAMLError, match="larger than"):
        ocifit.load_yaml(ok + " ")
    with pytest.raises(ocifit.YAMLError, match="larger than"):  # counted in UTF-8 bytes
        ocifit.load_yaml("a: " + "é" * (ocifit.YAML_MAX_BYTES // 2))


@pytest.mark.parametrize("line", [
    "a: " + "x" * (ocifit.YAML_MAX_BYTES - 10),
    "a: " + "x " * (ocifit.YAML_MAX_BYTES // 2 - 10),
    "a: " + "x:" * (ocifit.YAML_MAX_BYTES // 2 - 10),
    "a: " + ": " * (ocifit.YAML_MAX_BYTES // 2 - 10),
    "[" + "a " * (ocifit.YAML_MAX_BYTES // 2 - 10) + "]",
    "[" + "a," * 90000 + "]",
    '"' + "\\\\ " * (ocifit.YAML_MAX_BYTES // 3 - 10) + '"',
    "'" + "''" * (ocifit.YAML_MAX_BYTES // 2 - 10) + "'",
    "a: '" + "x" * (ocifit.YAML_MAX_BYTES - 10),
    "- 1" + "0_" * (ocifit.YAML_MAX_BYTES // 2 - 10),
    "- 1" + ":1" * (ocifit.YAML_MAX_BYTES // 2 - 10),
    "- " + "9" * (ocifit.YAML_MAX_BYTES - 10) + "x",
    "- 1:" + "5" * (ocifit.YAML_MAX_BYTES - 10) + ".",
    "{" * 64 + "a" * (ocifit.YAML_MAX_BYTES - 200),
    " " * (ocifit.YAML_MAX_BYTES - 10) + "a",
    "#" * (ocifit.YAML_MAX_BYTES - 1),
    "\n" * (ocifit.YAML_MAX_BYTES - 1),
])
def test_one_mib_line_is_fast(line):
    assert len(line.encode()) <= ocifit.YAML_MAX_BYTES
    start = time.perf_counter()
    try:
        ocifit.load_yaml(line)
    except ocifit.YAMLError:
        pass
    assert time.perf_counter() - start < 2.0


# -- hypothesis: safe_dump round trips ------------------------------------------
SPECIAL_STRINGS = [
    "", " ", "  x", "x  ", "-", "- x", "--", "---", "...", ":", ": ", "a: b", "a:b", "#",
    "a #b", "a#b", "'", '"', "''", "\\", "\n", "\n\n", "a\nb", "a\n\nb", " a\n b ", "\t",
    "a\tb", "~", "null", "Null", "NULL", "yes", "No", "on", "OFF", "y", "n", "true",
    "False", "0", "-0", "007", "0o7", "0x1F", "0b101", "1_000", "1:20", "1:20.5", "1e3",
    "1.0", ".5", "-.5", ".inf", "-.Inf", ".NaN", "2001-12-14", "2001-12-14 21:59:43.10 -5",
    "<<", "=", "?", "? x", "*x", "&x", "!x", "|", ">", "%x", "@x", "`x", "[a]", "{a: b}",
    ",", "a, b", "é", "日本", "😀", "\x07", "\x1b", "\x7f", "\xa0", "\ufeff", "\u2028",
    "\x85", "\ud7ff", "\ue000", "\ufffd",
]
scalar_text = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=30),
    st.text(" -:#'\"\\\n\tab01.x[]{},?&*!|>%@`~", max_size=30),
)
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10 ** 30), 10 ** 30),
    st.floats(allow_nan=True, allow_infinity=True), scalar_text)
json_like = st.recursive(
    leaf, lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(scalar_text, children, max_size=5)),
    max_leaves=30)
strings_only = st.recursive(
    scalar_text, lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(scalar_text, children, max_size=5)),
    max_leaves=30)
dump_options = st.fixed_dictionaries({
    "default_flow_style": st.sampled_from([False, True, None]),
    "indent": st.integers(2, 9),
    "width": st.sampled_from([10, 40, 80, 10000]),
    "sort_keys": st.booleans(),
    "allow_unicode": st.booleans(),
    "explicit_start": st.booleans(),
    "explicit_end": st.booleans(),
    "line_break": st.sampled_from([None, "\n", "\r\n"]),
})


def allowed_refusal(text, err):
    """Is err a refusal of a construct that safe_dump really emitted?"""
    msg = str(err)
    tokens = list(yaml.scan(text))
    if "multi-line plain" in msg:
        return any(isinstance(t, yaml.ScalarToken) and t.plain
                   and t.start_mark.line != t.end_mark.line for t in tokens)
    if "complex keys" in msg:
        return any(isinstance(t, yaml.KeyToken) and text[t.start_mark.index] == "?"
                   for t in tokens)
    if "tags" in msg:
        return any(isinstance(t, yaml.TagToken) for t in tokens)
    if "unsupported line break" in msg:
        return any(c in text for c in "\x85\u2028\u2029")
    return False


def dump_and_compare(value, options):
    text = yaml.safe_dump(value, **options)
    expected = yaml.safe_load(text)
    try:
        got = ocifit.load_yaml(text)
    except ocifit.YAMLError as e:
        assert allowed_refusal(text, e), (text, str(e))
        event("refused: " + e.problem)
        return
    assert same(got, expected), (text, got, expected)
    event("accepted")


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like, dump_options)
def test_safe_dump_roundtrip(value, options):
    dump_and_compare(value, options)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strings_only, dump_options, st.sampled_from(["'", '"']))
def test_safe_dump_quoted_styles(value, options, style):
    dump_and_compare(value, dict(options, default_style=style))


config_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                          blacklist_characters="\ufeff\x85"), max_size=40))
config_like = st.recursive(
    config_leaf, lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text("abcXYZ019-_./", min_size=1, max_size=12), children,
                        max_size=4)),
    max_leaves=40)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_like, dump_options)
def test_safe_dump_config_like_never_refused(value, options):
    """Single-line scalars and ordinary keys must always be accepted."""
    text = yaml.safe_dump(value, **dict(options, width=10 ** 6))
    assert same(ocifit.load_yaml(text), yaml.safe_load(text)), text


# -- hypothesis: fuzzing never yields a value PyYAML would not give ----------------
FUZZ_TOKENS = list(" \n-:#\"'[]{},\\\t&*!|>?%@`~.0123456789abxeE+_") + [
    "- ", ": ", "  ", "\n  ", "\n- ", "---", "...", "''", '\\"', "true", "null", "0x",
    "<<", "1:2", "a: ", "{a: 1}", "[b, c]", "\"q\"", "'s'", " # c\n", "\r\n", "é", "\\n",
    "\\x4", "\\u00e9", "yes", "1.5", ".inf",
]


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FUZZ_TOKENS), max_size=40))
def test_fuzz_token_soup(tokens):
    event(check_agree_or_refuse("".join(tokens)))


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_DOCS[:12] + VALID_DOCS[26:40] + VALID_DOCS[60:80]),
       st.lists(st.tuples(st.floats(0, 1), st.integers(0, 2), st.sampled_from(FUZZ_TOKENS)),
                min_size=1, max_size=4))
def test_fuzz_mutations(doc, mutations):
    for where, op, token in mutations:
        i = int(where * len(doc))
        if op == 0:
            doc = doc[:i] + token + doc[i:]
        elif op == 1:
            doc = doc[:i] + doc[i + 1:]
        else:
            doc = doc[:i] + token + doc[i + len(token):]
    event(check_agree_or_refuse(doc))


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like, dump_options, st.integers(0, 10 ** 6), st.sampled_from(FUZZ_TOKENS))
def test_fuzz_mutated_dumps(value, options, where, token):
    text = yaml.safe_dump(value, **options)
    i = where % (len(text) + 1)
    event(check_agree_or_refuse(text[:i] + token + text[i:]))


FUZZ_KEYS = ["a", "b", "k", "'q'", '"d"', "1", "~", "yes", "a b", "-x", "x:y", "é", "''"]
FUZZ_VALUES = ["", "v", "1", "-1", "0x1f", "1.5", ".nan", "null", "No", "'s'", '"d\\n"',
               "[]", "{}", "[a, b]", "{a: 1}", "a b", "'a''b'", "-x"]
FUZZ_ODD_VALUES = ["[a,", "b]", "\"x", "y\"", "- c", "a: b", "#c", "-", "?", "&a x", "!t x",
                   "|", ">-", "*a", "<<", "2001-01-01", "a\tb"]
block_line = st.tuples(
    st.sampled_from([0, 0, 0, 2, 2, 2, 4, 4, 1, 3, 6]),
    st.lists(st.sampled_from(["- ", "- ", "-  ", "-"]), max_size=2),
    st.one_of(st.none(), st.sampled_from(FUZZ_KEYS)),
    st.one_of(st.sampled_from(FUZZ_VALUES), st.sampled_from(FUZZ_VALUES),
              st.sampled_from(FUZZ_VALUES), st.sampled_from(FUZZ_ODD_VALUES)),
    st.sampled_from(["", "", "", " # c", "  ", "\n"]))


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(block_line, min_size=1, max_size=10), st.sampled_from(["", "---\n", "--- "]),
       st.sampled_from(["", "...\n", "\n"]))
def test_fuzz_block_lines(lines, head, tail):
    text = head + "".join(
        " " * ind + "".join(dashes) + ("" if key is None else key + ":" + (" " if value else ""))
        + value + end + "\n"
        for ind, dashes, key, value, end in lines) + tail
    event(check_agree_or_refuse(text))


# --------------------------------------------------------------------------------------------
# Node view: which nodes a pod can land on
# --------------------------------------------------------------------------------------------

def _mixed_cluster() -> ocifit.NodeSnapshot:
    return snapshot_of(
        node_obj("cp", {FLAVOR_KEY: "vanilla"}, control_plane=True),
        node_obj("w1", {FLAVOR_KEY: "vanilla", "pool": "a", "gen": "3"}),
        node_obj("w2", {FLAVOR_KEY: "vanilla", "pool": "a", "gen": "4"}),
        node_obj("w3", {FLAVOR_KEY: "chocolate", "pool": "b", "gen": "5"}),
        node_obj("w4", {FLAVOR_KEY: "chocolate", "pool": "b"}, unschedulable=True),
        node_obj("gpu", {FLAVOR_KEY: "strawberry", "pool": "gpu"},
                 taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]))


def candidates(pod_spec: Dict[str, Any], snapshot: Optional[ocifit.NodeSnapshot] = None) -> List[str]:
    placement = ocifit.parse_placement(pod_spec)
    groups = ocifit.candidate_groups(snapshot or _mixed_cluster(), placement, flavor_spec())
    return sorted(n for _, names in groups for n in names)


def _affinity(*terms: Dict[str, Any]) -> Dict[str, Any]:
    return {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": list(terms)}}}}


def test_without_selector_every_schedulable_worker_counts() -> None:
    assert candidates({}) == ["w1", "w2", "w3"]  # not the control plane, the cordoned w4, or the tainted gpu


def test_a_toleration_admits_tainted_and_cordoned_nodes() -> None:
    gpu = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    assert candidates(gpu) == ["gpu", "w1", "w2", "w3"]
    everything = {"tolerations": [{"operator": "Exists"}], "nodeSelector": {FLAVOR_KEY: "chocolate"}}
    assert candidates(everything) == ["w3", "w4"]


def test_node_selector_picks_the_nodes() -> None:
    assert candidates({"nodeSelector": {"pool": "a"}}) == ["w1", "w2"]
    assert candidates({"nodeSelector": {"pool": "a", FLAVOR_KEY: "chocolate"}}) == []


def test_control_plane_counts_only_when_selected_and_tolerated() -> None:
    selector = {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}
    assert candidates(selector) == []
    tolerated = dict(selector, tolerations=[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}])
    assert candidates(tolerated) == ["cp"]


@pytest.mark.parametrize("expression,names", [
    ({"key": "pool", "operator": "In", "values": ["a", "gpu"]}, ["w1", "w2"]),
    ({"key": "pool", "operator": "NotIn", "values": ["a"]}, ["w3"]),
    ({"key": "gen", "operator": "Exists"}, ["w1", "w2", "w3"]),
    ({"key": "gen", "operator": "DoesNotExist"}, []),
    ({"key": "gen", "operator": "Gt", "values": ["3"]}, ["w2", "w3"]),
    ({"key": "gen", "operator": "Lt", "values": ["4"]}, ["w1"]),
])
def test_required_node_affinity_operators(expression: Dict[str, Any], names: List[str]) -> None:
    assert candidates(_affinity({"matchExpressions": [expression]})) == names


def test_affinity_terms_are_ored_and_fields_select_names() -> None:
    terms = _affinity({"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]},
                      {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["w1"]}]})
    assert candidates(terms) == ["w1", "w3"]
    assert candidates(_affinity({})) == []  # an empty term matches no node
    both = dict(_affinity({"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}),
                nodeSelector={"gen": "4"})
    assert candidates(both) == ["w2"]


def test_the_spec_is_evaluated_once_per_kind_of_node_not_per_node() -> None:
    nodes = [node_obj(f"n{i}", {FLAVOR_KEY: "vanilla" if i % 2 else "chocolate", "zone": f"z{i % 3}"})
             for i in range(3000)]  # every node has its own hostname label
    groups = ocifit.candidate_groups(snapshot_of(*nodes), ocifit.Placement(), flavor_spec())
    assert len(groups) == 2 and sum(len(names) for _, names in groups) == 3000


def test_per_node_labels_do_not_make_a_homogeneous_cluster_disagree() -> None:
    decision = decide(pod_obj(), example_snapshot("nodes-homogeneous.json"))
    assert decision.allowed and decision.image == "debian:11" and decision.candidates == 3


def _groups(snapshot: ocifit.NodeSnapshot, keys: frozenset) -> List[Any]:
    return sorted((sorted(g.labels.items()), g.control_plane, g.taints, sorted(g.names))
                  for g in snapshot.partition(keys))


@hypothesis_settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3", "n4"]),
                                st.none() | st.fixed_dictionaries({"flavor": st.sampled_from(["a", "b"]),
                                                                   "zone": st.sampled_from(["z1", "z2"])}),
                                st.booleans()), max_size=12))
def test_watch_changes_keep_the_shape_index_equal_to_a_fresh_one(steps: List[Any]) -> None:
    snapshot = snapshot_of(node_obj("n1", {"flavor": "a", "zone": "z1"}), node_obj("n2", {"flavor": "b", "zone": "z1"}))
    snapshot.shapes()
    for name, labels, cordoned in steps:
        node = None if labels is None else ocifit.node_from_object(node_obj(name, labels, unschedulable=cordoned))
        snapshot = snapshot.with_node(name, node)
    fresh = ocifit.NodeSnapshot(snapshot.nodes.values())
    for keys in (frozenset({"flavor"}), frozenset({"flavor", "zone"}), frozenset({"kubernetes.io/hostname"})):
        assert _groups(snapshot, keys) == _groups(fresh, keys)


def test_nodes_of_one_shape_share_one_label_dict() -> None:
    a, b = (ocifit.node_from_object(node_obj(n, {"pool": "a", "cpu": "x"})) for n in ("w1", "w2"))
    assert a.labels.base is b.labels.base and a.labels.own == {"kubernetes.io/hostname": "w1"}
    assert dict(a.labels) == {"kubernetes.io/hostname": "w1", "kubernetes.io/os": "linux", "pool": "a", "cpu": "x"}
    assert a.shape == b.shape and a != b


def test_static_nodes_are_reread_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps({"kind": "List", "items": [node_obj("a")]}))
    source = ocifit.StaticNodes(str(path), interval=0.05)
    assert list(source.snapshot().nodes) == ["a"]
    path.write_text(json.dumps({"kind": "List", "items": [node_obj("a"), node_obj("b")]}))
    eventually(lambda: sorted(source.snapshot().nodes) == ["a", "b"])
    for broken, error in [("{broken", "Expecting property name"),
                          ('{"items": [{"metadata": "x"}]}', "node metadata is not an object"),
                          (json.dumps({"items": [dict(node_obj("c"), spec={"taints": 5})]}),
                           "node c: spec.taints is not a list of objects"),
                          ('{"items": [{"metadata": {"name": "d", "labels": {"k": 1}}}]}',
                           "node d: metadata.labels is not an object of strings")]:
        path.write_text(broken)
        eventually(lambda error=error: error in source.health()[1])  # the current error, not an older one
        assert sorted(source.snapshot().nodes) == ["a", "b"] and source.health()[0]  # the last good view stays
    path.write_text(json.dumps({"kind": "List", "items": []}))
    eventually(lambda: source.health() == (False, f"no nodes in {path}"))
    source.stop()


def test_a_nodes_file_of_the_wrong_shape_stops_the_start_with_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text('{"items": [{"metadata": "x"}]}')
    done = run_cli("review", str(EXAMPLE / "reviews" / "pod.json"), "--nodes", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot read nodes from {path}: node metadata is not an object" in done.stderr


# ---- the live cluster view, against a Kubernetes API double that kubectl accepts ----

def status_object(code: int, reason: str, message: str) -> Dict[str, Any]:
    """A metav1.Status as kube-apiserver sends it, in an error reply or a watch ERROR event: always with
    `metadata: {}` and `status: "Failure"` (k8s.io/apimachinery/pkg/api/errors)."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


NFD_GROUP_VERSION = {"groupVersion": "nfd.k8s-sigs.io/v1alpha1", "version": "v1alpha1"}
KUBE_KINDS = {"nodes": ("v1", "Node"), "nodefeatures": ("nfd.k8s-sigs.io/v1alpha1", "NodeFeature")}


class KubeAPIHandler(http.server.BaseHTTPRequestHandler):
    """FakeKubeAPI's request handler: the routes kubectl and ocifit use, in the API server's wire format."""

    protocol_version = "HTTP/1.1"
    server: Any

    @property
    def api(self) -> "FakeKubeAPI":
        return self.server.api

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path, _, raw_query = self.path.partition("?")
        query = dict(ocifit.urllib.parse.parse_qsl(raw_query))
        self.api.seen.append((path, query))
        if self.headers.get("Authorization") != f"Bearer {self.api.token}":
            return self.status(401, "Unauthorized", "Unauthorized")
        kind = "watch" if query.get("watch") in ("1", "true") else "list"
        for fault in list(self.api.faults):  # (list|watch|any, status, headers[, path prefix: nodes by default])
            if fault[0] in (kind, "any") and path.startswith(fault[3] if len(fault) > 3 else "/api/v1/nodes"):
                self.api.faults.remove(fault)
                return self.status(fault[1], "injected fault", "InternalError", fault[2])
        if path == "/api":
            return self.json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.api.port}"}]})
        if path == "/apis":
            groups = [] if self.api.nfd == "absent" else [{"name": "nfd.k8s-sigs.io", "versions": [NFD_GROUP_VERSION],
                                                           "preferredVersion": NFD_GROUP_VERSION}]
            return self.json({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        if path == "/apis/nfd.k8s-sigs.io/v1alpha1" and self.api.nfd != "absent":
            return self.json({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "nfd.k8s-sigs.io/v1alpha1",
                              "resources": [{"name": "nodefeatures", "singularName": "nodefeature", "namespaced": True,
                                             "kind": "NodeFeature", "verbs": ["delete", "deletecollection", "get",
                                                                              "list", "patch", "create", "update",
                                                                              "watch"]}]})
        feature_path = re.fullmatch(r"/apis/nfd\.k8s-sigs\.io/v1alpha1/(?:namespaces/([^/]+)/)?nodefeatures", path)
        if feature_path:
            if self.api.nfd == "absent":
                return self.status(404, "the server could not find the requested resource", "NotFound")
            if self.api.nfd == "forbidden":
                return self.status(403, 'nodefeatures.nfd.k8s-sigs.io is forbidden: User "system:serviceaccount:'
                                   'ocifit-system:ocifit" cannot list resource "nodefeatures" in API group '
                                   '"nfd.k8s-sigs.io" at the cluster scope', "Forbidden")
            namespace = feature_path.group(1)
            return self.watch(query, "nodefeatures") if kind == "watch" else self.list(query, "nodefeatures",
                                                                                        namespace)
        if path == "/api/v1":
            return self.json({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node",
                 "verbs": ["get", "list", "watch"], "shortNames": ["no"]}]})
        if path == "/version":
            return self.json({"major": "1", "minor": "32", "gitVersion": "v1.32.2"})
        if path == "/api/v1/nodes":
            return self.watch(query, "nodes") if kind == "watch" else self.list(query, "nodes")
        if path.startswith("/api/v1/nodes/"):
            node = self.api.nodes.get(path.rsplit("/", 1)[1])
            return self.json(node) if node else self.status(404, "node not found", "NotFound")
        self.status(404, f"no route {path}", "NotFound")

    def json(self, payload: Any, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def status(self, code: int, message: str, reason: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.json(status_object(code, reason, message), code, headers)

    def list(self, query: Dict[str, str], resource: str, namespace: Optional[str] = None) -> None:
        limit = int(query.get("limit") or 0) or 10 ** 9
        with self.api.cond:
            if query.get("continue"):
                list_rv, start = json.loads(base64.b64decode(query["continue"]))
                if list_rv < self.api.oldest_rv:
                    return self.status(410, "The provided continue parameter is too old", "Expired")
            else:
                list_rv, start = self.api.rv, 0
            store = self.api.store(resource)
            keys = sorted(k for k in store if namespace is None or k[0] == namespace)
            page = [store[k] for k in keys[start:start + limit]]
            meta: Dict[str, Any] = {"resourceVersion": str(list_rv)}
            if start + limit < len(keys):
                meta["continue"] = base64.b64encode(json.dumps([list_rv, start + limit]).encode()).decode()
                meta["remainingItemCount"] = len(keys) - start - limit
        api_version, kind = KUBE_KINDS[resource]
        self.json({"kind": kind + "List", "apiVersion": api_version, "metadata": meta, "items": page})

    def chunk(self, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def watch(self, query: Dict[str, str], resource: str) -> None:
        since = int(query.get("resourceVersion") or 0)
        ends = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            with self.api.cond:
                generation = self.api.generation
            if since < self.api.oldest_rv:
                self.chunk({"type": "ERROR", "object": status_object(
                    410, "Expired", f"too old resource version: {since} ({self.api.oldest_rv})")})
            else:
                self.stream(since, generation, ends, query.get("allowWatchBookmarks") == "true", resource)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    def stream(self, since: int, generation: int, ends: float, bookmarks: bool, resource: str) -> None:
        with self.api.cond:
            self.api.open_streams += 1
            self.api.open_by_resource[resource] = self.api.open_by_resource.get(resource, 0) + 1
        try:
            self.stream_events(since, generation, ends, bookmarks, resource)
        finally:
            with self.api.cond:
                self.api.open_streams -= 1
                self.api.open_by_resource[resource] -= 1

    def stream_events(self, since: int, generation: int, ends: float, bookmarks: bool, resource: str) -> None:
        while time.monotonic() < ends:
            with self.api.cond:
                pending = [e for e in self.api.events if e[0] > since and e[3] == resource]
                if not pending:
                    self.api.cond.wait(self.api.bookmark_every)
                    pending = [e for e in self.api.events if e[0] > since and e[3] == resource]
                if self.api.generation != generation or self.api.stopped:
                    if self.api.stream_error:
                        self.chunk({"type": "ERROR", "object": self.api.stream_error})
                    return
                current = self.api.rv
            for rv, kind, obj, _ in pending:
                self.chunk({"type": kind, "object": obj})
                since = rv
            if not pending and bookmarks:
                api_version, kind = KUBE_KINDS[resource]
                self.chunk({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                                                           "metadata": {"resourceVersion": str(current)}}})


class FakeKubeAPI:
    """A Kubernetes API double on loopback HTTPS with its own CA and a bearer token. It speaks the real wire
    format for nodes: discovery, NodeList pages with `continue`, chunked watch streams with BOOKMARK events,
    ERROR events with code 410, and injected faults (429 with Retry-After, 500, 401)."""

    def __init__(self, pki: Dict[str, Path], port: int = 0, bookmark_every: float = 0.5):
        self.token = "token-1"
        self.nodes: Dict[str, Dict[str, Any]] = {}
        self.features: Dict["tuple[str, str]", Dict[str, Any]] = {}  # NodeFeatures by (namespace, name)
        self.nfd = "installed"  # or "absent" (no such resource: 404) or "forbidden" (RBAC: 403)
        self.rv = 1000
        self.oldest_rv = 0  # watches from before this get 410 Gone
        self.events: List["tuple[int, str, Dict[str, Any], str]"] = []  # (rv, type, object, resource)
        self.cond = threading.Condition()
        self.generation = 0  # bumped to end every open watch stream
        self.stream_error: Optional[Dict[str, Any]] = None  # sent into open streams, then they end
        self.faults: List[tuple] = []  # (list|watch|any, status, headers[, path prefix])
        self.seen: List["tuple[str, Dict[str, str]]"] = []
        self.bookmark_every = bookmark_every
        self.open_streams = 0
        self.open_by_resource: Dict[str, int] = {}  # open watch streams by resource (nodes, nodefeatures)
        self.stopped = False  # gone: streams end, even one that opened while the server was shutting down

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), KubeAPIHandler)
        self.server.api = self
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki["crt"]), str(pki["key"]))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- the cluster changing --
    def store(self, resource: str) -> Dict[Any, Dict[str, Any]]:
        """Objects of a resource by sort key: (namespace, name) for NodeFeatures, ("", name) for nodes."""
        if resource == "nodes":
            return {("", name): node for name, node in self.nodes.items()}
        return self.features

    def _event(self, kind: str, obj: Dict[str, Any], resource: str = "nodes") -> None:
        with self.cond:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            meta = obj["metadata"]
            store: Dict[Any, Any] = self.nodes if resource == "nodes" else self.features
            key = meta["name"] if resource == "nodes" else (meta["namespace"], meta["name"])
            if kind == "DELETED":
                store.pop(key, None)
            else:
                store[key] = obj
            self.events.append((self.rv, kind, obj, resource))
            self.cond.notify_all()

    def add_features(self, *objects: Dict[str, Any]) -> None:
        """Create or replace NodeFeature objects (ADDED for new ones, MODIFIED for known ones)."""
        for obj in objects:
            known = (obj["metadata"]["namespace"], obj["metadata"]["name"]) in self.features
            self._event("MODIFIED" if known else "ADDED", obj, "nodefeatures")

    def delete_features(self, namespace: str, name: str) -> None:
        self._event("DELETED", self.features[(namespace, name)], "nodefeatures")

    def add(self, *nodes: Dict[str, Any]) -> None:
        for node in nodes:
            self._event("ADDED", node)

    def modify(self, name: str, labels: Optional[Dict[str, Optional[str]]] = None,
               unschedulable: Optional[bool] = None, status_only: bool = False) -> None:
        node = copy.deepcopy(self.nodes[name])
        for key, value in (labels or {}).items():
            if value is None:
                node["metadata"]["labels"].pop(key, None)
            else:
                node["metadata"]["labels"][key] = value
        if unschedulable is not None:
            node["spec"]["unschedulable"] = unschedulable
        if status_only:
            node.setdefault("status", {})["heartbeat"] = time.time()
        self._event("MODIFIED", node)

    def delete(self, name: str) -> None:
        self._event("DELETED", self.nodes[name])

    def end_streams(self, error: Optional[Dict[str, Any]] = None, wait: bool = True, resource: str = "nodes"
                    ) -> None:
        """Close every open watch stream, optionally after sending an ERROR event; by default first wait
        until the watcher of `resource` is listening, so the test does not race its reconnect (nor take
        another resource's stream for it)."""
        if wait:
            eventually(lambda: self.open_by_resource.get(resource))
        with self.cond:
            self.stream_error = error
            self.generation += 1
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget history, as etcd compaction does after other writes (leases, events) moved the revision on:
        watches and page tokens from before now get 410 Gone; a list now, and a watch from it, are fine."""
        with self.cond:
            self.rv += 1
            self.oldest_rv = self.rv
            self.events.clear()

    def lists(self) -> List[Dict[str, str]]:
        return [q for p, q in self.seen if p == "/api/v1/nodes" and q.get("watch") not in ("1", "true")]

    def stop(self) -> None:
        self.server.shutdown()  # no new connections first, so no watcher can open a stream that outlives it
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.server.server_close()


def flavor_cluster(api: FakeKubeAPI, flavor: str = "vanilla") -> None:
    api.add(node_obj("kind-control-plane", {FLAVOR_KEY: flavor}, control_plane=True),
            *[node_obj(f"kind-worker{i or ''}", {FLAVOR_KEY: flavor}) for i in range(3)])


@pytest.fixture
def kube_api(pki: Dict[str, Path]) -> Any:
    api = FakeKubeAPI(pki)
    yield api
    api.stop()


def kube_settings(api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path, **kw: Any) -> ocifit.Settings:
    token_file = tmp_path / "token"
    token_file.write_text(api.token + "\n")
    return ocifit.Settings(kube_api=api.url, kube_token_file=str(token_file), kube_ca=str(pki["ca"]), **kw)


@pytest.fixture
def live_nodes(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> Any:
    flavor_cluster(kube_api)
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    assert source.wait_synced(10), source.health()
    yield source
    source.stop()
    kube_api.end_streams(wait=False)


def eventually(check: Any, seconds: float = 30.0) -> Any:
    """Poll check() until it returns something truthy (the watch is asynchronous). An exception counts as
    not yet (a review denied in between has no patch); after `seconds`, a generous bound on a loaded machine
    and not a time window, fail with the last value or exception."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value: Any = check()
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, then reported
            value = exc
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds}s: {value!r}")
        time.sleep(0.02)


def live_decision(source: Any, pod: Optional[Dict[str, Any]] = None) -> ocifit.Decision:
    return ocifit.decide(review_of(pod or pod_obj())["request"], source.snapshot(), FileArtifacts())


def kubectl_against(api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path, *args: str) -> List[str]:
    (tmp_path / "no-kubeconfig").write_text("apiVersion: v1\nkind: Config\n")  # nothing but the flags below
    return [need("kubectl"), f"--server={api.url}", f"--token={api.token}", f"--certificate-authority={pki['ca']}",
            f"--kubeconfig={tmp_path / 'no-kubeconfig'}", f"--cache-dir={tmp_path / 'kube-cache'}", *args]


def test_kubectl_reads_nodes_from_the_api_double(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    kube_api.add(*[node_obj(f"extra-{i}") for i in range(700)])  # more than one page of 500
    done = subprocess.run(kubectl_against(kube_api, pki, tmp_path, "get", "nodes", "-o", "json"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names = [item["metadata"]["name"] for item in json.loads(done.stdout)["items"]]
    assert len(names) == 704 and "kind-worker2" in names
    assert any(q.get("continue") for q in kube_api.lists())  # kubectl followed the continue token


def test_kubectl_watches_nodes_on_the_api_double(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    watcher = subprocess.Popen(kubectl_against(kube_api, pki, tmp_path, "get", "nodes", "--watch", "-o", "name"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [watcher.stdout.readline().strip() for _ in range(4)]
        assert sorted(lines) == ["node/kind-control-plane", "node/kind-worker", "node/kind-worker1",
                                 "node/kind-worker2"]
        kube_api.add(node_obj("late-joiner"))
        assert watcher.stdout.readline().strip() == "node/late-joiner"
    finally:
        watcher.kill()
        watcher.wait()


def test_the_first_full_list_gates_readiness(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    kube_api.faults += [("list", 500, {}), ("list", 500, {})]
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        ready, why = source.health()
        assert not ready and why.startswith("waiting for the first node list")
        assert source.wait_synced(15)
        assert source.health()[0] and source.health()[1].startswith(f"4 nodes from {kube_api.url}")
        assert len(kube_api.lists()) >= 3
    finally:
        source.stop()


def test_a_relabel_changes_the_image_for_the_next_pod(live_nodes: Any, kube_api: FakeKubeAPI,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ocifit")
    assert live_decision(live_nodes).image == "debian:11"
    for name in ("kind-worker", "kind-worker1", "kind-worker2"):
        kube_api.modify(name, labels={FLAVOR_KEY: "chocolate"})
    assert eventually(lambda: live_decision(live_nodes).image == "ubuntu:24.04", 2.0)
    assert "node kind-worker labels ~feature.node.ocifit-k8s.flavor" in caplog.text


def test_added_deleted_and_cordoned_nodes_change_the_candidates(live_nodes: Any, kube_api: FakeKubeAPI) -> None:
    kube_api.add(node_obj("choc", {FLAVOR_KEY: "chocolate"}))
    assert eventually(lambda: live_decision(live_nodes).reason == "disagreement")
    kube_api.modify("choc", unschedulable=True)  # cordoned: no longer a candidate
    assert eventually(lambda: live_decision(live_nodes).image == "debian:11")
    kube_api.modify("choc", unschedulable=False)
    assert eventually(lambda: live_decision(live_nodes).reason == "disagreement")
    kube_api.delete("choc")
    assert eventually(lambda: live_decision(live_nodes).image == "debian:11")


def test_a_status_heartbeat_does_not_replace_the_snapshot(live_nodes: Any, kube_api: FakeKubeAPI) -> None:
    before = live_nodes.snapshot()
    kube_api.modify("kind-worker", status_only=True)
    kube_api.add(node_obj("marker"))
    eventually(lambda: "marker" in live_nodes.snapshot().nodes)
    assert live_nodes.snapshot().nodes["kind-worker"] is before.nodes["kind-worker"]


class ReadinessWatcher:
    """Samples a node source's health in the background, so a test can say it never went unready."""

    def __init__(self, source: Any):
        self.source, self._stop = source, threading.Event()
        self.unready: List[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            ready, why = self.source.health()
            if not ready:
                self.unready.append(why)

    def stop(self) -> List[str]:
        self._stop.set()
        self._thread.join()
        return self.unready


@pytest.fixture
def strict_live_nodes(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> Any:
    """live_nodes that turn unready after 0.2 s of watch failure, so a mishandled 410 shows."""
    flavor_cluster(kube_api)
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path, watch_failure_threshold=0.2))
    assert source.wait_synced(10), source.health()
    yield source
    source.stop()
    kube_api.end_streams(wait=False)


def test_an_expired_watch_in_the_stream_relists_at_once_and_stays_ready(
        strict_live_nodes: Any, kube_api: FakeKubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ocifit")
    lists = len(kube_api.lists())
    watcher = ReadinessWatcher(strict_live_nodes)
    kube_api.compact()  # etcd compaction: history before now is gone
    kube_api.modify("kind-worker2", labels={FLAVOR_KEY: "strawberry"})  # a relabel while the watch is expired
    # kube-apiserver's own words for it, inside the open stream
    kube_api.end_streams(error=status_object(410, "Expired", "too old resource version: 12 (40)"))
    assert eventually(lambda: live_decision(strict_live_nodes).reason == "disagreement", 30)
    assert len(kube_api.lists()) == lists + 1
    time.sleep(0.3)  # past the failure threshold: a watch still failing would show now
    assert watcher.stop() == [] and strict_live_nodes.health()[0]
    assert "node watch expired (410 Expired: too old resource version: 12 (40)); listing again" in caplog.text
    assert "node view:" not in caplog.text


def test_an_expired_resource_version_on_reconnect_relists(strict_live_nodes: Any, kube_api: FakeKubeAPI) -> None:
    lists = len(kube_api.lists())
    watcher = ReadinessWatcher(strict_live_nodes)
    kube_api.compact()
    kube_api.end_streams()  # the reconnecting watch asks for a compacted version and gets an ERROR 410 event
    eventually(lambda: len(kube_api.lists()) > lists, 30)
    kube_api.modify("kind-worker2", labels={FLAVOR_KEY: "strawberry"})
    assert eventually(lambda: live_decision(strict_live_nodes).reason == "disagreement", 30)
    assert watcher.stop() == []


def test_watch_errors_and_rbac_hints_name_the_kind_watched() -> None:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500}
    assert str(ocifit.watch_error(status, "NodeFeature")) == (
        "NodeFeature watch error 500 InternalError: etcdserver: leader changed")
    forbidden = json.dumps(dict(status, code=403, reason="Forbidden", message="nodefeatures.nfd.k8s-sigs.io is "
                                "forbidden: User \"system:serviceaccount:ocifit:ocifit\" cannot list resource"))
    err = ocifit.urllib.error.HTTPError("https://127.0.0.1/", 403, "Forbidden", email.message.Message(),
                                        io.BytesIO(forbidden.encode()))
    text = str(ocifit.KubeClient._error(err, "/apis/nfd.k8s-sigs.io/v1alpha1/nodefeatures"))
    assert text.endswith("cannot list resource (check the token and RBAC: ocifit needs get/list/watch on "
                         "nodefeatures)")


def test_an_http_410_to_the_watch_request_relists(strict_live_nodes: Any, kube_api: FakeKubeAPI) -> None:
    lists = len(kube_api.lists())
    watcher = ReadinessWatcher(strict_live_nodes)
    kube_api.faults.append(("watch", 410, {}))
    kube_api.end_streams()
    eventually(lambda: len(kube_api.lists()) > lists, 30)
    kube_api.add(node_obj("after-gone", {FLAVOR_KEY: "vanilla"}))
    eventually(lambda: "after-gone" in strict_live_nodes.snapshot().nodes, 30)
    assert watcher.stop() == []


def test_another_error_event_is_logged_with_its_code_and_message(live_nodes: Any, kube_api: FakeKubeAPI,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ocifit")
    kube_api.end_streams(error=status_object(500, "InternalError", "etcdserver: leader changed"))
    eventually(lambda: "node watch error 500 InternalError: etcdserver: leader changed" in caplog.text, 30)
    kube_api.add(node_obj("after-error", {FLAVOR_KEY: "vanilla"}))
    eventually(lambda: "after-error" in live_nodes.snapshot().nodes, 30)


def test_a_stream_the_server_closes_is_resumed_without_a_relist(live_nodes: Any, kube_api: FakeKubeAPI) -> None:
    lists = len(kube_api.lists())
    kube_api.end_streams()
    kube_api.add(node_obj("after-close", {FLAVOR_KEY: "vanilla"}))
    eventually(lambda: "after-close" in live_nodes.snapshot().nodes)
    assert len(kube_api.lists()) == lists
    watches = [q for p, q in kube_api.seen if q.get("watch") == "1"]
    assert watches[-1]["allowWatchBookmarks"] == "true" and int(watches[-1]["resourceVersion"]) > 1000


def test_a_rotated_token_is_read_again_after_a_401(live_nodes: Any, kube_api: FakeKubeAPI, tmp_path: Path) -> None:
    kube_api.token = "token-2"
    (tmp_path / "token").write_text("token-2\n")
    kube_api.end_streams()
    kube_api.add(node_obj("after-rotation", {FLAVOR_KEY: "vanilla"}))
    eventually(lambda: "after-rotation" in live_nodes.snapshot().nodes)
    assert live_nodes.health()[0]


def test_429_retry_after_is_honoured(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    kube_api.faults.append(("list", 429, {"Retry-After": "1"}))
    started = time.monotonic()
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        assert source.wait_synced(10)
        assert time.monotonic() - started >= 0.9 and len(kube_api.lists()) == 2
    finally:
        source.stop()


def test_an_api_server_down_at_start_is_waited_for(pki: Dict[str, Path], tmp_path: Path) -> None:
    port = _free_port()
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    settings = ocifit.Settings(kube_api=f"https://127.0.0.1:{port}", kube_token_file=str(token_file),
                               kube_ca=str(pki["ca"]))
    source = ocifit.build_node_source(settings)
    api = None
    try:
        ready, why = eventually(lambda: (lambda h: h if "refused" in h[1] else None)(source.health()))
        assert not ready and "Connection refused" in why
        api = FakeKubeAPI(pki, port=port)
        flavor_cluster(api)
        assert source.wait_synced(15)
        assert live_decision(source).image == "debian:11"
    finally:
        source.stop()
        if api:
            api.stop()


def test_readiness_fails_when_the_watch_keeps_failing(kube_api: FakeKubeAPI, pki: Dict[str, Path],
                                                      tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path, watch_failure_threshold=0.3))
    try:
        assert source.wait_synced(10)
        eventually(lambda: kube_api.open_streams)
        kube_api.faults += [("any", 500, {})] * 50
        kube_api.end_streams(wait=False)
        ready, why = eventually(lambda: (lambda h: h if not h[0] else None)(source.health()))
        assert why.startswith("node watch failing for") and "500" in why
        kube_api.faults.clear()
        eventually(lambda: source.health()[0], 40)
    finally:
        source.stop()


NFD_SPEC = """\
version: v1alpha1
compatibilities:
- tag: fast:1
  weight: 10
  description: AVX2 and a recent kernel
  rules:
  - name: cpu-kernel
    matchFeatures:
    - feature: cpu.cpuid
      matchName: {op: InRegexp, value: ["^AVX2$"]}
    - feature: kernel.version
      matchExpressions:
        full: {op: Ge, value: ["6.1"], type: version}
- tag: generic:1
  rules:
  - name: any
    matchFeatures:
    - feature: kernel.version
      matchExpressions:
        major: {op: Exists}
"""
FEATURES_PATH = "/apis/nfd.k8s-sigs.io/v1alpha1/nodefeatures"


def cpu_features(avx2: bool = True, kernel: str = "6.8.0-45-generic") -> Dict[str, Any]:
    return {"flags": {"cpu.cpuid": {"elements": {"AVX": {}, **({"AVX2": {}} if avx2 else {})}}},
            "attributes": {"kernel.version": {"elements": {"full": kernel, "major": kernel.split(".")[0]}},
                           "system.name": {"elements": {"nodename": "unique-per-node"}}}}


def nfd_decision(source: Any, pod: Optional[Dict[str, Any]] = None) -> ocifit.Decision:
    artifacts = FileArtifacts(**{FLAVOR_REF: ocifit.parse_spec(NFD_SPEC.encode())})
    return ocifit.decide(review_of(pod or pod_obj())["request"], source.snapshot(), artifacts)


def feature_cluster(api: FakeKubeAPI) -> None:
    flavor_cluster(api)
    api.add_features(*[node_feature(f"kind-worker{i or ''}", cpu_features()) for i in range(3)])


def test_kubectl_reads_node_features_from_the_api_double(kube_api: FakeKubeAPI, pki: Dict[str, Path],
                                                         tmp_path: Path) -> None:
    feature_cluster(kube_api)
    kube_api.add_features(node_feature("kind-worker", cpu_features(), name="vendor-ext", namespace="vendor"))
    done = subprocess.run(kubectl_against(kube_api, pki, tmp_path, "get", "nodefeatures", "-A", "-o", "json"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["items"]
    assert len(listed) == 4 and listed[0]["kind"] == "NodeFeature"
    assert ocifit.features_from_document(json.loads(done.stdout), "node-feature-discovery")["kind-worker1"].flags[
        "cpu.cpuid"] == {"AVX", "AVX2"}  # what kubectl prints, --node-features reads
    watcher = subprocess.Popen(kubectl_against(kube_api, pki, tmp_path, "get", "nodefeatures", "-n", "vendor",
                                               "--watch", "-o", "name"), stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "nodefeature.nfd.k8s-sigs.io/vendor-ext"
        kube_api.add_features(node_feature("kind-worker2", cpu_features(), name="late", namespace="vendor"))
        assert watcher.stdout.readline().strip() == "nodefeature.nfd.k8s-sigs.io/late"
    finally:
        watcher.kill()
        watcher.wait()


def test_node_features_are_watched_and_decide_nfd_specs(kube_api: FakeKubeAPI, pki: Dict[str, Path],
                                                        tmp_path: Path) -> None:
    feature_cluster(kube_api)
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        assert source.wait_synced(30) and source.health()[0]
        assert nfd_decision(source).image == "fast:1"
        kube_api.add_features(node_feature("kind-worker2", cpu_features(avx2=False)))  # MODIFIED
        decision = eventually(lambda: (lambda d: d if d.reason == "disagreement" else None)(nfd_decision(source)))
        assert "2 want fast:1" in decision.message and "1 wants generic:1 (kind-worker2)" in decision.message
        kube_api.delete_features("node-feature-discovery", "kind-worker2")  # no features: matches nothing
        decision = eventually(lambda: (lambda d: d if "matches no compatibility" in d.message else None)(
            nfd_decision(source)))
        assert "1 matches no compatibility (kind-worker2)" in decision.message
        kube_api.compact()  # history gone: the NodeFeature watch relists too
        kube_api.add_features(node_feature("kind-worker2", cpu_features()))
        kube_api.end_streams()
        assert eventually(lambda: nfd_decision(source).image == "fast:1")
        # nodes of one hardware kind are one kind for the decision, though each has its own nodename
        groups = ocifit.candidate_groups(source.snapshot(), ocifit.Placement(), ocifit.parse_spec(NFD_SPEC))
        assert [sorted(names) for _, names in groups] == [["kind-worker", "kind-worker1", "kind-worker2"]]
    finally:
        source.stop()


@pytest.mark.parametrize("namespaces", [(), ("node-feature-discovery",)])
def test_node_features_from_other_namespaces_count_only_unless_restricted(
        namespaces: "tuple[str, ...]", kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A tenant's NodeFeature naming a node gives it features (as nfd-master's default does) unless
    --node-feature-namespaces keeps to NFD's namespace; either way a change of a node's features is logged."""
    caplog.set_level("INFO")
    flavor_cluster(kube_api)
    kube_api.add_features(*[node_feature(f"kind-worker{i or ''}", cpu_features(avx2=False)) for i in range(3)])
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path, node_feature_namespaces=namespaces))
    try:
        assert source.wait_synced(30)
        assert nfd_decision(source).image == "generic:1"
        kube_api.add_features(node_feature("kind-worker2", {"flags": {"cpu.cpuid": {"elements": {"AVX2": {}}}}},
                                           name="sneaky", namespace="tenant-a"))
        kube_api.add_features(node_feature("kind-worker1", cpu_features()))  # NFD's own object changes
        assert eventually(lambda: "node kind-worker1: 1 feature sets changed; its NodeFeatures: "
                                  "node-feature-discovery/kind-worker1" in caplog.text)
        decision = nfd_decision(source)
        if namespaces:
            assert "kind-worker2" not in caplog.text and "tenant-a" not in caplog.text
            assert "1 wants fast:1 (kind-worker1)" in decision.message
        else:
            assert "node kind-worker2: 1 feature sets changed; its NodeFeatures: node-feature-discovery/" \
                   "kind-worker2, tenant-a/sneaky" in caplog.text
            assert "2 want fast:1 (kind-worker1, kind-worker2)" in decision.message
    finally:
        source.stop()


def test_the_first_node_feature_list_gates_readiness(kube_api: FakeKubeAPI, pki: Dict[str, Path],
                                                     tmp_path: Path) -> None:
    feature_cluster(kube_api)
    kube_api.faults += [("list", 500, {}, FEATURES_PATH), ("list", 500, {}, FEATURES_PATH)]
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        ready, why = eventually(lambda: (lambda h: h if "NodeFeature" in h[1] else None)(source.health()))
        assert not ready and why.startswith("waiting for the first NodeFeature list")
        assert source.wait_synced(30) and source.health()[0]
        assert nfd_decision(source).image == "fast:1"
    finally:
        source.stop()


@pytest.mark.parametrize("state,why", [
    ("absent", "the cluster has no nodefeatures.nfd.k8s-sigs.io resource (NFD not installed)"),
    ("forbidden", "ocifit may not read them (RBAC: get, list and watch on nodefeatures.nfd.k8s-sigs.io)"),
])
def test_without_node_features_nfd_specs_are_denied_saying_why(state: str, why: str, kube_api: FakeKubeAPI,
                                                               pki: Dict[str, Path], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ocifit")
    flavor_cluster(kube_api)
    kube_api.nfd = state
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        assert source.wait_synced(30) and source.health()[0]  # readiness does not depend on NFD
        decision = nfd_decision(source)
        assert not decision.allowed and decision.reason == "no-node-features" and why in decision.message
        assert live_decision(source).image == "debian:11"  # ocifit's dialect: labels, as ever
        assert caplog.text.count(why) == 1  # said once, not at every retry
        assert ("WARNING" in caplog.text.split(why)[0].rsplit("\n", 1)[-1]) == (state == "forbidden")
    finally:
        source.stop()


def test_node_features_no_longer_readable_leave_no_node_with_its_old_features(kube_api: FakeKubeAPI,
                                                                              pki: Dict[str, Path],
                                                                              tmp_path: Path) -> None:
    feature_cluster(kube_api)
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        assert source.wait_synced(30) and nfd_decision(source).image == "fast:1"
        assert any(node.features is not None for node in source.snapshot().nodes.values())
        kube_api.nfd = "forbidden"  # RBAC taken away: the NodeFeature watch, reconnecting, gets 403
        kube_api.end_streams(wait=False)  # an open stream ends; one reconnecting meets the 403 anyway
        eventually(lambda: all(node.features is None for node in source.snapshot().nodes.values()), 30)
        assert nfd_decision(source).reason == "no-node-features"
    finally:
        source.stop()

def test_5000_nodes_are_listed_in_pages_of_500(kube_api: FakeKubeAPI, pki: Dict[str, Path], tmp_path: Path) -> None:
    shapes = [{FLAVOR_KEY: "vanilla", "zone": f"z{i % 20}"} for i in range(20)]
    kube_api.add(*[node_obj(f"n{i:04d}", shapes[i % 20]) for i in range(5000)])
    source = ocifit.build_node_source(kube_settings(kube_api, pki, tmp_path))
    try:
        assert source.wait_synced(30)
        assert len(source.snapshot()) == 5000
        pages = kube_api.lists()
        assert len(pages) == 10 and all(q["limit"] == "500" for q in pages)
        assert live_decision(source).image == "debian:11"
    finally:
        source.stop()


def test_in_cluster_config_joins_ipv6_hosts_safely(monkeypatch: pytest.MonkeyPatch, pki: Dict[str, Path],
                                                   tmp_path: Path) -> None:
    shutil.copy(pki["ca"], tmp_path / "ca.crt")
    (tmp_path / "token").write_text("sa-token\n")
    monkeypatch.setattr(ocifit, "SERVICE_ACCOUNT_DIR", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    client = ocifit.KubeClient.in_cluster()
    assert client.base_url == "https://[fd00::1]:6443" and client.token() == "sa-token"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ValueError, match="not in a cluster"):
        ocifit.KubeClient.in_cluster()


def test_serve_follows_the_cluster_and_reports_readiness(kube_api: FakeKubeAPI, pki: Dict[str, Path],
                                                         tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    settings = kube_settings(kube_api, pki, tmp_path, port=0, bind="127.0.0.1", cert=str(pki["crt"]),
                             key=str(pki["key"]))
    metrics = ocifit.Metrics()
    source = ocifit.build_node_source(settings, metrics)
    artifacts = ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")})
    running = RunningServer(ocifit.build_server(settings, ocifit.Webhook(settings, source, artifacts, metrics)),
                            pki["ca"])
    try:
        eventually(lambda: running.request("GET", "/readyz")[0] == 200)
        assert patch_of(running.post_review(review_of(pod_obj()))["response"])[0]["value"] == "debian:11"
        for name in ("kind-worker", "kind-worker1", "kind-worker2"):
            kube_api.modify(name, labels={FLAVOR_KEY: "strawberry"})
        eventually(lambda: patch_of(running.post_review(review_of(pod_obj()))["response"])[0]["value"]
                   == "rockylinux:9", 2.0)
        assert b"ocifit_node_relists_total 1" in running.request("GET", "/metrics")[1]
    finally:
        running.stop()
        source.stop()


# --------------------------------------------------------------------------------------------
# Artifacts and registry: references, a real registry (docker-registry + oras), stubs for the rest
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("ghcr.io/compspec/ocifit-k8s-compatibility:kind-example",
     ("ghcr.io", "compspec/ocifit-k8s-compatibility", "kind-example", "")),
    ("debian", ("docker.io", "library/debian", "latest", "")),
    ("docker.io/debian:11", ("docker.io", "library/debian", "11", "")),
    ("index.docker.io/user/app", ("docker.io", "user/app", "latest", "")),
    ("user/app:v1", ("docker.io", "user/app", "v1", "")),
    ("localhost/app", ("localhost", "app", "latest", "")),
    ("localhost:5000/a/b/c:t", ("localhost:5000", "a/b/c", "t", "")),
    ("127.0.0.1:5000/app:v1@sha256:" + "a" * 64, ("127.0.0.1:5000", "app", "v1", "sha256:" + "a" * 64)),
    ("[::1]:5000/app", ("[::1]:5000", "app", "latest", "")),
    ("Registry.Example.COM/app", ("registry.example.com", "app", "latest", "")),
])
def test_references_follow_the_distribution_grammar(text: str, expected: tuple) -> None:
    ref = ocifit.parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert ref.reference == (expected[3] or expected[2])  # the digest wins over the tag


@pytest.mark.parametrize("text,message", [
    ("", "empty artifact reference"), ("ghcr.io/Org/app", "repository component 'Org' is not valid (repository "
                                                          "names are lowercase)"),
    ("ghcr.io/app:bad tag", "tag 'bad tag' is not a valid tag"), ("ghcr.io/app@sha256:abc", "digest 'sha256:abc'"),
    ("bad_host.io:port/app", "registry 'bad_host.io:port' is not a valid host[:port]"),
    ("ghcr.io//app", "repository component '' is not valid"),
])
def test_bad_references_name_the_wrong_part(text: str, message: str) -> None:
    with pytest.raises(ocifit.BadReference) as caught:
        ocifit.parse_reference(text)
    assert message in str(caught.value)


def test_allow_list_entries_and_wildcards() -> None:
    assert ocifit.registry_matches("ghcr.io", "ghcr.io") and ocifit.registry_matches("docker.io", "index.docker.io")
    assert ocifit.registry_matches("a.corp.example:5000", "*.corp.example")
    assert not ocifit.registry_matches("corp.example.evil.io", "*.corp.example")
    assert not ocifit.registry_matches("ghcr.io:443", "ghcr.io")


@pytest.mark.parametrize("address,why,always", [
    ("169.254.169.254", "a cloud metadata address", True), ("fd00:ec2::254", "a cloud metadata address", True),
    ("168.63.129.16", "a cloud metadata address", True),  # Azure WireServer
    ("169.254.10.1", "a link-local address", True), ("fe80::1%eth0", "a link-local address", True),
    ("::ffff:169.254.169.254", "a cloud metadata address (169.254.169.254, inside ::ffff:a9fe:a9fe)", True),
    ("127.0.0.1", "a loopback address", False), ("::1", "a loopback address", False),
    ("0.0.0.0", "an unspecified address", False), ("::", "an unspecified address", False),
    ("10.0.0.5", "a private address", False), ("172.20.1.1", "a private address", False),
    ("192.168.1.1", "a private address", False), ("fd12:3456::1", "a private address", False),
    ("100.64.0.10", "a shared (carrier-grade NAT) address", False),
    ("224.0.0.1", "a multicast or broadcast address", False), ("ff02::1", "a multicast or broadcast address", False),
    ("192.0.2.1", "a documentation or benchmarking address", False),
    ("2001:db8::1", "a documentation or benchmarking address", False),
    ("64:ff9b::7f00:1", "a loopback address (127.0.0.1, inside 64:ff9b::7f00:1)", False),  # NAT64
    ("2002:a00:1::", "a private address (10.0.0.1, inside 2002:a00:1::)", False),  # 6to4
    ("::127.0.0.1", "a loopback address (127.0.0.1, inside ::7f00:1)", False),  # IPv4-compatible
    ("::ffff:10.1.2.3", "a private address (10.1.2.3, inside ::ffff:a01:203)", False),
    ("64:ff9b::a9fe:a9fe", "a cloud metadata address (169.254.169.254, inside 64:ff9b::a9fe:a9fe)", True),
    ("8.8.8.8", None, False), ("2606:4700:4700::1111", None, False), ("64:ff9b::808:808", None, False),
])
def test_only_public_unicast_addresses_are_fetched_from_by_default(address: str, why: Optional[str],
                                                                   always: bool) -> None:
    assert ocifit.address_refusal(address) == (why, always)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0.0.0.0", "[::1]", "localhost"])
def test_a_pod_author_cannot_make_ocifit_fetch_from_loopback(stubs: Any, host: str) -> None:
    routes, _ = artifact_routes()
    stub = stubs(routes)  # a registry really listens there
    closed = _free_port()
    messages = []
    for port in (stub.port, closed):  # the same answer whether or not the port is open: no port-scan oracle
        with pytest.raises(ocifit.RegistryError) as refused:
            pull_spec(f"{host}:{port}/app:v1", ocifit.Settings())
        messages.append(str(refused.value).replace(str(port), "PORT"))
    assert messages[0] == messages[1] and "--allowed-registries" in messages[0], messages
    assert stub.seen == []
    assert pull_spec(f"127.0.0.1:{stub.port}/app:v1", ocifit.Settings(allowed_registries=(f"127.0.0.1:{stub.port}",),
                     insecure_registry=(f"127.0.0.1:{stub.port}",)))[0].compatibilities


def test_naming_a_registry_never_allows_metadata_or_link_local() -> None:
    policy = ocifit.AddressPolicy(("metadata.internal",))
    with pytest.raises(ocifit.ForbiddenAddress, match="never fetches from"):
        policy.check("metadata.internal", None, 443, ["169.254.169.254"])
    policy.check("metadata.internal", None, 443, ["10.0.0.1"])  # named: its private address is fine


def test_www_authenticate_challenges_parse_quoted_commas() -> None:
    header = ('Bearer realm="https://auth.example/token",service="registry.example",'
              'scope="repository:a/b:pull,push", Basic realm="x\\"y"')
    assert ocifit.parse_challenges([header]) == [
        ("bearer", {"realm": "https://auth.example/token", "service": "registry.example",
                    "scope": "repository:a/b:pull,push"}),
        ("basic", {"realm": 'x"y'})]


class DockerRegistry:
    """Debian's docker-registry (CNCF distribution 2.8) on a free loopback port, with its own storage."""

    def __init__(self, directory: Path, htpasswd: Optional[Path] = None):
        binary = need("docker-registry")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = directory / "registry.log"
        auth = (f"auth:\n  htpasswd:\n    realm: ocifit-test\n    path: {htpasswd}\n") if htpasswd else ""
        config = directory / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: info\n  formatter: json\n"
                          f"storage:\n  filesystem:\n    rootdirectory: {directory / 'data'}\n"
                          f"http:\n  addr: {self.host}\n{auth}")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([binary, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(f"docker-registry did not start: {self.log_path.read_text()}") from None
                time.sleep(0.05)

    def oras(self, username: str = "", password: str = "") -> Any:
        import oras.client
        client = oras.client.OrasClient(hostname=self.host, insecure=True,
                                        auth_backend="basic" if username else "token")
        if username:
            client.auth.set_basic_auth(username, password)
        return client

    def push(self, repo_tag: str, spec_file: Path, media_type: str = ocifit.COMPAT_MEDIA_TYPE, **login: str) -> str:
        """Push a spec with oras from the file's own directory; returns the manifest digest."""
        cwd = os.getcwd()
        os.chdir(spec_file.parent)
        try:
            response = self.oras(**login).push(target=f"{self.host}/{repo_tag}",
                                               files=[f"{spec_file.name}:{media_type}"], quiet=True)
        finally:
            os.chdir(cwd)
        return response.headers["Docker-Content-Digest"]

    def requests(self, path_part: str = "/v2/") -> List[str]:
        """The URIs of the requests the registry logged that contain path_part."""
        self.log.flush()
        uris = []
        for line in self.log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "response completed" in entry.get("msg", "") and path_part in entry.get("http.request.uri", ""):
                uris.append(entry["http.request.uri"])
        return uris

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("registry")
    running = DockerRegistry(directory)
    specs = tmp_path_factory.mktemp("specs")
    for name in ("compatibility-test.json", "ebpf-compatibility-spec.json"):
        shutil.copy(EXAMPLE / name, specs / name)
    running.digests = {"flavor": running.push("flavor:v1", specs / "compatibility-test.json"),
                       "ebpf": running.push("ebpf:v1", specs / "ebpf-compatibility-spec.json")}
    yield running
    running.stop()


def registry_settings(*hosts: str, **kw: Any) -> ocifit.Settings:
    return ocifit.Settings(insecure_registry=tuple(hosts), **kw)


def pull_spec(ref: str, settings: ocifit.Settings, budget: float = 8.0) -> "tuple[ocifit.Spec, str]":
    pulled = ocifit.RegistryClient(settings).pull(ocifit.parse_reference(ref), time.monotonic() + budget)
    return ocifit.parse_spec(pulled.spec_bytes), pulled.digest


def test_a_pushed_artifact_is_fetched_by_tag_and_by_digest(registry: DockerRegistry) -> None:
    settings = registry_settings(registry.host)
    spec, digest = pull_spec(f"{registry.host}/flavor:v1", settings)
    assert [c.tag for c in spec.compatibilities] == ["debian:11", "ubuntu:24.04", "rockylinux:9"]
    assert digest == registry.digests["flavor"]
    by_digest, _ = pull_spec(f"{registry.host}/ebpf@{registry.digests['ebpf']}", settings)
    assert by_digest.compatibilities[0].tag.endswith(":ubuntu2204")


def test_a_missing_tag_names_the_artifact_and_the_registry_code(registry: DockerRegistry) -> None:
    with pytest.raises(ocifit.RegistryError) as caught:
        pull_spec(f"{registry.host}/flavor:nope", registry_settings(registry.host))
    assert str(caught.value) == (f"artifact {registry.host}/flavor:nope not found in registry "
                                 "(MANIFEST_UNKNOWN: manifest unknown)")
    assert len(registry.requests("/flavor/manifests/nope")) == 1  # a 404 is never retried


def test_a_digest_the_registry_lacks_is_not_found(registry: DockerRegistry) -> None:
    with pytest.raises(ocifit.RegistryError, match="not found in registry"):
        pull_spec(f"{registry.host}/flavor@sha256:{'0' * 64}", registry_settings(registry.host))


def _registry_call(registry: DockerRegistry, method: str, path: str, body: Optional[bytes] = None,
                   content_type: str = ocifit.MANIFEST_TYPES[0]) -> http.client.HTTPResponse:
    """A plain HTTP call to the test registry, for setup oras-py has no verb for (pushing an index)."""
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=10)
    conn.request(method, path, body=body, headers={"Accept": ", ".join(ocifit.MANIFEST_TYPES),
                                                   "Content-Type": content_type})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_an_artifact_behind_an_index_is_followed(registry: DockerRegistry, tmp_path: Path) -> None:
    other = tmp_path / "readme.txt"
    other.write_text("not a spec")
    spec_copy = tmp_path / "compatibility-test.json"
    shutil.copy(EXAMPLE / "compatibility-test.json", spec_copy)
    children = [registry.push("indexed:plain", other, media_type="text/plain"),
                registry.push("indexed:spec", spec_copy)]
    manifests = [{"mediaType": ocifit.MANIFEST_TYPES[0], "digest": digest,
                  "size": int(_registry_call(registry, "HEAD", f"/v2/indexed/manifests/{digest}")
                              .getheader("Content-Length") or -1)} for digest in children]
    index = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[1], "manifests": manifests}).encode()
    assert _registry_call(registry, "PUT", "/v2/indexed/manifests/all", index, ocifit.MANIFEST_TYPES[1]).status == 201
    spec, digest = pull_spec(f"{registry.host}/indexed:all", registry_settings(registry.host))
    assert spec.compatibilities[0].tag == "debian:11"
    assert digest == "sha256:" + ocifit.hashlib.sha256(index).hexdigest()  # the index's digest keys the cache


def test_a_manifest_without_the_compatibility_layer_is_explained(registry: DockerRegistry, tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    registry.push("wrongtype:v1", other, media_type="text/plain")
    with pytest.raises(ocifit.RegistryError) as caught:
        pull_spec(f"{registry.host}/wrongtype:v1", registry_settings(registry.host))
    assert f"has no layer of media type {ocifit.COMPAT_MEDIA_TYPE} (layers: text/plain)" in str(caught.value)


def test_a_registry_mirror_serves_another_hosts_artifacts(registry: DockerRegistry) -> None:
    settings = registry_settings(registry.host, registry_mirror=(f"ghcr.io={registry.host}",))
    spec, _ = pull_spec("ghcr.io/flavor:v1", settings)
    assert spec.compatibilities[0].tag == "debian:11"


def test_fetch_prints_the_spec_and_with_v_the_digest(registry: DockerRegistry) -> None:
    done = run_cli("fetch", "-v", "--insecure-registry", registry.host, f"{registry.host}/flavor:v1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads((EXAMPLE / "compatibility-test.json").read_text())
    assert f"resolved to {registry.digests['flavor']}" in done.stderr and "requests" in done.stderr
    missing = run_cli("fetch", "--insecure-registry", registry.host, f"{registry.host}/flavor:gone")
    assert missing.returncode == 1 and "MANIFEST_UNKNOWN: manifest unknown" in missing.stderr


# ---- attached specs: OCI referrers -------------------------------------------------------

ATTACHED_SPEC = (EXAMPLE / "nfd" / "spec.yaml").read_bytes()
NEWER_ATTACHED_SPEC = ATTACHED_SPEC.replace(b"description: AVX2 and a recent kernel", b"description: the newer spec")


def _descriptor(media_type: str, data: bytes, **extra: Any) -> Dict[str, Any]:
    return dict({"mediaType": media_type, "digest": "sha256:" + ocifit.hashlib.sha256(data).hexdigest(),
                 "size": len(data)}, **extra)


def _put_blob(registry: DockerRegistry, repo: str, data: bytes) -> None:
    started = _registry_call(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    assert started.status == 202, started.status
    location = ocifit.urllib.parse.urlsplit(started.getheader("Location") or "")
    digest = "sha256:" + ocifit.hashlib.sha256(data).hexdigest()
    put = _registry_call(registry, "PUT", f"{location.path}?{location.query}&digest={digest}", data,
                         "application/octet-stream")
    assert put.status == 201, put.status


def referrer_manifest(subject: Dict[str, Any], spec: bytes, media_type: str = ocifit.NFD_SPEC_MEDIA_TYPE,
                      artifact_type: str = ocifit.NFD_ARTIFACT_TYPE, created: Optional[str] = None) -> bytes:
    """An artifact manifest as `oras attach` writes it: empty config, one layer, the image as its subject."""
    manifest: Dict[str, Any] = {
        "schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[0], "artifactType": artifact_type,
        "config": _descriptor("application/vnd.oci.empty.v1+json", b"{}"),
        "layers": [_descriptor(media_type, spec)], "subject": subject}
    if created:
        manifest["annotations"] = {ocifit.CREATED_ANNOTATION: created}
    return json.dumps(manifest).encode()


def attach(registry: DockerRegistry, repo: str, image: Dict[str, Any], spec: bytes, **kw: Any) -> Dict[str, Any]:
    """Attach a spec to an image in the test registry; returns the referrer's descriptor for an index."""
    for blob in (b"{}", spec):
        _put_blob(registry, repo, blob)
    manifest = referrer_manifest(image, spec, **kw)
    descriptor = _descriptor(ocifit.MANIFEST_TYPES[0], manifest, artifactType=kw.get("artifact_type",
                                                                                     ocifit.NFD_ARTIFACT_TYPE))
    assert _registry_call(registry, "PUT", f"/v2/{repo}/manifests/{descriptor['digest']}", manifest).status == 201
    if kw.get("created"):
        descriptor["annotations"] = {ocifit.CREATED_ANNOTATION: kw["created"]}
    return descriptor


def pushed_image(registry: DockerRegistry, repo_tag: str, tmp_path: Path) -> Dict[str, Any]:
    """An ordinary (non-compatibility) manifest pushed with oras; its descriptor, for a subject."""
    layer = tmp_path / f"{repo_tag.replace(':', '-')}.tar"
    layer.write_bytes(repo_tag.encode())
    digest = registry.push(repo_tag, layer, media_type="application/vnd.oci.image.layer.v1.tar")
    size = int(_registry_call(registry, "HEAD", f"/v2/{repo_tag.split(':')[0]}/manifests/{digest}")
               .getheader("Content-Length") or -1)
    return {"mediaType": ocifit.MANIFEST_TYPES[0], "digest": digest, "size": size}


def put_fallback_index(registry: DockerRegistry, repo: str, image: Dict[str, Any],
                       referrers: List[Dict[str, Any]]) -> None:
    """The referrers tag schema's index, as oras maintains it on a registry without the referrers API."""
    index = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[1], "manifests": referrers}).encode()
    tag = image["digest"].replace(":", "-")
    assert _registry_call(registry, "PUT", f"/v2/{repo}/manifests/{tag}", index, ocifit.MANIFEST_TYPES[1]).status == 201


def test_fetch_prints_the_newest_spec_attached_to_an_image(registry: DockerRegistry, tmp_path: Path) -> None:
    image = pushed_image(registry, "attached:v1", tmp_path)
    older = attach(registry, "attached", image, ATTACHED_SPEC, created="2026-03-01T12:00:00+02:00")  # 10:00 UTC
    newer = attach(registry, "attached", image, NEWER_ATTACHED_SPEC, created="2026-03-01T11:00:00Z")
    signature = attach(registry, "attached", image, b"sig", media_type="application/octet-stream",
                       artifact_type="application/vnd.dev.cosign.artifact.sig.v1+json", created="2026-12-01T00:00:00Z")
    put_fallback_index(registry, "attached", image, [older, signature, newer])

    done = run_cli("fetch", "-v", "--insecure-registry", registry.host, f"{registry.host}/attached:v1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ocifit.load_yaml(NEWER_ATTACHED_SPEC.decode())
    assert (f"its compatibility artifact is {registry.host}/attached@{newer['digest']}, the newest of 2 found through "
            f"the fallback tag {image['digest'].replace(':', '-')}") in done.stderr

    bare = pushed_image(registry, "attached:bare", tmp_path)
    nothing = run_cli("fetch", "--insecure-registry", registry.host, f"{registry.host}/attached:bare")
    assert nothing.returncode == 1 and nothing.stdout == ""
    assert nothing.stderr == (f"ocifit: image {registry.host}/attached:bare ({bare['digest']}) has no compatibility "
                              f"artifact attached (looked up through the fallback tag "
                              f"{bare['digest'].replace(':', '-')})\n")


def test_a_registry_without_the_referrers_api_is_probed_once(registry: DockerRegistry, tmp_path: Path) -> None:
    images = [pushed_image(registry, f"probed:{tag}", tmp_path) for tag in ("a", "b")]
    put_fallback_index(registry, "probed", images[0], [attach(registry, "probed", images[0], ATTACHED_SPEC)])
    client = ocifit.RegistryClient(registry_settings(registry.host))
    found = [client.attached(ocifit.parse_reference(f"{registry.host}/probed:{tag}"), time.monotonic() + 8)
             for tag in ("a", "b")]
    assert [a.spec_bytes for a in found] == [ATTACHED_SPEC, None]
    # The first: image, referrers probe (docker-registry 2.8 answers 404), fallback tag, referrer, blob. The
    # second: image and fallback tag, no probe.
    assert [a.requests for a in found] == [5, 2]
    assert [uri.rsplit("/", 1)[1] for uri in registry.requests("/probed/manifests/sha256-")[-2:]] == [
        image["digest"].replace(":", "-") for image in images]


def referrers_api_routes(pages: List[List[Dict[str, Any]]], manifests: Dict[str, bytes], blobs: Dict[str, bytes],
                         image: bytes, next_link: Any = None) -> Dict[str, Any]:
    """A registry with the referrers API: the image by tag, paged referrers (Link headers), manifests, blobs."""
    image_digest = "sha256:" + ocifit.hashlib.sha256(image).hexdigest()
    routes: Dict[str, Any] = {
        "/v2/app/manifests/v1": lambda h: send(h, 200, image, {"Content-Type": ocifit.MANIFEST_TYPES[0]})}

    def page(h: Any) -> None:
        number = int(dict(ocifit.urllib.parse.parse_qsl(h.path.partition("?")[2])).get("page", 0))
        index = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[1],
                            "manifests": pages[number]}).encode()
        link = (next_link or f"</v2/app/referrers/{image_digest}?page={number + 1}>; rel=\"next\"") \
            if number + 1 < len(pages) else None
        send(h, 200, index, dict({"Content-Type": ocifit.MANIFEST_TYPES[1]}, **({"Link": link} if link else {})))
    routes[f"/v2/app/referrers/{image_digest}"] = page
    for digest, body in manifests.items():
        routes[f"/v2/app/manifests/{digest}"] = lambda h, b=body: send(h, 200, b, {
            "Content-Type": ocifit.MANIFEST_TYPES[0]})
    for digest, body in blobs.items():
        routes[f"/v2/app/blobs/{digest}"] = lambda h, b=body: send(h, 200, b)
    return routes


def compat_referrer(subject: Dict[str, Any], spec: bytes) -> "tuple[bytes, Dict[str, Any]]":
    """A referrer carrying a spec in ocifit's dialect, and its descriptor as a referrers index lists it."""
    referrer = referrer_manifest(subject, spec, ocifit.COMPAT_MEDIA_TYPE)
    return referrer, _descriptor(ocifit.MANIFEST_TYPES[0], referrer, artifactType=ocifit.NFD_ARTIFACT_TYPE)


def api_registry_with(image: bytes, spec: bytes) -> "tuple[Dict[str, Any], Dict[str, Any], bytes, Dict[str, Any]]":
    """Routes of a registry with the referrers API serving app:v1 (`image`) with one spec attached; also the
    image's descriptor, the referrer and the referrer's descriptor."""
    subject = _descriptor(ocifit.MANIFEST_TYPES[0], image)
    referrer, descriptor = compat_referrer(subject, spec)
    routes = referrers_api_routes([[descriptor]], {descriptor["digest"]: referrer},
                                  {_descriptor("", spec)["digest"]: spec}, image)
    return routes, subject, referrer, descriptor

def test_the_referrers_api_is_paged_filtered_and_the_newest_chosen(stubs: Any, caplog: pytest.LogCaptureFixture
                                                                   ) -> None:
    image = b'{"schemaVersion": 2, "layers": []}'
    subject = _descriptor(ocifit.MANIFEST_TYPES[0], image)
    ocifit_spec = (EXAMPLE / "compatibility-test.json").read_bytes()
    made = {name: referrer_manifest(subject, spec, media_type) for name, spec, media_type in (
        ("undated", ATTACHED_SPEC, ocifit.NFD_SPEC_MEDIA_TYPE), ("dated", ocifit_spec, ocifit.COMPAT_MEDIA_TYPE),
        ("other", b"sbom", "application/spdx+json"))}
    descriptors = {name: _descriptor(ocifit.MANIFEST_TYPES[0], body, artifactType=ocifit.NFD_ARTIFACT_TYPE)
                   for name, body in made.items()}
    descriptors["dated"]["annotations"] = {ocifit.CREATED_ANNOTATION: "2025-01-01T00:00:00.123456789-05:00"}
    descriptors["other"]["artifactType"] = "application/spdx+json"  # the stub does not filter: ocifit must
    deleted = _descriptor(ocifit.MANIFEST_TYPES[0], b"a referrer since deleted", artifactType=ocifit.NFD_ARTIFACT_TYPE,
                          annotations={ocifit.CREATED_ANNOTATION: "2027-01-01T00:00:00Z"})  # newest, but 404
    odd = dict(deleted, digest="sha256:" + "0" * 64, annotations=["not", "a", "map"])
    stub = stubs(referrers_api_routes(
        [[descriptors["undated"], descriptors["other"], odd], [deleted, descriptors["dated"], descriptors["undated"]]],
        {d["digest"]: made[name] for name, d in descriptors.items()},
        {_descriptor("", s)["digest"]: s for s in (ATTACHED_SPEC, ocifit_spec)}, image))
    client = ocifit.RegistryClient(registry_settings(f"127.0.0.1:{stub.port}"))
    found = client.attached(ocifit.parse_reference(f"127.0.0.1:{stub.port}/app:v1"), time.monotonic() + 5)
    assert (found.artifact_digest, found.found_by, found.referrers) == (
        descriptors["dated"]["digest"], "the referrers API", 4)
    assert f"compatibility artifact {deleted['digest']} of 127.0.0.1:{stub.port}/app:v1 not found" in caplog.text
    assert "trying the next newest" in caplog.text
    assert ocifit.parse_spec(found.spec_bytes).compatibilities[0].tag == "debian:11"
    queries = [path for _, path, _ in stub.seen if "/referrers/" in path]
    assert len(queries) == 2 and "artifactType=application%2Fvnd.nfd.image-compatibility.v1alpha1" in queries[0]


def test_a_referrers_page_on_another_host_or_a_foreign_subject_is_refused(stubs: Any) -> None:
    image = b'{"schemaVersion": 2, "layers": ["mine"]}'
    foreign = referrer_manifest(_descriptor(ocifit.MANIFEST_TYPES[0], b"another image"), ATTACHED_SPEC)
    descriptor = _descriptor(ocifit.MANIFEST_TYPES[0], foreign, artifactType=ocifit.NFD_ARTIFACT_TYPE)
    routes = referrers_api_routes([[descriptor]], {descriptor["digest"]: foreign},
                                  {_descriptor("", ATTACHED_SPEC)["digest"]: ATTACHED_SPEC}, image)
    stub = stubs(routes)
    client = ocifit.RegistryClient(registry_settings(f"127.0.0.1:{stub.port}"))
    ref = ocifit.parse_reference(f"127.0.0.1:{stub.port}/app:v1")
    with pytest.raises(ocifit.RegistryError, match="does not name sha256:[0-9a-f]{64} as its subject"):
        client.attached(ref, time.monotonic() + 5)
    stub.routes.update(referrers_api_routes([[descriptor], []], {}, {}, image,
                                            next_link='<http://169.254.169.254/v2/app/referrers/x>; rel="next"'))
    with pytest.raises(ocifit.RegistryError, match='refusing a referrers page link to "http://169.254.169.254/'):
        client.attached(ref, time.monotonic() + 5)
    # A page after the first that fails is an error, not a sign that the registry has no referrers API.
    stub.routes.update(referrers_api_routes([[descriptor], []], {}, {}, image, next_link='</v2/app/gone>; rel=next'))
    with pytest.raises(ocifit.RegistryError, match=r"referrers of 127\.0\.0\.1:\d+/app:v1 not found in registry"):
        client.attached(ref, time.monotonic() + 5)


# ---- choosing among candidate images by their attached specs ----

CPU_LABEL = "example.com/cpu"
AVX2_ONLY_SPEC = b"""\
version: v1alpha1
compatibilities:
- description: needs AVX2
  rules:
  - name: avx2
    matchFeatures:
    - feature: cpu.cpuid
      matchName: {op: InRegexp, value: ["^AVX2$"]}
"""


def label_spec(*sets: List[Dict[str, Any]]) -> bytes:
    """A spec in ocifit's dialect without tags, as attached to an image: each set is one way it can run."""
    return json.dumps(spec_doc(*({"rules": [{"matchFeatures": [{"matchExpressions": list(s)}]}]} for s in sets)
                               )).encode()


def candidate_cluster() -> ocifit.NodeSnapshot:
    return snapshot_of(node_obj("w1", {CPU_LABEL: "avx512"}), node_obj("w2", {CPU_LABEL: "avx2"}),
                       node_obj("w3", {CPU_LABEL: "avx2"}), node_obj("cp", {CPU_LABEL: "avx2"}, control_plane=True))


def candidates_pod(images: str, **kw: Any) -> Dict[str, Any]:
    return pod_obj(ref=None, annotations={ocifit.CANDIDATES_ANNOTATION: images}, **kw)


@pytest.fixture(scope="module")
def candidate_images(registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """cands:fast runs on AVX-512 nodes only, cands:good on AVX-512 or AVX2 (two sets), cands:generic has
    nothing attached; each image's digest and its attached artifact's."""
    tmp = tmp_path_factory.mktemp("candidates")
    images = {tag: pushed_image(registry, f"cands:{tag}", tmp) for tag in ("fast", "good", "generic")}
    specs = {"fast": label_spec([expr("In", CPU_LABEL, ["avx512"])]),
             "good": label_spec([expr("In", CPU_LABEL, ["avx512"])], [expr("In", CPU_LABEL, ["avx2"])])}
    found: Dict[str, Any] = {tag: {"image": image["digest"]} for tag, image in images.items()}
    for tag, spec in specs.items():
        referrer = attach(registry, "cands", images[tag], spec, media_type=ocifit.COMPAT_MEDIA_TYPE)
        put_fallback_index(registry, "cands", images[tag], [referrer])
        found[tag]["artifact"] = referrer["digest"]
    return found


def test_the_first_candidate_whose_attached_spec_fits_every_node_is_chosen(
        registry: DockerRegistry, candidate_images: Dict[str, Any], tmp_path: Path) -> None:
    host, digests = registry.host, candidate_images
    artifacts = ocifit.RegistryArtifacts(registry_settings(host))
    snapshot = candidate_cluster()

    def decided(pod: Dict[str, Any]) -> ocifit.Decision:
        return ocifit.decide(review_of(pod)["request"], snapshot, FileArtifacts(),
                             get_attached=lambda ref: artifacts.attached(ref, time.monotonic() + 8))

    pod = candidates_pod(f"{host}/cands:fast, {host}/cands:good\n {host}/cands:generic")
    decision = decided(pod)
    assert (decision.reason, decision.image) == ("selected", f"{host}/cands:good@{digests['good']['image']}")
    mutated = kubectl_patch(pod, list(decision.patch), tmp_path)
    assert mutated["spec"]["containers"][0]["image"] == f"{host}/cands:good@{digests['good']['image']}"
    annotations = mutated["metadata"]["annotations"]
    assert annotations[ocifit.ARTIFACT_ANNOTATION] == f"{host}/cands@{digests['good']['artifact']}"
    assert annotations[ocifit.MATCHED_ANNOTATION] == "candidates[1] of 3: its attached spec fits all 3 candidate nodes"

    # The same pod again costs the registry nothing; kept to the AVX-512 node, the best candidate fits.
    before = len(registry.requests("/cands/"))
    assert decided(pod).image == decision.image
    on_avx512 = decided(candidates_pod(f"{host}/cands:fast {host}/cands:good",
                                       spec={"nodeSelector": {CPU_LABEL: "avx512"}}))
    assert on_avx512.image == f"{host}/cands:fast@{digests['fast']['image']}"
    assert on_avx512.matched == "candidates[0] of 2: its attached spec fits the 1 candidate node"
    assert len(registry.requests("/cands/")) == before

    generic = decided(candidates_pod(f"{host}/cands:fast,{host}/cands:generic"))
    assert (generic.reason, generic.image) == ("generic", f"{host}/cands:generic@{digests['generic']['image']}")
    assert {op["path"].rsplit("/", 1)[1]: op["value"] for op in generic.patch if "annotations" in op["path"]} == {
        "oci.image.compatibilities.selection~1selected-image": generic.image,
        "oci.image.compatibilities.selection~1matched-compatibility":
            "candidates[1] of 2: no compatibility artifact attached, so it runs on any of the 3 candidate nodes",
        "oci.image.compatibilities.selection~1artifact": f"none attached to {host}/cands@{digests['generic']['image']}"}

    none_fits = decided(candidates_pod(f"{host}/cands:fast"))
    assert (none_fits.allowed, none_fits.reason, none_fits.code) == (False, "no-candidate-fits", 403)
    assert none_fits.message == (
        f"the candidate image does not fit all 3 candidate nodes: (1) {host}/cands:fast: 2 of 3 candidate nodes "
        f"fail (w2, w3); on w2: compatibilities[0] (no tag): rules[0].matchFeatures[0].matchExpressions[0]: value "
        f"\"avx2\" of label \"{CPU_LABEL}\" not in [\"avx512\"]; list a generic image last (one with no "
        "compatibility artifact attached), or keep the pod to nodes that fit with a nodeSelector")


def test_candidates_and_an_image_ref_together_or_a_bad_list_are_denied_saying_so() -> None:
    both = decide(pod_obj(annotations={ocifit.CANDIDATES_ANNOTATION: "a:1 b:2"}))
    assert (both.reason, both.code) == ("malformed-pod", 400)
    assert both.message == (f"the pod has both {ocifit.IMAGE_REF_ANNOTATION} (one compatibility artifact naming "
                            f"images) and {ocifit.CANDIDATES_ANNOTATION} (images chosen by the specs attached to "
                            "them); choose one")
    empty = decide(candidates_pod(" , "))
    assert empty.message == f"annotation {ocifit.CANDIDATES_ANNOTATION} lists no image"
    many = decide(candidates_pod(" ".join(f"r.example/i:{n}" for n in range(17))))
    assert many.message == f"annotation {ocifit.CANDIDATES_ANNOTATION} lists 17 images, over 16"
    offline = decide(candidates_pod("r.example/i:1"))  # decide() given no way to read attached specs
    assert offline.reason == "artifact-unavailable" and "this mode has no registry access" in offline.message
    nowhere = decide(candidates_pod("r.example/i:1", spec={"nodeSelector": {"no": "such-node"}}))
    assert nowhere.reason == "no-candidates"
    bogus = decide(pod_obj(ref=None, annotations={ocifit.CANDIDATES_ANNOTATION: "r.example/i:1",
                                                  ocifit.ON_DISAGREEMENT_ANNOTATION: "sometimes"}))
    assert (bogus.reason, bogus.message) == (
        "malformed-pod", f'annotation {ocifit.ON_DISAGREEMENT_ANNOTATION} is "sometimes"; use pin or deny')
    misfit = ocifit.AttachedSpec("r.example/i:1", ocifit.parse_reference("r.example/i:1"), "sha256:" + "b" * 64,
                                 ocifit.parse_spec(label_spec([expr("In", CPU_LABEL, ["avx512"])])),
                                 "sha256:" + "c" * 64, "registry")
    pin = ocifit.decide(review_of(pod_obj(ref=None, annotations={ocifit.CANDIDATES_ANNOTATION: "r.example/i:1",
                                                                 ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"}))["request"],
                        candidate_cluster(), FileArtifacts(), get_attached=lambda ref: misfit)
    assert pin.reason == "no-candidate-fits"
    assert pin.message.endswith(f"({ocifit.ON_DISAGREEMENT_ANNOTATION}: pin does not apply to candidates)")
    with pytest.raises(ocifit.BadReference, match="tag 'café' is not a valid tag"):
        ocifit.parse_reference("r.example/app:café")  # ASCII only: a request line cannot carry it


def test_nothing_attached_needs_the_word_of_the_images_own_repository(stubs: Any) -> None:
    """A registry routing repositories to different backends: one without the referrers API must not make an
    image whose spec only that API lists look like one with nothing attached (and so be chosen anywhere), nor
    one with an old fallback index get that index's spec."""
    routes, subject, _, descriptor = api_registry_with(b'{"schemaVersion": 2, "layers": ["fast"]}',
                                                       label_spec([expr("In", CPU_LABEL, ["avx512"])]))
    routes["/v2/proxy/x/manifests/v1"] = lambda h: send(h, 200, b'{"schemaVersion": 2}',
                                                         {"Content-Type": ocifit.MANIFEST_TYPES[0]})
    # what a fallback index from before the API still lists
    _, old_descriptor = compat_referrer(subject, label_spec([expr("Exists", CPU_LABEL)]))
    old_index = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[1],
                            "manifests": [old_descriptor]}).encode()
    routes[f"/v2/app/manifests/{subject['digest'].replace(':', '-')}"] = lambda h: send(
        h, 200, old_index, {"Content-Type": ocifit.MANIFEST_TYPES[1]})
    stub = stubs(routes)
    artifacts = ocifit.RegistryArtifacts(registry_settings(stub.host))
    proxied = artifacts.attached(f"{stub.host}/proxy/x:v1", time.monotonic() + 5)
    assert (proxied.spec, proxied.artifact_digest) == (None, "")  # its referrers route is a 404: no API, no tag
    fast = artifacts.attached(f"{stub.host}/app:v1", time.monotonic() + 5)
    assert fast.artifact_digest == descriptor["digest"] and fast.spec is not None
    decision = ocifit.decide(review_of(candidates_pod(f"{stub.host}/app:v1 {stub.host}/proxy/x:v1"))["request"],
                             candidate_cluster(), FileArtifacts(),
                             get_attached=lambda ref: artifacts.attached(ref, time.monotonic() + 5))
    assert decision.image.startswith(f"{stub.host}/proxy/x:v1@")  # app:v1 fits only w1


def test_a_cached_spec_is_not_taken_for_another_image_that_lists_its_artifact(stubs: Any) -> None:
    routes, _, referrer, descriptor = api_registry_with(b'{"schemaVersion": 2, "layers": ["a"]}',
                                                        label_spec([expr("Exists", CPU_LABEL)]))
    victim = b'{"schemaVersion": 2, "layers": ["b"]}'
    victim_digest = _descriptor("", victim)["digest"]
    index = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[1], "manifests": [descriptor]}).encode()
    routes.update({
        "/v2/victim/manifests/b": lambda h: send(h, 200, victim, {"Content-Type": ocifit.MANIFEST_TYPES[0]}),
        f"/v2/victim/referrers/{victim_digest}": lambda h: send(h, 200, index,
                                                                {"Content-Type": ocifit.MANIFEST_TYPES[1]}),
        f"/v2/victim/manifests/{descriptor['digest']}": lambda h: send(h, 200, referrer, {
            "Content-Type": ocifit.MANIFEST_TYPES[0]})})
    stub = stubs(routes)
    artifacts = ocifit.RegistryArtifacts(registry_settings(stub.host))
    assert artifacts.attached(f"{stub.host}/app:v1", time.monotonic() + 5).spec is not None
    with pytest.raises(ocifit.ArtifactError, match=f"does not name {victim_digest} as its subject"):
        artifacts.attached(f"{stub.host}/victim:b", time.monotonic() + 5)


def test_a_candidate_whose_registry_fails_denies_the_pod_unless_its_last_spec_serves(
        stubs: Any, caplog: pytest.LogCaptureFixture) -> None:
    healthy, subject, _, _ = api_registry_with(b'{"schemaVersion": 2, "layers": ["cand"]}',
                                               label_spec([expr("In", CPU_LABEL, ["avx2", "avx512"])]))
    stub = stubs(dict(healthy))
    artifacts = ocifit.RegistryArtifacts(registry_settings(stub.host, tag_ttl=0.0, fetch_budget=2.0))
    images = f"{stub.host}/app:v1 {stub.host}/other:v1"

    def decided() -> ocifit.Decision:
        return ocifit.decide(review_of(candidates_pod(images))["request"], candidate_cluster(), FileArtifacts(),
                             get_attached=lambda ref: artifacts.attached(ref, time.monotonic() + 3))

    first = decided()
    assert first.image == f"{stub.host}/app:v1@{subject['digest']}" and first.artifact_origin == "registry"
    stub.routes.clear()
    stub.routes.update({path: (lambda h: send(h, 500, b'{"errors": [{"code": "UNKNOWN", "message": "down"}]}'))
                        for path in healthy})
    stale = decided()
    assert (stale.image, stale.artifact_origin) == (first.image, "stale")
    assert stale.warnings == (f"ocifit: the spec attached to image {stub.host}/app:v1 served from cache, registry "
                              "unavailable",)
    assert "serving the last good spec" in caplog.text
    realm = f"http://{stub.host}/token"  # not routed: the token service answers 404, an auth outage
    stub.routes.update({path: (lambda h: send(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}"'}))
                        for path in healthy})
    assert decided().artifact_origin == "stale"

    never_fetched = ocifit.RegistryArtifacts(registry_settings(stub.host, fetch_budget=1.0))
    denied = ocifit.decide(review_of(candidates_pod(images))["request"], candidate_cluster(), FileArtifacts(),
                           get_attached=lambda ref: never_fetched.attached(ref, time.monotonic() + 3))
    assert (denied.reason, denied.code) == ("artifact-unavailable", 503)
    assert denied.message.startswith(f"candidate image {stub.host}/app:v1: ")
    assert denied.message.endswith(f"; not trying {stub.host}/other:v1 after it")
    assert not any("/other/" in path for _, path, _ in stub.seen)  # no silent fall-through

    # The registry's word that the image is gone is an answer, not an outage: no stale spec for it.
    stub.routes.clear()
    artifacts.ERROR_TTL = 0.0
    gone = decided()
    assert (gone.reason, gone.code) == ("artifact-unavailable", 503)
    assert gone.message.startswith(f"candidate image {stub.host}/app:v1: image {stub.host}/app:v1 not found in "
                                   "registry (HTTP 404)")


def test_an_admission_sends_at_most_its_cap_of_registry_requests_however_many_pages(stubs: Any) -> None:
    """16 candidates, each behind referrers that page one entry at a time forever: the admission stops at the
    cap and is denied naming the candidate it had reached and the cap."""
    image = b'{"schemaVersion": 2, "layers": []}'
    subject = _descriptor(ocifit.MANIFEST_TYPES[0], image)
    digest = subject["digest"]
    misfit = label_spec([expr("In", CPU_LABEL, ["none"])])
    referrer, entry = compat_referrer(subject, misfit)
    routes: Dict[str, Any] = {}
    for n in range(16):
        routes[f"/v2/app{n}/manifests/{entry['digest']}"] = lambda h: send(h, 200, referrer, {
            "Content-Type": ocifit.MANIFEST_TYPES[0]})
        routes[f"/v2/app{n}/blobs/{_descriptor('', misfit)['digest']}"] = lambda h: send(h, 200, misfit)
        def page(h: Any, n: int = n) -> None:
            number = int(dict(ocifit.urllib.parse.parse_qsl(h.path.partition("?")[2])).get("page", 0))
            index = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[1], "manifests": [entry]})
            send(h, 200, index.encode(), {"Content-Type": ocifit.MANIFEST_TYPES[1],
                                          "Link": f'</v2/app{n}/referrers/{digest}?page={number + 1}>; rel="next"'})
        routes[f"/v2/app{n}/manifests/v1"] = lambda h: send(h, 200, image, {"Content-Type": ocifit.MANIFEST_TYPES[0]})
        routes[f"/v2/app{n}/referrers/{digest}"] = page
    stub = stubs(routes)
    settings = registry_settings(stub.host, nodes=str(EXAMPLE / "nodes-homogeneous.json"))
    webhook = ocifit.Webhook(settings, ocifit.StaticNodes(settings.nodes), ocifit.build_artifacts(settings))
    images = " ".join(f"{stub.host}/app{n}:v1" for n in range(16))
    _, decision = webhook.review(json.dumps(review_of(candidates_pod(images))).encode())
    assert decision.reason == "artifact-unavailable"
    assert re.match(rf"candidate image {stub.host}/app[0-9]+:v1: the admission has sent 128 registry requests, its "
                    "cap", decision.message), decision.message
    assert 100 < len(stub.seen) <= ocifit.MAX_ADMISSION_REQUESTS


def test_a_retry_after_of_zero_is_retried_a_few_times_and_not_at_once(stubs: Any) -> None:
    times: List[float] = []
    stub = stubs({"/v2/app/manifests/v1": lambda h: (times.append(time.monotonic()),
                                                     send(h, 503, b"", {"Retry-After": "0"}))})
    with pytest.raises(ocifit.RegistryError, match="answered HTTP 503"):
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host), budget=8)
    assert len(times) == 1 + ocifit.MAX_RETRIES
    assert all(b - a >= ocifit.RETRY_FLOOR * 0.9 for a, b in zip(times, times[1:]))


def test_a_tenants_junk_lookups_do_not_evict_a_spec_that_serves_admissions(stubs: Any, monkeypatch: Any) -> None:
    """Image B's spec answers admissions; its registry goes down; another namespace then names more junk
    images than the caches hold. B's next pod is still served from its last good spec."""
    monkeypatch.setitem(ocifit.CACHE_BOUNDS, "tags", ocifit.CacheBound(32, ocifit.MiB, 4096))
    healthy, subject, _, _ = api_registry_with(b'{"schemaVersion": 2, "layers": ["b"]}',
                                               label_spec([expr("In", CPU_LABEL, ["avx2", "avx512"])]))
    stub = stubs(dict(healthy))
    junk = stubs({f"/v2/junk{n}/manifests/v1": lambda h: send(h, 200, b'{"schemaVersion": 2}', {
        "Content-Type": ocifit.MANIFEST_TYPES[0]}) for n in range(64)})
    artifacts = ocifit.RegistryArtifacts(registry_settings(stub.host, junk.host, tag_ttl=0.0, fetch_budget=2.0))

    def decided(images: str) -> ocifit.Decision:
        return ocifit.decide(review_of(candidates_pod(images))["request"], candidate_cluster(), FileArtifacts(),
                             get_attached=lambda ref: artifacts.attached(ref, time.monotonic() + 3))
    assert decided(f"{stub.host}/app:v1").artifact_origin == "registry"
    stub.routes.update({path: (lambda h: send(h, 500)) for path in healthy})  # B's registry is down
    assert decided(f"{stub.host}/app:v1").artifact_origin == "stale"
    for n in range(64):  # each looked up once, and never again
        assert decided(f"{junk.host}/junk{n}:v1").reason == "generic"
    after = decided(f"{stub.host}/app:v1")
    assert (after.image, after.artifact_origin) == (f"{stub.host}/app:v1@{subject['digest']}", "stale")


def test_the_decision_memo_does_not_keep_a_spec_alive() -> None:
    import gc
    import weakref
    snapshot = snapshot_of(node_obj("w1", {"feature.node.ocifit-k8s.flavor": "vanilla"}))
    spec = flavor_spec()
    held = weakref.ref(spec)
    assert ocifit.choose_for(snapshot, spec, ocifit.Placement()).compatibility.tag == "debian:11"
    assert ocifit.choose_for(snapshot, spec, ocifit.Placement()).compatibility.tag == "debian:11"  # memoised
    del spec
    gc.collect()
    assert held() is None and len(snapshot.memo) == 1


def test_large_registry_replies_wait_for_room_in_the_shared_budget() -> None:
    replies = ocifit.InFlight(4 * ocifit.MiB)
    assert replies.take(3 * ocifit.MiB, time.monotonic() + 1)
    started = time.monotonic()
    assert not replies.take(2 * ocifit.MiB, time.monotonic() + 0.2)  # no room by its deadline
    assert time.monotonic() - started >= 0.15
    threading.Timer(0.1, replies.give_back, [3 * ocifit.MiB]).start()
    assert replies.take(2 * ocifit.MiB, time.monotonic() + 5)  # room made while it waited
    assert replies.take(1000, time.monotonic())  # small ones never wait


def test_a_bounded_cache_protects_what_is_asked_for_again() -> None:
    cache = ocifit.BoundedCache(ocifit.CacheBound(10, 10_000, 1000))
    cache.put("kept", 1)
    assert cache.get("kept") == 1  # asked for again: protected
    for n in range(100):
        cache.put(f"junk{n}", n)
    assert cache.get("kept") == 1 and len(cache) == 10
    cache.put("big", 2, size=1001)
    assert "big" not in cache


def test_review_chooses_a_candidate_by_its_attached_nfd_spec_and_node_features(
        registry: DockerRegistry, tmp_path: Path) -> None:
    images = {tag: pushed_image(registry, f"nfdcands:{tag}", tmp_path) for tag in ("avx2", "any")}
    for tag, spec in (("avx2", AVX2_ONLY_SPEC), ("any", ATTACHED_SPEC)):
        put_fallback_index(registry, "nfdcands", images[tag], [attach(registry, "nfdcands", images[tag], spec)])
    features = tmp_path / "features.json"
    features.write_text(json.dumps({"kind": "List", "items": [
        node_feature(name, cpu_features(avx2=name == "ocifit-worker"))
        for name in ("ocifit-worker", "ocifit-worker2", "ocifit-worker3")]}))
    pod = tmp_path / "pod.json"
    args = ["--nodes", str(EXAMPLE / "nodes-heterogeneous.json"), "--node-features", str(features),
            "--insecure-registry", registry.host, "--patch", str(pod)]
    host = registry.host
    pod.write_text(json.dumps(review_of(candidates_pod(f"{host}/nfdcands:avx2, {host}/nfdcands:any"))))
    done = run_cli("review", *args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0] == {"op": "replace", "path": "/spec/containers/0/image",
                                          "value": f"{host}/nfdcands:any@{images['any']['digest']}"}
    pod.write_text(json.dumps(review_of(candidates_pod(f"{host}/nfdcands:avx2"))))
    denied = run_cli("review", *args)
    assert denied.returncode == 1 and denied.stdout == ""
    assert (f"(1) {host}/nfdcands:avx2: 2 of 3 candidate nodes fail (ocifit-worker2, ocifit-worker3); on "
            "ocifit-worker2: compatibilities[0] (no tag): rules[0] (avx2): cpu.cpuid {op: InRegexp, value: "
            "[\"^AVX2$\"]}: no element name of cpu.cpuid matches") in denied.stderr


def test_serve_answers_a_candidates_pod_and_counts_a_generic_choice(
        registry: DockerRegistry, candidate_images: Dict[str, Any], tmp_path: Path, pki: Dict[str, Path]) -> None:
    artifacts = ocifit.build_artifacts(registry_settings(registry.host))
    running = start_server(tmp_path, pki, artifacts=artifacts, insecure_registry=(registry.host,))
    listed = f"{registry.host}/cands:fast {registry.host}/cands:generic"
    try:  # the example nodes have no example.com/cpu label: only the candidate with nothing attached fits
        answer = running.post_review(review_of(candidates_pod(listed)))
        assert patch_of(answer["response"])[0]["value"] == \
            f"{registry.host}/cands:generic@{candidate_images['generic']['image']}"
        metrics = running.request("GET", "/metrics")[1].decode()
        assert 'ocifit_admissions_total{mode="enforce",outcome="mutated",reason="generic"} 1' in metrics
    finally:
        running.stop()

def test_the_readmes_candidates_example_chooses_as_it_says(registry: DockerRegistry, tmp_path: Path) -> None:
    """README "Candidate images": specs attached with NFD's media types to two of three images."""
    images = {tag: pushed_image(registry, f"app:{tag}", tmp_path) for tag in ("chocolate", "avx2", "generic")}
    attached = {}
    for tag in ("chocolate", "avx2"):
        attached[tag] = attach(registry, "app", images[tag], (EXAMPLE / "candidates" / f"{tag}.yaml").read_bytes())
        put_fallback_index(registry, "app", images[tag], [attached[tag]])
    example = (EXAMPLE / "candidates" / "review.json").read_text()
    review = tmp_path / "review.json"
    review.write_text(example)
    args = ["review", str(review), "--nodes", str(EXAMPLE / "nodes-heterogeneous.json"), "--patch",  # as README says
            "--registry-mirror", f"registry.example={registry.host}", "--insecure-registry", registry.host]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    chosen = f"registry.example/app:avx2@{images['avx2']['digest']}"
    annotation = "/metadata/annotations/oci.image.compatibilities.selection~1"
    assert json.loads(done.stdout) == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": chosen},
        {"op": "add", "path": annotation + "selected-image", "value": chosen},
        {"op": "add", "path": annotation + "matched-compatibility",
         "value": "candidates[1] of 3: its attached spec fits all 3 candidate nodes"},
        {"op": "add", "path": annotation + "artifact", "value": f"registry.example/app@{attached['avx2']['digest']}"}]

    review.write_text(example.replace(", registry.example/app:avx2, registry.example/app:generic", ""))
    denied = run_cli(*args)
    assert denied.returncode == 1
    assert denied.stderr.splitlines()[0] == "ocifit: denied: " + README_CANDIDATES_DENIAL
    assert README_CANDIDATES_DENIAL in " ".join((HERE / "README.md").read_text().split())  # as the README shows it


README_CANDIDATES_DENIAL = (
    "the candidate image does not fit all 3 candidate nodes: (1) registry.example/app:chocolate: 2 of 3 candidate "
    "nodes fail (ocifit-worker, ocifit-worker2); on ocifit-worker: compatibilities[0] (no tag): "
    "rules[0].matchFeatures[0].matchExpressions[0]: value \"vanilla\" of label \"feature.node.ocifit-k8s.flavor\" "
    "not in [\"chocolate\"]; list a generic image last (one with no compatibility artifact attached), or keep the "
    "pod to nodes that fit with a nodeSelector")


def test_https_is_the_default_and_plain_http_needs_listing(registry: DockerRegistry) -> None:
    with pytest.raises(ocifit.RegistryError, match="TLS failed|unreachable"):
        pull_spec(f"{registry.host}/flavor:v1", ocifit.Settings(allowed_registries=(registry.host,)), budget=2)


def test_the_allow_list_refuses_other_registries(registry: DockerRegistry) -> None:
    artifacts = ocifit.RegistryArtifacts(registry_settings(registry.host, allowed_registries=("ghcr.io",)))
    before = len(registry.requests("/flavor/manifests/v1"))
    with pytest.raises(ocifit.ArtifactError) as caught:
        artifacts.get(f"{registry.host}/flavor:v1", time.monotonic() + 5)
    assert f"registry {registry.host} is not in the allowed registries (ghcr.io)" in str(caught.value)
    assert len(registry.requests("/flavor/manifests/v1")) == before  # refused before any request


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import bcrypt
    directory = tmp_path_factory.mktemp("auth-registry")
    htpasswd = directory / "htpasswd"
    htpasswd.write_text("ocifit:" + bcrypt.hashpw(b"s3cret-pw", bcrypt.gensalt(rounds=5)).decode() + "\n")
    running = DockerRegistry(directory / "run", htpasswd=htpasswd)
    spec = directory / "compatibility-test.json"
    shutil.copy(EXAMPLE / "compatibility-test.json", spec)
    running.push("private/flavor:v1", spec, username="ocifit", password="s3cret-pw")
    yield running
    running.stop()


def docker_config(directory: Path, host: str, **entry: str) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": {host: entry}}))
    return path


def test_basic_auth_credentials_come_from_a_docker_config(auth_registry: DockerRegistry, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    token = base64.b64encode(b"ocifit:s3cret-pw").decode()
    config = docker_config(tmp_path, f"http://{auth_registry.host}", auth=token)
    spec, _ = pull_spec(f"{auth_registry.host}/private/flavor:v1",
                        registry_settings(auth_registry.host, registry_config=str(tmp_path)))
    assert spec.compatibilities[0].tag == "debian:11"
    assert config.exists() and "s3cret" not in caplog.text and token not in caplog.text
    by_fields = docker_config(tmp_path, auth_registry.host, username="ocifit", password="s3cret-pw")
    assert pull_spec(f"{auth_registry.host}/private/flavor:v1",
                     registry_settings(auth_registry.host, registry_config=str(by_fields)))[0]


def test_missing_or_wrong_credentials_are_explained(auth_registry: DockerRegistry, tmp_path: Path) -> None:
    ref = f"{auth_registry.host}/private/flavor:v1"
    with pytest.raises(ocifit.RegistryError, match="wants credentials \\(Basic auth\\) and --registry-config has none"):
        pull_spec(ref, registry_settings(auth_registry.host))
    wrong = docker_config(tmp_path, auth_registry.host, username="ocifit", password="wrong")
    with pytest.raises(ocifit.RegistryError) as caught:
        pull_spec(ref, registry_settings(auth_registry.host, registry_config=str(wrong)))
    assert "refused access" in str(caught.value) and "wrong" not in str(caught.value)


# ---- stubs for what the real registry cannot do ----

class Stub:
    """A loopback HTTP(S) server whose routes are plain functions; it records every request it gets."""

    def __init__(self, routes: Dict[str, Any], tls: Optional[Dict[str, Path]] = None):
        stub = self
        self.routes = routes
        self.seen: List["tuple[str, str, Dict[str, str]]"] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stub.seen.append((self.command, self.path, dict(self.headers)))
                route = stub.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                route(self)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls["crt"]), str(tls["key"]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = ("https://" if tls else "http://") + self.host
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> List[str]:
        return [p for _, p, _ in self.seen]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: Any, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def artifact_routes(repo: str = "app", tag: str = "v1", spec: Optional[bytes] = None, blob: Optional[bytes] = None,
                    guard: Any = None, digest_header: Optional[str] = None) -> "tuple[Dict[str, Any], str]":
    """Routes serving one artifact: manifest by tag and digest, and its blob (optionally with other bytes)."""
    spec = spec or (EXAMPLE / "compatibility-test.json").read_bytes()
    layer: Dict[str, Any] = {"mediaType": ocifit.COMPAT_MEDIA_TYPE,
                             "digest": "sha256:" + ocifit.hashlib.sha256(spec).hexdigest(), "size": len(spec)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": ocifit.MANIFEST_TYPES[0],
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:" + "4" * 64,
                                      "size": 2}, "layers": [layer]}).encode()
    digest = "sha256:" + ocifit.hashlib.sha256(manifest).hexdigest()

    def guarded(body: bytes, content_type: str) -> Any:
        def route(h: Any) -> None:
            if guard is None or guard(h):
                served = (digest_header or digest) if body is manifest else layer["digest"]
                send(h, 200, body, {"Content-Type": content_type, "Docker-Content-Digest": served})
        return route
    return {f"/v2/{repo}/manifests/{tag}": guarded(manifest, ocifit.MANIFEST_TYPES[0]),
            f"/v2/{repo}/manifests/{digest}": guarded(manifest, ocifit.MANIFEST_TYPES[0]),
            f"/v2/{repo}/blobs/{layer['digest']}": guarded(blob if blob is not None else spec, "application/json")
            }, layer["digest"]


@pytest.fixture
def stubs() -> Any:
    made: List[Stub] = []

    def make(routes: Dict[str, Any], tls: Optional[Dict[str, Path]] = None) -> Stub:
        made.append(Stub(routes, tls))
        return made[-1]
    yield make
    for stub in made:
        stub.stop()


def test_a_bearer_token_realm_is_followed_and_the_token_cached(stubs: Any, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    tokens_issued: List[str] = []

    def token(h: Any) -> None:
        query = dict(ocifit.urllib.parse.parse_qsl(h.path.split("?", 1)[1]))
        assert h.headers["Authorization"] == "Basic " + base64.b64encode(b"robot:pa55").decode()
        tokens_issued.append(query["scope"])
        send(h, 200, json.dumps({"access_token": "tok-123", "expires_in": 300}).encode())
    auth_server = stubs({"/token": token})

    def need_bearer(h: Any) -> bool:
        if h.headers.get("Authorization") == "Bearer tok-123":
            return True
        send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
             {"WWW-Authenticate": f'Bearer realm="{auth_server.url}/token",service="stub",'
                                  'scope="repository:team/app:pull,push"'})
        return False
    routes, _ = artifact_routes(repo="team/app", guard=need_bearer)
    registry_stub = stubs(routes)
    docker_config(tmp_path, registry_stub.host, username="robot", password="pa55")
    settings = registry_settings(registry_stub.host, auth_server.host, registry_config=str(tmp_path), tag_ttl=0.01)
    artifacts = ocifit.RegistryArtifacts(settings)
    first = artifacts.get(f"{registry_stub.host}/team/app:v1", time.monotonic() + 5)
    time.sleep(0.05)
    second = artifacts.get(f"{registry_stub.host}/team/app:v1", time.monotonic() + 5)
    assert first.spec.compatibilities[0].tag == second.spec.compatibilities[0].tag == "debian:11"
    assert tokens_issued == ["repository:team/app:pull,push"]  # one token, reused until it expires
    assert "tok-123" not in caplog.text and "pa55" not in caplog.text


def test_an_identity_token_is_exchanged_by_oauth2_refresh(stubs: Any, tmp_path: Path) -> None:
    def token(h: Any) -> None:
        form = dict(ocifit.urllib.parse.parse_qsl(h.rfile.read(int(h.headers["Content-Length"])).decode()))
        ok = form.get("grant_type") == "refresh_token" and form.get("refresh_token") == "idt-xyz"
        send(h, 200 if ok else 401, json.dumps({"access_token": "from-refresh"}).encode())
    auth_server = stubs({"/token": token})

    def need_bearer(h: Any) -> bool:
        if h.headers.get("Authorization") == "Bearer from-refresh":
            return True
        send(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{auth_server.url}/token",service="stub"'})
        return False
    routes, _ = artifact_routes(guard=need_bearer)
    registry_stub = stubs(routes)
    docker_config(tmp_path, registry_stub.host, identitytoken="idt-xyz")
    spec, _ = pull_spec(f"{registry_stub.host}/app:v1",
                        registry_settings(registry_stub.host, auth_server.host, registry_config=str(tmp_path)))
    assert spec.compatibilities[0].tag == "debian:11"


def test_redirects_to_another_host_never_carry_authorization(stubs: Any, tmp_path: Path) -> None:
    routes, layer_digest = artifact_routes()
    blob_route = routes.pop(f"/v2/app/blobs/{layer_digest}")
    storage = stubs({"/storage/blob": blob_route})

    def redirect(h: Any) -> None:
        send(h, 307, b"", {"Location": f"{storage.url}/storage/blob?X-Signature=secret"})

    def need_basic(route: Any) -> Any:
        def wrapped(h: Any) -> None:
            if h.headers.get("Authorization", "").startswith("Basic "):
                route(h)
            else:
                send(h, 401, b"", {"WWW-Authenticate": 'Basic realm="stub"'})
        return wrapped
    registry_stub = stubs({**{p: need_basic(r) for p, r in routes.items()},
                           f"/v2/app/blobs/{layer_digest}": need_basic(redirect)})
    docker_config(tmp_path, registry_stub.host, username="u", password="p")
    spec, _ = pull_spec(f"{registry_stub.host}/app:v1",
                        registry_settings(registry_stub.host, storage.host, registry_config=str(tmp_path)))
    assert spec.compatibilities[0].tag == "debian:11"
    assert [h.get("Authorization") for _, _, h in storage.seen] == [None]


def test_a_redirect_from_https_to_http_is_refused(stubs: Any, pki: Dict[str, Path]) -> None:
    routes, layer_digest = artifact_routes()
    plain = stubs({"/blob": routes[f"/v2/app/blobs/{layer_digest}"]})
    routes[f"/v2/app/blobs/{layer_digest}"] = lambda h: send(h, 302, b"", {"Location": f"{plain.url}/blob"})
    secure = stubs(routes, tls=pki)
    with pytest.raises(ocifit.RegistryError, match="refusing a redirect to http"):  # plain is not insecure-listed
        pull_spec(f"{secure.host}/app:v1", ocifit.Settings(registry_ca=str(pki["ca"]),
                                                           allowed_registries=(secure.host, plain.host)))
    assert plain.seen == []
    with pytest.raises(ocifit.RegistryError, match="certificate verify failed"):  # without the CA: verified TLS fails
        pull_spec(f"{secure.host}/app:v1", ocifit.Settings(allowed_registries=(secure.host,)))


def proxied(routes: Dict[str, Any], registry: Stub) -> Dict[str, Any]:
    """A forward proxy's routes for plain-HTTP fetches: requests come as absolute URLs of the registry."""
    return {f"{registry.url}{path}": route for path, route in routes.items()}


def test_the_environments_proxy_is_not_used(stubs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    routes, _ = artifact_routes()
    registry = stubs(routes)
    proxy = stubs(proxied(routes, registry))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    assert pull_spec(f"{registry.host}/app:v1", registry_settings(registry.host))[0].compatibilities
    assert proxy.seen == [] and registry.seen


def test_the_operators_proxy_is_used_after_the_target_is_checked(stubs: Any) -> None:
    routes, _ = artifact_routes()
    registry = stubs(routes)
    proxy = stubs(proxied(routes, registry))
    settings = registry_settings(registry.host, registry_proxy=proxy.url)
    assert pull_spec(f"{registry.host}/app:v1", settings)[0].compatibilities
    assert proxy.paths()[0] == f"{registry.url}/v2/app/manifests/v1" and registry.seen == []
    with pytest.raises(ocifit.RegistryError, match="resolves to a loopback address; name it in --allowed-registries"):
        pull_spec("127.0.0.2:5000/app:v1", settings)  # never asked of the proxy
    assert len(proxy.seen) == 2
    direct = registry_settings(registry.host, registry_proxy=proxy.url, no_proxy=("127.0.0.1",))
    assert pull_spec(f"{registry.host}/app:v1", direct)[0].compatibilities  # NO_PROXY: straight to the registry
    assert len(proxy.seen) == 2 and registry.seen


def test_credentials_for_a_plain_http_registry_draw_a_warning(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    docker_config(tmp_path, "registry.local:5000", username="u", password="s3cret-pw")
    ocifit.RegistryClient(registry_settings("registry.local:5000", registry_config=str(tmp_path)))
    assert "registry credentials are configured for registry.local:5000, which --insecure-registry reaches over " \
        "plain HTTP" in caplog.text and "s3cret" not in caplog.text
    caplog.clear()
    ocifit.RegistryClient(registry_settings("other.local:5000", registry_config=str(tmp_path)))
    assert "registry credentials" not in caplog.text


def test_a_redirect_to_another_scheme_is_refused(stubs: Any) -> None:
    routes, layer_digest = artifact_routes()
    routes[f"/v2/app/blobs/{layer_digest}"] = lambda h: send(h, 302, b"", {"Location": "ftp://127.0.0.1/blob"})
    stub = stubs(routes)
    with pytest.raises(ocifit.RegistryError, match="refusing a redirect to ftp: ftp://127.0.0.1/blob"):
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host))


def test_429_with_retry_after_is_retried_within_the_budget(stubs: Any) -> None:
    routes, _ = artifact_routes()
    manifest_route = routes["/v2/app/manifests/v1"]
    calls = []

    def limited(h: Any) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            send(h, 429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}', {"Retry-After": "1"})
        else:
            manifest_route(h)
    routes["/v2/app/manifests/v1"] = limited
    stub = stubs(routes)
    spec, _ = pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host))
    assert spec.compatibilities[0].tag == "debian:11" and len(calls) == 2
    assert calls[1] - calls[0] >= 0.9  # it waited as told


def test_a_retry_after_beyond_the_budget_fails_at_once(stubs: Any) -> None:
    stub = stubs({"/v2/app/manifests/v1": lambda h: send(h, 429, b'{"errors":[{"code":"TOOMANYREQUESTS",'
                                                                 b'"message":"slow down"}]}', {"Retry-After": "60"})})
    with pytest.raises(ocifit.RegistryError) as caught:
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host), budget=3)
    assert "rate limiting" in str(caught.value) and "TOOMANYREQUESTS: slow down" in str(caught.value)
    assert len(stub.seen) == 1


def test_5xx_is_retried_and_404_and_403_are_not(stubs: Any) -> None:
    routes, _ = artifact_routes()
    good = routes["/v2/app/manifests/v1"]
    count = []
    routes["/v2/app/manifests/v1"] = lambda h: (count.append(1), send(h, 503) if len(count) < 3 else good(h))
    routes["/v2/app/manifests/forbidden"] = lambda h: send(h, 403, b'{"errors":[{"code":"DENIED","message":"no"}]}')
    stub = stubs(routes)
    assert pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host))[0]
    assert len(count) == 3
    with pytest.raises(ocifit.RegistryError, match="refused access .*DENIED: no"):
        pull_spec(f"{stub.host}/app:forbidden", registry_settings(stub.host))
    assert stub.paths().count("/v2/app/manifests/forbidden") == 1


def test_a_blob_whose_bytes_do_not_match_its_digest_is_refused(stubs: Any) -> None:
    evil = json.dumps(json.loads((EXAMPLE / "compatibility-test.json").read_text())).replace("debian", "evil")
    routes, _ = artifact_routes(blob=evil.encode())
    stub = stubs(routes)
    with pytest.raises(ocifit.RegistryError, match="compatibility layer does not match its digest"):
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host))


def test_a_manifest_that_does_not_match_the_digest_header_is_refused(stubs: Any) -> None:
    routes, _ = artifact_routes(digest_header="sha256:" + "b" * 64)
    stub = stubs(routes)
    with pytest.raises(ocifit.RegistryError, match="Docker-Content-Digest"):
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host))


def endless_manifest(chunks: int, sent: Optional[List[int]] = None) -> Any:
    """A route answering a manifest of `chunks` times 64 KiB of spaces, as fast as the client reads, counting
    what it sent."""
    def route(h: Any) -> None:
        h.send_response(200)
        h.send_header("Content-Type", ocifit.MANIFEST_TYPES[0])
        h.end_headers()
        try:
            for _ in range(chunks):
                h.wfile.write(b" " * 65536)
                if sent is not None:
                    sent.append(65536)
        except OSError:
            pass
    return route


def test_an_endless_body_is_cut_at_the_cap(stubs: Any) -> None:
    sent: List[int] = []
    stub = stubs({"/v2/app/manifests/v1": endless_manifest(10000, sent)})
    with pytest.raises(ocifit.RegistryError, match="over the 4194304 byte limit"):
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host))
    time.sleep(0.2)
    assert sum(sent) < 64 * 1024 * 1024  # it stopped reading; the server could not push it all


def test_a_server_that_never_answers_costs_no_more_than_the_budget(stubs: Any) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # accepts connections (kernel backlog), never answers
    host = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        settings = registry_settings(host, fetch_budget=1.5)
        artifacts = ocifit.RegistryArtifacts(settings)
        started = time.monotonic()
        with pytest.raises(ocifit.ArtifactError) as caught:
            artifacts.get(f"{host}/app:v1", started + settings.fetch_budget)
        assert f"registry {host} did not answer within 1.5s" in str(caught.value)
        assert time.monotonic() - started < 3
    finally:
        silent.close()


def test_a_slow_drip_body_is_cut_at_the_deadline(stubs: Any) -> None:
    def drip(h: Any) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(1000):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass
    stub = stubs({"/v2/app/manifests/v1": drip})
    started = time.monotonic()
    with pytest.raises(ocifit.RegistryError, match="did not answer within 1s"):
        pull_spec(f"{stub.host}/app:v1", registry_settings(stub.host, fetch_budget=1.0), budget=1.0)
    assert time.monotonic() - started < 2.5


def test_dripped_response_headers_end_the_fetch_and_its_thread_at_the_budget(stubs: Any) -> None:
    def drip_headers(h: Any) -> None:  # a status line, then one header byte every 0.1 s, for ever
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(10000):
                h.wfile.write(b"X-Drip: a\r\n"[_ % 11:_ % 11 + 1])
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass
    stub = stubs({f"/v2/app{i}/manifests/v1": drip_headers for i in range(5)})
    settings = registry_settings(stub.host, fetch_budget=1.5)
    artifacts = ocifit.RegistryArtifacts(settings)
    errors: List[str] = []

    def admit(i: int) -> None:
        try:
            artifacts.get(f"{stub.host}/app{i}:v1", time.monotonic() + settings.fetch_budget)
        except ocifit.ArtifactError as exc:
            errors.append(str(exc))
    admissions = [threading.Thread(target=admit, args=(i,)) for i in range(5)]
    started = time.monotonic()
    for thread in admissions:
        thread.start()
    for thread in admissions:
        thread.join()
    assert len(errors) == 5 and all(f"registry {stub.host} did not answer within 1.5s" in e for e in errors), errors
    eventually(lambda: not [t for t in threading.enumerate() if t.name.startswith(f"fetch {stub.host}")])
    assert time.monotonic() - started < settings.fetch_budget + 1.0  # no fetch thread outlived budget + 1 s


def test_failed_fetches_keep_their_message_not_their_buffers(stubs: Any) -> None:
    stub = stubs({f"/v2/app{i}/manifests/v1": endless_manifest(200) for i in range(12)})
    artifacts = ocifit.RegistryArtifacts(registry_settings(stub.host))
    import gc
    import tracemalloc
    tracemalloc.start()
    try:
        for i in range(12):  # each read 4 MiB before it was cut at the cap
            with pytest.raises(ocifit.ArtifactError, match="over the 4194304 byte limit"):
                artifacts.get(f"{stub.host}/app{i}:v1", time.monotonic() + 8)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 8 * 1024 * 1024, f"{held} bytes still held after 12 failed fetches"
    with pytest.raises(ocifit.ArtifactError, match="over the 4194304 byte limit"):  # the failure is remembered
        artifacts.get(f"{stub.host}/app0:v1", time.monotonic() + 8)


def test_concurrent_admissions_for_one_reference_make_one_fetch(registry: DockerRegistry, tmp_path: Path) -> None:
    spec = tmp_path / "compatibility-test.json"
    shutil.copy(EXAMPLE / "compatibility-test.json", spec)
    registry.push("storm:v1", spec)
    artifacts = ocifit.RegistryArtifacts(registry_settings(registry.host))
    results: List[str] = []

    def admit() -> None:
        results.append(artifacts.get(f"{registry.host}/storm:v1", time.monotonic() + 8).spec.compatibilities[0].tag)
    threads = [threading.Thread(target=admit) for _ in range(100)]
    before = len(registry.requests("/v2/storm/"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["debian:11"] * 100
    assert len(registry.requests("/v2/storm/")) - before == 2  # one manifest, one blob


def webhook_on_own_registry(tmp_path: Path, **settings: Any) -> "tuple[DockerRegistry, ocifit.Webhook, str]":
    """A registry of the test's own (so it can stop it) holding flavor:v1, and a webhook reading from it."""
    own = DockerRegistry(tmp_path / "registry")
    spec = tmp_path / "compatibility-test.json"
    shutil.copy(EXAMPLE / "compatibility-test.json", spec)
    own.push("flavor:v1", spec)
    config = registry_settings(own.host, tag_ttl=0.1, fetch_budget=2.0, nodes=str(EXAMPLE / "nodes-homogeneous.json"),
                               **settings)
    return own, ocifit.Webhook(config, ocifit.StaticNodes(config.nodes), ocifit.build_artifacts(config)), \
        f"{own.host}/flavor:v1"


def test_a_stale_spec_is_served_with_a_warning_while_the_registry_is_down(tmp_path: Path) -> None:
    own, webhook, ref = webhook_on_own_registry(tmp_path)
    pod = pod_obj(ref=ref)
    fresh = handled(webhook, json.dumps(review_of(pod)).encode())[1]["response"]
    assert patch_of(fresh)[0]["value"] == "debian:11" and "warnings" not in fresh
    own.stop()
    time.sleep(0.2)
    stale = handled(webhook, json.dumps(review_of(pod)).encode())[1]["response"]
    assert patch_of(stale)[0]["value"] == "debian:11"
    assert stale["warnings"] == [f"ocifit: artifact {ref} served from cache, registry unavailable"]
    other = handled(webhook, json.dumps(review_of(pod_obj(ref=f"{own.host}/never:v1"))).encode())[1]["response"]
    assert other["allowed"] is False and f"registry {own.host} unreachable" in other["status"]["message"]


def test_a_stale_spec_older_than_max_stale_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own, webhook, ref = webhook_on_own_registry(tmp_path, max_stale=0.5)
    pod = pod_obj(ref=ref)
    assert handled(webhook, json.dumps(review_of(pod)).encode())[1]["response"]["allowed"]
    own.stop()
    time.sleep(0.6)
    answer = handled(webhook, json.dumps(review_of(pod)).encode())[1]["response"]
    assert answer["allowed"] is False and f"registry {own.host} unreachable" in answer["status"]["message"]
    assert "past --max-stale (0.5s); not serving it" in caplog.text


def test_serve_with_a_real_registry_answers_with_the_right_patch(registry: DockerRegistry, tmp_path: Path,
                                                                 pki: Dict[str, Path]) -> None:
    running = start_server(tmp_path, pki, artifacts=None, insecure_registry=(registry.host,))
    running.server.webhook.artifacts = ocifit.build_artifacts(running.server.settings)
    try:
        pod = pod_obj(ref=f"{registry.host}/flavor:v1")
        answer = running.post_review(review_of(pod))["response"]
        patched = kubectl_patch(pod, patch_of(answer), tmp_path)
        assert patched["spec"]["containers"][0]["image"] == "debian:11"
        assert patched["metadata"]["annotations"][ocifit.ARTIFACT_ANNOTATION] == \
            f"{registry.host}/flavor:v1@{registry.digests['flavor']}"
        missing = running.post_review(review_of(pod_obj(ref=f"{registry.host}/flavor:nope")))["response"]
        assert missing["allowed"] is False and missing["status"]["code"] == 503
        assert missing["status"]["message"] == (f"artifact {registry.host}/flavor:nope not found in registry "
                                                "(MANIFEST_UNKNOWN: manifest unknown)")
    finally:
        running.stop()


# --------------------------------------------------------------------------------------------
# Admission: every path a review can take
# --------------------------------------------------------------------------------------------

def test_a_pod_is_mutated_with_the_chosen_image_and_the_patch_applies(tmp_path: Path) -> None:
    pod = pod_obj(spec={"initContainers": [{"name": "init", "image": "placeholder:latest"}],
                        "containers": [{"name": "main", "image": "placeholder:latest"},
                                       {"name": "sidecar", "image": "envoy:1.30"}]})
    review = review_of(pod)
    response = reply_to(review, decide(pod))
    assert response["apiVersion"] == "admission.k8s.io/v1" and response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == "uid-1" and response["response"]["allowed"] is True
    assert response["response"]["patchType"] == "JSONPatch"
    patched = kubectl_patch(pod, patch_of(response["response"]), tmp_path)
    assert [c["image"] for c in patched["spec"]["initContainers"]] == ["debian:11"]
    assert [c["image"] for c in patched["spec"]["containers"]] == ["debian:11", "envoy:1.30"]
    notes = patched["metadata"]["annotations"]
    assert notes[ocifit.SELECTED_IMAGE_ANNOTATION] == "debian:11"
    assert notes[ocifit.MATCHED_ANNOTATION] == "compatibilities[0] (debian:11)"
    assert notes[ocifit.ARTIFACT_ANNOTATION] == f"{FLAVOR_REF}@sha256:" + "a" * 64
    assert notes[ocifit.IMAGE_REF_ANNOTATION] == FLAVOR_REF


def test_a_custom_target_image_is_swapped(tmp_path: Path) -> None:
    pod = pod_obj(image="example.com/stub:0", annotations={ocifit.TARGET_IMAGE_ANNOTATION: "example.com/stub:0"})
    decision = decide(pod)
    patched = kubectl_patch(pod, list(decision.patch), tmp_path)
    assert patched["spec"]["containers"][0]["image"] == "debian:11"


def test_the_patch_creates_the_annotations_object_when_the_pod_has_none(tmp_path: Path) -> None:
    pod = pod_obj()
    del pod["metadata"]["annotations"]
    facts = ocifit.pod_facts(review_of(pod)["request"])
    artifact = FileArtifacts()(FLAVOR_REF)
    choice = ocifit.Choice(artifact.spec.compatibilities[1], 1)
    decision = ocifit.mutation(facts, ["/spec/containers/0/image"], choice, artifact)
    assert json.loads(base64.b64decode(decision.encoded_patch)) == list(decision.patch)
    patched = kubectl_patch(pod, list(decision.patch), tmp_path)
    assert patched["metadata"]["annotations"][ocifit.SELECTED_IMAGE_ANNOTATION] == "ubuntu:24.04"
    assert patched["spec"]["containers"][0]["image"] == "ubuntu:24.04"


def test_a_deployment_pod_without_a_name_is_mutated(tmp_path: Path) -> None:
    pod = pod_obj(name=None)
    decision = decide(pod)
    assert decision.outcome == "mutated"
    assert kubectl_patch(pod, list(decision.patch), tmp_path)["spec"]["containers"][0]["image"] == "debian:11"


@pytest.mark.parametrize("review_kw", [{"operation": "UPDATE"}, {"operation": "DELETE"}, {"kind": "Deployment"}])
def test_anything_but_pod_create_is_allowed_untouched(review_kw: Dict[str, Any]) -> None:
    response = reply_to(review_of(pod_obj(), **review_kw), decide(pod_obj(), **review_kw))
    assert response["response"] == {"uid": "uid-1", "allowed": True}


def test_a_pod_that_did_not_opt_in_is_allowed_untouched() -> None:
    for pod in (pod_obj(enabled=False), pod_obj(enabled=False, ref=None)):
        decision = decide(pod)
        assert (decision.allowed, decision.patch, decision.reason) == (True, (), "not-enabled")
    opted_out = pod_obj()
    opted_out["metadata"]["labels"][ocifit.ENABLED_LABEL] = "false"
    assert decide(opted_out).reason == "not-enabled"


def test_an_enabled_pod_without_image_ref_is_denied_naming_the_annotation() -> None:
    response = reply_to(review_of(pod_obj(ref=None)), decide(pod_obj(ref=None)))["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert ocifit.IMAGE_REF_ANNOTATION in response["status"]["message"]


def test_a_pod_without_the_placeholder_is_denied() -> None:
    decision = decide(pod_obj(image="nginx:1.27"))
    assert not decision.allowed and decision.reason == "no-placeholder"
    assert '"placeholder:latest"' in decision.message and ocifit.TARGET_IMAGE_ANNOTATION in decision.message


def test_an_already_mutated_pod_is_allowed_with_no_patch(tmp_path: Path) -> None:
    pod = pod_obj()
    mutated = kubectl_patch(pod, list(decide(pod).patch), tmp_path)
    again = decide(mutated)
    assert (again.allowed, again.patch, again.reason) == (True, (), "already-mutated")


def test_an_unknown_artifact_is_denied_naming_it() -> None:
    decision = decide(pod_obj(ref="registry.example/missing:v1"))
    assert not decision.allowed and decision.reason == "artifact-unavailable" and decision.code == 503
    assert "registry.example/missing:v1" in decision.message


def test_an_invalid_artifact_is_denied_naming_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec_doc(compat("a:1", expr("In", "f", ["x"])), compat("b:1", expr("Near")))))
    with pytest.raises(ocifit.SpecError) as invalid:
        ocifit.parse_spec(bad.read_bytes())

    def source(ref: str) -> ocifit.Artifact:
        raise invalid.value
    decision = ocifit.decide(review_of(pod_obj(ref="r/bad:1"))["request"], example_snapshot(), source)
    assert not decision.allowed and decision.reason == "spec-invalid"
    assert "artifact r/bad:1 is not a valid compatibility spec" in decision.message
    assert 'compatibilities[1].rules[0].matchFeatures[0].matchExpressions[0].op: unknown operator "Near"' \
        in decision.message


def test_a_broken_local_artifact_stops_serve_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="compatibilities: expected a list"):
        ocifit.LocalArtifacts({"r/bad:1": str(bad)})


def test_disagreeing_candidates_are_denied_with_names_counts_and_a_pin() -> None:
    snapshot = example_snapshot("nodes-heterogeneous.json")
    decision = decide(pod_obj(), snapshot)
    assert not decision.allowed and decision.reason == "disagreement"
    assert ("the 3 candidate nodes disagree on the image: 2 want debian:11 (ocifit-worker, ocifit-worker2), "
            "1 wants ubuntu:24.04 (ocifit-worker3)") in decision.message
    assert '{"feature.node.ocifit-k8s.flavor": "chocolate"} for ubuntu:24.04' in decision.message
    assert decision.candidates == 3 and decision.log_fields["candidates"] == 3  # the log line's count too
    again = decide(pod_obj(), snapshot)  # memoised on the snapshot: the count stays
    assert again.candidates == 3 and again.message == decision.message


def test_a_pinned_pod_on_a_mixed_cluster_gets_its_nodes_image() -> None:
    pod = pod_obj(spec={"nodeSelector": {FLAVOR_KEY: "chocolate"}})
    decision = decide(pod, example_snapshot("nodes-heterogeneous.json"))
    assert decision.image == "ubuntu:24.04" and decision.candidates == 1


def test_nodes_matching_no_rule_count_as_disagreement() -> None:
    snapshot = snapshot_of(*[node_obj(f"v{i}", {FLAVOR_KEY: "vanilla"}) for i in range(5)],
                           node_obj("plain"))
    decision = decide(pod_obj(), snapshot)
    assert decision.reason == "disagreement"
    assert "5 want debian:11 (v0, v1, v2, …+2 more), 1 matches no compatibility (plain)" in decision.message


# ---- pinning instead of denying: the pod kept on the kinds of node that fit the best image ----

def selects(requirement: Dict[str, Any], value: Optional[str]) -> bool:
    """One nodeSelectorRequirement on one node value, as the scheduler reads it (k8s.io/component-helpers)."""
    op, values = requirement["operator"], requirement.get("values") or []
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    return value is not None and value.lstrip("-").isdigit() and (int(value) > int(values[0]) if op == "Gt"
                                                                  else int(value) < int(values[0]))


def nodes_admitted(pod: Dict[str, Any], nodes: List[Dict[str, Any]]) -> List[str]:
    """The nodes a pod's nodeSelector and required node affinity let it onto (taints aside): the tests' own
    reading of the Kubernetes rules, independent of ocifit's."""
    spec = pod["spec"]
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    admitted = []
    for node in nodes:
        labels, name = node["metadata"]["labels"], node["metadata"]["name"]
        if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
            continue
        if required is not None and not any(
                all(selects(r, labels.get(r["key"])) for r in term.get("matchExpressions") or [])
                and all(selects(r, name) for r in term.get("matchFields") or [])
                and (term.get("matchExpressions") or term.get("matchFields"))
                for term in required["nodeSelectorTerms"]):
            continue
        admitted.append(name)
    return sorted(admitted)


WEIGHTED_SPEC = spec_doc(compat("debian:11", expr("In", FLAVOR_KEY, ["vanilla"]), weight=5),
                         compat("ubuntu:24.04", expr("In", FLAVOR_KEY, ["chocolate"]), weight=5),
                         compat("rocky:9", expr("In", FLAVOR_KEY, ["strawberry"]), expr("Exists", "gpu"), weight=9),
                         compat("alpine:3", expr("In", FLAVOR_KEY, ["mint"]), weight=5))


def pin_cluster() -> List[Dict[str, Any]]:
    return [node_obj("cp", {FLAVOR_KEY: "vanilla"}, control_plane=True),
            node_obj("v1", {FLAVOR_KEY: "vanilla", "pool": "a", "zone": "z1"}),
            node_obj("v2", {FLAVOR_KEY: "vanilla", "pool": "a", "zone": "z2"}),
            node_obj("c1", {FLAVOR_KEY: "chocolate", "pool": "a", "zone": "z1"}),
            node_obj("s1", {FLAVOR_KEY: "strawberry", "gpu": "a100", "pool": "b", "zone": "z1"},
                     taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}]),
            node_obj("m1", {FLAVOR_KEY: "mint", "pool": "b", "zone": "z2"}),
            node_obj("x1", {"pool": "b", "zone": "z2"})]  # matches nothing


def pinned(pod: Dict[str, Any], tmp_path: Path, nodes: Optional[List[Dict[str, Any]]] = None,
           spec: Any = WEIGHTED_SPEC, **decide_kw: Any) -> "tuple[ocifit.Decision, Dict[str, Any], List[str]]":
    """(the decision, the pod after kubectl applies its patch, the nodes the patched pod is admitted to)."""
    nodes = nodes if nodes is not None else pin_cluster()
    decision = ocifit.decide(review_of(pod)["request"], snapshot_of(*nodes), FileArtifacts(**{FLAVOR_REF: spec}),
                             **decide_kw)
    assert decision.allowed, decision.message
    after = kubectl_patch(pod, patch_of(reply_to(review_of(pod), decision)["response"]), tmp_path)
    return decision, after, nodes_admitted(after, nodes)


def test_a_mixed_cluster_without_selector_is_pinned_to_the_kinds_that_fit_the_best_image(tmp_path: Path) -> None:
    pod = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"})
    decision, after, admitted = pinned(pod, tmp_path)
    # rocky:9 weighs most, but no candidate is a strawberry node with the gpu taint tolerated: among the rest,
    # debian:11 is chosen by more nodes (v1, v2) than ubuntu or alpine
    assert decision.image == "debian:11" and admitted == ["v1", "v2"]  # the control plane stays out
    assert after["spec"]["containers"][0]["image"] == "debian:11"
    assert after["metadata"]["annotations"][ocifit.PINNED_ANNOTATION] == (
        "2 of 5 candidate nodes; the others would have needed alpine:3 (1 node), ubuntu:24.04 (1 node), an image "
        "no compatibility names (1 node)")
    (term,) = after["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [  # the labels the spec reads, and only those: no hostname
        {"key": FLAVOR_KEY, "operator": "In", "values": ["vanilla"]},
        {"key": "gpu", "operator": "DoesNotExist"},
        {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}]
    (warning,) = decision.warnings
    assert warning == ("ocifit pinned the pod to 2 of 5 nodes for debian:11; the others would need alpine:3, "
                       "ubuntu:24.04")
    assert decision.reason == "pinned" and 'pinned="2 of 5 candidate nodes; the others' in decision.log_text[0]
    later = pin_cluster() + [node_obj("v9", {FLAVOR_KEY: "vanilla", "pool": "c"})]
    assert nodes_admitted(after, later) == ["v1", "v2", "v9"]  # a node of the same kind, added later, qualifies


def test_tolerations_bring_in_a_tainted_kind_and_weight_decides(tmp_path: Path) -> None:
    pod = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"},
                  spec={"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    decision, _, admitted = pinned(pod, tmp_path)
    assert decision.image == "rocky:9" and admitted == ["s1"]  # weight 9 beats more nodes at weight 5


def test_a_node_selector_that_still_leaves_kinds_keeps_the_selector_and_pins_within_it(tmp_path: Path) -> None:
    pod = pod_obj(spec={"nodeSelector": {"pool": "a"}})
    decision, after, admitted = pinned(pod, tmp_path, on_disagreement="pin")  # cluster-wide setting
    assert decision.image == "debian:11" and admitted == ["v1", "v2"] and after["spec"]["nodeSelector"] == {
        "pool": "a"}
    term = after["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]
    assert {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"} not in term[
        "matchExpressions"]  # a selector chose the candidates: control-plane nodes were not left out by default


def test_the_pods_own_required_terms_are_kept_and_anded_with_each_kind(tmp_path: Path) -> None:
    spec = spec_doc(compat("debian:11", expr("In", FLAVOR_KEY, ["vanilla"])),
                    compat("ubuntu:24.04", expr("In", FLAVOR_KEY, ["chocolate"])),
                    compat("debian:11", expr("In", FLAVOR_KEY, ["mint"])))
    affinity = {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}],
             "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["v2"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}}]},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    pod = pod_obj(spec={"affinity": affinity}, annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"})
    decision, after, admitted = pinned(pod, tmp_path, spec=spec)
    # debian:11 on v1, v2 (vanilla) and m1 (mint), ubuntu on c1: the pod's terms leave v1 (z1), m1 (z2), not v2
    assert decision.image == "debian:11" and admitted == ["m1", "v1"]
    node_affinity = after["spec"]["affinity"]["nodeAffinity"]
    terms = node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 4  # 2 own terms x 2 kinds
    assert node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] == affinity["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"] and "podAntiAffinity" in after["spec"]["affinity"]


def test_a_tie_in_weight_goes_to_more_nodes_then_to_the_first_listed(tmp_path: Path) -> None:
    nodes = [node_obj("v1", {FLAVOR_KEY: "vanilla"}), node_obj("c1", {FLAVOR_KEY: "chocolate"}),
             node_obj("c2", {FLAVOR_KEY: "chocolate"})]
    pod = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"})
    decision, _, admitted = pinned(pod, tmp_path, nodes=nodes)
    assert decision.image == "ubuntu:24.04" and admitted == ["c1", "c2"]  # more nodes
    decision, _, admitted = pinned(pod, tmp_path, nodes=nodes[:2])
    assert decision.image == "debian:11" and admitted == ["v1"]  # equal: listed first


def test_node_features_pin_by_hostname(tmp_path: Path) -> None:
    nodes = [node_obj(name) for name in ("n1", "n2", "n3")]
    features = {"n1": cpu_features(), "n2": cpu_features(), "n3": cpu_features(avx2=False)}
    snapshot = ocifit.NodeSnapshot(ocifit.dataclasses.replace(
        ocifit.node_from_object(n), features=ocifit.features_from_object(features[n["metadata"]["name"]]))
        for n in nodes)
    pod = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"})
    decision = ocifit.decide(review_of(pod)["request"], snapshot,
                             FileArtifacts(**{FLAVOR_REF: ocifit.parse_spec(NFD_SPEC)}))
    after = kubectl_patch(pod, patch_of(reply_to(review_of(pod), decision)["response"]), tmp_path)
    assert decision.image == "fast:1" and nodes_admitted(after, nodes) == ["n1", "n2"]
    assert "by hostname" in decision.pinned and "nodes added later do not qualify" in decision.pinned
    assert nodes_admitted(after, nodes + [node_obj("n4")]) == ["n1", "n2"]


def test_a_pinned_pod_that_comes_back_is_left_alone_and_review_agrees(tmp_path: Path) -> None:
    pod = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "pin"})
    _, after, _ = pinned(pod, tmp_path)
    again = ocifit.decide(review_of(after)["request"], snapshot_of(*pin_cluster()),
                          FileArtifacts(**{FLAVOR_REF: WEIGHTED_SPEC}))
    assert again.allowed and again.reason == "already-mutated" and not again.patch
    review = tmp_path / "review.json"
    review.write_text(json.dumps(review_of(pod_obj())))
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"kind": "List", "items": pin_cluster()}))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(WEIGHTED_SPEC))
    done = run_cli("review", str(review), "--nodes", str(nodes), "--artifact", f"{FLAVOR_REF}={spec}",
                   "--on-disagreement", "pin", "--patch")
    assert done.returncode == 0 and any(op["path"] == "/spec/affinity" for op in json.loads(done.stdout))
    explained = run_cli("match", "--spec", str(spec), "--nodes", str(nodes), "--explain")
    assert explained.returncode == 1 and "# on-disagreement pin would choose debian:11" in explained.stderr


def test_the_pods_annotation_wins_and_too_many_terms_are_denied(tmp_path: Path) -> None:
    deny = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "deny"})
    decision = ocifit.decide(review_of(deny)["request"], snapshot_of(*pin_cluster()),
                             FileArtifacts(**{FLAVOR_REF: WEIGHTED_SPEC}), "pin")
    assert decision.reason == "disagreement"
    bad = pod_obj(annotations={ocifit.ON_DISAGREEMENT_ANNOTATION: "maybe"})
    assert ocifit.decide(review_of(bad)["request"], snapshot_of(*pin_cluster()),
                         FileArtifacts(**{FLAVOR_REF: WEIGHTED_SPEC})).reason == "malformed-pod"
    many = [node_obj(f"n{i}", {FLAVOR_KEY: "vanilla", "rack": f"r{i}"}) for i in range(70)] + [
        node_obj("c1", {FLAVOR_KEY: "chocolate"})]
    spec = spec_doc(compat("debian:11", expr("In", FLAVOR_KEY, ["vanilla"]), expr("Exists", "rack")),
                    compat("ubuntu:24.04", expr("In", FLAVOR_KEY, ["chocolate"])))
    denied = ocifit.decide(review_of(pod_obj())["request"], snapshot_of(*many),
                           FileArtifacts(**{FLAVOR_REF: spec}), "pin")
    assert not denied.allowed and "pinning the pod would take 70 node selector terms" in denied.message


def test_no_matching_rule_is_denied_with_the_explanation() -> None:
    decision = decide(pod_obj(), snapshot_of(node_obj("w1", {FLAVOR_KEY: "mint"})))
    assert decision.reason == "no-match"
    assert "no compatibility matches the 1 candidate node (w1)" in decision.message
    assert 'value "mint" of label "feature.node.ocifit-k8s.flavor" not in ["vanilla"]' in decision.message


def test_no_candidate_node_is_denied_naming_the_selector() -> None:
    decision = decide(pod_obj(spec={"nodeSelector": {"pool": "nope"}}))
    assert decision.reason == "no-candidates"
    assert 'no node matches the pod\'s nodeSelector {"pool": "nope"}' in decision.message


@pytest.mark.parametrize("spec,message", [
    ({"containers": "main"}, "spec.containers must be a list"),
    ({"nodeSelector": ["pool"]}, "spec.nodeSelector must be an object of strings"),
    (_affinity({"matchExpressions": [{"key": "k", "operator": "Near"}]}), '"Near" is not a node selector operator'),
])
def test_a_malformed_pod_is_denied_not_crashed(spec: Dict[str, Any], message: str) -> None:
    decision = decide(pod_obj(spec=spec))
    assert not decision.allowed and decision.reason == "malformed-pod" and message in decision.message


def test_a_v1beta1_review_is_answered_in_its_own_version() -> None:
    review = review_of(pod_obj(enabled=False), api_version="admission.k8s.io/v1beta1")
    assert reply_to(review, decide(pod_obj(enabled=False)))["apiVersion"] == "admission.k8s.io/v1beta1"


@pytest.mark.parametrize("body,message", [
    (b"{", "not valid JSON"), (b'{"kind": "Pod"}', "not an AdmissionReview"),
    (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "no request object"),
    (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"operation": "CREATE"}}',
     "no uid"),
    (b'{"kind": "AdmissionReview", "request": {"uid": "u"}}', "apiVersion None is not one ocifit answers"),
])
def test_a_body_that_is_no_review_is_a_bad_request(body: bytes, message: str) -> None:
    webhook = ocifit.Webhook(ocifit.Settings(), ocifit.StaticNodes(str(EXAMPLE / "nodes-homogeneous.json")),
                             ocifit.LocalArtifacts({}))
    status, payload = handled(webhook, body)
    assert status == 400 and message in payload["error"]


def test_an_internal_error_is_one_clear_denial(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ocifit.StaticNodes):
        def snapshot(self) -> ocifit.NodeSnapshot:
            raise RuntimeError("node view exploded")
    webhook = ocifit.Webhook(ocifit.Settings(), Broken(str(EXAMPLE / "nodes-homogeneous.json")),
                             ocifit.LocalArtifacts({}))
    status, payload = handled(webhook, json.dumps(review_of(pod_obj())).encode())
    assert status == 200 and payload["response"]["allowed"] is False
    assert payload["response"]["status"]["code"] == 500
    assert "node view exploded" in payload["response"]["status"]["message"]


def test_each_admission_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    webhook = ocifit.Webhook(ocifit.Settings(), ocifit.StaticNodes(str(EXAMPLE / "nodes-homogeneous.json")),
                             ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")}))
    caplog.set_level("INFO", logger="ocifit")
    handled(webhook, json.dumps(review_of(pod_obj(name=None))).encode())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admission")]
    assert len(lines) == 1
    assert "namespace=team-a pod=demo-7d9c8b6f5-* uid=uid-1 outcome=mutated reason=selected image=debian:11" in lines[0]
    assert "candidates=3 artifact=file" in lines[0]


# --------------------------------------------------------------------------------------------
# HTTP server: a real TLS socket
# --------------------------------------------------------------------------------------------

def openssl_cert(directory: Path, name: str, ca: Optional[Path] = None, days: int = 30,
                 sans: str = "DNS:localhost,IP:127.0.0.1") -> "tuple[Path, Path]":
    """A key and certificate made by openssl: self-signed CA when ca is None, else signed by it."""
    openssl = need("openssl")
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    if ca is None:
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
                        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt)],
                       check=True, capture_output=True)
        return key, crt
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    subprocess.run([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                    "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    subprocess.run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
                    "-CAcreateserial", "-days", str(days), "-extfile", str(ext), "-out", str(crt)],
                   check=True, capture_output=True)
    return key, crt


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_crt = openssl_cert(directory, "ca")
    key, crt = openssl_cert(directory, "server", ca=ca_crt)
    key2, crt2 = openssl_cert(directory, "renewed", ca=ca_crt)
    return {"dir": directory, "ca": ca_crt, "key": key, "crt": crt, "key2": key2, "crt2": crt2}


class RunningServer:
    def __init__(self, server: ocifit.WebhookServer, ca: Optional[Path]):
        self.server = server
        self.port = server.port
        self.cert = server.tls.cert if server.tls else None
        self.context = ssl.create_default_context(cafile=str(ca)) if ca else None
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def connect(self, timeout: float = 10, source: str = "") -> http.client.HTTPConnection:
        """A client connection, from another loopback address than 127.0.0.1 if `source` names one."""
        bind = (source, 0) if source else None
        if self.context is None:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, source_address=bind)
        return http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=timeout,
                                           source_address=bind)

    def tls_socket(self, source: str = "") -> ssl.SSLSocket:
        """A TLS connection with its handshake done and nothing sent yet."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                       source_address=(source, 0) if source else None)
        assert self.context is not None
        return self.context.wrap_socket(raw, server_hostname="localhost")

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> "tuple[int, bytes]":
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post_review(self, review: Dict[str, Any]) -> Dict[str, Any]:
        status, body = self.request("POST", "/mutate", json.dumps(review).encode())
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_server(tmp_path: Path, pki: Optional[Dict[str, Path]], nodes: str = "nodes-homogeneous.json",
                 artifacts: Any = None, node_source: Any = None, **settings_kw: Any) -> RunningServer:
    settings = ocifit.Settings(port=0, bind="127.0.0.1", cert=str(pki["crt"]) if pki else "",
                               key=str(pki["key"]) if pki else "", plain_http=pki is None,
                               nodes=str(EXAMPLE / nodes), **settings_kw)
    metrics = ocifit.Metrics()
    if artifacts is None:
        artifacts = ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")})
    webhook = ocifit.Webhook(settings, node_source or ocifit.build_node_source(settings, metrics), artifacts, metrics)
    return RunningServer(ocifit.build_server(settings, webhook), pki["ca"] if pki else None)


@pytest.fixture
def https_server(tmp_path: Path, pki: Dict[str, Path]) -> Any:
    running = start_server(tmp_path, pki, handshake_timeout=1.0)
    yield running
    running.stop()


def test_https_keep_alive_connection_answers_reviews(https_server: RunningServer, tmp_path: Path) -> None:
    conn = https_server.connect()
    pods = [pod_obj(name=f"p{i}") for i in range(3)]
    for pod in pods:
        conn.request("POST", "/mutate", body=json.dumps(review_of(pod, uid=pod["metadata"]["name"])),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "application/json"
        answer = json.loads(response.read())["response"]
        assert answer["uid"] == pod["metadata"]["name"]
        patched = kubectl_patch(pod, patch_of(answer), tmp_path)
        assert patched["spec"]["containers"][0]["image"] == "debian:11"
    assert conn.sock is not None and conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    conn.close()


def test_health_readiness_and_unknown_paths(https_server: RunningServer) -> None:
    assert https_server.request("GET", "/healthz") == (200, b"ok\n")
    status, body = https_server.request("GET", "/readyz")
    assert status == 200 and body.startswith(b"ready: 4 nodes")
    status, body = https_server.request("GET", "/nope")
    assert status == 404 and b"POST /mutate" in body
    conn = https_server.connect()
    conn.request("GET", "/mutate")
    response = conn.getresponse()
    assert (response.status, response.getheader("Allow")) == (405, "POST") and b"POSTed" in response.read()
    conn.close()


JSON_TYPE = ("Content-Type", "application/json")


@pytest.mark.parametrize("body,headers,status,message", [
    (b"{broken", [JSON_TYPE], 400, "not valid JSON"),
    (b"x" * 100, [JSON_TYPE, ("Content-Length", str(4 * 1024 * 1024))], 400, "exceeds the limit"),
    (b'{"kind":"AdmissionReview"}', [JSON_TYPE, ("Content-Length", "abc")], 400, "exactly one Content-Length"),
    (b'{"kind":"AdmissionReview"}', [JSON_TYPE, ("Content-Length", "+26")], 400, "exactly one Content-Length"),
    (b'{"kind":"AdmissionReview"}', [JSON_TYPE, ("Content-Length", "2_6")], 400, "exactly one Content-Length"),
    (b'{"kind":"AdmissionReview"}', [JSON_TYPE, ("Content-Length", "26"), ("Content-Length", "26")], 400,
     "exactly one Content-Length"),
    (b'{"kind":"AdmissionReview"}', [JSON_TYPE, ("Transfer-Encoding", "chunked")], 400,
     "Transfer-Encoding and Content-Length together are refused"),
    (b'{"kind":"AdmissionReview"}', [("Content-Type", "text/plain")], 415, "text/plain is not application/json"),
    (b'{"kind":"AdmissionReview"}', [], 400, "apiVersion None"),  # no Content-Type: read as JSON
    (json.dumps(dict(review_of(pod_obj()), apiVersion="admission.k8s.io/v2")).encode(), [JSON_TYPE], 400,
     "apiVersion admission.k8s.io/v2"),
])
def test_malformed_and_oversized_bodies_get_400_and_the_server_goes_on(
        https_server: RunningServer, body: bytes, headers: List["tuple[str, str]"], status: int, message: str
) -> None:
    conn = https_server.connect()
    conn.putrequest("POST", "/mutate")
    if not any(name == "Content-Length" for name, _ in headers):
        headers = headers + [("Content-Length", str(len(body)))]
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    assert (response.status, message in json.loads(response.read())["error"]) == (status, True)
    conn.close()
    assert https_server.post_review(review_of(pod_obj()))["response"]["allowed"] is True


def raw_post(server: RunningServer, head: bytes, body: bytes) -> "tuple[int, bytes]":
    """POST /mutate with these extra header lines and body bytes exactly as given; (status, reply body)."""
    with server.tls_socket() as sock:
        sock.sendall(b"POST /mutate HTTP/1.1\r\nHost: ocifit\r\nContent-Type: application/json\r\n" + head
                     + b"\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def chunked(data: bytes, size: int, extension: bytes = b"", trailers: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(data[i:i + size]), extension, data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n" + trailers + b"\r\n"


def test_a_chunked_body_is_read_in_small_chunks_with_extensions_and_trailers(https_server: RunningServer) -> None:
    review = json.dumps(review_of(pod_obj())).encode()
    te = b"Transfer-Encoding: chunked\r\n"
    for body in (chunked(review, 7), chunked(review, 1000, b";name=value", b"X-Trailer: 1\r\n")):
        status, reply = raw_post(https_server, te, body)
        assert status == 200 and patch_of(json.loads(reply)["response"])[0]["value"] == "debian:11"
    for head, body, status, message in [
            (te, b"zz\r\n" + review, 400, "malformed chunk size"),
            (te, b"5\r\n1234567\r\n0\r\n\r\n", 400, "not ended by CRLF"),
            (te, b"%x\r\n" % (4 * ocifit.MiB), 400, "exceeds the limit"),
            (b"Transfer-Encoding: gzip, chunked\r\n", chunked(review, 100), 501, "only chunked"),
            (te + b"Content-Length: 10\r\n", chunked(review, 100), 400, "together are refused")]:
        got = raw_post(https_server, head, body)
        assert (got[0], message in json.loads(got[1])["error"]) == (status, True), got
    assert https_server.post_review(review_of(pod_obj()))["response"]["allowed"] is True


def test_kubectl_create_raw_posts_a_review_chunked_and_gets_the_answer(
        https_server: RunningServer, pki: Dict[str, Path], tmp_path: Path) -> None:
    """client-go's REST client streams a body of unknown length chunked; ocifit reads it."""
    review = tmp_path / "review.json"
    review.write_text(json.dumps(review_of(pod_obj())))
    (tmp_path / "no-kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
    done = subprocess.run([need("kubectl"), f"--server=https://localhost:{https_server.port}", "--token=unused",
                           f"--certificate-authority={pki['ca']}", f"--kubeconfig={tmp_path / 'no-kubeconfig'}",
                           f"--cache-dir={tmp_path / 'kube-cache'}", "create", "--raw", "/mutate", "-f", str(review)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert patch_of(json.loads(done.stdout)["response"])[0]["value"] == "debian:11"


def test_a_silent_client_does_not_stall_others_and_is_dropped(https_server: RunningServer) -> None:
    silent = socket.create_connection(("127.0.0.1", https_server.port))
    try:
        started = time.monotonic()
        assert https_server.post_review(review_of(pod_obj()))["response"]["allowed"] is True
        assert time.monotonic() - started < 1.0  # not held up behind the silent handshake
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed after the 1 s handshake timeout
    finally:
        silent.close()


# The client offers TLS 1.0 and 1.1 on purpose; Python warns that they are deprecated, which is the point.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused(https_server: RunningServer) -> None:
    assert https_server.server.tls.context().minimum_version == ssl.TLSVersion.TLSv1_2
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with socket.create_connection(("127.0.0.1", https_server.port)) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            old.wrap_socket(raw).do_handshake()


def _served_cert_subject(running: RunningServer) -> str:
    conn = running.connect()
    conn.connect()
    subject = dict(x[0] for x in conn.sock.getpeercert()["subject"])["commonName"]
    conn.close()
    return subject


def test_renewed_certificates_are_served_without_restart_and_garbage_is_ignored(
        tmp_path: Path, pki: Dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    live = {"crt": tmp_path / "tls.crt", "key": tmp_path / "tls.key", "ca": pki["ca"]}
    shutil.copy(pki["crt"], live["crt"])
    shutil.copy(pki["key"], live["key"])
    running = start_server(tmp_path, live, cert_reload_interval=0.1)
    try:
        assert _served_cert_subject(running) == "server"
        shutil.copy(pki["crt2"], live["crt"])
        shutil.copy(pki["key2"], live["key"])
        time.sleep(0.2)
        assert _served_cert_subject(running) == "renewed"
        live["crt"].write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        time.sleep(0.2)
        assert _served_cert_subject(running) == "renewed"  # the last good pair keeps serving
        assert "not loaded" in caplog.text and "keeping what was read before" in caplog.text
    finally:
        running.stop()


def test_serve_refuses_to_start_without_a_certificate() -> None:
    done = run_cli("serve", "--nodes", str(EXAMPLE / "nodes-homogeneous.json"), "--port", "0")
    assert done.returncode == 2 and "no certificate: pass --cert and --key" in done.stderr


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def test_match_prints_the_image_alone() -> None:
    labels = json.dumps({FLAVOR_KEY: "chocolate"})
    done = run_cli("match", "--spec", str(EXAMPLE / "compatibility-test.json"), "--labels", "-", stdin=labels)
    assert (done.returncode, done.stdout) == (0, "ubuntu:24.04\n")


def test_match_explains_on_stderr() -> None:
    done = run_cli("match", "--spec", str(EXAMPLE / "compatibility-test.json"), "--labels", "-", "--explain",
                   stdin=json.dumps({FLAVOR_KEY: "vanilla"}))
    assert done.stdout == "debian:11\n" and "compatibilities[0] (debian:11): matched" in done.stderr


def test_match_without_a_match_exits_1_with_the_reason() -> None:
    done = run_cli("match", "--spec", str(EXAMPLE / "compatibility-test.json"), "--labels", "-", stdin="{}")
    assert done.returncode == 1 and done.stdout == ""
    assert 'label "feature.node.ocifit-k8s.flavor" missing' in done.stderr


def test_match_on_a_malformed_spec_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec_doc(compat("a:1", expr("Near")))))
    done = run_cli("match", "--spec", str(bad), "--labels", "-", stdin="{}")
    assert done.returncode == 2 and "unknown operator" in done.stderr


def test_match_on_nodes_reports_agreement_and_disagreement() -> None:
    spec = str(EXAMPLE / "compatibility-test.json")
    assert run_cli("match", "--spec", spec, "--nodes", str(EXAMPLE / "nodes-homogeneous.json")).stdout == "debian:11\n"
    mixed = run_cli("match", "--spec", spec, "--nodes", str(EXAMPLE / "nodes-heterogeneous.json"))
    assert mixed.returncode == 1 and "disagree" in mixed.stderr
    pinned = run_cli("match", "--spec", spec, "--nodes", str(EXAMPLE / "nodes-heterogeneous.json"),
                     "--node-selector", f"{FLAVOR_KEY}=chocolate")
    assert pinned.stdout == "ubuntu:24.04\n"


def test_review_prints_what_serve_would_answer(tmp_path: Path) -> None:
    done = run_cli("review", str(EXAMPLE / "reviews" / "pod.json"), "--nodes", str(EXAMPLE / "nodes-homogeneous.json"),
                   "--artifact", f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    pod = json.loads((EXAMPLE / "reviews" / "pod.json").read_text())["request"]["object"]
    assert kubectl_patch(pod, patch_of(answer["response"]), tmp_path)["spec"]["containers"][0]["image"] == "debian:11"
    denied = run_cli("review", str(EXAMPLE / "reviews" / "pod.json"), "--nodes",
                     str(EXAMPLE / "nodes-heterogeneous.json"), "--artifact",
                     f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}")
    assert denied.returncode == 1 and json.loads(denied.stdout)["response"]["allowed"] is False
    assert "disagree" in denied.stderr


@pytest.mark.parametrize("mode", ["warn", "audit"])
def test_warn_and_audit_allow_what_enforce_would_deny_saying_why(mode: str, tmp_path: Path) -> None:
    """warn: a pod enforce denies is allowed unchanged, the reason a warning; a mutation is made as in enforce.
    audit: every pod is allowed unchanged, a warning saying what enforce would do. The log says the mode."""
    def reviewed(nodes: str) -> "tuple[int, Dict[str, Any], str]":
        done = run_cli("review", str(EXAMPLE / "reviews" / "pod.json"), "--nodes", str(EXAMPLE / nodes),
                       "--artifact", f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}", "--mode", mode,
                       "--log-level", "debug")
        return done.returncode, json.loads(done.stdout)["response"], done.stderr
    code, denied, log_text = reviewed("nodes-heterogeneous.json")
    assert (code, denied["allowed"], "patch" in denied, "status" in denied) == (0, True, False, False)
    assert denied["warnings"][0].startswith(f"ocifit {mode} mode: enforce would deny the pod: artifact {FLAVOR_REF}: "
                                            "the 3 candidate nodes disagree on the image")
    assert all(len(w) <= 256 for w in denied["warnings"])
    assert f"mode={mode} outcome=denied reason=disagreement" in log_text
    code, mutated, log_text = reviewed("nodes-homogeneous.json")
    assert code == 0 and mutated["allowed"] is True
    if mode == "warn":
        assert patch_of(mutated)[0]["value"] == "debian:11" and "warnings" not in mutated
    else:
        assert "patch" not in mutated and mutated["warnings"] == [
            "ocifit audit mode: enforce would set the image to debian:11"]
    assert f"mode={mode} outcome=mutated reason=selected" in log_text
    explained = run_cli("match", "--spec", str(EXAMPLE / "compatibility-test.json"), "--nodes",
                        str(EXAMPLE / "nodes-heterogeneous.json"), "--explain", "--mode", mode)
    assert explained.returncode == 1 and f"# {mode} mode: the pod is allowed unchanged, warned that enforce would " \
        "deny the pod (disagreement)" in explained.stderr


def test_the_mode_labels_the_admissions_counter(tmp_path: Path) -> None:
    webhook = ocifit.Webhook(ocifit.Settings(mode="audit"), ocifit.StaticNodes(str(EXAMPLE / "nodes-homogeneous.json")),
                             ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")}),
                             ocifit.Metrics("audit"))
    status, reply = webhook.handle(json.dumps(review_of(pod_obj())).encode())
    assert status == 200 and "patch" not in json.loads(reply)["response"]
    text = webhook.metrics.render()
    assert 'ocifit_admissions_total{mode="audit",outcome="mutated",reason="selected"} 1' in text
    assert 'ocifit_admissions_total{mode="audit",outcome="denied",reason="no-match"} 0' in text


def test_review_of_garbage_exits_2() -> None:
    done = run_cli("review", "-", "--nodes", str(EXAMPLE / "nodes-homogeneous.json"), stdin="not json")
    assert done.returncode == 2 and done.stderr.startswith("ocifit: -: not valid JSON") and "request body" not in \
        done.stderr and done.stdout == ""


def test_review_patch_of_a_denial_prints_nothing_on_stdout_and_the_reason_once() -> None:
    done = run_cli("review", str(EXAMPLE / "reviews" / "pod.json"), "--nodes",
                   str(EXAMPLE / "nodes-heterogeneous.json"), "--artifact",
                   f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}", "--patch", "--log-level", "error")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("disagree on the image") == 1 and done.stderr.startswith("ocifit: denied: ")
    again = run_cli("review", str(EXAMPLE / "reviews" / "pod.json"), "--nodes",
                    str(EXAMPLE / "nodes-heterogeneous.json"), "--artifact",
                    f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}", "--patch")  # the default log level too
    assert again.stderr.count("disagree on the image") == 1


@pytest.mark.parametrize("args,env,message", [
    (("serve", "--port", "99999"), {}, "argument --port: '99999' is not a port number (0 to 65535)"),
    (("serve", "--port", "abc"), {}, "argument --port: 'abc' is not a port number"),
    (("serve",), {"OCIFIT_PORT": "abc"}, "ocifit: environment variable OCIFIT_PORT: 'abc' is not a port number"),
    (("serve", "--bind", "127.0.0.999"), {}, "argument --bind: '127.0.0.999' is not an IP address"),
    (("serve", "--log-format", "yaml"), {}, "argument --log-format: choose text or json, not 'yaml'"),
    (("serve", "--fetch-budget", "-1"), {}, "argument --fetch-budget: must be a positive number of seconds"),
    (("serve", "--plain-http"), {"OCIFIT_PLAIN_HTTP": "maybe"}, "OCIFIT_PLAIN_HTTP: choose true or false"),
    (("match", "--spec", "nosuch.json", "--labels", "x.json"), {}, "ocifit: --spec nosuch.json: No such file"),
    (("match", "--spec", str(EXAMPLE / "compatibility-test.json"), "--labels", "nosuch.json"), {},
     "ocifit: --labels nosuch.json: No such file"),
    (("review", "nosuch.json", "--nodes", str(EXAMPLE / "nodes-homogeneous.json")), {},
     "ocifit: review nosuch.json: No such file"),
    (("serve", "--cert", "nosuch.crt", "--key", "nosuch.key", "--nodes", str(EXAMPLE / "nodes-homogeneous.json")),
     {}, "nosuch.crt: No such file or directory"),
    (("serve", "--plain-http", "--nodes", "nosuch.json"), {}, "cannot read nodes from nosuch.json"),
    (("serve", "--plain-http", "--metrics-bind", "nine", "--nodes", str(EXAMPLE / "nodes-homogeneous.json")), {},
     "--metrics-bind 'nine': expected HOST:PORT or :PORT"),
])
def test_command_line_mistakes_exit_2_with_a_named_cause_and_no_traceback(args: tuple, env: Dict[str, str],
                                                                         message: str) -> None:
    done = run_cli(*args, env=env)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_port_in_use_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_cli("serve", "--plain-http", "--bind", "127.0.0.1", "--port", str(port), "--nodes",
                       str(EXAMPLE / "nodes-homogeneous.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--bind, --port): Address already in use" in done.stderr


def test_help_shows_each_default_and_environment_twin() -> None:
    text = " ".join(run_cli("serve", "--help").stdout.split())
    for flag, note in [("--port", "(default: 8443; env OCIFIT_PORT)"), ("--fetch-budget", "(default: 8.0; env "
                       "OCIFIT_FETCH_BUDGET)"), ("--plain-http", "(default: false; env OCIFIT_PLAIN_HTTP)"),
                       ("--cert", "(env OCIFIT_CERT or TLS_CERT_PATH)")]:
        assert flag in text and note in text, (flag, note)
    assert "Every setting (the flags in each subcommand's option groups) has an environment twin" in \
        " ".join(run_cli("--help").stdout.split())


@pytest.mark.parametrize("command,mentions", [
    ((), "serve"), (("serve",), "--fetch-budget"), (("match",), "--explain"), (("review",), "--patch"),
])
def test_help_explains_each_subcommand(command: tuple, mentions: str) -> None:
    done = run_cli(*command, "--help")
    assert done.returncode == 0 and mentions in done.stdout


def test_the_demo_serves_and_shows_patches() -> None:
    need("openssl"), need("curl")
    done = subprocess.run(["bash", str(EXAMPLE / "demo.sh")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DEMO_PORT=str(_free_port())))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("allowed: True") >= 3 and '"value": "debian:11"' in done.stdout
    assert '"value": "ubuntu:24.04"' in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pythons() -> List[str]:
    return ["3.9", "3.10", "3.11", "3.12", "3.13"]


def _interpreter(version: str) -> Optional[str]:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"{version}.*/bin/python{version}")) if root.is_dir() else []
    return str(found[-1]) if found else shutil.which(f"python{version}")


@pytest.mark.parametrize("version", _pythons())
def test_ocifit_runs_unchanged_on_each_supported_python(version: str, tmp_path: Path, pki: Dict[str, Path],
                                                         stubs: Any) -> None:
    python = _interpreter(version)
    if python is None:
        if os.environ.get("OCIFIT_REQUIRE_TOOLS") == "1":
            pytest.fail(f"CPython {version} is required here but not found under pyenv")
        pytest.skip(f"CPython {version} not installed")
    nodes, spec = str(EXAMPLE / "nodes-homogeneous.json"), str(EXAMPLE / "compatibility-test.json")
    match = run_cli("match", "--spec", spec, "--nodes", nodes, python=python)
    assert (match.returncode, match.stdout) == (0, "debian:11\n"), match.stderr
    review = run_cli("review", str(EXAMPLE / "reviews" / "deployment-pod.json"), "--nodes", nodes,
                     "--artifact", f"{FLAVOR_REF}={spec}", "--patch", python=python)
    assert review.returncode == 0, review.stderr
    assert [op["value"] for op in json.loads(review.stdout)[:2]] == ["debian:11", "debian:11"]
    port = _free_port()
    server = subprocess.Popen([python, str(HERE / "ocifit.py"), "serve", "--port", str(port), "--bind", "127.0.0.1",
                               "--cert", str(pki["crt"]), "--key", str(pki["key"]), "--nodes", nodes,
                               "--artifact", f"{FLAVOR_REF}={spec}"], stderr=subprocess.PIPE, text=True)
    try:
        running = RunningServer.__new__(RunningServer)
        running.port, running.context = port, ssl.create_default_context(cafile=str(pki["ca"]))
        _wait_ready(running)
        answer = running.post_review(review_of(pod_obj()))["response"]
        assert patch_of(answer)[0]["value"] == "debian:11"
        # the certificate's expiry, read from its DER by ocifit itself (no private ssl API), on this Python too
        metrics = running.request("GET", "/metrics")[1].decode()
        end_date = subprocess.run([need("openssl"), "x509", "-noout", "-enddate", "-in", str(pki["crt"])],
                                  capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
        assert f"ocifit_certificate_expiry_timestamp_seconds {float(ssl.cert_time_to_seconds(end_date))!r}" \
            in metrics
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert "stopped" in server.stderr.read()
    # a fetch over verified TLS through the guarded connection, its socket under the reaper's deadline
    routes, _ = artifact_routes()
    secure = stubs(routes, tls=pki)
    fetched = run_cli("fetch", "-v", f"{secure.host}/app:v1", "--registry-ca", str(pki["ca"]),
                      "--allowed-registries", secure.host, python=python)
    assert fetched.returncode == 0 and json.loads(fetched.stdout)["compatibilities"], fetched.stderr
    # a pod choosing among candidate images by the specs attached to them, found through the referrers API
    routes, subject, _, _ = api_registry_with(b'{"schemaVersion": 2, "layers": []}',
                                              label_spec([expr("In", FLAVOR_KEY, ["vanilla"])]))
    registry = stubs(routes)
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(review_of(candidates_pod(f"{registry.host}/app:v1"))))
    chosen = run_cli("review", str(candidates), "--nodes", nodes, "--insecure-registry", registry.host, "--patch",
                     python=python)
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)[0]["value"] == f"{registry.host}/app:v1@{subject['digest']}"


def _wait_ready(running: "RunningServer", seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if running.request("GET", "/readyz")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("server did not become ready")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Shipping: deploy.yaml, Makefile, Dockerfile, certificates, examples, end to end on kind
# --------------------------------------------------------------------------------------------

def deploy_docs(text: Optional[str] = None) -> List[Dict[str, Any]]:
    import yaml
    return [d for d in yaml.safe_load_all(text if text is not None else (HERE / "deploy.yaml").read_text()) if d]


def deploy_object(kind: str, docs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    matches = [d for d in (docs or deploy_docs()) if d["kind"] == kind]
    assert len(matches) == 1, f"{len(matches)} {kind} objects"
    return matches[0]


@pytest.mark.parametrize("version", ["1.29.0", "1.32.0"])
def test_deploy_yaml_core_objects_validate_against_the_kubernetes_schemas(version: str) -> None:
    import kubernetes_validate
    kinds = []
    for doc in deploy_docs():
        if doc["apiVersion"].startswith("cert-manager.io/"):
            continue  # CRDs: no schema in kubernetes-validate
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment",
                             "MutatingWebhookConfiguration", "Namespace", "PodDisruptionBudget", "ResourceQuota",
                             "Service", "ServiceAccount"]


def test_the_webhook_only_sees_opted_in_pod_creates_and_fails_closed_in_time() -> None:
    config = deploy_object("MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "ocifit-system/ocifit-tls"
    (hook,) = config["webhooks"]
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["objectSelector"] == {"matchLabels": {ocifit.ENABLED_LABEL: "true"}}
    (excluded,) = hook["namespaceSelector"]["matchExpressions"]
    assert excluded["key"] == "kubernetes.io/metadata.name" and excluded["operator"] == "NotIn"
    assert set(excluded["values"]) == {"kube-system", "ocifit-system"}
    assert (hook["failurePolicy"], hook["sideEffects"], hook["timeoutSeconds"], hook["reinvocationPolicy"],
            hook["admissionReviewVersions"]) == ("Fail", "None", 10, "IfNeeded", ["v1"])
    assert hook["clientConfig"]["service"] == {"name": "ocifit", "namespace": "ocifit-system", "path": "/mutate",
                                               "port": 443}
    budget = float(deploy_object("ConfigMap")["data"]["OCIFIT_FETCH_BUDGET"])
    assert budget < hook["timeoutSeconds"]


def test_rbac_is_get_list_watch_on_nodes_and_node_features_and_nothing_else() -> None:
    role = deploy_object("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": ["nfd.k8s-sigs.io"], "resources": ["nodefeatures"],
                              "verbs": ["get", "list", "watch"]}]
    assert not [d for d in deploy_docs() if d["kind"] in ("Role", "RoleBinding")]
    binding = deploy_object("ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ocifit", "namespace": "ocifit-system"}]


def test_the_deployment_is_restricted_replicated_and_probed_over_https() -> None:
    deployment = deploy_object("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 2 and spec["topologySpreadConstraints"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"] == \
        {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert deploy_object("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert deploy_object("Service")["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https",
                                                          "protocol": "TCP"}]
    assert deploy_object("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    registry_volume = [v for v in spec["volumes"] if v["name"] == "registry-credentials"][0]["secret"]
    assert registry_volume["optional"] is True and registry_volume["items"][0]["key"] == ".dockerconfigjson"


def test_the_namespace_enforces_warns_about_and_audits_the_restricted_profile() -> None:
    labels = deploy_object("Namespace")["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "latest"


def test_the_pods_are_cluster_critical_with_the_quota_that_admits_them_outside_kube_system() -> None:
    spec = deploy_object("Deployment")["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    quota = deploy_object("ResourceQuota")
    assert quota["metadata"]["namespace"] == deploy_object("Deployment")["metadata"]["namespace"] == "ocifit-system"
    assert quota["spec"]["scopeSelector"] == {"matchExpressions": [
        {"operator": "In", "scopeName": "PriorityClass", "values": ["system-cluster-critical"]}]}
    # Room for every replica and a rolling update's surge, as the quota counts the old and new pods alike.
    deployment = deploy_object("Deployment")["spec"]
    assert int(quota["spec"]["hard"]["pods"]) >= deployment["replicas"] + deployment["strategy"]["rollingUpdate"][
        "maxSurge"]


def test_the_pods_spread_over_nodes_and_zones_and_still_schedule_without_zone_labels() -> None:
    spec = deploy_object("Deployment")["spec"]["template"]["spec"]
    selector = {"matchLabels": {"app.kubernetes.io/name": "ocifit"}}
    assert spec["topologySpreadConstraints"] == [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": selector}
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]
    assert deploy_object("Deployment")["spec"]["template"]["metadata"]["labels"] == selector["matchLabels"]


def test_cert_manager_makes_a_ca_and_signs_the_serving_certificate_with_it() -> None:
    docs = deploy_docs()
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["apiVersion"] == "cert-manager.io/v1"}
    assert set(by_name) == {("Issuer", "ocifit-selfsigned"), ("Certificate", "ocifit-ca"), ("Issuer", "ocifit-ca"),
                            ("Certificate", "ocifit-tls")}
    assert all(d["metadata"]["namespace"] == "ocifit-system" for d in by_name.values())
    assert by_name["Issuer", "ocifit-selfsigned"]["spec"] == {"selfSigned": {}}
    ca = by_name["Certificate", "ocifit-ca"]["spec"]
    assert ca["isCA"] is True and ca["issuerRef"] == {"kind": "Issuer", "name": "ocifit-selfsigned"}
    assert by_name["Issuer", "ocifit-ca"]["spec"] == {"ca": {"secretName": ca["secretName"]}}
    serving = by_name["Certificate", "ocifit-tls"]["spec"]
    assert serving["issuerRef"] == {"kind": "Issuer", "name": "ocifit-ca"} and not serving.get("isCA")
    assert serving["secretName"] == "ocifit-tls"
    assert set(serving["dnsNames"]) == {"ocifit.ocifit-system.svc", "ocifit.ocifit-system.svc.cluster.local"}
    assert "server auth" in serving["usages"]

    def hours(duration: str) -> int:
        assert re.fullmatch(r"\d+h", duration), duration
        return int(duration[:-1])
    # The CA outlives many serving renewals, and renews while the serving certificates it signed still run.
    assert hours(ca["duration"]) >= 10 * hours(serving["duration"])
    assert hours(ca["renewBefore"]) > hours(serving["duration"]) > hours(serving["renewBefore"])
    assert ca["privateKey"]["rotationPolicy"] == "Never"
    # The caBundle comes from the serving certificate's Secret (its ca.crt: the CA), the Secret ocifit mounts.
    config = deploy_object("MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "ocifit-system/ocifit-tls"
    volumes = deploy_object("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": "ocifit-tls"}} in volumes


def test_deploy_yaml_runs_the_image_of_ocifits_own_version() -> None:
    (container,) = deploy_object("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/compspec/ocifit:{ocifit.__version__}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert ":latest" not in (HERE / "deploy.yaml").read_text()


def test_the_readme_says_to_build_and_push_first_and_to_restart_after_a_settings_change() -> None:
    readme = (HERE / "README.md").read_text()
    install = readme[readme.index("## Install\n"):readme.index("\n## ", readme.index("## Install\n") + 1)]
    commands = [line.split("#")[0].strip() for line in install.splitlines() if line.startswith(("make ", "kubectl "))]
    assert commands[0].startswith("make build push IMAGE=")
    assert commands[1].startswith("make install IMAGE=")
    assert "kubectl -n ocifit-system rollout restart deployment/ocifit" in install
    assert "BASE_IMAGE=" in install and "@sha256:" in install
    assert f"`__version__` in `ocifit.py`, now {ocifit.__version__}" in install
    assert "kubectl -n ocifit-system rollout restart deployment/ocifit" in (HERE / "deploy.yaml").read_text()


def test_ocifit_starts_with_the_deployments_own_args_and_environment(tmp_path: Path, pki: Dict[str, Path]) -> None:
    """What the kubelet would run: the container's args and env (ConfigMap included), probed as its probes do."""
    deployment = deploy_object("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = dict(deploy_object("ConfigMap")["data"])
    env.update({e["name"]: e["value"] for e in container["env"]})
    mounts = {"/etc/ocifit/tls/tls.crt": pki["crt"], "/etc/ocifit/tls/tls.key": pki["key"],
              "/etc/ocifit/registry/config.json": tmp_path / "absent-config.json"}
    env = {k: str(mounts.get(v, v)) for k, v in env.items()}
    port, metrics_port = _free_port(), _free_port()
    args = [a if a != "8443" else str(port) for a in container["args"]]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["OCIFIT_METRICS_BIND"] == f":{declared['metrics']}"  # the port the PodMonitor scrapes
    env.update(OCIFIT_NODES=str(EXAMPLE / "nodes-homogeneous.json"), OCIFIT_BIND="127.0.0.1",
               OCIFIT_METRICS_BIND=f"127.0.0.1:{metrics_port}")
    server = subprocess.Popen([sys.executable, str(HERE / "ocifit.py"), "serve", *args],
                              env=dict(os.environ, **env), stderr=subprocess.PIPE, text=True)
    try:
        running = RunningServer.__new__(RunningServer)
        running.port, running.context = port, ssl.create_default_context(cafile=str(pki["ca"]))
        _wait_ready(running)
        assert running.request("GET", "/healthz")[0] == 200
        scrape = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        scrape.request("GET", "/metrics")
        assert b"ocifit_build_info" in scrape.getresponse().read()
        scrape.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    log_lines = [json.loads(line) for line in server.stderr.read().splitlines() if line.startswith("{")]
    assert log_lines and all({"time", "level", "msg"} <= set(line) for line in log_lines)  # OCIFIT_LOG_FORMAT=json


def make_targets() -> List[str]:
    done = subprocess.run(["make", "-s", "help"], cwd=HERE, capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def test_make_help_lists_every_target_and_each_dry_runs() -> None:
    need("make")
    targets = make_targets()
    assert {"build", "push", "kind-load", "install", "install-configmap", "uninstall", "certs", "demo", "test",
            "e2e", "help"} <= set(targets)
    for target in targets:
        done = subprocess.run(["make", "-n", target, "IMAGE=registry.local/ocifit", "TAG=v1"], cwd=HERE,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (target, done.stderr)


def make_dry_run(*args: str) -> List[str]:
    """The commands `make -n` would run (without make's directory lines when the suite itself runs in make)."""
    need("make")
    done = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_make_build_tags_the_image_with_ocifits_version_and_passes_the_base_image() -> None:
    version = ocifit.__version__
    assert make_dry_run("build", "IMAGE=registry.local/ocifit") == [
        f'docker build --build-arg BASE_IMAGE="python:3.12-slim-bookworm" --build-arg VERSION="{version}" '
        f'-t registry.local/ocifit:{version} .']
    digest = "mirror.local/library/python@sha256:" + "0" * 64
    assert make_dry_run("build", "push", "IMAGE=registry.local/ocifit", "TAG=v2", f"BASE_IMAGE={digest}") == [
        f'docker build --build-arg BASE_IMAGE="{digest}" --build-arg VERSION="{version}" -t registry.local/ocifit:v2 .',
        "docker push registry.local/ocifit:v2"]


def test_make_test_shows_the_reason_of_each_skip() -> None:
    (pytest_line,) = [line for line in make_dry_run("test") if "-m pytest" in line]
    assert "-rs" in pytest_line.split()


def test_the_suites_own_tls_tests_raise_no_deprecation_warning() -> None:
    """Old protocol versions are offered on purpose there; that must not show up as a warning of the suite."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "error::DeprecationWarning", str(HERE / "test_ocifit.py"), "-k",
                           "test_tls_below_1_2_is_refused"],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout and "warning" not in done.stdout, done.stdout


def _kubectl_shim(tmp_path: Path, fail: str = "") -> Path:
    """A kubectl that records what it is asked to apply, delete or patch; `create --dry-run` and `patch --local`
    are the real kubectl's. `fail`: a subcommand that fails (exit 1) instead."""
    real = need("kubectl")
    calls = tmp_path / "calls"
    calls.mkdir(parents=True)
    shim = tmp_path / "kubectl"
    shim.write_text(f"""#!/bin/sh
case " $* " in *" {fail or '-no-failure-'} "*) echo "kubectl: failing on purpose" >&2; exit 1;; esac
case " $* " in *" create "*|*" --local "*) KUBECONFIG={tmp_path}/none exec {real} "$@";; esac
n=$(ls {calls} | grep -c args)
printf '%s\\n' "$@" > {calls}/$n.args
case "$*" in *"-f -"*) cat > {calls}/$n.stdin;; esac
""")
    shim.chmod(0o755)
    return shim


@pytest.fixture
def kubectl_shim(tmp_path: Path) -> Path:
    return _kubectl_shim(tmp_path)


def shim_calls(shim: Path) -> List["tuple[List[str], str]"]:
    calls = shim.parent / "calls"
    result = []
    for n in range(len(list(calls.glob("*.args")))):
        stdin = calls / f"{n}.stdin"
        result.append(((calls / f"{n}.args").read_text().splitlines(), stdin.read_text() if stdin.exists() else ""))
    return result


def run_make(*args: str) -> subprocess.CompletedProcess:
    need("make")
    return subprocess.run(["make", *args], cwd=HERE, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def _openssl_text(openssl: str, cert: Path, *args: str) -> str:
    return subprocess.run([openssl, "x509", "-in", str(cert), "-noout", *args], capture_output=True, text=True,
                          timeout=30).stdout


def _expires_within(openssl: str, cert: Path, days: int) -> bool:
    return subprocess.run([openssl, "x509", "-in", str(cert), "-noout", "-checkend", str(days * 86400)],
                          capture_output=True, timeout=30).returncode != 0


def test_make_certs_makes_a_ca_and_a_serving_certificate_for_the_service(kubectl_shim: Path, tmp_path: Path) -> None:
    openssl = need("openssl")
    certs = tmp_path / "certs"
    done = run_make("certs", f"CERT_DIR={certs}", f"KUBECTL={kubectl_shim}")
    assert done.returncode == 0, done.stderr
    verified = subprocess.run([openssl, "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "tls.crt")],
                              capture_output=True, text=True)
    assert verified.stdout.strip() == f"{certs / 'tls.crt'}: OK"
    ca = _openssl_text(openssl, certs / "ca.crt", "-ext", "basicConstraints,keyUsage")
    assert "CA:TRUE" in ca and "Certificate Sign" in ca
    serving = _openssl_text(openssl, certs / "tls.crt", "-ext", "basicConstraints,extendedKeyUsage,subjectAltName")
    assert "CA:FALSE" in serving and "TLS Web Server Authentication" in serving
    for name in ("ocifit.ocifit-system.svc", "ocifit.ocifit-system.svc.cluster.local"):
        assert f"DNS:{name}" in serving
    assert not _expires_within(openssl, certs / "ca.crt", 9 * 365) and _expires_within(openssl, certs / "tls.crt", 366)
    # ocifit serves the pair, and a client that trusts only the CA (the API server, with the caBundle) accepts
    # it for the Service's name.
    running = start_server(tmp_path, {"crt": certs / "tls.crt", "key": certs / "tls.key", "ca": certs / "ca.crt"})
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw:
            assert running.context is not None
            with running.context.wrap_socket(raw, server_hostname="ocifit.ocifit-system.svc") as tls:
                assert tls.getpeercert()["subject"] == ((("commonName", "ocifit.ocifit-system.svc"),),)
    finally:
        running.stop()
    (apply_args, secret), (patch_args, _) = shim_calls(kubectl_shim)
    assert apply_args == ["apply", "-f", "-"]
    assert "kind: Secret" in secret and "type: kubernetes.io/tls" in secret and "namespace: ocifit-system" in secret
    assert patch_args[:3] == ["patch", "mutatingwebhookconfiguration", "ocifit"]
    ca_bundle = json.loads(patch_args[-1])[0]
    assert ca_bundle["path"] == "/webhooks/0/clientConfig/caBundle"
    assert base64.b64decode(ca_bundle["value"]) == (certs / "ca.crt").read_bytes()


def test_make_certs_again_renews_the_serving_certificate_under_the_same_ca(tmp_path: Path) -> None:
    openssl = need("openssl")
    certs = tmp_path / "certs"
    bundles, serving = [], []
    for run in range(2):
        shim = _kubectl_shim(tmp_path / f"run{run}")
        done = run_make("certs", f"CERT_DIR={certs}", f"KUBECTL={shim}")
        assert done.returncode == 0, done.stderr
        bundles.append(json.loads(shim_calls(shim)[-1][0][-1])[0]["value"])
        serving.append((certs / "tls.crt").read_bytes())
    assert bundles[0] == bundles[1] and serving[0] != serving[1]
    assert base64.b64decode(bundles[1]) == (certs / "ca.crt").read_bytes()
    # A CA within a year of its end is replaced (a serving certificate lasts a year), and the caBundle with it.
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "100", "-subj", "/CN=old",
                    "-keyout", str(certs / "ca.key"), "-out", str(certs / "ca.crt")], capture_output=True, check=True)
    old_ca = (certs / "ca.crt").read_bytes()
    shim = _kubectl_shim(tmp_path / "run2")
    assert run_make("certs", f"CERT_DIR={certs}", f"KUBECTL={shim}").returncode == 0
    assert (certs / "ca.crt").read_bytes() != old_ca
    assert base64.b64decode(json.loads(shim_calls(shim)[-1][0][-1])[0]["value"]) == (certs / "ca.crt").read_bytes()


@pytest.mark.parametrize("cert_manager", ["true", "false"])
def test_make_install_applies_deploy_yaml_with_the_image_and_tag_given(kubectl_shim: Path, cert_manager: str) -> None:
    done = run_make("install", f"CERT_MANAGER={cert_manager}", "IMAGE=registry.local/ocifit", "TAG=v7",
                    f"KUBECTL={kubectl_shim}")
    assert done.returncode == 0, done.stderr
    ((args, applied),) = shim_calls(kubectl_shim)
    assert args == ["apply", "-f", "-"]
    docs = deploy_docs(applied)
    cert_manager_docs = [d for d in deploy_docs() if d["apiVersion"].startswith("cert-manager.io/")]
    if cert_manager == "false":
        assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
        assert len(docs) == len(deploy_docs()) - len(cert_manager_docs)
    else:
        assert len(docs) == len(deploy_docs())
    assert deploy_object("Deployment", docs)["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.local/ocifit:v7"
    assert "ghcr.io/compspec/ocifit" not in applied


def test_make_install_tags_the_image_with_ocifits_version_by_default(kubectl_shim: Path) -> None:
    done = run_make("install", "IMAGE=registry.local/ocifit", f"KUBECTL={kubectl_shim}")
    assert done.returncode == 0, done.stderr
    ((args, applied),) = shim_calls(kubectl_shim)
    assert deploy_object("Deployment", deploy_docs(applied))["spec"]["template"]["spec"]["containers"][0][
        "image"] == f"registry.local/ocifit:{ocifit.__version__}"


def test_make_install_configmap_applies_the_code_server_side_and_runs_it_on_a_stock_image(
        kubectl_shim: Path) -> None:
    import hashlib
    import kubernetes_validate
    base = "mirror.local/library/python@sha256:" + "0" * 64
    done = run_make("install-configmap", f"BASE_IMAGE={base}", f"KUBECTL={kubectl_shim}")
    assert done.returncode == 0, done.stderr
    (rest_args, rest), (code_args, code), (deployment_args, deployment_yaml) = shim_calls(kubectl_shim)
    # First everything but the Deployment (the namespace among it), then the code, then the Deployment that
    # mounts it: no pod waits for a ConfigMap that is not there yet.
    assert rest_args == deployment_args == ["apply", "-f", "-"]
    rest_docs = deploy_docs(rest)
    assert rest_docs[0]["kind"] == "Namespace" and "Deployment" not in [d["kind"] for d in rest_docs]
    # ocifit.py is far bigger than a last-applied annotation should be: server-side apply keeps none.
    assert code_args == ["apply", "--server-side", "-f", "-"]
    (config_map,) = deploy_docs(code)
    assert (config_map["kind"], config_map["metadata"]["name"], config_map["metadata"]["namespace"]) == \
        ("ConfigMap", "ocifit-code", "ocifit-system")
    assert config_map["data"] == {"ocifit.py": (HERE / "ocifit.py").read_text()}
    (deployment,) = deploy_docs(deployment_yaml)
    names = sorted((d["kind"], d["metadata"]["name"]) for d in rest_docs + [deployment])
    assert names == sorted((d["kind"], d["metadata"]["name"]) for d in deploy_docs())
    kubernetes_validate.validate(deployment, "1.32.0", strict=True)
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == base
    assert container["command"] == ["python3", "/opt/ocifit/ocifit.py", "serve"]
    assert {"name": "code", "configMap": {"name": "ocifit-code"}} in pod["volumes"]
    assert {"name": "code", "mountPath": "/opt/ocifit", "readOnly": True} in container["volumeMounts"]
    # A new ocifit.py changes the pod template, so the Deployment rolls.
    assert template["metadata"]["annotations"] == \
        {"ocifit.compspec.io/code-sha256": hashlib.sha256((HERE / "ocifit.py").read_bytes()).hexdigest()}
    original = deploy_object("Deployment")
    assert pod["priorityClassName"] == original["spec"]["template"]["spec"]["priorityClassName"]
    assert container["args"] == original["spec"]["template"]["spec"]["containers"][0]["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_no_kustomization_is_offered_that_fails_to_build_on_its_own() -> None:
    """`kubectl apply -k DIR` must work for every DIR with a kustomization, with no --load-restrictor."""
    kubectl = need("kubectl")
    found = [p for p in HERE.rglob("*") if p.name.lower() in ("kustomization.yaml", "kustomization.yml")
             and not any(part.startswith(".") for part in p.relative_to(HERE).parts)]
    for kustomization in found:
        done = subprocess.run([kubectl, "kustomize", str(kustomization.parent)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, KUBECONFIG=str(HERE / "no-kubeconfig")))
        assert done.returncode == 0, (kustomization, done.stderr)
    for doc in ("Makefile", "README.md", "example/README.md", "deploy.yaml"):
        assert "--load-restrictor" not in (HERE / doc).read_text()
        assert "-k example/" not in (HERE / doc).read_text()


@pytest.mark.parametrize("target, breaking", [
    ("install", "PYTHON=false"),
    ("uninstall", "PYTHON=false"),
    ("install-configmap", "PYTHON=false"),
    ("install-configmap", "fail=create"),
    ("certs", "fail=create"),
])
def test_make_fails_when_a_command_early_in_a_pipe_fails(tmp_path: Path, target: str, breaking: str) -> None:
    """Recipes run with bash -euo pipefail: a failing producer is not hidden by the kubectl reading from it."""
    if target == "certs":
        need("openssl")
    shim = _kubectl_shim(tmp_path, fail=breaking.split("=")[1] if breaking.startswith("fail=") else "")
    args = [target, f"KUBECTL={shim}", f"CERT_DIR={tmp_path / 'certs'}"]
    if breaking.startswith("PYTHON="):
        args.append(breaking)
    done = run_make(*args)
    assert done.returncode != 0, (done.stdout, done.stderr)
    applied = "".join(stdin for _, stdin in shim_calls(shim))
    assert "kind: Deployment" not in applied and "kind: Secret" not in applied
    assert not [args for args, _ in shim_calls(shim) if args[0] == "patch"]


def test_the_dockerfile_is_small_non_root_and_installs_nothing() -> None:
    lines = [line.strip() for line in (HERE / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[:2] == ["ARG BASE_IMAGE=python:3.12-slim-bookworm", "FROM ${BASE_IMAGE}"]
    assert "COPY ocifit.py /app/ocifit.py" in lines
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert not [line for line in lines if "pip" in line or line.startswith("RUN ")]
    assert json.loads(lines[-1].split(" ", 1)[1]) == ["python3", "/app/ocifit.py", "serve"]


def test_the_image_is_labelled_with_its_source_and_version() -> None:
    import shlex
    lines = [line.strip() for line in (HERE / "Dockerfile").read_text().replace("\\\n", " ").splitlines()]
    labels = dict(word.split("=", 1) for line in lines if line.startswith("LABEL ") for word in shlex.split(line)[1:])
    assert labels["org.opencontainers.image.source"].startswith("https://github.com/")
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    # VERSION is declared after FROM (an ARG before FROM is not seen by LABEL), and `make build` passes it.
    assert lines.index("ARG VERSION=unknown") > [i for i, line in enumerate(lines) if line.startswith("FROM ")][0]


def test_dockerignore_keeps_everything_but_ocifit_py_out_of_the_build_context() -> None:
    import fnmatch
    patterns = [line.strip() for line in (HERE / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last pattern that matches the path or a parent wins
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            pattern = pattern.lstrip("!").strip("/")
            parts = path.split("/")
            if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
                verdict = not negated
        return verdict
    for path in (".venv/bin/python", ".venv/lib/python3.11/site-packages/yaml/__init__.py", "certs/tls.key",
                 ".git/config", "test_ocifit.py", "example/pod.yaml", ".hypothesis/examples/x"):
        assert ignored(path), path
    copied = [line.split()[1] for line in (HERE / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    assert copied == ["ocifit.py"] and not ignored("ocifit.py")


def test_make_demo_shows_the_servers_log_after_the_answers_and_says_which_denials_are_expected() -> None:
    need("openssl"), need("curl"), need("make")
    done = subprocess.run(["make", "-s", "demo"], cwd=HERE, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, DEMO_PORT=str(_free_port())))
    assert done.returncode == 0, done.stderr
    answers, log = done.stdout.split("\n=== the server's log\n")
    assert "outcome=" not in answers and "outcome=" not in done.stderr  # no log line among the answers
    assert "outcome=mutated" in log and "outcome=denied" in log
    sections = answers.split("\n=== ")[1:]
    assert len(sections) == len(list((EXAMPLE / "reviews").glob("*.json"))) + 2
    for section in sections:
        actual = "denied" if "allowed: False" in section or "ocifit: denied" in section else "allowed"
        (expected,) = [line for line in section.splitlines() if line.startswith("expected: ")]
        assert expected.split()[1].rstrip(",:") == actual, section
    assert sum("expected: denied" in section for section in sections) == 2


def test_example_readme_waits_for_the_pod_before_reading_its_logs() -> None:
    lines = (EXAMPLE / "README.md").read_text().splitlines()
    logs = [i for i, line in enumerate(lines) if line.startswith("kubectl logs flavor-test")]
    assert logs
    for i in logs:
        since_apply = lines[max(j for j in range(i) if lines[j].startswith("kubectl apply -f example/pod.yaml")):i]
        assert [line for line in since_apply if line.startswith("kubectl wait ") and "pod/flavor-test" in line]
    e2e = (EXAMPLE / "e2e.sh").read_text()
    assert "kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/flavor-test" in e2e


def test_ci_installs_every_tool_the_suite_needs() -> None:
    """.ci/run on a clean Debian 12: whatever `need()` asks for, and python3-venv for `make test`."""
    ci = (HERE / ".ci" / "run").read_text()
    tools = set(re.findall(r'need\("([\w-]+)"\)', (HERE / "test_ocifit.py").read_text()))
    assert tools >= {"kubectl", "openssl", "docker-registry"}
    for tool in tools:
        assert f"{tool}:" in ci or f"command -v {tool} " in ci, tool
    assert "kubernetes-client" in ci and "python3-venv" in ci
    assert "OCIFIT_REQUIRE_TOOLS=1" in ci and ci.rstrip().endswith("make test")


def _manifest(path: Path) -> Dict[str, Any]:
    import yaml
    return yaml.safe_load(path.read_text())


def test_the_example_pod_and_deployment_are_mutated(tmp_path: Path) -> None:
    import kubernetes_validate
    pod = _manifest(EXAMPLE / "pod.yaml")
    pod["metadata"]["namespace"] = "default"
    kubernetes_validate.validate(pod, "1.32.0", strict=True)
    assert kubectl_patch(pod, list(decide(pod).patch), tmp_path)["spec"]["containers"][0]["image"] == "debian:11"
    deployment = _manifest(EXAMPLE / "deployment.yaml")
    kubernetes_validate.validate(deployment, "1.32.0", strict=True)
    template = deployment["spec"]["template"]
    replica = {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
               "metadata": dict(template["metadata"], generateName="flavor-deployment-5c9f-", namespace="default")}
    patched = kubectl_patch(replica, list(decide(replica).patch), tmp_path)
    assert [c["image"] for c in patched["spec"]["initContainers"] + patched["spec"]["containers"]] == \
        ["debian:11", "debian:11"]


def test_the_kind_example_has_one_control_plane_and_three_workers() -> None:
    roles = [n["role"] for n in _manifest(EXAMPLE / "kind-config.yaml")["nodes"]]
    assert roles == ["control-plane", "worker", "worker", "worker"]


def test_e2e_on_kind() -> None:
    """`make e2e`: the whole upstream story on a kind cluster. Needs a Docker engine, which CI here lacks."""
    for tool in ("kind", "docker"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed: the kind end-to-end test needs kind and a Docker engine")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Docker engine answers `docker info`: the kind end-to-end test needs one")
    done = subprocess.run(["make", "e2e"], cwd=HERE, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "=== e2e passed" in done.stdout


# --------------------------------------------------------------------------------------------
# Hostile input and faults while serving
# --------------------------------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
label_text = st.sampled_from(["f", FLAVOR_KEY, "pool", "gen", ""]) | st.text(max_size=6)
value_text = st.sampled_from(["vanilla", "chocolate", "5", "-1", "true", "x" * 70]) | st.text(max_size=8)


def maybe(strategy: Any) -> Any:
    """A well-formed value most of the time, any JSON value some of the time."""
    return st.one_of(strategy, strategy, json_values)


expressions = st.fixed_dictionaries({
    "op": maybe(st.sampled_from(list(ocifit.OPERATORS))), "key": maybe(label_text),
    "value": maybe(st.lists(value_text, max_size=3) | value_text | st.sampled_from(["(a+)+", "[", r"^\d+$"]))})
compatibilities = st.fixed_dictionaries(
    {"tag": maybe(st.sampled_from(["debian:11", "ubuntu:24.04"])), "weight": maybe(st.integers(-3, 3)),
     "rules": maybe(st.lists(st.fixed_dictionaries({"matchFeatures": maybe(st.lists(st.fixed_dictionaries(
         {"matchExpressions": maybe(st.lists(expressions, max_size=3))}), max_size=2))}), max_size=2))})
specs = st.fixed_dictionaries({"version": maybe(st.just("v1alpha1")),
                               "compatibilities": maybe(st.lists(compatibilities, min_size=1, max_size=3))})


@hypothesis_settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, labels=st.dictionaries(label_text, value_text, max_size=4))
def test_any_spec_is_either_valid_and_evaluates_or_rejected_with_a_place(spec: Any, labels: Dict[str, str]) -> None:
    try:
        parsed = ocifit.parse_spec(json.dumps(spec))
    except ocifit.SpecError as exc:
        assert str(exc)
        return
    selection = parsed.select(labels)
    chosen = selection.chosen
    assert chosen is None or chosen.tag == spec["compatibilities"][chosen.index]["tag"]
    assert len(selection.verdicts) == len(parsed.compatibilities)


node_terms = st.fixed_dictionaries({"matchExpressions": maybe(st.lists(st.fixed_dictionaries({
    "key": maybe(label_text), "operator": maybe(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"])),
    "values": maybe(st.lists(value_text, max_size=2))}), max_size=2))})
pod_specs = st.fixed_dictionaries({}, optional={
    "containers": maybe(st.lists(st.fixed_dictionaries({"name": st.just("c"), "image": maybe(st.sampled_from(
        ["placeholder:latest", "nginx:1"]))}), max_size=3)),
    "initContainers": maybe(st.lists(st.fixed_dictionaries({"image": st.just("placeholder:latest")}), max_size=2)),
    "nodeSelector": maybe(st.dictionaries(label_text, value_text, max_size=2)),
    "affinity": maybe(st.fixed_dictionaries({"nodeAffinity": maybe(st.fixed_dictionaries({
        "requiredDuringSchedulingIgnoredDuringExecution": maybe(st.fixed_dictionaries({
            "nodeSelectorTerms": maybe(st.lists(node_terms, max_size=2))}))}))})),
    "tolerations": maybe(st.lists(st.fixed_dictionaries({"operator": maybe(st.just("Exists"))}), max_size=1))})
pods = st.fixed_dictionaries({
    "metadata": maybe(st.fixed_dictionaries({
        "labels": maybe(st.just({ocifit.ENABLED_LABEL: "true"})),
        "annotations": maybe(st.fixed_dictionaries({ocifit.IMAGE_REF_ANNOTATION: maybe(st.sampled_from(
            [FLAVOR_REF, "", "r/missing:1"]))}))})),
    "spec": maybe(pod_specs)})


def fuzz_webhook() -> ocifit.Webhook:
    return ocifit.Webhook(ocifit.Settings(), ocifit.StaticNodes(str(EXAMPLE / "nodes-heterogeneous.json")),
                          ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")}))


@hypothesis_settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods, operation=st.sampled_from(["CREATE", "CREATE", "UPDATE"]), uid=st.text(min_size=1, max_size=8))
def test_any_pod_shape_gets_a_valid_review_never_an_internal_error(pod: Any, operation: str, uid: str) -> None:
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": uid, "kind": {"kind": "Pod"}, "operation": operation, "object": pod}}
    status, payload = handled(fuzz_webhook(), json.dumps(review).encode())
    assert status == 200
    response = payload["response"]
    assert response["uid"] == uid and isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert response["status"]["code"] != 500 and response["status"]["message"]
    if "patch" in response:
        assert all(op["op"] in ("replace", "add") for op in patch_of(response))


@hypothesis_settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_gets_a_review_or_a_400(body: bytes) -> None:
    status, payload = handled(fuzz_webhook(), body)
    assert (status == 400 and payload["error"]) or (status == 200 and payload["kind"] == "AdmissionReview")


@pytest.mark.parametrize("body,message", [
    (b"[" * 50000 + b"]" * 50000, "nested too deeply"),
    (b'{"kind": "AdmissionReview", "request": {"uid": ' + b"9" * 200000 + b"}}", "number with 200000 digits"),
])
def test_hostile_bodies_are_refused_quickly(body: bytes, message: str) -> None:
    status, payload = handled(fuzz_webhook(), body)
    assert status == 400 and message in payload["error"]


def test_the_live_server_survives_a_burst_of_garbage(https_server: RunningServer) -> None:
    for body in [b"\x00\xff" * 100, b"{" * 10000, b"[]", json.dumps({"kind": "AdmissionReview",
                                                                       "request": {"uid": "u", "object": 5}}).encode()]:
        status, _ = https_server.request("POST", "/mutate", body)
        assert status in (200, 400)
    raw = socket.create_connection(("127.0.0.1", https_server.port))
    raw.sendall(b"GARBAGE\r\n\r\n")  # not even TLS
    raw.close()
    tls = https_server.context.wrap_socket(socket.create_connection(("127.0.0.1", https_server.port)),
                                           server_hostname="localhost")
    tls.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    assert tls.recv(100).startswith(b"HTTP/1.1 400")
    tls.close()
    assert https_server.post_review(review_of(pod_obj()))["response"]["allowed"] is True


def test_idle_keep_alive_connections_are_closed(tmp_path: Path, pki: Dict[str, Path]) -> None:
    running = start_server(tmp_path, pki, idle_timeout=0.5)
    try:
        conn = running.connect()
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        time.sleep(1.0)
        conn.sock.settimeout(5)
        assert conn.sock.recv(1) == b""  # the server hung up on the idle connection
        conn.close()
    finally:
        running.stop()


def test_connections_past_the_cap_are_closed_and_the_rest_served(tmp_path: Path, pki: Dict[str, Path],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    running = start_server(tmp_path, pki, max_connections=2, handshake_timeout=3)
    holders = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(2)]
    try:
        extra = socket.create_connection(("127.0.0.1", running.port))
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed at once
        extra.close()
        for _ in range(3):  # refused too, counted, but not logged again within a few seconds
            socket.create_connection(("127.0.0.1", running.port)).close()
        eventually(lambda: 'ocifit_connections_refused_total{reason="capacity"} 4'
                   in running.server.webhook.metrics.render())
        assert caplog.text.count("refused") == 1
        assert "refused 1 connection: 2 connections (--max-connections) open already; the latest from 127.0.0.1" \
            in caplog.text
    finally:
        for sock in holders:
            sock.close()

    def served() -> bool:
        try:
            return running.request("GET", "/healthz")[0] == 200
        except OSError:  # closed at once while the freed slots are not yet back
            return False
    eventually(served)
    running.stop()


def test_a_request_dripped_a_byte_at_a_time_is_cut_at_its_deadline(tmp_path: Path, pki: Dict[str, Path]) -> None:
    running = start_server(tmp_path, pki, request_timeout=1.0, idle_timeout=30)
    try:
        slow = running.tls_socket()
        started, cut = time.monotonic(), False
        head = b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n" + b"X-Drip: " + b"a" * 200
        for i in range(len(head)):  # a byte every 0.1 s: each read is quick, the whole request is not
            try:
                slow.sendall(head[i:i + 1])
            except OSError:
                cut = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 15:
                break
        if not cut:
            slow.settimeout(5)
            cut = slow.recv(1) == b""
        assert cut and time.monotonic() - started < 15
        slow.close()
        assert running.post_review(review_of(pod_obj()))["response"]["allowed"] is True
    finally:
        running.stop()


def test_idle_connections_make_room_for_new_ones(tmp_path: Path, pki: Dict[str, Path]) -> None:
    running = start_server(tmp_path, pki, max_connections=2)
    try:
        idle = []
        for _ in range(2):  # two keep-alive connections, each idle after one request
            conn = running.connect()
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b"ok\n"
            idle.append(conn)
        assert running.post_review(review_of(pod_obj()))["response"]["allowed"] is True  # a third is served
        idle[0].sock.settimeout(5)
        assert idle[0].sock.recv(1) == b""  # the one idle longest made room
        assert 'ocifit_connections_evicted_total 1' in running.server.webhook.metrics.render()
    finally:
        running.stop()


def test_connections_stalled_before_their_handshake_make_room_too(tmp_path: Path, pki: Dict[str, Path]) -> None:
    running = start_server(tmp_path, pki, max_connections=4, max_connections_per_client=4, request_timeout=30,
                           handshake_timeout=30)
    silent = [socket.create_connection(("127.0.0.1", running.port), source_address=(f"127.0.0.{i + 3}", 0))
              for i in range(4)]  # four addresses, no ClientHello: every slot held
    try:
        time.sleep(1.2)  # past the grace a real handshake needs
        conn = running.connect(source="127.0.0.2")
        conn.request("POST", "/mutate", json.dumps(review_of(pod_obj())).encode(), {"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read())["response"]["allowed"] is True
        conn.close()
        assert "ocifit_connections_evicted_total 1" in running.server.webhook.metrics.render()
    finally:
        for sock in silent:
            sock.close()
        running.stop()


def test_one_client_address_cannot_take_every_slot(tmp_path: Path, pki: Dict[str, Path],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    running = start_server(tmp_path, pki, max_connections=8, max_connections_per_client=3, request_timeout=30)
    hogs = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(10)]  # no ClientHello: busy
    try:
        eventually(lambda: 'ocifit_connections_refused_total{reason="per-client"} 7'
                   in running.server.webhook.metrics.render())
        conn = running.connect(source="127.0.0.2")  # the API server, from another address
        conn.request("POST", "/mutate", json.dumps(review_of(pod_obj())).encode(), {"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read())["response"]["allowed"] is True
        conn.close()
        assert "3 connections per client (--max-connections-per-client) open already" in caplog.text
    finally:
        for sock in hogs:
            sock.close()
        running.stop()


def test_registry_faults_while_serving_are_denials_and_the_server_goes_on(tmp_path: Path, pki: Dict[str, Path],
                                                                         stubs: Any) -> None:
    evil = (EXAMPLE / "compatibility-test.json").read_text().replace("debian", "evil").encode()
    wrong_routes, _ = artifact_routes(repo="wrong", blob=evil)
    slow_routes, _ = artifact_routes(repo="slow")
    slow_routes["/v2/slow/manifests/v1"] = lambda h: time.sleep(5)
    good_routes, _ = artifact_routes(repo="good")
    stub = stubs({**wrong_routes, **slow_routes, **good_routes})
    down = f"127.0.0.1:{_free_port()}"
    running = start_server(tmp_path, pki, insecure_registry=(stub.host, down), fetch_budget=1.0,
                           allowed_registries=(stub.host, down))
    running.server.webhook.artifacts = ocifit.build_artifacts(running.server.settings)
    try:
        cases = {f"{stub.host}/wrong:v1": "compatibility layer does not match its digest",
                 f"{stub.host}/slow:v1": f"registry {stub.host} did not answer within 1s",
                 f"{down}/gone:v1": f"registry {down} unreachable"}
        for ref, message in cases.items():
            started = time.monotonic()
            answer = running.post_review(review_of(pod_obj(ref=ref)))["response"]
            assert answer["allowed"] is False and message in answer["status"]["message"]
            assert time.monotonic() - started < 3  # within the budget, not the stub's 5 s
        assert running.post_review(review_of(pod_obj(ref=f"{stub.host}/good:v1")))["response"]["allowed"] is True
        metrics = running.request("GET", "/metrics")[1].decode()
        assert 'ocifit_admissions_total{mode="enforce",outcome="denied",reason="artifact-unavailable"} 3' in metrics
    finally:
        running.stop()


def test_an_api_server_that_goes_away_leaves_decisions_on_the_last_view(kube_api: FakeKubeAPI, pki: Dict[str, Path],
                                                                        tmp_path: Path) -> None:
    flavor_cluster(kube_api)
    settings = kube_settings(kube_api, pki, tmp_path, watch_failure_threshold=0.5)
    source = ocifit.build_node_source(settings)
    try:
        assert source.wait_synced(10)
        kube_api.stop()
        ready, why = eventually(lambda: (lambda h: h if not h[0] else None)(source.health()), 10)
        assert re.match(r"(node|NodeFeature) watch failing for", why), why  # whichever watch noticed first
        assert live_decision(source).image == "debian:11"  # the last good view still decides
    finally:
        source.stop()


def test_sigterm_drains_in_flight_admissions_then_exits(tmp_path: Path, pki: Dict[str, Path], stubs: Any) -> None:
    routes, _ = artifact_routes()
    manifest = routes["/v2/app/manifests/v1"]
    routes["/v2/app/manifests/v1"] = lambda h: (time.sleep(1.5), manifest(h))
    stub = stubs(routes)
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "ocifit.py"), "serve", "--port", str(port), "--bind",
                               "127.0.0.1", "--cert", str(pki["crt"]), "--key", str(pki["key"]), "--nodes",
                               str(EXAMPLE / "nodes-homogeneous.json"), "--insecure-registry", stub.host,
                               "--drain-delay", "0.5"],
                              stderr=subprocess.PIPE, text=True)
    running = RunningServer.__new__(RunningServer)
    running.port, running.context = port, ssl.create_default_context(cafile=str(pki["ca"]))
    try:
        _wait_ready(running)
        answers: List[Dict[str, Any]] = []
        slow = threading.Thread(target=lambda: answers.append(
            running.post_review(review_of(pod_obj(ref=f"{stub.host}/app:v1")))))
        slow.start()
        eventually(lambda: stub.seen)  # the admission is in flight, waiting on the registry
        server.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert running.request("GET", "/readyz") == (503, b"not ready: shutting down\n")
        slow.join(10)
        assert patch_of(answers[0]["response"])[0]["value"] == "debian:11"
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert "drained: answered 1 admissions after SIGTERM" in server.stderr.read()


def test_after_sigterm_it_serves_through_the_drain_delay_closing_each_connection_then_exits(
        tmp_path: Path, pki: Dict[str, Path]) -> None:
    """As the API server sees it: a kept-alive connection and a new one are both answered during the drain
    delay, each reply saying Connection: close; after it, new connections are refused and ocifit exits."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "ocifit.py"), "serve", "--port", str(port), "--bind",
                               "127.0.0.1", "--cert", str(pki["crt"]), "--key", str(pki["key"]), "--nodes",
                               str(EXAMPLE / "nodes-homogeneous.json"), "--drain-delay", "2", "--artifact",
                               f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}"],
                              stderr=subprocess.PIPE, text=True)
    running = RunningServer.__new__(RunningServer)
    running.port, running.context = port, ssl.create_default_context(cafile=str(pki["ca"]))
    body = json.dumps(review_of(pod_obj())).encode()

    def post(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        conn.request("POST", "/mutate", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response
    try:
        _wait_ready(running)
        kept = running.connect()
        assert post(kept).getheader("Connection") is None  # kept alive
        idle = running.connect()
        assert post(idle).status == 200
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert running.request("GET", "/readyz")[0] == 503
        reused = post(kept)
        assert (reused.status, reused.getheader("Connection")) == (200, "close")
        fresh = post(running.connect())
        assert (fresh.status, fresh.getheader("Connection")) == (200, "close")
        time.sleep(2.5)  # past the drain delay: no new connections, and the idle one is closed
        with pytest.raises(OSError):
            running.request("GET", "/healthz")
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
    log_text = server.stderr.read()
    assert "serving for --drain-delay 2s" in log_text
    assert "drained: answered 2 admissions after SIGTERM; closed 1 idle connections; 0 still open" in log_text


def test_a_body_still_uploading_at_sigterm_is_answered_before_exit(tmp_path: Path, pki: Dict[str, Path]) -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "ocifit.py"), "serve", "--port", str(port), "--bind",
                               "127.0.0.1", "--cert", str(pki["crt"]), "--key", str(pki["key"]), "--nodes",
                               str(EXAMPLE / "nodes-homogeneous.json"), "--artifact",
                               f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}"],
                              stderr=subprocess.PIPE, text=True)
    running = RunningServer.__new__(RunningServer)
    running.port, running.context = port, ssl.create_default_context(cafile=str(pki["ca"]))
    try:
        _wait_ready(running)
        body = json.dumps(review_of(pod_obj())).encode()
        conn = running.connect()
        conn.putrequest("POST", "/mutate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body[:100])  # headers and the first bytes; the rest is still on its way
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # past the drain delay
        conn.send(body[100:])
        response = conn.getresponse()
        assert response.status == 200 and patch_of(json.loads(response.read())["response"])[0]["value"] == "debian:11"
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_large_bodies_in_flight_share_a_byte_budget(tmp_path: Path, pki: Dict[str, Path]) -> None:
    running = start_server(tmp_path, pki, max_inflight_bytes=1024 * 1024)
    try:
        body = json.dumps(review_of(pod_obj())).encode()
        holder = running.connect()
        holder.putrequest("POST", "/mutate")
        holder.putheader("Content-Type", "application/json")
        holder.putheader("Content-Length", str(3 * 1024 * 1024))
        holder.endheaders(b" " * 1000)  # 3 MiB announced, still uploading
        eventually(lambda: running.server.bodies.requests == 1)
        status, answer = running.request("POST", "/mutate", body + b" " * 200 * 1024)
        assert status == 429 and b"too many large request bodies" in answer
        assert 'ocifit_requests_shed_total{reason="body-budget"} 1' in running.server.webhook.metrics.render()
        assert running.post_review(review_of(pod_obj()))["response"]["allowed"]  # an ordinary one always goes in
        holder.close()
        eventually(lambda: running.server.bodies.requests == 0)
    finally:
        running.stop()


def huge_selector_pod(keys: int) -> Dict[str, Any]:
    return pod_obj(spec={"nodeSelector": {f"k{i}": "v" for i in range(keys)},
                         "containers": [{"name": "app", "image": "placeholder:latest"}]})


def test_a_huge_node_selector_gets_a_short_denial_and_is_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    import gc
    import tracemalloc
    caplog.set_level("INFO", logger="ocifit")
    webhook = ocifit.Webhook(ocifit.Settings(), ocifit.StaticNodes(str(EXAMPLE / "nodes-homogeneous.json")),
                             ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")}))
    body = json.dumps(review_of(huge_selector_pod(110_000))).encode()
    tracemalloc.start()
    try:
        status, reply = webhook.handle(body)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = json.loads(reply)["response"]["status"]["message"]
    assert status == 200 and len(message) <= ocifit.MAX_MESSAGE and len(reply) < 8192
    assert "no node matches the pod's nodeSelector" in message and "more" in message
    assert held < 4 * 1024 * 1024, f"{held} bytes kept after one request"
    assert max(len(r.getMessage()) for r in caplog.records) < 8192


def test_reviews_of_many_containers_are_answered_and_not_kept(tmp_path: Path) -> None:
    import gc
    import tracemalloc
    webhook = ocifit.Webhook(ocifit.Settings(), ocifit.StaticNodes(str(EXAMPLE / "nodes-homogeneous.json")),
                             ocifit.LocalArtifacts({FLAVOR_REF: str(EXAMPLE / "compatibility-test.json")}))
    tracemalloc.start()
    try:
        for i in range(3):  # each a different pod, as an attacker would send
            pod = pod_obj(name=f"wide-{i}", spec={"containers": [{"name": f"c{n}", "image": "placeholder:latest"}
                                                                 for n in range(20_000 + i)]})
            status, reply = webhook.handle(json.dumps(review_of(pod)).encode())
            assert status == 200 and len(patch_of(json.loads(reply)["response"])) == 20_000 + i + 3
            del reply, pod  # the test's own copies
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 4 * 1024 * 1024, f"{held} bytes kept after three wide reviews"


def test_text_logs_carry_one_line_per_admission_with_its_level(tmp_path: Path) -> None:
    answers = {}
    for name, ref in (("mutated", FLAVOR_REF), ("denied", None)):
        review = tmp_path / f"{name}.json"
        review.write_text(json.dumps(review_of(pod_obj(name=None, ref=ref))))
        answers[name] = run_cli("review", str(review), "--nodes", str(EXAMPLE / "nodes-homogeneous.json"),
                                "--artifact", f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}",
                                "--log-level", "debug")  # review logs admission lines only then
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # RFC 3339, UTC, milliseconds
    (mutated,) = [line for line in answers["mutated"].stderr.splitlines() if " admission " in line]
    assert re.fullmatch(stamp + r' INFO admission namespace=team-a pod=demo-7d9c8b6f5-\* uid=uid-1 outcome=mutated '
                        r'reason=selected image=debian:11 matched="compatibilities\[0\] \(debian:11\)" '
                        r'candidates=3 artifact=file ms=[\d.]+', mutated), mutated
    (denied,) = [line for line in answers["denied"].stderr.splitlines() if " admission " in line]
    assert re.fullmatch(stamp + r' WARNING admission namespace=team-a pod=demo-7d9c8b6f5-\* uid=uid-1 outcome=denied '
                        r'reason=missing-annotation ms=[\d.]+ message=".*image-ref annotation.*"',
                        denied), denied


def test_an_admission_record_through_logging_reads_as_text_and_json(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ocifit")
    decision = ocifit.Decision.denied("disagreement", "the 3 candidate nodes disagree", candidates=3)
    ocifit.log.handle(ocifit.AdmissionRecord("ns", "p-*", "u-1", decision, 1.5))
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage().startswith("admission namespace=ns pod=p-* uid=u-1 ")
    entry = json.loads(ocifit.JsonLogFormatter().format(record))
    assert entry["level"] == "warning" and entry["admission"] == {
        "namespace": "ns", "pod": "p-*", "uid": "u-1", "outcome": "denied", "reason": "disagreement",
        "candidates": 3, "message": "the 3 candidate nodes disagree", "ms": 1.5}  # no image: none chosen
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert ocifit.TextLogFormatter().format(record).endswith(
        'candidates=3 ms=1.5 message="the 3 candidate nodes disagree"')


@pytest.mark.parametrize("evil", ["ns\nINFO admission forged=1", "a\tb", "x\ry", "\x1b[31mred", "a\u2028b",
                                  "q\"uote", "k=v"])
def test_log_lines_cannot_be_forged(evil: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ocifit")
    decision = ocifit.Decision.denied("no-match", f"registry says {evil}")
    ocifit.log.handle(ocifit.AdmissionRecord(evil, evil, evil, decision, 1.0))
    ocifit.log.warning("node view: %s", evil)
    for record in caplog.records:
        text = ocifit.TextLogFormatter().format(record)
        assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text, text
        assert "\t" not in text
        json_line = ocifit.JsonLogFormatter().format(record)
        assert "\n" not in json_line and json.loads(json_line)
    admission = ocifit.TextLogFormatter().format(caplog.records[0])
    assert admission.count(" pod=") == 1 and admission.count(" uid=") == 1  # a value cannot pass for a field


class StalledStream(io.StringIO):
    """stderr as a full log pipe: write() blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked, self.release = threading.Event(), threading.Event()

    def write(self, text: str) -> int:
        self.blocked.set()
        assert self.release.wait(20)
        return super().write(text)


def test_a_stalled_log_pipe_costs_log_lines_not_memory() -> None:
    stream = StalledStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ocifit.TextLogFormatter())
    writer = ocifit.LogWriter(handler, interval=0.01, limit=50)
    writer.start()

    def line(i: int) -> ocifit.AdmissionRecord:
        return ocifit.AdmissionRecord("ns", f"pod-{i}", "u", ocifit.Decision.untouched("already-mutated"), 0.1)
    writer.put(line(0))
    assert stream.blocked.wait(10)  # the writer is stuck writing pod-0
    for i in range(1, 201):
        writer.put(line(i))
    assert writer.records.qsize() == 50
    stream.release.set()
    writer.stop()
    text = stream.getvalue()
    assert "pod=pod-0 " in text and "pod=pod-50 " in text and "pod=pod-51 " not in text
    assert "WARNING dropped 150 log lines: stderr was not taking them" in text
    assert text.index("pod=pod-0 ") < text.index("dropped 150") < text.index("pod=pod-1 ")


def test_json_logs_carry_the_admission_fields_and_no_secrets(tmp_path: Path, pki: Dict[str, Path]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"registry.example": {"auth": base64.b64encode(b"u:topsecret").decode()}}}))
    review = tmp_path / "review.json"
    review.write_text(json.dumps(review_of(pod_obj(name=None))))
    done = run_cli("review", str(review), "--nodes", str(EXAMPLE / "nodes-homogeneous.json"), "--artifact",
                   f"{FLAVOR_REF}={EXAMPLE / 'compatibility-test.json'}", "--log-format", "json",
                   "--registry-config", str(config), "--log-level", "debug")
    assert done.returncode == 0
    (line,) = [json.loads(text) for text in done.stderr.splitlines() if '"admission"' in text]
    assert line["admission"]["pod"] == "demo-7d9c8b6f5-*" and line["admission"]["image"] == "debian:11"
    assert line["admission"]["candidates"] == 3 and line["level"] == "info"
    assert "topsecret" not in done.stderr and "dTp0b3BzZWNyZXQ" not in done.stderr


def test_metrics_cover_admissions_nodes_and_the_certificate(https_server: RunningServer) -> None:
    https_server.post_review(review_of(pod_obj()))
    https_server.post_review(review_of(pod_obj(ref=None)))
    status, body = https_server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    for line in ('ocifit_admissions_total{mode="enforce",outcome="mutated",reason="selected"} 1',
                 'ocifit_admissions_total{mode="enforce",outcome="denied",reason="missing-annotation"} 1',
                 "ocifit_admission_duration_seconds_count 2", "ocifit_nodes 4", "ocifit_node_label_sets 4"):
        assert line in text
    expiry = float(re.search(r"^ocifit_certificate_expiry_timestamp_seconds (\S+)$", text, re.M).group(1))
    end_date = subprocess.run([need("openssl"), "x509", "-noout", "-enddate", "-in", str(https_server.cert)],
                              capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    assert expiry == float(ssl.cert_time_to_seconds(end_date))  # exact, not rounded to 6 digits
    assert "# TYPE ocifit_registry_requests_total counter" in text  # documented, though no request yet
    for series in ("ocifit_build_info{python=", "process_cpu_seconds_total ", "process_resident_memory_bytes ",
                   "process_open_fds ", "process_max_fds ", "process_start_time_seconds ",
                   'ocifit_admissions_total{mode="enforce",outcome="untouched",reason="not-enabled"} 0',
                   "ocifit_admissions_in_flight 0", "ocifit_connections_open "):
        assert series in text, series
    assert float(re.search(r"^process_start_time_seconds (\S+)$", text, re.M).group(1)) <= time.time()
    assert status == 200 and headers_of(https_server, "/metrics")["Content-Type"] == \
        "text/plain; version=0.0.4; charset=utf-8"


def headers_of(running: RunningServer, path: str) -> Dict[str, str]:
    conn = running.connect()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return dict(response.getheaders())
    finally:
        conn.close()


def test_metric_values_are_exact() -> None:
    metrics = ocifit.Metrics()
    metrics.count("ocifit_admissions_total", 1_234_567, outcome="mutated", reason="selected", mode="enforce")
    metrics.gauge("ocifit_certificate_expiry_timestamp_seconds", lambda: 1795000123.25)
    metrics.observe("ocifit_admission_duration_seconds", 0.000123456789)
    text = metrics.render()
    assert 'ocifit_admissions_total{mode="enforce",outcome="mutated",reason="selected"} 1234567\n' in text
    assert "ocifit_certificate_expiry_timestamp_seconds 1795000123.25\n" in text
    assert "ocifit_admission_duration_seconds_sum 0.000123456789\n" in text


def test_metrics_can_be_served_over_plain_http_on_a_second_address(tmp_path: Path, pki: Dict[str, Path]) -> None:
    port, metrics_port = _free_port(), _free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "ocifit.py"), "serve", "--bind", "127.0.0.1", "--port",
                               str(port), "--cert", str(pki["crt"]), "--key", str(pki["key"]), "--nodes",
                               str(EXAMPLE / "nodes-homogeneous.json"), "--metrics-bind", f"127.0.0.1:{metrics_port}"],
                              stderr=subprocess.PIPE, text=True)
    try:
        def scrape() -> Any:
            conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
            try:
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                return response.status, response.getheader("Content-Type"), response.read().decode()
            finally:
                conn.close()
        status, kind, text = eventually(scrape)
        assert status == 200 and kind == "text/plain; version=0.0.4; charset=utf-8" and "ocifit_nodes 4" in text
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
        conn.request("POST", "/mutate", body=b"{}", headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 501  # only /metrics (and /healthz) there
        conn.close()
    finally:
        server.terminate()
        server.wait(30)
