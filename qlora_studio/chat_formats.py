"""Chat formats for Ollama: which turn format a model's chat template uses, and the Ollama TEMPLATE,
SYSTEM and stop tokens that reproduce it (never Ollama's own guess).

One table, `FORMATS`: each family's turn markers (the text before and after a system, user and
assistant turn), where a system prompt goes (its own turn, or folded into the first or the last user
turn), and its end-of-turn tokens. `match_format` finds the family from markers in the model's chat
template, then *checks* it: it renders probe conversations with the tokenizer's own
`apply_chat_template` and with the family's pieces (`render`, the same logic as the Go template that
`go_template` writes), and accepts the family only when the texts are identical. What differs between
models of one family is read off the model's own template on the way:

- a text that its template puts before every system prompt (Llama 3.1's "Cutting Knowledge Date: ..."),
  the ``preamble``;
- a default system prompt, used when the conversation has none (SmolLM2's, Qwen 2.5's): it becomes the
  Modelfile's SYSTEM, which Ollama uses exactly when the conversation brings no system message;
- whether the system turn is written even without a system prompt (Llama 3.1: an empty one).

The template's beginning-of-sequence token is left out of TEMPLATE: llama.cpp (and so Ollama) adds it
when the GGUF says so (`tokenizer.ggml.add_bos_token`, checked by the export's verification).
Message contents are used as given (some templates trim them; Go templates cannot).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_SYSTEM = "You answer in one short sentence."
PROBE = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"}]


@dataclass(frozen=True)
class ChatFormat:
    name: str
    label: str  # the families it covers, for people
    markers: tuple[str, ...]  # all of them appear in a chat template of this family
    user: tuple[str, str]  # text before and after a user turn's content
    assistant: tuple[str, str]  # before (= the generation prompt) and after a finished reply; "{eos}": the EOS token
    stops: tuple[str, ...]  # end-of-turn tokens ("{eos}": the tokenizer's EOS token)
    system: tuple[str, str] | None = None  # a system turn of its own: text before and after
    fold: str | None = None  # no system turn: the system prompt goes into the "first" or the "last" user turn ...
    fold_sep: str = "\n\n"  # ... followed by this


FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat("chatml", "ChatML (SmolLM2, Qwen 2 / 2.5 / 3)", ("<|im_start|>",),
               user=("<|im_start|>user\n", "<|im_end|>\n"), assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
               system=("<|im_start|>system\n", "<|im_end|>\n"), stops=("<|im_end|>",)),
    ChatFormat("llama3", "Llama 3 / 3.1 / 3.2 / 3.3", ("<|start_header_id|>", "<|eot_id|>"),
               user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
               system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               stops=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
    ChatFormat("mistral-v7", "Mistral with [SYSTEM_PROMPT] (Mistral Small 3.x)", ("[SYSTEM_PROMPT]", "[INST]"),
               user=("[INST]", "[/INST]"), assistant=("", "{eos}"), system=("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
               stops=("{eos}",)),
    ChatFormat("mistral", "Mistral [INST] (v3, Nemo)", ("[INST]", "[/INST]"),
               user=("[INST]", "[/INST]"), assistant=("", "{eos}"), fold="last", stops=("{eos}",)),
    ChatFormat("gemma", "Gemma 2 / 3", ("<start_of_turn>", "<end_of_turn>"),
               user=("<start_of_turn>user\n", "<end_of_turn>\n"), assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
               fold="first", stops=("<end_of_turn>",)),
    ChatFormat("phi3", "Phi-3 / 3.5", ("<|user|>", "<|assistant|>", "<|end|>"),
               user=("<|user|>\n", "<|end|>\n"), assistant=("<|assistant|>\n", "<|end|>\n"),
               system=("<|system|>\n", "<|end|>\n"), stops=("<|end|>",)),
)


@dataclass
class FormatMatch:
    """A family checked against one model's chat template, with what was read off that template."""

    format: ChatFormat
    eos: str = ""
    preamble: str = ""  # before the system prompt, inside the system turn
    default_system: str = ""  # the template's system prompt when the conversation has none
    always_system: bool = False  # the system turn is written even without a system prompt
    bos: str = ""  # the BOS token text the template starts with ("" if it does not)
    system_refused: bool = False  # the model's template raises on a system message (Gemma 2)
    notes: list[str] = field(default_factory=list)

    def piece(self, text: str) -> str:
        return text.replace("{eos}", self.eos)

    def to_dict(self) -> dict:
        return {"format": self.format.name, "label": self.format.label, "preamble": self.preamble,
                "default_system": self.default_system, "always_system": self.always_system, "bos": self.bos,
                "system_refused": self.system_refused}


