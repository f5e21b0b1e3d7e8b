#!/usr/bin/env python3
"""Seeded generator of the inputs of testdata/nfd-oracle.json, the differential oracle against NFD's own evaluator.

Standard library only. Each case is an image-compatibility spec as an author writes it (YAML text, sometimes JSON
text) and the node's features as NFD's `Features` object ({flags, attributes, instances}). The cases cover every
class of issue 19 and the operator x value x placement matrix; `class` names the class a case was made for.

    python3 testdata/nfd_oracle_cases.py [--seed N] > inputs.jsonl
        one JSON object a line: {"id", "class", "spec", "features"}: what NFD's evaluator was given.
    python3 testdata/nfd_oracle_cases.py [--seed N] --merge VERDICTS.jsonl --about ABOUT.json > testdata/nfd-oracle.json
        the same cases joined by id with the verdicts NFD produced for them (one JSON object a line), and the
        header (ABOUT.json: NFD commit, Go version, how the verdicts were produced).

The verdicts are not computed here: they come from NFD's code. This file only makes the inputs and lays out the
result.
"""

import argparse
import json
import random
import re
import sys
from typing import Any, Dict, List, Optional

SEED = 19


# ---- a tiny YAML writer: scalars are double-quoted JSON strings unless wrapped in Raw (written verbatim) ----


class Raw(str):
    """A scalar written as is: `yes`, `5.0`, `1e2`, `~`, `'5'`."""


PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def scalar(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def key(k: Any) -> str:
    if isinstance(k, Raw):
        return str(k)
    if isinstance(k, str) and PLAIN_KEY.match(k) and k.lower() not in YAML11_WORDS:
        return k
    return json.dumps(k)


def flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{key(k)}: {flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(flow(x) for x in v) + "]"
    return scalar(v)


def block(v: Any, indent: int = 0) -> List[str]:
    pad = " " * indent
    out: List[str] = []
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, (dict, list)) and x and not is_leaf(x):
                out.append(f"{pad}{key(k)}:")
                out.extend(block(x, indent + 2))
            else:
                out.append(f"{pad}{key(k)}: {flow(x)}")
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, dict) and x:
                inner = block(x, indent + 2)
                out.append(pad + "- " + inner[0][indent + 2 :])
                out.extend(inner[1:])
            else:
                out.append(f"{pad}- {flow(x)}")
    return out


def is_leaf(v: Any) -> bool:
    """Written in flow style: an expression ({op, value, type}) or a list of scalars."""
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) for x in v)
    return (
        isinstance(v, dict)
        and all(not isinstance(x, (dict, list)) or is_leaf(x) and isinstance(x, list) for x in v.values())
        and any(str(k).lower() in ("op", "value", "type") for k in v)
    )


def yaml_text(doc: Any) -> str:
    return "\n".join(block(doc)) + "\n"


def has_raw(v: Any) -> bool:
    if isinstance(v, Raw):
        return True
    if isinstance(v, dict):
        return any(isinstance(k, Raw) or has_raw(x) for k, x in v.items())
    if isinstance(v, list):
        return any(has_raw(x) for x in v)
    return False


# ---- spec builders ----


def ex(op: Any = None, value: Any = "<none>", type_: Any = None) -> Dict[str, Any]:
    e: Dict[str, Any] = {}
    if op is not None:
        e["op"] = op
    if value != "<none>":
        e["value"] = value
    if type_ is not None:
        e["type"] = type_
    return e


def term(feature: Any, exprs: Any = None, name: Any = None) -> Dict[str, Any]:
    t: Dict[str, Any] = {"feature": feature}
    if exprs is not None:
        t["matchExpressions"] = exprs
    if name is not None:
        t["matchName"] = name
    return t


