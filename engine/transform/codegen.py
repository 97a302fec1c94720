"""Mappings compiled to plain Python: one generated function per resource mapping.

The template nodes (``templates``) are what a mapping is when it loads: they carry file, line and
expression for every element, the structure check walks them (``structure``), and they can build
a resource while recording where each value came from (``Node.build``, the interpreter). That
walk costs a method call, a path tuple and a dictionary lookup per element on every message.
Here each resource mapping is turned once, at load, into the source of one Python function that
builds the same resource with straight-line code: an element is an assignment, a list is a loop
over the expression's values, ``$when`` an ``if``; the expressions themselves stay the closures
``expr`` compiled them into, named in the function's globals.

The same walk knows the FHIR type of every element (the structure check proved the template
fits its definition), so the generated code checks only what a message decides: each value an
expression gives, by the check of its FHIR type (``fhirspec.VALUE_CHECKS``), and the required
elements and choices of each object it fills. Text written in the mapping was checked at load and
is not checked again.

The fast path knows nothing about error messages. When an expression cannot read a value, or a
value or object is not valid FHIR, the function raises and ``Conversion`` builds that resource
again with the interpreter and checks it with ``fhirspec.problems``, which name the FHIR element,
the mapping line and the HL7 field in words. So the generated code can only ever be as strict as
the reference path (a test runs both over every example, the corpus and generated variants and
compares Bundles, warnings and errors) and costs nothing to explain a failure it never explains.
"""

from __future__ import annotations

import linecache
from itertools import count

from . import fhirspec
from .expr import Context, Lets, Minutes, Sourced
from .templates import Array, Const, Expr, Node, Obj


class Recheck(Exception):
    """The fast path found a value or an object that is not valid FHIR: build it again, slowly,
    to say what and where."""


# What makes the fast path give up on a resource: a worded DataError (a ValueError), the failures
# the interpreter words itself (Expr.evaluate), and Recheck.
RECHECK = (ValueError, ArithmeticError, TypeError, OverflowError, Recheck)

# Values that count as nothing when empty (the interpreter's ``_EMPTY``), compared by exact type.
_EMPTY_TYPES = (str, dict, list)


def _object_checker(kind: str):
    """The run-time check of one object of FHIR type ``kind`` once filled: required elements
    given, at most one element of a choice, a required choice given. None when it has neither."""
    defined = fhirspec.definition_of_element(kind)
    required = defined.required
    choices = [(names, needed) for names, needed in defined.choices.values()]
    if not required and not choices:
        return None

    def check(value: dict):
        for name in required:
            if name not in value:
                raise Recheck
        for names, needed in choices:
            given = 0
            for name in names:
                if name in value:
                    given += 1
            if given > 1 or (needed and not given):
                raise Recheck

    return check


def _kept(value) -> bool:
    """Whether a value is kept in FHIR JSON (as the interpreter decides: empty text, objects and
    lists are dropped; False and 0 are values)."""
    return value is not None and bool(value or type(value) not in _EMPTY_TYPES)


