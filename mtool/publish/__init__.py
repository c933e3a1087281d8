"""Publishing model folders on the Hugging Face Hub: ``mtool push``."""
