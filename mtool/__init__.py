"""mtool: train LoRA/QLoRA adapters, merge models and adapters, name and card the results."""

__version__ = "0.2.0"
