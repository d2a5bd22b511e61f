"""Layer 5, application: the whole job and its faces.

:mod:`.demo` (the built-in workloads and ``ttamer demo``: train -> traces -> fit ->
compare on one workload), :mod:`.compare` (every policy family on a calibration and a
test split), :mod:`.commands` (the bodies of the other ``ttamer`` commands),
:mod:`.reports` (tables, Markdown reports, JSON), :mod:`.plotting` (matplotlib on use)
and :mod:`.cli` (the ``ttamer`` command line: parsing and process set-up). May import
every layer below. The benchmark harness is not part of the package: ``benchmarks/``
of the source repository.
"""
