"""The study file ``normlab study init PATH.toml`` writes: commented, and it runs as written."""

TEMPLATE = """\
# A normlab study: your data, your model, your question.
# Run it:     normlab study THIS_FILE.toml              (--resume continues it after a stop)
# Change it:  normlab study THIS_FILE.toml --set train.steps=1000 --set 'sweep.norm=["dyt"]'
# It trains every cell of [sweep] (their product) once per seed, then writes report.md,
# results.json and plots into runs/<name>/ (or --out DIR), with the cells ranked by `metric`
# and a verdict for each [[claim]].

name = "my-norms"                    # letters, digits, - and _
title = "LayerNorm, RMSNorm or DyT, Pre-LN or Peri-LN, for a small GPT on Shakespeare?"
seeds = 2                            # seeds per cell: 0 .. seeds-1 (at least 2 give a spread)
# max_seeds = 6                      # add seeds, a round at a time, to the cells of claims still
#                                    # inconclusive, up to this many (the stopping rule is in plan.json)
metric = "val_loss"                  # what the cells are ranked by (image data: "test_acc")

[data]
# Exactly one source. Relative paths are relative to this file.
corpus = "shakespeare"               # built in: "shakespeare", "bible"
# text = "my_corpus.txt"             # a UTF-8 text file, or a folder of them
# tokens = "my_tokens/"              # nanoGPT's train.bin / val.bin (uint16 token ids)
# hf_dataset = "my_saved_dataset/"   # a datasets save_to_disk folder; column = "text"
# images = "my_photos/"              # ImageFolder: one sub-folder of PNG/JPEG per class
# images = "fashion-mnist"           # built in: "fashion-mnist", "mnist5k", "auto"
level = "char"                       # text tokens: "char" or "byte"

[model]
# Exactly one model.
gpt = { n_layer = 4, n_embd = 64, n_head = 4, norm = "layernorm", placement = "pre" }
# convnet = { arch = "plain", widths = [16, 32], depth = 2, norm = "batchnorm" }
# hf_config = "config.json"          # any Hugging Face causal-LM (or image) config, random
#                                    # weights; its norms are swept through convert_norms
# hf = "llama"                       # or a model_type's default config, with
# config = { num_hidden_layers = 4, hidden_size = 64 }   # these fields changed
# factory = "my_models:build"        # a function returning an nn.Module; gets the sweep's
#                                    # model.* values (and vocab_size, block_size) as arguments

[train]
steps = 200
batch_size = 16
lr = 3e-3
block_size = 64                      # tokens per training window
warmup = 20
schedule = "cosine"                  # "cosine", "linear", "constant", "inverse_sqrt"
optimizer = "adamw"                  # "adamw", "adam", "sgd"
weight_decay = 0.0
eval_every = 50                      # steps between validation losses (0: at the end only)

[sweep]
# Any setting mapped to a list of values; the grid is their product times the seeds.
norm = ["layernorm", "rmsnorm", "dyt"]
placement = ["pre", "peri"]
# model.n_layer = [4, 8]             # an option of the model
# train.lr = [1e-3, 3e-3]            # a [train] setting
# norm_kwargs.alpha_init = [0.5, 1.0]   # an option of the norm (DyT's alpha here)

# Claims are optional: each is decided by its rule, written into plan.json before any run.
[[claim]]
id = "dyt-matches-layernorm"
text = "DyT reaches LayerNorm's validation loss (within 2%)"
metric = "val_loss"
a = { norm = "dyt" }
b = { norm = "layernorm" }
rule = { similar = 0.02 }            # the 95% interval of mean a - mean b within 2% of b's mean

[[claim]]
id = "rmsnorm-beats-layernorm"
text = "RMSNorm beats LayerNorm by more than 0.01 in validation loss"
metric = "val_loss"
a = { norm = "rmsnorm" }
b = { norm = "layernorm" }
rule = { better = 0.01 }             # the 95% interval of the gain excludes 0 and the gain is
#                                    # >= 0.01; inside +-0.01 (or reversed) is "not reproduced";
#                                    # level = 0.9 for a 90% interval
# [[claim]]                          # a stability claim: the share of seeds with an event
# metric = "diverged"
# a = { norm = "dyt" }
# rule = { rate = 0.25 }             # diverged (> 0.5) in fewer than 25% of seeds (Wilson interval)
"""
