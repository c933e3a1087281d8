"""``mtool demo``: the whole life cycle on tiny models, on CPU in a minute or so, with nothing downloaded.

A tiny base model is pre-trained on the spot, two QLoRA adapters each learn a new skill, the adapters are
merged into the base, the two fine-tunes are merged with several methods (and the merge parameters searched
on half of the questions), the adapters are combined in adapter space, every model is scored on the other
half of the questions, and every output is named and carded.
"""
