"""Preprocessing: align genes to a model panel and bin expression into tokens."""

__all__: list[str] = []
