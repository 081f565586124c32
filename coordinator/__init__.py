"""Pomona's coordinator: reads cluster.yaml, places the model, launches and drives workers;
never imports MLX."""
