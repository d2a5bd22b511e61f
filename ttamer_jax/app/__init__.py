"""Layer 5, application: the whole job and its faces.

:mod:`.pipeline` (train -> traces -> fit -> compare on one workload),
:mod:`.reports` (tables, Markdown reports, JSON), :mod:`.plotting` (matplotlib on
use), :mod:`.cli` (the ``ttamer`` command line: parsing and printing only) and
:mod:`.bench` (speed and memory benchmarks). May import every layer below.
"""
