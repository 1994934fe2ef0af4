"""The PurificationJob operator (kopf). Its controller, Job builders, status and metrics arrive
with the operator issue; this package holds no torch dependency by design."""
