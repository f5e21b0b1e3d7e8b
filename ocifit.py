#!/usr/bin/env python3
"""ocifit — pick a pod's container image from an OCI compatibility artifact.

A Kubernetes mutating admission webhook in one file, Python standard library only (CPython 3.9+).

A pod opts in with the label ``oci.image.compatibilities.selection/enabled: "true"`` and names a
compatibility artifact with the annotation ``oci.image.compatibilities.selection/image-ref``. ocifit
evaluates the artifact's rules against the nodes the pod can land on (its nodeSelector, required node
affinity and tolerations decide which): against their labels, or, for a spec in Node Feature Discovery's
dialect, against the feature sets NFD publishes in NodeFeature objects. It answers with a JSONPatch that swaps
every container image equal to ``.../target-image`` (default ``placeholder:latest``) for the chosen image.
If the candidate nodes disagree, the pod is denied with a message saying why, or (``.../on-disagreement: pin``)
pinned by a required node affinity to the kinds of node that fit the best image; if nothing matches, denied.
Or the pod lists candidate images, best first, in ``.../candidates``: ocifit reads the spec attached to each
(OCI referrers) and chooses the first that fits every candidate node, pinned to its digest.

Subcommands (``python3 ocifit.py SUBCOMMAND --help`` for each):
  serve    the HTTPS webhook: POST /mutate, GET /healthz /readyz /metrics
  match    evaluate a spec against labels, a node list or NFD node features, print the chosen image
  review   answer one AdmissionReview from a file, exactly as ``serve`` would
  fetch    pull a compatibility artifact (or the spec attached to an image) and print its spec

Sections (each under a banner of its name), the machinery first, then in the order data flows:
  Settings                 every option once: flag, environment twin, parser, default, help
  Logging and JSON         one-line log records, the writer thread, JSON from untrusted hands
  Shared machinery         bounded caches, watched files, socket deadlines, Retry-After
  Metrics                  Prometheus text from counters, histograms and gauges
  Compatibility spec       parse and validate a spec (ocifit's dialect or NFD's); match it against a node
  Node view                nodes, snapshots, where a pod may land; nodes from a file or the cluster
  Artifacts and registry   where specs come from: local files, an OCI registry (artifacts, or specs attached
                           to images as OCI referrers), the cache in front
  Admission                AdmissionReview in -> Decision -> AdmissionReview out; the webhook edge
  HTTP server              HTTPS with reloadable certificates, connection limits, /mutate and friends
  Command line             serve | match | review | fetch
Every setting has an environment twin (``--port`` / OCIFIT_PORT).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import calendar
import collections
import collections.abc
import dataclasses
import datetime
import email.utils
import errno
import functools
import gc
import hashlib
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import operator
import os
import platform
import queue
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import types
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, NoReturn, Optional, Protocol,
                    Sequence, Set, Tuple, TypeVar, cast)

__version__ = "0.1.0"

log = logging.getLogger("ocifit")

PREFIX = "oci.image.compatibilities.selection/"
ENABLED_LABEL = PREFIX + "enabled"
IMAGE_REF_ANNOTATION = PREFIX + "image-ref"
TARGET_IMAGE_ANNOTATION = PREFIX + "target-image"
SELECTED_IMAGE_ANNOTATION = PREFIX + "selected-image"
MATCHED_ANNOTATION = PREFIX + "matched-compatibility"
ARTIFACT_ANNOTATION = PREFIX + "artifact"
ON_DISAGREEMENT_ANNOTATION = PREFIX + "on-disagreement"  # "pin" or "deny"
PINNED_ANNOTATION = PREFIX + "pinned"
CANDIDATES_ANNOTATION = PREFIX + "candidates"  # candidate images, best first, chosen by their attached specs
DEFAULT_TARGET_IMAGE = "placeholder:latest"
ADMISSION_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")  # answered in the version asked
COMPAT_MEDIA_TYPE = "application/vnd.oci.image.compatibilities.v1+json"
CONTROL_PLANE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
MiB = 1024 * 1024
USER_AGENT = f"ocifit/{__version__}"


# ============================================================================================
# Settings
# ============================================================================================

@dataclass(frozen=True)
class Option:
    """One setting: its flag, its environment twin(s), the function that parses its text, its default and what
    it means. Settings takes its defaults from here, so each is written once."""

    flag: str
    env: Tuple[str, ...]
    parse: Callable[[str], Any]
    default: Any
    help: str
    many: bool = False  # repeatable flag; the environment form is comma-separated

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# Parsers of option text: each raises ArgumentTypeError with words for the user.

def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"choose true or false, not {text!r}")


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        return kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _seconds_or_zero(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number of seconds, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if not 0 < value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


def _port(text: str) -> int:
    value = _number(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return value


def _address(text: str) -> str:
    """An IP address to bind (empty: all)."""
    if text:
        try:
            ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None
    return text.strip("[]")


def _choice(*allowed: str) -> Callable[[str], str]:
    def read(text: str) -> str:
        if text.lower() not in allowed:
            raise argparse.ArgumentTypeError(f"choose {', '.join(allowed[:-1])} or {allowed[-1]}, not {text!r}")
        return text.lower()
    read.__doc__ = "{" + ",".join(allowed) + "}"  # the metavar --help shows
    return read


MODES = ("enforce", "warn", "audit")


# Grouped by the subcommands that take them; each group is added to a subcommand's parser whole.
OPTION_GROUPS: Dict[str, Tuple[Option, ...]] = {
    "logging": (
        Option("--log-level", ("OCIFIT_LOG_LEVEL",), _choice("debug", "info", "warning", "error"), "info",
               "debug, info, warning or error"),
        Option("--log-format", ("OCIFIT_LOG_FORMAT",), _choice("text", "json"), "text",
               "text or json (one object a line)"),
    ),
    "server": (
        Option("--port", ("OCIFIT_PORT",), _port, 8443, "port to serve HTTPS on"),
        Option("--bind", ("OCIFIT_BIND",), _address, "", "address to bind; empty: all, IPv6 and IPv4"),
        Option("--cert", ("OCIFIT_CERT", "TLS_CERT_PATH"), str, "", "PEM certificate chain (reloaded when it changes)"),
        Option("--key", ("OCIFIT_KEY", "TLS_KEY_PATH"), str, "", "PEM private key (reloaded when it changes)"),
        Option("--plain-http", ("OCIFIT_PLAIN_HTTP",), _boolean, False,
               "serve plain HTTP without a certificate (local trials only: the API server needs HTTPS)"),
        Option("--cert-reload-interval", ("OCIFIT_CERT_RELOAD_INTERVAL",), _seconds, 10.0,
               "how often to look for renewed certificate files"),
        Option("--max-connections", ("OCIFIT_MAX_CONNECTIONS",), _positive_int, 1024,
               "concurrent connections; when full, the longest idle one is closed for a new one, else it is refused"),
        Option("--max-connections-per-client", ("OCIFIT_MAX_CONNECTIONS_PER_CLIENT",), _positive_int, 256,
               "concurrent connections from one client address"),
        Option("--handshake-timeout", ("OCIFIT_HANDSHAKE_TIMEOUT",), _seconds, 5.0,
               "seconds a client has to complete the TLS handshake"),
        Option("--request-timeout", ("OCIFIT_REQUEST_TIMEOUT",), _seconds, 10.0,
               "seconds a client has to send a whole request, headers and body (the first: from connecting)"),
        Option("--idle-timeout", ("OCIFIT_IDLE_TIMEOUT",), _seconds, 120.0,
               "seconds an idle keep-alive connection is kept open"),
        Option("--max-body", ("OCIFIT_MAX_BODY",), _positive_int, 3 * MiB + 64 * 1024,
               "largest request body accepted, in bytes (the API server sends at most 3 MiB)"),
        Option("--max-inflight-bytes", ("OCIFIT_MAX_INFLIGHT_BYTES",), _positive_int, 8 * MiB,
               "request body bytes being handled at once; past it, 429 (one body is always taken)"),
        Option("--drain-delay", ("OCIFIT_DRAIN_DELAY",), _seconds_or_zero, 5.0,
               "on SIGTERM, seconds to keep serving, not ready and closing each connection after its reply, while "
               "the API server's endpoints catch up; then in-flight admissions finish (up to --fetch-budget + 2 s)"),
        Option("--metrics-bind", ("OCIFIT_METRICS_BIND",), str, "",
               "also serve GET /metrics over plain HTTP on HOST:PORT (e.g. :9090), for scrapers without the "
               "webhook's certificate; empty: only on the webhook's port"),
    ),
    "nodes": (
        Option("--nodes", ("OCIFIT_NODES",), str, "",
               "NodeList file as `kubectl get nodes -o json` prints it, instead of a cluster"),
        Option("--node-features", ("OCIFIT_NODE_FEATURES",), str, "",
               "with --nodes: NFD's NodeFeatures as `kubectl get nodefeatures -A -o json` prints them (or one "
               "NodeFeature), for specs in NFD's dialect; re-read when it changes"),
        Option("--nfd-namespace", ("OCIFIT_NFD_NAMESPACE",), str, "node-feature-discovery",
               "NFD's own namespace: its NodeFeatures come first when a node has several"),
        Option("--node-feature-namespaces", ("OCIFIT_NODE_FEATURE_NAMESPACES",), str, (),
               "read NodeFeatures only in these namespaces (as nfd-master's nodeFeatureNamespaceSelector); "
               "default: all. Set it where tenants may create NodeFeature objects", many=True),
        Option("--kube-api", ("OCIFIT_KUBE_API",), str, "",
               "Kubernetes API URL (e.g. http://127.0.0.1:8001 from kubectl proxy); default: in-cluster"),
        Option("--kube-token-file", ("OCIFIT_KUBE_TOKEN_FILE",), str, "", "bearer token file for --kube-api"),
        Option("--kube-ca", ("OCIFIT_KUBE_CA",), str, "", "CA bundle for --kube-api"),
        Option("--resync", ("OCIFIT_RESYNC",), _seconds, 600.0, "seconds between full node relists"),
        Option("--watch-failure-threshold", ("OCIFIT_WATCH_FAILURE_THRESHOLD",), _seconds, 120.0,
               "seconds of failing node watch after which /readyz reports not ready"),
    ),
    "admission": (
        Option("--mode", ("OCIFIT_MODE",), _choice(*MODES), "enforce",
               "enforce; warn: a pod enforce would deny is allowed unchanged, with the reason as a warning; audit: "
               "every pod is allowed unchanged, a warning saying what enforce would do. Logs and metrics carry both"),
        Option("--on-disagreement", ("OCIFIT_ON_DISAGREEMENT",), _choice("deny", "pin"), "deny",
               "when the candidate nodes disagree on the image: deny the pod, or pin it to the nodes that fit the "
               "best image (a pod's on-disagreement annotation wins)"),
    ),
    "artifacts": (
        Option("--artifact", ("OCIFIT_ARTIFACTS",), str, (), "REF=PATH: answer image-ref REF from a local spec file",
               many=True),
        Option("--fetch-budget", ("OCIFIT_FETCH_BUDGET",), _seconds, 8.0,
               "seconds an admission may spend fetching its artifact (below the webhook's timeoutSeconds)"),
        Option("--tag-ttl", ("OCIFIT_TAG_TTL",), _seconds, 60.0,
               "seconds a tag's digest is trusted before asking again"),
        Option("--max-stale", ("OCIFIT_MAX_STALE",), _seconds_or_zero, 3600.0,
               "while the registry is down, serve a tag's last good spec up to this many seconds old (0: never)"),
        Option("--cache-size", ("OCIFIT_CACHE_SIZE",), _positive_int, 256, "parsed specs kept, by manifest digest"),
        Option("--registry-config", ("OCIFIT_REGISTRY_CONFIG", "DOCKER_CONFIG"), str, "",
               "Docker config.json with registry credentials (a file, or the directory holding it)"),
        Option("--registry-ca", ("OCIFIT_REGISTRY_CA",), str, "", "CA bundle trusted for registries"),
        Option("--insecure-registry", ("OCIFIT_INSECURE_REGISTRIES",), str, (),
               "host[:port] reached over plain HTTP", many=True),
        Option("--registry-mirror", ("OCIFIT_REGISTRY_MIRRORS",), str, (),
               "HOST=MIRROR: fetch HOST's artifacts from MIRROR", many=True),
        Option("--allowed-registries", ("OCIFIT_ALLOWED_REGISTRIES",), str, (),
               "registries image-refs may name (host[:port], *.suffix); default any on a public address. Naming a "
               "registry also allows its loopback or private address", many=True),
        Option("--registry-proxy", ("OCIFIT_REGISTRY_PROXY",), str, "",
               "HTTP proxy for registry fetches (http://host:port); HTTPS_PROXY and the like are not used"),
        Option("--no-proxy", ("OCIFIT_NO_PROXY", "NO_PROXY"), str, (),
               "hosts (and their subdomains) fetched directly, not through --registry-proxy", many=True),
    ),
}


# Each option's default by its Settings field name: Settings takes its defaults from here, so each is written
# once, in OPTION_GROUPS (a test holds the fields and the options equal).
DEFAULTS: Dict[str, Any] = {o.dest: tuple(o.default) if o.many else o.default
                            for group in OPTION_GROUPS.values() for o in group}


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once from flags and the environment; defaults as in OPTION_GROUPS."""

    log_level: str = DEFAULTS["log_level"]
    log_format: str = DEFAULTS["log_format"]
    port: int = DEFAULTS["port"]
    bind: str = DEFAULTS["bind"]
    cert: str = DEFAULTS["cert"]
    key: str = DEFAULTS["key"]
    plain_http: bool = DEFAULTS["plain_http"]
    cert_reload_interval: float = DEFAULTS["cert_reload_interval"]
    max_connections: int = DEFAULTS["max_connections"]
    max_connections_per_client: int = DEFAULTS["max_connections_per_client"]
    handshake_timeout: float = DEFAULTS["handshake_timeout"]
    request_timeout: float = DEFAULTS["request_timeout"]
    idle_timeout: float = DEFAULTS["idle_timeout"]
    max_body: int = DEFAULTS["max_body"]
    max_inflight_bytes: int = DEFAULTS["max_inflight_bytes"]
    drain_delay: float = DEFAULTS["drain_delay"]
    metrics_bind: str = DEFAULTS["metrics_bind"]
    nodes: str = DEFAULTS["nodes"]
    node_features: str = DEFAULTS["node_features"]
    nfd_namespace: str = DEFAULTS["nfd_namespace"]
    node_feature_namespaces: Tuple[str, ...] = DEFAULTS["node_feature_namespaces"]
    kube_api: str = DEFAULTS["kube_api"]
    kube_token_file: str = DEFAULTS["kube_token_file"]
    kube_ca: str = DEFAULTS["kube_ca"]
    resync: float = DEFAULTS["resync"]
    watch_failure_threshold: float = DEFAULTS["watch_failure_threshold"]
    mode: str = DEFAULTS["mode"]
    on_disagreement: str = DEFAULTS["on_disagreement"]
    artifact: Tuple[str, ...] = DEFAULTS["artifact"]
    fetch_budget: float = DEFAULTS["fetch_budget"]
    tag_ttl: float = DEFAULTS["tag_ttl"]
    max_stale: float = DEFAULTS["max_stale"]
    cache_size: int = DEFAULTS["cache_size"]
    registry_config: str = DEFAULTS["registry_config"]
    registry_ca: str = DEFAULTS["registry_ca"]
    insecure_registry: Tuple[str, ...] = DEFAULTS["insecure_registry"]
    registry_mirror: Tuple[str, ...] = DEFAULTS["registry_mirror"]
    allowed_registries: Tuple[str, ...] = DEFAULTS["allowed_registries"]
    registry_proxy: str = DEFAULTS["registry_proxy"]
    no_proxy: Tuple[str, ...] = DEFAULTS["no_proxy"]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        values: Dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()
                                  if k in names}
        return cls(**values)

    def artifact_files(self) -> Dict[str, str]:
        """The --artifact REF=PATH pairs as a mapping."""
        pairs = {}
        for item in self.artifact:
            ref, sep, path = item.partition("=")
            if not sep or not ref or not path:
                raise ValueError(f"--artifact wants REF=PATH, got {item!r}")
            pairs[ref.strip()] = path.strip()
        return pairs


