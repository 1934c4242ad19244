"""Task-free statistics of MoQE: bootstrap intervals, paired tests, losses, controls, report
tables, interleaved latency. Each task's ``report.py`` and ``eval.py`` build on them.

- :mod:`.stats`: bootstrap CI of a mean, paired bootstrap of a difference, exact McNemar.
- :mod:`.losses`: per-sample losses against a reference (the loss matrix's entries).
- :mod:`.controls`: the random router, the copies control, the cost-matched comparison.
- :mod:`.report`: one paired bootstrap table per split and its Markdown formatting.
- :mod:`.latency`: candidates timed interleaved, median and IQR.

Nothing here imports a build stage; heavy dependencies (scipy) are imported lazily.
"""