def rule(
    terms: Optional[List[Any]] = None,
    name: str = "r",
    any_: Optional[List[Any]] = None,
    vars_: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    r: Dict[str, Any] = {"name": name}
    if vars_ is not None:
        r["vars"] = vars_
    if terms is not None:
        r["matchFeatures"] = terms
    if any_ is not None:
        r["matchAny"] = [{"matchFeatures": a} for a in any_]
    return r


def compat(rules: Any, tag: Any = "ok", weight: Any = None, description: Any = None) -> Dict[str, Any]:
    c: Dict[str, Any] = {}
    if tag is not None:
        c["tag"] = tag
    if weight is not None:
        c["weight"] = weight
    if description is not None:
        c["description"] = description
    if rules is not None:
        c["rules"] = rules
    return c


def spec(*compats: Any) -> Dict[str, Any]:
    return {"version": "v1alpha1", "compatibilities": list(compats)}


def one(feature: str, element: Any, expression: Any) -> Dict[str, Any]:
    return spec(compat([rule([term(feature, {element: expression})])]))


def attrs(name: str, elements: Any) -> Dict[str, Any]:
    return {"attributes": {name: {"elements": elements}}}


def flags(name: str, elements: List[str]) -> Dict[str, Any]:
    return {"flags": {name: {"elements": {e: {} for e in elements}}}}


def insts(name: str, elements: List[Dict[str, str]]) -> Dict[str, Any]:
    return {"instances": {name: {"elements": [{"attributes": a} for a in elements]}}}


def merge(*fs: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for f in fs:
        for kind, sets in f.items():
            out.setdefault(kind, {}).update(sets)
    return out


class Cases:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.items: List[Dict[str, Any]] = []
        self.counts: Dict[str, int] = {}

    def add(
        self,
        cls: str,
        doc: Any,
        features: Dict[str, Any],
        note: str = "",
        text: Optional[str] = None,
        as_json: Optional[bool] = None,
    ) -> None:
        if text is None:
            if as_json is None:
                as_json = not has_raw(doc) and self.rng.random() < 0.15
            text = json.dumps(doc, indent=1) + "\n" if as_json else yaml_text(doc)
        self.counts[cls] = self.counts.get(cls, 0) + 1
        case = {"id": f"{cls}-{self.counts[cls]:03d}", "class": cls, "spec": text, "features": features}
        if note:
            case["note"] = note
        self.items.append(case)


# ---- the classes ----

OPS = [
    "",
    "In",
    "NotIn",
    "InRegexp",
    "Exists",
    "DoesNotExist",
    "Gt",
    "Ge",
    "Lt",
    "Le",
    "GtLt",
    "GeLe",
    "IsTrue",
    "IsFalse",
]
VALUES = {  # value lists of each kind, as the spec author writes them
    "none": "<none>",
    "empty": [],
    "null": None,
    "str1": ["a"],
    "str2": ["a", "b"],
    "int1": ["5"],
    "int2": ["2", "8"],
    "int2rev": ["8", "2"],
    "int2eq": ["5", "5"],
    "ver1": ["6.1"],
    "ver2": ["5.4", "6.8"],
    "ver2rev": ["6.8", "5.4"],
    "bool": ["true"],
    "re": ["^a", "5$"],
    "neg": ["-3"],
    "badint": ["5.0"],
}
NODE_VALUES = ["a", "5", "-3", "", "6.8.0-45-generic", "true", "false", "007", "+5", "5.0", "6.1", "x y"]


def operators(c: Cases) -> None:
    """Every operator x value kind x type, on an element that is present (attribute / flag), missing, or a missing
    feature set; node values of every kind."""
    for op in OPS:
        for vk, value in VALUES.items():
            for type_ in (None, "version"):
                if type_ and vk not in ("int1", "int2", "ver1", "ver2", "ver2rev", "str1", "none", "int2rev"):
                    continue
                node = c.rng.choice(NODE_VALUES)
                e = ex(op, value, type_)
                c.add("operators", one("t.set", "e", e), attrs("t.set", {"e": node}), f"attribute e={node!r}")
                if c.rng.random() < 0.35:
                    c.add("operators", one("t.set", "e", e), attrs("t.set", {"other": node}), "element missing")
                if c.rng.random() < 0.3:
                    c.add("operators", one("t.set", "e", e), flags("t.set", ["e"]), "present as a flag")
                if c.rng.random() < 0.15:
                    c.add("operators", one("t.set", "e", e), attrs("t.other", {"e": node}), "feature set missing")
    for op in ("Gtee", "in", "Gte", "Lte", "EXISTS", "Equals"):
        for feats in (attrs("t.set", {"e": "5"}), flags("t.set", ["e"]), attrs("t.set", {}), attrs("t.x", {"e": "5"})):
            c.add("operators", one("t.set", "e", ex(op, ["5"])), feats, f"unknown op {op}")
    # no op at all, only value / type
    for value in ("<none>", ["a"]):
        c.add("operators", one("t.set", "e", ex(None, value)), attrs("t.set", {"e": "a"}), "no op key")
    # integer parsing (strconv.Atoi) on node values and bounds
    for n in [
        "5",
        "+5",
        "-0",
        "05",
        " 5",
        "5 ",
        "5_0",
        "0x10",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "1e3",
        "\u0665",
        "",
        "5.5",
    ]:
        c.add("operators", one("t.set", "e", ex("Gt", ["4"])), attrs("t.set", {"e": n}), f"node int {n!r}")
        c.add("operators", one("t.set", "e", ex("Lt", [n])), attrs("t.set", {"e": "4"}), f"bound int {n!r}")
    for lo, hi, node in [
        ("1", "9", "5"),
        ("1", "9", "1"),
        ("1", "9", "9"),
        ("-5", "-1", "-3"),
        ("0", "0", "0"),
        ("3", "2", "2"),
    ]:
        for op in ("GtLt", "GeLe"):
            c.add("operators", one("t.set", "e", ex(op, [lo, hi])), attrs("t.set", {"e": node}))
    for node in ["true", "True", "TRUE", "1", "yes", "false", "False", "0", "", "no"]:
        for op in ("IsTrue", "IsFalse"):
            c.add("operators", one("t.set", "e", ex(op)), attrs("t.set", {"e": node}), f"node {node!r}")
    # instances: zero, one, many, with In / NotIn / Exists / DoesNotExist
    inst_sets = {
        "zero": [],
        "one": [{"v": "a"}],
        "one-other": [{"w": "a"}],
        "many": [{"v": "b"}, {"v": "a"}],
        "many-none": [{"v": "b"}, {"v": "c"}],
        "one-empty": [{}],
    }
    for label, elems in inst_sets.items():
        for e in (ex("In", ["a"]), ex("NotIn", ["a"]), ex("Exists"), ex("DoesNotExist"), ex("InRegexp", ["^[ab]$"])):
            c.add("operators", one("t.dev", "v", e), insts("t.dev", elems), f"instances {label}")
    # two expressions that must hold on the same instance
    for elems in ([{"v": "a", "w": "1"}], [{"v": "a"}, {"w": "1"}], [{"v": "a", "w": "2"}, {"v": "b", "w": "1"}]):
        doc = spec(compat([rule([term("t.dev", {"v": ex("In", ["a"]), "w": ex("In", ["1"])})])]))
        c.add("operators", doc, insts("t.dev", elems), "one instance must satisfy both")


SEMVERS = [
    "1.2.3",
    "v1.2.3",
    "V1.2.3",
    "1",
    "1.2",
    "v1",
    "01.2.3",
    "1.02.3",
    "1.2.03",
    "1.2.3-rc1",
    "1.2.3-rc.1",
    "1.2.3-01",
    "1.2.3-a..b",
    "1.2.3+build",
    "1.2.3+",
    "1.2.3-",
    "1.2.3.4",
    "1.2.3-rc1+b.5",
    "18446744073709551615",
    "18446744073709551616",
    "18446744073709551615.0.0",
    "6.8.0-45-generic",
    "5.15.0-1034-azure",
    "4.18.0-477.10.1.el8_8.x86_64",
    "6.1.0-rc7",
    " 1.2.3",
    "1.2.3 ",
    "",
    "v",
    "1..2",
    "1.2.x",
    "1.2.*",
    "1.2.3-rc_1",
    "6.10",
    "6.9",
    "2.0.0-alpha",
    "0.0.0",
    "1.2.3-0",
    "1.2.3-rc.01",
]


def semver_class(c: Cases) -> None:
    bounds = [
        "1.2.3",
        "1.2",
        "6.9",
        "6.10",
        "v1",
        "01.2.3",
        "1.2.3+",
        "1.2.3-",
        "18446744073709551615",
        "18446744073709551616",
        "1.2.3-rc1",
        "2.0.0",
        "6.8.0",
    ]
    for node in SEMVERS:
        for op in ("Ge", "Lt"):
            b = c.rng.choice(bounds)
            c.add(
                "semver",
                one("kernel.version", "full", ex(op, [b], "version")),
                attrs("kernel.version", {"full": node}),
                f"node {node!r} {op} {b!r}",
            )
    for b in bounds + ["1.2.3.4", "", " 1.2.3", "1.2.x", "x"]:
        for node in ("1.2.3", "6.8.0-45-generic"):
            c.add(
                "semver",
                one("kernel.version", "full", ex("Gt", [b], "version")),
                attrs("kernel.version", {"full": node}),
                f"bound {b!r}",
            )
    # ordering: pre-release stripped, equality, ranges, reversed and equal bounds
    for node, lo, hi in [
        ("1.2.3-rc1", "1.2.3", "1.2.4"),
        ("1.2.3", "1.2.3-rc1", "1.2.4"),
        ("6.10", "6.9", "6.11"),
        ("6.9", "6.10", "6.11"),
        ("1.2.3", "1.2.4", "1.2.3"),
        ("1.2.3", "1.2.3", "1.2.3"),
        ("1.2.3+b", "1.2.3", "1.2.3"),
        ("18446744073709551615", "1", "18446744073709551615"),
        ("2", "v1", "v3"),
        ("6.8.0-45-generic", "6.8", "6.8.0"),
    ]:
        for op in ("GtLt", "GeLe"):
            c.add(
                "semver",
                one("kernel.version", "full", ex(op, [lo, hi], "version")),
                attrs("kernel.version", {"full": node}),
                f"{node!r} {op} [{lo!r}, {hi!r}]",
            )
    for node, b in [("1.2.3-rc1", "1.2.3"), ("1.2.3", "1.2.3-rc1"), ("1.2.3-alpha", "1.2.3-beta")]:
        for op in ("Le", "Ge", "Lt", "Gt"):
            c.add(
                "semver",
                one("kernel.version", "full", ex(op, [b], "version")),
                attrs("kernel.version", {"full": node}),
                "pre-release stripped",
            )
    # a version bound on a missing element: no error in NFD
    for b in ("1.2.3+", "x"):
        c.add(
            "semver",
            one("kernel.version", "full", ex("Ge", [b], "version")),
            attrs("kernel.version", {"major": "6"}),
            "bad bound, element missing",
        )


REGEXPS = [
    ("(?U)a+", ["aaa", "b"]),
    (r"\pL", ["é", "1"]),
    (r"\p{Greek}", ["α", "a"]),
    ("(?<n>a)", ["a", "b"]),
    ("(?P<n>a)", ["a"]),
    ("[[:alpha:]]", ["x", "1"]),
    (r"\Z", ["a"]),
    ("a++", ["a"]),
    ("a{1001}", ["a"]),
    ("a{1000}", ["a"]),
    (r"\z", ["a"]),
    (r"\Aa", ["a"]),
    ("(?=a)", ["a"]),
    (r"(a)\1", ["aa"]),
    (r"^\d$", ["5", "\u0665"]),
    (r"^\w+$", ["abc", "é"]),
    (r"^\s$", ["\x0b", " ", "\u00a0"]),
    ("^a$", ["a", "a\n"]),
    ("(?m)^a$", ["a\nb"]),
    ("(?s)a.b", ["a\nb"]),
    ("a.b", ["a\nb"]),
    (r"\Qa.b\E", ["a.b", "axb"]),
    (r"\x{41}", ["A"]),
    ("(?i)avx", ["AVX512F"]),
    ("[a-", ["a"]),
    ("(", ["a"]),
    ("*", ["a"]),
    ("a**", ["a"]),
    ("[[:word:]]+", ["ab_1"]),
    ("(?i:A)b", ["ab"]),
    (r"\C", ["a"]),
    ("x*", [""]),
    ("", ["anything"]),
    (r"[\d-z]", ["-"]),
    ("a{,3}", ["a{,3}", "aa"]),
    ("(?#c)a", ["a"]),
    (r"\N{LATIN SMALL LETTER A}", ["a"]),
    ("[^\\x00-\\x7F]", ["é", "e"]),
    ("a|", ["b"]),
    ("^AVX", ["AVX2"]),
]


def regexp_class(c: Cases) -> None:
    for pattern, inputs in REGEXPS:
        for node in inputs:
            c.add(
                "regexp",
                one("cpu.model", "name", ex("InRegexp", [pattern])),
                attrs("cpu.model", {"name": node}),
                f"{pattern!r} on {node!r}",
            )
        c.add(
            "regexp",
            spec(compat([rule([term("cpu.cpuid", name=ex("InRegexp", [pattern]))])])),
            flags("cpu.cpuid", inputs),
            f"matchName {pattern!r}",
        )
        c.add(
            "regexp",
            one("cpu.model", "name", ex("InRegexp", [pattern])),
            attrs("cpu.model", {"other": "a"}),
            "element missing: the pattern is never compiled",
        )


def zero_instances(c: Cases) -> None:
    for elems in ([], None):
        for exprs in ({}, {"v": ex("DoesNotExist")}, {"v": ex("NotIn", ["a"])}, {"v": ex("Exists")}):
            feats = (
                {"instances": {"pci.device": {"elements": elems}}}
                if elems is not None
                else {"instances": {"pci.device": {}}}
            )
            c.add(
                "zero-instances",
                spec(compat([rule([term("pci.device", exprs)])])),
                feats,
                f"elements {elems!r}, matchExpressions {exprs}",
            )
        for name in (ex("Exists"), ex("In", ["v"])):
            feats = (
                {"instances": {"pci.device": {"elements": elems}}}
                if elems is not None
                else {"instances": {"pci.device": {}}}
            )
            c.add("zero-instances", spec(compat([rule([term("pci.device", name=name)])])), feats, "matchName")
    for elems in ([{"v": "a"}], [{}], [{"v": "a"}, {"v": "b"}]):
        c.add(
            "zero-instances",
            spec(compat([rule([term("pci.device", {})])])),
            insts("pci.device", elems),
            "one or more instances, empty expressions",
        )
    c.add(
        "zero-instances",
        spec(compat([rule([term("pci.device", {})])])),
        {"instances": {"pci.device": {"elements": [{}]}}},
        "an instance without attributes",
    )
    c.add(
        "zero-instances",
        spec(compat([rule([term("pci.device", {"v": ex("DoesNotExist")})])])),
        {"instances": {"pci.device": {"elements": [{"attributes": None}]}}},
        "attributes: null",
    )
    c.add(
        "zero-instances",
        spec(compat([rule([term("pci.device", {"v": ex("In", [])})])])),
        insts("pci.device", []),
        "malformed expression never evaluated on zero instances",
    )


def nil_vs_empty(c: Cases) -> None:
    shapes = {
        "flags-no-elements": {"flags": {"m.x": {}}},
        "flags-elements-null": {"flags": {"m.x": {"elements": None}}},
        "flags-elements-empty": {"flags": {"m.x": {"elements": {}}}},
        "attrs-no-elements": {"attributes": {"m.x": {}}},
        "attrs-elements-empty": {"attributes": {"m.x": {"elements": {}}}},
        "inst-no-elements": {"instances": {"m.x": {}}},
        "inst-elements-empty": {"instances": {"m.x": {"elements": []}}},
        "flags-nil-attrs-empty": {"flags": {"m.x": {}}, "attributes": {"m.x": {"elements": {}}}},
    }
    terms = {
        "expr-empty": term("m.x", {}),
        "doesnotexist": term("m.x", {"e": ex("DoesNotExist")}),
        "notin": term("m.x", {"e": ex("NotIn", ["a"])}),
        "matchname-dne": term("m.x", name=ex("DoesNotExist")),
        "matchname-exists": term("m.x", name=ex("Exists")),
        "feature-only": term("m.x"),
        "expr-null": {"feature": "m.x", "matchExpressions": None},
    }
    for sn, feats in shapes.items():
        for tn, t in terms.items():
            c.add("nil-vs-empty", spec(compat([rule([t])])), feats, f"{tn} on {sn}")


def feature_case(c: Cases) -> None:
    for spec_name, node_name in [
        ("m.x", "M.x"),
        ("M.X", "m.x"),
        ("M.x", "M.x"),
        ("m.X", "m.x"),
        ("CPU.CPUID", "cpu.cpuid"),
        ("cpu.cpuid", "CPU.cpuid"),
        ("m.x", "m.x"),
    ]:
        for kind in ("flags", "attributes", "instances"):
            if kind == "flags":
                feats = flags(node_name, ["e"])
            elif kind == "attributes":
                feats = attrs(node_name, {"e": "1"})
            else:
                feats = insts(node_name, [{"e": "1"}])
            c.add("feature-case", one(spec_name, "e", ex("Exists")), feats, f"spec {spec_name} node {node_name}")
    # element names are never folded
    c.add("feature-case", one("m.x", "E", ex("Exists")), attrs("m.x", {"e": "1"}), "element case")
    c.add(
        "feature-case", spec(compat([rule([term("m.x", name=ex("In", ["E"]))])])), flags("m.x", ["e"]), "matchName case"
    )
    # no dot in the feature name
    c.add("feature-case", one("nodot", "e", ex("Exists")), attrs("nodot", {"e": "1"}), "no domain")
    c.add("feature-case", one("NoDot", "e", ex("Exists")), attrs("nodot", {"e": "1"}), "no domain, case")


def vars_class(c: Cases) -> None:
    present = attrs("m.x", {"e": "1"})
    hit, miss = term("m.x", {"e": ex("In", ["1"])}), term("m.x", {"e": ex("In", ["2"])})
    back = lambda k, v: term("rule.matched", {k: ex("In", [v])})  # noqa: E731
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"k": "v"}), rule([back("k", "v")], "b")])),
        present,
        "same compatibility",
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"k": "v"})], "one"), compat([rule([back("k", "v")], "b")], "two")),
        present,
        "later compatibility sees it",
    )
    c.add(
        "vars",
        spec(compat([rule([back("k", "v")], "b")], "one"), compat([rule([hit], "a", vars_={"k": "v"})], "two")),
        present,
        "earlier compatibility does not",
    )
    c.add(
        "vars",
        spec(compat([rule([miss], "a", vars_={"k": "v"}), rule([back("k", "v")], "b")])),
        present,
        "failed rule: no vars",
    )
    c.add(
        "vars",
        spec(compat([rule([miss], "a", vars_={"k": "v"}), rule([term("rule.matched", {})], "b")])),
        present,
        "failed rule still creates an empty rule.matched",
    )
    c.add("vars", spec(compat([rule([term("rule.matched", {})], "b")])), present, "no rule before: no rule.matched")
    c.add(
        "vars",
        spec(compat([rule(None, "a", any_=[[miss]], vars_={"k": "v"}), rule([back("k", "v")], "b")])),
        present,
        "matchAny-only rule fails but its vars are inserted",
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", any_=[[miss]], vars_={"k": "v"}), rule([back("k", "v")], "b")])),
        present,
        "matchFeatures holds, matchAny fails: vars inserted",
    )
    c.add(
        "vars",
        spec(compat([rule(None, "a", vars_={"k": "v"}), rule([back("k", "v")], "b")])),
        present,
        "rule with no matchers",
    )
    c.add(
        "vars",
        spec(
            compat([rule(None, "a", any_=[[miss]], vars_={"k": "v"})], "one"),
            compat([rule([back("k", "v")], "b")], "two"),
        ),
        present,
        "a failed matchAny-only rule's vars, seen by a later compatibility",
    )
    c.add(
        "vars",
        spec(
            compat([rule([hit], "a", any_=[[miss]], vars_={"k": "v"})], "one"),
            compat([rule([back("k", "v")], "b")], "two"),
        ),
        present,
        "matchAny failed, matchFeatures held: vars seen by a later compatibility",
    )
    c.add(
        "vars",
        spec(compat([rule([miss], "a", vars_={"k": "v"})], "one"), compat([rule([back("k", "v")], "b")], "two")),
        present,
        "a failed matchFeatures rule's vars are not inserted",
    )
    c.add(
        "vars",
        spec(
            compat(
                [rule([hit], "a", vars_={"k": "v"}), rule([hit], "a2", vars_={"k": "w"}), rule([back("k", "w")], "b")]
            )
        ),
        present,
        "later vars overwrite",
    )
    c.add(
        "vars",
        spec(
            compat(
                [
                    rule([hit], "a", vars_={"k": Raw("5"), "y": Raw("yes"), "f": Raw("1.10")}),
                    rule(
                        [term("rule.matched", {"k": ex("In", ["5"]), "y": ex("In", ["true"]), "f": ex("In", ["1.1"])})],
                        "b",
                    ),
                ]
            )
        ),
        present,
        "numeric and boolean vars values become strings",
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"k": "v"}), rule([term("Rule.Matched", {"k": ex("Exists")})], "b")])),
        present,
        "rule.matched named in capitals",
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"k": "v"}), rule([term("rule.matched", name=ex("In", ["k"]))], "b")])),
        present,
        "matchName on rule.matched",
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"e": "9"}), rule([term("rule.matched", {"e": ex("In", ["9"])})], "b")])),
        merge(present, attrs("rule.matched", {"e": "0", "z": "1"})),
        "node already has rule.matched: merged",
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"e": "9"}), rule([back("e", "9")], "b")])),
        merge(present, {"attributes": {"rule.matched": {}}}),
        "node's rule.matched has no elements map",
    )
    c.add(
        "vars", spec(compat([rule([hit], "a", vars_={}), rule([term("rule.matched", {})], "b")])), present, "empty vars"
    )
    c.add(
        "vars",
        spec(compat([rule([hit], "a", vars_={"k": None}), rule([back("k", "")], "b")])),
        present,
        "null vars value",
    )
    for tmpl in (
        "k=v",
        "k=v\nj=w",
        "{{ range .m.x }}n={{ .Name }}\n{{ end }}",
        "novalue",
        "{{ bad",
        '{{ upper "x" }}=1',
    ):
        doc = spec(compat([dict(rule([hit], "a"), varsTemplate=tmpl), rule([term("rule.matched", {})], "b")]))
        c.add("vars", doc, present, f"varsTemplate {tmpl!r}")
    # random chains over several rules and compatibilities
    for _ in range(30):
        compats = []
        names = ["k1", "k2", "k3"]
        for ci in range(c.rng.randint(1, 3)):
            rules = []
            for ri in range(c.rng.randint(1, 3)):
                kind = c.rng.random()
                if kind < 0.4:
                    rules.append(
                        rule(
                            [c.rng.choice([hit, miss])],
                            f"r{ci}{ri}",
                            vars_={c.rng.choice(names): c.rng.choice(["v", "w"])},
                        )
                    )
                elif kind < 0.8:
                    rules.append(rule([back(c.rng.choice(names), c.rng.choice(["v", "w"]))], f"r{ci}{ri}"))
                else:
                    rules.append(
                        rule(
                            [term("rule.matched", {c.rng.choice(names): ex(c.rng.choice(["Exists", "DoesNotExist"]))})],
                            f"r{ci}{ri}",
                        )
                    )
            compats.append(compat(rules, f"t{ci}"))
        c.add("vars", spec(*compats), present, "random chain")


