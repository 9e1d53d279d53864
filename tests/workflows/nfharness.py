"""Run Nextflow processes without Nextflow: parse modules and configs, render scripts, stage inputs,
run them with bash and check their declared outputs.

Nextflow cannot run on our machines (its launcher downloads the engine), so the pipeline tests
emulate what decides whether our pipelines work: each process's `script:` (or `stub:`) block is
rendered with the values Nextflow would substitute (nfgroovy: a small, strict subset of Groovy), run
with `bash -euo pipefail` in a task folder of its own with the inputs staged as links (including
`stageAs` patterns), and its declared `output:` paths must exist.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfgroovy import (  # noqa: F401  (re-exported for the tests)
    IDENT,
    REF,
    NfSyntaxError,
    Staged,
    literal,
    matching_close,
    render,
    render_script,
    script_parts,
    split_top,
    string_end,
    strip_comments,
    top_find,
)

SECTIONS = ("input", "output", "when", "script", "shell", "exec", "stub")


class TaskError(RuntimeError):
    """A rendered task failed, or did not produce a declared output."""


# ---- modules: processes and their declarations -------------------------------------------------


@dataclass
class Decl:
    """One input or output declaration: `val x`, `path "pattern"`, `path x, stageAs: 'd/*'`, or a tuple."""

    kind: str
    target: str = ""  # variable name, or the (quoted) output path pattern
    options: dict = field(default_factory=dict)
    items: list[Decl] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [d.target for d in (self.items or [self]) if REF.fullmatch(d.target)]


_ELEMENT = re.compile(r"(val|path|env|stdin|stdout)\s*(?:\((.*)\)|\s+(.*))?$", re.S)


def _element(text: str) -> Decl:
    m = _ELEMENT.match(text.strip())
    if not m:
        raise NfSyntaxError(f"unsupported declaration {text!r}")
    args = split_top(m.group(2) if m.group(2) is not None else (m.group(3) or ""))
    options = dict(_option(a) for a in args[1:])
    return Decl(kind=m.group(1), target=args[0] if args else "", options=options)


def _option(text: str) -> tuple[str, Any]:
    """`emit: tiles`, `optional: true`, `stageAs: 'tiles/*'` -> (name, value); bare words stay strings."""
    key, sep, value = text.partition(":")
    if not sep or not re.fullmatch(IDENT, key.strip()):
        raise NfSyntaxError(f"expected `name: value`, got {text!r}")
    value = value.strip()
    return key.strip(), value if re.fullmatch(IDENT, value) and value not in ("true", "false", "null") \
        else literal(value, {})


def parse_declaration(line: str) -> Decl:
    parts = split_top(line)
    head = parts[0]
    if head.startswith("tuple"):
        first = head[len("tuple") :].strip()
        elements = [first] + [p for p in parts[1:] if not re.match(rf"{IDENT}\s*:", p)]
        options = [p for p in parts[1:] if re.match(rf"{IDENT}\s*:", p)]
        return Decl(kind="tuple", items=[_element(e) for e in elements], options=dict(_option(o) for o in options))
    decl = _element(head)
    decl.options.update(_option(p) for p in parts[1:])
    return decl


@dataclass
class Process:
    name: str
    path: Path
    directives: str
    inputs: list[Decl]
    outputs: list[Decl]
    script: str
    stub: str | None

    @property
    def labels(self) -> list[str]:
        return re.findall(r"^\s*label\s+['\"]([^'\"]+)['\"]", self.directives, re.M)


def _sections(body: str) -> dict[str, str]:
    pattern = re.compile(rf"^\s*({'|'.join(SECTIONS)}):\s*$", re.M)
    marks = list(pattern.finditer(body))
    out = {"directives": body[: marks[0].start()] if marks else body}
    for m, nxt in zip(marks, [*marks[1:], None]):
        out[m.group(1)] = body[m.end() : nxt.start() if nxt else len(body)]
    return out


def parse_module(path: str | os.PathLike) -> list[Process]:
    path = Path(path)
    text = strip_comments(path.read_text())
    processes = []
    for m in re.finditer(rf"^process\s+({IDENT})\s*{{", text, re.M):
        body = text[m.end() : matching_close(text, m.end() - 1)]
        s = _sections(body)
        for required in ("input", "output", "script"):
            s.setdefault(required, "")
        if not s["script"].strip():
            raise NfSyntaxError(f"{path}: process {m.group(1)} has no script: block")
        processes.append(Process(
            name=m.group(1), path=path, directives=s["directives"],
            inputs=[parse_declaration(ln) for ln in s["input"].splitlines() if ln.strip()],
            outputs=[parse_declaration(ln) for ln in s["output"].splitlines() if ln.strip()],
            script=s["script"], stub=s.get("stub"),
        ))
    return processes


# ---- workflow files: process calls and .out references -----------------------------------------


def process_calls(text: str, names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(process name, argument expressions) of every call to one of `names`, in file order."""
    text, calls = strip_comments(text), []
    for m in re.finditer(rf"\b({'|'.join(map(re.escape, names))})\s*\(", text):
        close = matching_close(text, m.end() - 1)
        calls.append((m.group(1), split_top(text[m.end() : close])))
    return calls


