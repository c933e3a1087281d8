"""`mtool train` and `mtool estimate`: LoRA/QLoRA fine-tuning."""