SCALAR_VALUES = [
    ("4", "4"),
    ("010", "8"),
    ("0x1F", "31"),
    ("1.10", "1.1"),
    ("6.10", "6.1"),
    ("1e2", "100"),
    ("3.14159265358979", "3.14159"),
    ("y", "y"),
    ("n", "n"),
    ("yes", "yes"),
    ("no", "no"),
    ("on", "on"),
    ("off", "off"),
    ("Yes", "Yes"),
    ("TRUE", "TRUE"),
    ("true", "true"),
    ("~", ""),
    ("null", ""),
    (".inf", "+Inf"),
    ("-5", "-5"),
    ("+5", "5"),
    ("0o17", "0o17"),
    ("1_000", "1000"),
    ("'5'", "5"),
    ("2001-01-01", "2001-01-01"),
    ("12:30", "750"),
    ("0b101", "5"),
]


def scalars(c: Cases) -> None:
    for raw, plausible in SCALAR_VALUES:
        for node in sorted({plausible, raw, "true", "false"}):
            c.add(
                "scalars",
                one("kernel.config", "X", ex("In", [Raw(raw)])),
                attrs("kernel.config", {"X": node}),
                f"value: [{raw}] vs node {node!r}",
            )
        c.add(
            "scalars",
            one("kernel.config", Raw(raw), ex("Exists")),
            attrs("kernel.config", {plausible: "1", raw: "1"}),
            f"element key {raw}",
        )
    for raw in ("5", "'5'", "5.0", "1e2", "5.5", "-1", "0x10", "yes", "~", "'x'", "9223372036854775808", '""', "[5]"):
        c.add(
            "scalars",
            spec(compat([rule([term("m.x", {"e": ex("Exists")})])], weight=Raw(raw))),
            attrs("m.x", {"e": "1"}),
            f"weight: {raw}",
        )
    for raw in ("5", "5.0", "yes", "~", "1e2", "'5'", "010", '""', "[a]", "{a: b}"):
        c.add(
            "scalars",
            spec(compat([rule([term("m.x", {"e": ex("Exists")})])], tag=Raw(raw))),
            attrs("m.x", {"e": "1"}),
            f"tag: {raw}",
        )
    for raw in ("5", "yes", "~"):
        c.add(
            "scalars",
            spec(compat([rule([term("m.x", {"e": ex("Exists")})])], description=Raw(raw))),
            attrs("m.x", {"e": "1"}),
            f"description: {raw}",
        )
        doc = spec(compat([rule([term("m.x", {"e": ex("Exists")})])]))
        doc["compatibilities"][0]["rules"][0]["name"] = Raw(raw)
        c.add("scalars", doc, attrs("m.x", {"e": "1"}), f"rule name: {raw}")
    # a scalar where a list is required, and other shape errors
    for raw in ("v", "5", "yes", "~", "{a: b}", "[[a]]", "[{a: b}]"):
        c.add("scalars", one("m.x", "e", {"op": "In", "value": Raw(raw)}), attrs("m.x", {"e": "v"}), f"value: {raw}")
    for raw in ("Exists", "5", "yes", "~", "[In]"):
        c.add("scalars", one("m.x", "e", {"op": Raw(raw)}), attrs("m.x", {"e": "v"}), f"op: {raw}")
    for raw in ("version", "5", "yes", "~", "Version"):
        c.add(
            "scalars",
            one("m.x", "e", {"op": "Gt", "value": ["1"], "type": Raw(raw)}),
            attrs("m.x", {"e": "2"}),
            f"type: {raw}",
        )
    for raw in ("m.x", "5", "yes", "~", "[m.x]"):
        c.add(
            "scalars",
            spec(compat([rule([{"feature": Raw(raw), "matchExpressions": {}}])])),
            merge(attrs("m.x", {"e": "1"}), attrs("5", {}), attrs("true", {})),
            f"feature: {raw}",
        )
    # YAML 1.1 booleans against kernel config (y/n/m) values
    for raw in ("y", "n", "m", "Y", "N", "yes"):
        for node in ("y", "n", "true", "false"):
            c.add(
                "scalars",
                one("kernel.config", "NO_HZ", ex("In", [Raw(raw)])),
                attrs("kernel.config", {"NO_HZ": node}),
                f"kernel config {raw} vs {node}",
            )
    # documents: JSON text, multiple documents, anchors and merge keys, duplicate keys, tabs, empty
    base = 'version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions: {e: {op: In, value: ["1"]}}\n'
    texts = {
        "two documents": base + "---\nversion: v1alpha1\ncompatibilities: []\n",
        "document marker": "---\n" + base,
        "document end": base + "...\n",
        "anchor and alias": 'version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions:\n        e: &x {op: In, value: ["1"]}\n        f: *x\n',
        "merge key": 'version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions:\n        e: {<<: {op: In}, value: ["1"]}\n',
        "duplicate key": "version: v1alpha1\ncompatibilities:\n- tag: ok\n  tag: two\n  rules: []\n",
        "duplicate element": 'version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions: {e: {op: In, value: ["2"]}, e: {op: In, value: ["1"]}}\n',
        "tab indent": "version: v1alpha1\ncompatibilities:\n-\ttag: ok\n",
        "empty document": "",
        "only a comment": "# nothing\n",
        "null document": "null\n",
        "a list": "- tag: ok\n",
        "a string": "hello\n",
        "binary tag": "version: v1alpha1\ncompatibilities:\n- tag: !!binary aGVsbG8=\n  rules: []\n",
        "str tag on int": "version: v1alpha1\ncompatibilities:\n- tag: ok\n  weight: !!str 5\n  rules: []\n",
        "int tag on str": 'version: v1alpha1\ncompatibilities:\n- tag: !!int "5"\n  rules: []\n',
        "block scalar": "version: v1alpha1\ncompatibilities:\n- tag: |\n    ok\n  rules: []\n",
        "quoted key": 'version: v1alpha1\n"compatibilities":\n- tag: ok\n  rules: []\n',
        "json with comments": '{"compatibilities": [{"tag": "ok", "rules": []}]} # c\n',
        "crlf": base.replace("\n", "\r\n"),
        "bom": "\ufeff" + base,
        "complex key": "version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions: {[a]: {op: Exists}}\n",
        "null key": "version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions: {~: {op: Exists}}\n",
        "int key": "version: v1alpha1\ncompatibilities:\n- tag: ok\n  rules:\n  - matchFeatures:\n    - feature: m.x\n      matchExpressions: {5: {op: Exists}}\n",
        "version as number": "version: 1\ncompatibilities:\n- tag: ok\n  rules: []\n",
        "version missing": "compatibilities:\n- tag: ok\n  rules: []\n",
        "version other": "version: v2\ncompatibilities:\n- tag: ok\n  rules: []\n",
    }
    for label, text in texts.items():
        c.add(
            "scalars", None, merge(attrs("m.x", {"e": "1", "5": "1", "true": "1"}), attrs("m.y", {})), label, text=text
        )


