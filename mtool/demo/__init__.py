"""``mtool demo``: the whole life cycle on tiny models, on CPU in about 20 seconds, with nothing downloaded.

A tiny base model is pre-trained on the spot, two QLoRA adapters each learn a new skill, the adapters are
merged into the base, the two fine-tunes are merged with several methods (and the adapters combined in
adapter space), every model is scored on every skill, and every output is named and carded.
"""
