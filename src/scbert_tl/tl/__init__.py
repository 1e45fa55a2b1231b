"""Tools: pretrain, fine-tune, annotate, embed, explain."""

__all__: list[str] = []