def json_keys(c: Cases) -> None:
    feats = attrs("m.x", {"e": "1"})
    variants = [
        ("Feature", lambda t: {"Feature": t["feature"], "matchExpressions": t["matchExpressions"]}),
        ("FEATURE", lambda t: {"FEATURE": t["feature"], "matchExpressions": t["matchExpressions"]}),
        ("MatchExpressions", lambda t: {"feature": t["feature"], "MatchExpressions": t["matchExpressions"]}),
        ("matchexpressions", lambda t: {"feature": t["feature"], "matchexpressions": t["matchExpressions"]}),
        ("match_expressions", lambda t: {"feature": t["feature"], "match_expressions": t["matchExpressions"]}),
        ("unknown field", lambda t: dict(t, comment="x")),
        (
            "both cases, later wins",
            lambda t: {"feature": "m.y", "Feature": t["feature"], "matchExpressions": t["matchExpressions"]},
        ),
        (
            "both cases, exact first",
            lambda t: {"Feature": "m.y", "feature": t["feature"], "matchExpressions": t["matchExpressions"]},
        ),
    ]
    for label, mk in variants:
        for e in (ex("In", ["1"]), ex("In", ["2"])):
            t = term("m.x", {"e": e})
            c.add("json-keys", spec(compat([rule([mk(t)])])), feats, label)
    for label, e in [
        ("Op", {"Op": "In", "value": ["1"]}),
        ("OP", {"OP": "In", "Value": ["1"]}),
        ("VALUE", {"op": "In", "VALUE": ["2"]}),
        ("Type", {"op": "Gt", "value": ["0.9"], "Type": "version"}),
        ("unknown", {"op": "In", "value": ["1"], "values": ["2"]}),
        ("op twice", {"op": "In", "Op": "NotIn", "value": ["1"]}),
        ("oP", {"oP": "Exists"}),
        ("ſ long s", {"op": "In", "valuſ": ["1"]}),
        ("op with K", {"op": "In", "value": ["1"], "\u212aind": "x"}),
    ]:
        c.add("json-keys", one("m.x", "e", e), feats, f"expression key {label}")
    for label, doc in [
        (
            "Compatibilities",
            {
                "version": "v1alpha1",
                "Compatibilities": [{"tag": "ok", "rules": [rule([term("m.x", {"e": ex("In", ["1"])})])]}],
            },
        ),
        (
            "COMPATIBILITIES",
            {
                "VERSION": "v1alpha1",
                "COMPATIBILITIES": [{"TAG": "ok", "WEIGHT": 3, "RULES": [rule([term("m.x", {"e": ex("In", ["1"])})])]}],
            },
        ),
        (
            "Rules",
            {
                "compatibilities": [
                    {"tag": "ok", "Rules": [{"Name": "n", "MatchFeatures": [term("m.x", {"e": ex("In", ["2"])})]}]}
                ]
            },
        ),
        (
            "MatchAny",
            {
                "compatibilities": [
                    {"tag": "ok", "rules": [{"MatchAny": [{"MatchFeatures": [term("m.x", {"e": ex("In", ["2"])})]}]}]}
                ]
            },
        ),
        (
            "Vars",
            {
                "compatibilities": [
                    {
                        "tag": "ok",
                        "rules": [
                            {"name": "a", "Vars": {"k": "v"}, "matchFeatures": [term("m.x", {})]},
                            {"name": "b", "matchFeatures": [term("rule.matched", {"k": ex("Exists")})]},
                        ],
                    }
                ]
            },
        ),
        ("unknown top level", {"version": "v1alpha1", "kind": "Spec", "compatibilities": [{"tag": "ok", "rules": []}]}),
        (
            "unknown in compatibility",
            {"compatibilities": [{"tag": "ok", "image": "x", "rules": [rule([term("m.x", {"e": ex("In", ["2"])})])]}]},
        ),
        (
            "unknown in rule",
            {
                "compatibilities": [
                    {"tag": "ok", "rules": [dict(rule([term("m.x", {"e": ex("In", ["2"])})]), labels={"a": "b"})]}
                ]
            },
        ),
        (
            "typo matchFeature",
            {
                "compatibilities": [
                    {"tag": "ok", "rules": [{"name": "r", "matchFeature": [term("m.x", {"e": ex("In", ["2"])})]}]}
                ]
            },
        ),
        (
            "typo matchExpression",
            {
                "compatibilities": [
                    {"tag": "ok", "rules": [rule([{"feature": "m.x", "matchExpression": {"e": ex("In", ["2"])}}])]}
                ]
            },
        ),
        ("typo compatibility", {"compatibility": [{"tag": "ok", "rules": []}]}),
        (
            "rule labels and taints",
            {
                "compatibilities": [
                    {
                        "tag": "ok",
                        "rules": [
                            dict(
                                rule([term("m.x", {})]),
                                labels={"a": "b"},
                                taints=[{"key": "k", "effect": "NoSchedule"}],
                                extendedResources={"a": "1"},
                                labelsTemplate="x",
                            )
                        ],
                    }
                ]
            },
        ),
    ]:
        c.add("json-keys", doc, feats, label)


