"""Built-in architecture layouts, one small declarative module each. Importing registers them."""

from . import bert, bloom, encoder_decoder, fused, gpt2, gpt_neox, llama, mlp, phi3, separate  # noqa: F401
