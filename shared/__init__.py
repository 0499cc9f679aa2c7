"""The domain model of aetrain: specs, job states, settings, the Redis store and storage layout.

Imports pydantic and redis only, never fastapi, ray or torch.
"""