def empty_structure(c: Cases) -> None:
    feats = attrs("m.x", {"e": "1"})
    docs = [
        ("no compatibilities key", {"version": "v1alpha1"}),
        ("compatibilities []", {"version": "v1alpha1", "compatibilities": []}),
        ("compatibilities null", {"version": "v1alpha1", "compatibilities": None}),
        ("compatibility {}", spec({})),
        ("no rules, tag only", spec({"tag": "ok"})),
        ("rules []", spec(compat([]))),
        ("rules null", spec(compat(None))),
        ("rules [{}]", spec(compat([{}]))),
        (
            "rules [{}] and a failing one",
            spec(compat([{}], "a"), compat([rule([term("m.x", {"e": ex("In", ["2"])})])], "b")),
        ),
        ("matchFeatures []", spec(compat([{"matchFeatures": []}]))),
        ("matchAny []", spec(compat([{"matchAny": []}]))),
        ("matchAny [{}]", spec(compat([{"matchAny": [{}]}]))),
        ("matchAny [{matchFeatures: []}]", spec(compat([{"matchAny": [{"matchFeatures": []}]}]))),
        ("matchFeatures [{}]", spec(compat([{"matchFeatures": [{}]}]))),
        ("term with only a feature", spec(compat([{"matchFeatures": [{"feature": "m.x"}]}]))),
        ("term with only a missing feature", spec(compat([{"matchFeatures": [{"feature": "m.y"}]}]))),
        ("matchExpressions null", spec(compat([{"matchFeatures": [{"feature": "m.x", "matchExpressions": None}]}]))),
        ("matchName null", spec(compat([{"matchFeatures": [{"feature": "m.x", "matchName": None}]}]))),
        ("matchName {}", spec(compat([{"matchFeatures": [{"feature": "m.x", "matchName": {}}]}]))),
        ("expression {}", one("m.x", "e", {})),
        ("expression {} on missing element", one("m.x", "z", {})),
        ("expression null", one("m.x", "e", None)),
        ("expression null, element missing", one("m.x", "z", None)),
        ("expression null, feature missing", one("m.y", "e", None)),
        ("rules [{}] x2", spec(compat([{}, {}]))),
        ("two empty compatibilities", spec({}, {})),
        ("name only", spec(compat([{"name": "n"}]))),
    ]
    for label, doc in docs:
        for f in (feats, {}):
            c.add("empty-structure", doc, f, label + (" (no features)" if not f else ""))


