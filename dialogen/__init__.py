"""dialogen: a dialogue-generation toolkit.

From Python, `dialogen.load()` returns a `ChatModel`:

    import dialogen
    model = dialogen.load()              # the embedded SmolLM2-135M-Instruct; or a path
    print(model.chat("Hi! Who are you?"))

`import dialogen` stays light: torch and the model code load on the first `load()`.
"""

__version__ = "0.1.0"


def load(model: str | None = None, dtype: str | None = None, template: str | None = None, adapter: str | None = None):
    """A `ChatModel` (see `dialogen.api`): `model` None for the embedded default, a .gguf file, a
    Hugging Face directory or a dialogen checkpoint; `dtype` the decode weights (default auto);
    `template` the chat template (default: the model's own); `adapter` a LoRA adapter directory or GGUF LoRA file."""
    from .api import load as _load  # here, not at import time: it imports torch

    return _load(model, dtype, template, adapter)


def __getattr__(name):
    if name == "ChatModel":
        from .api import ChatModel

        return ChatModel
    raise AttributeError(f"module 'dialogen' has no attribute {name!r}")
