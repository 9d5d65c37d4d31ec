"""Which objects one LIST or WATCH asked for: label selectors, field selectors, namespace.

Pure: no I/O and no trio, so ``tests/test_fakeapi_store.py`` checks it with
tables. It parses what kube-apiserver parses (``a=b,c!=d,e in (f,g),h,!i``
and ``metadata.name=`` as the one field selector the fake serves) and
refuses the rest with :class:`SelectorError`, which the handlers answer 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from .objects import labels_of, name_of


class SelectorError(ValueError):
    """A label selector the fake (and kube-apiserver) cannot parse."""


_REQUIREMENT = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
)


def parse_label_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector (``a=b,c!=d,e in (f,g),h,!i``) into a predicate."""
    requirements: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^(]*\))", selector):
        if not part.strip():
            continue
        m = _REQUIREMENT.match(part)
        if m is None:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        requirements.append(_requirement(m))
    return lambda labels: all(req(labels) for req in requirements)


def _requirement(m: re.Match[str]) -> Callable[[dict[str, str]], bool]:
    if m["not"]:
        key = m["nkey"]
        return lambda labels: key not in labels
    key, op = m["key"], m["op"] or m["setop"]
    if op in ("=", "=="):
        value = m["value"]
        return lambda labels: labels.get(key) == value
    if op == "!=":
        value = m["value"]
        return lambda labels: labels.get(key) != value
    if op in ("in", "notin"):
        values = {v.strip() for v in m["values"].split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: key not in labels or labels[key] not in values
    return lambda labels: key in labels


@attrs.frozen
class Selection:
    """What one list or watch asked for: a namespace, a label selector, a name."""

    namespace: str | None
    labels: Callable[[dict[str, str]], bool]
    name: str | None = None

    @classmethod
    def from_query(cls, namespace: str | None, query: dict[str, str]) -> Selection:
        name = None
        for part in filter(None, query.get("fieldSelector", "").split(",")):
            key, _, value = part.partition("=")
            if key != "metadata.name":
                raise SelectorError(f'field label not supported: "{key}"')
            name = value.lstrip("=")
        return cls(namespace, parse_label_selector(query.get("labelSelector", "")), name)

    def sees(self, obj: Any) -> bool:
        """Objects too broken to carry labels are always seen: planted garbage."""
        labels = labels_of(obj)
        if labels is None:
            return True
        namespace, name = name_of(obj)
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.name is not None and name != self.name:
            return False
        return self.labels(labels)