def errors_abort(c: Cases) -> None:
    feats = merge(attrs("m.x", {"e": "1", "v": "abc"}), flags("m.f", ["e"]), insts("m.i", [{"e": "1"}]))
    bad = {
        "in-empty": ex("In", []),
        "gt-2": ex("Gt", ["1", "2"]),
        "badre": ex("InRegexp", ["("]),
        "node-not-int": ex("Gt", ["1"]),
        "bad-op": ex("Gte", ["1"]),
        "exists-value": ex("Exists", ["x"]),
        "badbound": ex("Lt", ["x"]),
        "badtype": ex("Gt", ["1"], "semver"),
    }
    good_hit, good_miss = term("m.x", {"e": ex("In", ["1"])}), term("m.x", {"e": ex("In", ["2"])})
    for bn, b in bad.items():
        element = "v" if bn == "node-not-int" else "e"
        bterm = term("m.x", {element: b})
        layouts = {
            "alone": spec(compat([rule([bterm])])),
            "after a matching compatibility": spec(compat([rule([good_hit])], "a"), compat([rule([bterm])], "b")),
            "before a matching compatibility": spec(compat([rule([bterm])], "a"), compat([rule([good_hit])], "b")),
            "after a failed term": spec(compat([rule([good_miss, bterm])])),
            "after a failed rule": spec(compat([rule([good_miss], "r1"), rule([bterm], "r2")])),
            "in matchAny": spec(compat([rule([good_hit], any_=[[good_hit], [bterm]])])),
            "in matchName after failed expressions": spec(
                compat([rule([term("m.x", {"e": ex("In", ["2"])}, name=b)])])
            ),
            "in matchName after a failed term": spec(compat([rule([good_miss, term("m.x", name=b)])])),
            "on a flag": spec(compat([rule([term("m.f", {"e": b})])])),
            "on an instance": spec(compat([rule([term("m.i", {"e": b})])])),
            "on a missing element": spec(compat([rule([term("m.x", {"zz": b})])])),
            "on a missing feature": spec(compat([rule([term("m.nope", {"e": b})])])),
        }
        for ln, doc in layouts.items():
            c.add("errors-abort", doc, feats, f"{bn} {ln}")


