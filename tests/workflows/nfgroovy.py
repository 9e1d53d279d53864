"""The small subset of Groovy that our Nextflow scripts use, evaluated in Python.

Nextflow renders a process's `script:` block as a Groovy GString. nfharness renders it here instead,
for a deliberately small subset:

- a script block is `def name = <expr>` lines followed by one triple-double-quoted string;
- <expr> is an operand, `cond ? a : b` or `a ?: b`; an operand is a string or number literal,
  `[]`, or a reference (`params.x`, `task.cpus`, `task.ext.args`, an input or `def` variable);
- strings interpolate `${ref}` and `$ref`; the escapes are `\\\\`, `\\$`, `\\"` and `\\'`.

Anything else raises `NfSyntaxError`, so a pipeline that outgrows the renderer fails its tests instead
of being rendered wrongly. Interpolating a null is an error too: Nextflow would write "null" into
the command.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

IDENT = r"[A-Za-z_]\w*"
REF = re.compile(rf"{IDENT}(?:\.{IDENT})*")


class NfSyntaxError(ValueError):
    """A construct outside the subset rendered here, or a reference that cannot be resolved."""


# ---- lexing -------------------------------------------------------------------------------------


def string_end(text: str, i: int) -> int:
    """Index just past the string literal starting at text[i] (', ", ''' or \"\"\")."""
    quote = text[i : i + 3] if text[i : i + 3] in ("'''", '"""') else text[i]
    j = i + len(quote)
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text.startswith(quote, j):
            return j + len(quote)
        else:
            j += 1
    raise NfSyntaxError(f"unterminated string starting {text[i:i + 40]!r}")


def strip_comments(text: str) -> str:
    """Text with // and /* */ comments blanked (newlines kept, so line numbers still hold)."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c in "'\"":
            j = string_end(text, i)
            out.append(text[i:j])
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = len(text) if j < 0 else j
        elif text.startswith("/*", i):
            j = text.index("*/", i) + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_close(text: str, i: int) -> int:
    """Index of the bracket closing the one at text[i], skipping strings."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack, j = [], i
    while j < len(text):
        c = text[j]
        if c in "'\"":
            j = string_end(text, j)
            continue
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                raise NfSyntaxError(f"unbalanced {c!r} near {text[max(0, j - 40):j + 1]!r}")
            if not stack:
                return j
        j += 1
    raise NfSyntaxError(f"no closing bracket for {text[i:i + 40]!r}")


def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside brackets and strings."""
    parts, depth, start, j = [], 0, 0, 0
    while j < len(text):
        c = text[j]
        if c in "'\"":
            j = string_end(text, j)
            continue
        depth += c in "([{"
        depth -= c in ")]}"
        if c == sep and depth == 0:
            parts.append(text[start:j])
            start = j + 1
        j += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


# ---- values: literals, references, Groovy truth and strings ------------------------------------


class Staged(list):
    """Staged input path(s) as the script sees them: relative names, blank-separated when several."""

    def __str__(self) -> str:
        return " ".join(str(p) for p in self)


def to_text(value: Any, what: str) -> str:
    if value is None:
        raise NfSyntaxError(f"{what} is null: Nextflow would write 'null' into the command")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def lookup(ref: str, scope: Mapping[str, Any]) -> Any:
    head, *rest = ref.split(".")
    if head not in scope:
        raise NfSyntaxError(f"unknown variable {head!r} in {ref!r}")
    value = scope[head]
    for k, attr in enumerate(rest):
        if not isinstance(value, Mapping) or (attr not in value and not (head == "task" and k == 1)):
            raise NfSyntaxError(f"unknown {'param' if head == 'params' else 'attribute'} in {ref!r}")
        value = value.get(attr)  # task.ext.<anything> is null unless set, as in Nextflow
    return value


def render(template: str, scope: Mapping[str, Any]) -> str:
    """A Groovy double-quoted string's value: escapes resolved, `${ref}` / `$ref` substituted."""
    out, i = [], 0
    while i < len(template):
        c = template[i]
        if c == "\\":
            nxt = template[i + 1 : i + 2]
            if nxt not in ("\\", "$", '"', "'"):
                raise NfSyntaxError(f"escape \\{nxt} is not supported (write \\\\{nxt} for a literal backslash)")
            out.append(nxt)
            i += 2
        elif c == "$" and template.startswith("${", i):
            j = matching_close(template, i + 1)
            ref = template[i + 2 : j].strip()
            if not REF.fullmatch(ref):
                raise NfSyntaxError(f"only plain references may be interpolated, not ${{{ref}}}")
            out.append(to_text(lookup(ref, scope), ref))
            i = j + 1
        elif c == "$":
            m = REF.match(template, i + 1)
            if not m:
                raise NfSyntaxError(f"unescaped $ in {template[i:i + 20]!r}: write \\$ for the shell")
            out.append(to_text(lookup(m.group(0), scope), m.group(0)))
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def literal(token: str, scope: Mapping[str, Any]) -> Any:
    """Value of a Groovy operand: a string/number/boolean/null literal, `[]`, or a reference."""
    token = token.strip()
    if token[:1] == "'" and string_end(token, 0) == len(token):
        body = token[1:-1]
        return re.sub(r"\\([\\'])", r"\1", body)
    if token[:1] == '"' and string_end(token, 0) == len(token):
        return render(token[1:-1], scope)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if re.fullmatch(r"-?\d+\.\d+", token):
        return float(token)
    if token in ("true", "false", "null", "[]"):
        return {"true": True, "false": False, "null": None, "[]": Staged()}[token]
    if REF.fullmatch(token):
        return lookup(token, scope)
    raise NfSyntaxError(f"unsupported Groovy expression {token!r}")


def top_find(text: str, token: str) -> int:
    """Index of the first `token` outside brackets and strings, or -1."""
    depth, j = 0, 0
    while j < len(text):
        c = text[j]
        if c in "'\"":
            j = string_end(text, j)
            continue
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0 and text.startswith(token, j):
            return j
        j += 1
    return -1


def evaluate(expr: str, scope: Mapping[str, Any]) -> Any:
    """`a`, `cond ? a : b` or `a ?: b` with Groovy truth (null, false, 0, '' and [] are false)."""
    q = top_find(expr, "?")
    if q < 0:
        return literal(expr, scope)
    if expr.startswith("?:", q):
        value = literal(expr[:q], scope)
        return value if value else literal(expr[q + 2 :], scope)
    branches = expr[q + 1 :]
    c = top_find(branches, ":")
    if c < 0 or top_find(branches, "?") >= 0:
        raise NfSyntaxError(f"unsupported expression {expr!r}: one `cond ? a : b` or `a ?: b` at most")
    return literal(branches[:c] if literal(expr[:q], scope) else branches[c + 1 :], scope)


def script_parts(block: str) -> tuple[list[tuple[str, str]], str]:
    """(`def` statements as (name, expression), the command template) of a script/stub block."""
    block = block.strip()
    start = block.find('"""')
    if start < 0:
        raise NfSyntaxError('a script block must end with one """ string')
    end = string_end(block, start)
    if block[end:].strip():
        raise NfSyntaxError(f"unsupported code after the script string: {block[end:].strip()[:40]!r}")
    defs = []
    for line in block[:start].splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(rf"\s*def\s+({IDENT})\s*=\s*(.+?)\s*", line)
        if not m:
            raise NfSyntaxError(f"unsupported statement in a script block: {line.strip()!r}")
        defs.append((m.group(1), m.group(2)))
    return defs, block[start + 3 : end - 3]


def render_script(block: str, scope: Mapping[str, Any]) -> tuple[str, dict]:
    """The shell script a block renders to, and the scope after its `def` statements."""
    scope = dict(scope)
    defs, template = script_parts(block)
    for name, expr in defs:
        scope[name] = evaluate(expr, scope)
    text = render(template, scope)
    lines = text.splitlines()
    indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[indent:] for ln in lines).strip() + "\n", scope
