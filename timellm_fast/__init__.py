"""timellm_fast: fused Triton kernels for Time-LLM's patch embedding and reprogramming layer."""
from . import dispatch, reference
from .cache import reuse_prototypes
from .patch_embedding import PatchEmbedding, patch_embedding
from .reprogramming import ReprogrammingLayer

__all__ = ["PatchEmbedding", "ReprogrammingLayer", "patch_embedding", "reuse_prototypes", "dispatch", "reference"]
__version__ = "0.1.0"
from .patching import Replacement, patch_model, unpatch_model  # noqa: E402

__all__ += ["patch_model", "unpatch_model", "Replacement"]
