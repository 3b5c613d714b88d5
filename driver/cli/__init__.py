"""The command line (see :mod:`driver`)."""
