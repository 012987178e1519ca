"""Chat tab: pick a run, merge it (once; cached in the run folder), and talk to the fine-tuned model
next to the base model it started from, on the same prompt; then export it (`ui/export.py`)."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from ..chat import ChatError, merge_run, stream_reply, system_messages, system_prompt
from ..home import runs_dir
from ..manager import get_manager
from . import export as export_section
from .common import chat_models, notice, read_json, run_folder, safe
from .evaluation import evaluate_named, evaluation_html, examples_dropdown, heldout_prompts


def chat_runs() -> list[str]:
    """Runs that have something to talk to (an adapter or a merged model), newest first."""
    out = []
    for p in runs_dir().iterdir():
        if (p / "adapter" / "adapter_config.json").is_file() or (p / "merged" / "studio_merged.json").is_file():
            st = read_json(p / "status.json", {})
            t = (st.get("created_at") or st.get("started_at")) if isinstance(st, dict) else None
            out.append((t if isinstance(t, (int, float)) else p.stat().st_mtime, p.name))
    return [name for _, name in sorted(out, reverse=True)]


def merged_state(name: str | None) -> str:
    if not name:
        return notice("No run to talk to yet: train one on the Train tab (a stopped run works too).", "info")
    folder = run_folder(name)
    if (folder.merged / "studio_merged.json").is_file():
        return notice(f"{name}: merged, ready.", "ok")
    return notice(f"{name}: not merged yet. Press Merge, or just send a message (it merges first).", "info")


def system_prompt_of(name: str | None) -> str:
    """The system message the run was trained with (`chat.system_prompt`), if any."""
    return system_prompt(run_folder(name)) if name else ""


def refresh(current):
    names = chat_runs()
    value = current if current in names else (names[0] if names else None)
    return gr.Dropdown(choices=names, value=value), merged_state(value), system_prompt_of(value)


def pick_example(name, index):
    """A held-out prompt into the message box, and its reference answer shown beside it."""
    prompts = heldout_prompts(name)
    if index is None or not isinstance(index, int) or not 0 <= index < len(prompts):
        return gr.skip(), ""
    question, reference = prompts[index]
    return question, notice(f"Held out from training; the answer in the data: {reference[:400]}", "info")


def evaluate(name, limit, progress=gr.Progress()):
    result = evaluate_named(name, limit, progress)
    return evaluation_html(result, elem_id="chat-eval-result")


def _refuse_if_training(folder) -> None:
    active = get_manager().active()
    if active is not None and active.path == folder.path:
        raise ChatError(f"{folder.name} is still training: stop it or wait for it to finish, then chat")


def merge(name, progress=gr.Progress()):
    if not name:
        raise ChatError("pick a run first")
    folder = run_folder(name)
    _refuse_if_training(folder)
    t0 = time.time()
    progress(0.0, desc="merging")
    path = merge_run(folder, progress=lambda f, m: progress(f, desc=m))
    chat_models.drop(path)
    return notice(f"{name}: merged into {path} in {time.time() - t0:.0f} s.", "ok")


def _base_model_path(folder) -> Path:
    from ..chat import _base_path  # the core's answer to "which model did this run start from"

    return _base_path(folder)


def send(prompt, name, system, temperature, top_p, max_tokens, compare, tuned_hist, base_hist, progress=gr.Progress()):
    """Stream the fine-tuned model's reply, then the base model's, to the same conversation."""
    prompt = (prompt or "").strip()
    if not prompt:
        yield gr.skip(), gr.skip(), gr.skip(), notice("Type a message first.", "info"), gr.skip()
        return
    if not name:
        raise ChatError("pick a run first (train one on the Train tab)")
    folder = run_folder(name)
    _refuse_if_training(folder)
    tuned_hist = list(tuned_hist or []) + [{"role": "user", "content": prompt}]
    base_hist = list(base_hist or []) + ([{"role": "user", "content": prompt}] if compare else [])
    yield tuned_hist, base_hist, "", notice("Preparing the fine-tuned model …", "info"), gr.skip()
    merged = merge_run(folder, progress=lambda f, m: progress(f, desc=m))
    model, tok = chat_models.get(merged)
    kw = dict(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
    sys_msg = system_messages(folder, system or "")

    def conversation(hist):
        return sys_msg + [{"role": m["role"], "content": _text(m["content"])} for m in hist]

    reply = ""
    for reply in stream_reply(model, tok, conversation(tuned_hist), **kw):
        yield tuned_hist + [{"role": "assistant", "content": reply}], gr.skip(), gr.skip(), "", gr.skip()
    tuned_hist = tuned_hist + [{"role": "assistant", "content": reply or "(empty reply)"}]
    yield tuned_hist, gr.skip(), gr.skip(), "", merged_state(name)
    if not compare:
        return
    base, btok = chat_models.get(_base_model_path(folder))
    reply = ""
    for reply in stream_reply(base, btok, conversation(base_hist), **kw):
        yield gr.skip(), base_hist + [{"role": "assistant", "content": reply}], gr.skip(), "", gr.skip()
    yield gr.skip(), base_hist + [{"role": "assistant", "content": reply or "(empty reply)"}], gr.skip(), "", gr.skip()


def _text(content) -> str:
    """Chatbot message content as plain text (gradio may hand back structured content)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    return str(content)


