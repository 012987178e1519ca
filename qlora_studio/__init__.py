"""QLoRA Studio: plan, train, diagnose and chat with a QLoRA fine-tune on one GPU or the CPU."""

__version__ = "0.1.0"
