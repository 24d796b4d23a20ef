"""splitprune: compression-aware split learning and split inference."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "split":  # imported on use: `import splitprune` stays light (no torch) for the CLI's first checks
        from splitprune.api import split

        return split
    raise AttributeError(f"module 'splitprune' has no attribute {name!r}")
