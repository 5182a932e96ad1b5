"""Speed, memory, quality-estimate and scaling benchmarks; ``benchmarks/run_all.py`` runs them all (``make bench``)."""
