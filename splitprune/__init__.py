"""splitprune: compression-aware split learning and split inference."""

__version__ = "0.1.0"
