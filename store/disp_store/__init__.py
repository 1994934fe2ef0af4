"""The artifact store shared by the runner and the operator: an S3 client with retries
(`disp_store.s3`), the run lease kept in the store, location parsing, credentials from the
environment, and the error classes both sides react to. It imports neither torch nor either side:
the operator's image installs it without the runner."""
