"""A from-scratch, decoder-only GPT: data prep, model, training, sampling.

Read the modules in the order data flows through them:
config -> sources -> tokenizer -> shards -> prepare -> loader -> model -> optim ->
trainer (with checkpoint and metrics) -> generate.
"""
