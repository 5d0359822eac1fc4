"""measure stage of weightdiff."""
