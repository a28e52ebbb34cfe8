"""Code that runs on the Ray cluster. It imports ray and pyarrow, never Airflow."""
