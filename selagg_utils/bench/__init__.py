"""Engine room: benchmarking (chapter 7).

`timing` holds the clocks, memory peaks and FLOP counts, `hardware` the device's name and peak,
`rows` one measured step as a `BenchRow`, `ladder` the backbone ladder of steps (eager, fused
attention, half precision, compiled, batch sizes), `probe_rows` the probe-side rows, and `report`
the tables and figures of rows. No chapter before 7 imports it.
"""