def chat_template_text(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), None)
    return t if isinstance(t, str) else ""


def _hf(tokenizer, messages: list[dict], template: str | None = None) -> str:
    kw = {"chat_template": template} if template else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def render(m: FormatMatch, messages: list[dict], system: str | None) -> str:
    """The prompt Ollama builds from `go_template(m)`: ``messages`` as Ollama's ``.Messages`` (system
    messages included; the template skips them) and ``system`` as ``.System`` (the conversation's system
    message, else the Modelfile's SYSTEM)."""
    f, out, first = m.format, "", True
    if f.system is not None and (system or (m.always_system and not m.default_system)):
        out += m.piece(f.system[0]) + m.preamble + (system or "") + m.piece(f.system[1])
    for i, msg in enumerate(messages):
        last = i == len(messages) - 1
        if msg["role"] == "user":
            out += m.piece(f.user[0])
            if system and ((f.fold == "first" and first) or (f.fold == "last" and last)):
                out += system + f.fold_sep
            first = False
            out += msg["content"] + m.piece(f.user[1]) + (m.piece(f.assistant[0]) if last else "")
        elif msg["role"] == "assistant":
            out += m.piece(f.assistant[0]) + msg["content"] + ("" if last else m.piece(f.assistant[1]))
    return out


def _go_text(text: str) -> str:
    """Literal text for a Go template (a "{{" would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(m: FormatMatch) -> str:
    """Ollama's TEMPLATE (a Go text/template over .System and .Messages), the same logic as `render`."""
    f, t = m.format, lambda s: _go_text(m.piece(s))
    parts = []
    if f.system is not None:
        block = t(f.system[0]) + _go_text(m.preamble) + "{{ .System }}" + t(f.system[1])
        parts.append(block if (m.always_system and not m.default_system) else "{{ if .System }}" + block + "{{ end }}")
    if f.fold == "first":
        parts.append("{{- $first := true }}")
    parts.append("{{- range $i, $_ := .Messages }}")
    parts.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    user = '{{- if eq .Role "user" }}' + t(f.user[0])
    if f.fold == "first":
        user += "{{ if and $first $.System }}{{ $.System }}" + _go_text(f.fold_sep) + "{{ end }}{{ $first = false }}"
    elif f.fold == "last":
        user += "{{ if and $last $.System }}{{ $.System }}" + _go_text(f.fold_sep) + "{{ end }}"
    user += "{{ .Content }}" + t(f.user[1]) + "{{ if $last }}" + t(f.assistant[0]) + "{{ end }}"
    parts.append(user)
    parts.append('{{- else if eq .Role "assistant" }}' + t(f.assistant[0]) + "{{ .Content }}{{ if not $last }}"
                 + t(f.assistant[1]) + "{{ end }}")
    parts += ["{{- end }}", "{{- end }}"]
    text = parts[0]
    for part in parts[1:]:  # a new line between actions only: "{{-" would also eat a turn's own whitespace
        if text.endswith("}}"):
            text += "\n" + part
        else:
            text += part.replace("{{-", "{{", 1)
    return text


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: the model's template has {a[i:i + 40]!r}, the format gives {b[i:i + 40]!r}"