def build(ctx) -> None:
    gr.Markdown("Talk to what you trained: the fine-tuned model next to the base model, on the same prompt.",
                elem_classes=["qs-tab-intro"])
    with gr.Row(equal_height=True):
        ctx.ch_run = gr.Dropdown(label="Run", choices=[], value=None, elem_id="chat-run", scale=4)
        ctx.ch_refresh = gr.Button("Refresh", scale=1, elem_id="chat-refresh")
        ctx.ch_merge = gr.Button("Merge", scale=1, elem_id="merge")
    ctx.ch_status = gr.HTML(elem_id="merge-status")
    with gr.Accordion("Generation settings", open=False, elem_id="chat-settings"):
        with gr.Row():
            ctx.ch_temp = gr.Slider(label="temperature (0: greedy)", minimum=0.0, maximum=1.5, step=0.05, value=0.0)
            ctx.ch_top_p = gr.Slider(label="top-p", minimum=0.05, maximum=1.0, step=0.05, value=0.9)
            ctx.ch_max = gr.Slider(label="max new tokens", minimum=16, maximum=1024, step=16, value=128, elem_id="chat-max")
        ctx.ch_system = gr.Textbox(label="System prompt (the run's own, from its data)", lines=2, elem_id="chat-system")
        ctx.ch_compare = gr.Checkbox(label="Also ask the base model (side by side)", value=True, elem_id="chat-compare")
    with gr.Row(equal_height=True):
        ctx.ch_tuned = gr.Chatbot(label="Fine-tuned", elem_id="chat-tuned", height=380, buttons=["copy"])
        ctx.ch_base = gr.Chatbot(label="Base model", elem_id="chat-base", height=380, buttons=["copy"])
    with gr.Row(equal_height=True):
        ctx.ch_prompt = gr.Textbox(label="Message", placeholder="Ask something like the examples it was trained on",
                                   elem_id="chat-prompt", scale=5, lines=1, max_lines=6)
        ctx.ch_send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        ctx.ch_clear = gr.Button("Clear", elem_id="chat-clear", scale=1)
    ctx.ch_examples = gr.Dropdown(label="Try a held-out prompt", choices=[], value=None, elem_id="chat-examples")
    ctx.ch_notice = gr.HTML(elem_id="chat-notice")
    with gr.Accordion("Evaluate on its held-out data: base vs fine-tuned", open=False,
                      elem_id="chat-eval-section") as ctx.ch_eval_section:
        gr.Markdown("Both models answer the prompts the run held out from training (or its test data), greedily; "
                    "the answers are scored by their kind (exact match for labels, ROUGE-L and chrF for text, "
                    "JSON fields, SQL execution). The base model's answers are kept, so a second evaluation "
                    "only asks the fine-tuned model.")
        with gr.Row(equal_height=True):
            ctx.ch_eval_limit = gr.Number(label="at most this many prompts", value=50, precision=0, minimum=1,
                                          elem_id="chat-eval-limit", scale=1)
            ctx.ch_eval = gr.Button("Evaluate", elem_id="chat-evaluate", scale=1)
        ctx.ch_eval_out = gr.HTML(elem_id="chat-eval")
    export_section.build(ctx)


def wire(ctx) -> None:
    refresh_safe = safe(lambda msg: (gr.skip(), notice(msg, "error"), gr.skip()))(refresh)
    ctx.tab_chat.select(refresh_safe, ctx.ch_run, [ctx.ch_run, ctx.ch_status, ctx.ch_system])
    ctx.ch_refresh.click(refresh_safe, ctx.ch_run, [ctx.ch_run, ctx.ch_status, ctx.ch_system])
    # .change, not .input: the Train and Runs tabs set the run too ("Talk to it in Chat", "Open in Chat")
    ctx.ch_run.change(safe(lambda msg: (notice(msg, "error"), gr.skip(), gr.skip()))(
        lambda n: (merged_state(n), system_prompt_of(n), examples_dropdown(n))),
        ctx.ch_run, [ctx.ch_status, ctx.ch_system, ctx.ch_examples])
    ctx.ch_examples.input(safe(lambda msg: (gr.skip(), notice(msg, "error")))(pick_example), [ctx.ch_run, ctx.ch_examples],
                          [ctx.ch_prompt, ctx.ch_notice])
    ctx.ch_eval.click(safe(lambda msg: notice(msg, "error"))(evaluate), [ctx.ch_run, ctx.ch_eval_limit], ctx.ch_eval_out,
                      concurrency_limit=1, concurrency_id="generate")
    ctx.ch_merge.click(safe(lambda msg: notice(msg, "error"))(merge), ctx.ch_run, ctx.ch_status, concurrency_limit=1)
    inputs = [ctx.ch_prompt, ctx.ch_run, ctx.ch_system, ctx.ch_temp, ctx.ch_top_p, ctx.ch_max, ctx.ch_compare,
              ctx.ch_tuned, ctx.ch_base]
    outputs = [ctx.ch_tuned, ctx.ch_base, ctx.ch_prompt, ctx.ch_notice, ctx.ch_status]
    send_safe = safe(lambda msg: (gr.skip(), gr.skip(), gr.skip(), notice(msg, "error"), gr.skip()))(send)
    ctx.ch_send.click(send_safe, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
    ctx.ch_prompt.submit(send_safe, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
    ctx.ch_clear.click(lambda: ([], [], ""), None, [ctx.ch_tuned, ctx.ch_base, ctx.ch_notice], queue=False)
    export_section.wire(ctx)
