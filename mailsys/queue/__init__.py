"""The queue: the durable spool, the runner that schedules deliveries, and the sink SMTP feeds."""
