from qlora_studio.ui.app import build_app, launch_options  # the same app as `qlora-studio serve`
demo = build_app()
demo.launch(server_name="127.0.0.1", server_port=7860, **launch_options())
