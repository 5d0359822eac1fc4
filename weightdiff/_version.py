"""The package version, in a module of its own so that any stage can import it without
running back up into the package ``__init__`` (which lazily imports the commands)."""

__version__ = "0.1.0"
