"""Routers of the REST API, one module per resource of rest-v1.md."""
