"""Deployment checks: `make compose-check` runs docker-compose.yml for real (deploy/compose_check.py)."""
