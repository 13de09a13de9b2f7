"""The deploy topology: compose.yaml, the nginx file docs/DEPLOYMENT.md shows, and the same as local processes."""
