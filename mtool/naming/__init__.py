"""`mtool name` and `mtool card`: the naming schema, license resolution, model cards."""
