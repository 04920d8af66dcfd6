"""A reward module that fails when imported (as a user's typo would)."""

raise ImportError("this module needs a package that is not installed")
