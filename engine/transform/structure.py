"""The FHIR structure of the mappings, checked once when they load.

Every resource template is walked beside the FHIR definition of its type (``fhirspec``): each key
must be an element of that type, a list where FHIR has a list (0..*) and one value where it has
one, an object where FHIR wants a datatype or a backbone element and an expression or text where it
wants a primitive, every required element given, at most one type of a choice (``value[x]``), and
every quoted text or ``$const`` a valid value of its element. A datatype mapping is checked for
every type it is used as (``$datatype: CX`` as an Identifier), a ``$reference`` where FHIR has a
Reference. Whatever fails is a ``ConfigError`` with the file and line, so ``hl7bridge check``
reports it and no message is ever mapped with it; what is left for run time is what only the
message decides (``fhirspec.problems``: the values, and required elements that came out empty).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import ConfigError
from . import fhirspec
from .templates import Array, Const, Expr, Node, Obj


def check_structure(mappings) -> None:
    """Check every resource mapping of a ``MappingSet`` against FHIR; raises ``ConfigError``."""
    checker = _Checker(mappings)
    for resource in mappings.resources.values():
        checker.object(resource.template, resource.resource_type, resource.resource_type, frozenset())


class _Checker:
    def __init__(self, mappings):
        self.mappings = mappings
        self.checked: set = set()  # (datatype, FHIR type, keys added beside it): each checked once

    def object(self, node: Obj, kind: str, label: str, beside: frozenset):
        """``node`` builds an object of FHIR type ``kind``; ``beside``: keys the node using it adds."""
        defined = fhirspec.definition_of_element(kind)
        keys = {key for key, _ in node.fields} | beside
        if node.datatype is not None:
            template = self.mappings.datatypes[node.datatype]
            added = frozenset(keys)
            if (node.datatype, kind, added) not in self.checked:
                self.checked.add((node.datatype, kind, added))
                if not isinstance(template, Obj) or template.each is not None or template.value is not None:
                    raise _error(node, f"{label}: $datatype {node.datatype} must give one object (a {kind})")
                used = f"{Path(node.origin.path).name}:{node.origin.line}"
                self.object(template, kind, f"{label} ($datatype {node.datatype} at {used})", added)
            keys |= {key for key, _ in template.fields}
        if node.reference is not None:
            if kind != "Reference":
                raise _error(node, f"{label}: $reference gives a Reference, but FHIR has a {kind} here",
                             "use $datatype to build the element itself")
            keys.add("reference")
        for key, child in node.fields:
            element = defined.elements.get(key)
            if element is None:
                close = difflib.get_close_matches(key, list(defined.elements), 1)
                raise _error(child, f"{label}.{key}: FHIR R4 {kind} has no element {key!r}",
                             f"did you mean {close[0]!r}?" if close else f"the elements of {kind}: "
                             + ", ".join(n for n in defined.elements if n not in ("id", "extension", "modifierExtension")))
            self.element(child, element, f"{label}.{key}")
        missing = [name for name in defined.required if name not in keys]
        if missing:
            raise _error(node, f"{label}: FHIR requires {kind}.{missing[0]}, and the mapping gives none",
                         f"add {missing[0]} to the template")
        for choice, (names, _) in defined.choices.items():
            given = [(key, child) for key, child in node.fields if key in names]
            always = [key for key, child in given if not _conditional(child)]
            if len(given) > 1 and len(always) > 1:
                raise _error(given[1][1], f"{label}: {always[0]} and {always[1]} are both {choice}[x], and FHIR "
                                          "allows only one", f"give one, or put $when on each")

    def element(self, node: Node, element: fhirspec.Element, label: str):
        if element.many:
            if isinstance(node, Array):
                for item in node.items:
                    self.item(item, element, label, in_list=True)
                return
            if isinstance(node, Obj) and node.each is not None:
                self.item(node, element, label, in_list=True)
                return
            if isinstance(node, Const) and isinstance(node.value, list):
                for value in node.value:
                    self.const(node, value, element, label)
                return
            raise _error(node, f"{label}: FHIR has a list of {element.type} here (0..*)",
                         "write it as a YAML list (- ...), or use $each")
        if isinstance(node, Array) or (isinstance(node, Obj) and node.each is not None):
            raise _error(node, f"{label}: FHIR has one {element.type} here (0..1 or 1..1), not a list",
                         "give one value")
        self.item(node, element, label)

    def item(self, node: Node, element: fhirspec.Element, label: str, in_list: bool = False):
        if isinstance(node, Obj) and node.value is not None:
            return self.item(node.value, element, label)
        if isinstance(node, Const):
            return self.const(node, node.value, element, label)
        if element.primitive:
            if isinstance(node, Expr):
                return  # its value is checked when a message gives it
            raise _error(node, f"{label}: FHIR has a {element.type} here: an expression or quoted text, not "
                               f"{'a list' if isinstance(node, Array) else 'an object'}")
        if isinstance(node, Obj):
            if element.type == fhirspec.ANY_RESOURCE:
                raise _error(node, f"{label}: a whole resource cannot be written inline here",
                             "build it with its own resource mapping")
            return self.object(node, element.type, label, frozenset())
        raise _error(node, f"{label}: FHIR has a {element.type} here (an object): "
                           f"{'an expression gives a single value' if isinstance(node, Expr) else 'not a list'}",
                     f"write its elements, or use $datatype")

    def const(self, node: Node, value, element: fhirspec.Element, label: str):
        """A value written in the mapping: checked now, as a message's values are when it is mapped."""
        if element.primitive:
            problem = fhirspec.value_problem(element.type, value)
            if problem is not None:
                raise _error(node, f"{label}: {value!r} is not a valid FHIR {element.type}: {problem}")
            return
        found: list = []
        fhirspec.complex_problems(value, element.type, (), found)
        if found:
            where, _, words = found[0]
            inner = "".join(f".{part}" if isinstance(part, str) else f"[{part}]" for part in where)
            raise _error(node, f"{label}{inner}: {words} (FHIR {element.type})")


def _conditional(node: Node) -> bool:
    return isinstance(node, Obj) and node.when is not None


def _error(node: Node, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError(message, node.origin.path, node.origin.line, hint)
