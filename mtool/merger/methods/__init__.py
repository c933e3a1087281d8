"""Merge methods: pure tensor functions, one module per method family."""
