"""A minimal evaluator of Go's text/template, for the tests only: enough of it to render the TEMPLATE
lines the studio writes into Ollama Modelfiles, the way Ollama (Go's text/template) does.

Covered, with Go's semantics: text and ``{{ }}`` actions with the ``{{-`` / ``-}}`` trim markers (they
remove all white space on that side, newlines included); ``if`` / ``else if`` / ``else`` / ``end``;
``range $i, $v := pipeline`` and ``range pipeline`` (dot becomes the element); variables declared with
``:=`` (scoped to the enclosing block) and assigned with ``=`` (Go 1.11+); ``$`` (the data passed to
Execute); fields (``.Role``, ``$.Messages``); string, integer and boolean literals; parenthesised calls;
the builtins ``eq`` (true if the first argument equals any other), ``ne``, ``and`` / ``or`` (returning an
argument, as Go does), ``not``, ``len`` and ``slice``. Truth is Go's: false, 0, "", nil and empty
lists are false. Anything else (pipelines with ``|``, ``with``, ``define``, other functions) raises.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<open>\()|(?P<close>\))|(?P<decl>:=)|'
                    r'(?P<assign>=)|(?P<comma>,)|(?P<word>\$\w*(?:\.\w+)*|\w+(?:\.\w+)*|(?:\.\w+)+|\.))')


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos:]!r}")
        out.append(m.group(0).strip())
        pos = m.end()
    return [t for t in out if t]


def _parse(template: str) -> list:
    """The template as a tree: str (text), ("out", tokens), ("set", tokens), ("if", [(cond, body)], else),
    ("range", names, tokens, body)."""
    items, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if items and isinstance(items[-1], tuple) and items[-1][0] == "trim":
            text = text.lstrip()
            items.pop()
        items.append(text)
        items.append(("action", m.group(2).strip()))
        if m.group(3):
            items.append(("trim",))
        pos = m.end()
    tail = template[pos:]
    if items and isinstance(items[-1], tuple) and items[-1][0] == "trim":
        tail = tail.lstrip()
        items.pop()
    items.append(tail)

    def block(i: int, stop: tuple[str, ...]):
        body = []
        while i < len(items):
            it = items[i]
            if isinstance(it, str):
                if it:
                    body.append(it)
                i += 1
                continue
            words = it[1].split(None, 1)
            head = words[0] if words else ""
            if head in stop or (head == "else" and "else" in stop):
                return body, i
            if head == "if":
                branches, otherwise = [], []
                cond = _tokens(words[1])
                while True:
                    then, i = block(i + 1, ("else", "end"))
                    branches.append((cond, then))
                    words = items[i][1].split(None, 1)
                    if words[0] == "end":
                        break
                    rest = words[1].split(None, 1) if len(words) > 1 else []
                    if rest and rest[0] == "if":
                        cond = _tokens(rest[1])
                        continue
                    otherwise, i = block(i + 1, ("end",))
                    break
                body.append(("if", branches, otherwise))
                i += 1
            elif head == "range":
                toks = _tokens(words[1])
                names = []
                if ":=" in toks:
                    k = toks.index(":=")
                    names, toks = [t for t in toks[:k] if t != ","], toks[k + 1:]
                inner, i = block(i + 1, ("end",))
                body.append(("range", names, toks, inner))
                i += 1
            elif head in ("end", "else"):
                raise ValueError(f"unexpected {{{{ {it[1]} }}}}")
            else:
                toks = _tokens(it[1])
                body.append(("set", toks) if len(toks) > 1 and toks[1] in (":=", "=") else ("out", toks))
                i += 1
        if stop:
            raise ValueError(f"missing {{{{ end }}}} (looking for {stop})")
        return body, i

    return block(0, ())[0]


def _truth(v) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or (isinstance(v, (list, dict, tuple)) and not v))


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name: str):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise NameError(f"undefined variable {name}")

    def set(self, name: str, value) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise NameError(f"assignment to undeclared variable {name}")


def _field(value, path: list[str]):
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise KeyError(f"no field {name}")
        value = value[name]
    return value


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda x, i=0, j=None: x[i:j],
}


def _eval(toks: list[str], scope: _Scope, dot):
    def operand(i: int):
        t = toks[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            return _eval(toks[i + 1:j - 1], scope, dot), j
        if t.startswith('"'):
            return bytes(t[1:-1], "utf-8").decode("unicode_escape"), i + 1
        if re.fullmatch(r"-?\d+", t):
            return int(t), i + 1
        if t in ("true", "false"):
            return t == "true", i + 1
        if t == ".":
            return dot, i + 1
        if t.startswith("."):
            return _field(dot, t[1:].split(".")), i + 1
        if t.startswith("$"):
            name, *path = t.split(".")
            return _field(scope.get(name), path), i + 1
        raise ValueError(f"not an operand: {t}")

    head = toks[0]
    if head in _FUNCS or head in ("and", "or"):
        args, i = [], 1
        while i < len(toks):
            v, i = operand(i)
            args.append(v)
        if head == "and":
            return next((a for a in args if not _truth(a)), args[-1])
        if head == "or":
            return next((a for a in args if _truth(a)), args[-1])
        return _FUNCS[head](*args)
    value, i = operand(0)
    if i != len(toks):
        raise ValueError(f"unsupported expression: {' '.join(toks)}")
    return value


def _run(nodes: list, scope: _Scope, dot, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            value = _eval(node[1], scope, dot)
            out.append("<no value>" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        elif node[0] == "set":
            name, op, *expr = node[1]
            value = _eval(expr, scope, dot)
            if op == ":=":
                scope.frames[-1][name] = value
            else:
                scope.set(name, value)
        elif node[0] == "if":
            _, branches, otherwise = node
            chosen = next((body for cond, body in branches if _truth(_eval(cond, scope, dot))), otherwise)
            scope.frames.append({})
            _run(chosen, scope, dot, out)
            scope.frames.pop()
        elif node[0] == "range":
            _, names, expr, body = node
            for i, item in enumerate(_eval(expr, scope, dot) or []):
                frame = {}
                if len(names) == 1:
                    frame[names[0]] = item
                elif len(names) == 2:
                    frame[names[0]], frame[names[1]] = i, item
                scope.frames.append(frame)
                _run(body, scope, item, out)
                scope.frames.pop()


def render(template: str, data: dict) -> str:
    """Execute ``template`` on ``data`` (a dict; lists of dicts for .Messages) as Go's text/template would."""
    out: list[str] = []
    _run(_parse(template), _Scope(data), data, out)
    return "".join(out)


def ollama_render(template: str, messages: list[dict], modelfile_system: str | None) -> str:
    """The prompt Ollama builds for a chat request: a Modelfile SYSTEM goes first as a system message when
    the request has none; ``.System`` is the system messages joined; ``.Messages`` holds them all."""
    if modelfile_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile_system}] + list(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return render(template, data)
