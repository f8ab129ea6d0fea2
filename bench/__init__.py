"""Benchmarks of mlpipe against raw aio-pika, FastStream and Celery on the same broker.

Every figure is measured against its baseline in the same run on the same RabbitMQ, so only
ratios are compared, never absolute times across runs or machines. Entry point:
``python -m bench.run [--quick]`` (``make bench`` / ``make bench-quick``).
"""
