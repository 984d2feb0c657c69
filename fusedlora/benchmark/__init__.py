"""The benchmark: fusedlora side by side with what users run today (docs/design.md §8).

`python -m fusedlora bench` runs `cli.main`; `cases` defines the problems,
`providers` the implementations under test, `timing` the clocks and the ceilings, `memory` the
saved-activation and peak-memory figures, `report` the table, the JSON and the plot, `model`
the cost model's estimates beside them.
"""