def _derive(tokenizer, f: ChatFormat, template: str, override: str | None) -> tuple[FormatMatch | None, str]:
    m = FormatMatch(f, eos=tokenizer.eos_token or "")
    bos = tokenizer.bos_token if tokenizer.bos_token and "bos_token" in template else ""

    def hf(messages):
        text = _hf(tokenizer, messages, override)
        if bos and text.startswith(bos):
            m.bos = bos
            return text[len(bos):]
        return text

    no_system = hf(PROBE[:1])
    try:
        with_system = hf([{"role": "system", "content": PROBE_SYSTEM}] + PROBE[:1])
    except Exception:  # jinja2's exception from the template's raise_exception (Gemma 2)
        with_system, m.system_refused = None, True
    if f.system is not None:
        before, after = m.piece(f.system[0]), m.piece(f.system[1])
        if with_system is None or not with_system.startswith(before) or PROBE_SYSTEM not in with_system:
            return None, "no system turn where the format has one"
        m.preamble = with_system[len(before):with_system.index(PROBE_SYSTEM)]
        if no_system.startswith(before + m.preamble):
            rest = no_system[len(before + m.preamble):]
            end = rest.find(after + m.piece(f.user[0]))
            if end < 0:
                return None, "the system turn without a system prompt does not end where the format's does"
            m.always_system, m.default_system = True, rest[:end]
    for conversation, system in ((PROBE, m.default_system or None),
                                 ([{"role": "system", "content": PROBE_SYSTEM}] + PROBE, PROBE_SYSTEM)):
        try:
            want = hf(conversation)
        except Exception:
            if system == PROBE_SYSTEM and m.system_refused:
                continue
            return None, "the model's template rejects the probe conversation"
        got = render(m, conversation, system)
        if got != want:
            return None, _first_difference(want, got)
    if m.system_refused:
        m.notes.append("the model's own template refuses a system message; the Modelfile puts one at the start of "
                       "the first user turn, as later models of the family do")
    return m, ""


def match_format(tokenizer, template: str | None = None) -> tuple[FormatMatch | None, str]:
    """The family of the tokenizer's chat template (or of ``template``), checked by rendering; or None
    and why none fits."""
    text = template or chat_template_text(tokenizer)
    if not text:
        return None, "the tokenizer has no chat template"
    reasons = []
    for f in FORMATS:
        if not all(mark in text for mark in f.markers):
            continue
        m, why = _derive(tokenizer, f, text, template)
        if m is not None:
            return m, ""
        reasons.append(f"not {f.label}: {why}")
    return None, "; ".join(reasons) or "its chat template has the markers of none of the known families"


def stop_tokens(tokenizer, m: FormatMatch | None, eos_ids=()) -> list[str]:
    """Every end-of-turn token: the family's, the tokenizer's EOS and the generation config's EOS ids;
    only those that are single tokens of the vocabulary."""
    eos = tokenizer.eos_token or ""
    cands = [s.replace("{eos}", eos) for s in (m.format.stops if m else ())] + [eos]
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    cands += [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    vocab, out = tokenizer.get_vocab(), []
    for s in cands:
        if s and s in vocab and s not in out:
            out.append(s)
    return out


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        from .errors import StudioError

        raise StudioError(f"the {what} contains three double quotes in a row, which a Modelfile cannot hold",
                          field=what, hint="edit the system prompt in the data (or the Modelfile by hand)")
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer, system: str | None, eos_ids=(), title: str = "") -> tuple[str, dict]:
    """An Ollama Modelfile for ``gguf_name`` (in the same folder) and what it holds: {"format", "stops",
    "system", "template", "warnings", "match"}. ``system``: the run's system prompt, if it has one."""
    m, why = match_format(tokenizer)
    stops = stop_tokens(tokenizer, m, eos_ids)
    warnings = []
    lines = [f"# {title or gguf_name}: written by QLoRA Studio", f"FROM ./{gguf_name}"]
    default = m.default_system if m else ""
    if m is None:
        warnings.append(f"no TEMPLATE in the Modelfile: this model's chat template is not one of the formats the "
                        f"studio knows ({why}); Ollama will guess one from the GGUF's chat template, which may be wrong")
        lines.append("# no TEMPLATE: the chat format is not one QLoRA Studio knows; Ollama guesses it")
    else:
        lines.append(f"# chat format: {m.format.label}, checked against the model's own chat template")
        lines.append(f"TEMPLATE {_quoted(go_template(m), 'template')}")
        warnings += m.notes
    chosen = system if system else default
    if chosen:
        lines.append(f"SYSTEM {_quoted(chosen, 'system prompt')}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", {"format": m.format.name if m else None, "label": m.format.label if m else None,
                                     "stops": stops, "system": chosen or None, "warnings": warnings,
                                     "bos": m.bos if m else "", "match": m.to_dict() if m else None}
