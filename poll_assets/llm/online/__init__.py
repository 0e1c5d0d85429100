"""Online calls: the one call path (runner.py) with its call policy and its concurrency and rate limits."""
