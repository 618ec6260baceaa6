"""SafeVid: safety alignment of video large multimodal models."""

__version__ = "0.1.0"
