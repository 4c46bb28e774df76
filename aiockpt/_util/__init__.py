"""Small helpers every layer may use: console output, human units, logging setup."""