def matchers(c: Cases) -> None:
    """matchName and matchExpressions together, matchAny, and multi-type feature sets (MatchMulti)."""
    multi = merge(flags("m.x", ["f1", "both"]), attrs("m.x", {"a1": "1", "both": "2"}), insts("m.x", [{"i1": "1"}]))
    for e in ("f1", "a1", "i1", "both", "zz"):
        for op in ("Exists", "DoesNotExist", "In", "NotIn"):
            value = ["1", "2"] if op in ("In", "NotIn") else "<none>"
            c.add("matchers", one("m.x", e, ex(op, value)), multi, f"multi-type {op} {e}")
    for op, value in (
        ("In", ["f1"]),
        ("In", ["a1"]),
        ("In", ["i1"]),
        ("InRegexp", ["^b"]),
        ("NotIn", ["f1"]),
        ("Exists", "<none>"),
        ("DoesNotExist", "<none>"),
        ("In", ["zz"]),
        ("Gt", ["0"]),
        ("IsTrue", "<none>"),
    ):
        c.add("matchers", spec(compat([rule([term("m.x", name=ex(op, value))])])), multi, f"matchName {op} {value}")
    for exprs_ok in (True, False):
        for name_ok in (True, False):
            t = term("m.x", {"a1": ex("In", ["1" if exprs_ok else "9"])}, name=ex("In", ["a1" if name_ok else "zz"]))
            c.add("matchers", spec(compat([rule([t])])), multi, f"both: expressions {exprs_ok} name {name_ok}")
    hit, miss = term("m.x", {"a1": ex("In", ["1"])}), term("m.x", {"a1": ex("In", ["9"])})
    for any_ in ([[hit]], [[miss]], [[miss], [hit]], [[miss], [miss]], [[hit, miss]], [[]], []):
        for mf in (None, [hit], [miss]):
            c.add(
                "matchers",
                spec(compat([rule(mf, any_=any_)])),
                multi,
                f"matchAny {len(any_)} blocks, matchFeatures {mf is not None}",
            )
    for _ in range(60):
        terms = []
        for _ in range(c.rng.randint(1, 4)):
            feature = c.rng.choice(["m.x", "m.y", "m.x", "M.X"])
            e = c.rng.choice(["f1", "a1", "i1", "both", "zz"])
            op = c.rng.choice(["Exists", "DoesNotExist", "In", "NotIn", "Gt", "InRegexp"])
            value = {"In": ["1"], "NotIn": ["2"], "Gt": ["0"], "InRegexp": ["^[12]$"]}.get(op, "<none>")
            if c.rng.random() < 0.3:
                terms.append(
                    term(
                        feature,
                        name=ex(op, value if op != "Gt" else "<none>") if op != "Gt" else ex("InRegexp", ["1$"]),
                    )
                )
            else:
                terms.append(term(feature, {e: ex(op, value)}))
        c.add("matchers", spec(compat([rule(terms)])), multi, "random terms")


