"""What a run shows: records, telemetry, watch, plots, render, analysis, results (see :mod:`driver`)."""
