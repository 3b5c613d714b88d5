"""Running a training job: the loop, its placements, Ray, recovery, scaling, sweeps (see :mod:`driver`)."""
