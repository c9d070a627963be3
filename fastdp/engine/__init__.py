"""The DP engine: per-layer rules and the book-keeping machinery."""
