"""`mtool adapters ...`: inspect, merge into base, combine, extract, resize PEFT LoRA adapters."""
