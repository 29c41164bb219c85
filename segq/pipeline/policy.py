"""What of a MONAI bundle's config segq will run, and what only with ``--trust-model``.

A bundle config is code: ``_target_`` instantiates any importable class, a ``$`` string is evaluated
with Python's ``eval``, a ``%`` macro reads another file. segq reads only the sections it needs
(``network_def``, ``preprocessing``, ``inferer``'s window settings, ``postprocessing``) and whatever
they reference; nothing else of the config is parsed, so its ``imports``, ``evaluator``, ``handlers``
and data loader never run. Within those sections, by default:

- ``_target_`` must name a class of MONAI or ``torch.nn`` (a bare name MONAI's ComponentLocator finds, or
  ``monai.…``, ``torch.nn.…``) that is a transform, a network (``torch.nn.Module``) or an inferer; not a
  function (the locator also finds ``run`` and ``download_url``), and not a writer (``Save…``);
- a ``$`` expression must be plain arithmetic over literals and ``@`` references: numbers, strings,
  lists, comparisons, ``x if c else y``, ``+``, subscripts, a dtype (``$numpy.float32``, ``$torch.float16``),
  ``torch.device(...)`` and ``torch.cuda.is_available()``; no other call, no attribute, no ``lambda``,
  no ``import``, no ``**``;
- ``_requires_``, ``_mode_: debug``, ``%`` macros and relative ``@#`` references are refused.

Anything else is refused at submit, naming the config key, unless the user passes ``--trust-model``,
which parses those sections as MONAI would (the config's own ``imports`` included).
"""

from __future__ import annotations

import ast
import re
from typing import Any

from segq.errors import InputError

DTYPE_EXPRESSION = re.compile(r"^\$\s*(numpy|np|torch)\.(u?int(8|16|32|64)|float(16|32|64)|bfloat16|bool_?|half)\s*$")
REFERENCE = re.compile(r"@([\w#]+)")
TRUST_HINT = "read the config, and if you trust it as code, submit again with --trust-model"


class PolicyError(InputError):
    """A bundle config that segq will run only with --trust-model."""


def _resolve(target: str) -> Any:
    """The object a ``_target_`` names, as MONAI's ComponentLocator would find it; None where it finds none."""
    import importlib

    from monai.bundle.config_item import ComponentLocator

    if "." in target:
        module_name, _, attr = target.rpartition(".")
    else:
        found = ComponentLocator().get_component_module_name(target)
        if found is None:
            return None
        module_name, attr = (found[0] if isinstance(found, list) else found), target
    try:
        return getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        return None


def allowed_target(target: str) -> bool:
    """A MONAI transform, a network (a ``torch.nn.Module``) of MONAI or torch.nn, or MONAI's inferer or Compose:
    classes only (MONAI's locator also finds functions, e.g. ``run`` and ``download_url``), and no writer."""
    if not target.startswith(("monai.", "torch.nn.")) and "." in target:
        return False
    found = _resolve(target)
    if not isinstance(found, type) or not found.__module__.startswith(("monai.", "torch.nn.")):
        return False
    import torch
    from monai.inferers import Inferer
    from monai.transforms import Transform

    if found.__name__.startswith("Save") or "Writer" in found.__name__ or "Saver" in found.__name__:
        return False
    return issubclass(found, Transform | torch.nn.Module | Inferer)


# The only attribute chains and calls a safe expression may name.
SAFE_ATTRIBUTES = {("torch", "device"), ("torch", "cuda", "is_available")}
SAFE_CALLS = SAFE_ATTRIBUTES
_SAFE_NODES = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.BinOp, ast.UnaryOp,
               ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.Load, ast.operator, ast.unaryop,
               ast.boolop, ast.cmpop, ast.keyword)
_REF_NAME = "_segq_ref_"


