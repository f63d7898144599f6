"""The daemon's HTTP side: /metrics for Prometheus, the swarm health page and its JSON API."""
