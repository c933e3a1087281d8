"""``mtool moe``: a mixture-of-experts model assembled from dense models, from mergekit-moe's YAML."""
