"""The Celery job queues on Redis: a source (inbox, intake, reaper), its sink (job records), and the dead letters."""
