"""Small helpers every layer may use: console output and human units."""
