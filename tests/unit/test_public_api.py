"""The public API is exactly what the README's API reference lists, and every public class,
method and function of it documents its arguments, its result and the aiockpt errors it
raises (Google-style ``Args:`` / ``Returns:`` / ``Raises:`` sections).

The README is the source of truth: a name added to ``aiockpt.__all__`` without a line in
its "API reference" section, or documented there but no longer exported, fails here.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiockpt
from aiockpt.errors import AiockptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
API_HEADING = "## API reference"

# The names the product's contract promises by name; they may never disappear.
CONTRACT = {
    "Config",
    "Checkpointer",
    "SyncCheckpointer",
    "Trainer",
    "SyncTrainer",
    "RNGState",
    "Stateful",
    "load",
    "list_checkpoints",
    "AiockptError",
    "ConfigError",
    "CorruptCheckpointError",
    "NoCheckpointError",
    "CheckpointInProgressError",
    "BackgroundError",
}

# Returned by aiockpt, never built by users: their constructors are not API.
HANDED_OUT = {"CheckpointHandle", "SyncCheckpointHandle", "SaveHandle", "AsyncSaveHandle"}

SECTION = re.compile(r"^\s*(Args|Arguments|Returns|Yields|Raises|Attributes|Examples?|Notes?):\s*$")
GENERATOR = re.compile(r"(Async)?(Iterator|Generator)\[")
CANONICAL = {"Arguments": "Args", "Example": "Examples", "Note": "Notes"}
ENTRY = re.compile(r"^\s*\**([A-Za-z_][A-Za-z0-9_.]*)\s*(\([^)]*\))?\s*:")


# -- the README's API reference ------------------------------------------------------------


def readme_api_names(text: str) -> list[str]:
    """The names listed (one per table row, first cell in backticks) under the API heading."""
    start = text.find(f"\n{API_HEADING}\n")
    assert start >= 0, f"README.md has no {API_HEADING!r} section"
    body = text[start + len(API_HEADING) + 2 :]
    end = body.find("\n## ")
    body = body if end < 0 else body[:end]
    names = []
    for line in body.splitlines():
        match = re.match(r"^\|\s*`(?:aiockpt\.)?([A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`", line)
        if match:
            names.append(match.group(1))
    return names


def test_readme_lists_exactly_the_exported_names() -> None:
    documented = readme_api_names(README.read_text(encoding="utf-8"))
    assert len(documented) == len(set(documented)), "a name is listed twice in the README"
    exported = set(aiockpt.__all__)
    missing_from_readme = sorted(exported - set(documented))
    not_exported = sorted(set(documented) - exported)
    assert not missing_from_readme, (
        f"exported in aiockpt.__all__ but not in the README's {API_HEADING}: "
        f"{missing_from_readme}; add a row for each"
    )
    assert not not_exported, (
        f"listed in the README's {API_HEADING} but not in aiockpt.__all__: {not_exported}"
    )


def test_contract_names_are_exported() -> None:
    missing = sorted(CONTRACT - set(aiockpt.__all__))
    assert not missing, f"the contract's names are no longer exported: {missing}"


def test_every_exported_name_imports_and_has_a_docstring() -> None:
    assert len(aiockpt.__all__) == len(set(aiockpt.__all__))
    for name in aiockpt.__all__:
        namespace: dict[str, Any] = {}
        exec(f"from aiockpt import {name}", namespace)  # the import a user writes
        obj = namespace[name]
        if name == "__version__":
            assert isinstance(obj, str) and obj
            continue
        assert own_docstring(obj), f"aiockpt.{name} has no docstring of its own"


def test_errors_form_one_tree() -> None:
    for name in aiockpt.__all__:
        obj = getattr(aiockpt, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, AiockptError), f"aiockpt.{name} is not an AiockptError"


PUBLIC_MODULES = ["aiockpt", "checkpointer", "config", "errors", "metrics", "stateful", "training"]


def mypy_overrides() -> list[dict[str, Any]]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    overrides: list[dict[str, Any]] = pyproject["tool"]["mypy"]["overrides"]
    return overrides


def override_for(module: str) -> dict[str, Any]:
    """The mypy override whose module patterns match ``module`` (empty: none does)."""
    for override in mypy_overrides():
        for pattern in override["module"]:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return override
    return {}


def test_public_modules_are_type_checked_strictly() -> None:
    for name in PUBLIC_MODULES:
        module = name if name == "aiockpt" else f"aiockpt.{name}"
        flags = override_for(module)
        assert flags.get("warn_return_any") and flags.get("warn_unused_ignores"), module
        assert flags.get("no_implicit_reexport"), module
    for name in aiockpt.__all__:
        module = getattr(getattr(aiockpt, name), "__module__", None)
        if module and module.startswith("aiockpt"):
            assert override_for(module).get("warn_return_any"), (
                f"{module} defines aiockpt.{name} but is not type-checked strictly: add it "
                "to the strict override in pyproject.toml"
            )


# -- docstring rules -----------------------------------------------------------------------


def own_docstring(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself (not inherited, not dataclass-generated)."""
    if isinstance(obj, type):
        doc = vars(obj).get("__doc__")
        if dataclasses.is_dataclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
            return None  # the signature dataclasses put there when there is none
    else:
        doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def sections(doc: str) -> dict[str, list[str]]:
    """Google-style sections of a docstring: header -> the names its entries start with."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    header_indent = 0
    entry_indent: int | None = None
    for line in inspect.cleandoc(doc).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        header = SECTION.match(line)
        if header:
            current = found.setdefault(CANONICAL.get(header.group(1), header.group(1)), [])
            header_indent, entry_indent = indent, None
        elif current is not None and indent <= header_indent:
            current = None  # prose after the section
        elif current is not None:
            entry_indent = indent if entry_indent is None else entry_indent
            entry = ENTRY.match(line)
            if entry and indent == entry_indent:
                current.append(entry.group(1))
    return found


def raised_errors(function: Callable[..., Any]) -> set[type[AiockptError]]:
    """The aiockpt errors that ``function`` raises itself or through the private functions
    of its module that it calls by name (``raise X(...)``, or ``raise helper(...)`` where
    the helper is annotated to return an error)."""
    found: set[type[AiockptError]] = set()
    seen: set[Callable[..., Any]] = set()

    def resolve(node: ast.expr, scope: dict[str, Any]) -> Any:
        if isinstance(node, ast.Name):
            return scope.get(node.id)
        if isinstance(node, ast.Attribute):
            base = resolve(node.value, scope)
            return getattr(base, node.attr, None) if base is not None else None
        return None

    def error_type(value: Any, scope: dict[str, Any]) -> type[AiockptError] | None:
        if isinstance(value, type) and issubclass(value, AiockptError):
            return value
        if inspect.isfunction(value):
            returned = value.__annotations__.get("return")
            candidate = lookup(returned, scope) if isinstance(returned, str) else returned
            if isinstance(candidate, type) and issubclass(candidate, AiockptError):
                return candidate
        return None

    def walk(fn: Callable[..., Any]) -> None:
        fn = inspect.unwrap(fn)
        if fn in seen or not inspect.isfunction(fn):
            return
        seen.add(fn)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError):
            return
        scope = fn.__globals__
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                kind = error_type(resolve(target, scope), scope)
                if kind is not None:
                    found.add(kind)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = scope.get(node.func.id)
                if (
                    node.func.id.startswith("_")
                    and inspect.isfunction(callee)
                    and callee.__module__ == fn.__module__
                ):
                    walk(callee)

    walk(function)
    return found


def lookup(dotted: str, scope: dict[str, Any]) -> Any:
    """``a.b.c`` looked up in ``scope`` (None when any part is missing)."""
    head, *rest = dotted.split(".")
    value = scope.get(head)
    for part in rest:
        value = getattr(value, part, None)
    return value


def documented_type(name: str, scope: dict[str, Any]) -> Any:
    """The exception a ``Raises:`` entry names, looked up as its reader would: in the
    function's module, in aiockpt, among the builtins."""
    for namespace in (scope, vars(aiockpt), vars(builtins)):
        value = lookup(name, namespace)
        if value is not None:
            return value
    return None


