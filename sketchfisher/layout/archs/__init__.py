"""Built-in architecture layouts, one small declarative module each. Importing registers them."""

from . import bert, bloom, gpt2, gpt_neox, llama, phi3  # noqa: F401