class _Generator:
    """Writes the source of the functions of one mapping set. Every function takes the context
    and the ``Output`` (for ``$reference``) and returns what the node builds (None for nothing)."""

    def __init__(self, mappings):
        self.mappings = mappings
        self.names = count()
        self.globals: dict = {
            "Context": Context, "Sourced": Sourced, "Minutes": Minutes, "Recheck": Recheck, "EMPTY": _EMPTY_TYPES,
        }
        self.functions: list[str] = []
        self.datatype_functions: dict = {}  # (datatype, FHIR type) -> function name

    def name(self, prefix: str, value=None) -> str:
        name = f"{prefix}{next(self.names)}"
        if value is not None:
            self.globals[name] = value
        return name

    # -- functions --------------------------------------------------------------------------------

    def resource(self, mapping) -> str:
        """The function building a resource's body (the dict after resourceType)."""
        return self.function(mapping.template, mapping.resource_type, f"resource {mapping.name}", top=True)

    def function(self, node: Obj, kind: str, what: str, top: bool = False, merged_check: bool = True,
                 name: str | None = None) -> str:
        """A function building one object node of FHIR type ``kind`` (with its $when, $value,
        $datatype or $reference; without its $each, which the caller loops)."""
        name = name or self.name("build_")
        body: list[str] = []
        self.object_body(node, kind, body, "    ", merged_check)
        self.functions.append(f"def {name}(ctx, out):  # {what}: {node.origin.path}:{node.origin.line}\n"
                              + "\n".join(body) + "\n")
        return name

    def datatype(self, datatype: str, kind: str) -> str:
        """The function of a datatype mapping built as FHIR ``kind`` (once per pair). Its object's
        required elements are checked where it is used, with the keys added beside it."""
        key = (datatype, kind)
        if key not in self.datatype_functions:
            # Named before its body is written: a datatype may use itself on a component
            # (``$from: $.4``), which ends where the component is empty, as in the interpreter.
            name = self.datatype_functions[key] = self.name("build_")
            self.function(self.mappings.datatypes[datatype], kind, f"datatype {datatype} as {kind}",
                          merged_check=False, name=name)
        return self.datatype_functions[key]

    # -- statements -------------------------------------------------------------------------------

    def object_body(self, node: Obj, kind: str, out: list, pad: str, check: bool = True):
        """Statements that return what ``node`` builds as one object (its ``_one``/``_fields``)."""
        if node.when is not None:
            when = self.name("when_", node.when)
            out.append(f"{pad}if not {when}(ctx):")
            out.append(f"{pad}    return None")
        if node.value is not None:
            element = self.element_of_value(kind)
            value = self.value(node.value, element, out, pad)
            out.append(f"{pad}return {value}")
            return
        if node.datatype is not None or node.reference is not None:
            source = self.name("source_", node.source) if node.source is not None else None
            if source is not None:
                out.append(f"{pad}values = {source}(ctx)")
            else:
                out.append(f"{pad}values = [ctx.value] if ctx.value else []")
            out.append(f"{pad}if not values:")
            out.append(f"{pad}    return None")
            node_name = self.name("node_", node)
            out.append(f"{pad}inner = values[0] if isinstance(values[0], Context) else "
                       f"ctx.at(value=values[0], label={node_name}._label(ctx))")
            if node.datatype is not None:
                function = self.datatype(node.datatype, kind)
                out.append(f"{pad}base = {function}(inner, out)")
                out.append(f"{pad}if not base:")
                out.append(f"{pad}    return None")
            else:
                origin = self.name("origin_", node.origin)
                out.append(f"{pad}base = out.reference({node.reference!r}, inner, {origin})")
                out.append(f"{pad}if base is None:")
                out.append(f"{pad}    return None")
            out.append(f"{pad}result = dict(base)")
        else:
            out.append(f"{pad}result = {{}}")
        self.fields(node, kind, "result", out, pad)
        checker = _object_checker(kind) if check else None
        if checker is not None:
            out.append(f"{pad}if result:")
            out.append(f"{pad}    {self.name('check_', checker)}(result)")
            out.append(f"{pad}    return result")
            out.append(f"{pad}return None")
        else:
            out.append(f"{pad}return result or None")

    def fields(self, node: Obj, kind: str, target: str, out: list, pad: str):
        defined = fhirspec.definition_of_element(kind)
        for key, child in node.fields:
            element = defined.elements[key]
            if isinstance(child, Const):
                if _kept(child.value):  # known now: a constant is always there, or never
                    out.append(f"{pad}{target}[{key!r}] = {self.name('const_', child.value)}")
                continue
            value = self.value(child, element, out, pad)
            out.append(f"{pad}if {value} is not None and ({value} or type({value}) not in EMPTY):")
            out.append(f"{pad}    {target}[{key!r}] = {value}")

    def value(self, node: Node, element: fhirspec.Element, out: list, pad: str) -> str:
        """Statements computing what ``node`` builds for ``element``; returns the variable (or
        constant) holding it."""
        if isinstance(node, Const):
            return self.name("const_", node.value)
        if isinstance(node, Expr):
            return self.expression(node, element.type, out, pad)
        if isinstance(node, Array):
            return self.array(node, element, out, pad)
        if isinstance(node, Obj):
            if node.each is not None:
                return self.each(node, element, out, pad)
            return self.inline_object(node, element.type, out, pad)
        raise TypeError(f"cannot compile a {type(node).__name__}")

    def expression(self, node: Expr, kind: str, out: list, pad: str) -> str:
        """The value of an expression, as FHIR JSON (``plain``), checked as a ``kind`` when it is
        kept (an empty text is dropped, not checked, as the interpreter drops it)."""
        getter = self.name("get_", node.getter)
        var = self.name("v")
        out.append(f"{pad}{var} = {getter}(ctx)")
        out.append(f"{pad}if {var} is not None:")
        out.append(f"{pad}    if type({var}) is Sourced:")
        out.append(f"{pad}        {var} = str({var})")
        out.append(f"{pad}    elif type({var}) is Minutes:")
        out.append(f"{pad}        {var} = int({var})")
        check = fhirspec.VALUE_CHECKS.get(kind)
        # The checks are total (a problem in words or None, whatever the value); an empty text is
        # dropped, not checked, as the interpreter drops it.
        if check is not None:
            out.append(f"{pad}    if {self.name('value_check_', check)}({var}) is not None and "
                       f"({var} or type({var}) not in EMPTY):")
        else:
            # An expression where FHIR wants an object: the structure check refuses it at load;
            # should one get here, the reference path says what is wrong.
            out.append(f"{pad}    if {var} or type({var}) not in EMPTY:")
        out.append(f"{pad}        raise Recheck")
        return var

    def array(self, node: Array, element: fhirspec.Element, out: list, pad: str) -> str:
        var = self.name("items")
        out.append(f"{pad}{var} = []")
        for item in node.items:
            if isinstance(item, Const) and not isinstance(item.value, dict):
                if _kept(item.value):
                    out.append(f"{pad}{var}.append({self.name('const_', item.value)})")
                continue
            value = self.value(item, element, out, pad)
            if item.spreads:
                one = self.name("one")
                out.append(f"{pad}for {one} in {value} or ():")
                out.append(f"{pad}    if {one} is not None and ({one} or type({one}) not in (dict, list)) and "
                           f"not (type({one}) is dict and {one} in {var}):")
                out.append(f"{pad}        {var}.append({one})")
            else:
                # An object equal to one already there says nothing new (as in Array.build).
                out.append(f"{pad}if {value} is not None and ({value} or type({value}) not in EMPTY) and "
                           f"not (type({value}) is dict and {value} in {var}):")
                out.append(f"{pad}    {var}.append({value})")
        out.append(f"{pad}{var} = {var} or None")
        return var

    def each(self, node: Obj, element: fhirspec.Element, out: list, pad: str) -> str:
        """``$each``: the object once per value or segment the selector picks (a list)."""
        function = self.function(node, element.type, "$each")
        select = self.name("each_", node.each)
        label = self.name("label_", node.each_text)
        var, item = self.name("items"), self.name("item")
        out.append(f"{pad}{var} = []")
        out.append(f"{pad}for {item} in {select}(ctx):")
        out.append(f"{pad}    {item} = {function}({item} if isinstance({item}, Context) else "
                   f"ctx.at(value={item}, label={label}), out)")
        out.append(f"{pad}    if {item} not in (None, {{}}, []):")
        out.append(f"{pad}        {var}.append({item})")
        return var

    def inline_object(self, node: Obj, kind: str, out: list, pad: str) -> str:
        """An object without $each: written in place when it is only elements, else a function."""
        if not node.simple:
            function = self.function(node, kind, "object")
            var = self.name("o")
            out.append(f"{pad}{var} = {function}(ctx, out)")
            return var
        var = self.name("o")
        out.append(f"{pad}{var} = {{}}")
        self.fields(node, kind, var, out, pad)
        checker = _object_checker(kind)
        if checker is not None:
            out.append(f"{pad}if {var}:")
            out.append(f"{pad}    {self.name('check_', checker)}({var})")
        out.append(f"{pad}{var} = {var} or None")
        return var

    def element_of_value(self, kind: str) -> fhirspec.Element:
        """The element a ``$value`` gives: the one the object stands for (its type is ``kind``)."""
        return fhirspec.Element("$value", kind, False, False)

    # -- the module -------------------------------------------------------------------------------

    def module(self, filename: str) -> dict:
        """Compile every function written so far; the namespace holding them."""
        source = "\n".join(self.functions)
        # Registered with linecache so a traceback through generated code shows the line.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        namespace = dict(self.globals)
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated source
        namespace["__source__"] = source
        return namespace


def compile_mappings(mappings) -> dict:
    """Generate and compile the builder of every resource mapping of a ``MappingSet`` (whose
    structure has been checked). Returns resource mapping name -> function(ctx, out) -> body;
    each function also has ``source``, the generated module, to read when debugging."""
    generator = _Generator(mappings)
    names = {name: generator.resource(mapping) for name, mapping in mappings.resources.items()}
    namespace = generator.module(f"<mappings {mappings.directory} {id(mappings):x}>")
    compiled = {}
    for name, function_name in names.items():
        function = namespace[function_name]
        function.source = namespace["__source__"]
        compiled[name] = function
    return compiled


def compute_lets(mapping, ctx: Context) -> Context:
    """The context with a resource's ``$let`` values computed, fast: an error raises (the
    interpreter computes them again to word it)."""
    values: dict = {}
    scoped = ctx.with_lets(Lets(values))
    for name, node in mapping.lets:
        values[name] = node.getter(scoped)
    return scoped

