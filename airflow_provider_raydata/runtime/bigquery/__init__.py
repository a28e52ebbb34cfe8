"""BigQuery, one module per job (all import google-cloud-bigquery, an optional extra):

- ``read`` (cluster): the query runs once as a query job with typed query parameters (never
  formatted into the SQL); its result table is read through the BigQuery Storage Read API, one
  Ray read task per stream. Ray's own ``read_bigquery`` uses the cluster's default credentials
  and takes no query parameters, hence this small reader with the caller's access token.
- ``load`` (Airflow worker, through ``hooks.bigquery``; no Ray stage: BigQuery reads the
  committed Parquet files from gs:// itself): ``append`` is a ``WRITE_APPEND`` load job whose job
  id is derived from the load id, so a retry of the same run finds the job that already appended;
  ``overwrite`` one ``WRITE_TRUNCATE`` load job (atomic); ``replace_partition`` a
  ``WRITE_TRUNCATE`` load job into ``table$YYYYMMDD``; ``upsert`` a load job into a staging table
  and one script (``runtime.upsert``'s rules: a repeated-key guard, then one ``MERGE``).
- ``common``: validated, backtick-quoted names and the clients built from an access token.
"""
