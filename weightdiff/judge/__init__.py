"""judge stage of weightdiff."""
