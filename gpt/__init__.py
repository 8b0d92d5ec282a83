"""A from-scratch, decoder-only GPT: data prep, model, training, sampling.

Read the modules in the order data flows through them (README.md, "Follow one token through the
code", says what to read in each): config -> sources (hf_dataset) -> tokenizer -> prepare (wordcache, shards, dataset)
-> loader -> model -> optim (muon) -> trainer (resume) -> checkpoint -> generate (static_decode) -> sampling.
"""
