"""Generic HTTP plumbing: a small HTTP server, a cached async view, and the health page's static files.

Nothing here knows about peers; the daemon's routes (``peerd.daemon.routes``) are built on it.
"""
