"""fahr: open health foundation models on face photographs.

Import what you need from the sub-packages (``fahr.models``, ``fahr.data``, ...); importing ``fahr``
itself stays cheap (no torch) so the command line starts fast.
"""

__version__ = "0.1.0"
