"""surgeon's version, on the ground floor: the command line prints it and the capture cache keys on it,
and neither may import the package's lazy public face (``surgeon/__init__.py``) that sits above every floor."""

__all__ = ["__version__"]

__version__ = "0.1.0"  # pyproject.toml's [project] version says the same; a test keeps them equal
