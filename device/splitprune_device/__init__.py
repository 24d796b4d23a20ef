"""splitprune-device: the device half of splitprune split inference with ONNX Runtime, without PyTorch."""

__version__ = "0.1.0"
