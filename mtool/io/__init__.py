"""mtool's I/O layer: safetensors weights and the folders around them.

* :mod:`~mtool.io.dtypes`: the one table of element types;
* :mod:`~mtool.io.reading`: headers and lazy reads (the reading policy is stated there);
* :mod:`~mtool.io.writing`: the streaming safetensors writer;
* :mod:`~mtool.io.hashing`: sha256 of input files (once per command, cached) and of outputs as they are written;
* :mod:`~mtool.io.folders`: atomic output folders and the config/tokenizer files that travel with weights.
"""
