"""The hostile-input corpus: broken and malicious inputs, each run through the CLI by tests/test_hostile_corpus.py.

Every case builds its inputs in a fresh folder (a corrupt safetensors header, a shard index pointing outside its
folder, an adapter config that contradicts its tensors, a YAML alias bomb, a data file in Latin-1, a name with
terminal escapes...), runs one mtool command on them and expects: a non-zero exit, exactly one line on stderr
(``error: what (where). fix``) naming the file or line at fault, no "unexpected" (the CLI's catch-all), no output
folder (nor a hidden build folder), and the inputs byte for byte, mode and modification time as they were.

Modules: :mod:`.cases` (the Case type, the helpers that write inputs), :mod:`.weights` (safetensors headers, shard
indexes, model folders), :mod:`.configs` (adapter configs, merge recipes), :mod:`.records` (training data,
names).
"""
