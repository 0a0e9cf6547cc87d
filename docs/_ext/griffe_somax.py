"""Griffe extension for the somax API reference (used by mkdocstrings, see ``mkdocs.yml``).

somax is read statically, which misses two kinds of documentation that the code base uses:

* ``#:`` comments on the lines just above a module or class attribute (the Sphinx
  convention for documenting constants): they become the attribute's docstring.
* Functions built at import time by a factory (every preset, from ``define_preset``;
  ``ggn_mse`` / ``ggn_ce``): statically they are attributes with no docstring. The
  module is imported and each such attribute whose runtime value is a documented
  function is replaced by a function with the runtime signature and docstring.

Docstrings are written for ``help()`` and Sphinx-style readers; for Markdown, a role
such as ``:class:`~somax.plan.Plan``` becomes the code span ``Plan`` and a literal-block
marker ``::`` at the end of a paragraph becomes ``:``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache
from pathlib import Path
from typing import Any

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_LITERAL = re.compile(r"::$(?=\n\s*\n)", re.MULTILINE)


def _markdown(doc: str) -> str:
    """Sphinx roles → code spans; a trailing ``::`` literal-block marker → ``:``."""
    doc = _ROLE.sub(lambda m: "`" + (m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)) + "`", doc)
    return _LITERAL.sub(":", doc)


@cache
def _lines(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def _comment_doc(attr: griffe.Attribute) -> str | None:
    """The ``#:`` comment block directly above ``attr``'s first line, or None."""
    path = attr.filepath
    if attr.lineno is None or not isinstance(path, Path) or not path.exists():
        return None
    lines = _lines(str(path))
    block = []
    i = attr.lineno - 2  # lineno is 1-based; start at the line above
    while i >= 0 and lines[i].strip().startswith("#:"):
        block.append(lines[i].strip()[2:].strip())
        i -= 1
    return "\n".join(reversed(block)) or None


def _runtime_function(name: str, value: Any, like: griffe.Attribute, loader: Any) -> griffe.Function:
    def shown(annotation: Any) -> str | None:
        return None if annotation is inspect.Parameter.empty else inspect.formatannotation(annotation)

    signature = inspect.signature(value)
    params = []
    for p in signature.parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        params.append(griffe.Parameter(p.name, kind=_KINDS[p.kind], default=default, annotation=shown(p.annotation)))
    func = griffe.Function(
        name,
        parameters=griffe.Parameters(*params),
        returns=shown(signature.return_annotation),
        lineno=like.lineno,
        endlineno=like.endlineno,
    )
    func.docstring = griffe.Docstring(
        _markdown(inspect.cleandoc(value.__doc__)),
        parent=func,
        parser=getattr(loader, "docstring_parser", None),
        parser_options=getattr(loader, "docstring_options", None),
    )
    return func


class SomaxDocs(griffe.Extension):
    """Fill in the documentation that static analysis of somax cannot see."""

    def _fill(self, obj: griffe.Object, runtime: Any, loader: Any) -> None:
        for name, member in list(obj.members.items()):
            if member.is_alias or not isinstance(member, griffe.Attribute) or member.docstring is not None:
                continue
            value = getattr(runtime, name, None) if runtime is not None else None
            if inspect.isfunction(value) and (value.__doc__ or "").strip():
                obj.set_member(name, _runtime_function(name, value, member, loader))
                continue
            doc = _comment_doc(member)
            if doc:
                member.docstring = griffe.Docstring(doc, parent=member)

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.path.startswith("somax") and obj.docstring is not None:
            obj.docstring.value = _markdown(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # the top-level package gets no on_object event

    def on_module(self, *, mod: griffe.Module, loader: Any = None, **kwargs: Any) -> None:
        if not mod.path.startswith("somax"):
            return
        try:
            runtime = importlib.import_module(mod.path)
        except ImportError:
            runtime = None
        self._fill(mod, runtime, loader)

    def on_class(self, *, cls: griffe.Class, loader: Any = None, **kwargs: Any) -> None:
        if cls.path.startswith("somax"):
            self._fill(cls, None, loader)