def random_specs(c: Cases) -> None:
    """Whole random specs: several compatibilities, rules, operators and node shapes."""
    names = ["cpu.cpuid", "kernel.version", "pci.device", "m.x"]
    for _ in range(150):
        feats: Dict[str, Any] = {}
        if c.rng.random() < 0.8:
            feats = merge(feats, flags("cpu.cpuid", c.rng.sample(["AVX", "AVX2", "SSE4"], c.rng.randint(0, 3))))
        if c.rng.random() < 0.8:
            feats = merge(
                feats,
                attrs(
                    "kernel.version",
                    {"full": c.rng.choice(["6.8.0-45-generic", "5.4.0", "6.1"]), "major": c.rng.choice(["5", "6"])},
                ),
            )
        if c.rng.random() < 0.7:
            n = c.rng.choice([0, 1, 2, 3])
            feats = merge(
                feats,
                insts(
                    "pci.device",
                    [
                        {"vendor": c.rng.choice(["10de", "8086"]), "class": c.rng.choice(["0300", "0200"])}
                        for _ in range(n)
                    ],
                ),
            )
        if c.rng.random() < 0.5:
            feats = merge(feats, attrs("m.x", {"e": c.rng.choice(["1", "a", "true", ""])}))

        def rnd_term() -> Dict[str, Any]:
            f = c.rng.choice(names)
            if f == "cpu.cpuid":
                if c.rng.random() < 0.5:
                    return term(f, name=ex("InRegexp", [c.rng.choice(["^AVX", "^SSE", "2$"])]))
                return term(f, {c.rng.choice(["AVX", "AVX2", "AVX512"]): ex(c.rng.choice(["Exists", "DoesNotExist"]))})
            if f == "kernel.version":
                op = c.rng.choice(["Ge", "Lt", "GeLe", "In"])
                if op == "In":
                    return term(f, {"major": ex("In", [c.rng.choice(["5", "6", Raw("6")])])})
                if op == "GeLe":
                    return term(f, {"full": ex(op, ["5.0", c.rng.choice(["6.9", "6.1"])], "version")})
                return term(
                    f,
                    {
                        c.rng.choice(["full", "major"]): ex(
                            op, [c.rng.choice(["6.1", "6", "5.4.0"])], c.rng.choice(["version", "version", None])
                        )
                    },
                )
            if f == "pci.device":
                return term(
                    f,
                    {
                        "vendor": ex(c.rng.choice(["In", "NotIn"]), ["10de"]),
                        **({"class": ex("In", ["0300"])} if c.rng.random() < 0.5 else {}),
                    },
                )
            return term(
                f,
                {
                    "e": ex(
                        c.rng.choice(["In", "IsTrue", "Exists", "InRegexp", "Gt"]),
                        *([["1"]] if c.rng.random() < 0.7 else []),
                    )
                },
            )

        compats = []
        for ci in range(c.rng.randint(1, 3)):
            rules = []
            for ri in range(c.rng.randint(0, 2)):
                r = rule([rnd_term() for _ in range(c.rng.randint(0, 3))], f"r{ri}")
                if c.rng.random() < 0.2:
                    r["matchAny"] = [{"matchFeatures": [rnd_term()]} for _ in range(c.rng.randint(1, 2))]
                rules.append(r)
            compats.append(compat(rules, c.rng.choice([f"t{ci}", None, Raw(str(ci))]), c.rng.choice([None, 0, 5, 10])))
        c.add("random", spec(*compats), feats)


def generate(seed: int) -> List[Dict[str, Any]]:
    c = Cases(seed)
    for make in (
        operators,
        semver_class,
        regexp_class,
        zero_instances,
        nil_vs_empty,
        feature_case,
        vars_class,
        scalars,
        json_keys,
        empty_structure,
        errors_abort,
        matchers,
        random_specs,
    ):
        make(c)
    return c.items


ISSUE_CLASS = {
    "semver": 1,
    "regexp": 2,
    "zero-instances": 3,
    "nil-vs-empty": 4,
    "feature-case": 5,
    "vars": 6,
    "scalars": 7,
    "json-keys": 8,
    "empty-structure": 9,
    "errors-abort": 10,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--merge", metavar="VERDICTS.jsonl", help="join NFD's verdicts (one JSON object a line, by id)")
    p.add_argument("--about", metavar="ABOUT.json", help="with --merge: the header")
    a = p.parse_args()
    cases = generate(a.seed)
    if not a.merge:
        for case in cases:
            print(json.dumps({k: case[k] for k in ("id", "class", "spec", "features")}))
        return 0
    verdicts = {}
    with open(a.merge, encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            verdicts[v.pop("id")] = v
    about = json.load(open(a.about, encoding="utf-8")) if a.about else {}
    about["seed"] = a.seed
    about["counts"] = {}
    for case in cases:
        about["counts"][case["class"]] = about["counts"].get(case["class"], 0) + 1
    sys.stdout.write('{"about": ' + json.dumps(about, indent=1) + ',\n "cases": [\n')
    node_value = re.compile(r'not a (version|number) "(?:[^"\\]|\\.)*"')
    for i, case in enumerate(cases):
        nfd = verdicts[case["id"]]
        error = nfd.get("error")
        nfd["error_kind"] = (
            None
            if not error
            else "panic"
            if nfd.pop("panic", False)
            else "node-value"
            if node_value.fullmatch(error)
            else "spec"
        )
        case = dict(case, issue_class=ISSUE_CLASS.get(case["class"]), nfd=nfd)
        sys.stdout.write("  " + json.dumps(case, ensure_ascii=False) + (",\n" if i < len(cases) - 1 else "\n"))
    sys.stdout.write(" ]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
