"""spd-bench: the microbenchmark CLI (installed as ``spdkernels.bench``; run ``spd-bench --help``).

Layout: ``cli.py`` (arguments, table, JSON, plot), ``timing.py`` (timers, copy bandwidth, device and
version facts), ``registry.py`` (the op registry), and one module per op named after it
(``verify_greedy.py``) holding its shape sets, inputs, byte counts and output check.
"""
