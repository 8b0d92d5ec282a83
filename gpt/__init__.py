"""A from-scratch, decoder-only GPT: data prep, model, training, sampling.

Read the modules in the order data flows through them (README.md, "Follow one token through the
code", says what to read in each): config -> sources (hf_dataset) -> tokenizer -> prepare (wordcache,
shards, dataset) -> loader -> model (linear, loss) -> optim (muon) -> trainer (resume, run_folder)
-> checkpoint -> generate (static_decode) -> sampling. Around them: distributed and parallel
(scale-out), device, console, mfu, training_log and metrics (the log), run_layout (what a run folder holds).
"""
