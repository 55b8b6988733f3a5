"""A process-isolated no-op model for bench/python/ab_roundtrip.py."""
def echo(ctx):
    return lambda x: x
