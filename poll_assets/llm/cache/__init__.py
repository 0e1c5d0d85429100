"""The response cache: every answer paid for, kept by its request key (SQLite, or PostgreSQL to share it)."""