def out_references(text: str) -> list[tuple[str, str]]:
    """(process, emit name) of every `NAME.out.emit` in a workflow file."""
    return re.findall(rf"\b({IDENT})\.out\.({IDENT})", strip_comments(text))


# ---- configs ------------------------------------------------------------------------------------


@dataclass
class ConfigBlock:
    name: str
    assignments: dict[str, str] = field(default_factory=dict)  # key -> raw Groovy value
    blocks: list[ConfigBlock] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)

    def block(self, name: str) -> ConfigBlock | None:
        return next((b for b in self.blocks if b.name == name), None)

    def walk(self) -> Iterable[ConfigBlock]:
        yield self
        for b in self.blocks:
            yield from b.walk()


def parse_config(text: str, name: str = "<root>") -> ConfigBlock:
    """Blocks (`scope {`, `withLabel: 'x' {`), `key = value` and `includeConfig` of a config file."""
    text, root, i = strip_comments(text), ConfigBlock(name), 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text.startswith("includeConfig", i):
            m = re.compile(r"includeConfig\s+('[^']*'|\"[^\"]*\")").match(text, i)
            if not m:
                raise NfSyntaxError(f"malformed includeConfig near {text[i:i + 40]!r}")
            root.includes.append(m.group(1)[1:-1])
            i = m.end()
            continue
        m = re.compile(r"([^={}\n]+?)\s*(=(?!=)|\{)").match(text, i)
        if not m:
            raise NfSyntaxError(f"unsupported config statement near {text[i:i + 40]!r}")
        head = m.group(1).strip()
        if m.group(2) == "{":
            close = matching_close(text, m.end() - 1)
            root.blocks.append(parse_config(text[m.end() : close], head))
            i = close + 1
            continue
        j = m.end()
        while j < len(text) and text[j] != "\n":
            if text[j] in "'\"":
                j = string_end(text, j)
            elif text[j] in "([{":
                j = matching_close(text, j) + 1
            else:
                j += 1
        root.assignments[head] = text[m.end() : j].strip()
        i = j
    return root


def read_config(path: str | os.PathLike) -> ConfigBlock:
    return parse_config(Path(path).read_text(), str(path))


def _config_params(block: ConfigBlock, scope: dict) -> None:
    for key, raw in block.assignments.items():
        if key.startswith("params."):
            scope["params"][key[len("params.") :]] = literal(raw, scope)
    params_block = block.block("params")
    if params_block is not None:
        for key, raw in params_block.assignments.items():
            scope["params"][key] = literal(raw, scope)


