"""What the cloud offers analysts beyond the event stream: production baselines on request
(``baseline.py``), Prometheus metrics (``metrics.py``) and the read-only web console with its
JSON API (``web.py``, plots in ``plots.py``)."""
