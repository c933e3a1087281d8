"""PEFT LoRA adapters as data: the schema of ``adapter_config.json`` (:mod:`~mtool.lora.config`), reading an
adapter folder (:mod:`~mtool.lora.adapter`) and the low-rank math (:mod:`~mtool.lora.lowrank`) that merges,
combines, extracts and resizes them. Used by ``mtool adapters`` and by merge recipes' ``model+adapter``
references."""
