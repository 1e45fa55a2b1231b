"""Where scBERT's data comes from when it does not fit in memory: streamed token sources and file jobs (private)."""

from ._tokens import CHUNK_SIZE, ModelTokens, chunk_bounds, model_outputs, out_of_core, run_chunks

__all__ = ["CHUNK_SIZE", "ModelTokens", "chunk_bounds", "model_outputs", "out_of_core", "run_chunks"]
