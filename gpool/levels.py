"""The levels every verdict is stated at, defined once and free of imports, so that the
commands' help (gpool.compare) states them without loading the statistics."""

#: The family-wise level every verdict is decided at (a sequential sweep spends it over its
#: looks).
ALPHA = 0.05
#: The power at which the detectable difference and the seeds needed are stated.
POWER = 0.8
#: The practical margin (points of accuracy) within which two groups count as equivalent;
#: a sweep's own verdict takes compare.margin, gpool.compare --margin.
MARGIN = 0.5