def _env_default(option: Option) -> Any:
    """The option's value from its environment twin, or its default; exits 2 naming a variable that does not
    parse, as a bad flag would."""
    for name in option.env:
        raw = os.environ.get(name)
        if raw is None or (option.many and not raw.strip()):
            continue
        try:
            if option.many:
                return [option.parse(part.strip()) for part in raw.split(",") if part.strip()]
            return option.parse(raw)
        except argparse.ArgumentTypeError as exc:
            print(f"ocifit: environment variable {name}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return list(option.default) if option.many else option.default


def add_options(parser: argparse.ArgumentParser, *groups: str) -> None:
    """Add the named option groups to a subcommand's parser, each flag defaulting to its env twin; --help shows
    each default and twin."""
    for group_name in groups:
        group = parser.add_argument_group(group_name)
        for option in OPTION_GROUPS[group_name]:
            shown = ",".join(option.default) if option.many else option.default
            if option.parse is _boolean:
                shown = str(shown).lower()
            notes = (f"default: {shown}; " if shown not in ("", ()) else "") + "env " + " or ".join(option.env)
            kwargs: Dict[str, Any] = {"dest": option.dest, "default": _env_default(option),
                                      "help": f"{option.help} ({notes})".replace("%", "%%")}
            if option.parse is _boolean:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif option.many:
                kwargs.update(action="append", type=option.parse, metavar="VALUE")
            else:
                kwargs.update(type=option.parse, metavar=METAVARS.get(option.parse) or (
                    option.parse.__doc__ if (option.parse.__doc__ or "").startswith("{") else
                    option.dest.split("_")[-1].upper()))
            group.add_argument(option.flag, **kwargs)


METAVARS: Dict[Callable[[str], Any], str] = {_seconds: "SECONDS", _seconds_or_zero: "SECONDS", _positive_int: "N",
                                             _port: "PORT", _address: "ADDRESS"}


# ============================================================================================
# Logging, JSON and YAML: log lines that stay one line, a writer thread, untrusted JSON and YAML
# ============================================================================================

_CONTROL = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7F, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
_LOGFMT_SPECIAL = frozenset(' "=\\')


_HAS_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """text with control characters (newlines, ESC, ...) written as escapes: one log line stays one line, and
    nothing a pod or registry says can forge another or steer a terminal."""
    return text.translate(_CONTROL) if _HAS_CONTROL.search(text) else text


def logfmt(pairs: Iterable[Tuple[str, Any]]) -> str:
    """`key=value ...`, leaving out empty values; a value that is not one plain word (spaces, quotes, `=`,
    control characters) and any message is JSON-quoted, so it cannot pass for other fields."""
    return " ".join(logfmt_pair(key, value) for key, value in pairs if value)


def logfmt_pair(key: str, value: Any) -> str:
    """One `key=value` of logfmt (see logfmt)."""
    text = value if isinstance(value, str) else str(value)
    if key != "message" and text.isprintable() and _LOGFMT_SPECIAL.isdisjoint(text) and text:
        return f"{key}={text}"
    return f"{key}={json.dumps(cap_text(text))}"


class AdmissionRecord(logging.LogRecord):
    """One admission's log line, as a LogRecord made cheaply: the request thread only gathers the pod, its
    AdmissionReview uid, the decision and the time taken; the log writer renders `key=value ...` text or a JSON
    object off the request path, and the decision's part is rendered once per decision (shared by every pod
    of a Deployment)."""

    # What LogRecord.__init__ would work out for each record, and admission lines never need; in the instance's
    # own dict, where %-style formats (pytest's, a library user's) look.
    namespace: str
    pod: str
    uid: str
    ms: float
    decision_fields: Dict[str, Any]
    decision_text: Tuple[str, str]
    _FIXED: Dict[str, Any] = {
        "name": "ocifit", "msg": "admission %s", "pathname": "ocifit", "filename": "ocifit", "module": "ocifit",
        "funcName": None, "lineno": 0, "threadName": None, "thread": 0, "processName": None, "process": 0,
        "taskName": None, "stack_info": None, "exc_info": None, "exc_text": None, "msecs": 0.0,
        "relativeCreated": 0.0}

    def __init__(self, namespace: str, pod: str, uid: str, decision: Any, ms: float):  # no super(): see _FIXED
        fields = dict(self._FIXED)
        allowed = decision.allowed
        # the decision's log fields and text, not the decision: a record kept by some handler keeps no patch
        fields.update(namespace=namespace, pod=pod, uid=uid, ms=ms, decision_fields=decision.log_fields,
                      decision_text=decision.log_text, levelno=logging.INFO if allowed else logging.WARNING,
                      levelname="INFO" if allowed else "WARNING", created=time.time(), args=(self,))
        self.__dict__ = fields

    def __str__(self) -> str:
        before, after = self.decision_text
        text = (f"{logfmt_pair('namespace', self.namespace) + ' ' if self.namespace else ''}"
                f"{logfmt_pair('pod', self.pod)} {logfmt_pair('uid', self.uid)} {before} ms={self.ms}")
        return f"{text} {after}" if after else text

    def fields(self) -> Dict[str, Any]:
        """The fields of a structured log entry: the pod, the uid, the decision's own fields, the time taken."""
        return {"namespace": self.namespace, "pod": self.pod, "uid": self.uid, **self.decision_fields,
                "ms": self.ms}


class TextLogFormatter(logging.Formatter):
    """`time LEVEL message`: RFC 3339 UTC time with milliseconds, the message capped and its control characters
    escaped. The time up to the second is made once a second rather than once a line."""

    def __init__(self) -> None:
        super().__init__()
        self._second, self._stamp = -1, ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not isinstance(record, AdmissionRecord):  # an admission line is logfmt: its values are quoted already
            message = escape_controls(cap_text(message))
        line = f"{self.stamp(record.created)} {record.levelname} {message}"
        return line + "\n" + self.formatException(record.exc_info) if record.exc_info else line


class JsonLogFormatter(TextLogFormatter):
    """One JSON object a line: time, level, message, and any `extra` fields passed to the log call; an admission
    line carries its fields under `admission`."""

    STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {"time": self.stamp(record.created), "level": record.levelname.lower(),
                                 "msg": cap_text(record.getMessage())}
        if isinstance(record, AdmissionRecord):
            entry["admission"] = record.fields()
        else:
            entry.update({k: v for k, v in vars(record).items() if k not in self.STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


MAX_NUMBER_DIGITS = 64


MAX_MESSAGE = 4096
MAX_WARNING = 256  # an admission warning's length that the API server keeps whole


def cap_text(text: str, most: int = MAX_MESSAGE) -> str:
    """text cut to at most `most` characters, saying how many more there were: denials and log lines stay
    small whatever a pod or registry puts in them."""
    if len(text) <= most:
        return text
    return text[:most - 40] + f" … {len(text) - (most - 40)} more characters"


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:  # CPython before 3.11 converts long digit strings in quadratic time
        raise ValueError(f"number with {len(text)} digits")
    return int(text)


_DECODERS: Dict[Any, json.JSONDecoder] = {}


def load_json(data: Any, object_hook: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Any:
    """json.loads for untrusted input: numbers longer than 64 digits are refused, nesting errors are ValueError."""
    decoder = _DECODERS.get(object_hook)
    if decoder is None:  # built once per hook: json.loads with arguments builds a decoder on every call
        decoder = _DECODERS[object_hook] = json.JSONDecoder(parse_int=_bounded_int, object_hook=object_hook)
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8-sig" if data[:3] == b"\xef\xbb\xbf" else "utf-8")
    try:
        return decoder.decode(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# ---- YAML: the subset specs use ----------------------------------------------------------------

# ---------------------------------------------------------------------------
# Strict YAML-subset parser (stdlib only; CPython 3.9+).
#
# load_yaml(text) returns exactly what PyYAML's yaml.safe_load(text) returns
# for the supported subset and raises YAMLError ("line L, column C: ...") for
# everything else.  Supported: one document (optional leading '---', optional
# trailing '...'), block mappings/sequences (incl. compact "- k: v" and
# indentless "key:\n- item"), flow collections, plain / single-quoted /
# double-quoted scalars (with PyYAML's line folding), comments, and YAML 1.1
# implicit types exactly as PyYAML's SafeLoader resolves them.
# Refused: anchors, aliases, tags, directives, block scalars (| >), complex
# keys (?), merge keys (<<), timestamps, '=', multi-line plain scalars,
# single-pair mappings inside flow sequences, empty keys, multiple documents,
# tabs outside quoted scalars/comments, NEL/LS/PS line breaks, inner BOMs.
# Deliberate differences from PyYAML: duplicate mapping keys are an error
# (PyYAML keeps the last value); so is exceeding the limits below (PyYAML has
# none; numbers over 4300 characters would otherwise convert slowly).
# ---------------------------------------------------------------------------

YAML_MAX_BYTES = 1 << 20  # UTF-8 size of the input
YAML_MAX_DEPTH = 64  # nested collections
YAML_MAX_NODES = 100000  # scalars + collections
YAML_MAX_NUMBER_LEN = 4300  # longest plain scalar converted to int/float


class YAMLError(ValueError):
    """Parse error; str(err) is 'line L, column C: problem' (1-based)."""

    def __init__(self, problem: str, line: int, column: int) -> None:
        super().__init__("line %d, column %d: %s" % (line, column, problem))
        self.problem, self.line, self.column = problem, line, column

    def __reduce__(self) -> Any:
        return type(self), (self.problem, self.line, self.column)


# Characters PyYAML's reader rejects, and line breaks we do not support.
_YAML_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
    "|[\x85\u2028\u2029\ufeff]"
)
_YAML_SPACES = re.compile(" *")
_YAML_BLANKS = re.compile("[ \t]*")
# One "chunk" of a plain scalar: runs of non-space characters where ':' is
# allowed only if not followed by a space (block) or a flow indicator (flow).
_YAML_BLOCK_CHUNK = re.compile(r"[^ \t\n\0:]*(?::(?=[^ \t\n\0])[^ \t\n\0:]*)*")
_YAML_FLOW_CHUNK = re.compile(
    r"[^ \t\n\0:,?\[\]{}]*(?::(?=[^ \t\n\0,\[\]{}])[^ \t\n\0:,?\[\]{}]*)*"
)
_YAML_QUOTED_RUN = re.compile("[^'\"\\\\ \t\n\0]+")
_YAML_ESCAPES = {
    "0": "\0", "a": "\x07", "b": "\x08", "t": "\t", "\t": "\t", "n": "\n",
    "v": "\x0b", "f": "\x0c", "r": "\r", "e": "\x1b", " ": " ", '"': '"',
    "\\": "\\", "/": "/", "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029",
}
_YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_YAML_HEX = re.compile("[0-9A-Fa-f]*")

# PyYAML's YAML 1.1 implicit resolvers (yaml/resolver.py), in the same order.
_YAML_BOOL = re.compile(
    r"(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)\Z"
)
_YAML_FLOAT = re.compile(
    r"""(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))\Z""",
    re.X,
)
_YAML_INT = re.compile(
    r"""(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+
    |[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)\Z""",
    re.X,
)
_YAML_NULL = re.compile(r"(?:~|null|Null|NULL|)\Z")
_YAML_TIMESTAMP = re.compile(
    r"""(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
    |[0-9][0-9][0-9][0-9] -[0-9][0-9]? -[0-9][0-9]?
     (?:[Tt]|[ \t]+)[0-9][0-9]?
     :[0-9][0-9] :[0-9][0-9] (?:\.[0-9]*)?
     (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)\Z""",
    re.X,
)
_YAML_INF = float("inf")
_YAML_NAN = -_YAML_INF / _YAML_INF  # one shared object, like PyYAML
_YAML_BAD_START = {
    "&": "anchors (&) are not supported",
    "*": "aliases (*) are not supported",
    "!": "tags (!) are not supported",
    "|": "block scalars (| and >) are not supported",
    ">": "block scalars (| and >) are not supported",
    "%": "directives (%) are not supported",
    "?": "complex keys (?) are not supported",
    "@": "reserved indicator '@' cannot start a value",
    "`": "reserved indicator '`' cannot start a value",
    ":": "empty keys are not supported",
    "-": "block sequence entries are not allowed here",
    "\0": "unexpected end of input",
    "\t": "tabs are only allowed inside quoted scalars and comments",
}


def _yaml_number(text: str) -> Any:
    """Construct an int/float exactly like PyYAML's SafeConstructor."""
    value = text.replace("_", "")
    is_float = _YAML_FLOAT.match(text) is not None
    if is_float:
        value = value.lower()
    sign = -1 if value[0] == "-" else 1
    if value[0] in "+-":
        value = value[1:]
    if is_float:
        if value == ".inf":
            return sign * _YAML_INF
        if value == ".nan":
            return _YAML_NAN
    elif value == "0":
        return 0
    elif value.startswith("0b"):
        return sign * int(value[2:], 2)
    elif value.startswith("0x"):
        return sign * int(value[2:], 16)
    elif value[0] == "0":
        return sign * int(value, 8)
    if ":" in value:  # sexagesimal (base 60)
        base, total = 1, 0.0 if is_float else 0
        for part in reversed(value.split(":")):
            total += (float(part) if is_float else int(part)) * base
            base *= 60
        return sign * total
    return sign * (float(value) if is_float else int(value))


def _yaml_match(pattern: "re.Pattern[str]", s: str, pos: int, end: Optional[int] = None) -> "re.Match[str]":
    """A match of a pattern that always matches (it may match nothing)."""
    m = pattern.match(s, pos) if end is None else pattern.match(s, pos, end)
    assert m is not None
    return m


def _yaml_end(pattern: "re.Pattern[str]", s: str, pos: int) -> int:
    return _yaml_match(pattern, s, pos).end()


class _YamlParser:
    """Recursive-descent parser over the whole text; self.pos is the cursor."""

    def __init__(self, text: str) -> None:
        self.s = text + "\0"  # sentinel: s[pos] is valid up to len(text)
        self.n = len(text)
        self.pos = 0
        self.depth = 0
        self.nodes = 0
        self.last_plain_end = -1

    # -- helpers ----------------------------------------------------------
    def error(self, problem: str, pos: int = -1) -> YAMLError:
        p = self.pos if pos < 0 else pos
        line_start = self.s.rfind("\n", 0, p) + 1
        return YAMLError(problem, self.s.count("\n", 0, p) + 1, p - line_start + 1)

    def col(self, p: int) -> int:
        return p - (self.s.rfind("\n", 0, p) + 1)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > YAML_MAX_DEPTH:
            raise self.error("nesting deeper than %d levels" % YAML_MAX_DEPTH)
        self.count_node()

    def count_node(self) -> None:
        self.nodes += 1
        if self.nodes > YAML_MAX_NODES:
            raise self.error("more than %d nodes" % YAML_MAX_NODES)

    def skip_spaces(self) -> None:
        self.pos = p = _yaml_end(_YAML_SPACES, self.s, self.pos)
        if self.s[p] == "\t":
            if not self.s[self.s.rfind("\n", 0, p) + 1 : p].strip(" "):
                raise self.error("tabs are not allowed for indentation")
            raise self.error("tabs are only allowed inside quoted scalars and comments")

    def skip_comment(self) -> None:
        if self.s[self.pos] == "#":
            p = self.s.find("\n", self.pos)
            self.pos = self.n if p < 0 else p

    def end_line(self) -> None:
        """Consume trailing spaces, an optional comment and the line break."""
        self.skip_spaces()
        self.skip_comment()
        if self.s[self.pos] == "\n":
            self.pos += 1
        elif self.pos < self.n:
            raise self.error("unexpected %r after the value" % self.s[self.pos])

    def next_content(self) -> int:
        """Skip blank/comment lines; return the next content's column or -1 at the end."""
        while True:
            self.skip_spaces()
            self.skip_comment()
            if self.s[self.pos] != "\n":
                return -1 if self.pos >= self.n else self.col(self.pos)
            self.pos += 1

    def at_marker(self) -> str:
        """Return '---' or '...' if a document marker starts at self.pos."""
        s, p = self.s, self.pos
        if s.startswith(("---", "..."), p) and s[p + 3] in " \t\n\0" and self.col(p) == 0:
            return s[p : p + 3]
        return ""

    def at_indicator(self, ch: str) -> bool:
        """'-' or ':' followed by white space or the end (block context)."""
        return self.s[self.pos] == ch and self.s[self.pos + 1] in " \t\n\0"

    def unexpected(self, what: str) -> YAMLError:
        gap = self.s[self.last_plain_end : self.pos]
        if self.last_plain_end >= 0 and "\n" in gap and not gap.strip(" \n"):
            return self.error("multi-line plain scalars are not supported")
        return self.error(what)

    def check_key(self, start: int, kind: str) -> None:
        """Validate an implicit key spanning start..self.pos (the ':')."""
        if kind == "flow":
            raise self.error("collections cannot be mapping keys", start)
        if self.s.find("\n", start, self.pos) >= 0:
            raise self.error("mapping keys must be on a single line", start)
        if self.pos - start > 1024:
            raise self.error("mapping keys longer than 1024 characters are not supported", start)

    def store(self, mapping: Dict[Any, Any], key: Any, value: Any, start: int) -> None:
        if key in mapping:
            raise self.error("duplicate mapping key %r" % (key,), start)
        mapping[key] = value

    # -- document and block structure --------------------------------------
    def parse_document(self) -> Any:
        value = None
        col = self.next_content()
        if col == 0 and self.s[self.pos] == "%":
            raise self.error("directives (%) are not supported")
        if self.at_marker() == "---":
            self.pos += 3
            self.skip_spaces()
            if self.s[self.pos] not in "#\n\0":
                value = self.parse_inline_value()
            else:
                self.end_line()
                if self.next_content() >= 0 and not self.at_marker():
                    value = self.parse_block_node()
        elif col >= 0:
            if self.at_marker():
                raise self.error("document marker %r without a document" % self.at_marker())
            value = self.parse_block_node()
        col = self.next_content()
        if col >= 0 and self.at_marker() == "...":
            self.pos += 3
            self.end_line()
            if self.next_content() >= 0:
                raise self.error("content after the document end marker '...'")
        elif col >= 0:
            if self.at_marker() == "---":
                raise self.error("multiple documents are not supported")
            raise self.unexpected("unexpected content (wrong indentation?)")
        return value

    def parse_block_node(self) -> Any:
        """Parse the block node at self.pos (a line's first content, or after '- ')."""
        col = self.col(self.pos)
        if self.at_indicator("-"):
            return self.parse_block_sequence(col)
        start = self.pos
        value, kind = self.parse_node(flow=False)
        self.skip_spaces()
        if self.at_indicator(":"):
            return self.parse_block_mapping(col, start, value, kind)
        self.end_line()
        return value

    def parse_inline_value(self) -> Any:
        """A scalar or flow collection filling the rest of the line."""
        value, _ = self.parse_node(flow=False)
        self.skip_spaces()
        if self.at_indicator(":"):
            raise self.error("mapping values are not allowed here")
        self.end_line()
        return value

    def parse_indented_value(self, col: int, indentless: bool) -> Any:
        """The value after 'key:' or '-' ending its line: on the next lines, or null."""
        ind = self.next_content()
        if ind > col:
            return self.parse_block_node()
        if indentless and ind == col and self.at_indicator("-"):
            return self.parse_block_sequence(col)
        return None

    def parse_block_mapping(self, col: int, start: int, key: Any, kind: str) -> Dict[Any, Any]:
        self.enter()
        result: Dict[Any, Any] = {}
        while True:
            self.check_key(start, kind)
            self.pos += 1  # ':'
            self.skip_spaces()
            if self.s[self.pos] in "#\n\0":
                self.end_line()
                value = self.parse_indented_value(col, indentless=True)
            else:
                value = self.parse_inline_value()
            self.store(result, key, value, start)
            ind = self.next_content()
            if ind < col or self.at_marker():
                self.last_plain_end = -1  # a dedent ends any plain scalar
                break
            if ind > col:
                raise self.unexpected("unexpected indentation")
            start = self.pos
            if self.at_indicator("-"):
                raise self.error("expected a mapping key, found a sequence entry")
            key, kind = self.parse_node(flow=False)
            self.skip_spaces()
            if not self.at_indicator(":"):
                raise self.error("expected ':' after the mapping key")
        self.depth -= 1
        return result

    def parse_block_sequence(self, col: int) -> List[Any]:
        self.enter()
        result: List[Any] = []
        while True:
            self.pos += 1  # '-'
            self.skip_spaces()
            if self.s[self.pos] in "#\n\0":
                self.end_line()
                result.append(self.parse_indented_value(col, indentless=False))
            else:
                result.append(self.parse_block_node())
            ind = self.next_content()
            if ind < col or self.at_marker() or (ind == col and not self.at_indicator("-")):
                self.last_plain_end = -1
                break
            if ind > col:
                raise self.unexpected("unexpected indentation")
        self.depth -= 1
        return result

    # -- nodes --------------------------------------------------------------
    def parse_node(self, flow: bool) -> Tuple[Any, str]:
        """Parse a flow collection or scalar; return (value, kind)."""
        s, p = self.s, self.pos
        ch = s[p]
        if ch in "[{":
            return self.parse_flow_collection(), "flow"
        if ch in "\"'":
            return self.parse_quoted(), "quoted"
        if ch not in "\0 \t\n-?:,[]{}#&*!|>'\"%@`" or (
            s[p + 1] not in "\0 \t\n" and (ch == "-" or (not flow and ch in "?:"))
        ):
            return self.parse_plain(flow), "plain"
        raise self.error(_YAML_BAD_START.get(ch, "unexpected %r" % ch))

    def parse_flow_collection(self) -> Any:
        s = self.s
        is_map = s[self.pos] == "{"
        close = "}" if is_map else "]"
        self.enter()
        self.pos += 1
        result: Any = {} if is_map else []
        first = True
        while True:
            self.skip_flow_space()
            if s[self.pos] == close:
                break
            if not first:
                if s[self.pos] != ",":
                    raise self.unexpected("expected ',' or %r" % close)
                self.pos += 1
                self.skip_flow_space()
                if s[self.pos] == close:
                    break
            first = False
            start = self.pos
            node, kind = self.parse_node(flow=True)
            self.skip_spaces()
            if not is_map:
                if s[self.pos] == ":":
                    raise self.error("mappings inside flow sequences are not supported")
                result.append(node)
                continue
            value = None
            if s[self.pos] == ":":
                self.check_key(start, kind)
                self.pos += 1
                self.skip_flow_space()
                if s[self.pos] not in ",}":
                    value = self.parse_node(flow=True)[0]
            elif kind == "flow":
                raise self.error("collections cannot be mapping keys", start)
            self.store(result, node, value, start)
        self.pos += 1
        self.depth -= 1
        return result

    def skip_flow_space(self) -> None:
        """Skip spaces, comments and line breaks inside a flow collection."""
        while True:
            self.skip_spaces()
            self.skip_comment()
            if self.s[self.pos] != "\n":
                break
            self.pos += 1
            if self.at_marker():
                raise self.error("document markers are not allowed inside flow collections")
        if self.pos >= self.n:
            raise self.error("unexpected end of input inside a flow collection")

    def parse_plain(self, flow: bool) -> Any:
        """A single-line plain scalar, resolved like PyYAML's SafeLoader."""
        s, chunk = self.s, _YAML_FLOW_CHUNK if flow else _YAML_BLOCK_CHUNK
        start = end = p = self.pos
        while True:
            m = _yaml_match(chunk, s, p)
            if m.end() == p:
                break
            end = p = m.end()
            q = _yaml_end(_YAML_SPACES, s, p)
            if q == p or s[q] == "#":
                break
            p = q
        self.pos = self.last_plain_end = end
        self.count_node()
        return self.resolve(s[start:end], start)

    def resolve(self, text: str, start: int) -> Any:
        if _YAML_BOOL.match(text):
            return text.lower() in ("yes", "true", "on")
        if _YAML_FLOAT.match(text) or _YAML_INT.match(text):
            if len(text) > YAML_MAX_NUMBER_LEN:
                raise self.error("numbers longer than %d characters are not supported"
                                 % YAML_MAX_NUMBER_LEN, start)
            try:
                return _yaml_number(text)
            except ValueError:
                raise self.error("invalid number %r" % text, start) from None
        if text == "<<":
            raise self.error("merge keys (<<) are not supported", start)
        if _YAML_NULL.match(text):
            return None
        if _YAML_TIMESTAMP.match(text):
            raise self.error("timestamps are not supported (quote the value)", start)
        if text == "=":
            raise self.error("the value indicator '=' is not supported", start)
        return text

    def parse_quoted(self) -> str:
        """A single- or double-quoted scalar with PyYAML's escapes and line folding."""
        s = self.s
        start = self.pos
        quote = s[start]
        double = quote == '"'
        p = start + 1
        chunks: List[str] = []
        while True:
            m = _YAML_QUOTED_RUN.match(s, p)
            if m:
                chunks.append(m.group())
                p = m.end()
            ch = s[p]
            if ch == quote:
                if double or s[p + 1] != "'":
                    break
                chunks.append("'")
                p += 2
            elif ch in "'\"" or (ch == "\\" and not double):
                chunks.append(ch)
                p += 1
            elif ch == "\\":
                ch = s[p + 1]
                p += 2
                if ch in _YAML_ESCAPES:
                    chunks.append(_YAML_ESCAPES[ch])
                elif ch in _YAML_HEX_ESCAPES:
                    size = _YAML_HEX_ESCAPES[ch]
                    digits = _yaml_match(_YAML_HEX, s, p, p + size).group()
                    if len(digits) != size:
                        raise self.error("expected %d hex digits in escape" % size, p)
                    if int(digits, 16) > 0x10FFFF:
                        raise self.error("escape \\%s%s is out of range" % (ch, digits), p - 2)
                    chunks.append(chr(int(digits, 16)))
                    p += size
                elif ch == "\n":
                    p = self.fold_breaks(p, chunks)
                elif p > self.n:
                    raise self.error("unterminated quoted scalar", start)
                else:
                    raise self.error("unknown escape character %r" % ch, p - 1)
            else:  # white space, line break or end of input
                q, p = p, _yaml_end(_YAML_BLANKS, s, p)
                if s[p] == "\n":
                    breaks: List[str] = []
                    p = self.fold_breaks(p + 1, breaks)
                    chunks.extend(breaks or [" "])
                elif p >= self.n:
                    raise self.error("unterminated quoted scalar", start)
                else:
                    chunks.append(s[q:p])
        self.pos = p + 1
        self.count_node()
        return "".join(chunks)

    def fold_breaks(self, p: int, chunks: List[str]) -> int:
        """At a line start inside a quoted scalar: skip indentation, keep empty lines."""
        s = self.s
        while True:
            if s.startswith(("---", "..."), p) and s[p + 3] in " \t\n\0":
                raise self.error("document marker inside a quoted scalar", p)
            p = _yaml_end(_YAML_BLANKS, s, p)
            if s[p] != "\n":
                return p
            chunks.append("\n")
            p += 1


def load_yaml(text: str) -> Any:
    """Parse one document of the YAML subset into dict/list/str/int/float/bool/None.

    Matches yaml.safe_load for supported input, else raises YAMLError.
    """
    if not isinstance(text, str):
        raise TypeError("load_yaml() expects str, not %s" % type(text).__name__)
    if len(text) > YAML_MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > YAML_MAX_BYTES:
        raise _YamlParser(text[:YAML_MAX_BYTES]).error(
            "document larger than %d bytes" % YAML_MAX_BYTES, min(len(text), YAML_MAX_BYTES))
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parser = _YamlParser(text)
    bad = _YAML_NON_PRINTABLE.search(text)
    if bad:
        ch = bad.group()
        what = "line break" if ch in "\x85\u2028\u2029" else (
            "byte order mark" if ch == "\ufeff" else "non-printable character")
        raise parser.error("unsupported %s U+%04X" % (what, ord(ch)), bad.start())
    return parser.parse_document()

# ---- end of YAML ---------------------------------------------------------------------------


class _EnqueueHandler(logging.Handler):
    """Hands records to the writer thread as they are: formatting and the write happen off the request path."""

    def __init__(self, writer: "LogWriter"):
        super().__init__()
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        """Queue the record: the queue is thread-safe, so no handler lock is taken (one less per admission)."""
        if self.filters and not self.filter(record):
            return False
        self.writer.put(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # for a caller that skips handle()
        self.writer.put(record)


class LogWriter(threading.Thread):
    """Writes queued log records in batches: at most one wake-up and one write() per interval, however many
    admissions were logged meanwhile, so logging costs a request thread a queue put. If stderr stalls, at most
    `limit` records wait; newer ones are dropped and counted, and the writer says how many once it can write
    again, so a blocked log pipe costs log lines, never memory or admissions."""

    STOP = logging.makeLogRecord({"msg": "stop"})

    def __init__(self, handler: logging.StreamHandler, interval: float = 0.05, limit: int = 10000):
        super().__init__(name="log-writer", daemon=True)
        self.handler, self.interval, self.limit = handler, interval, limit
        self.records: "queue.SimpleQueue[logging.LogRecord]" = queue.SimpleQueue()
        self.enqueue = _EnqueueHandler(self)
        self.dropped = self._dropped_reported = 0

    def put(self, record: logging.LogRecord) -> None:
        """Queue a record, or count it dropped when `limit` records are waiting."""
        if self.records.qsize() >= self.limit:
            self.dropped += 1  # a count for the operator; an increment lost to a thread race costs nothing
        else:
            self.records.put(record)

    def run(self) -> None:
        while self._write(self._gather()):
            pass

    def _gather(self) -> List[logging.LogRecord]:
        batch = [self.records.get()]
        time.sleep(self.interval)  # let a batch gather
        while True:
            try:
                batch.append(self.records.get_nowait())
            except queue.Empty:
                return batch

    def _write(self, batch: List[logging.LogRecord]) -> bool:
        """Write a batch; False once it held STOP. The batch is let go on return, not kept until the next line."""
        formatter = self.handler.formatter
        assert formatter is not None
        lines = []
        dropped = self.dropped - self._dropped_reported
        if dropped:
            self._dropped_reported += dropped
            lines.append(formatter.format(logging.makeLogRecord({
                "name": log.name, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"dropped {dropped} log lines: stderr was not taking them as fast as they came"})) + "\n")
        for record in batch:
            if record is not self.STOP:
                try:
                    lines.append(formatter.format(record) + "\n")
                except Exception:
                    self.handler.handleError(record)
        try:
            self.handler.stream.write("".join(lines))
            self.handler.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nothing left to tell
        return not any(record is self.STOP for record in batch)

    def stop(self) -> None:
        self.records.put(self.STOP)
        self.join(timeout=5)


_log_writer: Optional[LogWriter] = None


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr from one writer thread, so a slow log pipe or lock never holds up an admission."""
    global _log_writer
    # The logging HOWTO's optimisations: no caller frame lookup, no process fields, on every record.
    logging._srcfile = None  # documented in the logging HOWTO's "Optimization"
    logging.logProcesses = logging.logMultiprocessing = logging.logThreads = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else TextLogFormatter())
    if _log_writer is not None:
        _log_writer.stop()
    _log_writer = LogWriter(handler)
    _log_writer.start()
    root = logging.getLogger()
    root.handlers[:] = [_log_writer.enqueue]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def flush_logging() -> None:
    """Write out every queued log record and take the writer away (at exit, and before a subcommand returns)."""
    global _log_writer
    if _log_writer is not None:
        _log_writer.stop()
        root = logging.getLogger()
        if _log_writer.enqueue in root.handlers:
            root.removeHandler(_log_writer.enqueue)
        _log_writer = None


# ============================================================================================
# Shared machinery: bounded caches, watched files, socket deadlines, Retry-After
# ============================================================================================

_REQUIRED = object()


class WatchedFile:
    """What a file (or a few, read together) holds, read again when it changes: a ConfigMap or Secret update, a
    renewed certificate. One background thread looks for changes, so no request thread ever reads a file.

    `load(contents)` turns the bytes of each path into the value its users read as `.value`. A change that fails
    to load keeps the last good value, sets `.error` and is logged once. Reading at construction must succeed
    (ValueError otherwise) unless `missing` gives the value for files that are not there."""

    def __init__(self, paths: Sequence[str], load: Callable[[List[bytes]], Any], what: str, interval: float = 2.0,
                 cap: int = 64 * MiB, missing: Any = _REQUIRED):
        self.paths, self.load, self.what, self.interval, self.cap = tuple(paths), load, what, interval, cap
        self.missing = missing
        self.value: Any = None
        self.error = ""
        self._stamp: Optional[tuple] = None
        self._failed: Optional[tuple] = None
        self._due = 0.0
        self.check(initial=True)
        _FILE_WATCHER.add(self)

    def _stamps(self) -> tuple:
        stamps: List[Optional[Tuple[int, int, int]]] = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _read(self, path: str) -> bytes:
        with open(path, "rb") as fh:
            data = fh.read(self.cap + 1)
        if len(data) > self.cap:
            raise ValueError(f"{path} is larger than {self.cap} bytes")
        return data

    def check(self, initial: bool = False) -> bool:
        """Load the files if they changed since the last look; True when the value changed."""
        stamp = self._stamps()
        if not initial and stamp in (self._stamp, self._failed):
            return False
        try:
            if None in stamp and self.missing is not _REQUIRED:
                value = self.missing
            else:
                value = self.load([self._read(path) for path in self.paths])
        except (OSError, ValueError) as exc:
            self._failed = stamp
            why = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
            self.error = f"cannot read {self.what} from {', '.join(self.paths)}: {why}"
            if initial:
                raise ValueError(self.error) from None
            log.error("%s; keeping what was read before", self.error)
            return False
        self._stamp, self._failed, self.value, self.error = stamp, None, value, ""
        if not initial:
            log.info("read %s again from %s", self.what, ", ".join(self.paths))
        return True

    def stop(self) -> None:
        _FILE_WATCHER.discard(self)


class _FileWatcher:
    """The one thread that looks for changed files, each at its own interval; it holds files weakly, so a
    source that is dropped stops being watched."""

    def __init__(self) -> None:
        self._files: "weakref.WeakSet[WatchedFile]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def add(self, watched: WatchedFile) -> None:
        with self._lock:
            self._files.add(watched)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="file-watcher", daemon=True)
                self._thread.start()

    def discard(self, watched: WatchedFile) -> None:
        with self._lock:
            self._files.discard(watched)

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                due = [f for f in self._files if f._due <= now]
            for watched in due:
                watched._due = now + watched.interval
                try:
                    watched.check()
                except Exception:  # a loader's bug must not end the watching of every file
                    log.exception("reading %s failed", watched.what)


_FILE_WATCHER = _FileWatcher()


@dataclass(frozen=True)
class CacheBound:
    """How much one cache may hold: entries, bytes in all (as its owner reckons them), and the largest entry
    it keeps at all (a larger one is computed for its request and let go)."""

    entries: int
    bytes: int
    largest: int


# Every cache the process keeps, in one place, so an operator can see what memory it may hold beyond the node
# view itself. Per-snapshot caches live as long as their node snapshot (until the next node change).
CACHE_BOUNDS: Dict[str, CacheBound] = {
    "mutations": CacheBound(512, 8 * MiB, 256 * 1024),  # patch + reply per distinct outcome, shared by pods alike
    "decisions": CacheBound(256, 4 * MiB, 64 * 1024),  # per snapshot: (spec, placement) -> choice or denial
    "partitions": CacheBound(64, 4 * MiB, 512 * 1024),  # per snapshot: label keys -> groups of nodes alike
    "specs": CacheBound(256, 64 * MiB, 16 * MiB),  # parsed specs by manifest digest (--cache-size entries)
    "tags": CacheBound(1024, MiB, 4096),  # image-ref -> (digest, when resolved), for --tag-ttl and --max-stale
    "hits": CacheBound(1024, MiB, 4096),  # image-ref or candidate text -> its cache-hit answer, made once
    "failures": CacheBound(1024, 4 * MiB, 8192),  # image-ref -> its last failure's text, for a few seconds
    "no-referrers-api": CacheBound(1024, 256 * 1024, 1024),  # registry and repository -> when it said "no API"
}
# Also bounded, by entries, where they are made: parsed references (1,024, at most 1 KiB each). Label and feature
# sets shared by nodes alike (SHARED) are held weakly, so they take no memory beyond what nodes hold.


class BoundedCache:
    """A map bounded by a CacheBound, evicting as a segmented LRU: an entry starts on probation and is protected
    once asked for again, and eviction takes the least recently used entry on probation first. So a flood of
    entries that nobody asks for twice (a tenant's junk references) cycles through probation and cannot push
    out what serves admissions (and stands in for a registry that is down). Thread-safe; `size` is what an
    entry holds, in bytes, as measured or bounded by its owner."""

    PROTECTED_SHARE = 0.8  # of the entries and bytes, at most, in the protected segment

    def __init__(self, bound: CacheBound):
        self.bound = bound
        self._probation: "collections.OrderedDict[Any, Tuple[Any, int]]" = collections.OrderedDict()
        self._protected: "collections.OrderedDict[Any, Tuple[Any, int]]" = collections.OrderedDict()
        self._bytes = [0, 0]  # probation, protected
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            entry = self._protected.get(key)
            if entry is not None:
                self._protected.move_to_end(key)
                return entry[0]
            entry = self._probation.pop(key, None)
            if entry is None:
                return default
            self._bytes[0] -= entry[1]
            self._protected[key] = entry
            self._bytes[1] += entry[1]
            while len(self._protected) > self.bound.entries * self.PROTECTED_SHARE \
                    or self._bytes[1] > self.bound.bytes * self.PROTECTED_SHARE:
                demoted, (value, size) = self._protected.popitem(last=False)
                self._bytes[1] -= size
                self._probation[demoted] = (value, size)
                self._bytes[0] += size
            return entry[0]

    def put(self, key: Any, value: Any, size: int = 64) -> None:
        """Keep value under key (on probation, or where it was), evicting past the bounds; too large: not kept."""
        if size > self.bound.largest:
            self.pop(key)
            return
        with self._lock:
            segment = 1 if key in self._protected else 0
            store = (self._probation, self._protected)[segment]
            old = store.pop(key, None)
            if old is not None:
                self._bytes[segment] -= old[1]
            store[key] = (value, size)
            self._bytes[segment] += size
            while len(self) > self.bound.entries or sum(self._bytes) > self.bound.bytes:
                victims = 0 if self._probation else 1
                self._bytes[victims] -= (self._probation, self._protected)[victims].popitem(last=False)[1][1]

    def pop(self, key: Any) -> Any:
        with self._lock:
            for segment, store in enumerate((self._probation, self._protected)):
                entry = store.pop(key, None)
                if entry is not None:
                    self._bytes[segment] -= entry[1]
                    return entry[0]
            return None

    def __contains__(self, key: Any) -> bool:
        return key in self._protected or key in self._probation

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)


_SHARED_CODE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                types.FrameType, types.TracebackType)


def footprint(root: Any) -> int:
    """The bytes an object holds, with all it refers to (each object once; classes and modules not), as caches
    charge their entries: measured, not guessed."""
    seen: Set[int] = set()
    stack, total = [root], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _SHARED_CODE):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        stack.extend(gc.get_referents(item))
    return total


class InFlight:
    """Requests in flight and the bytes of their bodies, within a budget: request bodies the server reads, and
    registry replies. A large body that would take the total past the budget waits for room until its deadline,
    or (no deadline: the server answers 429 with Retry-After) is turned away at once, unless nothing else is in
    flight: memory for bodies stays bounded, one body of the largest size is always taken, and bodies of
    ordinary size (up to SMALL) always are, so large ones held open cannot starve ordinary ones."""

    SMALL = 64 * 1024  # an API server's review of an ordinary pod, a manifest: never held up by large ones

    def __init__(self, budget: int):
        self.budget, self.requests, self.bytes = budget, 0, 0
        self._room = threading.Condition()

    def take(self, size: int, deadline: float = 0.0) -> bool:
        with self._room:
            while size > self.SMALL and self.requests and self.bytes + size > self.budget:
                if not self._room.wait(max(0.0, deadline - time.monotonic())):
                    return False
            self.requests, self.bytes = self.requests + 1, self.bytes + size
            return True

    def give_back(self, size: int) -> None:
        with self._room:
            self.requests, self.bytes = self.requests - 1, self.bytes - size
            self._room.notify_all()


class SocketReaper:
    """Shuts down sockets whose deadline has passed, so that a thread blocked on one wakes at once.

    This gives a deadline to a whole exchange (a TLS handshake with a request's headers and body, a registry
    fetch), which per-read timeouts cannot: a peer sending a byte just before each timeout would hold a thread
    for ever. Deadlines are checked every `interval` seconds. The reaper shuts a socket down rather than closing
    it, and under the same lock that forget() takes, so the owner closes its own socket and a descriptor is
    never reused under it."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self._entries: Dict[Any, Tuple[float, socket.socket]] = {}
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._idle = False  # the reaper thread waits for a first entry

    def watch(self, key: Any, sock: socket.socket, deadline: float) -> None:
        """Shut `sock` down at `deadline` (monotonic) unless forget(key) comes first; a later call moves it."""
        with self._lock:
            self._entries[key] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="socket-reaper", daemon=True)
                self._thread.start()
            elif self._idle:
                self._lock.notify()

    def forget(self, key: Any) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._entries:
                    self._idle = True
                    self._lock.wait()
                self._idle = False
                now = time.monotonic()
                for key in [k for k, (deadline, _) in self._entries.items() if deadline <= now]:
                    _, sock = self._entries.pop(key)
                    try:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the socket's own, not SSLSocket's
                    except OSError:
                        pass
            time.sleep(self.interval)


REAPER = SocketReaper()


_Shared = TypeVar("_Shared")


class SharedPool:
    """One shared copy of each distinct value that some node still holds (a label set, a feature set), so
    thousands of nodes of one kind hold one copy. Values are found by the hash of their content and checked
    equal, and held weakly: a value is forgotten with the last node that holds it, so churn leaves nothing
    behind. Two values whose hashes collide simply share less."""

    def __init__(self) -> None:
        self._table: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()

    def share(self, content_hash: int, value: _Shared) -> _Shared:
        found = self._table.get(content_hash)
        if found is not None and found == value:
            return cast(_Shared, found)
        self._table[content_hash] = value
        return value

    def __len__(self) -> int:
        return len(self._table)


class StringMap(Dict[str, str]):
    """A shared map of strings (a node's common labels, an attribute set, an instance); weakly referable."""

    __slots__ = ("__weakref__",)


class InstanceList(List[StringMap]):
    """A shared list of instances (attribute maps), never changed once made; weakly referable."""

    __slots__ = ("__weakref__",)


SHARED = SharedPool()


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


# ============================================================================================
# Metrics: Prometheus text format, from counters, histograms and gauges read at scrape time
# ============================================================================================

class Metrics:
    """Counters, gauges and histograms in Prometheus text format (version 0.0.4); thread-safe, no dependencies.
    Every documented series is there from the start, at 0 until its first event; values are exact (counters
    as integers, other values with repr's precision)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    HELP: Dict[str, Tuple[str, str]] = {
        "ocifit_build_info": ("gauge", "ocifit's version and the Python running it; always 1."),
        "ocifit_admissions_total": ("counter", "Admission reviews answered: the mode, and what enforce does (outcome, "
                                    "reason)."),
        "ocifit_admission_duration_seconds": ("histogram", "Time to answer one admission review."),
        "ocifit_admissions_in_flight": ("gauge", "Admission requests being read or answered now."),
        "ocifit_requests_shed_total": ("counter", "Requests answered 429 because request bodies in flight were "
                                                  "over --max-inflight-bytes."),
        "ocifit_connections_open": ("gauge", "Client connections open now."),
        "ocifit_connections_refused_total": ("counter", "Connections closed at once, by the cap that was full."),
        "ocifit_connections_evicted_total": ("counter", "Idle keep-alive connections closed to make room."),
        "ocifit_registry_requests_total": ("counter", "Registry HTTP requests, by result."),
        "ocifit_artifact_cache_total": ("counter", "Artifact lookups, by result (hit, miss, stale)."),
        "ocifit_nodes": ("gauge", "Nodes in the current view."),
        "ocifit_node_label_sets": ("gauge", "Distinct label sets among the nodes in view."),
        "ocifit_node_shapes": ("gauge", "Kinds of node in view: label sets less per-node labels (hostname)."),
        "ocifit_node_relists_total": ("counter", "Full node lists from the API server."),
        "ocifit_node_watch_restarts_total": ("counter", "Node watch streams started again."),
        "ocifit_node_sync_age_seconds": ("gauge", "Seconds since the node view last heard from its source."),
        "ocifit_certificate_expiry_timestamp_seconds": ("gauge", "When the serving certificate expires."),
        "process_cpu_seconds_total": ("counter", "Total user and system CPU time spent in seconds."),
        "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
        "process_open_fds": ("gauge", "Number of open file descriptors."),
        "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
        "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
    }
    # Label sets known in advance, shown at 0 from the start.
    KNOWN: Dict[str, List[Dict[str, str]]] = {
        "ocifit_admissions_total": [{"outcome": "mutated", "reason": "selected"},
                                    {"outcome": "mutated", "reason": "pinned"},
                                    {"outcome": "mutated", "reason": "generic"},
                                    {"outcome": "untouched", "reason": "not-pod-create"},
                                    {"outcome": "untouched", "reason": "not-enabled"},
                                    {"outcome": "untouched", "reason": "already-mutated"},
                                    {"outcome": "bad-request", "reason": "bad-review"}]
                                   + [{"outcome": "denied", "reason": r} for r in (
                                       "missing-annotation", "no-placeholder", "malformed-pod", "spec-invalid",
                                       "artifact-unavailable", "no-candidates", "no-match", "disagreement", "no-tag",
                                       "no-node-features", "no-candidate-fits", "too-costly", "internal-error")],
        "ocifit_artifact_cache_total": [{"result": r} for r in ("hit", "miss", "stale")],
        "ocifit_requests_shed_total": [{"reason": "body-budget"}],
        "ocifit_connections_refused_total": [{"reason": r} for r in ("capacity", "per-client")],
        "ocifit_connections_evicted_total": [{}],
        "ocifit_node_relists_total": [{}], "ocifit_node_watch_restarts_total": [{}],
    }

    def __init__(self, mode: str = "enforce") -> None:
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, tuple], int] = {}
        self._histograms: Dict[str, List[float]] = {}
        self._gauges: Dict[str, Callable[[], Optional[float]]] = {}
        for name, label_sets in self.KNOWN.items():
            for labels in label_sets:
                self.count(name, 0, **dict(labels, mode=mode) if name == "ocifit_admissions_total" else labels)
        self.observe("ocifit_admission_duration_seconds", None)
        self.gauge("ocifit_build_info", lambda: 1, version=__version__, python=platform.python_version())
        for name, read in process_metrics().items():
            self.gauge(name, read)

    def count(self, name: str, amount: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def total(self, name: str) -> int:
        """A counter summed over its labels."""
        with self._lock:
            return sum(value for (counted, _), value in self._counters.items() if counted == name)

    def observe(self, name: str, seconds: Optional[float]) -> None:
        """Add an observation to a histogram (None: only make sure the histogram is there)."""
        with self._lock:
            counts = self._histograms.setdefault(name, [0.0] * (len(self.BUCKETS) + 2))
            if seconds is not None:
                counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1  # len(BUCKETS): only +Inf
                counts[-1] += seconds

    def gauge(self, name: str, read: Callable[[], Optional[float]], **labels: str) -> None:
        """Register a gauge read when /metrics is scraped; a None reading leaves the sample out."""
        self._gauges[name + _label_text(tuple(sorted(labels.items())))] = read

    def render(self) -> str:
        lines: List[str] = []
        seen = set()

        def header(name: str) -> None:
            if name not in seen and name in self.HELP:
                seen.add(name)
                kind, text = self.HELP[name]
                lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        with self._lock:
            counters = sorted(self._counters.items())
            histograms = {k: list(v) for k, v in self._histograms.items()}
        for (name, labels), amount in counters:
            header(name)
            lines.append(f"{name}{_label_text(labels)} {amount}")
        for name, counts in sorted(histograms.items()):
            header(name)
            cumulative = 0
            for bound, count in zip(self.BUCKETS, counts):
                cumulative += int(count)
                lines.append(f'{name}_bucket{{le="{bound!r}"}} {cumulative}')
            total = cumulative + int(counts[-2])
            lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_count {total}", f"{name}_sum {counts[-1]!r}"]
        for key, read in sorted(self._gauges.items()):
            try:
                value = read()
            except Exception:  # a gauge must never break the scrape
                value = None
            if value is not None:
                header(key.split("{", 1)[0])
                lines.append(f"{key} {value if isinstance(value, int) else repr(float(value))}")
        for name in self.HELP:  # documented series with nothing to show yet (say, no registry request so far)
            header(name)
        return "\n".join(lines) + "\n"


def _label_text(labels: Tuple[Tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "}"


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_STARTED = time.time()


def process_metrics() -> Dict[str, Callable[[], Optional[float]]]:
    """The standard process_* series, from /proc where there is one (Linux), else what the stdlib tells."""
    def resident() -> Optional[int]:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def open_fds() -> Optional[int]:
        try:
            return len(os.listdir("/proc/self/fd"))
        except OSError:
            return None

    def max_fds() -> Optional[int]:
        try:
            import resource  # Unix only
            return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        except (ImportError, OSError, ValueError):
            return None

    return {"process_cpu_seconds_total": time.process_time, "process_resident_memory_bytes": resident,
            "process_open_fds": open_fds, "process_max_fds": max_fds,
            "process_start_time_seconds": _process_start_time}


@functools.lru_cache(maxsize=None)
def _process_start_time() -> float:
    """When the process started: from /proc (boot time plus the start tick), else when ocifit was imported.
    Read once: it does not change, and every scrape asks."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _STARTED


# ============================================================================================
# Go regular expressions: Go's syntax and matches, in linear time
# ============================================================================================
# Patterns in specs are Go regular expressions (RE2 syntax), so ocifit parses them as Go's regexp/syntax does with
# its Perl flags (same accepted syntax, same error text) and matches them the way Go's regexp.MatchString does:
# the pattern compiles to a Thompson NFA program that is simulated as a lazily built DFA, so a search costs
# O(program size x text length) at worst and never backtracks. Deliberate differences from Go, all refusals or
# Unicode data: a program larger than max_program instructions is refused; Unicode *script* classes (\p{Greek})
# are refused, since the standard library has no script property; general categories and case folding come from
# Python's unicodedata, whose Unicode version may be older than Go's (characters assigned since then differ), plus
# the few simple case folds Go has that str.upper/lower cannot derive (_FOLD_PAIRS). Go's internal limits (repeat
# count 1000, nesting depth 1000, "expression too large") are mirrored on ocifit's parse tree, which is not
# factored as Go's is, so a pattern right at Go's nesting or size limit may be judged one step differently.

MAX_PROGRAM = 500  # instructions: the worst search of a 1 KiB text stays near 20 ms; real patterns take about 10
_GO_MAX_REPEAT = 1000
_GO_MAX_HEIGHT = 1000
_GO_MAX_SIZE = (128 << 20) // 40
_MAX_RUNE = 0x10FFFF
_CACHE_LIMIT = 4096         # entries per transition cache of one compiled regex; cleared when full

_FOLD, _ONE_LINE, _DOT_NL = 1, 2, 4                         # parser flags (U, non-greedy, cannot change a verdict)
_BEGIN_TEXT, _END_TEXT, _BEGIN_LINE, _END_LINE, _WORD_BOUNDARY, _NOT_WORD_BOUNDARY = 1, 2, 4, 8, 16, 32
_CHAR, _SPLIT, _JUMP, _ASSERT, _MATCH = range(5)           # instruction opcodes
_HEX_DIGITS = "0123456789abcdefABCDEF"
_WORD_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")

# A class item is (bounds, general categories, negated): bounds are flat sorted half-open code point intervals.
_Item = Tuple[Tuple[int, ...], frozenset, bool]

_PERL_GROUPS = {"d": ((0x30, 0x39),), "s": ((9, 10), (12, 13), (32, 32)),
                "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))}
_POSIX_GROUPS = {
    "alnum": ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)), "alpha": ((0x41, 0x5A), (0x61, 0x7A)),
    "ascii": ((0, 0x7F),), "blank": ((9, 9), (32, 32)), "cntrl": ((0, 0x1F), (0x7F, 0x7F)),
    "digit": ((0x30, 0x39),), "graph": ((0x21, 0x7E),), "lower": ((0x61, 0x7A),), "print": ((0x20, 0x7E),),
    "punct": ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)), "space": ((9, 13), (32, 32)),
    "upper": ((0x41, 0x5A),), "word": _PERL_GROUPS["w"], "xdigit": ((0x30, 0x39), (0x41, 0x46), (0x61, 0x66))}

_CATEGORIES = "Cc Cf Cn Co Cs Ll Lm Lo Lt Lu Mc Me Mn Nd Nl No Pc Pd Pe Pf Pi Po Ps Sc Sk Sm So Zl Zp Zs".split()
_CATEGORY_ALIASES = dict(pair.split("=") for pair in (
    "Casedletter=LC Closepunctuation=Pe Combiningmark=M Connectorpunctuation=Pc Control=Cc Currencysymbol=Sc "
    "Dashpunctuation=Pd Decimalnumber=Nd Enclosingmark=Me Finalpunctuation=Pf Format=Cf Initialpunctuation=Pi "
    "Letter=L Letternumber=Nl Lineseparator=Zl Lowercaseletter=Ll Mark=M Mathsymbol=Sm Modifierletter=Lm "
    "Modifiersymbol=Sk Nonspacingmark=Mn Number=N Openpunctuation=Ps Other=C Otherletter=Lo Othernumber=No "
    "Otherpunctuation=Po Othersymbol=So Paragraphseparator=Zp Privateuse=Co Punctuation=P Separator=Z "
    "Spaceseparator=Zs Spacingmark=Mc Surrogate=Cs Symbol=S Titlecaseletter=Lt Unassigned=Cn Uppercaseletter=Lu "
    "Cntrl=Cc Digit=Nd Punct=P").split())
_SCRIPTS = frozenset((  # Go's unicode.Scripts, canonical names: refused rather than silently mismatched
    "Adlam Ahom Anatolianhieroglyphs Arabic Armenian Avestan Balinese Bamum Bassavah Batak Bengali Beriaerfe "
    "Bhaiksuki Bopomofo Brahmi Braille Buginese Buhid Canadianaboriginal Carian Caucasianalbanian Chakma Cham "
    "Cherokee Chorasmian Common Coptic Cuneiform Cypriot Cyprominoan Cyrillic Deseret Devanagari Divesakuru Dogra "
    "Duployan Egyptianhieroglyphs Elbasan Elymaic Ethiopic Garay Georgian Glagolitic Gothic Grantha Greek Gujarati "
    "Gunjalagondi Gurmukhi Gurungkhema Han Hangul Hanifirohingya Hanunoo Hatran Hebrew Hiragana Imperialaramaic "
    "Inherited Inscriptionalpahlavi Inscriptionalparthian Javanese Kaithi Kannada Katakana Kawi Kayahli Kharoshthi "
    "Khitansmallscript Khmer Khojki Khudawadi Kiratrai Lao Latin Lepcha Limbu Lineara Linearb Lisu Lycian Lydian "
    "Mahajani Makasar Malayalam Mandaic Manichaean Marchen Masaramgondi Medefaidrin Meeteimayek Mendekikakui "
    "Meroiticcursive Meroitichieroglyphs Miao Modi Mongolian Mro Multani Myanmar Nabataean Nagmundari Nandinagari "
    "Newtailue Newa Nko Nushu Nyiakengpuachuehmong Ogham Olchiki Olonal Oldhungarian Olditalic Oldnortharabian "
    "Oldpermic Oldpersian Oldsogdian Oldsoutharabian Oldturkic Olduyghur Oriya Osage Osmanya Pahawhhmong Palmyrene "
    "Paucinhau Phagspa Phoenician Psalterpahlavi Rejang Runic Samaritan Saurashtra Sharada Shavian Siddham Sidetic "
    "Signwriting Sinhala Sogdian Sorasompeng Soyombo Sundanese Sunuwar Sylotinagri Syriac Tagalog Tagbanwa Taile "
    "Taitham Taiviet Taiyo Takri Tamil Tangsa Tangut Telugu Thaana Thai Tibetan Tifinagh Tirhuta Todhri Tolongsiki "
    "Toto Tulutigalari Ugaritic Vai Vithkuqi Wancho Warangciti Yezidi Yi Zanabazarsquare").split())

# Case folding: Go's unicode.SimpleFold orbits are {key, key.upper()} plus the characters below, which fold to a
# key that str.upper/lower cannot lead back to (Kelvin sign, long s, final sigma, ...), plus pairs Go folds that
# str.upper/lower do not relate at all. Dotless i is alone in Go, as simple case folding leaves it alone.
_ODD_FOLDS = "\u212a\u017f\u00b5\u212b\u1e9e\u01c5\u01c8\u01cb\u01f2\u0345\u1fbe\u03d0\u03f5\u03d1\u03f4\u03f0" \
             "\u03d6\u03f1\u03c2\u03d5\u2126\u1c80\u1c81\u1c82\u1c83\u1c84\u1c85\u1c86\u1c87\u1c88\u1e9b"
_FOLD_PAIRS = {a: b for x, y in ("\u019b\ua7dc", "\u0264\ua7cb", "\u0390\u1fd3", "\u03b0\u1fe3", "\ufb05\ufb06")
               for a, b in ((x, y), (y, x))}


class GoRegexError(ValueError):
    """A pattern Go's regexp.Compile refuses (str() is Go's error text), or one over ocifit's size limit."""


def _error(code: str, expr: str) -> GoRegexError:
    return GoRegexError(f"error parsing regexp: {code}: `{expr}`")


def _fold_key(char: str) -> str:
    """The lowercase of the uppercase of char when both are single characters, else char itself."""
    upper = char.upper()
    if len(upper) == 1 and char != "\u0131":
        lower = upper.lower()
        if len(lower) == 1:
            return lower
    return char


_ODD_BY_KEY: Dict[str, str] = {}
for _odd in _ODD_FOLDS:
    _ODD_BY_KEY[_fold_key(_odd)] = _ODD_BY_KEY.get(_fold_key(_odd), "") + _odd


@functools.lru_cache(maxsize=4096)
def _orbit(char: str) -> Tuple[str, ...]:
    """All characters equal to char under Go's simple case folding, char included."""
    key = _fold_key(char)
    members = {char, key, *_ODD_BY_KEY.get(key, ""), *_FOLD_PAIRS.get(char, "")}
    upper = key.upper()
    if len(upper) == 1 and _fold_key(upper) == key:
        members.add(upper)
    return tuple(sorted(members))


def _bounds(ranges: Iterable[Tuple[int, int]]) -> Tuple[int, ...]:
    """Inclusive (lo, hi) code point ranges as sorted, merged, flat half-open bounds for bisect."""
    flat: List[int] = []
    for lo, hi in sorted(ranges):
        if flat and lo <= flat[-1]:
            flat[-1] = max(flat[-1], hi + 1)
        else:
            flat += [lo, hi + 1]
    return tuple(flat)


def _ranges(bounds: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """Flat half-open bounds back as inclusive (lo, hi) ranges."""
    return [(lo, hi - 1) for lo, hi in zip(bounds[::2], bounds[1::2])]


def _canonical_name(name: str) -> str:
    """Go's canonicalName for lookups: no '_', '-' or ' ', capitalized (non-ASCII names match no table)."""
    name = "".join(ch for ch in name if ch not in "_- ")
    return name.capitalize() if name.isascii() else name


def _unicode_tables() -> Dict[str, _Item]:
    """Canonical \\p{name} -> class item, for every class Go accepts but scripts."""
    groups = {code: {code} for code in _CATEGORIES}
    groups.update({major: {c for c in _CATEGORIES if c[0] == major} for major in "CLMNPSZ"}, LC={"Lu", "Ll", "Lt"})
    tables: Dict[str, _Item] = {_canonical_name(name): ((), frozenset(codes), False) for name, codes in groups.items()}
    tables.update({alias: tables[_canonical_name(name)] for alias, name in _CATEGORY_ALIASES.items()})
    tables.update(Any=((0, _MAX_RUNE + 1), frozenset(), False), Assigned=((), frozenset({"Cn"}), True),
                  Ascii=((0, 0x80), frozenset(), False))
    return tables


_UNICODE_TABLES = _unicode_tables()


@dataclass(frozen=True)
class _CharClass:
    """A set of characters: items[0] (positive) united with the negated items after it, then negated.

    With fold, an item holds a character when it holds any character of its case-folding orbit, and negated
    items are negated after folding, as Go builds (?i)\\W. A literal is just its set of characters."""
    items: Tuple[_Item, ...] = ()
    fold: bool = False
    negated: bool = False
    literal: frozenset = frozenset()


def _char_class(items: List[_Item], fold: bool = False, negated: bool = False) -> _CharClass:
    """A class with its negated items made positive wherever that is exact, and its positive items merged."""
    if len(items) == 1 and items[0][2]:
        items, negated = [(items[0][0], items[0][1], False)], not negated
    items = [_positive_item(*item, fold) for item in items]
    positive = [item for item in items if not item[2]]
    merged = (_bounds(span for bounds, _, _ in positive for span in _ranges(bounds)),
              frozenset().union(*(categories for _, categories, _ in positive)), False)
    return _CharClass((merged, *(item for item in items if item[2])), fold, negated)


@functools.lru_cache(maxsize=256)
def _positive_item(bounds: tuple, categories: frozenset, negated: bool, fold: bool) -> _Item:
    """The complement of a negated item as a positive one. Under (?i) Go negates after folding, so only small
    code point sets (\\W, [:^alpha:]) qualify there, their folding spelled out; others stay negated."""
    if negated and fold and not categories and sum(hi + 1 - lo for lo, hi in _ranges(bounds)) <= 512:
        chars = {form for lo, hi in _ranges(bounds) for code in range(lo, hi + 1) for form in _orbit(chr(code))}
        bounds = _bounds((ord(char), ord(char)) for char in chars)
    elif not negated or fold:
        return bounds, categories, negated
    if categories:
        return bounds, frozenset(_CATEGORIES) - categories, False
    edges = (0,) + bounds + (_MAX_RUNE + 1,)
    return tuple(x for lo, hi in zip(edges[::2], edges[1::2]) if lo < hi for x in (lo, hi)), categories, False


@dataclass
class _ClassTable:
    """The classes of a program (all folded, or none) merged for one lookup per character: positive items as
    code point intervals and categories -> instructions; negated items (only under (?i)) tested once each."""
    points: list
    interval_masks: list
    category_masks: dict
    negated_items: list
    negated: int

    @classmethod
    def build(cls, classes: List[Tuple[_CharClass, int]]) -> "_ClassTable":
        points = sorted({point for char_class, _ in classes for point in char_class.items[0][0]})
        toggles = [0] * (len(points) + 1)
        category_masks: Dict[str, int] = {}
        negated_items: Dict[Tuple[Tuple[int, ...], frozenset], int] = {}
        for char_class, pcs in classes:
            (bounds, categories, _), *negated = char_class.items
            for point in bounds:
                toggles[bisect.bisect_left(points, point) + 1] ^= pcs
            for category in categories:
                category_masks[category] = category_masks.get(category, 0) | pcs
            for item in negated:
                negated_items[item[:2]] = negated_items.get(item[:2], 0) | pcs
        return cls(points, list(itertools.accumulate(toggles, operator.xor)), category_masks,
                   list(negated_items.items()), sum(pcs for char_class, pcs in classes if char_class.negated))

    def mask(self, forms) -> int:
        """The instructions whose class holds one of forms (a character, or its case-folding orbit)."""
        found, forms = 0, [(ord(form), unicodedata.category(form)) for form in forms]
        for code, category in forms:
            found |= self.interval_masks[bisect.bisect_right(self.points, code)] | self.category_masks.get(category, 0)
        for (bounds, categories), pcs in self.negated_items:
            if not any(bisect.bisect_right(bounds, code) & 1 or category in categories for code, category in forms):
                found |= pcs
        return found ^ self.negated


@dataclass
class _Node:
    """A parsed subexpression with its program fragment (relative jumps), or a '(' or '|' marker."""
    code: Any                 # a list of instructions; None once larger than the program limit (size still counts)
    size: int
    go_size: int = 1          # Go's calcSize, for "expression too large"
    height: int = 1           # Go's tree height, for "expression nests too deeply"
    repeats: int = 1          # product of nested {n,m} counts, for "invalid repeat count"
    marker: str = ""          # "(" or "|" for a marker, else ""
    flags: int = 0            # '(' marker: parser flags to restore at ')'
    capture: bool = False     # '(' marker: a capturing group


def _repeat_size(size: int, low: int, high: int) -> int:
    """The instructions of x{low,high} (high -1: unbounded) from x's; also Go's calcSize from x's."""
    if high < 0:
        return size + 2 if low == 0 else low * size + 1
    return high * size + high - low


def _repeat_code(code: list, low: int, high: int) -> list:
    """x{low,high} as x...x followed by high-low optional x (high -1: unbounded)."""
    if high < 0 and low == 0:
        return [(_SPLIT, 1, len(code) + 2)] + code + [(_JUMP, -len(code) - 1, 0)]
    if high < 0:
        return code * low + [(_SPLIT, -len(code), 1)]
    optional = []
    for left in range(high - low, 0, -1):
        optional += [(_SPLIT, 1, left * (len(code) + 1))] + code
    return code * low + optional


def _alternate_code(codes: List[list]) -> list:
    code = codes[-1]
    for branch in reversed(codes[:-1]):
        code = [(_SPLIT, 1, len(branch) + 2)] + branch + [(_JUMP, len(code) + 1, 0)] + code
    return code


class _RegexParser:
    """Go's regexp/syntax parser (Perl flags), a stack machine mirrored step for step, building program code."""

    def __init__(self, pattern: str, max_program: int):
        self.pattern, self.max_program = pattern, max_program
        self.flags = _ONE_LINE
        self.stack: List[_Node] = []

    # -- stack ------------------------------------------------------------------------------------------------
    def node(self, subs: List[_Node], size: int, go_size: int, build, repeats: int = 0) -> _Node:
        """A new node over subs, its code built only within the program limit; Go's limits checked."""
        node = _Node(None if size > self.max_program else build() if size else [], size, max(1, go_size),
                     1 + max(sub.height for sub in subs), repeats or max(sub.repeats for sub in subs))
        if node.go_size > _GO_MAX_SIZE:
            raise _error("expression too large", self.pattern)
        if node.height > _GO_MAX_HEIGHT:
            raise _error("expression nests too deeply", self.pattern)
        return node

    def push_class(self, char_class: _CharClass) -> None:
        self.stack.append(_Node([(_CHAR, char_class, 0)], 1))

    def literal(self, char: str) -> None:
        self.push_class(_CharClass(literal=frozenset(_orbit(char) if self.flags & _FOLD else char)))

    def assertion(self, condition: int) -> None:
        self.stack.append(_Node([(_ASSERT, condition, 0)], 1))

    def open_group(self, capture: bool) -> None:
        self.stack.append(_Node(None, 0, marker="(", flags=self.flags, capture=capture))

    def operands(self) -> List[_Node]:
        """Pop and return the nodes above the topmost marker."""
        i = len(self.stack)
        while i and not self.stack[i - 1].marker:
            i -= 1
        operands, self.stack[i:] = self.stack[i:], []
        return operands

    def concat(self) -> None:
        subs = self.operands() or [_Node([], 0)]
        if len(subs) > 1:
            subs = [self.node(subs, sum(s.size for s in subs), sum(s.go_size for s in subs),
                              lambda: [op for s in subs for op in s.code])]
        self.stack.append(subs[0])

    def alternate(self) -> None:
        """Close the alternation above the topmost '(' (the '|' marker already popped)."""
        subs = self.operands()
        if len(subs) > 1:
            subs = [self.node(subs, sum(s.size for s in subs) + 2 * len(subs) - 2,
                              sum(s.go_size for s in subs) + len(subs) - 1,
                              lambda: _alternate_code([s.code for s in subs]))]
        self.stack.append(subs[0])

    def swap_vertical_bar(self) -> bool:
        """Move a finished branch below the '|' marker, where the branches collect."""
        if len(self.stack) >= 2 and self.stack[-2].marker == "|":
            self.stack[-2], self.stack[-1] = self.stack[-1], self.stack[-2]
            return True
        return False

    def vertical_bar(self) -> None:
        self.concat()
        if not self.swap_vertical_bar():
            self.stack.append(_Node(None, 0, marker="|"))

    def close_group(self) -> None:
        self.concat()
        if self.swap_vertical_bar():
            self.stack.pop()
        self.alternate()

    def right_paren(self) -> None:
        self.close_group()
        if len(self.stack) < 2 or self.stack[-2].marker != "(":
            raise _error("unexpected )", self.pattern)
        inner, group = self.stack.pop(), self.stack.pop()
        self.flags = group.flags
        if group.capture:
            inner = self.node([inner], inner.size, 2 + inner.go_size, lambda: inner.code)
        self.stack.append(inner)

    def repeat(self, low: int, high: int, before: int, after: int, last_repeat: int) -> int:
        """Apply x{low,high} (high -1: unbounded; also *, + and ?) to the top of the stack; return the position
        after it and its non-greedy '?'."""
        if after < len(self.pattern) and self.pattern[after] == "?":
            after += 1
        if last_repeat >= 0:
            raise _error("invalid nested repetition operator", self.pattern[last_repeat:after])
        if not self.stack or self.stack[-1].marker:
            raise _error("missing argument to repetition operator", self.pattern[before:after])
        sub = self.stack[-1]
        repeats = 1 if high == 0 else max(high if high >= 0 else low, 1) * sub.repeats
        self.stack[-1] = node = self.node([sub], _repeat_size(sub.size, low, high),
                                          _repeat_size(sub.go_size, low, high),
                                          lambda: _repeat_code(sub.code, low, high), repeats)
        if (low >= 2 or high >= 2) and node.repeats > _GO_MAX_REPEAT:
            raise _error("invalid repeat count", self.pattern[before:after])
        return after

    # -- the main loop ----------------------------------------------------------------------------------------
    def parse(self) -> _Node:
        pattern, i, last_repeat = self.pattern, 0, -1
        while i < len(pattern):
            char, repeat_start = pattern[i], -1
            repetition = self.repetition(i)
            if repetition:
                low, high, after = repetition
                if low > _GO_MAX_REPEAT or high > _GO_MAX_REPEAT or 0 <= high < low:
                    raise _error("invalid repeat count", pattern[i:after])
                i, repeat_start = self.repeat(low, high, i, after, last_repeat), i
            elif pattern.startswith("(?", i):
                i = self.perl_flags(i)
            elif char == "[":
                i = self.parse_class(i)
            elif char == "\\":
                i = self.backslash(i)
            else:
                self.single(char)
                i += 1
            last_repeat = repeat_start
        self.close_group()
        if len(self.stack) != 1:
            raise _error("missing closing )", pattern)
        return self.stack[0]

    def single(self, char: str) -> None:
        """Parse a one-character token other than a repetition: (, |, ), ^, $, . or a literal."""
        if char == "(":
            self.open_group(capture=True)
        elif char == "|":
            self.vertical_bar()
        elif char == ")":
            self.right_paren()
        elif char in "^$":
            one_line = self.flags & _ONE_LINE
            self.assertion((_BEGIN_TEXT if one_line else _BEGIN_LINE) if char == "^" else
                           (_END_TEXT if one_line else _END_LINE))
        elif char == ".":
            newline: List[_Item] = [] if self.flags & _DOT_NL else [((10, 11), frozenset(), False)]
            self.push_class(_char_class(newline, negated=True))
        else:
            self.literal(char)

    def backslash(self, i: int) -> int:
        """Parse the escape at i (assertion, \\Q...\\E, class or literal); return the position after it."""
        pattern, kind = self.pattern, self.pattern[i + 1:i + 2]
        conditions = {"A": _BEGIN_TEXT, "b": _WORD_BOUNDARY, "B": _NOT_WORD_BOUNDARY, "z": _END_TEXT}
        if kind in conditions:
            self.assertion(conditions[kind])
            return i + 2
        if kind == "C":
            raise _error("invalid escape sequence", "\\C")
        if kind == "Q":
            end = pattern.find("\\E", i + 2)
            for char in pattern[i + 2:end if end >= 0 else len(pattern)]:
                self.literal(char)
            return end + 2 if end >= 0 else len(pattern)
        class_item = self.class_escape(i)
        if class_item:
            self.push_class(_char_class([class_item[0]], bool(self.flags & _FOLD)))
            return class_item[1]
        code_point, after = self.escape(i)
        self.literal(chr(code_point))
        return after

    # -- lexical pieces ---------------------------------------------------------------------------------------
    def parse_int(self, i: int) -> Tuple[Optional[int], int]:
        pattern, j = self.pattern, i
        while j < len(pattern) and "0" <= pattern[j] <= "9":
            j += 1
        if j == i or (j - i >= 2 and pattern[i] == "0"):
            return None, i
        return int(pattern[i:j]), j

    def repetition(self, i: int) -> Optional[Tuple[int, int, int]]:
        """*, +, ?, {n}, {n,} or {n,m} at i as (low, high or -1, end), or None (also for a literal '{')."""
        pattern, n = self.pattern, len(self.pattern)
        if pattern[i] in "*+?":
            return {"*": (0, -1), "+": (1, -1), "?": (0, 1)}[pattern[i]] + (i + 1,)
        if pattern[i] != "{":
            return None
        low, i = self.parse_int(i + 1)
        if low is None or i >= n:
            return None
        high: Optional[int] = low
        if pattern[i] == ",":
            i += 1
            high, i = (-1, i) if i < n and pattern[i] == "}" else self.parse_int(i)
        if high is None or i >= n or pattern[i] != "}":
            return None
        return low, high, i + 1

    def escape(self, i: int) -> Tuple[int, int]:
        """The code point of the escape sequence at i, and the position after it."""
        pattern, n = self.pattern, len(self.pattern)
        if i + 1 >= n:
            raise _error("trailing backslash at end of expression", "")
        char, j = pattern[i + 1], i + 2
        if char < "\x80" and not char.isalnum():
            return ord(char), j
        if char == "0" or "1" <= char <= "7" and j < n and "0" <= pattern[j] <= "7":
            value = int(char)
            for _ in range(2):
                if j < n and "0" <= pattern[j] <= "7":
                    value, j = value * 8 + int(pattern[j]), j + 1
            return value, j
        if char in "afnrtv":
            return ord("\a\f\n\r\t\v"["afnrtv".index(char)]), j
        if char == "x" and pattern[j:j + 1] == "{":
            value, end = 0, j + 1
            while end < n and pattern[end] in _HEX_DIGITS and value <= _MAX_RUNE:
                value, end = value * 16 + int(pattern[end], 16), end + 1
            if value > _MAX_RUNE:
                raise _error("invalid escape sequence", pattern[i:end])
            if end == j + 1 or pattern[end:end + 1] != "}":
                raise _error("invalid escape sequence", pattern[i:end + 1])
            return value, end + 1
        if char == "x" and all(digit in _HEX_DIGITS for digit in pattern[j:j + 2]) and j + 2 <= n:
            return int(pattern[j:j + 2], 16), j + 2
        raise _error("invalid escape sequence", pattern[i:j + 2 * (char == "x")])

    def class_escape(self, i: int) -> Optional[Tuple[_Item, int]]:
        """The \\d, \\D, \\s, \\S, \\w, \\W, \\p or \\P class at i as an item and the position after it, else None."""
        kind = self.pattern[i + 1:i + 2]
        if kind and kind in "dDsSwW":
            return (_bounds(_PERL_GROUPS[kind.lower()]), frozenset(), kind.isupper()), i + 2
        return self.unicode_class(i) if kind and kind in "pP" else None

    def unicode_class(self, i: int) -> Tuple[_Item, int]:
        """The \\p or \\P class at i as an item and the position after it."""
        pattern, negated = self.pattern, self.pattern[i + 1] == "P"
        if pattern[i + 2:i + 3] == "{":
            end = pattern.find("}", i)
            if end < 0:
                raise _error("invalid character class range", pattern[i:])
            sequence, name = pattern[i:end + 1], pattern[i + 3:end]
        else:
            sequence = pattern[i:i + 3]
            name = sequence[2:]
        if name.startswith("^"):
            negated, name = not negated, name[1:]
        table = _UNICODE_TABLES.get(_canonical_name(name))
        if table is None and _canonical_name(name) in _SCRIPTS:
            raise GoRegexError(f"error parsing regexp: Unicode script classes are not supported by ocifit: "
                               f"`{sequence}`")
        if table is None:
            raise _error("invalid character class range", sequence)
        return (table[0], table[1], negated != table[2]), i + len(sequence)

    def perl_flags(self, i: int) -> int:
        """Parse (?flags), (?flags:, (?P<name> or (?<name> at i; return the position after it."""
        pattern, rest = self.pattern, self.pattern[i:]
        if rest[2:4] == "P<" and len(rest) > 4 or rest[2:3] == "<" and len(rest) > 3:
            end = rest.find(">")
            if end < 0:
                raise _error("invalid named capture", rest)
            name = rest[(4 if rest[2] == "P" else 3):end]
            if not name or not all(ch == "_" or ch.isascii() and ch.isalnum() for ch in name):
                raise _error("invalid named capture", rest[:end + 1])
            self.open_group(capture=True)
            return i + end + 1
        flags, negate, saw_flag, j = self.flags, False, False, i + 2
        while j < len(pattern):
            char, j = pattern[j], j + 1
            if char in "imsU":
                bit = {"i": _FOLD, "m": _ONE_LINE, "s": _DOT_NL, "U": 0}[char]
                flags = flags & ~bit if negate != (char == "m") else flags | bit
                saw_flag = True
            elif char == "-" and not negate:
                negate, saw_flag = True, False
            elif char in ":)" and (saw_flag or not negate):
                if char == ":":
                    self.open_group(capture=False)
                self.flags = flags
                return j
            else:
                break
        raise _error("invalid or unsupported Perl syntax", pattern[i:j])

    def parse_class(self, start: int) -> int:
        """Parse the bracketed class at start, push it, return the position after it."""
        pattern, n = self.pattern, len(self.pattern)
        negated = pattern[start + 1:start + 2] == "^"
        i = start + 1 + negated
        items: List[_Item] = []
        ranges: List[Tuple[int, int]] = []
        while i >= n or pattern[i] != "]" or not (items or ranges):
            posix_end = pattern.find(":]", i + 2) if pattern.startswith("[:", i) else -1
            class_item = self.class_escape(i) if pattern[i:i + 1] == "\\" else None
            if posix_end >= 0:
                name = pattern[i + 2:posix_end]
                group = _POSIX_GROUPS.get(name[1:] if name.startswith("^") else name)
                if group is None:
                    raise _error("invalid character class range", pattern[i:posix_end + 2])
                items.append((_bounds(group), frozenset(), name.startswith("^")))
                i = posix_end + 2
            elif class_item:
                items.append(class_item[0])
                i = class_item[1]
            else:
                low, after = self.class_char(i, start)
                high = low
                if n - after >= 2 and pattern[after] == "-" and pattern[after + 1] != "]":
                    high, after = self.class_char(after + 1, start)
                    if high < low:
                        raise _error("invalid character class range", pattern[i:after])
                ranges.append((low, high))
                i = after
        self.push_class(_char_class([(_bounds(ranges), frozenset(), False)] + items, bool(self.flags & _FOLD),
                                    negated))
        return i + 1

    def class_char(self, i: int, start: int) -> Tuple[int, int]:
        if i >= len(self.pattern):
            raise _error("missing closing ]", self.pattern[start:])
        return self.escape(i) if self.pattern[i] == "\\" else (ord(self.pattern[i]), i + 1)


def compile_go(pattern: str, max_program: int = MAX_PROGRAM) -> "GoRegex":
    """Parse pattern as Go's regexp.Compile does; raise GoRegexError with Go's message if Go refuses it, or if
    its program would exceed max_program instructions (ocifit's limit, far below Go's)."""
    root = _RegexParser(pattern, max_program).parse()
    size = root.size + 1
    if size > max_program:
        raise GoRegexError(f"error parsing regexp: pattern compiles to {size} instructions, more than the limit "
                           f"of {max_program}: `{pattern}`")
    program = [(op, pc + a, pc + b) if op in (_SPLIT, _JUMP) else (op, a, b)
               for pc, (op, a, b) in enumerate(root.code + [(_MATCH, 0, 0)])]
    return GoRegex(pattern, size, program)


@dataclass(eq=False)
class GoRegex:
    """A compiled Go regular expression; search() is Go's MatchString, simulated as a lazily built DFA.

    A DFA state is the bitmask of the program's character and match instructions alive at a position. A step
    keeps the alive character instructions that accept the next character (a mask cached per character), moves
    each to the next instruction (a shift: they always continue at pc + 1), adds the start (the search is
    unanchored) and follows splits, jumps and the assertions true between the two characters (cached per
    (seed, context), from per-instruction closures computed once each). A miss costs O(program size) bit
    operations; the caches are bounded."""
    pattern: str
    size: int
    program: list = field(repr=False)

    def __post_init__(self) -> None:
        self._literals: Dict[str, int] = {}
        classes: Dict[_CharClass, int] = {}
        self._conditions = 0
        for pc, (op, arg, _) in enumerate(self.program):
            if op == _CHAR and arg.literal:
                for char in arg.literal:
                    self._literals[char] = self._literals.get(char, 0) | 1 << pc
            elif op == _CHAR:
                classes[arg] = classes.get(arg, 0) | 1 << pc
            elif op == _ASSERT:
                self._conditions |= arg
        by_fold = [[(c, pcs) for c, pcs in classes.items() if c.fold == fold] for fold in (False, True)]
        self._plain, self._folded = (_ClassTable.build(group) if group else None for group in by_fold)
        self._match_bit = 1 << (len(self.program) - 1)
        self._consuming = sum(1 << pc for pc, (op, _, _) in enumerate(self.program) if op in (_CHAR, _MATCH))
        self._reaches: Dict[Tuple[int, int], int] = {}   # (pc, context) -> _reach(), at most size x 64 entries
        self._accepting: Dict[str, int] = {}
        self._closures: Dict[Tuple[int, int], int] = {}

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in text, as Go's regexp.MatchString."""
        closures, accepting, used, n = self._closures, self._accepting, self._conditions, len(text)
        seed = 1
        for i in range(n + 1):
            context = self._context(text, i, n) & used if used else 0
            state = closures.get((seed, context))
            if state is None:
                if len(closures) >= _CACHE_LIMIT:
                    closures.clear()
                state = closures[seed, context] = self._closure(seed, context)
            if state & self._match_bit:
                return True
            if i == n:
                return False
            mask = accepting.get(text[i])
            if mask is None:
                if len(accepting) >= _CACHE_LIMIT:
                    accepting.clear()
                mask = accepting[text[i]] = self._accepting_mask(text[i])
            seed = (state & mask) << 1 | 1
        return False

    def _accepting_mask(self, char: str) -> int:
        mask = self._literals.get(char, 0)
        if self._plain:
            mask |= self._plain.mask((char,))
        if self._folded:
            mask |= self._folded.mask(_orbit(char))
        return mask

    @staticmethod
    def _context(text: str, i: int, n: int) -> int:
        """The empty-width conditions true between text[i-1] and text[i]."""
        before, after = text[i - 1] if i else "", text[i] if i < n else ""
        context = _BEGIN_TEXT | _BEGIN_LINE if not before else _BEGIN_LINE if before == "\n" else 0
        context |= _END_TEXT | _END_LINE if not after else _END_LINE if after == "\n" else 0
        return context | (_WORD_BOUNDARY if (before in _WORD_CHARS) != (after in _WORD_CHARS) else _NOT_WORD_BOUNDARY)

    def _closure(self, seed: int, context: int) -> int:
        """The character and match instructions reachable from the seed's instructions without input."""
        state, seed, reaches = seed & self._consuming, seed & ~self._consuming, self._reaches
        while seed:
            low = seed & -seed
            seed ^= low
            key = (low.bit_length() - 1, context)
            reach = reaches.get(key)
            if reach is None:
                reach = reaches[key] = self._reach(*key)
            state |= reach
        return state

    def _reach(self, start: int, context: int) -> int:
        """The character and match instructions reachable from instruction start without input: O(size)."""
        program, alive, todo, seen = self.program, [], [start], set()
        while todo:
            pc = todo.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op, arg, other = program[pc]
            if op == _SPLIT:
                todo += (other, arg)
            elif op == _JUMP:
                todo.append(arg)
            elif op != _ASSERT:
                alive.append(pc)
            elif arg & context:
                todo.append(pc + 1)
        return sum(1 << pc for pc in alive)


# ============================================================================================
# Compatibility spec: parse, validate, match
# ============================================================================================

class SpecError(ValueError):
    """The compatibility spec is malformed; the message names the offending place."""


EVALUATION_BUDGET = 1_000_000  # units of work one admission may spend deciding, about a microsecond each
EXPRESSION_COST = 5  # units for an expression tested on a value (a regular expression costs more, by its size)


class BudgetExceeded(Exception):
    """A decision needed more than its evaluation budget."""


_METER = threading.local()  # the units the deciding thread has left (None: not metered, as in `match`)
_Decided = TypeVar("_Decided")


def metered(decide: Callable[[], "_Decided"], units: int = EVALUATION_BUDGET) -> "_Decided":
    """decide(), its evaluation metered: the expressions and placement requirements it tests on node values may
    cost at most `units` (measured: about a microsecond each), or BudgetExceeded.
    Every spec, pod and node is someone else's, so this is what bounds the CPU one admission can take."""
    _METER.left = units
    try:
        return decide()
    finally:
        _METER.left = None


def charge(units: int) -> None:
    """Spend units of the deciding thread's evaluation budget (nothing if it is not metered)."""
    left = getattr(_METER, "left", None)
    if left is not None:
        _METER.left = left - units
        if left < units:
            raise BudgetExceeded(f"deciding needed more than the evaluation budget of {EVALUATION_BUDGET:,} units "
                                 "(about a microsecond of testing node values each)")



OPERATORS = ("In", "NotIn", "InRegexp", "Exists", "DoesNotExist", "Gt", "Lt", "Gte", "Lte", "GtLt",
             "IsTrue", "IsFalse")
VALUELESS_OPERATORS = ("Exists", "DoesNotExist", "IsTrue", "IsFalse")
SINGLE_INTEGER_OPERATORS = ("Gt", "Lt", "Gte", "Lte")
# Limits on a spec, each about 10x what the largest real specs need (NFD's and upstream ocifit's examples have at
# most 3 compatibilities, 3 rules, 8 expressions, short values and patterns, in 4 KiB); a spec over one is
# refused, naming it. With EVALUATION_BUDGET they bound what any spec can cost.
MAX_SPEC_BYTES = 64 * 1024
MAX_COMPATIBILITIES = 32
MAX_RULES = 64  # in all the compatibilities
MAX_EXPRESSIONS = 256  # in all the rules, matchName included
MAX_VALUES = 256  # in one expression
MAX_STRING = 4096  # a value, tag or description
MAX_PATTERN = 256  # a regular expression, in characters
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}\Z")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def parse_integer(text: str) -> Optional[int]:
    """A label value as a 64-bit integer, as Go's strconv.Atoi would read it; None if it is not one."""
    if not _INTEGER.match(text):
        return None
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else None


MAX_REGEX_INPUT = 1024  # longest value a pattern is tested against


def compile_pattern(pattern: str, path: str) -> "GoRegex":
    """Compile an InRegexp pattern as Go does (its syntax, its matches, in linear time), or raise SpecError naming
    path."""
    if len(pattern) > MAX_PATTERN:
        raise SpecError(f"{path}: pattern longer than {MAX_PATTERN} characters, the limit")
    try:
        return compile_go(pattern)
    except GoRegexError as exc:
        raise SpecError(f"{path}: pattern {pattern!r} refused: {exc}") from None


def searched(pattern: "GoRegex", value: str) -> bool:
    """Whether the pattern matches anywhere in the value, charged to the evaluation budget by its worst cost."""
    charge(len(value) * (1 + pattern.size // 32))  # about a microsecond a unit, cached or not
    return pattern.search(value)


def _quote_values(values: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(json.dumps(v) for v in values[:most])
    return "[" + shown + (f", …+{len(values) - most} more" if len(values) > most else "") + "]"


@dataclass(frozen=True)
class Expression:
    """One matchExpression: an operator on one node label."""

    path: str
    op: str
    key: str
    values: Tuple[str, ...] = ()
    patterns: Tuple[GoRegex, ...] = ()
    bounds: Tuple[int, ...] = ()

    def failure(self, labels: Mapping[str, str]) -> Optional[str]:
        """None when the expression holds on these labels, else why it does not."""
        charge(EXPRESSION_COST)
        op, value = self.op, labels.get(self.key)
        if op == "Exists":
            return None if value is not None else self._missing()
        if op == "DoesNotExist":
            return None if value is None else f"label {json.dumps(self.key)} present (value {json.dumps(value)})"
        if op == "NotIn":
            return None if value is None or value not in self.values else \
                self._value(value, f"is in {_quote_values(self.values)}")
        if value is None:
            return self._missing()
        if op == "In":
            return None if value in self.values else self._value(value, f"not in {_quote_values(self.values)}")
        if op == "InRegexp":
            if len(value) > MAX_REGEX_INPUT:
                return self._value(value[:40] + "…", f"is longer than {MAX_REGEX_INPUT} characters: not matched")
            return None if any(searched(p, value) for p in self.patterns) else \
                self._value(value, f"matches none of {_quote_values(self.values)}")
        if op in ("IsTrue", "IsFalse"):
            want = "true" if op == "IsTrue" else "false"
            return None if value == want else self._value(value, f'is not "{want}"')
        number = parse_integer(value)
        if number is None:
            return self._value(value, "is not an integer")
        if op == "GtLt":
            low, high = self.bounds
            return None if low < number < high else \
                self._value(value, f"is not between {low} and {high} (exclusive)")
        bound = self.bounds[0]
        holds = {"Gt": number > bound, "Lt": number < bound, "Gte": number >= bound, "Lte": number <= bound}[op]
        symbol = {"Gt": ">", "Lt": "<", "Gte": ">=", "Lte": "<="}[op]
        return None if holds else self._value(value, f"is not {symbol} {bound}")

    def _missing(self) -> str:
        return f"label {json.dumps(self.key)} missing"

    def _value(self, value: str, why: str) -> str:
        return f"value {json.dumps(value)} of label {json.dumps(self.key)} {why}"


@dataclass(frozen=True)
class Compatibility:
    """One candidate image (`tag`) and what a node must satisfy for it: in ocifit's dialect, expressions on the
    node's labels; in NFD's, rules on its feature sets (and the tag may be empty)."""

    index: int
    tag: str
    description: str
    weight: int
    expressions: Tuple[Expression, ...] = ()
    rules: Tuple["FeatureRule", ...] = ()  # NFD's dialect

    @property
    def name(self) -> str:
        return f"compatibilities[{self.index}] ({self.tag or 'no tag'})"

    def report(self, facts: Any) -> Dict[str, Any]:
        """What held and what did not on the node's facts, and why, as data: for `match --explain` (text) and
        `--output json`. NFD's dialect reports each rule and each expression, as `nfd compat validate-node`."""
        entry: Dict[str, Any] = {"index": self.index, "tag": self.tag, "weight": self.weight}
        if self.description:
            entry["description"] = self.description
        if self.rules:
            entry["rules"] = []
            for rule in self.rules:
                holds, outcomes = rule.evaluate(facts)
                entry["rules"].append({"name": rule.name, "matched": holds,
                                       "expressions": [dataclasses.asdict(o) for o in outcomes]})
            entry["matched"] = all(r["matched"] for r in entry["rules"])
        else:
            entry["expressions"] = [{"path": e.path, "key": e.key, "op": e.op, "value": list(e.values),
                                     "matched": (why := e.failure(facts)) is None, "why": why or "holds"}
                                    for e in self.expressions]
            entry["matched"] = all(e["matched"] for e in entry["expressions"])
        return entry

    def failure(self, facts: Any) -> Optional[str]:
        """None when it holds on the node's facts (labels, or NodeFeatures for NFD's dialect), else the first
        thing that fails and why."""
        if self.rules:
            for r, rule in enumerate(self.rules):
                holds, outcomes = rule.evaluate(facts)
                if not holds:
                    first = next((o for o in outcomes if not o.holds), None)
                    where = f"rules[{r}]" + (f" ({rule.name})" if rule.name else "")
                    return where + (f": {first.feature}" + (f".{first.element}" if first.element else "")
                                    + f" {first.expression}: {first.why}" if first else ": no matchAny block holds")
            return None
        for expression in self.expressions:
            reason = expression.failure(facts)
            if reason is not None:
                return f"{expression.path.split('.', 1)[-1]}: {reason}"
        return None


@dataclass(frozen=True)
class Verdict:
    compatibility: Compatibility
    failure: Optional[str]  # None: matched

    def __str__(self) -> str:
        return f"{self.compatibility.name}: " + ("matched" if self.failure is None else self.failure)


@dataclass(frozen=True)
class Selection:
    """The outcome of a spec on one label set, with the reasoning behind it."""

    chosen: Optional[Compatibility]
    verdicts: Tuple[Verdict, ...]

    def explain(self, facts: Any = None) -> str:
        """Why each compatibility matched or not; for NFD's dialect (given the node's facts), every rule and
        expression with its result, as `nfd compat validate-node` shows them."""
        lines = []
        for verdict in self.verdicts:
            compatibility = verdict.compatibility
            if not compatibility.rules or facts is None:
                lines.append(str(verdict))
                continue
            lines.append(f"{compatibility.name}: " + ("matched" if verdict.failure is None else "not matched"))
            for rule in compatibility.report(facts)["rules"]:
                lines.append(f"  rule {rule['name'] or '(unnamed)'}: {'matched' if rule['matched'] else 'failed'}")
                lines.extend(f"    {'OK  ' if o['holds'] else 'FAIL'}  {o['feature']}"
                             + (f".{o['element']}" if o["element"] else " matchName")
                             + f" {o['expression']}: {o['why']}" for o in rule["expressions"])
        if self.chosen is not None:
            lines.append(f"chosen: {self.chosen.name} weight {self.chosen.weight}")
        else:
            lines.append("chosen: none")
        return "\n".join(lines)

    def why_none(self) -> str:
        return "; ".join(str(v) for v in self.verdicts)


@dataclass(frozen=True)
class Spec:
    """A validated compatibility spec, in ocifit's dialect (on node labels) or NFD's (on node features)."""

    version: str
    compatibilities: Tuple[Compatibility, ...]
    keys: frozenset  # every label key the spec looks at (ocifit's dialect)
    features: frozenset = frozenset()  # every feature set the spec looks at (NFD's dialect)
    nfd: bool = False

    def select(self, facts: Any) -> Selection:
        """Evaluate every compatibility on a node's facts (its labels, or its NodeFeatures for NFD's dialect);
        the highest weight wins, the first listed on a tie."""
        verdicts = tuple(Verdict(c, c.failure(facts)) for c in self.compatibilities)
        chosen = None
        for verdict in verdicts:
            if verdict.failure is None and (chosen is None or verdict.compatibility.weight > chosen.weight):
                chosen = verdict.compatibility
        return Selection(chosen, verdicts)


def _require(value: Any, kind: type, path: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = "null" if value is None else type(value).__name__.replace("dict", "object").replace("str", "string")
        raise SpecError(f"{path}: expected {what}, got {got}")
    return value


def _weight(value: Any, path: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 5.0 and 1e2, as NFD's decoder reads them into an int
    _require(value, int, path, "an integer")
    if not _INT64[0] <= value <= _INT64[1]:
        raise SpecError(f"{path}: out of range (a 64-bit integer)")
    return value


def _only_keys(obj: Mapping[str, Any], allowed: Tuple[str, ...], path: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise SpecError(f"{path}: unsupported key {json.dumps(extra[0])} (expected {', '.join(allowed)})")


def _string(value: Any, path: str, what: str = "a string") -> str:
    _require(value, str, path, what)
    if len(value) > MAX_STRING:
        raise SpecError(f"{path}: longer than {MAX_STRING} characters")
    return value


def _parse_values(raw: Any, path: str) -> Tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (_string(raw, path),)
    _require(raw, list, path, "a list of strings or a string")
    if len(raw) > MAX_VALUES:
        raise SpecError(f"{path}: more than {MAX_VALUES} values")
    return tuple(_string(v, f"{path}[{i}]") for i, v in enumerate(raw))


def _parse_expression(raw: Any, path: str) -> Expression:
    _require(raw, dict, path, "an object with op, key and value")
    _only_keys(raw, ("op", "key", "value"), path)
    op = _string(raw.get("op"), f"{path}.op")
    if op not in OPERATORS:
        raise SpecError(f"{path}.op: unknown operator {json.dumps(op)} (expected one of {', '.join(OPERATORS)})")
    key = _string(raw.get("key"), f"{path}.key")
    if not key:
        raise SpecError(f"{path}.key: empty label key")
    values = _parse_values(raw.get("value"), f"{path}.value")
    patterns: Tuple[GoRegex, ...] = ()
    bounds: Tuple[int, ...] = ()
    if op in VALUELESS_OPERATORS:
        if values:
            raise SpecError(f"{path}.value: operator {op} takes no value")
    elif op in ("In", "NotIn", "InRegexp") and not values:
        raise SpecError(f"{path}.value: operator {op} needs at least one value")
    if op == "InRegexp":
        patterns = tuple(compile_pattern(v, f"{path}.value[{i}]") for i, v in enumerate(values))
    if op in SINGLE_INTEGER_OPERATORS or op == "GtLt":
        wanted = 2 if op == "GtLt" else 1
        if len(values) != wanted:
            raise SpecError(f"{path}.value: operator {op} needs exactly {wanted} integer value"
                            + ("s" if wanted > 1 else "") + f", got {len(values)}")
        parsed = [parse_integer(v) for v in values]
        for i, (text, number) in enumerate(zip(values, parsed)):
            if number is None:
                raise SpecError(f"{path}.value[{i}]: {json.dumps(text)} is not an integer")
        bounds = tuple(parsed)  # type: ignore[arg-type]
        if op == "GtLt" and not bounds[0] < bounds[1]:
            raise SpecError(f"{path}.value: GtLt needs the lower bound first, got {values[0]} and {values[1]}")
    return Expression(path, op, key, values, patterns, bounds)


def _compatibility_head(raw: Any, index: int, allowed: Tuple[str, ...] = (), empty_tag: bool = False
                        ) -> Tuple[str, str, str, int, List[Any]]:
    """(path, tag, description, weight, rules list) of a compatibility, as both dialects read them. Without a
    tag, a compatibility only says that an image can run (as a spec attached to an image does); `empty_tag`:
    whether `tag: ""` may say so too. `allowed`: the only keys it may have, if given."""
    path = f"compatibilities[{index}]"
    _require(raw, dict, path, "an object")
    if allowed:
        _only_keys(raw, allowed, path)
    tag = _string(raw.get("tag", ""), f"{path}.tag", "the image to use (a string)")
    if ("tag" in raw and not tag and not empty_tag) or any(ch.isspace() or ord(ch) < 32 for ch in tag):
        raise SpecError(f"{path}.tag: {json.dumps(tag)} is not an image reference")
    description = _string(raw.get("description", ""), f"{path}.description")
    weight = _weight(raw.get("weight", 0), f"{path}.weight")
    return path, tag, description, weight, _require(raw.get("rules"), list, f"{path}.rules", "a list of rules")


def _parse_compatibility(raw: Any, index: int, budget: List[int]) -> Compatibility:
    path, tag, description, weight, rules = _compatibility_head(raw, index)
    expressions: List[Expression] = []
    for r, rule in enumerate(rules):
        rule_path = f"{path}.rules[{r}]"
        _require(rule, dict, rule_path, "an object with matchFeatures")
        _only_keys(rule, ("matchFeatures", "name"), rule_path)
        features = _require(rule.get("matchFeatures"), list, f"{rule_path}.matchFeatures", "a list")
        for f, feature in enumerate(features):
            feature_path = f"{rule_path}.matchFeatures[{f}]"
            _require(feature, dict, feature_path, "an object with matchExpressions")
            _only_keys(feature, ("matchExpressions",), feature_path)
            items = _require(feature.get("matchExpressions"), list, f"{feature_path}.matchExpressions", "a list")
            budget[0] -= len(items)
            if budget[0] < 0:
                raise SpecError(f"{feature_path}: the spec has more than {MAX_EXPRESSIONS} expressions")
            expressions.extend(_parse_expression(item, f"{feature_path}.matchExpressions[{e}]")
                               for e, item in enumerate(items))
    return Compatibility(index, tag, description, weight, tuple(expressions))


# ---- NFD's dialect: image-compatibility specs over a node's feature sets ---------------------
#
# Node Feature Discovery (kubernetes-sigs/node-feature-discovery) publishes each node's features as NodeFeature
# objects, and its image-compatibility spec (api/image-compatibility/v1alpha1) matches rules against them: every
# rule of a compatibility must match; a rule's matchFeatures terms must all match and, when matchAny is there,
# one of its blocks; a term names a feature set and tests its elements. Semantics follow NFD's
# pkg/apis/nfd/nodefeaturerule (expression.go, rule.go), but a malformed spec is refused whole, and a node
# value that does not parse (a non-integer for Gt, a non-version) is a non-match with the reason, not an error.

NFD_OPERATORS = ("", "In", "NotIn", "InRegexp", "Exists", "DoesNotExist", "Gt", "Ge", "Lt", "Le", "GtLt", "GeLe",
                 "IsTrue", "IsFalse")
NFD_ALIASES = {"Gte": "Ge", "Lte": "Le"}  # ocifit's names for NFD's Ge and Le
RANGE_OPERATORS = ("Gt", "Ge", "Lt", "Le", "GtLt", "GeLe")
_VERSION = re.compile(r"v?([0-9]{1,9})(?:\.([0-9]{1,9}))?(?:\.([0-9]{1,9}))?"  # major, minor, patch
                      r"(?:-[^\s+]*)?(?:\+\S*)?\Z")  # pre-release and build, ignored: kernels write 427.13.1.el9_4
_STRICT_INTEGER = re.compile(r"[+-]?[0-9]{1,19}\Z")


def parse_version(text: str) -> Optional[Tuple[int, int, int]]:
    """`v?MAJOR[.MINOR[.PATCH]][-pre][+meta]` as (major, minor, patch), missing parts 0, pre-release and build
    metadata ignored (`6.8.0-45-generic` is 6.8.0); None if it is not one."""
    m = _VERSION.match(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


def parse_strict_integer(text: str) -> Optional[int]:
    """A sign and digits only, within int64 (Go's strconv.Atoi); None otherwise."""
    if not _STRICT_INTEGER.match(text):
        return None
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else None


class NodeFeatures:
    """A node's feature sets as NFD publishes them (its NodeFeature objects merged): flags (element names),
    attributes (name -> value) and instances (a list of attribute maps), by lowercased feature name. Each feature
    set is an interned, read-only object, so nodes of one hardware kind share them, and a decision can group
    nodes by the identity of the sets it reads."""

    __slots__ = ("flags", "attributes", "instances", "_projections")

    def __init__(self, flags: Mapping[str, frozenset], attributes: Mapping[str, Mapping[str, str]],
                 instances: Mapping[str, Sequence[Mapping[str, str]]]):
        self.flags, self.attributes, self.instances = flags, attributes, instances
        self._projections: Dict[Tuple[str, ...], tuple] = {}

    def projection(self, names: Tuple[str, ...]) -> tuple:
        """What a spec reading `names` sees of this node, as identities of interned sets: equal for nodes alike.
        Kept for the last few specs (features outlive node snapshots, so a node change costs one node's)."""
        found = self._projections.get(names)
        if found is None:
            found = tuple((id(self.flags.get(n)), id(self.attributes.get(n)), id(self.instances.get(n)))
                          for n in names)
            if len(self._projections) >= 8:
                self._projections.clear()
            self._projections[names] = found
        return found

    def __repr__(self) -> str:
        return f"NodeFeatures({len(self.flags)} flag, {len(self.attributes)} attribute, {len(self.instances)} " \
               "instance sets)"


NO_FEATURES = NodeFeatures({}, {}, {})


def _shared_flags(names: Iterable[str]) -> frozenset:
    flags = frozenset(names)  # weakly referable as it is
    return SHARED.share(hash(("flags", flags)), flags)


def shared_map(values: Mapping[str, str]) -> StringMap:
    shared = StringMap(values)
    return SHARED.share(hash(("map", frozenset(shared.items()))), shared)


def _shared_instances(items: Iterable[Mapping[str, str]]) -> InstanceList:
    shared = InstanceList(shared_map(item) for item in items)
    return SHARED.share(hash(("instances",) + tuple(id(item) for item in shared)), shared)


def _string_map(raw: Any, where: str) -> Dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(f"{where} is not an object of strings")
    return {str(k): v for k, v in raw.items()}


def features_from_object(raw: Any, where: str = "features") -> NodeFeatures:
    """NodeFeatures from NFD's `spec.features` shape: {flags: {set: {elements: {name: {}}}}, attributes: {set:
    {elements: {name: value}}}, instances: {set: {elements: [{attributes: {...}}]}}}; ValueError naming the
    place if the shape is wrong."""
    if raw is None:
        return NO_FEATURES
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    flags: Dict[str, frozenset] = {}
    attributes: Dict[str, Mapping[str, str]] = {}
    instances: Dict[str, Sequence[Mapping[str, str]]] = {}
    for kind in ("flags", "attributes", "instances"):
        sets = raw.get(kind) or {}
        if not isinstance(sets, dict):
            raise ValueError(f"{where}.{kind} is not an object")
        for name, body in sets.items():
            path = f"{where}.{kind}.{name}"
            elements = body.get("elements") if isinstance(body, dict) else None
            key = str(name).lower()
            if kind == "flags":
                if elements is None:
                    elements = {}
                if not isinstance(elements, dict):
                    raise ValueError(f"{path}.elements is not an object")
                flags[key] = _shared_flags(str(k) for k in elements)
            elif kind == "attributes":
                values = _string_map(elements or {}, f"{path}.elements")
                attributes[key] = shared_map(values)
            else:
                if not isinstance(elements or [], list):
                    raise ValueError(f"{path}.elements is not a list")
                items = tuple(_string_map((item or {}).get("attributes") or {} if isinstance(item, dict) else None,
                                          f"{path}.elements[{i}].attributes") for i, item in enumerate(elements or []))
                instances[key] = _shared_instances(items)
    return NodeFeatures(flags, attributes, instances)


def features_changed(old: NodeFeatures, new: NodeFeatures) -> int:
    """How many feature sets differ between two views of a node (added, removed or changed)."""
    return sum(old_sets.get(name) != new_sets.get(name)
               for old_sets, new_sets in ((old.flags, new.flags), (old.attributes, new.attributes),
                                          (old.instances, new.instances))
               for name in set(old_sets) | set(new_sets))


def merge_features(parts: Sequence[NodeFeatures]) -> NodeFeatures:
    """NodeFeatures of several objects for one node, merged as nfd-master does (in the order given): flags are
    united, later attributes overwrite earlier ones, instances are appended."""
    if not parts:
        return NO_FEATURES
    if len(parts) == 1:
        return parts[0]
    flags: Dict[str, frozenset] = {}
    attributes: Dict[str, Dict[str, str]] = {}
    instances: Dict[str, Tuple[Mapping[str, str], ...]] = {}
    for part in parts:
        for name, names in part.flags.items():
            flags[name] = flags.get(name, frozenset()) | names
        for name, values in part.attributes.items():
            attributes.setdefault(name, {}).update(values)
        for name, items in part.instances.items():
            instances[name] = instances.get(name, ()) + tuple(items)
    return NodeFeatures({k: _shared_flags(v) for k, v in flags.items()},
                        {k: shared_map(v) for k, v in attributes.items()},
                        {k: _shared_instances(v) for k, v in instances.items()})


@dataclass(frozen=True)
class Outcome:
    """How one expression (or matchName) fared on a node, for explanations and denials."""

    path: str  # where in the spec
    feature: str
    element: str  # "" for matchName
    expression: str
    holds: bool
    why: str


@dataclass(frozen=True)
class FeatureExpression:
    """One NFD expression: an operator on one element of a feature set (or, as matchName, on element names)."""

    path: str
    op: str
    values: Tuple[str, ...] = ()
    patterns: Tuple[GoRegex, ...] = ()
    bounds: Tuple[Any, ...] = ()  # ints, or (major, minor, patch) with type: version
    version: bool = False

    def __str__(self) -> str:
        op = self.op or '""'
        shown = f"{{op: {op}" + (f", value: {_quote_values(self.values)}" if self.values else "")
        return shown + (", type: version}" if self.version else "}")

    def holds(self, value: Optional[str]) -> Tuple[bool, str]:
        """(whether it holds, why) on an element's value; None: the element is missing."""
        charge(EXPRESSION_COST)
        op = self.op
        if op == "":
            return True, "no operator: always holds"
        if op == "Exists":
            return (True, "present") if value is not None else (False, "missing")
        if op == "DoesNotExist":
            return (True, "missing") if value is None else (False, "present")
        if value is None:
            return False, "missing"
        if op == "In":
            return (True, f"{json.dumps(value)} is listed") if value in self.values else \
                (False, f"{json.dumps(value)} not in {_quote_values(self.values)}")
        if op == "NotIn":
            return (False, f"{json.dumps(value)} is in {_quote_values(self.values)}") if value in self.values else \
                (True, f"{json.dumps(value)} not listed")
        if op == "InRegexp":
            if len(value) > MAX_REGEX_INPUT:
                return False, f"a value longer than {MAX_REGEX_INPUT} characters is not matched against patterns"
            return (True, f"{json.dumps(value)} matches") if any(searched(p, value) for p in self.patterns) else \
                (False, f"{json.dumps(value)} matches none of {_quote_values(self.values)}")
        if op in ("IsTrue", "IsFalse"):
            want = "true" if op == "IsTrue" else "false"
            return (value == want), f"{json.dumps(value)}" + (" is" if value == want else " is not") + f" {want}"
        number = parse_version(value) if self.version else parse_strict_integer(value)
        if number is None:
            return False, f"{json.dumps(value)} is not {'a version' if self.version else 'an integer'}"
        low = self.bounds[0]
        high = self.bounds[-1]
        holds = {"Gt": number > low, "Ge": number >= low, "Lt": number < low, "Le": number <= low,
                 "GtLt": low < number < high, "GeLe": low <= number <= high}[op]
        return holds, f"{json.dumps(value)}" + (" is" if holds else " is not") + f" {_RANGE_WORDS[op]} " + \
            " and ".join(self.values)


_RANGE_WORDS = {"Gt": ">", "Ge": ">=", "Lt": "<", "Le": "<=", "GtLt": "between (exclusive)",
                "GeLe": "between (inclusive)"}


@dataclass(frozen=True)
class FeatureTerm:
    """One matchFeatures term: a feature set, expressions on its elements (by name) and an optional matchName."""

    path: str
    feature: str  # lowercased, as NFD looks it up
    expressions: Tuple[Tuple[str, FeatureExpression], ...]  # (element, expression)
    match_name: Optional[FeatureExpression] = None

    def evaluate(self, features: NodeFeatures) -> Tuple[bool, Tuple[Outcome, ...]]:
        """As NFD's MatchMulti: the expressions hold on the flags or attributes together, or all on one single
        instance; then matchName on any element name. A feature set the node lacks fails the term."""
        name = self.feature
        flags, attrs, insts = features.flags.get(name), features.attributes.get(name), features.instances.get(name)
        if flags is None and attrs is None and insts is None:
            return False, tuple(Outcome(f"{self.path}.matchExpressions.{element}", name, element, str(e), False,
                                        f"the node has no feature set {name}") for element, e in self.expressions) \
                or (Outcome(self.path, name, "", "", False, f"the node has no feature set {name}"),)
        outcomes: List[Outcome] = []
        matched = True
        if self.expressions:
            set_matched = flags is not None or attrs is not None
            for element, expression in self.expressions:
                holds, why = self._on_sets(expression, element, flags, attrs)
                set_matched = set_matched and holds
                outcomes.append(Outcome(f"{self.path}.matchExpressions.{element}", name, element, str(expression),
                                        holds, why))
            if not set_matched and insts:  # then the instances: all expressions on one of them
                outcomes = max((self._on_instance(insts, i) for i in range(len(insts))),
                               key=lambda on_one: sum(o.holds for o in on_one))  # the first best, evaluated once
                matched = all(o.holds for o in outcomes)
            else:
                matched = set_matched
        if matched and self.match_name is not None:
            every = sorted(set(flags or ()) | set(attrs or ()) | {k for i in insts or () for k in i})
            charge(len(every) // 4)
            hit = next((n for n in every if self.match_name.holds(n)[0]), None)
            matched = hit is not None
            outcomes.append(Outcome(f"{self.path}.matchName", name, "", str(self.match_name), matched,
                                    f"element {json.dumps(hit)} matches" if hit is not None else
                                    f"no element name of {name} matches"))
        return matched, tuple(outcomes)

    @staticmethod
    def _on_sets(expression: FeatureExpression, element: str, flags: Optional[frozenset],
                 attrs: Optional[Mapping[str, str]]) -> Tuple[bool, str]:
        """One expression on the flags and attributes of the set: it holds if it holds on either (DoesNotExist:
        on both); a flag has no value, so only Exists, DoesNotExist and no operator can hold on one."""
        in_flags = flags is not None and element in flags
        value = attrs.get(element) if attrs is not None else None
        if expression.op == "DoesNotExist":
            present = in_flags or value is not None
            return (not present), ("present" if present else "missing")
        if value is not None:
            holds, why = expression.holds(value)
            if holds or not in_flags:
                return holds, why
        if in_flags:
            return (expression.op in ("", "Exists")), ("a flag (no value)" if expression.op not in ("", "Exists")
                                                       else "present")
        return expression.holds(None)

    def _on_instance(self, insts: Sequence[Mapping[str, str]], index: int) -> List[Outcome]:
        """The expressions on one instance (the first on which all hold wins the max above, being first)."""
        attributes = insts[index]
        return [Outcome(f"{self.path}.matchExpressions.{element}", self.feature, element, str(e),
                        *_with_instance(e.holds(attributes.get(element)), index)) for element, e in self.expressions]


def _with_instance(result: Tuple[bool, str], index: int) -> Tuple[bool, str]:
    return result[0], f"{result[1]} (instance {index})"


@dataclass(frozen=True)
class FeatureRule:
    """One rule: its matchFeatures terms must all match and, when matchAny is there, one of its blocks."""

    path: str
    name: str
    terms: Tuple[FeatureTerm, ...]
    any_of: Tuple[Tuple[FeatureTerm, ...], ...] = ()

    def evaluate(self, features: NodeFeatures) -> Tuple[bool, Tuple[Outcome, ...]]:
        outcomes: List[Outcome] = []
        matched = True
        for term in self.terms:
            holds, found = term.evaluate(features)
            matched = matched and holds
            outcomes.extend(found)
        if self.any_of:
            any_matched = False
            for block in self.any_of:
                block_holds = True
                for term in block:
                    holds, found = term.evaluate(features)
                    block_holds = block_holds and holds
                    outcomes.extend(found)
                any_matched = any_matched or block_holds
            matched = matched and any_matched
        return matched, tuple(outcomes)

    @property
    def features(self) -> frozenset:
        return frozenset(t.feature for t in self.terms + tuple(t for block in self.any_of for t in block))


def _parse_feature_expression(raw: Any, path: str, budget: List[int]) -> FeatureExpression:
    """One NFD expression, validated whole: operator, value count, integers or versions, regexes."""
    _require(raw, dict, path, "an object with op and value")
    _only_keys(raw, ("op", "value", "type"), path)
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(f"{path}: the spec has more than {MAX_EXPRESSIONS} expressions")
    op = _string(raw.get("op", ""), f"{path}.op")
    op = NFD_ALIASES.get(op, op)
    if op not in NFD_OPERATORS:
        raise SpecError(f"{path}.op: unknown operator {json.dumps(op)} (expected one of "
                        f"{', '.join(o for o in NFD_OPERATORS if o)}, or none)")
    kind = _string(raw.get("type", ""), f"{path}.type")
    if kind not in ("", "version"):
        raise SpecError(f"{path}.type: unknown type {json.dumps(kind)} (expected version)")
    if kind and op not in RANGE_OPERATORS:
        raise SpecError(f"{path}.type: type version goes only with {', '.join(RANGE_OPERATORS)}, not {op}")
    values = _parse_values(raw.get("value"), f"{path}.value")
    wanted = {"": 0, "Exists": 0, "DoesNotExist": 0, "IsTrue": 0, "IsFalse": 0, "Gt": 1, "Ge": 1, "Lt": 1, "Le": 1,
              "GtLt": 2, "GeLe": 2}.get(op)
    if wanted is not None and len(values) != wanted:
        raise SpecError(f"{path}.value: operator {op or '(none)'} takes "
                        + ("no value" if not wanted else f"exactly {wanted} value" + "s" * (wanted > 1))
                        + f", got {len(values)}")
    if wanted is None and not values:
        raise SpecError(f"{path}.value: operator {op} needs at least one value")
    patterns = tuple(compile_pattern(v, f"{path}.value[{i}]") for i, v in enumerate(values)) \
        if op == "InRegexp" else ()
    bounds: Tuple[Any, ...] = ()
    if op in RANGE_OPERATORS:
        parse = parse_version if kind else parse_strict_integer
        parsed = [parse(v) for v in values]
        for i, (text, bound) in enumerate(zip(values, parsed)):
            if bound is None:
                raise SpecError(f"{path}.value[{i}]: {json.dumps(text)} is not "
                                + ("a version (v?MAJOR[.MINOR[.PATCH]])" if kind else "an integer"))
        bounds = tuple(parsed)
        if len(bounds) == 2 and not bounds[0] < bounds[1]:
            raise SpecError(f"{path}.value: {op} needs the lower bound first, got {values[0]} and {values[1]}")
    return FeatureExpression(path, op, values, patterns, bounds, bool(kind))


def _parse_term(raw: Any, path: str, budget: List[int]) -> FeatureTerm:
    _require(raw, dict, path, "an object with feature and matchExpressions or matchName")
    _only_keys(raw, ("feature", "matchExpressions", "matchName"), path)
    feature = _string(raw.get("feature"), f"{path}.feature", "a feature name (a string)").lower()
    if not feature:
        raise SpecError(f"{path}.feature: empty feature name")
    expressions = raw.get("matchExpressions")
    if expressions is None:
        expressions = {}
    _require(expressions, dict, f"{path}.matchExpressions", "a mapping of element name to expression")
    parsed = tuple((_string(element, f"{path}.matchExpressions", "element names (strings)"),
                    _parse_feature_expression(e, f"{path}.matchExpressions.{element}", budget))
                   for element, e in expressions.items())
    match_name = raw.get("matchName")
    return FeatureTerm(path, feature, parsed, None if match_name is None
                       else _parse_feature_expression(match_name, f"{path}.matchName", budget))


def _parse_terms(raw: Any, path: str, budget: List[int]) -> Tuple[FeatureTerm, ...]:
    if raw is None:
        return ()
    _require(raw, list, path, "a list of terms")
    return tuple(_parse_term(t, f"{path}[{i}]", budget) for i, t in enumerate(raw))


def _parse_feature_rule(raw: Any, path: str, budget: List[int]) -> FeatureRule:
    _require(raw, dict, path, "an object with matchFeatures or matchAny")
    _only_keys(raw, ("name", "matchFeatures", "matchAny"), path)
    name = _string(raw.get("name", ""), f"{path}.name")
    terms = _parse_terms(raw.get("matchFeatures"), f"{path}.matchFeatures", budget)
    blocks = raw.get("matchAny")
    any_of: List[Tuple[FeatureTerm, ...]] = []
    if blocks is not None:
        _require(blocks, list, f"{path}.matchAny", "a list of {matchFeatures: [...]} blocks")
        for b, block in enumerate(blocks):
            where = f"{path}.matchAny[{b}]"
            _require(block, dict, where, "an object with matchFeatures")
            _only_keys(block, ("matchFeatures",), where)
            any_of.append(_parse_terms(block.get("matchFeatures"), f"{where}.matchFeatures", budget))
    return FeatureRule(path, name, terms, tuple(any_of))


def is_nfd_dialect(data: Mapping[str, Any]) -> bool:
    """Whether a spec is in NFD's dialect: a term with `feature` or matchName, a matchExpressions mapping, or
    matchAny; SpecError if it also has ocifit's (matchExpressions lists). With neither, what ocifit's dialect
    requires left out (a tag, a rule's matchFeatures) makes it NFD's."""
    nfd, ocifit, loose = [], [], []
    for c, compatibility in enumerate(_as_list(data.get("compatibilities"))):
        if not isinstance(compatibility, dict):
            continue
        if "tag" not in compatibility:
            loose.append(c)
        for r, rule in enumerate(_as_list(compatibility.get("rules"))):
            if not isinstance(rule, dict):
                continue
            where = f"compatibilities[{c}].rules[{r}]"
            if "matchAny" in rule:
                nfd.append(f"{where}.matchAny")
            if "matchFeatures" not in rule:
                loose.append(c)
            for f, term in enumerate(_as_list(rule.get("matchFeatures"))):
                if not isinstance(term, dict):
                    continue
                expressions = term.get("matchExpressions")
                if "feature" in term or isinstance(expressions, dict) or "matchName" in term:
                    nfd.append(f"{where}.matchFeatures[{f}]")
                elif isinstance(expressions, list):
                    ocifit.append(f"{where}.matchFeatures[{f}]")
    if nfd and ocifit:
        raise SpecError(f"{ocifit[0]}: the spec mixes two dialects: ocifit's (a list of matchExpressions with "
                        f"keys, here) and NFD's (feature sets, at {nfd[0]}); write it in one")
    return bool(nfd) or (not ocifit and bool(loose))


def _as_list(value: Any) -> List[Any]:
    return value if isinstance(value, list) else []


def parse_spec(data: Any) -> Spec:
    """Validate a compatibility spec (bytes, text or parsed JSON) as a whole, or raise SpecError."""
    if isinstance(data, (bytes, str)):
        size = len(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"spec: {size} bytes, over the limit of {MAX_SPEC_BYTES // 1024} KiB")
        data = load_document(data, "spec")
    _require(data, dict, "spec", "an object with compatibilities")
    version = _string(data.get("version", ""), "version")
    items = _require(data.get("compatibilities"), list, "compatibilities", "a list")
    if not items:
        raise SpecError("compatibilities: the spec lists no compatibilities")
    if len(items) > MAX_COMPATIBILITIES:
        raise SpecError(f"compatibilities: more than {MAX_COMPATIBILITIES} entries, the limit")
    rules = sum(len(c["rules"]) for c in items if isinstance(c, dict) and isinstance(c.get("rules"), list))
    if rules > MAX_RULES:
        raise SpecError(f"compatibilities: {rules} rules in all, over the limit of {MAX_RULES}")
    budget = [MAX_EXPRESSIONS]
    if is_nfd_dialect(data):
        compatibilities = tuple(_parse_nfd_compatibility(raw, i, budget) for i, raw in enumerate(items))
        features = frozenset(f for c in compatibilities for rule in c.rules for f in rule.features)
        return Spec(version, compatibilities, frozenset(), features, nfd=True)
    compatibilities = tuple(_parse_compatibility(raw, i, budget) for i, raw in enumerate(items))
    keys = frozenset(e.key for c in compatibilities for e in c.expressions)
    return Spec(version, compatibilities, keys)


_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\u[dD][89a-fA-F][0-9a-fA-F]{2})")
_SPEC_JSON = json.JSONDecoder(parse_int=_bounded_int, parse_constant=str)


def load_document(data: Any, what: str) -> Any:
    """JSON or YAML text (the subset load_yaml reads) as plain values; SpecError saying which and where."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise SpecError(f"{what} is not UTF-8 text (byte {exc.start})") from None
    body = text[1:] if text.startswith("\ufeff") else text  # one byte order mark, as YAML readers take it
    if body.lstrip()[:1] in ("{", "["):
        # Read as NFD reads it (YAML 1.1 through yaml.v2): bare NaN and Infinity are words, not numbers, and a
        # UTF-16 surrogate escape is an error, not half of a character.
        surrogate = _SURROGATE_ESCAPE.search(body)
        if surrogate:
            raise SpecError(f"{what}: {surrogate.group(1)} is a UTF-16 surrogate escape, which NFD's YAML reader "
                            "refuses; write the character itself")
        try:
            return _SPEC_JSON.decode(body)
        except ValueError as exc:
            raise SpecError(f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise SpecError(f"{what} is not valid JSON: nested too deeply") from None
    try:
        return load_yaml(text)
    except YAMLError as exc:
        raise SpecError(f"{what} is neither JSON nor YAML that ocifit reads: {exc}") from None
    except (ValueError, OverflowError) as exc:  # a number too large to hold
        raise SpecError(f"{what}: a number out of range ({type(exc).__name__})") from None


def _parse_nfd_compatibility(raw: Any, index: int, budget: List[int]) -> Compatibility:
    path, tag, description, weight, rules = _compatibility_head(raw, index, ("tag", "weight", "description", "rules"),
                                                                empty_tag=True)
    parsed = tuple(_parse_feature_rule(rule, f"{path}.rules[{r}]", budget) for r, rule in enumerate(rules))
    return Compatibility(index, tag, description, weight, rules=parsed)


# ============================================================================================
# Node view: nodes, snapshots, which nodes a pod can land on, and where nodes come from
# ============================================================================================

@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


UNSCHEDULABLE_TAINT = Taint("node.kubernetes.io/unschedulable", "", "NoSchedule")


PER_NODE_LABELS = frozenset({"kubernetes.io/hostname"})


class NodeLabels(collections.abc.Mapping):
    """A node's labels: a base that every node of the same shape shares (one dict for hundreds of nodes),
    and the few labels that name the node itself (its hostname)."""

    __slots__ = ("base", "own")

    def __init__(self, base: Dict[str, str], own: Dict[str, str]):
        self.base, self.own = base, own

    @classmethod
    def of(cls, name: str, labels: Mapping[str, str]) -> "NodeLabels":
        own = {k: v for k, v in labels.items() if k in PER_NODE_LABELS or v == name}
        base = {k: v for k, v in labels.items() if k not in own}
        return cls(shared_map(base), own)

    def __getitem__(self, key: str) -> str:
        value = self.own.get(key)
        return self.base[key] if value is None else value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.own.get(key)
        return self.base.get(key, default) if value is None else value

    def __contains__(self, key: object) -> bool:
        return key in self.own or key in self.base

    def __iter__(self) -> Iterator[str]:
        yield from self.own
        yield from self.base

    def __len__(self) -> int:
        return len(self.own) + len(self.base)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NodeLabels):
            return (self.base is other.base or self.base == other.base) and self.own == other.own
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"NodeLabels({dict(self.items())!r})"


@dataclass(frozen=True)
class Node:
    """What decisions need of a node, and nothing more."""

    name: str
    labels: Mapping[str, str]
    unschedulable: bool = False
    taints: Tuple[Taint, ...] = ()  # NoSchedule and NoExecute only: the ones that keep pods off
    features: Optional[NodeFeatures] = None  # from NFD's NodeFeature objects, when there are any

    @property
    def control_plane(self) -> bool:
        return any(k in self.labels for k in CONTROL_PLANE_LABELS)

    @property
    def blocking_taints(self) -> Tuple[Taint, ...]:
        return self.taints + ((UNSCHEDULABLE_TAINT,) if self.unschedulable else ())

    @property
    def shape(self) -> tuple:
        """What nodes share when they differ only in their own labels (hostname): decisions group by it."""
        labels = self.labels
        if isinstance(labels, NodeLabels):
            return id(labels.base), frozenset(labels.own), self.control_plane, self.blocking_taints
        return id(labels), frozenset(), self.control_plane, self.blocking_taints


def node_from_object(obj: Any) -> Node:
    """A Node from a Kubernetes Node object; ValueError, naming the node and field, if its shape is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("a node is not an object")
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if not isinstance(meta, dict):
        raise ValueError("node metadata is not an object")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("node without metadata.name")
    raw_labels = meta.get("labels") or {}
    if not isinstance(raw_labels, dict) or not all(isinstance(v, str) for v in raw_labels.values()):
        raise ValueError(f"node {name}: metadata.labels is not an object of strings")
    if not isinstance(spec, dict):
        raise ValueError(f"node {name}: spec is not an object")
    raw_taints = spec.get("taints") or []
    if not isinstance(raw_taints, list) or not all(isinstance(t, dict) for t in raw_taints):
        raise ValueError(f"node {name}: spec.taints is not a list of objects")
    labels = NodeLabels.of(name, {str(k): v for k, v in raw_labels.items()})
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
        for t in raw_taints if t.get("effect") in ("NoSchedule", "NoExecute"))
    return Node(name, labels, bool(spec.get("unschedulable")), taints)


def slim_node(obj: Dict[str, Any]) -> Dict[str, Any]:
    """A json object_hook that keeps of a Node object only what node_from_object reads, as it is parsed,
    so a large node list never holds every node's status, images and managed fields at once."""
    meta, spec = obj.get("metadata"), obj.get("spec")
    if not isinstance(meta, dict) or not ("spec" in obj or "status" in obj) or "items" in obj \
            or obj.get("kind", "Node") != "Node":  # a Status (watch ERROR) also has metadata and status
        return obj
    slim: Dict[str, Any] = {"metadata": {k: meta[k] for k in ("name", "labels", "resourceVersion") if k in meta}}
    if isinstance(spec, dict):
        slim["spec"] = {k: spec[k] for k in ("unschedulable", "taints") if k in spec}
    if "kind" in obj:
        slim["kind"] = obj["kind"]
    return slim


def nodes_from_document(doc: Any) -> List[Node]:
    """Nodes from a NodeList (or List, or bare list) as `kubectl get nodes -o json` prints it."""
    items = doc.get("items") if isinstance(doc, dict) else doc
    if isinstance(doc, dict) and doc.get("kind") == "Node":
        items = [doc]
    if not isinstance(items, list):
        raise ValueError("expected a NodeList with items")
    return [node_from_object(item) for item in items]


NODE_NAME_LABEL = "nfd.node.kubernetes.io/node-name"  # NFD: the node a NodeFeature object describes


@dataclass(frozen=True)
class FeatureObject:
    """What ocifit keeps of one NodeFeature object: where it is, its node, its features."""

    namespace: str
    name: str
    node: str
    features: NodeFeatures


def feature_object(obj: Any) -> FeatureObject:
    """A FeatureObject from a NodeFeature (nfd.k8s-sigs.io/v1alpha1); ValueError naming the object and field."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise ValueError("a NodeFeature without metadata")
    meta = obj["metadata"]
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "")
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    node = labels.get(NODE_NAME_LABEL)
    if not isinstance(node, str) or not node:
        raise ValueError(f"NodeFeature {namespace}/{name} has no {NODE_NAME_LABEL} label naming its node")
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise ValueError(f"NodeFeature {namespace}/{name}: spec is not an object")
    return FeatureObject(namespace, name, node,
                         features_from_object(spec.get("features"), f"NodeFeature {namespace}/{name} spec.features"))


def admitted(namespace: str, namespaces: Sequence[str]) -> bool:
    """Whether NodeFeatures in this namespace count: --node-feature-namespaces names it, or names none."""
    return not namespaces or namespace in namespaces


def merge_by_node(objects: Iterable[FeatureObject], nfd_namespace: str) -> Dict[str, NodeFeatures]:
    """Each node's features, its NodeFeature objects merged as nfd-master does: those in NFD's own namespace
    first, then by name, then by namespace."""
    by_node: Dict[str, List[FeatureObject]] = collections.defaultdict(list)
    for obj in objects:
        by_node[obj.node].append(obj)
    return {node: merge_features([o.features for o in sorted(objs, key=lambda o: (o.namespace != nfd_namespace,
                                                                                    o.name, o.namespace))])
            for node, objs in by_node.items()}


def features_from_document(doc: Any, nfd_namespace: str, namespaces: Sequence[str] = ()
                           ) -> Dict[str, NodeFeatures]:
    """Features by node name from `kubectl get nodefeatures -A -o json` output (a List), one NodeFeature, or a
    bare {flags, attributes, instances} object (as the features of a node named ""); `namespaces`: the only
    namespaces whose objects count, if any."""
    items = doc.get("items") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and not isinstance(items, list) and (doc.get("kind") == "NodeFeature" or "spec" in doc):
        items = [doc]
    if isinstance(items, list):
        return merge_by_node((o for o in map(feature_object, items) if admitted(o.namespace, namespaces)),
                             nfd_namespace)
    if isinstance(doc, dict) and set(doc) <= {"flags", "attributes", "instances"}:
        return {"": features_from_object(doc)}
    raise ValueError("expected a NodeFeature list, a NodeFeature, or an object of flags, attributes and instances")


@dataclass(frozen=True)
class NodeGroup:
    """Nodes that look alike to a decision: same values for the keys asked about, same taints."""

    labels: Mapping[str, str]  # only the keys asked about
    control_plane: bool
    taints: Tuple[Taint, ...]
    names: Tuple[str, ...]  # in no particular order: messages sort what they show
    features: NodeFeatures = NO_FEATURES  # one member's: alike, for the feature sets asked about, in all


class NodeSnapshot:
    """An immutable view of the cluster's nodes. Request threads share it; updates build a new one.

    Nodes are indexed by shape (shared base labels, own label keys, role, taints), so grouping thousands
    of nodes for a decision walks the few shapes, not every node; `with_node` carries the index over.

    Three things are cached on a snapshot, all derived from its nodes alone and bounded (CACHE_BOUNDS): the
    shape index, the partitions of its nodes by label keys, and `memo`, the choices made on it (keyed by the
    spec object and the pod's Placement, both immutable). Since the nodes never change under a snapshot, a
    cached answer is the answer; a node change makes a new snapshot with empty partitions and memo."""

    def __init__(self, nodes: Iterable[Node] = (), synced_at: Optional[float] = None, features_note: str = ""):
        self.nodes: Dict[str, Node] = {n.name: n for n in nodes}
        self.synced_at = time.time() if synced_at is None else synced_at
        self.features_note = features_note  # why the nodes carry no NFD features, if they may not
        self._shapes: Optional[Dict[tuple, Dict[str, Node]]] = None
        self._partitions = BoundedCache(CACHE_BOUNDS["partitions"])
        self._label_sets: Optional[int] = None
        self.memo = BoundedCache(CACHE_BOUNDS["decisions"])  # decisions on this snapshot (see choose_for)
        self.computing: Dict[tuple, threading.Event] = {}  # memo keys being computed, and how to wait for them
        self.lock = threading.Lock()

    @classmethod
    def from_dict(cls, nodes: Mapping[str, Node], shapes: Optional[Dict[tuple, Dict[str, Node]]] = None,
                  features_note: str = "") -> "NodeSnapshot":
        """A snapshot of a name -> Node map, copied at C speed."""
        snapshot = cls(features_note=features_note)
        snapshot.nodes = dict(nodes)
        snapshot._shapes = shapes
        return snapshot

    def with_node(self, name: str, node: Optional[Node]) -> "NodeSnapshot":
        """A new snapshot with one node added, replaced or (None) removed; the shape index is carried over,
        touching only the shapes the node left and joined."""
        nodes = dict(self.nodes)
        old = nodes.pop(name, None)
        if node is not None:
            nodes[name] = node
        shapes = None
        if self._shapes is not None:
            shapes = dict(self._shapes)
            if old is not None:
                members = dict(shapes[old.shape])
                del members[name]
                if members:
                    shapes[old.shape] = members
                else:
                    del shapes[old.shape]
            if node is not None:
                members = dict(shapes.get(node.shape, {}))
                members[name] = node
                shapes[node.shape] = members
        return NodeSnapshot.from_dict(nodes, shapes, self.features_note)

    def __len__(self) -> int:
        return len(self.nodes)

    def shapes(self) -> Dict[tuple, Dict[str, Node]]:
        if self._shapes is None:
            shapes: Dict[tuple, Dict[str, Node]] = {}
            for node in self.nodes.values():
                shapes.setdefault(node.shape, {})[node.name] = node
            self._shapes = shapes
        return self._shapes

    def partition(self, keys: frozenset, features: frozenset = frozenset()) -> Tuple[NodeGroup, ...]:
        """The nodes grouped by their values for the label `keys`, by the feature sets named in `features` (as
        interned objects: nodes of one hardware kind share them), by their taints and their role; cached."""
        cached = self._partitions.get((keys, features))
        if cached is not None:
            return cached
        ordered, feature_names = sorted(keys), tuple(sorted(features))
        buckets: Dict[tuple, List[str]] = collections.defaultdict(list)
        samples: Dict[tuple, NodeFeatures] = {}
        for (_, own_keys, control_plane, taints), members in self.shapes().items():
            if keys.isdisjoint(own_keys) and not features:  # every member answers alike: ask one
                labels = next(iter(members.values())).labels
                buckets[(tuple(labels.get(k) for k in ordered), (), control_plane, taints)].extend(members)
                continue
            for node in members.values():
                node_features = node.features or NO_FEATURES
                bucket = (tuple(node.labels.get(k) for k in ordered), node_features.projection(feature_names),
                          control_plane, taints)
                buckets[bucket].append(node.name)
                samples.setdefault(bucket, node_features)
        groups = tuple(
            NodeGroup({k: v for k, v in zip(ordered, values) if v is not None}, control_plane, taints, tuple(names),
                      samples.get((values, projection, control_plane, taints), NO_FEATURES))
            for (values, projection, control_plane, taints), names in buckets.items())
        self._partitions.put((keys, features), groups,
                             64 * (len(keys) + len(features) + 1) * len(groups) + 8 * len(self.nodes))
        return groups

    def label_sets(self) -> int:
        """How many distinct label sets the nodes carry (computed once per snapshot)."""
        if self._label_sets is None:
            self._label_sets = len({(id(n.labels.base), frozenset(n.labels.own.items()))
                                    if isinstance(n.labels, NodeLabels) else frozenset(n.labels.items())
                                    for n in self.nodes.values()})
        return self._label_sets

    def shape_count(self) -> int:
        """How many kinds of node there are, per-node labels aside."""
        return len(self.shapes())


@dataclass(frozen=True)
class Requirement:
    """A node selector requirement (nodeSelector entry or affinity matchExpression)."""

    key: str
    op: str
    values: Tuple[str, ...] = ()

    def holds(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "In":
            return value is not None and value in self.values
        if self.op == "NotIn":
            return value is None or value not in self.values
        if self.op == "Exists":
            return value is not None
        if self.op == "DoesNotExist":
            return value is None
        number, bound = parse_integer(value or ""), parse_integer(self.values[0]) if self.values else None
        if number is None or bound is None:
            return False
        return number > bound if self.op == "Gt" else number < bound

    def __str__(self) -> str:
        if self.op in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.op}"
        return f"{self.key} {self.op} {list(self.values)}"


@dataclass(frozen=True)
class Term:
    """One nodeSelectorTerm: label requirements and metadata.name requirements, all ANDed."""

    labels: Tuple[Requirement, ...]
    names: Tuple[Requirement, ...]

    def select(self, group: NodeGroup) -> Tuple[str, ...]:
        charge(len(self.labels))
        if not all(r.holds(group.labels) for r in self.labels):
            return ()
        if not self.names:
            return group.names
        charge(len(self.names) * len(group.names))
        return tuple(n for n in group.names if all(r.holds({"metadata.name": n}) for r in self.names))


class Toleration(NamedTuple):
    """A pod toleration. A tuple, not a dataclass: every pod carries a few (the API server adds two), and
    placements holding them are memo keys, so building, hashing and comparing them stays in C."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.key
        return self.key == taint.key and self.value == taint.value


class Placement(NamedTuple):
    """Where a pod may run: its nodeSelector, required node affinity and tolerations. A tuple, like Toleration:
    one is made for every admission and is the key of the decision memo."""

    node_selector: Tuple[Tuple[str, str], ...] = ()
    terms: Optional[Tuple[Term, ...]] = None  # None: no required node affinity
    tolerations: Tuple[Toleration, ...] = ()

    @property
    def constrained(self) -> bool:
        return bool(self.node_selector) or self.terms is not None

    @property
    def size(self) -> int:
        """Roughly the bytes it holds: a memo keyed by it must not keep a huge one."""
        items = len(self.node_selector) + len(self.tolerations) + sum(len(t.labels) + len(t.names)
                                                                      for t in self.terms or ())
        return 200 * items + 100

    @property
    def keys(self) -> frozenset:
        keys = {k for k, _ in self.node_selector}
        for term in self.terms or ():
            keys.update(r.key for r in term.labels)
        return frozenset(keys)

    def tolerates(self, taints: Iterable[Taint]) -> bool:
        return all(any(t.tolerates(taint) for t in self.tolerations) for taint in taints)

    def select(self, group: NodeGroup) -> Tuple[str, ...]:
        """The names in the group this pod can land on."""
        charge(1 + len(self.node_selector) + len(self.tolerations) * len(group.taints))
        if not self.tolerates(group.taints):
            return ()
        if not self.constrained and group.control_plane:
            return ()
        if any(group.labels.get(k) != v for k, v in self.node_selector):
            return ()
        if self.terms is None:
            return group.names
        chosen: set = set()
        for term in self.terms:
            chosen.update(term.select(group))
        return tuple(n for n in group.names if n in chosen)

    def describe(self, most: int = 20) -> str:
        """The selector and affinity in words, at most `most` requirements of each (a pod may carry thousands)."""
        parts = []
        if self.node_selector:
            shown = json.dumps(dict(self.node_selector[:most]), sort_keys=True)
            parts.append("nodeSelector " + shown + _more(len(self.node_selector) - most))
        if self.terms is not None:
            terms = " OR ".join("(" + " AND ".join(str(r) for r in (t.labels + t.names)[:most])
                                + _more(len(t.labels + t.names) - most) + ")" for t in self.terms[:most])
            parts.append("required node affinity " + (terms or "(no terms)") + _more(len(self.terms) - most))
        return " and ".join(parts) if parts else "schedulable worker nodes"


class PodShapeError(ValueError):
    """The pod's spec (or metadata) is not the shape Kubernetes gives it; the message names the field."""


def _mapping(value: Any, path: str) -> Dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise PodShapeError(f"{path} must be an object of strings")
    return value


def _list(value: Any, path: str) -> List[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PodShapeError(f"{path} must be a list")
    return value


def _requirements(items: Any, path: str) -> Tuple[Requirement, ...]:
    result = []
    for i, item in enumerate(_list(items, path)):
        where = f"{path}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise PodShapeError(f"{where} must be an object with a key")
        op = item.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"):
            raise PodShapeError(f"{where}.operator {json.dumps(op)} is not a node selector operator")
        values = tuple(str(v) for v in _list(item.get("values"), f"{where}.values"))
        if op in ("Gt", "Lt") and (len(values) != 1 or parse_integer(values[0]) is None):
            raise PodShapeError(f"{where}: {op} needs one integer value")
        result.append(Requirement(item["key"], op, values))
    return tuple(result)


def parse_placement(spec: Mapping[str, Any]) -> Placement:
    """The pod's nodeSelector, required node affinity and tolerations."""
    selector = _mapping(spec.get("nodeSelector"), "spec.nodeSelector")
    terms = None
    affinity = (spec.get("affinity") or {}).get("nodeAffinity") if isinstance(spec.get("affinity"), dict) else None
    required = (affinity or {}).get("requiredDuringSchedulingIgnoredDuringExecution") \
        if isinstance(affinity, dict) else None
    if isinstance(required, dict):
        path = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
        parsed = []
        for i, term in enumerate(_list(required.get("nodeSelectorTerms"), path)):
            if not isinstance(term, dict):
                raise PodShapeError(f"{path}[{i}] must be an object")
            labels = _requirements(term.get("matchExpressions"), f"{path}[{i}].matchExpressions")
            names = _requirements(term.get("matchFields"), f"{path}[{i}].matchFields")
            if any(r.key != "metadata.name" for r in names):
                raise PodShapeError(f"{path}[{i}].matchFields supports only metadata.name")
            if labels or names:  # an empty term matches no node
                parsed.append(Term(labels, names))
        terms = tuple(parsed)
    tolerations = []
    for i, item in enumerate(_list(spec.get("tolerations"), "spec.tolerations")):
        if not isinstance(item, dict):
            raise PodShapeError(f"spec.tolerations[{i}] must be an object")
        tolerations.append(Toleration(str(item.get("key") or ""), str(item.get("operator") or "Equal"),
                                      str(item.get("value") or ""), str(item.get("effect") or "")))
    return Placement(tuple(sorted(selector.items())), terms, tuple(tolerations))


def _more(hidden: int) -> str:
    return f" …+{hidden} more" if hidden > 0 else ""


class NodeSource(Protocol):
    """Where admissions get their view of the nodes: a file (StaticNodes) or the cluster (KubeNodes)."""

    def snapshot(self) -> NodeSnapshot:
        """The current view; never blocks on I/O."""

    def health(self) -> Tuple[bool, str]:
        """(ready, why) for /readyz."""

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the first full view is in; False if it was not within timeout seconds."""

    def stop(self) -> None:
        """Stop watching."""


class StaticNodes:
    """Nodes from a NodeList file, and their NFD features from a NodeFeature list if one is given, both re-read
    when they change (a ConfigMap update, say)."""

    def __init__(self, path: str, interval: float = 2.0, features_path: str = "",
                 nfd_namespace: str = DEFAULTS["nfd_namespace"], namespaces: Sequence[str] = ()):
        self.path, self.nfd_namespace, self.namespaces = path, nfd_namespace, namespaces
        paths = [path] + ([features_path] if features_path else [])
        self.file = WatchedFile(paths, self._load, "nodes" + (" and node features" if features_path else ""),
                                interval)

    def _load(self, contents: List[bytes]) -> NodeSnapshot:
        nodes = nodes_from_document(load_json(contents[0], slim_node))
        if len(contents) == 1:
            return NodeSnapshot(nodes, features_note="no NodeFeatures: ocifit reads nodes from a file, and no "
                                                     "--node-features file was given")
        features = features_from_document(load_json(contents[1]), self.nfd_namespace, self.namespaces)
        return NodeSnapshot(dataclasses.replace(n, features=features.get(n.name, NO_FEATURES)) for n in nodes)

    def snapshot(self) -> NodeSnapshot:
        return self.file.value

    def wait_synced(self, timeout: float) -> bool:
        return True  # read at construction

    def health(self) -> Tuple[bool, str]:
        count = len(self.file.value)
        if not count:
            return False, f"no nodes in {self.path}" + (f" ({self.file.error})" if self.file.error else "")
        return True, self.file.error or f"{count} nodes from {self.path}"

    def stop(self) -> None:
        self.file.stop()


# ---- the cluster: a Kubernetes REST client and a list+watch node cache --------------------

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REREAD_SECONDS = 60.0
MAX_EVENT_BYTES = 16 * MiB


class KubeAPIError(Exception):
    """An API server answer other than success; `status` is its HTTP code (410: Gone)."""

    def __init__(self, message: str, status: int = 0, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone, reason Expired or Gone): list again at once."""


def watch_error(status: Any, what: str = "node") -> Exception:
    """The exception for a watch ERROR event, whose object is a metav1.Status: _WatchExpired when history was
    compacted past the watch's resourceVersion, else a KubeAPIError with the status's code and message."""
    if not isinstance(status, dict):
        return KubeAPIError(f"{what} watch error: {str(status)[:200]}")
    code, reason = status.get("code"), status.get("reason")
    message = str(status.get("message") or reason or "no message")[:1000]
    if code == 410 or reason in ("Expired", "Gone"):
        return _WatchExpired(f"{code} {reason}: {message}")
    return KubeAPIError(f"{what} watch error {code} {reason or ''}: {message}".replace("  ", " "),
                        code if isinstance(code, int) else 0)


class KubeClient:
    """Kubernetes REST over urllib, with a bearer token re-read every minute and after a 401."""

    def __init__(self, base_url: str, token_file: str = "", ca_file: str = ""):
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        self._token, self._token_read = "", -1e9
        self._lock = threading.Lock()
        context = ssl.create_default_context(cafile=ca_file or None)
        context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)  # 3.13's strict checks refuse kubeadm CAs
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                                  urllib.request.ProxyHandler({}))

    @classmethod
    def in_cluster(cls) -> "KubeClient":
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("not in a cluster (KUBERNETES_SERVICE_HOST unset): pass --nodes FILE or --kube-api URL")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 service address
        return cls(f"https://{host}:{port}", os.path.join(SERVICE_ACCOUNT_DIR, "token"),
                   os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"))

    def token(self, reread: bool = False) -> str:
        """The bearer token, read again when it is a minute old or the server said 401."""
        if not self.token_file:
            return ""
        with self._lock:
            if reread or time.monotonic() - self._token_read > TOKEN_REREAD_SECONDS:
                try:
                    with open(self.token_file) as fh:
                        self._token = fh.read().strip()
                except OSError as exc:
                    log.error("cannot read the API token from %s: %s", self.token_file, exc.strerror or exc)
                self._token_read = time.monotonic()
            return self._token

    def open(self, path: str, query: Mapping[str, str], timeout: float) -> Any:
        """GET path?query; the open response, or KubeAPIError. A 401 re-reads the token and tries once more."""
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(query)}"
        for attempt in (1, 2):
            request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                           "User-Agent": USER_AGENT})
            token = self.token(reread=attempt == 2)
            if token:
                request.add_unredirected_header("Authorization", f"Bearer {token}")
            try:
                return self.opener.open(request, timeout=timeout)
            except urllib.error.HTTPError as err:
                if err.code == 401 and attempt == 1:
                    continue
                raise self._error(err, path) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _error(err: urllib.error.HTTPError, path: str) -> KubeAPIError:
        try:
            status = load_json(err.read(64 * 1024))
            message = status.get("message") or status.get("reason") or ""
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            message = ""
        resource = path.rstrip("/").rsplit("/", 1)[-1]  # nodes, nodefeatures
        hint = (f" (check the token and RBAC: ocifit needs get/list/watch on {resource})"
                if err.code in (401, 403) else "")
        return KubeAPIError(f"API server answered HTTP {err.code}" + (f": {message}" if message else "") + hint,
                            err.code, _retry_after(err.headers.get("Retry-After")))

    def list_objects(self, path: str, convert: Callable[[Dict[str, Any]], Any], page_size: int,
                     object_hook: Optional[Callable[[Dict[str, Any]], Any]] = None, timeout: float = 30.0
                     ) -> Tuple[List[Any], str]:
        """Every object at path, page by page, each converted as its page lands (so a large list is never held
        raw); (items, the list's resourceVersion). Starts over if a page token expires."""
        for _ in range(3):
            items: List[Any] = []
            token = ""
            try:
                while True:
                    query = {"limit": str(page_size)}
                    if token:
                        query["continue"] = token
                    with self.open(path, query, timeout) as response:
                        page = load_json(_read_capped_plain(response, 256 * MiB), object_hook)
                    items.extend(convert(i) for i in page.get("items") or [] if isinstance(i, dict))
                    meta = page.get("metadata") or {}
                    token = meta.get("continue") or ""
                    if not token:
                        return items, str(meta.get("resourceVersion") or "")
            except KubeAPIError as exc:
                if exc.status != 410 or not token:
                    raise
                log.info("list of %s: page token expired; listing again from the start", path)
        raise KubeAPIError(f"list of {path} kept expiring mid-way", 410)

    def watch_objects(self, path: str, resource_version: str, timeout_seconds: int,
                      object_hook: Optional[Callable[[Dict[str, Any]], Any]] = None,
                      on_open: Callable[[], None] = lambda: None) -> Iterator[Dict[str, Any]]:
        """Watch events at path after resource_version until the server ends the stream; bookmarks asked for."""
        query = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_seconds)}
        try:
            response = self.open(path, query, timeout_seconds + 30.0)
        except KubeAPIError as exc:
            if exc.status == 410:
                raise _WatchExpired(str(exc)) from None
            raise
        with response:
            on_open()
            while True:
                line = response.readline(MAX_EVENT_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_EVENT_BYTES:
                    raise KubeAPIError(f"watch event larger than {MAX_EVENT_BYTES} bytes")
                if line.strip():
                    event = load_json(line, object_hook)
                    if isinstance(event, dict):
                        yield event


def _read_capped_plain(response: Any, cap: int) -> bytes:
    body = response.read(cap + 1)
    if len(body) > cap:
        raise KubeAPIError(f"API response larger than {cap} bytes")
    return body


def _describe_change(old: Optional[Node], new: Optional[Node]) -> str:
    """What changed about a node, for the log: keys only, never values of taints or labels beyond keys."""
    if old is None and new is not None:
        return f"node {new.name} added ({len(new.labels)} labels)"
    if new is None and old is not None:
        return f"node {old.name} deleted"
    assert old is not None and new is not None
    parts = []
    added = sorted(set(new.labels) - set(old.labels))
    removed = sorted(set(old.labels) - set(new.labels))
    changed = sorted(k for k in set(new.labels) & set(old.labels) if new.labels[k] != old.labels[k])
    if added or removed or changed:
        parts.append("labels " + " ".join(["+" + k for k in added] + ["~" + k for k in changed]
                                          + ["-" + k for k in removed]))
    if old.unschedulable != new.unschedulable:
        parts.append("cordoned" if new.unschedulable else "uncordoned")
    if old.taints != new.taints:
        taints = ",".join(sorted(f"{t.key}:{t.effect}" for t in new.taints))
        parts.append(f"taints {taints}" if taints else "taints removed")
    return f"node {new.name} " + "; ".join(parts)


class ListWatch:
    """One kind of object kept by list+watch in a thread of its own: paged lists, a watch with bookmarks, an
    expired resourceVersion (410) relisted at once, a full relist every --resync seconds, other errors retried with
    jittered backoff (honouring Retry-After), and a health report. Subclasses say what a list and an event mean."""

    path = ""
    what = ""  # for log lines and readiness: "node", "NodeFeature"
    page_size = 500

    def __init__(self, client: KubeClient, settings: Settings, metrics: Optional[Metrics] = None):
        self.client, self.settings = client, settings
        self.metrics = metrics or Metrics()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._failing_since: Optional[float] = None
        self._last_error = ""
        self._heard = 0.0
        self._thread = threading.Thread(target=self._run, name=f"{self.what}-watch", daemon=True)

    def start(self) -> "ListWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def failing(self) -> Optional[str]:
        """Why the view is not to be trusted: not listed yet, or the watch failing past the threshold."""
        if not self._synced.is_set():
            return f"waiting for the first {self.what} list" + (f" ({self._last_error})" if self._last_error else "")
        if self._failing_since is not None:
            failing = time.monotonic() - self._failing_since
            if failing > self.settings.watch_failure_threshold:
                return f"{self.what} watch failing for {failing:.0f}s: {self._last_error}"
        return None

    # -- what subclasses say --
    def object_hook(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        """A json object_hook that keeps of each object only what convert() reads."""
        return obj

    def convert(self, item: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def replace(self, items: List[Any]) -> None:
        """A full list's converted items (None for skipped ones) replace what was known."""
        raise NotImplementedError

    def apply(self, kind: str, obj: Dict[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED event."""
        raise NotImplementedError

    def unavailable(self, exc: KubeAPIError) -> bool:
        """Whether an error means the kind is not there to list (and so no failure); False by default."""
        return False

    # -- the watcher thread --
    def _run(self) -> None:
        resource_version, listed_at, backoff = "", 0.0, 0.5
        while not self._stop.is_set():
            try:
                if not resource_version or time.monotonic() - listed_at >= self.settings.resync:
                    resource_version, listed_at = self._relist(), time.monotonic()
                resource_version = self._watch(resource_version, listed_at + self.settings.resync)
                backoff = 0.5
            except _WatchExpired as expired:
                log.info("%s watch expired (%s); listing again", self.what, expired)
                resource_version = ""
            except KubeAPIError as exc:
                if self.unavailable(exc):
                    self._healthy()
                    self._synced.set()
                    resource_version = ""
                    self._stop.wait(min(60.0, self.settings.resync))  # look again now and then: it may come
                    continue
                backoff = self._back_off(exc, backoff)
            except Exception as exc:  # the watcher must outlive any error; it reports through readiness
                backoff = self._back_off(exc, backoff)

    def _back_off(self, exc: Exception, backoff: float) -> float:
        self._failed(exc)
        delay = getattr(exc, "retry_after", None)
        self._stop.wait(backoff * random.uniform(0.5, 1.5) if delay is None else delay)
        return min(backoff * 2, 30.0)

    def _failed(self, exc: Exception) -> None:
        self._last_error = str(exc) if isinstance(exc, KubeAPIError) else f"{type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        log.warning("%s view: %s", self.what, self._last_error)

    def _healthy(self) -> None:
        self._failing_since, self._last_error, self._heard = None, "", time.monotonic()

    def _convert_or_none(self, item: Dict[str, Any]) -> Any:
        try:
            return self.convert(item)
        except ValueError as exc:
            log.warning("skipping a %s in the list: %s", self.what, exc)
            return None

    def _relist(self) -> str:
        items, resource_version = self.client.list_objects(self.path, self._convert_or_none, self.page_size,
                                                           self.object_hook)
        self.replace(items)
        self._healthy()
        log.info("listed %d %ss at resourceVersion %s", sum(i is not None for i in items), self.what,
                 resource_version)
        self._synced.set()
        return resource_version

    def _watch(self, resource_version: str, resync_at: float) -> str:
        """Apply watch events until the stream ends; returns the last resourceVersion seen."""
        timeout = int(max(1.0, min(resync_at - time.monotonic(), random.uniform(240, 360))))
        self.metrics.count(f"ocifit_{self.what.lower()}_watch_restarts_total")
        for event in self.client.watch_objects(self.path, resource_version, timeout, self.object_hook,
                                               on_open=self._healthy):
            if self._stop.is_set():
                break
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise watch_error(obj, self.what)
            self._healthy()
            meta = obj.get("metadata") or {} if isinstance(obj, dict) else {}
            resource_version = str(meta.get("resourceVersion") or resource_version)
            if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                try:
                    self.apply(str(kind), obj)
                except ValueError as exc:
                    log.warning("skipping a %s event: %s", self.what, exc)
        return resource_version


class KubeNodes(ListWatch):
    """The cluster's nodes by list+watch, held as an immutable snapshot that a new one replaces on change; with
    NFD's NodeFeatures, when the cluster has them, attached to their nodes.

    Request threads only read `snapshot()`: the API server is never called inside an admission."""

    path, what = "/api/v1/nodes", "node"

    def __init__(self, client: KubeClient, settings: Settings, metrics: Optional[Metrics] = None,
                 watch_features: bool = True):
        super().__init__(client, settings, metrics)
        self._snapshot = NodeSnapshot(features_note="NodeFeatures not listed yet")
        self._lock = threading.Lock()  # two watchers write the snapshot; readers never wait
        self._features: Dict[str, NodeFeatures] = {}
        self.features = KubeNodeFeatures(client, settings, self.metrics, self) if watch_features else None
        self.metrics.gauge("ocifit_node_sync_age_seconds",
                           lambda: time.monotonic() - self._heard if self._heard else None)

    def start(self) -> "KubeNodes":
        super().start()
        if self.features is not None:
            self.features.start()
        return self

    def stop(self) -> None:
        super().stop()
        if self.features is not None:
            self.features.stop()

    def snapshot(self) -> NodeSnapshot:
        return self._snapshot

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return self._synced.wait(timeout) and (self.features is None or self.features.wait_synced(
            max(0.0, deadline - time.monotonic())))

    def health(self) -> Tuple[bool, str]:
        why = self.failing() or (self.features.failing() if self.features is not None else None)
        if why:
            return False, why
        note = f"; {self._snapshot.features_note}" if self._snapshot.features_note else ""
        return True, f"{len(self._snapshot)} nodes from {self.client.base_url}{note}"

    # -- nodes --
    def object_hook(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        return slim_node(obj)

    def convert(self, item: Dict[str, Any]) -> Node:
        return node_from_object(item)

    def replace(self, items: List[Any]) -> None:
        with self._lock:
            nodes = {n.name: self._with_features(n) for n in items if n is not None}
            previous = self._snapshot.nodes
            if self._synced.is_set():
                for name in sorted(set(nodes) | set(previous)):
                    old, new = previous.get(name), nodes.get(name)
                    if old != new:
                        log.info("%s", _describe_change(old, new))
            snapshot = NodeSnapshot(nodes.values(), features_note=self._snapshot.features_note)
            snapshot.shapes()  # built here, off the request path; watch events then carry it over
            self._snapshot = snapshot
        self.metrics.count("ocifit_node_relists_total")
        log.info("%d nodes carry %d label sets", len(nodes), snapshot.label_sets())

    def apply(self, kind: str, obj: Dict[str, Any]) -> None:
        if kind == "DELETED":
            name = str((obj.get("metadata") or {}).get("name") or "")
            with self._lock:
                old = self._snapshot.nodes.get(name)
                if old is not None:
                    self._snapshot = self._snapshot.with_node(name, None)
            if old is not None:
                log.info("%s", _describe_change(old, None))
            return
        node = node_from_object(obj)
        with self._lock:
            node = self._with_features(node)
            old = self._snapshot.nodes.get(node.name)
            if old == node:
                return  # a status heartbeat: nothing a decision looks at
            self._snapshot = self._snapshot.with_node(node.name, node)
        log.info("%s", _describe_change(old, node))

    def _with_features(self, node: Node) -> Node:
        """The node carrying the features last set for it, or none if none are."""
        features = self._features.get(node.name)
        return node if node.features is features else dataclasses.replace(node, features=features)

    # -- their features, from the NodeFeature watcher --
    def features_of(self, name: str) -> Optional[NodeFeatures]:
        """The features last set for a node, if any."""
        return self._features.get(name)

    def set_features(self, changed: Mapping[str, Optional[NodeFeatures]], note: Optional[str] = None) -> None:
        """New features for some nodes (None: none any more); or, given `note` (why features may be missing, ""
        once they are listed), the features of every node: a node `changed` does not name carries none."""
        with self._lock:
            snapshot = self._snapshot
            if note is not None:  # one new snapshot (and shape index), not one per node
                self._features = {k: v for k, v in changed.items() if v is not None}
                snapshot = NodeSnapshot((self._with_features(n) for n in snapshot.nodes.values()),
                                        features_note=note)
                snapshot.shapes()
            else:
                for name, features in changed.items():
                    if features is None:
                        self._features.pop(name, None)
                    else:
                        self._features[name] = features
                    node = snapshot.nodes.get(name)
                    if node is not None:
                        snapshot = snapshot.with_node(name, self._with_features(node))
            self._snapshot = snapshot


class KubeNodeFeatures(ListWatch):
    """NFD's NodeFeature objects, across namespaces, by list+watch; each node's objects merged as nfd-master does
    and handed to the node view. Pages are small (NodeFeatures are large: kernel config, PCI devices), and each is
    converted as it lands. A cluster without NFD (no such resource) or an RBAC that forbids reading them is not a
    failure: the node view says so, and specs in NFD's dialect are denied saying so."""

    path, what, page_size = "/apis/nfd.k8s-sigs.io/v1alpha1/nodefeatures", "NodeFeature", 100

    def __init__(self, client: KubeClient, settings: Settings, metrics: Metrics, nodes: KubeNodes):
        super().__init__(client, settings, metrics)
        self.nodes = nodes
        self._objects: Dict[Tuple[str, str], FeatureObject] = {}
        self._warned = ""

    def object_hook(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        return slim_feature_object(obj)

    def convert(self, item: Dict[str, Any]) -> FeatureObject:
        return feature_object(item)

    def replace(self, items: List[Any]) -> None:
        namespaces = self.settings.node_feature_namespaces
        self._objects = {(o.namespace, o.name): o for o in items if o is not None and admitted(o.namespace,
                                                                                                 namespaces)}
        merged = merge_by_node(self._objects.values(), self.settings.nfd_namespace)
        self.nodes.set_features(merged, note="")

    def apply(self, kind: str, obj: Dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if not admitted(key[0], self.settings.node_feature_namespaces):
            return
        old = self._objects.pop(key, None)
        touched = {old.node} if old is not None else set()
        if kind != "DELETED":
            new = feature_object(obj)
            self._objects[key] = new
            touched.add(new.node)
        objects = [o for o in self._objects.values() if o.node in touched]
        merged = merge_by_node(objects, self.settings.nfd_namespace)
        for node in sorted(touched):
            self._log_change(node, merged.get(node), [o for o in objects if o.node == node])
        self.nodes.set_features({node: merged.get(node) for node in touched})

    def _log_change(self, node: str, new: Optional[NodeFeatures], objects: Sequence[FeatureObject]) -> None:
        """One line when a node's effective features change: how many feature sets, and from which objects."""
        changed = features_changed(self.nodes.features_of(node) or NO_FEATURES, new or NO_FEATURES)
        if changed:
            sources = ", ".join(sorted(f"{o.namespace}/{o.name}" for o in objects)) or "none (all deleted)"
            log.info("node %s: %d feature sets changed; its NodeFeatures: %s", node, changed, sources)

    def unavailable(self, exc: KubeAPIError) -> bool:
        if exc.status == 404:
            why = "no NodeFeatures: the cluster has no nodefeatures.nfd.k8s-sigs.io resource (NFD not installed)"
        elif exc.status == 403:
            why = ("no NodeFeatures: ocifit may not read them (RBAC: get, list and watch on "
                   "nodefeatures.nfd.k8s-sigs.io)")
        else:
            return False
        if why != self._warned:
            (log.warning if exc.status == 403 else log.info)("%s", why)
            self._warned = why
        self.nodes.set_features({}, note=why)
        return True


def slim_feature_object(obj: Dict[str, Any]) -> Dict[str, Any]:
    """A json object_hook that keeps of a NodeFeature only what feature_object reads (not its managed fields)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "spec" not in obj or "items" in obj or obj.get("kind", "NodeFeature") != \
            "NodeFeature":
        return obj
    spec = obj.get("spec")
    return {"kind": "NodeFeature", "metadata": {k: meta[k] for k in ("name", "namespace", "labels",
                                                                     "resourceVersion") if k in meta},
            "spec": {"features": spec.get("features")} if isinstance(spec, dict) else spec}


# ============================================================================================
# Artifacts and registry: where compatibility specs come from
# ============================================================================================

class ArtifactError(Exception):
    """The artifact could not be had; the message says which and why."""


@dataclass(frozen=True)
class Artifact:
    """A compatibility spec and where it came from."""

    ref: str
    spec: Spec
    digest: str
    origin: str  # "file", "registry", "cache" or "stale"
    warnings: Tuple[str, ...] = ()


@dataclass(frozen=True)
class AttachedSpec:
    """A candidate image, resolved to the digest that was checked, and the compatibility spec attached to it:
    None when nothing is attached (the image then runs on any node)."""

    ref: str  # as the pod names it
    reference: "Reference"
    image_digest: str
    spec: Optional[Spec]
    artifact_digest: str  # the attached artifact's manifest digest; "" when nothing is attached
    origin: str  # "registry", "cache" or "stale"
    warnings: Tuple[str, ...] = ()

    @property
    def image(self) -> str:
        """The image as the pod names it, pinned to the digest that was checked: name:tag@sha256:…"""
        return self.ref.strip().partition("@")[0] + "@" + self.image_digest

    @property
    def artifact(self) -> str:
        """The attached artifact's manifest reference, or that none is attached (for the pod's annotation)."""
        repository = f"{self.reference.registry}/{self.reference.repository}"
        return (f"{repository}@{self.artifact_digest}" if self.artifact_digest
                else f"none attached to {repository}@{self.image_digest}")


class ArtifactSource(Protocol):
    """Where admissions get an image-ref's compatibility spec, or a candidate image's attached one: local
    files, a registry, or both."""

    def get(self, ref: str, deadline: float, requests: Optional[RequestBudget] = None) -> Artifact:
        """The artifact, by the monotonic deadline, within the admission's registry requests; ArtifactError (or
        SpecError) saying why not."""

    def attached(self, ref: str, deadline: float, requests: Optional[RequestBudget] = None) -> AttachedSpec:
        """The image and the spec attached to it, as get() finds an artifact."""


class LocalArtifacts:
    """Artifacts from local spec files (--artifact REF=PATH), re-read when a file changes."""

    def __init__(self, files: Mapping[str, str], fallback: Optional[ArtifactSource] = None):
        self.fallback = fallback
        # a broken one stops the start
        self.files = {ref: WatchedFile([path], functools.partial(self._load, ref, path), f"artifact {ref}",
                                       cap=MAX_SPEC_BYTES) for ref, path in files.items()}

    @staticmethod
    def _load(ref: str, path: str, contents: List[bytes]) -> Artifact:
        try:
            spec = parse_spec(contents[0])
        except SpecError as exc:
            raise SpecError(f"artifact {ref} ({path}): {exc}") from None
        return Artifact(ref, spec, "sha256:" + hashlib.sha256(contents[0]).hexdigest(), "file")

    def get(self, ref: str, deadline: float, requests: Optional[RequestBudget] = None) -> Artifact:
        watched = self.files.get(ref)
        if watched is not None:
            return watched.value
        if self.fallback is not None:
            return self.fallback.get(ref, deadline, requests)
        known = ", ".join(sorted(self.files)) or "none"
        raise ArtifactError(f"artifact {ref} is not configured (local artifacts: {known}; no registry access in "
                            "this mode)")

    def attached(self, ref: str, deadline: float, requests: Optional[RequestBudget] = None) -> AttachedSpec:
        if self.fallback is not None:
            return self.fallback.attached(ref, deadline, requests)
        raise ArtifactError(f"image {ref}: the specs attached to candidate images are read from registries, and "
                            "this mode has no registry access")


# ---- references --------------------------------------------------------------------------

class BadReference(ArtifactError):
    """An image-ref that is not a valid OCI reference; the message names the wrong part."""


_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?\Z")
_PATH_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z", re.ASCII)
_DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Reference:
    """A parsed `host[:port]/repo[:tag][@digest]`; the digest wins over the tag."""

    registry: str  # "ghcr.io", "localhost:5000", "docker.io"
    repository: str  # "compspec/ocifit-k8s-compatibility", "library/debian"
    tag: str = "latest"
    digest: str = ""

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for."""
        return self.digest or self.tag

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


@functools.lru_cache(maxsize=1024)
def parse_reference(text: str) -> Reference:
    """Parse an image reference by the distribution grammar, or raise BadReference naming the bad part."""
    ref = text.strip()
    if not ref:
        raise BadReference("empty artifact reference")
    if len(ref) > 1024:
        raise BadReference("reference longer than 1024 characters")
    name, at, digest = ref.partition("@")
    if at and not _DIGEST.match(digest):
        raise BadReference(f"reference {ref!r}: digest {digest!r} is not sha256:<64 hex> or "
                           "sha512:<128 hex>")
    tag = ""
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.match(tag):
            raise BadReference(f"reference {ref!r}: tag {tag!r} is not a valid tag")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _DOMAIN.match(registry):
            raise BadReference(f"reference {ref!r}: registry {registry!r} is not a valid host[:port]")
    else:
        registry, path = DOCKER_HUB, name
    registry = DOCKER_HUB if registry.lower() in DOCKER_HUB_ALIASES else registry.lower()
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    for part in path.split("/"):
        if not _PATH_PART.match(part):
            hint = " (repository names are lowercase)" if part.lower() != part else ""
            raise BadReference(f"reference {ref!r}: repository component {part!r} is not valid{hint}")
    if len(path) > 255:
        raise BadReference(f"reference {ref!r}: repository name longer than 255 characters")
    return Reference(registry, path, tag or "latest", digest)


def registry_matches(registry: str, pattern: str) -> bool:
    """Whether an allow-list entry (`host[:port]`, `*.suffix`) admits a registry."""
    pattern = pattern.strip().lower()
    if pattern in DOCKER_HUB_ALIASES:
        pattern = DOCKER_HUB
    if pattern.startswith("*."):
        host = registry.split(":")[0] if not registry.startswith("[") else registry
        return host.endswith(pattern[1:])
    return registry == pattern


def check_allowed(ref: Reference, allowed: Sequence[str], what: str = "artifact") -> None:
    """Raise ArtifactError unless the operator's allow-list (empty: any) admits the reference's registry."""
    if allowed and not any(registry_matches(ref.registry, p) for p in allowed):
        raise ArtifactError(f"{what} {ref}: registry {ref.registry} is not in the allowed registries "
                            f"({', '.join(allowed)})")


# ---- transport: only the addresses the operator allows, and a deadline on every socket ----

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192", "168.63.129.16"))
# Not public unicast (IANA's special-purpose registries), by what they are; checked in this order.
SPECIAL_NETWORKS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("a link-local address", ("169.254.0.0/16", "fe80::/10")),
    ("a loopback address", ("127.0.0.0/8", "::1/128")),
    ("an unspecified address", ("0.0.0.0/8", "::/128")),
    ("a private address", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")),
    ("a shared (carrier-grade NAT) address", ("100.64.0.0/10",)),
    ("a multicast or broadcast address", ("224.0.0.0/4", "255.255.255.255/32", "ff00::/8")),
    ("a documentation or benchmarking address", ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
                                                "198.18.0.0/15", "2001:db8::/32", "3fff::/20")),
    ("a reserved address", ("192.0.0.0/24", "240.0.0.0/4", "100::/64", "64:ff9b:1::/48", "2001::/23",
                            "5f00::/16")),
)
_SPECIAL = tuple((what, tuple(ipaddress.ip_network(n) for n in nets)) for what, nets in SPECIAL_NETWORKS)
_NAT64, _SIX_TO_FOUR = ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("2002::/16")


def embedded_ipv4(ip: Any) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one carries: IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96) or 6to4."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):  # NAT64, or IPv4-compatible ::a.b.c.d
        return low
    return None


def address_refusal(address: str) -> Tuple[Optional[str], bool]:
    """(why an address is not public unicast, whether it stays refused even for a registry the operator named),
    or (None, False) for an address anyone may fetch from. IPv6 forms that embed an IPv4 address are judged by it."""
    try:
        ip: Any = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address", True
    inner = embedded_ipv4(ip)
    if inner is not None:
        why, always = address_refusal(str(inner))
        return (f"{why} ({inner}, inside {ip})" if why else None), always
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address", True
    for what, networks in _SPECIAL:
        if any(ip in network for network in networks):
            return what, what == "a link-local address"
    return None, False


class ForbiddenAddress(OSError):
    """A connection refused before it was made: the address is not one ocifit may fetch from."""


@dataclass(frozen=True)
class AddressPolicy:
    """Who may be fetched from. Public unicast addresses, always; other addresses (loopback, private, ...) only
    for the registries the operator named, in --allowed-registries, --insecure-registry, --registry-mirror or
    --registry-proxy; link-local and cloud metadata addresses never. Checked after DNS and before connecting,
    so the answer is the same whatever the port's state."""

    named: Tuple[str, ...] = ()  # host[:port] or *.suffix entries

    def names(self, host: str, port: Optional[int], default_port: int) -> bool:
        host = host.lower()
        host = f"[{host}]" if ":" in host else host
        candidates = {f"{host}:{port}" if port else host} | ({host} if port in (None, default_port) else set())
        return any(registry_matches(c, pattern) for c in candidates for pattern in self.named)

    def check(self, host: str, port: Optional[int], default_port: int, addresses: Iterable[str]) -> None:
        """Raise ForbiddenAddress if any address `host` resolved to may not be fetched from."""
        named = self.names(host, port, default_port)
        for address in addresses:
            why, always = address_refusal(address)
            if why is None or (named and not always):
                continue
            shown = f"[{host}]" if ":" in host else host
            where = f"{shown}:{port}" if port else shown
            if always:
                raise ForbiddenAddress(f"refusing to fetch from {where}: it resolves to {why}, which ocifit never "
                                       "fetches from")
            raise ForbiddenAddress(f"refusing to fetch from {where}: it resolves to {why}; name it in "
                                   "--allowed-registries (or --insecure-registry, --registry-mirror) to allow it")

    def resolve(self, host: str, port: int, default_port: int) -> List[Any]:
        """getaddrinfo for host:port, every answer checked."""
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        self.check(host, port, default_port, (str(info[4][0]) for info in infos))
        return infos


def _connect(infos: List[Any], timeout: Any, source_address: Any) -> socket.socket:
    """Connect to the first of the checked addresses that answers, as socket.create_connection would."""
    error: Optional[OSError] = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError("no address to connect to")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that connects only to addresses its policy allows (resolving first, and connecting to
    the very addresses it checked, so DNS cannot swap them in between), and whose socket is shut down at the
    fetch's deadline, however slowly the peer drips its answer."""

    default_port = http.client.HTTP_PORT

    def __init__(self, *args: Any, policy: AddressPolicy, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy, self.deadline = policy, deadline
        self._create_connection = self._guarded_connection

    def _guarded_connection(self, address: Tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                            source_address: Any = None) -> socket.socket:
        host, port = address
        sock = _connect(self.policy.resolve(host, port, self.default_port), timeout, source_address)
        REAPER.watch(self, sock, self.deadline)
        return sock

    def close(self) -> None:
        REAPER.forget(self)
        super().close()


class _GuardedHTTPSConnection(_GuardedHTTPConnection, http.client.HTTPSConnection):
    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        """http.client's own HTTPS connect, with the TLS socket handed to the reaper before its handshake."""
        http.client.HTTPConnection.connect(self)
        tls = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host or self.host,  # type: ignore[attr-defined]
                                        do_handshake_on_connect=False)
        self.sock = tls
        REAPER.watch(self, tls, self.deadline)
        tls.do_handshake()


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self.policy,
                                              deadline=_deadline_of(req)), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy, context: ssl.SSLContext):
        super().__init__(context=context)
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPSConnection, policy=self.policy,
                                              deadline=_deadline_of(req)),
                            req, context=self._context)  # type: ignore[attr-defined]


def _deadline_of(req: urllib.request.Request) -> float:
    """The monotonic deadline a registry request carries (set where it is made, copied to its redirects)."""
    return getattr(req, "deadline", None) or time.monotonic() + IO_TIMEOUT


class _ProxyHandler(urllib.request.ProxyHandler):
    """The operator's proxy (--registry-proxy) and nothing from the environment but NO_PROXY; the target is
    checked against the policy before the proxy is asked to connect to it."""

    def __init__(self, proxy: str, no_proxy: Sequence[str], policy: AddressPolicy):
        super().__init__({"http": proxy, "https": proxy} if proxy else {})
        self.no_proxy = tuple(n.strip().lower().lstrip(".") for n in no_proxy if n.strip())
        self.policy = policy

    def proxy_open(self, req: urllib.request.Request, proxy: str, type: str) -> Any:  # noqa: A002 - stdlib name
        target = urllib.parse.urlsplit(req.full_url)
        host = (target.hostname or "").lower()
        if any(n == "*" or host == n or host.endswith("." + n) for n in self.no_proxy):
            return None  # NO_PROXY: connect directly, through the guarded handlers
        default_port = 443 if target.scheme == "https" else 80
        try:
            self.policy.resolve(host, target.port or default_port, default_port)
        except socket.gaierror:
            pass  # a name only the proxy can resolve: the proxy decides
        return super().proxy_open(req, proxy, type)


def _safe_url(url: str) -> str:
    """A URL fit for messages and logs: no query (signed URLs carry secrets), no user info."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class RegistryError(ArtifactError):
    """A registry request that failed; `code` is the registry's error code when it sent one."""

    def __init__(self, message: str, status: int = 0, code: str = "", retry_after: Optional[float] = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class NotAnArtifact(RegistryError):
    """The reference names a manifest with no compatibility layer: an image, perhaps, with a spec attached."""


class OverBudget(RegistryError):
    """An admission has sent all the registry requests it may: no retry, and no other admission is told."""

    def __init__(self, message: str):
        super().__init__(message, -1)


class ReferenceGone(RegistryError):
    """The registry answered that the reference itself (its tag or digest) does not exist: an answer, not an
    outage, so no stale spec stands in for it."""


def allowed_scheme(url: str, insecure: Iterable[str]) -> bool:
    """Whether a redirect or token realm may go to url: https, or http to a host listed in --insecure-registry."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and parts.netloc.lower().rsplit("@", 1)[-1] in insecure


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow a few redirects, only to https (or http for an --insecure-registry host); Authorization only to
    the same host; the fetch's deadline carried along."""

    max_redirections = 5

    def __init__(self, insecure: Iterable[str]):
        super().__init__()
        self.insecure = frozenset(insecure)

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Optional[urllib.request.Request]:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if not allowed_scheme(newurl, self.insecure):
            raise RegistryError(f"refusing a redirect to {new.scheme}: {_safe_url(newurl)} (only https, or http to "
                                "an --insecure-registry host)")
        new_req = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new_req is not None:
            new_req.deadline = _deadline_of(req)  # type: ignore[attr-defined]
        auth = req.unredirected_hdrs.get("Authorization")
        if new_req is not None and auth and (old.hostname, old.port) == (new.hostname, new.port):
            new_req.add_unredirected_header("Authorization", auth)
        return new_req


# ---- credentials -------------------------------------------------------------------------

@dataclass(frozen=True)
class Credential:
    """Registry credentials from a Docker config.json. repr() never shows them."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _auth_key_host(key: str) -> str:
    """The host of a config.json `auths` key: `https://index.docker.io/v1/` -> `docker.io`."""
    host = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


class DockerConfig:
    """Credentials from a Docker config.json (a mounted dockerconfigjson Secret), re-read when it changes; no
    file, no credentials."""

    def __init__(self, path: str):
        self.path = os.path.join(path, "config.json") if path and os.path.isdir(path) else path
        self.file = WatchedFile([self.path], self._load, "registry credentials", cap=MiB, missing={}) \
            if self.path else None

    def lookup(self, host: str) -> Optional[Credential]:
        by_host = self.file.value if self.file is not None else {}
        return by_host.get(DOCKER_HUB if host in DOCKER_HUB_ALIASES else host)

    def hosts(self) -> List[str]:
        return sorted(self.file.value) if self.file is not None else []

    @classmethod
    def _load(cls, contents: List[bytes]) -> Dict[str, Credential]:
        try:
            auths = load_json(contents[0]).get("auths") or {}
            return {_auth_key_host(k): cls._credential(v) for k, v in auths.items() if isinstance(v, dict)}
        except (ValueError, AttributeError) as exc:  # never the file's text: it holds secrets
            raise ValueError(f"not a Docker config.json ({type(exc).__name__})") from None

    @staticmethod
    def _credential(entry: Mapping[str, Any]) -> Credential:
        username, password = str(entry.get("username") or ""), str(entry.get("password") or "")
        if entry.get("auth"):
            try:
                username, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                log.error("registry credentials: an `auth` entry is not base64 of user:password")
        return Credential(username, password, str(entry.get("identitytoken") or ""))


_CHALLENGE_TOKEN = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s,]*))?\s*,?')


def parse_challenges(values: Iterable[str]) -> List[Tuple[str, Dict[str, str]]]:
    """WWW-Authenticate headers as [(scheme, params)], quoted commas and escapes handled."""
    challenges: List[Tuple[str, Dict[str, str]]] = []
    for value in values:
        pos = 0
        while pos < len(value):
            m = _CHALLENGE_TOKEN.match(value, pos)
            if not m or m.end() == pos:
                break
            name, raw = m.group(1), m.group(2)
            if raw is None:
                challenges.append((name.lower(), {}))
            elif challenges:
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                challenges[-1][1][name.lower()] = raw
            pos = m.end()
    return challenges


# ---- the client --------------------------------------------------------------------------

MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_CAP = 4 * MiB
SPEC_CAP = MAX_SPEC_BYTES
NFD_ARTIFACT_TYPE = "application/vnd.nfd.image-compatibility.v1alpha1"
NFD_SPEC_MEDIA_TYPE = "application/vnd.nfd.image-compatibility.spec.v1alpha1+yaml"
ATTACHED_SPEC_TYPES = (NFD_SPEC_MEDIA_TYPE, COMPAT_MEDIA_TYPE)  # ocifit's dialect may be attached under NFD's type
CREATED_ANNOTATION = "org.opencontainers.image.created"
MAX_REFERRER_PAGES = 16
MAX_REFERRERS = 1024  # of the compatibility artifact type, per image: more is a hostile or broken registry
MAX_STALE_REFERRERS = 3  # referrers listed but gone or broken, skipped before giving up
_URL_SAFE = re.compile(r"[!-~]*\Z")  # printable ASCII, no spaces: a path and query as sent on the wire
IO_TIMEOUT = 5.0
MAX_INDEX_CHILDREN = 16
MAX_RETRIES = 3  # of one request, on 429, 5xx or a broken connection
RETRY_FLOOR = 0.25  # seconds between tries at the least, whatever Retry-After says
REPLY_BYTES_IN_FLIGHT = 16 * MiB  # registry replies being read and parsed, across all fetches
MAX_ADMISSION_REQUESTS = 128  # registry requests in all for one admission: 16 candidates, nothing cached, fit


class RequestBudget:
    """The registry requests one admission may still send, every retry and token request included, shared by
    all the lookups it starts (a lookup another admission started costs it nothing)."""

    def __init__(self, limit: int = MAX_ADMISSION_REQUESTS):
        self.limit, self.sent = limit, 0

    def spend(self, host: str) -> None:
        if self.sent >= self.limit:
            raise OverBudget(f"the admission has sent {self.limit} registry requests, its cap (the next was to "
                             f"{host}); a pod may name at most {MAX_ADMISSION_REQUESTS // 8} images whose "
                             "registries each need a few requests")
        self.sent += 1


def verify_digest(data: bytes, digest: str, what: str) -> None:
    """Raise RegistryError unless data hashes to digest."""
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise RegistryError(f"{what}: unsupported digest algorithm {algorithm!r}")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected.lower():
        raise RegistryError(f"{what} does not match its digest {digest} (got {algorithm}:{actual})")


def _registry_error_text(body: bytes) -> Tuple[str, str]:
    """(first error code, 'CODE: message; ...') from a distribution error body, if it is one."""
    try:
        errors = load_json(body)["errors"]
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors if isinstance(e, dict)]
        return (errors[0].get("code", "") if errors else ""), "; ".join(parts)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "", ""


@dataclass(frozen=True)
class Pulled:
    """What a pull found: the manifest digest the reference resolved to, and the spec bytes."""

    digest: str
    spec_bytes: Optional[bytes]  # None when the caller already had this digest's spec
    requests: int
    seconds: float


@dataclass(frozen=True)
class Attached:
    """What discovery found for an image: the digest it resolved to and the compatibility artifact attached to
    it (the newest of `referrers`), or none."""

    image_digest: str
    artifact_digest: Optional[str]  # the referrer's manifest digest; None when nothing is attached
    found_by: str  # "the referrers API" or "the fallback tag sha256-..."
    referrers: int
    spec_bytes: Optional[bytes]  # None when nothing is attached, or the caller already had the artifact's spec
    requests: int
    seconds: float


def _newest_first(descriptor: Mapping[str, Any]) -> Tuple[bool, float, str]:
    """Sort key for referrers: the newest created annotation first, undated ones last, ties by digest."""
    annotations = descriptor.get("annotations")
    created = rfc3339_seconds(annotations.get(CREATED_ANNOTATION) if isinstance(annotations, dict) else None)
    return created is None, -(created or 0.0), descriptor["digest"]


def rfc3339_seconds(text: Any) -> Optional[float]:
    """An RFC 3339 time (any offset, any fraction) as POSIX seconds; None when it is not one."""
    match = _RFC3339.match(text) if isinstance(text, str) else None
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        when = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), min(int(second), 59),
                                 tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    if zone not in ("Z", "z") and (int(zone[1:3]) > 23 or int(zone[4:6]) > 59):
        return None
    offset = 0 if zone in ("Z", "z") else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return when.timestamp() - offset + float(fraction or 0)


_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})\Z")


class RegistryClient:
    """An OCI distribution client on urllib: auth, redirects, digests, caps and one deadline per pull."""

    def __init__(self, settings: Settings, metrics: Optional[Metrics] = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.credentials = DockerConfig(settings.registry_config)
        self.insecure = {h.strip().lower() for h in settings.insecure_registry if h.strip()}
        self.mirrors: Dict[str, str] = {}
        for item in settings.registry_mirror:
            host, sep, mirror = item.partition("=")
            if not sep or not host.strip() or not mirror.strip():
                raise ValueError(f"--registry-mirror wants HOST=MIRROR, got {item!r}")
            host = host.strip().lower()
            self.mirrors[DOCKER_HUB if host in DOCKER_HUB_ALIASES else host] = mirror.strip().lower()
        context = ssl.create_default_context()
        if settings.registry_ca:
            context.load_verify_locations(cafile=settings.registry_ca)
        context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)  # 3.13's strict checks refuse many private CAs
        proxy_host = urllib.parse.urlsplit(settings.registry_proxy).netloc.rsplit("@", 1)[-1]
        self.policy = AddressPolicy(tuple(p.strip().lower() for p in settings.allowed_registries if p.strip())
                                    + tuple(self.insecure) + tuple(self.mirrors.values())
                                    + ((proxy_host.lower(),) if proxy_host else ()))
        for host in sorted(self.insecure & set(self.credentials.hosts())):
            log.warning("registry credentials are configured for %s, which --insecure-registry reaches over plain "
                        "HTTP: they would cross the network in clear", host)
        # Only what a registry client needs: no FTP, file or data handlers, no proxy from the environment.
        self.opener = urllib.request.OpenerDirector()
        for handler in (_ProxyHandler(settings.registry_proxy, settings.no_proxy, self.policy),
                        _GuardedHTTPHandler(self.policy), _GuardedHTTPSHandler(self.policy, context),
                        _RedirectHandler(self.insecure), urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
            self.opener.add_handler(handler)
        self._auth: Dict[Tuple[str, str], Tuple[str, float]] = {}  # (host, scope) -> (header, expires)
        self._auth_lock = threading.Lock()
        self._without_referrers_api = BoundedCache(CACHE_BOUNDS["no-referrers-api"])  # (host, repository) -> when
        self.replies = InFlight(REPLY_BYTES_IN_FLIGHT)

    # -- where to go --
    def host_for(self, ref: Reference) -> str:
        """The host to contact for a reference: its mirror, else Docker Hub's API host, else itself."""
        mirror = self.mirrors.get(ref.registry)
        if mirror:
            return mirror
        return "registry-1.docker.io" if ref.registry == DOCKER_HUB else ref.registry

    def base_url(self, host: str) -> str:
        scheme = "http" if host in self.insecure else "https"
        return f"{scheme}://{host}"

    # -- pulling --
    def pull(self, ref: Reference, deadline: float, known: Callable[[str], bool] = lambda d: False,
             requests: Optional[RequestBudget] = None) -> Pulled:
        """Resolve the reference and fetch its compatibility spec, unless known(digest) says we have it."""
        fetch = Fetch(ref, self.host_for(ref), deadline, self.settings.fetch_budget, requests or RequestBudget(),
                      self.replies)
        try:
            body, digest = self._resolve(fetch)
            if known(digest):
                return fetch.pulled(digest, None)
            manifest = self._manifest_json(body, f"manifest of {ref}")
            layer = self._compat_layer(fetch, manifest)
            return fetch.pulled(digest, self._layer_blob(fetch, layer, f"artifact {ref}"))
        finally:
            fetch.release()

    def _layer_blob(self, fetch: "Fetch", layer: Mapping[str, Any], what: str) -> bytes:
        """A spec layer's bytes, capped, checked against its descriptor's digest and size."""
        size = layer.get("size")
        if isinstance(size, int) and size > SPEC_CAP:
            raise RegistryError(f"{what}: compatibility layer is {size} bytes, over the {SPEC_CAP} byte limit")
        blob, _ = self._get(fetch, f"/v2/{fetch.ref.repository}/blobs/{layer['digest']}", "*/*", SPEC_CAP,
                            f"compatibility layer of {fetch.ref}")
        verify_digest(blob, layer["digest"], f"{what}: compatibility layer")
        if isinstance(size, int) and size != len(blob):
            raise RegistryError(f"{what}: compatibility layer is {len(blob)} bytes, its descriptor says {size}")
        return blob

    def _resolve(self, fetch: "Fetch", what: str = "") -> Tuple[bytes, str]:
        """The manifest (or index) the fetch's reference names, and its digest, checked."""
        ref = fetch.ref
        try:
            body, headers = self._get(fetch, f"/v2/{ref.repository}/manifests/{ref.reference}",
                                      ", ".join(MANIFEST_TYPES), MANIFEST_CAP, what or f"manifest of {ref}")
        except RegistryError as exc:
            if exc.status == 404:
                raise ReferenceGone(str(exc), exc.status, exc.code) from None
            raise
        return body, self._manifest_digest(ref, body, headers)

    def _described_manifest(self, fetch: "Fetch", descriptor: Mapping[str, Any], what: str) -> Dict[str, Any]:
        """The manifest a descriptor names, in the fetch's repository, checked against its digest and size."""
        body, _ = self._get(fetch, f"/v2/{fetch.ref.repository}/manifests/{descriptor['digest']}",
                            ", ".join(MANIFEST_TYPES), MANIFEST_CAP, what)
        verify_digest(body, descriptor["digest"], what)
        if isinstance(descriptor.get("size"), int) and descriptor["size"] != len(body):
            raise RegistryError(f"{what} is {len(body)} bytes, its descriptor says {descriptor['size']}")
        return self._manifest_json(body, what)

    def _manifest_digest(self, ref: Reference, body: bytes, headers: Any) -> str:
        header = headers.get("Docker-Content-Digest", "")
        if ref.digest:
            verify_digest(body, ref.digest, f"manifest of {ref}")
        if _DIGEST.match(header):
            verify_digest(body, header, f"manifest of {ref} (Docker-Content-Digest)")
        return ref.digest or "sha256:" + hashlib.sha256(body).hexdigest()

    @staticmethod
    def _manifest_json(body: bytes, what: str) -> Dict[str, Any]:
        try:
            doc = load_json(body)
        except ValueError:
            raise RegistryError(f"{what} is not JSON") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{what} is not a JSON object")
        return doc

    def _compat_layer(self, fetch: "Fetch", manifest: Dict[str, Any]) -> Dict[str, Any]:
        """The compatibility layer's descriptor, following an index to the manifest that carries it."""
        ref = fetch.ref
        if isinstance(manifest.get("manifests"), list):
            children = [m for m in manifest["manifests"] if isinstance(m, dict) and isinstance(m.get("digest"), str)
                        and _DIGEST.match(m["digest"])]
            children.sort(key=lambda m: m.get("artifactType") != COMPAT_MEDIA_TYPE)  # likely ones first
            for child in children[:MAX_INDEX_CHILDREN]:
                layers = self._compat_layers(self._described_manifest(fetch, child,
                                                                      f"manifest {child['digest']} in index {ref}"))
                if layers:
                    return self._one_layer(f"artifact {ref}", layers)
            raise NotAnArtifact(f"artifact {ref} is an index, and none of its {len(children)} manifests has a layer "
                                f"of media type {COMPAT_MEDIA_TYPE}")
        layers = self._compat_layers(manifest)
        if not layers:
            listed = manifest.get("layers")
            found = sorted({str(layer.get("mediaType")) for layer in (listed if isinstance(listed, list) else [])
                            if isinstance(layer, dict)})
            raise NotAnArtifact(f"artifact {ref} has no layer of media type {COMPAT_MEDIA_TYPE}"
                                + (f" (layers: {', '.join(found)})" if found else ""))
        return self._one_layer(f"artifact {ref}", layers)

    @staticmethod
    def _compat_layers(manifest: Mapping[str, Any], media_types: Tuple[str, ...] = (COMPAT_MEDIA_TYPE,)
                       ) -> List[Dict[str, Any]]:
        """The manifest's layers of the given media types, with a digest."""
        layers = manifest.get("layers")
        return [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") in media_types
                and isinstance(layer.get("digest"), str)] if isinstance(layers, list) else []

    @staticmethod
    def _one_layer(what: str, layers: List[Dict[str, Any]]) -> Dict[str, Any]:
        if len(layers) > 1:
            raise RegistryError(f"{what} has {len(layers)} compatibility layers; ocifit needs exactly one")
        if not _DIGEST.match(layers[0]["digest"]):
            raise RegistryError(f"{what}: compatibility layer digest {layers[0]['digest']!r} is not valid")
        return layers[0]

    # -- attached specs: OCI referrers --
    def attached(self, ref: Reference, deadline: float, known: Callable[[str], bool] = lambda d: False,
                 requests: Optional[RequestBudget] = None) -> Attached:
        """The compatibility spec attached to an image (NFD's workflow: `oras attach`), found through the
        referrers API or, on a registry without one, the referrers tag schema's fallback tag. Several: the
        newest by its created annotation (a missing one counts as oldest; ties to the smallest digest).
        `known`: digests whose spec the caller has, so that artifact is not fetched again (no spec_bytes)."""
        fetch = Fetch(ref, self.host_for(ref), deadline, self.settings.fetch_budget, requests or RequestBudget(),
                      self.replies)
        try:
            return self._attached(fetch, known)
        finally:
            fetch.release()

    def _attached(self, fetch: "Fetch", known: Callable[[str], bool]) -> Attached:
        _, image = self._resolve(fetch, f"image {fetch.ref}")
        found_by, listed = self._referrers(fetch, image)
        candidates = list({d["digest"]: d for d in reversed(listed)}.values())  # each digest once, as first listed
        first_error: Optional[RegistryError] = None
        for descriptor in sorted(candidates, key=_newest_first)[:MAX_STALE_REFERRERS + 1]:
            try:
                blob = self._attached_spec(fetch, image, descriptor, known)
            except RegistryError as exc:  # a fallback index kept by clients may list a referrer since deleted
                if fetch.deadline <= time.monotonic() or exc.status not in (0, 404):
                    raise
                log.warning("%s; trying the next newest", exc)
                first_error = first_error or exc
                continue
            return fetch.attached(image, descriptor["digest"], found_by, len(candidates), blob)
        if first_error is not None:
            raise first_error
        return fetch.attached(image, None, found_by, 0, None)

    def _referrers(self, fetch: "Fetch", image: str) -> Tuple[str, List[Dict[str, Any]]]:
        """(how they were found, the descriptors of the compatibility artifacts referring to an image digest):
        the referrers API unless the registry has lately said it has none for this repository, else the
        fallback tag. Remembered per repository, not per host: a registry may route repositories to different
        backends, and another repository's word must not make an image look as if nothing (or an old fallback
        index's spec) were attached to it. Candidates in one repository share one probe."""
        where = (fetch.host, fetch.ref.repository)
        learned = self._without_referrers_api.get(where)
        if learned is None or time.monotonic() - learned > self.settings.tag_ttl:
            found = self._referrers_api(fetch, image)
            if found is not None:
                self._without_referrers_api.pop(where)
                return "the referrers API", found
            self._without_referrers_api.put(where, time.monotonic(), 128 + len(fetch.host) + len(where[1]))
        algorithm, _, hexdigest = image.partition(":")
        tag = f"{algorithm[:32]}-{hexdigest[:64]}"
        what = f"referrers of {fetch.ref} (tag {tag})"
        try:
            body, _ = self._get(fetch, f"/v2/{fetch.ref.repository}/manifests/{tag}", MANIFEST_TYPES[1],
                                MANIFEST_CAP, what)
        except RegistryError as exc:
            if exc.status == 404:
                return f"the fallback tag {tag}", []
            raise
        return f"the fallback tag {tag}", self._compat_descriptors(body, what)

    def _referrers_api(self, fetch: "Fetch", image: str) -> Optional[List[Dict[str, Any]]]:
        """The compatibility artifacts the referrers API lists, following `Link: rel="next"` pages (at most
        MAX_REFERRER_PAGES); None when the first request says the registry has no such API (a 404 that is not
        NAME_UNKNOWN, a 400 or a 405). Later pages that fail are errors like any other."""
        what = f"referrers of {fetch.ref}"
        query = urllib.parse.urlencode({"artifactType": NFD_ARTIFACT_TYPE})
        path: Optional[str] = f"/v2/{fetch.ref.repository}/referrers/{image}?{query}"
        found: List[Dict[str, Any]] = []
        seen: Set[str] = set()
        while path is not None and path not in seen:
            if len(seen) == MAX_REFERRER_PAGES:
                log.warning("%s: more than %d pages; choosing among the first %d", what, len(seen), len(seen))
                break
            try:
                body, headers = self._get(fetch, path, MANIFEST_TYPES[1], MANIFEST_CAP, what)
            except RegistryError as exc:
                if not seen and (exc.status in (400, 405) or (exc.status == 404 and exc.code != "NAME_UNKNOWN")):
                    log.debug("registry %s has no referrers API (HTTP %d); using fallback tags", fetch.host,
                              exc.status)
                    return None
                raise
            seen.add(path)
            found += self._compat_descriptors(body, what, MAX_REFERRERS - len(found))
            path = self._next_page(fetch, path, ", ".join(headers.get_all("Link") or []))
            if len(found) >= MAX_REFERRERS and path is not None:
                log.warning("%s: more pages past %d compatibility artifacts; choosing among those", what, len(found))
                break
        return found

    def _compat_descriptors(self, body: bytes, what: str, limit: int = MAX_REFERRERS) -> List[Dict[str, Any]]:
        """The descriptors of compatibility artifacts in a referrers index (whatever filter a registry says it
        applied), at most limit."""
        manifests = self._manifest_json(body, what).get("manifests")
        if not isinstance(manifests, list):
            raise RegistryError(f"{what} is not an image index")
        found = [m for m in manifests if isinstance(m, dict) and m.get("artifactType") == NFD_ARTIFACT_TYPE
                 and isinstance(m.get("digest"), str) and _DIGEST.match(m["digest"])]
        if len(found) > limit:
            log.warning("%s: more than %d compatibility artifacts; choosing among the first", what, MAX_REFERRERS)
        return found[:max(0, limit)]

    def _next_page(self, fetch: "Fetch", path: str, links: str) -> Optional[str]:
        """The path of the next referrers page from `Link: <...>; rel="next"` headers, on the same registry."""
        for match in re.finditer(r'<([^>]*)>((?:\s*;\s*[A-Za-z-]+\s*=\s*(?:"[^"]*"|[^;,\s]*))*)', links):
            params = {k.lower(): v.strip('"') for k, v in re.findall(
                r';\s*([A-Za-z-]+)\s*=\s*("[^"]*"|[^;,\s]*)', match.group(2))}
            if "next" not in params.get("rel", "").lower().split():
                continue
            base = self.base_url(fetch.host)
            url = urllib.parse.urljoin(base + path, match.group(1).strip())
            target = urllib.parse.urlsplit(url)
            if f"{target.scheme}://{target.netloc}" != base or not _URL_SAFE.match(target.path + target.query):
                raise RegistryError(f"registry {fetch.host}: refusing a referrers page link to "
                                    f"{json.dumps(_safe_url(url)[:200])} (another host, or not a URL path)")
            return target.path + (f"?{target.query}" if target.query else "")
        return None

    def _attached_spec(self, fetch: "Fetch", image: str, descriptor: Mapping[str, Any],
                       known: Callable[[str], bool] = lambda d: False) -> Optional[bytes]:
        """The spec bytes of a referrer, checked: its digest and size, its type, its subject, one spec layer.
        None when `known` says the caller has this artifact's spec (its manifest is checked all the same: the
        same artifact may be listed for another image)."""
        what = f"compatibility artifact {descriptor['digest']} of {fetch.ref}"
        manifest = self._described_manifest(fetch, descriptor, what)
        config = manifest.get("config")
        config_type = config.get("mediaType") if isinstance(config, dict) else None
        if NFD_ARTIFACT_TYPE not in (manifest.get("artifactType"), config_type):
            raise RegistryError(f"{what} is not of artifact type {NFD_ARTIFACT_TYPE}")
        subject = manifest.get("subject")
        if not isinstance(subject, dict) or subject.get("digest") != image:
            raise RegistryError(f"{what} does not name {image} as its subject")
        layers = self._compat_layers(manifest, ATTACHED_SPEC_TYPES)
        if not layers:
            raise RegistryError(f"{what} has no layer of media type {' or '.join(ATTACHED_SPEC_TYPES)}")
        layer = self._one_layer(what, layers)
        return None if known(descriptor["digest"]) else self._layer_blob(fetch, layer, what)

    # -- one request, with auth, retries, caps and the deadline --
    def _get(self, fetch: "Fetch", path: str, accept: str, cap: int, what: str) -> Tuple[bytes, Any]:
        """GET path from the fetch's host: authenticating on a 401, retrying 429, 5xx and connection errors with
        backoff (at most MAX_RETRIES times, RETRY_FLOOR apart at least) while the budget lasts; the body capped.
        RegistryError on anything else."""
        url = self.base_url(fetch.host) + path
        authenticated, attempt = False, 0
        while True:
            request = fetch.request(url, {"Accept": accept}, self._cached_auth(fetch.host, fetch.scope))
            try:
                with self.opener.open(request, timeout=fetch.io_timeout(what)) as response:
                    body = _read_capped(response, cap, fetch, what)
                    self.metrics.count("ocifit_registry_requests_total", result=str(response.status))
                    return body, response.headers
            except urllib.error.HTTPError as err:
                self.metrics.count("ocifit_registry_requests_total", result=str(err.code))
                if err.code == 401 and not authenticated:
                    authenticated = True
                    self._authenticate(fetch, err.headers.get_all("WWW-Authenticate") or [])
                    continue
                if err.code == 401:
                    self._forget_auth(fetch.host, fetch.scope)
                last = self._http_error(err, fetch.host, what)
                if err.code not in (429, 500, 502, 503, 504):
                    raise last from None
            except RegistryError:
                raise
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                self.metrics.count("ocifit_registry_requests_total", result="error")
                last = _transport_error(fetch, exc, what)
                if last.status == -1:  # not worth a retry
                    raise last from None
            attempt += 1
            delay = last.retry_after
            delay = max(RETRY_FLOOR, min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0) if delay is None
                        else delay)
            if attempt > MAX_RETRIES or time.monotonic() + delay >= fetch.deadline:
                raise last
            log.info("%s; retrying in %.2fs", last, delay)  # the error names the registry
            time.sleep(delay)

    def _http_error(self, err: urllib.error.HTTPError, host: str, what: str) -> RegistryError:
        try:
            body = err.read(64 * 1024) if err.fp else b""
        except (OSError, http.client.HTTPException):
            body = b""
        code, text = _registry_error_text(body)
        detail = f" ({text})" if text else f" (HTTP {err.code})"
        if err.code == 404:
            message = f"{what.replace('manifest of ', 'artifact ')} not found in registry{detail}"
        elif err.code in (401, 403):
            message = f"registry {host} refused access to {what}{detail}; check --registry-config credentials"
        elif err.code == 429:
            message = f"registry {host} is rate limiting ({what}){detail}"
        else:
            message = f"registry {host} answered HTTP {err.code} for {what}{detail}"
        return RegistryError(message, err.code, code, _retry_after(err.headers.get("Retry-After")))

    # -- auth --
    def _cached_auth(self, host: str, scope: str) -> Optional[str]:
        with self._auth_lock:
            for key in ((host, scope), (host, "")):
                entry = self._auth.get(key)
                if entry and entry[1] > time.monotonic():
                    return entry[0]
        return None

    def _forget_auth(self, host: str, scope: str) -> None:
        with self._auth_lock:
            self._auth.pop((host, scope), None)
            self._auth.pop((host, ""), None)

    def _authenticate(self, fetch: "Fetch", headers: List[str]) -> None:
        """Answer a 401 challenge: fetch a Bearer token, or use Basic credentials; cache either."""
        host, scope = fetch.host, fetch.scope
        challenges = parse_challenges(headers)
        credential = self.credentials.lookup(host)
        for scheme, params in challenges:
            if scheme == "bearer" and params.get("realm"):
                token, lifetime = self._fetch_token(fetch, params, credential)
                with self._auth_lock:
                    self._auth[(host, scope)] = ("Bearer " + token, time.monotonic() + lifetime)
                return
        for scheme, _ in challenges:
            if scheme == "basic":
                if credential is None or not credential.username:
                    raise RegistryError(f"registry {host} wants credentials (Basic auth) and --registry-config "
                                        f"has none for {host}", 401)
                with self._auth_lock:
                    self._auth[(host, "")] = (credential.basic(), time.monotonic() + 3600)
                return
        raise RegistryError(f"registry {host} answered 401 without a Bearer or Basic challenge", 401)

    def _fetch_token(self, fetch: "Fetch", params: Mapping[str, str], credential: Optional[Credential]
                     ) -> Tuple[str, float]:
        host, realm = fetch.host, params["realm"]
        parts = urllib.parse.urlsplit(realm)
        if not allowed_scheme(realm, self.insecure):
            raise RegistryError(f"registry {host}: refusing token realm {_safe_url(realm)} (needs https, or http to "
                                "an --insecure-registry host)")
        query = {k: v for k, v in (("service", params.get("service", "")),
                                   ("scope", params.get("scope") or fetch.scope)) if v}
        headers: Dict[str, str] = {}
        data = None
        if credential and credential.identity_token:
            data = urllib.parse.urlencode(dict(query, grant_type="refresh_token", client_id="ocifit",
                                               refresh_token=credential.identity_token)).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            url = realm
        else:
            url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        basic = credential.basic() if credential and credential.username and not credential.identity_token else None
        request = fetch.request(url, headers, basic, data)
        try:
            with self.opener.open(request, timeout=fetch.io_timeout("token")) as response:
                body = _read_capped(response, 64 * 1024, fetch, "token")
        except urllib.error.HTTPError as err:
            raise RegistryError(f"registry {host}: token service {_safe_url(realm)} answered HTTP {err.code}"
                                + ("; check --registry-config credentials" if err.code in (401, 403) else ""),
                                err.code) from None
        except RegistryError:
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _transport_error(fetch, exc, f"token from {_safe_url(realm)}") from None
        try:
            answer = load_json(body)
            token = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token, lifetime = None, 0.0
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {host}: token service {_safe_url(realm)} sent no token")
        return token, max(60.0, lifetime) - 5  # the distribution spec's floor is 60 s; renew a little early


def _read_capped(response: Any, cap: int, fetch: "Fetch", what: str) -> bytes:
    """At most cap+1 bytes of a body, read by the fetch's deadline; RegistryError past either. The reaper shuts
    the socket down at the deadline, however slowly the body drips, and the read then ends early."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise RegistryError(f"{what} from {fetch.host} is {declared} bytes, over the {cap} byte limit")
    fetch.hold(int(declared) if declared and declared.isdigit() else cap, what)
    chunks: List[bytes] = []
    total = 0
    while True:
        try:
            chunk = response.read1(min(65536, cap + 1 - total))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _transport_error(fetch, exc, what) from None
        if not chunk:
            if time.monotonic() >= fetch.deadline:
                raise fetch.timed_out(f"{what} still arriving")
            if response.length:  # fewer bytes than Content-Length said
                raise RegistryError(f"registry {fetch.host}: {what} broke off after {total} bytes")
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise RegistryError(f"{what} from {fetch.host} is over the {cap} byte limit")


def _transport_error(fetch: "Fetch", exc: BaseException, what: str) -> RegistryError:
    """The RegistryError for a failed connection or read; status -1 when a retry cannot help."""
    reason = getattr(exc, "reason", exc)
    if time.monotonic() >= fetch.deadline or isinstance(reason, (socket.timeout, TimeoutError)):
        return fetch.timed_out(what)
    if isinstance(reason, (ForbiddenAddress, ssl.SSLCertVerificationError)):
        return RegistryError(f"registry {fetch.host}: {reason}", -1)
    if isinstance(reason, ssl.SSLError):
        return RegistryError(f"registry {fetch.host}: TLS failed: {reason}", -1)
    return RegistryError(f"registry {fetch.host} unreachable ({what}): {reason}")


@dataclass
class Fetch:
    """One pull's state: the reference, the host asked, the deadline every request and socket shares, and how
    many requests it has made."""

    ref: Reference
    host: str
    deadline: float
    budget: float
    allowance: RequestBudget = field(default_factory=RequestBudget)  # the admission's, shared by its lookups
    replies: Optional[InFlight] = None  # the budget of registry reply bytes that every fetch shares
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    held: int = 0  # bytes of the latest reply, held in the budget until the next one (or the end)

    def hold(self, size: int, what: str) -> None:
        """Hold room for the reply now read (and parsed) in place of the last one's, waiting for room by the
        deadline: replies in flight across all fetches stay within the budget, parsed copies included."""
        self.release()
        if self.replies is not None:
            if not self.replies.take(size, self.deadline):
                raise self.timed_out(f"{what}: waiting for room among the registry replies in flight")
            self.held = size

    def release(self) -> None:
        if self.replies is not None and self.held:
            self.replies.give_back(self.held)
        self.held = 0

    @property
    def scope(self) -> str:
        return f"repository:{self.ref.repository}:pull"

    def request(self, url: str, headers: Dict[str, str], authorization: Optional[str] = None,
                data: Optional[bytes] = None) -> urllib.request.Request:
        """A request that carries the deadline (to its socket and redirects), counted; fails if it has passed."""
        if time.monotonic() >= self.deadline:
            raise self.timed_out(urllib.parse.urlsplit(url).path)
        self.allowance.spend(urllib.parse.urlsplit(url).netloc)
        request = urllib.request.Request(url, data=data, headers=dict(headers, **{"User-Agent": USER_AGENT}))
        request.deadline = self.deadline  # type: ignore[attr-defined]
        if authorization:
            request.add_unredirected_header("Authorization", authorization)
        self.requests += 1
        return request

    def io_timeout(self, what: str) -> float:
        """The timeout for each socket operation: what remains of the budget, at most IO_TIMEOUT."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.timed_out(what)
        return min(IO_TIMEOUT, remaining)

    def timed_out(self, what: str) -> RegistryError:
        return RegistryError(f"registry {self.host} did not answer within {self.budget:g}s ({what})")

    def pulled(self, digest: str, spec_bytes: Optional[bytes]) -> "Pulled":
        return Pulled(digest, spec_bytes, self.requests, time.monotonic() - self.started)

    def attached(self, image: str, artifact: Optional[str], found_by: str, referrers: int,
                 spec_bytes: Optional[bytes]) -> "Attached":
        return Attached(image, artifact, found_by, referrers, spec_bytes, self.requests,
                        time.monotonic() - self.started)


# ---- the cache ---------------------------------------------------------------------------

@dataclass
class _Flight:
    """One fetch in progress; admissions for the same reference wait on it instead of fetching again. A failed
    one keeps only its error's kind and text: an exception would keep its traceback, and with it the buffers
    of the fetch that failed."""

    done: threading.Event = field(default_factory=threading.Event)
    found: Optional["_Found"] = None
    error: Optional[Tuple[type, str, bool]] = None  # (ArtifactError or SpecError, message, stale may serve)
    finished_at: float = 0.0

    def raise_error(self) -> None:
        assert self.error is not None
        raise self.error[0](self.error[1])


_Made = TypeVar("_Made")


class _Found(NamedTuple):
    """What a reference resolved to: its manifest digest, and the spec (by the digest of the manifest that
    carries it; for an image, its newest attached compatibility artifact, or none)."""

    digest: str
    spec_digest: str  # "" when nothing is attached to the image
    spec: Optional[Spec]


Resolver = Callable[[Reference, float, RequestBudget], _Found]


class RegistryArtifacts:
    """Artifacts from registries, and the specs attached to images: specs cached by digest (LRU), tags and
    referrers by TTL, one fetch per reference at a time, and the last good spec served while the registry is
    down (stale-if-error)."""

    ERROR_TTL = 3.0  # a failed fetch is remembered this long, so a pod storm on a bad ref costs one request

    def __init__(self, settings: Settings, metrics: Optional[Metrics] = None, client: Optional[RegistryClient] = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.client = client or RegistryClient(settings, self.metrics)
        self.allowed = tuple(p for p in settings.allowed_registries if p.strip())
        self._specs = BoundedCache(dataclasses.replace(CACHE_BOUNDS["specs"], entries=settings.cache_size))
        self._tags = BoundedCache(CACHE_BOUNDS["tags"])  # key -> (_Found without its spec, when it was resolved)
        self._hits = BoundedCache(CACHE_BOUNDS["hits"])
        self._failures = BoundedCache(CACHE_BOUNDS["failures"])  # key -> its failed _Flight
        self._flights: Dict[str, _Flight] = {}
        self._lock = threading.Lock()  # for _flights: one fetch per reference

    def get(self, text: str, deadline: float, requests: Optional[RequestBudget] = None) -> Artifact:
        """The compatibility artifact `text` names; `requests`: the admission's registry requests (a lookup it
        starts spends them)."""
        ref = parse_reference(text)
        check_allowed(ref, self.allowed)
        found, origin, warnings = self._lookup(str(ref), ref, deadline, f"artifact {text}", self._pulled,
                                               requests or RequestBudget())
        return self._answer(text, found, origin, warnings, Artifact, text, found.spec, found.digest)

    def attached(self, text: str, deadline: float, requests: Optional[RequestBudget] = None) -> "AttachedSpec":
        """The image `text` names, with its digest and the compatibility spec attached to it (or none)."""
        ref = parse_reference(text)
        check_allowed(ref, self.allowed, "image")
        found, origin, warnings = self._lookup("attached " + str(ref), ref, deadline,
                                               f"the spec attached to image {text}", self._attached,
                                               requests or RequestBudget())
        return self._answer("attached " + text, found, origin, warnings, AttachedSpec, text, ref, found.digest,
                            found.spec, found.spec_digest)

    def _answer(self, key: str, found: _Found, origin: str, warnings: Tuple[str, ...], make: Callable[..., _Made],
                *args: Any) -> _Made:
        """make(*args, origin, warnings); for a cache hit, made once per key and resolution and then shared, so a
        storm of admissions on a cached reference builds no object per admission."""
        if origin != "cache":
            return make(*args, origin, warnings)
        entry = self._hits.get(key)
        if entry is None or entry[0] != found[:2]:
            entry = (found[:2], make(*args, "cache", ()))
            self._hits.put(key, entry, 512 + 2 * len(key))
        return entry[1]

    def _lookup(self, key: str, ref: Reference, deadline: float, what: str, resolve: "Resolver",
                requests: RequestBudget) -> Tuple[_Found, str, Tuple[str, ...]]:
        """(what the key resolved to, where from: "cache", "registry" or "stale", warnings): from the cache,
        from the flight already fetching it, or from a new flight; the last good one if the registry fails."""
        hit = self._fresh(key, ref)
        if hit is not None:
            self.metrics.count("ocifit_artifact_cache_total", result="hit")
            return hit, "cache", ()
        with self._lock:
            failed = self._failures.get(key)
            if failed and time.monotonic() - failed.finished_at < self.ERROR_TTL:
                flight = failed
            else:
                flight = self._flights.get(key)
                if flight is None:
                    hit = self._fresh(key, ref)  # a flight that just landed has left its result
                    flight = self._start(key, ref, resolve, requests) if hit is None else None
        if flight is None:
            return self._lookup(key, ref, deadline, what, resolve, requests)
        self.metrics.count("ocifit_artifact_cache_total", result="miss")
        finished = flight.done.wait(max(0.0, deadline - time.monotonic()))
        if finished and flight.error is None and flight.found is not None:
            return flight.found, "registry", ()
        if finished and flight.error is not None and not flight.error[2]:
            flight.raise_error()  # an invalid spec, or the registry's word that the reference is gone
        stale = self._stale(key)
        why = flight.error[1] if finished and flight.error is not None else (
            f"registry {ref.registry} did not answer within {self.settings.fetch_budget:g}s ({what})")
        if stale is not None:
            self.metrics.count("ocifit_artifact_cache_total", result="stale")
            log.warning("%s: %s; serving the last good spec (%s)", what, why, stale.spec_digest or "none attached")
            return stale, "stale", (f"ocifit: {what} served from cache, registry unavailable",)
        raise ArtifactError(why)

    def _resolved(self, key: str) -> Optional[Tuple[_Found, float]]:
        """What the key last resolved to, with its spec if it had one and the spec is still cached, and when."""
        entry = self._tags.get(key)
        if entry is None:
            return None
        (digest, spec_digest), when = entry
        spec = self._specs.get(spec_digest) if spec_digest else None
        if spec_digest and spec is None:
            return None
        return _Found(digest, spec_digest, spec), when

    def _fresh(self, key: str, ref: Reference) -> Optional[_Found]:
        """What the key resolved to, when that is still trusted: a digest's artifact always, a tag for the tag
        TTL, and what is attached to an image (a new spec may be attached to any image) for the tag TTL."""
        resolved = self._resolved(key)
        if resolved is None:
            return None
        trusted = ref.digest and not key.startswith("attached ")
        return resolved[0] if trusted or time.monotonic() - resolved[1] <= self.settings.tag_ttl else None

    def _stale(self, key: str) -> Optional[_Found]:
        """What the key last resolved to, if it is no older than --max-stale."""
        resolved = self._resolved(key)
        if resolved is None:
            return None
        age = time.monotonic() - resolved[1]
        if age > self.settings.max_stale:
            log.warning("%s: the last good spec is %.0fs old, past --max-stale (%gs); not serving it",
                        key, age, self.settings.max_stale)
            return None
        return resolved[0]

    def _start(self, key: str, ref: Reference, resolve: "Resolver", requests: RequestBudget) -> _Flight:
        """A new flight for the key, fetched in a thread of its own. Holds the lock."""
        flight = _Flight()
        self._flights[key] = flight
        threading.Thread(target=self._fetch, args=(key, ref, flight, resolve, requests), name=f"fetch {key}",
                         daemon=True).start()
        return flight

    def _fetch(self, key: str, ref: Reference, flight: _Flight, resolve: "Resolver", requests: RequestBudget
               ) -> None:
        remembered = True  # a failure is remembered for ERROR_TTL, unless it was this admission's own cap
        try:
            flight.found = resolve(ref, time.monotonic() + self.settings.fetch_budget, requests)
            self._tags.put(key, (flight.found[:2], time.monotonic()), 300 + len(key))
        except SpecError as exc:
            flight.error = (SpecError, str(exc), False)
        except ArtifactError as exc:
            flight.error = (ArtifactError, str(exc), not isinstance(exc, ReferenceGone))
            remembered = not isinstance(exc, OverBudget)
        except Exception as exc:  # a bug in a fetch must reach the admission as a message, not kill it silently
            log.exception("unexpected error fetching %s", ref)
            flight.error = (ArtifactError, f"{ref}: unexpected error: {exc!r}", True)
        finally:
            flight.finished_at = time.monotonic()
            with self._lock:
                self._flights.pop(key, None)
                if flight.error is not None and remembered:
                    self._failures.put(key, flight, 256 + len(flight.error[1]))
                else:
                    self._failures.pop(key)
            flight.done.set()

    def _parsed(self, digest: str, spec_bytes: bytes) -> Spec:
        spec = parse_spec(spec_bytes)
        self._specs.put(digest, spec, footprint(spec))
        return spec

    def _holding(self) -> Tuple[Callable[[str], bool], Dict[str, Spec]]:
        """A `known` for the client (is this digest's spec cached?) that holds on to what it found, so a spec
        evicted between the question and its use needs no second fetch."""
        held: Dict[str, Spec] = {}

        def known(digest: str) -> bool:
            spec = self._specs.get(digest)
            if spec is not None:
                held[digest] = spec
            return spec is not None
        return known, held

    def _pulled(self, ref: Reference, deadline: float, requests: RequestBudget) -> _Found:
        """A compatibility artifact, its blob skipped when its spec is cached."""
        known, held = self._holding()
        pulled = self.client.pull(ref, deadline, known, requests)
        spec = held[pulled.digest] if pulled.spec_bytes is None else self._parsed(pulled.digest, pulled.spec_bytes)
        log.info("artifact %s resolved to %s (%d registry requests, %.0f ms)", ref, pulled.digest,
                 pulled.requests, pulled.seconds * 1000)
        return _Found(pulled.digest, pulled.digest, spec)

    def _attached(self, ref: Reference, deadline: float, requests: RequestBudget) -> _Found:
        """An image's digest and the newest compatibility artifact attached to it, its blob skipped when its
        spec is cached."""
        known, held = self._holding()
        found = self.client.attached(ref, deadline, known, requests)
        spec = held.get(found.artifact_digest or "")
        if found.artifact_digest and found.spec_bytes is not None:
            try:
                spec = self._parsed(found.artifact_digest, found.spec_bytes)
            except SpecError as exc:
                raise SpecError(f"its compatibility artifact {ref.registry}/{ref.repository}@"
                                f"{found.artifact_digest} is not a valid compatibility spec: {exc}") from None
        attached = (f"its compatibility artifact is {found.artifact_digest}, the newest of {found.referrers}"
                    if found.artifact_digest else "no compatibility artifact is attached")
        log.info("image %s resolved to %s; %s (found through %s; %d registry requests, %.0f ms)", ref,
                 found.image_digest, attached, found.found_by, found.requests, found.seconds * 1000)
        return _Found(found.image_digest, found.artifact_digest or "", spec)


# ============================================================================================
# Admission: AdmissionReview in -> Decision -> AdmissionReview out; pure but for the artifact source
# ============================================================================================

class BadReview(ValueError):
    """The body is not an AdmissionReview we can answer; the server replies 400."""


class Denial(Exception):
    """A pod that cannot be admitted; the message ends up in the API server's error. `candidates`: how many
    candidate nodes the decision weighed, for the log."""

    reason = "denied"
    code = 403

    def __init__(self, message: str, candidates: int = 0):
        super().__init__(message)
        self.candidates = candidates

    def again(self, prefix: str = "") -> "Denial":
        """A fresh copy (a memoised denial is raised anew each time), its message prefixed."""
        return type(self)(prefix + str(self), self.candidates)


class MissingAnnotation(Denial):
    reason, code = "missing-annotation", 400


class NoPlaceholder(Denial):
    reason, code = "no-placeholder", 400


class MalformedPod(Denial):
    reason, code = "malformed-pod", 400


class SpecInvalid(Denial):
    reason, code = "spec-invalid", 422


class ArtifactUnavailable(Denial):
    reason, code = "artifact-unavailable", 503


class NoCandidates(Denial):
    reason = "no-candidates"

    @classmethod
    def nowhere(cls, placement: Placement) -> "NoCandidates":
        return cls(f"no node matches the pod's {placement.describe()}; nothing to choose an image for")


class NoMatch(Denial):
    reason = "no-match"


class Disagreement(Denial):
    reason = "disagreement"


class NoTag(Denial):
    reason, code = "no-tag", 422


class TooCostly(Denial):
    reason, code = "too-costly", 422


class NoFeatures(Denial):
    reason, code = "no-node-features", 503

    @classmethod
    def check(cls, snapshot: NodeSnapshot, spec: Spec, subject: str, candidates: int = 0) -> None:
        """Raise one when a spec in NFD's dialect meets nodes whose features are missing, saying why."""
        if spec.nfd and snapshot.features_note:
            raise cls(f"{subject} is in NFD's dialect, which matches node features, but there are "
                      f"{snapshot.features_note.replace('no NodeFeatures: ', 'none: ')}", candidates)


class NoCandidateFits(Denial):
    reason = "no-candidate-fits"


@dataclass(frozen=True)
class Decision:
    """What ocifit answers for one review, and what it logs about it. Made by its named constructors,
    untouched(), patched() and denied(); whether the pod is allowed follows from the outcome."""

    outcome: str  # "untouched", "mutated" or "denied"
    reason: str
    message: str = ""
    code: int = 200
    patch: Tuple[Dict[str, Any], ...] = ()
    encoded_patch: str = ""  # base64 of the patch JSON, as the response carries it
    image: str = ""
    matched: str = ""
    candidates: int = 0
    artifact_origin: str = ""
    warnings: Tuple[str, ...] = ()
    pinned: str = ""  # how the pod was pinned to the nodes that fit, when the candidates disagreed
    mode: str = "enforce"  # outcome and reason are what enforce does; warn and audit may answer otherwise

    @classmethod
    def untouched(cls, reason: str, image: str = "") -> "Decision":
        """Allowed as it is: not ocifit's pod, or one it already mutated."""
        return cls("untouched", reason, image=image)

    @classmethod
    def patched(cls, ops: Sequence[Dict[str, Any]], image: str, matched: str, candidates: int, origin: str,
                warnings: Tuple[str, ...] = (), pinned: str = "", reason: str = "selected") -> "Decision":
        """Allowed with a JSONPatch, encoded here once (`pinned`: how the pod was pinned, if it was; `reason`:
        selected, pinned, or generic for a candidate with no spec attached)."""
        return cls("mutated", reason, patch=tuple(ops),
                   encoded_patch=base64.b64encode(json.dumps(ops).encode()).decode(), image=image, matched=matched,
                   candidates=candidates, artifact_origin=origin, warnings=warnings, pinned=pinned)

    @classmethod
    def denied(cls, reason: str, message: str, code: int = 403, candidates: int = 0) -> "Decision":
        """Refused, with a message (capped at MAX_MESSAGE) for the user and an HTTP-style code."""
        return cls("denied", reason, cap_text(message), code, candidates=candidates)

    def in_mode(self, mode: str) -> "Decision":
        """This decision as `mode` answers it (enforce: as it is)."""
        return self if mode == "enforce" or self.outcome == "untouched" else dataclasses.replace(self, mode=mode)

    @property
    def enforced(self) -> bool:
        """Whether the answer is the outcome: in enforce mode, and in warn mode for a mutation."""
        return self.mode == "enforce" or (self.mode == "warn" and self.outcome == "mutated")

    @property
    def allowed(self) -> bool:
        return self.outcome != "denied" or not self.enforced

    def response_fields(self) -> Dict[str, Any]:
        """The AdmissionResponse fields after its uid."""
        response: Dict[str, Any] = {"allowed": self.allowed}
        if not self.allowed:
            response["status"] = {"code": self.code, "message": self.message}
        if self.patch and self.enforced:
            response["patchType"] = "JSONPatch"
            response["patch"] = self.encoded_patch
        warnings = self.warnings + (() if self.enforced else (self.mode_warning,))
        if warnings:
            response["warnings"] = list(warnings)
        return response

    @property
    def mode_warning(self) -> str:
        """What enforce would have done, as a warning the API server shows (it may cut one past 256 characters)."""
        would = f"deny the pod: {self.message}" if self.outcome == "denied" else f"set the image to {self.image}"
        text = f"ocifit {self.mode} mode: enforce would {would}"
        return text if len(text) <= MAX_WARNING else text[:MAX_WARNING - 1] + "…"

    @functools.cached_property
    def response_json(self) -> str:
        """response_fields() as the inside of a JSON object, made once per decision."""
        return json.dumps(self.response_fields())[1:-1]

    @functools.cached_property
    def log_fields(self) -> Dict[str, Any]:
        """The decision's fields in a log entry; one that does not apply (no image, no message) is left out."""
        fields = {"mode": "" if self.mode == "enforce" else self.mode,
                  "outcome": self.outcome, "reason": self.reason, "image": self.image, "matched": self.matched,
                  "candidates": self.candidates, "artifact": self.artifact_origin, "pinned": self.pinned,
                  "message": self.message}
        return {k: v for k, v in fields.items() if v or k == "candidates"}

    @functools.cached_property
    def log_text(self) -> Tuple[str, str]:
        """The decision's part of its text log line, before and after the time taken; made once per decision,
        and mutations are shared by every pod of a Deployment."""
        return (logfmt((k, v) for k, v in self.log_fields.items() if k != "message"),
                logfmt((("message", self.message),)))


class PodFacts(NamedTuple):
    """What the decision needs of a pod (a tuple: one is made for every admission)."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Optional[Mapping[str, str]]  # None: the pod has no annotations object
    placement: Placement
    images: Tuple[Tuple[str, str], ...]  # (JSON pointer to the image field, image)
    affinity: int = 0  # how much of spec.affinity.nodeAffinity exists: 0 none, 1 affinity, 2 nodeAffinity too


def parse_review(body: bytes) -> Dict[str, Any]:
    """The AdmissionReview in a request body, or BadReview saying what is wrong with it."""
    try:
        review = load_json(body)
    except ValueError as exc:
        raise BadReview(f"not valid JSON: {exc}") from None
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise BadReview("not an AdmissionReview (kind must be AdmissionReview)")
    if review.get("apiVersion") not in ADMISSION_VERSIONS:
        raise BadReview(f"AdmissionReview apiVersion {str(review.get('apiVersion'))[:100]} is not one ocifit answers "
                        f"({' or '.join(ADMISSION_VERSIONS)}); set admissionReviewVersions to [v1] in the webhook "
                        "configuration")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("AdmissionReview request has no uid")
    return review


def pod_identity(request: Mapping[str, Any]) -> Tuple[str, str]:
    """(namespace, name) of the pod under review, for messages and log lines, whatever the request's shape.
    A pod without a name yet (a Deployment's) is named by its generateName and `*`."""
    pod = request.get("object")
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or request.get("name") or (str(meta.get("generateName") or "") + "*")
    return str(request.get("namespace") or meta.get("namespace") or ""), str(name)


def pod_facts(request: Mapping[str, Any]) -> PodFacts:
    """The facts of the pod in an admission request; MalformedPod if its shape is wrong."""
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise MalformedPod("the admission request carries no pod object")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise MalformedPod("pod metadata and spec must be objects")
    annotations = meta.get("annotations")
    images = []
    for field_name in ("initContainers", "containers"):
        try:
            containers = _list(spec.get(field_name), f"spec.{field_name}")
        except PodShapeError as exc:
            raise MalformedPod(str(exc)) from None
        for i, container in enumerate(containers):
            if isinstance(container, dict) and isinstance(container.get("image"), str):
                images.append((f"/spec/{field_name}/{i}/image", container["image"]))
    namespace, name = pod_identity(request)
    affinity = spec.get("affinity")
    try:
        return PodFacts(
            namespace=namespace,
            name=name,
            labels=_mapping(meta.get("labels"), "metadata.labels"),
            annotations=None if annotations is None else _mapping(annotations, "metadata.annotations"),
            placement=parse_placement(spec),
            images=tuple(images),
            affinity=0 if not isinstance(affinity, dict) else 2 if isinstance(affinity.get("nodeAffinity"), dict)
            else 1)
    except PodShapeError as exc:
        raise MalformedPod(str(exc)) from None


def _names(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", …+{len(names) - most} more" if len(names) > most else "")


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


@dataclass(frozen=True)
class Choice:
    """The image every candidate node agrees on; or, pinned, the image some agree on and the affinity that keeps
    the pod on them."""

    compatibility: Compatibility
    candidates: int
    pin: Optional["Pin"] = None


def choose(spec: Spec, groups: Sequence[Tuple[Any, Tuple[str, ...]]], placement: Placement, pin: bool = False
           ) -> Choice:
    """The one image all candidate groups select; NoCandidates, NoMatch or Disagreement otherwise (or, with
    `pin`, when some kinds of node match, the image to pin the pod to)."""
    if not groups:
        raise NoCandidates.nowhere(placement)
    by_tag: Dict[Optional[str], List[Tuple[Mapping[str, str], Tuple[str, ...], Selection]]] = {}
    for labels, names in groups:
        selection = spec.select(labels)
        chosen = selection.chosen
        tag = (chosen.tag or chosen.name) if chosen else None  # NFD's dialect: a compatibility may have no tag
        by_tag.setdefault(tag, []).append((labels, names, selection))
    total = sum(len(names) for _, names in groups)
    if len(by_tag) == 1:
        tag, entries = next(iter(by_tag.items()))
        if tag is not None:
            return Choice(entries[0][2].chosen, total)  # type: ignore[arg-type]
        every = sorted(n for _, ns, _ in entries for n in ns)
        raise NoMatch(f"no compatibility matches the {_plural(total, 'candidate node', 'candidate nodes')} "
                      f"({_names(every)}): {entries[0][2].why_none()}", total)
    if pin:
        return pin_choice(spec, by_tag, placement, total)
    raise Disagreement(_disagreement_message(spec, by_tag, total), total)


def _disagreement_message(spec: Spec, by_tag: Mapping[Optional[str], Sequence[tuple]], total: int) -> str:
    """Which nodes want which image, and a nodeSelector that would pin the pod to each."""
    varying = sorted(k for k in spec.keys
                     if len({entry[0].get(k) for entries in by_tag.values() for entry in entries}) > 1)
    parts, pins = [], []
    for tag, entries in sorted(by_tag.items(), key=lambda kv: -sum(len(e[1]) for e in kv[1])):
        names = sorted(n for e in entries for n in e[1])
        if tag is None:
            parts.append(f"{len(names)} {'matches' if len(names) == 1 else 'match'} no compatibility "
                         f"({_names(names)})")
            continue
        parts.append(f"{len(names)} {'wants' if len(names) == 1 else 'want'} {tag} ({_names(names)})")
        selector = {k: entries[0][0][k] for k in varying[:3] if k in entries[0][0]}
        if selector:
            pins.append(f"{json.dumps(selector, sort_keys=True)} for {tag}")
    message = f"the {total} candidate nodes disagree on the image: " + ", ".join(parts)
    let_ocifit = f"let ocifit pin it: annotate the pod {ON_DISAGREEMENT_ANNOTATION}: pin"
    if spec.nfd:  # labels cannot tell these kinds apart
        return message + f"; {let_ocifit}, or pin it to chosen nodes by {HOSTNAME_LABEL}"
    return message + "; pin the pod to one kind of node with a nodeSelector" + (
        ", e.g. " + " or ".join(pins) if pins else "") + f"; or {let_ocifit}"


def memoised(snapshot: NodeSnapshot, key: tuple, spec: Spec, compute: Callable[..., Tuple[Any, int]],
             *args: Any) -> Any:
    """compute(*args)'s answer, kept on the snapshot under key (compute gives the answer and the size of what
    else the key holds): snapshot, spec and placement are all immutable, so the same question asked again (every
    pod of a Deployment) gets the same answer for free, and asked at once, is computed once while the others
    wait. The memo holds the spec only weakly, to check by identity that an answer is its own (the id() a key
    holds may be reused once a spec is gone)."""
    hit = snapshot.memo.get(key)
    if hit is not None and hit[0]() is spec:
        return hit[1]
    with snapshot.lock:
        running = snapshot.computing.get(key)
        if running is None:
            snapshot.computing[key] = threading.Event()
    if running is not None:  # the same decision is being made: wait for it, then take its answer
        running.wait()
        hit = snapshot.memo.get(key)
        if hit is not None and hit[0]() is spec:
            return hit[1]
        return compute(*args)[0]  # it failed, or was too large to keep
    try:
        answer, size = compute(*args)
        snapshot.memo.put(key, (weakref.ref(spec), answer), size + footprint(answer))
        return answer
    finally:
        with snapshot.lock:
            snapshot.computing.pop(key).set()


def choose_for(snapshot: NodeSnapshot, spec: "Spec", placement: Placement, pin: bool = False) -> Any:
    """choose() over the pod's candidate groups, memoised on the snapshot (a denial too, raised anew)."""
    outcome = memoised(snapshot, (id(spec), placement, pin), spec, _choice_or_denial, snapshot, spec, placement, pin)
    if isinstance(outcome, Denial):
        raise outcome.again()
    return outcome


def _choice_or_denial(snapshot: NodeSnapshot, spec: Spec, placement: Placement, pin: bool) -> Tuple[Any, int]:
    try:
        outcome: Any = choose(spec, candidate_groups(snapshot, placement, spec), placement, pin)
    except Denial as denial:
        return denial.with_traceback(None), placement.size
    return outcome, placement.size


# ---- pinning: on disagreement, keep the pod on the kinds of node that fit the best image ----

MAX_PIN_TERMS = 64
HOSTNAME_LABEL = "kubernetes.io/hostname"


@dataclass(frozen=True)
class Pin:
    """A required node affinity that keeps a pod on the kinds of node that fit the chosen image: its
    nodeSelectorTerms (JSON-ready), how many of the candidate nodes it keeps, and what the others would have
    needed."""

    terms: Tuple[str, ...]  # each nodeSelectorTerm as JSON text, so the Pin hashes and memoises
    nodes: int
    total: int
    others: str
    by_hostname: bool = False
    other_images: Tuple[str, ...] = ()

    def warning(self, image: str) -> str:
        """A line for `kubectl apply` to show: under 120 characters, counts and images, no node lists."""
        start = f"ocifit pinned the pod to {self.nodes} of {self.total} nodes for {image}"
        line = start + (f"; the others would need {', '.join(self.other_images)}" if self.other_images else "")
        if len(line) >= 120:
            line = start + f"; the others would need {len(self.other_images)} other images"
        return line if len(line) < 120 else start[:119]

    def describe(self) -> str:
        kept = f"{self.nodes} of {self.total} candidate nodes"
        how = (" by hostname (NFD's features tell kinds apart, labels cannot: nodes added later do not qualify)"
               if self.by_hostname else "")
        return f"{kept}{how}; the others would have needed {self.others}"


def _requirement_json(requirement: Requirement) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"key": requirement.key, "operator": requirement.op}
    if requirement.op not in ("Exists", "DoesNotExist"):
        entry["values"] = list(requirement.values)
    return entry


def pin_choice(spec: Spec, by_tag: Mapping[Optional[str], Sequence[tuple]], placement: Placement, total: int
               ) -> Choice:
    """The image to pin the pod to when candidate nodes disagree: of the images some kind of node would choose,
    the one whose winning compatibility weighs most, then the one more nodes would choose, then the one listed
    first; and the affinity that keeps the pod on those kinds (by the spec's labels, or by hostname for NFD's
    dialect), ANDed with each of the pod's own required terms."""
    scored = []
    for key, entries in by_tag.items():
        if key is None:
            continue
        best = max((e[2].chosen for e in entries), key=lambda c: (c.weight, -c.index))
        count = sum(len(e[1]) for e in entries)
        scored.append(((-best.weight, -count, best.index), key, best, entries))
    _, key, compatibility, entries = min(scored)
    kept = sum(len(e[1]) for e in entries)
    if spec.nfd:
        kinds = [[{"key": HOSTNAME_LABEL, "operator": "In", "values": sorted(n for e in entries for n in e[1])}]]
    else:
        distinct = sorted({tuple(sorted(e[0].items())) for e in entries})
        kinds = [[{"key": k, "operator": "In", "values": [dict(kind)[k]]} if k in dict(kind) else
                  {"key": k, "operator": "DoesNotExist"} for k in sorted(spec.keys)] for kind in distinct]
    if not placement.constrained:  # the candidates left control-plane nodes out: so does the pin
        kinds = [kind + [{"key": CONTROL_PLANE_LABELS[0], "operator": "DoesNotExist"}] for kind in kinds]
    terms = []
    for own in placement.terms or (None,):
        for kind in kinds:
            term: Dict[str, Any] = {"matchExpressions": ([_requirement_json(r) for r in own.labels] if own else [])
                                    + kind}
            if own is not None and own.names:
                term["matchFields"] = [_requirement_json(r) for r in own.names]
            terms.append(json.dumps(term, sort_keys=True))
    if len(terms) > MAX_PIN_TERMS:
        raise Disagreement(f"the candidate nodes disagree, and pinning the pod would take {len(terms)} node "
                           f"selector terms (the pod's own times the kinds of node), over {MAX_PIN_TERMS}; pin it "
                           "with a nodeSelector instead", total)
    others = ", ".join(f"{k} ({_plural(sum(len(e[1]) for e in es), 'node', 'nodes')})"
                       for k, es in sorted(by_tag.items(), key=lambda kv: str(kv[0])) if k is not None and k != key)
    unmatched = sum(len(e[1]) for e in by_tag.get(None, ()))
    if unmatched:
        others += (", " if others else "") + f"an image no compatibility names ({_plural(unmatched, 'node', 'nodes')})"
    other_images = tuple(sorted(str(k) for k in by_tag if k is not None and k != key))
    return Choice(compatibility, total, Pin(tuple(terms), kept, total, others, spec.nfd, other_images))


def candidate_groups(snapshot: NodeSnapshot, placement: Placement, spec: Spec
                     ) -> List[Tuple[Any, Tuple[str, ...]]]:
    """(what the spec sees of them, node names) for each kind of node the pod can land on: the labels the spec
    reads, or (NFD's dialect) the node features."""
    result: List[Tuple[Any, Tuple[str, ...]]] = []
    for group in snapshot.partition(frozenset(spec.keys | placement.keys), spec.features if spec.nfd else frozenset()):
        names = placement.select(group)
        if names:
            result.append((group.features if spec.nfd else {k: v for k, v in group.labels.items() if k in spec.keys},
                           names))
    return result


def escape_pointer(token: str) -> str:
    """A JSON Pointer token (RFC 6901): ~ becomes ~0, / becomes ~1."""
    return token.replace("~", "~0").replace("/", "~1")


def mutation(pod: PodFacts, targets: Sequence[str], choice: Choice, artifact: Artifact) -> Decision:
    """The decision that swaps the target images for the chosen one, records why in the pod's annotations, and,
    when the choice pins the pod, sets its required node affinity."""
    artifact_note = f"{artifact.ref}@{artifact.digest}" if "@" not in artifact.ref else artifact.ref
    return _shared_mutation(tuple(targets), pod.annotations is None, choice.compatibility.tag,
                            choice.compatibility.name, artifact_note, choice.candidates, artifact.origin,
                            artifact.warnings, choice.pin, pod.affinity, "pinned" if choice.pin else "selected")


def candidate_mutation(pod: PodFacts, targets: Sequence[str], attached: AttachedSpec, matched: str, nodes: int,
                       reason: str = "selected") -> Decision:
    """The decision that swaps the target images for a candidate image, pinned to its checked digest, and
    records which candidate and which attached artifact chose it (`reason`: "generic" when none is attached)."""
    return _shared_mutation(tuple(targets), pod.annotations is None, attached.image, matched, attached.artifact,
                            nodes, attached.origin, attached.warnings, None, pod.affinity, reason)


def _shared_mutation(*key: Any) -> Decision:
    """_mutation(*key), made once for every pod that shares its key."""
    decision = _MUTATIONS.get(key)
    if decision is None:
        decision = _mutation(*key)
        pin = key[8]
        _MUTATIONS.put(key, decision, 400 * len(key[0]) + 2048 + sum(len(t) for t in (pin.terms if pin else ())))
    return decision


_MUTATIONS = BoundedCache(CACHE_BOUNDS["mutations"])
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"


def _mutation(targets: Tuple[str, ...], no_annotations: bool, image: str, matched: str, artifact_note: str,
              candidates: int, origin: str, warnings: Tuple[str, ...], pin: Optional[Pin], affinity: int, reason: str
              ) -> Decision:
    """Made once per distinct outcome, with its patch encoded: every pod of a Deployment shares one. Decisions
    are immutable; the patch ops they carry are shared too, so treat them as read-only."""
    ops: List[Dict[str, Any]] = [{"op": "replace", "path": path, "value": image} for path in targets]
    record = {SELECTED_IMAGE_ANNOTATION: image, MATCHED_ANNOTATION: matched, ARTIFACT_ANNOTATION: artifact_note}
    if pin is not None:
        record[PINNED_ANNOTATION] = pin.describe()
        required = {"nodeSelectorTerms": [json.loads(term) for term in pin.terms]}
        ops.append({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": {REQUIRED: required}}}
                   if affinity == 0 else
                   {"op": "add", "path": "/spec/affinity/nodeAffinity", "value": {REQUIRED: required}}
                   if affinity == 1 else
                   {"op": "add", "path": f"/spec/affinity/nodeAffinity/{REQUIRED}", "value": required})
        warnings += (pin.warning(image),)
    if no_annotations:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": record})
    else:
        ops.extend({"op": "add", "path": "/metadata/annotations/" + escape_pointer(k), "value": v}
                   for k, v in record.items())
    return Decision.patched(ops, image, matched, candidates, origin, warnings, pin.describe() if pin else "", reason)


ArtifactGetter = Callable[[str], Artifact]
AttachedGetter = Callable[[str], AttachedSpec]


def decide(request: Mapping[str, Any], snapshot: NodeSnapshot, get_artifact: ArtifactGetter,
           on_disagreement: str = "deny", get_attached: Optional[AttachedGetter] = None) -> Decision:
    """The decision for one admission request. Raises nothing: every failure is a denial. `on_disagreement`:
    what to do when the candidate nodes disagree, unless the pod's annotation says: deny, or pin.
    `get_attached`: a candidate image's attached spec (None: candidates pods are denied)."""
    try:
        return metered(lambda: _decide(request, snapshot, get_artifact, on_disagreement, get_attached))
    except Denial as denial:
        return Decision.denied(denial.reason, str(denial), denial.code, denial.candidates)
    except BudgetExceeded as exc:  # in placing the pod, before any spec was read
        return Decision.denied(TooCostly.reason, f"the pod's placement: {exc}", TooCostly.code)


def _decide(request: Mapping[str, Any], snapshot: NodeSnapshot, get_artifact: ArtifactGetter,
            on_disagreement: str, get_attached: Optional[AttachedGetter]) -> Decision:
    kind = (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), dict) else None
    if kind != "Pod" or request.get("operation") != "CREATE" or request.get("subResource"):
        return Decision.untouched("not-pod-create")
    pod = pod_facts(request)
    if pod.labels.get(ENABLED_LABEL) != "true":
        return Decision.untouched("not-enabled")
    annotations = pod.annotations or {}
    target = annotations.get(TARGET_IMAGE_ANNOTATION) or DEFAULT_TARGET_IMAGE
    targets = [path for path, image in pod.images if image == target]
    if not targets and SELECTED_IMAGE_ANNOTATION in annotations:
        return Decision.untouched("already-mutated", image=annotations[SELECTED_IMAGE_ANNOTATION])
    ref = annotations.get(IMAGE_REF_ANNOTATION, "").strip()
    listed = annotations.get(CANDIDATES_ANNOTATION, "").strip()
    if ref and listed:
        raise MalformedPod(f"the pod has both {IMAGE_REF_ANNOTATION} (one compatibility artifact naming images) "
                           f"and {CANDIDATES_ANNOTATION} (images chosen by the specs attached to them); choose one")
    if not ref and not listed:
        raise MissingAnnotation(f"pod is labelled {ENABLED_LABEL}=true but has no {IMAGE_REF_ANNOTATION} "
                                f"annotation naming the compatibility artifact (or {CANDIDATES_ANNOTATION} listing "
                                "candidate images)")
    if not targets:
        raise NoPlaceholder(f"no container or initContainer uses the target image {json.dumps(target)}; "
                            f"set the image to it or name another with the {TARGET_IMAGE_ANNOTATION} annotation")
    mode = annotations.get(ON_DISAGREEMENT_ANNOTATION, on_disagreement).strip()
    if mode not in ("deny", "pin"):
        raise MalformedPod(f"annotation {ON_DISAGREEMENT_ANNOTATION} is {json.dumps(mode)}; use pin or deny")
    if listed:
        return choose_candidate(pod, targets, candidate_images(listed), snapshot, get_attached, mode == "pin")
    try:
        artifact = get_artifact(ref)
    except SpecError as exc:
        raise SpecInvalid(f"artifact {ref} is not a valid compatibility spec: {exc}") from None
    except ArtifactError as exc:
        raise ArtifactUnavailable(str(exc)) from None
    NoFeatures.check(snapshot, artifact.spec, f"artifact {ref}")
    try:
        choice = choose_for(snapshot, artifact.spec, pod.placement, pin=mode == "pin")
    except Denial as denial:
        raise denial.again(f"artifact {ref}: ") from None
    except BudgetExceeded as exc:
        raise TooCostly(f"artifact {ref}: {exc}; simplify the spec, or keep the pod to fewer kinds of node") from None
    if not choice.compatibility.tag:
        raise NoTag(f"artifact {ref}: {choice.compatibility.name} matches the {choice.candidates} candidate nodes "
                    "but names no image (no tag); in NFD's dialect a compatibility without a tag only says that an "
                    "image can run, so to select an image by it, give it a tag", choice.candidates)
    return mutation(pod, targets, choice, artifact)


# ---- candidates: the first image whose attached spec fits every candidate node ----

MAX_CANDIDATE_IMAGES = 16


def candidate_images(text: str) -> Tuple[str, ...]:
    """The images a candidates annotation lists, best first (comma- or whitespace-separated, repeats dropped);
    MalformedPod when it lists none or too many."""
    images = tuple(dict.fromkeys(name for name in re.split(r"[\s,]+", text) if name))
    if not images:
        raise MalformedPod(f"annotation {CANDIDATES_ANNOTATION} lists no image")
    if len(images) > MAX_CANDIDATE_IMAGES:
        raise MalformedPod(f"annotation {CANDIDATES_ANNOTATION} lists {len(images)} images, over "
                           f"{MAX_CANDIDATE_IMAGES}")
    return images


@dataclass(frozen=True)
class Fit:
    """How an attached spec fits the pod's candidate nodes: how many no compatibility set admits (none: it
    fits), the first few of them, and why the first fails (each set's first failing expression)."""

    failing: int
    names: Tuple[str, ...]
    why: str

    def describe(self, total: int) -> str:
        names = self.names + (("…",) if self.failing > len(self.names) else ())
        return f"{self.failing} of {total} candidate nodes fail ({', '.join(names)}); on {self.names[0]}: {self.why}"


def fit_for(snapshot: NodeSnapshot, spec: Spec, placement: Placement) -> Fit:
    """How the spec fits the pod's candidate nodes: a node is admitted when any compatibility set matches it
    (NFD's reading: each set is one way the image can run). Memoised on the snapshot, as choose_for is."""
    return cast(Fit, memoised(snapshot, ("fit", id(spec), placement), spec, _fit, snapshot, spec, placement))


def _fit(snapshot: NodeSnapshot, spec: Spec, placement: Placement) -> Tuple[Fit, int]:
    failing: List[Tuple[str, Tuple[str, ...], Selection]] = []
    for facts, names in candidate_groups(snapshot, placement, spec):
        selection = spec.select(facts)
        if selection.chosen is None:
            failing.append((min(names), names, selection))
    every = sorted(name for _, names, _ in failing for name in names)
    first = min(failing, key=lambda entry: entry[0]) if failing else None
    fit = Fit(len(every), tuple(every[:3]), first[2].why_none() if first else "")
    return fit, placement.size


def candidate_node_count(snapshot: NodeSnapshot, placement: Placement) -> int:
    """How many nodes the pod can land on, memoised on the snapshot."""
    key = ("nodes", placement)
    count = snapshot.memo.get(key)
    if count is None:
        count = sum(len(placement.select(group)) for group in snapshot.partition(frozenset(placement.keys)))
        snapshot.memo.put(key, count, placement.size + 64)
    return count


def choose_candidate(pod: PodFacts, targets: Sequence[str], images: Sequence[str], snapshot: NodeSnapshot,
                     get_attached: Optional[AttachedGetter], pin: bool = False) -> Decision:
    """The first candidate image whose attached spec fits every candidate node, or that has none attached (a
    generic image runs anywhere). A candidate that cannot be looked up denies the pod: ocifit never falls
    through to a less preferred image without knowing that this one does not fit. (`pin`: on-disagreement is
    pin, by the pod's annotation or the server's flag; candidates do not pin, and a denial says so.)"""
    nodes = candidate_node_count(snapshot, pod.placement)
    if not nodes:
        raise NoCandidates.nowhere(pod.placement)
    if get_attached is None:
        raise ArtifactUnavailable("candidate images are chosen by the specs attached to them in registries, and "
                                  "this mode has no registry access")
    misfits: List[str] = []
    every_node = "the 1 candidate node" if nodes == 1 else f"all {nodes} candidate nodes"
    for index, text in enumerate(images):
        rank = f"candidates[{index}] of {len(images)}"
        later = f"; not trying {_names(images[index + 1:], 2)} after it" if index + 1 < len(images) else ""
        earlier = f" (looked up after {'; '.join(misfits)})" if misfits else ""
        try:
            attached = get_attached(text)
        except SpecError as exc:
            raise SpecInvalid(f"candidate image {text}: {exc}{later}{earlier}", nodes) from None
        except ArtifactError as exc:
            raise ArtifactUnavailable(f"candidate image {text}: {exc}{later}{earlier}", nodes) from None
        if attached.spec is None:
            return candidate_mutation(pod, targets, attached, f"{rank}: no compatibility artifact attached, so it "
                                      f"runs on any of the {_plural(nodes, 'candidate node', 'candidate nodes')}",
                                      nodes, "generic")
        NoFeatures.check(snapshot, attached.spec, f"candidate image {text}: its attached spec", nodes)
        try:
            fit = fit_for(snapshot, attached.spec, pod.placement)
        except BudgetExceeded as exc:
            raise TooCostly(f"candidate image {text}: its attached spec: {exc}{later}{earlier}", nodes) from None
        if not fit.failing:
            return candidate_mutation(pod, targets, attached, f"{rank}: its attached spec fits {every_node}", nodes)
        misfits.append(f"({index + 1}) {text}: {fit.describe(nodes)}")
    none = "the candidate image does not" if len(images) == 1 else f"none of the {len(images)} candidate images"
    raise NoCandidateFits(f"{none} fit{'s' if len(images) > 1 else ''} {every_node}: " + "; ".join(misfits)
                          + "; list a generic image last (one with no compatibility artifact attached), or keep the "
                          "pod to nodes that fit with a nodeSelector"
                          + (f" ({ON_DISAGREEMENT_ANNOTATION}: pin does not apply to candidates)" if pin else ""),
                          nodes)


def encode_review_response(review: Mapping[str, Any], decision: Decision) -> bytes:
    """The AdmissionReview that answers `review` with `decision`, as JSON bytes made from the decision's own
    encoding: a mutation's patch is encoded once for every pod that shares it, not once per admission."""
    return (f'{{"apiVersion": {json.dumps(_answer_version(review))}, "kind": "AdmissionReview", '
            f'"response": {{"uid": {json.dumps(review["request"]["uid"])}, {decision.response_json}}}}}').encode()


def _answer_version(review: Mapping[str, Any]) -> str:
    api_version = review.get("apiVersion")
    return api_version if api_version in ADMISSION_VERSIONS else ADMISSION_VERSIONS[0]


# ---- the edge: a body in, a reply out, with the artifact fetched, the line logged, the metrics counted ----

class Webhook:
    """The admission edge: body in, response out, with the artifact fetch, the log line and the metrics."""

    def __init__(self, settings: Settings, nodes: NodeSource, artifacts: ArtifactSource,
                 metrics: Optional[Metrics] = None, log_admissions: bool = True):
        self.settings = settings
        self.log_admissions = log_admissions  # the review subcommand says the outcome itself
        self.nodes = nodes
        self.artifacts = artifacts
        self.metrics = metrics or Metrics()

    def handle(self, body: bytes) -> Tuple[int, bytes]:
        """(HTTP status, JSON reply) for one POST /mutate body: 200 with the AdmissionReview that answers it, or
        400 with {"error": why} when the body is no AdmissionReview."""
        try:
            review, decision = self.review(body)
        except BadReview as exc:
            return 400, json.dumps({"error": str(exc)}).encode()
        return 200, encode_review_response(review, decision)

    def review(self, body: bytes) -> Tuple[Dict[str, Any], Decision]:
        """The AdmissionReview in a body and its decision, counted and logged; BadReview if it is not one."""
        started = time.monotonic()
        try:
            review = parse_review(body)
        except BadReview:
            self.metrics.count("ocifit_admissions_total", outcome="bad-request", reason="bad-review",
                               mode=self.settings.mode)
            raise
        request = review["request"]
        deadline = started + self.settings.fetch_budget
        requests = RequestBudget()
        try:
            decision = decide(request, self.nodes.snapshot(), lambda ref: self.artifacts.get(ref, deadline, requests),
                              self.settings.on_disagreement,
                              lambda ref: self.artifacts.attached(ref, deadline, requests))
        except Exception as exc:  # a bug must cost one clear denial, never the connection
            log.exception("internal error deciding admission %s", request.get("uid"))
            decision = Decision.denied("internal-error", f"ocifit internal error: {exc!r}", 500)
        decision = decision.in_mode(self.settings.mode)
        self._record(request, decision, time.monotonic() - started)
        return review, decision

    def _record(self, request: Mapping[str, Any], decision: Decision, elapsed: float) -> None:
        self.metrics.count("ocifit_admissions_total", outcome=decision.outcome, reason=decision.reason,
                           mode=self.settings.mode)
        self.metrics.observe("ocifit_admission_duration_seconds", elapsed)
        if decision.reason in ("not-pod-create", "not-enabled"):
            log.debug("admission %s allowed untouched (%s)", request.get("uid"), decision.reason)
            return
        if not self.log_admissions or not log.isEnabledFor(logging.INFO if decision.allowed else logging.WARNING):
            return
        namespace, name = pod_identity(request)
        log.handle(AdmissionRecord(namespace, name, str(request.get("uid")), decision, round(elapsed * 1000, 1)))


# ============================================================================================
# HTTP server: HTTPS with reloadable certificates, /mutate /healthz /readyz /metrics
# ============================================================================================

def certificate_expiry(pem: bytes) -> Optional[float]:
    """The notAfter of the first PEM certificate, as a Unix time, read from its DER (the standard library has no
    public certificate parser); None if it cannot be read."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii", "replace").split("-----END CERTIFICATE-----")[0]
                                       + "-----END CERTIFICATE-----\n")
        return _der_not_after(der)
    except (ValueError, IndexError):
        return None


def _der_read(data: bytes, at: int) -> Tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `at`."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        length, at = int.from_bytes(data[at:at + count], "big"), at + count
    return tag, at, at + length


def _der_not_after(der: bytes) -> float:
    """notAfter of an X.509 certificate: Certificate > TBSCertificate > Validity > second time."""
    _, at, _ = _der_read(der, 0)  # Certificate
    _, at, end = _der_read(der, at)  # TBSCertificate
    fields: List[Tuple[int, int, int]] = []
    while at < end and len(fields) < 5:
        tag, start, stop = _der_read(der, at)
        fields.append((tag, start, stop))
        at = stop
    if fields[0][0] != 0xA0:  # no explicit version: v1, one field fewer before Validity
        fields.insert(0, (0xA0, 0, 0))
    _, at, _ = fields[4]  # version, serial, signature algorithm, issuer, validity
    _, _, first_end = _der_read(der, at)
    tag, start, stop = _der_read(der, first_end)
    text = der[start:stop].decode("ascii")
    stamp = text if tag == 0x18 else ("19" if int(text[:2]) >= 50 else "20") + text  # GeneralizedTime or UTCTime
    return float(calendar.timegm(time.strptime(stamp.rstrip("Z")[:14], "%Y%m%d%H%M%S")))


class TLSFiles:
    """The serving certificate: loaded from files, reloaded when they change, the last good pair kept."""

    def __init__(self, cert: str, key: str, check_interval: float = 10.0):
        self.cert, self.key = cert, key
        self.file = WatchedFile([cert, key], self._load, "the serving certificate and key", check_interval, cap=MiB)

    def _load(self, contents: List[bytes]) -> Tuple[ssl.SSLContext, Optional[float]]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise ValueError(f"certificate {self.cert} / key {self.key} not loaded: {exc}") from None
        return context, certificate_expiry(contents[0])

    def context(self) -> ssl.SSLContext:
        return self.file.value[0]

    @property
    def expiry(self) -> Optional[float]:
        return self.file.value[1]

    @property
    def error(self) -> str:
        return self.file.error


@dataclass(eq=False)
class Connection:
    """One client connection: its socket (the TLS one once wrapped), its client address and what it is doing.
    `waiting` connections (no request under way: fresh, or kept alive between requests) are the ones closed
    first when slots run short."""

    sock: socket.socket
    client: str
    accepted: float = field(default_factory=time.monotonic)
    handshaken: bool = False  # TLS done (or none to do)
    waiting: bool = False
    since: float = 0.0  # when it began waiting
    evicted: bool = False
    served: int = 0  # requests answered on it: a waiting connection that has served one is idle keep-alive


NEW_CONNECTION_GRACE = 2.0  # after the drain delay, seconds a new connection may take to send its first request


class ConnectionTable:
    """The open connections, with a cap in all and a cap per client address. When a new connection finds the
    slots full, the longest-waiting idle connection is closed to make room (of the same client, when that
    client is at its own cap); only when none waits is the new one refused. Refusals are counted and logged at
    most once every LOG_EVERY seconds, with how many there were."""

    LOG_EVERY = 5.0
    HANDSHAKE_GRACE = 1.0  # a connection still without its TLS handshake after this long may make room too

    def __init__(self, most: int, most_per_client: int, metrics: "Metrics"):
        self.most, self.most_per_client, self.metrics = most, most_per_client, metrics
        self._lock = threading.Lock()
        self._open: Dict[int, Connection] = {}
        self._per_client: Dict[str, int] = collections.Counter()
        self._refused_unlogged = 0
        self._refusal_logged_at = -1e9
        metrics.gauge("ocifit_connections_open", lambda: len(self._open))

    def admit(self, sock: socket.socket, client: str) -> Optional[Connection]:
        """A Connection for a new socket, or None when it must be refused."""
        with self._lock:
            if self._per_client[client] >= self.most_per_client and not self._evict_one(client):
                refused = "per-client"
            elif len(self._open) >= self.most and not self._evict_one(None):
                refused = "capacity"
            else:
                connection = Connection(sock, client)
                self._open[id(connection)] = connection
                self._per_client[client] += 1
                return connection
        self._refused(refused, client)
        return None

    def _evict_one(self, client: Optional[str]) -> bool:
        """Close the longest-waiting idle connection (of `client`, if given). Holds the lock."""
        stalled_since = time.monotonic() - self.HANDSHAKE_GRACE
        idle = [c for c in self._open.values() if (client is None or c.client == client) and (
            c.waiting or (not c.handshaken and c.accepted < stalled_since))]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.since if c.waiting else c.accepted))
        self.metrics.count("ocifit_connections_evicted_total")
        return True

    def close_idle(self, new_grace: float) -> int:
        """Close the connections with no request under way: idle keep-alive ones, and new ones that have sent
        nothing for `new_grace` seconds (a client may be writing its first request to a new one right now, as
        Go's Server.Shutdown allows for). How many were closed."""
        stalled_since = time.monotonic() - new_grace
        with self._lock:
            idle = [c for c in self._open.values() if c.waiting and (c.served or c.accepted < stalled_since)
                    or not c.handshaken and c.accepted < stalled_since]
            for connection in idle:
                self._close(connection)
        return len(idle)

    def _close(self, connection: Connection) -> None:
        """Take a connection out and shut its socket down: its thread wakes, sees EOF and ends. Holds the lock."""
        self._drop(connection)
        connection.evicted = True
        REAPER.forget(connection)
        try:
            socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _drop(self, connection: Connection) -> None:
        if self._open.pop(id(connection), None) is not None:
            self._per_client[connection.client] -= 1
            if not self._per_client[connection.client]:
                del self._per_client[connection.client]

    def wait(self, connection: Connection) -> None:
        """The connection has no request under way: it may be closed to make room. (No lock: an evictor that
        reads these a moment late only picks another connection.)"""
        connection.since, connection.waiting = time.monotonic(), True

    def busy(self, connection: Connection) -> bool:
        """A request has begun on the connection; False if it was closed to make room meanwhile."""
        with self._lock:
            connection.waiting = False
            return not connection.evicted

    def release(self, connection: Connection) -> None:
        REAPER.forget(connection)
        with self._lock:
            self._drop(connection)

    def _refused(self, reason: str, client: str) -> None:
        self.metrics.count("ocifit_connections_refused_total", reason=reason)
        now = time.monotonic()
        with self._lock:
            self._refused_unlogged += 1
            if now - self._refusal_logged_at < self.LOG_EVERY:
                return
            count, self._refused_unlogged, self._refusal_logged_at = self._refused_unlogged, 0, now
        cap = (f"{self.most_per_client} connections per client (--max-connections-per-client)"
               if reason == "per-client" else f"{self.most} connections (--max-connections)")
        log.warning("refused %d connection%s: %s open already; the latest from %s",
                    count, "" if count == 1 else "s", cap, client)

    def __len__(self) -> int:
        return len(self._open)


class WebhookServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS handshakes in each connection's own thread, a deadline for each request
    (handshake, headers and body together), caps on connections in all and per client, idle connections
    closed first when slots run short, and a budget for request bodies in flight."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, settings: Settings, webhook: Webhook, tls: Optional[TLSFiles]):
        self.settings, self.webhook, self.tls = settings, webhook, tls
        self.draining = False  # SIGTERM came: not ready, every reply closes its connection
        self.connections = ConnectionTable(settings.max_connections, settings.max_connections_per_client,
                                           webhook.metrics)
        self.bodies = InFlight(settings.max_inflight_bytes)
        webhook.metrics.gauge("ocifit_admissions_in_flight", lambda: self.bodies.requests)
        address = settings.bind or "::"
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            try:
                super().__init__((address, settings.port), WebhookHandler)
            except OSError as exc:
                if settings.bind or exc.errno == errno.EADDRINUSE:  # the operator's address, or a port in use
                    raise
                address, self.address_family = "0.0.0.0", socket.AF_INET  # no IPv6 on this host
                super().__init__((address, settings.port), WebhookHandler)
        except OSError as exc:
            where = f"[{address}]" if ":" in address else address
            raise OSError(f"cannot listen on {where}:{settings.port} (--bind, --port): {exc.strerror or exc}") from None

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def get_request(self) -> Tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit the connection or close it at once; admitted ones get a thread of their own."""
        client = str(client_address[0])
        if client.startswith("::ffff:"):
            client = client[7:]  # an IPv4 client on the dual-stack socket
        connection = self.connections.admit(request, client)
        if connection is None:
            self.shutdown_request(request)
            return
        connection.handshaken = self.tls is None
        REAPER.watch(connection, request, connection.accepted + self._first_deadline(handshake=self.tls is not None))
        threading.Thread(target=self.process_request_thread, args=(request, client_address, connection),
                         daemon=True).start()

    def process_request_thread(self, request: Any, client_address: Any,
                               connection: Optional[Connection] = None) -> None:
        assert connection is not None
        try:
            if self.tls is not None:
                request = self._handshake(request, client_address, connection)
            if request is not None:
                self.finish_request(request, client_address, connection)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.connections.release(connection)
            if request is not None:
                self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any,
                       connection: Optional[Connection] = None) -> None:
        WebhookHandler(request, client_address, self, connection)

    def _handshake(self, sock: socket.socket, client_address: Any, connection: Connection
                   ) -> Optional[ssl.SSLSocket]:
        """TLS in this connection's own thread, done by the handshake deadline."""
        assert self.tls is not None
        sock.settimeout(self.settings.handshake_timeout)
        try:
            tls_sock = self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            connection.sock = tls_sock  # wrapping took over the descriptor: the reaper must hold the new socket
            REAPER.watch(connection, tls_sock, connection.accepted + self._first_deadline(handshake=True))
            tls_sock.do_handshake()
            connection.handshaken = True
            REAPER.watch(connection, tls_sock, connection.accepted + self._first_deadline(handshake=False))
            return tls_sock
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            sock.close()
            return None

    def _first_deadline(self, handshake: bool) -> float:
        """Seconds from accept() by which the handshake (if `handshake`), or the first request's headers and
        body, must have arrived."""
        settings = self.settings
        return min(settings.handshake_timeout, settings.request_timeout) if handshake else settings.request_timeout

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, ssl.SSLError)):
            log.debug("connection from %s ended: %s", client_address[0], exc)
        else:
            log.exception("unexpected error serving %s", client_address[0])

    def readiness(self) -> Tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if self.tls is not None and self.tls.error:
            log.debug("readiness: %s", self.tls.error)
        ok, why = self.webhook.nodes.health()
        return ok, why


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    """POST /mutate, GET /healthz /readyz /metrics; one write per response."""

    protocol_version = "HTTP/1.1"
    server_version = "ocifit/" + __version__
    sys_version = ""
    server: WebhookServer

    def __init__(self, request: Any, client_address: Any, server: WebhookServer,
                 tracked: Optional[Connection] = None):
        self.tracked = tracked  # the server's record of this connection (None when built by hand)
        self.served = 0
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.settings.request_timeout)

    def handle_one_request(self) -> None:
        """One request, after waiting for its first byte: between requests the connection is idle (closed after
        --idle-timeout, or sooner when slots run short); from the first byte on, headers and body must arrive
        within --request-timeout in all (the first request's count from accept(), handshake included)."""
        settings, tracked = self.server.settings, self.tracked
        if tracked is not None:
            self.server.connections.wait(tracked)
        if self.served:  # idle: no bytes at all is all a timeout needs to catch, so no deadline to reap
            if tracked is not None:
                REAPER.forget(tracked)
            self.connection.settimeout(settings.idle_timeout)
        try:
            started = cast(io.BufferedReader, self.rfile).peek(1)
        except (OSError, ValueError):  # idle timeout, evicted, reset
            started = b""
        if not started or (tracked is not None and not self.server.connections.busy(tracked)):
            self.close_connection = True
            return
        if self.served and tracked is not None:
            REAPER.watch(tracked, tracked.sock, time.monotonic() + settings.request_timeout)
            self.connection.settimeout(settings.request_timeout)
        self.served += 1
        super().handle_one_request()
        if tracked is not None:
            tracked.served = self.served

    def reply(self, status: int, body: bytes, content_type: str = "application/json", close: bool = False,
              headers: Optional[Mapping[str, str]] = None) -> None:
        """Status line, headers and body in one write, so no response waits on Nagle's algorithm."""
        phrase = http.HTTPStatus(status).phrase
        close = close or self.server.draining  # after SIGTERM, no client keeps a connection to reuse
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()) if headers else ""
        head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}" + ("Connection: close\r\n" if close else "") + "\r\n")
        self.wfile.write(head.encode("latin-1") + body)
        if close:
            self.close_connection = True
        self.log_request(status, len(body))

    def reply_json(self, status: int, payload: Any, close: bool = False,
                   headers: Optional[Mapping[str, str]] = None) -> None:
        self.reply(status, json.dumps(payload).encode(), close=close, headers=headers)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Errors the stdlib detects (bad request line, unsupported method) as one JSON reply, then close."""
        self.reply_json(code, {"error": message or http.HTTPStatus(code).phrase}, close=True)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a GET with a body: its bytes must not be read as the next request
        if path == "/healthz":
            self.reply(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            ok, why = self.server.readiness()
            self.reply(200 if ok else 503, (("ready: " if ok else "not ready: ") + why + "\n").encode(),
                       "text/plain; charset=utf-8")
        elif path == "/metrics":
            self.reply(200, self.server.webhook.metrics.render().encode(), METRICS_CONTENT_TYPE)
        elif path == "/mutate":
            self.reply_json(405, {"error": "admission reviews are POSTed to /mutate"}, headers={"Allow": "POST"})
        else:
            self.reply_json(404, {"error": f"no such path {path}; try POST /mutate, GET /healthz /readyz /metrics"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/mutate":
            self.reply_json(404, {"error": f"no such path {path}; admission reviews go to POST /mutate"}, close=True)
            return
        length = self.body_length()
        if length is None:
            return
        chunked = length < 0
        length = self.server.settings.max_body if chunked else length  # a chunked body may be as large as allowed
        if not self.server.bodies.take(length):
            self.server.webhook.metrics.count("ocifit_requests_shed_total", reason="body-budget")
            self.reply_json(429, {"error": "too many large request bodies in flight; retry shortly"}, close=True,
                            headers={"Retry-After": "1"})
            return
        try:  # in flight (for the drain on SIGTERM) from here, the body's upload included
            body = self.read_chunked(length) if chunked else self.rfile.read(length)
            if body is None or len(body) < length and not chunked:
                self.close_connection = True
                return
            if self.tracked is not None:  # the request is in; deciding is bounded by the fetch budget
                REAPER.forget(self.tracked)
            status, reply = self.server.webhook.handle(body)
            del body
            if status != 200:
                log.warning("rejected a request body from %s: %s", self.client_address[0],
                            load_json(reply).get("error"))
            self.reply(status, reply)
        finally:
            self.server.bodies.give_back(length)

    def body_length(self) -> Optional[int]:
        """The request's Content-Length (-1: chunked), or None after answering 400, 501 or 415 for a request ocifit
        won't read: no length, two lengths, a length that is not plain digits, a length and a Transfer-Encoding
        (a smuggling door), a coding other than chunked alone, too long, or of a type other than JSON."""
        lengths = self.headers.get_all("Content-Length") or []
        codings = [c.strip().lower() for h in self.headers.get_all("Transfer-Encoding") or [] for c in h.split(",")]
        error = ""
        if codings and lengths:
            error = "Transfer-Encoding and Content-Length together are refused (RFC 9112 6.1); send one"
        elif codings and codings != ["chunked"]:
            self.reply_json(501, {"error": f"Transfer-Encoding {', '.join(codings)} is not supported: only chunked"},
                            close=True)
            return None
        elif codings:
            lengths = ["-1"]
        elif len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit() and len(lengths[0]) < 20):
            error = "request needs exactly one Content-Length header of plain digits"
        elif int(lengths[0]) > self.server.settings.max_body:
            error = (f"request body of {int(lengths[0])} bytes exceeds the limit of {self.server.settings.max_body} "
                     "bytes")
        if error:
            self.reply_json(400, {"error": error}, close=True)
            return None
        media_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media_type not in ("application/json", ""):  # none, as `kubectl create --raw` sends: read as JSON
            self.reply_json(415, {"error": f"Content-Type {media_type} is not application/json"}, close=True)
            return None
        return int(lengths[0])

    def read_chunked(self, most: int) -> Optional[bytes]:
        """A chunked body (RFC 9112 7.1) of at most `most` bytes, extensions and trailers read and ignored, by
        the request's deadline (the reaper's); None after answering 400 for a malformed or too large one."""
        parts: List[bytes] = []
        total, error = 0, ""
        while not error:
            line = self.rfile.readline(1026)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not size_text or len(size_text) > 16 or \
                    not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                error = "malformed chunk size line"
                break
            size = int(size_text, 16)
            if size == 0:
                return self._trailers(b"".join(parts))
            if total + size > most:
                error = f"chunked request body exceeds the limit of {most} bytes"
                break
            chunk = self.rfile.read(size)
            total += len(chunk)
            parts.append(chunk)
            if len(chunk) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                error = "chunk shorter than its size, or not ended by CRLF"
        self.reply_json(400, {"error": error}, close=True)
        return None

    def _trailers(self, body: bytes) -> Optional[bytes]:
        """Read past the trailer section (at most 32 lines) after the last chunk; the body, or None after a 400."""
        for _ in range(32):
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n"):
                return body
            if not line.endswith(b"\n"):
                break
        self.reply_json(400, {"error": "malformed or endless trailer section"}, close=True)
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        if log.isEnabledFor(logging.DEBUG):  # the access log: formatted only when someone reads it
            log.debug("%s %s", self.address_string(), format % args)


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer(http.server.ThreadingHTTPServer):
    """--metrics-bind: GET /metrics (and /healthz) over plain HTTP on a second address, so a scraper needs no
    webhook certificate. Nothing else is served there."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: str, metrics: Metrics):
        host, port = parse_bind(address, "--metrics-bind")
        self.metrics = metrics
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _MetricsHandler)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    server_version = "ocifit/" + __version__
    sys_version = ""
    timeout = 10

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        status, body, kind = 404, b"no such path; try GET /metrics\n", "text/plain; charset=utf-8"
        if path == "/metrics":
            status, body, kind = 200, self.server.metrics.render().encode(), METRICS_CONTENT_TYPE
        elif path == "/healthz":
            status, body = 200, b"ok\n"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def parse_bind(address: str, flag: str) -> Tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` as (host, port); ValueError naming the flag otherwise."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {address!r}: expected HOST:PORT or :PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{flag} {address!r}: {host!r} is not an IP address") from None
    return host, int(port)


def build_server(settings: Settings, webhook: Webhook) -> WebhookServer:
    """A bound server for these settings; raises ValueError when TLS is neither set up nor waived."""
    tls = None
    if settings.cert or settings.key:
        if not (settings.cert and settings.key):
            raise ValueError("--cert and --key go together")
        tls = TLSFiles(settings.cert, settings.key, settings.cert_reload_interval)
    elif not settings.plain_http:
        raise ValueError("no certificate: pass --cert and --key (or TLS_CERT_PATH/TLS_KEY_PATH), "
                         "or --plain-http for a local trial")
    server = WebhookServer(settings, webhook, tls)
    if tls is not None:
        webhook.metrics.gauge("ocifit_certificate_expiry_timestamp_seconds", lambda: tls.expiry)
    return server


# ============================================================================================
# Command line: serve | match | review | fetch
# ============================================================================================

def build_kube_client(settings: Settings) -> KubeClient:
    if settings.kube_api:
        return KubeClient(settings.kube_api, settings.kube_token_file, settings.kube_ca)
    return KubeClient.in_cluster()


def build_node_source(settings: Settings, metrics: Optional[Metrics] = None) -> NodeSource:
    """Where nodes come from: a NodeList file, else the cluster (--kube-api, or in-cluster config)."""
    if settings.nodes:
        source: NodeSource = StaticNodes(settings.nodes, features_path=settings.node_features,
                                         nfd_namespace=settings.nfd_namespace,
                                         namespaces=settings.node_feature_namespaces)
    else:
        if settings.node_features:
            raise ValueError("--node-features goes with --nodes (in a cluster, NodeFeatures are watched)")
        source = KubeNodes(build_kube_client(settings), settings, metrics).start()
    if metrics is not None:
        metrics.gauge("ocifit_nodes", lambda: len(source.snapshot()))
        metrics.gauge("ocifit_node_label_sets", lambda: source.snapshot().label_sets())
        metrics.gauge("ocifit_node_shapes", lambda: source.snapshot().shape_count())
    return source


def build_artifacts(settings: Settings, metrics: Optional[Metrics] = None) -> LocalArtifacts:
    """Where artifacts come from: --artifact files first, then registries."""
    return LocalArtifacts(settings.artifact_files(), fallback=RegistryArtifacts(settings, metrics))


def _read_input(path: str, what: str) -> bytes:
    """The bytes of a file named on the command line ('-': stdin); ValueError naming it and why not."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    return_memory_eagerly()
    metrics = Metrics(settings.mode)
    nodes = build_node_source(settings, metrics)
    webhook = Webhook(settings, nodes, build_artifacts(settings, metrics), metrics)
    server = build_server(settings, webhook)
    metrics_server = MetricsServer(settings.metrics_bind, metrics) if settings.metrics_bind else None
    if metrics_server is not None:
        threading.Thread(target=metrics_server.serve_forever, name="metrics", daemon=True).start()
        log.info("serving GET /metrics over plain HTTP on %s:%d", *metrics_server.server_address[:2])
    stopping = threading.Event()

    drained = threading.Event()

    def drain() -> None:
        server.draining = True
        answered = metrics.total("ocifit_admissions_total")
        log.info("shutting down: not ready; serving for --drain-delay %gs while endpoints catch up, each reply "
                 "closing its connection", settings.drain_delay)
        time.sleep(settings.drain_delay)
        server.shutdown()  # accept no more, and refuse new connections from here on
        server.socket.close()
        deadline = time.monotonic() + settings.fetch_budget + 2.0
        closed = 0
        while time.monotonic() < deadline:
            closed += server.connections.close_idle(NEW_CONNECTION_GRACE)
            if not len(server.connections):
                break
            time.sleep(0.05)
        log.info("drained: answered %d admissions after SIGTERM; closed %d idle connections; %d still open",
                 metrics.total("ocifit_admissions_total") - answered, closed, len(server.connections))
        drained.set()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=drain, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    scheme = "https" if server.tls else "http"
    log.info("ocifit %s serving %s on port %d (POST /mutate, GET /healthz /readyz /metrics); nodes: %s",
             __version__, scheme, server.port, nodes.health()[1])
    if server.tls is None:
        log.warning("serving plain HTTP: fine for a local trial, but the API server only calls HTTPS webhooks")
    try:
        server.serve_forever(poll_interval=0.2)
        drained.wait()
    finally:
        server.server_close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        nodes.stop()
    log.info("stopped")
    return 0


def return_memory_eagerly() -> None:
    """Have glibc hand large freed buffers back to the system. By default it serves them from per-thread arenas
    and raises its mmap threshold after each large free, so RSS would stay at its peak after a burst of large
    reviews. A fixed threshold keeps buffers over 128 KiB on mmap (returned at free), and few arenas keep
    fragments few. Nothing happens where the C library is not glibc."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    for option, value in ((M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 256 * 1024), (M_ARENA_MAX, 2)):
        mallopt(option, value)


def run_match(args: argparse.Namespace, settings: Settings) -> int:
    """Print the image the spec chooses: for one label set (--labels), or for the nodes a pod with the given
    --node-selector can land on (--nodes and, for NFD's dialect, --node-features). Exit 0 chosen (nothing printed
    for a chosen compatibility without a tag), 1 none or the nodes disagree, 2 a malformed spec or input."""
    try:
        spec = parse_spec(_read_input(args.spec, "--spec"))
    except SpecError as exc:
        print(f"ocifit: invalid spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    if args.labels:
        if spec.nfd:
            raise ValueError(f"--spec {args.spec} is in NFD's dialect: it matches node features, so give "
                             "--node-features (with --nodes, or alone)")
        try:
            labels = load_json(_read_input(args.labels, "--labels"))
        except UnicodeDecodeError:
            labels = None
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError(f"--labels {args.labels}: expected a JSON object of label name to string value")
        selection = spec.select(labels)
        if args.output == "json":
            print(json.dumps({"chosen": selection.chosen.tag if selection.chosen else None,
                              "compatibilities": [c.report(labels) for c in spec.compatibilities]}, indent=2))
        elif args.explain:
            print(selection.explain(), file=sys.stderr)
        _explain_mode(args, selection.chosen.tag if selection.chosen else None, "no compatibility matches")
        if selection.chosen is None:
            print(f"ocifit: no compatibility matches: {selection.why_none()}", file=sys.stderr)
            return 1
        if args.output != "json":
            print(selection.chosen.tag)
        return 0
    if not (args.nodes or args.node_features):
        raise ValueError("give --labels, --nodes or --node-features: what to match the spec against")
    snapshot = _match_snapshot(args, settings, spec)
    selector = []
    for item in args.node_selector or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--node-selector wants KEY=VALUE, got {item!r}")
        selector.append((key, value))
    placement = Placement(node_selector=tuple(sorted(selector)))
    groups = candidate_groups(snapshot, placement, spec)
    report = [{"nodes": sorted(names), "compatibilities": [c.report(facts) for c in spec.compatibilities]}
              for facts, names in groups] if args.output == "json" else []
    if args.explain and args.output != "json":
        for facts, names in groups:
            print(f"# nodes {_names(sorted(names))}:\n{spec.select(facts).explain(facts)}", file=sys.stderr)
    try:
        choice = choose(spec, groups, placement)
    except Denial as exc:
        if isinstance(exc, Disagreement) and args.explain and args.output != "json":
            try:
                pinned = choose(spec, groups, placement, pin=True)
                assert pinned.pin is not None
                print(f"# on-disagreement pin would choose {pinned.compatibility.tag or pinned.compatibility.name}, "
                      f"keeping the pod on {pinned.pin.describe()}; required node affinity: "
                      f"{{\"nodeSelectorTerms\": [{', '.join(pinned.pin.terms)}]}}", file=sys.stderr)
            except Denial as why:
                print(f"# on-disagreement pin would deny too: {why}", file=sys.stderr)
        _explain_mode(args, None, exc.reason)
        if args.output == "json":
            print(json.dumps({"chosen": None, "reason": str(exc), "groups": report}, indent=2))
        print(f"ocifit: {exc}", file=sys.stderr)
        return 1
    _explain_mode(args, choice.compatibility.tag or choice.compatibility.name, "")
    if args.output == "json":
        print(json.dumps({"chosen": choice.compatibility.tag or None, "compatibility": choice.compatibility.index,
                          "groups": report}, indent=2))
    elif choice.compatibility.tag:
        print(choice.compatibility.tag)
    return 0


def _explain_mode(args: argparse.Namespace, chosen: Optional[str], why: str) -> None:
    """With --explain and --mode warn or audit, what that mode would answer a pod here (chosen: None, denied)."""
    if not args.explain or args.output == "json" or args.mode == "enforce":
        return
    if chosen is not None and args.mode == "warn":
        print(f"# warn mode: the pod gets {chosen}, as in enforce", file=sys.stderr)
        return
    would = f"set the image to {chosen}" if chosen is not None else f"deny the pod ({why})"
    print(f"# {args.mode} mode: the pod is allowed unchanged, warned that enforce would {would}", file=sys.stderr)


def _match_snapshot(args: argparse.Namespace, settings: Settings, spec: Spec) -> NodeSnapshot:
    """The nodes `match` weighs: --nodes, their features from --node-features; or, with --node-features alone,
    a label-less worker for each node it describes (the bare feature object describes one, named `node`)."""
    if spec.nfd and not args.node_features:
        raise ValueError(f"--spec {args.spec} is in NFD's dialect: it matches node features, so give "
                         "--node-features (with --nodes, or alone)")
    if args.nodes:
        return StaticNodes(args.nodes, features_path=args.node_features or "", nfd_namespace=settings.nfd_namespace,
                           namespaces=settings.node_feature_namespaces).snapshot()
    if not spec.nfd:
        raise ValueError(f"--spec {args.spec} is in ocifit's dialect: it matches node labels, so give --labels or "
                         "--nodes")
    try:
        by_node = features_from_document(load_json(_read_input(args.node_features, "--node-features")),
                                         settings.nfd_namespace, settings.node_feature_namespaces)
    except ValueError as exc:
        raise ValueError(f"--node-features {args.node_features}: {exc}") from None
    return NodeSnapshot(Node(name or "node", {}, features=features) for name, features in by_node.items())


def run_review(args: argparse.Namespace, settings: Settings) -> int:
    """Answer one AdmissionReview as `serve` would. Allowed: exit 0 with the review (or, with --patch, the
    decoded patch: `[]` when nothing changes). Denied: the reason once on stderr, nothing on stdout with
    --patch, exit 1. Bad input: exit 2."""
    body = _read_input(args.file, "review")
    nodes = build_node_source(settings)
    try:
        if not nodes.wait_synced(30):
            raise ValueError(f"could not list nodes: {nodes.health()[1]}")
        status, reply = Webhook(settings, nodes, build_artifacts(settings),
                                log_admissions=settings.log_level == "debug").handle(body)
    finally:
        nodes.stop()
    payload = load_json(reply)
    if status != 200:
        print(f"ocifit: {args.file}: {payload['error']}", file=sys.stderr)
        return 2
    response = payload["response"]
    for warning in response.get("warnings", ()):
        print(f"ocifit: warning: {warning}", file=sys.stderr)
    if not response["allowed"]:
        if not args.patch:
            print(json.dumps(payload, indent=2))
        print(f"ocifit: denied: {response['status']['message']}", file=sys.stderr)
        return 1
    if args.patch:
        print(json.dumps(load_json(base64.b64decode(response["patch"])) if "patch" in response else [], indent=2))
    else:
        print(json.dumps(payload, indent=2))
    return 0


def run_fetch(args: argparse.Namespace, settings: Settings) -> int:
    """Print the spec of a compatibility artifact, or of the one attached to an image, as JSON."""
    client = RegistryClient(settings)
    attached: Optional[Attached] = None
    try:
        ref = parse_reference(args.ref)
        check_allowed(ref, [p for p in settings.allowed_registries if p.strip()])
        try:
            pulled = client.pull(ref, time.monotonic() + settings.fetch_budget)
            spec_bytes = pulled.spec_bytes or b""
        except NotAnArtifact:
            attached = client.attached(ref, time.monotonic() + settings.fetch_budget)
            if attached.artifact_digest is None or attached.spec_bytes is None:
                print(f"ocifit: image {ref} ({attached.image_digest}) has no compatibility artifact attached "
                      f"(looked up through {attached.found_by})", file=sys.stderr)
                return 1
            spec_bytes = attached.spec_bytes
        parse_spec(spec_bytes)
    except ArtifactError as exc:
        print(f"ocifit: {exc}", file=sys.stderr)
        return 1
    except SpecError as exc:
        artifact = args.ref if attached is None else (
            f"{ref.registry}/{ref.repository}@{attached.artifact_digest} (attached to {args.ref})")
        print(f"ocifit: artifact {artifact} is not a valid compatibility spec: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(load_document(spec_bytes, "spec"), indent=2))
    if args.verbose and attached is not None:
        print(f"{ref} resolved to {attached.image_digest}; its compatibility artifact is "
              f"{ref.registry}/{ref.repository}@{attached.artifact_digest}, the newest of {attached.referrers} "
              f"found through {attached.found_by} via {client.base_url(client.host_for(ref))} "
              f"({attached.requests} requests, {attached.seconds * 1000:.0f} ms)", file=sys.stderr)
    elif args.verbose:
        print(f"{ref} resolved to {pulled.digest} via {client.base_url(client.host_for(ref))} "
              f"({pulled.requests} requests, {pulled.seconds * 1000:.0f} ms)", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line that names it (and where to look), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ocifit.py", description="Pick a pod's container image from an OCI compatibility artifact: "
        "a Kubernetes mutating admission webhook.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every setting (the flags in each subcommand's option groups) has an environment twin, named in its "
        "help. See `ocifit.py SUBCOMMAND --help`.")
    parser.add_argument("--version", action="version", version=f"ocifit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    serve = commands.add_parser("serve", help="run the admission webhook",
                                description="Serve POST /mutate (AdmissionReview v1) and GET /healthz /readyz "
                                "/metrics over HTTPS. Nodes come from --nodes FILE or the cluster.")
    add_options(serve, "server", "nodes", "admission", "artifacts", "logging")
    serve.set_defaults(run=run_serve)

    match = commands.add_parser("match", help="evaluate a spec against node labels or NFD node features",
                                description="Print the image a spec chooses (exit 0), or why none (exit 1 with the "
                                "reason on stderr). A malformed spec exits 2.")
    match.add_argument("--spec", required=True, metavar="FILE",
                       help="compatibility spec, JSON or YAML, in ocifit's dialect or NFD's ('-' for stdin)")
    source = match.add_mutually_exclusive_group()
    source.add_argument("--labels", metavar="FILE", help="JSON object of label name to value")
    source.add_argument("--nodes", metavar="FILE", help="NodeList (kubectl get nodes -o json): candidates as for "
                        "a pod with the given --node-selector, or every schedulable worker")
    match.add_argument("--node-features", metavar="FILE", help="NFD's NodeFeatures (kubectl get nodefeatures -A -o "
                       "json, one NodeFeature, or a bare {flags, attributes, instances} object) for a spec in NFD's "
                       "dialect: with --nodes, the features of those nodes; alone, the nodes it describes")
    match.add_argument("--node-selector", action="append", metavar="KEY=VALUE", help="with --nodes: the pod's "
                       "nodeSelector (repeatable)")
    match.add_argument("--explain", action="store_true", help="say on stderr why each compatibility matched or not "
                       "(for NFD's dialect: each rule and expression, with its feature set, element and result)")
    match.add_argument("--output", choices=("text", "json"), default="text",
                       help="json: the choice and the whole explanation as one JSON object on stdout")
    match.add_argument("--mode", choices=MODES, default="enforce",
                       help="with --explain: also say what serve's --mode would answer a pod here")
    add_options(match, "logging")
    match.set_defaults(run=run_match)

    review = commands.add_parser("review", help="answer one AdmissionReview from a file (a dry run)",
                                 description="Read an AdmissionReview request and print the response review "
                                 "exactly as `serve` would answer it. Exit 0 allowed, 1 denied, 2 bad input.")
    review.add_argument("file", help="AdmissionReview JSON ('-' for stdin)")
    review.add_argument("--patch", action="store_true", help="print only the decoded JSONPatch")
    add_options(review, "nodes", "admission", "artifacts", "logging")
    review.set_defaults(run=run_review)

    fetch = commands.add_parser("fetch", help="print the spec of a compatibility artifact, or of one an image has",
                                description="Fetch REF from its registry (with --registry-config credentials, "
                                "mirrors and allow-list as `serve` uses them) and print the spec as JSON. When REF "
                                "is an image, not a compatibility artifact, print the spec attached to it (OCI "
                                "referrers of artifact type " + NFD_ARTIFACT_TYPE + "; the newest wins). Exit 1 on "
                                "registry errors, with the registry's own error code, or when nothing is attached; "
                                "2 on an invalid spec.")
    fetch.add_argument("ref", help="artifact or image reference, e.g. "
                       "ghcr.io/compspec/ocifit-k8s-compatibility:kind-example")
    fetch.add_argument("-v", "--verbose", action="store_true",
                       help="print the resolved digest, the referrer chosen and how, and timings on stderr")
    add_options(fetch, "artifacts", "logging")
    fetch.set_defaults(run=run_fetch)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    settings = Settings.from_namespace(args)
    setup_logging(settings.log_level, settings.log_format)
    try:
        return args.run(args, settings)
    except (ValueError, OSError, ArtifactError) as exc:  # configuration and input errors: say, don't trace
        flush_logging()
        print(f"ocifit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line that says so, the traceback only at debug level
        log.debug("internal error", exc_info=True)
        flush_logging()
        print(f"ocifit: internal error: {exc!r} (please report it; --log-level debug shows where)", file=sys.stderr)
        return 70
    finally:
        flush_logging()


if __name__ == "__main__":
    sys.exit(main())
