"""pairing stage of weightdiff."""