def config_params(config: str | os.PathLike, profiles: Iterable[str] = ()) -> dict:
    """`params` as Nextflow resolves them from `config` (its directory is projectDir) and profiles."""
    config = Path(config).resolve()
    project = config.parent
    scope: dict = {"params": {}, "projectDir": str(project), "launchDir": os.getcwd(), "baseDir": str(project)}
    root = read_config(config)
    _config_params(root, scope)
    for include in root.includes:
        _config_params(read_config(project / include), scope)
    profiles_block = root.block("profiles") or ConfigBlock("profiles")
    for name in profiles:
        profile = profiles_block.block(name)
        if profile is None:
            raise NfSyntaxError(f"{config}: no profile {name!r}")
        _config_params(profile, scope)
        for include in profile.includes:
            _config_params(read_config(project / include), scope)
    return scope["params"]


# ---- params against nextflow_schema.json ---------------------------------------------------------

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def schema_properties(schema: Mapping) -> dict[str, dict]:
    props = dict(schema.get("properties", {}))
    for group in schema.get("$defs", {}).values():
        props.update(group.get("properties", {}))
    return props


def validate_params(params: Mapping[str, Any], schema: Mapping) -> list[str]:
    """Problems of `params` against the schema's types, enums, bounds and patterns (nulls are unset)."""
    props, problems = schema_properties(schema), []
    for name, value in params.items():
        spec = props.get(name)
        if spec is None:
            problems.append(f"params.{name} is not described in the schema")
            continue
        if value is None:
            continue
        expected = _JSON_TYPES[spec.get("type", "string")]
        if isinstance(value, bool) != (spec["type"] == "boolean") or not isinstance(value, expected):
            problems.append(f"params.{name} = {value!r} is not of type {spec['type']}")
            continue
        if "enum" in spec and value not in spec["enum"]:
            problems.append(f"params.{name} = {value!r} is not one of {spec['enum']}")
        if "pattern" in spec and not re.search(spec["pattern"], value):
            problems.append(f"params.{name} = {value!r} does not match {spec['pattern']}")
        if isinstance(value, (int, float)):
            for key, bad in (("minimum", value.__lt__), ("maximum", value.__gt__),
                             ("exclusiveMinimum", value.__le__), ("exclusiveMaximum", value.__ge__)):
                if key in spec and bad(spec[key]):
                    problems.append(f"params.{name} = {value!r} violates {key} {spec[key]}")
    return problems


# ---- running tasks -------------------------------------------------------------------------------


@dataclass
class TaskResult:
    process: str
    workdir: Path
    script: str  # the rendered script: block (also in stub runs, which execute the stub: block)
    outputs: dict[str, Any]  # emit name -> value (glob outputs: a list of paths)


def _numbered(pattern: str, index: int, many: bool) -> str:
    """Nextflow's stageAs wildcards: `?`s become the index, zero-padded to their count; `*` becomes the
    index, or nothing when there is a single file."""
    out = re.sub(r"\?+", lambda q: str(index).zfill(len(q.group(0))), pattern)
    return out.replace("*", str(index) if many else "")


