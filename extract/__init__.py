"""Stage one: the backbone registry and the extraction loop that fills the embedding cache."""