def _chain(node: ast.AST) -> tuple[str, ...] | None:
    """``("torch", "cuda", "is_available")`` for ``torch.cuda.is_available``; None for anything but names."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return (node.id, *reversed(parts))


def _safe(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return False  # 10 ** 10 ** 10 would hang the submit
    if isinstance(node, ast.Call):
        return (_chain(node.func) in SAFE_CALLS and all(_safe(a) for a in node.args)
                and all(_safe(k.value) for k in node.keywords))
    if isinstance(node, ast.Attribute):
        chain = _chain(node)
        return chain in SAFE_ATTRIBUTES or bool(chain and DTYPE_EXPRESSION.match("$" + ".".join(chain)))
    if isinstance(node, ast.Name):
        return node.id.startswith(_REF_NAME) or node.id in ("True", "False", "None")
    if not isinstance(node, _SAFE_NODES):
        return False
    return all(_safe(child) for child in ast.iter_child_nodes(node))


def allowed_expression(text: str) -> bool:
    """Whether a ``$`` expression is in the safe subset (module docstring); MONAI still evaluates it."""
    if DTYPE_EXPRESSION.match(text):
        return True
    source = REFERENCE.sub(lambda m: _REF_NAME + str(abs(hash(m.group(1)))), text[1:].strip())
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return _safe(tree)


def _refuse(key: str, what: str) -> None:
    raise PolicyError(f"bundle config key {key!r}: {what}, which segq runs only as trusted code; {TRUST_HINT}")


def _check_string(text: str, key: str, follow: list[str]) -> None:
    if text.startswith("%"):
        _refuse(key, f"the macro {text!r} reads another config")
    if text.startswith("$") and not allowed_expression(text):
        _refuse(key, f"the expression {text[:80]!r} is Python code")
    for ref in REFERENCE.findall(text) if text.startswith(("@", "$")) else ():
        if ref.startswith("#"):
            _refuse(key, f"the relative reference @{ref}")
        follow.append(ref)


def _check_node(node: Any, key: str, follow: list[str]) -> None:
    if isinstance(node, str):
        _check_string(node, key, follow)
    elif isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and (not isinstance(target, str) or not allowed_target(target)):
            _refuse(f"{key}#_target_", f"{target!r} is not a MONAI or torch.nn transform, network or inferer")
        if "_requires_" in node:
            _refuse(f"{key}#_requires_", "it runs other config items first")
        if node.get("_mode_") == "debug":
            _refuse(f"{key}#_mode_", "debug mode starts a debugger")
        for name, value in node.items():
            if name != "_target_":
                _check_node(value, f"{key}#{name}", follow)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_node(value, f"{key}#{index}", follow)


def get_item(config: dict[str, Any], key: str) -> Any:
    """The raw config item at a ``#``-separated id, KeyError when absent."""
    node: Any = config
    for part in key.split("#"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def reachable(config: dict[str, Any], roots: list[str], trusted: bool) -> dict[str, Any]:
    """A config of only what ``roots`` reach through ``@`` references, each item checked against the policy
    unless ``trusted``; PolicyError names the first key refused.

    Only the reached items are kept, not their top-level neighbours: MONAI's resolver evaluates every
    ``$import`` statement of a config it parses, reached or not.
    """
    kept: dict[str, Any] = {}
    pending = list(roots)
    seen: set[str] = set()
    while pending:
        key = pending.pop()
        if key in seen:
            continue
        seen.add(key)
        key = _prunable(config, key)
        try:
            node = get_item(config, key)
        except (KeyError, IndexError, ValueError, TypeError):
            raise InputError(f"bundle config refers to {key!r}, which it does not define") from None
        follow: list[str] = []
        if not trusted:
            _check_node(node, key, follow)
        else:
            _collect_references(node, follow)
        _put(kept, key, node)
        pending.extend(follow)
    return kept


def _prunable(config: dict[str, Any], key: str) -> str:
    """``key``, or the nearest enclosing id whose path from the top runs through dicts only."""
    parts = key.split("#")
    node: Any = config
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            return "#".join(parts[:depth])
        node = node.get(part)
    return key


def _put(target: dict[str, Any], key: str, node: Any) -> None:
    *parents, last = key.split("#")
    for part in parents:
        existing = target.get(part)
        target = target.setdefault(part, {}) if isinstance(existing, dict) or existing is None else existing
    target[last] = node


def _collect_references(node: Any, follow: list[str]) -> None:
    if isinstance(node, str) and node.startswith(("@", "$")):
        follow.extend(ref for ref in REFERENCE.findall(node) if not ref.startswith("#"))
    elif isinstance(node, dict):
        for value in node.values():
            _collect_references(value, follow)
    elif isinstance(node, list):
        for value in node:
            _collect_references(value, follow)
