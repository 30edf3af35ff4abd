"""The inverse of a rule table: which source key(s) would have produced a Flax path.

A :class:`~port_weights.common.Rule` maps a source key (regex ``pattern``) to a Flax path (``re`` template
``target`` referencing the pattern's groups). For a missing path, :func:`source_names` matches the path against
each target template (recovering the group values), writes the pattern out with those values, and keeps the
names that really map back to the path. The pattern is read with Python's own regex parser (``re._parser``, a
private module, imported as ``sre_parse`` before Python 3.11); parts it cannot write out (``\\d+`` with no value)
end that candidate, so the answer may be empty but is never wrong.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any, Protocol

try:
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_parse  # type: ignore[no-redef]



class Rule(Protocol):
    """What this module reads of a :class:`port_weights.common.Rule` (named structurally: common imports this
    module, so this module does not import common)."""

    pattern: str
    target: str
    transform: Any

_REF = re.compile(r"\\(?:g<(\w+)>|(\d+))")
_LIMIT = 16  # candidates written out per rule


def _template_regex(template: str, groupindex: dict[str, int]) -> re.Pattern:
    """A regex matching the strings ``template`` can expand to; group ``g{n}`` captures pattern group n."""
    parts, seen, pos = [], set(), 0
    for m in _REF.finditer(template):
        name, num = m.groups()
        n = int(num) if num else (int(name) if name.isdigit() else groupindex[name])
        parts += [re.escape(template[pos : m.start()]), f"(?P=g{n})" if n in seen else f"(?P<g{n}>.*?)"]
        seen.add(n)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def _write(items: Any, values: dict[int, str]) -> list[str] | None:
    """The strings the parsed regex ``items`` matches with the capture groups set to ``values``; None when a
    part (a character class, an unbounded repeat) has no single spelling."""
    out = [""]
    for op, av in items:
        opts = _write_one(op, av, values)
        if opts is None:
            return None
        out = [a + b for a in out for b in opts][:_LIMIT]
    return out


def _write_one(op: Any, av: Any, values: dict[int, str]) -> list[str] | None:
    if op is sre_parse.LITERAL:
        return [chr(av)]
    if op is sre_parse.AT:
        return [""]
    if op is sre_parse.SUBPATTERN:
        group, sub = av[0], av[-1]
        return [values[group]] if group in values else _write(sub, values)
    if op is sre_parse.GROUPREF:
        return [values[av]] if av in values else None
    if op is sre_parse.BRANCH:
        alts = [s for branch in av[1] for s in (_write(branch, values) or [])]
        return alts or None
    if op is sre_parse.IN and all(o is sre_parse.LITERAL for o, _ in av):
        return [chr(c) for _, c in av]
    if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):
        lo, hi, sub = av
        inner = _write(sub, values)
        if lo == 0:  # optional: absent, or once when it has a spelling
            return [""] + (inner if inner is not None and hi >= 1 else [])
        return None if inner is None else [s * lo for s in inner]
    return None


@functools.lru_cache(maxsize=4096)
def _prepare(rule: Rule) -> tuple[re.Pattern, re.Pattern, Any]:
    """``rule``'s compiled pattern, target-template regex and parsed pattern (cached: a table is asked once per
    missing path)."""
    compiled = re.compile(rule.pattern)
    return compiled, _template_regex(rule.target, dict(compiled.groupindex)), sre_parse.parse(rule.pattern)


def _leaf_fits(path: str, name: str) -> bool:
    """Whether a source name's kind (bias or not) fits the path's leaf, for rules that fan out to both."""
    return (path.rsplit("/", 1)[-1] == "bias") == bool(re.search(r"[._]bias$", name))


def source_names(path: str, rules: Iterable[Rule]) -> list[str]:
    """The source keys that ``rules`` would map to the Flax ``path``: from the rules whose target is the whole
    path, else from those whose target is a '/'-prefix of it (a transform that fans out, e.g. fused qkv -> q, k,
    v); when several fit, those whose kind (bias or not) matches the path's leaf. [] when none can be written."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(len(parts))]  # "", "a", "a/b", ...: fan-out targets
    exact: list[str] = []
    fanned: list[str] = []
    for rule in rules:
        compiled, template, parsed = _prepare(rule)
        heads = [(path, exact)] + ([(p, fanned) for p in prefixes] if rule.transform is not None else [])
        for head, out in heads:
            if (m := template.fullmatch(head)) is None:
                continue
            values = {int(k[1:]): v for k, v in m.groupdict().items()}
            for name in _write(parsed, values) or []:
                if (km := compiled.fullmatch(name)) and km.expand(rule.target) == head and name not in out:
                    out.append(name)
    names = exact or fanned
    fitting = [n for n in names if _leaf_fits(path, n)]
    return fitting if len(names) > 1 and fitting else names
