"""Small stand-ins for tests, examples and smoke runs (not used by training or conversion).

- ``tiny_tokenizer``: a word-level tokenizer with a chat template, built in a second, so the
  suite and the quickstart need no download.
- ``tiny_models``: tiny random Hugging Face models of each supported family (conversion tests).
"""
