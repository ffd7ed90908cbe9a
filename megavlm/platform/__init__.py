"""Hardware and launcher differences, confined to one package (see DESIGN.md principle 3)."""
