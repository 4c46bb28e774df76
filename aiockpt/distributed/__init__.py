"""What several ranks need: the side channel between them, and who writes what."""
