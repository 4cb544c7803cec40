"""Item encoders (`load_encoder`): the packed ternary model on the native kernel (no torch), full precision
(the `train` extra), and a model-free hashing baseline.
"""

from encoder.loading import Encoder, load_encoder

__all__ = ["Encoder", "load_encoder"]
