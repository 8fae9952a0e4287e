"""The Celery job queues on Redis: a source (inbox, intake, reaper) and its sink (job records)."""
