"""The statestore REST service (rest-v1.md) on FastAPI."""
