"""Piece storage on disk (one sparse file per blob, verified pieces) and the node's blob cache."""
