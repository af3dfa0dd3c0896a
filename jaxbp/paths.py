"""Where a file can be written: shared by the checkpoints and the command line."""

from __future__ import annotations

import os


def existing_ancestor(path: str) -> str:
    """The nearest of ``path`` (absolute) and its parents that exists: where creating it starts.

    Example:
      >>> import os, tempfile
      >>> root = tempfile.mkdtemp()
      >>> existing_ancestor(os.path.join(root, "runs", "a")) == os.path.abspath(root)
      True
    """
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor


def output_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be written as a file (checked before long work), or ``None``."""
    if not path:
        return "expected a file path; got ''"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"expected a file path; {path!r} is a directory"
    if not os.path.isdir(parent):
        ancestor = existing_ancestor(parent)
        if not os.path.isdir(ancestor):
            return f"{ancestor!r} in {path!r} is a file, not a directory"
        return f"directory {parent!r} of {path!r} does not exist"
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        return f"{path!r} is not writable"
    return None