def check_callable(
    qualname: str, function: Callable[..., Any], *, bound: bool, doc: str | None = None
) -> list[str]:
    """What is missing from ``function``'s docstring (or ``doc``, the one it inherits);
    ``bound``: its first parameter is self or cls."""
    doc = doc or own_docstring(function)
    if doc is None:
        return [f"{qualname}: no docstring"]
    problems = []
    found = sections(doc)
    parameters = list(inspect.signature(function).parameters.values())
    if bound:
        parameters = parameters[1:]
    names = [p.name for p in parameters]
    stale = [n for n in found.get("Args", []) if n not in names]
    if stale:
        problems.append(f"{qualname}: Args describes {stale}, which it does not take")
    if names:
        if "Args" not in found:
            problems.append(f"{qualname}: takes {names} but has no Args section")
        else:
            undocumented = [n for n in names if n not in found["Args"]]
            if undocumented:
                problems.append(f"{qualname}: Args does not describe {undocumented}")
    returned = inspect.signature(function).return_annotation
    returns_value = returned not in (inspect.Signature.empty, None, "None")
    if returns_value and not function.__name__.startswith("__"):
        generator = isinstance(returned, str) and GENERATOR.match(returned)
        wanted = "Yields" if generator else "Returns"
        if wanted not in found:
            problems.append(f"{qualname}: returns {returned} but has no {wanted} section")
    raised = raised_errors(function)
    documented = [documented_type(n, function.__globals__) for n in found.get("Raises", [])]
    for entry, kind in zip(found.get("Raises", []), documented, strict=True):
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            problems.append(f"{qualname}: Raises names {entry!r}, which is no exception")
    for kind in sorted(raised, key=lambda k: k.__name__):
        if not any(isinstance(d, type) and issubclass(kind, d) for d in documented):
            problems.append(f"{qualname}: raises {kind.__name__} but its Raises does not say so")
    return problems


