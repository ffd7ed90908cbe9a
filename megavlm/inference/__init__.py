"""Generation over the model in its training layout."""