def _stage_targets(value: Any, stage_as: str | None) -> list[tuple[Path, str]]:
    """(source, staged relative name) of each file of a `path` input."""
    files = [Path(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    pattern, many, staged = stage_as or "*", len(files) > 1, []
    for index, src in enumerate(files, 1):
        if pattern == "*":
            rel = src.name
        elif pattern.endswith("/*"):
            rel = f"{_numbered(pattern[:-2], index, many)}/{src.name}"
        elif "?" in pattern or "*" in pattern:
            rel = _numbered(pattern, index, many)
        elif not many:
            rel = pattern
        else:
            raise TaskError(f"stageAs {pattern!r} names one file but {len(files)} were given")
        staged.append((src, rel))
    return staged


class Runner:
    """Runs processes of a pipeline like Nextflow's local executor would, one task folder each."""

    def __init__(self, workflows_dir: str | os.PathLike, workdir: str | os.PathLike, params: Mapping[str, Any],
                 env: Mapping[str, str] | None = None, stub: bool = False, task: Mapping[str, Any] | None = None,
                 timeout: float = 900):
        self.processes = {p.name: p for f in sorted(Path(workflows_dir).glob("modules/*.nf")) for p in parse_module(f)}
        self.workdir, self.params, self.stub, self.timeout = Path(workdir), dict(params), stub, timeout
        self.env = dict(os.environ if env is None else env)
        self.task = {"cpus": 1, "attempt": 1, "ext": {}, **(task or {})}
        self._counter, self._lock = itertools.count(1), threading.Lock()

    def run(self, name: str, **inputs: Any) -> TaskResult:
        proc = self.processes[name]
        declared = [n for d in proc.inputs for n in d.names]
        if sorted(declared) != sorted(inputs):
            raise TaskError(f"{name} declares inputs {declared}, got {sorted(inputs)}")
        with self._lock:
            workdir = self.workdir / f"{next(self._counter):03d}-{name}"
        workdir.mkdir(parents=True)
        scope: dict[str, Any] = {"params": self.params, "task": self.task}
        staged_paths: set[str] = set()
        for decl in [item for d in proc.inputs for item in (d.items or [d])]:
            value = inputs[decl.target]
            if decl.kind != "path":
                scope[decl.target] = value
                continue
            targets = [] if value is None or value == [] else _stage_targets(value, decl.options.get("stageAs"))
            for src, rel in targets:
                if rel in staged_paths:
                    raise TaskError(f"{name}: input file name collision on {rel!r}")
                staged_paths.add(rel)
                (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src.resolve(), workdir / rel)
            scope[decl.target] = Staged(rel for _, rel in targets)
        script, scope = render_script(proc.script, scope)  # rendered in stub runs too: it must render
        command = script
        if self.stub:
            if proc.stub is None:
                raise TaskError(f"{name} has no stub: block")
            command, _ = render_script(proc.stub, scope)
        (workdir / ".command.sh").write_text(command)
        with open(workdir / ".command.out", "w") as out, open(workdir / ".command.err", "w") as err:
            rc = subprocess.run(["bash", "-euo", "pipefail", ".command.sh"], cwd=workdir, env=self.env,
                                stdout=out, stderr=err, timeout=self.timeout).returncode
        if rc != 0:
            tail = (workdir / ".command.err").read_text()[-3000:]
            raise TaskError(f"{name} exited with status {rc} in {workdir}\n--- script\n{script}--- stderr\n{tail}")
        outputs = {}
        for k, decl in enumerate(proc.outputs):
            values = [self._output(proc, item, decl, workdir, scope, staged_paths) for item in (decl.items or [decl])]
            value = values[0] if not decl.items else (None if any(v is None for v in values) else tuple(values))
            outputs[decl.options.get("emit", f"out{k}")] = value
        return TaskResult(name, workdir, script, outputs)

    def run_each(self, name: str, inputs: list[dict], workers: int = 2) -> list[TaskResult]:
        """One task per input set, `workers` at a time (Nextflow runs them in parallel too)."""
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda kw: self.run(name, **kw), inputs))

    def _output(self, proc: Process, item: Decl, decl: Decl, workdir: Path, scope: dict, staged: set[str]) -> Any:
        if item.kind == "val":
            return literal(item.target, scope)
        if item.kind != "path":
            raise NfSyntaxError(f"{proc.name}: unsupported output qualifier {item.kind}")
        pattern = literal(item.target, scope)
        kind = item.options.get("type", decl.options.get("type", "any"))
        optional = bool(item.options.get("optional", decl.options.get("optional", False)))
        if any(c in pattern for c in "*?[{"):
            found = [p for p in sorted(workdir.glob(pattern)) if p.relative_to(workdir).as_posix() not in staged
                     and not p.name.startswith(".")]
        else:
            found = [workdir / pattern] if (workdir / pattern).exists() else []
        found = [p for p in found if kind == "any" or (p.is_dir() if kind == "dir" else p.is_file())]
        if not found and not optional:
            listing = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*"))[:60]
            raise TaskError(f"{proc.name}: declared output {pattern!r} is missing in {workdir}; found {listing}")
        if not found:
            return None
        return found if any(c in pattern for c in "*?[{") else found[0]