def public_members(cls: type) -> Iterator[tuple[str, Any]]:
    """(name, raw attribute) of the public methods and properties of ``cls`` that aiockpt
    defines, inherited ones included."""
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not owner.__module__.startswith("aiockpt"):
            continue
        attribute = vars(owner)[name]
        if isinstance(attribute, (staticmethod, classmethod, property)) or inspect.isfunction(
            attribute
        ):
            yield name, attribute


def inherited_docstring(cls: type, member: str) -> str | None:
    """The docstring of the nearest aiockpt definition of ``member`` that has one: an
    override without a docstring inherits its base's, as ``help()`` shows."""
    for klass in cls.__mro__:
        attribute = vars(klass).get(member)
        if attribute is None or not klass.__module__.startswith("aiockpt"):
            continue
        function = attribute.fget if isinstance(attribute, property) else attribute
        function = getattr(function, "__func__", function)
        doc = own_docstring(function)
        if doc is not None:
            return doc
    return None


def constructor(cls: type) -> Callable[..., Any] | None:
    """The ``__init__`` aiockpt wrote for ``cls`` (None: inherited from Python or torch)."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            init = vars(klass)["__init__"]
            if not klass.__module__.startswith("aiockpt") or not inspect.isfunction(init):
                return None
            # A Protocol's __init__ is typing's, whatever class holds it.
            return None if init.__module__ in ("typing", "typing_extensions") else init
    return None


def check_class(name: str, cls: type) -> list[str]:
    problems = []
    doc = own_docstring(cls)
    if doc is None:
        problems.append(f"{name}: no docstring")
    init = constructor(cls)
    if init is not None and name not in HANDED_OUT:
        parameters = list(inspect.signature(init).parameters)[1:]
        if dataclasses.is_dataclass(cls):
            parameters = [f.name for f in dataclasses.fields(cls) if f.init]
        documented = sections(doc or "")
        documented_names = documented.get("Args", []) + documented.get("Attributes", [])
        init_doc = own_docstring(init)
        if init_doc:
            documented_names += sections(init_doc).get("Args", [])
        undocumented = [p for p in parameters if p not in documented_names]
        if undocumented:
            problems.append(
                f"{name}(): the class docstring's Args (or Attributes) does not describe "
                f"{undocumented}"
            )
        stale = [a for a in documented.get("Args", []) if a not in parameters]
        if stale:
            problems.append(f"{name}(): Args describes {stale}, which it does not take")
    for member, attribute in public_members(cls):
        qualname = f"{name}.{member}"
        inherited = inherited_docstring(cls, member)
        if isinstance(attribute, property):
            if own_docstring(attribute.fget) is None and inherited is None:
                problems.append(f"{qualname}: property without a docstring")
        elif isinstance(attribute, staticmethod):
            problems += check_callable(qualname, attribute.__func__, bound=False, doc=inherited)
        elif isinstance(attribute, classmethod):
            problems += check_callable(qualname, attribute.__func__, bound=True, doc=inherited)
        else:
            problems += check_callable(qualname, attribute, bound=True, doc=inherited)
    return problems


def api_problems(namespace: Any, names: list[str]) -> list[str]:
    problems = []
    for name in names:
        obj = getattr(namespace, name)
        if isinstance(obj, type):
            problems += check_class(name, obj)
        elif inspect.isfunction(obj):
            problems += check_callable(name, obj, bound=False)
    return problems


def test_every_public_callable_documents_args_returns_and_raises() -> None:
    names = [n for n in aiockpt.__all__ if n != "__version__"]
    problems = api_problems(aiockpt, names)
    assert not problems, "\n".join(problems)


# -- the rules themselves catch what they are for ------------------------------------------


class _Samples:
    """Functions with and without the sections the rules ask for."""

    @staticmethod
    def complete(path: str, *, strict: bool = False) -> int:
        """Read a thing.

        Args:
            path: where it is.
            strict (bool): refuse what is odd.

        Returns:
            How many there were.

        Raises:
            ConfigError: when ``path`` is empty.
        """
        if not path:
            raise aiockpt.ConfigError("empty path")
        return len(path)

    @staticmethod
    def no_args_section(path: str) -> None:
        """Read a thing."""

    @staticmethod
    def one_argument_undocumented(path: str, strict: bool) -> None:
        """Read a thing.

        Args:
            path: where it is.
        """

    @staticmethod
    def stale_argument(path: str) -> None:
        """Read a thing.

        Args:
            path: where it is.
            mode: a parameter it no longer takes.
        """

    @staticmethod
    def no_returns_section() -> int:
        """Count."""
        return 1

    @staticmethod
    def raises_undocumented() -> None:
        """Fail."""
        _fail_privately()

    @staticmethod
    def raises_something_else() -> None:
        """Fail.

        Raises:
            RestoreError: never, in fact.
        """
        raise aiockpt.ConfigError("bad")

    @staticmethod
    def raises_a_subclass_of_what_it_documents() -> None:
        """Fail.

        Raises:
            AiockptError: always.
        """
        raise aiockpt.NoCheckpointError("none")

    @staticmethod
    def raises_a_typo() -> None:
        """Fail.

        Raises:
            ConfgError: misspelt.
        """

    @staticmethod
    def no_docstring() -> None:
        pass


def _fail_privately() -> None:
    raise _an_error("through two private helpers")


def _an_error(message: str) -> aiockpt.DirectoryLockedError:
    return aiockpt.DirectoryLockedError(message)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("complete", None),
        ("no_args_section", "has no Args section"),
        ("one_argument_undocumented", "does not describe ['strict']"),
        ("stale_argument", "describes ['mode'], which it does not take"),
        ("no_returns_section", "has no Returns section"),
        ("raises_undocumented", "raises DirectoryLockedError"),
        ("raises_something_else", "raises ConfigError"),
        ("raises_a_subclass_of_what_it_documents", None),
        ("raises_a_typo", "'ConfgError', which is no exception"),
        ("no_docstring", "no docstring"),
    ],
)
def test_rules_catch_missing_sections(sample: str, expected: str | None) -> None:
    problems = check_callable(sample, vars(_Samples)[sample].__func__, bound=False)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_rules_catch_undocumented_constructor_and_members() -> None:
    class Widget:
        """A widget.

        Args:
            width: what it took before it took ``size``.
        """

        def __init__(self, size: int) -> None:
            self.size = size

        @property
        def area(self) -> int:
            return self.size**2

        def grow(self, by: int) -> None:
            """Grow it.

            Args:
                by: how much.
            """

    Widget.__module__ = "aiockpt.widgets"  # checked as aiockpt's own
    problems = check_class("Widget", Widget)
    assert any("does not describe ['size']" in p for p in problems), problems
    assert any("Args describes ['width'], which it does not take" in p for p in problems)
    assert any("Widget.area: property without a docstring" in p for p in problems), problems
    assert not any("grow" in p for p in problems), problems


def test_readme_parser_reads_only_its_section() -> None:
    text = (
        "# x\n\n## Use\n\n| `Other` | not api |\n\n"
        f"{API_HEADING}\n\n| name | what |\n|---|---|\n| `Config` | settings |\n"
        "| `load()` | read |\n\n## Status\n\n| `Later` | no |\n"
    )
    assert readme_api_names(text) == ["Config", "load"]
