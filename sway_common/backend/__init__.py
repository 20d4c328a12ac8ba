"""The shared half of every backend: views, result cache, batching, token boundaries, nulls."""
