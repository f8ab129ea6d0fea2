"""Benchmarks of mlpipe against raw aio-pika, hand-written full paths, FastStream and Celery
(with celery-singleton and psycopg for the full path) on the same broker and stores.

Every figure is measured against its baseline in the same run on the same RabbitMQ, as the
median of interleaved rounds, so only ratios are compared, never absolute times across runs
or machines. Entry point:
``python -m bench.run [--quick]`` (``make bench`` / ``make bench-quick``).
"""
