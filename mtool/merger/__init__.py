"""`mtool merge`: mergekit-compatible recipes, streamed tensor by tensor."""
