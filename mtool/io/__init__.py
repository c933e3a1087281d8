"""mtool's I/O layer: safetensors weights and the folders around them.

* :mod:`~mtool.io.dtypes`: the one table of element types;
* :mod:`~mtool.io.reading`: model folders, shard indexes and lazy reads (the reading policy is stated there);
* :mod:`~mtool.io.header`: the safetensors header, validated as strictly as the safetensors library does;
* :mod:`~mtool.io.jsonfiles` and :mod:`~mtool.io.text`: JSON side files and text files, read with bounds;
* :mod:`~mtool.io.writing`: the streaming safetensors writer;
* :mod:`~mtool.io.hashing`: sha256 of input files (once per command, cached) and of outputs as they are written;
* :mod:`~mtool.io.folders`: atomic output folders, the disk checks around them, and the config/tokenizer files
  that travel with weights;
* :mod:`~mtool.io.staging`: the hidden build folders of outputs, their lock files, and the stale ones.
"""
