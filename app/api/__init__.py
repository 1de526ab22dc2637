"""REST API (/api/v1) and health checks."""
