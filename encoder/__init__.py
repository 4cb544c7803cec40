"""Item encoders: full precision and ternary (packed 2-bit kernel)."""

from encoder.loading import Encoder, load_encoder

__all__ = ["Encoder", "load_encoder"]
