"""The HTTP gateway: an OpenAI-compatible Batch API (files, batches), async requests for services
that do not speak Kafka, signed webhooks, and the copy of results to tenant and reply topics.

It sits above the stages: it publishes through ``producers`` and reads results through
``analytics``."""
