"""The browser app: one module per tab, composed by `qlora_studio.ui.app.build_app`.

Gradio is imported only inside this package. The tabs hold no training logic: they call the core
(run manager, run folders, data, estimator, hardware, chat, presets) and show what it returns.
Importing this package does not import gradio; `qlora_studio.ui.app` does.
"""
